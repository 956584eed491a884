"""The bad-input catalogue: what the workflow does with each kind of broken input.

The README's *Bad inputs* table lists every case with the test that holds it;
most of those tests are here, the rest sit beside the code they exercise.
``test_the_readme_table_and_the_tests_agree`` keeps the table and the tests in
step. Every case ends in one of two ways: a one-line problem naming the file
(at ingest, before any job runs, or as a ValueError of the step that reads it),
or a flagged, recorded skip (a CcdVisit or DiaCcdVisit row with its reason).
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from conftest import REPO, fake_amplifiers, fake_primary

from workflow_lib.core.config import ConfigError, validate_config
from workflow_lib.core.flags import CcdVisitFlag
from workflow_lib.core.registry import parse_section
from workflow_lib.io import read_table, write_raw_file, write_table
from workflow_lib.io.exposure import read_exposure
from workflow_lib.io.fits import DamagedFitsFile, read_image_hdus
from workflow_lib.single_frame.refcat import RefcatColumns, standardize_refcat
from workflow_lib.steps.calibs import read_master
from workflow_lib.steps.diffim import subtract_ccd
from workflow_lib.steps.ingest import scan_files
from workflow_lib.steps.process_ccd import process_ccd
from workflow_lib.workflow import WorkflowPlan

TINY = {"sim": {"preset": "tiny", "seed": 7}}
DEFAULT_COLUMNS = RefcatColumns(
    id="id", ra="ra", dec="dec", is_star="is_star", is_variable="is_variable", mags={}, mag_errs={}
)
DEFAULTS = validate_config({})


def _problems(*paths: Path) -> list[str]:
    return scan_files(list(paths), image_format="raw").problems


def _one_problem(path: Path, text: str) -> str:
    problems = _problems(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: ") and text in problems[0], problems[0]
    assert "\n" not in problems[0]
    return problems[0]


# ---------------------------------------------------------------- damaged files (ingest)
def test_truncated_raw_file(tmp_path, write_fake_raw):
    """Cut to a third: the last amplifier HDUs gone, the headers before the cut intact."""
    good = write_fake_raw(tmp_path / "good.fits")
    data = good.read_bytes()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(data[: len(data) // 3])
    _one_problem(cut, "damaged FITS file")


def test_data_shorter_than_its_header_says(tmp_path, write_fake_raw):
    good = write_fake_raw(tmp_path / "good.fits")
    short = tmp_path / "short.fits"
    short.write_bytes(good.read_bytes()[:-100])
    _one_problem(short, "damaged FITS file")


def test_truncated_gzip_file(tmp_path, write_fake_raw):
    """A cut gzip stream decompresses to whole HDUs and astropy does not notice."""
    packed = write_fake_raw(tmp_path / "good.fits.gz")
    assert _problems(packed) == []
    cut = tmp_path / "cut.fits.gz"
    cut.write_bytes(packed.read_bytes()[: int(packed.stat().st_size * 0.6)])
    _one_problem(cut, "the gzip stream is cut or corrupt")


def test_corrupt_gzip_file(tmp_path, write_fake_raw):
    raw = write_fake_raw(tmp_path / "good.fits").read_bytes()
    damaged = bytearray(gzip.compress(raw, mtime=0))
    damaged[len(damaged) // 2 : len(damaged) // 2 + 8] = b"\x00\x13\x77\x99\xff\x01\x02\x03"
    path = tmp_path / "corrupt.fits.gz"
    path.write_bytes(bytes(damaged))
    problems = _problems(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: ")
    assert "damaged FITS file" in problems[0] or "cannot read as FITS" in problems[0]


def test_corrupt_tile_compressed_file(tmp_path, write_fake_raw):
    """Damaged compressed tiles pass a header scan; the checksum stops them when read."""
    path = write_fake_raw(tmp_path / "a.fits.fz")
    with fits.open(path) as hdul:
        start = hdul.fileinfo(1)["datLoc"]
    damaged = bytearray(path.read_bytes())
    damaged[start + 40 : start + 44] = b"\x7f\x7f\x7f\x7f"
    path.write_bytes(bytes(damaged))
    with pytest.raises(DamagedFitsFile, match="damaged FITS file"):
        read_image_hdus(path)


def test_raw_that_lost_amplifier_hdus(tmp_path, write_fake_raw):
    """A complete FITS file with an amplifier HDU dropped still tiles a (smaller) detector;
    the other files of its detector show the layout it should have."""
    write_fake_raw(tmp_path / "a.fits", EXPID=1)
    write_fake_raw(tmp_path / "b.fits", EXPID=2)
    lost = tmp_path / "lost.fits"
    write_raw_file(lost, fake_primary(EXPID=3), fake_amplifiers()[:1])
    result = scan_files(sorted(tmp_path.glob("*.fits")), image_format="raw")
    assert sorted(result.registry["exposure"]) == [1, 2]
    assert result.problems == [
        f"{lost}: 1 amplifier(s) on a 16x8 detector, but 2 other file(s) of detector 3 "
        "have 2 amplifier(s) on a 32x8 detector"
    ]


def test_nextend_disagrees_with_the_extensions(tmp_path):
    path = tmp_path / "a.fits"
    write_raw_file(path, fake_primary(NEXTEND=4), fake_amplifiers())
    _one_problem(path, "NEXTEND=4 but the file has 2 image extension(s)")


def test_amplifier_section_out_of_bounds(tmp_path, write_fake_raw):
    path = write_fake_raw(tmp_path / "a.fits", amp_overrides={"DATASEC": "[3:40,1:8]"})
    _one_problem(path, "DATASEC=[3:40,1:8] in HDU 1 exceeds the 22x8 image")


def test_visit_with_mixed_bands_across_detectors(tmp_path, write_fake_raw):
    for detector in (0, 1, 2):
        write_fake_raw(tmp_path / f"r{detector}.fits", DETECTOR=detector)
    odd = write_fake_raw(tmp_path / "g3.fits", DETECTOR=3, FILTER="g")
    result = scan_files(sorted(tmp_path.glob("*.fits")), image_format="raw")
    assert sorted(result.registry["detector"]) == [0, 1, 2]
    assert result.problems == [f"{odd}: band g, but 3 other file(s) of visit 159400 have band r"]
    # No majority: every file of the visit is left out.
    (tmp_path / "r1.fits").unlink()
    (tmp_path / "r2.fits").unlink()
    result = scan_files(sorted(tmp_path.glob("*.fits")), image_format="raw")
    assert result.registry.empty and len(result.problems) == 2
    assert all("the files of visit 159400 disagree" in p for p in result.problems)


# ------------------------------------------------------------- bad pixels (per-CCD job)
@pytest.fixture(scope="module")
def ccd(tiny_run):
    """Inputs of one science CCD of the tiny run."""
    plan = WorkflowPlan({**TINY, "output_dir": str(tiny_run / "results")})
    visit, detector = plan.science_ids[-1]
    inputs = plan.process_ccd_inputs({"visit": str(visit), "detector": str(detector)})
    return {"visit": visit, "detector": detector, "inputs": inputs}


def _process(ccd, out: Path, **overrides) -> pd.Series:
    out.mkdir(exist_ok=True)
    kwargs = {
        **ccd["inputs"],
        "calexp_path": str(out / "calexp.fits"),
        "src_path": str(out / "src.parquet"),
        "ccdvisit_path": str(out / "ccdVisit.parquet"),
        "visit": ccd["visit"],
        "detector": ccd["detector"],
        "image_format": "raw",
        "isr": DEFAULTS["isr"],
        "calibrate": DEFAULTS["calibrate"],
        **overrides,
    }
    process_ccd(**kwargs)
    return read_table(out / "ccdVisit.parquet").iloc[0]


def _raw_with(ccd, path: Path, change) -> str:
    """A copy of the CCD's raw file with ``change(data, amp_header)`` applied to each HDU."""
    with fits.open(ccd["inputs"]["raw_path"]) as hdul:
        for hdu in hdul[1:]:
            hdu.data = change(hdu.data.astype(np.float32), hdu.header)
        hdul.writeto(path, checksum=True)
    return str(path)


