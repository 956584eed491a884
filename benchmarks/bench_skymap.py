"""Time the sky map: building it and finding the patches of CCD footprints.

Usage: ``python benchmarks/bench_skymap.py [--n-ccds N] [--repeats R] [--seed S]``.
Synthetic CCDs: 0.23-deg squares at random positions and rotations over a
DC2-sized area (RA 50..75, Dec -45..-25), on the DC2 rings sky map (120 rings,
4000-pixel patches) and on a discrete tract fitted to them. Runs on one core
(BLAS threads pinned to 1 before numpy loads) and prints, for each phase, the
median over repeats of the process CPU time and the wall time (the machine is
shared, so CPU time is the figure to trust), in microseconds per CCD where the
phase is per CCD.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def synthetic_registry(n: int, seed: int) -> pd.DataFrame:
    """``n`` science CCD rows with header-WCS corner columns."""
    from workflow_lib.core.registry import CORNER_DEC_COLUMNS, CORNER_RA_COLUMNS
    from workflow_lib.sim.optics import tan_deproject

    rng = np.random.default_rng(seed)
    ra0 = rng.uniform(50.0, 75.0, n)
    dec0 = np.rad2deg(np.arcsin(rng.uniform(np.sin(np.deg2rad(-45)), np.sin(np.deg2rad(-25)), n)))
    th = rng.uniform(0.0, np.pi / 2, n)[:, None]
    half = 0.115
    u = np.array([-half, half, half, -half])[None, :]
    v = np.array([-half, -half, half, half])[None, :]
    xi, eta = np.cos(th) * u - np.sin(th) * v, np.sin(th) * u + np.cos(th) * v
    ra, dec = tan_deproject(xi, eta, ra0[:, None], dec0[:, None])
    table = pd.DataFrame({"visit": np.arange(n) // 189, "detector": np.arange(n) % 189})
    table[list(CORNER_RA_COLUMNS)] = ra
    table[list(CORNER_DEC_COLUMNS)] = dec
    return table


def _timed(func: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Median CPU and wall seconds of ``func`` over ``repeats`` calls, and its result."""
    cpu, wall = [], []
    result = None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        result = func()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall), result


def bench(n_ccds: int, repeats: int, seed: int) -> dict[str, float]:
    from workflow_lib.static_sky import skymap as sm

    out: dict[str, float] = {}
    registry = synthetic_registry(n_ccds, seed)
    ra = registry[list(sm.CORNER_RA_COLUMNS)].to_numpy()
    dec = registry[list(sm.CORNER_DEC_COLUMNS)].to_numpy()

    def build_rings() -> Any:
        sm._rings_sky_map.cache_clear()
        return sm.rings_sky_map()

    cpu, wall, rings = _timed(build_rings, repeats)
    out["rings_build_cpu_ms"], out["rings_build_wall_ms"] = cpu * 1e3, wall * 1e3
    out["rings_n_tracts"] = len(rings)
    cpu, wall, discrete = _timed(lambda: sm.discrete_sky_map(ra, dec), repeats)
    out["discrete_build_cpu_ms"], out["discrete_build_wall_ms"] = cpu * 1e3, wall * 1e3
    out["discrete_n_patches"] = discrete.tract(0).n_patches[0] * discrete.tract(0).n_patches[1]

    for name, skymap in (("rings", rings), ("discrete", discrete)):
        cpu, wall, result = _timed(lambda s=skymap: sm.ccd_patches(registry, s, 10.0), repeats)
        out[f"{name}_ccd_patches_cpu_us_per_ccd"] = cpu / n_ccds * 1e6
        out[f"{name}_ccd_patches_wall_us_per_ccd"] = wall / n_ccds * 1e6
        out[f"{name}_patches_per_ccd"] = float(np.mean([len(v) for v in result.values()]))
        n_single = min(n_ccds, 2000)

        def singles(s: Any = skymap, n: int = n_single) -> None:
            for i in range(n):
                s.patches_overlapping(ra[i], dec[i])

        singles()  # tracts are made (with their WCS) on first use; time the steady state
        cpu, wall, _ = _timed(singles, repeats)
        out[f"{name}_patches_overlapping_cpu_us_per_ccd"] = cpu / n_single * 1e6
        out[f"{name}_patches_overlapping_wall_us_per_ccd"] = wall / n_single * 1e6
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-ccds", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    for key, value in bench(args.n_ccds, args.repeats, args.seed).items():
        print(f"{key:<45} {value:12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
