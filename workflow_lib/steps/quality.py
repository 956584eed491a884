"""Quality of a simulated run's static-sky products against the simulation's truth.

Reads the products of a finished run (Object, ForcedSource, deep and template
coadds) and the truth tables, and calls :func:`workflow_lib.qa.metrics.static_sky_metrics`.
Used by ``dc2-drp metrics`` and by the end-to-end tests.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pandas as pd

from workflow_lib.io.butler import Butler
from workflow_lib.io.exposure import ProcessingFailed

log = logging.getLogger(__name__)


class DataFootprint:
    """Where a band's coadds have data: ``region(ra, dec)`` for the completeness
    (a star in a hole of the coverage cannot be found, whatever the depth)."""

    def __init__(self) -> None:
        self._maps: list[tuple[Any, np.ndarray]] = []

    def add(self, wcs: Any, has_data: np.ndarray) -> None:
        self._maps.append((wcs, np.asarray(has_data, dtype=bool)))

    def __call__(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        ra, dec = np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)
        inside = np.zeros(ra.size, dtype=bool)
        for wcs, has_data in self._maps:
            x, y = wcs.all_world2pix(ra, dec, 0)
            ix, iy = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
            on = (ix >= 0) & (iy >= 0) & (ix < has_data.shape[1]) & (iy < has_data.shape[0])
            inside[on] |= has_data[iy[on], ix[on]]
        return inside


def coadd_depths(
    butler: Butler,
    coadd_type: str = "deepCoadd",
    footprints: dict[str, DataFootprint] | None = None,
) -> dict[str, dict[str, float]]:
    """Predicted 5-sigma point-source depth per band: the median over the band's patches.

    Each coadd's sources are detected first (as the Object step does), so that
    the noise-correlation factor is measured on empty sky, not on star wings.
    ``footprints`` (filled per band if given) learns where the coadds have data.
    """
    from workflow_lib.objects.measure_objects import coadd_psf_depth, detect_coadd_sources

    per_band: dict[str, list[dict[str, float]]] = {}
    for ids in butler.list(coadd_type).to_dict("records"):
        try:
            coadd = butler.get(coadd_type, **ids)
        except ProcessingFailed:
            continue
        if footprints is not None:
            footprints.setdefault(str(ids["band"]), DataFootprint()).add(
                coadd.wcs, ~coadd.mask_of("NO_DATA")
            )
        detect_coadd_sources(coadd)  # sets the DETECTED plane
        depth = coadd_psf_depth(coadd)
        depth["n_inputs"] = int(coadd.metadata.get("NINPUTS", 0))
        per_band.setdefault(str(ids["band"]), []).append(depth)
    return {
        band: {
            "depth_median": float(np.nanmedian([d["depth_median"] for d in rows])),
            "noise_correlation": float(np.median([d["noise_factor"] for d in rows])),
            "n_patches": len(rows),
            "max_inputs": max(d["n_inputs"] for d in rows),
        }
        for band, rows in sorted(per_band.items())
    }


def template_objects(butler: Butler, *, bands: list[str], threshold_sigma: float = 5.0):
    """Objects detected and measured on the template coadds (for the transient check)."""
    from workflow_lib.io.skymap import read_skymap
    from workflow_lib.objects.measure_objects import (
        detect_coadd_sources,
        measure_objects,
        merge_detections,
        object_id_base,
    )
    from workflow_lib.steps.objects import read_coadd_psf_or_none

    sky = read_skymap(butler.path("skyMap"))
    found = butler.list("templateCoadd")
    tables = []
    for (tract, patch), rows in found.groupby(["tract", "patch"]):
        coadds, coadd_psfs = {}, {}
        for band in rows["band"]:
            ids = {"tract": tract, "patch": patch, "band": band}
            try:
                coadds[str(band)] = butler.get("templateCoadd", **ids)
            except ProcessingFailed:
                continue
            psf_path = butler.path("templateCoaddPsf", **ids)
            if os.path.exists(psf_path):
                coadd_psfs[str(band)] = read_coadd_psf_or_none(str(psf_path))
        if not coadds:
            continue
        tract_info = sky.tract(int(tract))
        detections = {
            b: detect_coadd_sources(c, threshold_sigma=threshold_sigma) for b, c in coadds.items()
        }
        merged = merge_detections(detections, tract_info.patch(int(patch)).wcs)
        tables.append(
            measure_objects(
                coadds,
                merged,
                tract=tract_info,
                patch=tract_info.patch(int(patch)),
                skymap=sky,
                id_base=object_id_base(int(tract), int(patch)),
                bands=bands,
                coadd_psfs=coadd_psfs,
                # Only detections matter here; PSF-matched inputs carry no correction.
                aperture_correction=False,
            )
        )
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def static_sky_quality(
    output_dir: str | os.PathLike[str], *, template_window: tuple[float | None, float | None]
) -> dict[str, Any]:
    """Every static-sky figure of the issue against truth, for a finished simulated run."""
    from workflow_lib.qa.metrics import static_sky_metrics

    butler = Butler(output_dir)
    objects = butler.get("Object")
    bands = sorted({c.split("_", 1)[0] for c in objects.columns if c.endswith("_psfFlux")})
    footprints: dict[str, DataFootprint] = {}
    depths = coadd_depths(butler, footprints=footprints)
    result = static_sky_metrics(
        objects,
        butler.get("truth_object"),
        depths={b: d["depth_median"] for b, d in depths.items()},
        forced=butler.get("ForcedSource"),
        truth_lightcurve=butler.get("truth_lightcurve"),
        template_objects=template_objects(butler, bands=bands),
        template_window=template_window,
        completeness_regions=footprints,
    )
    result["coadd_depths"] = depths
    return result