def _assert_skipped(row: pd.Series, flag: CcdVisitFlag, reason: str) -> None:
    assert row["flags"] & CcdVisitFlag.FAILED and row["flags"] & flag, CcdVisitFlag(row["flags"])
    assert reason in row["failReason"], row["failReason"]


@pytest.fixture(scope="module")
def good_row(ccd, tmp_path_factory) -> pd.Series:
    return _process(ccd, tmp_path_factory.mktemp("good"))


def test_all_zero_image(ccd, tmp_path):
    raw = _raw_with(ccd, tmp_path / "zero.fits", lambda data, header: data * 0)
    _assert_skipped(
        _process(ccd, tmp_path / "out", raw_path=raw),
        CcdVisitFlag.BAD_IMAGE,
        "every usable pixel has the same value (0): a blank image",
    )


def test_all_nan_raw_image(ccd, tmp_path):
    raw = _raw_with(ccd, tmp_path / "nan.fits", lambda data, header: data * np.nan)
    _assert_skipped(
        _process(ccd, tmp_path / "out", raw_path=raw),
        CcdVisitFlag.BAD_IMAGE,
        "every pixel is NaN or infinite",
    )


def test_image_without_stars(ccd, tmp_path):
    """Bias level and read noise only (a dark frame labelled as science)."""
    rng = np.random.default_rng(11)

    def blank(data, header):
        return np.float32(np.median(data)) + rng.normal(0, 5, data.shape).astype(np.float32)

    row = _process(ccd, tmp_path / "out", raw_path=_raw_with(ccd, tmp_path / "n.fits", blank))
    assert row["flags"] & CcdVisitFlag.FAILED
    assert row["flags"] & (CcdVisitFlag.PSF_FAILED | CcdVisitFlag.BAD_IMAGE)


