"""PSF determination where stars are few and galaxies many, and at the image edges.

Fields are 512 x 512 at 0.2"/px rendered with GalSim (Kolmogorov + obscured
Airy PSF, Sersic galaxies ten to twenty times as many as the stars, Poisson
noise; seeded), the regime of high-latitude fields on small CCDs where the old
isolation cuts left no PSF star at all.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from workflow_lib.core.psf_model import fwhm_of_image
from workflow_lib.single_frame.detection import compact_locus, detect_with_background
from workflow_lib.single_frame.measure import neighbour_flux_fraction
from workflow_lib.single_frame.psf import (
    determine_psf,
    fit_psf_model,
    moffat_kernel,
    psf_star_margin,
    select_psf_stars,
)

galsim = pytest.importorskip("galsim")

N = 512
SCALE = 0.2
SKY = 800.0
ZP_30S = 28.36 + 2.5 * np.log10(30.0)  # r-band AB magnitude of 1 e- in 30 s


def kolmogorov(fwhm: float):
    return galsim.Convolve(
        galsim.Kolmogorov(fwhm=fwhm), galsim.Airy(lam_over_diam=0.0152, obscuration=0.6)
    )


def _draw(img, profile, x: float, y: float) -> None:
    half = 40
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    bounds = galsim.BoundsI(ix + 1 - half, ix + 1 + half, iy + 1 - half, iy + 1 + half)
    stamp = galsim.ImageF(bounds, scale=SCALE)
    profile.drawImage(image=stamp, center=galsim.PositionD(x + 1, y + 1))
    overlap = bounds & img.bounds
    img[overlap] += stamp[overlap]


def galaxy_field(seed: int, *, n_star: int, gal_per_arcmin2: float, fwhm: float = 0.9):
    """Stars of r = 17-22 among galaxies of r = 20-26 (dN/dm ~ 10^0.28m)."""
    rng = np.random.default_rng(seed)
    n_gal = rng.poisson(gal_per_arcmin2 * (N * SCALE / 60.0) ** 2)
    img = galsim.ImageF(N, N, scale=SCALE)
    psf = kolmogorov(fwhm)
    a, b = 10 ** (0.28 * 20), 10 ** (0.28 * 26)
    mags = np.concatenate(
        [rng.uniform(17, 22, n_star), np.log10(a + rng.uniform(size=n_gal) * (b - a)) / 0.28]
    )
    rows = []
    for k, mag in enumerate(mags):
        x, y = rng.uniform(5, N - 5, 2)
        flux = 10 ** (-0.4 * (mag - ZP_30S))
        if k >= n_star:
            hlr = float(np.clip((0.35 + 0.12 * (24 - mag)) * rng.lognormal(0, 0.35), 0.2, 1.5))
            gal = galsim.Sersic(n=1.0, half_light_radius=hlr)
            gal = gal.shear(e1=rng.uniform(-0.3, 0.3), e2=rng.uniform(-0.3, 0.3))
            profile = galsim.Convolve(gal, psf)
        else:
            profile = psf
        _draw(img, profile.withFlux(flux), x, y)
        rows.append((x, y, mag, k >= n_star))
    truth = pd.DataFrame(rows, columns=["x", "y", "mag", "is_gal"])
    image = rng.poisson(img.array.astype(np.float64) + SKY).astype(np.float32)
    true_fwhm = fwhm_of_image(psf.drawImage(nx=41, ny=41, scale=SCALE).array)
    return image, np.maximum(image, 1.0), truth, true_fwhm


def characterize(image, variance, truth):
    mask = np.zeros(image.shape, dtype=bool)
    bkg, det = detect_with_background(image, variance, mask, fwhm=4.0)
    table = det.table
    dist, j = cKDTree(truth[["x", "y"]].to_numpy()).query(table[["x_win", "y_win"]].to_numpy())
    is_star = (dist < 1.5) & ~truth["is_gal"].to_numpy()[j]
    return image - bkg.image, mask, det, is_star, truth["mag"].to_numpy()[j]


@pytest.mark.parametrize("seed", [0, 3])
def test_psf_stars_among_twenty_times_as_many_galaxies(seed):
    """12 stars, 250 galaxies/arcmin^2 to r = 26: most stars used, no galaxy, right size."""
    image, var, truth, true_fwhm = galaxy_field(seed, n_star=12, gal_per_arcmin2=250)
    data, mask, det, is_star, _ = characterize(image, var, truth)
    selection = select_psf_stars(det.table, data, var, mask, segmentation=det.segmentation)
    chosen = selection.selected
    # Of the 12, some sit within the edge margin or on a bright galaxy.
    assert chosen.sum() >= 7
    assert np.all(is_star[chosen])
    fit, rows = determine_psf(det.table, data, var, mask, det.segmentation, order=2)
    assert fit.method == "pixel" and fit.order >= 0
    assert np.all(is_star[rows[fit.used]])
    assert fit.fwhm == pytest.approx(true_fwhm, rel=0.02)


def test_three_stars_give_a_constant_pixelised_model():
    image, var, truth, true_fwhm = galaxy_field(5, n_star=3, gal_per_arcmin2=110)
    data, mask, det, is_star, _ = characterize(image, var, truth)
    fit, rows = determine_psf(det.table, data, var, mask, det.segmentation, order=2)
    assert fit.method == "pixel" and fit.order == 0
    assert 2 <= fit.n_used <= 3 and np.all(is_star[rows[fit.used]])
    assert fit.fwhm == pytest.approx(true_fwhm, rel=0.02)


def test_a_lone_star_found_by_the_reference_catalog_gives_a_moffat_fallback():
    """One star among compact galaxies: the size locus alone cannot tell it; the
    reference catalog's star flag can, and a parametric PSF is fitted to it."""
    image, var, truth, true_fwhm = galaxy_field(2, n_star=1, gal_per_arcmin2=110)
    data, mask, det, is_star, mag = characterize(image, var, truth)
    known = is_star & (mag < 22)
    assert known.sum() == 1
    fit, rows = determine_psf(
        det.table, data, var, mask, det.segmentation, known_stars=known, order=2
    )
    assert fit.method == "moffat"
    assert np.all(is_star[rows[fit.used]])
    # A Moffat is not a Kolmogorov profile: a few per cent in FWHM (the flux is
    # aperture-corrected downstream).
    assert fit.fwhm == pytest.approx(true_fwhm, rel=0.05)


