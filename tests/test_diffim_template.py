"""Stitching a CCD's template from patch warps (workflow_lib.diffim.template)."""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS

from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.diffim.template import (
    TEMPLATE_SATURATED_PLANE,
    TemplatePiece,
    inner_region_mask,
    stitch_template,
    template_self_weight,
)


def _wcs(crpix=(50.0, 50.0)) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, -30.0]
    w.wcs.crpix = list(crpix)
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def _piece(value: float, origin, shape, inner_cols, sat=None) -> TemplatePiece:  # type: ignore[no-untyped-def]
    planes = MaskPlanes()
    mask = np.zeros(shape, dtype=MASK_DTYPE)
    if sat is not None:
        mask[sat] |= planes.bitmask("SAT")
    psf = PsfModel.constant(np.outer(np.hanning(7), np.hanning(7)) + 1e-3)
    warp = Exposure(
        np.full(shape, value),
        np.full(shape, value / 10),
        mask,
        psf=psf,
        mask_planes=planes,
        origin=origin,
    )
    inner = np.zeros(shape, dtype=bool)
    inner[:, inner_cols] = True
    return TemplatePiece(warp=warp, inner=inner)


def test_each_pixel_takes_the_patch_whose_inner_region_holds_it():
    # Two patches overlapping in columns 40-59 of a 100 x 80 CCD; inner regions meet at 50.
    a = _piece(1.0, (0, 0), (80, 60), slice(0, 50), sat=(slice(10, 12), slice(5, 7)))
    b = _piece(2.0, (40, 0), (80, 50), slice(10, 50))
    t = stitch_template([a, b], (80, 100), _wcs())
    img = t.exposure.image
    assert np.all(img[:, :50] == 1.0) and np.all(img[:, 50:90] == 2.0)
    assert t.exposure.mask_of("NO_DATA")[:, 90:].all() and t.coverage == 0.9
    assert t.n_patches == 2
    sat = t.exposure.mask_of(TEMPLATE_SATURATED_PLANE)
    assert sat[10:12, 5:7].all() and sat.sum() == 4


def test_outside_every_inner_region_the_first_patch_with_data_fills():
    a = _piece(1.0, (0, 0), (80, 60), slice(0, 0))  # no inner pixels on this CCD
    b = _piece(2.0, (40, 0), (80, 50), slice(30, 50))
    t = stitch_template([a, b], (80, 100), _wcs())
    img = t.exposure.image
    assert np.all(img[:, :60] == 1.0) and np.all(img[:, 70:90] == 2.0)
    assert np.all(img[:, 60:70] == 2.0)


def test_inner_region_mask_follows_the_patch_frame():
    calexp_wcs = _wcs((0.0, 0.0))
    warp = Exposure(
        np.zeros((64, 64)), np.zeros((64, 64)), np.zeros((64, 64), MASK_DTYPE), wcs=calexp_wcs
    )
    patch_wcs = _wcs((-20.0, 0.0))  # patch x = calexp x - 20 (same sky, shifted frame)
    inner = inner_region_mask(warp, patch_wcs, (0, 0, 50, 100))
    # patch 0 <= x < 50 is calexp 20 <= x < 70, to the 8-pixel grid of the mask
    cols = np.flatnonzero(inner.all(axis=0))
    assert 16 <= cols.min() <= 24 and cols.max() == 63
    assert not inner[:, :16].any()


def test_template_self_weight_takes_the_first_patch_with_inputs_at_each_point():
    nan = np.nan
    first = np.array([1.0, 1.0, nan, nan])
    second = np.array([0.0, 0.0, 0.25, nan])
    # Points 0-1 from the first patch, point 2 from the second, point 3 uncovered.
    assert template_self_weight([first, second]) == (1.0 + 1.0 + 0.25) / 3
    assert template_self_weight([]) == 0.0
    assert template_self_weight([np.full(3, nan)]) == 0.0
