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
