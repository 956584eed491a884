"""Time the built-in simulator: scene + truth, then every exposure of a preset.

Usage: ``python benchmarks/bench_sim.py [preset ...] [--format raw|eimage] [--out DIR]``.
Runs in-process and sequentially; prints wall seconds and peak RSS per phase
(peak RSS is the process high-water mark, so it only grows).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench(preset: str, *, seed: int = 1, image_format: str = "raw", out: Path) -> dict[str, float]:
    """Simulate ``preset`` into ``out``; return seconds and peak RSS per phase."""
    from workflow_lib.sim.presets import get_preset
    from workflow_lib.sim.survey import plan_survey
    from workflow_lib.steps.simulate import simulate_exposures, simulate_scene

    result: dict[str, float] = {}
    t0 = time.perf_counter()
    plan = plan_survey(get_preset(preset), seed)
    result["plan_s"] = time.perf_counter() - t0
    truth = out / "truth_object.parquet"
    t0 = time.perf_counter()
    simulate_scene(
        preset=preset,
        seed=seed,
        truth_object_path=truth,
        truth_lightcurve_path=out / "truth_lightcurve.parquet",
        truth_ccdvisit_path=out / "truth_ccdvisit.parquet",
        truth_amplifier_path=out / "truth_amplifier.parquet",
        refcat_path=out / "refcat.csv",
    )
    result["scene_s"] = time.perf_counter() - t0
    result["scene_rss_mib"] = _peak_rss_mib()
    reg = plan.registry(image_format)
    for obstype in ("science", "bias", "dark", "flat"):
        exposures = reg.loc[reg["obstype"] == obstype, "exposure"].unique()
        if not len(exposures):
            continue
        t0 = time.perf_counter()
        for exposure in exposures:
            paths = {
                d: out / image_format / f"{image_format}_{exposure}_{d}.fits"
                for d in plan.detectors
            }
            simulate_exposures(
                preset=preset,
                seed=seed,
                output_paths={int(exposure): paths},
                truth_object_path=truth,
                image_format=image_format,
            )
        dt = time.perf_counter() - t0
        result[f"{obstype}_s"] = dt
        result[f"{obstype}_per_file_s"] = dt / (len(exposures) * len(plan.detectors))
        result[f"{obstype}_rss_mib"] = _peak_rss_mib()
    result["total_s"] = sum(
        v for k, v in result.items() if k.endswith("_s") and "per_file" not in k
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("presets", nargs="*", default=["tiny"])
    parser.add_argument("--format", default="raw", choices=["raw", "eimage"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            out = args.out / preset if args.out else Path(tmp)
            res = bench(preset, seed=args.seed, image_format=args.format, out=out)
        print(f"preset={preset} format={args.format}")
        for key, value in res.items():
            print(f"  {key:24s} {value:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
