"""The SLURM profile on a real (single-node) SLURM cluster brought up on this machine.

scripts/slurm/cluster.sh installs Debian's Slurm, MUNGE and MariaDB packages
(as root) and starts munged, MariaDB, slurmdbd, slurmctld and slurmd on free
ports; the test runs the tiny survey through ``profiles/slurm``, then checks
from SLURM's accounting (sacct) that every job ran as a SLURM job, that one
job cancelled mid-run (scancel) was retried by the profile while the rest went
on, and that the products equal those of the local run. Skipped, with the reason, where the
cluster cannot be brought up (not root, no apt-get); never skipped in CI.

To save time the SLURM run does not simulate the survey again: it reads the
raw files of the local run (``input.source: raw``) and processes one visit per
band (all bands, so that the calibrations, built from the flats of the
selected bands, are those of the full run).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, SNAKEMAKE

from workflow_lib.io.butler import Butler

pytestmark = pytest.mark.workflow

CLUSTER_SCRIPT = REPO / "scripts" / "slurm" / "cluster.sh"
PACKAGES = ("slurmctld", "slurmd", "slurmdbd", "slurm-client", "munge", "mariadb-server")
RUN_TIMEOUT_S = 900


def _why_no_cluster() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (it installs Debian packages and starts daemons)"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "needs apt-get to install " + ", ".join(PACKAGES)
    return None


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment of a running single-node cluster; taken down (by PID) after the module."""
    reason = _why_no_cluster()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the real SLURM test must run in CI, but it {reason}")
        pytest.skip(f"real SLURM cluster test skipped: it {reason}")
    state = tmp_path_factory.mktemp("slurm-cluster")
    up = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "up", str(state)], capture_output=True, text=True, timeout=900
    )
    try:
        if up.returncode != 0:
            pytest.fail(f"cluster.sh up failed ({up.returncode}):\n{up.stderr[-4000:]}")
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(state)], timeout=300)


def _raw_mode_config(sim_root: Path, visits: list[int]) -> dict:
    return {
        "input": {
            "source": "raw",
            "raw_dir": str(sim_root / "sim/raw"),
            "refcat": str(sim_root / "sim/refcat/refcat_phosim.csv"),
            "refcat_columns": {
                "id": "uniqueId",
                "ra": "raJ2000",
                "dec": "decJ2000",
                "is_star": "starnotgal",
                "is_variable": "isvariable",
                "mags": {"g": "lsst_g", "r": "lsst_r", "i": "lsst_i"},
            },
        },
        "select": {"visit": visits},
    }


def _cancel_once(env: dict, comment: str, done: threading.Event, cancelled: list[str]) -> None:
    """``scancel`` the first running SLURM job whose comment holds ``comment``."""
    while not done.is_set():
        queue = subprocess.run(
            ["squeue", "-h", "-o", "%i|%k|%T"], env=env, capture_output=True, text=True, timeout=30
        )
        for line in queue.stdout.splitlines():
            job_id, job_comment, state = line.split("|")
            if comment in job_comment and state == "RUNNING":
                time.sleep(1.0)  # mid-run: its Snakemake has started on the node
                subprocess.run(["scancel", job_id], env=env, timeout=30, check=True)
                cancelled.append(job_id)
                return
        time.sleep(0.2)


