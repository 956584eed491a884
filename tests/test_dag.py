"""Large DAGs: input functions as look-ups, partitioned runs and their consolidation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY, snakemake

from benchmarks.bench_dag import BANDS, make_synthetic_survey
from workflow_lib.io.butler import Butler
from workflow_lib.steps.tables import consolidate_output_dir
from workflow_lib.workflow import WorkflowPlan


@pytest.fixture(scope="module")
def synthetic_plan(tmp_path_factory) -> WorkflowPlan:
    survey = make_synthetic_survey(tmp_path_factory.mktemp("synthetic"), 13, 4)
    return WorkflowPlan(yaml.safe_load(survey.configfile.read_text()))


def _filtered_inputs(plan: WorkflowPlan, visit: int, detector: int) -> dict[str, str]:
    """process_ccd's inputs computed the slow, obvious way: by filtering the tables."""
    science = plan.science
    row = science[(science["visit"] == visit) & (science["detector"] == detector)]
    band = row["band"].iloc[0]
    calibs = plan.calibrations
    expected = {"raw_path": row["path"].iloc[0]}
    for obstype in ("bias", "dark", "flat"):
        keep = (calibs["obstype"] == obstype) & (calibs["detector"] == detector)
        if obstype == "flat":
            keep &= calibs["band"] == band
        if keep.any():
            data_id = {"detector": detector, **({"band": band} if obstype == "flat" else {})}
            expected[f"{obstype}_path"] = str(plan.paths.path(obstype, **data_id))
    return expected


def test_input_functions_are_lookups_with_the_tables_answers(synthetic_plan):
    plan = synthetic_plan
    assert len(plan.science_ids) == 13 * 4
    for visit, detector in plan.science_ids:
        inputs = plan.process_ccd_inputs({"visit": str(visit), "detector": str(detector)})
        expected = _filtered_inputs(plan, visit, detector)
        assert {k: v for k, v in inputs.items() if k in expected} == expected
        assert inputs["defects_path"].endswith(f"defects_{detector}.fits")
    for detector in range(4):
        bias = plan.master_bias_inputs({"detector": str(detector)})["raw_paths"]
        calibs = plan.calibrations
        assert bias == list(
            calibs[(calibs["obstype"] == "bias") & (calibs["detector"] == detector)]["path"]
        )
        flats = plan.master_flat_inputs({"detector": str(detector), "band": "r"})["raw_paths"]
        assert len(flats) == 3 and all(f"_{detector}.fits" in f for f in flats)
        defects = plan.defects_inputs({"detector": str(detector)})
        assert len(defects["flat_paths"]) == len(BANDS)
    assert plan.per_ccd_paths("src") == [
        str(plan.paths.path("src", visit=v, detector=d)) for v, d in plan.science_ids
    ]
    with pytest.raises(ValueError, match="not a selected science CCD"):
        plan.process_ccd_inputs({"visit": "1", "detector": "0"})


def test_a_ccd_with_two_files_is_not_a_lookup_away(synthetic_plan):
    plan = WorkflowPlan(synthetic_plan.config)
    visit, detector = plan.science_ids[5]
    plan.science = pd.concat([plan.science, plan.science.iloc[[5]]], ignore_index=True)
    with pytest.raises(ValueError, match=f"visit {visit} detector {detector} is not"):
        plan.process_ccd_inputs({"visit": str(visit), "detector": str(detector)})
    other_visit, other_detector = plan.science_ids[0]
    assert plan.process_ccd_inputs({"visit": str(other_visit), "detector": str(other_detector)})


def job_counts(dry_run_output: str) -> dict[str, int]:
    """{rule: jobs} from the job stats table of a dry run."""
    return {
        parts[0]: int(parts[1])
        for parts in (line.split() for line in dry_run_output.splitlines())
        if len(parts) == 2 and parts[1].isdigit()
    }


def test_synthetic_survey_dry_run_has_the_expected_jobs(tmp_path):
    survey = make_synthetic_survey(tmp_path, 6, 3)
    result = snakemake(tmp_path, yaml.safe_load(survey.configfile.read_text()), "-n")
    counts = job_counts(result.stdout)
    assert counts["process_ccd"] == 18
    assert counts["total"] == survey.n_jobs


# Partitions run single-frame processing only: a coadd made inside a partition
# would hold that partition's visits alone (docs/hpc.md, "Partitioned runs").
PARTITION_ARGS = (
    "--omit-from",
    "ccdvisit_table",
    "source_table",
    "run_summary",
    "warp",
    "--rerun-triggers",
    "mtime",
)


def test_preparation_step_runs_no_ccd(tmp_path):
    counts = job_counts(snakemake(tmp_path, TINY, "-n", "--omit-from", "process_ccd").stdout)
    assert "process_ccd" not in counts and "ccdvisit_table" not in counts
    assert counts["master_flat"] > 0 and counts["simulate_exposure"] > 0


@pytest.mark.workflow
def test_visit_partitions_then_consolidate_equal_one_full_run(tiny_run, tmp_path):
    """Two visit-range partitions into one output_dir + `consolidate` == the full run."""
    full = tiny_run / "results"
    work = tmp_path / "partitioned"
    # The preparation step (simulation, ingest, refcat, calibrations) of the
    # full run, copied with its times: partitions must not redo it.
    prepared = {"sim", "registry", "refcat", "calib", "skymap"}
    shutil.copytree(
        full,
        work / "results",
        ignore=lambda d, names: [n for n in names if n not in prepared] if Path(d) == full else [],
    )
    visits = sorted(Butler(full).get("CcdVisit")["visit"].unique())
    halves = [visits[: len(visits) // 2], visits[len(visits) // 2 :]]
    for part in halves:
        config = {**TINY, "select": {"visit": [int(v) for v in part]}}
        snakemake(work, config, "--cores", "2", *PARTITION_ARGS)
    assert not (work / "results/tables/CcdVisit.parquet").exists()  # partitions make no table
    assert not (work / "results/warp").exists(), "a partition made warps (and coadds of its visits)"
    assert not (work / "results/logs/ingest_raw.log").exists(), "a partition redid the ingest"
    counts = consolidate_output_dir(output_dir=work / "results")
    for table in ("CcdVisit", "Source"):
        expected = pd.read_parquet(full / f"tables/{table}.parquet")
        got = pd.read_parquet(work / f"results/tables/{table}.parquet")
        assert counts[table] == len(expected) > 0
        pd.testing.assert_frame_equal(got, expected)


def test_consolidate_cli_rebuilds_tables_and_summary(tiny_run, tmp_path):
    from workflow_lib.cli import main

    work = tmp_path / "results"
    shutil.copytree(tiny_run / "results", work, ignore=shutil.ignore_patterns("calexp", "sim"))
    (work / "tables/Source.parquet").unlink()
    (work / "summary/run_summary.json").unlink()
    assert main(["consolidate", str(work)]) == 0
    pd.testing.assert_frame_equal(
        pd.read_parquet(work / "tables/Source.parquet"),
        pd.read_parquet(tiny_run / "results/tables/Source.parquet"),
    )
    assert Butler(work).get("run_summary")["inputs"]["n_files"] > 0
    shutil.rmtree(work / "src")
    assert main(["consolidate", str(work), "--tables", "Source"]) == 1  # nothing to consolidate
