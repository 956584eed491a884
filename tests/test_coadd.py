"""Coadd assembly: noise, artifact rejection, star photometry, coadd PSF, strips, I/O, selection.

The synthetic survey: one patch, several visits of different seeing (a Moffat
core convolved with a Gaussian of varying width, drawn by GalSim with pixel
integration), sky noise of known variance, partial coverage with chip gaps
(NO_DATA), and artifacts in single visits (a transient, missed cosmic rays, a
satellite trail). The PSF-matched warps are the direct warps (noise and
artifacts included) convolved with the Gaussian that brings each PSF to the
common model PSF, so their noise is correlated as in real PSF-matched warps.
"""

from __future__ import annotations

from dataclasses import dataclass

import galsim
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from scipy import ndimage

from workflow_lib.core.exposure import Exposure, MaskPlanes, PhotoCalib
from workflow_lib.core.flags import CcdVisitFlag
from workflow_lib.core.psf_model import PsfModel, fwhm_of_image
from workflow_lib.single_frame.measure import measure_sources
from workflow_lib.static_sky.coadd import (
    CoaddResult,
    ExposureWarpInput,
    assemble_coadd,
    select_template_ccd_visits,
    select_template_visits,
)

SHAPE = (230, 270)  # (ny, nx) of the patch
CORE_FWHM = 2.2  # Moffat core of every PSF, pixels
BETA = 4.0
MODEL_SIGMA = 2.0  # Gaussian part of the model PSF of the PSF-matched warps
KERNEL = 41
# Per visit: Gaussian part of the PSF, sky noise sigma (nJy), bbox (x0, y0, nx, ny), chip gap
# columns (or None). Warp edges inside the patch are CCD edges; x < 14 has only two visits.
VISITS = [
    (0.5, 9.0, (0, 0, 270, 230), None),
    (0.8, 10.0, (0, 3, 264, 227), (60, 66)),
    (1.0, 11.0, (14, 0, 256, 224), None),
    (1.2, 9.5, (14, 8, 256, 222), None),
    (1.4, 12.0, (14, 5, 256, 225), (150, 156)),
    (1.6, 10.5, (14, 0, 256, 230), None),
    (0.6, 13.0, (14, 0, 256, 230), None),
    (1.1, 9.0, (40, 0, 230, 230), (200, 206)),  # covers only part of the patch
]
TRANSIENT = (205.0, 57.0, 20000.0, 1)  # x, y, flux, visit index
CR_VISIT = 3
CR_PIXELS = [(60, 120), (61, 121), (62, 122), (150, 30), (230, 180), (231, 180)]
TRAIL_VISIT = 5  # trail along y = TRAIL_Y0 + TRAIL_SLOPE x
TRAIL_Y0, TRAIL_SLOPE, TRAIL_AMP = 15.0, 0.55, 300.0


def profile(sigma: float) -> galsim.GSObject:
    return galsim.Convolve(galsim.Moffat(beta=BETA, fwhm=CORE_FWHM), galsim.Gaussian(sigma=sigma))


def psf_model(sigma: float) -> PsfModel:
    return PsfModel.constant(profile(sigma).drawImage(nx=KERNEL, ny=KERNEL, scale=1.0).array)


def render(prof: galsim.GSObject, shape, xs, ys, fluxes) -> np.ndarray:
    """Point sources (0-based pixel-centre coordinates), pixel-integrated."""
    image = np.zeros(shape)
    c = KERNEL // 2
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        ix, iy = round(x), round(y)
        stamp = (
            prof.withFlux(f)
            .drawImage(nx=KERNEL, ny=KERNEL, scale=1.0, offset=(x - ix, y - iy))
            .array
        )
        y0, x0 = iy - c, ix - c
        ys0, xs0 = max(0, -y0), max(0, -x0)
        ye, xe = min(KERNEL, shape[0] - y0), min(KERNEL, shape[1] - x0)
        if ye > ys0 and xe > xs0:
            image[y0 + ys0 : y0 + ye, x0 + xs0 : x0 + xe] += stamp[ys0:ye, xs0:xe]
    return image


@dataclass
class Survey:
    stars: pd.DataFrame
    direct: list[Exposure]
    matched: list[Exposure]
    truth_direct: list[Exposure]  # noise- and artifact-free, same masks
    truth_matched: list[Exposure]


