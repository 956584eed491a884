"""Warping: resample a calexp onto another pixel grid (a patch), conserving flux.

The LSST ``makeWarp`` step, as numerics on arrays (no files):

* **Pixel mapping.** Every target pixel goes target pixel -> sky -> source
  (calexp) pixel. Doing that through the WCS on every pixel is what makes
  ``reproject_interp`` slow (the TAN-SIP inverse is iterative), so the exact
  mapping is evaluated on a coarse grid of nodes (every ``grid_step`` target
  pixels, as SWarp does) and a tensor-product cubic spline interpolates it.
  The spline is checked against the exact mapping at every cell centre and the
  grid refined until the largest error is below ``mapping_tolerance``
  (0.001 px by default; recorded as ``WARPMERR``).
* **Resampling** with a separable Lanczos kernel (``lanczos3`` by default, the
  kernel LSST and SWarp use), tabulated at 1/2048 pixel phases and normalised
  to unit sum, applied with vectorised gathers over row tiles; image and
  variance are gathered together as one complex array. ``spline3`` (scipy's
  prefiltered cubic B-spline, ``map_coordinates``) is the alternative.
* **Flux.** Images are in nJy per pixel: the interpolated value (a surface
  brightness times a source pixel's area) is multiplied by the Jacobian
  J = |d(source)/d(target)| (source pixels per target pixel), interpolated
  from exact finite differences on the same grid. Variance is multiplied by J^2.
* **Variance.** As in LSST, the variance plane is resampled with the *same*
  kernel as the image. The resampled noise is correlated: the per-pixel variance
  of the warped image is smaller (by sum w^2, 0.6-1 for Lanczos-3 depending on the
  sub-pixel phase) but the variance of a sum over an area larger than the kernel
  (an aperture or PSF flux) is what the plane predicts; coadds and measurements
  treat it that way. The mean per-pixel factor is recorded as ``WARPVCOR``.
* **Mask.** Each output pixel gets the OR of the mask bits of the source pixels
  of the 2x2 bilinear footprint around its source position (LSST's
  ``maskWarpingKernelName = "bilinear"``); the planes of ``full_footprint_planes``
  (NO_DATA, BAD, SAT, EDGE by default) are grown over the whole resampling
  kernel, so any pixel whose value touched such a pixel says so. Target pixels
  whose kernel footprint is not entirely inside the input are NO_DATA with
  image and variance 0 (LSST's edge-pixel rule; the project's NO_DATA convention).
* **Crop.** The result covers the bounding box of the pixels that have data,
  with ``origin`` in the target frame and the target WCS shifted to it.
* **PSF.** The calexp PSF seen through the local affine part of the mapping
  (rotation, flip, scale, shear): at a few positions the calexp PSF kernel is
  resampled (same kernel as the image) through the local Jacobian, and a
  :class:`~workflow_lib.single_frame.psf.PsfModel` polynomial is fitted to those kernels in
  the warp's own pixels (LSST's ``WarpedPsf``, made storable).

PSF matching to a model PSF (the "psfMatchedWarp" flavour) is in
:mod:`workflow_lib.static_sky.psf_matching`; its public functions are re-exported here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy import sparse
from scipy.interpolate import BSpline, make_interp_spline

from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes, copy_cards
from workflow_lib.core.psf_model import PsfModel, fit_psf_model
from workflow_lib.single_frame.measure import ApertureCorrection, without_aperture_correction
from workflow_lib.static_sky.psf_matching import PsfMatchingError, model_psf, psf_match_exposure

__all__ = [
    "PixelMapping",
    "PsfMatchingError",
    "build_pixel_mapping",
    "exact_source_pixels",
    "model_psf",
    "overlap_bbox",
    "psf_match_exposure",
    "resample_array",
    "warp_exposure",
    "warp_psf",
]

log = logging.getLogger(__name__)

Bbox = tuple[int, int, int, int]

# Kernel name -> half-width a (taps floor-a+1 .. floor+a).
KERNEL_HALF_WIDTH: dict[str, int] = {
    "bilinear": 1,
    "lanczos2": 2,
    "lanczos3": 3,
    "lanczos4": 4,
    "lanczos5": 5,
    "spline3": 2,
}
DEFAULT_FULL_FOOTPRINT_PLANES: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "EDGE")
_N_PHASES = 2048  # sub-pixel phases of the tabulated kernel: <= 1/4096 px rounding
_WCS_KEY = re.compile(
    r"^(WCSAXES|WCSNAME|CTYPE\d|CUNIT\d|CRVAL\d|CRPIX\d|CDELT\d|CROTA\d|CD\d_\d|PC\d_\d|PV\d_\d+"
    r"|LONPOLE|LATPOLE|RADESYS|EQUINOX|MJDREF|DATEREF|A_\w+|B_\w+|AP_\w+|BP_\w+|LTV\d|LTM\d_\d)$"
)


# --------------------------------------------------------------------------
# Pixel mapping: exact on a coarse grid, tensor cubic spline in between
# --------------------------------------------------------------------------
def exact_source_pixels(
    source_wcs: WCS, target_wcs: WCS, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Source (0-based) pixel coordinates of target pixels (x, y), through the sky, exactly.

    Both WCSs must use the same celestial frame. The inverse of a TAN-SIP WCS
    is solved iteratively to 1e-8 px (not taken from the approximate AP/BP).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ra, dec = target_wcs.all_pix2world(x.ravel(), y.ravel(), 0)
    if source_wcs.sip is None and not source_wcs.has_distortion:
        sx, sy = source_wcs.wcs_world2pix(ra, dec, 0)
    else:
        sx, sy = source_wcs.all_world2pix(ra, dec, 0, tolerance=1e-8, maxiter=100, quiet=True)
    return np.asarray(sx, float).reshape(x.shape), np.asarray(sy, float).reshape(y.shape)


def _check_frames(source_wcs: WCS, target_wcs: WCS) -> None:
    for w, name in ((source_wcs, "source"), (target_wcs, "target")):
        if not w.has_celestial or w.naxis != 2:
            raise ValueError(f"{name} WCS must be a 2-d celestial WCS")
    types = [tuple(t[:4] for t in w.wcs.ctype) for w in (source_wcs, target_wcs)]
    if types[0] != types[1]:
        raise ValueError(f"source and target WCS use different celestial axes: {types}")


def overlap_bbox(
    source_wcs: WCS, source_shape: tuple[int, int], target_wcs: WCS, target_bbox: Bbox
) -> Bbox | None:
    """Part of ``target_bbox`` (target pixels) that the source image's footprint covers.

    The source's outer pixel edges are mapped into the target frame; the image
    of a region's boundary bounds the image of the region, so their bounding
    box (rounded outwards) holds every target pixel with data. None if empty.
    """
    ny, nx = source_shape
    step = 16.0
    ex = np.linspace(-0.5, nx - 0.5, max(2, int(np.ceil(nx / step)) + 1))
    ey = np.linspace(-0.5, ny - 0.5, max(2, int(np.ceil(ny / step)) + 1))
    px = np.concatenate([ex, ex, np.full(ey.size, -0.5), np.full(ey.size, nx - 0.5)])
    py = np.concatenate([np.full(ex.size, -0.5), np.full(ex.size, ny - 0.5), ey, ey])
    ra, dec = source_wcs.all_pix2world(px, py, 0)
    with np.errstate(invalid="ignore"):
        tx, ty = target_wcs.all_world2pix(ra, dec, 0, tolerance=1e-6, maxiter=50, quiet=True)
    ok = np.isfinite(tx) & np.isfinite(ty)
    if not ok.all():
        # Part of the source lies where the target projection is undefined
        # (opposite hemisphere): no sensible warp onto this grid.
        return None
    bx0, by0, bnx, bny = (int(v) for v in target_bbox)
    x0 = max(bx0, int(np.floor(tx.min())))
    y0 = max(by0, int(np.floor(ty.min())))
    x1 = min(bx0 + bnx - 1, int(np.ceil(tx.max())))
    y1 = min(by0 + bny - 1, int(np.ceil(ty.max())))
    if x1 < x0 or y1 < y0:
        return None
    return (x0, y0, x1 - x0 + 1, y1 - y0 + 1)


def _nodes(start: int, n: int, step: float) -> np.ndarray:
    """Node positions covering pixels start .. start+n-1 (at least 2, ends included)."""
    count = max(2, int(np.ceil((n - 1) / step)) + 1)
    if n == 1:
        return np.array([start - 0.5, start + 0.5], dtype=np.float64)
    return np.linspace(start, start + n - 1, count)


def _interp_coefficients(
    ynodes: np.ndarray, xnodes: np.ndarray, values: np.ndarray, k: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Knots (ty, tx) and coefficients C of the tensor interpolating spline of ``values``."""
    sy = make_interp_spline(ynodes, values, k=k[0], axis=0)
    sx = make_interp_spline(xnodes, sy.c.T, k=k[1], axis=0)
    return sy.t, sx.t, sx.c.T


