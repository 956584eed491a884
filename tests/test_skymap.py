"""Sky maps: LSST's rings geometry, a discrete tract fitted to the data, patch lookup."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from workflow_lib.core.registry import CORNER_DEC_COLUMNS, CORNER_RA_COLUMNS
from workflow_lib.sim.optics import tan_deproject, tan_project
from workflow_lib.static_sky.skymap import (
    PROJECTIONS,
    SkyMap,
    ccd_patches,
    discrete_sky_map,
    rings_sky_map,
)

SMALL_PATCHES = dict(patch_inner_size=1000, patch_border=50)


def _square(ra0, dec0, half_deg, rot_deg=0.0, n=0):
    """Corners (n=0) or an n x n grid filling a square of half-size ``half_deg``.

    The square lives in the gnomonic plane about (ra0, dec0), so its edges are
    great circles, like a CCD's under a TAN header WCS.
    """
    s = np.array([-1.0, 1.0, 1.0, -1.0]) if n == 0 else np.linspace(-1.0, 1.0, n)
    t = np.array([-1.0, -1.0, 1.0, 1.0]) if n == 0 else np.linspace(-1.0, 1.0, n)
    if n:
        s, t = (a.ravel() for a in np.meshgrid(s, t))
    th = np.deg2rad(rot_deg)
    u, v = s * half_deg, t * half_deg
    return tan_deproject(
        np.cos(th) * u - np.sin(th) * v, np.sin(th) * u + np.cos(th) * v, ra0, dec0
    )


def _outer_patches_holding(skymap, ra, dec):
    """(tract, patch) of every patch whose outer bbox holds one of the points.

    Brute force and independent of the module's lookup: candidate tracts own
    some point of a dense grid around the points, pixels come from astropy,
    and every patch of a candidate tract is tested.
    """
    ra0, dec0 = float(np.mean(ra)), float(np.mean(dec))
    grid_ra, grid_dec = _square(ra0, dec0, 2.0, n=161)
    candidates = np.unique(skymap.find_tracts(grid_ra, grid_dec))
    found = set()
    for tract_id in candidates[candidates >= 0]:
        tract = skymap.tract(int(tract_id))
        x, y = tract.wcs.world_to_pixel_values(ra, dec)
        for patch_id in range(tract.n_patches[0] * tract.n_patches[1]):
            x0, y0, nx, ny = tract.patch(patch_id).outer_bbox
            hit = (x >= x0 - 0.5) & (x < x0 + nx - 0.5) & (y >= y0 - 0.5) & (y < y0 + ny - 0.5)
            if hit.any():
                found.add((int(tract_id), patch_id))
    return found


# ------------------------------------------------------------------------- rings
def test_rings_tract_count_follows_lsst_formula():
    for num_rings in (1, 2, 3, 10, 57, 120):
        size = math.pi / (num_rings + 1)
        expected = 2
        for ring in range(num_rings):
            lower = -math.pi / 2 + size / 2 + ring * size
            upper = lower + size
            # LSST divides at the edge nearer the equator (even for a ring that
            # straddles it), where the ring is widest.
            nearest_equator = min(abs(lower), abs(upper))
            expected += int(2 * math.pi * math.cos(nearest_equator) / size) + 1
        assert len(rings_sky_map(num_rings=num_rings)) == expected
    assert len(rings_sky_map()) == 18938  # DC2's 120 rings: tracts 0..18937


def test_dc2_tract_3828_is_lsst_tract_3828():
    # lsst/ci_imsim configs/skymap.py: "center of tract 3828 patch 3,3=24" of the DC2
    # sky map is (56.64971166122064, -36.4462532139527947602893); 7 x 7 patches.
    skymap = rings_sky_map()
    ra, dec = 56.64971166122064, -36.4462532139527947602893
    assert skymap.find_tracts(ra, dec).tolist() == [3828]
    tract = skymap.tract(3828)
    assert tract.n_patches == (7, 7) and tract.shape == (28000, 28000)
    patch = tract.patch_at((3, 3))
    assert patch.patch == 24
    x0, y0, nx, ny = patch.inner_bbox
    centre = tract.wcs.pixel_to_world_values(x0 + (nx - 1) / 2, y0 + (ny - 1) / 2)
    assert centre[0] == pytest.approx(ra, abs=1e-9) and centre[1] == pytest.approx(dec, abs=1e-9)


def _sphere_sample(rng, n):
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.rad2deg(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    return ra, dec


@pytest.mark.parametrize("num_rings", [120, 7])
def test_every_point_has_one_owner_and_lies_in_its_bbox(num_rings):
    skymap = rings_sky_map(num_rings=num_rings, **SMALL_PATCHES)
    size = 180.0 / (num_rings + 1)
    rng = np.random.default_rng(11)
    ra, dec = _sphere_sample(rng, 20000)
    edges = -90 + size / 2 + size * np.arange(num_rings + 1)
    special_dec = np.concatenate([[-90.0, 90.0], edges - 1e-9, edges + 1e-9, [0.0]])
    special_ra = [0.0, 1e-12, 359.9999999999, 360.0, 180.0]
    sra, sdec = np.meshgrid(special_ra, special_dec)
    ra = np.concatenate([ra, sra.ravel() % 360.0])
    dec = np.concatenate([dec, sdec.ravel()])

    owner = skymap.find_tracts(ra, dec)
    centres = skymap.tract_centres().set_index("tract")
    assert ((owner >= 0) & (owner < len(skymap))).all()
    # The owner's sector: within half a ring of its centre in Dec, and the nearest
    # tract centre of its ring in RA (ring = tracts with the same centre Dec).
    own_dec = centres.loc[owner, "dec"].to_numpy()
    assert (np.abs(dec - own_dec) <= size / 2 + 1e-7).all()
    per_ring = centres.groupby("dec").size()
    n_in_ring = per_ring.loc[own_dec].to_numpy()
    d_ra = (ra - centres.loc[owner, "ra"].to_numpy() + 180.0) % 360.0 - 180.0
    ring_tract = np.abs(own_dec) < 90.0
    assert (np.abs(d_ra[ring_tract]) <= 180.0 / n_in_ring[ring_tract] + 1e-7).all()
    caps = ~ring_tract
    assert (np.abs(dec[caps]) >= 90 - size / 2 - 1e-7).all()
    assert set(owner[caps]) <= {0, len(skymap) - 1}
    # ... and inside the owner's pixel bbox (astropy's WCS, not the module's projection).
    for tract_id in np.unique(owner):
        tract = skymap.tract(int(tract_id))
        mine = owner == tract_id
        assert tract.in_inner_region(ra[mine], dec[mine]).all()
        x, y = tract.wcs.world_to_pixel_values(ra[mine], dec[mine])
        ny, nx = tract.shape
        assert ((x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)).all(), tract_id


def _offset(ra, dec, distance_deg, bearing_deg):
    """Points ``distance_deg`` from (ra, dec) along ``bearing_deg`` (east of north)."""
    d, b = np.deg2rad(distance_deg), np.deg2rad(bearing_deg)
    xi, eta = np.tan(d) * np.sin(b), np.tan(d) * np.cos(b)
    return tan_deproject(np.rad2deg(xi), np.rad2deg(eta), ra, dec)


@pytest.mark.parametrize("patch_inner_size", [1000, 1])  # 1: no slack from whole patches
def test_neighbouring_tracts_overlap_by_the_configured_overlap(patch_inner_size):
    overlap = 1.0 / 60.0
    skymap = rings_sky_map(
        tract_overlap_deg=overlap, patch_inner_size=patch_inner_size, patch_border=0
    )
    rng = np.random.default_rng(5)
    ra, dec = _sphere_sample(rng, 30000)
    # Points just inside each ring edge and the cap edges, where overlaps matter most.
    size = 180.0 / 121
    edges = -90 + size / 2 + size * np.arange(121)
    edge_dec = np.repeat(edges, 60) + rng.choice([-1, 1], 60 * 121) * rng.uniform(0, 1.2 * overlap)
    ra = np.concatenate([ra, rng.uniform(0, 360, len(edge_dec))])
    dec = np.concatenate([dec, edge_dec])
    # Any point within the overlap of a tract's own region lies in that tract.
    near_ra, near_dec = _offset(ra, dec, 0.98 * overlap, rng.uniform(0, 360, len(ra)))
    owner = skymap.find_tracts(ra, dec)
    elsewhere = skymap.find_tracts(near_ra, near_dec) != owner
    assert elsewhere.sum() > 500  # the test reaches into neighbouring tracts
    for tract_id in np.unique(owner[elsewhere]):
        pick = elsewhere & (owner == tract_id)
        tract = skymap.tract(int(tract_id))
        x, y = tract.wcs.world_to_pixel_values(near_ra[pick], near_dec[pick])
        ny, nx = tract.shape
        assert ((x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)).all(), tract_id


def test_tract_extends_about_the_overlap_beyond_its_ring():
    # Along the central meridian of a DC2 tract the bbox reaches past the ring
    # edge by the overlap plus the padding to whole patches (less than a patch).
    overlap = 1.0 / 60.0
    skymap = rings_sky_map()
    tract = skymap.tract(3828)
    size = 180.0 / 121
    _, y = tract.wcs.world_to_pixel_values(
        [tract.ra, tract.ra], [tract.dec - size / 2, tract.dec + size / 2]
    )
    below, above = (y[0] + 0.5) * 0.2 / 3600, (tract.shape[0] - 0.5 - y[1]) * 0.2 / 3600
    for reach in (below, above):
        assert overlap <= reach < overlap + 4000 * 0.2 / 3600


def test_polar_caps_are_single_tracts():
    skymap = rings_sky_map(num_rings=20, **SMALL_PATCHES)
    last = len(skymap) - 1
    ra = np.linspace(0, 359, 50)
    assert (skymap.find_tracts(ra, np.full(50, -89.0)) == 0).all()
    assert (skymap.find_tracts(ra, np.full(50, 89.0)) == last).all()
    assert (skymap.tract(0).dec, skymap.tract(last).dec) == (-90.0, 90.0)


# ---------------------------------------------------------------------- discrete
def _dithered_ccd_corners(ra0, dec0, rng, n_visits=6):
    ra, dec = [], []
    for _ in range(n_visits):
        dx, dy = rng.uniform(-0.05, 0.05, 2)
        cra, cdec = tan_deproject(np.array([dx]), np.array([dy]), ra0, dec0)
        for ox in (-0.12, 0.12):
            r, d = _square(cra[0], cdec[0], 0.11, rot_deg=rng.uniform(-2, 2))
            r, d = _offset(r, d, abs(ox), 90.0 if ox > 0 else 270.0)
            ra.append(r)
            dec.append(d)
    return np.array(ra), np.array(dec)


@pytest.mark.parametrize(("ra0", "dec0"), [(56.0, -31.0), (0.02, 3.0), (123.0, -89.85)])
def test_discrete_tract_holds_every_ccd_corner(ra0, dec0):
    rng = np.random.default_rng(3)
    ra, dec = _dithered_ccd_corners(ra0, dec0, rng)
    skymap = discrete_sky_map(ra, dec, border_deg=0.01, tract_id=7, **SMALL_PATCHES)
    assert skymap.kind == "discrete" and skymap.tract_ids.tolist() == [7]
    tract = skymap.tract(7)
    assert tract.contains(ra, dec).all() and tract.in_inner_region(ra, dec).all()
    assert (skymap.find_tracts(ra, dec) == 7).all()
    # Fitted, not arbitrary: the bbox is no bigger than the footprint's circle plus
    # the border, rounded up to whole patches.
    xi, eta = tan_project(ra, dec, tract.ra, tract.dec)
    radius = np.hypot(xi, eta).max() + 0.01
    assert max(tract.shape) * 0.2 / 3600 <= 2 * radius + 1000 * 0.2 / 3600 + 1e-6
    far_ra, far_dec = _offset(np.array([tract.ra]), np.array([tract.dec]), 3 * radius, 45.0)
    assert skymap.find_tracts(far_ra, far_dec).tolist() == [-1]


def test_discrete_tract_is_centred_on_a_symmetric_footprint():
    ra, dec = _square(10.0, -45.0, 0.4, n=5)
    skymap = discrete_sky_map(ra, dec, **SMALL_PATCHES)
    tract = skymap.tract(0)
    assert tract.ra == pytest.approx(10.0, abs=1e-9) and tract.dec == pytest.approx(-45.0, abs=1e-9)
    with pytest.raises(ValueError, match="no finite footprint"):
        discrete_sky_map([np.nan], [np.nan])


def test_patches_tile_the_tract_and_outer_is_inner_plus_border():
    ra, dec = _square(200.0, 20.0, 0.3)
    border = 40
    skymap = discrete_sky_map(
        ra, dec, pixel_scale_arcsec=1.0, patch_inner_size=300, patch_border=border
    )
    tract = skymap.tract(0)
    ny, nx = tract.shape
    npx, npy = tract.n_patches
    assert npx * 300 == nx and npy * 300 == ny and npx >= 3 and npy >= 3
    coverage = np.zeros((ny, nx), dtype=np.int32)
    for patch_id in range(npx * npy):
        patch = tract.patch(patch_id)
        ix, iy = patch.index
        assert patch_id == iy * npx + ix and tract.patch_at((ix, iy)) == patch
        x0, y0, w, h = patch.inner_bbox
        coverage[y0 : y0 + h, x0 : x0 + w] += 1
        ox0, oy0, ow, oh = patch.outer_bbox
        assert (ox0, oy0) == (max(x0 - border, 0), max(y0 - border, 0))
        assert (ox0 + ow, oy0 + oh) == (min(x0 + w + border, nx), min(y0 + h + border, ny))
    assert (coverage == 1).all()  # no gap, no overlap
    with pytest.raises(IndexError):
        tract.patch(npx * npy)


def test_patch_wcs_is_the_tract_wcs_shifted():
    skymap = rings_sky_map(**SMALL_PATCHES)
    tract = skymap.tract(int(skymap.find_tracts(150.0, 2.0)[0]))
    rng = np.random.default_rng(9)
    for patch_id in (0, 5, tract.n_patches[0] * tract.n_patches[1] - 1):
        patch = tract.patch(patch_id)
        x0, y0, w, h = patch.outer_bbox
        assert patch.wcs.array_shape == (h, w)
        x, y = rng.uniform(-0.5, w - 0.5, 50), rng.uniform(-0.5, h - 0.5, 50)
        in_patch = patch.wcs.pixel_to_world_values(x, y)
        in_tract = tract.wcs.pixel_to_world_values(x + x0, y + y0)
        np.testing.assert_allclose(in_patch, in_tract, rtol=0, atol=1e-11)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_fast_projection_agrees_with_astropy(projection):
    skymap = rings_sky_map(num_rings=40, projection=projection, **SMALL_PATCHES)
    rng = np.random.default_rng(1)
    for tract_id in (0, 1, 400, len(skymap) - 1):
        tract = skymap.tract(tract_id)
        ny, nx = tract.shape
        x, y = rng.uniform(0, nx, 100), rng.uniform(0, ny, 100)
        ra, dec = tract.wcs.pixel_to_world_values(x, y)
        x2, y2 = tract.sky_to_pixel(ra, dec)
        np.testing.assert_allclose(x2, x, rtol=0, atol=1e-6)
        np.testing.assert_allclose(y2, y, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ patch lookup
@pytest.mark.parametrize(
    ("ra0", "dec0", "rot"),
    [
        (56.65, -36.45, 0.0),  # inside one DC2 tract
        (56.65 + 0.73 * 1.24, -36.45 + 0.74, 30.0),  # at tract corners: several tracts
        (0.01, 10.0, 45.0),  # across RA = 0
        (30.0, -89.95, 10.0),  # on the south pole
        (200.0, 89.25, 0.0),  # on the north cap's edge
    ],
)
def test_patches_overlapping_finds_every_patch_the_polygon_touches(ra0, dec0, rot):
    skymap = rings_sky_map(**SMALL_PATCHES)
    corner_ra, corner_dec = _square(ra0, dec0, 0.1, rot_deg=rot)
    found = {(p.tract, p.patch) for p in skymap.patches_overlapping(corner_ra, corner_dec)}
    inside_ra, inside_dec = _square(ra0, dec0, 0.1, rot_deg=rot, n=81)
    expected = _outer_patches_holding(skymap, inside_ra, inside_dec)
    assert expected <= found
    # Not far ones: each patch found holds a point of the polygon (within a few pixels).
    for tract_id, patch_id in found - expected:
        tract = skymap.tract(tract_id)
        x, y = tract.wcs.world_to_pixel_values(inside_ra, inside_dec)
        x0, y0, w, h = tract.patch(patch_id).outer_bbox
        gap_x = np.maximum(np.maximum(x0 - 0.5 - x, x - (x0 + w - 0.5)), 0)
        gap_y = np.maximum(np.maximum(y0 - 0.5 - y, y - (y0 + h - 0.5)), 0)
        assert np.hypot(gap_x, gap_y).min() < 60.0  # the sample spacing, in pixels
    tracts = {t.tract for t in skymap.tracts_overlapping(corner_ra, corner_dec)}
    assert tracts == {t for t, _ in found}


def test_patch_lookup_is_exact_beyond_the_polygon_bbox():
    # A diamond centred in a patch reaches into its four edge neighbours; its bbox
    # also meets the four diagonal neighbours, which the polygon itself does not.
    skymap = rings_sky_map(**SMALL_PATCHES)
    tract = skymap.tract(3828)
    patch = tract.patch_at((10, 12))
    x0, y0, w, h = patch.inner_bbox
    cx, cy = x0 + w / 2 - 0.5, y0 + h / 2 - 0.5
    half = 600.0
    px, py = cx + np.array([half, 0, -half, 0]), cy + np.array([0, half, 0, -half])
    ra, dec = tract.wcs.pixel_to_world_values(px, py)
    found = {p.index for p in tract.patches_overlapping(ra, dec)}
    assert found == {(10, 12), (9, 12), (11, 12), (10, 11), (10, 13)}
    assert {p.index for p in tract.patches_overlapping(ra[::-1], dec[::-1])} == found
    assert {p.index for p in skymap.patches_overlapping(ra, dec)} == found


def _registry_rows(ra_centres, dec_centres, rng):
    rows = []
    for k, (ra0, dec0) in enumerate(zip(ra_centres, dec_centres, strict=True)):
        ra, dec = _square(ra0, dec0, 0.1, rot_deg=rng.uniform(0, 90))
        if k % 2:  # either sense round the polygon
            ra, dec = ra[::-1], dec[::-1]
        rows.append(
            {
                "visit": 1000 + k // 3,
                "detector": k % 3,
                **dict(zip(CORNER_RA_COLUMNS, ra, strict=True)),
                **dict(zip(CORNER_DEC_COLUMNS, dec, strict=True)),
            }
        )
    return pd.DataFrame(rows)


def test_ccd_patches_with_a_margin_hold_the_points_near_each_ccd():
    skymap = rings_sky_map(**SMALL_PATCHES)
    rng = np.random.default_rng(21)
    n = 9
    rows = _registry_rows(rng.uniform(55, 58, n), rng.uniform(-38, -35, n), rng)
    margin = 30.0
    result = ccd_patches(rows, skymap, margin_arcsec=margin)
    bare = ccd_patches(rows, skymap, margin_arcsec=0.0)
    assert set(result) == set(zip(rows["visit"], rows["detector"], strict=True))
    grew = 0
    for k, row in rows.iterrows():
        key = (int(row["visit"]), int(row["detector"]))
        ra = row[list(CORNER_RA_COLUMNS)].to_numpy(float)
        dec = row[list(CORNER_DEC_COLUMNS)].to_numpy(float)
        single = {(p.tract, p.patch) for p in skymap.patches_overlapping(ra, dec)}
        assert set(bare[key]) == single and result[key] == sorted(result[key])
        # Points up to 0.95 margin outside every edge.
        ra0, dec0 = ra.mean(), dec.mean()
        xi, eta = tan_project(ra, dec, ra0, dec0)
        grown = []
        for a in range(4):
            b = (a + 1) % 4
            t = np.linspace(0, 1, 40)
            ex, ey = xi[b] - xi[a], eta[b] - eta[a]
            normal = np.array([ey, -ex]) / np.hypot(ex, ey)
            if np.dot(normal, [xi[a], eta[a]]) < 0:
                normal = -normal
            shift = 0.95 * margin / 3600.0
            grown.append(
                tan_deproject(
                    xi[a] + t * ex + shift * normal[0],
                    eta[a] + t * ey + shift * normal[1],
                    ra0,
                    dec0,
                )
            )
        near_ra = np.concatenate([g[0] for g in grown])
        near_dec = np.concatenate([g[1] for g in grown])
        expected = _outer_patches_holding(skymap, near_ra, near_dec)
        assert expected <= set(result[key]), k
        grew += len(set(result[key]) - single)
    assert grew > 0  # the margin made a difference somewhere


def test_ccd_patches_of_ccds_off_the_map_and_bad_rows():
    rng = np.random.default_rng(2)
    rows = _registry_rows([10.0, 10.1, 80.0], [0.0, 0.0, 40.0], rng)
    fitted = discrete_sky_map(
        rows.loc[:1, list(CORNER_RA_COLUMNS)],
        rows.loc[:1, list(CORNER_DEC_COLUMNS)],
        **SMALL_PATCHES,
    )
    result = ccd_patches(rows, fitted, margin_arcsec=5.0)
    assert result[(1000, 2)] == [] and len(result[(1000, 0)]) > 0
    rows.loc[1, "corner_dec_3"] = np.nan
    with pytest.raises(ValueError, match=r"1 registry row.*visit 1000 detector 1 "):
        ccd_patches(rows, fitted, margin_arcsec=5.0)
    with pytest.raises(ValueError, match="footprint columns"):
        ccd_patches(rows.drop(columns=["corner_ra_2"]), fitted, margin_arcsec=5.0)


# -------------------------------------------------------------------- round trip
def test_to_dict_from_dict_round_trip_through_json():
    rng = np.random.default_rng(4)
    ra, dec = _dithered_ccd_corners(359.98, -60.0, rng)
    maps = [
        rings_sky_map(
            num_rings=50,
            tract_overlap_deg=0.02,
            pixel_scale_arcsec=0.3,
            patch_inner_size=2000,
            patch_border=60,
            projection="STG",
            ra_start_deg=12.5,
        ),
        discrete_sky_map(
            ra,
            dec,
            border_deg=0.013,
            tract_id=3,
            tract_overlap_deg=0.001,
            pixel_scale_arcsec=0.25,
            patch_inner_size=700,
            patch_border=20,
        ),
    ]
    test_ra, test_dec = _sphere_sample(rng, 2000)
    test_ra, test_dec = np.append(test_ra, ra.ravel()), np.append(test_dec, dec.ravel())
    for skymap in maps:
        data = skymap.to_dict()
        again = SkyMap.from_dict(json.loads(json.dumps(data)))
        assert again.to_dict() == data and again == skymap and again.kind == skymap.kind
        pd.testing.assert_frame_equal(again.tract_centres(), skymap.tract_centres())
        np.testing.assert_array_equal(
            again.find_tracts(test_ra, test_dec), skymap.find_tracts(test_ra, test_dec)
        )
        for tract_id in skymap.tract_ids[:: max(1, len(skymap) // 5)]:
            a, b = skymap.tract(int(tract_id)), again.tract(int(tract_id))
            assert a == b and a.wcs.to_header_string() == b.wcs.to_header_string()
    with pytest.raises(ValueError, match="format_version"):
        SkyMap.from_dict({**maps[0].to_dict(), "format_version": 99})
    with pytest.raises(ValueError, match="kind"):
        SkyMap.from_dict({**maps[0].to_dict(), "kind": "healpix"})


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="projection"):
        rings_sky_map(projection="XYZ")
    with pytest.raises(ValueError, match="num_rings"):
        rings_sky_map(num_rings=0)
    with pytest.raises(ValueError, match="pixel_scale_arcsec"):
        rings_sky_map(pixel_scale_arcsec=0.0)
    with pytest.raises(ValueError, match="ra_start_deg"):
        rings_sky_map(ra_start_deg=360.0)


def test_crowded_candidate_search_gives_the_same_patches(monkeypatch):
    import workflow_lib.static_sky.skymap as skymap_module

    skymap = rings_sky_map(**SMALL_PATCHES)
    rng = np.random.default_rng(8)
    rows = _registry_rows(rng.uniform(0, 360, 30), rng.uniform(-89, 89, 30), rng)
    expected = ccd_patches(rows, skymap, margin_arcsec=20.0)
    monkeypatch.setattr(skymap_module, "_NEAREST_TRACTS", 1)  # every polygon falls back
    assert ccd_patches(rows, skymap, margin_arcsec=20.0) == expected
