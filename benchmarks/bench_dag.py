"""DAG building at DC2 scale: our workflow's per-job cost against bare Snakemake's.

No pixels: a generated registry of ``visits x detectors`` science CCDs (plus
bias, dark and flat frames per detector) and an empty file per input, the way
``input.registry`` feeds a large survey. For each size the benchmark times

* ``parse``: ``snakemake --list-rules`` (the Snakefile, WorkflowPlan included, no DAG);
* ``dry run``: ``snakemake -n`` (parse + DAG + job listing);

for the workflow and for a *bare* Snakefile with the same rules, wildcards,
inputs and outputs whose input functions are plain dictionary look-ups. The
per-job cost is the slope of (dry run - parse) against the job count between
the smallest and the largest size, so start-up cancels out. Wall time on a
shared machine is polluted by other processes: CPU time (user + system of the
whole process tree) is printed beside it.

``--profile-dry-run`` also times the dry run through ``profiles/slurm`` (its
groups add a pass over the DAG); ``--scheduler`` runs the DAG of one size with
``--touch`` (every job goes through the scheduler, nothing is computed) once
with the ILP scheduler and once with the greedy one, selecting up to 200 jobs
per round as the SLURM profile does.

    python -m benchmarks.bench_dag                       # 250, 1000, 5000 visits x 20 detectors
    python -m benchmarks.bench_dag --visits 100 500 --detectors 20 --scheduler 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
BANDS = ("u", "g", "r", "i", "z", "y")
N_CALIB_FRAMES = 3  # bias, dark and flat frames per (detector[, band])
FIRST_VISIT = 100_000


@dataclass(frozen=True)
class SyntheticSurvey:
    """A generated survey on disk: config file and expected job count."""

    root: Path
    configfile: Path
    n_visits: int
    n_detectors: int

    @property
    def n_ccds(self) -> int:
        return self.n_visits * self.n_detectors

    @property
    def n_jobs(self) -> int:
        """Jobs of a full dry run: see rules/*.smk for raw input."""
        per_detector = 2 + len(BANDS) + 1  # bias, dark, a flat per band, defects
        # ingest_raw, shard_refcat, ccdvisit_table, source_table, run_summary,
        # object_table, forced_source_table, metrics, qa_ccd_visits, and with
        # difference imaging dia_source_table, dia_ccd_visit_table, dia_object_table,
        # dia_forced_source_table, qa_dia_cutouts, qa_light_curves (no job needs the
        # sky map; the synthetic sky has no patch overlap known before the run)
        singles = 15
        return self.n_ccds + self.n_detectors * per_detector + singles + 1  # + all


def registry_records(n_visits: int, n_detectors: int) -> list[dict]:
    """Registry rows of a survey in every band, plus calibration frames per detector."""
    records = []
    # LSSTCam-like CCDs (4k pixels of 0.2", 0.227 deg) on a square grid around
    # the boresight; the header-WCS corners place them on the sky map.
    side = 4096 * 0.2 / 3600.0
    n_columns = int(np.ceil(np.sqrt(n_detectors)))
    cos_dec = np.cos(np.deg2rad(-30.0))
    for i in range(n_visits):
        visit = FIRST_VISIT + i
        band = BANDS[i % len(BANDS)]
        ra0, dec0 = 55.0 + 0.01 * (i % 100), -30.0
        for detector in range(n_detectors):
            cx = (detector % n_columns - (n_columns - 1) / 2) * side
            cy = (detector // n_columns - (n_columns - 1) / 2) * side
            corners = [
                (cx + dx * side / 2, cy + dy * side / 2)
                for dx, dy in ((-1, -1), (1, -1), (1, 1), (-1, 1))
            ]
            records.append(
                {
                    "exposure": visit,
                    "visit": visit,
                    "detector": detector,
                    "obstype": "science",
                    "band": band,
                    "mjd": 60000.0 + i * 0.01,
                    "exptime": 30.0,
                    "darktime": 30.0,
                    "ra": ra0,
                    "dec": dec0,
                    "n_amplifiers": 16,
                    **{f"corner_ra_{k + 1}": ra0 + x / cos_dec for k, (x, _) in enumerate(corners)},
                    **{f"corner_dec_{k + 1}": dec0 + y for k, (_, y) in enumerate(corners)},
                }
            )
    calib_types = [("bias", "", 0.0)] + [("dark", "", 30.0)] + [("flat", b, 1.0) for b in BANDS]
    exposure = 1
    for obstype, band, exptime in calib_types:
        for _ in range(N_CALIB_FRAMES):
            for detector in range(n_detectors):
                records.append(
                    {
                        "exposure": exposure,
                        "visit": -1,
                        "detector": detector,
                        "obstype": obstype,
                        "band": band,
                        "mjd": 59999.0,
                        "exptime": exptime,
                        "darktime": exptime,
                        "ra": float("nan"),
                        "dec": float("nan"),
                        "n_amplifiers": 16,
                        **{
                            f"corner_{c}_{k}": float("nan")
                            for c in ("ra", "dec")
                            for k in range(1, 5)
                        },
                    }
                )
            exposure += 1
    return records


def make_synthetic_survey(root: Path, n_visits: int, n_detectors: int) -> SyntheticSurvey:
    """Write a registry, an empty file per input and a config using them under ``root``."""
    from workflow_lib.core.registry import as_registry
    from workflow_lib.io import write_table

    raw_dir = root / "raw"
    records = registry_records(n_visits, n_detectors)
    for record in records:
        exposure, detector = record["exposure"], record["detector"]
        record["path"] = str(raw_dir / f"{exposure}" / f"raw_{exposure}_{detector}.fits")
    for exposure in sorted({r["exposure"] for r in records}):
        (raw_dir / str(exposure)).mkdir(parents=True, exist_ok=True)
    for record in records:
        os.close(os.open(record["path"], os.O_CREAT | os.O_WRONLY, 0o644))
    registry_path = root / "registry.parquet"
    write_table(as_registry(records), registry_path)
    refcat = root / "refcat.csv"
    refcat.write_text("id,ra,dec\n")
    config = {
        "output_dir": str(root / "results"),
        "input": {
            "source": "raw",
            "raw_dir": str(raw_dir),
            "registry": str(registry_path),
            "refcat": str(refcat),
        },
        # The single-frame part of the DAG, the part the bare Snakefile mirrors:
        # no tract 1 exists on the discrete sky map, so no coadd, Object or
        # forced-photometry job (only the two empty tables).
        "select": {"tract": [1]},
    }
    configfile = root / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    return SyntheticSurvey(root, configfile, n_visits, n_detectors)


# The same rules, wildcards, named inputs and outputs, params, logs and
# directives (conda, script) as rules/*.smk for raw input, with input
# functions that are dictionary look-ups built at parse time: what Snakemake
# itself costs per job. Never run: the script and environment are stubs.
BARE_SNAKEFILE = """
import pandas as pd

registry = pd.read_parquet(config["input"]["registry"])
out = config["output_dir"]
science = registry[registry["obstype"] == "science"]
calibs = registry[registry["obstype"] != "science"]
CCDS = {(int(v), int(d)): (b, p) for v, d, b, p in
        zip(science["visit"], science["detector"], science["band"], science["path"])}
FRAMES = {}
for o, d, b, p in zip(calibs["obstype"], calibs["detector"], calibs["band"], calibs["path"]):
    FRAMES.setdefault((o, int(d), b), []).append(p)
DETECTORS = sorted({d for _, d, _ in FRAMES})
BANDS = sorted({b for o, _, b in FRAMES if o == "flat"})
ALL_FILES = sorted(registry["path"])

def ccd_inputs(wc):
    band, raw = CCDS[(int(wc.visit), int(wc.detector))]
    d = wc.detector
    return {"raw_path": raw, "refcat_manifest_path": f"{out}/refcat/shards/manifest.json",
            "bias_path": f"{out}/calib/bias/bias_{d}.fits",
            "dark_path": f"{out}/calib/dark/dark_{d}.fits",
            "flat_path": f"{out}/calib/flat/{band}/flat_{band}_{d}.fits",
            "defects_path": f"{out}/calib/defects/defects_{d}.fits"}

CALEXP = out + "/calexp/{visit}/calexp_{visit}_{detector}.fits"
SRC = out + "/src/{visit}/src_{visit}_{detector}.parquet"
ROW = out + "/ccdVisit/{visit}/ccdVisit_{visit}_{detector}.parquet"

wildcard_constraints:
    visit=r"\\d+", detector=r"\\d+", band=r"[ugrizy]"

rule all:
    input: out + "/registry/exposures.parquet", out + "/summary/run_summary.json",
           out + "/tables/CcdVisit.parquet", out + "/tables/Source.parquet"

rule ingest_raw:
    input: ALL_FILES
    output: registry_path=out + "/registry/exposures.parquet",
            problems_path=out + "/registry/ingest_problems.csv"
    log: out + "/logs/ingest_raw.log"
    params: step="bare:step"
    conda: "env.yaml"
    script: "step.py"

rule shard_refcat:
    input: refcat_path=config["input"]["refcat"]
    output: manifest_path=out + "/refcat/shards/manifest.json"
    log: out + "/logs/shard_refcat.log"
    params: step="bare:step"
    conda: "env.yaml"
    script: "step.py"

rule master_bias:
    input: raw_paths=lambda wc: FRAMES[("bias", int(wc.detector), "")]
    output: output_path=out + "/calib/bias/bias_{detector}.fits"
    log: out + "/logs/calib/master_bias_{detector}.log"
    params: step="bare:step"
    conda: "env.yaml"
    script: "step.py"

rule master_dark:
    input: raw_paths=lambda wc: FRAMES[("dark", int(wc.detector), "")],
           bias_path=out + "/calib/bias/bias_{detector}.fits"
    output: output_path=out + "/calib/dark/dark_{detector}.fits"
    log: out + "/logs/calib/master_dark_{detector}.log"
    params: step="bare:step"
    conda: "env.yaml"
    script: "step.py"

rule master_flat:
    input: raw_paths=lambda wc: FRAMES[("flat", int(wc.detector), wc.band)],
           bias_path=out + "/calib/bias/bias_{detector}.fits",
           dark_path=out + "/calib/dark/dark_{detector}.fits"
    output: output_path=out + "/calib/flat/{band}/flat_{band}_{detector}.fits"
    log: out + "/logs/calib/master_flat_{band}_{detector}.log"
    params: step="bare:step"
    conda: "env.yaml"
    script: "step.py"

rule defects:
    input: dark_path=out + "/calib/dark/dark_{detector}.fits",
           flat_paths=lambda wc: [f"{out}/calib/flat/{b}/flat_{b}_{wc.detector}.fits"
                                  for b in BANDS]
    output: output_path=out + "/calib/defects/defects_{detector}.fits"
    log: out + "/logs/calib/defects_{detector}.log"
    params: step="bare:step"
    conda: "env.yaml"
    script: "step.py"

rule process_ccd:
    input: unpack(ccd_inputs)
    output: calexp_path=CALEXP, src_path=SRC, ccdvisit_path=ROW
    log: out + "/logs/process_ccd/{visit}/process_ccd_{visit}_{detector}.log"
    benchmark: out + "/benchmarks/process_ccd/{visit}/process_ccd_{visit}_{detector}.tsv"
    params: step="bare:step", image_format="raw", isr=config.get("isr", {}),
            calibrate=config.get("calibrate", {})
    conda: "env.yaml"
    script: "step.py"

rule ccdvisit_table:
    input: input_paths=[ROW.format(visit=v, detector=d) for v, d in sorted(CCDS)]
    output: output_path=out + "/tables/CcdVisit.parquet"
    log: out + "/logs/tables/CcdVisit.log"
    params: step="bare:step"
    conda: "env.yaml"
    script: "step.py"

rule source_table:
    input: input_paths=[SRC.format(visit=v, detector=d) for v, d in sorted(CCDS)]
    output: output_path=out + "/tables/Source.parquet"
    log: out + "/logs/tables/Source.log"
    params: step="bare:step"
    conda: "env.yaml"
    script: "step.py"

rule run_summary:
    input: registry_path=out + "/registry/exposures.parquet",
           problems_path=out + "/registry/ingest_problems.csv",
           ccdvisit_table_path=out + "/tables/CcdVisit.parquet"
    output: summary_path=out + "/summary/run_summary.json"
    log: out + "/logs/run_summary.log"
    params: step="bare:step"
    conda: "env.yaml"
    script: "step.py"
"""


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float
    peak_rss_mb: float


def timed_run(command: Sequence[str], *, cwd: Path, env: dict | None = None) -> Timing:
    """Wall time, CPU time (user + system, children included) and peak RSS of one command."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(command), cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            stderr.seek(0)
            message = stderr.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{message}")
    return Timing(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0)


def snakemake_command(snakefile: Path, survey: SyntheticSurvey, *args: str) -> list[str]:
    return [
        SNAKEMAKE,
        "-s",
        str(snakefile),
        "-d",
        str(survey.root),
        "--configfile",
        str(survey.configfile),
        *args,
    ]


def bench_size(
    work: Path,
    n_visits: int,
    n_detectors: int,
    *,
    with_profile: bool,
    other_checkout: Path | None = None,
) -> dict[str, Timing | int]:
    """Parse and dry-run timings of the workflow and of the bare Snakefile at one size."""
    root = work / f"survey-{n_visits}x{n_detectors}"
    survey = make_synthetic_survey(root, n_visits, n_detectors)
    bare = root / "Snakefile.bare"
    bare.write_text(BARE_SNAKEFILE)
    (root / "step.py").write_text("raise SystemExit('benchmark stub, never run')\n")
    (root / "env.yaml").write_text("channels: [conda-forge]\ndependencies: [python]\n")
    # The same resource settings for both (the workflow's own profile).
    profile = ("--workflow-profile", str(REPO / "profiles" / "default"))
    ours = REPO / "Snakefile"
    figures: dict[str, Timing | int] = {"n_jobs": survey.n_jobs}
    for name, snakefile in (("bare", bare), ("ours", ours)):
        figures[f"{name} parse"] = timed_run(
            snakemake_command(snakefile, survey, "--list-rules", *profile), cwd=root
        )
        figures[f"{name} dry run"] = timed_run(
            snakemake_command(snakefile, survey, "-n", *profile), cwd=root
        )
    if other_checkout is not None:
        # Another version of the workflow (e.g. before a change), its own
        # workflow_lib first on the path.
        env = {**os.environ, "PYTHONPATH": str(other_checkout)}
        snakefile = other_checkout / "Snakefile"
        figures["other parse"] = timed_run(
            snakemake_command(snakefile, survey, "--list-rules", *profile), cwd=root, env=env
        )
        figures["other dry run"] = timed_run(
            snakemake_command(snakefile, survey, "-n", *profile), cwd=root, env=env
        )
    if with_profile:
        figures["ours dry run, slurm profile"] = timed_run(
            snakemake_command(
                ours,
                survey,
                "-n",
                "--workflow-profile",
                str(REPO / "profiles" / "slurm"),
            ),
            cwd=root,
        )
    shutil.rmtree(root)
    return figures


# Jobs selected per scheduling round: like the SLURM profile's `jobs: 200`
# (remote jobs do not compete for local cores).
SCHEDULER_CORES = 200


def bench_scheduler(work: Path, n_visits: int, n_detectors: int) -> dict[str, Timing]:
    """The workflow's DAG run with --touch (no computation) under both schedulers."""
    figures = {}
    for scheduler in ("greedy", "ilp"):
        root = work / f"sched-{scheduler}"
        survey = make_synthetic_survey(root, n_visits, n_detectors)
        figures[scheduler] = timed_run(
            snakemake_command(
                REPO / "Snakefile",
                survey,
                "--touch",
                "--cores",
                str(SCHEDULER_CORES),
                "--scheduler",
                scheduler,
            ),
            cwd=root,
        )
        shutil.rmtree(root)
    return figures


def bench_plan(work: Path, n_visits: int, n_detectors: int) -> dict[str, float]:
    """The workflow's own per-CCD cost without Snakemake, at any size (no input files).

    Times, in this process: building the WorkflowPlan from a registry file (what
    every Snakemake start pays, in every SLURM job too), every process_ccd
    input function call and the per-CCD path lists of the table rules.
    """
    import resource

    from workflow_lib.core.registry import as_registry
    from workflow_lib.io import write_table
    from workflow_lib.workflow import WorkflowPlan

    records = registry_records(n_visits, n_detectors)
    for record in records:
        exposure, detector = record["exposure"], record["detector"]
        record["path"] = f"/raw/{exposure}/raw_{exposure}_{detector}.fits"
    registry_path = work / f"registry-{n_visits}x{n_detectors}.parquet"
    write_table(as_registry(records), registry_path)
    del records
    config = {
        "output_dir": str(work / "results"),
        "input": {
            "source": "raw",
            "raw_dir": "/raw",
            "registry": str(registry_path),
            "refcat": "/refcat.csv",
        },
    }
    figures = {}
    start = time.process_time()
    plan = WorkflowPlan(config)
    figures["plan (registry read, selection)"] = time.process_time() - start
    start = time.process_time()
    for visit, detector in plan.science_ids:
        plan.process_ccd_inputs({"visit": str(visit), "detector": str(detector)})
    figures["process_ccd_inputs, all CCDs"] = time.process_time() - start
    start = time.process_time()
    plan.per_ccd_paths("src")
    plan.per_ccd_paths("ccdVisit")
    figures["per_ccd_paths x2"] = time.process_time() - start
    figures["peak RSS MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return figures


def _line(label: str, t: Timing, n_jobs: int) -> str:
    return (
        f"  {label:<30} wall {t.wall_s:8.2f} s  cpu {t.cpu_s:8.2f} s  "
        f"peak RSS {t.peak_rss_mb:7.0f} MB  ({1000 * t.cpu_s / n_jobs:6.3f} ms cpu/job)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--visits", type=int, nargs="+", default=[250, 1000, 5000])
    parser.add_argument("--detectors", type=int, default=20)
    parser.add_argument("--profile-dry-run", action="store_true")
    parser.add_argument(
        "--other-checkout",
        type=Path,
        metavar="DIR",
        help="also time the Snakefile of another checkout (e.g. before a change)",
    )
    parser.add_argument(
        "--scheduler",
        type=int,
        metavar="VISITS",
        default=0,
        help="also run this many visits with --touch under the greedy and ILP schedulers",
    )
    parser.add_argument(
        "--plan-only",
        type=int,
        metavar="VISITS",
        default=0,
        help="only time the WorkflowPlan and its input functions at this many visits (no files)",
    )
    args = parser.parse_args(argv)
    if args.plan_only:
        with tempfile.TemporaryDirectory(prefix="dc2-bench-plan-") as tmp:
            n_ccds = args.plan_only * args.detectors
            print(
                f"workflow plan, {args.plan_only} visits x {args.detectors} detectors "
                f"({n_ccds} CCDs), CPU seconds in one process:"
            )
            for label, value in bench_plan(Path(tmp), args.plan_only, args.detectors).items():
                per_ccd = "" if "MB" in label else f"  ({1e6 * value / n_ccds:7.1f} us/CCD)"
                print(f"  {label:<34} {value:10.2f}{per_ccd}", flush=True)
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="dc2-bench-dag-") as tmp:
        for n_visits in sorted(args.visits):
            figures = bench_size(
                Path(tmp),
                n_visits,
                args.detectors,
                with_profile=args.profile_dry_run,
                other_checkout=args.other_checkout,
            )
            n_jobs = int(figures.pop("n_jobs"))  # type: ignore[arg-type]
            results[n_jobs] = figures
            print(f"{n_visits} visits x {args.detectors} detectors: {n_jobs} jobs", flush=True)
            for label, timing in figures.items():
                print(_line(label, timing, n_jobs), flush=True)  # type: ignore[arg-type]
        if len(results) > 1:
            small, large = min(results), max(results)
            print(
                f"per-job DAG cost, slope between {small} and {large} jobs "
                "(dry run - parse, CPU time):"
            )
            slopes = {}
            names = ("bare", "ours", "other") if args.other_checkout else ("bare", "ours")
            for name in names:
                dag = {
                    n: results[n][f"{name} dry run"].cpu_s - results[n][f"{name} parse"].cpu_s
                    for n in (small, large)
                }
                slopes[name] = (dag[large] - dag[small]) / (large - small)
                print(f"  {name:<5} {1000 * slopes[name]:.3f} ms/job")
            for name in names[1:]:
                print(f"  {name} / bare = {slopes[name] / slopes['bare']:.2f}")
        if args.scheduler:
            n_jobs = SyntheticSurvey(Path(tmp), Path(), args.scheduler, args.detectors).n_jobs
            print(
                f"scheduler, {args.scheduler} visits x {args.detectors} detectors "
                f"({n_jobs} jobs) run with --touch --cores {SCHEDULER_CORES}:"
            )
            for scheduler, timing in bench_scheduler(
                Path(tmp), args.scheduler, args.detectors
            ).items():
                print(_line(scheduler, timing, n_jobs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
