"""The per-CCD step on real files of the tiny survey, including every failure mode."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from workflow_lib.core.config import validate_config
from workflow_lib.core.flags import CcdVisitFlag
from workflow_lib.io import read_table, write_csv, write_image_file
from workflow_lib.io.butler import Butler
from workflow_lib.io.exposure import ProcessingFailed, read_exposure
from workflow_lib.steps.process_ccd import process_ccd
from workflow_lib.steps.refcat import shard_refcat
from workflow_lib.workflow import WorkflowPlan

DEFAULTS = validate_config({})


@pytest.fixture(scope="module")
def ccd(tiny_run):
    """Inputs of one science CCD of the tiny run."""
    plan = WorkflowPlan(
        {"sim": {"preset": "tiny", "seed": 7}, "output_dir": str(tiny_run / "results")}
    )
    visit, detector = plan.science_ids[-1]
    inputs = plan.process_ccd_inputs({"visit": str(visit), "detector": str(detector)})
    return {"visit": visit, "detector": detector, "inputs": inputs, "plan": plan}


def _run(ccd, tmp_path, **overrides):
    kwargs = dict(
        **ccd["inputs"],
        calexp_path=str(tmp_path / "calexp.fits"),
        src_path=str(tmp_path / "src.parquet"),
        ccdvisit_path=str(tmp_path / "ccdVisit.parquet"),
        visit=ccd["visit"],
        detector=ccd["detector"],
        image_format="raw",
        isr=DEFAULTS["isr"],
        calibrate=DEFAULTS["calibrate"],
    )
    kwargs.update(overrides)
    process_ccd(**kwargs)
    row = read_table(tmp_path / "ccdVisit.parquet").iloc[0]
    return row, read_table(tmp_path / "src.parquet")


def _assert_failed(row, src, tmp_path, flag, text):
    assert row["flags"] & CcdVisitFlag.FAILED and row["flags"] & flag
    assert text in row["failReason"]
    assert src.empty
    with pytest.raises(ProcessingFailed):
        read_exposure(tmp_path / "calexp.fits")


def _shifted_refcat(ccd, tmp_path, *, keep: int | None = None, shift_deg: float = 0.0):
    """The survey's refcat, moved on the sky or cut to its ``keep`` brightest stars."""
    plan = ccd["plan"]
    table = read_table(plan.refcat_path)
    table["raJ2000"] = (table["raJ2000"] + shift_deg) % 360.0
    if keep is not None:
        table = table.sort_values("lsst_r").head(keep)
    write_csv(table, tmp_path / "refcat.csv", header_prefix="#")
    manifest = tmp_path / "shards" / "manifest.json"
    shard_refcat(
        refcat_path=str(tmp_path / "refcat.csv"),
        columns=plan.refcat_columns,
        nside=64,
        manifest_path=str(manifest),
    )
    return str(manifest)


def test_a_good_ccd_gives_calexp_src_and_row(ccd, tmp_path):
    row, src = _run(ccd, tmp_path)
    assert row["flags"] & CcdVisitFlag.FAILED == 0 and row["failReason"] == ""
    calexp = read_exposure(tmp_path / "calexp.fits")
    assert (
        calexp.image.dtype == np.float32
        and calexp.psf.size == DEFAULTS["calibrate"]["psf_kernel_size"]
    )
    assert set(src.columns) >= {
        "sourceId",
        "visit",
        "detector",
        "band",
        "ra",
        "dec",
        "x",
        "y",
        "psfFlux",
        "psfFluxErr",
        "apFlux",
        "apFluxErr",
        "extendedness",
        "flags",
    }
    assert src["sourceId"].is_unique and len(src) == row["nSources"]
    # The calexp is in nJy: a bright star's PSF flux equals its aperture flux roughly.
    bright = src[(src["snr"] > 100) & (src["extendedness"] == 0)]
    ratio = np.median(bright["psfFlux"] / bright["apFlux"])
    assert 0.9 < ratio < 1.2


def test_no_overlap_with_the_reference_catalog(ccd, tmp_path):
    manifest = _shifted_refcat(ccd, tmp_path, shift_deg=20.0)
    row, src = _run(ccd, tmp_path, refcat_manifest_path=manifest)
    _assert_failed(row, src, tmp_path, CcdVisitFlag.NO_REFERENCE_STARS, "no reference stars")


def test_too_few_reference_stars(ccd, tmp_path):
    manifest = _shifted_refcat(ccd, tmp_path, keep=3)
    row, src = _run(ccd, tmp_path, refcat_manifest_path=manifest)
    assert row["flags"] & CcdVisitFlag.FAILED
    assert row["flags"] & (CcdVisitFlag.ASTROMETRY_FAILED | CcdVisitFlag.NO_REFERENCE_STARS)
    assert src.empty


def test_all_nan_eimage_is_flagged(ccd, tmp_path):
    header = fits.getheader(ccd["inputs"]["raw_path"], 0)
    header["GAIN"] = 1.0
    eimage = tmp_path / "eimage.fits"
    write_image_file(eimage, header, [], primary_data=np.full((64, 64), np.nan, dtype=np.float32))
    row, src = _run(
        ccd,
        tmp_path,
        raw_path=str(eimage),
        image_format="eimage",
        bias_path=None,
        dark_path=None,
        flat_path=None,
        defects_path=None,
    )
    _assert_failed(row, src, tmp_path, CcdVisitFlag.BAD_IMAGE, "ISR")


def test_missing_calibrations_are_skipped_and_recorded(ccd, tmp_path):
    row, _ = _run(ccd, tmp_path, bias_path=None, dark_path=None, defects_path=None)
    assert row["flags"] & CcdVisitFlag.NO_BIAS and row["flags"] & CcdVisitFlag.NO_DARK
    calexp = read_exposure(tmp_path / "calexp.fits")
    assert calexp.metadata["ISR_BIAS"].startswith("skipped")
    # The aperture correction travels with the calexp (its warps carry it to the coadd).
    from workflow_lib.single_frame.measure import ApertureCorrection

    apcorr = ApertureCorrection.from_header(calexp.metadata)
    ny, nx = calexp.shape
    at_centre = apcorr.ratio_at(np.array([(nx - 1) / 2.0]), np.array([(ny - 1) / 2.0]))[0][0]
    assert at_centre == pytest.approx(row["apCorr"], rel=1e-12)


def test_butler_reads_the_consolidated_tables(tiny_run):
    butler = Butler(tiny_run / "results")
    sources = butler.get("Source")
    assert isinstance(sources, pd.DataFrame) and sources["sourceId"].is_unique
    assert set(butler.list("calexp")["visit"]) == set(butler.get("CcdVisit")["visit"])