def make_survey(seed: int = 3, *, artifacts: bool = True, visits=VISITS) -> Survey:
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(22.0, SHAPE[1] - 15, 38.0), np.arange(20.0, SHAPE[0] - 15, 36.0))
    n = gx.size
    xs = gx.ravel() + rng.uniform(-3, 3, n)
    ys = gy.ravel() + rng.uniform(-3, 3, n)
    fluxes = np.exp(rng.uniform(np.log(3e3), np.log(3e5), n))
    # Keep the stars off the artifacts: what is rejected around those is not a star's doing.
    far = np.hypot(xs - TRANSIENT[0], ys - TRANSIENT[1]) > 25
    far &= np.abs(ys - (TRAIL_Y0 + TRAIL_SLOPE * xs)) / np.hypot(1, TRAIL_SLOPE) > 25
    for x, y in CR_PIXELS:
        far &= np.hypot(xs - x, ys - y) > 20
    stars = pd.DataFrame({"x": xs[far], "y": ys[far], "flux": fluxes[far]})
    planes = MaskPlanes()
    no_data = planes.bitmask("NO_DATA")
    direct, matched, truth, truth_matched = [], [], [], []
    for i, (sigma, noise, (bx, by, bnx, bny), gap) in enumerate(visits):
        prof = profile(sigma)
        scene = render(prof, SHAPE, stars["x"], stars["y"], stars["flux"])
        crop = (slice(by, by + bny), slice(bx, bx + bnx))
        clean = scene[crop]
        image = clean + rng.normal(0.0, noise, clean.shape)
        if artifacts and i == TRANSIENT[3]:
            image += render(prof, SHAPE, [TRANSIENT[0]], [TRANSIENT[1]], [TRANSIENT[2]])[crop]
        if artifacts and i == CR_VISIT:
            for x, y in CR_PIXELS:
                image[y - by, x - bx] += 4000.0
        if artifacts and i == TRAIL_VISIT:
            yy, xx = np.mgrid[by : by + bny, bx : bx + bnx]
            dist = (yy - TRAIL_Y0 - TRAIL_SLOPE * xx) / np.hypot(1.0, TRAIL_SLOPE)
            image += TRAIL_AMP * np.exp(-0.5 * (dist / 1.5) ** 2)
        mask = np.zeros(clean.shape, np.int32)
        if gap is not None:
            mask[:, gap[0] - bx : gap[1] - bx] |= no_data
        image[mask != 0] = 0.0
        var = np.full(clean.shape, noise**2)
        meta = fits.Header({"VISIT": 1000 + i, "DETECTOR": 7, "BAND": "r", "MJD": 60000.0 + i})
        common = dict(metadata=meta, origin=(bx, by), mask_planes=MaskPlanes())
        direct.append(Exposure(image, var, mask.copy(), psf=psf_model(sigma), **common))
        truth.append(
            Exposure(
                np.where(mask != 0, 0.0, clean), var, mask.copy(), psf=psf_model(sigma), **common
            )
        )
        # PSF matching: convolve with the Gaussian that takes this PSF to the model.
        k_sigma = np.sqrt(MODEL_SIGMA**2 - sigma**2)
        kernel = (
            galsim.Gaussian(sigma=k_sigma)
            .drawImage(nx=21, ny=21, scale=1.0, method="no_pixel")
            .array.astype(np.float64)
        )
        kernel /= kernel.sum()
        conv = ndimage.convolve(image, kernel, mode="constant")
        conv_clean = ndimage.convolve(np.where(mask != 0, 0.0, clean), kernel, mode="constant")
        conv_var = ndimage.convolve(var, kernel**2, mode="constant")
        # The matching kernel loses 10 pixels at CCD edges and gaps (not at the patch edge).
        bad = ndimage.binary_dilation(mask != 0, np.ones((21, 21), bool))
        bad[:10] |= by > 0
        bad[-10:] |= by + bny < SHAPE[0]
        bad[:, :10] |= bx > 0
        bad[:, -10:] |= bx + bnx < SHAPE[1]
        m_mask = np.where(bad, no_data, 0).astype(np.int32)
        model = psf_model(MODEL_SIGMA)
        matched.append(Exposure(np.where(bad, 0.0, conv), conv_var, m_mask, psf=model, **common))
        truth_matched.append(
            Exposure(np.where(bad, 0.0, conv_clean), conv_var, m_mask.copy(), psf=model, **common)
        )
    return Survey(stars, direct, matched, truth, truth_matched)


def wrap(exposures) -> list[ExposureWarpInput]:
    return [ExposureWarpInput(e) for e in exposures]


@pytest.fixture(scope="module")
def survey() -> Survey:
    return make_survey()


@pytest.fixture(scope="module")
def deep(survey) -> CoaddResult:
    return assemble_coadd(
        wrap(survey.direct), shape=SHAPE, wcs=None, rejection_inputs=wrap(survey.matched)
    )


@pytest.fixture(scope="module")
def truth_coadd(survey) -> CoaddResult:
    """The noise-free coadd: the same pixels enter as in ``deep`` except the clipped ones."""
    return assemble_coadd(
        wrap(survey.truth_direct),
        shape=SHAPE,
        wcs=None,
        rejection_inputs=wrap(survey.truth_matched),
    )


def coverage(exposures) -> np.ndarray:
    """Per coadd pixel, how many of ``exposures`` have data there."""
    count = np.zeros(SHAPE, int)
    for e in exposures:
        x0, y0 = e.origin
        ny, nx = e.shape
        count[y0 : y0 + ny, x0 : x0 + nx] += ~e.mask_of("NO_DATA")
    return count


def checked_coverage(survey) -> np.ndarray:
    """Per pixel, the visits whose direct and PSF-matched warps both have data there."""
    count = np.zeros(SHAPE, int)
    for d, m in zip(survey.direct, survey.matched, strict=True):
        count += (coverage([d]) > 0) & (coverage([m]) > 0)
    return count


def source_free(survey, radius: float = 12.0) -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    free = np.ones(SHAPE, bool)
    for x, y in zip(survey.stars["x"], survey.stars["y"], strict=True):
        free &= np.hypot(xx - x, yy - y) > radius
    return free


# --------------------------------------------------------------------------
# Noise and depth
# --------------------------------------------------------------------------


def test_coadd_noise_matches_inverse_variance_prediction(survey, deep, truth_coadd):
    region = (deep.n_image == len(VISITS)) & source_free(survey)
    assert region.mean() > 0.15
    noise = (deep.exposure.image - truth_coadd.exposure.image)[region]
    predicted = 1.0 / sum(1.0 / v[1] ** 2 for v in VISITS)
    # The variance plane is the 1 / sum(w) prediction ...
    assert np.allclose(deep.exposure.variance[region], predicted, rtol=1e-4)
    # ... and the pixels scatter as much.
    ratio = noise.std() / np.sqrt(predicted)
    assert abs(ratio - 1.0) < 0.03, ratio
    assert abs(noise.mean()) < 5 * np.sqrt(predicted / noise.size)
    # Depth gain over the best single visit ~ sqrt(sum of inverse variances).
    best = min(v[1] for v in VISITS)
    gain = best / noise.std()
    assert abs(gain / (best * np.sqrt(1.0 / predicted)) - 1.0) < 0.03
    # Nothing is clipped away from the artifacts.
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    near = np.abs(yy - TRAIL_Y0 - TRAIL_SLOPE * xx) / np.hypot(1.0, TRAIL_SLOPE) < 25
    near |= np.hypot(xx - TRANSIENT[0], yy - TRANSIENT[1]) < 25
    for x, y in CR_PIXELS:
        near |= np.hypot(xx - x, yy - y) < 20
    assert not deep.exposure.mask_of("CLIPPED")[~near].any()


def test_depth_gain_is_sqrt_n_for_equal_inputs():
    rng = np.random.default_rng(11)
    sigma, n = 7.0, 9
    inputs = []
    for i in range(n):
        image = rng.normal(0.0, sigma, (64, 80))
        meta = fits.Header({"VISIT": i, "DETECTOR": 0})
        inputs.append(
            Exposure(
                image,
                np.full(image.shape, sigma**2),
                np.zeros(image.shape),
                psf=psf_model(1.0),
                metadata=meta,
            )
        )
    result = assemble_coadd(wrap(inputs), shape=(64, 80), wcs=None)
    measured = np.nanstd(result.exposure.image)
    assert abs(sigma / measured / np.sqrt(n) - 1.0) < 0.05
    np.testing.assert_allclose(result.exposure.variance, sigma**2 / n, rtol=1e-5)
    np.testing.assert_allclose(result.inputs["weight"], 1.0 / sigma**2, rtol=1e-6)
    assert (result.n_image == n).all()


