"""ZOGY proper image subtraction (workflow_lib.diffim.zogy) on small synthetic images."""

from __future__ import annotations

import numpy as np
import pytest

from workflow_lib.diffim.zogy import (
    ZogyConfig,
    proper_psf,
    score_normalisation,
    zogy_difference,
    zogy_flux_scale,
)

SHAPE = (256, 256)
BORDER = 24  # interior used for statistics: away from the zero-padded edges
# (science PSF sigma, template PSF sigma): the template sharper, then the science sharper.
PSF_PAIRS = [(1.5, 2.5), (2.5, 1.5)]


def gaussian(sigma: float) -> np.ndarray:
    size = 2 * int(np.ceil(4 * sigma)) + 1
    r = np.arange(size) - size // 2
    k = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / sigma**2)
    return k / k.sum()


def add_point(image: np.ndarray, kernel: np.ndarray, y: int, x: int, flux: float) -> None:
    """flux * kernel centred on pixel (y, x), clipped to the image."""
    h = kernel.shape[0] // 2
    ny, nx = image.shape
    y0, y1, x0, x1 = max(y - h, 0), min(y + h + 1, ny), max(x - h, 0), min(x + h + 1, nx)
    image[y0:y1, x0:x1] += flux * kernel[y0 - y + h : y1 - y + h, x0 - x + h : x1 - x + h]


def psf_flux(image: np.ndarray, psf: np.ndarray, y: int, x: int) -> float:
    """PSF-weighted flux sum(D P) / sum(P^2): the optimal estimate on white noise."""
    h = psf.shape[0] // 2
    stamp = image[y - h : y + h + 1, x - h : x + h + 1]
    return float((stamp * psf).sum() / (psf**2).sum())


def noise_pair(rng, sigma_n: float, sigma_r: float, shape=SHAPE):
    science = rng.normal(0.0, sigma_n, shape)
    template = rng.normal(0.0, sigma_r, shape)
    return science, template, np.full(shape, sigma_n**2), np.full(shape, sigma_r**2)


def interior(a: np.ndarray) -> np.ndarray:
    return a[BORDER:-BORDER, BORDER:-BORDER]


def lag1(a: np.ndarray) -> tuple[float, float]:
    a = a - a.mean()
    rx = float((a[:, 1:] * a[:, :-1]).mean() / a.var())
    ry = float((a[1:] * a[:-1]).mean() / a.var())
    return rx, ry


@pytest.mark.parametrize(("s_sci", "s_tpl"), PSF_PAIRS)
def test_pure_noise_difference_is_white_with_unit_variance(s_sci, s_tpl):
    rng = np.random.default_rng(11)
    sigma_n, sigma_r = 1.0, 0.7
    sci, tpl, var_n, var_r = noise_pair(rng, sigma_n, sigma_r, (384, 384))
    res = zogy_difference(sci, tpl, var_n, var_r, gaussian(s_sci), gaussian(s_tpl))
    d = interior(res.normalised_difference)
    rx, ry = lag1(d)
    score_std = float(interior(res.score).std())
    print(
        f"\nPSFs {s_sci}/{s_tpl}: var D = {d.var():.4f}, lag-1 rho = ({rx:.4f}, {ry:.4f}), "
        f"std score = {score_std:.4f}, F_D = {res.flux_scale:.4f}"
    )
    assert abs(d.var() - 1.0) < 0.03
    assert abs(rx) < 0.03 and abs(ry) < 0.03
    assert abs(score_std - 1.0) < 0.05
    # The input images are far from white after the filters unless ZOGY whitens them:
    # the naive difference of the PSF-sharper images is not what D is.
    assert not np.allclose(d, interior(sci - tpl), atol=0.1)
    # Flux units: white variance sigma_n^2 + sigma_r^2 (F = 1), the plane agrees inside.
    np.testing.assert_allclose(interior(res.variance), sigma_n**2 + sigma_r**2, rtol=1e-4)
    assert abs(interior(res.difference).var() / (sigma_n**2 + sigma_r**2) - 1.0) < 0.03
    assert res.flux_scale == pytest.approx(zogy_flux_scale(sigma_n, sigma_r))
    assert res.psf.shape[0] % 2 == 1
    assert res.psf.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(("s_sci", "s_tpl"), PSF_PAIRS)
@pytest.mark.parametrize("sigma_r", [0.0, 0.7])
def test_transient_flux_and_significance(s_sci, s_tpl, sigma_r):
    rng = np.random.default_rng(23)
    sigma_n = 1.0
    p_sci, p_tpl = gaussian(s_sci), gaussian(s_tpl)
    sci, tpl, var_n, var_r = noise_pair(rng, sigma_n, sigma_r)
    flux, y, x = 2000.0, 120, 137
    add_point(sci, p_sci, y, x, flux)
    res = zogy_difference(sci, tpl, var_n, var_r, p_sci, p_tpl)
    measured = psf_flux(res.difference, res.psf, y, x)
    f_s = score_normalisation(p_sci, p_tpl, sigma_n, sigma_r)
    expected_snr = flux * np.sqrt(f_s)
    if sigma_r == 0.0:  # noiseless template: the science image's own PSF-fit S/N
        science_only = flux * np.sqrt((p_sci**2).sum()) / sigma_n
        assert expected_snr == pytest.approx(science_only, rel=0.01)
    peak = float(res.score[y, x])
    print(
        f"\nPSFs {s_sci}/{s_tpl}, sigma_r {sigma_r}: flux {measured:.1f} (true {flux}), "
        f"score flux {peak / np.sqrt(f_s):.1f}, significance {peak:.1f} "
        f"(expected {expected_snr:.1f})"
    )
    assert abs(measured / flux - 1.0) < 0.03
    assert abs(peak / np.sqrt(f_s) / flux - 1.0) < 0.03
    assert abs(peak / expected_snr - 1.0) < 0.10
    assert np.unravel_index(np.argmax(res.score), res.score.shape) == (y, x)


@pytest.mark.parametrize(("s_sci", "s_tpl"), PSF_PAIRS)
def test_static_star_leaves_no_residual(s_sci, s_tpl):
    rng = np.random.default_rng(5)
    sigma_n, sigma_r = 1.0, 0.7
    p_sci, p_tpl = gaussian(s_sci), gaussian(s_tpl)
    sci, tpl, var_n, var_r = noise_pair(rng, sigma_n, sigma_r)
    snr = 300.0
    flux = snr * sigma_n / np.sqrt((p_sci**2).sum())
    y, x = 100, 150
    add_point(sci, p_sci, y, x, flux)
    add_point(tpl, p_tpl, y, x, flux)
    res = zogy_difference(sci, tpl, var_n, var_r, p_sci, p_tpl)
    stamp = res.score[y - 10 : y + 11, x - 10 : x + 11]
    print(
        f"\nPSFs {s_sci}/{s_tpl}: static star S/N {snr}: score at star {res.score[y, x]:.2f}, "
        f"max |score| around it {np.abs(stamp).max():.2f}"
    )
    assert abs(res.score[y, x]) < 5
    assert np.abs(stamp).max() < 5
    # The same star with a 10% flux change is detected: the test can see a residual.
    tpl_dim = tpl.copy()
    add_point(tpl_dim, p_tpl, y, x, -0.1 * flux)
    changed = zogy_difference(sci, tpl_dim, var_n, var_r, p_sci, p_tpl)
    assert changed.score[y, x] > 10


def test_flux_zero_points_give_calibrated_difference():
    """Science in counts (F_n = 2.5 counts per nJy) gives the same nJy difference."""
    rng = np.random.default_rng(8)
    p_sci, p_tpl = gaussian(2.0), gaussian(1.5)
    sci, tpl, var_n, var_r = noise_pair(rng, 1.0, 0.5)
    add_point(sci, p_sci, 80, 90, 1500.0)
    ref = zogy_difference(sci, tpl, var_n, var_r, p_sci, p_tpl)
    g = 2.5
    counts = zogy_difference(
        g * sci, tpl, g * g * var_n, var_r, p_sci, p_tpl, config=ZogyConfig(science_flux_scale=g)
    )
    np.testing.assert_allclose(counts.difference, ref.difference, atol=1e-9)
    np.testing.assert_allclose(counts.variance, ref.variance, rtol=1e-9)
    np.testing.assert_allclose(counts.score, ref.score, atol=1e-9)
    # Without the zero point the counts image's source is 2.5 times too bright.
    wrong = zogy_difference(g * sci, tpl, g * g * var_n, var_r, p_sci, p_tpl)
    assert psf_flux(wrong.difference, wrong.psf, 80, 90) > 2.0 * 1500.0


