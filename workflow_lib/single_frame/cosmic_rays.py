"""Cosmic-ray detection and pixel repair (arrays in, arrays out; no file I/O).

Cosmic rays are found with astroscrappy (L.A.Cosmic, van Dokkum 2001), which
tells a cosmic ray from a star by the sharpness of its Laplacian relative to
the local fine structure, so it needs no PSF model: at ISR time none exists
yet. Run on a whole 4k x 4k detector it costs ~10 s per iteration on one core,
more than all of single-frame processing may spend. Almost all of that time
is spent far from any cosmic ray, so :func:`detect_cosmic_rays` first finds
*candidate* pixels with a cheap, generous numpy test (a positive spike well
above the noise whose neighbours on some side are much fainter than it), cuts
a padded tile around each group of neighbouring blocks holding a candidate
(one tile per group, so neighbours share their padding), packs the tiles into
one mosaic, and runs astroscrappy once on the mosaic. The padding is wider than
astroscrappy's filters reach, so every kept pixel is judged exactly as in a
full-frame run. When candidates are everywhere (undersampled images, very
crowded fields) it simply runs on the whole frame.

:func:`interpolate_masked` repairs masked pixels (cosmic rays, bad columns,
saturation) by linear interpolation across each masked run along rows and
columns, weighting the two directions by the inverse square of the gap, so a
bad column is bridged horizontally and a horizontal track vertically.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from _ctypes import CFuncPtr  # ctypes._CFuncPtr, as the stubs name it

log = logging.getLogger(__name__)


@functools.cache
def _openmp_setter() -> CFuncPtr | None:
    """``omp_set_num_threads`` of the OpenMP runtime astroscrappy's wheel bundles, if found."""
    import astroscrappy

    libs = os.path.join(
        os.path.dirname(os.path.dirname(astroscrappy.__file__)), "astroscrappy.libs"
    )
    candidates = [*sorted(glob.glob(os.path.join(libs, "libgomp*.so*"))), "libgomp.so.1"]
    for name in candidates:
        try:
            return ctypes.CDLL(name).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


def _limit_openmp_threads(threads: int) -> None:
    """Best effort: astroscrappy's median filters use all cores through OpenMP by default,
    which oversubscribes a machine running one job per core (10x slower when busy)."""
    setter = _openmp_setter()
    if setter is not None:
        setter(int(threads))
    else:
        log.debug("OpenMP runtime of astroscrappy not found; thread count left alone")


@dataclass(frozen=True)
class CosmicRayResult:
    """Cosmic-ray mask and how it was obtained."""

    mask: np.ndarray  # bool, True on cosmic-ray pixels
    n_candidates: int  # candidate pixels of the cheap pre-screen
    n_blocks: int  # blocks handed to astroscrappy (0: whole frame)
    fraction_searched: float  # fraction of the frame's pixels astroscrappy saw


def cosmic_ray_candidates(
    image: np.ndarray,
    variance: np.ndarray,
    *,
    background: float | np.ndarray,
    nsigma: float = 5.0,
    contrast: float = 0.3,
) -> np.ndarray:
    """Cheap pre-screen: pixels that may be cosmic rays (a superset of them).

    A pixel is a candidate where it exceeds ``background`` by ``nsigma`` noise
    sigma and, along at least one of the four axes through it, both of its
    opposite neighbours are fainter than ``contrast`` times its excess while
    the pixel beats their mean by ``nsigma`` sigma. A well-sampled PSF (FWHM
    >= ~2 pixels, Kolmogorov or Moffat) keeps more than 0.3 of its peak in
    its neighbours along every axis, so stars fail the test; every thin track
    passes across its width. False candidates cost only time. The test runs
    on the few pixels above the threshold only; the outermost rows and
    columns are never candidates.
    """
    level = np.asarray(background, dtype=np.float32)
    if level.ndim == 0:  # a constant: no full-frame excess image is needed

        def excess_at(rows: np.ndarray | slice, cols: np.ndarray | slice) -> np.ndarray:
            return image[rows, cols] - level

    else:
        excess = image - level

        def excess_at(rows: np.ndarray | slice, cols: np.ndarray | slice) -> np.ndarray:
            return excess[rows, cols]

    py, px = _significant_peaks(excess_at, variance, nsigma)
    candidates = np.zeros(image.shape, dtype=bool)
    if py.size == 0:
        return candidates
    e0 = excess_at(py, px)
    s0 = np.sqrt(np.maximum(variance[py, px], 0.0))
    hit = np.zeros(py.size, dtype=bool)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = excess_at(py + dy, px + dx)
        b = excess_at(py - dy, px - dx)
        hit |= (np.maximum(a, b) < contrast * e0) & (e0 - 0.5 * (a + b) > nsigma * s0)
    candidates[py[hit], px[hit]] = True
    return candidates