@dataclass(frozen=True)
class PixelMapping:
    """Target pixel -> source pixel mapping over a target-frame ``bbox``.

    Source x, source y and the Jacobian determinant J (source pixels per
    target pixel) are tensor-product splines of degree ``k`` through their
    exact values at the nodes ``xnodes`` x ``ynodes`` (target-frame pixels).
    ``max_error`` is the largest distance (source px) between spline and exact
    mapping at the cell centres, where a spline's error is largest.
    """

    bbox: Bbox
    xnodes: np.ndarray
    ynodes: np.ndarray
    k: tuple[int, int]
    tx: np.ndarray
    ty: np.ndarray
    coefficients: np.ndarray  # (3, n_coef_y, n_coef_x): source x, source y, J
    max_error: float
    grid_step: float

    def _design(self, t: np.ndarray, k: int, values: np.ndarray) -> sparse.csr_array:
        lo, hi = t[k], t[-k - 1]
        return BSpline.design_matrix(np.clip(values, lo, hi), t, k)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source x, source y, J) at target-frame points (x, y) of any shape."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        by = self._design(self.ty, self.k[0], y.ravel())
        bx = self._design(self.tx, self.k[1], x.ravel())
        out = []
        for c in self.coefficients:
            out.append(np.asarray((by @ c) * bx.toarray()).sum(axis=1).reshape(x.shape))
        return out[0], out[1], out[2]

    def block_evaluator(self) -> _BlockEvaluator:
        """Fast evaluation on blocks of the bbox's pixel grid (the resampling loop's access)."""
        x0, y0, nx, ny = self.bbox
        bx = self._design(self.tx, self.k[1], x0 + np.arange(nx, dtype=np.float64))
        # (3, n_coef_y, nx): the x-direction contraction done once for every column.
        partial = np.ascontiguousarray(
            np.stack([np.asarray((bx @ c.T).T) for c in self.coefficients])
        )
        by = self._design(self.ty, self.k[0], y0 + np.arange(ny, dtype=np.float64))
        return _BlockEvaluator(by.tocsr(), partial)


