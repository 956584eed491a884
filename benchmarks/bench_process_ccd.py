"""Single-frame processing of one full-size detector: 4k x 4k, 16 amplifiers, one core.

Simulates a one-detector survey at LSSTCam size (3 bias, 3 dark, 3 r flats and
one r visit), builds the master calibrations, shards the reference catalog,
then times the per-CCD step (ISR + characterize + calibrate, reading and
writing included) in a separate process pinned to one core, over repeats, and
prints medians of wall and process CPU time (CPU time is what to compare on
a shared machine), the peak memory (ru_maxrss of the process) and the
per-phase wall and CPU breakdown from the job log.

    python -m benchmarks.bench_process_ccd [--repeats 3] [--keep DIR [--reuse]]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESET = "bench4k"


def prepare(work: Path) -> dict[str, str]:
    """Simulate the detector and build everything the per-CCD step reads."""
    from workflow_lib.core.config import validate_config
    from workflow_lib.core.paths import ProductPaths
    from workflow_lib.sim.presets import get_preset, register_preset
    from workflow_lib.sim.survey import plan_survey
    from workflow_lib.sim.truth import phosim_refcat_columns
    from workflow_lib.steps import calibs
    from workflow_lib.steps.refcat import shard_refcat
    from workflow_lib.steps.simulate import simulate_exposures, simulate_scene

    preset = dataclasses.replace(
        get_preset("default"),
        name=PRESET,
        n_det_x=1,
        n_det_y=1,
        det_nx=4096,
        det_ny=4096,
        n_amp_x=8,
        visits=(("r", 0, 1),),
    )
    register_preset(preset)
    seed = 4
    paths = ProductPaths(work)
    simulate_scene(
        preset=PRESET,
        seed=seed,
        truth_object_path=paths.path("truth_object"),
        truth_lightcurve_path=paths.path("truth_lightcurve"),
        truth_ccdvisit_path=paths.path("truth_ccdvisit"),
        truth_amplifier_path=paths.path("truth_amplifier"),
        refcat_path=paths.path("sim_refcat"),
    )
    plan = plan_survey(preset, seed)
    registry = plan.registry("raw")
    files = {}
    for exposure in registry["exposure"].unique():
        files[int(exposure)] = {0: str(paths.path("sim_raw", exposure=exposure, detector=0))}
        simulate_exposures(
            preset=PRESET,
            seed=seed,
            output_paths={int(exposure): files[int(exposure)]},
            truth_object_path=paths.path("truth_object"),
        )

    def raws(obstype: str) -> list[str]:
        return [files[int(e)][0] for e in registry.loc[registry["obstype"] == obstype, "exposure"]]

    out = {k: str(paths.path(k, detector=0)) for k in ("bias", "dark", "defects")}
    out["flat"] = str(paths.path("flat", detector=0, band="r"))
    calibs.make_master_bias(raw_paths=raws("bias"), output_path=out["bias"])
    calibs.make_master_dark(raw_paths=raws("dark"), bias_path=out["bias"], output_path=out["dark"])
    calibs.make_master_flat(
        raw_paths=raws("flat"),
        bias_path=out["bias"],
        dark_path=out["dark"],
        output_path=out["flat"],
        band="r",
    )
    calibs.make_defects(dark_path=out["dark"], flat_paths=[out["flat"]], output_path=out["defects"])
    manifest = str(paths.path("refcat_manifest"))
    shard_refcat(
        refcat_path=str(paths.path("sim_refcat")),
        columns=phosim_refcat_columns(["r"]),
        nside=64,
        manifest_path=manifest,
    )
    visit = int(registry.loc[registry["obstype"] == "science", "exposure"].iloc[0])
    config = validate_config({})
    return {
        "raw_path": files[visit][0],
        "refcat_manifest_path": manifest,
        "bias_path": out["bias"],
        "dark_path": out["dark"],
        "flat_path": out["flat"],
        "defects_path": out["defects"],
        "visit": visit,
        "detector": 0,
        "image_format": "raw",
        "isr": config["isr"],
        "calibrate": config["calibrate"],
        "calexp_path": str(paths.path("calexp", visit=visit, detector=0)),
        "src_path": str(paths.path("src", visit=visit, detector=0)),
        "ccdvisit_path": str(paths.path("ccdVisit", visit=visit, detector=0)),
    }


_CHILD = """
import json, logging, resource, sys, time
cpu0, wall0 = time.process_time(), time.perf_counter()
logging.basicConfig(level=logging.INFO, filename=sys.argv[2], filemode="w",
                    format="%(name)s: %(message)s")
