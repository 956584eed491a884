"""The built-in survey simulator, checked independently of the pipeline.

The tiny preset is simulated once per session (raw and eimage); the tests
check the plan, the file format, determinism, raw-vs-eimage consistency, and
that photometry, PSF size and astrometry measured on the images agree with the
truth tables.
"""

from __future__ import annotations

import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from workflow_lib.core.registry import parse_section
from workflow_lib.io import read_image_hdus, read_table
from workflow_lib.sim.presets import get_preset
from workflow_lib.sim.survey import plan_survey
from workflow_lib.single_frame.isr import assemble_amplifiers

PRESET = "tiny"
SEED = 7
CONTRACT_KEYS = (
    "OBSTYPE",
    "EXPID",
    "DETECTOR",
    "FILTER",
    "MJD-OBS",
    "EXPTIME",
    "RA",
    "DEC",
    "CTYPE1",
    "CTYPE2",
    "CRVAL1",
    "CRVAL2",
    "CRPIX1",
    "CRPIX2",
    "CD1_1",
    "CD1_2",
    "CD2_1",
    "CD2_2",
)
AMP_KEYS = ("EXTNAME", "DATASEC", "BIASSEC", "DETSEC", "GAIN", "RDNOISE", "SATURATE")


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    """Simulate the tiny preset: truth, refcat, every raw exposure and every eimage."""
    from workflow_lib.steps.simulate import simulate_exposures, simulate_scene

    root = tmp_path_factory.mktemp("sim")
    paths = {
        "truth_object_path": root / "truth_object.parquet",
        "truth_lightcurve_path": root / "truth_lightcurve.parquet",
        "truth_ccdvisit_path": root / "truth_ccdvisit.parquet",
        "truth_amplifier_path": root / "truth_amplifier.parquet",
        "refcat_path": root / "refcat.csv",
    }
    simulate_scene(preset=PRESET, seed=SEED, **paths)
    plan = plan_survey(get_preset(PRESET), SEED)
    files: dict[tuple[str, int, int], Path] = {}
    for fmt in ("raw", "eimage"):
        reg = plan.registry(fmt)
        for exposure in reg["exposure"].unique():
            out = {d: root / fmt / f"{fmt}_{exposure}_{d}.fits" for d in plan.detectors}
            simulate_exposures(
                preset=PRESET,
                seed=SEED,
                output_paths={int(exposure): out},
                truth_object_path=paths["truth_object_path"],
                image_format=fmt,
            )
            files.update({(fmt, int(exposure), d): p for d, p in out.items()})
    return {
        "root": root,
        "plan": plan,
        "files": files,
        "truth_object": read_table(paths["truth_object_path"]),
        "truth_lightcurve": read_table(paths["truth_lightcurve_path"]),
        "truth_ccdvisit": read_table(paths["truth_ccdvisit_path"]),
        "truth_amplifier": read_table(paths["truth_amplifier_path"]),
        "refcat_path": paths["refcat_path"],
    }


# ------------------------------------------------------------------ the plan
def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="known presets: tiny"):
        get_preset("huge")


