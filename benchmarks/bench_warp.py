"""Time warping a 4k x 4k calexp onto a patch: ours, reproject_interp and SWarp, one core.

Usage: ``python -m benchmarks.bench_warp [--size 4096] [--repeats 3] [--no-reproject]``.

A synthetic calexp (Moffat stars with a PSF varying over the field, noise,
variance, BAD columns, cosmic rays and a saturated core in the mask) has a
TAN-SIP WCS rotated by 27 deg against a north-up TAN patch of the same size
centred near it (built first, not timed). Then, in the same run and pinned to
one CPU (BLAS/OpenMP threads 1, SWarp NTHREADS 1; children inherit the pin):

* ``warp_exposure`` (Lanczos-3; and the ``spline3`` option), in memory;
* ``psf_match_exposure`` to a model PSF, then ``warp_exposure`` (the
  PSF-matched flavour);
* ``reproject_interp`` (bicubic) of image and variance on the same output
  grid, the WCS evaluated on every pixel (one call, once: it is slow);
* SWarp (Lanczos-3, COMBINE N, variance map as weight, flux scaled by the
  local Jacobian) from FITS files in a temporary directory; its time includes
  reading and writing them. Skipped with a message if no ``swarp``/``SWarp``
  binary is on the PATH (Debian package ``swarp``). SWarp ignores SIP terms,
  so its output is compared with ours on the same image with a plain TAN WCS.

Wall and CPU seconds are printed (the machine may be shared: CPU time is the
fairer figure; SWarp's comes from ``RUSAGE_CHILDREN``), the ratio ours/SWarp,
the agreement of ours with SWarp's and reproject's output in units of the
noise, and the peak RSS. Helpers for the synthetic data are the tests' own
(``tests/test_warp.py``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.harness import run_once  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _helpers():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("_warp_helpers", REPO / "tests/test_warp.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _pin_to_one_cpu() -> str:
    try:
        cpu = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        return "not pinned (no sched_setaffinity)"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_scene(size: int, seed: int = 1, *, sip: bool = True):  # type: ignore[no-untyped-def]
    """The calexp and the patch WCS (not timed)."""
    from workflow_lib.core.exposure import Exposure, MaskPlanes, PhotoCalib

    h = _helpers()
    rng = np.random.default_rng(seed)
    shape = (size, size)
    wcs = h.tan_sip_wcs(shape, rotation_deg=27.0, sip=sip)

    def fwhm_at(x: float, y: float) -> float:
        return 3.2 + 0.4 * x / size + 0.2 * y / size

    n_stars = max(50, size * size // 8000)
    x = rng.uniform(40, size - 40, n_stars)
    y = rng.uniform(40, size - 40, n_stars)
    flux = np.exp(rng.uniform(np.log(2e3), np.log(2e6), n_stars))
    image = h.render_stars(shape, x, y, flux, fwhm_at, stamp=41)
    sky_sigma = 20.0
    image += rng.normal(0.0, sky_sigma, shape)
    variance = np.full(shape, sky_sigma**2) + np.maximum(image, 0.0) / 2.0
    planes = MaskPlanes()
    mask = np.zeros(shape, dtype=np.int32)
    mask[:, rng.integers(0, size, 8)] |= planes.bitmask("BAD")
    cr = rng.integers(0, size, (2, size * size // 20000))
    mask[cr[1], cr[0]] |= planes.bitmask("CR")
    mask[size // 3 : size // 3 + 5, size // 2 : size // 2 + 9] |= planes.bitmask("SAT")
    calexp = Exposure(
        image=image,
        variance=variance,
        mask=mask,
        wcs=wcs,
        psf=h.psf_model_for(shape, fwhm_at),
        photo_calib=PhotoCalib(njy_per_unit=1.0),
    )
    calexp.metadata["EXPID"] = 1
    calexp.metadata["FILTER"] = "r"
    target = h.patch_wcs(shape, (56.0 + 20 * h.ARCSEC, -30.0 - 12 * h.ARCSEC))
    return calexp, target, sky_sigma


def timed(function: Callable[[], object], repeats: int) -> tuple[object, float, float]:
    """Result of the last call, median wall and median CPU seconds."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        result = function()
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    return result, statistics.median(walls), statistics.median(cpus)