# --------------------------------------------------------------------------
# Artifact rejection
# --------------------------------------------------------------------------


def aperture_residual(coadd: CoaddResult, truth: CoaddResult, x: float, y: float, r: float):
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    inside = np.hypot(xx - x, yy - y) <= r
    diff = (coadd.exposure.image - truth.exposure.image)[inside]
    return float(diff.sum()), float(np.sqrt(coadd.exposure.variance[inside].sum()))


def test_transient_in_one_visit_is_removed(survey, deep, truth_coadd):
    x, y, _, _ = TRANSIENT
    resid, err = aperture_residual(deep, truth_coadd, x, y, 8.0)
    assert abs(resid) < 5 * err, (resid, err)
    # Without rejection the transient would be there (the test can fail).
    plain = assemble_coadd(wrap(survey.direct), shape=SHAPE, wcs=None, do_reject=False)
    resid_plain, _ = aperture_residual(plain, truth_coadd, x, y, 8.0)
    assert resid_plain > 20 * err
    assert deep.exposure.mask_of("CLIPPED")[round(y), round(x)]
    assert deep.exposure.mask_of("INEXACT_PSF")[round(y), round(x)]


def test_cosmic_rays_and_trail_are_removed(survey, deep, truth_coadd):
    diff = deep.exposure.image - truth_coadd.exposure.image
    sigma = np.sqrt(deep.exposure.variance)
    for x, y in CR_PIXELS:
        assert abs(diff[y, x]) < 5 * sigma[y, x], (x, y, diff[y, x] / sigma[y, x])
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    dist = np.abs(yy - TRAIL_Y0 - TRAIL_SLOPE * xx) / np.hypot(1.0, TRAIL_SLOPE)
    bx, by, _, _ = VISITS[TRAIL_VISIT][2]
    on_trail = (dist < 2.0) & (xx >= bx) & (yy >= by) & np.isfinite(diff)
    mean = diff[on_trail].mean()
    mean_err = np.sqrt(deep.exposure.variance[on_trail].mean() / on_trail.sum())
    assert abs(mean) < 5 * mean_err, (mean, mean_err)
    assert deep.exposure.mask_of("CLIPPED")[on_trail].mean() > 0.95
    table = deep.inputs.set_index("visit")
    assert table.loc[1000 + TRAIL_VISIT, "n_clipped"] > on_trail.sum()
    # Visits without artifacts lose (almost) nothing.
    clean = [1000 + i for i in (0, 2, 4, 6, 7)]
    assert (table.loc[clean, "clipped_fraction"] < 2e-3).all()


def test_bad_bits_spread_by_psf_matching_do_not_stop_the_check(survey, deep):
    # PSF matching spreads each interpolated defect's BAD bit over the matching kernel:
    # scattered hot pixels flag much of a PSF-matched warp. Those pixels still hold
    # (interpolated, convolved) sky, so the direct pixels under them are checked and
    # used, and artifacts there are still found.
    rng = np.random.default_rng(12)
    flagged = []
    for e in survey.matched:
        bad = np.zeros(e.shape, bool)
        bad[rng.integers(0, e.shape[0], 60), rng.integers(0, e.shape[1], 60)] = True
        bad = ndimage.binary_dilation(bad, np.ones((21, 21), bool))
        mask = e.mask | np.where(bad, np.int32(1 << e.mask_planes.bits["BAD"]), 0).astype(
            e.mask.dtype
        )
        flagged.append(
            Exposure(
                e.image,
                e.variance,
                mask,
                psf=e.psf,
                metadata=e.metadata,
                origin=e.origin,
                mask_planes=e.mask_planes,
            )
        )
    assert np.mean([f.mask_of("BAD").mean() for f in flagged]) > 0.25
    result = assemble_coadd(
        wrap(survey.direct), shape=SHAPE, wcs=None, rejection_inputs=wrap(flagged)
    )
    np.testing.assert_array_equal(result.inputs["n_used"], deep.inputs["n_used"])
    np.testing.assert_array_equal(
        result.exposure.mask_of("CLIPPED"), deep.exposure.mask_of("CLIPPED")
    )
    # Reading BAD as missing data would leave those direct pixels unchecked, hence unused.
    strict = assemble_coadd(
        wrap(survey.direct),
        shape=SHAPE,
        wcs=None,
        rejection_inputs=wrap(flagged),
        rejection_bad_mask_planes=("NO_DATA", "BAD"),
    )
    assert strict.inputs["n_used"].sum() < 0.8 * deep.inputs["n_used"].sum()


def test_bright_star_cores_are_not_clipped(survey, deep):
    clipped = deep.exposure.mask_of("CLIPPED")
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    for x, y in zip(survey.stars["x"], survey.stars["y"], strict=True):
        core = np.hypot(xx - x, yy - y) <= 6
        assert not clipped[core].any(), (x, y)


def test_few_inputs_cannot_reject_and_say_so(survey):
    for n in (1, 2):
        result = assemble_coadd(
            wrap(survey.direct[:n]),
            shape=SHAPE,
            wcs=None,
            rejection_inputs=wrap(survey.matched[:n]),
        )
        header = result.exposure.metadata
        assert header["REJECT"] == "NONE"
        assert "needs >= 3" in header["REJWHY"]
        assert not result.exposure.mask_of("CLIPPED").any()
        assert header["NINPUTS"] == n
    # One input: the coadd is the input itself where it has data.
    single = assemble_coadd(wrap(survey.direct[:1]), shape=SHAPE, wcs=None)
    data = ~survey.direct[0].mask_of("NO_DATA")
    np.testing.assert_allclose(single.exposure.image[data], survey.direct[0].image[data], rtol=1e-6)
    np.testing.assert_allclose(
        single.exposure.variance[data], survey.direct[0].variance[data], rtol=1e-6
    )


def test_rejection_needs_three_epochs_per_pixel(survey, deep):
    """Where only two visits cover a pixel nothing is clipped there."""
    n_epochs = coverage(survey.matched)
    assert (n_epochs < 3).any()
    assert not deep.exposure.mask_of("CLIPPED")[n_epochs < 3].any()
    assert 0.5 < deep.exposure.metadata["REJFRAC"] < 1.0


# --------------------------------------------------------------------------
# Stars and the coadd PSF
# --------------------------------------------------------------------------


