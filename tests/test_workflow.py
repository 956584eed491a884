"""The real workflow: dry runs, config errors, lint, and runs of the tiny survey."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from conftest import TINY, snakemake

from workflow_lib.io.butler import Butler
from workflow_lib.sim.presets import get_preset
from workflow_lib.sim.survey import plan_survey
from workflow_lib.workflow import WorkflowPlan

pytestmark = pytest.mark.workflow


def job_counts(dry_run_output: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    in_table = False
    for line in dry_run_output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
        elif in_table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
            if parts[0] == "total":
                break
    return counts


def test_dry_run_lists_the_whole_dag(tmp_path):
    result = snakemake(tmp_path, {}, "-n")
    counts = job_counts(result.stdout)
    plan = plan_survey(get_preset("default"), 20261121)
    registry = plan.registry("raw")
    assert (
        counts["simulate_exposure"]
        == registry.loc[registry["obstype"] == "science", "exposure"].nunique()
    )
    assert counts["simulate_calibrations"] == 1
    assert counts["simulate_scene"] == counts["ingest_raw"] == counts["run_summary"] == 1
    assert not (tmp_path / "results").exists()  # a dry run writes no product


def test_bad_config_fails_before_any_job_with_one_clear_line(tmp_path):
    result = snakemake(tmp_path, {"input": {"sourse": "raw"}}, "--cores", "1", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "config: input.sourse: unknown key (allowed:" in output
    assert not (tmp_path / "results").exists()


def test_rulegraph_renders(tmp_path):
    result = snakemake(tmp_path, TINY, "--rulegraph")
    assert result.stdout.lstrip().startswith("digraph")
    assert "simulate_exposure" in result.stdout and "ingest_raw" in result.stdout


def test_lint_has_only_the_explained_warning(tmp_path):
    result = snakemake(tmp_path, TINY, "--lint", check=False)
    output = result.stdout + result.stderr
    lints = [line.strip() for line in output.splitlines() if line.strip().startswith("* ")]
    # Ingest scans its directory for files Snakemake knows nothing about (the
    # bad ones), so the directory is a parameter by design (README, "Linting").
    assert lints == ["* Param raw_dir is a prefix of input or output file but hardcoded:"]


def test_selection_narrows_the_inputs():
    plan = WorkflowPlan(
        {"sim": {"preset": "tiny", "seed": 7}, "select": {"band": "r", "detector": [0]}}
    )
    assert set(plan.science["band"]) == {"r"}
    assert set(plan.science["detector"]) == {0}
    assert set(plan.calibrations["detector"]) <= {0}
    assert set(plan.calibrations.loc[plan.calibrations["obstype"] == "flat", "band"]) == {"r"}
    with pytest.raises(ValueError, match="keeps no science exposure"):
        WorkflowPlan({"sim": {"preset": "tiny"}, "select": {"visit": 1}})


def test_tiny_run_produces_registry_summary_and_truth(tiny_run):
    butler = Butler(tiny_run / "results")
    registry = butler.get("registry")
    planned = plan_survey(get_preset("tiny"), 7).registry("raw")
    assert len(registry) == len(planned)

    def ids(table: pd.DataFrame) -> list[tuple[int, int]]:
        return sorted(zip(table["exposure"], table["detector"], strict=True))

    assert ids(registry) == ids(planned)
    assert (registry["n_amplifiers"] > 1).all()
    summary = butler.get("run_summary")
    assert summary["inputs"]["n_files"] == len(planned)
    assert summary["skipped_inputs"] == []
    assert len(butler.get("truth_object")) > 0
    assert butler.list("sim_raw").shape[0] == len(planned)
    leftovers = [p for p in (tiny_run / "results").rglob(".*") if p.is_file()]
    # No temporary files left behind (Snakemake stamps the directories it made).
    assert [p for p in leftovers if p.name != ".snakemake_timestamp"] == []
    assert (tiny_run / "results/logs/ingest_raw.log").read_text().count("registry:") == 1


def test_tiny_run_single_frame_quality_against_truth(tiny_run):
    """Loose, error-budgeted versions of the issue's targets (tiny CCDs have ~40 stars)."""
    from workflow_lib.qa.metrics import single_frame_metrics

    butler = Butler(tiny_run / "results")
    ccd = butler.get("CcdVisit")
    assert len(ccd) == len(butler.get("registry").query("obstype == 'science'"))
    assert (ccd["failReason"] == "").all() and (ccd["nAstromStars"] >= 20).all()
    m = single_frame_metrics(
        butler.get("Source"), ccd, butler.get("truth_object"), butler.get("truth_ccdvisit")
    )
    assert m["n_failed"] == 0 and m["n_bright_stars"] > 300
    assert abs(m["zero_point_diff_median_mmag"]) < 15.0
    assert abs(m["seeing_ratio_median"] - 1.0) < 0.03 and m["seeing_abs_rel_diff_max"] < 0.06
    assert m["astrometry_rms_mas"] < 20.0
    assert abs(m["psf_flux_offset_median_mmag"]) < 10.0
    calexp = butler.get(
        "calexp", visit=int(ccd["visit"].iloc[0]), detector=int(ccd["detector"].iloc[0])
    )
    assert calexp.wcs.wcs.ctype[0] == "RA---TAN-SIP" and calexp.psf is not None
    assert calexp.metadata["ISR_BIAS"].startswith("done") or "bias" in calexp.metadata["ISR_BIAS"]