def swarp_binary() -> str | None:
    for name in ("swarp", "SWarp"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_swarp(binary: str, calexp, target, shape, work: Path):  # type: ignore[no-untyped-def]
    """SWarp's warp onto the patch grid: (image, x0, y0), wall s, CPU s, peak RSS MiB."""
    from astropy.io import fits

    header = calexp.wcs.to_header(relax=True)
    fits.writeto(work / "in.fits", calexp.image, header, overwrite=True)
    fits.writeto(work / "in.weight.fits", calexp.variance, header, overwrite=True)
    head = target.to_header()
    head["NAXIS"] = 2
    head["NAXIS1"], head["NAXIS2"] = shape[1], shape[0]
    (work / "coadd.head").write_text("\n".join(str(c) for c in head.cards) + "\nEND\n")
    command = [
        binary,
        str(work / "in.fits"),
        "-IMAGEOUT_NAME",
        str(work / "coadd.fits"),
        "-WEIGHTOUT_NAME",
        str(work / "coadd.weight.fits"),
        "-WEIGHT_TYPE",
        "MAP_VARIANCE",
        "-WEIGHT_IMAGE",
        str(work / "in.weight.fits"),
        "-RESCALE_WEIGHTS",
        "N",
        "-COMBINE",
        "N",
        "-RESAMPLE_DIR",
        str(work),
        "-RESAMPLING_TYPE",
        "LANCZOS3",
        "-FSCALASTRO_TYPE",
        "VARIABLE",
        "-SUBTRACT_BACK",
        "N",
        "-NTHREADS",
        "1",
        "-WRITE_XML",
        "N",
        "-VERBOSE_TYPE",
        "QUIET",
        "-DELETE_TMPFILES",
        "N",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, peak_rss = run_once(command, cwd=str(work))  # raises with SWarp's stderr on failure
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with fits.open(work / "in.resamp.fits") as hdul:
        out = hdul[0].data.astype(np.float64)
        # The resampled image is the patch grid cut to the overlap: its CRPIX says where.
        x0 = round(head["CRPIX1"] - hdul[0].header["CRPIX1"])
        y0 = round(head["CRPIX2"] - hdul[0].header["CRPIX2"])
    return (out, x0, y0), wall, cpu, peak_rss


def compare(ours, other: np.ndarray, x0: int, y0: int, sigma: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Differences (in units of the sky noise) where both have data, away from edges."""
    pad = 4  # room for small negative offsets
    ox, oy = ours.origin[0] + pad, ours.origin[1] + pad
    x0, y0 = x0 + pad, y0 + pad
    ny, nx = ours.shape
    size_y = max(oy + ny, y0 + other.shape[0]) + pad
    size_x = max(ox + nx, x0 + other.shape[1]) + pad
    mine = np.full((size_y, size_x), np.nan)
    mine[oy : oy + ny, ox : ox + nx] = np.where(ours.mask_of("NO_DATA"), np.nan, ours.image)
    theirs = np.full((size_y, size_x), np.nan)
    theirs[y0 : y0 + other.shape[0], x0 : x0 + other.shape[1]] = np.where(other == 0, np.nan, other)
    from scipy.ndimage import binary_erosion

    both = np.isfinite(mine) & np.isfinite(theirs)
    both = binary_erosion(both, iterations=8)
    d = (mine - theirs)[both] / sigma
    return {
        "n_pixels": float(both.sum()),
        "rms_diff_sigma": float(np.sqrt(np.mean(d**2))),
        "max_abs_diff_sigma": float(np.max(np.abs(d))),
        "sum_ratio": float(np.sum(mine[both]) / np.sum(theirs[both])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-reproject", action="store_true", help="skip reproject (slow)")
    args = parser.parse_args(argv)
    pin = _pin_to_one_cpu()

    from reproject import reproject_interp

    from workflow_lib.static_sky.warp import (
        build_pixel_mapping,
        model_psf,
        psf_match_exposure,
        warp_exposure,
    )

    t0 = time.perf_counter()
    calexp, target, sigma = make_scene(args.size)
    shape = calexp.shape
    bbox = (0, 0, shape[1], shape[0])
    print(
        f"warp benchmark: {args.size}x{args.size} calexp (TAN-SIP, rotated 27 deg) onto a "
        f"{shape[1]}x{shape[0]} patch, 1 core ({pin}); scene built in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    rows: list[tuple[str, float, float]] = []

    warp, wall, cpu = timed(lambda: warp_exposure(calexp, target, bbox), args.repeats)
    rows.append(("ours warp_exposure lanczos3", wall, cpu))
    ours_cpu, ours_wall = cpu, wall
    print(
        f"  crop {warp.origin} + {warp.shape[::-1]}, mapping grid {warp.metadata['WARPGRID']:.0f}"
        f" px, max mapping error {warp.metadata['WARPMERR']:.2g} px"
    )
    _, wall, cpu = timed(
        lambda: warp_exposure(calexp, target, bbox, kernel="spline3"), args.repeats
    )
    rows.append(("ours warp_exposure spline3", wall, cpu))

    model = model_psf(4.6)
    matched, wall_m, cpu_m = timed(lambda: psf_match_exposure(calexp, model), args.repeats)
    rows.append(("ours psf_match_exposure", wall_m, cpu_m))
    _, wall, cpu = timed(lambda: warp_exposure(matched, target, bbox), args.repeats)
    rows.append(("ours PSF-matched warp (total)", wall + wall_m, cpu + cpu_m))

    rss_ours = _peak_rss_mib()
    accuracy: dict[str, dict[str, float]] = {}
    if not args.no_reproject:
        cube = np.stack([calexp.image, calexp.variance]).astype(np.float64)

        def run_reproject():  # type: ignore[no-untyped-def]
            return reproject_interp(
                (cube, calexp.wcs), warp.wcs, shape_out=warp.shape, order="bicubic"
            )

        (ref, _), wall, cpu = timed(run_reproject, 1)
        rows.append(("reproject_interp bicubic", wall, cpu))
        # reproject interpolates surface brightness: scale by the pixel-area ratio.
        mapping = build_pixel_mapping(calexp.wcs, target, (*warp.origin, *warp.shape[::-1]))
        area = mapping.block_evaluator().rows(slice(0, warp.shape[0]))[2]
        accuracy["reproject x area"] = compare(
            warp, np.nan_to_num(ref[0]) * area, *warp.origin, sigma
        )

    binary = swarp_binary()
    swarp_cpu = swarp_wall = None
    if binary is None:
        print("  SWarp: no 'swarp' or 'SWarp' on the PATH (apt-get install swarp); skipped")
    else:
        with tempfile.TemporaryDirectory(prefix="bench-warp-") as tmp:
            walls, cpus, rss = [], [], 0.0
            for _ in range(args.repeats):
                (out, x0, y0), wall, cpu, peak = run_swarp(binary, calexp, target, shape, Path(tmp))
                walls.append(wall)
                cpus.append(cpu)
                rss = max(rss, peak)
            swarp_wall, swarp_cpu = statistics.median(walls), statistics.median(cpus)
            rows.append(("SWarp lanczos3 (incl. FITS I/O)", swarp_wall, swarp_cpu))
            # SWarp ignores SIP terms (it reads TPV distortions): compare the outputs on
            # the same image with the WCS's TAN part only.
            tan = calexp.wcs.deepcopy()
            tan.sip = None
            tan.wcs.ctype = ["RA---TAN", "DEC--TAN"]
            plain = replace(calexp, wcs=tan)
            (out, x0, y0), *_ = run_swarp(binary, plain, target, shape, Path(tmp))
            accuracy["SWarp (TAN WCS)"] = compare(
                warp_exposure(plain, target, bbox), out, x0, y0, sigma
            )

    print(f"  {'':34s} {'wall s':>8s} {'CPU s':>8s}")
    for name, wall, cpu in rows:
        print(f"  {name:34s} {wall:8.2f} {cpu:8.2f}")
    if swarp_cpu:
        cpu_ratio, wall_ratio = ours_cpu / swarp_cpu, ours_wall / swarp_wall
        print(f"  ratio ours/SWarp: CPU {cpu_ratio:.2f}, wall {wall_ratio:.2f}  (goal <= 1)")
    for name, stats in accuracy.items():
        text = ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
        print(f"  ours vs {name}: {text}")
    print(
        f"  peak RSS {rss_ours:.0f} MiB after ours (scene included), at the end "
        f"{_peak_rss_mib():.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
