"""Benchmark harness: run a command several times, report median time and peak memory.

Each repeat runs in its own process so that its peak resident memory (from
``wait4``) belongs to that repeat alone. For commands that start children
(snakemake), the peak is the largest single process of the tree as the kernel
reports it for the waited-for child, plus the children it waited for.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    name: str
    seconds: list[float]
    peak_rss_mb: float

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def line(self) -> str:
        spread = f"{min(self.seconds):.2f}-{max(self.seconds):.2f}"
        n = len(self.seconds)
        return (
            f"{self.name:<28} median {self.median:8.2f} s  (range {spread} s, n={n})"
            f"  peak RSS {self.peak_rss_mb:8.0f} MB"
        )


def run_once(command: Sequence[str], *, cwd: str | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run; raises if the command fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(command), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return elapsed, usage.ru_maxrss / 1024.0


def measure(
    name: str,
    command: Sequence[str],
    *,
    repeats: int = 3,
    cwd: str | None = None,
    before_each: Callable[[], None] | None = None,
) -> Measurement:
    """Median wall time and the largest peak RSS over ``repeats`` runs."""
    seconds, peaks = [], []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        elapsed, peak = run_once(command, cwd=cwd)
        seconds.append(elapsed)
        peaks.append(peak)
    return Measurement(name=name, seconds=seconds, peak_rss_mb=max(peaks))
