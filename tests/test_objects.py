"""Coadd Objects: detection, merging, deblending, measurement (objects.measure_objects)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree
from synthetic_sky import (
    Scene,
    add_model_star,
    exposure_from,
    moffat_psf,
    psf_kernel,
    render_band,
    tan_wcs,
)

from workflow_lib.core.exposure import Exposure
from workflow_lib.core.flags import ObjectFlag
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.objects import measure_objects as objects
from workflow_lib.objects.deblend import deblend_fractions, monotonic_template
from workflow_lib.single_frame.psf import shift_stamps

SHAPE = (380, 400)
FWHM = {"g": 4.4, "r": 4.0, "i": 3.7}
SKY = {"g": 12.0, "r": 15.0, "i": 18.0}
COLOUR = {"g": 0.8, "r": 1.0, "i": 1.2}
NO_DATA_COLUMNS = 14  # left border without data in every band
G_NO_DATA_ROWS = 30  # top rows without data in g only


@dataclass(frozen=True)
class FakePatch:
    tract: int
    patch: int
    inner_bbox: tuple[int, int, int, int]
    outer_bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class FakeTract:
    tract: int
    ra_min: float

    def in_inner_region(self, ra, dec):
        return np.asarray(ra) > self.ra_min


@dataclass(frozen=True)
class FakeSkyMap:
    ra_min: float

    def find_tracts(self, ra, dec):
        return np.where(np.asarray(ra) > self.ra_min, 9, 8)


def _scene(rng: np.random.Generator) -> tuple[Scene, dict[str, slice]]:
    """Isolated stars on a jittered grid, galaxies, two blended pairs, an i-only source."""
    ny, nx = SHAPE
    gx, gy = np.meshgrid(np.arange(45, nx - 20, 36.0), np.arange(25, ny - 20, 36.0))
    gx = gx.ravel() + rng.uniform(-4, 4, gx.size)
    gy = gy.ravel() + rng.uniform(-4, 4, gy.size)
    order = rng.permutation(gx.size)
    n_gal = 14
    stars, gals = order[:-n_gal], order[-n_gal:]
    mag = rng.uniform(18.0, 24.8, stars.size)
    gmag = rng.uniform(19.0, 22.5, n_gal)
    x = np.concatenate([gx[stars], gx[gals]])
    y = np.concatenate([gy[stars], gy[gals]])
    kind = np.array(["star"] * stars.size + ["galaxy"] * n_gal)
    hlr = np.concatenate([np.zeros(stars.size), rng.uniform(2.0, 4.0, n_gal)])
    base = 10 ** (-0.4 * (np.concatenate([mag, gmag]) - 31.4))
    flux = {b: base * COLOUR[b] for b in FWHM}
    groups = {"isolated": slice(0, x.size)}
    # Blended pairs of bright stars 1.5 and 2 FWHM(r) apart, and a source seen in i only.
    # Mid-cell positions of the grid, >= 19 pixels from any grid source.
    extra_x = [135.0, 135.0 + 1.5 * FWHM["r"], 279.0, 279.0 + 2.0 * FWHM["r"] * 0.8, 207.0]
    extra_y = [79.0, 79.0, 187.0, 187.0 + 2.0 * FWHM["r"] * 0.6, 295.0]
    extra_flux = {b: np.array([6e4, 4e4, 3e4, 3e4, 0.0]) * COLOUR[b] for b in FWHM}
    extra_flux["i"][4] = 2.5e4
    groups["pair15"] = slice(x.size, x.size + 2)
    groups["pair20"] = slice(x.size + 2, x.size + 4)
    groups["i_only"] = slice(x.size + 4, x.size + 5)
    x = np.concatenate([x, extra_x])
    y = np.concatenate([y, extra_y])
    kind = np.concatenate([kind, ["star"] * 5])
    hlr = np.concatenate([hlr, np.zeros(5)])
    flux = {b: np.concatenate([flux[b], extra_flux[b]]) for b in FWHM}
    return Scene(x, y, flux, kind, hlr), groups


def _coadds(scene: Scene, rng: np.random.Generator) -> dict:
    wcs = tan_wcs(SHAPE)
    coadds = {}
    for band, fwhm in FWHM.items():
        profile = moffat_psf(fwhm)
        image, variance = render_band(SHAPE, scene, band, profile, sky_sigma=SKY[band], rng=rng)
        no_data = np.zeros(SHAPE, dtype=bool)
        no_data[:, :NO_DATA_COLUMNS] = True
        if band == "g":
            no_data[-G_NO_DATA_ROWS:, :] = True
        psf = PsfModel.constant(psf_kernel(profile))
        coadds[band] = exposure_from(image, variance, wcs=wcs, psf=psf, no_data=no_data)
    return coadds


@pytest.fixture(scope="module")
def patch_run():
    rng = np.random.default_rng(424242)
    scene, groups = _scene(rng)
    coadds = _coadds(scene, rng)
    detections = {band: objects.detect_coadd_sources(c) for band, c in coadds.items()}
    merged = objects.merge_detections(detections, coadds["r"].wcs)
    ny, nx = SHAPE
    patch = FakePatch(9, 12, (1000 + 40, 2000 + 40, nx - 80, ny - 80), (1000, 2000, nx, ny))
    ra_mid = float(coadds["r"].wcs.all_pix2world([nx / 2], [ny / 2], 0)[0][0])
    tract = FakeTract(9, ra_mid)
    table = objects.measure_objects(
        coadds,
        merged,
        tract=tract,
        patch=patch,
        id_base=objects.object_id_base(9, 12),
        bands=["g", "r", "i", "z"],
    )
    return scene, groups, coadds, detections, merged, table, patch, tract


def _match(scene: Scene, table: pd.DataFrame, patch: FakePatch, radius: float = 1.0):
    """Index of the nearest non-parent Object to each truth source, -1 beyond ``radius``."""
    rows = table[table["deblend_nChild"] == 0]
    local = np.column_stack([rows["x"] - patch.outer_bbox[0], rows["y"] - patch.outer_bbox[1]])
    dist, k = cKDTree(local).query(np.column_stack([scene.x, scene.y]))
    return np.where(dist < radius, rows.index.to_numpy()[k], -1), dist


def _snr(scene: Scene, band: str) -> np.ndarray:
    """Expected PSF-flux S/N (sky-limited) of a point source."""
    kernel = psf_kernel(moffat_psf(FWHM[band]))
    return scene.flux[band] * np.sqrt((kernel**2).sum()) / SKY[band]


def test_contract_columns_and_ids(patch_run):
    *_, table, _, _ = patch_run
    required = [
        "objectId",
        "tract",
        "patch",
        "ra",
        "dec",
        "detect_isPrimary",
        "refBand",
        "refExtendedness",
    ]
    for band in "grz" + "i":
        required += [f"{band}_psfFlux", f"{band}_psfFluxErr", f"{band}_apFlux", f"{band}_apFluxErr"]
    assert set(required) <= set(table.columns)
    base = (9 * 1000 + 12) << 32
    assert objects.object_id_base(9, 12) == base
    assert table["objectId"].is_unique
    assert (table["objectId"] - base).tolist() == list(range(1, len(table) + 1))
    assert set(table["tract"]) == {9} and set(table["patch"]) == {12}
    children = table[table["parentObjectId"] > 0]
    parents = table.set_index("objectId").loc[children["parentObjectId"].unique()]
    assert (parents["deblend_nChild"] > 0).all()
    counts = children.groupby("parentObjectId").size()
    assert (parents.loc[counts.index, "deblend_nChild"] == counts).all()
    with pytest.raises(ValueError):
        objects.object_id_base(1, 1000)


def test_stars_detected_with_accurate_positions(patch_run):
    scene, groups, _, _, _, table, patch, _ = patch_run
    match, dist = _match(scene, table, patch)
    snr = _snr(scene, "i")
    stars = scene.kind == "star"
    clear = stars & (snr > 15) & (np.arange(scene.x.size) < groups["isolated"].stop)
    clear &= scene.x > NO_DATA_COLUMNS + 10
    assert clear.sum() > 30
    assert np.all(match[clear] >= 0)
    bright = clear & (snr > 100)
    assert np.sqrt(np.mean(dist[bright] ** 2)) < 0.05
    # The sky positions are consistent with the pixel positions.
    rows = table.loc[match[bright]]
    ra, dec = patch_run[2]["r"].wcs.all_pix2world(scene.x[bright], scene.y[bright], 0)
    sep_arcsec = np.hypot((rows["ra"] - ra) * np.cos(np.deg2rad(dec)), rows["dec"] - dec) * 3600
    assert np.max(sep_arcsec) < 0.02


def test_psf_fluxes_and_errors_of_isolated_stars(patch_run):
    scene, groups, _, _, _, table, patch, _ = patch_run
    match, _ = _match(scene, table, patch)
    isolated = np.zeros(scene.x.size, dtype=bool)
    isolated[groups["isolated"]] = True
    for band in ("r", "i"):
        snr = _snr(scene, band)
        sel = isolated & (scene.kind == "star") & (match >= 0) & (snr > 10)
        sel &= scene.x > NO_DATA_COLUMNS + 15
        rows = table.loc[match[sel]]
        flux = rows[f"{band}_psfFlux"].to_numpy()
        err = rows[f"{band}_psfFluxErr"].to_numpy()
        truth = scene.flux[band][sel]
        bright = snr[sel] > 200
        assert np.median(flux[bright] / truth[bright]) == pytest.approx(1.0, abs=0.005)
        pull = (flux - truth) / err
        q25, q75 = np.percentile(pull[~bright], [25, 75])
        assert 0.75 < (q75 - q25) / 1.349 < 1.3
        assert (rows[f"{band}_flags"] & int(ObjectFlag.PSF_FLUX_FAILED) == 0).all()


def test_blended_pairs_are_deblended_into_children(patch_run):
    scene, groups, _, _, _, table, patch, _ = patch_run
    match, _ = _match(scene, table, patch)
    for name in ("pair15", "pair20"):
        idx = np.arange(scene.x.size)[groups[name]]
        assert np.all(match[idx] >= 0), name
        rows = table.loc[match[idx]]
        assert rows["parentObjectId"].nunique() == 1 and (rows["parentObjectId"] > 0).all()
        assert (rows["flags"] & int(ObjectFlag.DEBLEND_CHILD) != 0).all()
        for band in ("r", "i"):
            ratio = rows[f"{band}_psfFlux"].to_numpy() / scene.flux[band][idx]
            assert np.all(np.abs(ratio - 1) < 0.03), (name, band, ratio)


def test_source_seen_in_one_band_is_measured_in_all(patch_run):
    scene, groups, _, _, _, table, patch, _ = patch_run
    match, _ = _match(scene, table, patch)
    row = table.loc[match[groups["i_only"]][0]]
    assert row["i_detected"] and not row["g_detected"] and not row["r_detected"]
    assert row["refBand"] == "i"
    assert row["g_flags"] & int(ObjectFlag.NOT_DETECTED)
    assert not row["i_flags"] & int(ObjectFlag.NOT_DETECTED)
    for band in ("g", "r"):
        assert np.isfinite(row[f"{band}_psfFluxErr"]) and row[f"{band}_psfFluxErr"] > 0
        assert abs(row[f"{band}_psfFlux"]) < 4 * row[f"{band}_psfFluxErr"]
    assert row["i_psfFlux"] / scene.flux["i"][groups["i_only"]][0] == pytest.approx(1, abs=0.03)


def test_missing_band_and_no_data_are_flagged(patch_run):
    *_, table, patch, _ = patch_run
    assert table["z_psfFlux"].isna().all()
    assert (table["z_flags"] & int(ObjectFlag.NO_COADD) != 0).all()
    local_y = table["y"] - patch.outer_bbox[1]
    in_g_hole = local_y > SHAPE[0] - G_NO_DATA_ROWS
    assert in_g_hole.sum() >= 2
    assert (table.loc[in_g_hole, "g_flags"] & int(ObjectFlag.NO_DATA_CENTER) != 0).all()
    assert table.loc[in_g_hole, "g_psfFlux_flag"].all()
    assert not table.loc[in_g_hole, "r_psfFlux_flag"].any()
    # No peak is found in the NO_DATA border.
    assert (table["x"] - patch.outer_bbox[0] > NO_DATA_COLUMNS - 1).all()


def test_extendedness_separates_stars_and_galaxies(patch_run):
    scene, groups, _, _, _, table, patch, _ = patch_run
    match, _ = _match(scene, table, patch)
    snr = _snr(scene, "i")
    good = (match >= 0) & (snr > 30) & (np.arange(scene.x.size) < groups["isolated"].stop)
    ext = table.loc[match[good], "refExtendedness"].to_numpy()
    kind = scene.kind[good]
    assert np.mean(ext[kind == "star"] == 0) >= 0.95
    assert np.mean(ext[kind == "galaxy"] == 1) >= 0.9


def test_primary_flags_follow_patch_and_tract_geometry(patch_run):
    *_, table, patch, tract = patch_run
    x0, y0, nx, ny = patch.inner_bbox
    inner = (table["x"] >= x0 - 0.5) & (table["x"] < x0 + nx - 0.5)
    inner &= (table["y"] >= y0 - 0.5) & (table["y"] < y0 + ny - 0.5)
    assert (table["detect_isPatchInner"] == inner).all()
    assert 0 < inner.sum() < len(table)
    in_tract = table["ra"] > tract.ra_min
    assert (table["detect_isTractInner"] == in_tract).all()
    assert 0 < in_tract.sum() < len(table)
    expected = inner & in_tract & (table["deblend_nChild"] == 0)
    assert (table["detect_isPrimary"] == expected).all()
    assert not table.loc[table["deblend_nChild"] > 0, "detect_isPrimary"].any()


def test_tract_region_falls_back_to_the_sky_map(patch_run):
    _, _, coadds, _, merged, _, patch, tract = patch_run
    small = merged.iloc[:10].reset_index(drop=True)
    out = objects.measure_objects(
        coadds, small, patch=patch, skymap=FakeSkyMap(tract.ra_min), id_base=0
    )
    assert (out["detect_isTractInner"] == (out["ra"] > tract.ra_min)).all()


def test_merge_keeps_first_priority_position_and_adds_new_peaks():
    wcs = tan_wcs(SHAPE)  # 0.2 arcsec pixels: a 0.5 arcsec match radius is 2.5 pixels

    def peaks(xy, snr):
        xy = np.asarray(xy, dtype=np.float64)
        return pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "snr": snr})

    per_band = {
        "g": peaks([[50.0, 50.0], [200.0, 100.0]], [30.0, 8.0]),
        "i": peaks([[51.0, 50.5], [120.0, 80.0], [122.0, 80.0]], [40.0, 20.0, 6.0]),
        "r": peaks([[50.4, 49.6], [52.0, 51.0]], [35.0, 5.0]),
    }
    merged = objects.merge_detections(per_band, wcs)
    # A band's own peaks are all kept (i: 3); r's second peak near an already claimed
    # peak is a duplicate; g adds one.
    assert len(merged) == 4
    assert merged["i_detected"].sum() == 3
    first = merged.iloc[0]
    assert (first["x"], first["y"]) == (51.0, 50.5) and first["peak_band"] == "i"
    assert first["g_detected"] and first["r_detected"] and first["i_detected"]
    assert first["g_snr"] == 30.0
    new = merged[merged["peak_band"] == "g"].iloc[0]
    assert (new["x"], new["y"]) == (200.0, 100.0)
    assert not new["i_detected"] and np.isnan(new["i_snr"])
    ra, dec = wcs.all_pix2world(merged["x"], merged["y"], 0)
    assert np.allclose(merged["ra"], ra) and np.allclose(merged["dec"], dec)


def _resampling_kernel(h: int = 3) -> np.ndarray:
    """Weights of the input pixels of one output pixel of a half-pixel Lanczos-3 shift."""
    impulse = np.zeros((4 * h + 1, 4 * h + 1))
    impulse[2 * h, 2 * h] = 1.0
    return shift_stamps(impulse[None], np.array([0.5]), np.array([0.5]))[0]


def test_noise_correlation_factor_of_resampled_noise():
    rng = np.random.default_rng(8)
    shape = (600, 600)
    white = rng.normal(0.0, 1.0, shape)
    resampling = _resampling_kernel()
    resampled = ndimage.convolve(white, resampling, mode="wrap")
    # The variance plane a warp propagates: per-pixel variance, correlations ignored.
    variance = np.full(shape, (resampling**2).sum())
    exclude = np.zeros(shape, dtype=bool)
    weights = psf_kernel(moffat_psf(4.0))[10:31, 10:31]
    # sum(w d) = sum((w * R) white): its variance over the variance plane's prediction.
    effective = ndimage.convolve(np.pad(weights, resampling.shape[0]), resampling)
    expected = np.sqrt((effective**2).sum() / ((weights**2).sum() * (resampling**2).sum()))
    assert expected > 1.1
    measured = objects.noise_correlation_factor(resampled, variance, exclude, weights)
    assert measured == pytest.approx(expected, rel=0.05)
    uncorrelated = objects.noise_correlation_factor(white, np.ones(shape), exclude, weights)
    assert uncorrelated == pytest.approx(1.0, abs=0.05)


def test_coadd_depth_matches_the_psf_flux_error():
    shape = (200, 200)
    sigma = 7.0
    kernel = psf_kernel(moffat_psf(3.5))
    coadd = exposure_from(
        np.zeros(shape), np.full(shape, sigma**2), wcs=tan_wcs(shape), psf=PsfModel.constant(kernel)
    )
    depth = objects.coadd_psf_depth(coadd)
    # The unweighted PSF fit inside 2 FWHM: err = sigma sqrt(sum m^2) / sum m^2.
    half = int(np.ceil(2 * 3.5))
    m = kernel[20 - half : 21 + half, 20 - half : 21 + half]
    err = sigma / np.sqrt((m**2).sum())
    assert depth["depth_median"] == pytest.approx(31.4 - 2.5 * np.log10(5 * err), abs=0.02)
    assert depth["data_fraction"] == 1.0
    doubled = objects.coadd_psf_depth(coadd, noise_factor=2.0)
    assert doubled["depth_median"] == pytest.approx(depth["depth_median"] - 2.5 * np.log10(2))


def test_deblend_fractions_share_each_pixel_once():
    ny, nx = 40, 60
    yy, xx = np.mgrid[0:ny, 0:nx]
    star = lambda cx, cy, f: f * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 1.7**2))  # noqa: E731
    image = star(20, 20, 1000.0) + star(27, 20, 500.0) + star(50, 20, 800.0)
    own = image[5:35, 5:45] > 1.0
    fractions = deblend_fractions(
        image, own, (5, 5), np.array([20, 27]), np.array([20, 20]), floor=1e-3, fwhm=4.0
    )
    assert np.allclose(fractions.sum(axis=0)[own], 1.0)
    assert np.all(fractions[:, ~own] == 0)
    sub = image[5:35, 5:45]
    first = (fractions[0] * sub).sum()
    assert first == pytest.approx(star(20, 20, 1000.0)[5:35, 5:45][own].sum(), rel=0.03)
    # A monotonic template cannot rise again past a gap.
    bump = np.zeros((21, 21))
    bump[8:13, 8:13], bump[10, 18] = 5.0, 9.0
    capped = monotonic_template(bump, 10, 10)
    assert capped[10, 18] == 0.0 and capped[10, 10] == 5.0 and capped[12, 12] == 5.0


def test_errors_account_for_correlated_coadd_noise():
    """On resampled (correlated) noise the PSF-flux errors include the measured correlation
    factor and the pulls are unit-normal; without the correction they are too small."""
    rng = np.random.default_rng(77)
    shape = (520, 520)
    gx, gy = np.meshgrid(np.arange(30, 500, 52.0), np.arange(30, 500, 52.0))
    n = gx.size
    x = gx.ravel() + rng.uniform(-5, 5, n)
    y = gy.ravel() + rng.uniform(-5, 5, n)
    flux = 10 ** rng.uniform(np.log10(800.0), np.log10(6000.0), n)
    scene = Scene(x, y, {"r": flux}, np.array(["star"] * n), np.zeros(n))
    profile = moffat_psf(4.0)
    noiseless, _ = render_band(shape, scene, "r", profile, sky_sigma=0.0, rng=rng)
    resampling = _resampling_kernel()
    sigma = 15.0
    noise = ndimage.convolve(rng.normal(0.0, sigma, shape), resampling, mode="wrap")
    variance = np.full(shape, sigma**2 * (resampling**2).sum())
    coadd = exposure_from(
        noiseless + noise, variance, wcs=tan_wcs(shape), psf=PsfModel.constant(psf_kernel(profile))
    )
    detections = objects.detect_coadd_sources(coadd)
    assert detections.attrs["noise_correlation_factor"] > 1.1
    merged = objects.merge_detections({"r": detections}, coadd.wcs)
    pulls = {}
    for correct in (True, False):
        table = objects.measure_objects(
            {"r": coadd}, merged, correct_noise_correlation=correct, aperture_correction=False
        )
        dist, k = cKDTree(np.column_stack([table["x"], table["y"]])).query(np.column_stack([x, y]))
        rows = table.iloc[k[dist < 1.0]]
        pull = (rows["r_psfFlux"].to_numpy() - flux[dist < 1.0]) / rows["r_psfFluxErr"].to_numpy()
        q25, q75 = np.percentile(pull, [25, 75])
        pulls[correct] = (q75 - q25) / 1.349
        if correct:
            assert table.attrs["noise_correlation_factor"]["r"]["psf"] > 1.1
            assert (dist < 1.0).sum() > 0.9 * n
    assert 0.8 < pulls[True] < 1.2
    assert pulls[False] > 1.15 * pulls[True]


def test_exact_coadd_psf_removes_the_bias_at_a_coverage_edge():
    # Two inputs of equal weight: A covers the whole coadd, B (a much wider PSF) only its
    # right half, so the coadd PSF jumps at x = EDGE from PSF_A to (PSF_A + PSF_B) / 2.
    from workflow_lib.static_sky.coadd_psf import block_sums, build_coadd_psf

    shape, edge, block = (200, 320), 160, 8
    kernel_a, kernel_b = psf_kernel(moffat_psf(3.0)), psf_kernel(moffat_psf(6.0))
    psf_a, psf_b = PsfModel.constant(kernel_a), PsfModel.constant(kernel_b)
    used_a = np.ones(shape, dtype=bool)
    used_b = np.zeros(shape, dtype=bool)
    used_b[:, edge:] = True
    coadd_psf = build_coadd_psf(
        [psf_a, psf_b],
        np.array([1.0, 1.0]),
        [(0, 0), (0, 0)],
        [block_sums(used_a, 0, 0, block), block_sums(used_b[:, edge:], 0, edge, block)],
        [(0, 0), (edge // block, 0)],
        block=block,
        shape=shape,
        cell_size=64,
    )
    # Bright isolated stars 12 pixels left and right of the edge (alternate rows) and far
    # from it on either side.
    ys = np.arange(20.0, 185.0, 30.0) + 0.3
    near = np.where(np.arange(ys.size) % 2 == 0, edge - 12.3, edge + 11.7)
    x = np.concatenate([near, np.full(ys.size, 60.4), np.full(ys.size, 260.1)])
    y = np.tile(ys, 3)
    flux = np.full(x.size, 2e5)
    image = np.zeros(shape)
    for xi, yi, f in zip(x, y, flux, strict=True):
        kernel = kernel_a if xi < edge else 0.5 * (kernel_a + kernel_b)
        add_model_star(image, PsfModel.constant(kernel), xi, yi, f)
    rng = np.random.default_rng(5)
    sigma = 2.0
    image += rng.normal(0.0, sigma, shape)
    coadd = exposure_from(image, np.full(shape, sigma**2), wcs=tan_wcs(shape), psf=coadd_psf.model)
    merged = objects.merge_detections({"r": objects.detect_coadd_sources(coadd)}, coadd.wcs)

    def bias(**kwargs: object) -> np.ndarray:
        table = objects.measure_objects({"r": coadd}, merged, aperture_correction=False, **kwargs)
        tree = cKDTree(np.column_stack([table["x"], table["y"]]))
        dist, index = tree.query(np.column_stack([x, y]))
        assert (dist < 1.0).all()
        return -2.5 * np.log10(table["r_psfFlux"].to_numpy()[index] / flux)

    left, right = (x < edge) & (np.abs(x - edge) < 20), (x > edge) & (np.abs(x - edge) < 20)
    far_left, far_right = x < 100, x > 220

    def jumps(bias_mag: np.ndarray) -> np.ndarray:
        # How far sources near the edge are off from the far ones on their own side.
        return np.array(
            [
                np.median(bias_mag[left]) - np.median(bias_mag[far_left]),
                np.median(bias_mag[right]) - np.median(bias_mag[far_right]),
            ]
        )

    smooth = bias()
    exact = bias(coadd_psfs={"r": coadd_psf})
    # The smooth model cannot follow the jump (the test means something) ...
    assert np.abs(jumps(smooth)).max() > 0.02
    # ... the exact coadd PSF can, on both sides of it, and it is right far from it too.
    assert np.abs(jumps(exact)).max() < 0.003, exact
    assert np.abs(exact).max() < 0.01, exact


def test_a_masked_star_core_gives_one_peak_not_a_ring():
    # A bright star whose core is masked in the coadd (saturated in every input).
    shape = (120, 120)
    profile = moffat_psf(3.5)
    scene = Scene(
        np.array([60.3]), np.array([59.7]), {"r": np.array([5e6])}, np.array(["star"]), np.zeros(1)
    )
    image, variance = render_band(
        shape, scene, "r", profile, sky_sigma=5.0, rng=np.random.default_rng(8)
    )
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    core = np.hypot(xx - 60.3, yy - 59.7) < 5.0
    coadd = exposure_from(
        image,
        variance,
        wcs=tan_wcs(shape),
        psf=PsfModel.constant(psf_kernel(profile)),
        no_data=core,
    )
    ring = objects.detect_coadd_sources(coadd, hole_radius_fwhm=0.0)
    filled = objects.detect_coadd_sources(coadd)
    assert len(ring) > 1  # the hole's rim makes false peaks when left empty
    assert len(filled) == 1
    assert np.hypot(filled["x"][0] - 60.3, filled["y"][0] - 59.7) < 1.0
    assert filled["snr"][0] > 100


def test_psf_fluxes_take_the_inputs_aperture_corrections():
    # Input A (sharp) covers the coadd, B (wide) its right half; each input's PSF model
    # holds 1 / A_i of a calibrated star's light, so stars are drawn at F / A_i per input.
    # The PSF fluxes times the inputs' corrections, mixed as the coadd mixed them, are F.
    from workflow_lib.static_sky.coadd_psf import block_sums, build_coadd_psf

    shape, edge, block = (200, 320), 160, 8
    kernel_a, kernel_b = psf_kernel(moffat_psf(3.0)), psf_kernel(moffat_psf(6.0))
    apcorr = np.array([1.02, 1.12])
    used_b = np.zeros(shape, dtype=bool)
    used_b[:, edge:] = True
    inputs = dict(
        psfs=[PsfModel.constant(kernel_a), PsfModel.constant(kernel_b)],
        weights=np.array([1.0, 1.0]),
        origins=[(0, 0), (0, 0)],
        coverage=[
            block_sums(np.ones(shape, dtype=bool), 0, 0, block),
            block_sums(used_b[:, edge:], 0, edge, block),
        ],
        block_origin=[(0, 0), (edge // block, 0)],
    )
    with_apcorr = build_coadd_psf(
        *inputs.values(), block=block, shape=shape, cell_size=64, aperture_corrections=apcorr
    )
    without = build_coadd_psf(*inputs.values(), block=block, shape=shape, cell_size=64)
    ys = np.arange(20.0, 185.0, 30.0) + 0.3
    x = np.concatenate([np.full(ys.size, 60.4), np.full(ys.size, 260.1)])
    y = np.tile(ys, 2)
    flux, sigma = 2e5, 2.0

    def coadd_of(ratios: np.ndarray) -> Exposure:
        image = np.random.default_rng(6).normal(0.0, sigma, shape)
        for xi, yi in zip(x, y, strict=True):
            light = kernel_a / ratios[0]
            if xi > edge:
                light = 0.5 * (light + kernel_b / ratios[1])
            add_model_star(
                image, PsfModel.constant(light / light.sum()), xi, yi, flux * light.sum()
            )
        return exposure_from(image, np.full(shape, sigma**2), wcs=tan_wcs(shape), psf=without.model)

    def dmag(coadd: Exposure, coadd_psf, **kwargs: object) -> tuple[np.ndarray, pd.DataFrame]:
        merged = objects.merge_detections({"r": objects.detect_coadd_sources(coadd)}, coadd.wcs)
        table = objects.measure_objects({"r": coadd}, merged, coadd_psfs={"r": coadd_psf}, **kwargs)
        dist, index = cKDTree(np.column_stack([table["x"], table["y"]])).query(
            np.column_stack([x, y])
        )
        assert (dist < 1.0).all()
        return -2.5 * np.log10(table["r_psfFlux"].to_numpy()[index] / flux), table

    scaled = coadd_of(apcorr)
    # What the measurement gives for stars whose PSF models hold all their light.
    baseline, _ = dmag(coadd_of(np.ones(2)), without, aperture_correction=False)
    raw, _ = dmag(scaled, with_apcorr, aperture_correction=False)
    corrected, table = dmag(scaled, with_apcorr)
    left, right = x < edge, x > edge
    # Uncorrected: short by A_A on the left, by about the mean of both on the right.
    np.testing.assert_allclose((raw - baseline)[left], 2.5 * np.log10(1.02), atol=2e-4)
    assert np.all((raw - baseline)[right] > 2.5 * np.log10(1.05))
    assert np.abs(corrected - baseline).max() < 5e-4, corrected - baseline
    assert table.attrs["aperture_correction_source"] == {"r": "inputs"}
    assert table.attrs["aperture_correction"]["r"] > 1.02
    # Without the inputs' corrections the coadd's own bright stars give one.
    _, fitted = dmag(scaled, without)
    assert fitted.attrs["aperture_correction_source"] == {"r": "coadd"}
