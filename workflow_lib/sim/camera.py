"""Focal plane and amplifier geometry (LSSTCam-like), and per-amplifier electronics.

Numpy only. A detector of ``det_nx x det_ny`` pixels is read out by two rows of
``n_amp_x`` amplifiers. Each raw amplifier image holds ``prescan`` columns,
the data section, then ``overscan`` serial-overscan columns; raw row 0 / data
column 0 is the first pixel read out. As on LSSTCam, some amplifiers read
their segment right-to-left (DETSEC flipped in x) and the whole top row reads
top-down (DETSEC flipped in y).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from workflow_lib.sim.presets import SimPreset
from workflow_lib.sim.seeds import rng_for

UINT16_MAX = 65535


@dataclass(frozen=True)
class AmpLayout:
    """Where one amplifier's pixels come from and go to (0-based, half-open)."""

    name: str
    index: int
    det_x0: int  # first detector column of the segment
    det_y0: int  # first detector row of the segment
    nx: int
    ny: int
    x_flip: bool
    y_flip: bool
    prescan: int
    overscan: int

    @property
    def raw_shape(self) -> tuple[int, int]:
        return (self.ny, self.prescan + self.nx + self.overscan)

    def datasec(self) -> str:
        return f"[{self.prescan + 1}:{self.prescan + self.nx},1:{self.ny}]"

    def biassec(self) -> str:
        x1 = self.prescan + self.nx + 1
        return f"[{x1}:{x1 + self.overscan - 1},1:{self.ny}]"

    def detsec(self) -> str:
        x1, x2 = self.det_x0 + 1, self.det_x0 + self.nx
        y1, y2 = self.det_y0 + 1, self.det_y0 + self.ny
        if self.x_flip:
            x1, x2 = x2, x1
        if self.y_flip:
            y1, y2 = y2, y1
        return f"[{x1}:{x2},{y1}:{y2}]"

    def segment(self, image: np.ndarray) -> np.ndarray:
        """This amplifier's segment of a detector image, in readout order."""
        seg = image[self.det_y0 : self.det_y0 + self.ny, self.det_x0 : self.det_x0 + self.nx]
        if self.x_flip:
            seg = seg[:, ::-1]
        if self.y_flip:
            seg = seg[::-1, :]
        return seg


def amp_layouts(preset: SimPreset) -> list[AmpLayout]:
    """Amplifier layout of every detector (all detectors are alike)."""
    nx = preset.det_nx // preset.n_amp_x
    ny = preset.det_ny // 2
    amps: list[AmpLayout] = []
    for row in (0, 1):
        for col in range(preset.n_amp_x):
            index = row * preset.n_amp_x + col
            # Bottom row: odd segments read right-to-left; top row: read top-down,
            # and (like LSSTCam's C1x) right-to-left for even segments.
            x_flip = (col % 2 == 1) if row == 0 else (col % 2 == 0)
            amps.append(
                AmpLayout(
                    name=f"C{row}{col}",
                    index=index,
                    det_x0=col * nx,
                    det_y0=row * ny,
                    nx=nx,
                    ny=ny,
                    x_flip=x_flip,
                    y_flip=row == 1,
                    prescan=preset.prescan,
                    overscan=preset.overscan,
                )
            )
    return amps


def detector_origins(preset: SimPreset) -> pd.DataFrame:
    """Focal-plane position of every detector.

    Columns: detector, x0, y0 — the focal-plane pixel coordinates (relative to
    the optical axis) of the detector's pixel (0, 0). Detectors tile a grid
    with gaps, centred on the optical axis.
    """
    pitch_x = preset.det_nx + preset.gap_px
    pitch_y = preset.det_ny + preset.gap_px
    width = preset.n_det_x * pitch_x - preset.gap_px
    height = preset.n_det_y * pitch_y - preset.gap_px
    rows = []
    for j in range(preset.n_det_y):
        for i in range(preset.n_det_x):
            rows.append(
                {
                    "detector": j * preset.n_det_x + i,
                    "x0": i * pitch_x - width / 2.0,
                    "y0": j * pitch_y - height / 2.0,
                }
            )
    return pd.DataFrame(rows)


def focal_plane_radius(preset: SimPreset) -> float:
    """Distance (pixels) from the optical axis to the farthest detector corner."""
    width = preset.n_det_x * (preset.det_nx + preset.gap_px) - preset.gap_px
    height = preset.n_det_y * (preset.det_ny + preset.gap_px) - preset.gap_px
    return float(np.hypot(width, height) / 2.0)


def amplifier_electronics(preset: SimPreset, seed: int) -> pd.DataFrame:
    """Gain, read noise, bias level, full well and saturation of every amplifier.

    SATURATE is the ADC/pipeline saturation in ADU (bias included), a little
    below full well, so that every pixel at full well reads as saturated.
    A ``uint16`` camera (``preset.raw_dtype``) has three times the gain
    (2.7-5.4 e-/ADU, DECam-like) and bias levels of 1000-5000 ADU, from the
    same random draws, so that SATURATE stays below 65535.
    """
    rows = []
    sixteen_bit = preset.raw_dtype == "uint16"
    for det in range(preset.n_detectors):
        rng = rng_for(seed, "electronics", det)
        det_bias = rng.uniform(1000.0, 25000.0)
        if sixteen_bit:
            det_bias = 1000.0 + (det_bias - 1000.0) / 6.0
        for amp in amp_layouts(preset):
            gain = rng.uniform(0.9, 1.8)
            full_well = rng.uniform(100e3, 150e3)
            bias = det_bias + rng.normal(0.0, 150.0)
            if sixteen_bit:
                gain *= 3.0
            saturate = float(np.floor(bias + 0.97 * full_well / gain))
            if sixteen_bit:
                saturate = min(saturate, float(UINT16_MAX))
            rows.append(
                {
                    "detector": det,
                    "amplifier": amp.name,
                    "gain": gain,
                    "read_noise": rng.uniform(4.0, 9.0),
                    "bias_level": bias,
                    "full_well": full_well,
                    "saturate": saturate,
                }
            )
    return pd.DataFrame(rows)
