"""The high-latitude presets and the simulator's camera knobs.

Plan- and scene-level checks are cheap; one highlat_tiny science exposure is
rendered through the workflow's writer, plus a bias per raw dtype and one
eimage of a parity-flipped camera.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits
from astropy.wcs import WCS

from workflow_lib.io import read_image_hdus, read_table, write_raw_file
from workflow_lib.sim.presets import get_preset, preset_names
from workflow_lib.sim.survey import plan_survey
from workflow_lib.single_frame.isr import assemble_amplifiers

SEED = 11
ARCMIN2_PER_DEG2 = 3600.0
SCHEMA = Path(__file__).resolve().parents[1] / "workflow_lib" / "schemas" / "config.schema.yaml"
# Targets of the high-latitude field, per arcmin^2.
GALAXY_TARGETS = {24.0: 30.0, 25.0: 60.0, 26.0: 110.0}
STAR_TARGET_R24 = 3.0


def _variant(base: str, **changes):
    """``base`` with some knobs changed (same name, so the same random plan)."""
    return dataclasses.replace(get_preset(base), **changes)


def _header(cards) -> fits.Header:
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    return header


def _write_rendered(rendered, path: Path) -> Path:
    amps = [(data, _header(cards)) for data, cards in rendered.amplifiers]
    write_raw_file(path, _header(rendered.header), amps)
    return path


def _poisson_close(n_obs: float, n_exp: float) -> bool:
    """Within 3 Poisson sigma plus 10% of the expectation."""
    return abs(n_obs - n_exp) <= 3.0 * np.sqrt(n_exp) + 0.1 * n_exp


def _cd_rotation_deg(cd: np.ndarray) -> float:
    """Sky rotation of a CD matrix of :func:`workflow_lib.sim.optics.cd_matrix` form."""
    return float(np.rad2deg(np.arctan2(cd[1, 0], cd[1, 1])))


def _header_cd(cards) -> np.ndarray:
    return np.array([[cards["CD1_1"], cards["CD1_2"]], [cards["CD2_1"], cards["CD2_2"]]])


# ------------------------------------------------------------ presets, plan
def test_highlat_presets_are_registered_and_configurable():
    from workflow_lib.core.config import validate_config

    schema = yaml.safe_load(SCHEMA.read_text())
    enum = schema["properties"]["sim"]["properties"]["preset"]["enum"]
    for name in ("highlat", "highlat_tiny"):
        assert name in preset_names() and name in enum
        p = get_preset(name)
        assert p.pixel_scale == 0.26 and p.det_nx != p.det_ny
        assert p.n_amps == 4 and p.galaxy_mag_max == 26.0
    assert get_preset("highlat").n_detectors == 4 and get_preset("highlat_tiny").n_detectors == 2
    assert set(enum) == {"tiny", "default", "highlat", "highlat_tiny"} <= set(preset_names())
    cfg = validate_config({"sim": {"preset": "highlat_tiny"}})
    assert cfg["sim"]["preset"] == "highlat_tiny"


@pytest.mark.parametrize("name", ["highlat", "highlat_tiny"])
def test_highlat_plan_has_templates_and_transient_epochs(name):
    plan = plan_survey(get_preset(name), SEED)
    p, v = plan.preset, plan.visits
    assert 6 <= len(v) <= 20
    for band in ("g", "r", "i"):
        mine = v[v["band"] == band]
        tmpl = mine[mine["template_quality"]]
        assert len(tmpl) >= 1 and (tmpl["mjd"] < p.template_mjd_end).all()
        assert (~mine["template_quality"]).sum() >= 1
    assert (v.loc[~v["template_quality"], "mjd"] > p.explosion_mjd_min).all()
    assert len(plan.later_visits("r")) >= 2
    # Seeing spans excellent templates to poor later visits.
    assert v.loc[v["template_quality"], "seeing"].between(*p.template_seeing).all()
    assert v.loc[~v["template_quality"], "seeing"].between(*p.later_seeing).all()
    assert p.template_seeing[0] <= 0.5 and p.later_seeing[1] >= 2.0
    assert (v["rotation_deg"].abs() <= p.rot_max_deg).all()


@pytest.mark.parametrize("name", ["highlat", "highlat_tiny"])
def test_highlat_scene_counts_match_the_targets(name):
    from workflow_lib.sim.scene import make_scene, scene_half_width_deg

    plan = plan_survey(get_preset(name), SEED)
    scene = make_scene(plan)
    area = (2.0 * scene_half_width_deg(plan)) ** 2 * ARCMIN2_PER_DEG2  # arcmin^2
    gal = scene.loc[scene["kind"] == "galaxy", "r_mag"].to_numpy()
    star = scene.loc[scene["kind"] == "star", "r_mag"].to_numpy()
    for mag, density in GALAXY_TARGETS.items():
        assert _poisson_close((gal < mag).sum(), density * area), (mag, (gal < mag).sum() / area)
    assert _poisson_close((star < 24.0).sum(), STAR_TARGET_R24 * area)
    assert gal.max() < 26.0 and gal.min() >= 17.5
    assert star.min() >= 15.0 and star.max() < 25.0
    # The refcat: bright stars and variables plus a few galaxies.
    ref = scene[scene["in_refcat"]]
    assert (ref["kind"] == "galaxy").sum() == 3
    points = ref[ref["kind"] != "galaxy"]
    assert (points["r_mag"] < get_preset(name).refcat_mag_limit).all() and len(points) >= 20


def test_highlat_tiny_has_few_bright_stars_per_ccd():
    from workflow_lib.sim.scene import make_scene

    plan = plan_survey(get_preset("highlat_tiny"), SEED)
    scene = make_scene(plan)
    bright = scene[scene["kind"].isin(["star", "variable"]) & (scene["r_mag"] < 22.0)]
    counts = []
    for visit in plan.visits["visit"]:
        det, x, y = plan.locate(bright["ra"].to_numpy(), bright["dec"].to_numpy(), int(visit))
        counts += np.bincount(det[det >= 0], minlength=len(plan.detectors)).tolist()
        # Non-square detectors: the located pixels fill the 512 x 448 CCD, no more.
        on = det >= 0
        assert (x[on] < 511.5).all() and (y[on] < 447.5).all()
    assert 4 <= np.median(counts) <= 20


def test_default_presets_keep_their_sky():
    """The knobs' defaults are the original survey (bit-identity is checked in test_sim)."""
    for name in ("tiny", "default"):
        p = get_preset(name)
        assert p.galaxy_mag_max == 25.5 and p.pixel_scale == 0.2
        assert (p.rotation_offset_deg, p.parity_flip, p.raw_dtype, p.obstype_keyword) == (
            0.0,
            False,
            "int32",
            "OBSTYPE",
        )
        assert p.header_wcs_offset_arcsec == 4.0 and p.header_wcs_rotation_deg == (0.1, 0.3)
        assert p.template_seeing == (0.48, 0.6) and p.later_seeing == (0.68, 1.2)


