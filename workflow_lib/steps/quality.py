"""Quality of a simulated run's static-sky products against the simulation's truth.

Reads the products of a finished run (Object, ForcedSource, deep and template
coadds) and the truth tables, and calls :func:`workflow_lib.metrics.static_sky_metrics`.
Used by ``dc2-drp metrics`` and by the end-to-end tests.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pandas as pd

from workflow_lib.butler import Butler
from workflow_lib.io.exposure import ProcessingFailed

log = logging.getLogger(__name__)


def coadd_depths(butler: Butler, coadd_type: str = "deepCoadd") -> dict[str, dict[str, float]]:
    """Predicted 5-sigma point-source depth per band: the median over the band's patches.

    Each coadd's sources are detected first (as the Object step does), so that
    the noise-correlation factor is measured on empty sky, not on star wings.
    """
    from workflow_lib.objects import coadd_psf_depth, detect_coadd_sources

    per_band: dict[str, list[dict[str, float]]] = {}
    for ids in butler.list(coadd_type).to_dict("records"):
        try:
            coadd = butler.get(coadd_type, **ids)
        except ProcessingFailed:
            continue
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
    from workflow_lib.objects import (
        detect_coadd_sources,
        measure_objects,
        merge_detections,
        object_id_base,
    )
    from workflow_lib.steps.coadd import read_skymap
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
            )
        )
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def static_sky_quality(
    output_dir: str | os.PathLike[str], *, template_window: tuple[float | None, float | None]
) -> dict[str, Any]:
    """Every static-sky figure of the issue against truth, for a finished simulated run."""
    from workflow_lib.metrics import static_sky_metrics

    butler = Butler(output_dir)
    objects = butler.get("Object")
    bands = sorted({c.split("_", 1)[0] for c in objects.columns if c.endswith("_psfFlux")})
    depths = coadd_depths(butler)
    result = static_sky_metrics(
        objects,
        butler.get("truth_object"),
        depths={b: d["depth_median"] for b, d in depths.items()},
        forced=butler.get("ForcedSource"),
        truth_lightcurve=butler.get("truth_lightcurve"),
        template_objects=template_objects(butler, bands=bands),
        template_window=template_window,
    )
    result["coadd_depths"] = depths
    return result
