"""Alard-Lupton kernel fit on synthetic template/science pairs with a known kernel."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from workflow_lib.diffim.alard_lupton import (
    AlardLuptonConfig,
    KernelFitError,
    alard_lupton_basis,
    fit_kernel,
    psf_kernel_solution,
    subtract,
)
from workflow_lib.static_sky.psf_matching import MatchingKernels

N = 200
SIG_T, SIG_S = 1.5, 2.2
SIG_K = float(np.sqrt(SIG_S**2 - SIG_T**2))
SCALE = 1.3
SKY_VAR_S, SKY_VAR_T = 25.0, 1.0


def gaussian_kernel(sigma: float, size: int, dx: float = 0.0) -> np.ndarray:
    d = np.arange(size) - size // 2
    g = np.exp(-0.5 * ((d[None, :] - dx) ** 2 + d[:, None] ** 2) / sigma**2)
    return g / g.sum()


def render(xs, ys, fluxes, sigmas) -> np.ndarray:
    """Sum of pixel-sampled circular Gaussians (sigma per star)."""
    yy, xx = np.mgrid[:N, :N]
    out = np.zeros((N, N))
    for x, y, f, s in zip(xs, ys, fluxes, np.broadcast_to(sigmas, np.shape(xs)), strict=True):
        out += f * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / s**2) / (2 * np.pi * s**2)
    return out


def background_truth() -> np.ndarray:
    yy, xx = np.mgrid[:N, :N]
    return 10.0 + 0.03 * xx - 0.02 * yy


def observe(rng, template_true, science_true, template_sky_var=SKY_VAR_T):
    """Noisy template (a deep coadd, sky-subtracted) and science (with a sky gradient)."""
    tvar = template_sky_var + template_true / 50.0
    svar = SKY_VAR_S + science_true / 2.0
    template = template_true + rng.normal(size=(N, N)) * np.sqrt(tvar)
    science = science_true + background_truth() + rng.normal(size=(N, N)) * np.sqrt(svar)
    return template, science, tvar, svar


def stars(rng, n=40):
    return rng.uniform(22, 178, n), rng.uniform(22, 178, n), rng.uniform(3000, 30000, n)


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(20240611)
    xs, ys, fl = stars(rng)
    t_true = render(xs, ys, fl, SIG_T)
    kernel = gaussian_kernel(SIG_K, 21)
    s_true = SCALE * fftconvolve(t_true, kernel, mode="same")
    return (xs, ys, fl, kernel, *observe(rng, t_true, s_true))


def stamp_chi2(diff, var, xs, ys, half=8) -> np.ndarray:
    """Mean (difference / sigma)^2 in boxes around the stars."""
    out = []
    for x, y in zip(xs, ys, strict=True):
        xc, yc = round(x), round(y)
        sl = (slice(yc - half, yc + half + 1), slice(xc - half, xc + half + 1))
        out.append(float((diff[sl] ** 2 / var[sl]).mean()))
    return np.array(out)


def fit(scene, idx=None, **cfg):
    xs, ys, _, _, template, science, tvar, svar = scene
    idx = slice(None) if idx is None else idx
    return fit_kernel(
        template,
        science,
        tvar,
        svar,
        None,
        xs[idx],
        ys[idx],
        template_sigma=SIG_T,
        science_sigma=SIG_S,
        config=AlardLuptonConfig(**cfg),
    )


def test_basis_is_normalised_for_a_constant_kernel_sum():
    basis = alard_lupton_basis((0.8, 1.6, 3.2), (6, 4, 2), 21)
    assert basis.shape == (28 + 15 + 6, 21, 21)
    assert basis[0].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(basis[1:].sum(axis=(1, 2)), 0.0, atol=1e-12)


def test_recovers_flux_scale_kernel_and_background(scene):
    xs, ys, _, kernel, template, science, tvar, svar = scene
    sol = fit(scene)
    assert sol.degrees == (6, 4, 2) and sol.spatial_order == 1 and sol.n_stamps == 40
    assert sol.rejected.size == 0 and sol.skipped.size == 0
    ksum = sol.kernel_sum_at(100.0, 100.0)
    kerr = np.sqrt(
        ((sol.kernel_at(100, 100) - SCALE * kernel) ** 2).sum() / ((SCALE * kernel) ** 2).sum()
    )
    raw = fit(scene, ridge=0.0).kernel_at(100, 100)
    kerr_raw = np.sqrt(((raw - SCALE * kernel) ** 2).sum() / ((SCALE * kernel) ** 2).sum())
    diff, var = subtract(template, science, tvar, svar, sol, grid_spacing=100.0)
    chi2 = stamp_chi2(diff, var, xs, ys)
    bg_err = sol.background((N, N)) - background_truth()
    print(
        f"kernel sum {ksum:.4f} (error {ksum / SCALE - 1:+.4f}); kernel L2 error {kerr:.3f} "
        f"(undamped {kerr_raw:.3f}); stamp chi2/dof mean {chi2.mean():.3f} max {chi2.max():.3f}; "
        f"background error inner {np.abs(bg_err[20:-20, 20:-20]).max():.3f}"
    )
    assert abs(ksum / SCALE - 1) < 0.01
    assert kerr < 0.4 and kerr < kerr_raw
    assert chi2.max() < 1.3 and chi2.mean() < 1.1
    assert np.abs(bg_err[20:-20, 20:-20]).max() < 0.5
    # The difference is flat: no residual sky left away from the stars either.
    assert abs(np.median(diff[20:-20, 20:-20])) < 0.2


def test_template_variance_weighting(scene):
    """A shallow template: its noise, convolved with K^2, is part of the fit's weights."""
    xs, ys, fl, kernel, *_ = scene
    rng = np.random.default_rng(8)
    t_true = render(xs, ys, fl, SIG_T)
    s_true = SCALE * fftconvolve(t_true, kernel, mode="same")
    images = (xs, ys, fl, kernel, *observe(rng, t_true, s_true, template_sky_var=100.0))
    sol, base = fit(images, use_template_variance=True), fit(images)
    with_t, without = np.median(sol.stamp_chi2), np.median(base.stamp_chi2)
    print(
        f"shallow template: kernel sum {sol.kernel_sum_at(100, 100):.4f} with its variance, "
        f"{base.kernel_sum_at(100, 100):.4f} without; median stamp chi2 {with_t:.3f} vs "
        f"{without:.3f}"
    )
    assert abs(sol.kernel_sum_at(100, 100) / SCALE - 1) < 0.01
    assert abs(with_t - 1.0) < 0.06 and without > with_t + 0.1


