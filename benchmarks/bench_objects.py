"""Time coadd Object detection + measurement of one patch and forced photometry of one CCD.

Usage: ``python -m benchmarks.bench_objects [--size 4200] [--bands gri] [--depth 26.0]``.

A patch of ``size`` x ``size`` pixels (0.2") is filled with the simulator's
default source densities (150k stars and 126k galaxies per deg^2, power-law
magnitudes) drawn with numpy (Moffat stars, Gaussian-profile galaxies), with
white noise giving a 5-sigma point-source depth of ``--depth`` in every band.
Rendering is not timed. Reported per stage: wall seconds, process CPU
seconds (the machine is shared, CPU time is the comparable figure) and the
peak RSS of the process so far. Forced photometry runs on a 4k x 4k
"calexp" cut from the first band with all Objects.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import pandas as pd

PIXEL_SCALE = 0.2


def _moffat(fwhm: float, half: int = 20, beta: float = 3.5) -> np.ndarray:
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    alpha = fwhm / (2.0 * np.sqrt(2 ** (1 / beta) - 1))
    k = (1 + (xx**2 + yy**2) / alpha**2) ** -beta
    return k / k.sum()


def _render(shape, x, y, flux, size_px, fwhm, rng) -> np.ndarray:
    """Moffat stars (size 0) and round Gaussian-profile galaxies (sigma^2 = psf^2 + size^2)."""
    image = np.zeros(shape, dtype=np.float32)
    half = 20
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    alpha = fwhm / (2.0 * np.sqrt(2 ** (1 / 3.5) - 1))
    psf_sigma = fwhm / 2.3548
    ny, nx = shape
    for xi, yi, fi, si in zip(x, y, flux, size_px, strict=True):
        ix, iy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        r2 = (xx - (xi - ix)) ** 2 + (yy - (yi - iy)) ** 2
        if si <= 0:
            prof = (1 + r2 / alpha**2) ** -3.5
        else:
            prof = np.exp(-r2 / (2 * (psf_sigma**2 + si**2)))
        prof *= fi / prof.sum()
        y0, y1, x0, x1 = (
            max(iy - half, 0),
            min(iy + half + 1, ny),
            max(ix - half, 0),
            min(ix + half + 1, nx),
        )
        if y0 < y1 and x0 < x1:
            image[y0:y1, x0:x1] += prof[
                y0 - iy + half : y1 - iy + half, x0 - ix + half : x1 - ix + half
            ]
    return image


def _power_law(rng, n, m0, m1, slope=0.3):
    u = rng.uniform(0, 1, n)
    a, b = 10 ** (slope * m0), 10 ** (slope * m1)
    return np.log10(a + u * (b - a)) / slope


class _Clock:
    def __init__(self) -> None:
        self.rows: list[dict[str, float | str]] = []

    def __call__(self, name: str, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        self.rows.append(
            {
                "stage": name,
                "wall_s": round(time.perf_counter() - wall, 2),
                "cpu_s": round(time.process_time() - cpu, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0),
            }
        )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4200)
    parser.add_argument("--bands", default="gri")
    parser.add_argument("--depth", type=float, default=26.0)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    from astropy.wcs import WCS

    from workflow_lib.core.exposure import Exposure, MaskPlanes
    from workflow_lib.core.psf_model import PsfModel
    from workflow_lib.objects import measure_objects as objects
    from workflow_lib.objects.forced import forced_photometry

    rng = np.random.default_rng(args.seed)
    shape = (args.size, args.size)
    area_deg2 = (args.size * PIXEL_SCALE / 3600.0) ** 2
    n_star, n_gal = rng.poisson(150_000 * area_deg2), rng.poisson(126_000 * area_deg2)
    n = n_star + n_gal
    x, y = rng.uniform(0, args.size, n), rng.uniform(0, args.size, n)
    mag = np.r_[_power_law(rng, n_star, 15.0, 25.0), _power_law(rng, n_gal, 17.5, 25.5)]
    size_px = np.r_[np.zeros(n_star), np.clip(rng.lognormal(np.log(2.0), 0.4, n_gal), 0.8, 7.0)]
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [56.0, -30.0]
    wcs.wcs.crpix = [args.size / 2.0, args.size / 2.0]
    wcs.wcs.cd = PIXEL_SCALE / 3600.0 * np.array([[-1.0, 0.0], [0.0, 1.0]])
    coadds = {}
    fwhms = dict(zip(args.bands, np.linspace(4.0, 3.4, len(args.bands)), strict=True))
    t0 = time.perf_counter()
    for band in args.bands:
        fwhm = float(fwhms[band])
        kernel = _moffat(fwhm)
        sigma_psf = 10 ** (-0.4 * (args.depth - 31.4)) / 5.0
        pixel_sigma = sigma_psf * np.sqrt((kernel**2).sum())
        image = _render(shape, x, y, 10 ** (-0.4 * (mag - 31.4)), size_px, fwhm, rng)
        image += rng.normal(0.0, pixel_sigma, shape).astype(np.float32)
        planes = MaskPlanes()
        variance = np.full(shape, pixel_sigma**2)
        coadds[band] = Exposure(
            image,
            variance,
            np.zeros(shape, np.int32),
            wcs=wcs,
            psf=PsfModel.constant(kernel),
            mask_planes=planes,
        )
    setup_s = time.perf_counter() - t0

    clock = _Clock()
    detections = {
        b: clock(f"detect {b}", objects.detect_coadd_sources, c) for b, c in coadds.items()
    }
    merged = clock("merge", objects.merge_detections, detections, wcs)
    table = clock("measure_objects", objects.measure_objects, coadds, merged, id_base=0)
    first = coadds[args.bands[0]]
    cut = min(4096, args.size)
    calexp = Exposure(
        first.image[:cut, :cut],
        first.variance[:cut, :cut],
        first.mask[:cut, :cut],
        wcs=first.wcs,
        psf=first.psf,
    )
    primary = table[table["detect_isPrimary"]]
    forced = clock("forced_photometry (4k CCD)", forced_photometry, calexp, primary)
    summary = {
        "size": args.size,
        "bands": args.bands,
        "n_sources": int(n),
        "setup_s": round(setup_s, 1),
        "n_peaks": {b: len(d) for b, d in detections.items()},
        "n_merged": len(merged),
        "n_objects": len(table),
        "n_parents": int((table["deblend_nChild"] > 0).sum()),
        "n_forced": len(forced),
        "noise_factors": table.attrs.get("noise_correlation_factor"),
    }
    print(pd.DataFrame(clock.rows).to_string(index=False))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
