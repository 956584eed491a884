"""Restart after a hard kill with the same command: clear the locks a dead run left.

Snakemake locks its working directory for a run and removes the lock when it
ends; a run killed with SIGKILL (or a power loss, an out-of-memory kill of the
main process) leaves the lock behind, and the next run refuses to start until
the user runs ``--unlock``. Snakemake cannot tell a live lock from a stale one,
so the Snakefile records, at parse time, which process on which host runs in
the directory (``.snakemake/dc2_drp_runs/``). A lock is stale when every
recorded run is a process of this host that no longer exists; only then is it
removed. A run recorded on another host (a main process in a cluster job) is
never judged: its lock stays, and Snakemake's own message says what to do.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

RUNS_DIR = "dc2_drp_runs"


def clear_stale_locks_and_register(snakemake_dir: str | os.PathLike[str]) -> list[str]:
    """Remove the locks of dead runs, then record this process as the directory's run.

    Called by the Snakefile in Snakemake's main process only (job processes
    parse the Snakefile too). Returns the lock files removed.
    """
    root = Path(snakemake_dir)
    runs = root / RUNS_DIR
    records = _read_records(runs)
    host = socket.gethostname()
    dead = [r for r in records if r["host"] == host and not _is_alive(r)]
    for record in dead:
        record["path"].unlink(missing_ok=True)
    removed: list[str] = []
    if records and len(dead) == len(records):
        for lock in sorted((root / "locks").glob("*.lock")):
            lock.unlink(missing_ok=True)
            removed.append(str(lock))
    if removed:
        pids = ", ".join(f"pid {r['pid']}" for r in dead)
        log.warning(
            "removed %d lock(s) of an earlier run in this directory that was killed (%s on %s)",
            len(removed),
            pids,
            host,
        )
    _register(runs, host)
    return removed


def _read_records(runs: Path) -> list[dict]:
    records = []
    for path in sorted(runs.glob("*.json")) if runs.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            record = {
                "host": str(record["host"]),
                "pid": int(record["pid"]),
                "started": float(record["started"]),
                "path": path,
            }
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record cut by the kill itself says nothing
        records.append(record)
    return records


def _is_alive(record: dict) -> bool:
    """The recorded process still runs (and is the same process, not a reused pid)."""
    try:
        return abs(psutil.Process(record["pid"]).create_time() - record["started"]) < 1.0
    except psutil.AccessDenied:
        return True  # another user's live process
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def _register(runs: Path, host: str) -> None:
    me = psutil.Process()
    runs.mkdir(parents=True, exist_ok=True)
    record = {"host": host, "pid": me.pid, "started": me.create_time()}
    final = runs / f"{host}.{me.pid}.json"
    tmp = final.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, final)
