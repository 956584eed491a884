"""Coadd inputs: the warp protocol, and their preparation into strips of packed layers.

Internals of :mod:`workflow_lib.static_sky.coadd`. Each input gets a weight (1 / its
sigma-clipped mean variance), its part of the coadd, and a layer: inputs
sharing a layer never overlap, so a strip of the coadd is a dense
(layers, rows, columns) stack whose size is bounded by the strip, whatever
the number of inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from astropy.io import fits

from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes, PhotoCalib
from workflow_lib.core.psf_model import PsfModel

VISIT_KEYS = ("VISIT", "EXPID")
DETECTOR_KEYS = ("DETECTOR", "CCDNUM")


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


def header_value(header: Mapping[str, Any], keys: Sequence[str]) -> Any:
    """The value of the first of ``keys`` present in ``header`` (None if none is)."""
    for key in keys:
        if key in header and header[key] is not None:
            return header[key]
    return None


def warp_ids(
    header: Mapping[str, Any], *, visit: int | None = None, detector: int | None = None
) -> tuple[int, int]:
    """(visit, detector): the given ones, else from a warp or calexp header (VISIT or
    EXPID, DETECTOR)."""
    if visit is None:
        visit = header_value(header, VISIT_KEYS)
    if detector is None:
        detector = header_value(header, DETECTOR_KEYS)
    if visit is None or detector is None:
        raise ValueError("warp header has no VISIT/EXPID or DETECTOR card")
    return int(visit), int(detector)


class ExposureWarpInput:
    """A :class:`WarpInput` over an in-memory :class:`Exposure` (rows are views)."""

    def __init__(
        self, exposure: Exposure, *, visit: int | None = None, detector: int | None = None
    ) -> None:
        self.exposure = exposure
        self.visit, self.detector = warp_ids(exposure.metadata, visit=visit, detector=detector)

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


@dataclass
class PreparedInput:
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
class Stack:
    """Inputs of one strip packed into non-overlapping layers (L, rows, nx)."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray  # coadd mask bits
    weight: np.ndarray  # input weight where covered (not NO_DATA), else 0
    valid: np.ndarray  # usable pixel: covered, finite, variance > 0, no bad plane
    regions: list[tuple[int, int, slice, slice]]  # (input index, layer, rows, cols)

    def spans(self) -> list[slice]:
        """Per layer, the columns its inputs occupy (all work outside them is on zeros)."""
        lo = [self.image.shape[2]] * self.image.shape[0]
        hi = [0] * self.image.shape[0]
        for _, layer, _, cs in self.regions:
            lo[layer], hi[layer] = min(lo[layer], cs.start), max(hi[layer], cs.stop)
        return [slice(a, max(a, b)) for a, b in zip(lo, hi, strict=True)]


def clipped_mean(values: np.ndarray, *, n_sigma: float = 3.0, n_iter: int = 3) -> float:
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


def sample_row_ranges(ny: int, sample_rows: int | None, block: int) -> list[tuple[int, int]]:
    """Evenly spaced blocks of ``block`` rows, ``sample_rows`` rows in all.

    Every row, block after block, if ``sample_rows`` is None or ``ny`` is no
    larger (never one block of the whole image: memory stays per block).
    """
    if sample_rows is None or ny <= sample_rows:
        return [(y, min(y + block, ny)) for y in range(0, ny, block)]
    n_blocks = max(1, sample_rows // block)
    starts = np.unique(np.linspace(0, ny - block, n_blocks).astype(int))
    return [(int(s), int(s) + block) for s in starts]


def prepare_inputs(
    sources: Sequence[WarpInput], shape: tuple[int, int], planes: MaskPlanes, bad: Sequence[str]
) -> list[PreparedInput]:
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
            PreparedInput(
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


def valid_pixels(p: PreparedInput, rows: WarpRows) -> tuple[np.ndarray, np.ndarray]:
    """(covered, valid) of rows read from ``p``: covered = not NO_DATA."""
    mask = np.asarray(rows.mask)
    covered = (mask & p.no_data_bits) == 0
    valid = covered & ((mask & p.bad_bits) == 0)
    valid &= np.isfinite(rows.image) & np.isfinite(rows.variance) & (rows.variance > 0)
    return covered, valid


def measure_weight(p: PreparedInput, *, sample_rows: int | None) -> None:
    """Weight = 1 / sigma-clipped mean variance, from evenly spaced blocks of rows.

    ``sample_rows`` rows in blocks of 16 (all rows if None): variance planes
    are smooth, and the estimate then costs a fraction of one read.
    """
    variances = []
    for r0, r1 in sample_row_ranges(p.source.shape[0], sample_rows, 16):
        rows = p.source.read_rows(r0, r1)
        _, valid = valid_pixels(p, rows)
        variances.append(np.asarray(rows.variance, dtype=np.float64)[valid] * p.scale**2)
    p.mean_variance = clipped_mean(np.concatenate(variances) if variances else np.zeros(0))
    p.weight = 1.0 / p.mean_variance if p.mean_variance > 0 else 0.0


def pack_layers(prepared: list[PreparedInput]) -> int:
    """Give each input a layer in which no other input's bbox overlaps it; returns the count.

    Inputs are packed in (visit, detector) order, so a visit's CCDs share
    layers; the assignment is global, which makes every pixel's sums run
    over the same inputs in the same order whatever the strip size.
    """
    layers: list[list[PreparedInput]] = []
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


def read_stack(
    prepared: list[PreparedInput], y0: int, y1: int, nx: int, planes: MaskPlanes, *, with_mask: bool
) -> Stack:
    members = [p for p in prepared if p.layer >= 0 and p.overlaps_rows(y0, y1)]
    layer_ids = sorted({p.layer for p in members})
    position = {layer: k for k, layer in enumerate(layer_ids)}
    shape = (len(layer_ids), y1 - y0, nx)
    stack = Stack(
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
        covered, valid = valid_pixels(p, rows)
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
