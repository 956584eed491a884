"""Cameras only a simulation can give, each simulated, processed and checked against truth.

Where ``test_camera_variations`` rewrites the files of one simulated camera,
each case here is a camera the simulator itself renders: a variant of the
``tiny`` preset (2 detectors; 2 science visits in different bands and the
calibration exposures they need, nothing else simulated) with another pixel
scale, detector size or shape, seeing, sky orientation, parity, pixel type or
exposure-type keyword. Every case simulates its own survey in a worker of
the shared pool (``camera_variants.run_matrix``, two cases at a time) and runs
the real single-frame steps (ingest, master calibrations, process_ccd) on it.
Checked against the simulation's truth as in the matrix of conventions, one
test per case and figure (an xfail names both): every CCD calibrated, median
|zeroPoint - truth| <= 10 mmag, astrometric rms of bright stars against their
true positions <= 15 mas, the fitted WCS within 50 mas of the true one over
the whole detector, seeing of each CCD within 5 % of the truth; and that each
knob took effect (image size, pixel scale, parity and orientation of the
fitted WCS, pixel type, keyword, the header WCS's pointing error).
``pytest -s tests/test_camera_presets.py`` prints the tables of figures and
the run time.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import camera_variants as cv
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

# The zero point is checked, as in the matrix of conventions, against the truth's zero
# point for all of a star's electrons. The pipeline's counts the electrons inside the
# calibration aperture (README, "CcdVisit"), so the second table also gives the light of
# the true PSF beyond CALIB_RADIUS_ARCSEC and |zeroPoint - truth for that aperture|.
ZP_MAX_MMAG = 10.0
CALIB_RADIUS_ARCSEC = 4.0  # calibrate.calib_aperture_radius_arcsec's default
# The fitted WCS against the true one over the whole detector (a 9 x 9 grid, corners
# included): where stars are few (corners) a wrong distortion term shows.
WCS_MAX_MAS = 50.0
ASTROM_MAX_MAS = 15.0
SEEING_MAX_REL = 0.05
N_BRIGHT_STARS_MIN = 40
# The file's budget: 2 minutes of this project's 2-core test machine, checked on CPU
# seconds (this process and its workers) / 2, which other work on the machine does not
# inflate; the wall time is printed beside it.
MATRIX_MAX_S, CORES = 120.0, 2
WCS_OFF = {"header_wcs_offset_arcsec": 30.0, "header_wcs_rotation_deg": (2.0, 2.0)}


def _preset(name: str, **knobs):  # type: ignore[no-untyped-def]
    from workflow_lib.sim.presets import get_preset

    return dataclasses.replace(get_preset("tiny"), name=f"cam_{name}", **knobs)


def _case(name: str, what: str, **knobs) -> cv.Variant:  # type: ignore[no-untyped-def]
    return cv.Variant(name, what, preset=_preset(name, **knobs))


CASES: list[cv.Variant] = [
    _case(
        "scale_0.168",
        'HSC-like 0.168"/px, 600 x 600 px (101" a side)',
        pixel_scale=0.168,
        det_nx=600,
        det_ny=600,
    ),
    _case(
        "scale_0.4", '0.4"/px, 400 x 400 px (160" a side)', pixel_scale=0.4, det_nx=400, det_ny=400
    ),
    _case(
        "nonsquare_768x384",
        "768 x 384 px, 2 x 2 amplifiers of 384 x 192",
        det_nx=768,
        det_ny=384,
        n_amp_x=2,
    ),
    _case(
        "large_1024",
        "1024 x 1024 px, 2 x 4 amplifiers of 256 x 512",
        det_nx=1024,
        det_ny=1024,
        n_amp_x=4,
    ),
    _case(
        "seeing_0.5",
        'seeing 0.48-0.52" in every visit',
        template_seeing=(0.48, 0.52),
        later_seeing=(0.48, 0.52),
    ),
    _case(
        "seeing_2.0",
        'seeing 1.95-2.05" in every visit',
        template_seeing=(1.95, 2.05),
        later_seeing=(1.95, 2.05),
    ),
    _case(
        "rot90_wcs_off",
        'detector turned 90 deg on the sky; header WCS 30" rms off, 2 deg',
        rotation_offset_deg=90.0,
        **WCS_OFF,
    ),
    _case(
        "parity_wcs_off",
        'mirrored camera (det CD > 0); header WCS 30" rms off, 2 deg',
        parity_flip=True,
        **WCS_OFF,
    ),
    _case(
        "uint16_imgtype",
        "uint16 pixels (DECam-like gains) and IMGTYPE only",
        raw_dtype="uint16",
        obstype_keyword="IMGTYPE",
    ),
]
# (case, check) pairs expected to fail, with the precise cause (file, function, why).
XFAIL: dict[tuple[str, str], str] = {
    ("scale_0.4", "seeing"): (
        "PSF FWHM overestimated for an undersampled PSF: "
        "workflow_lib/single_frame/psf.py fit_psf_model moves every PSF star onto the "
        "kernel's central pixel by Lanczos-3 interpolation "
        "(shift_stamps), which is not exact when the effective PSF is 1.75-1.8 px FWHM "
        '(0.7" on 0.4" pixels), and the kernel is sampled at the image\'s pixels (no '
        "oversampled model, as PSFEx's PSF_SAMPLING < 1 would give). The shifted, stacked "
        "stars come out broader: the GalSim ePSF of this case drawn at 200 random sub-pixel "
        'offsets, shifted with shift_stamps and median-stacked measures 0.754" by '
        'fwhm_of_image against 0.704" for the centred ePSF and 0.710" truth; CcdVisit '
        'seeing is 0.735-0.754" against 0.695-0.710" (+3.5 to +8.5 %). At 0.2" and '
        '0.168" pixels (3.5-3.9 px FWHM) the same stack is exact to 0.3 %.'
    ),
    ("seeing_2.0", "zero_point"): (
        'zeroPoint counts the electrons inside the 4" calibration aperture, by design '
        "(README 'CcdVisit'; calibrate.calib_aperture_radius_arcsec = 4.0 in "
        "workflow_lib/schemas/config.schema.yaml; workflow_lib/single_frame/calibrate.py fits the "
        'zero point to PSF fluxes aperture-corrected to it), and at 2" FWHM the true PSF '
        'puts 35-39 mmag outside 4" (4.5-5.5 mmag at 0.5-0.7"): against the total-light '
        'truth the CCDs read 19-32 mmag low (median |d| 26 mmag). The same case with an 8" '
        'calibration aperture gives 7.9 mmag. Against the truth for the 4" aperture it is '
        "still +7 to +16 mmag (median 10.8; zeroPointErr 4.6-6.3 mmag): the per-star zero "
        "points scatter +-40 mmag (10-90 %) among neighbours' light at 2\", and the good-"
        'seeing cases too sit ~5 mmag above their 4" truth.'
    ),
    ("seeing_2.0", "wcs"): (
        'Centroids pulled ~100 mas by neighbours at 2" seeing (see the astrometry xfail) bias '
        "the WCS fit of one CCD: 239 mas from the true WCS at worst over the detector (774 mas "
        "before workflow_lib/single_frame/astrometry.py _choose_order made the radial model "
        "the default whenever a boresight is given, so that a cubic SIP no longer kept its "
        "place against "
        "a radial model of equal score). Not yet checked which model that CCD now gets: "
        "the pulled centroids (workflow_lib/single_frame/measure.py measure_sources) are the "
        "likely cause."
    ),
    ("seeing_2.0", "astrometry"): (
        "Centroids pulled by neighbours' light at 2\" seeing, on top of a noise floor: of "
        "the 65 bright (S/N > 50) stars (rms 46 mas), the 20 with >= 3 % of their light from "
        'other objects within 5" have 75 mas rms, their residuals point towards the '
        'neighbours (14 of 20, median cosine 0.83; random at 0.5" seeing), the 32 isolated '
        "ones 24 mas (centroid noise ~ FWHM / SNR: ~17 mas at S/N 100, so 15 mas is out of "
        'reach at 2" for S/N > 50 stars). The centroid is workflow_lib/single_frame/measure.py '
        "measure_sources: sep.winpos on the image with only bad pixels masked, then one "
        "linearised PSF-fit step whose stamps mask the neighbours' footprints but not their "
        "wings beyond them (and which, by its own comment, leaves ~20 % of sources at the "
        "windowed centroid)."
    ),
}


def _cost(case: cv.Variant) -> float:
    """Pixels to simulate and process: the dearest cases start first (fuller pool)."""
    p = case.preset
    return p.det_nx * p.det_ny * (1.0 + 0.5 * (p.later_seeing[0] > 1.5))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every case simulated and run; the figures and the run time printed (with -s)."""
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    work = tmp_path_factory.mktemp("camera_presets")
    ordered = sorted(CASES, key=_cost, reverse=True)
    results = {r["case"]: r for r in cv.run_matrix(ordered, work_dir=work)}
    for case in CASES:
        if "error" not in results[case.name]:
            results[case.name].update(_truth_extras(case, work / case.name))
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    print(
        f"\n\nsimulated cameras ({len(CASES)} variants of tiny; 2 visits x 2 detectors each): "
        f"wall {elapsed:.1f} s; CPU {cpu:.1f} s = {cpu / CORES:.1f} s on {CORES} cores"
    )
    print(cv.format_table(results[c.name] for c in CASES))
    print(
        "\n" + "case".ljust(22) + ' ZP-truth mmag beyond 4"  |ZP-truth4"| WCS max err mas'
        "  (ZP: medians over the 4 CCDs; WCS: the worst CCD)"
    )
    for case in CASES:
        r = results[case.name]
        if "zp_ap_abs_median_mmag" in r:
            print(
                f"{case.name:<22} {r['zp_diff_median_mmag']:13.1f} "
                f"{r['aperture_loss_mmag']:10.1f} {r['zp_ap_abs_median_mmag']:13.2f} "
                f"{r['wcs_max_err_mas']:15.0f}"
            )
    for case in CASES:
        if "error" in results[case.name]:
            print(f"\n--- {case.name}:\n{results[case.name]['error']}")
    return {"results": results, "work": work, "elapsed": elapsed, "cpu": cpu}


