"""Steps of the built-in survey simulator: the scene with its truth, and one exposure.

I/O only: the numerics live in :mod:`workflow_lib.sim`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from astropy.io import fits

from workflow_lib import __version__
from workflow_lib.io import read_table, write_csv, write_image_file, write_raw_file, write_table
from workflow_lib.sim.presets import get_preset
from workflow_lib.sim.scene import make_scene
from workflow_lib.sim.survey import plan_survey
from workflow_lib.sim.truth import (
    reference_catalog,
    truth_amplifier,
    truth_ccdvisit,
    truth_lightcurve,
)

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


def _provenance(preset: str, seed: int, **extra: object) -> dict[str, object]:
    return {
        "package_version": __version__,
        "step": "simulate",
        "preset": preset,
        "seed": seed,
        **extra,
    }


def simulate_scene(
    *,
    preset: str,
    seed: int,
    truth_object_path: PathLike,
    truth_lightcurve_path: PathLike,
    truth_ccdvisit_path: PathLike,
    truth_amplifier_path: PathLike,
    refcat_path: PathLike,
) -> None:
    """Generate the sky of a preset and write the four truth tables and the refcat."""
    plan = plan_survey(get_preset(preset), seed)
    scene = make_scene(plan)
    prov = _provenance(preset, seed)
    write_table(scene, truth_object_path, provenance=prov)
    write_table(truth_lightcurve(plan, scene), truth_lightcurve_path, provenance=prov)
    write_table(truth_ccdvisit(plan), truth_ccdvisit_path, provenance=prov)
    write_table(truth_amplifier(plan), truth_amplifier_path, provenance=prov)
    refcat = reference_catalog(plan, scene)
    write_csv(refcat, refcat_path, header_prefix="#")
    log.info(
        "scene %s seed %d: %d objects (%s), %d refcat rows",
        preset, seed, len(scene), scene["kind"].value_counts().to_dict(), len(refcat),
    )  # fmt: skip


def _header(cards: Mapping[str, object]) -> fits.Header:
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    return header


def simulate_exposure(
    *,
    preset: str,
    seed: int,
    exposure: int,
    truth_object_path: PathLike,
    output_paths: Mapping[int, PathLike],
    image_format: str = "raw",
) -> None:
    """Render every detector of ``exposure`` and write one file per detector.

    ``output_paths`` maps detector id -> file; every detector of the plan must
    be present. Raw files hold a data-less primary HDU and one HDU per
    amplifier; eimages hold float32 electrons in the primary HDU.
    """
    from workflow_lib.sim.render import render_exposure_detector

    plan = plan_survey(get_preset(preset), seed)
    output_paths = {int(d): path for d, path in output_paths.items()}
    missing = set(plan.detectors) - set(output_paths)
    if missing:
        raise ValueError(f"output_paths lacks detectors {sorted(missing)}")
    info = plan.exposure_info(exposure)
    scene = read_table(truth_object_path) if info["obstype"] == "science" else None
    for detector in plan.detectors:
        out = Path(output_paths[detector])
        rendered = render_exposure_detector(
            plan, scene, exposure, detector, image_format=image_format
        )
        header = _header(rendered.header)
        if image_format == "eimage":
            assert rendered.eimage is not None
            write_image_file(out, header, [], primary_data=np.asarray(rendered.eimage, np.float32))
        else:
            amps = [(data, _header(cards)) for data, cards in rendered.amplifiers]
            write_raw_file(out, header, amps)
        log.info(
            "wrote %s (%s exposure %d detector %d, %d objects)",
            out, info["obstype"], exposure, detector, rendered.n_objects,
        )  # fmt: skip
