"""ZOGY proper image subtraction (Zackay, Ofek & Gal-Yam 2016; LSST's ``ZogyTask``).

Inputs are a science image N and a template R on the same pixel grid
(background-subtracted), their PSFs P_n, P_r (small odd-sized kernels, unit
sum, constant over the image as in LSST's ZOGY, which is spatially constant
per image or per sub-image), their white-noise sigmas σ_n, σ_r (the square
roots of the medians of the variance planes over unmasked pixels) and the
flux zero-point ratios F_n, F_r.

Flux convention: an image holds F times the calibrated flux, so a source of
flux α contributes F α P to it. The default F_n = F_r = 1 means both images
are already in the same calibrated units (nJy, as calexps and coadds are
here); a science image in counts with 1 nJy = g counts has F_n = g (and its
variance plane is in counts², so σ_n is in counts).

With hats for Fourier transforms (paper's Eqs. 13-17, 12)::

    den  = sqrt(σ_n² F_r² |P̂_r|² + σ_r² F_n² |P̂_n|²)
    D̂    = (F_r P̂_r N̂ - F_n P̂_n R̂) / den                 proper difference
    F_D  = F_r F_n / sqrt(σ_n² F_r² + σ_r² F_n²)            its flux zero point
    P̂_D  = F_r F_n P̂_r P̂_n / (F_D den)                     its PSF (unit sum)
    Ŝ    = F_D conj(P̂_D) D̂                                  score: F_D D ⊗ P_D reversed

For white noise D has unit variance per pixel and is uncorrelated (no
"convolve the sharper image" choice is needed: the same formula holds
whichever PSF is broader). A transient of flux change α is F_D α P_D on D, so
``difference = D / F_D`` is in the calibrated flux units (a PSF fit with P_D
on it returns α; its white-noise variance is σ_n²/F_n² + σ_r²/F_r²).
At a transient S = α F_S with F_S = F_D² Σ P_D² (:func:`score_normalisation`),
and var S = F_S on pure white noise: ``score = S / sqrt(var S)`` is the
detection significance per pixel, N(0, 1) on noise, and S / F_S the flux.

Spatially varying noise (the "corrected variance" of LSST's ZOGY, the paper's
Eqs. 26-28 without the source-noise and astrometric terms): D = a_n ⊗ N -
a_r ⊗ R and S = k_n ⊗ N - k_r ⊗ R are linear, so for locally white noise
var D = V_n ⊗ a_n² + V_r ⊗ a_r² and var S = V_n ⊗ k_n² + V_r ⊗ k_r², with the
squared real-space kernels convolved with the input variance planes. Both
reduce to 1 and F_S for constant variances. ``spatial_variance=False`` uses
the constants instead.

Padding: the images are placed in a square grid of a fast FFT length with at
least ``pad_width`` pixels (default twice the larger PSF size) on every side,
filled with zeros (their variance zero: nothing there, which the variance
planes account for) or by reflection (``padding="reflect"``: smooth edges
for imperfectly background-subtracted images; the reflected noise is
correlated with the image's, which the variance planes ignore). Either way
nothing wraps round from the opposite edge. The grid is square because the
kernels are placed for the FFT by ``static_sky.psf_matching._centred``.

Masks: masked or non-finite pixels (in either image or variance) are set to
0 (or to the unmasked median, ``mask_fill="median"``) in both images, with
variance 0, before the transforms. The output mask grows them by the PSF
radius (the box holding 99% of Σ|P| of the broadest of P_n, P_r, P_D; or
``mask_growth``) and flags the border strip of that width, where the PSF is
cut by the image edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import fft
from scipy.ndimage import binary_dilation

from workflow_lib.static_sky.psf_matching import _centred, _effective_radius

# Floor on den² relative to its maximum: only guards exact zeros. A larger floor (1e-12
# already) clips frequencies where both PSFs vanish, and D is no longer white there.
_REGULARIZATION = 1e-30


@dataclass(frozen=True)
class ZogyConfig:
    """Settings of :func:`zogy_difference`."""

    science_flux_scale: float = 1.0  # F_n: science pixels per unit calibrated flux
    template_flux_scale: float = 1.0  # F_r: template pixels per unit calibrated flux
    padding: str = "zero"  # "zero" or "reflect"
    pad_width: int | None = None  # minimum padding per side; None = 2 x larger PSF size
    mask_fill: str = "zero"  # value of masked pixels: "zero" or "median" (of unmasked)
    mask_growth: int | None = None  # None = 99% box radius of the broadest PSF
    spatial_variance: bool = True  # variance from the planes (else constant white noise)
    psf_size: int | None = None  # odd size of the returned P_D; None = larger input size
    regularization: float = _REGULARIZATION  # floor on den² relative to its maximum (avoids 0/0)
    workers: int = 1  # scipy.fft threads

    def __post_init__(self) -> None:
        if not (self.science_flux_scale > 0 and self.template_flux_scale > 0):
            raise ValueError("flux zero-point ratios F_n and F_r must be positive")
        if self.padding not in ("zero", "reflect"):
            raise ValueError(f"padding must be 'zero' or 'reflect', got {self.padding!r}")
        if self.mask_fill not in ("zero", "median"):
            raise ValueError(f"mask_fill must be 'zero' or 'median', got {self.mask_fill!r}")
        if self.pad_width is not None and self.pad_width < 0:
            raise ValueError("pad_width must be >= 0")
        if self.mask_growth is not None and self.mask_growth < 0:
            raise ValueError("mask_growth must be >= 0")
        if self.psf_size is not None and (self.psf_size < 1 or self.psf_size % 2 == 0):
            raise ValueError(f"psf_size must be odd and positive, got {self.psf_size}")
        if not 0 <= self.regularization < 1:
            raise ValueError("regularization must be in [0, 1)")


@dataclass(frozen=True)
class ZogyResult:
    """ZOGY outputs on the input pixel grid (see the module notes for conventions)."""

    difference: np.ndarray  # D / F_D: calibrated flux units, a transient is α P_D
    variance: np.ndarray  # variance of ``difference`` per pixel (flux units²)
    psf: np.ndarray  # P_D cropped to an odd size, unit sum
    score: np.ndarray  # S / sigma_S: detection significance per pixel, N(0,1) on noise
    flux_scale: float  # F_D; difference * F_D is the unit-variance proper difference
    mask: np.ndarray  # bool: input mask grown by the PSF radius, plus the border strip
    science_sigma: float  # σ_n used in the filters (image units)
    template_sigma: float  # σ_r

    @property
    def normalised_difference(self) -> np.ndarray:
        """The proper difference D itself: unit variance per pixel for white noise."""
        return self.difference * self.flux_scale


def zogy_flux_scale(
    science_sigma: float,
    template_sigma: float,
    science_flux_scale: float = 1.0,
    template_flux_scale: float = 1.0,
) -> float:
    """F_D = F_r F_n / sqrt(σ_n² F_r² + σ_r² F_n²): the zero point of the proper difference D."""
    fn, fr = float(science_flux_scale), float(template_flux_scale)
    denom = np.hypot(science_sigma * fr, template_sigma * fn)
    if not denom > 0:
        raise ValueError("at least one of the noise sigmas must be positive")
    return float(fr * fn / denom)


@dataclass(frozen=True)
class _Filters:
    """Fourier filters on one grid: D̂ = a_n N̂ - a_r R̂, Ŝ = k_n N̂ - k_r R̂, and P̂_D."""

    a_n: np.ndarray
    a_r: np.ndarray
    k_n: np.ndarray
    k_r: np.ndarray
    p_d: np.ndarray
    f_d: float


def _kernel(psf: np.ndarray) -> np.ndarray:
    k = np.asarray(psf, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
        raise ValueError(f"PSF kernels must be square with odd size, got shape {k.shape}")
    total = k.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("PSF kernel must have a positive, finite sum")
    return k / total


def _filters(
    science_psf: np.ndarray,
    template_psf: np.ndarray,
    sigma_n: float,
    sigma_r: float,
    fn: float,
    fr: float,
    n: int,
    regularization: float,
    workers: int = 1,
) -> _Filters:
    """The ZOGY filters (module notes) on an n x n FFT grid, kernels centred at (0, 0)."""
    pn = fft.rfft2(_centred(_kernel(science_psf), n), workers=workers)
    pr = fft.rfft2(_centred(_kernel(template_psf), n), workers=workers)
    den2 = (sigma_n * fr) ** 2 * np.abs(pr) ** 2 + (sigma_r * fn) ** 2 * np.abs(pn) ** 2
    den2 = np.maximum(den2, regularization * den2.max())
    den = np.sqrt(den2)
    f_d = zogy_flux_scale(sigma_n, sigma_r, fn, fr)
    a_n, a_r = fr * pr / den, fn * pn / den
    p_d = fr * fn * pr * pn / (f_d * den)
    matched = f_d * np.conj(p_d)
    return _Filters(a_n=a_n, a_r=a_r, k_n=matched * a_n, k_r=matched * a_r, p_d=p_d, f_d=f_d)


def _default_grid(science_psf: np.ndarray, template_psf: np.ndarray) -> int:
    size = max(np.shape(science_psf)[0], np.shape(template_psf)[0])
    return fft.next_fast_len(4 * size, real=True)


def _cropped_psf(p_d_hat: np.ndarray, n: int, size: int) -> np.ndarray:
    """P_D in real space (inverse of ``_centred``), cropped to size x size, unit sum."""
    if size > n:
        raise ValueError(f"P_D size {size} exceeds the FFT grid {n}")
    full = fft.irfft2(p_d_hat, s=(n, n))
    h = size // 2
    kernel = np.roll(full, (h, h), axis=(0, 1))[:size, :size]
    return kernel / kernel.sum()


def proper_psf(
    science_psf: np.ndarray,
    template_psf: np.ndarray,
    science_sigma: float,
    template_sigma: float,
    *,
    science_flux_scale: float = 1.0,
    template_flux_scale: float = 1.0,
    size: int | None = None,
    grid: int | None = None,
) -> np.ndarray:
    """P_D, the PSF of the proper difference, as an odd ``size`` kernel of unit sum.

    Computed on a ``grid`` x ``grid`` FFT grid (default 4x the larger kernel,
    enough for P_D's tails) and cropped; ``size`` defaults to the larger input.
    """
    n = _default_grid(science_psf, template_psf) if grid is None else int(grid)
    size = max(np.shape(science_psf)[0], np.shape(template_psf)[0]) if size is None else size
    if size % 2 == 0:
        raise ValueError(f"P_D size must be odd, got {size}")
    filt = _filters(
        science_psf,
        template_psf,
        science_sigma,
        template_sigma,
        science_flux_scale,
        template_flux_scale,
        n,
        _REGULARIZATION,
    )
    return _cropped_psf(filt.p_d, n, int(size))


def score_normalisation(
    science_psf: np.ndarray,
    template_psf: np.ndarray,
    science_sigma: float,
    template_sigma: float,
    *,
    science_flux_scale: float = 1.0,
    template_flux_scale: float = 1.0,
    grid: int | None = None,
) -> float:
    """F_S = F_D² Σ P_D²: var S on white noise, and S / F_S at a point source is its flux.

    Hence S / sqrt(F_S) is N(0, 1) on pure noise (the significance), and a
    source's flux change is significance / sqrt(F_S) at its position.
    """
    n = _default_grid(science_psf, template_psf) if grid is None else int(grid)
    filt = _filters(
        science_psf,
        template_psf,
        science_sigma,
        template_sigma,
        science_flux_scale,
        template_flux_scale,
        n,
        _REGULARIZATION,
    )
    p_d = fft.irfft2(filt.p_d, s=(n, n))
    return float(filt.f_d**2 * np.sum(p_d**2))


def _prepared(
    science: np.ndarray,
    template: np.ndarray,
    science_var: np.ndarray,
    template_var: np.ndarray,
    mask: np.ndarray | None,
    fill: str,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Float copies of the four planes with masked pixels filled (variance 0); the bad mask."""
    planes = [np.array(a, dtype=np.float64) for a in (science, template, science_var, template_var)]
    shape = planes[0].shape
    if len(shape) != 2 or any(p.shape != shape for p in planes):
        raise ValueError("science, template and their variances must be 2-d of one shape")
    bad = np.zeros(shape, dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    if bad.shape != shape:
        raise ValueError(f"mask shape {bad.shape} differs from the image shape {shape}")
    for p in planes:
        bad |= ~np.isfinite(p)
    bad |= (planes[2] < 0) | (planes[3] < 0)
    if bad.all():
        raise ValueError("every pixel is masked")
    for i, p in enumerate(planes):
        p[bad] = np.median(p[~bad]) if (fill == "median" and i < 2) else 0.0
    return planes, bad


def _filtered_variance(
    var_n: np.ndarray, var_r: np.ndarray, h_n: np.ndarray, h_r: np.ndarray, n: int, workers: int
) -> np.ndarray:
    """V_n ⊗ h_n² + V_r ⊗ h_r² (h real-space kernels from their spectra), padded grid."""
    total = np.zeros_like(h_n)
    for var, h in ((var_n, h_n), (var_r, h_r)):
        h2 = fft.irfft2(h, s=(n, n), workers=workers) ** 2
        total += fft.rfft2(var, workers=workers) * fft.rfft2(h2, workers=workers)
    return np.clip(fft.irfft2(total, s=(n, n), workers=workers), 0.0, None)


def _padder(shape: tuple[int, int], pad: int, n: int, mode: str):
    ny, nx = shape
    widths = ((pad, n - ny - pad), (pad, n - nx - pad))
    np_mode: Literal["constant", "reflect"] = "constant" if mode == "zero" else "reflect"

    def padded(a: np.ndarray) -> np.ndarray:
        return np.pad(a, widths, mode=np_mode)

    def cropped(a: np.ndarray) -> np.ndarray:
        return a[pad : pad + ny, pad : pad + nx]

    return padded, cropped


def _output_mask(bad: np.ndarray, radius: int) -> np.ndarray:
    """``bad`` grown by a (2 radius + 1)² box, with the border strip of width radius."""
    if radius <= 0:
        return bad.copy()
    out = binary_dilation(bad, structure=np.ones((2 * radius + 1, 2 * radius + 1), dtype=bool))
    out[:radius] = out[-radius:] = True
    out[:, :radius] = out[:, -radius:] = True
    return out


def zogy_difference(
    science: np.ndarray,
    template: np.ndarray,
    science_var: np.ndarray,
    template_var: np.ndarray,
    science_psf: np.ndarray,
    template_psf: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    config: ZogyConfig = ZogyConfig(),
) -> ZogyResult:
    """ZOGY proper difference, its variance and PSF, and the significance image.

    ``science``/``template``: background-subtracted images on one grid;
    ``*_var``: their variance planes (σ = sqrt of the unmasked median enters
    the filters, the planes the variance correction); ``*_psf``: odd unit-sum
    kernels; ``mask``: pixels (True/non-zero) to ignore in both images.
    Conventions (units, padding, masks) are in the module notes.
    """
    (sci, tpl, var_n, var_r), bad = _prepared(
        science, template, science_var, template_var, mask, config.mask_fill
    )
    sigma_n = float(np.sqrt(np.median(var_n[~bad])))
    sigma_r = float(np.sqrt(np.median(var_r[~bad])))
    fn, fr = config.science_flux_scale, config.template_flux_scale
    sizes = (np.shape(science_psf)[0], np.shape(template_psf)[0])
    pad = 2 * max(sizes) if config.pad_width is None else config.pad_width
    n = fft.next_fast_len(max(sci.shape) + 2 * pad, real=True)
    w = config.workers
    filt = _filters(
        science_psf, template_psf, sigma_n, sigma_r, fn, fr, n, config.regularization, w
    )
    padded, cropped = _padder(sci.shape, pad, n, config.padding)
    n_hat = fft.rfft2(padded(sci), workers=w)
    r_hat = fft.rfft2(padded(tpl), workers=w)
    d_hat = filt.a_n * n_hat - filt.a_r * r_hat
    s_hat = filt.f_d * np.conj(filt.p_d) * d_hat
    del n_hat, r_hat
    d = cropped(fft.irfft2(d_hat, s=(n, n), workers=w))
    s = cropped(fft.irfft2(s_hat, s=(n, n), workers=w))
    p_d_full = fft.irfft2(filt.p_d, s=(n, n), workers=w)
    f_s = filt.f_d**2 * float(np.sum(p_d_full**2))
    if config.spatial_variance:
        vn, vr = padded(var_n), padded(var_r)
        var_d = cropped(_filtered_variance(vn, vr, filt.a_n, filt.a_r, n, w))
        var_s = cropped(_filtered_variance(vn, vr, filt.k_n, filt.k_r, n, w))
    else:
        var_d = np.ones_like(d)
        var_s = np.full_like(s, f_s)
    floor = 1e-12 * f_s
    score = np.where(var_s > floor, s / np.sqrt(np.maximum(var_s, floor)), 0.0)
    psf_size = max(sizes) if config.psf_size is None else config.psf_size
    psf = _cropped_psf(filt.p_d, n, psf_size)
    if config.mask_growth is None:
        radius = max(
            _effective_radius(k, 0.99) for k in (_kernel(science_psf), _kernel(template_psf), psf)
        )
    else:
        radius = config.mask_growth
    return ZogyResult(
        difference=d / filt.f_d,
        variance=var_d / filt.f_d**2,
        psf=psf,
        score=score,
        flux_scale=filt.f_d,
        mask=_output_mask(bad, int(radius)),
        science_sigma=sigma_n,
        template_sigma=sigma_r,
    )
