"""Quality of the products against a simulation's truth tables.

Single-frame metrics (issue 3): astrometric rms of bright stars against their
true positions, zero point and seeing against the truth, calibrated PSF flux
offset of bright stars, and photometric repeatability across visits (LSST's PA1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from astropy import units as u
from astropy.coordinates import SkyCoord

from workflow_lib.core.flags import UNRELIABLE_SOURCE, CcdVisitFlag, SourceFlag

# Unreliable sources, and those whose flux the aperture correction could not fix.
BAD_SOURCE = UNRELIABLE_SOURCE | int(SourceFlag.APCORR_FAILED)


def match_to_truth_stars(
    sources: pd.DataFrame, truth: pd.DataFrame, *, radius_arcsec: float = 0.5
) -> pd.DataFrame:
    """Sources matched to the nearest non-variable truth star within ``radius_arcsec``.

    Adds truth_id, truth_ra, truth_dec, truth_flux (nJy in the source's band)
    and sep_arcsec. Sources nearer to a galaxy or transient are not kept.
    """
    static = truth[truth["kind"].isin(["star", "galaxy"])]
    src = SkyCoord(sources["ra"].to_numpy() * u.deg, sources["dec"].to_numpy() * u.deg)
    ref = SkyCoord(static["ra"].to_numpy() * u.deg, static["dec"].to_numpy() * u.deg)
    index, sep, _ = src.match_to_catalog_sky(ref)
    nearest = static.iloc[index].reset_index(drop=True)
    keep = (sep.arcsec < radius_arcsec) & (nearest["kind"].to_numpy() == "star")
    matched = sources.reset_index(drop=True)[keep].copy()
    nearest = nearest[keep]
    matched["truth_id"] = nearest["id"].to_numpy()
    matched["truth_ra"] = nearest["ra"].to_numpy()
    matched["truth_dec"] = nearest["dec"].to_numpy()
    mags = np.array([nearest[f"{b}_mag"].to_numpy()[i] for i, b in enumerate(matched["band"])])
    matched["truth_flux"] = 10.0 ** (-0.4 * (mags - 31.4))
    matched["sep_arcsec"] = sep.arcsec[keep]
    return matched


def single_frame_metrics(
    sources: pd.DataFrame,
    ccd_visits: pd.DataFrame,
    truth_objects: pd.DataFrame,
    truth_ccdvisit: pd.DataFrame,
    *,
    snr_min: float = 50.0,
) -> dict[str, Any]:
    """The issue-3 quality figures; magnitudes in mmag, positions in mas."""
    ok = ccd_visits[(ccd_visits["flags"] & int(CcdVisitFlag.FAILED)) == 0]
    merged = ok.merge(truth_ccdvisit, on=["visit", "detector"], suffixes=("", "_truth"))
    zp_diff = 1000.0 * (merged["zeroPoint"] - merged["zero_point"])
    seeing_ratio = merged["seeing"] / merged["seeing_truth"]

    good = sources[((sources["flags"] & BAD_SOURCE) == 0) & (sources["extendedness"] < 0.5)]
    good = good[good["psfFlux"] / good["psfFluxErr"] > snr_min]
    matched = match_to_truth_stars(good, truth_objects)
    cos_dec = np.cos(np.deg2rad(matched["truth_dec"].to_numpy()))
    d_ra = (matched["ra"] - matched["truth_ra"]).to_numpy() * cos_dec * 3.6e6
    d_dec = (matched["dec"] - matched["truth_dec"]).to_numpy() * 3.6e6
    mag_offset = -2500.0 * np.log10(matched["psfFlux"] / matched["truth_flux"])

    return {
        "n_ccd_visits": len(ccd_visits),
        "n_failed": int(len(ccd_visits) - len(ok)),
        "zero_point_abs_diff_median_mmag": float(np.median(np.abs(zp_diff))),
        "zero_point_diff_median_mmag": float(np.median(zp_diff)),
        "seeing_ratio_median": float(np.median(seeing_ratio)),
        "seeing_abs_rel_diff_max": float(np.max(np.abs(seeing_ratio - 1.0))),
        "n_bright_stars": len(matched),
        "astrometry_rms_mas": float(np.sqrt(np.mean(d_ra**2 + d_dec**2))),
        "astrometry_rms_ra_mas": float(np.sqrt(np.mean(d_ra**2))),
        "astrometry_rms_dec_mas": float(np.sqrt(np.mean(d_dec**2))),
        "astrometry_median_offset_mas": [float(np.median(d_ra)), float(np.median(d_dec))],
        "psf_flux_offset_median_mmag": float(np.median(mag_offset)),
        "pa1_mmag_by_min_snr": {
            str(limit): repeatability(matched[matched["psfFlux"] / matched["psfFluxErr"] > limit])
            for limit in (snr_min, 100.0, 200.0, 400.0)
            if limit >= snr_min
        },
        "astrom_rms_reported_median_mas": float(1000.0 * ok["astromRms"].median()),
    }


def repeatability(
    matched: pd.DataFrame, *, id_column: str = "truth_id", min_visits: int = 3
) -> dict[str, float]:
    """PA1: scatter of stars' magnitudes about their own mean across visits (mmag).

    Stars are the groups of ``id_column`` (a truth id, or a cross-visit match).
    Each star contributes (n - 1) degrees of freedom in each band where it has
    at least ``min_visits`` measurements. ``rms`` is the pooled rms, ``robust``
    the same from the interquartile range (as validate_drp's PA1 is robust to
    the odd blend), and ``noise`` the rms of the reported magnitude errors, so
    that ``sqrt(rms**2 - noise**2)`` is the scatter the errors do not explain.
    """
    flux = matched["psfFlux"].to_numpy()
    frame = pd.DataFrame(
        {
            "id": matched[id_column].to_numpy(),
            "band": matched["band"].to_numpy(),
            "mag": -2.5 * np.log10(flux),
            "err": 2.5 / np.log(10) * matched["psfFluxErr"].to_numpy() / flux,
        }
    )
    frame = frame[frame.groupby(["id", "band"])["mag"].transform("size") >= min_visits]
    if frame.empty:
        nan = float("nan")
        return {"rms": nan, "robust": nan, "noise": nan, "n_stars": 0}
    deviation = frame["mag"] - frame.groupby(["id", "band"])["mag"].transform("mean")
    n_groups = frame.groupby(["id", "band"]).ngroups
    dof_scale = np.sqrt(len(frame) / (len(frame) - n_groups))
    q25, q75 = np.percentile(deviation, [25, 75])
    return {
        "rms": float(1000.0 * np.sqrt(np.sum(deviation**2) / (len(frame) - n_groups))),
        "robust": float(1000.0 * (q75 - q25) / 1.349 * dof_scale),
        "noise": float(1000.0 * np.sqrt(np.mean(frame["err"] ** 2))),
        "n_stars": int(n_groups),
    }


# ---------------------------------------------------------------------------
# Static sky (issue 4): coadd Objects and forced photometry against the truth
# ---------------------------------------------------------------------------

from workflow_lib.core.flags import ForcedSourceFlag, ObjectFlag  # noqa: E402

# Object measurements whose PSF flux is not to be trusted in a metric.
_BAD_OBJECT_BAND = int(
    ObjectFlag.PSF_FLUX_FAILED
    | ObjectFlag.EDGE
    | ObjectFlag.NO_DATA_CENTER
    | ObjectFlag.MASKED
    | ObjectFlag.SATURATED_CENTER
    | ObjectFlag.NO_COADD
)
_BAD_FORCED = int(
    ForcedSourceFlag.PSF_FLUX_FAILED
    | ForcedSourceFlag.EDGE
    | ForcedSourceFlag.NO_DATA_CENTER
    | ForcedSourceFlag.MASKED
)

STATIC_SKY_TARGETS: dict[str, float] = {
    "completeness_depth_max_abs_diff_mag": 0.3,
    "purity_min": 0.99,
    "bright_star_bias_max_abs_mmag": 5.0,
    "forced_pull_sigma_min": 0.9,
    "forced_pull_sigma_max": 1.1,
    "depth_gain_ratio_max_abs_diff": 0.1,
}


PULL_EDGES = np.arange(-5.0, 5.0001, 0.25)


def pull_histogram(pulls: np.ndarray) -> dict[str, Any]:
    """Counts of ``pulls`` in 0.25-wide bins over [-5, 5], and those outside (for plots)."""
    pulls = np.asarray(pulls, dtype=np.float64)
    pulls = pulls[np.isfinite(pulls)]
    counts, _ = np.histogram(pulls, bins=PULL_EDGES)
    return {
        "edges": PULL_EDGES.round(2).tolist(),
        "counts": counts.tolist(),
        "n_below": int((pulls < PULL_EDGES[0]).sum()),
        "n_above": int((pulls > PULL_EDGES[-1]).sum()),
    }


def _robust_sigma(values: np.ndarray) -> float:
    """Interquartile range / 1.349 (NaN for fewer than 2 values)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return float("nan")
    q25, q75 = np.percentile(values, [25, 75])
    return float((q75 - q25) / 1.349)


def _sky(ra: np.ndarray, dec: np.ndarray) -> SkyCoord:
    return SkyCoord(
        np.asarray(ra, dtype=np.float64) * u.deg, np.asarray(dec, dtype=np.float64) * u.deg
    )


def _mag_to_njy(mag: np.ndarray) -> np.ndarray:
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - 31.4))


