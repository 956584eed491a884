"""Run the committed benchmarks and print their figures.

    python -m benchmarks.run                 # all
    python -m benchmarks.run sim-tiny dryrun-default --repeats 5
    python -m benchmarks.run workflow-default --repeats 1   # + CPU per rule
    python -m benchmarks.run job-overhead
    python -m benchmarks.run consolidate-sources --repeats 1   # 10^4 Source files, 17 GB of disk

Benchmarks are run by hand and quoted in notes; they are not timed tests.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.bench_tables import bench_consolidate
from benchmarks.harness import Measurement, measure
from benchmarks.rule_costs import format_costs, rule_costs

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SNAKEMAKE = str(Path(PYTHON).with_name("snakemake"))


def _fresh(directory: Path) -> Callable[[], None]:
    def reset() -> None:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)

    return reset


def _config(directory: Path, preset: str) -> str:
    path = directory.parent / f"{directory.name}.yaml"
    path.write_text(f"output_dir: {directory / 'results'}\nsim: {{preset: {preset}}}\n")
    return str(path)


def bench_simulate(preset: str, repeats: int, work: Path) -> Measurement:
    out = work / f"sim-{preset}"
    command = [PYTHON, "-m", "workflow_lib", "simulate", "--preset", preset, "--output", str(out)]
    return measure(f"simulate {preset} (1 core)", command, repeats=repeats, before_each=_fresh(out))


def bench_dryrun(preset: str, repeats: int, work: Path) -> Measurement:
    run_dir = work / f"dry-{preset}"
    _fresh(run_dir)()
    command = [
        SNAKEMAKE,
        "-n",
        "-q",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(run_dir),
        "--configfile",
        _config(run_dir, preset),
    ]
    return measure(f"snakemake -n ({preset})", command, repeats=repeats)


def bench_workflow(preset: str, repeats: int, work: Path) -> str:
    """Wall time and peak RSS of the whole run, then the last repeat's CPU per rule."""
    run_dir = work / f"wf-{preset}"
    command = [
        SNAKEMAKE,
        "--cores",
        "2",
        "-q",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(run_dir),
        "--configfile",
        _config(run_dir, preset),
    ]
    measurement = measure(
        f"workflow {preset} (2 cores)", command, repeats=repeats, before_each=_fresh(run_dir)
    )
    # The harness's peak RSS is of Snakemake's process tree, which jobs forked from
    # the warm-start server are not part of; the table's peak MB is per job.
    note = "(peak RSS: Snakemake and cold jobs; warm jobs' peaks in the table)"
    return f"{measurement.line()}\n{note}\n" + format_costs(rule_costs(run_dir / "results"))


OVERHEAD_SNAKEFILE = """
rule all:
    input: expand("out/{i}.done", i=range(int(config["njobs"])))
rule empty:
    output: output_path="out/{i}.done"
    params: step="empty:write_marker"
    log: "logs/{i}.log"
    script: "%s"
"""
# Each step module with the numerics package it calls (imported in full: an
# upper bound on what its job imports, some of it lazily).
STEP_IMPORTS = {
    "simulate": "sim",
    "process_ccd": "single_frame",
    "coadd": "static_sky",
    "objects": "objects",
    "diffim": "diffim",
    "association": "association",
    "tables": None,
}


def _import_code(step: str, package: str | None) -> str:
    """Python code importing a step module and every module of its numerics package."""
    code = f"import importlib, pkgutil, workflow_lib.steps.{step}\n"
    if package:
        code += (
            f"pkg = importlib.import_module('workflow_lib.{package}')\n"
            "for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "    importlib.import_module(m.name)\n"
        )
    return code


def bench_job_overhead(repeats: int, work: Path) -> str:
    """Fixed cost of one job: the empty step through Snakemake, cold and warm, plus
    each step's imports (what a cold job pays on top).

    The Snakemake part is the marginal wall time per job of a serial run
    (``--cores 1``: 21 jobs minus 1 job, over 20), once with every job in its own
    process (``DC2_WARM_START=0``) and once forked from the warm-start server
    (started beforehand, as the first jobs of a run start it); the import part is
    a fresh interpreter importing the step module, minus one importing nothing.
    """
    run_dir, snakefile = work / "overhead", work / "overhead.smk"
    snakefile.write_text(OVERHEAD_SNAKEFILE % (REPO / "scripts" / "run_step.py"))

    def serial(njobs: int, warm: bool) -> Measurement:
        command = [
            *("env", f"DC2_WARM_START={int(warm)}", SNAKEMAKE),
            *("--cores", "1", "-q", "-d", str(run_dir), "-s", str(snakefile)),
            *("--config", f"njobs={njobs}"),
        ]
        name = f"empty step x{njobs} ({'warm' if warm else 'cold'})"
        return measure(name, command, repeats=repeats, before_each=_fresh(run_dir))

    lines, per_job = [], {}
    for warm in (False, True):
        if warm:
            _start_warm_server(lambda: serial(1, True))
        one, many = serial(1, warm), serial(21, warm)
        per_job[warm] = (many.median - one.median) / 20
        label = f"snakemake + runner per job ({'warm' if warm else 'cold'})"
        lines += [one.line(), many.line(), f"{label:<44} {per_job[warm]:8.2f} s"]
    bare = measure("python -c pass", [PYTHON, "-c", "pass"], repeats=max(repeats, 5))
    for step, package in STEP_IMPORTS.items():
        m = measure(step, [PYTHON, "-c", _import_code(step, package)], repeats=max(repeats, 5))
        imports = m.median - bare.median
        lines.append(
            f"{'import ' + step:<28} {imports:8.2f} s   a cold job's fixed cost"
            f" {per_job[False] + imports:5.2f} s  (peak RSS {m.peak_rss_mb:.0f} MB)"
        )
    return "\n".join(lines)


def _start_warm_server(run_one_job: Callable[[], Measurement]) -> None:
    """One warm-enabled job starts the server; wait until it listens."""
    from workflow_lib.steps import warm_start

    run_one_job()
    path = warm_start.socket_path()
    deadline = time.monotonic() + 120
    while path is not None and not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


BENCHMARKS: dict[str, Callable[[int, Path], str]] = {
    "sim-tiny": lambda r, w: bench_simulate("tiny", r, w).line(),
    "sim-default": lambda r, w: bench_simulate("default", r, w).line(),
    "dryrun-default": lambda r, w: bench_dryrun("default", r, w).line(),
    "workflow-tiny": lambda r, w: bench_workflow("tiny", r, w),
    "workflow-default": lambda r, w: bench_workflow("default", r, w),
    "job-overhead": bench_job_overhead,
    "consolidate-sources": lambda r, w: bench_consolidate(10_000, 5_000, r, w).line(),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"any of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    with tempfile.TemporaryDirectory(prefix="dc2-bench-") as tmp:
        for name in names:
            print(BENCHMARKS[name](args.repeats, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
