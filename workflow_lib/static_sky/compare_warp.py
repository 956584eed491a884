"""Artifact rejection by comparing PSF-matched warps (LSST's CompareWarpAssembleCoadd).

Internals of :mod:`workflow_lib.static_sky.coadd`. In a strip, the PSF-matched warps
(one model PSF for all) give a robust per-pixel reference; each warp's
difference from it is smoothed with a Gaussian of the model PSF (a matched
filter), divided by its white-noise expectation and by the warp's measured
noise correlation, and thresholded; candidates are grown, and kept as
artifacts only where a minority of the epochs covering the pixel has them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from workflow_lib.core.exposure import MaskPlanes
from workflow_lib.static_sky.coadd_inputs import PreparedInput, Stack, read_stack, sample_row_ranges


def gaussian_1d(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def smooth(z: np.ndarray, kernel_1d: np.ndarray) -> np.ndarray:
    """Separable convolution of a 2-d array, zero outside (no data beyond the edge)."""
    out = ndimage.correlate1d(z, kernel_1d, axis=0, mode="constant", cval=0.0)
    return ndimage.correlate1d(out, kernel_1d, axis=1, mode="constant", cval=0.0)


def grow(flags: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a boolean image by a square of half-side ``radius`` (zero outside)."""
    if radius <= 0:
        return flags
    m = flags.view(np.uint8)
    m = ndimage.maximum_filter1d(m, 2 * radius + 1, axis=0, mode="constant", cval=0)
    m = ndimage.maximum_filter1d(m, 2 * radius + 1, axis=1, mode="constant", cval=0)
    return m.astype(bool)


@dataclass(frozen=True)
class Reference:
    """The robust reference of a strip and what entered it."""

    centre: np.ndarray  # (rows, nx)
    kept: np.ndarray  # (L, rows, nx): layer pixels inside the final clip
    total: np.ndarray  # sum of kept weights
    variance: np.ndarray  # of the centre
    spans: list[slice]  # per layer, the columns it occupies


@dataclass(frozen=True)
class RejectionParams:
    """Settings of the rejection (see ``assemble_coadd``); ``smoothing`` is the 1-d
    Gaussian of the model PSF, ``grow_radius`` in pixels, ``n_iter`` clip iterations."""

    clip_sigma: float
    detect_sigma: float
    model_error: float
    max_num_epochs: int
    max_fraction_epochs_low: float
    max_fraction_epochs_high: float
    smoothing: np.ndarray
    grow_radius: int
    n_iter: int = 2


