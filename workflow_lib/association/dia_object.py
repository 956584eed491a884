"""DIAObject ids and aggregates from associated DIASources (arrays in, tables out)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from workflow_lib.core.sky import from_tangent_plane_arcsec

# (tract, patch, sequence) packed under bit 61, a range of its own: a
# diaObjectId never equals an objectId, a sourceId or a diaSourceId (bit 62).
_TRACT_BITS, _PATCH_BITS, _SEQ_BITS = 20, 16, 24
_DIA_OBJECT_BIT = np.int64(1 << 61)
# Flux columns of a DIASource aggregated per band: difference and direct flux.
FLUX_COLUMNS: tuple[tuple[str, str], ...] = (
    ("psfFlux", "psfFluxErr"),
    ("scienceFlux", "scienceFluxErr"),
)
AGGREGATES = ("Mean", "MeanErr", "Sigma", "Ndata", "Chi2")


def dia_object_ids(tract: int, patch: int, n: int) -> np.ndarray:
    """``n`` DIAObject ids of one patch, from its tract, patch and a sequence number."""
    if not (0 <= tract < 1 << _TRACT_BITS and 0 <= patch < 1 << _PATCH_BITS):
        raise ValueError(f"diaObjectId: tract {tract} or patch {patch} out of range")
    if n > 1 << _SEQ_BITS:
        raise ValueError(f"diaObjectId: {n} DIAObjects in one patch (at most {1 << _SEQ_BITS})")
    base = (np.int64(tract) << (_PATCH_BITS + _SEQ_BITS)) | (np.int64(patch) << _SEQ_BITS)
    return _DIA_OBJECT_BIT | base | np.arange(n, dtype=np.int64)


def _weighted_stats(
    group: np.ndarray, n_groups: int, flux: np.ndarray, err: np.ndarray
) -> dict[str, np.ndarray]:
    """Per group: weighted mean, its error, sample sigma, count and chi2; NaNs left out."""
    good = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    g, f, w = group[good], flux[good], 1.0 / err[good] ** 2
    n = np.bincount(g, minlength=n_groups).astype(np.int64)
    sum_w = np.bincount(g, w, minlength=n_groups)
    sum_f = np.bincount(g, f, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(g, w * f, minlength=n_groups) / sum_w
        mean_err = 1.0 / np.sqrt(sum_w)
        plain = sum_f / n
        sigma = np.sqrt(np.bincount(g, (f - plain[g]) ** 2, minlength=n_groups) / (n - 1.0))
        chi2 = np.bincount(g, w * (f - mean[g]) ** 2, minlength=n_groups).astype(np.float64)
    sigma[n < 2] = np.nan
    chi2[n == 0] = np.nan
    return {"Mean": mean, "MeanErr": mean_err, "Sigma": sigma, "Ndata": n, "Chi2": chi2}


def dia_object_table(
    sources: pd.DataFrame,
    labels: np.ndarray,
    xi: np.ndarray,
    eta: np.ndarray,
    err: np.ndarray,
    *,
    tract: int,
    patch: int,
    centre: tuple[float, float],
    bands: Sequence[str],
) -> pd.DataFrame:
    """One row per DIAObject: position, counts, epochs and per-band flux aggregates.

    ``labels`` (from :func:`~workflow_lib.association.associate.associate`)
    number the objects 0..n-1; ``xi``, ``eta``, ``err`` are the sources'
    tangent-plane positions and errors (arcsec) about ``centre`` (ra, dec).
    The position is the error-weighted mean, ``coordErr`` its error.
    """
    n_obj = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    used = labels >= 0
    lab = labels[used]
    w = 1.0 / err[used] ** 2
    sum_w = np.bincount(lab, w, minlength=n_obj)
    ra, dec = from_tangent_plane_arcsec(
        np.bincount(lab, w * xi[used], minlength=n_obj) / np.where(sum_w > 0, sum_w, 1.0),
        np.bincount(lab, w * eta[used], minlength=n_obj) / np.where(sum_w > 0, sum_w, 1.0),
        *centre,
    )
    mjd = sources["midpointMjdTai"].to_numpy(dtype=np.float64)[used]
    first = np.full(n_obj, np.inf)
    last = np.full(n_obj, -np.inf)
    np.minimum.at(first, lab, mjd)
    np.maximum.at(last, lab, mjd)
    table: dict[str, np.ndarray] = {
        "diaObjectId": dia_object_ids(tract, patch, n_obj),
        "tract": np.full(n_obj, tract, dtype=np.int64),
        "patch": np.full(n_obj, patch, dtype=np.int64),
        "ra": ra,
        "dec": dec,
        "coordErr": 1.0 / np.sqrt(sum_w),
        "nDiaSources": np.bincount(lab, minlength=n_obj).astype(np.int64),
        "firstDiaSourceMjdTai": first,
        "lastDiaSourceMjdTai": last,
    }
    band = sources["band"].to_numpy().astype(str)[used]
    for b in bands:
        in_band = band == b
        for flux_col, err_col in FLUX_COLUMNS:
            # The columns exist whatever the input holds: one schema for every patch.
            nan = np.full(int(used.sum()), np.nan)
            flux = sources[flux_col].to_numpy(np.float64)[used] if flux_col in sources else nan
            ferr = sources[err_col].to_numpy(np.float64)[used] if err_col in sources else nan
            stats = _weighted_stats(
                lab, n_obj, np.where(in_band, flux, np.nan), np.where(in_band, ferr, np.nan)
            )
            for name in AGGREGATES:
                table[f"{b}_{flux_col}{name}"] = stats[name]
    return pd.DataFrame(table)
