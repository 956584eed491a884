"""Master calibrations, defects and ISR checked against the tiny simulated survey's truth.

One detector of the tiny preset is rendered once per module: its bias, dark
and r-band flat exposures and two later r visits (raw and eimage). The steps
write real master files to a temporary directory; the numbers are compared
with the simulator's true response, dark current, defects and cosmic rays.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage

from workflow_lib.io import read_image_hdus, write_image_file, write_raw_file
from workflow_lib.sim.instrument import dark_rate_map, response_map
from workflow_lib.sim.presets import get_preset
from workflow_lib.sim.survey import plan_survey
from workflow_lib.single_frame.isr import eimage_exposure, process_amplifiers, run_isr
from workflow_lib.single_frame.master_calibs import build_master_bias
from workflow_lib.steps.calibs import (
    make_defects,
    make_master_bias,
    make_master_dark,
    make_master_flat,
    read_defects,
    read_master,
)

SEED = 7
DET = 1


def _robust_sigma(x: np.ndarray) -> float:
    q25, q75 = np.percentile(x, [25, 75])
    return float((q75 - q25) / 1.349)


def _header(cards: dict) -> fits.Header:
    h = fits.Header()
    for key, value in cards.items():
        h[key] = value
    return h


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Render detector 1 of the tiny preset: calibrations, two r visits; build the masters."""
    from workflow_lib.sim.render import render_exposure_detector
    from workflow_lib.sim.scene import make_scene

    root = tmp_path_factory.mktemp("calibs")
    plan = plan_survey(get_preset("tiny"), SEED)
    scene = make_scene(plan)
    cal = plan.calibrations
    paths: dict[str, list] = {"bias": [], "dark": [], "flat": []}
    for _, row in cal.iterrows():
        if row["obstype"] == "flat" and row["band"] != "r":
            continue
        r = render_exposure_detector(plan, None, int(row["exposure"]), DET)
        path = root / f"raw_{row['exposure']}_{DET}.fits"
        write_raw_file(path, _header(r.header), [(d, _header(c)) for d, c in r.amplifiers])
        paths[row["obstype"]].append(path)
    science = {}
    for visit in plan.later_visits("r")["visit"].iloc[:2]:
        raw = render_exposure_detector(plan, scene, int(visit), DET)
        eim = render_exposure_detector(plan, scene, int(visit), DET, image_format="eimage")
        science[int(visit)] = (raw, eim)
    out = {k: root / f"{k}.fits" for k in ("bias", "dark", "flat", "defects")}
    make_master_bias(raw_paths=paths["bias"], output_path=out["bias"])
    make_master_dark(raw_paths=paths["dark"], bias_path=out["bias"], output_path=out["dark"])
    make_master_flat(
        raw_paths=paths["flat"],
        bias_path=out["bias"],
        dark_path=out["dark"],
        output_path=out["flat"],
        band="r",
    )
    make_defects(dark_path=out["dark"], flat_paths=[out["flat"]], output_path=out["defects"])
    org = plan.origins.set_index("detector").loc[DET]
    resp = response_map(
        plan.preset, SEED, DET, "r", x0=org["x0"], y0=org["y0"], fp_radius=plan.fp_radius
    )
    return {
        "root": root,
        "plan": plan,
        "scene": scene,
        "paths": paths,
        "out": out,
        "science": science,
        "true_flat": resp / np.median(resp),
        "true_dark": dark_rate_map(plan.preset, SEED, DET),
    }


def test_master_bias_removes_the_bias(tiny):
    raws = [read_image_hdus(p) for p in tiny["paths"]["bias"]]
    frames = [process_amplifiers(amps, header=primary) for primary, amps in raws]
    master = build_master_bias(frames[:2])
    test = frames[2]
    for amp in test.amps:
        resid = (test.image - master.image)[amp.slices]
        n = resid.size
        sigma = amp.read_noise * np.sqrt(1 + 1 / 2)
        assert _robust_sigma(resid.ravel()) == pytest.approx(sigma, rel=0.1), amp.name
        # Mean within noise: pixel noise plus the per-row overscan correction's residual.
        budget = 5 * np.hypot(sigma / np.sqrt(n), amp.read_noise / np.sqrt(resid.shape[0]))
        assert abs(np.mean(resid)) < budget, amp.name
        # The fixed column pattern is gone: column means scatter as noise does.
        cols = resid.mean(axis=0)
        assert np.std(cols) < 1.3 * sigma / np.sqrt(resid.shape[0]) + 0.1, amp.name
    stored = read_master(tiny["out"]["bias"])
    assert stored.kind == "bias" and stored.n_frames == 3 and not stored.mask.any()
    prov = json.loads(fits.getheader(tiny["out"]["bias"])["PROVENAN"])
    assert len(prov["inputs"]) == 3 and prov["step"] == "make_master_bias"
    assert fits.getheader(tiny["out"]["bias"], "IMAGE")["BUNIT"] == "electron"


