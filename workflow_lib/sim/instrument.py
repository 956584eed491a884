"""Instrument signature: flat response, dark current, defects, cosmic rays, readout.

Numpy only. Everything fixed about a detector (response pattern, defects, bias
structure) comes from ``(seed, detector[, band])``; everything that changes per
exposure (noise, cosmic rays, row bias jitter) from ``(seed, exposure, detector)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from workflow_lib.sim.camera import AmpLayout
from workflow_lib.sim.presets import SimPreset
from workflow_lib.sim.seeds import rng_for

# Band dependence of the response: vignetting depth at the focal-plane corner,
# dust-donut depth, and PRNU scale.
_VIGNETTING = {"u": 0.14, "g": 0.12, "r": 0.10, "i": 0.09, "z": 0.085, "y": 0.08}
_DUST_DEPTH = {"u": 0.06, "g": 0.05, "r": 0.04, "i": 0.03, "z": 0.025, "y": 0.02}
_PRNU_SCALE = {"u": 1.4, "g": 1.2, "r": 1.0, "i": 0.9, "z": 0.85, "y": 0.8}


@dataclass(frozen=True)
class Defects:
    """Fixed defects of one detector."""

    response_factor: np.ndarray  # 1 except dead (0-0.05) and low (0.3-0.7) pixels/columns
    hot_rate: np.ndarray  # extra dark current, e-/s/pixel (hot pixels and columns)
    base_dark: float  # e-/s/pixel


def detector_defects(preset: SimPreset, seed: int, detector: int) -> Defects:
    """Dead/low pixels and columns, hot pixels and columns, base dark current."""
    rng = rng_for(seed, "defects", detector)
    ny, nx = preset.det_ny, preset.det_nx
    factor = np.ones((ny, nx), dtype=np.float32)
    hot = np.zeros((ny, nx), dtype=np.float32)
    npix = nx * ny
    n_dead = max(3, int(2e-4 * npix))
    idx = rng.choice(npix, size=n_dead, replace=False)
    factor.flat[idx[: n_dead // 2]] = rng.uniform(0.0, 0.05, n_dead // 2)
    factor.flat[idx[n_dead // 2 :]] = rng.uniform(0.3, 0.7, n_dead - n_dead // 2)
    for _ in range(max(1, nx // 512)):  # dead or low partial columns
        col = rng.integers(5, nx - 5)
        y0 = rng.integers(0, ny // 2)
        factor[y0 : y0 + rng.integers(ny // 4, ny // 2), col] = rng.choice([0.0, 0.5])
    n_hot = max(3, int(1e-4 * npix))
    hot.flat[rng.choice(npix, size=n_hot, replace=False)] = rng.uniform(1.0, 100.0, n_hot)
    for _ in range(max(1, nx // 512)):  # hot column segments
        col = rng.integers(5, nx - 5)
        y0 = rng.integers(0, ny // 2)
        hot[y0:, col] += rng.uniform(0.5, 3.0)
    return Defects(factor, hot, float(rng.uniform(0.002, 0.02)))


def response_map(
    preset: SimPreset,
    seed: int,
    detector: int,
    band: str,
    *,
    x0: float,
    y0: float,
    fp_radius: float,
) -> np.ndarray:
    """Relative response (flat field) of one detector in one band.

    Vignetting across the focal plane (detector origin ``x0, y0`` in
    focal-plane pixels), ~1% pixel response non-uniformity, one or two dust
    donuts of a few % depth, dead/low pixels and columns. Mean ~0.95.
    """
    ny, nx = preset.det_ny, preset.det_nx
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    r2 = ((xx + x0) ** 2 + (yy + y0) ** 2) / fp_radius**2
    resp = 1.0 - _VIGNETTING[band] * r2
    rng = rng_for(seed, "prnu", detector)
    prnu = rng.normal(0.0, 0.01, size=(ny, nx)).astype(np.float32)
    resp *= 1.0 + _PRNU_SCALE[band] * prnu
    # A weak band-dependent large-scale gradient (coating non-uniformity).
    gx, gy = rng.normal(0.0, 0.01, 2)
    resp *= 1.0 + (gx * (xx / nx - 0.5) + gy * (yy / ny - 0.5)) * (_PRNU_SCALE[band] - 0.7) * 3
    for _ in range(rng.integers(1, 3)):
        cx, cy = rng.uniform(40, nx - 40), rng.uniform(40, ny - 40)
        rad, width = rng.uniform(15, 35), rng.uniform(4, 8)
        rr = np.hypot(xx - cx, yy - cy)
        resp *= 1.0 - _DUST_DEPTH[band] * np.exp(-0.5 * ((rr - rad) / width) ** 2)
    resp *= detector_defects(preset, seed, detector).response_factor
    return resp.astype(np.float32)


def dark_rate_map(preset: SimPreset, seed: int, detector: int) -> np.ndarray:
    """Dark current per pixel, e-/s (base level plus hot pixels and columns)."""
    defects = detector_defects(preset, seed, detector)
    return (defects.base_dark + defects.hot_rate).astype(np.float32)


def add_cosmic_rays(
    image: np.ndarray, rng: np.random.Generator, *, rate: float, darktime: float
) -> np.ndarray:
    """Deposit cosmic-ray tracks in ``image`` (e-), in place; return their mask.

    Tracks are straight, 1-12 pixels long, with 1000-8000 e- per pixel crossed;
    the number is Poisson with mean ``rate * npix * darktime``.
    """
    ny, nx = image.shape
    mask = np.zeros(image.shape, dtype=bool)
    n = rng.poisson(rate * nx * ny * darktime)
    for _ in range(n):
        x, y = rng.uniform(0, nx), rng.uniform(0, ny)
        length = rng.exponential(4.0) + 1.0
        ang = rng.uniform(0, np.pi)
        dep = rng.uniform(1000.0, 8000.0)
        steps = max(2, int(length * 3))
        t = np.linspace(0.0, min(length, 12.0), steps)
        px = np.clip((x + t * np.cos(ang)).astype(int), 0, nx - 1)
        py = np.clip((y + t * np.sin(ang)).astype(int), 0, ny - 1)
        cells = np.unique(py * nx + px)
        image.flat[cells] += dep * rng.uniform(0.5, 1.5, len(cells))
        mask.flat[cells] = True
    return mask


def bleed(image: np.ndarray, full_well: np.ndarray) -> np.ndarray:
    """Spill charge above full well up and down the column (charge conserving), in place.

    Returns the mask of pixels at full well after bleeding.
    """
    over = image > full_well
    for col in np.flatnonzero(over.any(axis=0)):
        column = image[:, col]
        fw = full_well[:, col]
        rows = np.flatnonzero(column > fw)
        excess = float(np.sum(column[rows] - fw[rows]))
        column[rows] = fw[rows]
        centre = int(np.median(rows))
        up, down = excess / 2.0, excess / 2.0
        for direction, amount in ((1, up), (-1, down)):
            j = centre
            while amount > 0 and 0 <= j < len(column):
                room = fw[j] - column[j]
                if room > 0:
                    take = min(room, amount)
                    column[j] += take
                    amount -= take
                j += direction
    return image >= full_well * 0.999


def full_well_map(
    preset: SimPreset, amps: list[AmpLayout], electronics: pd.DataFrame
) -> np.ndarray:
    """Full well (e-) of every pixel, from its amplifier."""
    fw = np.zeros((preset.det_ny, preset.det_nx), dtype=np.float32)
    by_name = electronics.set_index("amplifier")
    for amp in amps:
        fw[amp.det_y0 : amp.det_y0 + amp.ny, amp.det_x0 : amp.det_x0 + amp.nx] = by_name.loc[
            amp.name, "full_well"
        ]
    return fw


def _bias_structure(seed: int, detector: int, amp: AmpLayout) -> np.ndarray:
    """Fixed bias structure in ADU (serial start-up transient plus a faint column pattern)."""
    rng = rng_for(seed, "bias_structure", detector, amp.index)
    ncol = amp.raw_shape[1]
    cols = np.arange(ncol, dtype=np.float32)
    ramp = rng.uniform(3.0, 8.0) * np.exp(-cols / rng.uniform(5.0, 15.0))
    pattern = rng.normal(0.0, 0.5, ncol).astype(np.float32)
    pattern[amp.prescan + amp.nx :] = 0.0  # the overscan sees no column pattern
    return (ramp + pattern)[None, :]


def read_out(
    electrons: np.ndarray,
    amps: list[AmpLayout],
    electronics: pd.DataFrame,
    rng: np.random.Generator,
    *,
    seed: int,
    detector: int,
    raw_dtype: str = "int32",
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Convert a detector image in e- to raw amplifier images (ADU) with their cards.

    Per amplifier: gain, Gaussian read noise, bias level, a fixed bias
    structure, and a per-row bias jitter shared by the data and the overscan of
    that row; raw values are clipped to [0, SATURATE]. The pixels are
    ``raw_dtype`` (the preset's ``raw_dtype``): integer types are rounded to whole
    ADU, ``float32`` keeps the fractional ADU.
    """
    by_name = electronics.set_index("amplifier")
    out: list[tuple[np.ndarray, dict[str, Any]]] = []
    for amp in amps:
        e = by_name.loc[amp.name]
        gain, rn = float(e["gain"]), float(e["read_noise"])
        ny, ncol = amp.raw_shape
        raw = np.zeros((ny, ncol), dtype=np.float64)
        raw[:, amp.prescan : amp.prescan + amp.nx] = amp.segment(electrons) / gain
        raw += rng.normal(0.0, rn / gain, size=raw.shape)
        jitter = rng.normal(0.0, 2.5, ny) + np.cumsum(rng.normal(0.0, 0.3, ny))
        raw += float(e["bias_level"]) + jitter[:, None]
        raw += _bias_structure(seed, detector, amp)
        if raw_dtype == "float32":
            data = np.clip(raw, 0, float(e["saturate"])).astype(np.float32)
        else:
            data = np.clip(np.rint(raw), 0, float(e["saturate"])).astype(raw_dtype)
        cards: dict[str, Any] = {
            "EXTNAME": amp.name,
            "DATASEC": amp.datasec(),
            "BIASSEC": amp.biassec(),
            "DETSEC": amp.detsec(),
            "GAIN": round(gain, 5),
            "RDNOISE": round(rn, 4),
            "SATURATE": float(e["saturate"]),
            "BUNIT": "adu",
        }
        out.append((data, cards))
    return out
