"""Time ISR of one LSSTCam-sized raw detector (4k x 4k, 16 amplifiers) on one core.

Usage: ``python -m benchmarks.bench_isr [--size 4096] [--repeats 3] [--no-cr] [--out DIR]``.

A raw detector is synthesised with the simulator's instrument helpers
(LSSTCam-like amplifier layout and electronics, response pattern, dark
current, defects, cosmic rays at the simulator's rate) and a field of Moffat
stars drawn with numpy, written as a raw FITS file beside master bias, dark
and flat files. Each repeat then runs in a fresh process pinned to one CPU
with BLAS/OpenMP limited to one thread: it reads the raw and the masters and
runs :func:`workflow_lib.single_frame.isr.run_isr`, reporting seconds per sub-step and its
own peak RSS. Setup is not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, os, resource, sys, time
try:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
except (AttributeError, OSError):
    pass
t0 = time.perf_counter()
from workflow_lib.io import read_image_hdus
from workflow_lib.steps.calibs import read_defects, read_master
from workflow_lib.single_frame.isr import run_isr
d = sys.argv[1]
t_import = time.perf_counter() - t0
t = time.perf_counter()
primary, amps = read_image_hdus(os.path.join(d, "raw.fits"))
bias = read_master(os.path.join(d, "bias.fits"))
dark = read_master(os.path.join(d, "dark.fits"))
flat = read_master(os.path.join(d, "flat.fits"))
defects = read_defects(os.path.join(d, "defects.fits"))
t_read = time.perf_counter() - t
t = time.perf_counter()
res = run_isr(primary, amps, bias=bias, dark=dark, flat=flat, defects=defects,
              cosmic_rays=sys.argv[2] == "1")
total = time.perf_counter() - t
out = {"import_s": t_import, "read_s": t_read, "isr_s": total}
out.update({k + "_s": v for k, v in res.timings.items()})
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
out["n_cr"] = res.stats.get("n_cr_pixels", 0)
out["cr_searched"] = res.stats.get("cr_fraction_searched", 0)
print(json.dumps(out))
"""


def _moffat_field(shape: tuple[int, int], rng: np.random.Generator, *, n: int) -> np.ndarray:
    """Expected electrons of ``n`` Moffat (beta 3, FWHM 3.5 px) stars, fluxes 1e3-1e6 e-."""
    image = np.zeros(shape, dtype=np.float64)
    half = 20
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    alpha = 3.5 / (2.0 * np.sqrt(2 ** (1 / 3.0) - 1))
    for _ in range(n):
        x, y = rng.uniform(half, shape[1] - half - 1), rng.uniform(half, shape[0] - half - 1)
        ix, iy = int(x), int(y)
        r2 = (xx - (x - ix)) ** 2 + (yy - (y - iy)) ** 2
        prof = (1 + r2 / alpha**2) ** -3.0
        image[iy - half : iy + half + 1, ix - half : ix + half + 1] += (
            10 ** rng.uniform(3, 6) * prof / prof.sum()
        )
    return image


def synthesise(out: Path, *, size: int, seed: int = 5) -> None:
    """Write raw.fits, bias/dark/flat masters and defects.fits for a size x size detector."""
    from astropy.io import fits

    from workflow_lib.io import write_raw_file
    from workflow_lib.sim.camera import amp_layouts, amplifier_electronics
    from workflow_lib.sim.instrument import (
        add_cosmic_rays,
        dark_rate_map,
        detector_defects,
        read_out,
        response_map,
    )
    from workflow_lib.sim.presets import get_preset
    from workflow_lib.single_frame.isr import MasterCalib
    from workflow_lib.steps.calibs import write_defects, write_master

    preset = dataclasses.replace(
        get_preset("default"),
        name="bench",
        n_det_x=1,
        n_det_y=1,
        det_nx=size,
        det_ny=size,
        n_amp_x=8,
    )
    rng = np.random.default_rng(seed)
    amps = amp_layouts(preset)
    electronics = amplifier_electronics(preset, seed)
    resp = response_map(preset, seed, 0, "r", x0=-size / 2, y0=-size / 2, fp_radius=size)
    dark_rate = dark_rate_map(preset, seed, 0)
    sky, exptime, darktime = 1200.0, 30.0, 31.0
    expected = _moffat_field((size, size), rng, n=int(3000 * (size / 4096) ** 2)) + sky
    electrons = rng.poisson(expected * resp).astype(np.float64)
    electrons += rng.poisson(dark_rate * darktime)
    add_cosmic_rays(electrons, rng, rate=preset.cr_rate, darktime=darktime)
    amplifiers = read_out(electrons, amps, electronics, rng, seed=seed, detector=0)
    primary = fits.Header()
    for key, value in {
        "OBSTYPE": "SCIENCE",
        "EXPID": 1,
        "DETECTOR": 0,
        "FILTER": "r",
        "MJD-OBS": 60640.0,
        "EXPTIME": exptime,
        "DARKTIME": darktime,
        "RA": 56.0,
        "DEC": -31.0,
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CRVAL1": 56.0,
        "CRVAL2": -31.0,
        "CRPIX1": size / 2,
        "CRPIX2": size / 2,
        "CD1_1": -5.56e-5,
        "CD1_2": 0.0,
        "CD2_1": 0.0,
        "CD2_2": 5.56e-5,
    }.items():
        primary[key] = value
    headers = []
    for data, cards in amplifiers:
        h = fits.Header()
        for key, value in cards.items():
            h[key] = value
        headers.append((data, h))
    write_raw_file(out / "raw.fits", primary, headers)
    # Masters: bias is the overscan-corrected bias structure (zero here, its noise
    # floor), dark and flat the truth with a little noise.
    shape = (size, size)
    ones = np.ones(shape, dtype=np.float32)
    no = np.zeros(shape, dtype=bool)
    flat = (resp / np.median(resp)).astype(np.float32)
    masters = {
        "bias": MasterCalib("bias", np.zeros(shape, np.float32), 10 * ones, no, 10),
        "dark": MasterCalib("dark", dark_rate.astype(np.float32), 1e-4 * ones, no, 10),
        "flat": MasterCalib("flat", flat, 1e-5 * ones, no, 10, band="r"),
    }
    for kind, master in masters.items():
        write_master(master, out / f"{kind}.fits", provenance={"step": "bench"})
    defects = detector_defects(preset, seed, 0)
    write_defects(
        (defects.response_factor < 0.8) | (defects.hot_rate > 0.3),
        out / "defects.fits",
        provenance={"step": "bench"},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cr", action="store_true", help="skip cosmic-ray detection")
    parser.add_argument("--out", type=Path, default=None, help="keep the synthetic files here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-isr-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "raw.fits").exists():
            t = time.perf_counter()
            synthesise(out, size=args.size)
            print(f"synthesised {args.size}x{args.size} raw in {time.perf_counter() - t:.1f} s")
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        runs = []
        for _ in range(args.repeats):
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, str(out), "0" if args.no_cr else "1"],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        keys = [k for k in runs[0] if k.endswith("_s")]
        print(
            f"ISR of a {args.size}x{args.size} detector, 16 amplifiers, one core "
            f"(median of {len(runs)}):"
        )
        for key in keys:
            values = sorted(r[key] for r in runs)
            print(f"  {key[:-2]:<14} {values[len(values) // 2]:7.3f} s")
        print(f"  peak RSS       {max(r['peak_rss_mb'] for r in runs):7.0f} MB")
        print(f"  CR pixels {runs[0]['n_cr']}, fraction searched {runs[0]['cr_searched']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
