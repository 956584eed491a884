"""Quality figures from the data alone: no truth table, so they work on a real survey.

- **PA1** (LSST SRD): repeatability of the PSF magnitudes of bright unresolved
  Sources across visits, per band; stars are Sources matched across visits by
  position (friends of friends within ``match_radius_arcsec``), not truth.
- **AM1** (LSST SRD, as validate_drp/faro compute it): the median, over pairs
  of stars about 5' apart (4'-6'), of the rms of their separation across the
  visits that saw both, in mas. A field narrower than the annulus gives NaN
  with ``n_pairs = 0``, never a figure from other scales.
- per-band medians of the CcdVisit table, Object and DIA counts.
- **injection** (``DiaInjection``): the efficiency of the DIASource search against
  the true S/N of point sources injected into the survey's own calexps, with the
  flux bias and position scatter of those found.

Tables in, dict out; the step that writes ``metrics.json`` lives in
:mod:`workflow_lib.steps.qa`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from workflow_lib.core.flags import ARTIFACT_DIA_SOURCE, CcdVisitFlag, DiaSourceFlag
from workflow_lib.core.sky import tangent_plane_arcsec
from workflow_lib.qa.efficiency import efficiency_bins, fit_efficiency
from workflow_lib.qa.metrics import BAD_SOURCE, repeatability

# SRD's PA1 and AM1 use bright stars: S/N >= 50 (faro's "bright" selection).
BRIGHT_SNR = 50.0
MATCH_RADIUS_ARCSEC = 0.5
AM1_ANNULUS_ARCMIN = (4.0, 6.0)
# AM1 pairs grow as the square of the stars; a seeded sample bounds the cost.
AM1_MAX_STARS = 3000
INJECTION_SNR_EDGES = (0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0, np.inf)
# The S/N above which the efficiency goal (>= 95%) and the bright figures hold.
INJECTION_HIGH_SNR = 6.5
INJECTION_BRIGHT_SNR = 20.0


def bright_point_sources(sources: pd.DataFrame, *, snr_min: float = BRIGHT_SNR) -> pd.DataFrame:
    """Unflagged, point-like Sources with PSF-flux S/N >= ``snr_min``."""
    snr = sources["psfFlux"] / sources["psfFluxErr"]
    keep = ((sources["flags"].to_numpy() & BAD_SOURCE) == 0) & (sources["extendedness"] < 0.5)
    return sources[keep & (snr >= snr_min)].reset_index(drop=True)


def match_across_visits(
    sources: pd.DataFrame, *, radius_arcsec: float = MATCH_RADIUS_ARCSEC
) -> pd.DataFrame:
    """``sources`` with a ``star`` column: one id per group of Sources within
    ``radius_arcsec`` of each other (friends of friends). Groups holding two
    Sources of one visit are ambiguous (a blend, a split) and get ``star = -1``."""
    if sources.empty:
        return sources.assign(star=np.zeros(0, dtype=np.int64))
    centre = (float(sources["ra"].median()), float(sources["dec"].median()))
    xy = np.c_[tangent_plane_arcsec(sources["ra"].to_numpy(), sources["dec"].to_numpy(), *centre)]
    pairs = cKDTree(xy).query_pairs(radius_arcsec, output_type="ndarray")
    n = len(sources)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    matched = sources.assign(star=label.astype(np.int64))
    ambiguous = matched.duplicated(["star", "visit"], keep=False)
    bad_stars = matched.loc[ambiguous, "star"].unique()
    matched.loc[matched["star"].isin(bad_stars), "star"] = -1
    return matched


def photometric_repeatability(matched: pd.DataFrame, *, min_visits: int = 3) -> dict[str, Any]:
    """PA1 per band (mmag): :func:`workflow_lib.qa.metrics.repeatability` on matched stars."""
    stars = matched[matched["star"] >= 0]
    return {
        str(band): repeatability(rows, id_column="star", min_visits=min_visits)
        for band, rows in stars.groupby("band")
    }


def astrometric_repeatability(
    matched: pd.DataFrame,
    *,
    annulus_arcmin: tuple[float, float] = AM1_ANNULUS_ARCMIN,
    min_visits: int = 3,
    max_stars: int = AM1_MAX_STARS,
    seed: int = 0,
) -> dict[str, Any]:
    """AM1-style figure (mas) for the pair separations in ``annulus_arcmin``."""
    stars = matched[matched["star"] >= 0]
    counts = stars.groupby("star")["visit"].transform("size")
    stars = stars[counts >= min_visits]
    ids = np.unique(stars["star"].to_numpy())
    if len(ids) > max_stars:
        ids = np.sort(np.random.default_rng(seed).choice(ids, max_stars, replace=False))
        stars = stars[stars["star"].isin(ids)]
    empty = {"median_rms_mas": float("nan"), "n_pairs": 0, "n_stars": len(ids)}
    if len(ids) < 2:
        return empty
    # One row per star, one column per visit: positions in radians (NaN where unseen).
    ra = stars.pivot_table(index="star", columns="visit", values="ra", aggfunc="first")
    dec = stars.pivot_table(index="star", columns="visit", values="dec", aggfunc="first")
    ra_r, dec_r = np.deg2rad(ra.to_numpy()), np.deg2rad(dec.to_numpy())
    centre = (float(np.nanmedian(ra.to_numpy())), float(np.nanmedian(dec.to_numpy())))
    xy = np.c_[
        tangent_plane_arcsec(np.nanmean(ra.to_numpy(), 1), np.nanmean(dec.to_numpy(), 1), *centre)
    ]
    inner, outer = (60.0 * a for a in annulus_arcmin)
    pairs = cKDTree(xy).query_pairs(outer, output_type="ndarray")
    if len(pairs):
        gap = np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T)
        pairs = pairs[gap >= inner]
    if not len(pairs):
        return empty
    i, j = pairs[:, 0], pairs[:, 1]
    separation = _haversine(ra_r[i], dec_r[i], ra_r[j], dec_r[j]) * (180.0 / np.pi * 3.6e6)
    n_common = np.isfinite(separation).sum(axis=1)
    separation = separation[n_common >= min_visits]
    if not len(separation):
        return empty
    rms = np.nanstd(separation, axis=1, ddof=1)
    return {
        "median_rms_mas": float(np.median(rms)),
        "n_pairs": len(rms),
        "n_stars": len(ids),
    }


def _haversine(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    """Angular separation in radians (stable at small angles)."""
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return 2.0 * np.arcsin(np.sqrt(h))


def ccd_visit_summary(ccd_visits: pd.DataFrame) -> dict[str, Any]:
    """Per band: CCD-visits processed and failed, medians of seeing, zero point, sky, astromRms."""
    out: dict[str, Any] = {}
    for band, rows in ccd_visits.groupby("band"):
        ok = rows[(rows["flags"].to_numpy() & int(CcdVisitFlag.FAILED)) == 0]
        out[str(band)] = {
            "n_ccd_visits": len(rows),
            "n_failed": len(rows) - len(ok),
            "seeing_median_arcsec": _median(ok["seeing"]),
            "zero_point_median_mag": _median(ok["zeroPoint"]),
            "sky_median": _median(ok["skyBg"]),
            "astrom_rms_median_mas": 1000.0 * _median(ok["astromRms"]),
        }
    return out


def object_summary(objects: pd.DataFrame) -> dict[str, Any]:
    """Object counts, in all and primary, and primary Objects at S/N >= 5 per band."""
    primary = objects[objects["detect_isPrimary"].astype(bool)]
    bands = sorted(c.split("_", 1)[0] for c in objects.columns if c.endswith("_psfFlux"))
    return {
        "n_objects": len(objects),
        "n_primary": len(primary),
        "n_primary_snr5": {
            b: int((primary[f"{b}_psfFlux"] / primary[f"{b}_psfFluxErr"] >= 5).sum()) for b in bands
        },
    }


def dia_summary(
    dia_sources: pd.DataFrame, dia_ccd: pd.DataFrame, dia_objects: pd.DataFrame | None
) -> dict[str, Any]:
    """DIASources per subtracted CCD-visit, dipoles, the subtractions' quality figures
    (residual ratio at bright stars, blank-sky noise of PSF fluxes), DIAObjects and the
    associated fractions (of all DIASources, and of the clean ones, which all should be)."""
    subtracted = dia_ccd[~dia_ccd["failed"].astype(bool)]
    per_ccd = dia_sources.groupby(["visit", "detector"]).size()
    per_ccd = per_ccd.reindex(pd.MultiIndex.from_frame(subtracted[["visit", "detector"]]))
    flags = dia_sources["flags"].to_numpy(dtype=np.int64)
    clean = dia_sources[(flags & ARTIFACT_DIA_SOURCE) == 0]
    out: dict[str, Any] = {
        "n_ccd_visits_subtracted": len(subtracted),
        "n_ccd_visits_skipped": len(dia_ccd) - len(subtracted),
        "n_dia_sources": len(dia_sources),
        "n_dia_sources_clean": len(clean),
        "n_static_residuals": int((flags & int(DiaSourceFlag.STATIC_RESIDUAL) != 0).sum()),
        "dia_sources_per_ccd_visit_median": _median(per_ccd.fillna(0)),
        "n_dipoles": int(dia_sources["isDipole"].astype(bool).sum()),
    }
    for column, name in (
        ("residualRatio", "residual_ratio_median"),
        ("blankNoiseSigma", "blank_noise_sigma_median"),
    ):
        if column in subtracted:
            out[name] = _median(subtracted[column].dropna())
    if "badSubtraction" in subtracted:
        out["n_bad_subtractions"] = int(subtracted["badSubtraction"].astype(bool).sum())
    if dia_objects is not None:
        out["n_dia_objects"] = len(dia_objects)
        out["fraction_dia_sources_associated"] = (
            float((dia_sources["diaObjectId"] != 0).mean()) if len(dia_sources) else float("nan")
        )
        out["fraction_clean_dia_sources_associated"] = (
            float((clean["diaObjectId"] != 0).mean()) if len(clean) else float("nan")
        )
    return out


def _median(values: pd.Series) -> float:
    return float(values.median()) if len(values) else float("nan")


def survey_metrics(
    sources: pd.DataFrame, ccd_visits: pd.DataFrame, *, objects: pd.DataFrame | None = None
) -> dict[str, Any]:
    """The truth-free single-frame and static-sky figures of a run."""
    matched = match_across_visits(bright_point_sources(sources))
    out: dict[str, Any] = {
        "ccd_visits": ccd_visit_summary(ccd_visits),
        "PA1_mmag": photometric_repeatability(matched),
        "AM1_mas": {
            str(band): astrometric_repeatability(rows) for band, rows in matched.groupby("band")
        },
        "n_bright_point_sources": len(matched),
    }
    if objects is not None:
        out["objects"] = object_summary(objects)
    return out


def injection_summary(injections: pd.DataFrame) -> dict[str, Any]:
    """Efficiency, flux bias and position scatter of injected point sources.

    Efficiency counts an injected source found when a *clean* DIASource (no artifact
    flag) lies within a FWHM of it (``detected``: any DIASource), binned and fitted
    (logistic: ``snr_50``, ``plateau``) against the true S/N; split by whether a
    calexp source lies beneath (``hostFlux`` > 0). The fluxes of bright ones
    (S/N > 20) give the DIASource flux bias (median psfFlux / injected - 1) and the
    forced flux's; the pulls (diffFlux - injected) / diffFluxErr of all say whether the
    errors are right; offsets give the position scatter (robust sigma per axis).
    """
    from astropy.stats import mad_std

    snr = injections["snr"].to_numpy(dtype=np.float64)
    clean = injections["clean"].to_numpy(dtype=bool)
    detected = injections["detected"].to_numpy(dtype=bool)
    hosted = injections["hostFlux"].to_numpy(dtype=np.float64) > 0
    high = snr >= INJECTION_HIGH_SNR

    def fraction(sel: np.ndarray) -> float:
        return float(clean[sel].mean()) if sel.any() else float("nan")

    flags = injections["flags"].to_numpy(dtype=np.int64)
    lost = detected & ~clean
    bright = clean & (snr > INJECTION_BRIGHT_SNR)
    rows = injections[bright]
    pull = (injections["diffFlux"] - injections["injectedFlux"]) / injections["diffFluxErr"]
    offsets = rows[["raOffset", "decOffset"]].to_numpy(dtype=np.float64)
    return {
        "n_injected": len(injections),
        "n_ccd_visits": int(injections.groupby(["visit", "detector"]).ngroups),
        "bins": efficiency_bins(snr, clean, INJECTION_SNR_EDGES),
        "fit": fit_efficiency(snr, clean),
        "fit_any_dia_source": fit_efficiency(snr, detected),
        "efficiency_snr_ge_6p5": fraction(high),
        "efficiency_snr_ge_6p5_on_sources": fraction(high & hosted),
        "efficiency_snr_ge_6p5_blank_sky": fraction(high & ~hosted),
        "fraction_on_sources": float(hosted.mean()) if hosted.size else float("nan"),
        "lost_to_flags": {
            flag.name: n
            for flag in DiaSourceFlag
            if (n := int((lost & ((flags & int(flag)) != 0)).sum()))
        },
        "n_bright": len(rows),
        "flux_bias_snr_gt_20": _median(rows["psfFlux"] / rows["injectedFlux"] - 1.0),
        "forced_flux_bias_snr_gt_20": _median(
            injections.loc[snr > INJECTION_BRIGHT_SNR, "diffFlux"]
            / injections.loc[snr > INJECTION_BRIGHT_SNR, "injectedFlux"]
            - 1.0
        ),
        "forced_pull_sigma": float(mad_std(pull.dropna()))
        if pull.notna().sum() > 1
        else float("nan"),
        "position_sigma_arcsec_snr_gt_20": [
            float(mad_std(offsets[:, k])) if len(rows) > 1 else float("nan") for k in range(2)
        ],
    }
