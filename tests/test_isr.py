"""ISR numerics on seeded synthetic data (workflow_lib.single_frame: isr, cosmic_rays).

Raw amplifiers are built here from electron images with known gain, bias,
row jitter and read noise (big-endian on purpose); stars are drawn with
GalSim using Kolmogorov and Moffat profiles, cosmic rays with the
simulator's track model. Assertions are statistical, with error budgets.
"""

from __future__ import annotations

import galsim
import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage

from workflow_lib.core.registry import parse_section
from workflow_lib.sim.instrument import add_cosmic_rays
from workflow_lib.single_frame.cosmic_rays import detect_cosmic_rays, interpolate_masked
from workflow_lib.single_frame.isr import (
    MasterCalib,
    UnprocessableExposure,
    eimage_exposure,
    measure_overscan,
    process_amplifiers,
    run_isr,
)
from workflow_lib.single_frame.master_calibs import build_master_dark

GAINS = (1.2, 1.6, 0.9, 1.4)
READ_NOISE = (5.0, 6.0, 7.0, 4.5)
BIAS = (1000.0, 1500.0, 20000.0, 800.0)
SATURATE_E = 9.0e4


def _robust_sigma(x: np.ndarray) -> float:
    q25, q75 = np.percentile(x, [25, 75])
    return float((q75 - q25) / 1.349)


def make_raw(
    electrons: np.ndarray,
    rng: np.random.Generator,
    *,
    jitter: float = 3.0,
    overscan: int = 16,
    big_endian: bool = True,
) -> tuple[fits.Header, list[tuple[np.ndarray, fits.Header]]]:
    """Read an (ny, nx) electron image out through 4 amplifiers (2x2, LSST-like flips)."""
    ny, nx = electrons.shape
    hy, hx = ny // 2, nx // 2
    pre = 4
    amps = []
    for row in (0, 1):
        for col in (0, 1):
            k = 2 * row + col
            seg = electrons[row * hy : (row + 1) * hy, col * hx : (col + 1) * hx]
            xf, yf = (col == 1) if row == 0 else (col == 0), row == 1
            seg = seg[:, ::-1] if xf else seg
            seg = seg[::-1, :] if yf else seg
            raw = np.zeros((hy, pre + hx + overscan))
            raw[:, pre : pre + hx] = seg / GAINS[k]
            raw += rng.normal(0.0, READ_NOISE[k] / GAINS[k], raw.shape)
            raw += BIAS[k] + rng.normal(0.0, jitter, hy)[:, None]
            sat = float(np.floor(BIAS[k] + SATURATE_E / GAINS[k]))
            data = np.clip(np.rint(raw), 0, sat).astype(">i4" if big_endian else "<i4")
            x1, x2, y1, y2 = col * hx + 1, (col + 1) * hx, row * hy + 1, (row + 1) * hy
            x1, x2 = (x2, x1) if xf else (x1, x2)
            y1, y2 = (y2, y1) if yf else (y1, y2)
            detsec = f"[{x1}:{x2},{y1}:{y2}]"
            header = fits.Header()
            header.update(
                EXTNAME=f"C{row}{col}",
                DATASEC=f"[{pre + 1}:{pre + hx},1:{hy}]",
                BIASSEC=f"[{pre + hx + 1}:{pre + hx + overscan},1:{hy}]",
                DETSEC=detsec,
                GAIN=GAINS[k],
                RDNOISE=READ_NOISE[k],
                SATURATE=sat,
            )
            amps.append((data, header))
    return _primary(), amps


def _primary(**cards: object) -> fits.Header:
    h = fits.Header()
    base = {
        "OBSTYPE": "science",
        "EXPID": 1,
        "DETECTOR": 0,
        "FILTER": "r",
        "EXPTIME": 30.0,
        "MJD-OBS": 60640.0,
        "RA": 56.0,
        "DEC": -31.0,
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CRVAL1": 56.0,
        "CRVAL2": -31.0,
        "CRPIX1": 64.0,
        "CRPIX2": 64.0,
        "CD1_1": -5.5e-5,
        "CD1_2": 0.0,
        "CD2_1": 0.0,
        "CD2_2": 5.5e-5,
    }
    base.update(cards)
    for key, value in base.items():
        h[key] = value
    return h