def _significant_peaks(
    excess_at: Callable[[slice, slice], np.ndarray],
    variance: np.ndarray,
    nsigma: float,
    *,
    rows: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the inner pixels whose excess is positive and > nsigma sigma.

    Done in bands of ``rows`` rows so the temporaries stay in cache (the full
    frame is scanned once, and few pixels pass).
    """
    ny, nx = variance.shape
    threshold = np.float32(nsigma**2)
    found_y, found_x = [], []
    for r0 in range(1, ny - 1, rows):
        r1 = min(r0 + rows, ny - 1)
        ex = excess_at(slice(r0, r1), slice(1, nx - 1))
        peak = ex * ex > threshold * variance[r0:r1, 1 : nx - 1]
        peak &= ex > 0
        yy, xx = np.nonzero(peak)
        found_y.append(yy + r0)
        found_x.append(xx + 1)
    if not found_y:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    return np.concatenate(found_y), np.concatenate(found_x)


def detect_cosmic_rays(
    image: np.ndarray,
    variance: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    read_noise: float = 5.0,
    sigclip: float = 5.0,
    sigfrac: float = 0.3,
    objlim: float = 8.0,
    niter: int = 2,
    block: int = 12,
    pad: int = 8,
    max_block_fraction: float = 0.4,
    contrast: float = 0.3,
    threads: int = 1,
) -> CosmicRayResult:
    """Find cosmic-ray pixels on a sky-included image in electrons.

    ``variance`` (e-^2) is handed to astroscrappy as its noise model (after
    its own median filtering), so the thresholds mean the same whatever the
    gain, flat or sky; ``mask`` (bad, saturated, no-data pixels) is never
    flagged. ``sigclip``/``objlim`` are L.A.Cosmic's (objlim 8 rather than 5:
    fewer star pixels grown into cosmic rays, ~0.2% fewer CR pixels found);
    ``contrast`` is the candidate test's (see :func:`cosmic_ray_candidates`),
    which every kept cosmic ray must pass somewhere, so sharp star cores
    (FWHM ~2 pixels) that L.A.Cosmic alone would flag are spared; ``niter`` 2
    catches the pixels of long tracks that the first pass left after cleaning
    the brightest ones (later passes hardly add anything). ``block``/``pad`` size the tiles (see the
    module docstring); above ``max_block_fraction`` of the blocks the whole
    frame is searched. ``threads`` caps astroscrappy's OpenMP threads (one
    core per job is the workflow's budget).
    """
    import astroscrappy

    _limit_openmp_threads(threads)

    image = np.ascontiguousarray(image, dtype=np.float32)
    variance = np.ascontiguousarray(variance, dtype=np.float32)
    ny, nx = image.shape
    inmask = np.zeros(image.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    good = ~inmask & np.isfinite(image)
    if not good.any():
        return CosmicRayResult(np.zeros(image.shape, dtype=bool), 0, 0, 0.0)
    # The background only sets the pre-screen's excess; a coarse level is enough.
    step = max(1, int(np.sqrt(image.size / 250_000)))
    sample = image[::step, ::step][good[::step, ::step]]
    background = float(np.median(sample)) if sample.size else 0.0
    cand = cosmic_ray_candidates(
        image, variance, background=background, nsigma=sigclip, contrast=contrast
    )
    cand &= good
    n_cand = int(cand.sum())
    kwargs = dict(
        sigclip=sigclip,
        sigfrac=sigfrac,
        objlim=objlim,
        gain=1.0,
        readnoise=float(read_noise),
        satlevel=np.float32(np.inf),
        niter=niter,
        sepmed=True,
        cleantype="meanmask",
        fsmode="median",
    )
    if n_cand == 0:
        return CosmicRayResult(np.zeros(image.shape, dtype=bool), 0, 0, 0.0)
    nby, nbx = -(-ny // block), -(-nx // block)
    cy, cx = np.nonzero(cand)
    # A track may run a few pixels into the next block: that block is searched too.
    reach = 3
    cy = np.clip(np.concatenate([cy - reach, cy - reach, cy + reach, cy + reach]), 0, ny - 1)
    cx = np.clip(np.concatenate([cx - reach, cx + reach, cx - reach, cx + reach]), 0, nx - 1)
    blocks = np.unique((cy // block) * nbx + (cx // block))
    if len(blocks) > max_block_fraction * nby * nbx:
        crmask, _ = astroscrappy.detect_cosmics(
            image, inmask=~good, invar=np.maximum(variance, 1e-3), **kwargs
        )
        return CosmicRayResult(_require_sharp(crmask.astype(bool) & good, cand), n_cand, 0, 1.0)

    # Mosaic of padded tiles around groups of candidate blocks (neighbouring
    # blocks share one tile, so they share its padding); outside the image a
    # tile holds the background, masked.
    selected = np.zeros((nby, nbx), dtype=bool)
    selected.reshape(-1)[blocks] = True
    tiles = _block_tiles(selected)  # (by0, by1, bx0, bx1) in blocks
    shapes = [
        ((b1 - b0) * block + 2 * pad, (c1 - c0) * block + 2 * pad) for b0, b1, c0, c1 in tiles
    ]
    places, (mh, mw) = _pack_shelves(shapes)
    mosaic = np.full((mh, mw), background, dtype=np.float32)
    mvar = np.ones_like(mosaic)
    mbad = np.ones(mosaic.shape, dtype=bool)
    for (r0, _, c0, _), (h, w), (ty, tx) in zip(tiles, shapes, places, strict=True):
        y0, x0 = r0 * block - pad, c0 * block - pad
        sy0, sx0 = max(y0, 0), max(x0, 0)
        sy1, sx1 = min(y0 + h, ny), min(x0 + w, nx)
        dst = (slice(ty + sy0 - y0, ty + sy1 - y0), slice(tx + sx0 - x0, tx + sx1 - x0))
        mosaic[dst] = image[sy0:sy1, sx0:sx1]
        mvar[dst] = variance[sy0:sy1, sx0:sx1]
        mbad[dst] = ~good[sy0:sy1, sx0:sx1]
    crm, _ = astroscrappy.detect_cosmics(
        mosaic, inmask=mbad, invar=np.maximum(mvar, 1e-3), **kwargs
    )
    out = np.zeros((nby * block, nbx * block), dtype=bool)
    for (r0, r1, c0, c1), (h, w), (ty, tx) in zip(tiles, shapes, places, strict=True):
        core = crm[ty + pad : ty + h - pad, tx + pad : tx + w - pad]
        out[r0 * block : r1 * block, c0 * block : c1 * block] |= core
    # Only the candidate blocks count (a tile's bounding box may hold others).
    out &= selected.repeat(block, axis=0).repeat(block, axis=1)
    frac = sum(h * w for h, w in shapes) / float(ny * nx)
    return CosmicRayResult(_require_sharp(out[:ny, :nx] & good, cand), n_cand, len(blocks), frac)


def _block_tiles(selected: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Rectangles (row0, row1, col0, col1) of blocks covering the selected ones.

    Each 8-connected group of selected blocks gets its bounding box, unless
    that box is mostly unselected (a diagonal track's staircase): then each
    row's runs of selected blocks get their own rectangle.
    """
    from scipy.ndimage import find_objects, label

    labels, _ = label(selected, structure=np.ones((3, 3), dtype=bool))
    tiles = []
    for index, box in enumerate(find_objects(labels), start=1):
        rows, cols = box
        group = labels[box] == index
        if group.size <= 2 * group.sum():
            tiles.append((rows.start, rows.stop, cols.start, cols.stop))
            continue
        for r, line in enumerate(group):
            edges = np.flatnonzero(np.diff(np.concatenate(([0], line.view(np.int8), [0]))))
            for c0, c1 in zip(edges[::2], edges[1::2], strict=True):
                tiles.append((rows.start + r, rows.start + r + 1, cols.start + c0, cols.start + c1))
    return tiles