def test_tiny_run_static_sky_products(tiny_run):
    """Coadds, Objects and forced photometry of the tiny survey, in the CONTRACT's form."""
    butler = Butler(tiny_run / "results")
    plan = WorkflowPlan({**TINY, "output_dir": str(tiny_run / "results")})
    objects = butler.get("Object")
    contract = [
        "objectId",
        "tract",
        "patch",
        "ra",
        "dec",
        "detect_isPrimary",
        "refBand",
        "refExtendedness",
    ]
    for band in plan.science_bands:
        contract += [f"{band}_{c}" for c in ("psfFlux", "psfFluxErr", "apFlux", "apFluxErr")]
    assert set(contract) <= set(objects.columns)
    assert objects["objectId"].is_unique and objects["detect_isPrimary"].sum() > 50
    forced = butler.get("ForcedSource")
    forced_cols = [
        "objectId",
        "visit",
        "detector",
        "band",
        "midpointMjdTai",
        "psfFlux",
        "psfFluxErr",
    ]
    assert set(forced_cols) <= set(forced.columns)
    primary = set(objects.loc[objects["detect_isPrimary"], "objectId"])
    assert set(forced["objectId"]) <= primary
    assert set(zip(forced["visit"], forced["detector"], strict=True)) <= set(plan.science_ids)

    summary = butler.get("run_summary")["static_sky"]
    assert summary["n_coadds"] == 2 * len(plan.coadd_ids) and summary["skipped_coadds"] == []
    ids = plan.coadd_ids[0]
    with fits.open(butler.path("deepCoadd", **ids)) as hdul:
        assert {"IMAGE", "MASK", "VARIANCE", "PSF"} <= {h.name for h in hdul}
        assert hdul["MASK"].header["MP_NO_DATA"] >= 0 and "MP_CLIPPED" in hdul["MASK"].header
        assert hdul["IMAGE"].header["CTYPE1"].startswith("RA---TAN")
    # The template holds only visits of the MJD window that pass the PSF cut.
    ccd = butler.get("CcdVisit").set_index(["visit", "detector"])
    for ids in plan.coadd_ids:
        template = butler.get("templateCoadd", **ids)
        provenance = json.loads(template.metadata["PROVENAN"])
        assert provenance["visits"]
        for visit in provenance["visits"]:
            rows = ccd.loc[visit]
            assert (rows["midpointMjdTai"] <= 60630.0).all()
        assert template.psf is not None
    assert butler.get("deepCoaddPsf", **ids).weights.size > 0


def test_tiny_run_static_sky_quality_against_truth(tiny_run):
    """Loose versions of the issue's static-sky targets on the tiny survey.

    Tiny has ~290 primary Objects at S/N > 10, ~60 bright isolated stars per band on
    1-2 visits in g and i (a calexp zero point scatters by ~7 mmag), ~700 forced
    measurements of stars at S/N < 20 (robust sigma known to ~0.04): the bounds are the
    targets widened by those errors, tight enough that split deblended stars (forced
    pulls 1.16), ring-shaped false peaks around masked star cores (purity 95.5%) or a
    depth from a noise-correlation factor measured on star wings (m50 - depth +0.8 to
    +1.1) fail them; the bright-star bias bound is a gross guard (see below).
    The r coadd's errors on Objects are ~1.3x the inputs' combined (artifact rejection
    clips source pixels; only r has enough visits for it): bounded at 1.4, which still
    fails when half the inputs are lost.
    """
    from workflow_lib.steps.quality import static_sky_quality

    q = static_sky_quality(tiny_run / "results", template_window=(None, 60630.0))
    assert q["purity"]["n_objects"] > 150 and q["purity"]["purity"] >= 0.96
    for band, bias in q["bright_star_bias"].items():
        # The 5 mmag target is test_tiny_run_coadd_bright_star_bias_target's.
        assert bias["n_stars"] >= 20 and abs(bias["median_mmag"]) < 10.0, band
    for band, gain in q["depth_gain"].items():
        assert gain["n"] >= 30 and 0.85 < gain["ratio"] < 1.4, band
    pulls = q["forced_pulls"]
    assert pulls["n"] > 300 and 0.85 < pulls["sigma"] < 1.15 and abs(pulls["median"]) < 0.2
    for band, c in q["completeness"].items():
        assert c["n_stars"] > 100, band
        if c["m50_reached"]:
            assert abs(c["m50_minus_depth"]) < 0.5, band
        else:  # the truth stars end before 50 % completeness: a lower limit
            assert c["m50_lower_limit"] > c["depth_mag"] - 0.5, band
    assert q["template_transients"]["passed"]