def test_kernel_orientation_matches_the_convolution(scene):
    """A science image shifted by +0.7 px in x gives a kernel whose centroid is at +0.7."""
    xs, ys, fl, _, *_ = scene
    rng = np.random.default_rng(5)
    t_true = render(xs, ys, fl, SIG_T)
    s_true = SCALE * fftconvolve(t_true, gaussian_kernel(SIG_K, 21, dx=0.7), mode="same")
    template, science, tvar, svar = observe(rng, t_true, s_true)
    sol = fit((xs, ys, fl, None, template, science, tvar, svar))
    k = sol.kernel_at(100, 100)
    d = np.arange(k.shape[0]) - k.shape[0] // 2
    cx, cy = (k.sum(axis=0) * d).sum() / k.sum(), (k.sum(axis=1) * d).sum() / k.sum()
    diff, var = subtract(template, science, tvar, svar, sol, grid_spacing=100.0)
    print(f"kernel centroid ({cx:.3f}, {cy:.3f}); chi2 {stamp_chi2(diff, var, xs, ys).mean():.3f}")
    assert cx == pytest.approx(0.7, abs=0.05) and abs(cy) < 0.05
    assert stamp_chi2(diff, var, xs, ys).max() < 1.3


def test_spatially_varying_kernel_needs_order_one():
    rng = np.random.default_rng(11)
    xs, ys, fl = stars(rng, 50)
    sig_k = 1.2 + 0.8 * xs / (N - 1)  # kernel width grows linearly across the image
    t_true = render(xs, ys, fl, SIG_T)
    s_true = SCALE * render(xs, ys, fl, np.sqrt(SIG_T**2 + sig_k**2))
    template, science, tvar, svar = observe(rng, t_true, s_true)
    chi2 = {}
    for order in (0, 1):
        sol = fit_kernel(
            template,
            science,
            tvar,
            svar,
            None,
            xs,
            ys,
            template_sigma=SIG_T,
            science_sigma=float(np.sqrt(SIG_T**2 + 1.6**2)),
            config=AlardLuptonConfig(spatial_order=order),
        )
        assert sol.spatial_order == order
        diff, var = subtract(template, science, tvar, svar, sol, grid_spacing=50.0)
        chi2[order] = stamp_chi2(diff, var, xs, ys)
    print(
        f"order 0 chi2 mean {chi2[0].mean():.3f} max {chi2[0].max():.3f}; "
        f"order 1 mean {chi2[1].mean():.3f} max {chi2[1].max():.3f}"
    )
    assert chi2[1].mean() < 1.1 and chi2[1].max() < 1.3
    assert chi2[0].mean() > chi2[1].mean() + 0.1
    assert chi2[0].max() > 1.5