@dataclass(frozen=True)
class _BlockEvaluator:
    by: sparse.csr_array
    partial: np.ndarray

    def rows(self, rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Source x, source y and J on bbox rows ``rows`` (bbox-relative), every column."""
        b = self.by[rows]
        x, y, jacobian = (np.asarray(b @ p) for p in self.partial)  # partial: (3, ...)
        return x, y, jacobian


def _exact_with_jacobian(
    source_wcs: WCS, target_wcs: WCS, x: np.ndarray, y: np.ndarray, *, delta: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact source (x, y) and the 2x2 Jacobian d(source)/d(target) (central differences)."""
    n = x.size
    xs = np.concatenate([x.ravel(), x.ravel() + delta, x.ravel() - delta, x.ravel(), x.ravel()])
    ys = np.concatenate([y.ravel(), y.ravel(), y.ravel(), y.ravel() + delta, y.ravel() - delta])
    sx, sy = exact_source_pixels(source_wcs, target_wcs, xs, ys)
    sx, sy = sx.reshape(5, n), sy.reshape(5, n)
    jac = np.empty((n, 2, 2))
    jac[:, 0, 0] = (sx[1] - sx[2]) / (2 * delta)
    jac[:, 0, 1] = (sx[3] - sx[4]) / (2 * delta)
    jac[:, 1, 0] = (sy[1] - sy[2]) / (2 * delta)
    jac[:, 1, 1] = (sy[3] - sy[4]) / (2 * delta)
    return sx[0].reshape(x.shape), sy[0].reshape(x.shape), jac.reshape(*x.shape, 2, 2)


def build_pixel_mapping(
    source_wcs: WCS,
    target_wcs: WCS,
    bbox: Bbox,
    *,
    grid_step: float = 64.0,
    tolerance: float = 1e-3,
    min_step: float = 4.0,
) -> PixelMapping:
    """Spline of the target -> source pixel mapping over ``bbox`` (target frame).

    The grid starts at ``grid_step`` target pixels and is halved until the
    spline agrees with the exact mapping to ``tolerance`` source pixels at
    every cell centre (or the step reaches ``min_step``).
    """
    _check_frames(source_wcs, target_wcs)
    x0, y0, nx, ny = bbox
    step = float(grid_step)
    while True:
        xn = _nodes(x0, nx, step)
        yn = _nodes(y0, ny, step)
        gy, gx = np.meshgrid(yn, xn, indexing="ij")
        sx, sy, jac = _exact_with_jacobian(source_wcs, target_wcs, gx, gy)
        det = np.abs(jac[..., 0, 0] * jac[..., 1, 1] - jac[..., 0, 1] * jac[..., 1, 0])
        if not (np.isfinite(sx).all() and np.isfinite(sy).all()):
            raise ValueError(
                "the pixel mapping is undefined inside the overlap (WCS inverse failed)"
            )
        k = (min(3, yn.size - 1), min(3, xn.size - 1))
        coefs = []
        for values in (sx, sy, det):
            ty, tx, c = _interp_coefficients(yn, xn, values, k)
            coefs.append(c)
        mapping = PixelMapping(
            bbox=bbox,
            xnodes=xn,
            ynodes=yn,
            k=k,
            tx=tx,
            ty=ty,
            coefficients=np.stack(coefs),
            max_error=0.0,
            grid_step=step,
        )
        # Check at the cell centres (and half-way along the cell edges).
        cx = np.concatenate([xn, 0.5 * (xn[1:] + xn[:-1])])
        cy = np.concatenate([yn, 0.5 * (yn[1:] + yn[:-1])])
        my, mx = np.meshgrid(cy, cx, indexing="ij")
        ex, ey = exact_source_pixels(source_wcs, target_wcs, mx, my)
        ix, iy, _ = mapping.evaluate(mx, my)
        err = float(np.max(np.hypot(ix - ex, iy - ey)))
        mapping = PixelMapping(**{**mapping.__dict__, "max_error": err})
        if err <= tolerance or step <= min_step:
            if err > tolerance:
                log.warning("pixel mapping error %.2g px exceeds tolerance %.2g", err, tolerance)
            return mapping
        step /= 2.0


# --------------------------------------------------------------------------
# Resampling kernels
# --------------------------------------------------------------------------
@lru_cache(maxsize=8)
def kernel_table(kernel: str, n_phases: int = _N_PHASES) -> np.ndarray:
    """Weights (2a, n_phases + 1) of the taps floor-a+1 .. floor+a for fractional
    offsets d = q / n_phases, q = 0 .. n_phases; rows normalised to unit sum."""
    a = KERNEL_HALF_WIDTH[kernel]
    d = np.arange(n_phases + 1, dtype=np.float64) / n_phases
    t = d[None, :] - (np.arange(2 * a) - (a - 1))[:, None]
    if kernel == "bilinear":
        w = np.clip(1.0 - np.abs(t), 0.0, None)
    elif kernel.startswith("lanczos"):
        w = np.sinc(t) * np.sinc(t / a)
        w[np.abs(t) >= a] = 0.0
    else:
        raise ValueError(f"no tabulated weights for kernel {kernel!r}")
    w /= w.sum(axis=0, keepdims=True)
    table = w.astype(np.float32)
    table.setflags(write=False)
    return table


def _check_kernel(kernel: str) -> int:
    if kernel not in KERNEL_HALF_WIDTH:
        raise ValueError(
            f"unknown warping kernel {kernel!r}; known: {', '.join(KERNEL_HALF_WIDTH)}"
        )
    return KERNEL_HALF_WIDTH[kernel]


def _lanczos_gather(
    flat: np.ndarray,
    width: int,
    base: np.ndarray,
    qx: np.ndarray,
    qy: np.ndarray,
    table: np.ndarray,
) -> np.ndarray:
    """Separable tabulated-kernel interpolation: sum_j wy_j sum_i wx_i src[base + j*width + i]."""
    taps = table.shape[0]
    tab = table.astype(flat.dtype)
    wx = [tab[i].take(qx) for i in range(taps)]
    scratch = np.empty(base.shape, dtype=flat.dtype)
    row = np.empty(base.shape, dtype=flat.dtype)
    acc = np.empty(base.shape, dtype=flat.dtype)
    for j in range(taps):
        for i in range(taps):
            flat[j * width + i :].take(base, out=scratch, mode="wrap")
            if i == 0:
                np.multiply(scratch, wx[0], out=row)
            else:
                scratch *= wx[i]
                row += scratch
        if j == 0:
            np.multiply(row, tab[0].take(qy), out=acc)
        else:
            row *= tab[j].take(qy)
            acc += row
    return acc


def _footprint_base(
    sx: np.ndarray, sy: np.ndarray, a: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Valid flag, flat index of the footprint's top-left pixel, tabulated phases, floor index."""
    ny, nx = shape
    with np.errstate(invalid="ignore"):
        fx = np.floor(sx)
        fy = np.floor(sy)
        valid = (fx >= a - 1) & (fx <= nx - 1 - a) & (fy >= a - 1) & (fy <= ny - 1 - a)
    dx = sx - fx
    dy = sy - fy
    if not valid.all():
        invalid = ~valid
        fx[invalid] = fy[invalid] = a - 1
        dx[invalid] = dy[invalid] = 0.0
    # d in [0, 1): rounding to the nearest tabulated phase (q = n_phases is d ~ 1).
    qx = (dx * _N_PHASES + 0.5).astype(np.intp)
    qy = (dy * _N_PHASES + 0.5).astype(np.intp)
    floor_index = fy.astype(np.intp) * nx + fx.astype(np.intp)
    base = floor_index - (a - 1) * (nx + 1)
    return valid, base, qx, qy, floor_index


def resample_array(
    array: np.ndarray, sx: np.ndarray, sy: np.ndarray, *, kernel: str = "lanczos3"
) -> tuple[np.ndarray, np.ndarray]:
    """Values of ``array`` interpolated at 0-based (sx, sy); and where the footprint was inside.

    For small arrays (PSF kernels) and tests; the warp itself uses the same
    weights through its tiled loop. Outside values are 0.
    """
    a = _check_kernel(kernel)
    array = np.ascontiguousarray(array)
    if kernel == "spline3":
        from scipy.ndimage import map_coordinates

        out = map_coordinates(array, [np.ravel(sy), np.ravel(sx)], order=3, mode="constant")
        valid, *_ = _footprint_base(np.ravel(sx), np.ravel(sy), a, array.shape)
        return np.where(valid, out, 0).reshape(np.shape(sx)), valid.reshape(np.shape(sx))
    valid, base, qx, qy, _ = _footprint_base(np.ravel(sx), np.ravel(sy), a, array.shape)
    flat = array.ravel()
    if flat.dtype.kind not in "fc":
        flat = flat.astype(np.float64)
    pad = np.concatenate([flat, np.zeros(2 * a * (array.shape[1] + 1), flat.dtype)])
    out = _lanczos_gather(pad, array.shape[1], base, qx, qy, kernel_table(kernel))
    return np.where(valid, out, 0).reshape(np.shape(sx)), valid.reshape(np.shape(sx))


def _aligned_mask_bits(
    severe_flat: np.ndarray,
    mask_flat: np.ndarray,
    width: int,
    base: np.ndarray,
    floor_index: np.ndarray,
    qx: np.ndarray,
    qy: np.ndarray,
) -> np.ndarray:
    """Mask bits for pixels whose source position is (within 1/4096 px) on a pixel
    column or row: the bilinear footprint keeps only the pixels with non-zero weight."""
    m = severe_flat.take(base)
    x_lo, x_hi = qx < _N_PHASES, qx > 0
    y_lo, y_hi = qy < _N_PHASES, qy > 0
    for use, offset in (
        (x_lo & y_lo, 0),
        (x_hi & y_lo, 1),
        (x_lo & y_hi, width),
        (x_hi & y_hi, width + 1),
    ):
        m |= np.where(use, mask_flat.take(floor_index + offset), 0).astype(MASK_DTYPE)
    return m


def _forward_or(mask: np.ndarray, width: int, axis: int) -> np.ndarray:
    """OR of ``mask`` over [i, i + width) along ``axis`` (zeros beyond the end), by doubling."""
    out = mask.copy()
    span = 1
    while span < width:
        shift = min(span, width - span)
        src = out.copy()
        if axis == 1:
            out[:, :-shift] |= src[:, shift:]
        else:
            out[:-shift] |= src[shift:]
        span += shift
    return out


# --------------------------------------------------------------------------
# The warped PSF
# --------------------------------------------------------------------------
def warp_psf(
    psf: PsfModel,
    source_wcs: WCS,
    target_wcs: WCS,
    origin: tuple[int, int],
    shape: tuple[int, int],
    source_shape: tuple[int, int],
    *,
    kernel: str = "lanczos3",
    order: int | None = None,
) -> PsfModel:
    """``psf`` (source pixels) seen in the pixels of a warp at ``origin`` of ``target_wcs``.

    At a grid of (order+3)^2 positions spread over the part of the *source*
    image under the warp (where the source model is valid and the warp has
    data), the source kernel is resampled through the local Jacobian
    d(source)/d(target) with the warping kernel (what warping does to a
    star), and a polynomial of ``order`` (default: the source model's) in the
    warp's own pixel coordinates is fitted pixel by pixel.
    """
    ny, nx = shape
    sny, snx = source_shape
    order = psf.order if order is None else int(order)
    n_side = order + 3
    # Sample where the warp has data: the source region under the warp's bbox.
    ex = origin[0] + np.array([-0.5, nx - 0.5, nx - 0.5, -0.5, (nx - 1) / 2.0, (nx - 1) / 2.0])
    ey = origin[1] + np.array([-0.5, -0.5, ny - 0.5, ny - 0.5, -0.5, ny - 0.5])
    cx, cy = exact_source_pixels(source_wcs, target_wcs, ex, ey)
    lo_x, hi_x = np.clip([cx.min(), cx.max()], 0, snx - 1)
    lo_y, hi_y = np.clip([cy.min(), cy.max()], 0, sny - 1)
    gsx, gsy = (
        g.ravel()
        for g in np.meshgrid(np.linspace(lo_x, hi_x, n_side), np.linspace(lo_y, hi_y, n_side))
    )
    ra, dec = source_wcs.all_pix2world(gsx, gsy, 0)
    tx, ty = target_wcs.all_world2pix(ra, dec, 0, tolerance=1e-8, maxiter=100, quiet=True)
    src_x, src_y, jac = _exact_with_jacobian(source_wcs, target_wcs, tx, ty)
    inv = np.linalg.inv(jac)
    stretch = float(np.max(np.linalg.svd(inv, compute_uv=False)))
    h_src = psf.size // 2
    half = int(np.clip(np.ceil(h_src * stretch), 2, 2 * h_src))
    size = 2 * half + 1
    off = np.arange(-half, half + 1, dtype=np.float64)
    dv, du = np.meshgrid(off, off, indexing="ij")
    a = KERNEL_HALF_WIDTH[kernel]
    kernels = np.empty((gsx.size, size, size))
    for n in range(gsx.size):
        src = np.pad(psf.kernel_at(float(src_x[n]), float(src_y[n])), a + 1)
        c = h_src + a + 1
        sxk = c + jac[n, 0, 0] * du + jac[n, 0, 1] * dv
        syk = c + jac[n, 1, 0] * du + jac[n, 1, 1] * dv
        warped, _ = resample_array(src, sxk, syk, kernel=kernel)
        kernels[n] = warped / warped.sum()
    return fit_psf_model(tx - origin[0], ty - origin[1], kernels, order, (ny, nx))


# --------------------------------------------------------------------------
# warp_exposure
# --------------------------------------------------------------------------
def _shifted_wcs(wcs: WCS, x0: int, y0: int, nx: int, ny: int) -> WCS:
    out = wcs.slice((slice(y0, y0 + ny), slice(x0, x0 + nx)))
    out.pixel_shape = (nx, ny)
    return out


def _warp_metadata(exposure: Exposure, **cards: object) -> fits.Header:
    """The input's metadata minus WCS cards, with VISIT and BAND spelled out."""
    header = copy_cards(
        exposure.metadata,
        lambda key: key in ("", "COMMENT", "HISTORY") or bool(_WCS_KEY.match(key)),
    )
    if "VISIT" not in header and "EXPID" in header:
        header["VISIT"] = (int(header["EXPID"]), "visit id")
    if "BAND" not in header and "FILTER" in header:
        header["BAND"] = (str(header["FILTER"]).strip().lower(), "band")
    for key, value in cards.items():
        header[key] = value
    return header


def warp_exposure(
    exposure: Exposure,
    target_wcs: WCS,
    target_bbox: Bbox,
    *,
    kernel: str = "lanczos3",
    grid_step: float = 64.0,
    mapping_tolerance: float = 1e-3,
    full_footprint_planes: tuple[str, ...] = DEFAULT_FULL_FOOTPRINT_PLANES,
    tile_size: int = 128,
    psf_order: int | None = None,
) -> Exposure | None:
    """Resample ``exposure`` onto the pixels of ``target_wcs`` inside ``target_bbox``.

    ``target_bbox`` is (x0, y0, nx, ny) in ``target_wcs`` pixels (for a patch:
    the patch WCS and (0, 0, nx, ny)). Returns the warp cropped to the pixels
    that have data, with ``origin`` = its (x0, y0) in the target frame, the
    target WCS shifted to the crop, image in the input's units per *target*
    pixel (flux conserving), variance and mask propagated (see the module
    notes), NO_DATA where there is no input, the PSF as a PsfModel in the
    warp's pixels, and the input's photo_calib and metadata (plus ``VISIT``,
    ``BAND`` and ``WARP*`` cards). None if nothing overlaps.
    """
    if exposure.wcs is None:
        raise ValueError("cannot warp an exposure without a WCS")
    a = _check_kernel(kernel)
    _check_frames(exposure.wcs, target_wcs)
    crop = overlap_bbox(exposure.wcs, exposure.shape, target_wcs, target_bbox)
    if crop is None:
        return None
    mapping = build_pixel_mapping(
        exposure.wcs, target_wcs, crop, grid_step=grid_step, tolerance=mapping_tolerance
    )
    cx0, cy0, cnx, cny = crop
    sny, snx = exposure.shape
    planes = MaskPlanes(dict(exposure.mask_planes.bits))
    no_data = np.int32(planes.bitmask("NO_DATA"))
    severe_bits = 0
    for name in full_footprint_planes:
        severe_bits |= 1 << planes.add(name)

    # Source planes; non-finite pixels become BAD zeros so they cannot spread NaN.
    image = exposure.image
    variance = exposure.variance
    smask = exposure.mask
    finite = np.isfinite(image) & np.isfinite(variance)
    if not finite.all():
        image = np.where(finite, image, 0.0)
        variance = np.where(finite, variance, 0.0)
        smask = smask | np.where(finite, 0, planes.bitmask("BAD")).astype(MASK_DTYPE)
    # Valid footprints never reach past the last source pixel, so the flat source
    # arrays need no padding (invalid pixels read pixel 0 and are overwritten).
    # Mask bits each output pixel gets, anchored at its footprint's top-left source
    # pixel: the full-footprint planes over 2a x 2a, the others over the 2 x 2
    # bilinear footprint at floor(source position).
    severe = smask & np.int32(severe_bits)
    if severe.any():
        severe = _forward_or(_forward_or(severe, 2 * a, 1), 2 * a, 0)
    anchored = severe.copy()
    bilinear = _forward_or(_forward_or(smask, 2, 1), 2, 0)
    anchored[: sny - (a - 1), : snx - (a - 1)] |= bilinear[a - 1 :, a - 1 :]
    del bilinear
    anchored_mask = anchored.ravel()
    mask_flat = np.ascontiguousarray(smask).ravel()
    severe_flat = severe.ravel()
    if kernel == "spline3":
        from scipy.ndimage import spline_filter

        pre_image = spline_filter(image.astype(np.float64), order=3)
        pre_var = spline_filter(variance.astype(np.float64), order=3)
    else:
        both = np.empty(snx * sny, dtype=np.complex64)
        both.real = image.ravel()
        both.imag = variance.ravel()
        table = kernel_table(kernel)
        wsq = table.astype(np.float64) ** 2

    out_image = np.zeros((cny, cnx), dtype=np.float32)
    out_var = np.zeros((cny, cnx), dtype=np.float32)
    out_mask = np.full((cny, cnx), no_data, dtype=MASK_DTYPE)
    evaluator = mapping.block_evaluator()
    noise_factor_sum, noise_factor_n = 0.0, 0
    # Square blocks keep each block's source footprint in cache whatever the rotation.
    for r0 in range(0, cny, tile_size):
        rows = slice(r0, min(cny, r0 + tile_size))
        band = evaluator.rows(rows)
        for c0 in range(0, cnx, tile_size):
            cols = slice(c0, min(cnx, c0 + tile_size))
            sx, sy = band[0][:, cols].ravel(), band[1][:, cols].ravel()
            jac = band[2][:, cols].ravel().astype(np.float32)
            valid, base, qx, qy, floor_index = _footprint_base(sx, sy, a, (sny, snx))
            if not valid.any():
                continue
            if kernel == "spline3":
                from scipy.ndimage import map_coordinates

                coords = [sy, sx]
                img = map_coordinates(pre_image, coords, order=3, prefilter=False, mode="nearest")
                var = map_coordinates(pre_var, coords, order=3, prefilter=False, mode="nearest")
                np.maximum(var, 0.0, out=var)
            else:
                vals = _lanczos_gather(both, snx, base, qx, qy, table)
                img, var = vals.real, vals.imag
                # Per-pixel variance factor of the resampled noise (sum of w^2), on a sample.
                sample = slice(None, None, 97)
                factor = wsq[:, qx[sample]].sum(axis=0) * wsq[:, qy[sample]].sum(axis=0)
                noise_factor_sum += float(factor[valid[sample]].sum())
                noise_factor_n += int(valid[sample].sum())
            m = anchored_mask.take(base)
            # Exactly aligned axes: only the pixels with weight (LSST's bilinear rule).
            aligned = (qx == 0) | (qx == _N_PHASES) | (qy == 0) | (qy == _N_PHASES)
            if aligned.any():
                m[aligned] = _aligned_mask_bits(
                    severe_flat,
                    mask_flat,
                    snx,
                    base[aligned],
                    floor_index[aligned],
                    qx[aligned],
                    qy[aligned],
                )
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            img = img * jac
            var = var * (jac * jac)
            if not valid.all():
                invalid = ~valid
                img[invalid] = 0.0
                var[invalid] = 0.0
                m[invalid] = no_data
            out_image[rows, cols] = img.reshape(shape)
            out_var[rows, cols] = var.reshape(shape)
            out_mask[rows, cols] = m.reshape(shape)

    has_data = (out_mask & no_data) == 0
    data_cols = np.flatnonzero(has_data.any(axis=0))
    rws = np.flatnonzero(has_data.any(axis=1))
    if data_cols.size == 0:
        return None
    xs = slice(int(data_cols[0]), int(data_cols[-1]) + 1)
    ys = slice(int(rws[0]), int(rws[-1]) + 1)
    x0, y0 = cx0 + xs.start, cy0 + ys.start
    nx, ny = xs.stop - xs.start, ys.stop - ys.start
    wcs = _shifted_wcs(target_wcs, x0, y0, nx, ny)

    psf = None
    if exposure.psf is not None:
        psf = warp_psf(
            exposure.psf,
            exposure.wcs,
            target_wcs,
            (x0, y0),
            (ny, nx),
            exposure.shape,
            kernel=kernel,
            order=psf_order,
        )
    vcor = noise_factor_sum / noise_factor_n if noise_factor_n else float("nan")
    metadata = _warp_metadata(
        exposure,
        WARPKERN=(kernel, "resampling kernel"),
        WARPGRID=(mapping.grid_step, "[px] step of the exact-mapping grid"),
        WARPMERR=(mapping.max_error, "[px] max error of the interpolated mapping"),
        WARPVCOR=(vcor if np.isfinite(vcor) else -1.0, "mean per-pixel noise variance factor"),
    )
    apcorr = ApertureCorrection.from_header(exposure.metadata)
    if apcorr is not None:
        # The input's correction (in its own pixels) at the input pixel under the
        # warp's centre: the coadd's correction is the inputs' weighted mean.
        ra, dec = target_wcs.all_pix2world([x0 + (nx - 1) / 2.0], [y0 + (ny - 1) / 2.0], 0)
        sx, sy = exposure.wcs.all_world2pix(ra, dec, 0)
        sx = np.clip(np.asarray(sx, dtype=np.float64), 0.0, snx - 1.0)
        sy = np.clip(np.asarray(sy, dtype=np.float64), 0.0, sny - 1.0)
        metadata = without_aperture_correction(metadata)
        metadata["APCORR"] = (
            float(apcorr.ratio_at(sx, sy)[0][0]),
            "aperture correction at the warp centre",
        )
    log.debug(
        "warp: crop %s, grid %.0f px (max error %.2g px), kernel %s",
        (x0, y0, nx, ny),
        mapping.grid_step,
        mapping.max_error,
        kernel,
    )
    return Exposure(
        image=out_image[ys, xs],
        variance=out_var[ys, xs],
        mask=out_mask[ys, xs],
        wcs=wcs,
        psf=psf,
        photo_calib=exposure.photo_calib,
        metadata=metadata,
        mask_planes=planes,
        origin=(x0, y0),
    )
