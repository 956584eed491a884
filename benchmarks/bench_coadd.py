"""Time coadd assembly: N warps of S x S pixels onto a P x P patch, with peak memory.

Usage::

    python benchmarks/bench_coadd.py [--patch 4200] [--warps 20] [--size 2000]
        [--mode deep|template|plain] [--inputs tile|fits] [--memory-mb 1024]

``deep``: direct warps with PSF-matched rejection warps of the same visits
(CompareWarp rejection); ``template``: PSF-matched warps only, rejecting on
themselves; ``plain``: direct warps, no rejection. ``tile`` inputs serve rows
from a noise tile held in memory (pure assembly cost, no I/O); ``fits``
inputs are real warp files written first (not timed) and read row by row
with fitsio. Setup is not timed. Reported: wall and process CPU seconds of
``assemble_coadd``, throughput in input megapixels (the direct inputs'
pixels) per second, and the process's peak RSS (it only grows, so the value
after assembly is the peak; the RSS before assembly is shown for reference).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402

from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes  # noqa: E402
from workflow_lib.core.psf_model import PsfModel  # noqa: E402
from workflow_lib.static_sky.coadd import WarpRows  # noqa: E402

TILE_ROWS = 97  # rows of noise a tile input repeats (prime, so strips do not alias)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gaussian_psf(fwhm: float, size: int = 25) -> PsfModel:
    half = size // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    sigma = fwhm / 2.3548
    return PsfModel.constant(np.exp(-(xx**2 + yy**2) / (2 * sigma**2)))


class TileWarpInput:
    """A WarpInput whose rows repeat a small noise tile: assembly cost without I/O."""

    def __init__(self, visit: int, origin, shape, psf: PsfModel, sigma: float, rng) -> None:
        self.visit, self.detector = visit, 0
        self.origin, self.shape, self.psf = origin, shape, psf
        self.photo_calib = None
        self.metadata = fits.Header({"VISIT": visit, "DETECTOR": 0, "BAND": "r"})
        self.mask_planes = MaskPlanes()
        nx = shape[1]
        self._image = rng.normal(0.0, sigma, (TILE_ROWS, nx)).astype(np.float32)
        self._variance = np.full((TILE_ROWS, nx), sigma**2, np.float32)
        self._mask = np.zeros((TILE_ROWS, nx), MASK_DTYPE)

    def read_rows(self, y0: int, y1: int) -> WarpRows:
        rows = np.arange(y0, y1) % TILE_ROWS
        return WarpRows(self._image[rows], self._variance[rows], self._mask[rows])


def layout(patch: int, n_warps: int, size: int, seed: int):
    """Seeded warp origins (each warp fully inside the patch) and noise levels."""
    rng = np.random.default_rng(seed)
    span = max(patch - size, 0)
    corners = rng.integers(0, span + 1, (n_warps, 2))
    origins = [(int(x), int(y)) for x, y in corners]
    sigmas = rng.uniform(8.0, 14.0, n_warps)
    return origins, sigmas


def tile_inputs(patch: int, n_warps: int, size: int, seed: int, *, fwhm: float):
    origins, sigmas = layout(patch, n_warps, size, seed)
    rng = np.random.default_rng(seed + 1)
    psf = gaussian_psf(fwhm)
    return [
        TileWarpInput(1000 + i, origins[i], (size, size), psf, sigmas[i], rng)
        for i in range(n_warps)
    ]


def fits_inputs(
    patch: int, n_warps: int, size: int, seed: int, *, fwhm: float, directory: Path, tag: str
):
    from workflow_lib.io.exposure import write_exposure
    from workflow_lib.io.warp_input import FitsWarpInput

    origins, sigmas = layout(patch, n_warps, size, seed)
    rng = np.random.default_rng(seed + 1)
    psf = gaussian_psf(fwhm)
    inputs = []
    for i in range(n_warps):
        image = rng.normal(0.0, sigmas[i], (size, size)).astype(np.float32)
        exposure = Exposure(
            image,
            np.full(image.shape, sigmas[i] ** 2, np.float32),
            np.zeros(image.shape),
            psf=psf,
            metadata=fits.Header({"VISIT": 1000 + i, "DETECTOR": 0, "BAND": "r"}),
            origin=origins[i],
        )
        path = directory / f"{tag}_{i}.fits"
        write_exposure(exposure, path)
        del exposure, image
        inputs.append(FitsWarpInput(path))
    return inputs


def bench(args: argparse.Namespace) -> dict[str, float]:
    from workflow_lib.static_sky.coadd import assemble_coadd

    def make(fwhm: float, tag: str, directory: Path | None):
        if args.inputs == "fits":
            assert directory is not None
            return fits_inputs(
                args.patch,
                args.warps,
                args.size,
                args.seed,
                fwhm=fwhm,
                directory=directory,
                tag=tag,
            )
        return tile_inputs(args.patch, args.warps, args.size, args.seed, fwhm=fwhm)

    with tempfile.TemporaryDirectory(prefix="bench_coadd_") as tmp:
        directory = Path(tmp)
        t_setup = time.perf_counter()
        matched = make(5.0, "matched", directory) if args.mode in ("deep", "template") else None
        direct = make(3.5, "direct", directory) if args.mode != "template" else matched
        setup_s = time.perf_counter() - t_setup
        rss_before = _peak_rss_mib()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = assemble_coadd(
            direct,
            shape=(args.patch, args.patch),
            wcs=None,
            rejection_inputs=matched if args.mode == "deep" else None,
            do_reject=args.mode != "plain",
            memory_limit_mb=args.memory_mb,
        )
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        for group in (direct, matched):
            for warp in group or []:
                if hasattr(warp, "close"):
                    warp.close()
    input_mpix = args.warps * args.size**2 / 1e6
    return {
        "setup_s (not timed)": setup_s,
        "input_megapixels": input_mpix,
        "assembly_wall_s": wall,
        "assembly_cpu_s": cpu,
        "throughput_mpix_per_wall_s": input_mpix / wall,
        "throughput_mpix_per_cpu_s": input_mpix / cpu,
        "strip_rows": float(result.exposure.metadata["STRIPROW"]),
        "coverage_fraction": float(result.exposure.metadata["COVFRAC"]),
        "clipped_input_pixels": float(result.exposure.metadata["NCLIPPED"]),
        "rss_before_assembly_mib": rss_before,
        "peak_rss_mib": _peak_rss_mib(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patch", type=int, default=4200)
    parser.add_argument("--warps", type=int, default=20)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--mode", choices=("deep", "template", "plain"), default="deep")
    parser.add_argument("--inputs", choices=("tile", "fits"), default="tile")
    parser.add_argument("--memory-mb", type=float, default=1024.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(
        f"coadd {args.mode}: {args.warps} warps of {args.size}^2 onto {args.patch}^2, "
        f"{args.inputs} inputs, memory limit {args.memory_mb:.0f} MiB"
    )
    for key, value in bench(args).items():
        print(f"  {key:30s} {value:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
