"""Coadds: weighted mean of warps with artifact rejection, the coadd PSF, template selection.

``assemble_coadd`` follows LSST's CompareWarpAssembleCoadd. Artifacts
(transients, cosmic rays, satellite trails) are found on *PSF-matched* warps,
which all share one model PSF, so a star looks the same in every one of them
whatever the seeing of its visit: each warp is compared with a robust
reference (median-seeded, sigma-clipped weighted mean) and the significant
parts of its difference, if they appear in only a minority of the epochs
covering a pixel, are rejected. The coadd itself is then a plain weighted mean
of the *direct* warps without those pixels, so bright-star cores of visits
with different seeing are never clipped and the coadd PSF (the same weighted
mean of the input PSFs) describes the stars.

Everything is done in row strips: memory is bounded by strip rows x patch
width x the number of overlapping inputs, never by the patch area times the
number of inputs. Inputs implement :class:`WarpInput` (an in-memory one here,
a FITS-backed one in ``workflow_lib.io.warp_input``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage

from workflow_lib.coadd_psf import COVERAGE_DTYPE, CoaddPsf, block_sums, build_coadd_psf
from workflow_lib.exposure import MASK_DTYPE, Exposure, MaskPlanes, PhotoCalib
from workflow_lib.flags import CcdVisitFlag
from workflow_lib.psf import PsfModel, fwhm_of_image

log = logging.getLogger(__name__)

# Input pixels with these planes never enter the coadd (LSST's badMaskPlanes).
DEFAULT_BAD_MASK_PLANES: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "SUSPECT", "EDGE")
# Planes of used inputs that are not ORed into the coadd mask: detection planes
# belong to the coadd's own detection; the others are set here by the assembly.
NOT_PROPAGATED_PLANES: tuple[str, ...] = (
    "DETECTED", "DETECTED_NEGATIVE", "NOT_DEBLENDED",
    "CLIPPED", "REJECTED", "SENSOR_EDGE", "INEXACT_PSF",
)  # fmt: skip
# A bad plane is set in the coadd where the inputs it excluded carry at least
# this fraction of the pixel's covering weight (LSST's maskPropagationThresholds).
DEFAULT_MASK_PROPAGATION: dict[str, float] = {"SAT": 0.1}

# CcdVisit flags that make a calexp unusable for any coadd.
UNUSABLE_CCD_FLAGS = int(
    CcdVisitFlag.FAILED
    | CcdVisitFlag.BAD_IMAGE
    | CcdVisitFlag.PSF_FAILED
    | CcdVisitFlag.ASTROMETRY_FAILED
    | CcdVisitFlag.PHOTOCAL_FAILED
)

VISIT_KEYS = ("VISIT", "EXPID")
DETECTOR_KEYS = ("DETECTOR", "CCDNUM")
BAND_KEYS = ("BAND", "FILTER")
MJD_KEYS = ("MJD", "MJD-MID", "MJD-OBS")
# Bytes held per (layer, row, column) of a strip: stacks plus temporaries.
_BYTES_PER_DIRECT = 48
_BYTES_PER_REJECTION = 64


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WarpRows:
    """Rows of a warp: image and variance (float32, image units) and mask (int32)."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray


@runtime_checkable
class WarpInput(Protocol):
    """A warp onto the coadd's pixel grid, cropped to its overlap with it.

    ``origin`` is the (x0, y0) of the warp's pixel [0, 0] in the coadd frame;
    ``psf`` is in the warp's own pixels; ``read_rows(y0, y1)`` returns rows
    ``y0:y1`` of the warp's own frame, mask bits in ``mask_planes``.
    """

    @property
    def visit(self) -> int: ...
    @property
    def detector(self) -> int: ...
    @property
    def origin(self) -> tuple[int, int]: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def psf(self) -> PsfModel | None: ...
    @property
    def photo_calib(self) -> PhotoCalib | None: ...
    @property
    def metadata(self) -> fits.Header: ...
    @property
    def mask_planes(self) -> MaskPlanes: ...
    def read_rows(self, y0: int, y1: int) -> WarpRows: ...


def header_value(header: Mapping[str, object], keys: Sequence[str]) -> object | None:
    """The first of ``keys`` present in ``header`` (None if none is)."""
    for key in keys:
        if key in header and header[key] is not None:
            return header[key]
    return None


def warp_ids(header: Mapping[str, object]) -> tuple[int, int]:
    """(visit, detector) from a warp or calexp header (VISIT or EXPID, DETECTOR)."""
    visit, detector = header_value(header, VISIT_KEYS), header_value(header, DETECTOR_KEYS)
    if visit is None or detector is None:
        raise ValueError("warp header has no VISIT/EXPID or DETECTOR card")
    return int(visit), int(detector)  # type: ignore[call-overload]


