"""Warm start (workflow_lib/steps/warm_start.py): a job forked from the warm-start
server makes the same products as the same job in a process of its own, fails as it
would, and dies with the job's process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from astropy.io import fits

from workflow_lib.core.config import validate_config
from workflow_lib.steps import warm_start
from workflow_lib.steps.runner import Job, run_job
from workflow_lib.workflow import WorkflowPlan

# A job process as scripts/run_step.py is, minus Snakemake: the job from argv; exit
# status 99 when no server took it.
CLIENT = """
import pickle, sys
from workflow_lib.steps.warm_start import run_in_worker
code = run_in_worker(pickle.loads(bytes.fromhex(sys.argv[1])), startup_s=0.0)
sys.exit(99 if code is None else code)
"""


def _private_env() -> dict[str, str]:
    """The environment of jobs with a warm-start directory of their own (short: a
    Unix socket's path has at most ~100 characters, pytest's tmp_path is longer)."""
    directory = tempfile.mkdtemp(prefix="warm-", dir="/tmp")
    return {**os.environ, "DC2_WARM_START_DIR": directory, "DC2_WARM_START": "1"}


def _socket_path(env: dict[str, str]) -> Path:
    saved = os.environ.get("DC2_WARM_START_DIR")
    os.environ["DC2_WARM_START_DIR"] = env["DC2_WARM_START_DIR"]
    try:
        path = warm_start.socket_path()
    finally:
        if saved is None:
            del os.environ["DC2_WARM_START_DIR"]
        else:
            os.environ["DC2_WARM_START_DIR"] = saved
    assert path is not None
    return path


@pytest.fixture(scope="module")
def server():
    """A server of its own (private directory; it waits out the tiny run), ready to take jobs."""
    env = _private_env()
    path = _socket_path(env)
    process = subprocess.Popen(
        [sys.executable, "-m", "workflow_lib.steps.warm_start", str(path), "1800"],
        env={**env, **warm_start.SERVER_ENV},
    )
    deadline = time.monotonic() + 120
    while not path.exists():
        assert process.poll() is None, "the server ended before it was ready"
        assert time.monotonic() < deadline, "the server was not ready within 120 s"
        time.sleep(0.2)
    yield {"env": env, "pid": process.pid}
    process.terminate()
    process.wait(timeout=30)


def _client(job: Job, env: dict[str, str], **kwargs) -> subprocess.Popen:
    import pickle

    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, pickle.dumps(job).hex()], env=env, text=True, **kwargs
    )


def _job(step: str, log: Path, **named_outputs) -> Job:
    return Job(
        rule="test",
        step=step,
        threads=1,
        log_path=str(log),
        named_inputs={},
        named_outputs=named_outputs,
        params={},
        wildcards={},
    )


def test_a_warm_job_runs_in_a_child_of_the_server(server, tmp_path):
    job = _job("empty:write_marker", tmp_path / "job.log", output_path=str(tmp_path / "done"))
    client = _client(job, server["env"], cwd=tmp_path)
    assert client.wait(timeout=60) == 0
    assert (tmp_path / "done").exists()
    log = (tmp_path / "job.log").read_text()
    assert f"forked from warm-start server {server['pid']}" in log
    assert "done in" in log and "CPU" in log


def test_a_failing_warm_job_exits_non_zero_with_its_traceback(server, tmp_path):
    job = Job(
        rule="qa_ccd_visits",
        step="qa:plot_ccd_visits",
        threads=1,
        log_path="job.log",  # relative: the child works in the job's directory
        named_inputs={"ccdvisit_table_path": str(tmp_path / "no_such_CcdVisit.parquet")},
        named_outputs={"plot_path": "a.png", "failed_path": "b.html"},
        params={},
        wildcards={},
    )
    client = _client(job, server["env"], cwd=tmp_path, stderr=subprocess.PIPE)
    _, stderr = client.communicate(timeout=60)
    assert client.returncode == 1
    assert "no_such_CcdVisit.parquet" in stderr and "Traceback" in stderr
    log = (tmp_path / "job.log").read_text()
    assert "step qa:plot_ccd_visits failed" in log and "Traceback" in log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_the_child_dies_with_the_job_process(server, tmp_path, signum):
    """A step blocked on a FIFO (nothing reads it): the job process is signalled and
    the child must end too, SIGTERM forwarded, SIGKILL noticed by the child."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    job = _job("empty:write_marker", tmp_path / "job.log", output_path=str(fifo))
    client = _client(job, server["env"], cwd=tmp_path)
    deadline = time.monotonic() + 60
    children: list[psutil.Process] = []
    while not children:
        assert time.monotonic() < deadline and client.poll() is None
        children = psutil.Process(server["pid"]).children()
        time.sleep(0.1)
    client.send_signal(signum)
    # SIGTERM is forwarded and the job process exits as a shell reports a killed job.
    expected = -signum if signum == signal.SIGKILL else 128 + signum
    assert client.wait(timeout=30) == expected
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"children of the server still running: {alive}"


