"""Master bias, dark and flat, and defect maps (arrays in, dataclasses out; no file I/O).

The masters are clipped means of calibration exposures processed by
:func:`workflow_lib.single_frame.isr.process_amplifiers` (overscan, trim, assemble, gain),
each with a variance (the error of the mean, from a photon + read-noise
model of the frames) and a mask of pixels no frame could estimate. Defects
come from the dark (hot pixels and column segments) and the flats (dead,
low- or high-response pixels and column segments).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workflow_lib.single_frame.isr import (
    AssembledFrame,
    MasterCalib,
    RawExposure,
    _check_shape,
    _robust_std,
    process_amplifiers,
)

log = logging.getLogger(__name__)


def _as_frame(item: RawExposure | AssembledFrame) -> AssembledFrame:
    if isinstance(item, AssembledFrame):
        return item
    primary, amps = item
    return process_amplifiers(amps, header=primary)


def _clipped_mean(
    frames: Sequence[np.ndarray],
    scales: Sequence[float],
    read_noise: np.ndarray,
    *,
    nsigma: float,
    chunk_rows: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Sigma-clipped mean over frames of ``frame * scale`` with a photon + read-noise model.

    The noise of frame i is ((max(centre / s_i, 0) + rn^2) s_i^2), taken at
    the robust centre rather than at the pixel itself, so that a cosmic ray
    does not widen its own tolerance. Three or more frames: clip around the
    median, then twice around the clipped mean. Two frames: if they disagree
    by more than ``nsigma`` the higher one is dropped (what goes wrong in a
    calibration frame, cosmic rays, is positive). One frame: nothing to clip.
    Returns mean, variance of the mean (model), frames used per pixel and the
    clipped fraction; processed in row chunks to bound memory.
    """
    n = len(frames)
    ny, nx = frames[0].shape
    mean = np.empty((ny, nx), dtype=np.float32)
    var = np.empty((ny, nx), dtype=np.float32)
    used = np.empty((ny, nx), dtype=np.uint16)
    s = np.asarray(scales, dtype=np.float32)[:, None, None]
    n_good = n_kept = 0
    for r0 in range(0, ny, chunk_rows):
        r1 = min(r0 + chunk_rows, ny)
        x = np.stack([f[r0:r1] for f in frames]).astype(np.float32) * s
        good = np.isfinite(x)
        rn2 = read_noise[r0:r1].astype(np.float32) ** 2
        with np.errstate(invalid="ignore", all="ignore"):
            centre = np.nanmedian(np.where(good, x, np.nan), axis=0) if n > 1 else x[0]
            centre = np.where(np.isfinite(centre), centre, 0.0)
            model = (np.maximum(centre / s, 0.0) + rn2) * s * s
            sig = np.sqrt(model)
            keep = good.copy()
            if n >= 3:
                for _ in range(3):
                    keep = good & (np.abs(x - centre) <= nsigma * sig)
                    cnt = keep.sum(axis=0)
                    tot = np.where(keep, x, 0.0).sum(axis=0)
                    centre = np.where(cnt > 0, tot / np.maximum(cnt, 1), centre)
                    model = (np.maximum(centre / s, 0.0) + rn2) * s * s
                    sig = np.sqrt(model)
            elif n == 2:
                both = good[0] & good[1]
                bad_pair = both & (np.abs(x[0] - x[1]) > nsigma * np.sqrt(model[0] + model[1]))
                high0 = x[0] > x[1]
                keep[0] &= ~(bad_pair & high0)
                keep[1] &= ~(bad_pair & ~high0)
            cnt = keep.sum(axis=0)
            tot = np.where(keep, x, 0.0).sum(axis=0)
            m = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
            v = np.where(keep, model, 0.0).sum(axis=0) / np.maximum(cnt, 1) ** 2
        mean[r0:r1] = m
        var[r0:r1] = np.where(cnt > 0, v, np.inf)
        used[r0:r1] = cnt
        n_good += int(good.sum())
        n_kept += int(keep.sum())
    clipped = 1.0 - n_kept / n_good if n_good else 1.0
    return mean, var, used, clipped


def _frames_of(items: Sequence[RawExposure | AssembledFrame], what: str) -> list[AssembledFrame]:
    if not items:
        raise ValueError(f"no {what} frames given")
    frames = [_as_frame(item) for item in items]
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"{what} frames differ in shape: {sorted(shapes)}")
    if len(frames) < 3:
        log.warning(
            "%s from %d frame(s): %s",
            what,
            len(frames),
            "no outlier rejection"
            if len(frames) == 1
            else "only the higher of a discrepant pair is rejected",
        )
    return frames


