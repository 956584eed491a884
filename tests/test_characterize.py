"""Characterization: background, detection, PSF model, measurement, aperture correction.

Fields are rendered with GalSim (Kolmogorov + obscured Airy, and Moffat PSFs
whose size and ellipticity vary over the image; exponential galaxies;
Poisson noise; seeded) and handed over as big-endian arrays on purpose.
Assertions are statistical with an error budget stated next to each.
"""

from __future__ import annotations

import glob

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from workflow_lib.core.psf_model import PsfModel, fwhm_of_image
from workflow_lib.single_frame.background import estimate_background
from workflow_lib.single_frame.detection import (
    detect_sources,
    detect_with_background,
    estimate_fwhm,
)
from workflow_lib.single_frame.measure import (
    ApertureCorrection,
    aperture_column,
    fit_aperture_correction,
    measure_sources,
    psf_model_stamps,
)
from workflow_lib.single_frame.psf import (
    PsfFitError,
    fit_psf_model,
    kernel_centroid,
    select_psf_stars,
)

galsim = pytest.importorskip("galsim")

N = 1024
SCALE = 0.2
SKY = 800.0


def _robust_sigma(a: np.ndarray) -> float:
    a = np.asarray(a)
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


def true_psf(x: float, y: float, kind: str):
    """Pixel-free PSF at (x, y): size and shear vary linearly/quadratically over the field."""
    u, v = (x - N / 2) / (N / 2), (y - N / 2) / (N / 2)
    if kind == "kolmogorov":
        fwhm = 0.70 * (1 + 0.06 * u + 0.04 * v * v)
        atm = galsim.Kolmogorov(fwhm=fwhm).shear(g1=0.03 * u, g2=0.02 * v)
        return galsim.Convolve(atm, galsim.Airy(lam_over_diam=0.0152, obscuration=0.6))
    fwhm = 0.75 * (1 + 0.05 * u - 0.03 * v)
    return galsim.Moffat(beta=3.0, fwhm=fwhm).shear(g1=-0.02 * v, g2=0.03 * u)


def true_kernel(x: float, y: float, kind: str, size: int = 41) -> np.ndarray:
    k = true_psf(x, y, kind).drawImage(nx=size, ny=size, scale=SCALE).array.astype(np.float64)
    return k / k.sum()


def render_scene(seed: int, kind: str, *, n_star: int = 300, n_gal: int = 100):
    """Noise-free image (e-, sky included) and truth table (0-based positions)."""
    rng = np.random.default_rng(seed)
    img = galsim.ImageF(N, N, scale=SCALE)
    rows = []
    for k in range(n_star + n_gal):
        x, y = rng.uniform(10, N - 10, 2)
        is_gal = k >= n_star
        flux = float(np.exp(rng.uniform(np.log(1e3), np.log(3e5))))
        psf = true_psf(x, y, kind)
        if is_gal:
            gal = galsim.Exponential(half_light_radius=rng.uniform(0.3, 1.0))
            gal = gal.shear(e1=rng.uniform(-0.3, 0.3), e2=rng.uniform(-0.3, 0.3))
            prof = galsim.Convolve(gal, psf)
        else:
            prof = psf
        half = 48
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        bounds = galsim.BoundsI(ix + 1 - half, ix + 1 + half, iy + 1 - half, iy + 1 + half)
        stamp = galsim.ImageF(bounds, scale=SCALE)
        prof.withFlux(flux).drawImage(image=stamp, center=galsim.PositionD(x + 1, y + 1))
        overlap = bounds & img.bounds
        img[overlap] += stamp[overlap]
        rows.append((x, y, float(stamp[overlap].array.sum()), is_gal))
    truth = pd.DataFrame(rows, columns=["x", "y", "flux", "is_gal"])
    xy = truth[["x", "y"]].to_numpy()
    dist, _ = cKDTree(xy).query(xy, k=2)
    truth["isolated"] = dist[:, 1] > 25.0
    return img.array.astype(np.float64) + SKY, truth