def test_sky_far_brighter_than_the_rest(ccd, tmp_path, good_row):
    """Ten times the sky (in electrons, through the flat): calibrated, and right."""
    flat = read_master(ccd["inputs"]["flat_path"]).image
    extra_e = 10 * good_row["skyBg"]
    rng = np.random.default_rng(12)

    def brighter(data, header):
        data_sec, det_sec = parse_section(header["DATASEC"]), parse_section(header["DETSEC"])
        response = flat[det_sec.slices]
        response = response[:, ::-1] if det_sec.x_flip else response
        response = response[::-1, :] if det_sec.y_flip else response
        mean_e = extra_e * np.clip(np.nan_to_num(response), 0.0, None)
        sky_e = rng.poisson(mean_e).astype(np.float32)
        data[data_sec.slices] += sky_e / float(header["GAIN"])
        return data

    row = _process(ccd, tmp_path / "out", raw_path=_raw_with(ccd, tmp_path / "b.fits", brighter))
    assert row["flags"] & CcdVisitFlag.FAILED == 0
    assert row["skyBg"] == pytest.approx(good_row["skyBg"] + extra_e, rel=0.02)
    assert row["skyNoise"] > 2.5 * good_row["skyNoise"]
    assert abs(row["zeroPoint"] - good_row["zeroPoint"]) < 0.02


def test_header_wcs_one_degree_off(ccd, tmp_path):
    raw = tmp_path / "moved.fits"
    with fits.open(ccd["inputs"]["raw_path"]) as hdul:
        hdul[0].header["CRVAL2"] += 1.0
        hdul.writeto(raw, checksum=True)
    row = _process(ccd, tmp_path / "out", raw_path=str(raw))
    assert row["flags"] & CcdVisitFlag.FAILED
    assert row["flags"] & (CcdVisitFlag.NO_REFERENCE_STARS | CcdVisitFlag.ASTROMETRY_FAILED)


def test_flat_with_zeros_and_negative_values(ccd, tmp_path):
    """Pixels where the flat is <= 0 are BAD (and interpolated), not divided by; a flat
    with no positive pixel leaves nothing to calibrate."""
    source = ccd["inputs"]["flat_path"]
    with fits.open(source) as hdul:
        hdul["IMAGE"].data[:20] = 0.0
        hdul["IMAGE"].data[20:40] = -1.0
        hdul.writeto(tmp_path / "holes.fits")
        hdul["IMAGE"].data[:] = 0.0
        hdul.writeto(tmp_path / "zero.fits")
    row = _process(ccd, tmp_path / "holes", flat_path=str(tmp_path / "holes.fits"))
    assert row["flags"] & CcdVisitFlag.FAILED == 0
    calexp = read_exposure(tmp_path / "holes" / "calexp.fits")
    bad = calexp.mask_planes.bitmask("BAD")
    assert (calexp.mask[:40] & bad != 0).all() and np.isfinite(calexp.image[:40]).all()
    row = _process(ccd, tmp_path / "zero", flat_path=str(tmp_path / "zero.fits"))
    _assert_skipped(row, CcdVisitFlag.BAD_IMAGE, "no usable pixel")


