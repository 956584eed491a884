"""Source detection: matched-filter thresholding and deblending with ``sep``.

Detection thresholds are in units of the per-pixel noise (``err =
sqrt(variance)``), after filtering with a PSF-like kernel (the matched filter
maximises the S/N of point sources). The boolean footprint map feeds the
``DETECTED`` mask plane; the table gives positions (0-based pixels, the
array's own frame), isophotal fluxes, shapes and windowed centroids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import sep

from workflow_lib.single_frame.background import (
    Background,
    dilate_mask,
    estimate_background,
    native_float,
    subsample_stride,
)

log = logging.getLogger(__name__)

GAUSSIAN_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True)
class Detections:
    """Detected sources and their footprints.

    ``table``: one row per source (``id`` = its label in ``segmentation``,
    1-based). ``footprints``: boolean map of detected pixels.
    """

    table: pd.DataFrame
    footprints: np.ndarray
    segmentation: np.ndarray
    threshold_sigma: float


def gaussian_kernel(fwhm: float, *, size: int | None = None) -> np.ndarray:
    """Normalised circular Gaussian kernel of ``fwhm`` pixels (an approximate matched filter)."""
    sigma = max(float(fwhm), 1.0) * GAUSSIAN_FWHM_TO_SIGMA
    if size is None:
        size = 2 * int(np.ceil(2.5 * sigma)) + 1
    half = size // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    k = np.exp(-(xx**2 + yy**2) / (2.0 * sigma**2))
    return (k / k.sum()).astype(np.float32)


def _prepare(image, variance, mask):
    """sep's inputs: float32 data and noise, masked pixels zeroed / filled, and the mask."""
    data = native_float(image)
    var = native_float(variance)
    bad = ~np.isfinite(data)
    bad |= ~np.isfinite(var)
    bad |= var <= 0
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    if bad.any():
        data = np.where(bad, np.float32(0.0), data)
        # The fill only keeps sep's noise finite on pixels it ignores anyway:
        # a median of a subsample is as good as the full one.
        step = subsample_stride(var.size)
        good_var = var[::step, ::step][~bad[::step, ::step]]
        if good_var.size == 0:
            good_var = var[~bad]
        fill = np.float32(np.median(good_var)) if good_var.size else np.float32(1.0)
        err = np.where(bad, fill, var)
    else:
        err = var.copy()
    np.sqrt(err, out=err)
    return data, err, np.ascontiguousarray(bad)