def robust_reference(stack: Stack, params: RejectionParams) -> Reference:
    """Per-pixel reference: median-seeded, sigma-clipped weighted mean of the layers.

    The clip uses each input's own variance plus a fractional model error
    (PSF-matching residuals of bright stars), so no noise estimate from few
    inputs is needed. Float32 throughout: this is a detection reference.
    """
    n_layers = stack.image.shape[0]
    valid = stack.valid
    spans = stack.spans()
    n_valid = valid.sum(axis=0)
    ordered = np.sort(np.where(valid, stack.image, np.float32(np.nan)), axis=0)  # NaN last
    lo = np.clip((n_valid - 1) // 2, 0, max(n_layers - 1, 0))
    hi = np.clip(n_valid // 2, 0, max(n_layers - 1, 0))
    median = np.float32(0.5) * (
        np.take_along_axis(ordered, lo[None], 0)[0] + np.take_along_axis(ordered, hi[None], 0)[0]
    )
    del ordered
    median = np.where(n_valid > 0, median, np.float32(0.0))
    centre = median
    k2 = np.float32(params.clip_sigma**2)
    kept = np.zeros_like(valid)
    total = np.zeros(median.shape, np.float32)
    for _ in range(params.n_iter):
        num = np.zeros(median.shape, np.float32)
        total = np.zeros(median.shape, np.float32)
        tol2 = (np.float32(params.model_error) * centre) ** 2
        for layer, cs in enumerate(spans):
            img = stack.image[layer, :, cs]
            tolerance = k2 * (stack.variance[layer, :, cs] + tol2[:, cs])
            keep = valid[layer, :, cs] & ((img - centre[:, cs]) ** 2 <= tolerance)
            kept[layer, :, cs] = keep
            w = np.where(keep, stack.weight[layer, :, cs], np.float32(0.0))
            num[:, cs] += w * img
            total[:, cs] += w
        centre = np.where(total > 0, num / np.where(total > 0, total, 1.0), median)
    var_centre = np.zeros(median.shape, np.float32)
    for layer, cs in enumerate(spans):
        w = np.where(kept[layer, :, cs], stack.weight[layer, :, cs], np.float32(0.0))
        var_centre[:, cs] += w * w * stack.variance[layer, :, cs]
    var_centre = np.where(total > 0, var_centre / np.where(total > 0, total, 1.0) ** 2, 0.0)
    return Reference(centre, kept, total, var_centre.astype(np.float32), spans)


def max_epochs(n_epochs: np.ndarray, params: RejectionParams) -> np.ndarray:
    """Most epochs an artifact may appear in and still be rejected (LSST's broken line)."""
    low = params.max_fraction_epochs_low * n_epochs
    high = params.max_num_epochs + params.max_fraction_epochs_high * n_epochs
    return np.floor(np.minimum(low, high) + 1e-9).astype(np.int32)


def difference_z(
    stack: Stack, layer: int, ref: Reference, params: RejectionParams, cs: slice
) -> np.ndarray:
    """S/N of (layer - reference) over columns ``cs``, 0 where the layer has no valid pixel."""
    valid = stack.valid[layer, :, cs]
    var = stack.variance[layer, :, cs]
    total = ref.total[:, cs]
    centre = ref.centre[:, cs]
    # Variance of (input - reference): the input is part of the reference if kept.
    share = np.where(
        ref.kept[layer, :, cs], stack.weight[layer, :, cs] / np.where(total > 0, total, 1.0), 0.0
    )
    var_diff = np.maximum(var * (1.0 - 2.0 * share) + ref.variance[:, cs], 0.05 * var)
    var_diff += (np.float32(params.model_error) * centre) ** 2
    diff = stack.image[layer, :, cs] - centre
    return np.divide(diff, np.sqrt(var_diff), out=np.zeros_like(diff), where=valid)


def padded_span(cs: slice, pad: int, nx: int) -> slice:
    return slice(max(0, cs.start - pad), min(nx, cs.stop + pad))


def estimate_noise_correlation(
    rejection: list[PreparedInput],
    shape: tuple[int, int],
    planes: MaskPlanes,
    params: RejectionParams,
    sample_rows: int | None,
) -> None:
    """Each rejection input's noise correlation: robust scatter of its smoothed difference S/N.

    PSF matching and resampling correlate the noise of a warp, so its
    smoothed S/N scatters more than the white-noise prediction; the ratio
    is measured on the input's difference from the reference (sources
    cancel) over evenly spaced row blocks of the coadd, the same blocks
    whatever the strip size. Inputs with too few sampled pixels get the
    median of the others.
    """
    ny, nx = shape
    radius = params.smoothing.size // 2
    white = float((params.smoothing**2).sum())
    values: dict[int, list[np.ndarray]] = {}
    for b0, b1 in sample_row_ranges(ny, sample_rows, max(32, 4 * radius + 16)):
        stack = read_stack(rejection, b0, b1, nx, planes, with_mask=False)
        if not stack.image.shape[0]:
            continue
        reference = robust_reference(stack, params)
        inside: np.ndarray = np.zeros(stack.image.shape[1:], bool)  # stubs: 0-d from shape[1:]
        inside[radius : inside.shape[0] - radius] = True
        # A lone epoch's difference from itself is zero: only where others overlap it.
        shared = stack.valid.sum(axis=0) >= 2
        for layer, span in enumerate(reference.spans):
            cs = padded_span(span, radius, nx)
            valid = stack.valid[layer, :, cs] & shared[:, cs]
            if not valid.any():
                continue
            smoothed = smooth(difference_z(stack, layer, reference, params, cs), params.smoothing)
            full = inside[:, cs] & (smooth(valid.astype(np.float32), params.smoothing) > 0.999)
            for index, lay, rs, rcs in stack.regions:
                if lay == layer:
                    sub = (rs, slice(rcs.start - cs.start, rcs.stop - cs.start))
                    values.setdefault(index, []).append(smoothed[sub][full[sub]])
    measured = {}
    for index, chunks in values.items():
        v = np.concatenate(chunks)
        if v.size >= 200:
            mad = 1.4826 * float(np.median(np.abs(v - np.median(v))))
            measured[index] = float(np.clip(mad / white, 0.5, 20.0))
    fallback = float(np.median(list(measured.values()))) if measured else 1.0
    for p in rejection:
        p.noise_correlation = measured.get(p.index, fallback)


# Per rejection input in a strip's core rows: (rows, cols, valid, rejected).
Verdict = tuple[slice, slice, np.ndarray, np.ndarray]


def find_artifacts(
    stack: Stack, prepared: list[PreparedInput], core: slice, params: RejectionParams
) -> dict[int, Verdict]:
    """Valid and rejected pixels of each rejection input in the strip's core rows.

    A pixel of a layer is an artifact candidate where the PSF-smoothed S/N
    of its difference from the reference exceeds ``detect_sigma`` (grown by
    ``grow_radius``); it is rejected if at most ``max_epochs(N)`` of the N
    epochs covering that pixel are candidates there, so what most epochs
    share (stars, PSF-matching residuals common to all) is never rejected.
    """
    reference = robust_reference(stack, params)
    nx = stack.image.shape[2]
    pad = params.smoothing.size // 2
    white = np.float32((params.smoothing**2).sum())
    grown = np.zeros_like(stack.valid)
    for layer, span in enumerate(reference.spans):
        cs = padded_span(span, pad + params.grow_radius, nx)
        valid = stack.valid[layer, :, cs]
        if not valid.any():
            continue
        z = difference_z(stack, layer, reference, params, cs)
        for index, lay, rs, rcs in stack.regions:
            if lay == layer:  # each input's own noise correlation
                sub = (rs, slice(rcs.start - cs.start, rcs.stop - cs.start))
                z[sub] /= np.float32(prepared[index].noise_correlation)
        significance = smooth(z, params.smoothing) / white
        candidates = (np.abs(significance) > params.detect_sigma) & valid
        if candidates.any():
            grown[layer, :, cs] = grow(candidates, params.grow_radius) & valid
    if grown.any():
        n_epochs = stack.valid.sum(axis=0)
        grown &= (grown.sum(axis=0) <= max_epochs(n_epochs, params))[None]
    found: dict[int, Verdict] = {}
    for index, layer, rs, cs in stack.regions:
        lo, hi = max(rs.start, core.start), min(rs.stop, core.stop)
        if hi > lo:
            rows = slice(lo - core.start, hi - core.start)
            found[index] = (rows, cs, stack.valid[layer, lo:hi, cs], grown[layer, lo:hi, cs])
    return found
