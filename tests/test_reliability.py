"""Interrupted and repeated runs: a hard kill, a restart with the same command, the same
tables to the bit; one changed parameter reruns exactly what depends on it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from astropy.io import fits
from conftest import REPO, SNAKEMAKE, TINY, snakemake
from test_dag import job_counts

from workflow_lib.plans.stale_locks import RUNS_DIR, clear_stale_locks_and_register


def _command(run_dir: Path, config: dict, *args: str) -> list[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "override.yaml").write_text(yaml.safe_dump(config))
    return [
        SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(run_dir),
        "--configfile",
        str(run_dir / "override.yaml"),
        *args,
    ]


def _kill_when(command: list[str], ready: Callable[[], bool], *, hash_seed: int) -> None:
    """Start the run and SIGKILL Snakemake and every job process once ``ready()``."""
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    with open(Path(command[command.index("-d") + 1]) / f"killed_{hash_seed}.log", "w") as log:
        run = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 900
        while run.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run.poll() is None, "the run ended before the point where it was to be killed"
        tree = [*psutil.Process(run.pid).children(recursive=True), psutil.Process(run.pid)]
        for process in tree:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        run.wait(timeout=60)
        psutil.wait_procs(tree, timeout=30)


def _count(results: Path, pattern: str) -> int:
    return sum(1 for _ in results.glob(pattern))


def _assert_nothing_half_written(results: Path) -> None:
    """Every product that has its final name is whole (temporaries are dot-files)."""
    for path in results.rglob("*"):
        if path.name.startswith(".") or "logs" in path.parts or not path.is_file():
            continue
        if path.suffix == ".parquet":
            pd.read_parquet(path)
        elif path.name.endswith((".fits", ".fits.fz", ".fits.gz")):
            with fits.open(path, checksum=True) as hdul:
                hdul.verify("exception")
                for hdu in hdul:
                    _ = hdu.data


@pytest.mark.workflow
def test_killed_twice_and_restarted_equals_an_uninterrupted_run(tiny_run, tmp_path):
    """SIGKILL during single-frame processing, during the warps and during the coadds, then
    the same command to the end (one core, other hash seeds): the tables of a clean run."""
    results = tmp_path / "results"
    command = _command(tmp_path, TINY, "--cores", "2")
    _kill_when(command, lambda: _count(results, "calexp/*/calexp_*.fits") >= 4, hash_seed=1)
    assert _count(results, "calexp/*/calexp_*.fits") < 20
    _assert_nothing_half_written(results)
    _kill_when(command, lambda: _count(results, "warp/*/*/*.fits") >= 4, hash_seed=2)
    _assert_nothing_half_written(results)
    _kill_when(command, lambda: _count(results, "coadd/*/*/*Coadd_*.fits") >= 1, hash_seed=3)
    assert not (results / "tables" / "Object.parquet").exists()
    _assert_nothing_half_written(results)
    env = {**os.environ, "PYTHONHASHSEED": "4"}
    finished = subprocess.run([*command[:-1], "1"], capture_output=True, text=True, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    reference = tiny_run / "results" / "tables"  # may hold more tables: other tests add to it
    names = sorted(p.name for p in (results / "tables").glob("*.parquet"))
    assert {"CcdVisit.parquet", "Source.parquet", "Object.parquet"} <= set(names)
    for name in names:
        pd.testing.assert_frame_equal(
            pd.read_parquet(results / "tables" / name),
            pd.read_parquet(reference / name),
            check_exact=True,
            obj=name,
        )


@pytest.mark.workflow
def test_one_changed_parameter_reruns_only_what_depends_on_it(tiny_run):
    changed = {**TINY, "objects": {"detection_threshold": 6.0}}
    dry = snakemake(tiny_run, changed, "-n")
    counts = job_counts(dry.stdout)
    n_forced = counts.get("forced_phot_ccd", 0)
    assert n_forced == len(list((tiny_run / "results" / "forced").rglob("*.parquet")))
    assert {"coadd_objects", "object_table", "forced_source_table"} <= set(counts)
    upstream = {
        "simulate_scene",
        "simulate_exposure",
        "simulate_calibrations",
        "ingest_raw",
        "shard_refcat",
        "make_skymap",
        "master_bias",
        "master_dark",
        "master_flat",
        "defects",
        "process_ccd",
        "warp",
        "deep_coadd",
        "template_coadd",
        "ccdvisit_table",
        "source_table",
        "qa_ccd_visits",
    }
    assert not upstream & set(counts), counts
    assert "Params have changed since last execution" in dry.stdout
    (tiny_run / "override.yaml").write_text(yaml.safe_dump(TINY))  # as the other tests expect


# ------------------------------------------------------------------------ stale locks
def _lock(root: Path) -> Path:
    (root / "locks").mkdir(parents=True, exist_ok=True)
    lock = root / "locks" / "0.input.lock"
    lock.write_text("results/x\n")
    return lock


def _record(root: Path, pid: int, started: float, host: str | None = None) -> None:
    (root / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    host = host or socket.gethostname()
    record = {"host": host, "pid": pid, "started": started}
    (root / RUNS_DIR / f"{host}.{pid}.json").write_text(json.dumps(record))


def test_a_dead_runs_lock_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["sleep", "0"])
    started = psutil.Process(dead.pid).create_time()
    dead.wait()
    lock = _lock(tmp_path)
    _record(tmp_path, dead.pid, started)
    assert clear_stale_locks_and_register(tmp_path) == [str(lock)] and not lock.exists()
    # This process registered itself and lives: the next run leaves a lock alone.
    assert [p.name for p in (tmp_path / RUNS_DIR).iterdir()] == [
        f"{socket.gethostname()}.{os.getpid()}.json"
    ]
    lock = _lock(tmp_path)
    assert clear_stale_locks_and_register(tmp_path) == [] and lock.exists()


def test_locks_without_a_record_or_from_another_host_are_kept(tmp_path):
    lock = _lock(tmp_path)
    assert clear_stale_locks_and_register(tmp_path) == [] and lock.exists()  # no record
    for path in (tmp_path / RUNS_DIR).iterdir():
        path.unlink()
    _record(tmp_path, 1, 0.0, host="some-cluster-node")
    assert clear_stale_locks_and_register(tmp_path) == [] and lock.exists()
    # A reused pid (same number, another start time) is not the recorded run.
    for path in (tmp_path / RUNS_DIR).iterdir():
        path.unlink()
    _record(tmp_path, os.getpid(), 12345.0)
    assert clear_stale_locks_and_register(tmp_path) == [str(lock)]


@pytest.mark.workflow
def test_warps_are_deleted_once_the_coadds_are_made(tiny_run):
    """keep_warps (false by default): warps are Snakemake temp() outputs."""
    results = tiny_run / "results"
    assert list(results.glob("coadd/*/*/deepCoadd_*.fits"))
    assert list(results.glob("coadd/*/*/templateCoadd_*.fits"))
    assert not list(results.glob("warp/*/*/*.fits"))
