"""Instrument signature removal numerics (array in, array out; no file I/O).

This module starts with what both the simulator's tests and the ISR stage
need: parsing FITS section strings and assembling amplifier images into a
detector image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_SECTION_RE = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")


@dataclass(frozen=True)
class Section:
    """A FITS image section as 0-based numpy slices.

    ``x``/``y`` always run upwards (``start < stop``); ``x_flip``/``y_flip``
    record that the FITS text listed that axis high-to-low, which for DETSEC
    means the amplifier reads that axis in reverse.
    """

    x: slice
    y: slice
    x_flip: bool = False
    y_flip: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the section."""
        return (self.y.stop - self.y.start, self.x.stop - self.x.start)

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(y, x)`` slices, to index a numpy image."""
        return (self.y, self.x)


def parse_section(text: str) -> Section:
    """Parse a FITS 1-based inclusive section ``'[x1:x2,y1:y2]'``.

    ``x1 > x2`` (or ``y1 > y2``) means that axis is flipped. Raises
    ValueError on anything else (missing brackets, zero or negative indices,
    non-integers).
    """
    if not isinstance(text, str):
        raise ValueError(f"section must be a string like '[1:512,1:2002]', got {text!r}")
    match = _SECTION_RE.match(text)
    if match is None:
        raise ValueError(f"malformed FITS section {text!r}; expected '[x1:x2,y1:y2]'")
    x1, x2, y1, y2 = (int(g) for g in match.groups())
    if min(x1, x2, y1, y2) < 1:
        raise ValueError(f"FITS section {text!r} has an index < 1 (sections are 1-based)")
    return Section(
        x=slice(min(x1, x2) - 1, max(x1, x2)),
        y=slice(min(y1, y2) - 1, max(y1, y2)),
        x_flip=x1 > x2,
        y_flip=y1 > y2,
    )


def amplifier_gains(amps: Sequence[tuple[np.ndarray, Mapping[str, Any]]]) -> list[float]:
    """The ``GAIN`` (e-/ADU) of every amplifier; KeyError naming the amplifier if absent."""
    gains = []
    for k, (_, header) in enumerate(amps):
        if "GAIN" not in header:
            raise KeyError(f"amplifier {header.get('EXTNAME', k)} has no GAIN keyword")
        gains.append(float(header["GAIN"]))
    return gains


def overscan_per_row(data: np.ndarray, biassec: Section, datasec: Section) -> np.ndarray:
    """Robust per-row overscan level for the rows of ``datasec``.

    The median of the BIASSEC pixels of each row (rows matched by index when
    BIASSEC and DATASEC cover the same rows, otherwise one overall median).
    """
    over = np.asarray(data[biassec.slices], dtype=np.float64)
    if biassec.y == datasec.y:
        return np.median(over, axis=1)
    return np.full(datasec.shape[0], np.median(over))


def assemble_amplifiers(
    amps: Sequence[tuple[np.ndarray, Mapping[str, Any]]],
    *,
    overscan_subtract: bool = False,
    dtype: type | np.dtype = np.float32,
) -> np.ndarray:
    """Place each amplifier's DATASEC pixels in the detector at its DETSEC.

    Axes flipped in DETSEC are reversed, so the assembled image has the
    detector's orientation. With ``overscan_subtract`` each data row first
    loses the median of the same row of BIASSEC (row-correlated bias jitter
    is common to data and overscan). The detector size is the union of the
    DETSECs.
    """
    if not amps:
        raise ValueError("no amplifiers to assemble")
    parsed = []
    for k, (data, header) in enumerate(amps):
        name = header.get("EXTNAME", k)
        try:
            datasec = parse_section(header["DATASEC"])
            detsec = parse_section(header["DETSEC"])
        except KeyError as err:
            raise KeyError(f"amplifier {name} lacks {err.args[0]}") from None
        if datasec.shape != detsec.shape:
            raise ValueError(
                f"amplifier {name}: DATASEC {header['DATASEC']} and DETSEC "
                f"{header['DETSEC']} differ in size"
            )
        if overscan_subtract and "BIASSEC" not in header:
            raise KeyError(f"amplifier {name} lacks BIASSEC")
        biassec = parse_section(header["BIASSEC"]) if overscan_subtract else None
        parsed.append((np.asarray(data), datasec, detsec, biassec))
    ny = max(d.y.stop for _, _, d, _ in parsed)
    nx = max(d.x.stop for _, _, d, _ in parsed)
    image = np.zeros((ny, nx), dtype=dtype)
    for data, datasec, detsec, biassec in parsed:
        pix = np.asarray(data[datasec.slices], dtype=np.float64)
        if biassec is not None:
            pix = pix - overscan_per_row(data, biassec, datasec)[:, None]
        if detsec.x_flip:
            pix = pix[:, ::-1]
        if detsec.y_flip:
            pix = pix[::-1, :]
        image[detsec.slices] = pix
    return image
