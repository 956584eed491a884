"""The template of one CCD: every template-coadd patch that overlaps it, in the calexp's pixels.

dia_pipe's ``GetCoaddAsMultiTractTemplate``: each overlapping patch (of any
tract) is warped onto the calexp's own pixel grid with the warper of the
static sky (:func:`workflow_lib.static_sky.warp.warp_exposure`), and the warps
are stitched. Patches overlap by their borders, where both hold the same sky;
a pixel takes the patch whose *inner* region holds it (where that patch's
coadd is deepest and farthest from its own edge), else the first patch that
has data there. Where no patch has data the template is ``NO_DATA``.

The template's PSF is that of the patch covering most of the CCD, warped with
it: the coadd PSF's POLYPIX fit, which follows the inputs' PSFs across the
patch for direct-warp templates (the default), and is one model PSF for
PSF-matched ones. Where the CCD spans patches of different PSFs, the other
patches' PSFs are not used (a PSF per pixel region is not done).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS

from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes

TEMPLATE_SATURATED_PLANE = "SAT_TEMPLATE"  # the template's SAT pixels, in the calexp frame


@dataclass(frozen=True)
class TemplatePiece:
    """One patch's template coadd warped to the calexp, with its inner region's mask."""

    warp: Exposure  # in calexp pixels, cropped; ``origin`` is its (x0, y0) on the calexp
    inner: np.ndarray  # bool, warp.shape: the pixel lies in the patch's inner region


@dataclass(frozen=True)
class CcdTemplate:
    """The stitched template on the calexp's grid and what it covers."""

    exposure: Exposure
    coverage: float  # fraction of the CCD's pixels with template data
    n_patches: int  # patches that contributed pixels


def inner_region_mask(
    warp: Exposure, patch_wcs: WCS, inner_bbox: tuple[int, int, int, int]
) -> np.ndarray:
    """Pixels of ``warp`` whose sky position falls in the patch's inner bbox (x0, y0, nx, ny).

    Evaluated on a grid every 8 pixels and expanded: the inner region's edge
    is a straight line in the patch frame, so a pixel-exact boundary is not
    needed (both neighbours hold the same sky there).
    """
    ny, nx = warp.shape
    step = 8
    gx = np.arange(0, nx + step - 1, step, dtype=np.float64).clip(max=nx - 1)
    gy = np.arange(0, ny + step - 1, step, dtype=np.float64).clip(max=ny - 1)
    xx, yy = np.meshgrid(gx, gy)
    assert warp.wcs is not None
    ra, dec = warp.wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
    px, py = patch_wcs.all_world2pix(ra, dec, 0)
    x0, y0, inx, iny = inner_bbox
    inside = (px >= x0 - 0.5) & (px < x0 + inx - 0.5) & (py >= y0 - 0.5) & (py < y0 + iny - 0.5)
    coarse = inside.reshape(xx.shape)
    rows = np.minimum(np.arange(ny) // step, coarse.shape[0] - 1)
    cols = np.minimum(np.arange(nx) // step, coarse.shape[1] - 1)
    return coarse[np.ix_(rows, cols)]


def stitch_template(
    pieces: Sequence[TemplatePiece], shape: tuple[int, int], wcs: WCS
) -> CcdTemplate:
    """Stitch warped template patches onto the calexp grid of ``shape``.

    Each pixel takes the first piece whose inner region holds it and has data,
    else the first piece with data; the rest is NO_DATA. The template's SAT
    pixels are carried as their own plane (``SAT_TEMPLATE``) so that the
    kernel fit and the DIASource flags can tell template saturation apart.
    """
    planes = MaskPlanes()
    no_data = planes.bitmask("NO_DATA")
    image = np.zeros(shape, dtype=np.float32)
    variance = np.zeros(shape, dtype=np.float32)
    mask = np.full(shape, no_data, dtype=MASK_DTYPE)
    filled = np.zeros(shape, dtype=bool)
    used = np.zeros(len(pieces), dtype=np.int64)
    sat_bit = np.int32(1 << planes.add(TEMPLATE_SATURATED_PLANE))
    for pass_inner in (True, False):
        for i, piece in enumerate(pieces):
            w = piece.warp
            x0, y0 = w.origin
            ny, nx = w.shape
            region = (slice(y0, y0 + ny), slice(x0, x0 + nx))
            has_data = ~w.mask_of("NO_DATA")
            take = has_data & ~filled[region]
            if pass_inner:
                take &= piece.inner
            if not take.any():
                continue
            used[i] += int(take.sum())
            piece_mask = w.mask_planes.translate(w.mask, planes)
            if "SAT" in w.mask_planes.bits:
                piece_mask = np.where(w.mask_of("SAT"), piece_mask | sat_bit, piece_mask)
            image[region][take] = w.image[take]
            variance[region][take] = w.variance[take]
            mask[region][take] = piece_mask[take]
            filled[region] |= take
    best = int(np.argmax(used)) if len(pieces) else -1
    psf = pieces[best].warp.psf if best >= 0 else None
    if psf is not None and pieces[best].warp.origin != (0, 0):
        psf = _psf_in_parent_frame(psf, pieces[best].warp.origin)
    exposure = Exposure(
        image,
        variance,
        mask,
        wcs=wcs,
        psf=psf,
        mask_planes=planes,
        photo_calib=pieces[best].warp.photo_calib if best >= 0 else None,
    )
    return CcdTemplate(
        exposure=exposure,
        coverage=float(filled.mean()),
        n_patches=int((used > 0).sum()),
    )


def template_self_weight(shares: Sequence[np.ndarray]) -> float:
    """The science visit's mean share of its template's input weight over the CCD.

    ``shares`` holds, per template piece in stitching order, the visit's share
    of that patch's coadd weight at one common grid of CCD points (NaN where
    the patch has no input there; see ``CoaddPsf.visit_weight_share``). Each
    point takes the first piece with a value, as stitching takes the first
    piece with data; the mean is over the points any piece covers (0.0 when
    none does: no template, nothing of the visit in it).
    """
    if not len(shares):
        return 0.0
    stacked = np.vstack([np.asarray(s, dtype=np.float64) for s in shares])
    covered = np.isfinite(stacked)
    first = np.argmax(covered, axis=0)
    points = covered.any(axis=0)
    if not points.any():
        return 0.0
    values = stacked[first, np.arange(stacked.shape[1])]
    return float(values[points].mean())


def _psf_in_parent_frame(psf, origin: tuple[int, int]):
    """The same PSF model with its polynomial centre moved from crop to calexp pixels."""
    from dataclasses import replace

    x0, y0 = origin
    box = psf.fit_box
    moved_box = None if box is None else (box[0] + x0, box[1] + x0, box[2] + y0, box[3] + y0)
    return replace(psf, x_center=psf.x_center + x0, y_center=psf.y_center + y0, fit_box=moved_box)
