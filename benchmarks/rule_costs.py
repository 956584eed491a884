"""Per-rule cost of a finished run, from Snakemake's benchmark files.

Every rule writes ``benchmarks/<subpath>.tsv`` beside its ``logs/<subpath>.log``
(the same sub-path); the log's first runner line names the rule. Prints, per
rule, the number of jobs, the sums of wall and CPU seconds, CPU seconds per job
and the largest peak RSS, then the totals. A job forked from the warm-start
server (workflow_lib/steps/warm_start.py) adds its step's CPU time and peak
memory from its log to the benchmark file's figures, which see only the job's
waiting process; the server's own imports, once per run, are in no job.

    python -m benchmarks.rule_costs RESULTS_DIR
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

RULE_LINE = re.compile(r"rule (\w+): step ")
WARM_LINE = re.compile(r"forked from warm-start server")
DONE_LINE = re.compile(r"done in [0-9.]+ s, CPU ([0-9.]+) s, peak memory ([0-9.]+) MB")


@dataclass
class RuleCost:
    jobs: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_mb: float = 0.0
    walls: list[float] = field(default_factory=list)


@dataclass
class JobLog:
    rule: str | None = None
    # A job forked from the warm-start server: its step's CPU and peak memory,
    # which Snakemake's benchmark (of the job's waiting process) does not see.
    worker_cpu_s: float = 0.0
    worker_peak_mb: float = 0.0


def _read_log(log: Path) -> JobLog:
    job = JobLog()
    if not log.exists():
        return job
    warm = False
    with log.open(errors="replace") as handle:
        for line in handle:
            if job.rule is None and (match := RULE_LINE.search(line)):
                job.rule = match.group(1)
                warm = bool(WARM_LINE.search(line))
            elif warm and (done := DONE_LINE.search(line)):
                job.worker_cpu_s, job.worker_peak_mb = float(done.group(1)), float(done.group(2))
    return job


def _number(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "", "NA", "-") else 0.0
    except ValueError:
        return 0.0


def rule_costs(results: Path) -> dict[str, RuleCost]:
    """{rule: summed cost} over every benchmark file of a run's ``results``."""
    costs: dict[str, RuleCost] = defaultdict(RuleCost)
    bench_root = results / "benchmarks"
    for tsv in sorted(bench_root.rglob("*.tsv")):
        sub = tsv.relative_to(bench_root).with_suffix(".log")
        job = _read_log(results / "logs" / sub)
        rule = job.rule or f"?{sub.parent}"
        with tsv.open() as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if not rows:
            continue
        row = rows[-1]
        cost = costs[rule]
        cost.jobs += 1
        wall = _number(row.get("s"))
        cost.wall_s += wall
        cost.walls.append(wall)
        cost.cpu_s += _number(row.get("cpu_time")) + job.worker_cpu_s
        cost.peak_mb = max(cost.peak_mb, _number(row.get("max_rss")), job.worker_peak_mb)
    return dict(costs)


def format_costs(costs: dict[str, RuleCost]) -> str:
    """A fixed-width table, most expensive rule (CPU) first, with totals."""
    lines = [f"{'rule':<26}{'jobs':>6}{'wall s':>10}{'CPU s':>10}{'CPU s/job':>11}{'peak MB':>9}"]
    for rule, cost in sorted(costs.items(), key=lambda item: -item[1].cpu_s):
        lines.append(
            f"{rule:<26}{cost.jobs:>6}{cost.wall_s:>10.1f}{cost.cpu_s:>10.1f}"
            f"{cost.cpu_s / max(cost.jobs, 1):>11.2f}{cost.peak_mb:>9.0f}"
        )
    jobs = sum(c.jobs for c in costs.values())
    wall = sum(c.wall_s for c in costs.values())
    cpu = sum(c.cpu_s for c in costs.values())
    peak = max((c.peak_mb for c in costs.values()), default=0.0)
    lines.append(
        f"{'total':<26}{jobs:>6}{wall:>10.1f}{cpu:>10.1f}{cpu / max(jobs, 1):>11.2f}{peak:>9.0f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a run's output_dir")
    args = parser.parse_args(argv)
    costs = rule_costs(args.results)
    if not costs:
        print(f"no benchmark files under {args.results / 'benchmarks'}", file=sys.stderr)
        return 1
    print(format_costs(costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
