"""Science minus PSF-matched template on synthetic images (workflow_lib.diffim.subtract)."""

from __future__ import annotations

import numpy as np
import pytest

from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes
from workflow_lib.core.flags import ARTIFACT_DIA_SOURCE
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.diffim.sources import detect_dia_sources
from workflow_lib.diffim.subtract import subtract_images

SHAPE = (256, 256)
HALF = 12


def _gauss(sigma: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[-HALF : HALF + 1, -HALF : HALF + 1]
    g = np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * sigma**2))
    return g / g.sum()


def _render(sigma, stars, noise, rng, background=0.0):  # type: ignore[no-untyped-def]
    image = rng.normal(0.0, noise, SHAPE) + background
    for x, y, f in stars:
        ix, iy = round(x), round(y)
        image[iy - HALF : iy + HALF + 1, ix - HALF : ix + HALF + 1] += f * _gauss(
            sigma, x - ix, y - iy
        )
    planes = MaskPlanes()
    return Exposure(
        image,
        np.full(SHAPE, noise**2),
        np.zeros(SHAPE, MASK_DTYPE),
        psf=PsfModel.constant(_gauss(sigma)),
        mask_planes=planes,
    )


@pytest.fixture(scope="module")
def stars():
    rng = np.random.default_rng(5)
    xy = rng.uniform(20, 236, size=(40, 2))
    flux = 10 ** rng.uniform(3.0, 4.5, size=40)
    return [(x, y, f) for (x, y), f in zip(xy, flux, strict=True)]


@pytest.mark.parametrize(
    ("sigma_sci", "sigma_tmpl", "convolved"), [(2.2, 1.5, "template"), (1.5, 2.2, "both")]
)
def test_static_stars_vanish_and_a_transient_remains(stars, sigma_sci, sigma_tmpl, convolved):
    rng = np.random.default_rng(9)
    transient = (128.4, 100.7, 3000.0)
    science = _render(sigma_sci, [*stars, transient], 5.0, rng, background=3.0)
    template = _render(sigma_tmpl, stars, 2.0, rng)
    result = subtract_images(science, template)
    assert result.convolved == convolved
    diff = result.difference
    found = detect_dia_sources(diff.image, diff.variance, diff.mask, diff.mask_planes, result.psf)
    clean = found[(found["flags"] & ARTIFACT_DIA_SOURCE) == 0]
    d = np.hypot(clean["x"] - transient[0], clean["y"] - transient[1])
    assert d.min() < 0.5
    row = clean.loc[d.idxmin()]
    assert row["psf_flux"] == pytest.approx(transient[2], abs=4 * row["psf_flux_err"])
    # The static stars (up to S/N ~ 1000 in the science) leave nothing at 5 sigma.
    assert len(clean) <= 2, clean
    # The differential background (3.0 in the science only) is removed.
    quiet = diff.image[40:80, 40:80]
    assert abs(np.median(quiet)) < 0.5


@pytest.mark.parametrize(
    ("sigma_sci", "sigma_tmpl", "convolved"), [(2.2, 1.5, "template"), (1.5, 2.2, "science")]
)
def test_alard_lupton_with_decorrelation(stars, sigma_sci, sigma_tmpl, convolved):
    """The kernel fitted on the stars (flux scale 1.1 between the images), the difference
    decorrelated: static stars vanish, the transient's flux and S/N are right."""
    rng = np.random.default_rng(11)
    transient = (128.4, 100.7, 3000.0)
    science = _render(sigma_sci, [*stars, transient], 5.0, rng, background=3.0)
    template = _render(sigma_tmpl, [(x, y, f / 1.1) for x, y, f in stars], 2.0, rng)
    xy = np.array([(x, y) for x, y, _ in stars])
    result = subtract_images(science, template, kernel_sources=(xy[:, 0], xy[:, 1]))
    assert result.method == "alard_lupton" and result.convolved == convolved
    assert result.n_kernel_stamps >= 30
    diff = result.difference
    assert diff.metadata["DIFFDECO"] and 0.8 < diff.metadata["DIFFVSCL"] < 1.25
    found = detect_dia_sources(diff.image, diff.variance, diff.mask, diff.mask_planes, result.psf)
    clean = found[(found["flags"] & ARTIFACT_DIA_SOURCE) == 0]
    d = np.hypot(clean["x"] - transient[0], clean["y"] - transient[1])
    row = clean.loc[d.idxmin()]
    assert d.min() < 0.5
    # In the science's units whichever image is convolved (the kernel's sum divided out).
    assert row["psf_flux"] == pytest.approx(transient[2], abs=4 * row["psf_flux_err"])
    assert len(clean) <= 2, clean
    # Decorrelated: the noise is white, so no rescaling of the PSF-filtered noise is needed.
    assert found.attrs["noise_scale"] == pytest.approx(1.0, abs=0.1)


def test_zogy_difference_finds_the_transient_and_leaves_the_stars(stars):
    from workflow_lib.diffim.subtract import SubtractionConfig

    rng = np.random.default_rng(13)
    transient = (128.4, 100.7, 3000.0)
    science = _render(2.2, [*stars, transient], 5.0, rng, background=3.0)
    template = _render(1.5, stars, 2.0, rng)
    result = subtract_images(science, template, SubtractionConfig(method="zogy"))
    assert result.method == "zogy"
    diff = result.difference
    found = detect_dia_sources(diff.image, diff.variance, diff.mask, diff.mask_planes, result.psf)
    clean = found[(found["flags"] & ARTIFACT_DIA_SOURCE) == 0]
    d = np.hypot(clean["x"] - transient[0], clean["y"] - transient[1])
    row = clean.loc[d.idxmin()]
    assert d.min() < 0.5
    assert row["psf_flux"] == pytest.approx(transient[2], abs=4 * row["psf_flux_err"])
    assert len(clean) <= 2, clean
    assert found.attrs["noise_scale"] == pytest.approx(1.0, abs=0.1)  # ZOGY's D is white