def _isolated_in_truth(
    truth: pd.DataFrame, index: np.ndarray, band: str, *, radius_arcsec: float, flux_ratio: float
) -> np.ndarray:
    """Truth rows ``index`` with no other truth object brighter than ``flux_ratio`` times
    them (in ``band``) within ``radius_arcsec``."""
    index = np.asarray(index, dtype=np.int64)
    isolated = np.ones(index.size, dtype=bool)
    if index.size == 0 or radius_arcsec <= 0:
        return isolated
    coords = _sky(truth["ra"], truth["dec"])
    mags = truth[f"{band}_mag"].to_numpy(dtype=np.float64) if f"{band}_mag" in truth else None
    # a.search_around_sky(b) returns (indices into b, indices into a, ...).
    other, first, _, _ = coords[index].search_around_sky(coords, radius_arcsec * u.arcsec)
    own = index[first]
    neighbour = own != other
    if mags is not None:
        with np.errstate(invalid="ignore"):
            neighbour &= ~(mags[other] > mags[own] - 2.5 * np.log10(flux_ratio))
    crowded = np.unique(first[neighbour])
    isolated[crowded] = False
    return isolated


def match_objects_to_truth(
    objects: pd.DataFrame,
    truth: pd.DataFrame,
    *,
    radius_arcsec: float = 1.0,
    size_factor: float = 2.0,
) -> pd.DataFrame:
    """For every Object, the nearest truth object (any kind) and whether it is a match.

    A match is within ``max(radius_arcsec, size_factor * hlr_arcsec)`` of the
    truth object (extended galaxies may be centred less precisely, or
    shredded). Returns ``truth_index`` (row of ``truth``), ``truth_id``,
    ``truth_kind``, ``sep_arcsec`` and ``matched``, aligned with ``objects``.
    """
    n = len(objects)
    if n == 0 or len(truth) == 0:
        return pd.DataFrame(
            {
                "truth_index": np.full(n, -1),
                "truth_id": np.full(n, -1),
                "truth_kind": [""] * n,
                "sep_arcsec": np.full(n, np.inf),
                "matched": np.zeros(n, dtype=bool),
            }
        )
    hlr = (
        truth["hlr_arcsec"].to_numpy(dtype=np.float64)
        if "hlr_arcsec" in truth
        else np.zeros(len(truth))
    )
    allowed = np.maximum(radius_arcsec, size_factor * np.nan_to_num(hlr, nan=0.0))
    obj = _sky(objects["ra"], objects["dec"])
    ref = _sky(truth["ra"], truth["dec"])
    # a.search_around_sky(b) returns (indices into b, indices into a, ...).
    idx_o, idx_t, sep, _ = ref.search_around_sky(obj, float(allowed.max()) * u.arcsec)
    sep_arcsec = sep.arcsec
    ok = sep_arcsec <= allowed[idx_t]
    nearest, nearest_sep = obj.match_to_catalog_sky(ref)[:2]
    matched = np.zeros(n, dtype=bool)
    matched[np.unique(idx_o[ok])] = True
    # Prefer the nearest truth object that matches; fall back to the nearest overall.
    best = np.asarray(nearest, dtype=np.int64).copy()
    best_sep = nearest_sep.arcsec.copy()
    if ok.any():
        frame = pd.DataFrame({"o": idx_o[ok], "t": idx_t[ok], "s": sep_arcsec[ok]})
        frame = frame.sort_values("s").drop_duplicates("o")
        best[frame["o"].to_numpy()] = frame["t"].to_numpy()
        best_sep[frame["o"].to_numpy()] = frame["s"].to_numpy()
    return pd.DataFrame(
        {
            "truth_index": best,
            "truth_id": truth["id"].to_numpy()[best],
            "truth_kind": truth["kind"].to_numpy()[best].astype(object),
            "sep_arcsec": best_sep,
            "matched": matched,
        },
        index=objects.index,
    )


