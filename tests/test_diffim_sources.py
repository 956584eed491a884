"""DIASource detection on a synthetic difference image (workflow_lib.diffim.sources)."""

from __future__ import annotations

import numpy as np
import pytest

from workflow_lib.core.exposure import MASK_DTYPE, MaskPlanes
from workflow_lib.core.flags import ARTIFACT_DIA_SOURCE, DiaSourceFlag
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.diffim.sources import detect_dia_sources, pair_dipoles

SIGMA = 1.7  # PSF sigma, pixels


def _psf_stamp(dx: float = 0.0, dy: float = 0.0, half: int = 12) -> np.ndarray:
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    g = np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * SIGMA**2))
    return g / g.sum()


def _add(image, flux, x, y):  # type: ignore[no-untyped-def]
    ix, iy = round(x), round(y)
    image[iy - 12 : iy + 13, ix - 12 : ix + 13] += flux * _psf_stamp(x - ix, y - iy)


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(12)
    shape, sigma_noise = (256, 256), 10.0
    image = rng.normal(0.0, sigma_noise, shape)
    truth = {"positive": (60.3, 70.6, 4000.0), "negative": (190.2, 60.4, -3000.0)}
    for x, y, f in truth.values():
        _add(image, f, x, y)
    # A dipole: a star of 20000 shifted by 0.6 px between template and science.
    _add(image, 20000.0, 120.3, 180.0)
    _add(image, -20000.0, 120.9, 180.0)
    variance = np.full(shape, sigma_noise**2)
    planes = MaskPlanes()
    mask = np.zeros(shape, dtype=MASK_DTYPE)
    mask[:, 240:] = planes.bitmask("NO_DATA")  # the template stops 16 px from the edge
    _add(image, 5000.0, 236.0, 128.0)  # a transient at the template's edge
    psf = PsfModel.constant(_psf_stamp())
    table = detect_dia_sources(image, variance, mask, planes, psf)
    return table, truth


def test_positive_and_negative_sources_are_found_with_their_fluxes(scene):
    table, truth = scene
    for name, (x, y, f) in truth.items():
        d = np.hypot(table["x"] - x, table["y"] - y)
        row = table.loc[d.idxmin()]
        assert d.min() < 0.3, name
        assert row["psf_flux"] == pytest.approx(f, abs=4 * row["psf_flux_err"])
        negative = bool(int(row["flags"]) & DiaSourceFlag.NEGATIVE)
        assert negative == (f < 0) and not row["is_dipole"]
        assert abs(row["snr"]) > 40  # 3000 / (10 sqrt(4 pi) 1.7) = 50 expected


def test_dipole_is_one_source_and_flagged(scene):
    table, _ = scene
    near = table[np.hypot(table["x"] - 120.6, table["y"] - 180.0) < 6]
    assert len(near) == 1 and bool(near["is_dipole"].iloc[0])
    assert int(near["flags"].iloc[0]) & DiaSourceFlag.DIPOLE


def test_template_edge_is_an_artifact_and_noise_gives_few_false_sources(scene):
    table, _ = scene
    edge = table[np.hypot(table["x"] - 236.0, table["y"] - 128.0) < 3]
    assert len(edge) == 1 and int(edge["flags"].iloc[0]) & DiaSourceFlag.TEMPLATE_EDGE
    assert int(edge["flags"].iloc[0]) & ARTIFACT_DIA_SOURCE
    # 4 real sources; pure noise at 5 sigma over 60k pixels gives < 1 expected.
    assert len(table) <= 5


def test_dipole_pairing_needs_both_lobes_comparable():
    import pandas as pd

    pos = pd.DataFrame({"x": [10.0, 50.0], "y": [10.0, 50.0], "lobe_flux": [100.0, 100.0]})
    neg = pd.DataFrame({"x": [12.0, 51.0], "y": [10.0, 50.0], "lobe_flux": [-90.0, -5.0]})
    assert pair_dipoles(pos, neg, 4.0, 0.2) == [(0, 0)]
