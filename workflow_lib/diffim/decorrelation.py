"""Decorrelation of an Alard-Lupton difference image (Reiss & Lupton 2016; LSST
``DecorrelateALKernelTask``).

The difference D = S - T * K of white-noise images with pixel variances
sigma_s^2 (science) and sigma_t^2 (template) has the noise power spectrum
P(k) = sigma_s^2 + sigma_t^2 |K(k)|^2: convolving the template by K correlated
neighbouring pixels, which detection thresholds in units of the per-pixel
sigma do not expect. The post-convolution filter

    phi(k) = sqrt(P(0) / P(k)) = sqrt((sigma_s^2 + sigma_t^2 |K(0)|^2)
                                      / (sigma_s^2 + sigma_t^2 |K(k)|^2))

whitens it. Convention: K is the matching kernel as applied, photometric scale
(kernel sum kappa = K(0)) included, and sigma_t^2 is the template's variance in
its own units, so phi(0) = 1 (fluxes kept). LSST writes
sqrt((svar + tvar) / (svar + tvar |K|^2)); after both are normalised to unit
sum (as here and in LSST) the numerator is only a constant and the two are the
same filter. What matters is the pairing in the denominator: a unit-sum K must
go with tvar = kappa^2 sigma_t^2 (the template's variance in science units).
Like LSST's default, phi is built from one kernel (the image centre's): the
variation of K over a CCD changes phi at the per-cent level.

After filtering, the noise is white with variance P(0) = sigma_s^2 +
kappa^2 sigma_t^2 (more than the per-pixel variance sigma_s^2 + sigma_t^2
sum K^2 before: the correlation is now in the variance, which is why a point
source's S/N is unchanged), and the difference's PSF becomes the science PSF
convolved with phi (:func:`convolved_psf`). :func:`variance_scale` measures
what is left for the variance plane to match the pixels ("doScaleVariance").
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from astropy.stats import sigma_clip
from scipy import fft
from scipy.special import ndtr

from workflow_lib.core.convolution import fft_convolve
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.single_frame.background import subsample_stride
from workflow_lib.static_sky.psf_matching import _centred


def decorrelation_kernel(
    matching_kernel: np.ndarray,
    science_variance: float,
    template_variance: float,
    size: int | None = None,
) -> np.ndarray:
    """Real-space decorrelation kernel phi (odd ``size``, default K's size; unit sum).

    ``science_variance`` / ``template_variance``: mean per-pixel variances of the
    two images before matching (template in template units). phi is computed on
    a grid at least twice the kernels' size (no wrap-around), cropped and
    renormalised.
    """
    k = np.asarray(matching_kernel, dtype=np.float64)
    size = k.shape[0] if size is None else int(size)
    if size % 2 == 0 or size < 1 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
        raise ValueError(f"kernels must be square and odd-sized, got {k.shape} and {size}")
    if not (science_variance > 0 and template_variance >= 0):
        raise ValueError("science variance must be > 0 and template variance >= 0")
    n = fft.next_fast_len(2 * max(k.shape[0], size) + 1)
    kf = fft.rfft2(_centred(k, n))
    power = science_variance + template_variance * np.abs(kf) ** 2
    phi_f = np.sqrt((science_variance + template_variance * k.sum() ** 2) / power)
    full = np.roll(fft.irfft2(phi_f, s=(n, n)), (size // 2,) * 2, axis=(0, 1))
    phi = full[:size, :size]
    return phi / phi.sum()


def _white_variance_gain(kernel: np.ndarray) -> float:
    """1 / mean_k |phi(k)|^-2: output / input pixel variance when phi whitens the noise."""
    n = fft.next_fast_len(4 * kernel.shape[0])
    power = np.abs(fft.fft2(_centred(kernel, n))) ** 2
    return float(1.0 / np.mean(1.0 / np.maximum(power, 1e-12)))


def decorrelate(
    difference: np.ndarray, variance: np.ndarray, kernel: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The difference image convolved with ``kernel`` (phi) and its variance plane.

    Exact variance propagation needs the input covariance, which a variance
    plane does not hold. Approximation: the noise is locally stationary with the
    spectrum phi whitens (P ~ 1 / |phi|^2), so the pixel variance grows by
    1 / mean_k |phi(k)|^-2; its spatial variation is smoothed by phi^2 / sum
    phi^2. Non-finite pixels count as zero (an FFT would spread a NaN over the
    whole image): the caller masks them, and the border of ``kernel``'s
    half-size, where the convolution ran off the image.
    """
    diff = np.asarray(difference, dtype=np.float64)
    var = np.asarray(variance, dtype=np.float64)
    bad = ~(np.isfinite(diff) & np.isfinite(var))
    diff, var = np.where(bad, 0.0, diff), np.where(bad, 0.0, var)
    k = np.asarray(kernel, dtype=np.float64)
    image = fft_convolve(diff, k, mode="same", single=True)
    smooth = k**2 / (k**2).sum()
    out_var = _white_variance_gain(k) * fft_convolve(var, smooth, mode="same", single=True)
    return image.astype(np.float32), np.maximum(out_var, 0.0).astype(np.float32)


def variance_scale(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """Factor f with f * variance matching the image's measured pixel variance.

    The pixel variance is that of the unmasked, finite pixels left by a 3-sigma
    clip (MAD-based bounds; robust to the sources left in a difference image),
    corrected for the Gaussian's truncation at 3 sigma, divided by their median
    variance. Assumes the
    image is (close to) white noise, i.e. decorrelated.
    """
    # A whole-image statistic: a 1-in-stride^2 subsample of about a million pixels holds
    # it to 0.15 % (the noise is white), at a fraction of a 4k CCD's clipping cost.
    stride = subsample_stride(np.size(image))
    image = np.asarray(image, dtype=np.float64)[::stride, ::stride]
    variance = np.asarray(variance, dtype=np.float64)[::stride, ::stride]
    good = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    if mask is not None:
        good &= ~np.asarray(mask, dtype=bool)[::stride, ::stride]
    if good.sum() < 100:
        raise ValueError(f"only {int(good.sum())} usable pixels to scale the variance")
    clip = 3.0
    # Bounds from the MAD (unbiased for Gaussian noise), so the cut is at 3 sigma ...
    kept = sigma_clip(image[good], sigma=clip, maxiters=5, stdfunc="mad_std", masked=False)
    # ... and the kept pixels' variance, 2.7% short of the Gaussian's, is corrected for the
    # cut (the MAD itself would be unbiased but ~2.7 times noisier).
    density_at_clip = np.exp(-0.5 * clip * clip) / np.sqrt(2.0 * np.pi)
    truncation = 1.0 - 2.0 * clip * density_at_clip / (2.0 * ndtr(clip) - 1.0)
    return float(np.var(kept) / truncation / np.median(variance[good]))


def convolved_psf(psf: PsfModel, kernel: np.ndarray, size: int | None = None) -> PsfModel:
    """``psf`` convolved with ``kernel`` at every position, the central ``size`` (odd,
    default the PSF's) of each kernel kept.

    Exact for a spatially varying model: it is linear in its basis images (normalised
    when evaluated), so each is convolved on its own. One kernel for the whole CCD,
    evaluated at its centre, misreads PSF fluxes by the PSF's change across the CCD:
    2-5 % at the corners of the default survey's calexps.
    """
    k = np.asarray(kernel, dtype=np.float64)
    size = psf.size if size is None else int(size)
    full_size = psf.size + k.shape[0] - 1
    if size % 2 == 0 or size > full_size:
        raise ValueError(f"PSF size must be odd and at most {full_size}, got {size}")
    c, h = full_size // 2, size // 2
    basis = np.stack(
        [fft_convolve(b, k, mode="full")[c - h : c + h + 1, c - h : c + h + 1] for b in psf.basis]
    )
    return replace(psf, basis=basis)