def detect_sources(
    image_minus_bg: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    threshold_sigma: float = 5.0,
    min_area: int = 5,
    fwhm: float = 3.0,
    kernel: np.ndarray | None = None,
    deblend_nthresh: int = 32,
    deblend_cont: float = 0.005,
    windowed: bool = True,
) -> Detections:
    """Detect sources whose matched-filter S/N exceeds ``threshold_sigma``.

    ``mask`` (bool) marks pixels to ignore (NO_DATA, BAD, ...); saturated
    cores should normally *not* be ignored here, or bright stars split into
    rings. ``kernel`` overrides the Gaussian matched filter of ``fwhm`` pixels
    (pass the PSF model's kernel once it is known).
    """
    data, err, bad = _prepare(image_minus_bg, variance, mask)
    filt = gaussian_kernel(fwhm) if kernel is None else native_float(kernel)
    sep.set_extract_pixstack(max(300_000, min(data.size // 8, 3_000_000)))
    sep.set_sub_object_limit(4096)
    # sep's "matched" filter (per-pixel noise inside the kernel) costs ~10x a
    # plain convolution on 4k x 4k; with the noise locally constant across
    # the kernel both give the same S/N once the threshold is scaled by the
    # filter's noise reduction sqrt(sum k^2) / sum k (sep normalises k).
    noise_reduction = float(np.sqrt((filt.astype(np.float64) ** 2).sum()) / filt.sum())
    objects, seg = sep.extract(
        data,
        float(threshold_sigma) * noise_reduction,
        err=err,
        mask=bad,
        minarea=int(min_area),
        filter_kernel=filt,
        filter_type="conv",
        deblend_nthresh=int(deblend_nthresh),
        deblend_cont=float(deblend_cont),
        clean=True,
        segmentation_map=True,
    )
    table = pd.DataFrame(
        {
            "id": np.arange(1, len(objects) + 1, dtype=np.int64),
            "x": objects["x"].astype(np.float64),
            "y": objects["y"].astype(np.float64),
            "flux": objects["flux"].astype(np.float64),
            "cflux": objects["cflux"].astype(np.float64),
            "peak": objects["peak"].astype(np.float64),
            "cpeak": objects["cpeak"].astype(np.float64),
            "a": objects["a"].astype(np.float64),
            "b": objects["b"].astype(np.float64),
            "theta": objects["theta"].astype(np.float64),
            "x2": objects["x2"].astype(np.float64),
            "y2": objects["y2"].astype(np.float64),
            "xy": objects["xy"].astype(np.float64),
            "npix": objects["npix"].astype(np.int64),
            "flags": objects["flag"].astype(np.int64),
        }
    )
    table["x_win"] = table["x"]
    table["y_win"] = table["y"]
    table["win_flag"] = np.zeros(len(table), dtype=np.int64)
    if windowed and len(table):
        # SExtractor's window is a Gaussian of sigma = 2 r_half / 2.35 (= sigma
        # for a Gaussian source): the isophotal second-moment radius, never
        # below the PSF's sigma (faint isophotes are biased small).
        sig = np.maximum(
            np.sqrt(np.maximum(0.5 * (table["x2"] + table["y2"]).to_numpy(), 0.0)),
            max(float(fwhm), 1.0) * GAUSSIAN_FWHM_TO_SIGMA,
        )
        xw, yw, wflag = sep.winpos(
            data, table["x"].to_numpy(), table["y"].to_numpy(), sig, mask=bad
        )
        ok = np.isfinite(xw) & np.isfinite(yw) & (np.hypot(xw - table["x"], yw - table["y"]) < 2)
        table["x_win"] = np.where(ok, xw, table["x"])
        table["y_win"] = np.where(ok, yw, table["y"])
        table["win_flag"] = np.where(ok, wflag, 1).astype(np.int64)
    seg = np.asarray(seg, dtype=np.int32)
    log.debug("detected %d sources above %.1f sigma", len(table), threshold_sigma)
    return Detections(
        table=table, footprints=seg > 0, segmentation=seg, threshold_sigma=float(threshold_sigma)
    )


def detect_with_background(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    threshold_sigma: float = 5.0,
    min_area: int = 5,
    fwhm: float = 3.0,
    kernel: np.ndarray | None = None,
    box_size: int = 128,
    filter_size: int = 3,
    dilate_fwhm: float = 2.0,
    n_pass: int = 2,
) -> tuple[Background, Detections]:
    """Background and detections together, iterated ``n_pass`` times.

    Each pass masks the previous pass's footprints grown by ``dilate_fwhm``
    times ``fwhm`` (so source wings do not raise the sky), re-estimates the
    background and detects again on the subtracted image.
    """
    image = np.asarray(image, dtype=np.float32)
    ignore = np.zeros(image.shape, dtype=bool) if mask is None else np.asarray(mask, bool)
    bkg_mask = ignore
    bkg = None
    det = None
    n_pass = max(1, int(n_pass))
    for k in range(n_pass):
        bkg = estimate_background(image, mask=bkg_mask, box_size=box_size, filter_size=filter_size)
        subtracted = np.subtract(image, bkg.image, dtype=np.float32)
        if k < n_pass - 1:
            # Earlier passes only mask sources for the sky: detect on a 2x2-binned
            # image (4x fewer pixels), no deblending or windowed centroids.
            bkg_mask = _binned_footprints(
                subtracted,
                variance,
                ignore,
                threshold_sigma=threshold_sigma,
                fwhm=fwhm,
                dilate_radius=dilate_fwhm * fwhm,
            )
            bkg_mask |= ignore
            continue
        det = detect_sources(
            subtracted,
            variance,
            ignore,
            threshold_sigma=threshold_sigma,
            min_area=min_area,
            fwhm=fwhm,
            kernel=kernel,
        )
    assert bkg is not None and det is not None
    return bkg, det


def _binned_footprints(
    image: np.ndarray,
    variance: np.ndarray,
    ignore: np.ndarray,
    *,
    threshold_sigma: float,
    fwhm: float,
    dilate_radius: float = 0.0,
) -> np.ndarray:
    """Detected pixels found on the image binned 2x2 (sums), grown by ``dilate_radius``,
    back at full size.

    The footprints are unions of 2x2 blocks, so growing them by an even
    number of pixels 2k equals growing the binned map by k and expanding:
    the growth is done on the 4x smaller map, exactly.
    """
    ny, nx = image.shape
    r = int(np.ceil(dilate_radius)) if dilate_radius > 0 else 0
    if ny < 16 or nx < 16:
        det = detect_sources(
            image,
            variance,
            ignore,
            threshold_sigma=threshold_sigma,
            fwhm=fwhm,
            windowed=False,
            deblend_cont=1.0,
        )
        return dilate_mask(det.footprints, radius=r)
    by, bx = ny // 2 * 2, nx // 2 * 2

    def binned(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        out = np.add(a[0:by:2, 0:bx:2], a[1:by:2, 0:bx:2], dtype=np.float32)
        out += a[0:by:2, 1:bx:2]
        out += a[1:by:2, 1:bx:2]
        return out

    def binned_finite(a: np.ndarray) -> np.ndarray:
        out = binned(a)
        if not np.isfinite(out).all():  # rare: non-finite pixels count as 0
            out = binned(np.where(np.isfinite(a), a, np.float32(0.0)))
        return out

    bad = ignore[0:by:2, 0:bx:2] | ignore[1:by:2, 0:bx:2]
    bad |= ignore[0:by:2, 1:bx:2]
    bad |= ignore[1:by:2, 1:bx:2]
    data, var = binned_finite(image), binned_finite(variance)
    det = detect_sources(
        data,
        var,
        bad,
        threshold_sigma=threshold_sigma,
        fwhm=max(fwhm / 2.0, 1.0),
        windowed=False,
        deblend_cont=1.0,
    )
    footprints = det.footprints
    exact = r % 2 == 0 and (by, bx) == (ny, nx)
    if exact:
        footprints = dilate_mask(footprints, radius=r // 2)
    full = np.zeros((ny, nx), dtype=bool)
    # Each binned pixel back onto its 2x2 block, by one broadcast assignment.
    blocks = full[:by, :bx].reshape(by // 2, 2, bx // 2, 2)
    blocks[...] = footprints[:, None, :, None]
    return full if exact else dilate_mask(full, radius=r)


def estimate_fwhm(table: pd.DataFrame, *, min_snr_flux: float | None = None) -> float:
    """Rough PSF FWHM (pixels) from the compact end of the sources' isophotal sizes.

    Used to size the matched filter before a PSF model exists; for a Gaussian
    the isophotal ``a``, ``b`` are biased low by the threshold cut, so only
    the brightest half of the sources enters. Stars are the smallest real
    sources, so the estimate is the size of the most compact tight group
    (:func:`compact_locus`), not the commonest size: in a galaxy-dominated
    field the commonest bright source is a galaxy.
    """
    if len(table) < 5:
        return float("nan")
    bright = table["flux"] >= (
        np.quantile(table["flux"], 0.5) if min_snr_flux is None else min_snr_flux
    )
    t = table[bright & (table["flags"] == 0) & (table["b"] > 0)]
    if len(t) < 5:
        t = table[table["b"] > 0]
    size = np.sqrt(t["a"] * t["b"]).to_numpy()
    return float(2.3548 * compact_locus(size, rel_width=0.1))


def compact_locus(
    sizes: np.ndarray, *, rel_width: float = 0.05, min_members: int | None = None
) -> float:
    """Size of the most compact tight group of sources (the stellar locus).

    Point sources share one size, the PSF's, and every other real source is
    larger; so the locus is the smallest size shared by at least
    ``min_members`` sources within ``rel_width`` (relative), refined as the
    median of that group. ``min_members`` defaults to 2-5, growing with the
    number of sources (a lone compact outlier, a hot pixel or a noise spike,
    never makes a locus), and never more than a third of the densest group,
    so stars that are a small minority still win over the galaxies above them.
    Falls back to the robust mode when no group qualifies.
    """
    v = np.log(np.asarray(sizes, dtype=np.float64))
    v = np.sort(v[np.isfinite(v)])
    if v.size == 0:
        return float("nan")
    if v.size < 3:
        return float(np.exp(np.median(v)))
    half = np.log1p(rel_width)
    lo = np.searchsorted(v, v - half, side="left")
    hi = np.searchsorted(v, v + half, side="right")
    counts = hi - lo
    if min_members is None:
        min_members = int(np.clip(round(0.1 * v.size), 2, 5))
    need = max(2, min(int(min_members), int(np.ceil(counts.max() / 3.0))))
    dense = np.flatnonzero(counts >= need)
    if dense.size == 0:
        return robust_mode(np.exp(v), rel_bandwidth=rel_width)
    centre = v[dense[0]]
    for _ in range(5):
        members = v[np.abs(v - centre) <= half]
        new = float(np.median(members))
        if abs(new - centre) < 1e-6:
            break
        centre = new
    return float(np.exp(centre))


def robust_mode(values: np.ndarray, *, rel_bandwidth: float = 0.05) -> float:
    """Mode of a positive distribution by a Gaussian KDE in log space."""
    v = np.log(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    if v.size < 3:
        return float(np.exp(np.median(v)))
    grid = np.linspace(v.min(), v.max(), 512)
    bw = max(rel_bandwidth, 1e-3)
    dens = np.exp(-0.5 * ((grid[:, None] - v[None, :]) / bw) ** 2).sum(axis=1)
    return float(np.exp(grid[np.argmax(dens)]))
