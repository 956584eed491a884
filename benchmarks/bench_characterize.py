"""Time characterization of one 4k x 4k detector: background, detection, PSF, measurement.

Usage: ``python benchmarks/bench_characterize.py [--size 4096] [--sources 5000]``.
A synthetic image (Moffat PSF varying over the field, Poisson noise, seeded)
is built first (not timed); each phase is then timed on one core, and the
process's peak RSS is printed (it only grows, so the last value is the peak).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_image(size: int, n_sources: int, *, seed: int = 1):
    """Moffat(beta=3) stars (80%) and wider blobs (20%) on a flat sky, Poisson noise."""
    rng = np.random.default_rng(seed)
    sky = 800.0
    image = np.full((size, size), sky)
    half = 15
    off = np.arange(-half, half + 1)
    x = rng.uniform(20, size - 20, n_sources)
    y = rng.uniform(20, size - 20, n_sources)
    flux = np.exp(rng.uniform(np.log(500.0), np.log(3e5), n_sources))
    extended = rng.uniform(size=n_sources) < 0.2
    for xi, yi, fi, ext in zip(x, y, flux, extended, strict=True):
        u, v = (xi - size / 2) / (size / 2), (yi - size / 2) / (size / 2)
        fwhm = 3.6 * (1 + 0.05 * u + 0.03 * v * v) * (1.8 if ext else 1.0)
        alpha = fwhm / (2 * np.sqrt(2 ** (1 / 3.0) - 1))
        ix, iy = round(xi), round(yi)
        dx = (ix + off)[None, :] - xi
        dy = (iy + off)[:, None] - yi
        prof = (1 + (dx**2 + dy**2) / alpha**2) ** -3.0
        image[iy - half : iy + half + 1, ix - half : ix + half + 1] += fi * prof / prof.sum()
    noisy = rng.poisson(image).astype(np.float32)
    return noisy, np.maximum(noisy, 1.0).astype(np.float32)


def bench(size: int, n_sources: int) -> dict[str, float]:
    from workflow_lib.single_frame.detection import detect_with_background, estimate_fwhm
    from workflow_lib.single_frame.measure import fit_aperture_correction, measure_sources
    from workflow_lib.single_frame.psf import fit_psf_model, select_psf_stars

    image, variance = synthetic_image(size, n_sources)
    mask = np.zeros(image.shape, dtype=bool)
    res: dict[str, float] = {"render_rss_mib": _peak_rss_mib()}
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    bkg, det = detect_with_background(image, variance, mask, fwhm=3.5)
    res["background_detection_s"] = time.perf_counter() - t0
    res["n_detected"] = len(det.table)
    data = image - bkg.image
    t0 = time.perf_counter()
    fwhm = estimate_fwhm(det.table)
    sel = select_psf_stars(
        det.table, data, variance, mask, segmentation=det.segmentation, fwhm=fwhm
    ).selected
    fit = fit_psf_model(
        data,
        variance,
        mask,
        det.table["x_win"].to_numpy()[sel],
        det.table["y_win"].to_numpy()[sel],
        kernel_size=41,
        order=2,
        segmentation=det.segmentation,
        source_ids=det.table["id"].to_numpy()[sel],
    )
    res["psf_select_fit_s"] = time.perf_counter() - t0
    res["n_psf_stars"] = fit.n_used
    t0 = time.perf_counter()
    meas = measure_sources(
        data,
        variance,
        mask,
        psf=fit.psf,
        x=det.table["x_win"].to_numpy(),
        y=det.table["y_win"].to_numpy(),
        segmentation=det.segmentation,
        source_ids=det.table["id"].to_numpy(),
    )
    res["measure_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    used = np.zeros(len(meas), dtype=bool)
    used[np.flatnonzero(sel)[fit.used]] = True
    apc = fit_aperture_correction(
        meas["x"],
        meas["y"],
        meas["psf_flux"],
        meas["psf_flux_err"],
        meas["ap_17_0_flux"],
        meas["ap_17_0_flux_err"],
        used=used,
    )
    apc.apply(meas["x"], meas["y"], meas["psf_flux"], meas["psf_flux_err"])
    res["apcorr_s"] = time.perf_counter() - t0
    res["total_s"] = time.perf_counter() - t_all
    res["peak_rss_mib"] = _peak_rss_mib()
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--sources", type=int, default=5000)
    args = parser.parse_args(argv)
    for key, value in bench(args.size, args.sources).items():
        print(f"  {key:24s} {value:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
