"""DIASource detection on a synthetic difference image (workflow_lib.diffim.sources)."""

from __future__ import annotations

import numpy as np
import pandas as pd
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


def test_residuals_of_static_stars_are_flagged_but_real_changes_are_not():
    """Six bright stars leave 2 % residuals (a slightly mis-matched PSF): that ratio is
    measured, their residual lobes are STATIC_RESIDUAL (an artifact), while a 30 % change
    of another such star and a hostless transient stay clean; a ratio past the gate flags
    every DIASource BAD_SUBTRACTION."""
    rng = np.random.default_rng(3)
    shape = (256, 256)
    image = rng.normal(0.0, 10.0, shape)
    stars = [(40.0 + 35 * i, 60.0 + 25 * (i % 2), 2e5) for i in range(6)]
    for x, y, f in stars:  # science PSF 5 % wider than the template's: a ring residual
        ix, iy = round(x), round(y)
        yy, xx = np.mgrid[-12:13, -12:13]
        wide = np.exp(-((xx - x + ix) ** 2 + (yy - y + iy) ** 2) / (2 * (1.05 * SIGMA) ** 2))
        image[iy - 12 : iy + 13, ix - 12 : ix + 13] += f * (
            wide / wide.sum() - _psf_stamp(x - ix, y - iy)
        )
    _add(image, 0.3 * 2e5, 128.0, 190.0)  # a variable star of 2e5 brightened by 30 %
    _add(image, 3000.0, 200.0, 200.0)  # a hostless transient
    static = pd.DataFrame(
        {
            "x": [s[0] for s in stars] + [128.0, 200.0],
            "y": [s[1] for s in stars] + [190.0, 200.0],
            "flux": [s[2] for s in stars] + [2e5, 3000.0],
        }
    )
    planes, mask = MaskPlanes(), np.zeros(shape, dtype=MASK_DTYPE)
    psf = PsfModel.constant(_psf_stamp())
    args = (image, np.full(shape, 100.0), mask, planes, psf)
    table = detect_dia_sources(*args, static_sources=static, reference_stars=static.iloc[:6])
    assert 0.005 < table.attrs["residual_ratio"] < 0.05 and table.attrs["n_residual_stars"] == 6
    flagged = (table["flags"] & int(DiaSourceFlag.STATIC_RESIDUAL)) != 0
    at_stars = np.min([np.hypot(table["x"] - x, table["y"] - y) for x, y, _ in stars], axis=0) < 6
    assert at_stars.sum() >= 6 and flagged[at_stars].all()
    for x, y in ((128.0, 190.0), (200.0, 200.0)):
        real = np.hypot(table["x"] - x, table["y"] - y) < 2
        assert real.sum() == 1 and not flagged[real].any()
        assert not (table.loc[real, "flags"] & ARTIFACT_DIA_SOURCE).any()
    assert not table.attrs["bad_subtraction"]
    # The same with a tighter quality gate: the subtraction fails it, everything is marked.
    from workflow_lib.diffim.sources import DiaDetectionConfig

    gated = detect_dia_sources(
        *args,
        DiaDetectionConfig(max_residual_ratio=0.001),
        static_sources=static,
        reference_stars=static.iloc[:6],
    )
    assert gated.attrs["bad_subtraction"]
    assert ((gated["flags"] & int(DiaSourceFlag.BAD_SUBTRACTION)) != 0).all()
    # Without reference stars nothing is flagged for residuals (the ratio is unknown).
    plain = detect_dia_sources(*args, static_sources=static)
    assert np.isnan(plain.attrs["residual_ratio"])
    assert not ((plain["flags"] & int(DiaSourceFlag.STATIC_RESIDUAL)) != 0).any()