def _pack_shelves(shapes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Top-left corners packing rectangles (h, w) into shelves, and the mosaic shape.

    Tallest first, left to right, on shelves about as wide as the square root
    of the total area, so the mosaic stays near square and little is wasted.
    """
    width = max(max(w for _, w in shapes), int(np.ceil(np.sqrt(sum(h * w for h, w in shapes)))))
    order = sorted(range(len(shapes)), key=lambda k: (-shapes[k][0], -shapes[k][1]))
    places: list[tuple[int, int]] = [(0, 0)] * len(shapes)
    y = x = shelf = 0
    for k in order:
        h, w = shapes[k]
        if x + w > width:
            y, x, shelf = y + shelf, 0, 0
        places[k] = (y, x)
        x += w
        shelf = max(shelf, h)
    return places, (y + shelf, width)


def _require_sharp(crmask: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Keep the cosmic rays (8-connected groups) holding at least one candidate pixel.

    L.A.Cosmic's object test fails on the cores of very sharp stars (FWHM
    ~2 pixels, a Kolmogorov core); a group none of whose pixels is sharper
    than a PSF can be (the candidate test) is a star, not a cosmic ray.
    """
    if not crmask.any():
        return crmask
    from scipy.ndimage import label

    labels, _ = label(crmask, structure=np.ones((3, 3), dtype=bool))
    idx = np.flatnonzero(crmask)
    lab = labels.reshape(-1)[idx]
    sharp = np.unique(lab[candidates.reshape(-1)[idx]])
    out = crmask.copy()
    out.reshape(-1)[idx[~np.isin(lab, sharp)]] = False
    return out


def _interpolate_runs(
    line: np.ndarray,
    pos: np.ndarray,
    line_length: int,
    step: int,
    flat: np.ndarray,
    arrays: list[np.ndarray],
) -> tuple[list[np.ndarray], np.ndarray]:
    """Linear interpolation across runs of masked pixels along lines.

    ``line``/``pos``: line number and position along it of each masked pixel,
    sorted by (line, pos); ``flat``: its flat index in the arrays; ``step``:
    flat-index distance of one position along the line (1 for rows, nx for
    columns). Returns the interpolated values for each array and the gap
    length (inf where the line has no good pixel on either side).
    """
    key = line.astype(np.int64) * (line_length + 1) + pos
    breaks = np.flatnonzero(np.diff(key) != 1)
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [len(key) - 1]))
    length = (ends - starts + 1).astype(np.float64)
    has_l = pos[starts] > 0
    has_r = pos[ends] < line_length - 1
    left = flat[starts] - step
    right = flat[ends] + step
    run_of = np.repeat(np.arange(len(starts)), ends - starts + 1)
    t = (np.arange(len(key)) - starts[run_of] + 1.0) / (length[run_of] + 1.0)
    out = []
    for arr in arrays:
        av = arr.reshape(-1)
        vl = av[np.where(has_l, left, 0)]
        vr = av[np.where(has_r, right, 0)]
        vl, vr = np.where(has_l, vl, vr), np.where(has_r, vr, vl)
        out.append(vl[run_of] + (vr[run_of] - vl[run_of]) * t)
    gap = np.where(has_l | has_r, length, np.inf)[run_of]
    return out, gap


