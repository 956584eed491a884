"""Run the committed benchmarks and print their figures.

    python -m benchmarks.run                 # all
    python -m benchmarks.run sim-tiny dryrun-default --repeats 5

Benchmarks are run by hand and quoted in notes; they are not timed tests.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import Measurement, measure

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
    command = [SNAKEMAKE, "-n", "-q", "-s", str(REPO / "Snakefile"), "-d", str(run_dir),
               "--configfile", _config(run_dir, preset)]  # fmt: skip
    return measure(f"snakemake -n ({preset})", command, repeats=repeats)


def bench_workflow(preset: str, repeats: int, work: Path) -> Measurement:
    run_dir = work / f"wf-{preset}"
    command = [SNAKEMAKE, "--cores", "2", "-q", "-s", str(REPO / "Snakefile"), "-d", str(run_dir),
               "--configfile", _config(run_dir, preset)]  # fmt: skip
    return measure(
        f"workflow {preset} (2 cores)", command, repeats=repeats, before_each=_fresh(run_dir)
    )


BENCHMARKS: dict[str, Callable[[int, Path], Measurement]] = {
    "sim-tiny": lambda r, w: bench_simulate("tiny", r, w),
    "sim-default": lambda r, w: bench_simulate("default", r, w),
    "dryrun-default": lambda r, w: bench_dryrun("default", r, w),
    "workflow-tiny": lambda r, w: bench_workflow("tiny", r, w),
    "workflow-default": lambda r, w: bench_workflow("default", r, w),
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
            print(BENCHMARKS[name](args.repeats, Path(tmp)).line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
