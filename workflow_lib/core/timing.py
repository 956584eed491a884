"""Wall-clock and process CPU time of the phases of a job (for QA logs and benchmarks).

On a shared machine wall time measures the neighbours as much as the job;
process CPU time (``time.process_time``: user + system of this process) does
not, so every phase records both.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class PhaseClock:
    """Accumulates wall and CPU seconds per named phase.

    Use :meth:`phase` around a block, or :meth:`lap` to charge the time since
    the previous lap (or since the clock was made) to a phase.
    """

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    _last: tuple[float, float] = field(default_factory=lambda: _now(), repr=False)

    def lap(self, name: str) -> None:
        """Charge the time since the previous lap to ``name``."""
        now = _now()
        self._add(name, now[0] - self._last[0], now[1] - self._last[1])
        self._last = now

    def _add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time spent in the block to ``name``."""
        start = _now()
        try:
            yield
        finally:
            end = _now()
            self._add(name, end[0] - start[0], end[1] - start[1])
            self._last = end

    def rounded(self, digits: int = 3) -> dict[str, dict[str, float]]:
        """``{"wall": {...}, "cpu": {...}}`` rounded, for a log line."""
        return {
            "wall": {k: round(v, digits) for k, v in self.wall.items()},
            "cpu": {k: round(v, digits) for k, v in self.cpu.items()},
        }


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class ProgressLog:
    """Logs ``done of total`` at most every ``interval_s`` seconds, and at the end.

    For the long loops of a job (ingest's header scan, reading thousands of
    per-CCD tables), so that a person following the log sees it move::

        progress = ProgressLog(log, "header scan", total=len(files))
        for f in files:
            ...
            progress.step()
    """

    def __init__(
        self, logger: logging.Logger, label: str, *, total: int, interval_s: float = 10.0
    ) -> None:
        self.logger, self.label, self.total = logger, label, total
        self.interval_s = interval_s
        self.done = 0
        self._start = self._last = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.done >= self.total or now - self._last >= self.interval_s:
            self._last = now
            elapsed = now - self._start
            rate = self.done / elapsed if elapsed > 0 else float("inf")
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            self.logger.info(
                "%s: %d of %d (%.0f%%) in %.0f s, about %.0f s left",
                self.label,
                self.done,
                self.total,
                100.0 * self.done / max(self.total, 1),
                elapsed,
                left,
            )
