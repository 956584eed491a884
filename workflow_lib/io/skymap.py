"""The sky map definition on disk: one JSON file (``skyMap``), written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from workflow_lib.io.atomic import atomic_output
from workflow_lib.static_sky.skymap import SkyMap


def write_skymap(sky: SkyMap, path: str | os.PathLike[str]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(sky.to_dict(), indent=1, sort_keys=True))


def read_skymap(path: str | os.PathLike[str]) -> SkyMap:
    return SkyMap.from_dict(json.loads(Path(path).read_text()))