def _primary(objects: pd.DataFrame) -> pd.DataFrame:
    if "detect_isPrimary" in objects:
        return objects[objects["detect_isPrimary"].to_numpy(dtype=bool)]
    return objects


def _default_region(objects: pd.DataFrame, margin_arcsec: float = 5.0):
    """The RA/Dec box of the Objects shrunk by ``margin_arcsec`` (for truth selection)."""
    ra, dec = objects["ra"].to_numpy(), objects["dec"].to_numpy()
    if ra.size == 0:
        return lambda r, d: np.zeros(np.size(r), dtype=bool)
    cos = np.cos(np.deg2rad(np.median(dec)))
    m = margin_arcsec / 3600.0
    lo_r, hi_r = ra.min() + m / cos, ra.max() - m / cos
    lo_d, hi_d = dec.min() + m, dec.max() - m
    return lambda r, d: (
        (np.asarray(r) > lo_r)
        & (np.asarray(r) < hi_r)
        & (np.asarray(d) > lo_d)
        & (np.asarray(d) < hi_d)
    )


def _fit_completeness(mag: np.ndarray, found: np.ndarray) -> tuple[float, float, float]:
    """Unbinned maximum-likelihood logistic C(m) = c_max / (1 + exp((m - m50) / width))."""
    from scipy.optimize import minimize

    mag = np.asarray(mag, dtype=np.float64)
    found = np.asarray(found, dtype=bool)
    order = np.argsort(mag)
    running = np.cumsum(found[order]) / np.arange(1, mag.size + 1)
    start = float(mag[order][np.argmin(np.abs(running - 0.5))]) if mag.size else float("nan")

    def nll(p: np.ndarray) -> float:
        m50, log_w, logit_c = p
        c = 1.0 / (1.0 + np.exp(-logit_c))
        prob = c / (1.0 + np.exp(np.clip((mag - m50) / np.exp(log_w), -50, 50)))
        prob = np.clip(prob, 1e-9, 1 - 1e-9)
        return float(-np.sum(np.where(found, np.log(prob), np.log1p(-prob))))

    best = minimize(
        nll,
        [start, np.log(0.2), 4.0],
        method="Nelder-Mead",
        options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 4000},
    )
    m50, log_w, logit_c = best.x
    return float(m50), float(np.exp(log_w)), float(1.0 / (1.0 + np.exp(-logit_c)))


