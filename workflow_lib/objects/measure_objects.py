"""Coadd Objects: per-band detection, multi-band merging, deblending, measurement.

The LSST coadd chain (detectCoaddSources, mergeCoaddDetections,
deblendCoaddSources, measureCoaddSources, mergeCoaddMeasurements,
forcedPhotCoadd) on the coadds of one patch:

1. :func:`detect_coadd_sources` — the coadd filtered by its own PSF (the
   matched filter) is thresholded at ``threshold_sigma`` of its true noise;
   peaks are local maxima standing ``min_prominence_sigma`` above the saddle
   to any brighter peak, plus those found the same way on a sharper image
   (close pairs are one blob after the matched filter). Footprints, grown by
   ~1 FWHM, go to the coadd's ``DETECTED`` mask plane.
2. :func:`merge_detections` — peaks matched across bands (same peak within
   ``match_radius_arcsec``, bands in priority order, the first band's
   position kept); parent footprints are the union of all bands' footprints.
3. :func:`measure_objects` — footprints with several peaks are deblended per
   band as LSST's meas_deblender does (:mod:`workflow_lib.objects.deblend`):
   symmetric, monotonic templates, each pixel shared among the children in
   proportion to them (heavy footprints), templates rebuilt twice from the
   children's shares. Every object is measured on its own pixels, every
   *other* footprint replaced by noise of the variance plane (LSST's
   NoiseReplacer). An unforced pass gives each band's centroid and S/N; the
   reference band is the first of ``ref_band_priority`` with S/N >=
   ``min_ref_snr`` and clean flags; the forced pass measures every band
   (detected there or not) at the reference-band centroid: PSF flux, aperture
   flux, windowed shape and extendedness.

Errors on a coadd: resampling correlates neighbouring pixels, so sums over
pixels (PSF fits, apertures, the detection filter) are noisier than the
variance plane says. :func:`noise_correlation_factor` measures the ratio of
the true to the variance-plane noise of each estimator from the noise
autocorrelation of the coadd's source-free pixels; detection thresholds and
the ``{b}_psfFluxErr``/``{b}_apFluxErr`` columns include it, so they are the
real 1-sigma statistical errors of the measurements (``attrs`` of the table
keeps the factors; :func:`coadd_psf_depth` takes the PSF one).

PSF fluxes are aperture-corrected, as on calexps, to the calibration aperture
(``calib_aperture_radius_arcsec``) with a correction measured on the coadd's
bright isolated stars, so coadd and calexp PSF fluxes share one flux scale.

``objectId = ((tract * 1000 + patch) << 32) | n`` with ``n`` = 1, 2, ... in
the patch (:func:`object_id_base`): unique across tracts and patches. Flag
bits: :class:`workflow_lib.core.flags.ObjectFlag`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
from astropy.wcs import WCS
from scipy import ndimage

from workflow_lib.core.convolution import fft_convolve
from workflow_lib.core.exposure import Exposure
from workflow_lib.core.flags import ObjectFlag
from workflow_lib.objects.deblend import (
    KIND_CHILD,
    KIND_ISOLATED,
    KIND_PARENT,
    BandImages,
    bad_pixels,
    build_entities,
    disk,
    footprint_labels,
    measure_band,
    psf_of,
)
from workflow_lib.objects.forced import (
    model_stamps,
    pixel_scale_arcsec,
    psf_centroid_offset,
    psf_fit_half_size,
)
from workflow_lib.single_frame.background import dilate_mask, native_float
from workflow_lib.single_frame.psf import cut_stamps
from workflow_lib.static_sky.coadd_psf import CoaddPsf

log = logging.getLogger(__name__)

BAND_ORDER: tuple[str, ...] = ("u", "g", "r", "i", "z", "y")
REF_BAND_PRIORITY: tuple[str, ...] = ("i", "r", "z", "y", "g", "u")
DETECTION_BAD_PLANES: tuple[str, ...] = ("NO_DATA", "BAD")
_MEASUREMENT_BITS = 0xFFFF


class PatchGeometry(Protocol):
    """What Object measurement needs of a patch (``skymap.PatchInfo`` has it)."""

    # Read-only properties: a frozen dataclass such as PatchInfo qualifies.
    @property
    def tract(self) -> int: ...
    @property
    def patch(self) -> int: ...
    @property
    def inner_bbox(self) -> tuple[int, int, int, int]: ...  # (x0, y0, nx, ny) in tract pixels
    @property
    def outer_bbox(self) -> tuple[int, int, int, int]: ...  # the coadd's pixels, in tract pixels


class TractGeometry(Protocol):
    """What Object measurement needs of a tract (``skymap.TractInfo`` has it)."""

    @property
    def tract(self) -> int: ...

    def in_inner_region(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray: ...


class SkyMapGeometry(Protocol):
    """The sky map's tract lookup, used when no tract is given."""

    def find_tracts(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray: ...


def object_id_base(tract: int, patch: int) -> int:
    """First objectId of a patch minus one: ``(tract * 1000 + patch) << 32``."""
    if not 0 <= int(patch) < 1000 or int(tract) < 0:
        raise ValueError(f"objectId needs 0 <= patch < 1000 and tract >= 0 (got {tract}, {patch})")
    return (int(tract) * 1000 + int(patch)) << 32


def noise_autocorrelation(
    image: np.ndarray,
    variance: np.ndarray,
    exclude: np.ndarray,
    *,
    max_lag: int = 8,
    tile: int = 512,
    max_tiles: int = 8,
    clip_sigma: float = 5.0,
    min_pixels: int = 20_000,
) -> np.ndarray | None:
    """Autocorrelation ``C[dy, dx]`` (lags -max_lag..max_lag) of the noise ``r = d / sqrt(v)``.

    From the pixels outside ``exclude`` (sources, bad pixels; beyond
    ``clip_sigma`` dropped), by FFTs on the ``max_tiles`` tiles of ``tile``
    pixels with the most such pixels, each tile's mean removed. ``C(0)`` is 1
    for a correct variance plane; ``C`` vanishes beyond a few pixels for a
    Lanczos resampling. Faint sources that were not excluded count as
    correlated noise (about 1% on the factor at DC2 source densities, more in
    extreme crowding). None with fewer than ``min_pixels`` usable pixels.
    """
    from scipy import fft

    data = native_float(image, np.float64)
    var = native_float(variance, np.float64)
    valid = ~np.asarray(exclude, dtype=bool) & np.isfinite(data) & np.isfinite(var) & (var > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(valid, data / np.sqrt(np.where(valid, var, 1.0)), 0.0)
    valid &= np.abs(r) < clip_sigma
    if valid.sum() < min_pixels:
        log.warning("only %d noise pixels: no noise autocorrelation", int(valid.sum()))
        return None
    lag = int(max_lag)
    ny, nx = data.shape
    starts = [(y0, x0) for y0 in range(0, ny, tile) for x0 in range(0, nx, tile)]
    counts = [int(valid[y0 : y0 + tile, x0 : x0 + tile].sum()) for y0, x0 in starts]
    chosen = [starts[k] for k in np.argsort(counts)[::-1][:max_tiles] if counts[k] > 0]
    lags = np.arange(-lag, lag + 1)
    sums = np.zeros((lags.size, lags.size))
    pairs = np.zeros((lags.size, lags.size))
    for y0, x0 in chosen:
        m = valid[y0 : y0 + tile, x0 : x0 + tile].astype(np.float64)
        rr = r[y0 : y0 + tile, x0 : x0 + tile] * m
        rr = (rr - rr.sum() / m.sum()) * m  # the tile's mean (residual sky) removed
        shape = [fft.next_fast_len(n + lag, real=True) for n in m.shape]
        auto_r = fft.irfft2(np.abs(fft.rfft2(rr, s=shape)) ** 2, s=shape)
        auto_m = fft.irfft2(np.abs(fft.rfft2(m, s=shape)) ** 2, s=shape)
        index = np.ix_(lags % shape[0], lags % shape[1])
        sums += auto_r[index]
        pairs += auto_m[index]
    correlation = np.where(pairs > 100, sums / np.maximum(pairs, 1.0), 0.0)
    if not correlation[lag, lag] > 1e-6:
        log.warning("no noise in the image: no noise autocorrelation")
        return None
    return correlation


def correlation_factor(correlation: np.ndarray | None, weights: np.ndarray) -> float:
    """``sqrt(sum_lag C(lag) A(lag) / A(0))``: true / variance-plane noise of ``sum(w d)``
    for noise of autocorrelation ``C`` (see :func:`noise_autocorrelation`; None gives 1),
    with ``A`` the autocorrelation of the ``weights``."""
    if correlation is None:
        return 1.0
    w = np.asarray(weights, dtype=np.float64)
    lag = correlation.shape[0] // 2
    padded = np.pad(w, lag)
    auto = np.array(
        [
            [
                np.sum(
                    w * padded[lag + dy : lag + dy + w.shape[0], lag + dx : lag + dx + w.shape[1]]
                )
                for dx in range(-lag, lag + 1)
            ]
            for dy in range(-lag, lag + 1)
        ]
    )
    ratio = float((correlation * auto).sum() / auto[lag, lag])
    return float(np.sqrt(max(ratio, 0.0)))


def noise_correlation_factor(
    image: np.ndarray,
    variance: np.ndarray,
    exclude: np.ndarray,
    weights: np.ndarray,
    **options: Any,
) -> float:
    """True / variance-plane noise of a weighted pixel sum ``sum(w d)`` on this image.

    Resampling correlates neighbouring pixels, so ``var(sum(w d))`` exceeds
    the variance plane's ``sum(w^2 v)``. The noise autocorrelation of the
    pixels outside ``exclude`` (:func:`noise_autocorrelation`, ``options``
    go to it) gives the factor (:func:`correlation_factor`): 1 for
    uncorrelated noise with a correct variance plane, 1.0 when the noise
    cannot be measured.
    """
    correlation = noise_autocorrelation(image, variance, exclude, **options)
    return correlation_factor(correlation, weights)


def grow_footprints(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` dilated by an octagon of ``radius`` pixels (nearly a disc; a square would
    merge more neighbours into one parent): the union of two separable rectangles."""
    mask = np.asarray(mask, dtype=np.uint8)
    r = int(np.ceil(radius))
    if r <= 0 or not mask.any():
        return mask.astype(bool)
    s = round(radius / np.sqrt(2.0))

    def box(a: int, b: int) -> np.ndarray:
        out = ndimage.maximum_filter1d(mask, 2 * a + 1, axis=0)
        return ndimage.maximum_filter1d(out, 2 * b + 1, axis=1).astype(bool)

    return box(r, s) | box(s, r)


def coadd_psf_depth(
    coadd: Exposure,
    *,
    n_sigma: float = 5.0,
    noise_factor: float | None = None,
    fit_radius_fwhm: float = 2.0,
    n_samples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Predicted ``n_sigma`` point-source depth (AB mag) of a coadd in nJy.

    The PSF-flux error of an isolated point source, ``sqrt(sum(m^2 v)) /
    sum(m^2)`` with ``m`` the PSF model (as :func:`measure_objects` fits it),
    times ``noise_factor``, evaluated at random unmasked positions. The
    factor (the coadd's noise correlation, :func:`noise_correlation_factor`)
    is measured when not given, away from the ``DETECTED`` footprints if the
    coadd has them. Returns the median, 10th and 90th percentile magnitudes,
    the factor used and the fraction of the patch with data.
    """
    psf = psf_of(coadd)
    bad = bad_pixels(coadd, DETECTION_BAD_PLANES)
    fwhm = psf.fwhm_at(psf.x_center, psf.y_center)
    half = psf_fit_half_size(psf, fit_radius_fwhm=fit_radius_fwhm, fwhm=fwhm)
    offset = psf_centroid_offset(psf, fwhm=fwhm)
    if noise_factor is None:
        if "DETECTED" in coadd.mask_planes.bits:
            sources = coadd.mask_of("DETECTED")
        else:
            sources = np.abs(coadd.image) > 5.0 * np.sqrt(np.abs(coadd.variance))
        exclude = bad | dilate_mask(sources, radius=2.0 * fwhm)
        centre = (np.array([psf.x_center]), np.array([psf.y_center]))
        kernel = model_stamps(psf, *centre, half, offset=offset)[0][0]
        noise_factor = noise_correlation_factor(coadd.image, coadd.variance, exclude, kernel)
    ny, nx = coadd.shape
    rng = np.random.default_rng(seed)
    ix = rng.integers(0, nx, n_samples)
    iy = rng.integers(0, ny, n_samples)
    keep = ~bad[iy, ix]
    nan = float("nan")
    if not keep.any():
        return {
            "depth_median": nan,
            "depth_p10": nan,
            "depth_p90": nan,
            "noise_factor": float(noise_factor),
            "data_fraction": 0.0,
        }
    x, y = ix[keep].astype(np.float64), iy[keep].astype(np.float64)
    models, jx, jy = model_stamps(psf, x, y, half, offset=offset)
    var = np.where(bad, 0.0, native_float(coadd.variance, np.float64))
    v = cut_stamps(var, jx, jy, half)
    good = cut_stamps(bad.astype(np.float64), jx, jy, half, fill=1.0) == 0
    mg = models * good
    err = noise_factor * np.sqrt((mg * mg * v).sum(axis=(1, 2))) / (mg * mg).sum(axis=(1, 2))
    mags = 31.4 - 2.5 * np.log10(n_sigma * err[np.isfinite(err) & (err > 0)])
    return {
        "depth_median": float(np.median(mags)),
        "depth_p10": float(np.percentile(mags, 10)),
        "depth_p90": float(np.percentile(mags, 90)),
        "noise_factor": float(noise_factor),
        "data_fraction": float(keep.mean()),
    }


def detect_coadd_sources(
    coadd: Exposure,
    *,
    threshold_sigma: float = 5.0,
    min_area: int = 3,
    grow_fwhm: float = 1.0,
    kernel_radius_fwhm: float = 1.25,
    min_prominence_sigma: float = 3.0,
    peak_smoothing_fwhm: float | None = 0.5,
    sharp_prominence_sigma: float = 5.0,
    max_peaks_per_footprint: int = 500,
    correct_noise_correlation: bool = True,
    hole_radius_fwhm: float = 8.0,
) -> pd.DataFrame:
    """Peaks above ``threshold_sigma`` in the coadd filtered by its own PSF.

    Enclosed masked holes smaller than a disc of ``hole_radius_fwhm`` FWHM
    (typically a bright star's core saturated in every input) are filled
    (:func:`fill_holes`) before filtering, so their rims give no false peaks.

    The image is convolved with the PSF kernel (the matched filter, cropped
    to ``kernel_radius_fwhm`` FWHM); its S/N map uses the convolved variance
    times the coadd's noise correlation factor (from the noise away from sources),
    so the threshold is a true matched-filter S/N, i.e. the PSF-flux S/N of a
    point source. Footprints are the connected pixels above the threshold
    (at least ``min_area``), grown by ``grow_fwhm`` FWHM; they replace the
    coadd's ``DETECTED`` mask plane (a side effect, as LSST's detection sets
    it). Peaks are the local maxima of the filtered image in the footprints
    that rise at least ``min_prominence_sigma`` above the lowest point on the
    straight line to every brighter peak kept (so a faint star on a bright
    star's wing is found, a noise bump on a galaxy is not). As the matched
    filter blurs close pairs into one peak, the same search runs on the image
    smoothed by a Gaussian of ``peak_smoothing_fwhm`` PSF FWHM (prominence
    ``sharp_prominence_sigma`` of that image's noise) and adds the peaks more
    than 0.5 FWHM from the others (``None`` turns it off).

    Returns one row per peak: ``x``, ``y`` (sub-pixel peak of the filtered
    image, the coadd's 0-based pixels), ``ra``, ``dec``, ``snr`` (filtered
    S/N at the peak), ``footprint`` (label of its footprint before growing);
    ``attrs`` holds the threshold and the noise correlation factor.
    """
    psf = psf_of(coadd)
    bad = bad_pixels(coadd, DETECTION_BAD_PLANES)
    fwhm = psf.fwhm_at(psf.x_center, psf.y_center)
    half = int(min(psf.size // 2, max(2, np.ceil(kernel_radius_fwhm * fwhm))))
    c = psf.size // 2
    kernel = psf.kernel_at(psf.x_center, psf.y_center)[
        c - half : c + half + 1, c - half : c + half + 1
    ]
    kernel = kernel / kernel.sum()
    data = np.where(bad, 0.0, coadd.image).astype(np.float64)
    var = np.where(bad, 0.0, coadd.variance).astype(np.float64)
    # Peaks come from an image whose small enclosed holes (the cores of stars saturated in
    # every input) are filled: left at zero, each would ring the hole with false peaks.
    filled, holes = fill_holes(data, bad, max_area=np.pi * (hole_radius_fwhm * fwhm) ** 2)
    filtered = fft_convolve(filled, kernel)
    base_noise = np.sqrt(np.maximum(fft_convolve(var, kernel**2), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        snr_map = np.where((base_noise > 0) & ~bad, filtered / base_noise, 0.0)
    factor = 1.0
    correlation = None
    if correct_noise_correlation:
        # Noise pixels: away (2 FWHM) from everything above the threshold before the
        # correction, which is the larger set (the factor is >= 1 on resampled coadds).
        margin = dilate_mask(snr_map >= threshold_sigma, radius=2.0 * fwhm)
        correlation = noise_autocorrelation(data, var, bad | margin)
        factor = correlation_factor(correlation, kernel)
    snr_map /= factor
    noise = factor * base_noise
    above = (snr_map >= threshold_sigma) | (holes > 0)
    labels, n_labels = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))
    if n_labels:
        sizes = np.bincount(labels.ravel(), minlength=n_labels + 1)
        small = sizes < int(min_area)
        small[0] = False
        labels[small[labels]] = 0
    footprints = labels > 0
    px, py = _find_peaks(
        filtered,
        noise,
        labels,
        min_sigma=min_prominence_sigma,
        max_per_footprint=max_peaks_per_footprint,
    )
    x, y = _subpixel_peaks(filtered, px, py)
    x, y = _hole_centres(holes, px, py, x, y)
    if peak_smoothing_fwhm is not None:
        # Companions on a bright neighbour's slope are mere shoulders after the matched
        # filter (which widens the PSF by sqrt 2): look for them in a sharper image too.
        sharp_kernel = _gaussian_kernel(peak_smoothing_fwhm * fwhm)
        sharp = fft_convolve(filled, sharp_kernel)
        sharp_noise = np.sqrt(np.maximum(fft_convolve(var, sharp_kernel**2), 0.0))
        if correct_noise_correlation:
            sharp_noise *= correlation_factor(correlation, sharp_kernel)
        sx, sy = _find_peaks(
            sharp,
            sharp_noise,
            labels,
            min_sigma=sharp_prominence_sigma,
            max_per_footprint=max_peaks_per_footprint,
        )
        if sx.size and px.size:
            from scipy.spatial import cKDTree

            dist, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([sx, sy]))
            new = dist > 0.5 * fwhm
            sx, sy = sx[new], sy[new]
        if sx.size:
            fx, fy = _hole_centres(holes, sx, sy, *_subpixel_peaks(sharp, sx, sy))
            px, py = np.concatenate([px, sx]), np.concatenate([py, sy])
            x, y = np.concatenate([x, fx]), np.concatenate([y, fy])
    peak_snr = snr_map[py, px]
    in_hole = holes[py, px] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        # A filled hole's S/N from the plateau and the noise its rim's variance spreads in.
        hole_snr = filtered[py, px] / noise[py, px]
    peak_snr = np.where(in_hole & np.isfinite(hole_snr), hole_snr, peak_snr)
    grown = grow_footprints(footprints, grow_fwhm * fwhm) & ~bad
    bit = coadd.mask_planes.add("DETECTED")
    coadd.mask &= np.int32(~(1 << bit))
    coadd.set_mask("DETECTED", grown)
    if coadd.wcs is not None and len(x):
        ra, dec = coadd.wcs.all_pix2world(x, y, 0)
    else:
        ra = dec = np.full(len(x), np.nan)
    out = pd.DataFrame(
        {
            "x": x,
            "y": y,
            "ra": np.asarray(ra, dtype=np.float64),
            "dec": np.asarray(dec, dtype=np.float64),
            "snr": peak_snr,
            "footprint": labels[py, px].astype(np.int64),
        }
    )
    out.attrs["noise_correlation_factor"] = factor
    out.attrs["threshold_sigma"] = float(threshold_sigma)
    log.debug("coadd detection: %d peaks, noise correlation factor %.3f", len(out), factor)
    return out


def fill_holes(
    data: np.ndarray, bad: np.ndarray, *, max_area: float
) -> tuple[np.ndarray, np.ndarray]:
    """``data`` with each connected ``bad`` region of at most ``max_area`` pixels that does
    not touch the image border set to the highest value on its rim (a plateau, which
    holds one peak); larger regions (chip gaps, edges) stay as given. Also returns the
    labels of the filled regions (0 elsewhere)."""
    labels, n = ndimage.label(bad)
    holes = np.zeros(data.shape, dtype=np.int32)
    if n == 0:
        return data, holes
    area = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    small = area <= max_area
    small[0] = False
    small[border] = False
    if not small.any():
        return data, holes
    out = data.copy()
    for k, region in enumerate(ndimage.find_objects(labels), start=1):
        if not small[k] or region is None:
            continue
        sy = slice(max(region[0].start - 1, 0), region[0].stop + 1)
        sx = slice(max(region[1].start - 1, 0), region[1].stop + 1)
        hole = labels[sy, sx] == k
        rim = ndimage.binary_dilation(hole, structure=np.ones((3, 3), dtype=bool)) & ~bad[sy, sx]
        if rim.any():
            out[sy, sx][hole] = data[sy, sx][rim].max()
            holes[sy, sx][hole] = k
    return out, holes


def _hole_centres(
    holes: np.ndarray, px: np.ndarray, py: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Peaks on a filled hole's plateau placed at the hole's centre (their pixel is arbitrary)."""
    inside = holes[py, px] > 0
    if not inside.any():
        return x, y
    x, y = x.copy(), y.copy()
    ids = holes[py[inside], px[inside]]
    centres = ndimage.center_of_mass(np.ones(holes.shape), holes, ids)
    x[inside] = [c[1] for c in centres]
    y[inside] = [c[0] for c in centres]
    return x, y


def _gaussian_kernel(fwhm: float) -> np.ndarray:
    """Unit-sum circular Gaussian of ``fwhm`` pixels on a (2 ceil(3 sigma) + 1)^2 grid."""
    sigma = max(float(fwhm), 0.5) / 2.3548200450309493
    half = int(np.ceil(3.0 * sigma))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    kernel = np.exp(-(xx**2 + yy**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def _find_peaks(
    image: np.ndarray,
    noise: np.ndarray,
    labels: np.ndarray,
    *,
    min_sigma: float,
    max_per_footprint: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixels of the prominent local maxima of ``image`` inside the footprints."""
    peak_map = (labels > 0) & (image >= ndimage.maximum_filter(image, size=3))
    py, px = np.nonzero(peak_map)
    keep = _prominent_peaks(
        image, noise, labels, px, py, min_sigma=min_sigma, max_per_footprint=max_per_footprint
    )
    return px[keep], py[keep]


def _prominent_peaks(
    filtered: np.ndarray,
    noise: np.ndarray,
    labels: np.ndarray,
    px: np.ndarray,
    py: np.ndarray,
    *,
    min_sigma: float,
    max_per_footprint: int,
    max_neighbours: int = 20,
) -> np.ndarray:
    """Peaks (brightest first in each footprint) that rise ``min_sigma`` filtered-noise units
    above the saddle towards every brighter peak kept, the saddle taken as the minimum
    along the straight line between the two (the brightest peak is always kept)."""
    n = px.size
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    value = filtered[py, px]
    label = labels[py, px]
    order = np.lexsort((-value, label))
    bounds = np.flatnonzero(np.diff(label[order])) + 1
    for group in np.split(order, bounds):
        group = group[: max(1, int(max_per_footprint))]
        kept: list[int] = [int(group[0])]
        keep[group[0]] = True
        for p in group[1:]:
            k = np.asarray(kept)
            dist = np.hypot(px[k] - px[p], py[k] - py[p])
            nearest = k[np.argsort(dist)[:max_neighbours]]
            saddle = -np.inf
            for q in nearest:
                steps = int(np.ceil(np.hypot(px[q] - px[p], py[q] - py[p]))) + 1
                t = np.linspace(0.0, 1.0, steps + 1)
                line = ndimage.map_coordinates(
                    filtered, [py[p] + t * (py[q] - py[p]), px[p] + t * (px[q] - px[p])], order=1
                )
                saddle = max(saddle, float(line.min()))
            if value[p] - saddle >= min_sigma * noise[py[p], px[p]]:
                keep[p] = True
                kept.append(int(p))
    return keep


def _subpixel_peaks(
    filtered: np.ndarray, px: np.ndarray, py: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Peak positions refined by a parabola through each pixel and its two neighbours per axis."""
    ny, nx = filtered.shape
    x, y = px.astype(np.float64), py.astype(np.float64)
    for axis in (0, 1):
        step = np.array([0, 1]) if axis == 0 else np.array([1, 0])
        inside = (px - step[0] >= 0) & (px + step[0] < nx) & (py - step[1] >= 0)
        inside &= py + step[1] < ny
        i = np.flatnonzero(inside)
        lo = filtered[py[i] - step[1], px[i] - step[0]]
        mid = filtered[py[i], px[i]]
        hi = filtered[py[i] + step[1], px[i] + step[0]]
        curvature = lo - 2 * mid + hi
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.where(curvature < 0, 0.5 * (lo - hi) / curvature, 0.0)
        shift = np.clip(np.nan_to_num(shift), -0.5, 0.5)
        if axis == 0:
            x[i] += shift
        else:
            y[i] += shift
    return x, y


def merge_detections(
    per_band: Mapping[str, pd.DataFrame],
    wcs: WCS,
    *,
    priority: Sequence[str] = REF_BAND_PRIORITY,
    match_radius_arcsec: float = 0.5,
) -> pd.DataFrame:
    """One merged peak list from the per-band peaks (all on the same patch pixel grid).

    Bands are taken in ``priority`` order (then any others). A band's peak,
    brightest first, claims the nearest merged peak within
    ``match_radius_arcsec`` not yet claimed in this band; one with only
    claimed peaks that near is a duplicate and dropped; any other becomes a
    new merged peak. Positions are those of the first band that saw the
    peak. Returns ``x``, ``y``, ``ra``, ``dec``, ``peak_band``, and per band
    ``{b}_detected`` and ``{b}_snr`` (NaN where not detected).
    """
    from scipy.spatial import cKDTree

    bands = [b for b in priority if b in per_band] + [b for b in per_band if b not in priority]
    radius = match_radius_arcsec / pixel_scale_arcsec(wcs)
    xs: list[float] = []
    ys: list[float] = []
    first: list[str] = []
    snr: dict[str, list[float]] = {b: [] for b in bands}
    seen: dict[str, list[bool]] = {b: [] for b in bands}
    for band in bands:
        table = per_band[band]
        bs = table["snr"].to_numpy(dtype=np.float64)
        order = np.argsort(-np.nan_to_num(bs, nan=-np.inf), kind="stable")
        bx = table["x"].to_numpy(dtype=np.float64)[order]
        by = table["y"].to_numpy(dtype=np.float64)[order]
        bs = bs[order]
        n_old = len(xs)
        old_x, old_y = np.asarray(xs), np.asarray(ys)
        claimed = np.zeros(n_old, dtype=bool)
        # Only earlier bands' peaks are matched: this band's own peaks were
        # already separated by its deblending.
        tree = cKDTree(np.column_stack([old_x, old_y])) if n_old else None
        for px, py, ps in zip(bx, by, bs, strict=True):
            if tree is not None:
                near = np.asarray(tree.query_ball_point([px, py], radius), dtype=np.int64)
                if near.size:
                    free = near[~claimed[near]]
                    if free.size:
                        k = int(free[np.argmin(np.hypot(old_x[free] - px, old_y[free] - py))])
                        claimed[k] = True
                        snr[band][k] = ps
                        seen[band][k] = True
                    continue
            xs.append(px)
            ys.append(py)
            first.append(band)
            for b in bands:
                snr[b].append(ps if b == band else np.nan)
                seen[b].append(b == band)
    out = pd.DataFrame(
        {"x": np.asarray(xs, dtype=np.float64), "y": np.asarray(ys, dtype=np.float64)}
    )
    if len(out):
        ra, dec = wcs.all_pix2world(out["x"].to_numpy(), out["y"].to_numpy(), 0)
    else:
        ra = dec = np.zeros(0)
    out["ra"], out["dec"] = np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)
    out["peak_band"] = pd.Series(first, dtype=object)
    for b in bands:
        values = np.asarray(snr[b], dtype=np.float64)
        out[f"{b}_detected"] = np.asarray(seen[b], dtype=bool)
        out[f"{b}_snr"] = values
    return out


def _extendedness(
    ratio: np.ndarray,
    ratio_err: np.ndarray,
    snr: np.ndarray,
    valid: np.ndarray,
    *,
    floor: float = 0.02,
) -> np.ndarray:
    """1 where the light inside ~2 FWHM exceeds the PSF model's by more than 3 sigma (and
    ``floor``), 0 otherwise, NaN where unknown; ratios are normalised to the stellar locus."""
    locus_sel = valid & np.isfinite(ratio) & (snr > 50) & (np.abs(ratio - 1) < 0.05)
    locus = float(np.median(ratio[locus_sel])) if locus_sel.sum() >= 10 else 1.0
    excess = ratio / locus - 1.0
    ext = (excess > np.maximum(floor, 3.0 * ratio_err)).astype(np.float64)
    return np.where(valid & np.isfinite(ratio), ext, np.nan)


def _choose_ref_band(
    priority: Sequence[str],
    snr: Mapping[str, np.ndarray],
    clean: Mapping[str, np.ndarray],
    n: int,
    min_snr: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Index into ``priority`` of each object's reference band, and a fallback flag."""
    ref = np.full(n, -1, dtype=np.int64)
    for k, band in enumerate(priority):
        ref[(ref < 0) & clean[band] & (np.nan_to_num(snr[band], nan=-np.inf) >= min_snr)] = k
    fallback = ref < 0
    for k, band in enumerate(priority):
        ref[(ref < 0) & clean[band]] = k
    ref[ref < 0] = 0
    return ref, fallback


def _converged_children(
    ents: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    snr: Mapping[str, np.ndarray],
    ref_index: np.ndarray,
    priority: Sequence[str],
    *,
    min_separation: float,
) -> np.ndarray:
    """Children closer than ``min_separation`` pixels to a brighter sibling (in their
    reference band's S/N): the entities whose peaks should go."""
    from scipy.spatial import cKDTree

    child = np.flatnonzero(ents["kind"] == KIND_CHILD)
    if child.size < 2 or min_separation <= 0:
        return np.zeros(0, dtype=np.int64)
    ref_snr = np.full(len(ents["kind"]), -np.inf)
    for k, band in enumerate(priority):
        sel = ref_index == k
        ref_snr[sel] = np.nan_to_num(snr[band][sel], nan=-np.inf)
    tree = cKDTree(np.column_stack([x[child], y[child]]))
    pairs = tree.query_pairs(min_separation, output_type="ndarray")
    drop = set()
    for a, b in child[pairs] if len(pairs) else []:
        if ents["parent"][a] != ents["parent"][b] or a in drop or b in drop:
            continue
        drop.add(int(b) if ref_snr[a] >= ref_snr[b] else int(a))
    return np.asarray(sorted(drop), dtype=np.int64)


def measure_objects(
    coadds: Mapping[str, Exposure],
    merged: pd.DataFrame,
    *,
    tract: TractGeometry | None = None,
    patch: PatchGeometry | None = None,
    skymap: SkyMapGeometry | None = None,
    ref_band_priority: Sequence[str] = REF_BAND_PRIORITY,
    id_base: int = 0,
    bands: Sequence[str] | None = None,
    coadd_psfs: Mapping[str, CoaddPsf | None] | None = None,
    min_child_separation_fwhm: float = 0.5,
    ap_flux_radius_arcsec: float = 2.4,
    calib_aperture_radius_arcsec: float = 4.0,
    min_ref_snr: float = 10.0,
    fit_radius_fwhm: float = 2.0,
    max_masked_fraction: float = 0.2,
    max_children: int = 100,
    max_deblend_pixels: int = 20_000_000,
    correct_noise_correlation: bool = True,
    aperture_correction: bool = True,
    min_apcorr_snr: float = 50.0,
    min_apcorr_stars: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """The Object table of one patch from its coadds (same pixel grid and WCS in every band).

    ``merged`` is :func:`merge_detections`' output; the coadds' ``DETECTED``
    planes (from :func:`detect_coadd_sources`) give the footprints. ``bands``
    lists every band that gets columns (default: the coadds'); a band without
    a coadd gets NaN and ``NO_COADD``. ``x``, ``y`` are in tract pixels when
    ``patch`` is given (the coadd is its outer bbox), otherwise in the
    coadd's frame offset by its ``origin``. ``detect_isPatchInner``: inside
    the patch's inner bbox (always true without a patch);
    ``detect_isTractInner``: ``tract.in_inner_region`` (or ``skymap`` finds
    this tract; true without either); ``detect_isPrimary``: both, and not a
    deblended parent. ``coadd_psfs`` (per band, optional): the exact
    :class:`~workflow_lib.static_sky.coadd_psf.CoaddPsf` of each coadd, used for the PSF
    fluxes in place of the coadd's smooth PSF model, which cannot follow the
    PSF's jumps where the inputs' coverage changes. Children of one parent
    whose centroids land within ``min_child_separation_fwhm`` FWHM of each
    other are one source: the fainter peak is dropped and the parent
    deblended again. ``aperture_correction``: PSF fluxes are corrected to
    the inputs' calibration aperture with the inputs' own corrections where
    the exact coadd PSF carries them (LSST's CoaddApCorrMap; NaN coverage
    flags ``APCORR_FAILED``), else with one fitted on the coadd's bright
    stars. ``attrs`` holds per band the noise correlation factors, the
    aperture correction at the patch centre and its source (``inputs`` or
    ``coadd``).
    """
    from workflow_lib.single_frame.measure import fit_aperture_correction

    if not coadds:
        raise ValueError("measure_objects needs at least one coadd")
    present = [b for b in BAND_ORDER if b in coadds] + [b for b in coadds if b not in BAND_ORDER]
    all_bands = list(bands) if bands is not None else list(present)
    all_bands += [b for b in present if b not in all_bands]
    first = coadds[present[0]]
    if first.wcs is None:
        raise ValueError("coadds need a WCS")
    shape = first.shape
    for band in present:
        if coadds[band].shape != shape:
            raise ValueError(f"coadd {band} has shape {coadds[band].shape}, expected {shape}")
    ny, nx = shape
    wcs = first.wcs
    scale = pixel_scale_arcsec(wcs)
    px = merged["x"].to_numpy(dtype=np.float64)
    py = merged["y"].to_numpy(dtype=np.float64)
    fwhms = {
        b: psf_of(coadds[b]).fwhm_at(psf_of(coadds[b]).x_center, psf_of(coadds[b]).y_center)
        for b in present
    }
    fwhm = max(fwhms.values())
    labels, peak_label = footprint_labels(coadds, px, py, fwhm)
    slices = ndimage.find_objects(labels)
    ents = build_entities(
        merged,
        peak_label,
        slices,
        present,
        max_children=max_children,
        max_deblend_pixels=max_deblend_pixels,
    ).arrays()
    n = len(ents["kind"])
    x0, y0 = px[ents["peak"]], py[ents["peak"]]
    r_ap = ap_flux_radius_arcsec / scale
    r_cal = calib_aperture_radius_arcsec / scale
    id_seed = [int(seed), int(id_base) >> 32, int(id_base) & 0xFFFFFFFF]
    common: dict[str, Any] = dict(
        fit_radius_fwhm=fit_radius_fwhm, max_masked_fraction=max_masked_fraction
    )
    exact = {b: p for b, p in (coadd_psfs or {}).items() if p is not None}

    # Pass 1, unforced: each band's centroid and S/N, for the reference band.
    factors: dict[str, dict[str, float]] = {}
    shares: dict[str, dict] = {}
    centroids: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    snr1: dict[str, np.ndarray] = {}
    clean1: dict[str, np.ndarray] = {}
    for bi, band in enumerate(present):
        images = BandImages(
            coadds[band],
            labels,
            ents,
            px,
            py,
            seed=[*id_seed, bi],
            fwhm=fwhms[band],
            coadd_psf=exact.get(band),
        )
        shares[band] = images.shares
        factors[band] = {"psf": 1.0, "ap": 1.0}
        if correct_noise_correlation:
            # Away from footprints by 2 FWHM: star wings beyond them would bias it high.
            empty = images.bad | dilate_mask(labels > 0, radius=2.0 * fwhm)
            hf = psf_fit_half_size(images.psf, fit_radius_fwhm=fit_radius_fwhm, fwhm=images.fwhm)
            centre = (np.array([images.psf.x_center]), np.array([images.psf.y_center]))
            kernel = model_stamps(images.psf, *centre, hf, offset=images.offset)[0][0]
            circle = disk(r_ap).astype(np.float64)
            correlation = noise_autocorrelation(images.data, images.var, empty)
            factors[band] = {
                "psf": correlation_factor(correlation, kernel),
                "ap": correlation_factor(correlation, circle),
            }
        res = measure_band(images, ents, x0, y0, centroid=True, aperture_radii=(), **common)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr1[band] = res["psf_flux"] / (res["psf_flux_err"] * factors[band]["psf"])
        clean1[band] = ~(res["psf_flag"] | res["centroid_flag"] | res["edge"] | res["center_bad"])
        centroids[band] = (res["x"], res["y"], res["centroid_flag"])
        del images
    priority = [b for b in ref_band_priority if b in present]
    priority += [b for b in present if b not in priority]
    ref_index, fallback = _choose_ref_band(priority, snr1, clean1, n, min_ref_snr)
    x_ref, y_ref = x0.copy(), y0.copy()
    for k, band in enumerate(priority):
        cx, cy, cflag = centroids[band]
        take = (ref_index == k) & ~cflag
        x_ref[take], y_ref[take] = cx[take], cy[take]
    ref_band = np.asarray(priority, dtype=object)[ref_index]
    duplicates = _converged_children(
        ents,
        x_ref,
        y_ref,
        snr1,
        ref_index,
        priority,
        min_separation=min_child_separation_fwhm * fwhm,
    )
    if duplicates.size:
        # Two peaks of one parent whose children centroid onto the same place are one
        # source split in two (each would get part of its flux, and forced photometry
        # could not separate them): deblend again without the fainter peak.
        log.info(
            "%d deblended children converged onto a sibling; deblending again", duplicates.size
        )
        keep = np.ones(len(merged), dtype=bool)
        keep[ents["peak"][duplicates]] = False
        return measure_objects(
            coadds,
            merged[keep].reset_index(drop=True),
            tract=tract,
            patch=patch,
            skymap=skymap,
            ref_band_priority=ref_band_priority,
            id_base=id_base,
            bands=bands,
            coadd_psfs=coadd_psfs,
            min_child_separation_fwhm=min_child_separation_fwhm,
            ap_flux_radius_arcsec=ap_flux_radius_arcsec,
            calib_aperture_radius_arcsec=calib_aperture_radius_arcsec,
            min_ref_snr=min_ref_snr,
            fit_radius_fwhm=fit_radius_fwhm,
            max_masked_fraction=max_masked_fraction,
            max_children=max_children,
            max_deblend_pixels=max_deblend_pixels,
            correct_noise_correlation=correct_noise_correlation,
            aperture_correction=aperture_correction,
            min_apcorr_snr=min_apcorr_snr,
            min_apcorr_stars=min_apcorr_stars,
            seed=seed,
        )

    # Pass 2, forced: every band at the reference position.
    columns: dict[str, np.ndarray] = {}
    band_flags: dict[str, np.ndarray] = {}
    shapes = {key: np.full(n, np.nan) for key in ("shape_xx", "shape_yy", "shape_xy")}
    ref_ext = np.full(n, np.nan)
    apcorr_at_centre: dict[str, float] = {}
    apcorr_source: dict[str, str] = {}
    for band in all_bands:
        flags = np.zeros(n, dtype=np.int64)
        if band not in coadds:
            for col in ("psfFlux", "psfFluxErr", "apFlux", "apFluxErr", "extendedness"):
                columns[f"{band}_{col}"] = np.full(n, np.nan)
            for col in ("psfFlux_flag", "apFlux_flag"):
                columns[f"{band}_{col}"] = np.ones(n, dtype=bool)
            columns[f"{band}_detected"] = np.zeros(n, dtype=bool)
            band_flags[band] = flags | int(
                ObjectFlag.NO_COADD
                | ObjectFlag.NOT_DETECTED
                | ObjectFlag.PSF_FLUX_FAILED
                | ObjectFlag.AP_FLUX_FAILED
                | ObjectFlag.EXTENDEDNESS_FAILED
            )
            continue
        images = BandImages(
            coadds[band],
            labels,
            ents,
            px,
            py,
            seed=[*id_seed, present.index(band)],
            fwhm=fwhms[band],
            shares=shares.pop(band),
            coadd_psf=exact.get(band),
        )
        res = measure_band(
            images, ents, x_ref, y_ref, centroid=False, aperture_radii=(r_ap,), **common
        )
        f_psf, f_ap = factors[band]["psf"], factors[band]["ap"]
        flux, err = res["psf_flux"], res["psf_flux_err"] * f_psf
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = flux / err
        ext = _extendedness(
            res["ext_ratio"], res["ext_ratio_err"] * f_psf, snr, ~res["psf_flag"] & (flux > 0)
        )
        propagated = exact.get(band)
        if propagated is not None and propagated.aperture_corrections is None:
            propagated = None
        if aperture_correction and propagated is not None:
            # The inputs' own corrections, weighted as the coadd weighted them: the
            # coadd's calibration is theirs, so nothing is re-measured on it.
            ratio = propagated.aperture_correction_at(x_ref, y_ref)
            known = np.isfinite(ratio)
            flux = np.where(known, flux * ratio, flux)
            err = np.where(known, err * ratio, err)
            flags |= np.where(known, 0, int(ObjectFlag.APCORR_FAILED))
            centre = propagated.aperture_correction_at(
                np.array([(nx - 1) / 2.0]), np.array([(ny - 1) / 2.0])
            )[0]
            if np.isfinite(centre):
                apcorr_at_centre[band] = float(centre)
            apcorr_source[band] = "inputs"
        elif aperture_correction:
            apcorr_source[band] = "coadd"
            cand = np.flatnonzero(
                (ents["kind"] == KIND_ISOLATED)
                & (ents["flags"] == 0)
                & (ext == 0)
                & (snr > min_apcorr_snr)
                & ~res["psf_flag"]
                & ~res["edge"]
                & ~res["center_bad"]
                & ~res["center_sat"]
            )
            corrected = False
            if cand.size >= min_apcorr_stars:
                cal = measure_band(
                    images,
                    ents,
                    x_ref,
                    y_ref,
                    centroid=False,
                    aperture_radii=(r_cal,),
                    which=cand,
                    **common,
                )
                ok = ~cal[f"ap_{r_cal}_flag"]
                if ok.sum() >= min_apcorr_stars:
                    try:
                        apcorr = fit_aperture_correction(
                            x_ref[cand][ok],
                            y_ref[cand][ok],
                            flux[cand][ok],
                            err[cand][ok],
                            cal[f"ap_{r_cal}"][ok],
                            cal[f"ap_{r_cal}_err"][ok] * f_ap,
                            x_center=(nx - 1) / 2.0,
                            y_center=(ny - 1) / 2.0,
                            x_scale=nx / 2.0,
                            y_scale=ny / 2.0,
                        )
                        flux, err = apcorr.apply(x_ref, y_ref, flux, err)
                        centre_ratio = apcorr.ratio_at(
                            np.array([(nx - 1) / 2.0]), np.array([(ny - 1) / 2.0])
                        )
                        apcorr_at_centre[band] = float(centre_ratio[0][0])
                        corrected = True
                    except ValueError:
                        pass
            if not corrected:
                flags |= int(ObjectFlag.APCORR_FAILED)
                log.warning("band %s: too few stars for the coadd aperture correction", band)
        detected = ents["detected"][:, present.index(band)]
        ap_flag = res[f"ap_{r_ap}_flag"]
        cflag = centroids[band][2]
        for bit, where in (
            (ObjectFlag.NOT_DETECTED, ~detected),
            (ObjectFlag.PSF_FLUX_FAILED, res["psf_flag"]),
            (ObjectFlag.AP_FLUX_FAILED, ap_flag),
            (ObjectFlag.CENTROID_FAILED, cflag),
            (ObjectFlag.EDGE, res["edge"]),
            (ObjectFlag.NO_DATA_CENTER, res["center_bad"]),
            (ObjectFlag.MASKED, res["masked"]),
            (ObjectFlag.SATURATED_CENTER, res["center_sat"]),
            (ObjectFlag.SHAPE_FAILED, res["shape_flag"]),
            (ObjectFlag.EXTENDEDNESS_FAILED, ~np.isfinite(ext)),
        ):
            flags |= np.where(where, int(bit), 0)
        band_flags[band] = flags
        columns[f"{band}_psfFlux"] = flux
        columns[f"{band}_psfFluxErr"] = err
        columns[f"{band}_psfFlux_flag"] = res["psf_flag"]
        columns[f"{band}_apFlux"] = res[f"ap_{r_ap}"]
        columns[f"{band}_apFluxErr"] = res[f"ap_{r_ap}_err"] * f_ap
        columns[f"{band}_apFlux_flag"] = ap_flag
        columns[f"{band}_extendedness"] = ext
        columns[f"{band}_detected"] = detected
        is_ref = ref_band == band
        for key in shapes:
            shapes[key][is_ref] = res[key][is_ref]
        ref_ext[is_ref] = ext[is_ref]
        del images

    return _object_table(
        ents,
        columns,
        band_flags,
        shapes,
        ref_ext,
        ref_band,
        fallback,
        x_ref,
        y_ref,
        all_bands=all_bands,
        wcs=wcs,
        origin=first.origin,
        tract=tract,
        patch=patch,
        skymap=skymap,
        id_base=id_base,
        attrs={
            "noise_correlation_factor": factors,
            "aperture_correction": apcorr_at_centre,
            "aperture_correction_source": apcorr_source,
        },
    )


def _object_table(
    ents,
    columns,
    band_flags,
    shapes,
    ref_ext,
    ref_band,
    fallback,
    x_ref,
    y_ref,
    *,
    all_bands,
    wcs,
    origin,
    tract,
    patch,
    skymap,
    id_base,
    attrs,
):
    """Assemble the Object table (CONTRACT columns first)."""
    n = len(ents["kind"])
    object_id = int(id_base) + 1 + np.arange(n, dtype=np.int64)
    parent_id = np.where(ents["parent"] >= 0, object_id[np.maximum(ents["parent"], 0)], 0)
    if n:
        ra, dec = wcs.all_pix2world(x_ref, y_ref, 0)
    else:
        ra = dec = np.zeros(0)
    ra, dec = np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)
    if patch is not None:
        ox, oy = int(patch.outer_bbox[0]), int(patch.outer_bbox[1])
        bx, by, bnx, bny = (int(v) for v in patch.inner_bbox)
        bx, by = bx - ox, by - oy
        patch_inner = (x_ref >= bx - 0.5) & (x_ref < bx + bnx - 0.5)
        patch_inner &= (y_ref >= by - 0.5) & (y_ref < by + bny - 0.5)
    else:
        ox, oy = int(origin[0]), int(origin[1])
        patch_inner = np.ones(n, dtype=bool)
    tract_id = tract.tract if tract is not None else (patch.tract if patch is not None else -1)
    if tract is not None:
        tract_inner = np.asarray(tract.in_inner_region(ra, dec), dtype=bool)
    elif skymap is not None and patch is not None:
        tract_inner = np.asarray(skymap.find_tracts(ra, dec)) == patch.tract
    else:
        tract_inner = np.ones(n, dtype=bool)
    is_parent = ents["kind"] == KIND_PARENT
    flags = ents["flags"] | np.where(fallback, int(ObjectFlag.REF_BAND_FALLBACK), 0)
    ref_flags = np.zeros(n, dtype=np.int64)
    for band in set(ref_band.tolist()):
        sel = ref_band == band
        ref_flags[sel] = band_flags[band][sel] & _MEASUREMENT_BITS
    table = {
        "objectId": object_id,
        "tract": np.full(n, int(tract_id), dtype=np.int64),
        "patch": np.full(n, int(patch.patch) if patch is not None else -1, dtype=np.int64),
        "ra": ra,
        "dec": dec,
        "detect_isPrimary": patch_inner & tract_inner & ~is_parent,
        "refBand": pd.Series(ref_band, dtype=object).to_numpy(),
        "refExtendedness": ref_ext,
    }
    for band in all_bands:
        for col in ("psfFlux", "psfFluxErr", "apFlux", "apFluxErr"):
            table[f"{band}_{col}"] = columns[f"{band}_{col}"]
    table.update(
        {
            "x": x_ref + ox,
            "y": y_ref + oy,
            "detect_isPatchInner": patch_inner,
            "detect_isTractInner": tract_inner,
            "parentObjectId": parent_id,
            "deblend_nChild": ents["n_child"],
            "flags": flags | ref_flags,
            **shapes,
        }
    )
    for band in all_bands:
        for col in ("psfFlux_flag", "apFlux_flag", "extendedness", "detected"):
            table[f"{band}_{col}"] = columns[f"{band}_{col}"]
        table[f"{band}_flags"] = band_flags[band]
    out = pd.DataFrame(table)
    out.attrs.update(attrs)
    return out
