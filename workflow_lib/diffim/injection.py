"""Source injection: point sources of known flux put into a calexp, to measure what
difference imaging finds (LSST's ``source_injection``, run on the fly per CCD-visit).

The efficiency of a detection pipeline is a property of the survey's own images,
not of a simulator's truth: sources with the calexp's PSF model are added to the
calexp at places where both the calexp and the template have data, the calexp is
differenced and searched again exactly as in the run, and each injected source
is looked for among the new DIASources. No noise is added with a source: near the
detection limit the sky's noise dominates (a source of S/N 5 adds a few per cent
of variance over its PSF); bright injected sources are therefore measured with
slightly too small errors, which does not matter for whether they are found.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from workflow_lib.core.psf_model import PsfModel, evaluate_kernels
from workflow_lib.single_frame.psf import shift_stamps

LANCZOS = 3  # taps per side of the sub-pixel shift of each injected PSF stamp


def injection_positions(
    usable: np.ndarray, n: int, min_separation: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` positions (x, y, 0-based) drawn uniformly over the ``usable`` pixels
    (bool, (ny, nx)) with a random sub-pixel offset, each at least ``min_separation``
    pixels from the others (candidates in random order, kept greedily)."""
    iy, ix = np.nonzero(usable)
    if not ix.size or n <= 0:
        return np.zeros(0), np.zeros(0)
    pick = rng.choice(ix.size, size=min(ix.size, 20 * n), replace=False)
    x = ix[pick] + rng.uniform(-0.5, 0.5, pick.size)
    y = iy[pick] + rng.uniform(-0.5, 0.5, pick.size)
    kept: list[int] = []
    for i in range(pick.size):
        if len(kept) == n:
            break
        if kept and np.hypot(x[kept] - x[i], y[kept] - y[i]).min() < min_separation:
            continue
        kept.append(i)
    return x[kept], y[kept]


def point_source_image(
    shape: tuple[int, int], psf: PsfModel, x: np.ndarray, y: np.ndarray, flux: np.ndarray
) -> np.ndarray:
    """An image of ``shape`` holding point sources of total ``flux`` at (x, y), each the
    PSF model at its position, shifted to its sub-pixel centre (Lanczos-3)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    out = np.zeros(shape, dtype=np.float64)
    if not x.size:
        return out
    kernels = np.pad(evaluate_kernels(psf, x, y), ((0, 0), (LANCZOS, LANCZOS), (LANCZOS, LANCZOS)))
    ix, iy = np.round(x).astype(np.int64), np.round(y).astype(np.int64)
    # shift_stamps samples the stamp at (pixel + dx): a source at +f is sampled at -f.
    stamps = shift_stamps(kernels, -(x - ix), -(y - iy), a=LANCZOS)
    h = stamps.shape[1] // 2
    ny, nx = shape
    for stamp, cx, cy, f in zip(stamps, ix, iy, np.asarray(flux, dtype=np.float64), strict=True):
        x0, x1 = max(cx - h, 0), min(cx + h + 1, nx)
        y0, y1 = max(cy - h, 0), min(cy + h + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        sub = stamp[y0 - (cy - h) : y1 - (cy - h), x0 - (cx - h) : x1 - (cx - h)]
        out[y0:y1, x0:x1] += f * sub
    return out


def match_injected(
    x: np.ndarray, y: np.ndarray, found_x: np.ndarray, found_y: np.ndarray, radius: float
) -> np.ndarray:
    """Index of the nearest found source within ``radius`` pixels of each injected one
    (-1 where none)."""
    out = np.full(np.asarray(x).size, -1, dtype=np.int64)
    if not out.size or not np.asarray(found_x).size:
        return out
    d, i = cKDTree(np.c_[found_x, found_y]).query(np.c_[x, y])
    hit = d < radius
    out[hit] = i[hit]
    return out
