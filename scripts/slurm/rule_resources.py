"""Per-rule time and memory of a finished run, from its job logs; SLURM resource suggestions.

Every job log ends with the runner's line ``step S done in T s, CPU C s, peak memory
M MB`` (workflow_lib/steps/runner.py; logs before 2026-12-06 lack the CPU): the
step's own wall time and peak RSS. A SLURM
job also holds the Snakemake process that runs the step, whose memory grows
with the registry (``--snakemake-mb``, measure it with ``benchmarks/bench_dag.py``:
the 'ours parse' peak RSS at your survey's size).

    python scripts/slurm/rule_resources.py results/
    python scripts/slurm/rule_resources.py results/ --snakemake-mb 600 --time-factor 3
    python scripts/slurm/rule_resources.py results/ --check profiles/slurm/config.yaml

Suggestions: mem_mb = (step peak + Snakemake) x memory factor, rounded up to
500 MB; runtime = slowest job x time factor + start-up, in whole minutes (at
least 5). Put them in profiles/slurm/config.yaml under set-resources.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

RULE_LINE = re.compile(r"rule (\w+): step (\S+)")
DONE_LINE = re.compile(
    r"step (\S+) done in ([0-9.]+) s(?:, CPU [0-9.]+ s)?, peak memory ([0-9.]+) MB"
)


def collect(log_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """{rule: [(seconds, peak MB) per job]} from every job log under ``log_dir``."""
    figures: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for log in sorted(log_dir.rglob("*.log")):
        text = log.read_text(errors="replace")
        rule, done = RULE_LINE.search(text), DONE_LINE.search(text)
        if rule and done:
            figures[rule.group(1)].append((float(done.group(2)), float(done.group(3))))
    return dict(figures)


def _first_attempt(value: object) -> float:
    """A profile resource at attempt 1: a number, or an expression in ``attempt``."""
    if isinstance(value, (int, float)):
        return float(value)
    return float(eval(str(value), {"__builtins__": {}}, {"attempt": 1}))  # profile's own text


def over_profile(
    figures: dict[str, list[tuple[float, float]]], profile: Path, *, snakemake_mb: float
) -> list[str]:
    """One line per rule whose measured jobs exceed the profile's first-attempt resources.

    A job's memory is its step's peak plus the Snakemake process that runs it;
    its time, the step's slowest wall time (runtime is in minutes).
    """
    import yaml

    config = yaml.safe_load(profile.read_text())
    default = config.get("default-resources") or {}
    per_rule = config.get("set-resources") or {}
    problems = []
    for rule, jobs in sorted(figures.items()):
        resources = {**default, **(per_rule.get(rule) or {})}
        peak = max(m for _, m in jobs) + snakemake_mb
        slowest = max(s for s, _ in jobs)
        if "mem_mb" in resources and peak > _first_attempt(resources["mem_mb"]):
            problems.append(
                f"{rule}: {peak:.0f} MB measured (step + Snakemake) > mem_mb "
                f"{resources['mem_mb']} in {profile}"
            )
        if "runtime" in resources and slowest > 60 * _first_attempt(resources["runtime"]):
            problems.append(
                f"{rule}: {slowest:.0f} s measured > runtime "
                f"{resources['runtime']} min in {profile}"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", type=Path, help="a run's output_dir (its logs/ is read)")
    parser.add_argument(
        "--snakemake-mb",
        type=float,
        default=400.0,
        help="memory of the Snakemake process inside each job (MB)",
    )
    parser.add_argument("--memory-factor", type=float, default=1.25)
    parser.add_argument(
        "--time-factor", type=float, default=3.0, help="headroom for slower nodes and contention"
    )
    parser.add_argument(
        "--startup-s", type=float, default=30.0, help="Snakemake start-up inside each job (s)"
    )
    parser.add_argument(
        "--check",
        type=Path,
        metavar="PROFILE",
        help="exit 1, listing them, if any rule's jobs exceed this profile's resources",
    )
    args = parser.parse_args(argv)
    figures = collect(args.output_dir / "logs")
    if not figures:
        print(f"no job logs with timings under {args.output_dir / 'logs'}", file=sys.stderr)
        return 1
    if args.check is not None:
        problems = over_profile(figures, args.check, snakemake_mb=args.snakemake_mb)
        print("\n".join(problems) or f"every rule fits {args.check}")
        return 1 if problems else 0
    print(
        f"{'rule':<24}{'jobs':>6}{'median s':>10}{'max s':>9}{'max MB':>9}"
        f"{'mem_mb':>9}{'runtime':>9}"
    )
    for rule, jobs in sorted(figures.items()):
        seconds = [s for s, _ in jobs]
        peak = max(m for _, m in jobs)
        mem_mb = 500 * math.ceil((peak + args.snakemake_mb) * args.memory_factor / 500)
        runtime = max(5, math.ceil((max(seconds) * args.time_factor + args.startup_s) / 60))
        print(
            f"{rule:<24}{len(jobs):>6}{statistics.median(seconds):>10.1f}{max(seconds):>9.1f}"
            f"{peak:>9.0f}{mem_mb:>9}{runtime:>9}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
