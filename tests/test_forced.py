"""Forced PSF photometry at fixed positions (workflow_lib.objects.forced)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import Sip
from synthetic_sky import add_model_star, exposure_from, linear_psf_model, tan_wcs

from workflow_lib.core.flags import ForcedSourceFlag
from workflow_lib.objects.forced import fixed_psf_fluxes, forced_photometry

SHAPE = (500, 600)
SKY_SIGMA = 10.0  # nJy per pixel
SOURCE_VARIANCE_PER_NJY = 0.5  # photon noise of the sources, nJy^2 per nJy


def _sip_wcs():
    """A TAN-SIP WCS (a few tenths of a pixel of distortion at the corners)."""
    wcs = tan_wcs(SHAPE, rotation_deg=12.0)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], b[0, 2], a[1, 1] = 2e-6, -1.5e-6, 1e-6
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def _robust_sigma(values: np.ndarray) -> float:
    q25, q75 = np.percentile(values, [25, 75])
    return float((q75 - q25) / 1.349)


def _calexp(rng, x, y, flux, *, no_data=None):
    """A calexp with stars drawn from a spatially varying PSF model, sky + photon noise."""
    ny, nx = SHAPE
    psf = linear_psf_model(3.4, 4.4, nx, ny)
    model = np.zeros(SHAPE)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        add_model_star(model, psf, xi, yi, fi)
    variance = SKY_SIGMA**2 + SOURCE_VARIANCE_PER_NJY * np.maximum(model, 0.0)
    image = model + rng.normal(0.0, 1.0, SHAPE) * np.sqrt(variance)
    exposure = exposure_from(
        image, variance, wcs=_sip_wcs(), psf=psf, no_data=no_data, origin=(100, 200)
    )
    exposure.metadata = fits.Header(
        {"EXPID": 4321, "DETECTOR": 7, "FILTER": "r", "MJD-OBS": 60700.25, "EXPTIME": 30.0}
    )
    return exposure


def _objects(wcs, x, y, *, first_id=1):
    ra, dec = wcs.all_pix2world(x, y, 0)
    return pd.DataFrame(
        {
            "objectId": first_id + np.arange(len(x)),
            "ra": ra,
            "dec": dec,
            "refExtendedness": np.zeros(len(x)),
        }
    )


def _isolated_stars(rng, n, *, margin=25.0, min_separation=30.0):
    """Star positions at least ``min_separation`` pixels apart (greedy rejection)."""
    ny, nx = SHAPE
    points: list[tuple[float, float]] = []
    while len(points) < n:
        p = (rng.uniform(margin, nx - margin), rng.uniform(margin, ny - margin))
        if all(np.hypot(p[0] - q[0], p[1] - q[1]) > min_separation for q in points):
            points.append(p)
    xy = np.array(points)
    return xy[:, 0], xy[:, 1]


@pytest.fixture(scope="module")
def star_field():
    rng = np.random.default_rng(20240611)
    x, y = _isolated_stars(rng, 200)
    # S/N from ~5 to ~150 (sky-limited): fluxes log-uniform.
    flux = 10 ** rng.uniform(np.log10(250.0), np.log10(8000.0), x.size)
    calexp = _calexp(rng, x, y, flux)
    return calexp, x, y, flux


def test_pulls_of_isolated_stars_are_unit_normal(star_field):
    calexp, x, y, flux = star_field
    table = forced_photometry(calexp, _objects(calexp.wcs, x, y), aperture_correction=None)
    assert len(table) == x.size
    table = table.set_index("objectId").loc[1 + np.arange(x.size)]
    assert (table["flags"] == 0).all()
    pull = (table["psfFlux"].to_numpy() - flux) / table["psfFluxErr"].to_numpy()
    assert 0.9 <= _robust_sigma(pull) <= 1.1
    assert abs(np.median(pull)) < 0.15
    # Positions come from the WCS unchanged (no recentring).
    assert np.allclose(table["x"], x, atol=1e-3) and np.allclose(table["y"], y, atol=1e-3)


def test_errors_include_photon_noise_of_bright_stars(star_field):
    calexp, x, y, flux = star_field
    fit = fixed_psf_fluxes(calexp.image, calexp.variance, None, calexp.psf, x, y)
    sky_only = fixed_psf_fluxes(calexp.image, np.full(SHAPE, SKY_SIGMA**2), None, calexp.psf, x, y)
    bright = flux > 4000
    assert np.all(fit["psf_flux_err"][bright] > 1.1 * sky_only["psf_flux_err"][bright])


def test_fitted_aperture_correction_is_unity_for_an_exact_psf(star_field):
    calexp, x, y, flux = star_field
    table = forced_photometry(
        calexp, _objects(calexp.wcs, x, y), min_apcorr_snr=30.0, calib_aperture_radius_arcsec=3.6
    )
    used = (table["flags"] & int(ForcedSourceFlag.USED_APCORR)) != 0
    assert used.sum() >= 10
    # Every kernel pixel lies inside 3.6" (18 px) only up to the corners: ratio ~ 1.
    assert np.median(table["apCorr"]) == pytest.approx(1.0, abs=0.01)
    pull = (table["psfFlux"].to_numpy() - flux[table["objectId"] - 1]) / table["psfFluxErr"]
    assert 0.9 <= _robust_sigma(pull) <= 1.1


def test_ids_and_times_come_from_the_calexp_metadata(star_field):
    calexp, x, y, _ = star_field
    table = forced_photometry(
        calexp, _objects(calexp.wcs, x[:3], y[:3], first_id=77), aperture_correction=None
    )
    assert table["objectId"].tolist() == [77, 78, 79]
    assert set(table["visit"]) == {4321} and set(table["detector"]) == {7}
    assert set(table["band"]) == {"r"}
    assert table["midpointMjdTai"].iloc[0] == pytest.approx(60700.25 + 15.0 / 86400.0)


def test_objects_off_the_image_are_skipped_and_edge_ones_flagged():
    rng = np.random.default_rng(5)
    x = np.array([300.0, 2.0, 300.0, -30.0, 700.0, 300.0])
    y = np.array([250.0, 250.0, 497.5, 250.0, 250.0, -0.7])
    no_data = np.zeros(SHAPE, dtype=bool)
    no_data[100:140, 100:140] = True
    x = np.append(x, 120.0)
    y = np.append(y, 120.0)
    calexp = _calexp(rng, x[:3], y[:3], np.full(3, 3000.0), no_data=no_data)
    table = forced_photometry(calexp, _objects(calexp.wcs, x, y), aperture_correction=None)
    assert sorted(table["objectId"]) == [1, 2, 3, 7]  # 4, 5 and 6 are off the image
    flags = table.set_index("objectId")["flags"]
    assert flags[1] == 0
    assert flags[2] & int(ForcedSourceFlag.EDGE) and flags[3] & int(ForcedSourceFlag.EDGE)
    no_data_flags = int(ForcedSourceFlag.NO_DATA_CENTER | ForcedSourceFlag.PSF_FLUX_FAILED)
    assert flags[7] & no_data_flags == no_data_flags


def test_joint_fit_separates_a_close_pair():
    rng = np.random.default_rng(11)
    fwhm = 3.9  # the model's FWHM near the image centre
    x = np.array([300.0, 300.0 + 1.5 * fwhm, 150.0])
    y = np.array([250.0, 250.4, 100.0])
    flux = np.array([60000.0, 25000.0, 5000.0])
    calexp = _calexp(rng, x, y, flux)
    joint = forced_photometry(calexp, _objects(calexp.wcs, x, y), aperture_correction=None)
    alone = forced_photometry(
        calexp, _objects(calexp.wcs, x, y), aperture_correction=None, joint=False
    )
    pull = (joint["psfFlux"].to_numpy() - flux) / joint["psfFluxErr"].to_numpy()
    assert np.all(np.abs(pull) < 4)
    assert np.all(np.abs(joint["psfFlux"].to_numpy()[:2] / flux[:2] - 1) < 0.02)
    assert joint["nFit"].tolist() == [2, 2, 1]
    assert joint["flags"].iloc[0] & int(ForcedSourceFlag.BLENDED)
    # Fitted alone, each picks up its neighbour's light.
    assert np.all(alone["psfFlux"].to_numpy()[:2] > 1.05 * flux[:2])


def test_fixed_fluxes_accept_big_endian_arrays_and_are_linear():
    rng = np.random.default_rng(3)
    ny, nx = SHAPE
    psf = linear_psf_model(3.4, 4.4, nx, ny)
    model = np.zeros(SHAPE)
    add_model_star(model, psf, 200.3, 300.7, 1000.0)
    noise = rng.normal(0.0, SKY_SIGMA, SHAPE)
    variance = np.full(SHAPE, SKY_SIGMA**2)
    one = fixed_psf_fluxes(
        (model + noise).astype(">f4"),
        variance.astype(">f4"),
        None,
        psf,
        np.array([200.3]),
        np.array([300.7]),
    )
    three = fixed_psf_fluxes(
        3 * model + noise, variance, None, psf, np.array([200.3]), np.array([300.7])
    )
    # Linear in the data: the model's share scales, the noise's does not.
    noise_only = fixed_psf_fluxes(noise, variance, None, psf, np.array([200.3]), np.array([300.7]))
    signal_one = one["psf_flux"][0] - noise_only["psf_flux"][0]
    signal_three = three["psf_flux"][0] - noise_only["psf_flux"][0]
    assert signal_three == pytest.approx(3 * signal_one, rel=1e-5)
    assert signal_one == pytest.approx(1000.0, rel=0.01)
