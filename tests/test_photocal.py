"""Photometric zero point: recovery, outlier rejection and honest error bars."""

from __future__ import annotations

import numpy as np
import pytest

from workflow_lib.core.exposure import PhotoCalib
from workflow_lib.single_frame.photocal import (
    PhotoCalError,
    fit_zero_point,
    select_photometric_stars,
)

ZP = 28.37


def stars(rng: np.random.Generator, n: int = 100, *, ref_err: float = 0.003, intrinsic=0.0):
    """Fluxes (e-/s) with Poisson+sky errors and reference mags with ``ref_err`` noise."""
    true_mag = rng.uniform(16.0, 21.0, n)
    flux_true = 10 ** (-0.4 * (true_mag - ZP))
    exptime = 30.0
    err_e = np.sqrt(flux_true * exptime + 2e4) / exptime
    flux = flux_true + rng.normal(0, 1, n) * err_e
    flux *= 10 ** (-0.4 * rng.normal(0, intrinsic, n)) if intrinsic else 1.0
    ref = true_mag + rng.normal(0, ref_err, n)
    return flux, err_e, ref, np.full(n, ref_err)


def test_zero_point_of_100_stars_to_a_millimag():
    rng = np.random.default_rng(1)
    flux, err, ref, ref_err = stars(rng)
    res = fit_zero_point(flux.astype(">f8"), err, ref, ref_err)  # big-endian on purpose
    assert abs(res.zero_point - ZP) < 0.001
    assert abs(res.zero_point - ZP) < 4 * res.zero_point_err
    assert res.zero_point_err < 0.001 and res.n_used >= 97
    assert res.used.dtype == bool and len(res.used) == 100


def test_variables_and_blends_are_rejected():
    rng = np.random.default_rng(2)
    flux, err, ref, ref_err = stars(rng, 120)
    var = rng.choice(120, 10, replace=False)
    flux[var] *= 10 ** (-0.4 * rng.choice([-1, 1], 10) * rng.uniform(0.1, 0.5, 10))
    blend = np.setdiff1d(np.arange(120), var)[:6]
    flux[blend] *= 10 ** (0.4 * rng.uniform(0.05, 0.3, 6))  # a neighbour adds light
    res = fit_zero_point(flux, err, ref, ref_err)
    assert not res.used[var].any() and not res.used[blend].any()
    assert abs(res.zero_point - ZP) < 0.0015
    # Plain mean would be biased by the blends and variables.
    naive = np.mean(ref + 2.5 * np.log10(np.clip(flux, 1e-9, None)))
    assert abs(naive - ZP) > abs(res.zero_point - ZP)


@pytest.mark.parametrize("intrinsic", [0.0, 0.01])
def test_error_bar_matches_monte_carlo_scatter(intrinsic):
    """The quoted error equals the scatter of the zero point over noise realisations (10%)."""
    rng = np.random.default_rng(3)
    zps, errs = [], []
    for _ in range(300):
        flux, err, ref, ref_err = stars(rng, 60, intrinsic=intrinsic)
        res = fit_zero_point(flux, err, ref, ref_err)
        zps.append(res.zero_point)
        errs.append(res.zero_point_err)
    zps = np.array(zps)
    scatter = np.std(zps)
    assert abs(np.mean(zps) - ZP) < 4 * scatter / np.sqrt(len(zps))
    assert np.mean(errs) == pytest.approx(scatter, rel=0.15)
    if intrinsic:
        assert res.intrinsic_mag == pytest.approx(intrinsic, abs=0.005)


def test_too_few_stars_and_nan_inputs():
    rng = np.random.default_rng(4)
    flux, err, ref, ref_err = stars(rng, 10)
    flux[:8] = np.nan
    with pytest.raises(PhotoCalError, match="too few stars"):
        fit_zero_point(flux, err, ref, ref_err)
    with pytest.raises(PhotoCalError, match="too few stars"):
        fit_zero_point(flux, err, ref, ref_err, min_stars=5)
    flux[6:8] = 1e4  # four usable stars are enough by default
    assert fit_zero_point(flux, err, ref, ref_err).n_used >= 3
    flux, err, ref, ref_err = stars(rng, 10)
    ref_err[:] = np.nan  # unknown reference errors count as zero
    res = fit_zero_point(flux, err, ref, ref_err)
    assert abs(res.zero_point - ZP) < 0.01
    assert issubclass(PhotoCalError, ValueError)


def test_selection_and_photo_calib():
    flux = np.array([1000.0, 100.0, np.nan, 5e5, 2000.0, -5.0])
    err = np.array([10.0, 10.0, 1.0, 700.0, 10.0, 1.0])
    bad = np.array([False, False, False, False, True, False])
    sel = select_photometric_stars(flux, err, bad=bad, min_snr=20.0, max_flux=4e5)
    assert sel.tolist() == [True, False, False, False, False, False]
    rng = np.random.default_rng(5)
    res = fit_zero_point(*stars(rng))
    pc = res.photo_calib(exptime=30.0)
    assert pc.njy_per_unit == PhotoCalib.njy_per_electron(res.zero_point, 30.0)
    # A star of 1 e-/s (30 e- in the image) has magnitude zero_point.
    assert 31.4 - 2.5 * np.log10(30.0 * pc.njy_per_unit) == pytest.approx(res.zero_point)
    assert pc.njy_per_unit_err / pc.njy_per_unit == pytest.approx(
        0.4 * np.log(10) * res.zero_point_err
    )


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("intrinsic", [0.0, 0.015])
def test_one_gross_outlier_among_few_stars(n, intrinsic):
    """A galaxy matched to a star or a variable (0.3-2 mag off) among 3, 5 or 10 stars is
    rejected and leaves the zero point where the good stars put it."""
    rng = np.random.default_rng(40 + n)
    for _ in range(50):
        flux, err, ref, ref_err = stars(rng, n, intrinsic=intrinsic)
        good = fit_zero_point(flux[1:], err[1:], ref[1:], ref_err[1:], min_stars=2)
        flux[0] *= 10 ** (-0.4 * rng.choice([-1, 1]) * rng.uniform(0.3, 2.0))
        res = fit_zero_point(flux, err, ref, ref_err)
        assert not res.used[0] and res.n_used == n - 1
        assert res.zero_point == pytest.approx(good.zero_point, abs=1e-9)
        assert abs(res.zero_point - ZP) < 5 * res.zero_point_err


@pytest.mark.parametrize("n", [3, 5, 10])
def test_error_bar_with_few_stars_is_honest(n):
    """Over noise realisations with an intrinsic scatter the stars must measure, the
    quoted error covers the truth about as often as a one-sigma error should."""
    rng = np.random.default_rng(60 + n)
    d, e = [], []
    for _ in range(400):
        flux, err, ref, ref_err = stars(rng, n, intrinsic=0.015)
        res = fit_zero_point(flux, err, ref, ref_err)
        d.append(res.zero_point - ZP)
        e.append(res.zero_point_err)
    coverage = np.mean(np.abs(d) < np.array(e))
    assert 0.6 < coverage < 0.85
    # Few stars, few degrees of freedom: the error is wider than the Gaussian one.
    assert np.mean(e) > np.std(d) * (0.9 if n > 3 else 1.0)