def _star_field(
    shape: tuple[int, int], rng: np.random.Generator, *, n: int, profile: galsim.GSObject
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Expected e- of ``n`` stars of ``profile`` (pixel scale 1); their x, y, flux."""
    img = galsim.ImageF(shape[1], shape[0], scale=1.0)
    x = rng.uniform(12, shape[1] - 12, n)
    y = rng.uniform(12, shape[0] - 12, n)
    flux = 10 ** rng.uniform(3.5, 5.7, n)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        stamp = profile.withFlux(float(fi)).drawImage(
            nx=41, ny=41, scale=1.0, center=galsim.PositionD(xi + 1, yi + 1)
        )
        b = stamp.bounds & img.bounds
        img[b] += stamp[b]
    return img.array.astype(np.float64), x, y, flux


# ------------------------------------------------------------------ overscan
def test_overscan_removes_row_jitter_and_smooths_quiet_amplifiers():
    rng = np.random.default_rng(11)
    sky = np.full((256, 128), 500.0)
    electrons = rng.poisson(sky).astype(float)
    _, amps = make_raw(electrons, rng, jitter=4.0)
    data, header = amps[0]
    datasec, biassec = parse_section(header["DATASEC"]), parse_section(header["BIASSEC"])
    jittery = measure_overscan(data, biassec, datasec)
    assert jittery.mode == "row" and jittery.row_weight > 0.8
    assert jittery.noise == pytest.approx(READ_NOISE[0] / GAINS[0], rel=0.1)
    _, quiet_amps = make_raw(electrons, rng, jitter=0.0)
    quiet = measure_overscan(quiet_amps[0][0], biassec, datasec)
    assert quiet.row_weight < 0.35
    # Short overscan: one constant.
    short = parse_section(f"[{biassec.x.start + 1}:{biassec.x.start + 2},1:{datasec.shape[0]}]")
    assert measure_overscan(data, short, datasec).mode == "constant"

    frame = process_amplifiers(amps)
    # Row means of each amplifier: scatter consistent with white noise (jitter gone).
    for amp in frame.amps:
        seg = frame.image[amp.slices] - 500.0
        rows = seg.mean(axis=1)
        expected = np.sqrt(500.0 + amp.read_noise**2) / np.sqrt(seg.shape[1])
        n_over = 16
        expected = np.hypot(expected, amp.read_noise / np.sqrt(n_over))  # overscan noise
        assert np.std(rows) < 1.3 * expected, amp.name
        assert abs(np.mean(seg)) < 5 * expected
        assert amp.read_noise_measured == pytest.approx(amp.read_noise, rel=0.1)


def test_saturation_judged_on_raw_value_and_kept_after_interpolation():
    rng = np.random.default_rng(5)
    electrons = rng.poisson(np.full((128, 128), 300.0)).astype(float)
    electrons[40:44, 20] = 2.0e5  # over full scale
    electrons[90, 100] = 2.0e5
    _, amps = make_raw(electrons, rng)
    res = run_isr(
        _primary(), amps, bias=None, dark=None, flat=None, defects=None, cosmic_rays=False
    )
    exp = res.exposure
    sat = exp.mask_of("SAT")
    assert sat[40:44, 20].all() and sat[90, 100]
    assert sat[39, 20] and sat[44, 20] and sat[90, 101]  # grown by one pixel
    assert sat.sum() <= 4 * 3 + 6 + 9 + 2
    assert exp.mask_of("INTRP")[sat].all()
    # Interpolated from the sky around: no trace of the saturated value.
    assert np.all(np.abs(exp.image[sat] - 300.0) < 100.0)
    assert res.stats["n_saturated"] == sat.sum()


# ------------------------------------------------------------------ full ISR
def test_variance_plane_matches_pixel_scatter_with_flat_and_dark():
    rng = np.random.default_rng(21)
    shape = (200, 160)
    xx = np.mgrid[: shape[0], : shape[1]][1]
    flat = (0.8 + 0.4 * xx / shape[1]).astype(np.float32)
    flat /= np.median(flat)
    dark_rate = np.full(shape, 2.0, np.float32)
    darktime = 40.0
    sky = 800.0
    electrons = rng.poisson(sky * flat) + rng.poisson(dark_rate * darktime)
    _, amps = make_raw(electrons.astype(float), rng)
    no = np.zeros(shape, bool)
    masters = dict(
        bias=MasterCalib("bias", np.zeros(shape, np.float32), np.zeros(shape, np.float32), no, 9),
        dark=MasterCalib("dark", dark_rate, np.zeros(shape, np.float32), no, 9),
        flat=MasterCalib("flat", flat, np.zeros(shape, np.float32), no, 9, band="r"),
    )
    res = run_isr(_primary(DARKTIME=darktime), amps, defects=None, cosmic_rays=False, **masters)
    exp = res.exposure
    assert exp.image.dtype == np.float32 and exp.image.shape == shape
    pull = (exp.image - sky) / np.sqrt(exp.variance)
    # The flat makes the raw noise vary by 50% across the image: the pull must not.
    for cols in (slice(0, 40), slice(120, 160)):
        p = pull[:, cols].ravel()
        assert abs(np.median(p)) < 5 * 1.25 / np.sqrt(p.size)
        assert 0.95 < _robust_sigma(p) < 1.05
    assert np.all(exp.variance > 0)
    assert res.steps["bias"].startswith("done") and res.steps["flat"].startswith("done")
    assert exp.metadata["ISR_DARK"].startswith("done")
    assert exp.metadata["BUNIT"] == "electron"
    assert exp.wcs is not None


def test_missing_calibrations_are_skipped_and_recorded():
    rng = np.random.default_rng(3)
    electrons = rng.poisson(np.full((64, 64), 100.0)).astype(float)
    _, amps = make_raw(electrons, rng)
    res = run_isr(_primary(), amps, bias=None, dark=None, flat=None, defects=None)
    for step, card in (
        ("bias", "ISR_BIAS"),
        ("dark", "ISR_DARK"),
        ("flat", "ISR_FLAT"),
        ("defects", "ISR_DEFS"),
    ):
        assert res.steps[step].startswith("skipped: no ")
        assert res.exposure.metadata[card] == res.steps[step]
    assert res.exposure.metadata["ISR_BIAS"] == "skipped: no master bias"
    assert res.steps["cosmic_rays"].startswith("done")
    # Shape mismatch of a master is a clear error.
    wrong = MasterCalib(
        "bias",
        np.zeros((10, 10), np.float32),
        np.zeros((10, 10), np.float32),
        np.zeros((10, 10), bool),
        1,
    )
    with pytest.raises(ValueError, match="master bias is"):
        run_isr(_primary(), amps, bias=wrong, dark=None, flat=None, defects=None)


def test_unprocessable_exposures_raise_a_named_error():
    rng = np.random.default_rng(4)
    _, amps = make_raw(np.zeros((32, 32)), rng)
    nan_amps = [(np.full(d.shape, np.nan), h) for d, h in amps]
    with pytest.raises(UnprocessableExposure, match="NaN"):
        run_isr(_primary(), nan_amps, bias=None, dark=None, flat=None, defects=None)
    sat_amps = [(np.full(d.shape, h["SATURATE"]), h) for d, h in amps]
    with pytest.raises(UnprocessableExposure, match="saturated"):
        run_isr(_primary(), sat_amps, bias=None, dark=None, flat=None, defects=None)
    with pytest.raises(UnprocessableExposure, match="NaN"):
        eimage_exposure(np.full((16, 16), np.nan, np.float32), _primary(GAIN=1.0))
    assert issubclass(UnprocessableExposure, ValueError)


# -------------------------------------------------------------- cosmic rays
@pytest.mark.parametrize(
    "profile",
    [galsim.Kolmogorov(fwhm=2.3), galsim.Moffat(beta=2.5, fwhm=3.2)],
    ids=["kolmogorov-2.3px", "moffat-3.2px"],
)
def test_cosmic_rays_found_and_stars_spared(profile):
    rng = np.random.default_rng(8)
    shape = (384, 448)
    stars, x, y, _ = _star_field(shape, rng, n=120, profile=profile)
    electrons = rng.poisson(stars + 600.0).astype(np.float64)
    truth = add_cosmic_rays(electrons, rng, rate=4e-5, darktime=30.0)
    res = eimage_exposure(electrons.astype(">f4"), _primary(GAIN=1.0), read_noise=4.0)
    found = res.exposure.mask_of("CR")
    assert truth.sum() > 500
    assert (found & truth).sum() / truth.sum() > 0.9
    near_truth = ndimage.binary_dilation(truth, structure=np.ones((3, 3)))
    assert (found & ~near_truth).sum() < 0.02 * found.sum() + 3
    # No star core is called a cosmic ray (unless a true one lands nearby).
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    core = np.zeros(shape, bool)
    core[iy, ix] = True
    near3 = ndimage.binary_dilation(truth, structure=np.ones((3, 3)), iterations=3)
    core = ndimage.binary_dilation(core, iterations=2) & ~near3
    assert (found & core).sum() == 0
    # CR pixels are repaired: close to the expected scene.
    rep = found & truth
    resid = (res.exposure.image - stars - 600.0)[rep] / np.sqrt(stars[rep] + 600.0)
    assert np.median(np.abs(resid)) < 3.0
    assert res.exposure.mask_of("INTRP")[found].all()


def test_cosmic_ray_tiles_agree_with_whole_frame():
    rng = np.random.default_rng(9)
    stars, *_ = _star_field((256, 256), rng, n=40, profile=galsim.Moffat(beta=3, fwhm=3.0))
    img = rng.poisson(stars + 400.0).astype(np.float32)
    truth = add_cosmic_rays(img, rng, rate=1e-5, darktime=30.0)
    var = np.maximum(img, 0) + 25.0
    tiled = detect_cosmic_rays(img, var, read_noise=5.0)
    assert 0 < tiled.fraction_searched < 1 and tiled.n_blocks > 0
    whole = detect_cosmic_rays(img, var, read_noise=5.0, max_block_fraction=0.0)
    assert whole.fraction_searched == 1.0 and whole.n_blocks == 0
    inner = (slice(3, -3), slice(3, -3))  # astroscrappy treats the outer pixels its own way
    assert (tiled.mask[inner] != whole.mask[inner]).sum() <= 2
    assert (tiled.mask & truth).sum() > 0.9 * truth.sum()


def test_cosmic_ray_tiles_cover_every_block_once_and_do_not_overlap():
    from workflow_lib.single_frame.cosmic_rays import _block_tiles, _pack_shelves

    rng = np.random.default_rng(3)
    selected = rng.random((40, 50)) < 0.08
    selected[5:9, 10:14] = True  # a compact group: one tile
    for k in range(30):  # a diagonal staircase: split into row runs, not its bounding box
        selected[k + 10, k + 15] = True
    tiles = _block_tiles(selected)
    covered = np.zeros(selected.shape, int)
    for r0, r1, c0, c1 in tiles:
        covered[r0:r1, c0:c1] += 1
    assert (covered[selected] == 1).all()  # every selected block in exactly one tile
    assert covered.sum() <= 2 * selected.sum()  # bounding boxes waste at most half
    assert any(r0 <= 5 and r1 >= 9 and c0 <= 10 and c1 >= 14 for r0, r1, c0, c1 in tiles)
    shapes = [(int(h), int(w)) for h, w in rng.integers(3, 40, size=(60, 2))]
    places, (height, width) = _pack_shelves(shapes)
    canvas = np.zeros((height, width), int)
    for (h, w), (y, x) in zip(shapes, places, strict=True):
        canvas[y : y + h, x : x + w] += 1
    assert canvas.max() == 1  # no overlap, all inside the mosaic
    assert canvas.sum() == sum(h * w for h, w in shapes)
    assert canvas.size < 2.0 * canvas.sum()  # packed reasonably tightly


# ------------------------------------------------------------ interpolation
def test_interpolation_reproduces_a_plane_across_columns_and_tracks():
    yy, xx = np.mgrid[:50, :60].astype(np.float32)
    plane = 3.0 * xx - 2.0 * yy + 100.0
    mask = np.zeros(plane.shape, bool)
    mask[5:45, 30] = True  # bad column segment
    mask[20, 10:22] = True  # horizontal track
    mask[0, 0] = mask[49, 59] = True  # corners
    image = np.where(mask, np.float32(1e6), plane).astype(np.float32)
    var = np.ones_like(image)
    interpolate_masked(image, mask, variance=var)
    inner = np.ones(plane.shape, bool)
    inner[0, 0] = inner[49, 59] = False  # corners: extrapolated, not exact
    np.testing.assert_allclose(image[inner], plane[inner], atol=1e-3)
    np.testing.assert_allclose(image[~inner], plane[~inner], atol=3.0)
    assert np.all(var == 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        interpolate_masked(np.asfortranarray(image), mask)


# ------------------------------------------------------------------- eimage
def test_eimage_variance_saturation_and_sky_subtracted_floor():
    rng = np.random.default_rng(12)
    img = rng.poisson(np.full((128, 128), 900.0)).astype(np.float32)
    img[30:40, 64] = 1.2e5  # charge capped at full well: a flat-topped column
    res = eimage_exposure(img.astype(">f4"), _primary(GAIN=1.0), cosmic_rays=False)
    exp = res.exposure
    assert exp.mask_of("SAT")[30:40, 64].all() and exp.mask_of("SAT").sum() <= 12 * 3
    ok = ~exp.mask_of("SAT")
    pull = ((exp.image - 900.0) / np.sqrt(exp.variance))[ok]
    assert 0.95 < _robust_sigma(pull) < 1.05
    # SATURATE in the header wins over the heuristic.
    res2 = eimage_exposure(img, _primary(GAIN=1.0, SATURATE=900.0), cosmic_rays=False)
    assert res2.exposure.mask_of("SAT").mean() > 0.1
    # A sky-subtracted eimage: the measured noise sets a floor.
    res3 = eimage_exposure(img - 900.0, _primary(GAIN=1.0), cosmic_rays=False)
    assert res3.stats["variance_excess"] == pytest.approx(900.0, rel=0.1)
    ok = ~res3.exposure.mask_of("SAT")
    assert np.median(res3.exposure.variance[ok]) == pytest.approx(900.0, rel=0.1)


# ---------------------------------------------------------- small-n masters
@pytest.mark.parametrize("n", [1, 2, 3])
def test_master_dark_from_few_frames_rejects_cosmic_rays(n):
    rng = np.random.default_rng(30 + n)
    shape = (64, 64)
    rate = np.full(shape, 0.5)
    raws = []
    for _ in range(n):
        e = rng.poisson(rate * 61.0).astype(float)
        raws.append(e)
    raws[0][10, 10] += 5000.0  # a cosmic ray in the first frame only
    items = []
    for e in raws:
        _, amps = make_raw(e, rng, jitter=0.0)
        items.append((_primary(OBSTYPE="dark", EXPTIME=60.0, DARKTIME=61.0), amps))
    dark = build_master_dark(items, bias=None)
    assert dark.n_frames == n
    ok = np.ones(shape, bool)
    ok[10, 10] = False
    # The overscan removed the bias level: the rate is the truth, within the noise.
    pull = (dark.image - 0.5)[ok] / np.sqrt(dark.variance[ok])
    assert abs(np.mean(pull)) < 0.15 and 0.85 < np.std(pull) < 1.2
    if n >= 2:
        assert abs(dark.image[10, 10] - 0.5) < 6 * np.sqrt(dark.variance[10, 10])
    else:
        assert dark.image[10, 10] > 50.0  # one frame: nothing to reject against