def test_edge_stars_constrain_the_psf_model_at_the_edges():
    """A PSF growing by 20% towards the corners, stars only near the edges and the centre:
    stars within half a kernel of the edge enter the fit (partial stamps), so the model
    at the edges is fitted, not extrapolated."""
    rng = np.random.default_rng(11)
    img = galsim.ImageF(N, N, scale=SCALE)

    def fwhm_at(x, y):
        u, v = (x - N / 2) / (N / 2), (y - N / 2) / (N / 2)
        return 0.75 * (1 + 0.1 * (u * u + v * v))

    margin = psf_star_margin(41)
    ring = np.linspace(margin + 2, N - margin - 3, 12)  # 44 stars: enough for order 2
    edge_xy = [(x, d) for x in ring for d in (margin + 2, N - margin - 3)]
    edge_xy += [(d, y) for y in ring[1:-1] for d in (margin + 2, N - margin - 3)]
    centre_xy = [(N / 2 + dx, N / 2 + dy) for dx in (-60, 60) for dy in (-60, 60)]
    stars = np.array(edge_xy + centre_xy) + rng.uniform(-2, 2, (len(edge_xy) + 4, 2))
    for x, y in stars:
        _draw(img, kolmogorov(fwhm_at(x, y)).withFlux(float(10 ** rng.uniform(5.0, 5.6))), x, y)
    image = rng.poisson(img.array.astype(np.float64) + SKY).astype(np.float32)
    var = np.maximum(image, 1.0)
    fit = fit_psf_model(image - SKY, var, None, stars[:, 0], stars[:, 1], order=2)
    assert fit.used.sum() >= len(stars) - 2
    for x, y in [(margin + 2, N / 2), (N / 2, N - margin - 3), (N - 30, N - 30)]:
        truth = kolmogorov(fwhm_at(x, y)).drawImage(nx=41, ny=41, scale=SCALE).array
        assert fit.psf.fwhm_at(x, y) == pytest.approx(fwhm_of_image(truth), rel=0.015)


def test_compact_locus_finds_a_star_minority_below_the_galaxies():
    rng = np.random.default_rng(1)
    stars = 2.0 * (1 + rng.normal(0, 0.01, 6))
    galaxies = 2.0 * np.exp(rng.uniform(0.08, 0.9, 80))
    spike = [1.2]  # a lone compact artefact never makes a locus
    sizes = np.concatenate([stars, galaxies, spike])
    assert compact_locus(sizes) == pytest.approx(2.0, rel=0.02)
    # The global mode would be a galaxy size.
    assert np.median(sizes) > 2.5


def test_moffat_kernel_matches_galsim():
    kernel = moffat_kernel(41, 4.0, 3.0, 0.1, -0.05)
    ref = (
        galsim.Moffat(beta=3.0, fwhm=4.0)
        .shear(e1=0.1, e2=-0.05)
        .drawImage(nx=41, ny=41, scale=1.0)
        .array
    )
    assert kernel.sum() == pytest.approx(ref.sum(), rel=2e-3)
    assert np.abs(kernel - ref).max() < 2e-3 * ref.max()


def test_neighbour_flux_fraction_counts_only_other_footprints():
    image = np.ones((40, 40))
    seg = np.zeros((40, 40), dtype=np.int32)
    seg[18:23, 18:23] = 1  # the star
    seg[18:23, 26:29] = 2  # a neighbour 7 px away: 15 pixels of flux 1
    frac = neighbour_flux_fraction(
        image,
        seg,
        np.array([1, 1]),
        [20.0, 20.0],
        [20.0, 20.0],
        radius=10.0,
        flux=np.array([100.0, 100.0]),
    )
    assert frac == pytest.approx([0.15, 0.15])
    near = neighbour_flux_fraction(
        image, seg, np.array([1]), [20.0], [20.0], radius=5.0, flux=np.array([100.0])
    )
    assert near[0] == 0.0
