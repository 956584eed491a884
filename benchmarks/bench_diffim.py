"""Time difference imaging of a 4k x 4k CCD on one core: subtraction, detection, measurement.

Usage: ``python -m benchmarks.bench_diffim [--size 4096] [--methods alard_lupton zogy]``.

A synthetic science/template pair (Gaussian stars, 240 per Mpx, science FWHM 4.7 px and template
3.5 px, a flux scale of 1.1 and a differential background between them, 50 transients
in the science only) is built once and written to a temporary directory; then each
method runs in a fresh process pinned to one CPU (BLAS/OpenMP threads 1) that reads
the pair and times ``subtract_images`` (with the kernel fitted on the stars for
``alard_lupton``, decorrelation on) and ``detect_dia_sources`` (detection in both
polarities, PSF fluxes, flags) separately. Printed per method: wall and CPU seconds
of each part, the peak RSS of the process, the transients found and the clean
DIASources that are none of them. The issue's goal: <= 5 s and <= 3 GB for
Alard-Lupton with detection and measurement (Rubin's RTN-109: 63 s + 50 s).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SIGMA_SCIENCE, SIGMA_TEMPLATE = 2.0, 1.5  # Gaussian PSF sigmas, pixels
NOISE_SCIENCE, NOISE_TEMPLATE = 10.0, 5.0
STARS_PER_MPX, N_TRANSIENTS = 240, 50  # 4000 stars on a 4k CCD
HALF = 15


def _stamp(sigma: float, dx: float, dy: float) -> np.ndarray:
    yy, xx = np.mgrid[-HALF : HALF + 1, -HALF : HALF + 1]
    g = np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * sigma**2))
    return g / g.sum()


def _render(shape, sigma, sources, noise, rng, background=0.0):  # type: ignore[no-untyped-def]
    image = rng.normal(background, noise, shape).astype(np.float32)
    for x, y, f in sources:
        ix, iy = round(x), round(y)
        image[iy - HALF : iy + HALF + 1, ix - HALF : ix + HALF + 1] += f * _stamp(
            sigma, x - ix, y - iy
        )
    return image


def build_pair(size: int, directory: Path) -> None:
    """Write science.npz and template.npz (image, variance, star and transient lists)."""
    rng = np.random.default_rng(20261204)
    shape = (size, size)
    n_stars = round(STARS_PER_MPX * size * size / 1e6)
    stars = np.c_[rng.uniform(40, size - 40, (n_stars, 2)), 10 ** rng.uniform(3.3, 5.3, n_stars)]
    transients = np.c_[rng.uniform(40, size - 40, (N_TRANSIENTS, 2)), np.full(N_TRANSIENTS, 3e3)]
    science = _render(shape, SIGMA_SCIENCE, np.r_[stars, transients], NOISE_SCIENCE, rng, 3.0)
    template_stars = stars * [1.0, 1.0, 1 / 1.1]
    template = _render(shape, SIGMA_TEMPLATE, template_stars, NOISE_TEMPLATE, rng)
    np.savez(
        directory / "pair.npz",
        science=science,
        template=template,
        stars=stars,
        transients=transients,
    )


def _exposure(image: np.ndarray, noise: float, sigma: float):  # type: ignore[no-untyped-def]
    from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes
    from workflow_lib.core.psf_model import PsfModel

    return Exposure(
        image,
        np.full(image.shape, noise**2, np.float32),
        np.zeros(image.shape, MASK_DTYPE),
        psf=PsfModel.constant(_stamp(sigma, 0, 0)),
        mask_planes=MaskPlanes(),
    )


def run_one(directory: Path, method: str, save: Path | None = None) -> dict[str, float]:
    """One method on the pair, in this process: timings, peak RSS, transients found;
    ``save``: the difference image written there too (float32 FITS, NaN where unusable)."""
    from workflow_lib.core.flags import ARTIFACT_DIA_SOURCE
    from workflow_lib.diffim.injection import match_injected
    from workflow_lib.diffim.sources import detect_dia_sources
    from workflow_lib.diffim.subtract import SubtractionConfig, subtract_images

    data = np.load(directory / "pair.npz")
    science = _exposure(data["science"], NOISE_SCIENCE, SIGMA_SCIENCE)
    template = _exposure(data["template"], NOISE_TEMPLATE, SIGMA_TEMPLATE)
    stars = data["stars"]
    kernel = stars[(stars[:, 2] > 2e3) & (stars[:, 2] < 1e5)]
    wall, cpu = time.perf_counter(), time.process_time()
    result = subtract_images(
        science,
        template,
        SubtractionConfig(method=method),
        kernel_sources=(kernel[:, 0], kernel[:, 1]),
    )
    t_sub, c_sub = time.perf_counter() - wall, time.process_time() - cpu
    diff = result.difference
    if save is not None:
        from astropy.io import fits

        unusable = diff.mask_of("NO_DATA", "BAD")
        fits.writeto(save, np.where(unusable, np.nan, diff.image).astype(np.float32))
    wall, cpu = time.perf_counter(), time.process_time()
    found = detect_dia_sources(diff.image, diff.variance, diff.mask, diff.mask_planes, result.psf)
    t_det, c_det = time.perf_counter() - wall, time.process_time() - cpu
    clean = found[(found["flags"].to_numpy() & int(ARTIFACT_DIA_SOURCE)) == 0]
    tr = data["transients"]
    hit = match_injected(tr[:, 0], tr[:, 1], clean["x"].to_numpy(), clean["y"].to_numpy(), 2.0)
    n_found = int((hit >= 0).sum())
    return {
        "subtract_wall_s": t_sub,
        "subtract_cpu_s": c_sub,
        "detect_wall_s": t_det,
        "detect_cpu_s": c_det,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "transients_found": n_found,
        "other_clean": len(clean) - n_found,
        "method": result.method,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--methods", nargs="+", default=["alard_lupton", "zogy"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        save = Path(args.save) if args.save else None
        print(json.dumps(run_one(Path(args.dir), args.one, save)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build_pair(args.size, Path(tmp))
        n_stars = round(STARS_PER_MPX * args.size**2 / 1e6)
        print(f"{args.size}x{args.size} pair: {n_stars} stars, {N_TRANSIENTS} transients, one core")
        for method in args.methods:
            out = subprocess.run(
                [
                    "taskset",
                    "-c",
                    "0",
                    sys.executable,
                    "-m",
                    "benchmarks.bench_diffim",
                    "--one",
                    method,
                    "--dir",
                    tmp,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            total = r["subtract_wall_s"] + r["detect_wall_s"]
            print(
                f"{method:<13} subtract {r['subtract_wall_s']:6.2f} s "
                f"(CPU {r['subtract_cpu_s']:.2f})  detect+measure {r['detect_wall_s']:6.2f} s "
                f"(CPU {r['detect_cpu_s']:.2f})  total {total:6.2f} s  "
                f"peak RSS {r['peak_rss_mb']:6.0f} MB  transients "
                f"{r['transients_found']}/{N_TRANSIENTS}, other clean {r['other_clean']} "
                f"({r['method']})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
