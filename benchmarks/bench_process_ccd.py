"""Single-frame processing of one full-size detector: 4k x 4k, 16 amplifiers, one core.

Simulates a one-detector survey at LSSTCam size (3 bias, 3 dark, 3 r flats and
one r visit), builds the master calibrations, shards the reference catalog,
then times the per-CCD step (ISR + characterize + calibrate, reading and
writing included) in a separate process pinned to one core, over repeats, and
prints the median, the peak memory and the per-step breakdown from the job log.

    python -m benchmarks.bench_process_ccd [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import run_once

PRESET = "bench4k"


def prepare(work: Path) -> dict[str, str]:
    """Simulate the detector and build everything the per-CCD step reads."""
    from workflow_lib.config import validate_config
    from workflow_lib.paths import ProductPaths
    from workflow_lib.sim.presets import get_preset, register_preset
    from workflow_lib.sim.survey import plan_survey
    from workflow_lib.sim.truth import phosim_refcat_columns
    from workflow_lib.steps import calibs
    from workflow_lib.steps.refcat import shard_refcat
    from workflow_lib.steps.simulate import simulate_exposures, simulate_scene

    preset = dataclasses.replace(
        get_preset("default"), name=PRESET, n_det_x=1, n_det_y=1, det_nx=4096, det_ny=4096,
        n_amp_x=8, visits=(("r", 0, 1),),
    )  # fmt: skip
    register_preset(preset)
    seed = 4
    paths = ProductPaths(work)
    simulate_scene(
        preset=PRESET, seed=seed, truth_object_path=paths.path("truth_object"),
        truth_lightcurve_path=paths.path("truth_lightcurve"),
        truth_ccdvisit_path=paths.path("truth_ccdvisit"),
        truth_amplifier_path=paths.path("truth_amplifier"), refcat_path=paths.path("sim_refcat"),
    )  # fmt: skip
    plan = plan_survey(preset, seed)
    registry = plan.registry("raw")
    files = {}
    for exposure in registry["exposure"].unique():
        files[int(exposure)] = {0: str(paths.path("sim_raw", exposure=exposure, detector=0))}
        simulate_exposures(
            preset=PRESET, seed=seed, output_paths={int(exposure): files[int(exposure)]},
            truth_object_path=paths.path("truth_object"),
        )  # fmt: skip

    def raws(obstype: str) -> list[str]:
        return [files[int(e)][0] for e in registry.loc[registry["obstype"] == obstype, "exposure"]]

    out = {k: str(paths.path(k, detector=0)) for k in ("bias", "dark", "defects")}
    out["flat"] = str(paths.path("flat", detector=0, band="r"))
    calibs.make_master_bias(raw_paths=raws("bias"), output_path=out["bias"])
    calibs.make_master_dark(raw_paths=raws("dark"), bias_path=out["bias"], output_path=out["dark"])
    calibs.make_master_flat(raw_paths=raws("flat"), bias_path=out["bias"], dark_path=out["dark"],
                            output_path=out["flat"], band="r")  # fmt: skip
    calibs.make_defects(dark_path=out["dark"], flat_paths=[out["flat"]], output_path=out["defects"])
    manifest = str(paths.path("refcat_manifest"))
    shard_refcat(refcat_path=str(paths.path("sim_refcat")), columns=phosim_refcat_columns(["r"]),
                 nside=64, manifest_path=manifest)  # fmt: skip
    visit = int(registry.loc[registry["obstype"] == "science", "exposure"].iloc[0])
    config = validate_config({})
    return {
        "raw_path": files[visit][0], "refcat_manifest_path": manifest,
        "bias_path": out["bias"], "dark_path": out["dark"], "flat_path": out["flat"],
        "defects_path": out["defects"], "visit": visit, "detector": 0, "image_format": "raw",
        "isr": config["isr"], "calibrate": config["calibrate"],
        "calexp_path": str(paths.path("calexp", visit=visit, detector=0)),
        "src_path": str(paths.path("src", visit=visit, detector=0)),
        "ccdvisit_path": str(paths.path("ccdVisit", visit=visit, detector=0)),
    }  # fmt: skip


_CHILD = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, filename=sys.argv[2], filemode="w",
                    format="%(name)s: %(message)s")
from workflow_lib.steps.process_ccd import process_ccd
process_ccd(**json.load(open(sys.argv[1])))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-process-ccd-"))
    kwargs = prepare(work)
    (work / "kwargs.json").write_text(json.dumps(kwargs))
    log = work / "process_ccd.log"
    env_cmd = ["env", "OMP_NUM_THREADS=1", "OPENBLAS_NUM_THREADS=1", "MKL_NUM_THREADS=1"]
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    command = [*env_cmd, *pin, sys.executable, "-c", _CHILD, str(work / "kwargs.json"), str(log)]
    runs = [run_once(command) for _ in range(args.repeats)]
    seconds = sorted(r[0] for r in runs)
    print(f"process_ccd 4096x4096, 16 amps, 1 core: median {seconds[len(seconds) // 2]:.2f} s "
          f"(range {seconds[0]:.2f}-{seconds[-1]:.2f}, n={len(runs)}), "
          f"peak RSS {max(r[1] for r in runs):.0f} MB")  # fmt: skip
    text = log.read_text()
    for key in ("isr_timings_s", "timings_s"):
        match = re.search(rf"QA {key} = (\{{.*\}})", text)
        if match:
            print(f"  last run {key}: {ast.literal_eval(match.group(1))}")
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
