"""Photometric calibration: the zero point of a CCD from its matched reference stars.

The zero point (CONTRACT 2) is the AB magnitude of a source giving one
electron per second: for each star ``zp_i = m_ref + 2.5 log10(flux_e_per_s)``
and the CCD's value is their robust weighted mean. Each star's weight combines
its measurement error, its reference-magnitude error and an intrinsic scatter
term fitted so that the chi^2 per degree of freedom is one: the reference
catalog's and the PSF model's systematic errors do not shrink with S/N, and
without that term a handful of very bright stars would set the zero point
alone. Variables, blends and mismatches are rejected by iterative clipping;
with few stars (a galaxy-dominated field may have 3-10) each star is judged
against the mean of the others and rejected one at a time, and the error is
widened for the few degrees of freedom (Student t), so that neither one
outlier nor a lucky agreement of two stars makes the zero point look better
than it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import stdtrit

from workflow_lib.core.exposure import PhotoCalib

log = logging.getLogger(__name__)

_LN10_04 = 0.4 * np.log(10.0)
_MAG_PER_REL = 2.5 / np.log(10.0)  # 1.0857: magnitudes per relative flux error
_ONE_SIGMA = 0.8413447460685429  # P(Z < 1) of a standard normal
_SMALL_N = 20  # below this many stars, judge each against the others, one at a time


class PhotoCalError(ValueError):
    """Photometric calibration failed (too few usable stars); the message says why."""


@dataclass(frozen=True)
class ZeroPointResult:
    """Zero point (AB mag giving 1 e-/s) of one CCD, and how it was obtained.

    ``scatter_mag`` is the robust standard deviation of the per-star zero
    points that were used; ``intrinsic_mag`` the fitted scatter beyond the
    quoted errors; ``used`` marks the stars that survived the cuts and clipping.
    """

    zero_point: float
    zero_point_err: float
    n_used: int
    scatter_mag: float
    used: np.ndarray
    intrinsic_mag: float

    def photo_calib(self, exptime: float) -> PhotoCalib:
        """The PhotoCalib of an image in electrons of an ``exptime``-second exposure."""
        njy = PhotoCalib.njy_per_electron(self.zero_point, exptime)
        return PhotoCalib(
            njy_per_unit=njy,
            njy_per_unit_err=njy * _LN10_04 * self.zero_point_err,
            zero_point=self.zero_point,
            zero_point_err=self.zero_point_err,
        )


def select_photometric_stars(
    flux: np.ndarray,
    flux_err: np.ndarray,
    *,
    bad: np.ndarray | None = None,
    min_snr: float = 20.0,
    max_flux: float | None = None,
) -> np.ndarray:
    """Mask of stars fit to set a zero point: finite, S/N >= ``min_snr``, not ``bad``.

    ``bad`` carries the caller's flags (saturated or interpolated centre,
    edge, blended); ``max_flux`` optionally drops stars near saturation whose
    flags were missed (non-linearity). A faint cut at S/N 20 keeps the
    detection-threshold (Eddington) bias far below a millimagnitude.
    """
    flux = np.asarray(flux, dtype=np.float64)
    flux_err = np.asarray(flux_err, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux / flux_err
    ok = np.isfinite(flux) & np.isfinite(flux_err) & (flux > 0) & (flux_err > 0)
    ok &= snr >= min_snr
    if bad is not None:
        ok &= ~np.asarray(bad, dtype=bool)
    if max_flux is not None:
        ok &= flux <= max_flux
    return ok


def _intrinsic(d: np.ndarray, var: np.ndarray) -> float:
    """Extra variance s^2 such that sum(d'^2 / (var + s^2)) = n - 1 about the weighted mean."""
    n = len(d)

    def excess(s2: float) -> float:
        w = 1.0 / (var + s2)
        mu = np.sum(w * d) / np.sum(w)
        return float(np.sum(w * (d - mu) ** 2) - (n - 1))

    if n < 3 or excess(0.0) <= 0.0:
        return 0.0
    hi = max(float(np.var(d)) * 10.0, 1e-8)
    while excess(hi) > 0.0:
        hi *= 10.0
    return float(np.sqrt(brentq(excess, 0.0, hi, xtol=1e-12)))


def _weighted_mean(zp: np.ndarray, var: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, intrinsic scatter, quoted-error error, sample error) of per-star zero points.

    The intrinsic scatter makes chi^2 per degree of freedom one (:func:`_intrinsic`);
    the sample error is the weighted standard error of the mean from the scatter of
    the values themselves (NaN for one star).
    """
    s_int = _intrinsic(zp, var)
    w = 1.0 / (var + s_int**2)
    mean = float(np.sum(w * zp) / np.sum(w))
    err = float(np.sqrt(1.0 / np.sum(w)))
    n = len(zp)
    sample = float("nan")
    if n >= 2:
        sample = float(np.sqrt(np.sum(w * (zp - mean) ** 2) / ((n - 1) * np.sum(w))))
    return mean, s_int, err, sample


def _t_factor(dof: int) -> float:
    """Student-t quantile at the one-sigma probability (0.8413) for ``dof`` degrees of
    freedom: how much wider than Gaussian a one-sigma error from few stars is."""
    return float(stdtrit(max(dof, 1), _ONE_SIGMA)) if dof < 1000 else 1.0


def _loo_t(zp: np.ndarray, var: np.ndarray, floor_mag: float) -> np.ndarray:
    """Deviation of each value from the weighted mean of the *others*, in units of its
    expected spread (own error, the others' intrinsic scatter, at least ``floor_mag``,
    and the error of their mean)."""
    n = len(zp)
    t = np.zeros(n)
    for i in range(n):
        keep = np.arange(n) != i
        mean, s_int, err, _ = _weighted_mean(zp[keep], var[keep])
        s2 = max(s_int, floor_mag) ** 2
        t[i] = abs(zp[i] - mean) / np.sqrt(var[i] + s2 + err**2)
    return t


def fit_zero_point(
    flux_e_per_s: np.ndarray,
    flux_err: np.ndarray,
    ref_mag: np.ndarray,
    ref_mag_err: np.ndarray,
    *,
    clip_sigma: float = 3.0,
    max_iter: int = 5,
    min_stars: int = 3,
    min_outlier_mag: float = 0.02,
) -> ZeroPointResult:
    """Zero point from matched stars: fluxes in e-/s (and errors), reference AB mags.

    The caller passes only stars it trusts to be unsaturated and bright enough
    (see :func:`select_photometric_stars`); NaN reference errors count as zero
    (the intrinsic term absorbs them). The value is the weighted mean of the
    per-star zero points with an intrinsic scatter term (chi^2 per degree of
    freedom one). Outliers (a galaxy matched to a star, a variable, a blend)
    cannot drag it:

    * with fewer than ``_SMALL_N`` stars, each star is compared with the mean
      of the *others* (their intrinsic scatter, but at least ``min_outlier_mag``,
      counting in its expected spread: two or three stars cannot measure a
      scatter) and the worst one beyond ``clip_sigma`` goes, one at a time,
      keeping at least half of them and never fewer than two; stars that fit
      again come back;
    * with more, starting from the median and the robust scatter, stars
      further than ``clip_sigma`` times their total error from the weighted
      mean are rejected, up to ``max_iter`` times.

    The error is that of the weighted mean with the intrinsic term; with few
    stars it is at least the standard error from the values' own scatter, and
    both are widened by the Student-t factor of n - 1 degrees of freedom
    where the scatter was estimated from the stars; two stars are assumed to
    scatter by ``min_outlier_mag`` at least. Raises PhotoCalError with
    fewer than ``min_stars`` usable stars.
    """
    flux = np.asarray(flux_e_per_s, dtype=np.float64)
    ferr = np.asarray(flux_err, dtype=np.float64)
    mag = np.asarray(ref_mag, dtype=np.float64)
    merr = np.asarray(ref_mag_err, dtype=np.float64)
    n = len(flux)
    if not (len(ferr) == len(mag) == len(merr) == n):
        raise ValueError(
            "flux_e_per_s, flux_err, ref_mag and ref_mag_err must have the same length"
        )
    ok = np.isfinite(flux) & (flux > 0) & np.isfinite(mag) & np.isfinite(ferr) & (ferr >= 0)
    min_stars = max(int(min_stars), 2)
    if ok.sum() < min_stars:
        raise PhotoCalError(
            f"too few stars for a zero point: {int(ok.sum())} usable of {n} (need {min_stars})"
        )
    zp = np.full(n, np.nan)
    zp[ok] = mag[ok] + 2.5 * np.log10(flux[ok])
    var = np.full(n, np.inf)
    merr0 = np.where(np.isfinite(merr), merr, 0.0)
    var[ok] = (_MAG_PER_REL * ferr[ok] / flux[ok]) ** 2 + merr0[ok] ** 2

    n_ok = int(ok.sum())
    if n_ok < _SMALL_N:
        used = _clip_few(zp, var, ok, clip_sigma, min_outlier_mag, max(2, (n_ok + 1) // 2))
    else:
        used = _clip_many(zp, var, ok, clip_sigma, max_iter, min_stars)
    if used.sum() < min(min_stars, 2):
        raise PhotoCalError(
            f"too few stars for a zero point after clipping: {int(used.sum())} of "
            f"{n_ok} usable (need {min_stars})"
        )
    centre, s_int, err, sample = _weighted_mean(zp[used], var[used])
    n_used = int(used.sum())
    if n_used < 3:  # two stars cannot measure a scatter: assume min_outlier_mag of it
        err = max(err, float(np.sqrt(1.0 / np.sum(1.0 / (var[used] + min_outlier_mag**2)))))
    if n_used < _SMALL_N:
        err = max(err, sample if np.isfinite(sample) else 0.0) * _t_factor(n_used - 1)
    elif s_int > 0.0:
        err *= _t_factor(n_used - 1)
    d = zp[used] - centre
    scatter = 1.4826 * float(np.median(np.abs(d - np.median(d))))
    log.info(
        "zero point %.4f +- %.4f mag from %d of %d stars (scatter %.4f, intrinsic %.4f mag)",
        centre,
        err,
        n_used,
        n_ok,
        scatter,
        s_int,
    )
    return ZeroPointResult(
        zero_point=centre,
        zero_point_err=err,
        n_used=n_used,
        scatter_mag=scatter,
        intrinsic_mag=s_int,
        used=used,
    )


def _clip_few(
    zp: np.ndarray, var: np.ndarray, ok: np.ndarray, clip: float, floor: float, min_keep: int
) -> np.ndarray:
    """One-at-a-time rejection against the others (see :func:`fit_zero_point`)."""
    used = ok.copy()
    for _ in range(int(ok.sum()) + 1):
        idx = np.flatnonzero(used)
        new = used.copy()
        mean, s_int, err, _ = _weighted_mean(zp[idx], var[idx])
        s2 = max(s_int, floor) ** 2
        back = ok & ~used & (np.abs(zp - mean) <= clip * np.sqrt(var + s2 + err**2))
        new |= back
        if len(idx) - 1 >= min_keep:
            t = _loo_t(zp[idx], var[idx], floor)
            worst = int(np.argmax(t))
            if t[worst] > clip:
                new[idx[worst]] = False
        if np.array_equal(new, used):
            break
        used = new
    return used


def _clip_many(
    zp: np.ndarray, var: np.ndarray, ok: np.ndarray, clip: float, max_iter: int, min_stars: int
) -> np.ndarray:
    """Iterative clipping from a robust start (see :func:`fit_zero_point`)."""
    centre = float(np.median(zp[ok]))
    robust = 1.4826 * float(np.median(np.abs(zp[ok] - centre)))
    s_int = float(np.sqrt(max(robust**2 - np.median(var[ok]), 0.0)))
    used = ok & (np.abs(zp - centre) <= clip * np.sqrt(var + s_int**2 + (0.5 * robust) ** 2))
    for _ in range(max_iter):
        if used.sum() < min_stars:
            break
        centre, s_int, _, _ = _weighted_mean(zp[used], var[used])
        new_used = ok & (np.abs(zp - centre) <= clip * np.sqrt(var + s_int**2))
        if np.array_equal(new_used, used):
            break
        used = new_used
    return used
