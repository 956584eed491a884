"""The pixelized, spatially varying PSF model container."""

import numpy as np
import pytest

from workflow_lib.core.psf_model import PsfModel, fwhm_of_image, monomial_exponents


def _gaussian(sigma: float, size: int = 25) -> np.ndarray:
    half = size // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    return np.exp(-(xx**2 + yy**2) / (2 * sigma**2))


@pytest.mark.parametrize("sigma", [1.0, 1.7, 2.5, 3.5])
def test_fwhm_of_sampled_gaussian(sigma):
    assert fwhm_of_image(_gaussian(sigma)) == pytest.approx(2.3548 * sigma, rel=0.01)


def test_fwhm_of_non_gaussian_profile():
    # A Moffat with beta=2.5: FWHM = 2 alpha sqrt(2^(1/beta) - 1).
    alpha, beta = 3.0, 2.5
    yy, xx = np.mgrid[-30:31, -30:31]
    moffat = (1 + (xx**2 + yy**2) / alpha**2) ** -beta
    expected = 2 * alpha * np.sqrt(2 ** (1 / beta) - 1)
    assert fwhm_of_image(moffat) == pytest.approx(expected, rel=0.01)


def test_monomial_order():
    assert monomial_exponents(2) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]


def test_linear_variation_is_evaluated_and_normalised():
    narrow, wide = (g / g.sum() for g in (_gaussian(1.5), _gaussian(2.5)))
    # kernel(u) = narrow + u (wide - narrow): narrow at u=0, wide at u=1.
    basis = np.stack(
        [narrow / narrow.sum(), wide / wide.sum() - narrow / narrow.sum(), np.zeros_like(wide)]
    )
    psf = PsfModel(basis, order=1, x_center=100, y_center=0, x_scale=200, y_scale=100)
    assert psf.kernel_at(100, 50).sum() == pytest.approx(1.0)
    assert psf.fwhm_at(100, 0) == pytest.approx(2.3548 * 1.5, rel=0.01)
    assert psf.fwhm_at(300, 0) == pytest.approx(2.3548 * 2.5, rel=0.01)


def test_invalid_models_are_rejected():
    with pytest.raises(ValueError, match="odd"):
        PsfModel.constant(np.ones((4, 4)))
    with pytest.raises(ValueError, match="order"):
        PsfModel(np.ones((2, 5, 5)), order=1)
    with pytest.raises(ValueError, match="non-positive"):
        PsfModel(
            np.stack([np.ones((5, 5)), -np.ones((5, 5)), np.zeros((5, 5))]), order=1
        ).kernel_at(5, 0)


def test_fit_box_holds_the_model_beyond_its_stars():
    """Outside the stars' box the kernel is the one at the box's nearest point, and the
    box survives the FITS cards (a quadratic left free there goes negative)."""
    from workflow_lib.core.psf_model import evaluate_kernels

    narrow, wide = (g / g.sum() for g in (_gaussian(1.5), _gaussian(2.5)))
    # kernel = narrow + u^2 (wide - narrow): fine for |u| <= 1, a negative core beyond ~1.5
    basis = np.zeros((6, 25, 25))
    basis[0], basis[3] = narrow, wide - narrow
    free = PsfModel(basis=basis, order=2, x_center=50.0, y_center=50.0, x_scale=50.0, y_scale=50.0)
    boxed = PsfModel(
        basis=basis,
        order=2,
        x_center=50.0,
        y_center=50.0,
        x_scale=50.0,
        y_scale=50.0,
        fit_box=(10.0, 90.0, 20.0, 80.0),
    )
    assert free.kernel_at(-40.0, 50.0)[12, 12] < 0  # u = -1.8
    assert boxed.kernel_at(-40.0, 50.0).min() >= 0
    np.testing.assert_allclose(boxed.kernel_at(-40.0, 95.0), free.kernel_at(10.0, 80.0))
    np.testing.assert_allclose(boxed.kernel_at(40.0, 60.0), free.kernel_at(40.0, 60.0))
    many = evaluate_kernels(boxed, np.array([-40.0, 40.0]), np.array([95.0, 60.0]))
    np.testing.assert_allclose(many[0], free.kernel_at(10.0, 80.0), atol=1e-12)
    cards = {k: v for k, v, _ in boxed.header_cards() if k != "COMMENT"}
    again = PsfModel.from_header_and_cube(cards, basis)
    assert again.fit_box == boxed.fit_box
    assert "PSFXMIN" not in {k for k, _, _ in free.header_cards()}
    with pytest.raises(ValueError, match="empty"):
        PsfModel(basis=basis, order=2, fit_box=(5.0, 1.0, 0.0, 1.0))