def _truth_extras(case: cv.Variant, root: Path) -> dict[str, float]:
    """Zero point against the truth for the calibration aperture, and the fitted WCS
    against the true one over each detector (the simulation's truth, drawn here)."""
    import galsim

    from workflow_lib.io import read_table
    from workflow_lib.sim.presets import get_preset, register_preset
    from workflow_lib.sim.render import detector_psf
    from workflow_lib.sim.survey import plan_survey

    p = case.preset
    register_preset(p)
    plan = plan_survey(get_preset(p.name), cv.SEED)
    truth = read_table(root / "sim/sim/truth/truth_ccdvisit.parquet").set_index(
        ["visit", "detector"]
    )
    cx, cy = (p.det_nx - 1) / 2.0, (p.det_ny - 1) / 2.0
    fine, half = p.pixel_scale / 4.0, int(2.5 * CALIB_RADIUS_ARCSEC / (p.pixel_scale / 4.0))
    yy, xx = (np.mgrid[: 2 * half + 1, : 2 * half + 1] - half) * fine
    inside = np.hypot(xx, yy) <= CALIB_RADIUS_ARCSEC
    diffs, losses, wcs_err = [], [], []
    gx, gy = np.meshgrid(np.linspace(0, p.det_nx - 1, 9), np.linspace(0, p.det_ny - 1, 9))
    for path in sorted((root / "out/ccdVisit").rglob("*.parquet")):
        row = read_table(path).iloc[0]
        visit, detector = int(row["visit"]), int(row["detector"])
        eff = galsim.Convolve(
            detector_psf(plan, visit, detector, cx, cy), galsim.Pixel(p.pixel_scale)
        )
        image = eff.drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=fine, method="no_pixel").array
        loss = -2.5 * np.log10(image[inside].sum() / image.sum())
        zp_diff = float(row["zeroPoint"]) - float(truth.loc[(visit, detector), "zero_point"])
        diffs.append(1000.0 * zp_diff)
        losses.append(1000.0 * loss)
        calexp = root / f"out/calexp/{visit}/calexp_{visit}_{detector}.fits"
        wcs = _quiet_wcs(fits.getheader(calexp, 1))
        ra_fit, dec_fit = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
        ra_true, dec_true = plan.true_wcs(visit, detector).pixel_to_sky(gx.ravel(), gy.ravel())
        wcs_err.append(1000.0 * _separation_arcsec(ra_fit, dec_fit, ra_true, dec_true).max())
    diffs_ap = np.asarray(diffs) + np.asarray(losses)
    return {
        "zp_diff_median_mmag": float(np.median(diffs)),
        "aperture_loss_mmag": float(np.median(losses)),
        "zp_ap_abs_median_mmag": float(np.median(np.abs(diffs_ap))),
        "wcs_max_err_mas": float(np.max(wcs_err)),
    }