def test_plan_survey_does_not_import_galsim():
    code = (
        "import sys, time\n"
        "import workflow_lib.sim.survey as s\n"
        "from workflow_lib.sim.presets import get_preset\n"
        "t = time.perf_counter(); p = s.plan_survey(get_preset('default'), 3)\n"
        "dt = time.perf_counter() - t\n"
        "p.registry('raw'); p.registry('eimage')\n"
        "assert 'galsim' not in sys.modules, 'galsim imported'\n"
        "print(dt)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 0.1


def test_plan_content():
    plan = plan_survey(get_preset(PRESET), SEED)
    v = plan.visits
    assert set(v["band"]) >= {"g", "r", "i"}
    assert (v["visit"] >= 100_000).all() and v["visit"].is_unique
    # Dithers of arcsec to tens of arcsec and small rotations.
    sep = np.hypot(
        (v["ra"] - v["ra"].mean()) * np.cos(np.deg2rad(v["dec"])), v["dec"] - v["dec"].mean()
    )
    assert sep.max() * 3600 > 3.0
    assert 0.1 < v["rotation_deg"].abs().max() <= 2.0
    tmpl = v[v["template_quality"]]
    assert (tmpl["mjd"] < 60630).all() and (tmpl["band"] == "r").sum() >= 2
    assert (v.loc[~v["template_quality"], "mjd"] > 60632).all()
    assert ((v["band"] == "r") & ~v["template_quality"]).sum() >= 4
    # Same seed -> same plan; another seed -> another plan.
    pd.testing.assert_frame_equal(v, plan_survey(get_preset(PRESET), SEED).visits)
    assert not np.allclose(v["ra"], plan_survey(get_preset(PRESET), SEED + 1).visits["ra"])


def test_registry_schema():
    plan = plan_survey(get_preset(PRESET), SEED)
    raw = plan.registry("raw")
    assert list(raw.columns) == [
        "exposure",
        "visit",
        "detector",
        "obstype",
        "band",
        "mjd",
        "exptime",
        "darktime",
        "ra",
        "dec",
        "corner_ra_1",
        "corner_ra_2",
        "corner_ra_3",
        "corner_ra_4",
        "corner_dec_1",
        "corner_dec_2",
        "corner_dec_3",
        "corner_dec_4",
    ]
    for col in ("exposure", "visit", "detector"):
        assert raw[col].dtype == np.int64
    assert set(raw["obstype"]) == {"science", "bias", "dark", "flat"}
    sci = raw[raw["obstype"] == "science"]
    assert (sci["visit"] == sci["exposure"]).all()
    cal = raw[raw["obstype"] != "science"]
    assert (cal["visit"] == -1).all() and cal["exposure"].min() > sci["exposure"].max()
    assert set(cal.loc[cal["obstype"] == "flat", "band"]) == set(plan.preset.bands)
    assert (cal.loc[cal["obstype"].isin(["bias", "dark"]), "band"] == "").all()
    assert len(raw) == raw[["exposure", "detector"]].drop_duplicates().shape[0]
    eim = plan.registry("eimage")
    assert (eim["obstype"] == "science").all() and len(eim) == len(sci)
    with pytest.raises(ValueError):
        plan.registry("calexp")


# --------------------------------------------------------------- the scene
def test_truth_tables(sim):
    obj = sim["truth_object"]
    assert set(obj["kind"]) == {"star", "galaxy", "transient", "variable"}
    assert obj["id"].is_unique and obj["id"].dtype == np.int64
    for col in (
        "ra",
        "dec",
        "g_mag",
        "r_mag",
        "i_mag",
        "sersic_n",
        "hlr_arcsec",
        "e1",
        "e2",
        "host_id",
        "in_refcat",
        "t0_mjd",
    ):
        assert col in obj
    gal = obj[obj["kind"] == "galaxy"]
    assert gal["hlr_arcsec"].between(0.2, 1.5).all()
    assert obj.loc[obj["kind"] == "star", "hlr_arcsec"].isna().all()
    tr = obj[obj["kind"] == "transient"]
    assert (tr["t0_mjd"] > 60632).all()
    assert (tr["host_id"] == -1).any() and (tr["host_id"] > 0).any()
    assert set(tr.loc[tr["host_id"] > 0, "host_id"]) <= set(gal["id"])
    amp = sim["truth_amplifier"]
    assert amp["gain"].between(0.9, 1.8).all() and amp["read_noise"].between(4, 9).all()
    ccd = sim["truth_ccdvisit"]
    assert len(ccd) == len(sim["plan"].visits) * len(sim["plan"].detectors)
    assert ccd["seeing"].between(0.5, 1.4).all()
    assert (ccd.loc[ccd["template_quality"], "seeing"] < 0.9).all()


def test_guaranteed_transients_are_bright_on_later_r_visits(sim):
    obj = sim["truth_object"].set_index("id")
    lc = sim["truth_lightcurve"]
    later_r = sim["plan"].later_visits("r")["visit"]
    tr_ids = obj.index[obj["kind"] == "transient"]
    lcr = lc[lc["visit"].isin(later_r) & lc["id"].isin(tr_ids)]
    on_all = lcr.groupby("id")["detector"].apply(lambda d: (d >= 0).all())
    bright = lcr.groupby("id")["mag"].min() < 21.5
    good = on_all & bright
    assert good.sum() >= 1
    assert (obj.loc[good[good].index, "host_id"] == -1).any()  # one of them hostless
    # Zero flux before explosion, in every band.
    pre = lc[lc["id"].isin(tr_ids) & (lc["mjd"] < 60632)]
    assert len(pre) and (pre["flux"] == 0).all() and np.isinf(pre["mag"]).all()


def test_refcat(sim):
    raw = Path(sim["refcat_path"]).read_text().splitlines()[0]
    assert raw.replace(" ", "").startswith(
        "#uniqueId,raJ2000,decJ2000,lsst_g,lsst_r,lsst_i,starnotgal,isvariable"
    )
    ref = read_table(sim["refcat_path"])
    obj = sim["truth_object"].set_index("id")
    truth = obj.loc[ref["uniqueId"]]
    stars = ref["starnotgal"] == 1
    assert (truth.loc[stars.to_numpy(), "kind"].isin(["star", "variable"])).all()
    assert (ref["starnotgal"] == 0).sum() >= 1
    assert (truth["r_mag"].to_numpy()[stars] < 22.0).all()
    assert (ref["isvariable"].to_numpy() == (truth["kind"] == "variable").to_numpy()).all()
    assert ref["isvariable"].sum() >= 1
    dpos = (
        np.hypot(
            (ref["raJ2000"].to_numpy() - truth["ra"].to_numpy())
            * np.cos(np.deg2rad(truth["dec"].to_numpy())),
            ref["decJ2000"].to_numpy() - truth["dec"].to_numpy(),
        )
        * 3.6e6
    )  # mas
    assert 3.0 < np.sqrt(np.mean(dpos**2)) < 12.0
    bright = truth["r_mag"].to_numpy() < 20
    dmag = ref["lsst_r"].to_numpy()[bright] - truth["r_mag"].to_numpy()[bright]
    assert 0.003 < np.std(dmag) < 0.012 and abs(np.mean(dmag)) < 0.003
    # Every refcat star that is on the field is rarely unsaturated-and-bright-enough: just
    # check the refcat is a usable size.
    assert stars.sum() >= 60


# ------------------------------------------------------------- file format
def test_every_raw_file_has_the_contract_keywords(sim):
    for (fmt, exposure, det), path in sim["files"].items():
        primary, images = read_image_hdus(path)
        for key in CONTRACT_KEYS:
            assert key in primary, f"{path.name} lacks {key}"
        assert primary["EXPID"] == exposure and primary["DETECTOR"] == det
        assert primary["OBSTYPE"].lower() in {"science", "bias", "dark", "flat"}
        if primary["OBSTYPE"].lower() in {"science", "flat"}:
            assert primary["FILTER"] in "ugrizy"
        if fmt == "raw":
            assert len(images) == get_preset(PRESET).n_amps
            for data, header in images:
                assert np.issubdtype(data.dtype, np.integer)
                for key in AMP_KEYS:
                    assert key in header, f"{path.name}[{header.get('EXTNAME')}] lacks {key}"
                assert data.max() <= header["SATURATE"]
        else:
            assert primary["GAIN"] == 1.0 and len(images) == 1
            assert images[0][0].dtype == np.float32


def test_plan_footprint_corners_equal_the_header_scan(sim):
    """The registry the DAG is built from (the plan) gives the corners the files give."""
    from workflow_lib.core.registry import CORNER_COLUMNS
    from workflow_lib.steps.ingest import scan_files

    for fmt in ("raw", "eimage"):
        files = [p for (f, _, _), p in sim["files"].items() if f == fmt]
        scanned = scan_files(files, image_format=fmt)
        assert scanned.problems == []
        planned = sim["plan"].registry(fmt)
        merged = planned.merge(
            scanned.registry, on=["exposure", "detector"], suffixes=("", "_scan")
        )
        assert len(merged) == len(planned) == len(scanned.registry)
        science = merged["obstype"] == "science"
        assert science.any()
        for col in CORNER_COLUMNS:
            plan_value, scan_value = merged[col].to_numpy(), merged[col + "_scan"].to_numpy()
            assert np.isnan(plan_value[~science]).all() and np.isnan(scan_value[~science]).all()
            diff = plan_value[science] - scan_value[science]
            if col.startswith("corner_ra"):
                diff = (diff + 180.0) % 360.0 - 180.0
            assert np.abs(diff).max() < 1e-9, col
        # Corners 1 and 3 span the detector diagonal (outer pixel edges).
        sci = merged[science]
        size = np.hypot(
            (sci["corner_ra_1"] - sci["corner_ra_3"]) * np.cos(np.deg2rad(sci["corner_dec_1"])),
            sci["corner_dec_1"] - sci["corner_dec_3"],
        )
        preset = sim["plan"].preset
        expected = np.hypot(preset.det_nx, preset.det_ny) * preset.pixel_scale / 3600
        assert np.allclose(size, expected, rtol=1e-3)


def test_determinism(sim, tmp_path):
    from workflow_lib.steps.simulate import simulate_exposures

    plan = sim["plan"]
    cases = [
        ("raw", int(plan.later_visits("r")["visit"].iloc[0])),
        ("raw", 900_100),
        ("eimage", int(plan.visits["visit"].iloc[0])),
    ]
    for fmt, exposure in cases:
        out = {d: tmp_path / f"{fmt}_{exposure}_{d}.fits" for d in plan.detectors}
        simulate_exposures(
            preset=PRESET,
            seed=SEED,
            output_paths={exposure: out},
            truth_object_path=sim["root"] / "truth_object.parquet",
            image_format=fmt,
        )
        for d in plan.detectors:
            _, a = read_image_hdus(out[d])
            _, b = read_image_hdus(sim["files"][(fmt, exposure, d)])
            for (da, _), (db, _) in zip(a, b, strict=True):
                np.testing.assert_array_equal(da, db)


# ------------------------------------------------------- pixels vs. truth
def _assembled(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overscan-subtracted ADU, gain map and saturation flag of a raw file."""
    _, amps = read_image_hdus(path)
    image = assemble_amplifiers(amps, overscan_subtract=True, dtype=np.float64)
    gain = np.zeros_like(image)
    sat = np.zeros(image.shape, dtype=bool)
    for data, header in amps:
        det = parse_section(header["DETSEC"])
        ds = parse_section(header["DATASEC"])
        gain[det.slices] = header["GAIN"]
        s = data[ds.slices] >= header["SATURATE"]
        s = s[:, ::-1] if det.x_flip else s
        sat[det.slices] = s[::-1, :] if det.y_flip else s
    return image, gain, sat


def _robust_sigma(x: np.ndarray) -> float:
    q25, q75 = np.percentile(x, [25, 75])
    return float((q75 - q25) / 1.349)


def test_raw_calibrated_by_truth_matches_eimage(sim):
    """Assembled raw minus bias and dark, times gain, over the true response == eimage."""
    from scipy import ndimage

    from workflow_lib.sim.instrument import add_cosmic_rays, dark_rate_map, response_map
    from workflow_lib.sim.seeds import rng_for

    plan = sim["plan"]
    files = sim["files"]
    p = plan.preset
    visit = int(plan.later_visits("r")["visit"].iloc[1])
    det = 1
    info = plan.exposure_info(visit)
    bias = np.mean(
        [_assembled(files[("raw", e, det)])[0] for e in range(900_000, 900_000 + p.n_bias)], axis=0
    )
    darks = [
        _assembled(files[("raw", e, det)])[0] - bias for e in range(900_100, 900_100 + p.n_dark)
    ]
    dark_rate = np.median(darks, axis=0) / (p.dark_exptime + 1.0)  # ADU/s (median rejects CRs)
    sci, gain, sat = _assembled(files[("raw", visit, det)])
    electrons = (sci - bias - dark_rate * info["darktime"]) * gain
    org = plan.origins.iloc[det]
    resp = response_map(p, SEED, det, "r", x0=org["x0"], y0=org["y0"], fp_radius=plan.fp_radius)
    med = float(np.median(resp))
    flat = resp / med
    flat = np.maximum(flat, 1e-3)  # dead pixels are masked below
    calibrated = electrons / flat
    eimage = read_image_hdus(files[("eimage", visit, det)])[1][0][0].astype(np.float64)

    crs = np.zeros(resp.shape)
    mask = add_cosmic_rays(
        crs, rng_for(SEED, "cosmic_rays", visit, det), rate=p.cr_rate, darktime=info["darktime"]
    )
    mask |= sat | (resp < 0.8 * med) | (dark_rate_map(p, SEED, det) > 0.1) | (eimage > 8e4)
    for e in range(900_100, 900_100 + p.n_dark):  # CRs of the dark frames
        mask |= (_assembled(files[("raw", e, det)])[0] - bias) * gain > 200
    mask = ndimage.binary_dilation(mask, iterations=2)
    amp = sim["truth_amplifier"]
    rn = amp.loc[amp["detector"] == det, "read_noise"].mean()
    var_raw = np.maximum(eimage, 0) / med / flat + (rn**2 * (1 + 1 / p.n_bias + 0.2)) / flat**2
    var = var_raw + np.maximum(eimage, 0)
    pull = ((calibrated - eimage) / np.sqrt(var))[~mask]
    assert mask.mean() < 0.1
    assert abs(np.median(pull)) < 0.05
    assert 0.9 < _robust_sigma(pull) < 1.1
    # The mean difference is tiny compared with the sky.
    diff = (calibrated - eimage)[~mask]
    sky = sim["truth_ccdvisit"].query("visit == @visit and detector == @det")["sky"].iloc[0]
    assert abs(np.mean(diff)) < 0.003 * sky
    assert np.median(eimage[~mask]) == pytest.approx(sky, rel=0.02)


def _stars_on(sim, visit: int, det: int, image: np.ndarray, *, wcs: WCS):
    """Isolated, unsaturated, non-variable stars on the image with true pixel positions."""
    obj = sim["truth_object"]
    ccd = sim["truth_ccdvisit"].query("visit == @visit and detector == @det").iloc[0]
    band = ccd["band"]
    x, y = wcs.all_world2pix(obj["ra"].to_numpy(), obj["dec"].to_numpy(), 0)
    flux_e = 10 ** (-0.4 * (obj[f"{band}_mag"].to_numpy() - ccd["zero_point"])) * ccd["exptime"]
    near = np.zeros(len(obj), dtype=bool)
    on = (x > -20) & (x < image.shape[1] + 20) & (y > -20) & (y < image.shape[0] + 20)
    idx = np.flatnonzero(on)
    for i in idx:  # neighbours that would bias an aperture flux by more than ~0.5%
        d = np.hypot(x[idx] - x[i], y[idx] - y[i])
        f = flux_e[idx] / flux_e[i]
        near[i] = np.any((d > 0) & (((d < 20) & (f > 0.005)) | ((d < 40) & (f > 1.0))))
    ok = (
        (obj["kind"] == "star").to_numpy()
        & ~near
        & (x > 40)
        & (x < image.shape[1] - 40)
        & (y > 40)
        & (y < image.shape[0] - 40)
        & (flux_e < 2.0e5 * (ccd["seeing"] / 0.6) ** 2)
        & (flux_e > 3e3)
    )
    return x[ok], y[ok], flux_e[ok], ccd


def _later_eimage(sim, k: int = 2, det: int = 0):
    plan = sim["plan"]
    visit = int(plan.later_visits("r")["visit"].iloc[k])
    image = read_image_hdus(sim["files"][("eimage", visit, det)])[1][0][0].astype(np.float64)
    ccd = sim["truth_ccdvisit"].query("visit == @visit and detector == @det").iloc[0]
    wcs = WCS(fits.Header.fromstring(ccd["wcs_header"]))
    return visit, det, image, wcs


def _true_encircled_energy(sim, visit: int, det: int, radius: float) -> float:
    """Fraction of the true PSF (with pixel) inside ``radius`` pixels at the detector centre."""
    import galsim

    from workflow_lib.sim.render import detector_psf

    plan = sim["plan"]
    c = (plan.preset.det_nx - 1) / 2.0
    jac = plan.true_wcs(visit, det).local_jacobian(c, c)
    stamp = detector_psf(plan, visit, det, c, c).drawImage(
        nx=81, ny=81, wcs=galsim.JacobianWCS(*jac.ravel())
    )
    yy, xx = np.mgrid[:81, :81]
    return float(stamp.array[np.hypot(xx - 40, yy - 40) < radius].sum() / stamp.array.sum())


def _later_images(sim):
    plan = sim["plan"]
    for k in range(len(plan.later_visits("r"))):
        for det in plan.detectors:
            yield _later_eimage(sim, k, det)


def test_forced_photometry_at_true_positions_recovers_true_flux(sim):
    """Aperture fluxes at true positions, corrected by the PSF's encircled energy, match truth."""
    import sep

    dmags, pulls, ratios = [], [], []
    for visit, det, image, wcs in _later_images(sim):
        x, y, flux, ccd = _stars_on(sim, visit, det, image, wcs=wcs)
        data = image - ccd["sky"]  # the eimage sky is flat: subtract the true level
        err = np.full(image.shape, np.sqrt(ccd["sky"]))
        r_ap = 10.0
        ap, ap_err, _ = sep.sum_circle(data, x, y, r_ap, err=err, gain=1.0)
        ee = _true_encircled_energy(sim, visit, det, r_ap)
        bright = flux > 1.5e4  # S/N > 50
        dmags += list(-2.5 * np.log10(ap[bright] / ee / flux[bright]))
        pulls += list((ap / ee - flux) / (ap_err / ee))
        # Curve of growth measured in the image (bright stars) vs the true PSF's.
        very = flux > 5e4
        if very.any():
            ap20, _, _ = sep.sum_circle(data, x[very], y[very], 20.0)
            ratios += list(ap20 / ap[very] / (_true_encircled_energy(sim, visit, det, 20.0) / ee))
    dmags, pulls = np.array(dmags), np.array(pulls)
    assert len(dmags) >= 30
    # Median offset consistent with 0 (its error is ~1.25 * 0.02 / sqrt(N) ~ 4 mmag).
    assert abs(np.median(dmags)) < 0.006
    assert 0.85 < _robust_sigma(pulls) < 1.2
    assert abs(np.median(pulls)) < 0.3
    assert len(ratios) >= 5 and np.median(ratios) == pytest.approx(1.0, abs=0.01)


def _stacked_fwhm(image, x, y, flux, sky) -> float:
    """FWHM (pixels) of the stacked radial profile of stars at known positions."""
    rs, vs = [], []
    for xi, yi, fi in zip(x, y, flux, strict=True):
        ix, iy = round(xi), round(yi)
        cut = image[iy - 8 : iy + 9, ix - 8 : ix + 9] - sky
        yy, xx = np.mgrid[iy - 8 : iy + 9, ix - 8 : ix + 9]
        rs.append(np.hypot(xx - xi, yy - yi).ravel())
        vs.append((cut / fi).ravel())
    r, v = np.concatenate(rs), np.concatenate(vs)
    # Centre from a quadratic in r^2; FWHM where the binned profile crosses half of it.
    inner = r < 1.0
    peak = np.polyfit(r[inner] ** 2, v[inner], 1)[1]
    edges = np.arange(0.0, 8.0, 0.25)
    bins = [(a, b) for a, b in pairwise(edges) if np.any((r >= a) & (r < b))]
    centres = np.array([0.5 * (a + b) for a, b in bins])
    prof = np.array([np.median(v[(r >= a) & (r < b)]) for a, b in bins])
    j = np.flatnonzero(prof < 0.5 * peak)[0]
    return 2.0 * float(np.interp(0.5 * peak, [prof[j], prof[j - 1]], [centres[j], centres[j - 1]]))


def test_truth_seeing_matches_image(sim):
    ratios = []
    for visit, det, image, wcs in _later_images(sim):
        x, y, flux, ccd = _stars_on(sim, visit, det, image, wcs=wcs)
        bright = flux > 1.5e4
        if bright.sum() < 4:
            continue
        fwhm = _stacked_fwhm(image, x[bright], y[bright], flux[bright], ccd["sky"])
        ratios.append(fwhm * 0.2 / ccd["seeing"])
    assert len(ratios) >= 6
    assert np.median(ratios) == pytest.approx(1.0, abs=0.03)
    assert np.all(np.abs(np.array(ratios) - 1) < 0.08)


def test_true_wcs_reproduces_star_positions_and_header_wcs_is_rough(sim):
    import sep

    dx, dy, offs = [], [], []
    for visit, det, image, wcs in _later_images(sim):
        x, y, flux, ccd = _stars_on(sim, visit, det, image, wcs=wcs)
        bright = flux > 1.5e4
        if not bright.any():
            continue
        data = image - ccd["sky"]
        sig = ccd["seeing"] / 0.2 / 2.355
        xc, yc, flag = sep.winpos(data, x[bright], y[bright], np.full(bright.sum(), sig))
        assert (flag == 0).all()
        dx += list(xc - x[bright])
        dy += list(yc - y[bright])
        # The plan's own TrueWCS agrees with the TAN-SIP header string to << 1 mas.
        ra, dec = sim["plan"].true_wcs(visit, det).pixel_to_sky(x[bright], y[bright])
        ra2, dec2 = wcs.all_pix2world(x[bright], y[bright], 0)
        assert np.max(np.abs(ra - ra2)) * 3.6e6 < 0.5 and np.max(np.abs(dec - dec2)) * 3.6e6 < 0.5
        # The header WCS is only a hint: off by arcsec, never by more than 30".
        primary, _ = read_image_hdus(sim["files"][("eimage", visit, det)])
        rh, dh = WCS(primary).all_pix2world(x[bright], y[bright], 0)
        offs += list(np.hypot((rh - ra2) * np.cos(np.deg2rad(dh)), dh - dec2) * 3600)
    dx, dy, offs = np.array(dx), np.array(dy), np.array(offs)
    assert len(dx) >= 30
    assert abs(np.median(dx)) < 0.02 and abs(np.median(dy)) < 0.02
    assert np.sqrt(np.mean(dx**2 + dy**2)) < 0.05
    assert 0.5 < np.median(offs) and offs.max() < 30.0


def test_distortion_is_a_few_pixels_at_the_field_edge():
    from workflow_lib.sim.camera import focal_plane_radius

    preset = get_preset("default")
    plan = plan_survey(preset, SEED)
    wcs = plan.true_wcs(int(plan.visits["visit"].iloc[0]), 0)
    r = focal_plane_radius(preset)
    assert wcs.k * r**3 == pytest.approx(preset.distortion_edge_px)
    # Round trip sky -> pixel -> sky.
    rng = np.random.default_rng(3)
    xs, ys = rng.uniform(-10, 1030, 50), rng.uniform(-10, 1030, 50)
    ra, dec = wcs.pixel_to_sky(xs, ys)
    x2, y2 = wcs.sky_to_pixel(ra, dec)
    np.testing.assert_allclose(x2, xs, atol=1e-6)
    np.testing.assert_allclose(y2, ys, atol=1e-6)


def test_faint_galaxies_photons_are_convolved_with_the_true_psf():
    """PsfPhotons (the PSF applied to a faint galaxy's shot photons) draws from the
    same profile as GalSim shooting through make_psf's Convolve, and as its FFT image:
    radius quantiles, second moments and the pixelised image within their noise."""
    import galsim

    from workflow_lib.sim.optics import psf_parameters
    from workflow_lib.sim.psf import PsfPhotons, make_psf

    # An off-axis position (sheared atmosphere and optics), r band.
    params = psf_parameters(
        seeing=0.7,
        wind_g1=0.02,
        wind_g2=-0.03,
        wavelength_nm=620.0,
        fx=900.0,
        fy=-700.0,
        fp_radius=1500.0,
    )
    n = 1_000_000
    reference = make_psf(params).shoot(n, galsim.BaseDeviate(3))
    x, y = PsfPhotons(params).offsets(n, galsim.BaseDeviate(4))
    once, twice = (PsfPhotons(params).offsets(1000, galsim.BaseDeviate(5)) for _ in range(2))
    assert np.array_equal(once, twice)  # seeded
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    ours = np.quantile(np.hypot(x, y), quantiles)
    theirs = np.quantile(np.hypot(reference.x, reference.y), quantiles)
    np.testing.assert_allclose(ours, theirs, rtol=0.005)
    core = np.hypot(x, y) < 3.0
    ref_core = np.hypot(reference.x, reference.y) < 3.0
    for a, b in (
        (x * x, reference.x**2),
        (y * y, reference.y**2),
        (x * y, reference.x * reference.y),
    ):
        assert abs(a[core].mean() - b[ref_core].mean()) < 0.01 * (x * x)[core].mean()
    image = make_psf(params).drawImage(nx=48, ny=48, scale=0.2).array
    counts, _, _ = np.histogram2d(y, x, bins=48, range=[[-4.8, 4.8], [-4.8, 4.8]])
    noise = np.sqrt(np.maximum(image * n, 1.0))
    assert np.abs(counts - image * n).max() < 5.0 * noise.max()
    assert abs(counts.sum() / n - image.sum()) < 1e-3
