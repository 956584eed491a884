"""The run's quality: ``qa/metrics.json`` and the figures of ``snakemake --report``.

``metrics.json`` has a ``survey`` section computed from the data alone (PA1, AM1,
per-band CCD-visit medians, Object and DIA counts: meaningful on a real survey)
and, for simulated input, a ``truth`` section with every figure the stage
issues compare with the simulation's truth. ``dc2-drp check-metrics`` compares
a metrics file with thresholds.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, cast

import numpy as np
import pandas as pd

from workflow_lib import __version__
from workflow_lib.core.paths import ProductPaths
from workflow_lib.io import atomic_output, read_table

log = logging.getLogger(__name__)


def _json_safe(value: Any) -> Any:
    """numpy scalars and arrays, and NaN, as plain JSON (NaN -> null)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_metrics(
    *,
    ccdvisit_table_path: str,
    source_table_path: str,
    object_table_path: str,
    forced_table_path: str,
    metrics_path: str,
    template: dict[str, Any],
    qa: dict[str, Any],
    dia_source_table_path: str | None = None,
    dia_ccd_table_path: str | None = None,
    dia_object_table_path: str | None = None,
    dia_forced_table_path: str | None = None,
    dia_injection_table_path: str | None = None,
    truth_object_path: str | None = None,
    truth_ccdvisit_path: str | None = None,
    truth_lightcurve_path: str | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json``: the truth-free figures, and the truth ones where truth exists."""
    from workflow_lib.qa.survey_metrics import dia_summary, injection_summary, survey_metrics

    ccd_visits = read_table(ccdvisit_table_path)
    sources = read_table(source_table_path)
    objects = read_table(object_table_path)
    metrics: dict[str, Any] = {
        "package_version": __version__,
        "survey": survey_metrics(sources, ccd_visits, objects=objects),
    }
    dia_sources = read_table(dia_source_table_path) if dia_source_table_path else None
    dia_objects = read_table(dia_object_table_path) if dia_object_table_path else None
    if dia_sources is not None and dia_ccd_table_path:
        metrics["survey"]["difference_imaging"] = dia_summary(
            dia_sources, read_table(dia_ccd_table_path), dia_objects
        )
    if dia_injection_table_path:
        metrics["survey"]["injection"] = injection_summary(read_table(dia_injection_table_path))
    if truth_object_path and truth_ccdvisit_path:
        window = (template.get("mjd_min"), template.get("mjd_max"))
        metrics["truth"] = _truth_metrics(
            sources=sources,
            ccd_visits=ccd_visits,
            truth=read_table(truth_object_path),
            truth_ccdvisit=read_table(truth_ccdvisit_path),
            truth_lightcurve=read_table(truth_lightcurve_path) if truth_lightcurve_path else None,
            dia_sources=dia_sources,
            dia_ccd=read_table(dia_ccd_table_path) if dia_ccd_table_path else None,
            dia_objects=dia_objects,
            dia_forced=read_table(dia_forced_table_path) if dia_forced_table_path else None,
            output_dir=str(ProductPaths.of_product("metrics", metrics_path).root)
            if qa["truth_static_sky"]
            else None,
            template_window=window,
        )
    with atomic_output(metrics_path) as tmp:
        tmp.write_text(json.dumps(_json_safe(metrics), indent=2))
    _log_headlines(metrics)
    return metrics


def _truth_metrics(
    *,
    sources: pd.DataFrame,
    ccd_visits: pd.DataFrame,
    truth: pd.DataFrame,
    truth_ccdvisit: pd.DataFrame,
    truth_lightcurve: pd.DataFrame | None,
    dia_sources: pd.DataFrame | None,
    dia_ccd: pd.DataFrame | None,
    dia_objects: pd.DataFrame | None,
    dia_forced: pd.DataFrame | None,
    output_dir: str | None,
    template_window: tuple[float | None, float | None],
) -> dict[str, Any]:
    from workflow_lib.qa.metrics import single_frame_metrics

    out: dict[str, Any] = {
        "single_frame": single_frame_metrics(sources, ccd_visits, truth, truth_ccdvisit)
    }
    if output_dir is not None:
        from workflow_lib.steps.quality import static_sky_quality

        out["static_sky"] = static_sky_quality(output_dir, template_window=template_window)
    if dia_sources is not None and dia_ccd is not None:
        from workflow_lib.qa.dia_metrics import detection_efficiency, false_positives

        out["difference_imaging"] = {
            "false_positives": false_positives(dia_sources, dia_ccd, truth)
        }
        if truth_lightcurve is not None:
            out["difference_imaging"]["efficiency"] = detection_efficiency(
                dia_sources, dia_ccd, truth, truth_lightcurve, template_window=template_window
            )
    if dia_sources is not None and dia_objects is not None:
        from workflow_lib.qa.dia_metrics import association_metrics, light_curve_pulls

        out["association"] = association_metrics(dia_sources, dia_objects, truth)
        if dia_forced is not None and truth_lightcurve is not None:
            out["light_curves"] = light_curve_pulls(
                dia_forced,
                dia_objects,
                dia_sources,
                truth,
                truth_lightcurve,
                template_window=template_window,
            )
    return out


def _log_headlines(metrics: dict[str, Any]) -> None:
    survey = metrics["survey"]
    for band, pa1 in survey["PA1_mmag"].items():
        log.info("PA1 %s: %.1f mmag robust (%d stars)", band, pa1["robust"], pa1["n_stars"])
    for band, am1 in survey["AM1_mas"].items():
        log.info("AM1 %s: %.1f mas (%d pairs)", band, am1["median_rms_mas"], am1["n_pairs"])
    if "truth" in metrics:
        sf = metrics["truth"]["single_frame"]
        log.info(
            "against truth: astrometric rms %.1f mas, |zero point - truth| median %.1f mmag",
            sf["astrometry_rms_mas"],
            sf["zero_point_abs_diff_median_mmag"],
        )


# ---------------------------------------------------------------------------
# The report's figures: each step reads its tables or images, calls
# workflow_lib.qa.plots and writes one PNG (temporary name, then rename).
# ---------------------------------------------------------------------------


def _save(fig: Any, path: str) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    log.info("wrote %s", path)


def plot_ccd_visits(*, ccdvisit_table_path: str, plot_path: str, failed_path: str) -> None:
    """Per-CCD-visit quality against time, and the page listing flagged and failed CCD-visits."""
    from workflow_lib.core.flags import CcdVisitFlag
    from workflow_lib.qa.plots import ccd_visit_figure

    ccd_visits = read_table(ccdvisit_table_path)
    _save(ccd_visit_figure(ccd_visits), plot_path)
    flags = ccd_visits["flags"].to_numpy()
    # The members a Flag iterates over are named ones (Flag.name is None for composites).
    listed = ccd_visits[flags != 0].assign(
        flagNames=[
            ", ".join(cast(str, f.name) for f in CcdVisitFlag(int(v))) for v in flags[flags != 0]
        ]
    )
    columns = ["visit", "detector", "band", "midpointMjdTai", "flagNames", "failReason"]
    table = listed[columns].sort_values(["visit", "detector"])
    n_failed = int(((flags & int(CcdVisitFlag.FAILED)) != 0).sum())
    heading = (
        f"{n_failed} of {len(ccd_visits)} CCD-visits not calibrated, "
        f"{len(table) - n_failed} calibrated with flags"
    )
    page = (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>failed CCD-visits</title>'
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}</style>"
        f"</head><body><h3>{heading}</h3>{table.to_html(index=False, border=0)}</body></html>"
    )
    with atomic_output(failed_path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def _read_coadds(paths: list[str]) -> dict[str, Any]:
    from workflow_lib.io.exposure import ProcessingFailed, read_exposure

    coadds = {}
    for path in paths:
        try:
            coadd = read_exposure(path)
        except ProcessingFailed:  # a coadd recorded as not made: no picture of it
            continue
        coadds[str(coadd.metadata["BAND"])] = coadd
    return coadds


def plot_color_image(
    *, deep_paths: list[str], template_paths: list[str], object_table_path: str, plot_path: str
) -> None:
    """gri picture of a patch's deep coadd with its primary Objects, the template's beside it."""
    from workflow_lib.qa.plots import color_image_figure

    objects = read_table(object_table_path)
    if len(objects):
        ref = objects["refBand"].astype(str).to_numpy()
        flux = np.array([objects[f"{b}_psfFlux"].iloc[k] for k, b in enumerate(ref)])
        err = np.array([objects[f"{b}_psfFluxErr"].iloc[k] for k, b in enumerate(ref)])
        bright = objects["detect_isPrimary"].astype(bool).to_numpy() & (flux / err > 10)
        objects = objects[bright]
    panels = [
        ("deep coadd", _read_coadds(deep_paths), objects),
        ("template coadd", _read_coadds(template_paths), None),
    ]
    _save(color_image_figure(panels), plot_path)


def _stamp(exposure: Any, x: float, y: float, half: int) -> np.ndarray:
    """A (2 half + 1)^2 cut-out centred on pixel (x, y); NaN off the image."""
    out = np.full((2 * half + 1, 2 * half + 1), np.nan)
    ix, iy = int(np.rint(x)), int(np.rint(y))
    ny, nx = exposure.image.shape
    x0, x1 = max(ix - half, 0), min(ix + half + 1, nx)
    y0, y1 = max(iy - half, 0), min(iy + half + 1, ny)
    if x0 < x1 and y0 < y1:
        out[y0 - iy + half : y1 - iy + half, x0 - ix + half : x1 - ix + half] = exposure.image[
            y0:y1, x0:x1
        ]
    return out


def _template_stamp(templates: list[Any | None], calexp: Any, x: float, y: float, half: int) -> Any:
    """The template on the calexp's pixel grid around (x, y), from the coadd that covers it."""
    from scipy.ndimage import map_coordinates

    gy, gx = np.mgrid[-half : half + 1, -half : half + 1]
    ra, dec = calexp.wcs.all_pix2world(gx.ravel() + round(x), gy.ravel() + round(y), 0)
    for template in templates:
        if template is None:
            continue
        tx, ty = template.wcs.all_world2pix(ra, dec, 0)
        ny, nx = template.image.shape
        inside = (tx >= 0) & (ty >= 0) & (tx <= nx - 1) & (ty <= ny - 1)
        if inside.mean() > 0.5:
            values = map_coordinates(template.image, [ty, tx], order=1, cval=np.nan)
            return np.where(inside, values, np.nan).reshape(gx.shape)
    return np.full(gx.shape, np.nan)


def plot_dia_cutouts(*, dia_source_table_path: str, plot_path: str, qa: dict[str, Any]) -> None:
    """Science, template and difference cut-outs of the brightest DIASources and a random sample."""
    from workflow_lib.core.flags import ARTIFACT_DIA_SOURCE
    from workflow_lib.io.exposure import ProcessingFailed, read_exposure
    from workflow_lib.io.skymap import read_skymap
    from workflow_lib.qa.plots import cutout_figure

    paths = ProductPaths.of_product("DiaSource", dia_source_table_path)
    sources = read_table(dia_source_table_path)
    clean = sources[(sources["flags"].to_numpy() & ARTIFACT_DIA_SOURCE) == 0]
    n = int(qa["n_cutouts"])
    brightest = clean.sort_values("snr", key=np.abs, ascending=False).head(n)
    rest = clean.drop(brightest.index)
    sample = rest.sample(min(n, len(rest)), random_state=int(qa["seed"])) if len(rest) else rest
    chosen = pd.concat([brightest.assign(kind="bright"), sample.assign(kind="random")])
    cache: dict[str, Any] = {}

    def load(path: str) -> Any:
        if path not in cache:
            try:
                cache[path] = read_exposure(path)
            except ProcessingFailed:  # a template recorded as not made
                cache[path] = None
        return cache[path]

    sky = read_skymap(paths.path("skyMap"))
    rows = []
    half = 20
    for r in chosen.itertuples():
        ids = {"visit": int(r.visit), "detector": int(r.detector)}
        calexp = load(str(paths.path("calexp", **ids)))
        difference = load(str(paths.path("differenceExp", **ids)))
        band = str(r.band)
        # Only the template coadds of the patches holding the DIASource are read.
        tract_id = int(sky.find_tracts(r.ra, r.dec)[0])
        # a 2" square about the DIASource: the patches whose outer region holds it
        d = 1.0 / 3600.0
        square_ra = r.ra + np.array([-d, d, d, -d]) / np.cos(np.deg2rad(r.dec))
        square_dec = r.dec + np.array([-d, -d, d, d])
        tract = sky.tract(tract_id) if tract_id >= 0 else None
        patches = tract.patches_overlapping(square_ra, square_dec) if tract else []
        templates = [
            load(template)
            for patch in patches
            if os.path.exists(
                template := str(
                    paths.path("templateCoadd", tract=patch.tract, patch=patch.patch, band=band)
                )
            )
        ]
        label = f"{r.kind}: {int(r.visit)}/{int(r.detector)} {band}\nS/N {r.snr:.0f}"
        rows.append(
            (
                label,
                _stamp(calexp, r.x, r.y, half),
                _template_stamp(templates, calexp, r.x, r.y, half),
                _stamp(difference, r.x, r.y, half),
                bool(r.isDipole),
            )
        )
    _save(cutout_figure(rows), plot_path)


def plot_light_curves(
    *,
    dia_forced_table_path: str,
    dia_object_table_path: str,
    dia_source_table_path: str,
    plot_path: str,
    qa: dict[str, Any],
) -> None:
    """Light curves of the DIAObjects with the most DIASources."""
    from matplotlib.figure import Figure

    from workflow_lib.association.light_curves import light_curve, plot_light_curve

    objects = read_table(dia_object_table_path)
    forced = read_table(dia_forced_table_path)
    sources = read_table(dia_source_table_path)
    top = objects.sort_values(["nDiaSources", "diaObjectId"], ascending=[False, True])
    ids = top["diaObjectId"].to_numpy(dtype=np.int64)[: int(qa["n_light_curves"])]
    # Difference flux (left) and direct flux (right), one DIAObject per row.
    fig = Figure(figsize=(14.4, 2.6 * max(len(ids), 1)), layout="constrained")
    axes = fig.subplots(max(len(ids), 1), 2, squeeze=False)
    for object_id, (left, right) in zip(ids, axes, strict=False):
        curve = light_curve(forced, [object_id], sources)
        plot_light_curve(curve, ax=left, flux="psfDiffFlux", title=f"{object_id}: difference")
        plot_light_curve(curve, ax=right, flux="psfFlux", title=f"{object_id}: direct")
    if not len(ids):
        axes[0, 0].text(0.5, 0.5, "no DIAObject", ha="center", va="center")
    # One legend for the figure, outside the panels (every panel has the same bands).
    handles: dict[str, Any] = {}
    for ax in axes.ravel():
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper")
    _save(fig, plot_path)


def plot_injection(*, dia_injection_table_path: str, plot_path: str) -> None:
    """What source injection measured: efficiency, flux and position figures."""
    from workflow_lib.qa.plots import injection_figure
    from workflow_lib.qa.survey_metrics import injection_summary

    injections = read_table(dia_injection_table_path)
    _save(injection_figure(injections, injection_summary(injections)), plot_path)


def plot_truth(
    *, metrics_path: str, source_table_path: str, truth_object_path: str, plot_path: str
) -> None:
    """The figures against the simulation's truth (simulated input only)."""
    from workflow_lib.qa.metrics import match_to_truth_stars
    from workflow_lib.qa.plots import truth_figure
    from workflow_lib.qa.survey_metrics import bright_point_sources

    metrics = json.loads(open(metrics_path, encoding="utf-8").read())
    stars = match_to_truth_stars(
        bright_point_sources(read_table(source_table_path)), read_table(truth_object_path)
    )
    _save(truth_figure(metrics, stars), plot_path)