CHECKS = ("calibrated", "zero_point", "astrometry", "wcs", "seeing")


def _case_params():
    for case in CASES:
        for check in CHECKS:
            reason = XFAIL.get((case.name, check))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(case, check, id=f"{case.name}-{check}", marks=marks)


@pytest.mark.parametrize(("case", "check"), list(_case_params()))
def test_case_matches_truth(matrix, case, check):
    """One figure of one case against the truth (an xfail names the figure it concerns)."""
    r = matrix["results"][case.name]
    assert "error" not in r, r.get("error")
    if check == "calibrated":
        assert r["n_calibrated"] == r["n_ccds"] == 4, r["fail_reasons"]
    elif check == "zero_point":
        # The target widened by the median's own standard error (cv.zp_median_error_mmag).
        assert r["zp_abs_median_mmag"] <= ZP_MAX_MMAG + r["zp_median_error_mmag"]
    elif check == "astrometry":
        assert r["n_bright_stars"] >= N_BRIGHT_STARS_MIN
        assert r["astrom_rms_mas"] <= ASTROM_MAX_MAS
    elif check == "wcs":
        assert r["wcs_max_err_mas"] <= WCS_MAX_MAS
    else:
        assert r["seeing_abs_rel_diff_max"] <= SEEING_MAX_REL