def test_spatially_varying_variance_plane():
    """Science noise doubling in the right half: the variance plane and score follow it."""
    rng = np.random.default_rng(17)
    shape = (256, 384)
    p_sci, p_tpl = gaussian(1.5), gaussian(2.5)
    sigma = np.where(np.arange(shape[1])[None, :] < shape[1] // 2, 1.0, 2.0) * np.ones(shape)
    sci = rng.normal(0.0, 1.0, shape) * sigma
    tpl = rng.normal(0.0, 0.5, shape)
    res = zogy_difference(sci, tpl, sigma**2, np.full(shape, 0.25), p_sci, p_tpl)
    for name, cols in (("left", slice(BORDER, 150)), ("right", slice(234, -BORDER))):
        d = res.difference[BORDER:-BORDER, cols]
        v = res.variance[BORDER:-BORDER, cols]
        s = res.score[BORDER:-BORDER, cols]
        print(f"\n{name}: var D {d.var():.3f} vs plane {v.mean():.3f}, std score {s.std():.3f}")
        assert abs(d.var() / v.mean() - 1.0) < 0.05
        assert abs(s.std() - 1.0) < 0.07
    const = zogy_difference(
        sci,
        tpl,
        sigma**2,
        np.full(shape, 0.25),
        p_sci,
        p_tpl,
        config=ZogyConfig(spatial_variance=False),
    )
    assert np.ptp(const.variance) == 0.0
    left = const.score[BORDER:-BORDER, BORDER:150].std()
    right = const.score[BORDER:-BORDER, 234:-BORDER].std()
    print(f"constant-variance score std: left {left:.3f}, right {right:.3f}")
    assert left < 0.85 and right > 1.15  # uncorrected: wrong on both sides


def test_padding_prevents_wrap_around():
    rng = np.random.default_rng(3)
    shape = (128, 128)
    p_sci, p_tpl = gaussian(2.5), gaussian(1.5)
    sci, tpl, var_n, var_r = noise_pair(rng, 1.0, 0.7, shape)
    add_point(sci, p_sci, 64, 2, 5e4)
    padded = zogy_difference(sci, tpl, var_n, var_r, p_sci, p_tpl)
    far_side = np.abs(padded.score[:, -8:]).max()
    unpadded = zogy_difference(sci, tpl, var_n, var_r, p_sci, p_tpl, config=ZogyConfig(pad_width=0))
    wrapped = np.abs(unpadded.score[:, -8:]).max()
    reflect = zogy_difference(
        sci, tpl, var_n, var_r, p_sci, p_tpl, config=ZogyConfig(padding="reflect")
    )
    print(
        f"\nmax |score| at the far edge: padded {far_side:.2f}, unpadded {wrapped:.1f}, "
        f"reflect {np.abs(reflect.score[:, -8:]).max():.2f}"
    )
    assert far_side < 5
    assert wrapped > 50  # the check can fail: without padding the source wraps round
    assert np.abs(reflect.score[:, -8:]).max() < 5
    inner = (slice(40, -40), slice(40, -40))
    # Inside, far from the edges, the padding choice hardly matters (<1% of the noise).
    np.testing.assert_allclose(reflect.difference[inner], padded.difference[inner], atol=1e-2)


@pytest.mark.parametrize("fill", ["zero", "median"])
def test_masked_pixels_are_ignored_and_mask_grows(fill):
    rng = np.random.default_rng(29)
    p_sci, p_tpl = gaussian(1.5), gaussian(2.5)
    sci, tpl, var_n, var_r = noise_pair(rng, 1.0, 0.7)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[100:103, 60:62] = True
    sci[101, 60] = 1e6  # a cosmic ray or bad column
    tpl[100, 61] = np.nan
    res = zogy_difference(
        sci, tpl, var_n, var_r, p_sci, p_tpl, mask=mask, config=ZogyConfig(mask_fill=fill)
    )
    unmasked = zogy_difference(sci, np.nan_to_num(tpl), var_n, var_r, p_sci, p_tpl)
    grown = res.mask[BORDER:-BORDER, BORDER:-BORDER]
    radius = int(res.mask[101, :].sum() - res.mask[101, BORDER:-BORDER].sum()) // 2
    print(
        f"\nfill {fill}: grown mask {grown.sum()} px (radius {radius}), max |score| "
        f"outside {np.abs(res.score[~res.mask]).max():.2f}, unmasked run "
        f"{np.abs(unmasked.score).max():.0f}"
    )
    assert np.all(np.isfinite(res.difference)) and np.all(np.isfinite(res.score))
    assert np.abs(res.score[~res.mask]).max() < 5.5
    assert np.abs(unmasked.score).max() > 100  # the spike would show without the mask
    assert grown.sum() == (3 + 2 * radius) * (2 + 2 * radius)
    assert res.mask[101, 60 - radius] and not res.mask[101, 60 - radius - 1]
    assert radius >= 3


def test_proper_psf_limits():
    """Noiseless template: P_D is the science PSF; equal PSFs: P_D is that PSF."""
    p_sci, p_tpl = gaussian(1.5), gaussian(2.5)
    pd = proper_psf(p_sci, p_tpl, 1.0, 0.0, size=p_sci.shape[0])
    # (up to the sign of the truncated template kernel's transform at high frequencies)
    np.testing.assert_allclose(pd, p_sci, atol=5e-3 * p_sci.max())
    pd = proper_psf(p_tpl, p_tpl, 1.0, 0.7)
    np.testing.assert_allclose(pd, p_tpl, atol=5e-3 * p_tpl.max())
    pd = proper_psf(p_sci, p_tpl, 1.0, 0.7)
    assert pd.shape == p_tpl.shape and pd.sum() == pytest.approx(1.0)
    assert not np.allclose(pd, p_tpl, atol=1e-3) and not np.allclose(pd[4:-4, 4:-4], p_sci)


def test_config_validation():
    with pytest.raises(ValueError):
        ZogyConfig(padding="wrap")
    with pytest.raises(ValueError):
        ZogyConfig(science_flux_scale=0.0)
    with pytest.raises(ValueError):
        ZogyConfig(psf_size=10)
    img = np.zeros((32, 32))
    with pytest.raises(ValueError):
        zogy_difference(img, img, img + 1, img + 1, np.ones((4, 4)), gaussian(1.0))
