"""fft_convolve against scipy.signal.fftconvolve (which the pipeline no longer imports)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from workflow_lib.core.convolution import fft_convolve


@pytest.mark.parametrize("mode", ["full", "same"])
@pytest.mark.parametrize(
    ("image_shape", "kernel_shape"),
    [((64, 80), (11, 11)), ((33, 17), (4, 7)), ((5, 5), (9, 9)), ((1, 40), (3, 1))],
)
def test_matches_scipy_signal(mode: str, image_shape: tuple[int, int], kernel_shape) -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(size=image_shape)
    kernel = rng.normal(size=kernel_shape)
    expected = fftconvolve(image, kernel, mode=mode)
    result = fft_convolve(image, kernel, mode=mode)
    assert result.shape == expected.shape
    np.testing.assert_allclose(result, expected, atol=1e-10 * np.abs(expected).max())


def test_point_kernel_is_identity_and_shift() -> None:
    image = np.random.default_rng(4).normal(size=(20, 30))
    delta = np.zeros((5, 5))
    delta[2, 2] = 1.0
    np.testing.assert_allclose(fft_convolve(image, delta), image, atol=1e-12)
    shifted = np.zeros((5, 5))
    shifted[2, 3] = 1.0  # one pixel to +x
    np.testing.assert_allclose(fft_convolve(image, shifted)[:, 1:], image[:, :-1], atol=1e-12)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="mode"):
        fft_convolve(np.ones((4, 4)), np.ones((3, 3)), mode="valid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        fft_convolve(np.ones(4), np.ones((3, 3)))
