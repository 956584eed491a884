"""Detection efficiency against S/N: binned fractions and a fitted logistic curve.

Shared by the truth-based efficiency (:mod:`workflow_lib.qa.dia_metrics`) and the
injection summary (:func:`workflow_lib.qa.survey_metrics.injection_summary`).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import curve_fit


def efficiency_bins(
    snr: np.ndarray, found: np.ndarray, edges: tuple[float, ...]
) -> list[dict[str, float]]:
    """Injected sources and the fraction found, per bin of true S/N."""
    snr = np.asarray(snr, dtype=np.float64)
    found = np.asarray(found, dtype=bool)
    bins = []
    for lo, hi in itertools.pairwise(edges):
        sel = (snr >= lo) & (snr < hi)
        bins.append(
            {
                "snr_min": float(lo),
                "snr_max": float(hi),
                "n": int(sel.sum()),
                "n_detected": int(found[sel].sum()),
                "efficiency": float(found[sel].mean()) if sel.any() else float("nan"),
            }
        )
    return bins


def _logistic(snr: np.ndarray, plateau: float, snr_50: float, width: float) -> np.ndarray:
    return plateau / (1.0 + np.exp(-(snr - snr_50) / width))


def fit_efficiency(snr: np.ndarray, found: np.ndarray) -> dict[str, float]:
    """Logistic efficiency curve ``plateau / (1 + exp(-(S/N - snr_50) / width))`` fitted
    to each injected source's outcome (least squares on the 0/1 outcomes); NaN where the
    fit fails or fewer than 20 sources. ``snr_50`` is where half the plateau is found."""
    snr = np.asarray(snr, dtype=np.float64)
    found = np.asarray(found, dtype=np.float64)
    ok = np.isfinite(snr)
    nan = {"plateau": float("nan"), "snr_50": float("nan"), "width": float("nan")}
    if ok.sum() < 20:
        return nan
    try:
        (plateau, snr_50, width), _ = curve_fit(
            _logistic,
            snr[ok],
            found[ok],
            p0=(0.95, 5.0, 0.5),
            bounds=((0.0, 0.0, 0.01), (1.0, 100.0, 20.0)),
        )
    except (RuntimeError, ValueError):
        return nan
    return {"plateau": float(plateau), "snr_50": float(snr_50), "width": float(width)}
