"""Warping (workflow_lib.static_sky.warp) and PSF matching (workflow_lib.static_sky.psf_matching).

Synthetic calexps: a TAN-SIP WCS at any rotation (with or without a flip), stars
of a Moffat PSF (non-Gaussian, optionally elliptical and varying over the
image) drawn by GalSim at positions known on the sky, a PsfModel fitted to
GalSim's own kernels. The helpers are reused by ``benchmarks/bench_warp.py``.
"""

from __future__ import annotations

import galsim
import numpy as np
import pytest
import sep
from astropy.io import fits
from astropy.wcs import WCS, Sip
from reproject import reproject_interp

from workflow_lib.core.exposure import Exposure, MaskPlanes, PhotoCalib
from workflow_lib.core.psf_model import PsfModel, fwhm_of_image, polynomial_terms
from workflow_lib.static_sky.warp import (
    PsfMatchingError,
    build_pixel_mapping,
    exact_source_pixels,
    model_psf,
    psf_match_exposure,
    resample_array,
    warp_exposure,
)

ARCSEC = 1.0 / 3600.0


# --------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------
def tan_sip_wcs(
    shape: tuple[int, int],
    *,
    rotation_deg: float = 0.0,
    flip: bool = False,
    scale_arcsec: float = 0.2,
    crval: tuple[float, float] = (56.0, -30.0),
    sip: bool = True,
) -> WCS:
    """TAN(-SIP) WCS of a detector: any rotation, optional flip, a few 1e-3 of distortion."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [nx / 2 + 0.5, ny / 2 + 0.5]
    th = np.deg2rad(rotation_deg)
    cd = scale_arcsec * ARCSEC * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    if flip:
        cd = cd @ np.diag([-1.0, 1.0])
    w.wcs.cd = cd
    if sip:
        # Distortion of a few pixels at the corners of a 4k detector (LSST-like).
        half = max(nx, ny) / 2.0
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[1, 1], a[0, 2] = 1.2e-3 / half, -0.6e-3 / half, 0.8e-3 / half
        b[2, 0], b[1, 1], b[0, 2] = -0.5e-3 / half, 1.0e-3 / half, 0.4e-3 / half
        a[3, 0], b[0, 3], a[1, 2] = 1e-3 / half**2, -0.8e-3 / half**2, 0.5e-3 / half**2
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.pixel_shape = (nx, ny)
    return w


def patch_wcs(
    shape: tuple[int, int], crval: tuple[float, float], *, scale_arcsec: float = 0.2
) -> WCS:
    """North-up TAN WCS of a patch centred on ``crval``."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [nx / 2 + 0.5, ny / 2 + 0.5]
    w.wcs.cd = scale_arcsec * ARCSEC * np.array([[-1.0, 0.0], [0.0, 1.0]])
    w.pixel_shape = (nx, ny)
    return w


def moffat(fwhm: float, *, beta: float = 3.0, g1: float = 0.0, g2: float = 0.0) -> galsim.GSObject:
    profile = galsim.Moffat(beta=beta, fwhm=fwhm, trunc=6.0 * fwhm)
    return profile.shear(g1=g1, g2=g2) if (g1 or g2) else profile


def render_stars(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm_at,  # callable (x, y) -> FWHM in pixels
    *,
    beta: float = 3.0,
    g1: float = 0.0,
    g2: float = 0.0,
    stamp: int = 61,
) -> np.ndarray:
    """Pixel-integrated Moffat stars at 0-based (x, y) with total ``flux`` each."""
    image = np.zeros(shape)
    half = stamp // 2
    for xi, yi, fi in zip(x, y, flux, strict=True):
        ix, iy = round(xi), round(yi)
        prof = moffat(fwhm_at(xi, yi), beta=beta, g1=g1, g2=g2).withFlux(fi)
        img = prof.drawImage(nx=stamp, ny=stamp, scale=1.0, offset=(xi - ix, yi - iy)).array
        y0, x0 = iy - half, ix - half
        ys = slice(max(y0, 0), min(y0 + stamp, shape[0]))
        xs = slice(max(x0, 0), min(x0 + stamp, shape[1]))
        image[ys, xs] += img[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return image


def psf_model_for(
    shape: tuple[int, int],
    fwhm_at,
    *,
    beta: float = 3.0,
    g1: float = 0.0,
    g2: float = 0.0,
    size: int = 41,
    order: int = 2,
) -> PsfModel:
    """PsfModel fitted (least squares, pixel by pixel) to GalSim kernels on a grid."""
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5))
    gx, gy = gx.ravel(), gy.ravel()
    kernels = np.stack(
        [
            moffat(fwhm_at(x, y), beta=beta, g1=g1, g2=g2)
            .drawImage(nx=size, ny=size, scale=1.0)
            .array
            for x, y in zip(gx, gy, strict=True)
        ]
    )
    xc, yc, xs, ys = (nx - 1) / 2.0, (ny - 1) / 2.0, nx / 2.0, ny / 2.0
    terms = polynomial_terms((gx - xc) / xs, (gy - yc) / ys, order)
    coef, *_ = np.linalg.lstsq(terms, kernels.reshape(len(gx), -1), rcond=None)
    return PsfModel(coef.reshape(-1, size, size), order, xc, yc, xs, ys)