def test_zogy_fits_the_photometric_scale_on_the_kernel_stars(stars):
    """A template 10 % fainter (a zero-point error): with the kernel stars the scale is
    fitted and the stars vanish; without them (scale 1) they would not."""
    from workflow_lib.diffim.subtract import SubtractionConfig

    rng = np.random.default_rng(13)
    transient = (128.4, 100.7, 3000.0)
    science = _render(2.2, [*stars, transient], 5.0, rng, background=3.0)
    template = _render(1.5, [(x, y, f / 1.1) for x, y, f in stars], 2.0, rng)
    xy = np.array([(x, y) for x, y, _ in stars])
    config = SubtractionConfig(method="zogy")
    counts = {}
    for name, sources in (("fitted", (xy[:, 0], xy[:, 1])), ("unit", None)):
        result = subtract_images(science, template, config, kernel_sources=sources)
        diff = result.difference
        found = detect_dia_sources(
            diff.image, diff.variance, diff.mask, diff.mask_planes, result.psf
        )
        counts[name] = int(((found["flags"] & ARTIFACT_DIA_SOURCE) == 0).sum())
        if name == "fitted":
            assert diff.metadata["DIFFFSCL"] == pytest.approx(1.1, abs=0.01)
            d = np.hypot(found["x"] - transient[0], found["y"] - transient[1])
            assert found.loc[d.idxmin(), "psf_flux"] == pytest.approx(3000.0, rel=0.1)
    assert counts["fitted"] <= 2 < counts["unit"], counts


def _varying_psf(sigma_left: float, sigma_right: float, nx: int) -> PsfModel:
    """A PSF linear in x between two Gaussians (at x = 0 and x = nx - 1)."""
    left, right = _gauss(sigma_left), _gauss(sigma_right)
    c = (nx - 1) / 2.0
    basis = np.stack([(left + right) / 2, (right - left) / 2, np.zeros_like(left)])
    return PsfModel(basis=basis, order=1, x_center=c, y_center=127.5, x_scale=c, y_scale=127.5)


def _render_with(psf: PsfModel, stars, noise, rng, shape):  # type: ignore[no-untyped-def]
    image = rng.normal(0.0, noise, shape)
    for x, y, f in stars:  # integer positions: the model's own kernel is the truth
        image[y - HALF : y + HALF + 1, x - HALF : x + HALF + 1] += f * psf.kernel_at(x, y)
    return Exposure(
        image,
        np.full(shape, noise**2),
        np.zeros(shape, MASK_DTYPE),
        psf=psf,
        mask_planes=MaskPlanes(),
    )


@pytest.mark.parametrize(
    ("science_sigmas", "template_sigmas", "convolved"),
    [((1.9, 2.7), (1.3, 1.6), "template"), ((1.3, 1.6), (1.9, 2.7), "science")],
)
def test_difference_psf_follows_the_psf_across_the_ccd(science_sigmas, template_sigmas, convolved):
    """Transients at both ends of a CCD whose PSFs widen from left to right: their PSF
    fluxes on the decorrelated difference are right at both ends (the PSF at the CCD's
    centre would read the broad end ~5 % faint and the sharp end bright)."""
    shape = (256, 640)
    rng = np.random.default_rng(17)
    xy = np.column_stack([rng.integers(20, 620, 80), rng.integers(20, 236, 80)])
    stars = [
        (int(x), int(y), float(f))
        for (x, y), f in zip(xy, 10 ** rng.uniform(3.5, 4.5, 80), strict=True)
    ]
    transients = [(16 + 24 * k, 40 + 40 * (k % 5), 20000.0) for k in range(5)]
    transients += [(624 - 24 * k, 40 + 40 * (k % 5), 20000.0) for k in range(5)]
    science = _render_with(
        _varying_psf(*science_sigmas, shape[1]), [*stars, *transients], 5.0, rng, shape
    )
    template = _render_with(_varying_psf(*template_sigmas, shape[1]), stars, 2.0, rng, shape)
    kernel_xy = (xy[:, 0].astype(float), xy[:, 1].astype(float))
    result = subtract_images(science, template, kernel_sources=kernel_xy)
    assert result.method == "alard_lupton" and result.convolved == convolved
    diff = result.difference
    from workflow_lib.objects.forced import fixed_psf_fluxes

    tx = np.array([t[0] for t in transients], dtype=float)
    ty = np.array([t[1] for t in transients], dtype=float)
    bad = diff.mask_of("NO_DATA", "BAD")
    fit = fixed_psf_fluxes(diff.image, diff.variance, bad, result.psf, tx, ty, joint=False)
    ratio = fit["psf_flux"].to_numpy() / 20000.0
    print(np.round(ratio, 4))
    # S/N ~ 200 per transient: 0.5 % noise; the two ends agree and are right to 1 %.
    left, right = np.median(ratio[:5]), np.median(ratio[5:])
    assert left == pytest.approx(1.0, abs=0.01) and right == pytest.approx(1.0, abs=0.01)