def point_source_completeness(
    objects: pd.DataFrame,
    truth: pd.DataFrame,
    *,
    band: str,
    depth_mag: float | None = None,
    region=None,
    radius_arcsec: float = 0.5,
    bin_width: float = 0.25,
) -> dict[str, Any]:
    """Completeness of non-variable truth stars in ``band`` against their true magnitude.

    A star is found if a primary Object detected in ``band`` lies within
    ``radius_arcsec``. ``region(ra, dec) -> bool`` selects the truth stars
    the coadd covers (default: the Objects' RA/Dec box less 5 arcsec).
    ``m50`` is the magnitude of 50% completeness from an unbinned logistic
    fit (``c_max`` its bright-end plateau); when the faintest 10% of the
    stars are still more than half found, ``m50_reached`` is false, ``m50``
    NaN and ``m50_lower_limit`` given instead. With ``depth_mag`` (the
    coadd's predicted 5-sigma point-source depth, e.g. from
    :func:`workflow_lib.objects.measure_objects.coadd_psf_depth`) ``m50_minus_depth`` and
    ``passed`` (within 0.3 mag; None when not measurable) are added.
    ``bins`` gives the binned curve.
    """
    region = _default_region(objects) if region is None else region
    stars = truth[(truth["kind"] == "star") & np.isfinite(truth[f"{band}_mag"])]
    stars = stars[np.asarray(region(stars["ra"].to_numpy(), stars["dec"].to_numpy()), bool)]
    primary = _primary(objects)
    detected = (
        primary[primary[f"{band}_detected"].to_numpy(dtype=bool)]
        if (f"{band}_detected" in primary)
        else primary
    )
    found = np.zeros(len(stars), dtype=bool)
    if len(stars) and len(detected):
        sep = _sky(stars["ra"], stars["dec"]).match_to_catalog_sky(
            _sky(detected["ra"], detected["dec"])
        )[1]
        found = sep.arcsec < radius_arcsec
    mag = stars[f"{band}_mag"].to_numpy(dtype=np.float64)
    out: dict[str, Any] = {"band": band, "n_stars": len(stars), "n_found": int(found.sum())}
    if len(stars) >= 10:
        m50, width, c_max = _fit_completeness(mag, found)
        out.update({"m50": m50, "width": width, "c_max": c_max})
        edges = np.arange(
            np.floor(mag.min() / bin_width) * bin_width, mag.max() + bin_width, bin_width
        )
        which = np.digitize(mag, edges) - 1
        out["bins"] = [
            {
                "mag": float(edges[k] + bin_width / 2),
                "n": int((which == k).sum()),
                "completeness": float(found[which == k].mean()),
            }
            for k in range(edges.size - 1)
            if (which == k).any()
        ]
    else:
        out.update({"m50": float("nan"), "width": float("nan"), "c_max": float("nan"), "bins": []})
    # The curve must fall below one half within the truth's magnitudes, or m50 is only a
    # lower limit (the simulator's stars stop at r = 25, possibly brighter than the depth).
    faint = mag >= np.quantile(mag, 0.9) if len(stars) else np.zeros(0, dtype=bool)
    reached = bool(len(stars) >= 10 and found[faint].mean() < 0.5)
    out["m50_reached"] = reached
    if not reached and len(stars) >= 10:
        out["m50_lower_limit"] = float(np.quantile(mag, 0.9))
        out["m50"] = float("nan")
    if depth_mag is not None:
        limit = STATIC_SKY_TARGETS["completeness_depth_max_abs_diff_mag"]
        out["depth_mag"] = float(depth_mag)
        out["m50_minus_depth"] = float(out["m50"] - depth_mag)
        if reached:
            out["passed"] = bool(abs(out["m50_minus_depth"]) <= limit)
        elif "m50_lower_limit" in out and out["m50_lower_limit"] > depth_mag + limit:
            out["passed"] = False
        else:
            out["passed"] = None  # not measurable: the truth stars are all brighter
    return out