def make_calexp(
    rng: np.random.Generator,
    shape: tuple[int, int],
    wcs: WCS,
    *,
    n_stars: int = 40,
    fwhm_at=lambda x, y: 3.5,
    g1: float = 0.0,
    g2: float = 0.0,
    noise: float = 0.0,
    margin: int = 30,
) -> tuple[Exposure, dict[str, np.ndarray]]:
    """A calexp of isolated stars (positions known on the sky) with its PSF model."""
    ny, nx = shape
    # Stars on a jittered grid so they stay isolated.
    side = int(np.ceil(np.sqrt(n_stars)))
    gx, gy = np.meshgrid(
        np.linspace(margin, nx - 1 - margin, side), np.linspace(margin, ny - 1 - margin, side)
    )
    x = gx.ravel()[:n_stars] + rng.uniform(-0.5, 0.5, n_stars)
    y = gy.ravel()[:n_stars] + rng.uniform(-0.5, 0.5, n_stars)
    flux = rng.uniform(2e4, 1e5, n_stars)
    image = render_stars(shape, x, y, flux, fwhm_at, g1=g1, g2=g2)
    variance = np.full(shape, max(noise, 1.0) ** 2)
    if noise > 0:
        image = image + rng.normal(0.0, noise, shape)
    ra, dec = wcs.all_pix2world(x, y, 0)
    meta = {"EXPID": 1234, "DETECTOR": 7, "FILTER": "r", "MJD-OBS": 60600.25, "EXPTIME": 30.0}
    exposure = Exposure(
        image=image,
        variance=variance,
        mask=np.zeros(shape, dtype=np.int32),
        wcs=wcs,
        psf=psf_model_for(shape, fwhm_at, g1=g1, g2=g2),
        photo_calib=PhotoCalib(njy_per_unit=1.0, zero_point=31.4),
    )
    for key, value in meta.items():
        exposure.metadata[key] = value
    return exposure, {"x": x, "y": y, "ra": ra, "dec": dec, "flux": flux}


def star_positions_in(warp: Exposure, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, ...]:
    """Truth positions in the warp's own pixels (through its WCS)."""
    x, y = warp.wcs.all_world2pix(ra, dec, 0)
    return np.asarray(x), np.asarray(y)


def winpos(image: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm: float) -> tuple[np.ndarray, ...]:
    """Windowed centroids started 0.3 px away from (x, y)."""
    data = np.ascontiguousarray(image, dtype=np.float64)
    sig = np.full(len(x), fwhm / 2.3548)
    xw, yw, flag = sep.winpos(data, x + 0.3, y - 0.25, sig)
    assert np.all(flag == 0)
    return xw, yw