def _run_bounded(
    command: list[str], env: dict, cwd: Path, *, cancel_comment: str
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run Snakemake, ``scancel`` one job of it once; past the limit SIGTERM (it cancels
    its SLURM jobs), then SIGKILL. Returns the run and the ids of the cancelled jobs."""
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    done, cancelled = threading.Event(), []
    canceller = threading.Thread(target=_cancel_once, args=(env, cancel_comment, done, cancelled))
    canceller.start()
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"snakemake through SLURM ran past {RUN_TIMEOUT_S} s:\n{output[-4000:]}")
    finally:
        done.set()
        canceller.join(timeout=60)
    return subprocess.CompletedProcess(command, proc.returncode, output, ""), cancelled


def _sacct(env: dict, *args: str) -> list[dict[str, str]]:
    fields = ["JobID", "JobName", "State", "ExitCode", "Comment", "AllocCPUS"]
    result = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-o", ",".join(fields), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [dict(zip(fields, line.split("|"), strict=True)) for line in result.stdout.splitlines()]


def test_tiny_survey_through_the_slurm_profile(slurm_env, tiny_run, tmp_path):
    local = Butler(tiny_run / "results")
    local_ccd = local.get("CcdVisit")
    visits = sorted(int(v) for v in local_ccd.groupby("band")["visit"].min())
    assert len(visits) == local_ccd["band"].nunique() >= 2
    configfile = tmp_path / "override.yaml"
    configfile.write_text(yaml.safe_dump(_raw_mode_config(tiny_run / "results", visits)))
    command = [
        SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(tmp_path),
        "--configfile",
        str(configfile),
        "--workflow-profile",
        str(REPO / "profiles/slurm"),
        # Poll often: the jobs here take seconds, not hours.
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--seconds-between-status-checks",
        "3",
        # The profile sizes the whole-survey tables for DC2 (up to 16 GB); a
        # test node may have less, and a job asking for more never starts.
        "--set-resources",
        *(
            f"{rule}:mem_mb=2000"
            for rule in ("ccdvisit_table", "source_table", "object_table", "forced_source_table")
        ),
        "--verbose",
    ]
    # One visit's job is cancelled mid-run (scancel): the profile's retries
    # resubmit it, and the rest of the DAG goes on.
    result, cancelled = _run_bounded(
        command, slurm_env, tmp_path, cancel_comment=f"visit_{visits[0]}"
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert len(cancelled) == 1, "the visit job was never seen running"

    # The plugin asked sacct (accounting is up), not squeue, for the job states.
    status_query = r"Status query timing \(cycle\): command=(\w+)"
    assert set(re.findall(status_query, result.stdout)) == {"sacct"}

    # SLURM's accounting: every job of this run completed as a SLURM job, grouped
    # as the profile says (one job per visit, one per detector's calibrations).
    run_id = re.search(r"SLURM run ID: (\S+)", result.stdout).group(1)
    every_job = _sacct(slurm_env, "--name", run_id)
    killed = [j for j in every_job if j["JobID"] in cancelled]
    assert len(killed) == 1 and killed[0]["State"].startswith("CANCELLED"), every_job
    assert f"visit_{visits[0]}" in killed[0]["Comment"]
    jobs = [j for j in every_job if j["JobID"] not in cancelled]
    assert jobs and all(j["State"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs), jobs
    # A group job runs its members one after another (the plugin's `--jobs 1`
    # inside the allocation), so the profile asks for one CPU per job.
    assert {j["AllocCPUS"] for j in jobs} == {"1"}, jobs
    comments = " ".join(j["Comment"] for j in jobs)
    for visit in visits:
        assert comments.count(f"visit_{visit}") == 1, comments
    detectors = sorted(local_ccd["detector"].unique())
    for detector in detectors:
        assert comments.count(f"calib_{detector}") == 1, comments
    # Per visit also one job each of forced photometry, difference imaging and DIA
    # forced photometry; per patch one job of coadds and Objects and one of
    # association; prepare (ingest, refcat, sky map) one job; the eight tables and
    # the run summary one each; the metrics one, the report's figures one (raw
    # input: no truth figure).
    names = comments.split()
    patches = set(re.findall(r"\brule_patch_(\d+_\d+)_", comments))
    assert patches, comments
    for patch in patches:
        assert sum(name.startswith(f"rule_patch_{patch}_") for name in names) == 1, comments
        assert names.count(f"rule_associate_patch_wildcards_{patch}") == 1, comments
    n_patches = len(patches)
    for visit in visits:
        for group in ("forced", "diffim", "dia_forced"):
            assert sum(name.startswith(f"rule_{group}_{visit}_") for name in names) == 1, comments
    assert names.count("rule_metrics") == 1 and comments.count("qa_figures") == 1, comments
    n_tables = 8
    expected_jobs = 4 * len(visits) + len(detectors) + 2 * n_patches + 1 + n_tables + 1 + 2
    assert len(jobs) == expected_jobs, comments

    # The products equal the local run's, row for row.
    slurm = Butler(tmp_path / "results")
    for table in ("CcdVisit", "Source"):
        expected = local.get(table)
        expected = expected[expected["visit"].isin(visits)].reset_index(drop=True)
        got = slurm.get(table)
        assert len(got) == len(expected) > 0
        pd.testing.assert_frame_equal(got, expected)
    summary = slurm.get("run_summary")
    assert summary["single_frame"]["n_processed"] == len(visits) * len(detectors)
