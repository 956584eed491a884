"""Association and DIA light-curve quality against a simulation's truth (tables in, dict out).

- **association**: per true transient (and variable) with at least two clean
  DIASources matched to it (1"), into how many DIAObjects they went (exactly
  one is the goal); DIAObjects whose members match two true objects 2" or more
  apart (merges).
- **light-curve pulls**: (psfDiffFlux - true difference flux) / psfDiffFluxErr
  on the DiaForcedSource rows of the DIAObject nearest each true transient, at
  visits outside the template window where the template cannot hold the
  transient's light (its flux was zero at every template visit of the band),
  split hostless / hosted; the flux
  bias at true S/N > 20; and the pulls of DIAObjects far from anything varying
  at the visits where they were not detected (true difference 0: the noise
  calibration of psfDiffFluxErr), for DIAObjects with no true object within 3".

Robust sigma is 1.4826 MAD, as the issue's goals state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from astropy.stats import mad_std
from scipy.spatial import cKDTree

from workflow_lib.core.flags import ARTIFACT_DIA_SOURCE, DiaForcedSourceFlag
from workflow_lib.core.sky import tangent_plane_arcsec
from workflow_lib.qa.efficiency import efficiency_bins
from workflow_lib.qa.metrics import pull_histogram

MATCH_ARCSEC = 1.0
MERGE_ARCSEC = 2.0
FAR_ARCSEC = 3.0
# DiaForcedSource rows whose difference flux cannot be compared with truth
# (BLENDED rows are joint fits, kept).
UNUSABLE_DIFF = int(
    DiaForcedSourceFlag.DIFF_FLUX_FAILED
    | DiaForcedSourceFlag.DIFF_NO_DATA_CENTER
    | DiaForcedSourceFlag.NO_DIFFERENCE_IMAGE
)


def robust_sigma(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation (astropy's mad_std; NaN for fewer than 2)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(mad_std(values)) if values.size >= 2 else float("nan")


def _plane(ra: np.ndarray, dec: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    return np.c_[tangent_plane_arcsec(np.asarray(ra, float), np.asarray(dec, float), *centre)]


def _pull_summary(pull: np.ndarray) -> dict[str, Any]:
    pull = pull[np.isfinite(pull)]
    return {
        "n": int(pull.size),
        "median": float(np.median(pull)) if pull.size else float("nan"),
        "robust_sigma": robust_sigma(pull),
        "histogram": pull_histogram(pull),
    }


def association_metrics(
    dia_sources: pd.DataFrame,
    dia_objects: pd.DataFrame,
    truth: pd.DataFrame,
) -> dict[str, Any]:
    """Completeness, splits and merges of the DIAObjects against the true varying objects."""
    centre = (float(truth["ra"].median()), float(truth["dec"].median()))
    tree = cKDTree(_plane(truth["ra"], truth["dec"], centre))
    clean = dia_sources[(dia_sources["flags"].to_numpy() & ARTIFACT_DIA_SOURCE) == 0]
    d, i = tree.query(_plane(clean["ra"], clean["dec"], centre))
    kind = np.where(d < MATCH_ARCSEC, truth["kind"].to_numpy()[i], "none")
    matched = clean.assign(
        truth_id=np.where(d < MATCH_ARCSEC, truth["id"].to_numpy()[i], -1), kind=kind
    )
    out: dict[str, Any] = {}
    for k in ("transient", "variable"):
        rows = matched[matched["kind"] == k]
        per_truth = rows.groupby("truth_id").agg(
            n_sources=("diaSourceId", "size"),
            n_objects=("diaObjectId", lambda s: s[s != 0].nunique()),
            n_unassociated=("diaObjectId", lambda s: int((s == 0).sum())),
        )
        eligible = per_truth[per_truth["n_sources"] >= 2]
        out[k] = {
            "n_with_two_detections": len(eligible),
            "n_in_exactly_one_object": int((eligible["n_objects"] == 1).sum()),
            "fraction_in_one_object": float((eligible["n_objects"] == 1).mean())
            if len(eligible)
            else float("nan"),
            "n_split": int((eligible["n_objects"] > 1).sum()),
        }
    # Merges: a DIAObject whose members match true objects >= 2" apart.
    truth_pos = pd.DataFrame(
        _plane(truth["ra"], truth["dec"], centre), index=truth["id"], columns=["x", "y"]
    )
    linked = matched[(matched["truth_id"] >= 0) & (matched["diaObjectId"] != 0)]
    merges = 0
    for _, ids in linked.groupby("diaObjectId")["truth_id"]:
        unique = np.unique(ids.to_numpy())
        if len(unique) < 2:
            continue
        pos = truth_pos.loc[unique].to_numpy()
        far = np.hypot(*(pos[:, None, :] - pos[None, :, :]).transpose(2, 0, 1)) >= MERGE_ARCSEC
        merges += int(far.any())
    out["n_dia_objects"] = len(dia_objects)
    out["n_merging_true_objects_2arcsec_apart"] = merges
    out["n_dia_sources_associated"] = int((dia_sources["diaObjectId"] != 0).sum())
    out["n_dia_sources"] = len(dia_sources)
    return out


def light_curve_pulls(
    forced: pd.DataFrame,
    dia_objects: pd.DataFrame,
    dia_sources: pd.DataFrame,
    truth: pd.DataFrame,
    lightcurve: pd.DataFrame,
    *,
    template_window: tuple[float | None, float | None],
) -> dict[str, Any]:
    """Pulls of psfDiffFlux against the true difference flux (see the module docstring)."""
    if not len(dia_objects) or not len(forced):
        return {"transient": {"n": 0}, "noise": {"n": 0}}
    centre = (float(truth["ra"].median()), float(truth["dec"].median()))
    varying = truth[truth["kind"].isin(["transient", "variable"])].reset_index(drop=True)
    obj_xy = _plane(dia_objects["ra"], dia_objects["dec"], centre)
    _, i = cKDTree(_plane(varying["ra"], varying["dec"], centre)).query(obj_xy)
    good = forced[(forced["flags"].to_numpy() & UNUSABLE_DIFF) == 0]
    out: dict[str, Any] = {}
    # Transients at visits whose band's template cannot hold their light.
    lo, hi = template_window
    mjd = lightcurve["mjd"].to_numpy()
    in_window = np.ones(len(lightcurve), dtype=bool)
    if lo is not None:
        in_window &= mjd >= lo
    if hi is not None:
        in_window &= mjd <= hi
    template_flux = lightcurve[in_window].groupby(["id", "band"])["flux"].max()
    # Each true object's light curve is that of its nearest DIAObject (within 1"), and a
    # DIAObject counts for its nearest true object only.
    d_obj, i_obj = cKDTree(obj_xy).query(_plane(varying["ra"], varying["dec"], centre))
    mutual = (d_obj < MATCH_ARCSEC) & (i[i_obj] == np.arange(len(varying)))
    link = pd.DataFrame(
        {
            "diaObjectId": dia_objects["diaObjectId"].to_numpy()[i_obj[mutual]],
            "id": varying["id"].to_numpy()[mutual],
            "kind": varying["kind"].to_numpy()[mutual],
            "hostless": varying["host_id"].to_numpy()[mutual] < 0 if "host_id" in varying else True,
        }
    )
    # Only visits outside the template window: a template input shares its noise (and
    # the transient's light, were it on) with the template.
    outside = np.zeros(len(good), dtype=bool)
    epoch = good["midpointMjdTai"].to_numpy()
    if hi is not None:
        outside |= epoch > hi
    if lo is not None:
        outside |= epoch < lo
    rows = good[outside].merge(link[link["kind"] == "transient"], on="diaObjectId")
    rows = rows.merge(lightcurve[["id", "visit", "band", "flux"]], on=["id", "visit", "band"])
    key = pd.MultiIndex.from_frame(rows[["id", "band"]])
    empty_template = template_flux.reindex(key).fillna(0.0).to_numpy() == 0.0
    rows = rows[empty_template]
    pull = ((rows["psfDiffFlux"] - rows["flux"]) / rows["psfDiffFluxErr"]).to_numpy()
    hostless = rows["hostless"].to_numpy(dtype=bool)
    snr = (rows["flux"] / rows["psfDiffFluxErr"]).to_numpy()
    bright = snr > 20
    frac = ((rows["psfDiffFlux"] - rows["flux"]) / rows["flux"]).to_numpy()
    out["transient"] = {
        **_pull_summary(pull),
        "hostless": _pull_summary(pull[hostless]),
        "hosted": _pull_summary(pull[~hostless]),
        "n_snr_gt_20": int(bright.sum()),
        "median_flux_bias_snr_gt_20": float(np.median(frac[bright]))
        if bright.any()
        else float("nan"),
    }
    # Noise: DIAObjects far from every true object, at visits without a DIASource.
    d_any, _ = cKDTree(_plane(truth["ra"], truth["dec"], centre)).query(obj_xy)
    far_ids = dia_objects["diaObjectId"].to_numpy()[d_any > FAR_ARCSEC]
    noise = good[outside & good["diaObjectId"].isin(far_ids).to_numpy()]
    seen = pd.MultiIndex.from_frame(dia_sources[["diaObjectId", "visit"]])
    noise = noise[~pd.MultiIndex.from_frame(noise[["diaObjectId", "visit"]]).isin(seen)]
    out["noise"] = _pull_summary((noise["psfDiffFlux"] / noise["psfDiffFluxErr"]).to_numpy())
    return out


def _template_flux(
    lightcurve: pd.DataFrame, template_window: tuple[float | None, float | None]
) -> pd.Series:
    """Mean true flux of each (id, band) over the template window's visits: what the
    template holds (0 where no template visit saw the object: a transient before it)."""
    lo, hi = template_window
    mjd = lightcurve["mjd"].to_numpy()
    inside = np.ones(len(lightcurve), dtype=bool)
    if lo is not None:
        inside &= mjd >= lo
    if hi is not None:
        inside &= mjd <= hi
    return lightcurve[inside].groupby(["id", "band"])["flux"].mean()


def detection_efficiency(
    dia_sources: pd.DataFrame,
    dia_ccd: pd.DataFrame,
    truth: pd.DataFrame,
    lightcurve: pd.DataFrame,
    *,
    template_window: tuple[float | None, float | None],
    snr_edges: tuple[float, ...] = (0.0, 3.0, 5.0, 7.0, 10.0, 20.0, 50.0, np.inf),
) -> dict[str, Any]:
    """Fraction of true flux changes found as a clean DIASource (within 1"), per true S/N.

    Every truth light-curve point on a subtracted CCD-visit counts; its true
    difference is its flux less the template's (:func:`_template_flux`), its
    noise the median ``psfFluxErr`` of the CCD-visit's faint DIASources
    (|snr| < 20: the sky's noise), so the true S/N needs no truth noise model.
    """
    done = dia_ccd[~dia_ccd["failed"].astype(bool)][["visit", "detector"]]
    faint = dia_sources[np.abs(dia_sources["snr"]) < 20]
    noise = faint.groupby(["visit", "detector"])["psfFluxErr"].median().rename("noise")
    points = lightcurve.merge(done, on=["visit", "detector"]).join(noise, on=["visit", "detector"])
    points = points[np.isfinite(points["noise"])]
    template = _template_flux(lightcurve, template_window)
    key = pd.MultiIndex.from_frame(points[["id", "band"]])
    true_diff = points["flux"].to_numpy() - template.reindex(key).fillna(0.0).to_numpy()
    snr = np.abs(true_diff) / points["noise"].to_numpy()
    position = truth.set_index("id").loc[points["id"], ["ra", "dec"]].to_numpy()
    found = np.zeros(len(points), dtype=bool)
    clean = dia_sources[(dia_sources["flags"].to_numpy() & ARTIFACT_DIA_SOURCE) == 0]
    if len(points) and len(clean):
        centre = (float(truth["ra"].median()), float(truth["dec"].median()))
        for visit, rows in clean.groupby("visit"):
            at = np.flatnonzero(points["visit"].to_numpy() == visit)
            if not at.size:
                continue
            d, _ = cKDTree(_plane(rows["ra"], rows["dec"], centre)).query(
                _plane(position[at, 0], position[at, 1], centre)
            )
            found[at] = d < MATCH_ARCSEC
    bright = snr >= 10
    return {
        "bins": efficiency_bins(snr, found, snr_edges),
        "n_points": len(points),
        "efficiency_snr_gt_10": float(found[bright].mean()) if bright.any() else float("nan"),
    }


def false_positives(
    dia_sources: pd.DataFrame, dia_ccd: pd.DataFrame, truth: pd.DataFrame
) -> dict[str, Any]:
    """Clean DIASources with no true transient or variable within 1", per subtracted CCD-visit;
    split by whether a static truth object lies within 2" (a subtraction residual) or not."""
    done = dia_ccd[~dia_ccd["failed"].astype(bool)][["visit", "detector"]]
    clean = dia_sources[(dia_sources["flags"].to_numpy() & ARTIFACT_DIA_SOURCE) == 0]
    centre = (float(truth["ra"].median()), float(truth["dec"].median()))
    varying = truth[truth["kind"].isin(["transient", "variable"])]
    static = truth[~truth["kind"].isin(["transient", "variable"])]
    xy = _plane(clean["ra"], clean["dec"], centre)
    far_from_varying = np.ones(len(clean), dtype=bool)
    if len(varying) and len(clean):
        d, _ = cKDTree(_plane(varying["ra"], varying["dec"], centre)).query(xy)
        far_from_varying = d >= MATCH_ARCSEC
    near_static = np.zeros(len(clean), dtype=bool)
    if len(static) and len(clean):
        d, _ = cKDTree(_plane(static["ra"], static["dec"], centre)).query(xy)
        near_static = d < MERGE_ARCSEC
    false = clean[far_from_varying].assign(residual=near_static[far_from_varying])
    per_ccd = false.groupby(["visit", "detector"]).size()
    per_ccd = per_ccd.reindex(pd.MultiIndex.from_frame(done), fill_value=0)
    return {
        "n_ccd_visits": len(done),
        "per_ccd_visit_median": float(per_ccd.median()) if len(per_ccd) else float("nan"),
        "per_ccd_visit_mean": float(per_ccd.mean()) if len(per_ccd) else float("nan"),
        "per_ccd_visit": per_ccd.to_numpy().tolist(),
        "n_total": len(false),
        "n_at_static_objects": int(false["residual"].sum()),
    }