def _finish_master(
    kind: str, mean: np.ndarray, var: np.ndarray, used: np.ndarray, fill: float, **kw: Any
) -> MasterCalib:
    mask = (used == 0) | ~np.isfinite(mean)
    mean[mask] = fill
    var[mask | ~np.isfinite(var)] = np.float32(np.finfo(np.float32).max)
    return MasterCalib(kind=kind, image=mean, variance=var, mask=mask, **kw)


def build_master_bias(
    items: Sequence[RawExposure | AssembledFrame], *, nsigma: float = 4.0
) -> MasterCalib:
    """Master bias (e-): clipped mean of overscan-corrected, assembled bias frames.

    What the overscan does not see (fixed column pattern, start-up transients,
    amplifier glow) is left for this frame to remove.
    """
    frames = _frames_of(items, "bias")
    rn = frames[0].read_noise_map()
    mean, var, used, clipped = _clipped_mean(
        [f.image for f in frames], [1.0] * len(frames), rn, nsigma=nsigma
    )
    good = used > 0
    stats = {
        "n_frames": len(frames),
        "clipped_fraction": clipped,
        "mean": float(np.mean(mean[good])) if good.any() else float("nan"),
        "robust_std": _robust_std(mean[good]),
    }
    return _finish_master("bias", mean, var, used, 0.0, n_frames=len(frames), stats=stats)


def build_master_dark(
    items: Sequence[RawExposure | AssembledFrame],
    *,
    bias: MasterCalib | None,
    nsigma: float = 4.0,
) -> MasterCalib:
    """Master dark (e-/s): clipped mean of (frame - bias) / DARKTIME.

    Cosmic rays, frequent in long darks, are clipped (3+ frames) or the
    higher of a discrepant pair is dropped (2 frames); from one frame they
    stay, and the defect finder will call them hot pixels.
    """
    frames = _frames_of(items, "dark")
    _check_shape(bias, frames[0].shape, "bias")
    times = [f.darktime for f in frames]
    if not all(t > 0 for t in times):
        raise ValueError(f"dark frames need DARKTIME (or EXPTIME) > 0, got {times}")
    rn = frames[0].read_noise_map()
    data = [f.image if bias is None else f.image - bias.image for f in frames]
    mean, var, used, clipped = _clipped_mean(data, [1.0 / t for t in times], rn, nsigma=nsigma)
    if bias is not None:
        var += bias.variance * np.float32(np.mean([1.0 / t for t in times]) ** 2)
    good = used > 0
    stats = {
        "n_frames": len(frames),
        "clipped_fraction": clipped,
        "median_rate": float(np.median(mean[good])) if good.any() else float("nan"),
        "darktime_total": float(np.sum(times)),
    }
    return _finish_master("dark", mean, var, used, 0.0, n_frames=len(frames), stats=stats)