def test_variable_star_stamp_is_rejected(scene):
    xs, ys, fl, kernel, template, science, tvar, svar = scene
    j = int(np.argmax(fl))  # the brightest star brightens by 30% in the science image
    extra = (
        0.3
        * SCALE
        * fftconvolve(
            render(xs[j : j + 1], ys[j : j + 1], fl[j : j + 1], SIG_T), kernel, mode="same"
        )
    )
    sol = fit((xs, ys, fl, kernel, template, science + extra, tvar, svar))
    sep = np.hypot(xs[sol.rejected] - xs[j], ys[sol.rejected] - ys[j])
    print(
        f"rejected {sol.rejected.tolist()} (variable star {j}; distances {np.round(sep, 1)}); "
        f"used {sol.n_stamps}"
    )
    assert j in sol.rejected and j not in sol.used
    assert sol.n_stamps >= 36 and sol.n_stamps + sol.rejected.size == 40
    assert abs(sol.kernel_sum_at(100, 100) / SCALE - 1) < 0.01


def test_few_stamps_fall_back_to_simpler_models(scene):
    order = np.argsort(scene[2])[::-1]  # brightest first
    five, three = fit(scene, order[:5]), fit(scene, order[:3])
    print(
        f"5 stamps: degrees {five.degrees}, order {five.spatial_order}, "
        f"sum {five.kernel_sum_at(100, 100):.4f}; 3 stamps: degrees {three.degrees}, "
        f"order {three.spatial_order}, sum {three.kernel_sum_at(100, 100):.4f}"
    )
    assert five.degrees == (2, 1, 0) and five.spatial_order == 0 and five.n_stamps == 5
    assert five.basis.shape[0] == 6 + 3 + 1
    assert three.degrees == (0, 0, 0) and three.spatial_order == 0
    assert three.background_order == 0 and three.basis.shape[0] == 3
    for sol in (five, three):
        assert abs(sol.kernel_sum_at(100, 100) / SCALE - 1) < 0.02
    with pytest.raises(KernelFitError, match="only 2 usable"):
        fit(scene, order[:2])


def test_stamps_off_the_image_or_masked_are_skipped(scene):
    xs, ys, _, _, template, science, tvar, svar = scene
    sep = np.hypot(xs[:, None] - xs[None, :], ys[:, None] - ys[None, :]) + 1e3 * np.eye(40)
    j = int(np.argmax(sep.min(axis=1)))  # the most isolated star
    mask = np.zeros((N, N), dtype=bool)
    # One bad template pixel spoils every science pixel whose kernel footprint holds it.
    mask[round(ys[j]), round(xs[j])] = True
    x, y = np.concatenate([xs, [3.0]]), np.concatenate([ys, [100.0]])
    sol = fit_kernel(
        template, science, tvar, svar, mask, x, y, template_sigma=SIG_T, science_sigma=SIG_S
    )
    assert sol.skipped.tolist() == [j, 40] and sol.n_stamps == 39
    assert abs(sol.kernel_sum_at(100, 100) / SCALE - 1) < 0.01


def test_psf_model_fallback_gives_the_gaussian_matching_kernel():
    sol = psf_kernel_solution(
        gaussian_kernel(SIG_T, 25), gaussian_kernel(SIG_S, 25), 21, flux_scale=SCALE, shape=(N, N)
    )
    k = sol.kernel_at(10.0, 190.0) / SCALE
    d = np.arange(21) - 10
    r2 = d[None, :] ** 2 + d[:, None] ** 2
    sigma = np.sqrt((k * r2).sum() / k.sum() / 2)
    err = np.sqrt(((k - gaussian_kernel(SIG_K, 21)) ** 2).sum() / (k**2).sum())
    print(f"PSF-model kernel sigma {sigma:.4f} (expected {SIG_K:.4f}), L2 error {err:.4f}")
    assert sigma == pytest.approx(SIG_K, rel=0.01) and err < 0.01
    assert sol.kernel_sum_at(0, 0) == pytest.approx(SCALE)
    assert sol.method == "psf-models" and np.all(sol.background((5, 5)) == 0)
    mk = sol.to_matching_kernels((N, N), 100.0)
    assert isinstance(mk, MatchingKernels) and mk.kernels.shape == (3, 3, 21, 21)
    assert mk.gains.max() == pytest.approx(SCALE, rel=1e-3) and mk.radius >= 2