@pytest.mark.parametrize(
    "changes",
    [
        {"det_nx": 500, "n_amp_x": 3},
        {"det_ny": 449},
        {"raw_dtype": "int16"},
        {"obstype_keyword": "IMAGETYP"},
        {"header_wcs_offset_arcsec": 31.0},
        {"header_wcs_rotation_deg": (0.5, 2.5)},
        {"later_seeing": (1.0, 0.7)},
    ],
)
def test_bad_knobs_are_clear_errors(changes):
    with pytest.raises(ValueError, match="highlat_tiny"):
        _variant("highlat_tiny", **changes)


# ------------------------------------------------------- non-square camera
def test_non_square_amplifiers_tile_the_detector():
    from workflow_lib.sim.camera import amp_layouts, amplifier_electronics
    from workflow_lib.sim.instrument import full_well_map, response_map

    p = get_preset("highlat")
    covered = np.zeros((p.det_ny, p.det_nx), dtype=int)
    for amp in amp_layouts(p):
        covered[amp.det_y0 : amp.det_y0 + amp.ny, amp.det_x0 : amp.det_x0 + amp.nx] += 1
        assert amp.raw_shape == (320, amp.prescan + 384 + amp.overscan)
    assert (covered == 1).all()
    plan = plan_survey(p, SEED)
    el = amplifier_electronics(p, SEED)
    fw = full_well_map(p, amp_layouts(p), el[el["detector"] == 3])
    org = plan.origins.iloc[3]
    resp = response_map(p, SEED, 3, "r", x0=org["x0"], y0=org["y0"], fp_radius=plan.fp_radius)
    assert fw.shape == resp.shape == (640, 768) and (fw > 0).all()


