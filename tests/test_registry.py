"""Ingest: every CONTRACT keyword is checked, bad files become one line each."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from workflow_lib.core.config import Selection
from workflow_lib.core.registry import (
    CORNER_COLUMNS,
    CORNER_DEC_COLUMNS,
    CORNER_RA_COLUMNS,
    select_calibrations,
    select_science,
)
from workflow_lib.io import write_table
from workflow_lib.steps import ingest
from workflow_lib.steps.ingest import (
    IngestError,
    ingest_raw,
    read_registry,
    scan_files,
    scan_raw_directory,
)


def _scan_one(path, image_format="raw"):
    return scan_files([path], image_format=image_format)


def test_valid_raw_file_gives_one_registry_row(tmp_path, write_fake_raw):
    path = write_fake_raw(tmp_path / "a.fits", FILTER="R ", DARKTIME=None)
    result = _scan_one(path)
    assert result.problems == []
    row = result.registry.iloc[0]
    assert (row.exposure, row.visit, row.detector, row.band) == (159400, 159400, 3, "r")
    assert row.darktime == row.exptime == 30.0
    assert row.n_amplifiers == 2
    assert row.path == str(path)


@pytest.mark.parametrize(
    ("primary", "amp", "expected"),
    [
        ({"OBSTYPE": None}, {}, "missing keyword IMGTYPE"),
        ({"EXPID": None}, {}, "missing keyword EXPID"),
        ({"EXPID": "abc"}, {}, "keyword EXPID='abc' is not an integer"),
        ({"FILTER": None}, {}, "missing keyword FILTER"),
        ({"FILTER": "w"}, {}, "keyword FILTER='w' is not one of"),
        ({"MJD-OBS": None}, {}, "missing keyword MJD-OBS"),
        ({"EXPTIME": "long"}, {}, "keyword EXPTIME='long' in primary HDU is not a number"),
        ({"EXPTIME": 0.0}, {}, "EXPTIME=0.0 is not a valid science time"),
        ({"RA": None}, {}, "missing keyword RA"),
        ({"CD1_1": None}, {}, "missing keyword CD1_1"),
        ({"OBSTYPE": "focus"}, {}, "keyword OBSTYPE='focus' is not one of"),
        ({}, {"GAIN": None}, "missing keyword GAIN in HDU 1"),
        ({}, {"SATURATE": -5.0}, "keyword SATURATE=-5.0 in HDU 1 must be positive"),
        ({}, {"DATASEC": "[3:18;1:8]"}, "keyword DATASEC in HDU 1"),
        ({}, {"DATASEC": "[3:40,1:8]"}, "exceeds the 22x8 image"),
        ({}, {"DETSEC": "[1:10,1:8]"}, "differ in size"),
    ],
)
def test_each_bad_keyword_is_one_line_naming_file_and_keyword(
    tmp_path, write_fake_raw, primary, amp, expected
):
    path = write_fake_raw(tmp_path / "bad.fits", amp_overrides=amp, **primary)
    result = _scan_one(path)
    assert result.registry.empty
    assert len(result.problems) == 1
    line = result.problems[0]
    assert line.startswith(f"{path}: ")
    assert expected in line
    assert "\n" not in line


def test_calibrations_need_less_than_science(tmp_path, write_fake_raw):
    bias = write_fake_raw(tmp_path / "bias.fits", OBSTYPE="BIAS", EXPTIME=0.0, FILTER=None, RA=None)
    dark = write_fake_raw(tmp_path / "dark.fits", IMGTYPE="dark", OBSTYPE=None, EXPID=9, RA=None)
    result = scan_files([bias, dark], image_format="raw")
    assert result.problems == []
    assert sorted(result.registry["obstype"]) == ["bias", "dark"]
    assert set(result.registry["visit"]) == {-1}
    assert set(result.registry["band"]) == {""}


def test_amplifiers_must_tile_the_detector(tmp_path, write_fake_raw):
    path = write_fake_raw(tmp_path / "a.fits", amp_overrides={"DETSEC": "[1:16,1:8]"})
    assert "HDU 2: DETSEC [1:16,1:8] overlaps that of HDU 1" in _scan_one(path).problems[0]
    gap = write_fake_raw(tmp_path / "b.fits", amp_overrides={"DETSEC": "[17:32,1:8]"})
    gap_amps = fits.open(gap)  # move the second amplifier up: a gap below it
    gap_amps[2].header["DETSEC"] = "[17:32,9:16]"
    gap_amps.writeto(tmp_path / "c.fits")
    assert "DETSECs cover 256 pixels of a 32x16" in _scan_one(tmp_path / "c.fits").problems[0]


def test_scan_reports_every_bad_file_and_keeps_the_good(tmp_path, write_fake_raw):
    write_fake_raw(tmp_path / "raw" / "v1" / "good1.fits", EXPID=1)
    write_fake_raw(tmp_path / "raw" / "v2" / "good2.fits", EXPID=2)
    (tmp_path / "raw" / "corrupt.fits").write_bytes(b"not a FITS file at all")
    write_fake_raw(tmp_path / "raw" / "nofilter.fits", EXPID=3, FILTER=None)
    (tmp_path / "raw" / "notes.txt").write_text("ignored: not a FITS name")

    result = scan_raw_directory(tmp_path / "raw", image_format="raw")
    assert sorted(result.registry["exposure"]) == [1, 2]
    assert len(result.problems) == 2
    assert any("corrupt.fits: cannot read as FITS" in p for p in result.problems)
    assert any("nofilter.fits: missing keyword FILTER" in p for p in result.problems)

    with pytest.raises(IngestError) as info:
        result.raise_if_problems(on_bad_file="fail")
    message = str(info.value)
    assert "2 bad input file(s)" in message and "corrupt.fits" in message
    result.raise_if_problems(on_bad_file="skip")  # logged, not raised


def test_duplicate_exposure_detector_is_a_problem(tmp_path, write_fake_raw):
    a = write_fake_raw(tmp_path / "a.fits")
    b = write_fake_raw(tmp_path / "b.fits")
    result = scan_files([a, b], image_format="raw")
    assert result.registry.empty
    assert "appears in several files" in result.problems[0]


def test_empty_or_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        scan_raw_directory(tmp_path / "nope", image_format="raw")
    with pytest.raises(IngestError, match=r"no \*\.fits"):
        scan_raw_directory(tmp_path, image_format="raw")


def test_scan_cache_skips_unchanged_files(tmp_path, write_fake_raw, monkeypatch):
    path = write_fake_raw(tmp_path / "raw" / "a.fits")
    cache = tmp_path / "cache.json"
    first = scan_raw_directory(tmp_path / "raw", image_format="raw", cache_path=cache)

    def must_not_read(_path):
        raise AssertionError("unchanged file was reopened")

    monkeypatch.setattr(ingest, "read_headers", must_not_read)
    again = scan_raw_directory(tmp_path / "raw", image_format="raw", cache_path=cache)
    pd.testing.assert_frame_equal(first.registry, again.registry)

    monkeypatch.undo()
    write_fake_raw(path, EXPID=77)
    os.utime(path, ns=(1, 1))  # a different mtime, whatever the clock resolution
    changed = scan_raw_directory(tmp_path / "raw", image_format="raw", cache_path=cache)
    assert changed.registry["exposure"].tolist() == [77]


def test_eimage_rules(tmp_path, write_fake_eimage):
    good = write_fake_eimage(tmp_path / "e1.fits")
    gain = write_fake_eimage(tmp_path / "e2.fits", EXPID=2, GAIN=1.7)
    flat = write_fake_eimage(tmp_path / "e3.fits", EXPID=3, OBSTYPE="flat")
    result = scan_files([good, gain, flat], image_format="eimage")
    assert result.registry["exposure"].tolist() == [159400]
    assert result.registry["n_amplifiers"].tolist() == [0]
    assert any("GAIN=1.7: eimage pixels must be electrons" in p for p in result.problems)
    assert any("eimage inputs must be science" in p for p in result.problems)


def test_selection_of_science_and_needed_calibrations(tmp_path, write_fake_raw):
    files = [
        write_fake_raw(tmp_path / "s1.fits", EXPID=840, DETECTOR=1, FILTER="g"),
        write_fake_raw(tmp_path / "s2.fits", EXPID=841, DETECTOR=1, FILTER="r"),
        write_fake_raw(tmp_path / "s3.fits", EXPID=842, DETECTOR=2, FILTER="r"),
        write_fake_raw(tmp_path / "f1.fits", EXPID=9, DETECTOR=1, OBSTYPE="flat", FILTER="r"),
        write_fake_raw(tmp_path / "f2.fits", EXPID=9, DETECTOR=2, OBSTYPE="flat", FILTER="r"),
        write_fake_raw(tmp_path / "f3.fits", EXPID=10, DETECTOR=1, OBSTYPE="flat", FILTER="g"),
        write_fake_raw(tmp_path / "b1.fits", EXPID=11, DETECTOR=1, OBSTYPE="bias", FILTER=None),
    ]
    registry = scan_files(files, image_format="raw").registry
    science = select_science(
        registry, Selection(visits=(840, 841, 842), detectors=(1,), bands=("r",))
    )
    assert science["exposure"].tolist() == [841]
    calib = select_calibrations(registry, science)
    assert sorted(zip(calib["obstype"], calib["exposure"], calib["detector"], strict=True)) == [
        ("bias", 11, 1),
        ("flat", 9, 1),
    ]


def test_ingest_step_writes_registry_and_problems(tmp_path, write_fake_raw):
    good = write_fake_raw(tmp_path / "raw" / "good.fits")
    write_fake_raw(tmp_path / "raw" / "bad.fits", EXPID=5, RA=None)
    kwargs = dict(
        raw_dir=str(tmp_path / "raw"),
        registry_path=str(tmp_path / "out" / "registry.parquet"),
        problems_path=str(tmp_path / "out" / "problems.csv"),
        image_format="raw",
    )
    with pytest.raises(IngestError, match=r"bad\.fits: missing keyword RA"):
        ingest_raw(**kwargs, on_bad_file="fail")
    assert not (tmp_path / "out" / "registry.parquet").exists()

    registry = ingest_raw(**kwargs, on_bad_file="skip", expected_files=[str(good)])
    assert registry["path"].tolist() == [str(good)]
    assert "bad.fits" in (tmp_path / "out" / "problems.csv").read_text()

    with pytest.raises(IngestError, match="expected input is missing"):
        ingest_raw(
            **kwargs, on_bad_file="skip", expected_files=[str(tmp_path / "raw" / "bad.fits")]
        )


# ------------------------------------------------------------- footprint corners
def _expected_corners(nx: int, ny: int, crpix, cd, crval):
    """Gnomonic corners of an nx x ny detector, outer pixel edges (no astropy)."""
    from workflow_lib.sim.optics import tan_deproject

    x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5]) + 1.0 - crpix[0]
    y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5]) + 1.0 - crpix[1]
    xi = cd[0][0] * x + cd[0][1] * y
    eta = cd[1][0] * x + cd[1][1] * y
    return tan_deproject(xi, eta, *crval)


def test_science_rows_carry_the_header_wcs_footprint(tmp_path, write_fake_raw, write_fake_eimage):
    # Two 16x8 amplifiers (DETSEC) assemble a 32x8 detector; the eimage holds 32x8 pixels.
    wcs = dict(CRVAL1=359.999, CRVAL2=-30.0, CD1_1=-5.5e-5, CD1_2=1e-6, CD2_1=1e-6, CD2_2=5.5e-5)
    raw = write_fake_raw(tmp_path / "raw.fits", **wcs)
    bias = write_fake_raw(
        tmp_path / "bias.fits", OBSTYPE="BIAS", EXPID=3, EXPTIME=0.0, FILTER=None, RA=None
    )
    eimage = write_fake_eimage(tmp_path / "e.fits", EXPID=2, **wcs)
    cd = ((wcs["CD1_1"], wcs["CD1_2"]), (wcs["CD2_1"], wcs["CD2_2"]))
    ra, dec = _expected_corners(32, 8, (16.5, 8.5), cd, (wcs["CRVAL1"], wcs["CRVAL2"]))
    assert ra.max() - ra.min() > 300  # the detector straddles RA = 0

    for files, fmt in (([raw, bias], "raw"), ([eimage], "eimage")):
        result = scan_files(files, image_format=fmt)
        assert result.problems == []
        science = result.registry[result.registry["obstype"] == "science"].iloc[0]
        got_ra = science[list(CORNER_RA_COLUMNS)].to_numpy(float)
        got_dec = science[list(CORNER_DEC_COLUMNS)].to_numpy(float)
        np.testing.assert_allclose(got_ra, ra, rtol=0, atol=1e-10)
        np.testing.assert_allclose(got_dec, dec, rtol=0, atol=1e-10)
        calib = result.registry[result.registry["obstype"] != "science"]
        assert calib[list(CORNER_COLUMNS)].isna().all().all()


def test_unusable_header_wcs_is_one_problem_line(tmp_path, write_fake_raw):
    path = write_fake_raw(tmp_path / "a.fits", CD1_1=0.0, CD1_2=0.0, CD2_1=0.0, CD2_2=0.0)
    problems = _scan_one(path).problems
    assert len(problems) == 1 and problems[0].startswith(f"{path}: header WCS")
    assert "\n" not in problems[0]


def test_registry_of_an_older_version_is_refused_clearly(tmp_path, write_fake_raw):
    write_fake_raw(tmp_path / "raw" / "a.fits")
    out = tmp_path / "registry.parquet"
    ingest_raw(
        raw_dir=str(tmp_path / "raw"),
        registry_path=str(out),
        problems_path=str(tmp_path / "problems.csv"),
        image_format="raw",
        on_bad_file="fail",
    )
    current = read_registry(out)
    assert np.isfinite(current[list(CORNER_COLUMNS)].to_numpy(float)).all()

    old = tmp_path / "old_registry.parquet"
    write_table(current.drop(columns=list(CORNER_COLUMNS)), old)
    with pytest.raises(
        IngestError, match=r"lacks the footprint columns corner_ra_1.*dc2-drp ingest"
    ):
        read_registry(old)


def test_scan_cache_of_an_older_version_is_read_again(tmp_path, write_fake_raw):
    write_fake_raw(tmp_path / "raw" / "a.fits")
    cache = tmp_path / "cache.json"
    scan_raw_directory(tmp_path / "raw", image_format="raw", cache_path=cache)
    payload = json.loads(cache.read_text())
    payload["version"] = 1  # as written before the footprint columns existed
    for entry in payload["files"].values():
        for col in CORNER_COLUMNS:
            del entry["record"][col]
    cache.write_text(json.dumps(payload))

    again = scan_raw_directory(tmp_path / "raw", image_format="raw", cache_path=cache)
    assert np.isfinite(again.registry[list(CORNER_COLUMNS)].to_numpy(float)).all()
    assert json.loads(cache.read_text())["version"] > 1