def noisy(expected: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Poisson image and its variance (from the image itself, as ISR makes it), big-endian."""
    image = np.random.default_rng(seed).poisson(expected).astype(">f4")
    return image, np.maximum(image, 1.0).astype(">f4")


def characterize(image, variance, *, kernel_size: int = 41):
    mask = np.zeros(image.shape, dtype=bool)
    bkg, det = detect_with_background(image, variance, mask, fwhm=3.5)
    data = image.astype(np.float64) - bkg.image
    sel = select_psf_stars(
        det.table,
        data,
        variance,
        mask,
        segmentation=det.segmentation,
        fwhm=estimate_fwhm(det.table),
    ).selected
    fit = fit_psf_model(
        data,
        variance,
        mask,
        det.table["x_win"][sel],
        det.table["y_win"][sel],
        kernel_size=kernel_size,
        segmentation=det.segmentation,
        source_ids=det.table["id"][sel],
    )
    meas = measure_sources(
        data,
        variance,
        mask,
        psf=fit.psf,
        x=det.table["x_win"],
        y=det.table["y_win"],
        aperture_radii=(3.0, 6.0, 12.0, 17.0),
        segmentation=det.segmentation,
        source_ids=det.table["id"],
    )
    used = np.zeros(len(meas), dtype=bool)
    used[np.flatnonzero(sel)[fit.used]] = True
    apc = fit_aperture_correction(
        meas["x"],
        meas["y"],
        meas["psf_flux"],
        meas["psf_flux_err"],
        meas["ap_17_0_flux"],
        meas["ap_17_0_flux_err"],
        used=used,
    )
    meas["psf_flux_corr"], meas["psf_flux_corr_err"] = apc.apply(
        meas["x"], meas["y"], meas["psf_flux"], meas["psf_flux_err"]
    )
    return {"bkg": bkg, "det": det, "sel": sel, "fit": fit, "meas": meas, "apc": apc}


@pytest.fixture(scope="module", params=["kolmogorov", "moffat"])
def field(request):
    kind = request.param
    expected, truth = render_scene(7 if kind == "kolmogorov" else 8, kind)
    image, variance = noisy(expected, 1)
    out = characterize(image, variance)
    meas = out["meas"]
    dist, j = cKDTree(truth[["x", "y"]].to_numpy()).query(meas[["x", "y"]].to_numpy())
    for col in ("x", "y", "flux", "is_gal", "isolated"):
        meas[f"true_{col}"] = truth[col].to_numpy()[j]
    meas["match"] = dist < 1.0
    meas["snr"] = meas["psf_flux"] / meas["psf_flux_err"]
    return {"kind": kind, "expected": expected, "truth": truth, "image": image, **out}


def _clean_stars(meas: pd.DataFrame, snr_min: float) -> pd.Series:
    return meas["match"] & ~meas["true_is_gal"] & meas["true_isolated"] & (meas["snr"] > snr_min)


def test_background_is_unbiased_with_sky_gradient():
    """A sloped sky under sources: residual on source-free pixels averages to zero."""
    expected, truth = render_scene(3, "moffat", n_star=200, n_gal=60)
    yy, xx = np.mgrid[:N, :N]
    expected = expected + 40.0 * (xx / N) + 25.0 * (yy / N) ** 2
    image, variance = noisy(expected, 5)
    bkg, det = detect_with_background(image, variance, None, fwhm=3.6, box_size=128)
    true_sky = SKY + 40.0 * (xx / N) + 25.0 * (yy / N) ** 2
    # Pixels at least 30 px from any object: sky only.
    far = np.ones((N, N), dtype=bool)
    for x, y in truth[["x", "y"]].to_numpy():
        far[max(0, int(y) - 30) : int(y) + 31, max(0, int(x) - 30) : int(x) + 31] = False
    resid = (bkg.image - true_sky)[far]
    # The model's own noise: ~sqrt(SKY) / box_size per box, ~50 boxes -> ~0.03 e-;
    # a 1% leak of source light would be several e-.
    assert abs(resid.mean()) < 0.3
    assert np.sqrt(np.mean(resid**2)) < 1.5  # follows the gradient (pixel sigma is 28)
    assert bkg.global_rms == pytest.approx(np.sqrt(SKY), rel=0.05)
    # One pass without masking sources is biased high by their wings.
    naive = estimate_background(image, box_size=128)
    assert (naive.image - true_sky)[far].mean() > resid.mean()
    assert det.footprints.dtype == bool and det.footprints.shape == (N, N)


def test_no_spurious_detections_on_pure_noise():
    rng = np.random.default_rng(11)
    sigma = 30.0
    image = rng.normal(0.0, sigma, (N, N)).astype(">f4")
    variance = np.full((N, N), sigma**2, dtype=">f4")
    det = detect_sources(image, variance, None, threshold_sigma=5.0, fwhm=3.5)
    # Peaks above nu in a smoothed Gaussian field (Euler-characteristic density):
    # A lambda2 / (2 pi)^1.5 nu exp(-nu^2 / 2), lambda2 = 1 / (2 sigma_k^2) for
    # a Gaussian filter of sigma_k = 3.5 / 2.355: ~0.3 at 5 sigma, ~110 at 3.5.
    assert len(det.table) <= 3
    det4 = detect_sources(image, variance, None, threshold_sigma=3.5, fwhm=3.5, min_area=1)
    assert 50 <= len(det4.table) <= 170


def test_detection_completeness_and_footprints(field):
    det, truth = field["det"], field["truth"]
    expected_snr = truth["flux"] / np.sqrt(truth["flux"] + SKY * 4 * np.pi * 1.5**2)
    bright = (~truth["is_gal"]) & truth["isolated"] & (expected_snr > 20)
    dist, _ = cKDTree(det.table[["x_win", "y_win"]].to_numpy()).query(
        truth.loc[bright, ["x", "y"]].to_numpy()
    )
    assert bright.sum() > 50
    assert np.mean(dist < 1.0) >= 0.99
    # Every detection's centre lies in its own footprint.
    seg = det.segmentation
    ix = np.clip(np.round(det.table["x"]).astype(int), 0, N - 1)
    iy = np.clip(np.round(det.table["y"]).astype(int), 0, N - 1)
    assert np.mean(seg[iy, ix] == det.table["id"]) > 0.95


def test_psf_stars_are_stars(field):
    meas, sel = field["meas"], field["sel"]
    assert sel.sum() >= 40
    matched = meas["match"].to_numpy()[sel]
    assert np.mean(matched) > 0.95
    assert np.mean(meas["true_is_gal"].to_numpy()[sel][matched]) < 0.03


def test_psf_model_reproduces_true_psf(field):
    fit, kind = field["fit"], field["kind"]
    psf = fit.psf
    assert fit.order == 2 and fit.n_used >= 40
    for x, y in [(512, 512), (150, 150), (880, 160), (160, 880), (870, 870)]:
        truth = true_kernel(x, y, kind)
        model = psf.kernel_at(x, y)
        assert psf.fwhm_at(x, y) == pytest.approx(fwhm_of_image(truth), rel=0.015)
        # Residual rms relative to the peak: a fraction of a percent.
        assert np.sqrt(np.mean((model - truth) ** 2)) / truth.max() < 0.005
        cx, cy = kernel_centroid(model)
        assert abs(cx) < 0.01 and abs(cy) < 0.01


def test_psf_flux_after_aperture_correction_matches_truth(field):
    """Aperture-corrected PSF fluxes equal the true flux inside the 17 px reference aperture.

    (The light beyond it, 0.2-0.8% for these PSFs, is the zero point's business.)
    """
    meas, kind = field["meas"], field["kind"]
    k = true_psf(N / 2, N / 2, kind).drawImage(nx=97, ny=97, scale=SCALE).array
    yy, xx = np.mgrid[:97, :97]
    ee17 = k[np.hypot(xx - 48, yy - 48) < 17.0].sum() / k.sum()
    good = _clean_stars(meas, 50) & ~meas["psf_flux_flag"]
    ratio = meas.loc[good, "psf_flux_corr"] / (ee17 * meas.loc[good, "true_flux"])
    dmag = -2.5 * np.log10(ratio)
    assert good.sum() >= 60
    # Scatter ~0.6% -> the median is known to ~1 mmag; a sky error of 0.2 e-/px
    # (source wings leaking into the sky) moves a 17 px aperture by ~2 mmag.
    assert abs(np.median(dmag)) < 0.004
    assert _robust_sigma(dmag) < 0.012
    assert field["apc"].n_used >= 30


def test_astrometry_of_bright_isolated_stars(field):
    meas = field["meas"]
    good = _clean_stars(meas, 50) & ~meas["centroid_flag"]
    dx = (meas["x"] - meas["true_x"])[good]
    dy = (meas["y"] - meas["true_y"])[good]
    assert abs(dx.median()) < 0.01 and abs(dy.median()) < 0.01
    assert np.sqrt(np.mean(dx**2 + dy**2)) < 0.03  # 6 mas at 0.2"/px
    pulls = np.concatenate([dx / meas.loc[good, "x_err"], dy / meas.loc[good, "y_err"]])
    assert 0.7 < _robust_sigma(pulls) < 1.5


def test_extendedness_separates_stars_and_galaxies(field):
    meas = field["meas"]
    base = meas["match"] & meas["true_isolated"] & (meas["snr"] > 20)
    stars = base & ~meas["true_is_gal"]
    gals = base & meas["true_is_gal"]
    assert stars.sum() > 50 and gals.sum() > 15
    assert np.nanmean(meas.loc[stars, "extendedness"]) < 0.05
    assert np.nanmean(meas.loc[gals, "extendedness"]) > 0.9


def test_forced_psf_flux_pulls_monte_carlo():
    """Faint stars measured at their true positions over noise realisations: pulls ~ N(0, 1)."""
    expected, truth = render_scene(21, "kolmogorov", n_star=220, n_gal=0)
    image, variance = noisy(expected, 0)
    psf = characterize(image, variance)["fit"].psf
    faint = truth[truth["isolated"] & (truth["flux"] < 8e3)]
    pulls, dflux = [], []
    for seed in range(1, 5):
        image, variance = noisy(expected, seed)
        data = image.astype(np.float64) - SKY
        meas = measure_sources(
            data, variance, None, psf=psf, x=faint["x"], y=faint["y"], refine_centroids=False
        )
        pulls.append((meas["psf_flux"] - faint["flux"].to_numpy()) / meas["psf_flux_err"])
        dflux.append(meas["psf_flux"] / faint["flux"].to_numpy())
    pulls = np.concatenate(pulls)
    assert len(pulls) >= 100
    assert 0.9 <= _robust_sigma(pulls) <= 1.15
    # The 41 px kernel holds ~99.5% of the flux: a small negative bias at most.
    assert -0.25 < np.median(pulls) < 0.15


def _model_star(psf: PsfModel, x: float, y: float, flux: float, shape=(121, 121)) -> np.ndarray:
    """Noise-free image of a point source drawn with the PSF model itself."""
    half = psf.size // 2
    stamp, ix, iy = psf_model_stamps(psf, np.array([x]), np.array([y]), half)
    image = np.zeros(shape)
    image[iy[0] - half : iy[0] + half + 1, ix[0] - half : ix[0] + half + 1] = flux * stamp[0]
    return image


def test_fixed_positions_measure_exactly_at_the_given_positions():
    """Forced photometry: a star 0.3 px off the given position loses the PSF flux that
    the model's overlap predicts; the refined mode recentres and recovers it all."""
    psf = PsfModel.constant(true_kernel(60, 55, "moffat", size=21))
    flux, true_x, true_y = 1.0e5, 60.3, 55.0
    image = _model_star(psf, true_x, true_y, flux)
    variance = np.ones_like(image)
    given_x, given_y = np.array([60.0, np.nan, 300.0]), np.array([55.0, 50.0, 50.0])
    forced = measure_sources(
        image,
        variance,
        None,
        psf=psf,
        x=given_x,
        y=given_y,
        aperture_radii=(5.0,),
        fixed_positions=True,
    )
    refined = measure_sources(
        image, variance, None, psf=psf, x=given_x[:1], y=given_y[:1], aperture_radii=(5.0,)
    )
    # Positions as given; no centroid errors; only the non-finite / off-image flagged.
    np.testing.assert_array_equal(forced["x"], given_x)
    np.testing.assert_array_equal(forced["y"], given_y)
    assert forced["x_err"].isna().all() and forced["y_err"].isna().all()
    assert forced["centroid_flag"].tolist() == [False, True, True]
    assert forced["psf_flux_flag"].tolist() == [False, True, True]
    # The least-squares amplitude of the model at 60.0 on a star at 60.3.
    fit_half = int(min(psf.size // 2, max(3, np.ceil(2.0 * psf.fwhm_at(0, 0)))))
    at_given = psf_model_stamps(psf, given_x[:1], given_y[:1], fit_half)[0][0]
    at_true = psf_model_stamps(psf, np.array([true_x]), np.array([true_y]), fit_half)[0][0]
    expected = flux * (at_given * at_true).sum() / (at_given**2).sum()
    assert expected < 0.995 * flux  # the test means something: 0.3 px costs > 0.5%
    assert forced["psf_flux"].iloc[0] == pytest.approx(expected, rel=1e-6)
    assert refined["x"].iloc[0] == pytest.approx(true_x, abs=0.01)
    assert refined["psf_flux"].iloc[0] == pytest.approx(flux, rel=2e-3)
    assert forced["psf_flux"].iloc[0] < refined["psf_flux"].iloc[0]
    # The aperture is centred on the given position too.
    assert forced["ap_5_0_flux"].iloc[0] < refined["ap_5_0_flux"].iloc[0]


def test_aperture_of_ones_is_pi_r_squared():
    ones = np.ones((101, 101), dtype=">f4")
    psf = PsfModel.constant(true_kernel(50, 50, "moffat", size=21))
    meas = measure_sources(
        ones, ones, None, psf=psf, x=[50.3], y=[49.8], aperture_radii=(3.0, 6.0, 12.0)
    )
    for r in (3.0, 6.0, 12.0):
        assert meas[f"{aperture_column(r)}_flux"].iloc[0] == pytest.approx(np.pi * r**2, rel=2e-3)
        assert meas[f"{aperture_column(r)}_flux_err"].iloc[0] == pytest.approx(
            np.pi**0.5 * r, rel=2e-3
        )


def test_aperture_correction_recovers_a_known_map():
    rng = np.random.default_rng(4)
    n = 200
    x, y = rng.uniform(0, 2000, n), rng.uniform(0, 4000, n)
    true_ratio = 1.03 + 0.01 * (x - 1000) / 1000 - 0.005 * (y - 2000) / 2000
    psf_flux = np.exp(rng.uniform(np.log(1e4), np.log(1e6), n))
    ap_err = np.sqrt(psf_flux + 5e4)
    ap_flux = psf_flux * true_ratio + rng.normal(0, 1, n) * ap_err
    ap_flux[:10] *= 1.3  # blends / galaxies
    apc = fit_aperture_correction(
        x,
        y,
        psf_flux,
        0.5 * ap_err,
        ap_flux,
        ap_err,
        order=1,
        x_center=1000,
        y_center=2000,
        x_scale=1000,
        y_scale=2000,
    )
    assert isinstance(apc, ApertureCorrection)
    assert apc.n_used >= n - 20 and not apc.used[:10].any()
    err = np.sqrt(np.diag(apc.covariance))
    np.testing.assert_array_less(np.abs(apc.coefficients - [1.03, 0.01, -0.005]), 5 * err + 1e-4)
    flux, ferr = apc.apply(x, y, psf_flux, np.full(n, 10.0))
    ratio, rerr = apc.ratio_at(x, y)
    assert np.allclose(flux, psf_flux * ratio)
    assert np.all(ferr >= 10.0 * ratio) and np.all(ferr > psf_flux * rerr * 0.999)
    # Few stars: the order drops instead of failing.
    few = fit_aperture_correction(
        x[20:26], y[20:26], psf_flux[20:26], ap_err[20:26], ap_flux[20:26], ap_err[20:26], order=1
    )
    assert few.order == 0


def test_psf_fit_degrades_order_and_fails_cleanly(field):
    det, sel, image = field["det"], field["sel"], field["image"]
    data = image.astype(np.float64) - field["bkg"].image
    var = np.maximum(image.astype(np.float64), 1.0)
    xs, ys = det.table["x_win"][sel].to_numpy(), det.table["y_win"][sel].to_numpy()
    assert fit_psf_model(data, var, None, xs[:12], ys[:12], kernel_size=31).order == 1
    assert fit_psf_model(data, var, None, xs[:6], ys[:6], kernel_size=31).order == 0
    assert fit_psf_model(data, var, None, xs[:2], ys[:2], kernel_size=31).order == 0
    with pytest.raises(PsfFitError):
        fit_psf_model(data, var, None, xs[:1], ys[:1], kernel_size=31)
    assert issubclass(PsfFitError, ValueError)


@pytest.fixture(scope="module")
def tiny_eimages(tmp_path_factory):
    from workflow_lib.cli import main

    out = tmp_path_factory.mktemp("tiny_eimage")
    assert main(["simulate", "--preset", "tiny", "--format", "eimage", "--output", str(out)]) == 0
    return out


def test_psf_fwhm_matches_truth_seeing_on_tiny_eimages(tiny_eimages):
    from astropy.io import fits
    from astropy.wcs import WCS

    from workflow_lib.io import read_image_hdus, read_table

    ccd = read_table(
        glob.glob(str(tiny_eimages / "**" / "truth_ccdvisit*.parquet"), recursive=True)[0]
    )
    ratios = []
    for path in sorted(glob.glob(str(tiny_eimages / "**" / "eimage_*.fits"), recursive=True)):
        primary, hdus = read_image_hdus(path)
        image = hdus[0][0].astype(np.float32)
        row = ccd[
            (ccd["visit"] == int(primary["EXPID"])) & (ccd["detector"] == int(primary["DETECTOR"]))
        ].iloc[0]
        wcs = WCS(fits.Header.fromstring(row["wcs_header"]))
        scale = 3600.0 * np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))
        variance = np.maximum(image, 1.0)
        mask = image > 9.0e4
        bkg, det = detect_with_background(image, variance, None, fwhm=3.5)
        data = image - bkg.image
        sel = select_psf_stars(
            det.table,
            data,
            variance,
            mask,
            segmentation=det.segmentation,
            fwhm=estimate_fwhm(det.table),
        ).selected
        fit = fit_psf_model(
            data,
            variance,
            mask,
            det.table["x_win"][sel],
            det.table["y_win"][sel],
            kernel_size=41,
            segmentation=det.segmentation,
            source_ids=det.table["id"][sel],
        )
        c = (np.array(image.shape[::-1]) - 1) / 2.0
        ratios.append(fit.psf.fwhm_at(*c) * scale / row["seeing"])
    ratios = np.array(ratios)
    assert len(ratios) >= 10
    assert np.median(ratios) == pytest.approx(1.0, abs=0.03)
    assert np.all(np.abs(ratios - 1.0) < 0.06)