# ---------------------------------------------------- one rendered survey file
@pytest.fixture(scope="module")
def highlat_tiny(tmp_path_factory):
    """Truth, refcat and one later r exposure (both detectors) of highlat_tiny."""
    from workflow_lib.steps.simulate import simulate_exposures, simulate_scene

    root = tmp_path_factory.mktemp("highlat_tiny")
    paths = {
        "truth_object_path": root / "truth_object.parquet",
        "truth_lightcurve_path": root / "truth_lightcurve.parquet",
        "truth_ccdvisit_path": root / "truth_ccdvisit.parquet",
        "truth_amplifier_path": root / "truth_amplifier.parquet",
        "refcat_path": root / "refcat.csv",
    }
    simulate_scene(preset="highlat_tiny", seed=SEED, **paths)
    plan = plan_survey(get_preset("highlat_tiny"), SEED)
    visit = int(plan.later_visits("r")["visit"].iloc[0])
    out = {d: root / f"raw_{visit}_{d}.fits" for d in plan.detectors}
    simulate_exposures(
        preset="highlat_tiny",
        seed=SEED,
        output_paths={visit: out},
        truth_object_path=paths["truth_object_path"],
    )
    return {"plan": plan, "visit": visit, "files": out, **{k: v for k, v in paths.items()}}


def test_highlat_tiny_file_is_contract_valid(highlat_tiny):
    from workflow_lib.core.registry import CORNER_COLUMNS
    from workflow_lib.steps.ingest import scan_files

    plan, visit = highlat_tiny["plan"], highlat_tiny["visit"]
    scanned = scan_files(list(highlat_tiny["files"].values()), image_format="raw")
    assert scanned.problems == []
    planned = plan.registry("raw")
    planned = planned[planned["exposure"] == visit].reset_index(drop=True)
    reg = scanned.registry.sort_values("detector", ignore_index=True)
    for col in ("exposure", "detector", "obstype", "band"):
        assert reg[col].tolist() == planned[col].tolist()
    for col in CORNER_COLUMNS:
        np.testing.assert_allclose(reg[col], planned[col], rtol=0, atol=1e-9)
    assert (reg["n_amplifiers"] == 4).all()
    primary, amps = read_image_hdus(highlat_tiny["files"][0])
    assert primary["OBSTYPE"] == "SCIENCE" and primary["DETSIZE"] == "[1:512,1:448]"
    scale = np.sqrt(abs(np.linalg.det(_header_cd(primary)))) * 3600.0
    assert scale == pytest.approx(0.26, rel=1e-9)
    image = assemble_amplifiers(amps, overscan_subtract=True)
    assert image.shape == (448, 512)
    for data, header in amps:
        assert data.dtype == np.int32 and data.max() <= header["SATURATE"]
    # Sky per pixel scales with the pixel area: ~1700 e- in r at 0.26".
    ccd = read_table(highlat_tiny["truth_ccdvisit_path"])
    row = ccd[(ccd["visit"] == visit) & (ccd["detector"] == 0)].iloc[0]
    gain = np.mean([h["GAIN"] for _, h in amps])
    assert np.median(image) * gain == pytest.approx(row["sky"], rel=0.1)


def test_highlat_tiny_truth_tables_and_refcat(highlat_tiny):
    plan = highlat_tiny["plan"]
    ccd = read_table(highlat_tiny["truth_ccdvisit_path"])
    assert len(ccd) == len(plan.visits) * len(plan.detectors)
    assert (ccd.loc[ccd["template_quality"], "seeing"] < 0.9).all()
    assert ccd["seeing"].max() > 1.2
    wcs = WCS(fits.Header.fromstring(ccd["wcs_header"].iloc[0]))
    assert np.sqrt(abs(np.linalg.det(wcs.wcs.cd))) * 3600 == pytest.approx(0.26)
    lc = read_table(highlat_tiny["truth_lightcurve_path"])
    on = lc["detector"] >= 0
    assert on.any() and (lc.loc[on, "x"] < 511.5).all() and (lc.loc[on, "y"] < 447.5).all()
    ref = read_table(highlat_tiny["refcat_path"])
    assert (ref["starnotgal"] == 0).sum() == 3 and (ref["starnotgal"] == 1).sum() >= 20
    obj = read_table(highlat_tiny["truth_object_path"])
    assert obj.loc[obj["kind"] == "galaxy", "r_mag"].max() > 25.8