def build_master_flat(
    items: Sequence[RawExposure | AssembledFrame],
    *,
    bias: MasterCalib | None,
    dark: MasterCalib | None,
    nsigma: float = 4.0,
) -> MasterCalib:
    """Master flat of one band: relative response normalised to median 1 over the detector.

    Each frame, bias- and dark-corrected, is divided by its own median (flat
    lamps vary), the frames are clip-averaged, and the result is divided by
    its median, so a flat-fielded image keeps the electron scale of a typical
    pixel. All frames must share one FILTER.
    """
    frames = _frames_of(items, "flat")
    shape = frames[0].shape
    _check_shape(bias, shape, "bias")
    _check_shape(dark, shape, "dark")
    bands = {str(f.header.get("FILTER", "")).strip() for f in frames}
    if len(bands) > 1:
        raise ValueError(f"flat frames of several bands mixed: {sorted(bands)}")
    rn = frames[0].read_noise_map()
    data, scales = [], []
    for f in frames:
        y = f.image.copy()
        if bias is not None:
            y -= bias.image
        if dark is not None:
            y -= dark.image * np.float32(f.darktime)
        level = float(np.nanmedian(y[~f.saturated][:: max(1, y.size // 1_000_000)]))
        if not level > 0:
            raise ValueError(f"flat frame with non-positive median level {level:.3g} e-")
        data.append(y)
        scales.append(1.0 / level)
    mean, var, used, clipped = _clipped_mean(data, scales, rn, nsigma=nsigma)
    extra = np.zeros(shape, dtype=np.float32)
    s_mean = float(np.mean(scales))
    if bias is not None:
        extra += bias.variance * np.float32(s_mean**2)
    if dark is not None:
        t_mean = float(np.mean([f.darktime for f in frames]))
        extra += dark.variance * np.float32((s_mean * t_mean) ** 2)
    good = (used > 0) & np.isfinite(mean)
    norm = float(np.median(mean[good][:: max(1, int(good.sum()) // 2_000_000)]))
    mean /= np.float32(norm)
    var = (var + extra) / np.float32(norm**2)
    stats = {
        "n_frames": len(frames),
        "clipped_fraction": clipped,
        "mean_level_e": float(1.0 / s_mean),
        "median_noise": float(np.sqrt(np.median(var[good]))) if good.any() else float("nan"),
    }
    return _finish_master(
        "flat", mean, var, used, 1.0, n_frames=len(frames), band=bands.pop(), stats=stats
    )


# --------------------------------------------------------------------------
# Defects
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class DefectMap:
    """Boolean defect mask (True = BAD) and how many pixels each test flagged."""

    mask: np.ndarray
    counts: dict[str, int]


def _block_median(image: np.ndarray, by: int, bx: int) -> np.ndarray:
    """Median of (by x bx) blocks, expanded back to the image shape (edges: partial blocks)."""
    ny, nx = image.shape
    nby, nbx = -(-ny // by), -(-nx // bx)
    padded = np.full((nby * by, nbx * bx), np.nan, dtype=np.float32)
    padded[:ny, :nx] = image
    blocks = padded.reshape(nby, by, nbx, bx).transpose(0, 2, 1, 3).reshape(nby, nbx, by * bx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        med = np.nanmedian(blocks, axis=2)
    med = np.where(np.isfinite(med), med, np.nanmedian(med) if np.isfinite(med).any() else 0.0)
    return np.repeat(np.repeat(med, by, axis=0), bx, axis=1)[:ny, :nx]


def find_defects(
    *,
    dark: MasterCalib | None,
    flats: Sequence[MasterCalib] = (),
    hot_nsigma: float = 5.0,
    hot_min_rate: float = 0.25,
    column_min_rate: float = 0.1,
    low_response: float = 0.8,
    high_response: float = 1.25,
    column_response: float = 0.9,
    flat_nsigma: float = 5.0,
    block: int = 32,
) -> DefectMap:
    """Bad pixels and columns from a master dark and master flats.

    Hot pixels: dark rate above the detector median by more than
    ``hot_nsigma`` sigma (the master's own error, or the robust scatter of
    the rates if larger) and by at least ``hot_min_rate`` e-/s. Hot column
    segments: the median rate of ``block`` rows of one column above the
    median by ``hot_nsigma`` times its error and ``column_min_rate``. Dead,
    low and hot-response pixels: flat over its local (block-median) level
    below ``low_response`` or above ``high_response`` and ``flat_nsigma``
    sigma from 1; low column segments: the block median of that ratio along
    a column below ``column_response``. Pixels that a master could not
    estimate are bad too. The local level follows vignetting and large dust
    shadows, so neither is called a defect.
    """
    shape = None
    for m in [dark, *flats]:
        if m is not None:
            if shape is not None and m.image.shape != shape:
                raise ValueError(f"masters differ in shape: {m.image.shape} vs {shape}")
            shape = m.image.shape
    if shape is None:
        raise ValueError("find_defects needs a dark or at least one flat")
    bad = np.zeros(shape, dtype=bool)
    counts: dict[str, int] = {}
    if dark is not None:
        rate = dark.image
        ok = ~dark.mask
        base = float(np.median(rate[ok]))
        sig = np.sqrt(np.maximum(dark.variance, 0.0))
        sig = np.maximum(sig, np.float32(_robust_std(rate[ok])))
        excess = rate - np.float32(base)
        hot = ok & (excess > hot_nsigma * sig) & (excess > hot_min_rate)
        col_excess = _block_median(np.where(ok, excess, np.nan).T, 1, block).T
        col_sig = 1.2533 * _block_median(np.where(ok, sig, np.nan).T, 1, block).T / np.sqrt(block)
        hot_col = (col_excess > hot_nsigma * col_sig) & (col_excess > column_min_rate)
        counts.update(
            hot_pixels=int(hot.sum()),
            hot_column_pixels=int((hot_col & ~hot).sum()),
            dark_unestimated=int(dark.mask.sum()),
        )
        bad |= hot | hot_col | dark.mask
    for flat in flats:
        ok = ~flat.mask & (flat.image > 0)
        local = _block_median(np.where(ok, flat.image, np.nan), block, block)
        with np.errstate(all="ignore"):
            ratio = flat.image / local
            sig = np.sqrt(np.maximum(flat.variance, 0.0)) / local
        off = (ratio < low_response) | (ratio > high_response)
        pix = ~ok | (off & (np.abs(ratio - 1.0) > flat_nsigma * sig))
        col = _block_median(np.where(ok, ratio, np.nan).T, 1, block).T < column_response
        key = f"flat_{flat.band or 'noband'}"
        counts[f"{key}_pixels"] = int(pix.sum())
        counts[f"{key}_column_pixels"] = int((col & ~pix).sum())
        bad |= pix | col
    counts["total"] = int(bad.sum())
    return DefectMap(bad, counts)