def moments(stamp: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted second moments (xx, yy, xy) about the weighted centroid."""
    n = stamp.shape[0]
    yy, xx = np.mgrid[:n, :n] - n // 2
    cx = cy = 0.0
    for _ in range(10):
        w = stamp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
        cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    w = stamp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    dx, dy = xx - cx, yy - cy
    return np.array([(w * dx * dx).sum(), (w * dy * dy).sum(), (w * dx * dy).sum()]) / w.sum()


def centred_stamp(image: np.ndarray, x: float, y: float, half: int) -> np.ndarray:
    """Stamp with (x, y) resampled onto its central pixel (Lanczos-3)."""
    off = np.arange(-half, half + 1, dtype=np.float64)
    sy, sx = np.meshgrid(y + off, x + off, indexing="ij")
    out, valid = resample_array(np.asarray(image, dtype=np.float64), sx, sy)
    assert valid.all()
    return out


# --------------------------------------------------------------------------
# The pixel mapping
# --------------------------------------------------------------------------
@pytest.mark.parametrize(("rotation", "flip"), [(23.0, False), (90.0, False), (131.0, True)])
def test_interpolated_mapping_matches_exact_wcs(rotation: float, flip: bool) -> None:
    shape = (4096, 4096)
    source = tan_sip_wcs(shape, rotation_deg=rotation, flip=flip)
    target = patch_wcs((4200, 4200), (56.01, -30.005))
    mapping = build_pixel_mapping(source, target, (300, 200, 3600, 3700), grid_step=64)
    rng = np.random.default_rng(3)
    x = rng.uniform(300, 3899, 20000)
    y = rng.uniform(200, 3899, 20000)
    sx, sy, jac = mapping.evaluate(x, y)
    ex, ey = exact_source_pixels(source, target, x, y)
    err = np.hypot(sx - ex, sy - ey)
    assert err.max() < 0.01
    assert mapping.max_error < 0.01
    # The distortion is real: an affine mapping would be off by pixels.
    assert np.ptp(jac) > 1e-4
    # J from the exact mapping by finite differences.
    d = 0.5
    ax, ay = exact_source_pixels(source, target, x[:50] + d, y[:50])
    bx, by = exact_source_pixels(source, target, x[:50] - d, y[:50])
    cx, cy = exact_source_pixels(source, target, x[:50], y[:50] + d)
    dx, dy = exact_source_pixels(source, target, x[:50], y[:50] - d)
    det = ((ax - bx) * (cy - dy) - (cx - dx) * (ay - by)) / (4 * d * d)
    np.testing.assert_allclose(jac[:50], np.abs(det), rtol=1e-5)


def test_mapping_grid_is_refined_until_accurate() -> None:
    # A wide field (0.2 deg detector, strong SIP) with a coarse start must refine itself.
    shape = (4096, 4096)
    source = tan_sip_wcs(shape, rotation_deg=10.0, scale_arcsec=2.0)
    source.sip.a[2, 0] *= 30.0
    target = patch_wcs((4096, 4096), (56.0, -30.0), scale_arcsec=2.0)
    mapping = build_pixel_mapping(source, target, (0, 0, 4096, 4096), grid_step=1024)
    assert mapping.grid_step < 1024
    assert mapping.max_error < 1e-3


# --------------------------------------------------------------------------
# Warps
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rotation", "flip", "source_scale"),
    [(0.0, False, 0.2), (37.0, False, 0.2), (90.0, False, 0.2), (120.0, True, 0.25)],
)
def test_warped_stars_keep_positions_and_fluxes(rotation: float, flip: bool, source_scale: float):
    rng = np.random.default_rng(11)
    shape = (400, 440)
    wcs = tan_sip_wcs(shape, rotation_deg=rotation, flip=flip, scale_arcsec=source_scale)
    calexp, truth = make_calexp(rng, shape, wcs, n_stars=36)
    target = patch_wcs((700, 700), (56.0 + 3 * ARCSEC, -30.0 - 5 * ARCSEC))
    warp = warp_exposure(calexp, target, (0, 0, 700, 700))
    assert warp is not None
    tx, ty = star_positions_in(warp, truth["ra"], truth["dec"])
    # Stars whose whole aperture has data in the warp.
    r_src = 5.0 * 3.5
    r_w = r_src * source_scale / 0.2
    no_data = np.ascontiguousarray(warp.mask_of("NO_DATA"))
    f_w, _, flag = sep.sum_circle(warp.image.astype(np.float64), tx, ty, r_w, mask=no_data)
    inside = flag == 0
    assert inside.sum() >= 16
    fwhm_w = 3.5 * source_scale / 0.2
    xw, yw = winpos(warp.image, tx[inside], ty[inside], fwhm_w)
    rms = np.sqrt(np.mean((xw - tx[inside]) ** 2 + (yw - ty[inside]) ** 2))
    assert rms < 0.02, f"star positions off by {rms:.4f} px rms"
    # Aperture fluxes against the same aperture (in arcsec) on the calexp.
    f_src, _, _ = sep.sum_circle(calexp.image.astype(np.float64), truth["x"], truth["y"], r_src)
    ratio = f_w[inside] / f_src[inside]
    assert np.all(np.abs(ratio - 1.0) < 0.005), f"flux ratios {ratio.min():.4f}..{ratio.max():.4f}"
    # Metadata and calibration carried.
    assert warp.metadata["VISIT"] == 1234 and warp.metadata["DETECTOR"] == 7
    assert warp.metadata["BAND"] == "r" and warp.metadata["MJD-OBS"] == 60600.25
    assert warp.metadata["WARPKERN"] == "lanczos3" and warp.metadata["WARPMERR"] < 0.01
    assert warp.photo_calib == calexp.photo_calib


def test_constant_surface_brightness_stays_constant() -> None:
    # A different pixel scale and SIP distortion: nJy per pixel must follow the pixel area.
    shape = (300, 320)
    wcs = tan_sip_wcs(shape, rotation_deg=17.0, scale_arcsec=0.25)
    wcs.sip.a[2, 0] *= 200.0  # ~1% area variation over the image
    value = 100.0
    calexp = Exposure(
        np.full(shape, value), np.full(shape, 4.0), np.zeros(shape, np.int32), wcs=wcs
    )
    target = patch_wcs((500, 500), (56.0, -30.0))
    warp = warp_exposure(calexp, target, (0, 0, 500, 500))
    good = ~warp.mask_of("NO_DATA")
    yy, xx = np.nonzero(good)
    pick = np.random.default_rng(0).choice(len(xx), 3000, replace=False)
    x, y = xx[pick] + warp.origin[0], yy[pick] + warp.origin[1]
    d = 0.5
    ax, ay = exact_source_pixels(wcs, target, x + d, y)
    bx, by = exact_source_pixels(wcs, target, x - d, y)
    cx, cy = exact_source_pixels(wcs, target, x, y + d)
    dx, dy = exact_source_pixels(wcs, target, x, y - d)
    area = np.abs((ax - bx) * (cy - dy) - (cx - dx) * (ay - by))  # source px per target px
    assert np.ptp(area) > 0.003  # the area really varies
    np.testing.assert_allclose(warp.image[yy[pick], xx[pick]], value * area, rtol=2e-5)
    np.testing.assert_allclose(warp.variance[yy[pick], xx[pick]], 4.0 * area**2, rtol=2e-5)


def test_no_data_outside_crop_and_wcs() -> None:
    shape = (200, 260)
    wcs = tan_sip_wcs(shape, rotation_deg=30.0)
    calexp = Exposure(np.ones(shape), np.ones(shape), np.zeros(shape, np.int32), wcs=wcs)
    target = patch_wcs((1000, 1000), (56.0, -30.0))
    # A target bbox at a non-zero origin of the target frame.
    warp = warp_exposure(calexp, target, (100, 150, 800, 700))
    x0, y0 = warp.origin
    assert x0 >= 100 and y0 >= 150
    assert x0 + warp.shape[1] <= 900 and y0 + warp.shape[0] <= 850
    # The crop is tight: data touches every side.
    good = ~warp.mask_of("NO_DATA")
    assert good[0].any() and good[-1].any() and good[:, 0].any() and good[:, -1].any()
    # The warp's WCS is the target WCS shifted to the crop.
    i, j = np.array([0.0, 17.0, warp.shape[1] - 1.0]), np.array([0.0, 23.0, warp.shape[0] - 1.0])
    a = warp.wcs.all_pix2world(i, j, 0)
    b = target.all_pix2world(i + x0, j + y0, 0)
    np.testing.assert_allclose(a, b, atol=1e-10)
    # Pixels whose source position is outside the calexp are NO_DATA with zeros.
    grid = np.meshgrid(np.arange(warp.shape[1]) + x0, np.arange(warp.shape[0]) + y0)
    sx, sy = exact_source_pixels(wcs, target, *grid)
    outside = (sx < -0.5) | (sx > shape[1] - 0.5) | (sy < -0.5) | (sy > shape[0] - 0.5)
    inside_deep = (sx > 3) & (sx < shape[1] - 4) & (sy > 3) & (sy < shape[0] - 4)
    assert outside.any()
    assert warp.mask_of("NO_DATA")[outside].all()
    assert not warp.mask_of("NO_DATA")[inside_deep].any()
    assert np.all(warp.image[outside] == 0) and np.all(warp.variance[outside] == 0)
    # Far away: no overlap at all.
    far = patch_wcs((100, 100), (57.0, -30.0))
    assert warp_exposure(calexp, far, (0, 0, 100, 100)) is None


def test_warp_does_not_depend_on_the_target_bbox() -> None:
    # A tiny target bbox inside the calexp (fewer nodes than a cubic spline needs) gives
    # the same pixels as the big warp; an exposure without PSF gives a warp without PSF.
    rng = np.random.default_rng(9)
    shape = (300, 300)
    wcs = tan_sip_wcs(shape, rotation_deg=71.0)
    calexp, _ = make_calexp(rng, shape, wcs, n_stars=9, noise=5.0)
    calexp.psf = None
    target = patch_wcs((600, 600), (56.0, -30.0))
    big = warp_exposure(calexp, target, (0, 0, 600, 600))
    assert big.psf is None
    for bbox in [(300, 310, 7, 3), (250, 260, 1, 1), (280, 200, 40, 64)]:
        small = warp_exposure(calexp, target, bbox)
        assert small.origin == bbox[:2] and small.shape == (bbox[3], bbox[2])
        ys = slice(bbox[1] - big.origin[1], bbox[1] - big.origin[1] + bbox[3])
        xs = slice(bbox[0] - big.origin[0], bbox[0] - big.origin[0] + bbox[2])
        # Equal up to the kernel's phase tabulation (1/4096 px): noise sigma 5, atol 0.02.
        np.testing.assert_allclose(small.image, big.image[ys, xs], rtol=1e-4, atol=0.02)
        np.testing.assert_array_equal(small.mask, big.mask[ys, xs])


def test_identity_warp_is_exact_and_keeps_masks() -> None:
    # Same WCS, big-endian input at a non-zero origin: Lanczos at integer positions is the identity.
    rng = np.random.default_rng(5)
    shape = (120, 150)
    wcs = tan_sip_wcs(shape, rotation_deg=12.0)
    image = rng.normal(size=shape).astype(">f4")
    planes = MaskPlanes()
    mask = np.zeros(shape, np.int32)
    mask[60, 70] = planes.bitmask("CR")
    mask[:, 40] |= planes.bitmask("BAD")
    calexp = Exposure(image, np.ones(shape, ">f4"), mask, wcs=wcs, origin=(1000, 2000))
    warp = warp_exposure(calexp, wcs, (0, 0, shape[1], shape[0]))
    # Lanczos-3 needs source pixels floor-2 .. floor+3: 2 or 3 pixels lost per side.
    x0, y0 = warp.origin
    assert x0 in (2, 3) and y0 in (2, 3)
    assert shape[1] - 6 <= warp.shape[1] <= shape[1] - 4
    assert shape[0] - 6 <= warp.shape[0] <= shape[0] - 4
    inner = (slice(y0, y0 + warp.shape[0]), slice(x0, x0 + warp.shape[1]))
    good = ~warp.mask_of("NO_DATA")
    assert good[3 - y0 : shape[0] - 3 - y0, 3 - x0 : shape[1] - 3 - x0].all()
    np.testing.assert_allclose(warp.image[good], image[inner][good], atol=1e-5)
    cr = warp.mask_of("CR")
    assert cr.sum() == 1 and cr[60 - y0, 70 - x0]
    # BAD grows over the whole resampling kernel (Lanczos-3: +-3 columns, here +-2 with weight).
    bad_cols = np.flatnonzero(warp.mask_of("BAD").all(axis=0)) + x0
    assert 40 in bad_cols and set(bad_cols) <= set(range(37, 44))
    assert len(bad_cols) >= 5


def test_mask_planes_propagate_through_rotation() -> None:
    shape = (200, 200)
    wcs = tan_sip_wcs(shape, rotation_deg=33.0)
    planes = MaskPlanes()
    mask = np.zeros(shape, np.int32)
    mask[100, 90] = planes.bitmask("CR")
    mask[20:40, 150:170] = planes.bitmask("NO_DATA")
    image = np.ones(shape)
    image[150, 60] = np.nan  # a non-finite pixel must not spread: it becomes BAD
    calexp = Exposure(image, np.ones(shape), mask, wcs=wcs)
    target = patch_wcs((400, 400), (56.0, -30.0))
    warp = warp_exposure(calexp, target, (0, 0, 400, 400))
    # CR: the 2x2 bilinear footprint around the pixel's image in the warp.
    ra, dec = wcs.all_pix2world([90.0], [100.0], 0)
    cx, cy = (v[0] for v in warp.wcs.all_world2pix(ra, dec, 0))
    ys, xs = np.nonzero(warp.mask_of("CR"))
    assert 1 <= len(xs) <= 4
    assert np.all(np.hypot(xs - cx, ys - cy) < 1.5)
    # Interior NO_DATA: every warp pixel mapping into the block (grown by the kernel) is NO_DATA.
    ra, dec = wcs.all_pix2world([160.0], [30.0], 0)
    bx, by = (round(float(v[0])) for v in warp.wcs.all_world2pix(ra, dec, 0))
    assert warp.mask_of("NO_DATA")[by - 6 : by + 7, bx - 6 : bx + 7].all()
    assert np.isfinite(warp.image).all() and np.isfinite(warp.variance).all()
    ra, dec = wcs.all_pix2world([60.0], [150.0], 0)
    nx_, ny_ = (float(v[0]) for v in warp.wcs.all_world2pix(ra, dec, 0))
    ys, xs = np.nonzero(warp.mask_of("BAD"))
    assert 16 <= len(xs) <= 49 and np.all(np.hypot(xs - nx_, ys - ny_) < 4.5)


def test_agrees_with_reproject() -> None:
    """Same image through reproject_interp (bicubic, exact WCS on every pixel) times the
    pixel-area ratio. Metric: max |ours - reproject| / star peak over the interior."""
    rng = np.random.default_rng(2)
    shape = (256, 256)
    wcs = tan_sip_wcs(shape, rotation_deg=41.0, scale_arcsec=0.22)
    calexp, _ = make_calexp(rng, shape, wcs, n_stars=16, fwhm_at=lambda x, y: 4.0)
    target = patch_wcs((360, 360), (56.0, -30.0))
    warp = warp_exposure(calexp, target, (0, 0, 360, 360))
    out_wcs = warp.wcs
    ref, footprint = reproject_interp(
        (calexp.image.astype(np.float64), wcs), out_wcs, shape_out=warp.shape, order="bicubic"
    )
    ny, nx = warp.shape
    yy, xx = np.mgrid[:ny, :nx]
    mapping = build_pixel_mapping(wcs, target, (*warp.origin, nx, ny))
    _, _, area = mapping.evaluate(xx + warp.origin[0], yy + warp.origin[1])
    ok = (footprint > 0) & ~warp.mask_of("NO_DATA")
    diff = np.abs(warp.image - ref * area)[ok]
    peak = warp.image.max()
    assert diff.max() / peak < 0.01
    assert np.sqrt(np.mean(diff**2)) / peak < 5e-4


def test_variance_predicts_aperture_noise() -> None:
    # Pure noise of known variance: the warped variance plane predicts the noise of
    # aperture sums (the resampling's covariance adds back), and WARPVCOR the
    # per-pixel noise.
    rng = np.random.default_rng(8)
    shape = (600, 600)
    wcs = tan_sip_wcs(shape, rotation_deg=27.0, scale_arcsec=0.2)
    sigma = 3.0
    calexp = Exposure(
        rng.normal(0, sigma, shape), np.full(shape, sigma**2), np.zeros(shape, np.int32), wcs=wcs
    )
    target = patch_wcs((900, 900), (56.0, -30.0))
    warp = warp_exposure(calexp, target, (0, 0, 900, 900))
    good = ~warp.mask_of("NO_DATA")
    cx, cy = warp.shape[1] / 2, warp.shape[0] / 2
    gx, gy = np.meshgrid(np.arange(cx - 180, cx + 181, 20), np.arange(cy - 180, cy + 181, 20))
    sums, _, _ = sep.sum_circle(warp.image.astype(np.float64), gx.ravel(), gy.ravel(), 8.0)
    pred, _, _ = sep.sum_circle(warp.variance.astype(np.float64), gx.ravel(), gy.ravel(), 8.0)
    ratio = np.var(sums) / np.mean(pred)
    n = sums.size
    assert abs(ratio - 1.0) < 4.0 * np.sqrt(2.0 / n), ratio
    pixel_ratio = np.var(warp.image[good]) / np.mean(warp.variance[good])
    assert abs(pixel_ratio - warp.metadata["WARPVCOR"]) < 0.03
    assert pixel_ratio < 0.95  # the resampled noise is correlated


@pytest.mark.parametrize(("rotation", "flip"), [(0.0, False), (62.0, False), (90.0, True)])
def test_warp_psf_matches_warped_stars(rotation: float, flip: bool) -> None:
    # An elliptical PSF whose size varies: the warp's PsfModel must follow the
    # rotation/flip and the pixel-scale change.
    rng = np.random.default_rng(21)
    shape = (480, 480)
    wcs = tan_sip_wcs(shape, rotation_deg=rotation, flip=flip, scale_arcsec=0.24)

    def fwhm_at(x: float, y: float) -> float:
        return 3.0 + 0.6 * x / shape[1]

    calexp, truth = make_calexp(rng, shape, wcs, n_stars=25, fwhm_at=fwhm_at, g1=0.12, g2=-0.05)
    target = patch_wcs((700, 700), (56.0, -30.0))
    warp = warp_exposure(calexp, target, (0, 0, 700, 700))
    tx, ty = star_positions_in(warp, truth["ra"], truth["dec"])
    half = 12
    checked = 0
    for x, y in zip(tx, ty, strict=True):
        if not (30 < x < warp.shape[1] - 30 and 30 < y < warp.shape[0] - 30):
            continue
        star = centred_stamp(warp.image, x, y, half)
        model = warp.psf.kernel_at(x, y)
        c = model.shape[0] // 2
        model = model[c - half : c + half + 1, c - half : c + half + 1]
        scale = star.sum() / model.sum()
        resid = np.sqrt(((star - scale * model) ** 2).sum() / (star**2).sum())
        assert resid < 0.03, f"PSF model residual {resid:.3f} at ({x:.0f}, {y:.0f})"
        ms, mm = moments(star, 2.5), moments(model, 2.5)
        np.testing.assert_allclose(ms, mm, atol=0.02 * ms[:2].mean())
        checked += 1
    assert checked >= 10

    # The ellipticity really turned with the sky (and flipped): the model's follows the
    # exact local Jacobian, M_warp = A M_source A^T with A = d(warp)/d(source).
    def ellipticity(m: np.ndarray) -> np.ndarray:
        return np.array([m[0] - m[1], 2 * m[2]]) / (m[0] + m[1])

    m_src = moments(calexp.psf.kernel_at(240, 240)[8:-8, 8:-8], 2.5)
    ra, dec = wcs.all_pix2world([240.0], [240.0], 0)
    wx, wy = (float(v[0]) for v in warp.wcs.all_world2pix(ra, dec, 0))
    m_w = moments(warp.psf.kernel_at(wx, wy)[8:-8, 8:-8], 2.5)
    ox, oy = warp.origin
    d = 0.5
    px = np.array([wx + d, wx - d, wx, wx]) + ox
    py = np.array([wy, wy, wy + d, wy - d]) + oy
    sx, sy = exact_source_pixels(wcs, target, px, py)
    jac = np.array([[sx[0] - sx[1], sx[2] - sx[3]], [sy[0] - sy[1], sy[2] - sy[3]]]) / (2 * d)
    inv = np.linalg.inv(jac)
    cov = inv @ np.array([[m_src[0], m_src[2]], [m_src[2], m_src[1]]]) @ inv.T
    expected = ellipticity(np.array([cov[0, 0], cov[1, 1], cov[0, 1]]))
    # Windowed moments are not covariant: compare the direction (within 1.5 deg of
    # position angle) and, loosely, the size of the ellipticity.
    e_w = ellipticity(m_w)
    angle = np.angle(complex(*e_w) / complex(*expected))
    assert abs(angle) < np.deg2rad(3.0), np.rad2deg(angle) / 2
    assert 0.8 < np.hypot(*e_w) / np.hypot(*expected) < 1.2
    if rotation or flip:  # the test means something: the ellipticity did turn
        assert np.hypot(*(expected - ellipticity(m_src))) > 0.05


def test_spline3_kernel_option_agrees_with_lanczos() -> None:
    rng = np.random.default_rng(4)
    shape = (200, 200)
    wcs = tan_sip_wcs(shape, rotation_deg=50.0)
    calexp, _ = make_calexp(rng, shape, wcs, n_stars=9, fwhm_at=lambda x, y: 4.0)
    target = patch_wcs((300, 300), (56.0, -30.0))
    a = warp_exposure(calexp, target, (0, 0, 300, 300))
    b = warp_exposure(calexp, target, (0, 0, 300, 300), kernel="spline3")
    assert b.metadata["WARPKERN"] == "spline3"
    # Spline-3 needs a narrower footprint: its crop is a little larger.
    dx, dy = a.origin[0] - b.origin[0], a.origin[1] - b.origin[1]
    assert 0 <= dx <= 2 and 0 <= dy <= 2
    b_on_a = (slice(dy, dy + a.shape[0]), slice(dx, dx + a.shape[1]))
    ok = ~(a.mask_of("NO_DATA") | b.mask_of("NO_DATA")[b_on_a])
    diff = np.abs(a.image - b.image[b_on_a])[ok]
    assert diff.max() < 0.01 * a.image.max()
    with pytest.raises(ValueError, match="unknown warping kernel"):
        warp_exposure(calexp, target, (0, 0, 300, 300), kernel="sinc")


# --------------------------------------------------------------------------
# Model PSF and PSF matching
# --------------------------------------------------------------------------
def test_model_psf_is_an_lsst_double_gaussian() -> None:
    psf = model_psf(4.0)
    k = psf.kernel_at(0, 0)
    assert k.shape[0] % 2 == 1 and abs(k.sum() - 1) < 1e-12
    assert abs(fwhm_of_image(k) / 4.0 - 1) < 0.01
    np.testing.assert_allclose(k, k.T)
    np.testing.assert_allclose(k, k[::-1])
    core = model_psf(4.0, 41, core_fwhm=True).kernel_at(0, 0)
    assert core.shape == (41, 41)
    assert fwhm_of_image(core) > 4.0 * 1.03  # the wing widens LSST's core-FWHM model
    with pytest.raises(ValueError):
        model_psf(4.0, 40)


def _varying_calexp(rng: np.random.Generator, shape: tuple[int, int], **kwargs):
    def fwhm_at(x: float, y: float) -> float:
        return 2.8 + 0.5 * x / shape[1] + 0.3 * y / shape[0]

    wcs = tan_sip_wcs(shape, rotation_deg=20.0)
    return make_calexp(rng, shape, wcs, fwhm_at=fwhm_at, **kwargs)


def test_psf_matched_stars_have_the_model_psf() -> None:
    rng = np.random.default_rng(31)
    shape = (600, 640)
    calexp, truth = _varying_calexp(rng, shape, n_stars=36, margin=45)
    model = model_psf(4.4, 41)
    matched = psf_match_exposure(calexp, model, grid_spacing=200)
    assert matched.psf is model
    assert matched.metadata["PSFMATCH"] is True
    m_kernel = model.kernel_at(0, 0)
    fwhm_model = fwhm_of_image(m_kernel)
    mom_model = moments(m_kernel[8:-8, 8:-8], 3.0)
    half = 12
    f_in, _, _ = sep.sum_circle(calexp.image.astype(np.float64), truth["x"], truth["y"], 18.0)
    f_out, _, _ = sep.sum_circle(matched.image.astype(np.float64), truth["x"], truth["y"], 18.0)
    fwhm_in = []
    for x, y in zip(truth["x"], truth["y"], strict=True):
        star = centred_stamp(matched.image, x, y, half)
        assert abs(fwhm_of_image(star) / fwhm_model - 1) < 0.02
        np.testing.assert_allclose(moments(star, 3.0), mom_model, atol=0.02 * mom_model[0])
        fwhm_in.append(fwhm_of_image(centred_stamp(calexp.image, x, y, half)))
    assert np.ptp(fwhm_in) > 0.4  # the input PSF did vary
    np.testing.assert_allclose(f_out / f_in, 1.0, atol=0.005)


def test_psf_matching_refuses_a_narrower_model() -> None:
    rng = np.random.default_rng(32)
    calexp, _ = _varying_calexp(rng, (300, 300), n_stars=4)
    # FWHM 2.8..3.6 px across the image: a 3.3 px model is too narrow in one corner.
    with pytest.raises(PsfMatchingError, match="narrower than the exposure's PSF"):
        psf_match_exposure(calexp, model_psf(3.3), grid_spacing=150)
    # An elongated PSF wider than the model along one axis cannot be matched either.
    wcs = tan_sip_wcs((200, 200))
    elongated, _ = make_calexp(rng, (200, 200), wcs, n_stars=4, g1=0.35, fwhm_at=lambda x, y: 3.0)
    with pytest.raises(PsfMatchingError):
        psf_match_exposure(elongated, model_psf(3.3))


def test_a_wide_model_needs_its_own_kernel_size() -> None:
    # LSST's rejection model (7.7 px) is much wider than a sharp calexp PSF kept in a
    # 41-pixel box: cut to that box its wing is lost and no kernel can match it, so
    # the warp step builds the model at its own size (+-3.5 wing sigma).
    from workflow_lib.static_sky.psf_matching import fit_matching_kernels

    psf = PsfModel.constant(moffat(4.2).drawImage(nx=41, ny=41, scale=1.0).array)
    natural = model_psf(7.7)
    assert natural.size > 41
    assert fit_matching_kernels(psf, natural, (200, 200)).residuals.max() < 0.005
    with pytest.raises(PsfMatchingError, match="cannot be matched"):
        fit_matching_kernels(psf, model_psf(7.7, 41), (200, 200))


def test_psf_matching_propagates_variance_and_masks() -> None:
    rng = np.random.default_rng(33)
    shape = (400, 400)
    calexp, _ = _varying_calexp(rng, shape, n_stars=1)
    sigma = 2.0
    calexp.image[:] = rng.normal(0.0, sigma, shape)
    calexp.variance[:] = sigma**2
    calexp.set_mask("CR", np.pad(np.ones((1, 1), bool), ((200, 199), (150, 249))))
    dead = np.zeros(shape, bool)
    dead[300:310, 280:290] = True
    calexp.set_mask("NO_DATA", dead)
    calexp.image[dead] = 0.0
    matched = psf_match_exposure(calexp, model_psf(4.5), grid_spacing=200)
    grow, edge = matched.metadata["PSFMGROW"], matched.metadata["PSFMEDGE"]
    assert 2 <= grow <= edge <= 20
    good = ~matched.mask_of("NO_DATA")
    assert not good[:edge].any() and not good[:, -edge:].any()
    hole = ~good[edge:-edge, edge:-edge]
    ys, xs = np.nonzero(hole)
    assert (ys.min() + edge, ys.max() + edge) == (300 - edge, 309 + edge)
    assert (xs.min() + edge, xs.max() + edge) == (280 - edge, 289 + edge)
    assert hole.sum() == (10 + 2 * edge) ** 2
    # Per-pixel variance of convolved white noise is sigma^2 sum K^2: the plane says so.
    ratio = np.var(matched.image[good]) / np.mean(matched.variance[good])
    assert abs(ratio - 1.0) < 0.05
    assert np.mean(matched.variance[good]) < 0.5 * sigma**2
    cr = matched.mask_of("CR")
    ys, xs = np.nonzero(cr)
    assert cr.sum() == (2 * grow + 1) ** 2 and ys.min() == 200 - grow and xs.min() == 150 - grow
    # A repaired (interpolated) defect holds sky: its bits spread over the kernel's core
    # only; an unrepaired one over the 95% box.
    hot = np.zeros(shape, bool)
    hot[100, 100] = hot[100, 300] = True
    calexp.set_mask("BAD", hot)
    calexp.set_mask("INTRP", hot & (np.arange(shape[1]) < 200)[None, :])
    again = psf_match_exposure(calexp, model_psf(4.5), grid_spacing=200)
    core = again.metadata["PSFMGRWI"]
    assert 0 < core < grow
    bad = again.mask_of("BAD")
    assert bad[:, :200].sum() == (2 * core + 1) ** 2
    assert bad[:, 200:].sum() == (2 * grow + 1) ** 2
    assert again.mask_of("INTRP").sum() == (2 * core + 1) ** 2
    np.testing.assert_array_equal(again.mask_of("CR"), cr)


def test_warp_of_psf_matched_exposure_carries_the_model() -> None:
    rng = np.random.default_rng(34)
    calexp, _ = _varying_calexp(rng, (300, 300), n_stars=9, margin=50)
    model = model_psf(4.4, 41)
    matched = psf_match_exposure(calexp, model, grid_spacing=150)
    target = patch_wcs((500, 500), (56.0, -30.0))
    warp = warp_exposure(matched, target, (0, 0, 500, 500))
    k = warp.psf.kernel_at(warp.shape[1] / 2, warp.shape[0] / 2)
    assert abs(fwhm_of_image(k) / fwhm_of_image(model.kernel_at(0, 0)) - 1) < 0.01
    assert warp.metadata["PSFMATCH"] is True and warp.metadata["VISIT"] == 1234


def test_warp_carries_the_inputs_aperture_correction_at_its_centre() -> None:
    # The calexp's correction map (a gradient across the CCD) becomes one number per
    # warp: its value at the calexp pixel under the warp's centre. Its map cards, in
    # the calexp's pixel frame, do not travel; nor does it survive PSF matching.
    from workflow_lib.single_frame.measure import ApertureCorrection

    rng = np.random.default_rng(41)
    shape = (300, 300)
    wcs = tan_sip_wcs(shape, rotation_deg=33.0)
    calexp, _ = make_calexp(rng, shape, wcs, n_stars=9, noise=5.0)
    apcorr = ApertureCorrection(
        coefficients=np.array([1.02, 0.01, -0.004]),
        covariance=np.zeros((3, 3)),
        order=1,
        x_center=149.5,
        y_center=149.5,
        x_scale=150.0,
        y_scale=150.0,
        n_used=20,
        scatter=0.002,
        used=np.zeros(0, dtype=bool),
    )
    for key, value, comment in apcorr.to_cards():
        calexp.metadata[key] = (value, comment)
    back = ApertureCorrection.from_header(calexp.metadata)
    np.testing.assert_array_equal(back.coefficients, apcorr.coefficients)
    target = patch_wcs((600, 600), (56.0, -30.0))
    for bbox in [(0, 0, 600, 600), (250, 260, 40, 30)]:
        warp = warp_exposure(calexp, target, bbox)
        x0, y0 = warp.origin
        ny, nx = warp.shape
        ra, dec = target.all_pix2world([x0 + (nx - 1) / 2.0], [y0 + (ny - 1) / 2.0], 0)
        sx, sy = wcs.all_world2pix(ra, dec, 0)
        expected = apcorr.ratio_at(np.clip(sx, 0, 299), np.clip(sy, 0, 299))[0][0]
        assert warp.metadata["APCORR"] == pytest.approx(expected, rel=1e-12)
        assert "APCORD" not in warp.metadata and "APC0" not in warp.metadata
    small, big = (
        warp_exposure(calexp, target, b).metadata["APCORR"]
        for b in [(250, 260, 40, 30), (0, 0, 600, 600)]
    )
    assert small != pytest.approx(big, abs=1e-4)  # the gradient is seen
    matched = psf_match_exposure(calexp, model_psf(5.0, 41), grid_spacing=150)
    assert ApertureCorrection.from_header(matched.metadata) is None
    assert "APCORR" not in warp_exposure(matched, target, (0, 0, 600, 600)).metadata
    assert ApertureCorrection.from_header(fits.Header({"EXPID": 1})) is None


def test_warp_keeps_hierarch_cards_without_warnings() -> None:
    import warnings

    rng = np.random.default_rng(43)
    shape = (120, 120)
    calexp, _ = make_calexp(rng, shape, tan_sip_wcs(shape), n_stars=4, noise=5.0)
    calexp.metadata["HIERARCH ISR C10 RDNOISE"] = (4.5, "read noise of amplifier C10")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warp = warp_exposure(calexp, patch_wcs((300, 300), (56.0, -30.0)), (0, 0, 300, 300))
    assert warp.metadata["ISR C10 RDNOISE"] == 4.5
    assert warp.metadata.comments["ISR C10 RDNOISE"] == "read noise of amplifier C10"