def test_highlat_tiny_stars_sit_at_their_true_positions(highlat_tiny):
    """Centroids of bright isolated stars on the 0.26" pixels agree with the true WCS."""
    import sep

    plan, visit = highlat_tiny["plan"], highlat_tiny["visit"]
    obj = read_table(highlat_tiny["truth_object_path"])
    dx, dy = [], []
    for det, path in highlat_tiny["files"].items():
        _, amps = read_image_hdus(path)
        image = assemble_amplifiers(amps, overscan_subtract=True, dtype=np.float64)
        _, x, y = _isolated_bright_stars(plan, obj, visit, det, "r")
        data = image - np.median(image)
        seeing = float(plan.exposure_info(visit)["seeing"])
        xc, yc, flag = sep.winpos(data, x, y, np.full(len(x), seeing / 0.26 / 2.355))
        dx += list((xc - x)[flag == 0])
        dy += list((yc - y)[flag == 0])
    assert len(dx) >= 4  # few stars: a high-latitude field
    assert np.median(np.abs(dx)) < 0.1 and np.median(np.abs(dy)) < 0.1


def _isolated_bright_stars(plan, obj, visit, det, band, *, mag=(16.0, 22.0), edge=30.0):
    """Row numbers and true 0-based pixel positions of isolated stars in a magnitude range."""
    wcs = plan.true_wcs(visit, det)
    x, y = wcs.sky_to_pixel(obj["ra"].to_numpy(), obj["dec"].to_numpy())
    m = obj[f"{band}_mag"].to_numpy()
    p = plan.preset
    inside = (x > edge) & (x < p.det_nx - edge) & (y > edge) & (y < p.det_ny - edge)
    cand = np.flatnonzero(inside & (obj["kind"] == "star").to_numpy() & (m > mag[0]) & (m < mag[1]))
    near = np.flatnonzero((x > -50) & (x < p.det_nx + 50) & (y > -50) & (y < p.det_ny + 50))
    keep = []
    for i in cand:
        d = np.hypot(x[near] - x[i], y[near] - y[i])
        brighter = m[near] < m[i] + 2.0
        if not np.any((d > 0) & (d < 12) & brighter):
            keep.append(i)
    return np.array(keep, dtype=int), x[keep], y[keep]


# ----------------------------------------------------------------- the knobs
@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_raw_dtype_knob(dtype, tmp_path):
    from workflow_lib.sim.render import render_exposure_detector
    from workflow_lib.sim.truth import truth_amplifier
    from workflow_lib.steps.ingest import scan_files

    preset = _variant("highlat_tiny", raw_dtype=dtype)
    plan = plan_survey(preset, SEED)
    base = plan_survey(get_preset("highlat_tiny"), SEED)
    bias = int(plan.calibrations["exposure"].iloc[0])
    path = _write_rendered(render_exposure_detector(plan, None, bias, 1), tmp_path / "b.fits")
    assert scan_files([path], image_format="raw").problems == []
    _, amps = read_image_hdus(path)
    assert all(data.dtype == np.dtype(dtype) for data, _ in amps)
    assert assemble_amplifiers(amps, overscan_subtract=True).shape == (448, 512)
    amp = truth_amplifier(plan)
    if dtype == "uint16":
        assert fits.getheader(path, 1)["BITPIX"] == 16
        assert (amp["saturate"] <= 65535).all() and amp["gain"].between(2.7, 5.4).all()
        for data, header in amps:
            assert data.max() <= header["SATURATE"] <= 65535
    else:
        assert fits.getheader(path, 1)["BITPIX"] == -32
        pd_amp = truth_amplifier(base)
        np.testing.assert_array_equal(amp["saturate"], pd_amp["saturate"])
        ref = render_exposure_detector(base, None, bias, 1).amplifiers
        for (data, _), (ints, _) in zip(amps, ref, strict=True):
            assert np.abs(data.astype(np.float64) - ints).max() <= 0.5 + 1e-3
            assert np.any(data != np.rint(data))  # fractional ADU are kept