def measure_stars(coadd: CoaddResult, stars: pd.DataFrame) -> pd.DataFrame:
    e = coadd.exposure
    bad = e.mask_of("NO_DATA", "BAD", "SAT")
    table = measure_sources(e.image, e.variance, bad, psf=e.psf, x=stars["x"], y=stars["y"])
    return table.assign(true_flux=stars["flux"].to_numpy())


def exact_coadd_psf(survey, x: float, y: float, visits=VISITS) -> PsfModel:
    """The weighted mean of the PSFs of the visits used at (x, y)."""
    ix, iy = round(x), round(y)
    kernel, total = 0.0, 0.0
    for d, m, (sigma, noise, *_) in zip(survey.direct, survey.matched, visits, strict=True):
        if coverage([d])[iy, ix] and coverage([m])[iy, ix]:
            kernel = kernel + psf_model(sigma).kernel_at(0, 0) / noise**2
            total += 1.0 / noise**2
    return PsfModel.constant(kernel / total)


def uniformly_covered(survey, stars: pd.DataFrame, radius: float = 9.0) -> np.ndarray:
    """Stars whose surroundings have one set of visits: no PSF can describe a star that a
    coverage edge cuts (its profile is a different mixture on either side)."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    maps = [
        (coverage([d]) > 0) & (coverage([m]) > 0)
        for d, m in zip(survey.direct, survey.matched, strict=True)
    ]
    clean = []
    for x, y in zip(stars["x"], stars["y"], strict=True):
        disc = np.hypot(xx - x, yy - y) <= radius
        clean.append(all(m[disc].all() or not m[disc].any() for m in maps))
    return np.array(clean)


def measure_with_coadd_psf(coadd: CoaddResult, stars: pd.DataFrame) -> pd.DataFrame:
    """PSF photometry with the exact coadd PSF of each star (grouped by coverage)."""
    e = coadd.exposure
    bad = e.mask_of("NO_DATA", "BAD", "SAT")
    x, y = stars["x"].to_numpy(), stars["y"].to_numpy()
    parts = []
    for psf, index in coadd.coadd_psf.groups(x, y):
        part = measure_sources(e.image, e.variance, bad, psf=psf, x=x[index], y=y[index])
        parts.append(part.set_index(index))
    return pd.concat(parts).sort_index().assign(true_flux=stars["flux"].to_numpy())


def test_bright_star_psf_fluxes_unbiased_in_deep_coadd(survey, deep, truth_coadd):
    clean = uniformly_covered(survey, survey.stars)
    table = measure_with_coadd_psf(deep, survey.stars)
    ok = clean & ~table["psf_flux_flag"] & (table["psf_flux"] / table["psf_flux_err"] > 200)
    assert ok.sum() >= 7
    dmag = -2.5 * np.log10(table["psf_flux"] / table["true_flux"])
    # Baseline: the noise-free coadd measured with the exact PSF at each star. What
    # remains is the measurement's own bias (Lanczos-shifted PSF models), not the coadd's.
    baseline = []
    e = truth_coadd.exposure
    for row in table.itertuples():
        ref = measure_sources(
            e.image,
            e.variance,
            e.mask_of("NO_DATA"),
            psf=exact_coadd_psf(survey, row.x, row.y),
            x=[row.x],
            y=[row.y],
            refine_centroids=False,
        )
        baseline.append(-2.5 * np.log10(ref["psf_flux"].iloc[0] / row.true_flux))
    excess = (dmag - np.array(baseline))[ok]
    assert abs(np.median(excess)) < 0.003, np.median(excess)
    assert np.abs(excess).max() < 0.012, excess.to_numpy()
    assert abs(np.median(dmag[ok])) < 0.005, np.median(dmag[ok])


def test_coadd_psf_matches_stars(survey, deep, truth_coadd):
    exact, model = deep.coadd_psf, deep.exposure.psf
    assert model is not None and exact is not None
    truth = truth_coadd.exposure.image
    c = KERNEL // 2
    clean = uniformly_covered(survey, survey.stars)
    bright = survey.stars[clean & (survey.stars["flux"] > 2e4).to_numpy()]
    checked = 0
    for x, y, f in zip(bright["x"], bright["y"], bright["flux"], strict=True):
        ix, iy = round(x), round(y)
        if not (c <= ix < SHAPE[1] - c and c <= iy < SHAPE[0] - c):
            continue
        stamp = truth[iy - c : iy + c + 1, ix - c : ix + c + 1]
        star_fwhm = fwhm_of_image(stamp)
        local = exact.psf_at(x, y)
        assert abs(local.fwhm_at(x, y) / star_fwhm - 1.0) < 0.01, (x, y)
        # The smooth POLYPIX fit cannot follow the coverage edges of 8 visits exactly.
        assert abs(model.fwhm_at(x, y) / star_fwhm - 1.0) < 0.04, (x, y)
        # Flux: the kernel scaled to the true flux reproduces the star's core.
        kernel = local.kernel_at(x, y)
        core = slice(c - 4, c + 5)
        assert abs(stamp[core, core].sum() / (f * kernel[core, core].sum()) - 1.0) < 0.03
        checked += 1
    assert checked >= 5


UNIFORM_VISITS = [(sigma, noise, (0, 0, SHAPE[1], SHAPE[0]), None) for sigma, noise, *_ in VISITS]


def test_polynomial_coadd_psf_is_exact_for_uniform_coverage():
    """Where every visit covers the whole patch the POLYPIX PSF is the exact weighted mean."""
    survey = make_survey(seed=4, artifacts=False, visits=UNIFORM_VISITS)
    result = assemble_coadd(
        wrap(survey.direct), shape=SHAPE, wcs=None, rejection_inputs=wrap(survey.matched)
    )
    exact = exact_coadd_psf(survey, 135, 115, visits=UNIFORM_VISITS).kernel_at(0, 0)
    for x, y in [(20, 20), (135, 115), (250, 210)]:
        kernel = result.exposure.psf.kernel_at(x, y)
        assert np.abs(kernel - exact).max() < 1e-4 * exact.max()
    table = measure_stars(result, survey.stars)
    ok = ~table["psf_flux_flag"] & (table["psf_flux"] / table["psf_flux_err"] > 200)
    dmag = -2.5 * np.log10(table["psf_flux"][ok] / table["true_flux"][ok])
    assert abs(np.median(dmag)) < 0.005, np.median(dmag)
    assert not result.exposure.mask_of("CLIPPED").any()


def test_coadd_psf_follows_input_psf_variation():
    """Spatially varying input PSFs, evaluated in each input's own frame."""
    k_narrow, k_wide = psf_model(0.4).kernel_at(0, 0), psf_model(1.8).kernel_at(0, 0)
    # kernel(u) = (k_narrow + k_wide)/2 + u (k_wide - k_narrow)/2: narrow at u = -1.
    basis = np.stack([(k_narrow + k_wide) / 2, (k_wide - k_narrow) / 2, 0 * k_wide])
    varying = PsfModel(basis=basis, order=1, x_center=50.0, x_scale=50.0)
    shape = (64, 160)
    inputs = []
    for i, (psf, x0) in enumerate([(varying, 0), (varying, 60), (psf_model(1.0), 0)]):
        nx = 100 if i < 2 else 160
        inputs.append(
            Exposure(
                np.zeros((64, nx)),
                np.full((64, nx), 1.0),
                np.zeros((64, nx)),
                psf=psf,
                metadata=fits.Header({"VISIT": i, "DETECTOR": 0}),
                origin=(x0, 0),
            )
        )
    result = assemble_coadd(wrap(inputs), shape=shape, wcs=None, psf_block=4, do_reject=False)
    for x in (10.0, 70.0, 90.0, 150.0):
        expected = psf_model(1.0).kernel_at(0, 0)
        n = 1
        for x0 in (0, 60):
            if x0 <= x < x0 + 100:
                expected = expected + varying.kernel_at(x - x0, 32)
                n += 1
        expected /= n
        got = result.coadd_psf.kernel_at(x, 32.0)
        assert np.abs(got - expected).max() < 1e-6 * expected.max(), x