def test_tiny_run_coadd_bright_star_bias_target(tiny_run):
    """The issue's target: bright-star psfFlux bias on the deep coadds within 5 mmag (plus
    twice the median's noise: the tiny run has few bright stars)."""
    from workflow_lib.qa.metrics import bright_star_flux_bias

    butler = Butler(tiny_run / "results")
    objects, truth = butler.get("Object"), butler.get("truth_object")
    for band in ("g", "r", "i"):
        bias = bright_star_flux_bias(objects, truth, band=band)
        assert abs(bias["median_mmag"]) <= 5.0 + 2.0 * bias["robust_scatter_mmag"] / np.sqrt(
            max(bias["n_stars"], 1)
        ), band


def test_rerun_has_nothing_to_do(tiny_run):
    result = snakemake(tiny_run, TINY, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


def _raw_mode_config(sim_root: Path, raw_dir: Path, **input_extra) -> dict:
    return {
        "output_dir": "processed",
        "input": {
            "source": "raw",
            "raw_dir": str(raw_dir),
            "refcat": str(sim_root / "sim/refcat/refcat_phosim.csv"),
            "refcat_columns": {
                "id": "uniqueId",
                "ra": "raJ2000",
                "dec": "decJ2000",
                "is_star": "starnotgal",
                "is_variable": "isvariable",
                "mags": {"g": "lsst_g", "r": "lsst_r", "i": "lsst_i"},
            },
            **input_extra,
        },
    }


def test_raw_mode_on_files_from_elsewhere(tiny_run, tmp_path):
    """Point the workflow at raw files by directory, as a user with their own survey."""
    sim_root = tiny_run / "results"
    raw_dir = tmp_path / "survey"
    shutil.copytree(sim_root / "sim/raw", raw_dir)
    (raw_dir / "bogus.fits").write_bytes(b"SIMPLE  = garbage")
    # One CCD whose pixels are all saturated: processed, flagged, not a crash.
    saturated = sorted((raw_dir).rglob("raw_4*_1.fits"))[-1]
    with fits.open(saturated, mode="update") as hdul:
        for hdu in hdul[1:]:
            hdu.data[:] = int(hdu.header["SATURATE"]) + 10

    failed = snakemake(tmp_path, _raw_mode_config(sim_root, raw_dir), "-n", check=False)
    assert failed.returncode != 0
    assert f"{raw_dir / 'bogus.fits'}: cannot read as FITS" in failed.stdout + failed.stderr

    config = _raw_mode_config(sim_root, raw_dir, on_bad_file="skip")
    snakemake(tmp_path, config, "--cores", "2")
    butler = Butler(tmp_path / "processed")
    registry = butler.get("registry")
    original = Butler(sim_root).get("registry")
    assert len(registry) == len(original)
    pd.testing.assert_frame_equal(
        registry.drop(columns="path"), original.drop(columns="path"), check_like=True
    )
    summary = json.loads((tmp_path / "processed/summary/run_summary.json").read_text())
    assert len(summary["skipped_inputs"]) == 1 and "bogus.fits" in summary["skipped_inputs"][0]
    failed = summary["single_frame"]["failed"]
    visit = int(saturated.name.split("_")[1])
    assert [(f["visit"], f["detector"]) for f in failed] == [(visit, 1)]
    assert "saturated" in failed[0]["reason"]
    assert summary["single_frame"]["n_processed"] == len(registry.query("obstype == 'science'")) - 1


def test_eimage_survey_runs_for_a_selected_visit(tmp_path):
    """The eimage switch: only the selected visit is simulated and ingested."""
    plan = plan_survey(get_preset("tiny"), 7)
    visit = int(plan.registry("eimage")["visit"].iloc[0])
    config = {"sim": {"preset": "tiny", "seed": 7, "format": "eimage"}, "select": {"visit": visit}}
    snakemake(tmp_path, config, "--cores", "2")
    registry = Butler(tmp_path / "results").get("registry")
    assert set(registry["visit"]) == {visit}
    assert set(registry["obstype"]) == {"science"}
    assert (registry["n_amplifiers"] == 0).all()
    assert len(registry) == len(plan.detectors)
