"""An empty step: what every job pays before its own work begins.

Used by the job-overhead benchmark (``python -m benchmarks.run job-overhead``),
which runs it through the same rule -> ``scripts/run_step.py`` -> runner path
as every real step.
"""

from __future__ import annotations

from pathlib import Path


def write_marker(*, output_path: str) -> None:
    """Write an empty ``output_path``."""
    Path(output_path).write_text("")