def test_coadd_psf_follows_coverage():
    """Two halves covered by different visits: the PSF differs between the halves."""
    shape = (120, 200)
    inputs = []
    for i, (sigma, x0, nx) in enumerate([(0.4, 0, 200), (1.8, 100, 100), (1.8, 100, 100)]):
        e = Exposure(
            np.zeros((120, nx)),
            np.full((120, nx), 4.0),
            np.zeros((120, nx)),
            psf=psf_model(sigma),
            metadata=fits.Header({"VISIT": i, "DETECTOR": 0}),
            origin=(x0, 0),
        )
        inputs.append(e)
    result = assemble_coadd(wrap(inputs), shape=shape, wcs=None, psf_cell_size=20, psf_order=3)
    psf = result.exposure.psf
    left = psf.fwhm_at(20, 60)
    right = psf.fwhm_at(180, 60)
    only_left = fwhm_of_image(psf_model(0.4).kernel_at(0, 0))
    expected_right = fwhm_of_image(
        (psf_model(0.4).kernel_at(0, 0) + 2 * psf_model(1.8).kernel_at(0, 0)) / 3.0
    )
    assert abs(left / only_left - 1.0) < 0.03
    assert abs(right / expected_right - 1.0) < 0.03
    # Whose weight the coadd holds: visit 0 alone on the left, a third of it on the right
    # (equal weights), none of visit 5 anywhere; stored with the PSF file.
    share = result.coadd_psf.visit_weight_share(0, np.array([20.0, 180.0]), np.array([60.0] * 2))
    np.testing.assert_allclose(share, [1.0, 1.0 / 3.0], rtol=1e-6)
    assert np.all(result.coadd_psf.visit_weight_share(5, np.array([20.0]), np.array([60.0])) == 0)
    assert np.isnan(result.coadd_psf.visit_weight_share(0, np.array([20.0]), np.array([500.0])))


# --------------------------------------------------------------------------
# Masks, coverage, NO_DATA
# --------------------------------------------------------------------------


def test_coverage_and_no_data(survey, deep):
    e = deep.exposure
    checked = checked_coverage(survey)
    clipped = e.mask_of("CLIPPED")
    assert (deep.n_image[~clipped] == checked[~clipped]).all()
    assert (deep.n_image[clipped] < checked[clipped]).all()
    assert (e.mask_of("NO_DATA") == (checked == 0)).all()
    # Direct pixels whose PSF-matched partner has no data (its border) are left out.
    table = deep.inputs
    assert (table["n_unchecked"] > 0).sum() == len(VISITS) - 1  # visit 0 has no CCD edge inside
    assert (table["n_used"] + table["n_clipped"] + table["n_unchecked"] == table["n_valid"]).all()
    # Without rejection every direct pixel with data is used.
    plain = assemble_coadd(wrap(survey.direct), shape=SHAPE, wcs=None, do_reject=False)
    assert (plain.n_image == coverage(survey.direct)).all()
    assert (plain.inputs["n_used"] == plain.inputs["n_valid"]).all()


def test_no_data_region_and_interpolation():
    rng = np.random.default_rng(5)
    shape = (60, 90)
    inputs = []
    for i in range(4):
        image = 50.0 + rng.normal(0.0, 3.0, (60, 60))
        mask = np.zeros((60, 60), np.int32)
        mask[20:30, 25:35] = MaskPlanes().bitmask("NO_DATA")  # a hole in every input
        image[mask != 0] = np.nan
        inputs.append(
            Exposure(
                image,
                np.full(image.shape, 9.0),
                mask,
                psf=psf_model(1.0),
                metadata=fits.Header({"VISIT": i, "DETECTOR": 1}),
            )
        )
    plain = assemble_coadd(wrap(inputs), shape=shape, wcs=None)
    no_data = plain.exposure.mask_of("NO_DATA")
    expected = np.zeros(shape, bool)
    expected[:, 60:] = True
    expected[20:30, 25:35] = True
    assert (no_data == expected).all()
    assert np.isnan(plain.exposure.image[no_data]).all()
    assert np.isfinite(plain.exposure.image[~no_data]).all()
    filled = assemble_coadd(wrap(inputs), shape=shape, wcs=None, do_interp=True)
    img = filled.exposure.image
    assert np.isfinite(img).all() and np.isfinite(filled.exposure.variance).all()
    assert abs(np.median(img[20:30, 25:35]) - 50.0) < 3.0
    assert (filled.exposure.mask_of("INTRP") == expected).all()
    assert (filled.exposure.mask_of("NO_DATA") == expected).all()
    assert filled.exposure.metadata["DOINTERP"]