def test_master_dark_matches_true_dark_current(tiny):
    dark = read_master(tiny["out"]["dark"])
    true = tiny["true_dark"]
    assert (
        dark.kind == "dark"
        and fits.getheader(tiny["out"]["dark"], "IMAGE")["BUNIT"] == "electron/s"
    )
    pull = (dark.image - true) / np.sqrt(dark.variance)
    assert abs(np.median(pull)) < 0.05 and 0.9 < _robust_sigma(pull) < 1.1
    hot = true > 1.0
    assert hot.sum() > 10
    assert np.median(dark.image[hot] / true[hot]) == pytest.approx(1.0, abs=0.03)


def test_master_flat_matches_true_response(tiny):
    flat = read_master(tiny["out"]["flat"])
    assert flat.band == "r" and flat.kind == "flat"
    true = tiny["true_flat"]
    defects = read_defects(tiny["out"]["defects"])
    ok = ~defects & (true > 0.5)
    pull = ((flat.image - true) / np.sqrt(flat.variance))[ok]
    assert abs(np.median(pull)) < 0.05
    assert 0.9 < _robust_sigma(pull) < 1.1
    assert np.median(flat.image) == pytest.approx(1.0, abs=1e-4)


def test_defects_found_from_dark_and_flat(tiny):
    bad = read_defects(tiny["out"]["defects"])
    hot = tiny["true_dark"] > 0.3
    low = tiny["true_flat"] < 0.75
    assert (bad & hot).sum() >= 0.98 * hot.sum()
    assert (bad & low).sum() >= 0.98 * low.sum()
    near = ndimage.binary_dilation(hot | (tiny["true_flat"] < 0.85), iterations=1)
    # Column segments are flagged in blocks of rows: allow their ends.
    assert (bad & ~near).sum() < 1e-3 * bad.size
    header = fits.getheader(tiny["out"]["defects"])
    assert header["NDEFECT"] == bad.sum()


def test_flat_step_rejects_another_band(tiny, tmp_path):
    with pytest.raises(ValueError, match="expected flat of band 'g'"):
        make_master_flat(
            raw_paths=tiny["paths"]["flat"],
            bias_path=None,
            dark_path=None,
            output_path=tmp_path / "f.fits",
            band="g",
        )
    with pytest.raises(ValueError, match="OBSTYPE"):
        make_master_bias(raw_paths=tiny["paths"]["dark"], output_path=tmp_path / "b.fits")


def test_isr_matches_eimage_and_finds_cosmic_rays(tiny):
    masters = {k: read_master(tiny["out"][k]) for k in ("bias", "dark", "flat")}
    defects = read_defects(tiny["out"]["defects"])
    plan = tiny["plan"]
    for visit, (raw, eim) in tiny["science"].items():
        primary = _header(raw.header)
        amps = [(d.astype(">i4"), _header(c)) for d, c in raw.amplifiers]
        res = run_isr(primary, amps, defects=defects, **masters)
        exp = res.exposure
        expected = eim.eimage.astype(np.float64)  # same scene, other noise realisation
        crs = raw.cr_mask
        masked = exp.mask_of("BAD", "SAT", "CR", "INTRP", "SUSPECT")
        masked |= ndimage.binary_dilation(crs, iterations=2) | (expected > 8e4)
        pull = ((exp.image - expected) / np.sqrt(exp.variance + np.maximum(expected, 0)))[~masked]
        assert masked.mean() < 0.02
        assert abs(np.median(pull)) < 0.03
        assert 0.95 < _robust_sigma(pull) < 1.05
        # Cosmic rays: most found, hardly any elsewhere, none on bright star cores.
        found = exp.mask_of("CR")
        assert crs.sum() > 20
        assert (found & crs).sum() >= 0.9 * crs.sum()
        near = ndimage.binary_dilation(crs, structure=np.ones((3, 3)), iterations=2)
        assert (found & ~near).sum() <= 0.05 * found.sum() + 2
        wcs = plan.true_wcs(visit, DET)
        stars = tiny["scene"][tiny["scene"]["kind"] == "star"]
        x, y = wcs.sky_to_pixel(stars["ra"].to_numpy(), stars["dec"].to_numpy())
        on = (x > 2) & (x < 509) & (y > 2) & (y < 509) & (stars["r_mag"].to_numpy() < 21)
        ix, iy = np.round(x[on]).astype(int), np.round(y[on]).astype(int)
        cores = found[iy, ix] & ~near[iy, ix] & ~exp.mask_of("SAT")[iy, ix]
        assert on.sum() > 10 and cores.sum() == 0
        assert exp.metadata["ISR_BIAS"].startswith("done")
        # The eimage path: same cosmic rays, variance = image + read-noise floor.
        eres = eimage_exposure(eim.eimage, _header(eim.header))
        efound = eres.exposure.mask_of("CR")
        assert (efound & crs).sum() >= 0.9 * crs.sum()
        assert eres.steps["bias"] == "skipped: eimage"


def test_eimage_file_roundtrip_through_io(tiny, tmp_path):
    """eimage_exposure on what the I/O layer reads back (big-endian FITS, float32)."""
    visit, (_, eim) = next(iter(tiny["science"].items()))
    path = tmp_path / "eimage.fits"
    write_image_file(path, _header(eim.header), [], primary_data=eim.eimage)
    primary, images = read_image_hdus(path)
    res = eimage_exposure(images[0][0], primary)
    assert res.exposure.metadata["EXPID"] == visit
    assert np.all(res.exposure.variance > 0)
    assert res.exposure.mask_of("CR").sum() > 0
