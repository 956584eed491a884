"""Step: shard the reference catalog by HEALPix, and read the shards around a CCD.

``shard_refcat`` reads the user's catalog once (CSV, FITS or Parquet, any
column layout described by the ``refcat_columns`` config section), checks and
standardizes it and writes one Parquet file per non-empty nested HEALPix pixel,
then ``manifest.json`` last: a present manifest means a complete set of shards.
``load_refcat_region`` reads only the shards that overlap a cone.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow_lib import __version__
from workflow_lib.core.config import RefcatColumns
from workflow_lib.io import atomic_output, read_table, write_table
from workflow_lib.single_frame.refcat import (
    cut_to_cone,
    empty_refcat,
    healpix_index,
    refcat_bands,
    shards_for_region,
    standard_columns,
    standardize_refcat,
)

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]

MANIFEST_NAME = "manifest.json"
_COLUMN_DEFAULTS: dict[str, Any] = {
    "id": "id",
    "ra": "ra",
    "dec": "dec",
    "is_star": "is_star",
    "is_variable": "is_variable",
    "mags": {},
    "mag_errs": {},
}


def shard_path(output_dir: PathLike, pixel: int) -> Path:
    """Path of the shard of nested HEALPix pixel ``pixel``."""
    return Path(output_dir) / f"refcat_{int(pixel)}.parquet"


def shard_refcat(
    *,
    refcat_path: str,
    columns: Mapping[str, Any],
    nside: int,
    output_dir: str | None = None,
    manifest_path: str | None = None,
) -> None:
    """Standardize the catalog at ``refcat_path`` and write its HEALPix shards.

    ``columns`` is the ``input.refcat_columns`` config section as a dict (keys
    left out take the CONTRACT defaults). Writes ``refcat_{pixel}.parquet`` for
    every non-empty nested pixel of ``nside`` into ``output_dir`` and then
    ``manifest.json`` (nside, shards, counts, bands, source). A rule may give
    ``manifest_path`` (its output) instead: the shards then go beside it. An
    existing manifest is removed first and shards of an earlier run that are no
    longer wanted are deleted, so a half-rewritten directory never looks complete.
    """
    if (output_dir is None) == (manifest_path is None):
        raise TypeError("shard_refcat: give exactly one of output_dir and manifest_path")
    if manifest_path is None:
        assert output_dir is not None  # exactly one was given
        manifest = Path(output_dir) / MANIFEST_NAME
    else:
        manifest = Path(manifest_path)
    out = manifest.parent
    out.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    col_map = RefcatColumns.from_dict({**_COLUMN_DEFAULTS, **dict(columns)})
    table = read_table(refcat_path)
    refcat = standardize_refcat(table, col_map, source=str(refcat_path))
    bands = refcat_bands(refcat)
    pix = healpix_index(refcat["ra"].to_numpy(), refcat["dec"].to_numpy(), nside=nside)
    provenance = {
        "package_version": __version__,
        "step": "shard_refcat",
        "source": str(refcat_path),
        "columns": col_map.to_dict(),
        "nside": int(nside),
    }
    counts: dict[str, int] = {}
    order = np.argsort(pix, kind="stable")
    pix_sorted = pix[order]
    bounds = np.flatnonzero(np.diff(pix_sorted)) + 1
    for chunk in np.split(order, bounds):
        if len(chunk) == 0:
            continue
        p = int(pix[chunk[0]])
        write_table(
            refcat.iloc[chunk].reset_index(drop=True),
            shard_path(out, p),
            provenance={**provenance, "healpix": p},
        )
        counts[str(p)] = len(chunk)
    wanted = {shard_path(out, int(p)).name for p in counts}
    for old in out.glob("refcat_*.parquet"):
        if old.name not in wanted:
            old.unlink()
    record = {
        "package_version": __version__,
        "source": str(refcat_path),
        "nside": int(nside),
        "order": "nested",
        "shards": sorted(int(p) for p in counts),
        "counts": counts,
        "n_rows": len(refcat),
        "n_stars": int(refcat["is_star"].sum()),
        "bands": bands,
        "columns": col_map.to_dict(),
    }
    with atomic_output(manifest) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    log.info(
        "refcat %s: %d rows (%d stars), bands %s, %d shard(s) at nside %d in %s",
        refcat_path,
        len(refcat),
        record["n_stars"],
        ",".join(bands),
        len(counts),
        nside,
        out,
    )


def read_manifest(shard_dir: PathLike) -> dict[str, Any]:
    """The manifest of a shard directory; a clear error when sharding is incomplete."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no reference-catalog manifest (shard_refcat did not run or did not finish)"
        )
    return json.loads(path.read_text())


def load_refcat_region(*, shard_dir: str, ra: float, dec: float, radius_deg: float) -> pd.DataFrame:
    """Standardized reference objects within ``radius_deg`` of (ra, dec).

    Reads only the shards overlapping the cone. A cone outside the catalog
    gives an empty frame with the standard columns (not an error: the caller
    decides whether a CCD without reference stars is fatal).
    """
    manifest = read_manifest(shard_dir)
    bands = list(manifest["bands"])
    have = set(int(p) for p in manifest["shards"])
    wanted = [
        p for p in shards_for_region(ra, dec, radius_deg, nside=int(manifest["nside"])) if p in have
    ]
    parts = [read_table(shard_path(shard_dir, p)) for p in wanted]
    if not parts:
        log.info(
            "refcat %s: no shard overlaps (%.5f, %.5f) r=%.4f deg", shard_dir, ra, dec, radius_deg
        )
        return empty_refcat(bands)
    refcat = cut_to_cone(pd.concat(parts, ignore_index=True), ra, dec, radius_deg)
    log.info(
        "refcat %s: %d object(s) within %.4f deg of (%.5f, %.5f) from %d shard(s)",
        shard_dir,
        len(refcat),
        radius_deg,
        ra,
        dec,
        len(wanted),
    )
    return refcat[standard_columns(bands)]