from workflow_lib.steps.process_ccd import process_ccd
cpu1, wall1 = time.process_time(), time.perf_counter()
process_ccd(**json.load(open(sys.argv[1])))
cpu2, wall2 = time.process_time(), time.perf_counter()
json.dump({"import_cpu_s": cpu1 - cpu0, "import_wall_s": wall1 - wall0,
           "step_cpu_s": cpu2 - cpu1, "step_wall_s": wall2 - wall1,
           "step_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0},
          open(sys.argv[3], "w"))
"""

# Per-phase QA lines of the job log: (log key, label).
_PHASE_KEYS = (
    ("step_timings_s", "step_cpu_timings_s", "step"),
    ("isr_timings_s", "isr_cpu_timings_s", "isr"),
    ("timings_s", "cpu_timings_s", "characterize+calibrate"),
)


@dataclasses.dataclass
class _Run:
    wall_s: float  # the whole child process, interpreter start to exit
    cpu_s: float  # its user + system CPU seconds
    peak_rss_mb: float
    child: dict[str, float]  # the child's own split: imports vs the step
    phases: dict[str, dict[str, float]]  # "<label>.<wall|cpu>" -> {phase: seconds}


def _run_child(command: list[str], log: Path, stats: Path) -> _Run:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"process_ccd failed:\n{stderr[-3000:]}")
    text = log.read_text()
    phases = {}
    for wall_key, cpu_key, label in _PHASE_KEYS:
        for key, kind in ((wall_key, "wall"), (cpu_key, "cpu")):
            match = re.search(rf"QA {key} = (\{{.*\}})", text)
            if match:
                phases[f"{label}.{kind}"] = ast.literal_eval(match.group(1))
    return _Run(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024.0,
        child=json.loads(stats.read_text()),
        phases=phases,
    )


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse the inputs already prepared in --keep"
    )
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-process-ccd-"))
    if args.reuse and (work / "kwargs.json").exists():
        kwargs = json.loads((work / "kwargs.json").read_text())
    else:
        kwargs = prepare(work)
        (work / "kwargs.json").write_text(json.dumps(kwargs))
    log, stats = work / "process_ccd.log", work / "process_ccd_stats.json"
    env_cmd = ["env", "OMP_NUM_THREADS=1", "OPENBLAS_NUM_THREADS=1", "MKL_NUM_THREADS=1"]
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    command = [
        *env_cmd,
        *pin,
        sys.executable,
        "-c",
        _CHILD,
        str(work / "kwargs.json"),
        str(log),
        str(stats),
    ]
    runs = [_run_child(command, log, stats) for _ in range(args.repeats)]
    walls = sorted(r.wall_s for r in runs)
    print(f"process_ccd 4096x4096, 16 amps, 1 core, n={len(runs)} (medians):")
    print(
        f"  process wall {_median(walls):.2f} s (range {walls[0]:.2f}-{walls[-1]:.2f}), "
        f"process CPU {_median([r.cpu_s for r in runs]):.2f} s, "
        f"peak RSS {max(r.peak_rss_mb for r in runs):.0f} MB"
    )
    child = {key: _median([r.child[key] for r in runs]) for key in runs[0].child}
    print(
        f"  step (the process_ccd call) wall {child['step_wall_s']:.2f} s, "
        f"CPU {child['step_cpu_s']:.2f} s; imports {child['import_cpu_s']:.2f} s"
    )
    for key in runs[-1].phases:
        names = runs[-1].phases[key]
        table = {
            name: round(_median([r.phases.get(key, {}).get(name, float("nan")) for r in runs]), 3)
            for name in names
        }
        print(f"  {key}: {table}")
    text = log.read_text()
    for key in ("seeing", "zeroPoint", "astromRms", "nAstromStars", "nSources"):
        match = re.search(rf": {key} = (\S+)", text)
        if match:
            print(f"  {key} = {match.group(1)}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