def test_bad_planes_excluded_and_saturation_propagated():
    rng = np.random.default_rng(8)
    planes = MaskPlanes()
    inputs = []
    for i in range(5):
        image = rng.normal(0.0, 2.0, (40, 40))
        mask = np.zeros((40, 40), np.int32)
        if i == 0:
            image[10:12, 10:12] = 1e6
            mask[10:12, 10:12] = planes.bitmask("SAT")
            mask[30, 30] = planes.bitmask("CR", "INTRP")
        inputs.append(
            Exposure(
                image,
                np.full(image.shape, 4.0),
                mask,
                psf=psf_model(1.0),
                metadata=fits.Header({"VISIT": i, "DETECTOR": 0}),
            )
        )
    result = assemble_coadd(wrap(inputs), shape=(40, 40), wcs=None)
    e = result.exposure
    assert np.abs(e.image[10:12, 10:12]).max() < 10.0
    assert (result.n_image[10:12, 10:12] == 4).all()
    assert e.mask_of("SAT")[10:12, 10:12].all() and e.mask_of("SAT").sum() == 4
    assert e.mask_of("REJECTED")[10:12, 10:12].all() and e.mask_of("INEXACT_PSF").sum() == 4
    # Planes of used inputs are ORed in (CR was used: its value is fine).
    assert e.mask_of("CR")[30, 30] and e.mask_of("CR").sum() == 1
    # With a higher threshold one input of five does not set SAT.
    strict = assemble_coadd(wrap(inputs), shape=(40, 40), wcs=None, mask_propagation={"SAT": 0.5})
    assert not strict.exposure.mask_of("SAT").any()


def test_photometric_scale_of_inputs_is_applied():
    rng = np.random.default_rng(9)
    image = rng.normal(10.0, 1.0, (30, 30))
    meta = fits.Header({"VISIT": 1, "DETECTOR": 2})
    njy = Exposure(image, np.ones(image.shape), np.zeros(image.shape), metadata=meta)
    counts = Exposure(
        image / 4.0,
        np.ones(image.shape) / 16.0,
        np.zeros(image.shape),
        metadata=meta,
        photo_calib=PhotoCalib(njy_per_unit=4.0),
    )
    a = assemble_coadd(wrap([njy]), shape=(30, 30), wcs=None)
    b = assemble_coadd(wrap([counts]), shape=(30, 30), wcs=None)
    np.testing.assert_allclose(a.exposure.image, b.exposure.image, rtol=1e-6)
    np.testing.assert_allclose(a.exposure.variance, b.exposure.variance, rtol=1e-6)


# --------------------------------------------------------------------------
# Strips, inputs table, template coadd
# --------------------------------------------------------------------------


def assert_same_coadd(a: CoaddResult, b: CoaddResult) -> None:
    np.testing.assert_array_equal(a.exposure.image, b.exposure.image)
    np.testing.assert_array_equal(a.exposure.variance, b.exposure.variance)
    np.testing.assert_array_equal(a.exposure.mask, b.exposure.mask)
    np.testing.assert_array_equal(a.n_image, b.n_image)
    np.testing.assert_array_equal(a.exposure.psf.basis, b.exposure.psf.basis)
    for ca, cb in zip(a.coadd_psf.coverage, b.coadd_psf.coverage, strict=True):
        np.testing.assert_array_equal(ca, cb)


def test_strips_give_the_same_coadd_as_one_strip(survey, deep):
    assert deep.exposure.metadata["STRIPROW"] == SHAPE[0]  # the default fits in one strip
    strips = assemble_coadd(
        wrap(survey.direct),
        shape=SHAPE,
        wcs=None,
        rejection_inputs=wrap(survey.matched),
        strip_rows=17,
    )
    assert strips.exposure.metadata["STRIPROW"] == 17
    assert_same_coadd(deep, strips)
    pd.testing.assert_frame_equal(deep.inputs, strips.inputs)


def test_inputs_table(survey, deep):
    table = deep.inputs
    assert list(table["visit"]) == [1000 + i for i in range(len(VISITS))]
    assert (table["detector"] == 7).all() and (table["band"] == "r").all()
    np.testing.assert_allclose(table["weight"], [1 / v[1] ** 2 for v in VISITS], rtol=1e-6)
    assert table["has_rejection_input"].all() and table["used"].all()
    # PSF matching correlates the noise of the rejection warps.
    assert (table["noise_correlation"] > 1.2).all()
    header = deep.exposure.metadata
    assert header["REJECT"] == "COMPAREWARP" and header["NVISITS"] == len(VISITS)
    assert header["BAND"] == "r" and header["REJINPUT"] == "PARTNER"


def test_template_coadd_from_psf_matched_warps(survey):
    result = assemble_coadd(wrap(survey.matched), shape=SHAPE, wcs=None)
    e = result.exposure
    assert e.metadata["REJINPUT"] == "SELF" and e.metadata["REJECT"] == "COMPAREWARP"
    # The coadd PSF is the model PSF everywhere.
    model = fwhm_of_image(psf_model(MODEL_SIGMA).kernel_at(0, 0))
    for x, y in [(30, 30), (135, 115), (240, 200)]:
        assert abs(e.psf.fwhm_at(x, y) / model - 1.0) < 0.01
    # The transient is gone here too.
    x, y, flux, _ = TRANSIENT
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    inside = np.hypot(xx - x, yy - y) <= 8
    plain = assemble_coadd(wrap(survey.matched), shape=SHAPE, wcs=None, do_reject=False)
    excess = (plain.exposure.image - e.image)[inside].sum()
    n_cover = plain.n_image[round(y), round(x)]
    assert excess > 0.5 * flux / n_cover


# --------------------------------------------------------------------------
# FITS-backed inputs
# --------------------------------------------------------------------------


def test_fits_inputs_give_the_same_coadd(survey, deep, tmp_path):
    from workflow_lib.io.exposure import write_exposure
    from workflow_lib.io.warp_input import FitsWarpInput

    paths = []
    for kind, exposures in (("direct", survey.direct), ("matched", survey.matched)):
        for e in exposures:
            path = tmp_path / f"{kind}_{e.metadata['VISIT']}.fits"
            write_exposure(e, path)
            paths.append(path)
    n = len(survey.direct)
    direct = [FitsWarpInput(p) for p in paths[:n]]
    matched = [FitsWarpInput(p, keep_open=False) for p in paths[n:]]
    assert direct[3].origin == survey.direct[3].origin
    assert (direct[3].visit, direct[3].detector) == (1003, 7)
    rows = direct[3].read_rows(5, 9)
    np.testing.assert_array_equal(rows.image, survey.direct[3].image[5:9])
    assert rows.image.dtype.isnative and rows.mask.dtype == np.int32
    from_files = assemble_coadd(
        direct, shape=SHAPE, wcs=None, rejection_inputs=matched, strip_rows=40
    )
    for warp in direct:
        warp.close()
    assert_same_coadd(deep, from_files)