def test_raw_damaged_after_ingest(ccd, tmp_path):
    """Bytes changed inside the pixel data: the file's checksum catches it when read."""
    damaged = bytearray(Path(ccd["inputs"]["raw_path"]).read_bytes())
    middle = len(damaged) // 2
    damaged[middle : middle + 4] = b"\x7f\x7f\x7f\x7f"
    raw = tmp_path / "damaged.fits"
    raw.write_bytes(bytes(damaged))
    row = _process(ccd, tmp_path / "out", raw_path=str(raw))
    _assert_skipped(row, CcdVisitFlag.BAD_IMAGE, "raw file unreadable: damaged FITS file")


# ------------------------------------------------------------------- reference catalog
def _refcat(n: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    return pd.DataFrame(
        {
            "id": np.arange(n) + 1,
            "ra": rng.uniform(10, 11, n),
            "dec": rng.uniform(-1, 1, n),
            "r": rng.uniform(16, 21, n),
        }
    )


def test_refcat_with_non_numeric_magnitudes():
    table = _refcat().astype({"r": object})
    table.loc[3, "r"] = "bright"
    with pytest.raises(ValueError, match=r"^cat\.csv: .*r magnitude.*not numeric"):
        standardize_refcat(table, DEFAULT_COLUMNS, source="cat.csv")


def test_refcat_with_duplicate_ids():
    table = _refcat()
    table.loc[5, "id"] = table.loc[4, "id"]
    with pytest.raises(ValueError, match=r"^cat\.csv: column 'id' \(id\) has 2 rows sharing"):
        standardize_refcat(table, DEFAULT_COLUMNS, source="cat.csv")


# ------------------------------------------------------------------ selection and config
def test_empty_selection():
    with pytest.raises(ConfigError, match="config: select: keeps no science exposure"):
        WorkflowPlan({**TINY, "select": {"band": "u"}})


def test_template_window_after_every_visit():
    config = {
        **TINY,
        "diffim": {"enabled": True},
        "template": {"mjd_min": 70000.0, "mjd_max": 80000.0},
    }
    with pytest.raises(ConfigError, match="holds none of the 20 science exposures"):
        WorkflowPlan(config)


# ----------------------------------------------------------------- difference imaging
@pytest.fixture(scope="module")
def dia_ccd(tiny_run):
    """A CCD of the tiny run with its calexp and the template coadds it overlaps."""
    config = {**TINY, "output_dir": str(tiny_run / "results"), "diffim": {"enabled": True}}
    plan = WorkflowPlan(config)
    visit, detector = plan.diffim_ccd_ids()[-1]
    wildcards = {"visit": str(visit), "detector": str(detector)}
    inputs = plan.diffim_inputs(wildcards)
    assert all(Path(p).exists() for p in inputs["template_paths"])
    return {
        "visit": visit,
        "detector": detector,
        "patches": [list(p) for p in plan.warp_patches(wildcards)],
        "diffim": plan.config["diffim"],
        **inputs,
    }


def _subtract(dia_ccd, out: Path, **overrides) -> pd.Series:
    out.mkdir(exist_ok=True)
    kwargs = {
        **{k: dia_ccd[k] for k in ("calexp_path", "ccdvisit_path", "src_path", "skymap_path")},
        "template_paths": dia_ccd["template_paths"],
        "template_psf_paths": dia_ccd["template_psf_paths"],
        "patches": dia_ccd["patches"],
        "difference_path": str(out / "diff.fits"),
        "dia_source_path": str(out / "diaSrc.parquet"),
        "dia_ccd_path": str(out / "diaCcd.parquet"),
        "visit": dia_ccd["visit"],
        "detector": dia_ccd["detector"],
        "diffim": dia_ccd["diffim"],
        **overrides,
    }
    subtract_ccd(**kwargs)
    return read_table(out / "diaCcd.parquet").iloc[0]


def test_no_template_coverage(dia_ccd, tmp_path):
    row = _subtract(dia_ccd, tmp_path, template_paths=[], template_psf_paths=[], patches=[])
    assert row["failed"] and "template covers 0.0% of the CCD" in row["failReason"]
    assert read_table(tmp_path / "diaSrc.parquet").empty


def test_too_few_stars_for_psf_matching(dia_ccd, tmp_path):
    """No kernel stamp: the kernel between the two PSF models, recorded as such."""
    src = read_table(dia_ccd["src_path"])
    write_table(src.nlargest(2, "snr"), tmp_path / "src.parquet")
    row = _subtract(dia_ccd, tmp_path / "out", src_path=str(tmp_path / "src.parquet"))
    assert not row["failed"]
    assert row["method"] == "psf_models" and row["nKernelStamps"] == 0


def test_science_visit_is_its_own_template(dia_ccd, tmp_path):
    """A CCD-visit that is most of its own template is a recorded skip, not a difference
    of the visit with itself (its noise cancelled, every residual a DIASource)."""
    from workflow_lib.io.coadd_psf import read_coadd_psf

    config = {**TINY, "output_dir": str(Path(dia_ccd["skymap_path"]).parents[1])}
    plan = WorkflowPlan({**config, "diffim": {"enabled": True}})
    inputs = read_coadd_psf(dia_ccd["template_psf_paths"][0]).input_ids
    assert inputs is not None
    in_template = [ccd for ccd in plan.diffim_ccd_ids() if ccd[0] in set(inputs[:, 0])]
    visit, detector = in_template[0]
    wildcards = {"visit": str(visit), "detector": str(detector)}
    own = {
        **dia_ccd,
        **plan.diffim_inputs(wildcards),
        "visit": visit,
        "detector": detector,
        "patches": [list(p) for p in plan.warp_patches(wildcards)],
    }
    row = _subtract(own, tmp_path / "skip")
    assert row["failed"] and "this visit's own pixels" in row["failReason"], row["failReason"]
    assert row["templateSelfWeight"] > 0.5
    allowed = {**dia_ccd["diffim"], "max_template_self_weight": 1.0}
    row = _subtract(own, tmp_path / "allowed", diffim=allowed)
    assert not row["failed"] and row["templateSelfWeight"] > 0.5
    # A visit outside the template: none of its pixels are in it.
    assert _subtract(dia_ccd, tmp_path / "other")["templateSelfWeight"] == 0.0


# ------------------------------------------------------------------------- the table
_TEST_CELL = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def _readme_cases() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Bad inputs", 1)[1].split("\n#", 1)[0]
    return [m.groups() for m in _TEST_CELL.finditer(section)]


def test_the_readme_table_and_the_tests_agree():
    cases = _readme_cases()
    assert len(cases) >= 25
    for file, name in cases:
        assert re.search(rf"^def {name}\(", (REPO / file).read_text(), re.M), f"{file}::{name}"
    here = {n for f, n in cases if f == "tests/test_bad_inputs.py"}
    mine = set(re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(), re.M))
    guards = {"test_the_readme_table_and_the_tests_agree", "test_our_own_files_pass_the_checks"}
    assert mine - guards == here