def test_no_server_no_warm_start(tmp_path):
    """Nothing listening: the job process is told to run the job itself (and starts
    no server while another one holds the lock, i.e. is starting)."""
    env = _private_env()
    path = _socket_path(env)
    lock = warm_start._try_lock(path)
    assert lock is not None
    try:
        job = _job("empty:write_marker", tmp_path / "job.log", output_path=str(tmp_path / "d"))
        assert _client(job, env, cwd=tmp_path).wait(timeout=60) == 99
    finally:
        os.close(lock)
    assert not (tmp_path / "d").exists()
    assert not path.exists() and not path.with_suffix(".log").exists()


def test_switched_off_and_where_it_is_off_by_default(monkeypatch):
    job = _job("empty:write_marker", Path("job.log"), output_path="d")
    monkeypatch.delenv("DC2_WARM_START", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert warm_start.enabled(job)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    assert not warm_start.enabled(job)
    monkeypatch.setenv("DC2_WARM_START", "1")
    assert warm_start.enabled(job)
    monkeypatch.setenv("DC2_WARM_START", "0")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert not warm_start.enabled(job)
    monkeypatch.setenv("DC2_WARM_START", "1")
    assert not warm_start.enabled(replace(job, threads=4))


def test_a_server_for_other_code_does_not_start(tmp_path):
    """A socket named for another code signature: the server refuses to serve it."""
    path = tmp_path / ("0" * 24 + ".sock")
    done = subprocess.run(
        [sys.executable, "-m", "workflow_lib.steps.warm_start", str(path), "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "is not this code's socket" in done.stderr
    assert not path.exists()


@pytest.mark.workflow
def test_process_ccd_warm_equals_cold(server, tiny_run, tmp_path):
    """The single-frame step on a tiny-survey CCD, forked from the server and in this
    process: the same calexp pixels, the same Source table, the same CcdVisit row."""
    plan = WorkflowPlan(
        {"sim": {"preset": "tiny", "seed": 7}, "output_dir": str(tiny_run / "results")}
    )
    visit, detector = plan.science_ids[0]
    defaults = validate_config({})
    inputs = plan.process_ccd_inputs({"visit": str(visit), "detector": str(detector)})
    outputs = {}
    for mode in ("warm", "cold"):
        out = tmp_path / mode
        out.mkdir()
        job = Job(
            rule="process_ccd",
            step="process_ccd:process_ccd",
            threads=1,
            log_path=str(out / "job.log"),
            named_inputs=dict(inputs),
            named_outputs={
                "calexp_path": str(out / "calexp.fits"),
                "src_path": str(out / "src.parquet"),
                "ccdvisit_path": str(out / "ccdVisit.parquet"),
            },
            params={
                "image_format": "raw",
                "isr": defaults["isr"],
                "calibrate": defaults["calibrate"],
            },
            wildcards={"visit": str(visit), "detector": str(detector)},
        )
        if mode == "warm":
            assert _client(job, server["env"], cwd=out).wait(timeout=300) == 0
            assert "forked from warm-start server" in (out / "job.log").read_text()
        else:
            try:
                run_job(job, startup_s=0.0)
            finally:
                logging.getLogger().handlers.clear()  # the job's log handler
        outputs[mode] = out
    warm, cold = outputs["warm"], outputs["cold"]
    with fits.open(warm / "calexp.fits") as a, fits.open(cold / "calexp.fits") as b:
        assert len(a) == len(b)
        for hdu_a, hdu_b in zip(a, b, strict=True):
            if hdu_a.data is not None:
                np.testing.assert_array_equal(np.asarray(hdu_a.data), np.asarray(hdu_b.data))
    for name in ("src.parquet", "ccdVisit.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(warm / name), pd.read_parquet(cold / name), check_exact=True
        )


def test_a_socket_path_is_private(monkeypatch):
    base = Path(_private_env()["DC2_WARM_START_DIR"])
    monkeypatch.setenv("DC2_WARM_START_DIR", str(base))
    path = warm_start.socket_path()
    assert path is not None and path.parent.stat().st_mode & 0o777 == 0o700
    path.parent.chmod(0o755)
    assert warm_start.socket_path() is None
    monkeypatch.setenv("DC2_WARM_START_DIR", str(base / ("x" * 120)))
    assert warm_start.socket_path() is None