# --------------------------------------------------------------------------
# Template selection
# --------------------------------------------------------------------------


@pytest.fixture
def ccd_visits() -> pd.DataFrame:
    rows = [
        # visit, detector, band, mjd, seeing, flags
        (1, 10, "r", 60000.0, 0.70, 0),
        (1, 11, "r", 60000.0, 0.95, 0),  # the same visit's other CCD, too wide
        (2, 10, "r", 60010.0, 0.60, 0),
        (3, 10, "r", 60020.0, 0.65, int(CcdVisitFlag.FAILED)),
        (4, 10, "g", 60020.0, 0.50, 0),  # other band
        (5, 10, "r", 60100.0, 0.55, 0),  # after the window
        (6, 10, "r", 59990.0, 0.80, 0),  # before the window
        (7, 10, "r", 60030.0, 0.90, 0),  # exactly at the FWHM limit: kept
        (7, 11, "r", 60030.0, 0.85, 0),
        (8, 10, "r", 60050.0, float("nan"), 0),
        (9, 10, "r", 60050.0, 0.75, int(CcdVisitFlag.PSF_REDUCED_ORDER)),  # usable
    ]
    return pd.DataFrame(
        rows, columns=["visit", "detector", "band", "midpointMjdTai", "seeing", "flags"]
    )


def test_template_selection_per_calexp(ccd_visits):
    kw = dict(band="r", mjd_min=60000.0, mjd_max=60050.0, max_psf_fwhm=0.9)
    chosen = select_template_ccd_visits(ccd_visits, max_images=None, **kw)
    pairs = list(zip(chosen["visit"], chosen["detector"], strict=True))
    assert pairs == [(2, 10), (1, 10), (9, 10), (7, 11), (7, 10)]  # best seeing first
    best3 = select_template_ccd_visits(ccd_visits, max_images=3, **kw)
    assert list(zip(best3["visit"], best3["detector"], strict=True)) == pairs[:3]
    assert select_template_visits(ccd_visits, max_images=3, **kw) == [1, 2, 9]
    assert select_template_visits(ccd_visits, max_images=None, **{**kw, "mjd_min": None}) == [
        1,
        2,
        6,
        7,
        9,
    ]
    with pytest.raises(ValueError):
        select_template_visits(ccd_visits, max_images=0, **kw)


def test_template_selection_by_seeing_quantile(ccd_visits):
    """No FWHM cut: the best third of what passes, but at least min_images (LSST's qMax and
    nVisitsMin); the window and the flags still apply."""
    kw = dict(band="r", mjd_min=60000.0, mjd_max=60050.0, max_psf_fwhm=None, max_images=None)
    everything = select_template_ccd_visits(ccd_visits, **kw)
    # In the window and usable: 2, 1/10, 9, 7/11, 7/10, 1/11 (0.95 passes without a cut).
    assert len(everything) == 6
    third = select_template_ccd_visits(ccd_visits, seeing_quantile=0.33, **kw)
    assert list(zip(third["visit"], third["detector"], strict=True)) == [(2, 10), (1, 10)]
    at_least = select_template_ccd_visits(ccd_visits, seeing_quantile=0.33, min_images=4, **kw)
    assert len(at_least) == 4 and at_least["seeing"].max() == 0.85
    capped = {**kw, "max_images": 3}
    assert len(select_template_ccd_visits(ccd_visits, seeing_quantile=1.0, **capped)) == 3
    with pytest.raises(ValueError):
        select_template_ccd_visits(ccd_visits, seeing_quantile=0.0, **kw)


def test_template_selection_per_visit(ccd_visits):
    kw = dict(band="r", mjd_min=60000.0, mjd_max=60050.0, max_psf_fwhm=0.9, per_detector=False)
    chosen = select_template_ccd_visits(ccd_visits, max_images=2, **kw)
    # Visit 1's FWHM is the median of 0.70 and 0.95: 0.825, worse than visits 2 and 9.
    assert list(chosen["visit"]) == [2, 9]
    everything = select_template_ccd_visits(ccd_visits, max_images=None, **kw)
    assert sorted(set(everything["visit"])) == [1, 2, 7, 9]
    assert len(everything[everything["visit"] == 1]) == 2  # all rows of a chosen visit


def test_coadd_psf_file_round_trip(deep, tmp_path):
    from workflow_lib.io.coadd_psf import read_coadd_psf, write_coadd_psf

    path = tmp_path / "coaddPsf.fits"
    write_coadd_psf(deep.coadd_psf, path)
    back = read_coadd_psf(path)
    x = np.array([5.0, 61.2, 135.3, 262.0])
    y = np.array([7.0, 166.8, 57.2, 220.0])
    np.testing.assert_allclose(back.kernels_at(x, y), deep.coadd_psf.kernels_at(x, y), atol=1e-12)
    np.testing.assert_array_equal(back.model.basis, deep.coadd_psf.model.basis)
    assert back.block == deep.coadd_psf.block and back.shape == SHAPE
    np.testing.assert_array_equal(back.input_ids, deep.coadd_psf.input_ids)
    assert deep.coadd_psf.input_ids is not None
    np.testing.assert_array_equal(
        back.visit_weight_share(1, x, y), deep.coadd_psf.visit_weight_share(1, x, y)
    )


def _with_aperture_corrections(exposures, ratios):
    """The inputs scaled to 1 / A_i with A_i (None: unknown) in their metadata."""
    out = []
    for e, a in zip(exposures, ratios, strict=True):
        meta = e.metadata.copy()
        if a is not None:
            meta["APCORR"] = float(a)
        out.append(
            Exposure(
                e.image / (a or 1.0),
                e.variance,
                e.mask.copy(),
                psf=e.psf,
                metadata=meta,
                origin=e.origin,
                mask_planes=e.mask_planes,
            )
        )
    return out


