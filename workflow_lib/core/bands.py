"""The LSST bands: their order (blue to red) and the colour each is drawn in."""

from __future__ import annotations

from collections.abc import Iterable

BAND_ORDER = "ugrizy"
# Plot colours per band (colour-blind-safe, blue to red as LSST's plots draw them).
BAND_COLOURS = {
    "u": "#56b4e9",
    "g": "#009e73",
    "r": "#d55e00",
    "i": "#cc79a7",
    "z": "#000000",
    "y": "#e69f00",
}


def sorted_bands(bands: Iterable[str]) -> list[str]:
    """Distinct bands in ugrizy order (unknown names last, alphabetically)."""
    return sorted({str(b) for b in bands}, key=lambda b: (BAND_ORDER.find(b) % 7, b))
