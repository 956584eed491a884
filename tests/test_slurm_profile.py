"""profiles/slurm without a cluster: its groups in a dry run, and resources for every rule."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
import yaml
from conftest import REPO, TINY, snakemake

pytestmark = pytest.mark.workflow

PROFILE = REPO / "profiles" / "slurm"


def grouped_jobs(dry_run_output: str) -> tuple[dict[str, list[tuple[str, dict]]], list[str]]:
    """({group: [(rule, wildcards)]}, [rules of ungrouped jobs]) from a dry run's listing."""
    groups: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    ungrouped: list[str] = []
    current: str | None = None
    last: tuple[str, dict] | None = None
    for line in dry_run_output.splitlines():
        if match := re.search(r"Group job (\S+) \(jobs", line):
            current = match.group(1)
        elif match := re.match(r"^(\s*)rule (\w+):$", line):
            last = (match.group(2), {})
            if match.group(1):
                groups[current].append(last)  # type: ignore[index]
            else:
                current = None
                ungrouped.append(last[0])
        elif (match := re.match(r"^\s*wildcards: (.*)$", line)) and last is not None:
            last[1].update(item.split("=", 1) for item in match.group(1).split(", "))
    return dict(groups), ungrouped


@pytest.fixture(scope="module")
def profile_dry_run(tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("slurm-dry")
    return snakemake(run_dir, TINY, "-n", "--workflow-profile", str(PROFILE)).stdout


def test_ccds_are_grouped_per_visit_and_calibrations_per_detector(profile_dry_run):
    groups, ungrouped = grouped_jobs(profile_dry_run)
    # Every job is in a group job but the consolidated tables, the association of each
    # patch (one job per patch already), the metrics (see the profile) and the truth
    # figure, which waits for the metrics.
    tables = ["ccdvisit_table", "forced_source_table", "object_table", "source_table"]
    dia_tables = [
        f"dia_{name}_table" for name in ("ccd_visit", "forced_source", "object", "source")
    ]
    others = ["all", "run_summary", "metrics", "qa_truth", "associate_patch"]
    assert sorted(ungrouped) == sorted([*others, *tables, *dia_tables])
    assert {rule for rule, _ in groups["qa_figures"]} == {
        "qa_ccd_visits",
        "qa_color_image",
        "qa_dia_cutouts",
        "qa_light_curves",
    }
    visit_groups = {g: jobs for g, jobs in groups.items() if g.startswith("visit_")}
    ccds = [wc for jobs in visit_groups.values() for rule, wc in jobs if rule == "process_ccd"]
    assert len(ccds) == 20  # the tiny survey: 10 visits x 2 detectors
    for name, jobs in visit_groups.items():
        # A visit's CCDs are processed and warped in one job.
        assert {rule for rule, _ in jobs} == {"process_ccd", "warp"}
        assert {wc["visit"] for _, wc in jobs} == {name.removeprefix("visit_")}
        for rule in ("process_ccd", "warp"):
            assert sorted(wc["detector"] for r, wc in jobs if r == rule) == ["0", "1"]
    # A visit's difference images, and its DIA forced photometry, one job each.
    for prefix, rule in (("diffim_", "subtract_ccd"), ("dia_forced_", "dia_forced_ccd")):
        dia_groups = {g: jobs for g, jobs in groups.items() if g.startswith(prefix)}
        assert {g.removeprefix(prefix) for g in dia_groups} == {
            g.removeprefix("visit_") for g in visit_groups
        }
        for name, jobs in dia_groups.items():
            assert {r for r, _ in jobs} == {rule}
            assert {wc["visit"] for _, wc in jobs} == {name.removeprefix(prefix)}
            assert sorted(wc["detector"] for _, wc in jobs) == ["0", "1"]
    patch_groups = {g: jobs for g, jobs in groups.items() if g.startswith("patch_")}
    assert patch_groups, "per-patch coadds and Objects are grouped"
    for jobs in patch_groups.values():
        assert {rule for rule, _ in jobs} == {"deep_coadd", "template_coadd", "coadd_objects"}
        assert len({(wc["tract"], wc["patch"]) for _, wc in jobs}) == 1
    calib_groups = {g: jobs for g, jobs in groups.items() if g.startswith("calib_")}
    assert sorted(calib_groups) == ["calib_0", "calib_1"]
    for name, jobs in calib_groups.items():
        rules = sorted(rule for rule, _ in jobs)
        assert rules == ["defects", "master_bias", "master_dark"] + ["master_flat"] * 3
        assert {wc["detector"] for _, wc in jobs} == {name.removeprefix("calib_")}
    assert sorted(rule for rule, _ in groups["prepare"]) == [
        "ingest_raw",
        "make_skymap",
        "shard_refcat",
    ]


def test_workflow_profile_resources_reach_the_jobs(profile_dry_run):
    """--workflow-profile replaces profiles/default (with --profile, default's would win)."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    expected = profile["set-resources"]["process_ccd"]
    mem_at_attempt_1 = int(str(expected["mem_mb"]).split("*")[0])
    block = profile_dry_run[profile_dry_run.index("rule process_ccd:") :]
    resources = next(line for line in block.splitlines() if "resources:" in line)
    assert f"mem_mb={mem_at_attempt_1}," in resources
    assert f"runtime={expected['runtime']}" in resources


def test_every_rule_has_measured_resources_in_the_profile(tmp_path):
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    listed = snakemake(tmp_path, TINY, "--list-rules").stdout.split()
    rules = {name for name in listed if re.fullmatch(r"[a-z_]+", name)} - {"all"}
    assert "process_ccd" in rules
    missing = sorted(rules - set(profile["set-resources"]))
    assert missing == [], f"add measured mem_mb/runtime to profiles/slurm (docs/hpc.md): {missing}"
    for rule, resources in profile["set-resources"].items():
        assert {"mem_mb", "runtime"} <= set(resources), rule
    # Every group-components key names a group the profile defines.
    group_names = {entry.split("=", 1)[1] for entry in profile["groups"]}
    assert {entry.split("=", 1)[0] for entry in profile["group-components"]} <= group_names


def _rule_resources():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "rule_resources", REPO / "scripts" / "slurm" / "rule_resources.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# A SLURM job holds a Snakemake process beside its step; a local job is the step alone.
@pytest.mark.parametrize(("profile", "snakemake_mb"), [("default", 0.0), ("slurm", 400.0)])
def test_measured_jobs_fit_the_profiles_resources(tiny_run, profile, snakemake_mb):
    """Every job of the tiny run (step peak from its log, plus the Snakemake process)
    fits the memory and wall time the profile gives its rule at the first attempt."""
    tool = _rule_resources()
    figures = tool.collect(tiny_run / "results" / "logs")
    assert {"process_ccd", "warp", "deep_coadd", "coadd_objects"} <= set(figures)
    config = REPO / "profiles" / profile / "config.yaml"
    assert tool.over_profile(figures, config, snakemake_mb=snakemake_mb) == []
    # And the check does bite: a job beyond its rule's memory and time.
    figures["process_ccd"].append((10_000.0, 90_000.0))
    problems = tool.over_profile(figures, config, snakemake_mb=snakemake_mb)
    assert [p.split(":")[0] for p in problems] == ["process_ccd", "process_ccd"]


def test_a_job_cancelled_by_a_user_reads_as_cancelled(monkeypatch):
    """sacct says 'CANCELLED by 0'; the plugin knows only 'CANCELLED' (and would wait)."""
    import asyncio
    import inspect
    import types

    import snakemake_executor_plugin_slurm as real

    from workflow_lib.plans import slurm_status

    # The installed plugin still has the function this wraps, and still needs it.
    assert inspect.iscoroutinefunction(real.query_job_status) or getattr(
        real.query_job_status, "first_word_states", False
    )
    assert '"CANCELLED",' in inspect.getsource(real.Executor.check_active_jobs)

    async def query_job_status(command, logger):
        return {"5": "CANCELLED by 0", "6": "COMPLETED", "7": "RUNNING"}, 0.01

    plugin = types.SimpleNamespace(query_job_status=query_job_status)
    monkeypatch.setitem(__import__("sys").modules, "snakemake_executor_plugin_slurm", plugin)
    assert slurm_status.read_cancelled_jobs_as_cancelled()
    assert not slurm_status.read_cancelled_jobs_as_cancelled()  # wrapped once only
    statuses, _ = asyncio.run(plugin.query_job_status("sacct ...", None))
    assert statuses == {"5": "CANCELLED", "6": "COMPLETED", "7": "RUNNING"}
    assert slurm_status.first_word_states(None) is None