def test_imgtype_keyword_knob(tmp_path):
    from workflow_lib.sim.render import primary_header, render_exposure_detector
    from workflow_lib.steps.ingest import scan_files

    plan = plan_survey(_variant("highlat_tiny", obstype_keyword="IMGTYPE"), SEED)
    visit = int(plan.visits["visit"].iloc[0])
    cards = primary_header(plan, visit, 0, "raw")
    assert cards["IMGTYPE"] == "SCIENCE" and "OBSTYPE" not in cards
    default = primary_header(plan_survey(get_preset("highlat_tiny"), SEED), visit, 0, "raw")
    assert default["OBSTYPE"] == "SCIENCE"
    dark = int(plan.calibrations.query("obstype == 'dark'")["exposure"].iloc[0])
    path = _write_rendered(render_exposure_detector(plan, None, dark, 0), tmp_path / "d.fits")
    header = fits.getheader(path)
    assert header["IMGTYPE"] == "DARK" and "OBSTYPE" not in header
    scanned = scan_files([path], image_format="raw")
    assert scanned.problems == [] and scanned.registry["obstype"].tolist() == ["dark"]


def test_parity_flip_knob_plan():
    """Both WCSs of a mirrored camera have det(CD) > 0 (the sky's own parity is det < 0)."""
    flipped = plan_survey(_variant("highlat_tiny", parity_flip=True), SEED)
    normal = plan_survey(get_preset("highlat_tiny"), SEED)
    for visit in flipped.visits["visit"]:
        for det in flipped.detectors:
            true_f = flipped.true_wcs(int(visit), det).cd_array
            true_n = normal.true_wcs(int(visit), det).cd_array
            head_f = _header_cd(flipped.header_wcs(int(visit), det))
            head_n = _header_cd(normal.header_wcs(int(visit), det))
            assert np.linalg.det(true_n) < 0 and np.linalg.det(head_n) < 0
            assert np.linalg.det(true_f) > 0 and np.linalg.det(head_f) > 0
            np.testing.assert_allclose(true_f[:, 0], -true_n[:, 0])
            np.testing.assert_allclose(true_f[:, 1], true_n[:, 1])
    # The registry footprint (header WCS) still covers the true footprint.
    reg = flipped.registry("raw").query("obstype == 'science'")
    row = reg.iloc[0]
    wcs = flipped.true_wcs(int(row["exposure"]), int(row["detector"]))
    ra, dec = wcs.pixel_to_sky(
        np.array([-0.5, 511.5, 511.5, -0.5]), np.array([-0.5, -0.5, 447.5, 447.5])
    )
    cra = row[[f"corner_ra_{k}" for k in range(1, 5)]].to_numpy(float)
    cdec = row[[f"corner_dec_{k}" for k in range(1, 5)]].to_numpy(float)
    sep = np.hypot((cra - ra) * np.cos(np.deg2rad(dec)), cdec - dec) * 3600.0
    assert sep.max() < 30.0


def test_parity_flip_knob_pixels():
    """Stars of a mirrored camera's image sit where its true WCS (and truth table) puts them."""
    import sep

    from workflow_lib.sim.render import render_exposure_detector
    from workflow_lib.sim.scene import make_scene
    from workflow_lib.sim.truth import truth_lightcurve

    plan = plan_survey(_variant("tiny", parity_flip=True), SEED)
    scene = make_scene(plan)
    visit, det = int(plan.later_visits("r")["visit"].iloc[0]), 1
    rendered = render_exposure_detector(plan, scene, visit, det, image_format="eimage")
    image = rendered.eimage.astype(np.float64)
    header = _header(rendered.header)
    assert np.linalg.det(_header_cd(header)) > 0
    truth = WCS(fits.Header.fromstring(plan.true_wcs(visit, det).header_string()))
    assert np.linalg.det(truth.wcs.cd) > 0
    idx, x, y = _isolated_bright_stars(plan, scene, visit, det, "r")
    # The truth header (astropy's TAN-SIP) and the plan agree on the pixel positions.
    ax, ay = truth.all_world2pix(scene["ra"].to_numpy()[idx], scene["dec"].to_numpy()[idx], 0)
    np.testing.assert_allclose(ax, x, atol=1e-3)
    np.testing.assert_allclose(ay, y, atol=1e-3)
    # Centroids in the image agree with them.
    seeing = float(plan.exposure_info(visit)["seeing"])
    xc, yc, flag = sep.winpos(image - np.median(image), x, y, np.full(len(x), seeing / 0.2 / 2.355))
    good = flag == 0
    assert good.sum() >= 10
    assert np.median(np.abs(xc - x)[good]) < 0.05 and np.median(np.abs(yc - y)[good]) < 0.05
    # The header WCS is mirrored too: it puts the stars within its pointing error.
    hx, hy = WCS(header).all_world2pix(*truth.all_pix2world(x, y, 0), 0)
    assert np.max(np.hypot(hx - x, hy - y)) * 0.2 < 30.0
    # The truth light-curve table uses the same (mirrored) positions.
    lc = truth_lightcurve(plan, scene)
    lc = lc[(lc["visit"] == visit) & (lc["detector"] == det)]
    if len(lc):
        src = scene.set_index("id").loc[lc["id"]]
        tx, ty = truth.all_world2pix(src["ra"].to_numpy(), src["dec"].to_numpy(), 0)
        np.testing.assert_allclose(lc["x"], tx, atol=1e-3)
        np.testing.assert_allclose(lc["y"], ty, atol=1e-3)