class ExposureWarpInput:
    """A :class:`WarpInput` over an in-memory :class:`Exposure` (rows are views)."""

    def __init__(
        self, exposure: Exposure, *, visit: int | None = None, detector: int | None = None
    ) -> None:
        self.exposure = exposure
        if visit is None or detector is None:
            header_visit, header_detector = warp_ids(exposure.metadata)
            visit = header_visit if visit is None else visit
            detector = header_detector if detector is None else detector
        self.visit = int(visit)
        self.detector = int(detector)

    @property
    def origin(self) -> tuple[int, int]:
        return (int(self.exposure.origin[0]), int(self.exposure.origin[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self.exposure.shape

    @property
    def psf(self) -> PsfModel | None:
        return self.exposure.psf

    @property
    def photo_calib(self) -> PhotoCalib | None:
        return self.exposure.photo_calib

    @property
    def metadata(self) -> fits.Header:
        return self.exposure.metadata

    @property
    def mask_planes(self) -> MaskPlanes:
        return self.exposure.mask_planes

    def read_rows(self, y0: int, y1: int) -> WarpRows:
        e = self.exposure
        return WarpRows(e.image[y0:y1], e.variance[y0:y1], e.mask[y0:y1])


# --------------------------------------------------------------------------
# Template selection
# --------------------------------------------------------------------------


def select_template_ccd_visits(
    ccd_visits: pd.DataFrame,
    *,
    band: str,
    mjd_min: float | None,
    mjd_max: float | None,
    max_psf_fwhm: float | None,
    max_images: int | None,
    min_psf_fwhm: float | None = None,
    per_detector: bool = True,
    exclude_flags: int = UNUSABLE_CCD_FLAGS,
) -> pd.DataFrame:
    """CcdVisit rows (calexps) chosen for a template coadd, best seeing first.

    dia_pipe's TimeBestSeeingWcsSelectImagesTask: among the calexps of
    ``band`` (pass only those overlapping the patch) taken within
    [``mjd_min``, ``mjd_max``] (``midpointMjdTai``, inclusive, None = open)
    whose PSF FWHM (``seeing``, arcsec) is <= ``max_psf_fwhm`` (and >=
    ``min_psf_fwhm``), keep the ``max_images`` with the smallest FWHM (None =
    all). As in dia_pipe the unit is the calexp (one CCD of a visit), so a
    visit's best CCDs may be chosen and its worse ones not.
    ``per_detector=False`` ranks whole visits instead (LSST's Gen3
    BestSeeingSelectVisitsTask): a visit's FWHM and MJD are the medians over
    its rows, ``max_images`` counts visits and all their rows are returned.
    Rows with ``exclude_flags`` bits set (failed calexps) or no seeing are
    never chosen.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    rows = ccd_visits[ccd_visits["band"].astype(str) == str(band)]
    usable = np.isfinite(rows["seeing"].to_numpy(dtype=np.float64))
    if "flags" in rows:
        usable &= (rows["flags"].to_numpy(dtype=np.int64) & int(exclude_flags)) == 0
    rows = rows[usable]
    if per_detector:
        units = rows.assign(_unit=np.arange(len(rows)))
    else:
        units = rows.assign(_unit=rows["visit"].to_numpy())
    per_unit = units.groupby("_unit").agg(
        seeing=("seeing", "median"), mjd=("midpointMjdTai", "median"), visit=("visit", "min")
    )
    keep = np.ones(len(per_unit), dtype=bool)
    seeing = per_unit["seeing"].to_numpy(dtype=np.float64)
    mjd = per_unit["mjd"].to_numpy(dtype=np.float64)
    if max_psf_fwhm is not None:
        keep &= seeing <= max_psf_fwhm
    if min_psf_fwhm is not None:
        keep &= seeing >= min_psf_fwhm
    if mjd_min is not None:
        keep &= mjd >= mjd_min
    if mjd_max is not None:
        keep &= mjd <= mjd_max
    # Ties broken by visit then row order, so the choice is reproducible.
    ranked = per_unit[keep].sort_values(["seeing", "visit"], kind="mergesort")
    if max_images is not None:
        ranked = ranked.head(int(max_images))
    chosen = units[units["_unit"].isin(ranked.index)]
    order = {unit: rank for rank, unit in enumerate(ranked.index)}
    chosen = chosen.assign(_rank=chosen["_unit"].map(order))
    chosen = chosen.sort_values(["_rank", "seeing", "detector"], kind="mergesort")
    log.info(
        "template selection: %d of %d %s (%s)", len(ranked), len(per_unit),
        "calexps" if per_detector else "visits",
        f"FWHM {ranked['seeing'].min():.3f}-{ranked['seeing'].max():.3f} arcsec"
        if len(ranked) else "none",
    )  # fmt: skip
    return chosen.drop(columns=["_unit", "_rank"])


def select_template_visits(
    ccd_visits: pd.DataFrame,
    *,
    band: str,
    mjd_min: float | None,
    mjd_max: float | None,
    max_psf_fwhm: float | None,
    max_images: int | None,
    **kwargs: object,
) -> list[int]:
    """Visits of :func:`select_template_ccd_visits`, ascending.

    With the default per-calexp selection a visit is listed when any of its
    CCDs is chosen; the template coadd should use the chosen (visit,
    detector) pairs of :func:`select_template_ccd_visits`, not every CCD of
    these visits.
    """
    chosen = select_template_ccd_visits(
        ccd_visits, band=band, mjd_min=mjd_min, mjd_max=mjd_max,
        max_psf_fwhm=max_psf_fwhm, max_images=max_images, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return sorted({int(v) for v in chosen["visit"]})


# --------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------


@dataclass
class CoaddResult:
    """A coadd, the table of its inputs, the number of inputs used per pixel, its PSF.

    ``exposure.psf`` is the smooth POLYPIX fit; ``coadd_psf`` evaluates the
    exact weighted mean of the input PSFs anywhere (:mod:`workflow_lib.coadd_psf`).
    """

    exposure: Exposure
    inputs: pd.DataFrame
    n_image: np.ndarray
    coadd_psf: CoaddPsf | None = None


@dataclass
class _Input:
    """One input as the assembly sees it: clipped bbox in the coadd, weight, layer."""

    source: WarpInput
    index: int
    x0: int  # origin in the coadd frame
    y0: int
    bx0: int  # the part of it inside the coadd, coadd frame
    bx1: int
    by0: int
    by1: int
    scale: float  # nJy per image unit
    bad_bits: int  # in the input's own mask bits
    no_data_bits: int
    edge_bits: int
    translate: bool  # mask bits differ from the coadd's
    weight: float = 0.0
    mean_variance: float = float("nan")
    noise_correlation: float = 1.0
    layer: int = -1

    def overlaps_rows(self, y0: int, y1: int) -> bool:
        return self.by0 < y1 and self.by1 > y0 and self.bx1 > self.bx0


@dataclass
class _Stack:
    """Inputs of one strip packed into non-overlapping layers (L, rows, nx)."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray  # coadd mask bits
    weight: np.ndarray  # input weight where covered (not NO_DATA), else 0
    valid: np.ndarray  # usable pixel: covered, finite, variance > 0, no bad plane
    regions: list[tuple[int, int, slice, slice]]  # (input index, layer, rows, cols)


def _clipped_mean(values: np.ndarray, *, n_sigma: float = 3.0, n_iter: int = 3) -> float:
    """Sigma-clipped mean (afw's MEANCLIP): start from the median and the IQR width."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    q25, centre, q75 = np.percentile(values, [25.0, 50.0, 75.0])
    sigma = 0.7413 * (q75 - q25)
    for _ in range(n_iter):
        if not sigma > 0:
            break
        kept = values[np.abs(values - centre) <= n_sigma * sigma]
        if kept.size == 0:
            break
        centre, sigma = float(kept.mean()), float(kept.std())
    return float(centre)


def _sample_row_ranges(ny: int, sample_rows: int | None, block: int) -> list[tuple[int, int]]:
    """Evenly spaced blocks of ``block`` rows, ``sample_rows`` in all (all rows if None)."""
    if sample_rows is None or ny <= max(sample_rows, block):
        return [(0, ny)]
    n_blocks = max(1, sample_rows // block)
    starts = np.unique(np.linspace(0, ny - block, n_blocks).astype(int))
    return [(int(s), int(s) + block) for s in starts]


def _gaussian_1d(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _smooth(z: np.ndarray, kernel_1d: np.ndarray) -> np.ndarray:
    """Separable convolution of a 2-d array, zero outside (no data beyond the edge)."""
    out = ndimage.correlate1d(z, kernel_1d, axis=0, mode="constant", cval=0.0)
    return ndimage.correlate1d(out, kernel_1d, axis=1, mode="constant", cval=0.0)


def _grow(flags: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a boolean image by a square of half-side ``radius`` (zero outside)."""
    if radius <= 0:
        return flags
    m = flags.view(np.uint8)
    m = ndimage.maximum_filter1d(m, 2 * radius + 1, axis=0, mode="constant", cval=0)
    m = ndimage.maximum_filter1d(m, 2 * radius + 1, axis=1, mode="constant", cval=0)
    return m.astype(bool)


def _prepare_inputs(
    sources: Sequence[WarpInput], shape: tuple[int, int], planes: MaskPlanes, bad: Sequence[str]
) -> list[_Input]:
    ny, nx = shape
    prepared = []
    for index, source in enumerate(sources):
        x0, y0 = (int(v) for v in source.origin)
        sy, sx = source.shape
        own = source.mask_planes
        calib = source.photo_calib
        scale = float(calib.njy_per_unit) if calib is not None else 1.0
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"input {index}: photometric scale {scale} is not positive")
        prepared.append(
            _Input(
                source=source,
                index=index,
                x0=x0,
                y0=y0,
                bx0=max(0, x0),
                bx1=min(nx, x0 + sx),
                by0=max(0, y0),
                by1=min(ny, y0 + sy),
                scale=scale,
                bad_bits=sum(1 << own.bits[p] for p in bad if p in own.bits),
                no_data_bits=(1 << own.bits["NO_DATA"]) if "NO_DATA" in own.bits else 0,
                edge_bits=(1 << own.bits["EDGE"]) if "EDGE" in own.bits else 0,
                translate=any(planes.bits.get(k) != v for k, v in own.bits.items()),
            )
        )
    return prepared


def _valid_pixels(p: _Input, rows: WarpRows) -> tuple[np.ndarray, np.ndarray]:
    """(covered, valid) of rows read from ``p``: covered = not NO_DATA."""
    mask = np.asarray(rows.mask)
    covered = (mask & p.no_data_bits) == 0
    valid = covered & ((mask & p.bad_bits) == 0)
    valid &= np.isfinite(rows.image) & np.isfinite(rows.variance) & (rows.variance > 0)
    return covered, valid


def _measure_input(p: _Input, *, sample_rows: int | None) -> None:
    """Weight = 1 / sigma-clipped mean variance, from evenly spaced blocks of rows.

    ``sample_rows`` rows in blocks of 16 (all rows if None): variance planes
    are smooth, and the estimate then costs a fraction of one read.
    """
    variances = []
    for r0, r1 in _sample_row_ranges(p.source.shape[0], sample_rows, 16):
        rows = p.source.read_rows(r0, r1)
        _, valid = _valid_pixels(p, rows)
        variances.append(np.asarray(rows.variance, dtype=np.float64)[valid] * p.scale**2)
    p.mean_variance = _clipped_mean(np.concatenate(variances) if variances else np.zeros(0))
    p.weight = 1.0 / p.mean_variance if p.mean_variance > 0 else 0.0


def _pack_layers(prepared: list[_Input]) -> int:
    """Give each input a layer in which no other input's bbox overlaps it; returns the count.

    Inputs are packed in (visit, detector) order, so a visit's CCDs share
    layers; the assignment is global, which makes every pixel's sums run
    over the same inputs in the same order whatever the strip size.
    """
    layers: list[list[_Input]] = []
    order = sorted(prepared, key=lambda p: (p.source.visit, p.source.detector, p.index))
    for p in order:
        if p.bx1 <= p.bx0 or p.by1 <= p.by0 or p.weight <= 0:
            continue
        for k, members in enumerate(layers):
            if all(
                q.bx1 <= p.bx0 or p.bx1 <= q.bx0 or q.by1 <= p.by0 or p.by1 <= q.by0
                for q in members
            ):
                members.append(p)
                p.layer = k
                break
        else:
            layers.append([p])
            p.layer = len(layers) - 1
    return len(layers)


def _read_stack(
    prepared: list[_Input], y0: int, y1: int, nx: int, planes: MaskPlanes, *, with_mask: bool
) -> _Stack:
    members = [p for p in prepared if p.layer >= 0 and p.overlaps_rows(y0, y1)]
    layer_ids = sorted({p.layer for p in members})
    position = {layer: k for k, layer in enumerate(layer_ids)}
    shape = (len(layer_ids), y1 - y0, nx)
    stack = _Stack(
        image=np.zeros(shape, np.float32),
        variance=np.zeros(shape, np.float32),
        mask=np.zeros(shape if with_mask else (0, 0, 0), MASK_DTYPE),
        weight=np.zeros(shape, np.float32),
        valid=np.zeros(shape, bool),
        regions=[],
    )
    for p in members:
        r0, r1 = max(y0, p.by0), min(y1, p.by1)
        rows = p.source.read_rows(r0 - p.y0, r1 - p.y0)
        cols = slice(p.bx0 - p.x0, p.bx1 - p.x0)
        rows = WarpRows(rows.image[:, cols], rows.variance[:, cols], rows.mask[:, cols])
        covered, valid = _valid_pixels(p, rows)
        layer = position[p.layer]
        rs, cs = slice(r0 - y0, r1 - y0), slice(p.bx0, p.bx1)
        stack.image[layer, rs, cs] = np.where(valid, rows.image * np.float32(p.scale), 0.0)
        stack.variance[layer, rs, cs] = np.where(valid, rows.variance * np.float32(p.scale**2), 0.0)
        stack.weight[layer, rs, cs] = np.where(covered, np.float32(p.weight), 0.0)
        stack.valid[layer, rs, cs] = valid
        if with_mask:
            mask = np.asarray(rows.mask, dtype=MASK_DTYPE)
            if p.translate:
                mask = p.source.mask_planes.translate(mask, planes)
            stack.mask[layer, rs, cs] = mask
        stack.regions.append((p.index, layer, rs, cs))
    return stack


@dataclass(frozen=True)
class _RejectionParams:
    clip_sigma: float
    detect_sigma: float
    model_error: float
    max_num_epochs: int
    max_fraction_epochs_low: float
    max_fraction_epochs_high: float
    smoothing: np.ndarray
    grow_radius: int
    n_iter: int = 3


def _robust_reference(stack: _Stack, params: _RejectionParams):  # type: ignore[no-untyped-def]
    """Per-pixel reference: median-seeded, sigma-clipped weighted mean of the layers.

    The clip uses each input's own variance plus a fractional model error
    (PSF-matching residuals of bright stars), so no noise estimate from few
    inputs is needed. Returns (centre, kept per layer, sum of kept weights,
    variance of the centre).
    """
    n_layers = stack.image.shape[0]
    valid = stack.valid
    n_valid = valid.sum(axis=0)
    ordered = np.sort(np.where(valid, stack.image, np.nan), axis=0)  # NaN last
    lo = np.clip((n_valid - 1) // 2, 0, max(n_layers - 1, 0))
    hi = np.clip(n_valid // 2, 0, max(n_layers - 1, 0))
    median = 0.5 * (
        np.take_along_axis(ordered, lo[None], 0)[0].astype(np.float64)
        + np.take_along_axis(ordered, hi[None], 0)[0]
    )
    del ordered
    median = np.where(n_valid > 0, median, 0.0)
    centre = median
    k2 = params.clip_sigma**2
    kept = np.zeros_like(valid)
    total = np.zeros(median.shape)
    for _ in range(params.n_iter):
        num = np.zeros(median.shape)
        total = np.zeros(median.shape)
        tol2 = (params.model_error * centre) ** 2
        for layer in range(n_layers):
            img = stack.image[layer]
            tolerance = k2 * (stack.variance[layer] + tol2)
            kept[layer] = valid[layer] & ((img - centre) ** 2 <= tolerance)
            w = np.where(kept[layer], stack.weight[layer], 0.0)
            num += w * img
            total += w
        centre = np.where(total > 0, num / np.where(total > 0, total, 1.0), median)
    var_centre = np.zeros(median.shape)
    for layer in range(n_layers):
        w = np.where(kept[layer], stack.weight[layer], 0.0)
        var_centre += w * w * stack.variance[layer]
    var_centre = np.where(total > 0, var_centre / np.where(total > 0, total, 1.0) ** 2, 0.0)
    return centre, kept, total, var_centre


def _max_epochs(n_epochs: np.ndarray, params: _RejectionParams) -> np.ndarray:
    """Most epochs an artifact may appear in and still be rejected (LSST's broken line)."""
    low = params.max_fraction_epochs_low * n_epochs
    high = params.max_num_epochs + params.max_fraction_epochs_high * n_epochs
    return np.floor(np.minimum(low, high) + 1e-9).astype(np.int32)


def _difference_z(stack: _Stack, layer: int, reference, params: _RejectionParams) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Per-pixel S/N of (layer - reference), 0 where the layer has no valid pixel."""
    centre, kept, total, var_centre = reference
    valid = stack.valid[layer]
    var = stack.variance[layer].astype(np.float64)
    # Variance of (input - reference): the input is part of the reference if kept.
    share = np.where(kept[layer], stack.weight[layer] / np.where(total > 0, total, 1.0), 0.0)
    var_diff = np.maximum(var * (1.0 - 2.0 * share) + var_centre, 0.05 * var)
    var_diff += (params.model_error * centre) ** 2
    return np.divide(
        stack.image[layer] - centre, np.sqrt(var_diff), out=np.zeros(centre.shape), where=valid
    )


def _estimate_noise_correlation(
    rejection: list[_Input], shape: tuple[int, int], planes: MaskPlanes,
    params: _RejectionParams, sample_rows: int | None,
) -> None:  # fmt: skip
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
    for b0, b1 in _sample_row_ranges(ny, sample_rows, max(32, 4 * radius + 16)):
        stack = _read_stack(rejection, b0, b1, nx, planes, with_mask=False)
        if not stack.image.shape[0]:
            continue
        reference = _robust_reference(stack, params)
        inside = np.zeros(stack.image.shape[1:], bool)
        inside[radius : inside.shape[0] - radius] = True
        for layer in range(stack.image.shape[0]):
            valid = stack.valid[layer]
            if not valid.any():
                continue
            smoothed = _smooth(_difference_z(stack, layer, reference, params), params.smoothing)
            full = inside & (_smooth(valid.astype(np.float64), params.smoothing) > 0.999)
            for index, lay, rs, cs in stack.regions:
                if lay == layer:
                    sel = full[rs, cs]
                    values.setdefault(index, []).append(smoothed[rs, cs][sel])
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
_Verdict = tuple[slice, slice, np.ndarray, np.ndarray]


def _find_artifacts(
    stack: _Stack, prepared: list[_Input], core: slice, params: _RejectionParams
) -> dict[int, _Verdict]:
    """Valid and rejected pixels of each rejection input in the strip's core rows.

    A pixel of a layer is an artifact candidate where the PSF-smoothed S/N
    of its difference from the reference exceeds ``detect_sigma`` (grown by
    ``grow_radius``); it is rejected if at most ``max_epochs(N)`` of the N
    epochs covering that pixel are candidates there, so what most epochs
    share (stars, PSF-matching residuals common to all) is never rejected.
    """
    reference = _robust_reference(stack, params)
    n_layers = stack.image.shape[0]
    white = float((params.smoothing**2).sum())
    correlation = np.ones(stack.image.shape[1:], np.float32)
    grown = np.zeros_like(stack.valid)
    for layer in range(n_layers):
        valid = stack.valid[layer]
        if not valid.any():
            continue
        z = _difference_z(stack, layer, reference, params)
        correlation[:] = 1.0
        for index, lay, rs, cs in stack.regions:
            if lay == layer:
                correlation[rs, cs] = prepared[index].noise_correlation
        significance = _smooth(z, params.smoothing) / (white * correlation)
        candidates = (np.abs(significance) > params.detect_sigma) & valid
        if candidates.any():
            grown[layer] = _grow(candidates, params.grow_radius) & valid
    if grown.any():
        n_epochs = stack.valid.sum(axis=0)
        grown &= (grown.sum(axis=0) <= _max_epochs(n_epochs, params))[None]
    found: dict[int, _Verdict] = {}
    for index, layer, rs, cs in stack.regions:
        lo, hi = max(rs.start, core.start), min(rs.stop, core.stop)
        if hi > lo:
            rows = slice(lo - core.start, hi - core.start)
            found[index] = (rows, cs, stack.valid[layer, lo:hi, cs], grown[layer, lo:hi, cs])
    return found


def _psf_fwhm(psf: PsfModel | None, shape: tuple[int, int]) -> float:
    if psf is None:
        return float("nan")
    try:
        kernel = psf.kernel_at((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
        return fwhm_of_image(kernel, oversample=4)
    except ValueError:
        return float("nan")


def _auto_strip_rows(
    n_direct: int, n_rejection: int, nx: int, halo: int, memory_limit_mb: float
) -> int:
    per_row = nx * (n_direct * _BYTES_PER_DIRECT + n_rejection * _BYTES_PER_REJECTION + 64)
    rows = int(memory_limit_mb * 2**20 / max(per_row, 1)) - 2 * halo
    return max(rows, 16, 2 * halo)


def assemble_coadd(
    inputs: Sequence[WarpInput],
    *,
    shape: tuple[int, int],
    wcs: WCS | None,
    rejection_inputs: Sequence[WarpInput] | None = None,
    clip_sigma: float = 3.0,
    do_interp: bool = False,
    detect_sigma: float = 5.0,
    model_error: float = 0.05,
    max_num_epochs: int = 2,
    max_fraction_epochs_low: float = 0.4,
    max_fraction_epochs_high: float = 0.03,
    grow_nsigma: float = 2.4,
    do_reject: bool = True,
    bad_mask_planes: Sequence[str] = DEFAULT_BAD_MASK_PLANES,
    mask_propagation: Mapping[str, float] | None = None,
    strip_rows: int | None = None,
    memory_limit_mb: float = 1024.0,
    weight_sample_rows: int | None = 512,
    psf_cell_size: int | None = None,
    psf_order: int = 3,
    psf_block: int = 8,
    origin: tuple[int, int] = (0, 0),
    metadata: fits.Header | None = None,
) -> CoaddResult:
    """Inverse-variance weighted mean of warps with CompareWarp artifact rejection.

    ``inputs``: warps on the coadd grid (``shape`` = (ny, nx), ``wcs`` of
    its 0-based pixels), images in nJy (times ``photo_calib.njy_per_unit``
    if set). ``rejection_inputs``: the PSF-matched warps of the same (visit,
    detector) for a deep coadd, on which artifacts are detected; None means
    the inputs themselves (a template coadd of PSF-matched warps).

    Each input's weight is 1 / its sigma-clipped mean variance (from
    ``weight_sample_rows`` rows; None = all). A rejection input's pixel is
    rejected where the PSF-smoothed S/N of its difference from a robust
    reference (``clip_sigma`` clipped mean, ``model_error`` fractional
    tolerance) exceeds ``detect_sigma``, grown by ``grow_nsigma`` PSF sigmas,
    and at most min(low N, max_num_epochs + high N) of the N epochs there
    are candidates (with N < 3 nothing can be rejected; the metadata say so).
    Pixels with ``bad_mask_planes`` never enter the coadd; ``mask_propagation``
    (default SAT: 0.1) sets a bad plane where the inputs it excluded carry
    that fraction of the covering weight. The coadd mask is the OR of the
    used inputs' other planes, plus NO_DATA (nothing used: image and
    variance NaN, or interpolated if ``do_interp``, which also sets INTRP),
    CLIPPED (an input rejected as artifact), REJECTED (an input excluded by
    a bad plane), SENSOR_EDGE (by EDGE) and INEXACT_PSF (any of those: the
    coadd PSF assumes all covering inputs). Variance = sum w^2 var / (sum w)^2.

    Rows are processed in strips of ``strip_rows`` (default: what fits in
    ``memory_limit_mb``); the result does not depend on the strip size.
    The coadd PSF (``coadd_psf``) knows, per ``psf_block`` x ``psf_block``
    block, the pixels each input contributed; its POLYPIX fit (``exposure.psf``,
    of ``psf_order``) uses cells of ``psf_cell_size`` pixels (default: a
    32nd of the patch, 16 to 128). See :mod:`workflow_lib.coadd_psf`.
    """
    ny, nx = (int(shape[0]), int(shape[1]))
    if not inputs:
        raise ValueError("assemble_coadd needs at least one input")
    planes = MaskPlanes()
    for name in (*bad_mask_planes, "CLIPPED", "REJECTED", "SENSOR_EDGE", "INEXACT_PSF", "INTRP"):
        planes.add(name)
    propagation = dict(DEFAULT_MASK_PROPAGATION if mask_propagation is None else mask_propagation)
    direct = _prepare_inputs(inputs, (ny, nx), planes, bad_mask_planes)
    template_mode = rejection_inputs is None
    rejection = (
        direct
        if template_mode
        else _prepare_inputs(
            rejection_inputs,
            (ny, nx),
            planes,
            bad_mask_planes,  # type: ignore[arg-type]
        )
    )

    # Smoothing (a matched filter for the model PSF) and growth radius.
    fwhms = [_psf_fwhm(p.source.psf, p.source.shape) for p in rejection[:25]]
    finite = [f for f in fwhms if np.isfinite(f) and f > 0]
    model_fwhm = float(np.median(finite)) if finite else 3.0
    psf_sigma = model_fwhm / 2.3548200450309493
    smoothing = _gaussian_1d(max(psf_sigma, 0.5), 3.0)
    grow_radius = math.ceil(grow_nsigma * psf_sigma)

    for p in direct if template_mode else [*direct, *rejection]:
        _measure_input(p, sample_rows=weight_sample_rows)
    n_epochs = len({p.source.visit for p in rejection if p.weight > 0})
    reject_reason = ""
    if not do_reject:
        reject_reason = "disabled"
    elif n_epochs < 3:
        reject_reason = f"{n_epochs} visit(s): rejection needs >= 3"
    rejecting = not reject_reason
    # Rejection input -> direct input of the same (visit, detector).
    partner: dict[int, int] = {}
    if rejecting and template_mode:
        partner = {p.index: p.index for p in direct}
    elif rejecting:
        by_id = {(p.source.visit, p.source.detector): p.index for p in direct}
        for q in rejection:
            key = (q.source.visit, q.source.detector)
            if key in by_id:
                partner[q.index] = by_id[key]
        missing = len(direct) - len(set(partner.values()))
        if missing:
            log.warning("%d input(s) without a rejection input: never clipped", missing)

    n_layers = _pack_layers(direct)
    n_rej_layers = _pack_layers(rejection) if rejecting and not template_mode else 0
    params = _RejectionParams(
        clip_sigma=clip_sigma, detect_sigma=detect_sigma, model_error=model_error,
        max_num_epochs=max_num_epochs, max_fraction_epochs_low=max_fraction_epochs_low,
        max_fraction_epochs_high=max_fraction_epochs_high, smoothing=smoothing,
        grow_radius=grow_radius,
    )  # fmt: skip
    # Rows beyond a strip that its artifact masks depend on: smoothing + growth.
    halo = smoothing.size // 2 + grow_radius + 1 if rejecting else 0
    if strip_rows is None:
        n_rej = (n_layers if template_mode else n_rej_layers) if rejecting else 0
        strip_rows = _auto_strip_rows(n_layers, n_rej, nx, halo, memory_limit_mb)
    strip_rows = max(1, min(int(strip_rows), ny))
    if rejecting:
        _estimate_noise_correlation(rejection, (ny, nx), planes, params, weight_sample_rows)
    if psf_cell_size is None:
        psf_cell_size = int(np.clip(min(ny, nx) // 32, 16, 128))

    out = _Output.empty((ny, nx), planes, direct, max(1, int(psf_block)))
    propagation = {k: v for k, v in propagation.items() if k in planes.bits}
    or_bits = 0
    for name, b in planes.bits.items():
        if name not in NOT_PROPAGATED_PLANES and name not in bad_mask_planes:
            or_bits |= 1 << b
    n_possible = 0
    for y0 in range(0, ny, strip_rows):
        y1 = min(ny, y0 + strip_rows)
        verdicts: dict[int, _Verdict] = {}
        if rejecting:
            h0, h1 = max(0, y0 - halo), min(ny, y1 + halo)
            rstack = _read_stack(rejection, h0, h1, nx, planes, with_mask=False)
            if rstack.image.shape[0]:
                core = slice(y0 - h0, y1 - h0)
                found = _find_artifacts(rstack, rejection, core, params)
                n_epochs_core = rstack.valid[:, core].sum(axis=0)
                n_possible += int((_max_epochs(n_epochs_core, params) > 0).sum())
                for q_index, verdict in found.items():
                    if q_index in partner:
                        verdicts[partner[q_index]] = verdict
            del rstack
        stack = _read_stack(direct, y0, y1, nx, planes, with_mask=True)
        _combine_strip(
            stack, verdicts, set(partner.values()), y0, out,
            or_bits=or_bits, propagation=propagation,
        )  # fmt: skip
        del stack

    bit = out.bit
    no_data = out.n_image == 0
    out.mask[no_data] |= bit["NO_DATA"]
    if do_interp and no_data.any() and not no_data.all():
        from workflow_lib.cosmic_rays import interpolate_masked

        interpolate_masked(out.image, no_data, variance=out.variance)
        out.mask[no_data] |= bit["INTRP"]

    weights = np.array([p.weight for p in direct])
    coadd_psf = build_coadd_psf(
        [p.source.psf for p in direct], weights, [(p.x0, p.y0) for p in direct],
        out.coverage, out.block_origin, block=out.block, shape=(ny, nx),
        cell_size=psf_cell_size, order=psf_order,
    )  # fmt: skip
    table = _input_table(direct, rejection, partner, out.stats)
    header = _coadd_header(
        metadata, table, reject_reason=reject_reason, template_mode=template_mode,
        params=params, n_possible=n_possible, no_data=no_data, strip_rows=strip_rows,
        model_fwhm=model_fwhm, coadd_psf=coadd_psf, do_interp=do_interp,
        psf_cell_size=psf_cell_size,
    )  # fmt: skip
    exposure = Exposure(
        image=out.image, variance=out.variance, mask=out.mask, wcs=wcs,
        psf=coadd_psf.model if coadd_psf is not None else None,
        photo_calib=PhotoCalib(njy_per_unit=1.0), metadata=header, mask_planes=planes,
        origin=(int(origin[0]), int(origin[1])),
    )  # fmt: skip
    log.info(
        "coadd %dx%d from %d inputs (%d visits): rejection %s, %.1f%% of pixels with data",
        nx, ny, len(direct), table["visit"].nunique(), reject_reason or "compare-warp",
        100.0 * (1.0 - no_data.mean()),
    )  # fmt: skip
    return CoaddResult(
        exposure=exposure, inputs=table, n_image=out.n_image,
        coadd_psf=coadd_psf,
    )  # fmt: skip


@dataclass
class _Output:
    """The coadd planes being filled, with per-input tallies and PSF coverage blocks."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    n_image: np.ndarray
    stats: np.ndarray  # (n_inputs, 5) pixels: covered, valid, used, clipped, unchecked
    block: int
    coverage: list[np.ndarray]  # per input: pixels used per block over its bbox
    block_origin: list[tuple[int, int]]  # per input: (bx, by) of its first block
    bit: dict[str, np.int32]

    @classmethod
    def empty(cls, shape: tuple[int, int], planes: MaskPlanes, inputs: list[_Input], block: int):  # type: ignore[no-untyped-def]
        coverage, origin = [], []
        for p in inputs:
            if p.layer < 0:
                coverage.append(np.zeros((0, 0), COVERAGE_DTYPE))
                origin.append((0, 0))
                continue
            bx0, by0 = p.bx0 // block, p.by0 // block
            nbx, nby = (p.bx1 - 1) // block - bx0 + 1, (p.by1 - 1) // block - by0 + 1
            coverage.append(np.zeros((nby, nbx), COVERAGE_DTYPE))
            origin.append((bx0, by0))
        return cls(
            image=np.full(shape, np.nan, np.float32),
            variance=np.full(shape, np.nan, np.float32),
            mask=np.zeros(shape, MASK_DTYPE),
            n_image=np.zeros(shape, np.int32),
            stats=np.zeros((len(inputs), 5), np.int64), block=block,
            coverage=coverage, block_origin=origin,
            bit={name: np.int32(1 << b) for name, b in planes.bits.items()},
        )  # fmt: skip

    def add_coverage(self, index: int, used: np.ndarray, y_start: int, x_start: int) -> None:
        counts = block_sums(used, y_start, x_start, self.block)
        bx0, by0 = self.block_origin[index]
        jy, jx = y_start // self.block - by0, x_start // self.block - bx0
        self.coverage[index][jy : jy + counts.shape[0], jx : jx + counts.shape[1]] += counts.astype(
            COVERAGE_DTYPE
        )


def _verdict_on(verdict: _Verdict | None, rs: slice, cs: slice) -> tuple[np.ndarray, np.ndarray]:
    """(checked, rejected) over a direct input's region from its partner's verdict."""
    checked = np.zeros((rs.stop - rs.start, cs.stop - cs.start), bool)
    rejected = np.zeros_like(checked)
    if verdict is None:
        return checked, rejected
    vrs, vcs, valid, grown = verdict
    lo, hi = max(rs.start, vrs.start), min(rs.stop, vrs.stop)
    c0, c1 = max(cs.start, vcs.start), min(cs.stop, vcs.stop)
    if hi > lo and c1 > c0:
        src = (slice(lo - vrs.start, hi - vrs.start), slice(c0 - vcs.start, c1 - vcs.start))
        dst = (slice(lo - rs.start, hi - rs.start), slice(c0 - cs.start, c1 - cs.start))
        checked[dst] = valid[src]
        rejected[dst] = grown[src]
    return checked, rejected


def _combine_strip(
    stack: _Stack,
    verdicts: Mapping[int, _Verdict],
    checked_inputs: set[int],
    y0: int,
    out: _Output,
    *,
    or_bits: int,
    propagation: Mapping[str, float],
) -> None:
    """Weighted mean of one strip's layers without bad or clipped pixels, into ``out``.

    Inputs in ``checked_inputs`` (those with a rejection input) contribute
    only pixels their rejection input had valid and did not reject
    (``verdicts``, by direct input): a direct pixel whose PSF-matched
    partner has no data there (its border, lost to the matching kernel)
    could hide an artifact, so it is left out, as LSST's CompareWarp does
    by shrinking the direct warps' valid polygons to the PSF-matched ones.
    """
    if not stack.image.shape[0]:
        return  # nothing covers these rows: the planes stay NaN, NO_DATA is set later
    rows, nx = stack.image.shape[1:]
    y1 = y0 + rows
    bit = out.bit
    num = np.zeros((rows, nx))
    den = np.zeros((rows, nx))
    vnum = np.zeros((rows, nx))
    n_used = np.zeros((rows, nx), np.int32)
    mask_or = np.zeros((rows, nx), MASK_DTYPE)
    covered_w = np.zeros((rows, nx))
    bad_w = {name: np.zeros((rows, nx)) for name in propagation}
    excluded_any = np.zeros((rows, nx), bool)
    edge_any = np.zeros((rows, nx), bool)
    clipped_any = np.zeros((rows, nx), bool)
    regions: dict[int, list[tuple[int, slice, slice]]] = {}
    for index, layer, rs, cs in stack.regions:
        regions.setdefault(layer, []).append((index, rs, cs))
    for layer in range(stack.image.shape[0]):
        valid = stack.valid[layer]
        w_cov = stack.weight[layer]
        covered = w_cov > 0
        msk = stack.mask[layer]
        used = valid.copy()
        clipped = np.zeros_like(valid)
        for index, rs, cs in regions.get(layer, []):
            if index in checked_inputs:
                checked, rejected = _verdict_on(verdicts.get(index), rs, cs)
                clipped[rs, cs] = valid[rs, cs] & rejected
                used[rs, cs] &= checked & ~rejected
        w = np.where(used, w_cov, np.float32(0.0))
        num += w * stack.image[layer]
        den += w
        vnum += w * w * stack.variance[layer]
        n_used += used
        mask_or |= np.where(used, msk & or_bits, 0).astype(MASK_DTYPE)
        clipped_any |= clipped
        excluded = covered & ~valid
        excluded_any |= excluded
        if "EDGE" in bit:
            edge_any |= excluded & ((msk & bit["EDGE"]) != 0)
        covered_w += w_cov
        for name, acc in bad_w.items():
            acc += np.where((msk & bit[name]) != 0, w_cov, np.float32(0.0))
        for index, rs, cs in regions.get(layer, []):
            u = used[rs, cs]
            v = valid[rs, cs]
            n_clipped = int(clipped[rs, cs].sum())
            out.stats[index] += (
                int(covered[rs, cs].sum()), int(v.sum()), int(u.sum()), n_clipped,
                int(v.sum()) - int(u.sum()) - n_clipped,
            )  # fmt: skip
            if u.any():
                out.add_coverage(index, u, y0 + rs.start, cs.start)
    has = den > 0
    safe = np.where(has, den, 1.0)
    out.image[y0:y1] = np.where(has, num / safe, np.nan)
    out.variance[y0:y1] = np.where(has, vnum / safe**2, np.nan)
    flags = {
        "CLIPPED": clipped_any,
        "REJECTED": excluded_any,
        "SENSOR_EDGE": edge_any,
        "INEXACT_PSF": (clipped_any | excluded_any) & has,
    }
    for name, acc in bad_w.items():
        frac = np.divide(acc, covered_w, out=np.zeros_like(acc), where=covered_w > 0)
        flags[name] = flags.get(name, False) | (frac >= propagation[name])
    for name, where in flags.items():
        mask_or |= np.where(where, bit[name], 0).astype(MASK_DTYPE)
    out.mask[y0:y1] = mask_or
    out.n_image[y0:y1] = n_used


def _input_table(direct, rejection, partner, stats) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    correlation = {d: rejection[q].noise_correlation for q, d in partner.items()}
    rows = []
    for p in direct:
        meta = p.source.metadata
        band = header_value(meta, BAND_KEYS)
        mjd = header_value(meta, MJD_KEYS)
        covered, valid, used, clipped, unchecked = (int(v) for v in stats[p.index])
        sy, sx = p.source.shape
        rows.append({
            "visit": int(p.source.visit),
            "detector": int(p.source.detector),
            "band": str(band).strip() if band is not None else "",
            "mjd": float(mjd) if mjd is not None else float("nan"),  # type: ignore[arg-type]
            "weight": float(p.weight),
            "mean_variance": float(p.mean_variance),
            "x0": p.x0, "y0": p.y0, "nx": int(sx), "ny": int(sy),
            "psf_fwhm": _psf_fwhm(p.source.psf, p.source.shape),
            "n_covered": covered, "n_valid": valid, "n_used": used, "n_clipped": clipped,
            "n_unchecked": unchecked,
            "clipped_fraction": clipped / valid if valid else 0.0,
            "has_rejection_input": p.index in correlation,
            "noise_correlation": float(correlation.get(p.index, np.nan)),
            "used": used > 0,
        })  # fmt: skip
    return pd.DataFrame(rows)


def _coadd_header(
    metadata,
    table,
    *,
    reject_reason,
    template_mode,
    params,
    n_possible,
    no_data,
    strip_rows,
    model_fwhm,
    coadd_psf,
    do_interp,
    psf_cell_size,
) -> fits.Header:  # type: ignore[no-untyped-def]
    header = fits.Header() if metadata is None else metadata.copy()
    bands = sorted({b for b in table["band"] if b})
    if len(bands) == 1:
        header["BAND"] = (bands[0], "band of every input")
    header["NINPUTS"] = (int(table["used"].sum()), "inputs used (visit, detector)")
    header["NVISITS"] = (int(table.loc[table["used"], "visit"].nunique()), "visits used")
    if np.isfinite(table["mjd"]).any():
        header["MJDMIN"] = (float(np.nanmin(table["mjd"])), "earliest input MJD")
        header["MJDMAX"] = (float(np.nanmax(table["mjd"])), "latest input MJD")
    header["COADDTYP"] = ("PSFMATCHED" if template_mode else "DIRECT", "warp type of the inputs")
    header["STATISTC"] = ("MEAN", "inverse-variance weighted mean")
    header["REJECT"] = ("NONE" if reject_reason else "COMPAREWARP", "artifact rejection")
    if reject_reason:
        header["REJWHY"] = (reject_reason[:68], "why no artifact rejection")
    covered = max(int((~no_data).sum()), 1)
    header["REJFRAC"] = (round(n_possible / covered, 5), "fraction of data pixels with >= 3 epochs")
    header["CLIPSIG"] = (params.clip_sigma, "reference clip, sigma")
    header["DETSIG"] = (params.detect_sigma, "artifact detection threshold, sigma")
    header["MODELERR"] = (params.model_error, "fractional tolerance of the reference")
    header["MAXEPOCH"] = (params.max_num_epochs, "maxNumEpochs")
    header["EPOCHLO"] = (params.max_fraction_epochs_low, "maxFractionEpochsLow")
    header["EPOCHHI"] = (params.max_fraction_epochs_high, "maxFractionEpochsHigh")
    header["MODLFWHM"] = (round(model_fwhm, 4), "PSF FWHM of the rejection warps, pixels")
    header["NCLIPPED"] = (int(table["n_clipped"].sum()), "input pixels rejected as artifacts")
    header["COVFRAC"] = (round(1.0 - float(no_data.mean()), 6), "fraction of pixels with data")
    header["STRIPROW"] = (int(strip_rows), "rows per assembly strip")
    header["DOINTERP"] = (bool(do_interp), "NO_DATA pixels interpolated")
    if coadd_psf is not None:
        header["PSFCELL"] = (int(psf_cell_size), "cell size of the POLYPIX PSF fit, pixels")
        header["PSFBLOCK"] = (coadd_psf.block, "block size of the PSF coverage maps, pixels")
        header["PSFORDER"] = (coadd_psf.order, "order of the POLYPIX coadd PSF")
        residual = round(coadd_psf.max_rms_residual, 6)
        header["PSFFRES"] = (residual, "max rms residual / peak of the PSF fit")
        pure = round(coadd_psf.pure_cell_fraction, 4)
        header["PSFPURE"] = (pure, "fraction of PSF fit cells of uniform coverage")
    return header