def test_coadd_aperture_correction_restores_the_inputs_calibration(survey, tmp_path):
    # Visit i's calibration aperture holds A_i times its PSF flux: its PSF model misses
    # a fraction of the light, so a calibrated star is drawn at 1 / A_i of its flux in
    # PSF-model units. The coadd's PSF fluxes times the inputs' corrections, weighted as
    # the coadd weighted the inputs, give the fluxes of the unscaled coadd back.
    from workflow_lib.io.coadd_psf import read_coadd_psf, write_coadd_psf

    ratios = list(1.0 + 0.025 * np.arange(len(VISITS)))
    plain = assemble_coadd(wrap(survey.truth_direct), shape=SHAPE, wcs=None, do_reject=False)
    coadd = assemble_coadd(
        wrap(_with_aperture_corrections(survey.truth_direct, ratios)),
        shape=SHAPE,
        wcs=None,
        do_reject=False,
    )
    stars = survey.stars
    x, y = stars["x"].to_numpy(), stars["y"].to_numpy()
    ratio = coadd.coadd_psf.aperture_correction_at(x, y)
    clean = uniformly_covered(survey, stars)
    assert clean.sum() >= 7 and np.isfinite(ratio).all()
    measured = measure_with_coadd_psf(coadd, stars)["psf_flux"].to_numpy()[clean]
    reference = measure_with_coadd_psf(plain, stars)["psf_flux"].to_numpy()[clean]
    assert np.all(np.abs(measured / reference - 1) > 0.03)  # the test can fail
    # Exact for an isolated star; a neighbour's light enters the fit with its own mix.
    residual = np.abs(measured * ratio[clean] / reference - 1)
    assert np.median(residual) < 2e-4 and residual.max() < 5e-3, residual
    centre = coadd.coadd_psf.aperture_correction_at(np.array([134.5]), np.array([114.5]))[0]
    assert coadd.exposure.metadata["APCORR"] == pytest.approx(centre, abs=1e-6)
    path = tmp_path / "coaddPsf.fits"
    write_coadd_psf(coadd.coadd_psf, path)
    np.testing.assert_array_equal(read_coadd_psf(path).aperture_correction_at(x, y), ratio)
    assert plain.coadd_psf.aperture_corrections is None and "APCORR" not in plain.exposure.metadata
    assert np.isnan(plain.coadd_psf.aperture_correction_at(x, y)).all()

    # Where an input without a correction contributes, none can be given.
    ratios[7] = None
    partial = assemble_coadd(
        wrap(_with_aperture_corrections(survey.truth_direct, ratios)),
        shape=SHAPE,
        wcs=None,
        do_reject=False,
    )
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    covered_by_7 = coverage([survey.truth_direct[7]])[iy, ix] > 0
    assert covered_by_7.any() and not covered_by_7.all()
    np.testing.assert_array_equal(
        np.isnan(partial.coadd_psf.aperture_correction_at(x, y)), covered_by_7
    )


# --------------------------------------------------------------------------
# Pure noise, odd inputs
# --------------------------------------------------------------------------


class BigEndianRows(ExposureWarpInput):
    """Rows as a FITS reader without byte swapping would return them."""

    def read_rows(self, y0: int, y1: int):
        rows = super().read_rows(y0, y1)
        return type(rows)(*(a.astype(a.dtype.newbyteorder(">")) for a in rows.__dict__.values()))


def test_pure_noise_is_not_clipped_and_byte_order_does_not_matter():
    """Overlapping noise-only warps (1 to 6 epochs per pixel): (almost) nothing is clipped."""
    rng = np.random.default_rng(21)
    shape = (200, 220)
    direct, matched = [], []
    for i in range(6):
        x0, y0 = int(rng.integers(0, 70)), int(rng.integers(0, 50))
        sigma = rng.uniform(5.0, 9.0)
        image = rng.normal(0.0, sigma, (150, 150))
        meta = fits.Header({"VISIT": 50 + i, "DETECTOR": 3})
        common = dict(metadata=meta, origin=(x0, y0))
        direct.append(
            Exposure(
                image,
                np.full(image.shape, sigma**2),
                np.zeros(image.shape),
                psf=psf_model(0.8),
                **common,
            )
        )
        kernel = galsim.Gaussian(sigma=1.5).drawImage(nx=11, ny=11, scale=1.0, method="no_pixel")
        k = kernel.array / kernel.array.sum()
        smooth = ndimage.convolve(image, k, mode="nearest")
        matched.append(
            Exposure(
                smooth,
                np.full(image.shape, sigma**2 * (k**2).sum()),
                np.zeros(image.shape),
                psf=psf_model(1.7),
                **common,
            )
        )
    result = assemble_coadd(
        wrap(direct), shape=shape, wcs=None, rejection_inputs=wrap(matched), strip_rows=50
    )
    assert result.exposure.mask_of("CLIPPED").mean() < 1e-3
    # The smoothed noise of the matched warps exceeds white noise's by the factor that
    # a Gaussian (sigma_k = 1.5) correlation predicts for the smoothing Gaussian sigma_s.
    sigma_s = result.exposure.metadata["MODLFWHM"] / 2.3548
    predicted = 2 * np.sqrt(np.pi) * sigma_s * 1.5 / np.hypot(sigma_s, 1.5)
    correlation = result.inputs["noise_correlation"]
    assert (np.abs(correlation / predicted - 1.0) < 0.1).all(), (correlation, predicted)
    swapped = assemble_coadd(
        [BigEndianRows(e) for e in direct],
        shape=shape,
        wcs=None,
        rejection_inputs=[BigEndianRows(e) for e in matched],
        strip_rows=50,
    )
    assert_same_coadd(result, swapped)


def split_rows(e: Exposure, at: int) -> list[Exposure]:
    """Two 'detectors' of one visit: the rows below and above ``at``."""
    parts = []
    for detector, rows in ((7, slice(0, at)), (8, slice(at, e.shape[0]))):
        meta = e.metadata.copy()
        meta["DETECTOR"] = detector
        origin = (e.origin[0], e.origin[1] + rows.start)
        parts.append(
            Exposure(
                e.image[rows],
                e.variance[rows],
                e.mask[rows],
                psf=e.psf,
                metadata=meta,
                origin=origin,
            )
        )
    return parts


def test_visit_split_into_detectors_gives_the_same_coadd(survey, deep):
    direct = split_rows(survey.direct[0], 115) + survey.direct[1:]
    matched = split_rows(survey.matched[0], 115) + survey.matched[1:]
    split = assemble_coadd(wrap(direct), shape=SHAPE, wcs=None, rejection_inputs=wrap(matched))
    assert list(split.inputs["detector"][:2]) == [7, 8]
    assert split.inputs["n_used"][:2].sum() == deep.inputs["n_used"][0]
    # Identical wherever neither clipped (each detector measures its own noise correlation).
    same = ~(split.exposure.mask_of("CLIPPED") | deep.exposure.mask_of("CLIPPED"))
    assert same.mean() > 0.75
    np.testing.assert_array_equal(split.exposure.image[same], deep.exposure.image[same])
    np.testing.assert_array_equal(split.n_image, deep.n_image)
