"""Single-frame plumbing: failure records, flags, tables, summary, DAG inputs, metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from workflow_lib.core.exposure import Exposure
from workflow_lib.core.flags import CcdVisitFlag, SourceFlag, describe
from workflow_lib.io import read_table, write_concatenated, write_csv, write_table
from workflow_lib.io.exposure import (
    ProcessingFailed,
    is_failure_record,
    read_exposure,
    write_exposure,
    write_failure_record,
)
from workflow_lib.qa.metrics import repeatability, single_frame_metrics
from workflow_lib.single_frame.calibrate import ccd_visit_row, process_single_frame, source_ids
from workflow_lib.steps.summary import write_run_summary
from workflow_lib.steps.tables import consolidate_table
from workflow_lib.workflow import WorkflowPlan


def test_failure_record_cannot_be_read_as_an_image(tmp_path):
    path = tmp_path / "calexp.fits"
    write_failure_record(path, fits.Header({"EXPID": 5}), reason="astrometry: no match")
    assert is_failure_record(path)
    with pytest.raises(ProcessingFailed, match="astrometry: no match"):
        read_exposure(path)
    with fits.open(path) as hdul:
        assert len(hdul) == 1 and hdul[0].data is None
    good = tmp_path / "ok.fits"
    write_exposure(Exposure(np.zeros((3, 3)), np.ones((3, 3)), np.zeros((3, 3))), good)
    assert not is_failure_record(good)


def test_flags_are_distinct_bits_and_decodable():
    for flag_type in (CcdVisitFlag, SourceFlag):
        values = [m.value for m in flag_type]
        assert len(set(values)) == len(values)
        assert all(v & (v - 1) == 0 for v in values)  # single bits
    value = int(CcdVisitFlag.FAILED | CcdVisitFlag.NO_REFERENCE_STARS)
    assert describe(CcdVisitFlag, value) == ["FAILED", "NO_REFERENCE_STARS"]


def test_source_ids_are_unique_across_ccds():
    a = source_ids(400100, 3, 1000)
    b = source_ids(400100, 4, 1000)
    c = source_ids(400101, 3, 1000)
    assert len(np.unique(np.concatenate([a, b, c]))) == 3000
    with pytest.raises(ValueError):
        source_ids(1, 1000, 5)


def test_bad_image_is_a_flagged_row_not_a_crash():
    exposure = Exposure(np.full((20, 20), np.nan), np.ones((20, 20)), np.zeros((20, 20)))
    exposure.set_mask("NO_DATA", np.ones((20, 20), dtype=bool))
    from workflow_lib.core.config import load_config

    result = process_single_frame(
        exposure,
        pd.DataFrame(),
        visit=1,
        detector=2,
        band="r",
        mjd=60600.0,
        exptime=30.0,
        config=load_config({}).calibrate,
    )
    assert result.failed
    assert result.ccd_visit["flags"] & CcdVisitFlag.FAILED
    assert result.ccd_visit["flags"] & CcdVisitFlag.BAD_IMAGE
    assert "no usable pixel" in result.ccd_visit["failReason"]
    assert result.sources.empty


def test_consolidation_and_summary_list_failed_ccds(tmp_path):
    rows = [
        ccd_visit_row(visit=2, detector=0, band="r", mjd=60600.0, exptime=30.0, flags=0),
        ccd_visit_row(
            visit=1,
            detector=1,
            band="r",
            mjd=60600.0,
            exptime=30.0,
            flags=int(CcdVisitFlag.FAILED | CcdVisitFlag.NO_REFERENCE_STARS),
            fail_reason="no reference stars overlap this CCD",
        ),
    ]
    paths = []
    for i, row in enumerate(rows):
        paths.append(str(tmp_path / f"row{i}.parquet"))
        write_table(pd.DataFrame([row]), paths[-1])
    n_rows = consolidate_table(
        input_paths=paths, output_path=str(tmp_path / "CcdVisit.parquet"), table="CcdVisit"
    )
    table = read_table(tmp_path / "CcdVisit.parquet")
    assert n_rows == 2 and table["visit"].tolist() == [1, 2]  # sorted
    assert table["midpointMjdTai"].iloc[0] == pytest.approx(60600.0 + 15.0 / 86400.0)

    registry = pd.DataFrame(
        {"obstype": ["science"], "band": ["r"], "visit": [1], "detector": [1], "mjd": [60600.0]}
    )
    write_table(registry, tmp_path / "registry.parquet")
    write_csv(pd.DataFrame({"problem": []}, dtype=str), tmp_path / "problems.csv")
    summary = write_run_summary(
        registry_path=str(tmp_path / "registry.parquet"),
        problems_path=str(tmp_path / "problems.csv"),
        summary_path=str(tmp_path / "summary.json"),
        ccdvisit_table_path=str(tmp_path / "CcdVisit.parquet"),
    )
    single = summary["single_frame"]
    assert single["n_processed"] == 1 and single["n_failed"] == 1
    assert single["failed"] == [
        {"visit": 1, "detector": 1, "reason": "no reference stars overlap this CCD"}
    ]


def test_empty_per_ccd_tables_still_consolidate(tmp_path):
    empty = pd.DataFrame({"visit": pd.Series(dtype="i8"), "detector": pd.Series(dtype="i8")})
    write_table(empty, tmp_path / "a.parquet")
    out = consolidate_table(
        input_paths=[str(tmp_path / "a.parquet")],
        output_path=str(tmp_path / "S.parquet"),
        table="Source",
    )
    assert out == 0 and list(read_table(tmp_path / "S.parquet").columns) == ["visit", "detector"]


def test_streamed_consolidation_equals_concatenating_and_sorting(tmp_path):
    """Pieces in any order, empty ones with untyped columns, small row groups: the
    result is the stable (visit, detector) sort of the concatenation, dtypes kept."""
    rng = np.random.default_rng(4)
    pieces = []
    for visit, detector, n in [(3, 1, 5), (1, 2, 0), (1, 0, 7), (2, 0, 4), (1, 0, 3), (3, 0, 6)]:
        pieces.append(
            pd.DataFrame(
                {
                    "sourceId": rng.integers(0, 2**62, n),
                    "visit": np.full(n, visit),
                    "detector": np.full(n, detector),
                    "band": ["r"] * n if n else [],
                    "psfFlux": rng.normal(size=n).astype(np.float32),
                }
            )
        )
    paths = []
    for i, piece in enumerate(pieces):
        paths.append(str(tmp_path / f"p{i}.parquet"))
        write_table(piece.astype({"band": object}) if piece.empty else piece, paths[-1])
    expected = (
        pd.concat([p for p in pieces if len(p)], ignore_index=True)
        .sort_values(["visit", "detector"], kind="stable")
        .reset_index(drop=True)
    )
    out = tmp_path / "Source.parquet"
    assert write_concatenated(paths, out, sort_keys=("visit", "detector"), row_group_rows=8) == 25
    pd.testing.assert_frame_equal(read_table(out), expected, check_exact=True)
    assert pq.ParquetFile(out).metadata.num_row_groups > 1
    # A piece holding several (visit, detector): sorted in memory, same answer.
    write_table(pd.concat([pieces[0], pieces[2]], ignore_index=True), paths[0])
    mixed = [paths[0], *paths[3:]]
    expected = (
        pd.concat([pieces[0], pieces[2], *pieces[3:]], ignore_index=True)
        .sort_values(["visit", "detector"], kind="stable")
        .reset_index(drop=True)
    )
    write_concatenated(mixed, out, sort_keys=("visit", "detector"))
    pd.testing.assert_frame_equal(read_table(out), expected, check_exact=True)


def test_process_ccd_inputs_follow_the_available_calibrations():
    plan = WorkflowPlan({"sim": {"preset": "tiny", "seed": 7}})
    visit, detector = plan.science_ids[0]
    inputs = plan.process_ccd_inputs({"visit": str(visit), "detector": str(detector)})
    assert set(inputs) == {
        "raw_path",
        "refcat_manifest_path",
        "bias_path",
        "dark_path",
        "flat_path",
        "defects_path",
    }
    band = plan.science.set_index(["visit", "detector"]).loc[(visit, detector), "band"]
    assert inputs["flat_path"].endswith(f"flat_{band}_{detector}.fits")

    eimage = WorkflowPlan({"sim": {"preset": "tiny", "seed": 7, "format": "eimage"}})
    inputs = eimage.process_ccd_inputs({"visit": str(visit), "detector": str(detector)})
    assert set(inputs) == {"raw_path", "refcat_manifest_path"}
    with pytest.raises(ValueError, match="not a selected science CCD"):
        plan.process_ccd_inputs({"visit": "1", "detector": "0"})


def test_metrics_against_a_known_truth():
    rng = np.random.default_rng(3)
    n_stars, visits = 40, [10, 11, 12, 13]
    truth = pd.DataFrame(
        {
            "id": np.arange(n_stars),
            "kind": "star",
            "ra": 56.0 + rng.uniform(0, 0.05, n_stars),
            "dec": -30.0 + rng.uniform(0, 0.05, n_stars),
            "r_mag": rng.uniform(17, 20, n_stars),
        }
    )
    rows = []
    for visit in visits:
        err_mag = rng.normal(0, 0.004, n_stars)  # 4 mmag per-visit scatter
        flux = 10 ** (-0.4 * (truth["r_mag"] + 0.002 + err_mag - 31.4))  # 2 mmag faint bias
        rows.append(
            pd.DataFrame(
                {
                    "visit": visit,
                    "detector": 0,
                    "band": "r",
                    "ra": truth["ra"]
                    + rng.normal(0, 5e-3 / 3600, n_stars) / np.cos(np.deg2rad(-30)),
                    "dec": truth["dec"] + rng.normal(0, 5e-3 / 3600, n_stars),
                    "psfFlux": flux,
                    "psfFluxErr": flux / 200,
                    "extendedness": 0.0,
                    "flags": 0,
                }
            )
        )
    sources = pd.concat(rows, ignore_index=True)
    ccd = pd.DataFrame(
        [
            ccd_visit_row(
                visit=v,
                detector=0,
                band="r",
                mjd=0,
                exptime=30,
                flags=0,
                seeing=0.8,
                zeroPoint=28.003,
                astromRms=0.005,
            )
            for v in visits
        ]
    )
    truth_ccd = pd.DataFrame({"visit": visits, "detector": 0, "zero_point": 28.0, "seeing": 0.8})
    m = single_frame_metrics(sources, ccd, truth, truth_ccd)
    assert m["zero_point_abs_diff_median_mmag"] == pytest.approx(3.0, abs=1e-6)
    assert m["seeing_ratio_median"] == pytest.approx(1.0)
    assert m["n_bright_stars"] == n_stars * len(visits)
    assert m["astrometry_rms_mas"] == pytest.approx(5.0 * np.sqrt(2), rel=0.15)
    assert m["psf_flux_offset_median_mmag"] == pytest.approx(2.0, abs=1.0)
    pa1 = m["pa1_mmag_by_min_snr"]["50.0"]
    assert pa1["rms"] == pytest.approx(4.0, rel=0.15)
    assert pa1["robust"] == pytest.approx(4.0, rel=0.25)
    assert pa1["noise"] == pytest.approx(1000 * 2.5 / np.log(10) / 200, rel=1e-6)


def test_repeatability_ignores_stars_with_few_visits():
    matched = pd.DataFrame(
        {"truth_id": [1, 1, 2, 2, 2], "band": "r", "psfFlux": [1.0, 1.0, 1.0, 1.01, 0.99]}
    )
    matched["psfFluxErr"] = 0.01
    value = repeatability(matched, min_visits=3)
    expected = 1000 * np.std(-2.5 * np.log10([1.0, 1.01, 0.99]), ddof=1)
    assert value["rms"] == pytest.approx(expected)
    assert value["n_stars"] == 1