def test_our_own_files_pass_the_checks(tmp_path):
    """Our own writer's files pass the damage checks (so the checks judge only damage)."""
    for name in ("a.fits", "a.fits.gz", "a.fits.fz"):
        write_raw_file(tmp_path / name, fake_primary(), fake_amplifiers())
        assert _problems(tmp_path / name) == []
        assert len(read_image_hdus(tmp_path / name)[1]) == 2
    # A keyword astropy calls non-standard is not damage.
    # astropy warns of them (VerifyWarning) and reads on; so do we.
    write_raw_file(tmp_path / "odd.fits", fake_primary(ODDVAL=1), fake_amplifiers())
    data = (tmp_path / "odd.fits").read_bytes()
    at = data.index(b"ODDVAL  =")
    for card in (b"odd-key = 'x'", b"ODDVAL  = 1.2.3", b"ODD KEY = 3"):
        (tmp_path / "odd.fits").write_bytes(data[:at] + card.ljust(80) + data[at + 80 :])
        with pytest.warns(fits.verify.VerifyWarning):
            assert _problems(tmp_path / "odd.fits") == []
        with pytest.warns(fits.verify.VerifyWarning):
            assert len(read_image_hdus(tmp_path / "odd.fits")[1]) == 2
    # A header keyword edited by hand breaks CHECKSUM but not DATASUM: still read.
    with fits.open(tmp_path / "a.fits", mode="update", checksum=False) as hdul:
        hdul[1].header.set("GAIN", 1.6)
    with pytest.warns(UserWarning, match="Checksum verification failed"):
        fits.getdata(tmp_path / "a.fits", 1, checksum=True)
    assert read_image_hdus(tmp_path / "a.fits")[1][0][1]["GAIN"] == 1.6
