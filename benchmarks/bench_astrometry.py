"""Time astrometric matching and WCS fitting on a synthetic full-size detector.

Usage: ``python benchmarks/bench_astrometry.py [--repeats N] [--seed S]``.
A 4k x 4k detector (0.2 arcsec pixels) with ~3000 detections and ~1500
reference stars on it, a header WCS off by 45 arcsec, 1.5 deg and 1% in scale;
then a sparse 1k x 1k field (~8 reference stars among 200 detections, mostly
galaxies, header 30 arcsec and 2 deg off).
Runs on one core (BLAS threads pinned to 1 before numpy loads) and prints the
median seconds of each phase, the peak RSS and the accuracy against the truth.
The synthetic field is the one the tests use (``tests/test_astrometry.py``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _field_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("_astro_field", REPO / "tests/test_astrometry.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def bench(seed: int) -> dict[str, float]:
    """One run: seconds of match, fit and the full solve; accuracy of the result."""
    from workflow_lib.single_frame.astrometry import fit_wcs, match_sources, solve_astrometry

    make_field = _field_module().make_field
    f = make_field(np.random.default_rng(seed), nx=4096, ny=4096, n_ref=1500, n_det=3000)
    w = 1.0 / ((f["sigma_px"] * 0.2) ** 2 + 0.005**2)
    out: dict[str, float] = {"n_sources": len(f["x"]), "n_ref_on_detector": (f["truth"] >= 0).sum()}
    t0 = time.perf_counter()
    m = match_sources(
        f["x"], f["y"], f["flux"], f["ref_ra"], f["ref_dec"], f["ref_mag"], f["header_wcs"]
    )
    out["match_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit_wcs(
        f["x"][m.source_index],
        f["y"][m.source_index],
        f["ref_ra"][m.reference_index],
        f["ref_dec"][m.reference_index],
        crpix=(2048.5, 2048.5),
        weights=w[m.source_index],
        image_shape=(4096, 4096),
    )
    out["fit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    m, res = solve_astrometry(
        f["x"],
        f["y"],
        f["flux"],
        f["ref_ra"],
        f["ref_dec"],
        f["ref_mag"],
        f["header_wcs"],
        image_shape=(4096, 4096),
        weights=w,
    )
    out["solve_s"] = time.perf_counter() - t0
    out["n_matches"] = m.n_matches
    out["correct_fraction"] = float(np.mean(f["truth"][m.source_index] == m.reference_index))
    bright = (f["truth"] >= 0) & (f["snr"] > 50)
    ra, dec = res.wcs.all_pix2world(f["tx"][bright], f["ty"][bright], 0)
    i = f["truth"][bright]
    d = (
        np.hypot(
            (ra - f["true_ra"][i]) * np.cos(np.deg2rad(f["true_dec"][i])), dec - f["true_dec"][i]
        )
        * 3.6e6
    )
    out["bright_rms_vs_truth_mas"] = float(np.sqrt(np.mean(d**2)))
    out["fit_rms_mas"] = res.rms_arcsec * 1000.0
    out["inverse_sip_err_mas"] = res.inverse_max_err_mas
    # A sparse field: 1k x 1k, ~8 reference stars among 200 detections (mostly galaxies).
    g = make_field(
        np.random.default_rng(seed),
        n_ref=8,
        n_det=200,
        offset=30.0,
        rot=2.0,
        extra_mag=(18.0, 25.0),
        extra_slope=0.33,
    )
    wg = 1.0 / ((g["sigma_px"] * 0.2) ** 2 + 0.005**2)
    t0 = time.perf_counter()
    _, rg = solve_astrometry(
        g["x"],
        g["y"],
        g["flux"],
        g["ref_ra"],
        g["ref_dec"],
        g["ref_mag"],
        g["header_wcs"],
        image_shape=g["shape"],
        weights=wg,
    )
    out["sparse_solve_s"] = time.perf_counter() - t0
    out["sparse_n_used"] = rg.n_used
    star = g["truth"] >= 0
    ra, dec = rg.wcs.all_pix2world(g["tx"][star], g["ty"][star], 0)
    i = g["truth"][star]
    d = (
        np.hypot(
            (ra - g["true_ra"][i]) * np.cos(np.deg2rad(g["true_dec"][i])), dec - g["true_dec"][i]
        )
        * 3.6e6
    )
    out["sparse_rms_vs_truth_mas"] = float(np.sqrt(np.mean(d**2)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    runs = [bench(args.seed + k) for k in range(args.repeats)]
    print(f"astrometry, 4k x 4k synthetic detector, 1 core, {args.repeats} fields")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"  {key:26s} median {statistics.median(values):10.4f}  max {max(values):10.4f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"  {'peak_rss_mib':26s} {peak:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