def interpolate_masked(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    variance: np.ndarray | None = None,
) -> None:
    """Replace masked pixels, in place, by interpolation from the nearest good pixels.

    Each masked pixel gets the linear interpolation across its masked run
    along the row and along the column; the two are averaged with weights
    1/gap^2, so the short direction wins (a bad column is bridged along the
    row, a horizontal cosmic-ray track along the column). ``variance``, if
    given, is interpolated alike. A pixel with no good pixel in its row or
    column gets the median of the good pixels. Cost is proportional to the
    number of masked pixels; the arrays must be C-contiguous.
    """
    mask = np.asarray(mask, dtype=bool)
    arrays = [image] if variance is None else [image, variance]
    for arr in arrays:
        if not arr.flags.c_contiguous or arr.shape != mask.shape:
            raise ValueError("interpolate_masked needs C-contiguous arrays of the mask's shape")
    if not mask.any():
        return
    ny, nx = mask.shape
    flat = np.flatnonzero(mask)  # row-major: sorted by (row, column)
    ys, xs = np.divmod(flat, nx)
    h_vals, h_gap = _interpolate_runs(ys, xs, nx, 1, flat, arrays)
    order = np.lexsort((ys, xs))  # column-major
    v_vals, v_gap = _interpolate_runs(xs[order], ys[order], ny, nx, flat[order], arrays)
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    v_gap = v_gap[back]
    wh = np.where(np.isfinite(h_gap), 1.0 / h_gap**2, 0.0)
    wv = np.where(np.isfinite(v_gap), 1.0 / v_gap**2, 0.0)
    wsum = wh + wv
    for arr, hv, vv in zip(arrays, h_vals, v_vals, strict=True):
        vv = vv[back]
        with np.errstate(invalid="ignore", divide="ignore"):
            val = (np.where(wh > 0, hv, 0.0) * wh + np.where(wv > 0, vv, 0.0) * wv) / wsum
        none = ~np.isfinite(val)
        if none.any():
            good = arr.reshape(-1)[:: max(1, arr.size // 1_000_000)]
            good = good[np.isfinite(good)]
            val[none] = float(np.median(good)) if good.size else 0.0
        arr.reshape(-1)[flat] = val.astype(arr.dtype)
