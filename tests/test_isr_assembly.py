"""Section parsing and amplifier assembly (workflow_lib.single_frame.isr)."""

from __future__ import annotations

import numpy as np
import pytest

from workflow_lib.core.registry import Section, parse_section
from workflow_lib.single_frame.isr import amplifier_gains, assemble_amplifiers


def test_parse_section_plain():
    s = parse_section("[9:264,1:256]")
    assert s == Section(x=slice(8, 264), y=slice(0, 256), x_flip=False, y_flip=False)
    assert s.shape == (256, 256)


def test_parse_section_flips_and_blanks():
    s = parse_section(" [ 256:1 , 512:257 ] ")
    assert (s.x, s.y, s.x_flip, s.y_flip) == (slice(0, 256), slice(256, 512), True, True)
    s = parse_section("[5:5,3:1]")
    assert s.shape == (3, 1) and not s.x_flip and s.y_flip


@pytest.mark.parametrize(
    "text", ["", "[1:10]", "1:10,1:10", "[1:10,1:x]", "[0:10,1:10]", "[1:10;1:10]", "[-1:4,1:2]"]
)
def test_parse_section_malformed(text):
    with pytest.raises(ValueError, match="section"):
        parse_section(text)


def test_parse_section_not_a_string():
    with pytest.raises(ValueError):
        parse_section(None)  # type: ignore[arg-type]


def _make_amps(truth: np.ndarray, rng: np.random.Generator, *, big_endian: bool = False):
    """Split ``truth`` into 4 amps (2x2) with LSST-like flips, prescan and overscan."""
    ny, nx = truth.shape
    hy, hx = ny // 2, nx // 2
    pre, over = 3, 6
    amps = []
    for row in (0, 1):
        for col in (0, 1):
            seg = truth[row * hy : (row + 1) * hy, col * hx : (col + 1) * hx]
            xf = (col == 1) if row == 0 else (col == 0)
            yf = row == 1
            read = seg[:, ::-1] if xf else seg
            read = read[::-1, :] if yf else read
            jitter = rng.normal(0, 5, hy)[:, None]
            raw = np.full((hy, pre + hx + over), 1000.0 + 100 * (2 * row + col)) + jitter
            raw[:, pre : pre + hx] += read
            x1, x2 = col * hx + 1, (col + 1) * hx
            y1, y2 = row * hy + 1, (row + 1) * hy
            if xf:
                x1, x2 = x2, x1
            if yf:
                y1, y2 = y2, y1
            header = {
                "EXTNAME": f"C{row}{col}",
                "DATASEC": f"[{pre + 1}:{pre + hx},1:{hy}]",
                "BIASSEC": f"[{pre + hx + 1}:{pre + hx + over},1:{hy}]",
                "DETSEC": f"[{x1}:{x2},{y1}:{y2}]",
                "GAIN": 1.0 + 0.1 * (2 * row + col),
            }
            data = raw.astype(">f8") if big_endian else raw
            amps.append((data, header))
    return amps


@pytest.mark.parametrize("big_endian", [False, True])
def test_assemble_places_and_flips(big_endian):
    rng = np.random.default_rng(1)
    ny, nx = 20, 16
    truth = np.arange(ny * nx, dtype=float).reshape(ny, nx)  # every pixel unique
    amps = _make_amps(truth, rng, big_endian=big_endian)
    image = assemble_amplifiers(amps, overscan_subtract=True, dtype=np.float64)
    # Row jitter is in data and overscan alike: row-wise subtraction removes it exactly.
    np.testing.assert_allclose(image, truth, atol=1e-9)
    # Without overscan subtraction, the bias (and jitter) stays.
    raw = assemble_amplifiers(amps)
    assert raw.shape == (ny, nx)
    assert np.all(raw - truth > 900)
    assert amplifier_gains(amps) == pytest.approx([1.0, 1.1, 1.2, 1.3])


def test_assemble_errors():
    rng = np.random.default_rng(2)
    amps = _make_amps(np.zeros((8, 8)), rng)
    bad = [(amps[0][0], {**amps[0][1], "DETSEC": "[1:3,1:4]"})]
    with pytest.raises(ValueError, match="differ in size"):
        assemble_amplifiers(bad)
    missing = [(amps[0][0], {k: v for k, v in amps[0][1].items() if k != "DETSEC"})]
    with pytest.raises(KeyError, match="DETSEC"):
        assemble_amplifiers(missing)
    with pytest.raises(ValueError):
        assemble_amplifiers([])
    with pytest.raises(KeyError, match="GAIN"):
        amplifier_gains([(amps[0][0], {"EXTNAME": "C00"})])