@pytest.mark.parametrize("offset", [90.0, 180.0])
def test_rotation_offset_knob(offset):
    plan = plan_survey(_variant("highlat_tiny", rotation_offset_deg=offset), SEED)
    base = plan_survey(get_preset("highlat_tiny"), SEED)
    np.testing.assert_allclose(plan.visits["rotation_deg"], base.visits["rotation_deg"] + offset)
    for visit in plan.visits["visit"]:
        for det in plan.detectors:
            rot = float(base.visits.set_index("visit").loc[visit, "rotation_deg"])
            header = _header_cd(plan.header_wcs(int(visit), det))
            true = plan.true_wcs(int(visit), det).cd_array
            d_true = (_cd_rotation_deg(true) - rot - offset + 180.0) % 360.0 - 180.0
            d_head = (_cd_rotation_deg(header) - rot - offset + 180.0) % 360.0 - 180.0
            assert abs(d_true) < 1e-9 and 0.1 - 1e-9 <= abs(d_head) <= 0.3 + 1e-9
            # The pixel x axis points north (90) or east (180) instead of west
            # (to within the 1.5 deg dither rotations and the header error).
            s = 0.26 / 3600.0
            if offset == 90.0:
                assert abs(header[1, 0] - s) < 0.05 * s and abs(header[0, 0]) < 0.05 * s
            else:
                assert abs(header[0, 0] - s) < 0.05 * s and abs(header[1, 1] + s) < 0.05 * s
    # Calibration frames keep rotation 0.
    bias = int(plan.calibrations["exposure"].iloc[0])
    assert plan.exposure_info(bias)["rotation_deg"] == 0.0


@pytest.mark.parametrize(
    ("offset", "rotation"), [(4.0, (0.1, 0.3)), (30.0, (1.5, 2.0)), (0.0, (0.0, 0.0))]
)
def test_header_wcs_error_knobs(offset, rotation):
    preset = _variant("highlat", header_wcs_offset_arcsec=offset, header_wcs_rotation_deg=rotation)
    plan = plan_survey(preset, SEED)
    p = plan.preset
    cx, cy = (p.det_nx - 1) / 2.0, (p.det_ny - 1) / 2.0
    d_rot, d_pos = [], []
    for visit in plan.visits["visit"]:
        for det in plan.detectors:
            cards = plan.header_wcs(int(visit), det)
            true = plan.true_wcs(int(visit), det)
            assert (cards["CRPIX1"], cards["CRPIX2"]) == (cx + 1.0, cy + 1.0)
            ra, dec = true.pixel_to_sky(np.array([cx]), np.array([cy]))
            dra = ((cards["CRVAL1"] - ra[0] + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(dec[0]))
            d_pos.append((dra * 3600.0, (cards["CRVAL2"] - dec[0]) * 3600.0))
            diff = _cd_rotation_deg(_header_cd(cards)) - _cd_rotation_deg(true.cd_array)
            d_rot.append((diff + 180.0) % 360.0 - 180.0)
    d_rot, d_pos = np.abs(d_rot), np.array(d_pos)
    assert (d_rot >= rotation[0] - 1e-9).all() and (d_rot <= rotation[1] + 1e-9).all()
    sigma = offset * np.sqrt(1.0 + 1.0 / 16.0)  # per axis: exposure plus detector errors
    if offset == 0.0:
        assert np.abs(d_pos).max() < 1e-6
    else:
        assert 0.5 * sigma < np.sqrt(np.mean(d_pos**2)) < 1.6 * sigma
        assert np.abs(d_pos).max() < 4.5 * sigma