def object_purity(
    objects: pd.DataFrame,
    truth: pd.DataFrame,
    *,
    snr_min: float = 10.0,
    radius_arcsec: float = 1.0,
    size_factor: float = 2.0,
) -> dict[str, Any]:
    """Fraction of primary Objects with reference-band PSF S/N > ``snr_min`` that match a
    truth object of any kind (see :func:`match_objects_to_truth`); target >= 99%."""
    primary = _primary(objects)
    snr = np.full(len(primary), np.nan)
    for band in primary["refBand"].unique() if len(primary) else []:
        sel = (primary["refBand"] == band).to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            snr[sel] = (primary[f"{band}_psfFlux"] / primary[f"{band}_psfFluxErr"]).to_numpy()[sel]
    bright = primary[snr > snr_min]
    match = match_objects_to_truth(
        bright, truth, radius_arcsec=radius_arcsec, size_factor=size_factor
    )
    n = len(bright)
    purity = float(match["matched"].mean()) if n else float("nan")
    # Purity against the reference-band PSF magnitude, in 0.5-mag bins (for the report).
    ref = bright["refBand"].astype(str).to_numpy()
    flux = np.array([bright[f"{b}_psfFlux"].iloc[k] for k, b in enumerate(ref)], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = 31.4 - 2.5 * np.log10(flux)
    matched = match["matched"].to_numpy(dtype=bool)
    which = np.floor(mag / 0.5)
    bins = [
        {"mag": float((k + 0.5) * 0.5), "n": int(sel.sum()), "purity": float(matched[sel].mean())}
        for k in np.unique(which[np.isfinite(which)])
        for sel in [which == k]
    ]
    return {
        "snr_min": float(snr_min),
        "n_objects": int(n),
        "bins": bins,
        "n_unmatched": int(n - match["matched"].sum()),
        "purity": purity,
        "unmatched_object_ids": bright["objectId"][~match["matched"]].astype(int).tolist()[:50],
        "passed": bool(n and purity >= STATIC_SKY_TARGETS["purity_min"]),
    }


def bright_star_flux_bias(
    objects: pd.DataFrame,
    truth: pd.DataFrame,
    *,
    band: str,
    snr_min: float = 100.0,
    radius_arcsec: float = 0.5,
    isolation_arcsec: float = 2.0,
    neighbour_flux_ratio: float = 0.1,
) -> dict[str, Any]:
    """Median of -2.5 log10(psfFlux / true flux) (mmag) of bright isolated truth stars.

    Primary Objects with clean ``band`` measurements and S/N > ``snr_min``,
    matched to a non-variable truth star within ``radius_arcsec`` that has no
    truth neighbour brighter than ``neighbour_flux_ratio`` times it within
    ``isolation_arcsec``. Target: |median| <= 5 mmag.
    """
    primary = _primary(objects)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = (primary[f"{band}_psfFlux"] / primary[f"{band}_psfFluxErr"]).to_numpy()
    clean = (
        (primary[f"{band}_flags"].to_numpy() & _BAD_OBJECT_BAND) == 0
        if (f"{band}_flags" in primary)
        else np.ones(len(primary), dtype=bool)
    )
    sel = primary[clean & (snr > snr_min)]
    stars = truth[truth["kind"] == "star"]
    nan = float("nan")
    if len(sel) == 0 or len(stars) == 0:
        return {
            "band": band,
            "n_stars": 0,
            "median_mmag": nan,
            "robust_scatter_mmag": nan,
            "passed": False,
        }
    index, sep, _ = _sky(sel["ra"], sel["dec"]).match_to_catalog_sky(
        _sky(stars["ra"], stars["dec"])
    )
    ok = sep.arcsec < radius_arcsec
    truth_rows = stars.index.to_numpy()[index[ok]]
    positions = truth.index.get_indexer(truth_rows)
    isolated = _isolated_in_truth(
        truth, positions, band, radius_arcsec=isolation_arcsec, flux_ratio=neighbour_flux_ratio
    )
    flux = sel[f"{band}_psfFlux"].to_numpy()[ok][isolated]
    true = _mag_to_njy(truth[f"{band}_mag"].to_numpy()[positions][isolated])
    dmag = -2500.0 * np.log10(flux / true)
    median = float(np.median(dmag)) if dmag.size else nan
    return {
        "band": band,
        "n_stars": int(dmag.size),
        "median_mmag": median,
        "robust_scatter_mmag": _robust_sigma(dmag),
        "passed": bool(
            dmag.size and abs(median) <= STATIC_SKY_TARGETS["bright_star_bias_max_abs_mmag"]
        ),
    }


def coadd_depth_gain(
    objects: pd.DataFrame,
    forced: pd.DataFrame,
    *,
    band: str,
    min_snr: float = 5.0,
    max_snr: float = 50.0,
) -> dict[str, Any]:
    """Is the coadd as deep as its N inputs together (errors down by sqrt(N))?

    For primary point-like Objects with clean ``band`` measurements at coadd
    S/N in [``min_snr``, ``max_snr``] (sky-limited), compares the coadd
    psfFluxErr with the inverse-variance combination of the same Object's
    forced psfFluxErr on the N calexps (``1 / sqrt(sum 1 / err_i^2)``; equal
    inputs: ``err_1 / sqrt(N)``). ``ratio`` is the median of coadd error over
    that combination (1 = the full sqrt(N) gain; target within 0.1 of 1);
    ``gain_mag`` the median 2.5 log10(median single error / coadd error),
    ``expected_gain_mag`` the median 1.25 log10(N).
    """
    nan = float("nan")
    out: dict[str, Any] = {
        "band": band,
        "n": 0,
        "ratio": nan,
        "gain_mag": nan,
        "expected_gain_mag": nan,
        "median_n_inputs": nan,
        "passed": False,
    }
    if len(objects) == 0 or len(forced) == 0 or f"{band}_psfFluxErr" not in objects:
        return out
    primary = _primary(objects)
    flux, err = primary[f"{band}_psfFlux"].to_numpy(), primary[f"{band}_psfFluxErr"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / err
    keep = (snr >= min_snr) & (snr <= max_snr)
    if f"{band}_flags" in primary:
        keep &= (primary[f"{band}_flags"].to_numpy() & _BAD_OBJECT_BAND) == 0
    if "refExtendedness" in primary:
        keep &= primary["refExtendedness"].to_numpy() == 0
    coadd = pd.Series(err[keep], index=primary["objectId"].to_numpy()[keep])
    rows = forced[(forced["band"] == band) & ((forced["flags"].to_numpy() & _BAD_FORCED) == 0)]
    rows = rows[rows["objectId"].isin(coadd.index) & (rows["psfFluxErr"] > 0)]
    if len(rows) == 0:
        return out
    inv = 1.0 / rows["psfFluxErr"].to_numpy() ** 2
    per = pd.DataFrame(
        {"objectId": rows["objectId"].to_numpy(), "inv": inv, "err": rows["psfFluxErr"].to_numpy()}
    ).groupby("objectId")
    combined = 1.0 / np.sqrt(per["inv"].sum())
    n_inputs = per["inv"].size()
    single = per["err"].median()
    coadd = coadd.loc[combined.index]
    ratio = coadd / combined
    out.update(
        {
            "n": len(ratio),
            "ratio": float(np.median(ratio)),
            "ratio_p16_p84": [float(v) for v in np.percentile(ratio, [16, 84])],
            "gain_mag": float(np.median(2.5 * np.log10(single / coadd))),
            "expected_gain_mag": float(np.median(1.25 * np.log10(n_inputs))),
            "median_n_inputs": float(np.median(n_inputs)),
        }
    )
    out["passed"] = bool(
        abs(out["ratio"] - 1.0) <= STATIC_SKY_TARGETS["depth_gain_ratio_max_abs_diff"]
    )
    return out


def forced_photometry_pulls(
    forced: pd.DataFrame,
    objects: pd.DataFrame,
    truth: pd.DataFrame,
    *,
    radius_arcsec: float = 0.5,
    min_snr: float = 0.0,
    max_snr: float = 20.0,
    isolation_arcsec: float = 2.0,
    neighbour_flux_ratio: float = 0.1,
    truth_lightcurve: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Pulls (psfFlux - true) / psfFluxErr of forced photometry of non-variable stars.

    ForcedSource rows (clean flags) of Objects matched to isolated truth
    stars (as in :func:`bright_star_flux_bias`) whose true S/N (true flux /
    psfFluxErr) lies in [``min_snr``, ``max_snr``]: psfFluxErr is the
    statistical error, and the calibration of a calexp (zero point, flat,
    PSF model: ~1% per star on the simulated survey, the same in the Source
    table) dominates above S/N ~ 30. ``sigma`` is IQR / 1.349 (target [0.9,
    1.1]); also per band and in S/N bins (all S/N), and
    ``systematic_floor_mmag``: the fractional error which, added in
    quadrature, brings the pulls of stars with S/N > 50 to sigma 1. With
    ``truth_lightcurve`` the same is reported for variables and transients
    (their true flux at each visit), not as a target.
    """
    stars = truth[truth["kind"] == "star"]
    out: dict[str, Any] = {"n": 0, "sigma": float("nan"), "median": float("nan"), "passed": False}
    if len(forced) == 0 or len(objects) == 0 or len(stars) == 0:
        return out
    obj = objects.set_index("objectId")[["ra", "dec"]]
    index, sep, _ = _sky(obj["ra"], obj["dec"]).match_to_catalog_sky(
        _sky(stars["ra"], stars["dec"])
    )
    ok = sep.arcsec < radius_arcsec
    positions = truth.index.get_indexer(stars.index.to_numpy()[index])
    link = pd.DataFrame({"objectId": obj.index.to_numpy()[ok], "truth_pos": positions[ok]})
    rows = forced[(forced["flags"].to_numpy() & _BAD_FORCED) == 0].merge(link, on="objectId")
    pulls = []
    for band, group in rows.groupby("band"):
        iso = _isolated_in_truth(
            truth,
            group["truth_pos"].to_numpy(),
            str(band),
            radius_arcsec=isolation_arcsec,
            flux_ratio=neighbour_flux_ratio,
        )
        group = group[iso]
        true = _mag_to_njy(truth[f"{band}_mag"].to_numpy()[group["truth_pos"].to_numpy()])
        err = group["psfFluxErr"].to_numpy()
        snr = true / err
        pulls.append(
            pd.DataFrame(
                {
                    "band": band,
                    "snr": snr,
                    "pull": (group["psfFlux"].to_numpy() - true) / err,
                    "frac": group["psfFlux"].to_numpy() / true - 1.0,
                }
            )
        )
    if not pulls:
        return out
    everything = pd.concat(pulls, ignore_index=True)
    table = everything[(everything["snr"] >= min_snr) & (everything["snr"] <= max_snr)]
    sigma = _robust_sigma(table["pull"])
    out.update(
        {
            "n": len(table),
            "n_stars": int(link["truth_pos"].nunique()),
            "sigma": sigma,
            "median": float(np.median(table["pull"])) if len(table) else float("nan"),
            "histogram": pull_histogram(table["pull"].to_numpy()),
            "by_band": {
                str(b): {
                    "n": len(g),
                    "sigma": _robust_sigma(g["pull"]),
                    "median": float(np.median(g["pull"])),
                }
                for b, g in table.groupby("band")
            },
            "by_snr": {
                f"{lo:g}-{hi:g}": {"n": int(s.sum()), "sigma": _robust_sigma(everything["pull"][s])}
                for lo, hi in ((0, 5), (5, 20), (20, 50), (50, 100), (100, 1e9))
                for s in [(everything["snr"] >= lo) & (everything["snr"] < hi)]
                if s.sum() >= 5
            },
            "passed": bool(
                STATIC_SKY_TARGETS["forced_pull_sigma_min"]
                <= sigma
                <= STATIC_SKY_TARGETS["forced_pull_sigma_max"]
            ),
        }
    )
    out["systematic_floor_mmag"] = _systematic_floor(everything[everything["snr"] > 50])
    if truth_lightcurve is not None:
        out["varying"] = _varying_pulls(forced, obj, truth, truth_lightcurve, radius_arcsec)
    return out


def _systematic_floor(rows: pd.DataFrame) -> float:
    """Fractional error (mmag) that, added in quadrature to the errors, gives pulls of
    robust sigma 1 (0 when they are already at most 1; NaN for fewer than 10 rows)."""
    if len(rows) < 10:
        return float("nan")
    pull, frac = rows["pull"].to_numpy(), rows["frac"].to_numpy()
    snr = rows["snr"].to_numpy()

    def sigma(floor: float) -> float:
        scale = np.sqrt(1.0 + (floor * snr) ** 2)
        return _robust_sigma(pull / scale)

    if sigma(0.0) <= 1.0:
        return 0.0
    lo, hi = 0.0, max(float(np.nanmax(np.abs(frac))), 1e-3)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sigma(mid) > 1.0 else (lo, mid)
    return float(1085.7 * 0.5 * (lo + hi))  # fractional -> mmag


def _varying_pulls(forced, obj, truth, lightcurve, radius_arcsec) -> dict[str, Any]:
    """Pulls of forced photometry of variables and transients against their light curves."""
    varying = truth[truth["kind"].isin(["variable", "transient"])]
    if len(varying) == 0 or len(obj) == 0:
        return {"n": 0, "sigma": float("nan")}
    index, sep, _ = _sky(obj["ra"], obj["dec"]).match_to_catalog_sky(
        _sky(varying["ra"], varying["dec"])
    )
    ok = sep.arcsec < radius_arcsec
    link = pd.DataFrame(
        {"objectId": obj.index.to_numpy()[ok], "id": varying["id"].to_numpy()[index[ok]]}
    )
    rows = forced[(forced["flags"].to_numpy() & _BAD_FORCED) == 0].merge(link, on="objectId")
    rows = rows.merge(lightcurve[["id", "visit", "flux"]], on=["id", "visit"])
    pull = (rows["psfFlux"] - rows["flux"]) / rows["psfFluxErr"]
    return {
        "n": len(rows),
        "sigma": _robust_sigma(pull),
        "median": float(np.median(pull)) if len(rows) else float("nan"),
    }


def transients_absent_from_template(
    template_objects: pd.DataFrame,
    truth: pd.DataFrame,
    truth_lightcurve: pd.DataFrame,
    *,
    mjd_min: float | None,
    mjd_max: float | None,
    radius_arcsec: float = 1.0,
    region=None,
) -> dict[str, Any]:
    """No transient that is dark in every visit of the template window is an Object there.

    Transients whose light-curve flux is zero at every visit with ``mjd_min``
    <= mjd <= ``mjd_max`` (``None``: open) are checked: a template Object
    (primary) whose nearest truth object, within ``radius_arcsec``, is such a
    transient (not its host or another object) is a failure. ``region``
    restricts the transients to the coadd area.
    """
    lc = truth_lightcurve
    in_window = np.ones(len(lc), dtype=bool)
    if mjd_min is not None:
        in_window &= lc["mjd"].to_numpy() >= mjd_min
    if mjd_max is not None:
        in_window &= lc["mjd"].to_numpy() <= mjd_max
    bright_in_window = lc[in_window & (lc["flux"].to_numpy() > 0)]["id"].unique()
    transients = truth[(truth["kind"] == "transient") & ~truth["id"].isin(bright_in_window)]
    if region is not None and len(transients):
        inside = np.asarray(region(transients["ra"].to_numpy(), transients["dec"].to_numpy()))
        transients = transients[inside.astype(bool)]
    primary = _primary(template_objects)
    offenders: list[int] = []
    if len(transients) and len(primary):
        index, sep, _ = _sky(primary["ra"], primary["dec"]).match_to_catalog_sky(
            _sky(truth["ra"], truth["dec"])
        )
        nearest_id = truth["id"].to_numpy()[index]
        hit = (sep.arcsec < radius_arcsec) & np.isin(nearest_id, transients["id"].to_numpy())
        offenders = sorted({int(i) for i in nearest_id[hit]})
    return {
        "n_transients_checked": len(transients),
        "n_detected": len(offenders),
        "detected_ids": offenders,
        "passed": len(offenders) == 0,
    }


def static_sky_metrics(
    objects: pd.DataFrame,
    truth: pd.DataFrame,
    *,
    depths: dict[str, float],
    forced: pd.DataFrame | None = None,
    truth_lightcurve: pd.DataFrame | None = None,
    template_objects: pd.DataFrame | None = None,
    template_window: tuple[float | None, float | None] | None = None,
    region=None,
    completeness_regions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The issue-4 figures in one dict: completeness vs depth per band (``depths``: band ->
    predicted 5-sigma depth), purity, bright-star bias per band, forced-photometry pulls,
    and the template-transient check; each with its target and ``passed``.
    ``completeness_regions`` (band -> ``region(ra, dec)``, e.g. where that band's
    coadds have data) select each band's truth stars in place of ``region``."""
    out: dict[str, Any] = {"targets": dict(STATIC_SKY_TARGETS)}
    regions = dict(completeness_regions or {})
    out["completeness"] = {
        band: point_source_completeness(
            objects, truth, band=band, depth_mag=depth, region=regions.get(band, region)
        )
        for band, depth in depths.items()
    }
    out["purity"] = object_purity(objects, truth)
    out["bright_star_bias"] = {
        band: bright_star_flux_bias(objects, truth, band=band) for band in depths
    }
    if forced is not None:
        out["depth_gain"] = {band: coadd_depth_gain(objects, forced, band=band) for band in depths}
        out["forced_pulls"] = forced_photometry_pulls(
            forced, objects, truth, truth_lightcurve=truth_lightcurve
        )
    if template_objects is not None and truth_lightcurve is not None and template_window:
        out["template_transients"] = transients_absent_from_template(
            template_objects,
            truth,
            truth_lightcurve,
            mjd_min=template_window[0],
            mjd_max=template_window[1],
            region=region,
        )
    return out
