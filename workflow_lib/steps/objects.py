"""Objects per patch and forced photometry per (visit, detector, tract).

* ``measure_patch_objects``: detection per band on the deep coadds, merging
  across bands, deblending, per-band measurement, the merged Object rows.
* ``forced_phot_ccd``: PSF fluxes of a tract's primary Objects on one calexp.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from workflow_lib import __version__
from workflow_lib.core.config import ObjectsConfig
from workflow_lib.io import read_tables, write_table
from workflow_lib.io.exposure import ProcessingFailed, read_exposure

log = logging.getLogger(__name__)

# CONTRACT columns of the tables, for the empty ones (a patch or CCD with nothing in it).
FORCED_COLUMNS = {
    "objectId": "int64",
    "visit": "int64",
    "detector": "int64",
    "band": "object",
    "midpointMjdTai": "float64",
    "psfFlux": "float64",
    "psfFluxErr": "float64",
}


def empty_object_table(bands: list[str]) -> pd.DataFrame:
    """An Object table with the CONTRACT columns and no rows."""
    columns = {
        "objectId": "int64",
        "tract": "int64",
        "patch": "int64",
        "ra": "float64",
        "dec": "float64",
        "detect_isPrimary": "bool",
        "refBand": "object",
        "refExtendedness": "float64",
    }
    for band in bands:
        for stem in ("psfFlux", "psfFluxErr", "apFlux", "apFluxErr"):
            columns[f"{band}_{stem}"] = "float64"
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


def read_coadd_psf_or_none(path: str) -> Any:
    """The exact coadd PSF in ``path``, or None for a failure record."""
    from astropy.io import fits

    from workflow_lib.io.coadd_psf import read_coadd_psf

    header = fits.getheader(path, 0)
    if header.get("PROCSTAT") == "FAILED":
        log.warning("%s: no coadd PSF (%s)", path, header.get("PROCFAIL", "failed"))
        return None
    return read_coadd_psf(path)


def measure_patch_objects(
    *,
    coadd_paths: list[str],
    skymap_path: str,
    object_path: str,
    tract: int,
    patch: int,
    bands: list[str],
    objects: dict[str, Any],
    coadd_psf_paths: list[str] | None = None,
) -> pd.DataFrame:
    """Detect, merge, deblend and measure the Objects of one patch.

    ``coadd_psf_paths`` (the coadds' exact CoaddPsf files, in the order of
    ``coadd_paths``) give the PSF fluxes the exact coadd PSF; without them
    the coadds' smooth PSF models are used.
    """
    from workflow_lib.io.skymap import read_skymap
    from workflow_lib.objects.measure_objects import (
        detect_coadd_sources,
        measure_objects,
        merge_detections,
        object_id_base,
    )

    cfg = ObjectsConfig.from_dict(objects)
    sky = read_skymap(skymap_path)
    tract_info = sky.tract(tract)
    patch_info = tract_info.patch(patch)
    if coadd_psf_paths is not None and len(coadd_psf_paths) != len(coadd_paths):
        raise ValueError("coadd_psf_paths must pair with coadd_paths")
    coadds = {}
    coadd_psfs = {}
    for k, path in enumerate(coadd_paths):
        try:
            exposure = read_exposure(path)
        except ProcessingFailed as err:
            log.warning("skipped: %s", err)
            continue
        band = str(exposure.metadata["BAND"]).strip()
        coadds[band] = exposure
        if coadd_psf_paths is not None:
            coadd_psfs[band] = read_coadd_psf_or_none(coadd_psf_paths[k])
    provenance = {
        "package_version": __version__,
        "step": "measure_patch_objects",
        "inputs": [*coadd_paths, *(coadd_psf_paths or [])],
        "objects": objects,
    }
    if not coadds:
        log.warning("tract %d patch %d: no coadd with data; no Objects", tract, patch)
        table = empty_object_table(bands)
        write_table(table, object_path, provenance=provenance)
        return table
    detections = {
        band: detect_coadd_sources(coadd, threshold_sigma=cfg.detection_threshold)
        for band, coadd in coadds.items()
    }
    for band, det in detections.items():
        log.info("band %s: %d detections", band, len(det))
    merged = merge_detections(detections, patch_info.wcs, priority=cfg.ref_band_priority)
    table = measure_objects(
        coadds,
        merged,
        tract=tract_info,
        patch=patch_info,
        skymap=sky,
        ref_band_priority=cfg.ref_band_priority,
        id_base=object_id_base(tract, patch),
        bands=bands,
        coadd_psfs=coadd_psfs,
    )
    log.info(
        "tract %d patch %d: %d Objects (%d primary)",
        tract,
        patch,
        len(table),
        int(table["detect_isPrimary"].sum()) if len(table) else 0,
    )
    write_table(table, object_path, provenance=provenance)
    return table


def forced_phot_ccd(
    *,
    calexp_path: str,
    object_paths: list[str],
    forced_path: str,
    visit: int,
    detector: int,
    tract: int,
) -> pd.DataFrame:
    """Forced PSF photometry of the tract's primary Objects on one calexp."""
    from workflow_lib.objects.forced import forced_photometry

    provenance = {
        "package_version": __version__,
        "step": "forced_phot_ccd",
        "inputs": [calexp_path, *object_paths],
    }
    objects = read_tables(object_paths)
    if len(objects):
        objects = objects[objects["detect_isPrimary"].astype(bool)].reset_index(drop=True)
    try:
        calexp = read_exposure(calexp_path)
    except ProcessingFailed as err:
        log.warning("visit %d detector %d: %s; no forced photometry", visit, detector, err)
        calexp = None
    if calexp is None or not len(objects):
        table = pd.DataFrame({c: pd.Series(dtype=t) for c, t in FORCED_COLUMNS.items()})
    else:
        meta = calexp.metadata
        table = forced_photometry(
            calexp,
            objects,
            visit=visit,
            detector=detector,
            band=str(meta["FILTER"]).strip().lower(),
            midpoint_mjd=float(meta["MJD-OBS"]) + 0.5 * float(meta["EXPTIME"]) / 86400.0,
        )
    table["tract"] = np.int64(tract)
    log.info(
        "visit %d detector %d tract %d: %d forced measurements of %d primary Objects",
        visit,
        detector,
        tract,
        len(table),
        len(objects),
    )
    write_table(table, forced_path, provenance=provenance)
    return table
