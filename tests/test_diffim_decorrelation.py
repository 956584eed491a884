"""Decorrelation afterburner: the difference of white-noise images is white again."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from workflow_lib.core.psf_model import PsfModel
from workflow_lib.diffim.decorrelation import (
    convolved_psf,
    decorrelate,
    decorrelation_kernel,
    variance_scale,
)

N = 256
SVAR, TVAR = 1.0, 2.0  # a noisy template makes the correlation easy to see
MARGIN = 20  # border where the convolutions ran off the image


def gaussian_kernel(sigma: float, size: int) -> np.ndarray:
    d = np.arange(size) - size // 2
    g = np.exp(-0.5 * (d[None, :] ** 2 + d[:, None] ** 2) / sigma**2)
    return g / g.sum()


def lag_correlation(image: np.ndarray) -> tuple[float, float]:
    """Correlation coefficient of neighbouring pixels along x and along y."""
    a = image - image.mean()
    var = (a * a).mean()
    return float((a[:, 1:] * a[:, :-1]).mean() / var), float((a[1:] * a[:-1]).mean() / var)


def make_difference(scale: float):
    """White science minus white template convolved with a Gaussian K of sum ``scale``."""
    rng = np.random.default_rng(42)
    kernel = scale * gaussian_kernel(1.0, 15)
    science = rng.normal(0.0, np.sqrt(SVAR), (N, N))
    template = rng.normal(0.0, np.sqrt(TVAR), (N, N))
    diff = science - fftconvolve(template, kernel, mode="same")
    var = np.full((N, N), SVAR + TVAR * (kernel**2).sum())  # what subtract() reports
    return kernel, diff, var


@pytest.fixture(scope="module")
def difference():
    return make_difference(1.0)


def inner(a: np.ndarray) -> np.ndarray:
    return a[MARGIN:-MARGIN, MARGIN:-MARGIN]


def test_decorrelation_kernel_is_identity_without_template_noise():
    phi = decorrelation_kernel(gaussian_kernel(1.5, 11), 1.0, 0.0)
    expected = np.zeros((11, 11))
    expected[5, 5] = 1.0
    np.testing.assert_allclose(phi, expected, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_difference_noise_is_white_after_decorrelation(scale):
    """Also with a photometric scale in K: phi(0) = 1 and the variance is s + scale^2 t."""
    kernel, diff, var = make_difference(scale)
    phi = decorrelation_kernel(kernel, SVAR, TVAR)
    assert phi.shape == kernel.shape and phi.sum() == pytest.approx(1.0)
    assert phi[7, 7] > 1.0 and phi.min() < 0  # it sharpens: the inverse of a smoothing
    before = lag_correlation(inner(diff))
    image, out_var = decorrelate(diff, var, phi)
    after = lag_correlation(inner(image))
    measured, predicted = inner(image).var(), float(np.median(inner(out_var)))
    white = SVAR + scale**2 * TVAR
    print(
        f"K sum {scale}: lag-1 correlation before {before[0]:.4f}, {before[1]:.4f}; after "
        f"{after[0]:.4f}, {after[1]:.4f}; pixel variance {measured:.4f} vs plane "
        f"{predicted:.4f} (white-noise value {white:.2f})"
    )
    assert min(before) > 0.08  # > 15 sigma for 46k pixels
    assert max(abs(r) for r in after) < 0.02
    assert predicted == pytest.approx(measured, rel=0.03)
    assert measured == pytest.approx(white, rel=0.03)


def test_variance_scale_makes_the_plane_match_the_pixels(difference):
    kernel, diff, var = difference
    image, out_var = decorrelate(diff, var, decorrelation_kernel(kernel, SVAR, TVAR))
    image, out_var = inner(image).copy(), 0.7 * inner(out_var)  # a plane 30% too low
    mask = np.zeros(image.shape, dtype=bool)
    rng = np.random.default_rng(3)
    image[10:70, 10:70] += rng.normal(0.0, 4.0, (60, 60))  # a masked noisy patch ...
    mask[10:70, 10:70] = True
    image[100, 100:105] = 500.0  # ... and unmasked sources, left to the clipping
    factor = variance_scale(image, out_var, mask)
    truth = inner_var(image, mask)
    ratio = factor * float(np.median(out_var)) / truth
    print(
        f"variance scale {factor:.4f} (expected ~{1 / 0.7:.4f}); scaled plane / pixel "
        f"variance {ratio:.4f}"
    )
    assert ratio == pytest.approx(1.0, abs=0.03)
    assert factor == pytest.approx(1 / 0.7, rel=0.03)
    unmasked = variance_scale(image, out_var)
    print(f"without the mask {unmasked:.4f}")
    assert unmasked > factor * 1.05  # the masked patch would inflate it


def inner_var(image: np.ndarray, mask: np.ndarray) -> float:
    """Pixel variance of the noise alone (masked pixels and the sources left out)."""
    keep = ~mask
    keep[100, 100:105] = False
    return float(image[keep].var())


def test_decorrelated_psf_is_the_science_psf_convolved():
    psf = gaussian_kernel(2.2, 25)
    phi = decorrelation_kernel(gaussian_kernel(1.6, 15), SVAR, TVAR)
    out = convolved_psf(PsfModel.constant(psf), phi).kernel_at(10.0, 10.0)
    assert out.shape == psf.shape and out.sum() == pytest.approx(1.0)
    full = fftconvolve(psf, phi, mode="full")[7:-7, 7:-7]
    np.testing.assert_allclose(out, full / full.sum(), atol=1e-12)
    assert out.max() > psf.max()  # phi sharpens the PSF


def test_decorrelated_psf_varies_as_the_science_psf():
    """A PSF that widens across the CCD stays a varying model: at every position the
    model is that position's PSF convolved with phi, not the centre's."""
    sharp, broad = gaussian_kernel(1.8, 25), gaussian_kernel(2.6, 25)
    # Linear in u over a CCD of 1000 px: sharp at x = 0, broad at x = 999.
    model = PsfModel(
        basis=np.stack([(sharp + broad) / 2, (broad - sharp) / 2, np.zeros_like(sharp)]),
        order=1,
        x_center=499.5,
        y_center=499.5,
        x_scale=499.5,
        y_scale=499.5,
    )
    phi = decorrelation_kernel(gaussian_kernel(1.6, 15), SVAR, TVAR)
    out = convolved_psf(model, phi)
    for x, kernel in ((0.0, sharp), (999.0, broad)):
        full = fftconvolve(kernel, phi, mode="full")[7:-7, 7:-7]
        np.testing.assert_allclose(out.kernel_at(x, 300.0), full / full.sum(), atol=1e-12)
    # The centre's kernel would misread the flux at the broad edge by several per cent.
    centre, edge = out.kernel_at(499.5, 300.0), out.kernel_at(999.0, 300.0)
    assert (edge * centre).sum() / (centre * centre).sum() < 0.95