def _quiet_wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():  # a data-less primary HDU: NAXIS = 0 is no concern
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header, naxis=2)


def _scale_parity_rotation(cd: np.ndarray) -> tuple[float, float, float]:
    """Of a CD matrix (deg/px): pixel scale (arcsec), sign of det(CD), and the position
    angle (deg, north through east) of the pixel +y axis."""
    scale = 3600.0 * float(np.sqrt(abs(np.linalg.det(cd))))
    angle = float(np.degrees(np.arctan2(cd[0, 1], cd[1, 1])))
    return scale, float(np.sign(np.linalg.det(cd))), angle


def _true_cd(true, x: float, y: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The true WCS's local CD matrix (deg/px, distortion included) at 0-based (x, y)."""
    jac = np.array(true.local_jacobian(x, y), float) / 3600.0  # d(west, north)/d(x, y)
    jac[0, :] *= -1.0  # east
    return jac


def _angle_diff(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def _separation_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:  # type: ignore[no-untyped-def]
    d_ra = (np.asarray(ra1) - np.asarray(ra2) + 180.0) % 360.0 - 180.0
    d_ra = d_ra * np.cos(np.deg2rad(np.asarray(dec2)))
    return 3600.0 * np.hypot(d_ra, np.asarray(dec1) - np.asarray(dec2))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_camera_knobs_took_effect(matrix, case):
    """What the files and the products show: the knob is really in the survey processed."""
    from workflow_lib.sim.presets import get_preset, register_preset
    from workflow_lib.sim.survey import plan_survey

    r = matrix["results"][case.name]
    if "error" in r:
        pytest.skip("the case failed to run (see test_case_matches_truth)")
    p = case.preset
    root = matrix["work"] / case.name
    raws = sorted((root / "raw").rglob("raw_400*.fits"))
    assert len(raws) == 4
    primary, amps = fits.getheader(raws[0], 0), fits.open(raws[0])
    with amps:
        assert len(amps) - 1 == p.n_amps == r["n_amplifiers"][0]
        bitpix = {int(h.header["BITPIX"]) for h in amps[1:]}
        bzero = {float(h.header.get("BZERO", 0.0)) for h in amps[1:]}
    if p.raw_dtype == "uint16":
        assert bitpix == {16} and bzero == {32768.0}
    else:
        assert bitpix == {32}
    keyword = p.obstype_keyword
    assert str(primary[keyword]).strip().lower() == "science"
    if keyword == "IMGTYPE":
        assert "OBSTYPE" not in primary
    assert r["obstypes"] == ["bias", "dark", "flat", "science"]

    register_preset(p)
    plan = plan_survey(get_preset(p.name), cv.SEED)
    for path in sorted((root / "out/calexp").rglob("calexp_*.fits")):
        visit, detector = (int(v) for v in path.stem.split("_")[1:])
        with fits.open(path) as hdus:
            assert hdus[1].data.shape == (p.det_ny, p.det_nx)
            wcs = _quiet_wcs(hdus[1].header)
        true = plan.true_wcs(visit, detector)
        scale, parity, _ = _scale_parity_rotation(wcs.pixel_scale_matrix)
        true_scale, true_parity, _ = _scale_parity_rotation(
            _true_cd(true, (p.det_nx - 1) / 2.0, (p.det_ny - 1) / 2.0)
        )
        assert true_scale == pytest.approx(p.pixel_scale, rel=0.01)
        assert scale == pytest.approx(p.pixel_scale, rel=0.01)
        assert parity == true_parity == (1.0 if p.parity_flip else -1.0)
        rotation = float(plan.visits.set_index("visit").loc[visit, "rotation_deg"])
        assert abs(rotation - p.rotation_offset_deg) <= p.rot_max_deg
        # The fitted WCS turned and mirrored as the true one: the detector's corners land
        # within 2" of the truth (a 90 deg turn or a mirror would put them ~100" off; how
        # close the fit is is test_case_matches_truth's "wcs" check).
        gx, gy = np.meshgrid([0.0, p.det_nx - 1.0], [0.0, p.det_ny - 1.0])
        ra_fit, dec_fit = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
        ra_true, dec_true = true.pixel_to_sky(gx.ravel(), gy.ravel())
        assert _separation_arcsec(ra_fit, dec_fit, ra_true, dec_true).max() < 2.0


def test_header_wcs_errors_were_large(matrix):
    """The 30" / 2 deg cases start from header WCSs that are really that far off: the
    header centre against the true sky position of the detector centre, and the angle."""
    from workflow_lib.sim.presets import get_preset, register_preset
    from workflow_lib.sim.survey import plan_survey

    lines = []
    for case in CASES:
        p = case.preset
        if p.header_wcs_offset_arcsec < 30.0:
            continue
        register_preset(p)
        plan = plan_survey(get_preset(p.name), cv.SEED)
        offsets, turns = [], []
        for path in sorted((matrix["work"] / case.name / "raw").rglob("raw_400*.fits")):
            header = fits.getheader(path, 0)
            visit, detector = int(header["EXPID"]), int(header["DETECTOR"])
            true = plan.true_wcs(visit, detector)
            cx, cy = (p.det_nx - 1) / 2.0, (p.det_ny - 1) / 2.0
            ra, dec = (float(v[0]) for v in true.pixel_to_sky(np.array([cx]), np.array([cy])))
            h_ra, h_dec = (float(v) for v in _quiet_wcs(header).all_pix2world(cx, cy, 0))
            offsets.append(float(_separation_arcsec(h_ra, h_dec, ra, dec)))
            _, _, a_true = _scale_parity_rotation(_true_cd(true, cx, cy))
            _, _, a_head = _scale_parity_rotation(_quiet_wcs(header).pixel_scale_matrix)
            turns.append(_angle_diff(a_head, a_true))
        lines.append(
            f'  {case.name}: header centre off by {min(offsets):.0f}-{max(offsets):.0f}" '
            f"(4 CCDs), turned by {min(turns):.2f}-{max(turns):.2f} deg"
        )
        assert max(offsets) > 20.0
        assert min(turns) == pytest.approx(2.0, abs=0.3)
    print("\nheader WCS errors the fit started from:\n" + "\n".join(lines))


def test_matrix_run_time(matrix):
    print(f"\nsimulated-camera matrix: {matrix['elapsed']:.1f} s wall, {matrix['cpu']:.1f} s CPU")
    assert matrix["cpu"] / CORES <= MATRIX_MAX_S


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the workers)."""
    import resource

    return sum(
        u.ru_utime + u.ru_stime
        for u in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )
