"""Quality of the products against a simulation's truth tables.

Single-frame metrics (issue 3): astrometric rms of bright stars against their
true positions, zero point and seeing against the truth, calibrated PSF flux
offset of bright stars, and photometric repeatability across visits (LSST's PA1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from astropy import units as u
from astropy.coordinates import SkyCoord

from workflow_lib.flags import UNRELIABLE_SOURCE, CcdVisitFlag, SourceFlag

# Unreliable sources, and those whose flux the aperture correction could not fix.
_BAD_SOURCE = UNRELIABLE_SOURCE | int(SourceFlag.APCORR_FAILED)


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

    good = sources[((sources["flags"] & _BAD_SOURCE) == 0) & (sources["extendedness"] < 0.5)]
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


def repeatability(matched: pd.DataFrame, *, min_visits: int = 3) -> dict[str, float]:
    """PA1: scatter of stars' magnitudes about their own mean across visits (mmag).

    Each star contributes (n - 1) degrees of freedom in each band where it has
    at least ``min_visits`` measurements. ``rms`` is the pooled rms, ``robust``
    the same from the interquartile range (as validate_drp's PA1 is robust to
    the odd blend), and ``noise`` the rms of the reported magnitude errors, so
    that ``sqrt(rms**2 - noise**2)`` is the scatter the errors do not explain.
    """
    flux = matched["psfFlux"].to_numpy()
    frame = pd.DataFrame(
        {
            "id": matched["truth_id"].to_numpy(),
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
