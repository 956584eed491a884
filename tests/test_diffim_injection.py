"""Source injection (workflow_lib.diffim.injection) and the efficiency it measures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from workflow_lib.core.exposure import MASK_DTYPE, MaskPlanes
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.diffim.injection import (
    injection_positions,
    match_injected,
    point_source_image,
)
from workflow_lib.diffim.sources import DiaDetectionConfig, detect_dia_sources
from workflow_lib.qa.efficiency import efficiency_bins, fit_efficiency
from workflow_lib.qa.survey_metrics import injection_summary

SIGMA = 1.7  # PSF sigma, pixels (FWHM 4 px)


def _gaussian_psf(half: int = 12) -> PsfModel:
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    return PsfModel.constant(np.exp(-(xx**2 + yy**2) / (2 * SIGMA**2)))


@pytest.mark.parametrize(("x", "y"), [(40.0, 50.0), (40.37, 50.81), (41.5, 49.12)])
def test_an_injected_source_has_its_flux_and_its_sub_pixel_centre(x, y):
    image = point_source_image((100, 100), _gaussian_psf(), np.array([x]), np.array([y]), [1000.0])
    assert image.sum() == pytest.approx(1000.0, rel=1e-3)
    yy, xx = np.mgrid[:100, :100]
    # Lanczos-3 shifts a 1.7-pixel Gaussian to within 0.02 px (4 mas at 0.2"/px).
    assert (image * xx).sum() / image.sum() == pytest.approx(x, abs=0.025)
    assert (image * yy).sum() / image.sum() == pytest.approx(y, abs=0.025)
    assert (image * (xx - x) ** 2).sum() / image.sum() == pytest.approx(SIGMA**2, rel=0.02)


def test_a_source_at_the_edge_is_cut_not_wrapped():
    image = point_source_image((50, 50), _gaussian_psf(), np.array([1.2]), np.array([25.0]), [1.0])
    assert 0.5 < image.sum() < 0.9  # about the half of the PSF inside the image
    assert image[:, 40:].sum() == 0.0


def test_positions_lie_on_usable_pixels_and_keep_apart():
    usable = np.zeros((200, 300), dtype=bool)
    usable[20:180, 30:150] = True  # the right half has no template
    rng = np.random.default_rng(3)
    x, y = injection_positions(usable, 60, 12.0, rng)
    assert 20 <= len(x) <= 60
    assert usable[np.round(y).astype(int), np.round(x).astype(int)].all()
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    assert d[np.triu_indices(len(x), 1)].min() >= 12.0
    again = injection_positions(usable, 60, 12.0, np.random.default_rng(3))
    np.testing.assert_array_equal(again[0], x)
    assert injection_positions(np.zeros((10, 10), bool), 5, 1.0, rng)[0].size == 0


def test_matching_takes_the_nearest_within_the_radius():
    match = match_injected(
        np.array([10.0, 50.0, 90.0]),
        np.array([10.0, 50.0, 90.0]),
        np.array([10.5, 53.5, 89.0]),
        np.array([10.0, 50.0, 90.2]),
        radius=2.0,
    )
    assert match.tolist() == [0, -1, 2]
    assert (
        match_injected(np.array([1.0]), np.array([1.0]), np.array([]), np.array([]), 2.0)[0] == -1
    )


def test_the_logistic_fit_finds_the_half_efficiency_point():
    rng = np.random.default_rng(5)
    snr = rng.uniform(2.0, 12.0, 3000)
    truth = 0.97 / (1.0 + np.exp(-(snr - 5.5) / 0.4))
    found = rng.uniform(size=snr.size) < truth
    fit = fit_efficiency(snr, found)
    assert fit["snr_50"] == pytest.approx(5.5, abs=0.1)
    assert fit["plateau"] == pytest.approx(0.97, abs=0.02)
    bins = efficiency_bins(snr, found, (2.0, 4.0, 8.0, 12.0))
    assert [b["n"] for b in bins] == [
        int(((snr >= lo) & (snr < hi)).sum()) for lo, hi in ((2, 4), (4, 8), (8, 12))
    ]
    assert bins[0]["efficiency"] < 0.1 and bins[2]["efficiency"] > 0.9
    assert np.isnan(fit_efficiency(snr[:5], found[:5])["snr_50"])


@pytest.fixture(scope="module")
def injected_into_noise():
    """Point sources of S/N 2-12 injected into white noise, found by detect_dia_sources."""
    rng = np.random.default_rng(11)
    # 700 sources on 4 Mpx: sparse enough (1.5% of the area) not to widen the noise.
    shape, sigma = (2048, 2048), 10.0
    psf = _gaussian_psf()
    usable = np.zeros(shape, dtype=bool)
    usable[30:-30, 30:-30] = True
    x, y = injection_positions(usable, 700, 40.0, rng)
    # A PSF flux's error on white noise: sigma sqrt(4 pi) sigma_psf (for a Gaussian PSF).
    err = sigma * np.sqrt(4 * np.pi) * SIGMA
    snr = rng.uniform(2.0, 12.0, x.size)
    image = rng.normal(0.0, sigma, shape) + point_source_image(shape, psf, x, y, snr * err)
    planes = MaskPlanes()
    found = detect_dia_sources(
        image,
        np.full(shape, sigma**2),
        np.zeros(shape, MASK_DTYPE),
        planes,
        psf,
        DiaDetectionConfig(threshold_sigma=5.0),
    )
    match = match_injected(x, y, found["x"].to_numpy(), found["y"].to_numpy(), 4.0)
    return snr, match >= 0, found


def test_a_five_sigma_search_finds_half_the_sources_of_snr_five(injected_into_noise):
    """A matched-filter search at 5 sigma is 50% complete at S/N 5: the peak of the
    filtered image is the statistic (one pixel above the threshold, LSST's minPixels)."""
    snr, found, table = injected_into_noise
    assert table.attrs["noise_scale"] == pytest.approx(1.0, abs=0.02)
    fit = fit_efficiency(snr, found)
    assert fit["snr_50"] == pytest.approx(5.0, abs=0.25)
    assert found[snr >= 6.5].mean() >= 0.95
    assert found[snr < 3.5].mean() <= 0.05


def test_no_false_detections_in_pure_noise(injected_into_noise):
    """White noise of 4 10^6 pixels holds ~0.2 matched-filter peaks above 5 sigma."""
    _, found, table = injected_into_noise
    assert len(table) - int(found.sum()) <= 2


def test_injection_summary_of_a_table():
    rng = np.random.default_rng(2)
    n = 400
    snr = rng.uniform(2.0, 40.0, n)
    detected = snr > 5.0
    clean = detected & (rng.uniform(size=n) > 0.05)
    injected = np.full(n, 1000.0)
    table = pd.DataFrame(
        {
            "visit": 1,
            "detector": rng.integers(0, 4, n),
            "snr": snr,
            "detected": detected,
            "clean": clean,
            "hostFlux": np.where(rng.uniform(size=n) < 0.2, 5e4, 0.0),
            "flags": np.where(detected & ~clean, 1 << 10, 0),
            "injectedFlux": injected,
            "psfFlux": np.where(detected, 1010.0, np.nan),
            "diffFlux": injected + rng.normal(0.0, 1000.0 / snr),
            "diffFluxErr": 1000.0 / snr,
            "raOffset": rng.normal(0, 0.01, n),
            "decOffset": rng.normal(0, 0.01, n),
        }
    )
    summary = injection_summary(table)
    assert summary["n_injected"] == n and summary["n_ccd_visits"] == 4
    assert summary["fit_any_dia_source"]["snr_50"] == pytest.approx(5.0, abs=0.3)
    assert summary["efficiency_snr_ge_6p5"] == pytest.approx(clean[snr >= 6.5].mean())
    assert summary["lost_to_flags"] == {"STATIC_RESIDUAL": int((detected & ~clean).sum())}
    assert summary["flux_bias_snr_gt_20"] == pytest.approx(0.01)
    assert summary["forced_pull_sigma"] == pytest.approx(1.0, abs=0.15)
    assert summary["position_sigma_arcsec_snr_gt_20"][0] == pytest.approx(0.01, abs=0.003)
