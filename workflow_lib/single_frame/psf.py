"""PSF determination: choosing PSF stars and fitting a PSF model to them.

LSST's ``measurePsf`` with a PSFEx-like determiner: stars are selected from
the detections by a robust stellar locus (helped by the reference catalog when
stars are few), cut out with their neighbours masked, and fitted by a
pixelised kernel that varies as a polynomial over the CCD
(:class:`workflow_lib.core.psf_model.PsfModel`); with too few stars, an
elliptical Moffat.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from workflow_lib.core.psf_model import (
    PsfModel,
    fwhm_of_image,
    polynomial_terms,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# Fitting a PsfModel to stars (PSFEx-like)
# --------------------------------------------------------------------------

LANCZOS_ORDER = 3


def psf_star_margin(kernel_size: int) -> int:
    """Closest a PSF star's centre may be to the image edge (pixels).

    A quarter of the kernel: the stamp's core and inner wings are inside, the
    rest of it is zero-weighted. Requiring the whole stamp inside would leave
    a border of half a kernel where the PSF model is only extrapolated — on a
    512-pixel CCD with a 41-pixel kernel, 17% of the area.
    """
    return kernel_size // 4 + LANCZOS_ORDER


# Fewest stars for each polynomial order (order 0 needs MIN_PSF_STARS): a
# constant pixelised kernel is already better than a parametric one with 2
# clean stars; a spatial term needs stars spread over the image.
MIN_STARS_FOR_ORDER: dict[int, int] = {0: 2, 1: 8, 2: 20, 3: 35, 4: 55}
MIN_PSF_STARS = 2


class PsfFitError(ValueError):
    """Too few usable stars to fit a PSF model."""


@dataclass(frozen=True)
class PsfFitResult:
    """A fitted PSF model and how each input star was used.

    ``used``: stars that entered the final fit; ``chi2``: reduced chi^2 of
    each star's stamp against the final model (NaN where it could not be
    cut out); ``amplitude``: fitted flux in kernel units (sum of the kernel).
    ``method``: ``pixel`` (the PSFEx-like pixelised model) or ``moffat`` (the
    parametric fallback of :func:`fit_moffat_psf`).
    """

    psf: PsfModel
    used: np.ndarray
    chi2: np.ndarray
    amplitude: np.ndarray
    n_used: int
    order: int
    residual_rms: float
    fwhm: float
    method: str = "pixel"


def lanczos_weights(shift: np.ndarray, *, a: int = LANCZOS_ORDER) -> np.ndarray:
    """Interpolation weights (n, 2a+1) for sampling at offset ``shift`` (|shift| <= 0.5).

    Weight ``k`` (offsets -a..a) multiplies the sample at integer offset k;
    rows are normalised to unit sum so flux is conserved.
    """
    shift = np.atleast_1d(np.asarray(shift, dtype=np.float64))
    t = shift[:, None] - np.arange(-a, a + 1)[None, :]
    w = np.sinc(t) * np.sinc(t / a)
    w[np.abs(t) >= a] = 0.0
    return w / w.sum(axis=1, keepdims=True)


def shift_stamps(
    stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray, *, a: int = LANCZOS_ORDER
) -> np.ndarray:
    """Resample stamps (n, H, W) at a sub-pixel offset, losing ``a`` pixels per side.

    ``out[n, i, j] = stamps[n](i + a + dy[n], j + a + dx[n])`` by separable
    Lanczos-``a`` interpolation (close to sinc for well-sampled images): one
    pass per axis, each a strided window view contracted with the stamp's
    taps (no temporary per tap).
    """
    return resample_stamps(stamps, lanczos_weights(dx, a=a), lanczos_weights(dy, a=a))


def resample_stamps(stamps: np.ndarray, wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """Separable resampling of stamps (n, H, W) with per-stamp taps ``wx``, ``wy`` (n, 2a+1).

    ``out[n, i, j] = sum_kl wy[n, k] wx[n, l] stamps[n, i + k, j + l]``: the
    output loses ``a`` pixels per side. :func:`shift_stamps` uses Lanczos
    taps; being linear in the taps, differences of taps resample to
    differences of shifted stamps in one go.
    """
    along_x = _resample_axis(np.asarray(stamps, dtype=np.float64), wx, axis=2)
    return _resample_axis(along_x, wy, axis=1)


def _resample_axis(stamps: np.ndarray, taps: np.ndarray, *, axis: int) -> np.ndarray:
    """``out[n, ..., j, ...] = sum_k taps[n, k] stamps[n, ..., j + k, ...]`` along ``axis``."""
    from numpy.lib.stride_tricks import sliding_window_view

    windows = sliding_window_view(stamps, taps.shape[1], axis=axis)  # (n, i, j, taps)
    return np.einsum("nijk,nk->nij", windows, taps)


def cut_stamps(
    array: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int, *, fill: float = 0.0
) -> np.ndarray:
    """Square cut-outs (n, 2 half + 1, 2 half + 1) centred on integer pixels.

    Pixels outside the array get ``fill`` (converted to the array's dtype).
    Stamps wholly inside are gathered from a strided window view (one block
    copy per stamp, several times faster than per-pixel fancy indexing);
    only stamps that cross the border take the per-pixel path.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    array = np.asarray(array)
    ny, nx = array.shape
    ix = np.asarray(ix, dtype=np.int64).ravel()
    iy = np.asarray(iy, dtype=np.int64).ravel()
    size = 2 * half + 1
    if ny < size or nx < size:
        return _cut_stamps_clipped(array, ix, iy, half, fill)
    inside = (ix >= half) & (ix < nx - half) & (iy >= half) & (iy < ny - half)
    windows = sliding_window_view(array, (size, size))
    if inside.all():
        return windows[iy - half, ix - half]
    out = np.empty((ix.size, size, size), dtype=array.dtype)
    out[inside] = windows[iy[inside] - half, ix[inside] - half]
    out[~inside] = _cut_stamps_clipped(array, ix[~inside], iy[~inside], half, fill)
    return out


def _cut_stamps_clipped(
    array: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int, fill: float
) -> np.ndarray:
    ny, nx = array.shape
    off = np.arange(-half, half + 1)
    rows = iy[:, None] + off[None, :]
    cols = ix[:, None] + off[None, :]
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    out = array[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]]
    out[~inside] = np.asarray(fill).astype(array.dtype)
    return out


def kernel_centroid(kernel: np.ndarray, *, sigma: float | None = None) -> tuple[float, float]:
    """Gaussian-windowed centroid (dx, dy) of a kernel relative to its central pixel.

    The window (iterated as in ``sep.winpos``) ignores noisy wings, so this is
    the centroid that windowed source positions are consistent with.
    """
    k = np.asarray(kernel, dtype=np.float64)
    c = k.shape[0] // 2
    yy, xx = np.mgrid[: k.shape[0], : k.shape[1]] - c
    if sigma is None:
        sigma = max(fwhm_of_image(k) / 2.3548, 0.5)
    cx = cy = 0.0
    for _ in range(20):
        w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)) * k
        nx_, ny_ = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
        # winpos update: x += 2 * (windowed mean - x)
        ncx, ncy = cx + 2 * (nx_ - cx), cy + 2 * (ny_ - cy)
        if abs(ncx - cx) < 1e-6 and abs(ncy - cy) < 1e-6:
            cx, cy = ncx, ncy
            break
        cx, cy = ncx, ncy
    return float(cx), float(cy)


def _order_for(n_stars: int, requested: int) -> int:
    if n_stars < MIN_PSF_STARS:
        raise PsfFitError(f"only {n_stars} usable PSF stars (need >= {MIN_PSF_STARS})")
    order = int(requested)
    while order > 0 and n_stars < MIN_STARS_FOR_ORDER.get(order, 10 * (order + 1) ** 2):
        order -= 1
    return order


def fit_psf_model(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    x: np.ndarray,
    y: np.ndarray,
    *,
    kernel_size: int = 41,
    order: int = 2,
    clip_sigma: float = 3.0,
    max_iter: int = 3,
    segmentation: np.ndarray | None = None,
    source_ids: np.ndarray | None = None,
    model_error: float = 0.03,
) -> PsfFitResult:
    """Fit a pixelised, polynomially varying PSF to stars at (x, y) (0-based).

    ``image`` is background-subtracted. Each star is cut out, resampled
    (Lanczos-3) so its centre lands on the stamp's central pixel, and scaled
    by its fitted amplitude; every kernel pixel is then a weighted
    least-squares polynomial in (u, v) = position normalised to the image
    centre and half-size. Stars whose chi^2 is an outlier (binaries,
    galaxies, cosmic rays) are rejected iteratively. ``mask`` (bool) and
    pixels of *other* sources (``segmentation`` with ``source_ids`` the label
    of each star) get zero weight. The polynomial order drops when stars are
    few; below ``MIN_PSF_STARS`` this raises :class:`PsfFitError`.
    ``model_error`` is a fractional floor added to each pixel's noise, so
    very bright stars are not rejected for tiny interpolation residuals.
    """
    if kernel_size % 2 == 0 or kernel_size < 5:
        raise ValueError(f"kernel_size must be odd and >= 5, got {kernel_size}")
    image = np.asarray(image)
    variance = np.asarray(variance)
    ny, nx = image.shape
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    n_in = x.size
    a = LANCZOS_ORDER
    half = kernel_size // 2
    big = half + a
    finite = np.isfinite(x) & np.isfinite(y)
    ix = np.floor(np.where(finite, x, 0.0) + 0.5).astype(np.int64)
    iy = np.floor(np.where(finite, y, 0.0) + 0.5).astype(np.int64)
    edge = psf_star_margin(kernel_size)
    inside = (ix >= edge) & (ix < nx - edge) & (iy >= edge) & (iy < ny - edge) & finite
    idx = np.flatnonzero(inside)
    chi2_all = np.full(n_in, np.nan)
    amp_all = np.full(n_in, np.nan)
    used_all = np.zeros(n_in, dtype=bool)
    _order_for(idx.size, order)  # fail early

    # Stamps first, then float64 and the bad-pixel test on the stamps only.
    # Stamps that cross the image edge have zero variance (hence zero weight) outside.
    data = cut_stamps(image, ix[idx], iy[idx], big).astype(np.float64)
    var_big = cut_stamps(variance, ix[idx], iy[idx], big, fill=0.0).astype(np.float64)
    bad = ~np.isfinite(data) | ~np.isfinite(var_big) | (var_big <= 0)
    if mask is not None:
        bad |= cut_stamps(np.asarray(mask, dtype=bool), ix[idx], iy[idx], big)
    data[bad] = 0.0
    from scipy.ndimage import maximum_filter

    if segmentation is not None and source_ids is not None:
        seg = cut_stamps(np.asarray(segmentation), ix[idx], iy[idx], big)
        own = np.asarray(source_ids)[idx][:, None, None]
        # Neighbours' footprints, grown by a pixel for the wings beyond their
        # isophote, get zero weight: a star with faint neighbours still counts.
        others = maximum_filter((seg != 0) & (seg != own), size=(1, 3, 3))
        bad |= others & (seg != own)
    # A resampled pixel is bad if any input pixel of its Lanczos footprint is.

    bad = maximum_filter(bad, size=(1, 2 * a + 1, 2 * a + 1), mode="constant", cval=0)
    good = ~bad[:, a:-a, a:-a]
    stamps = shift_stamps(data, x[idx] - ix[idx], y[idx] - iy[idx])
    var = var_big[:, a:-a, a:-a]
    var_bg = np.array(
        [np.median(v[g]) if g.any() else np.inf for v, g in zip(var, good, strict=True)]
    )
    # Effective gain (variance per unit signal) from bright pixels, for the
    # predicted (noise-free) variance used as weights.
    bright = good & (stamps > 30.0 * np.sqrt(var_bg)[:, None, None])
    gain_var = 0.0
    if bright.any():
        ratio = (var - var_bg[:, None, None])[bright] / stamps[bright]
        gain_var = float(max(np.median(ratio), 0.0))

    # Initial amplitude: flux in a central box, then a median stack as model 0.
    c = half
    core = stamps[:, c - 2 : c + 3, c - 2 : c + 3].sum(axis=(1, 2))
    ok = good.all(axis=(1, 2)) | (good.mean(axis=(1, 2)) > 0.5)
    ok &= core > 0
    if ok.sum() < MIN_PSF_STARS:
        raise PsfFitError(f"only {int(ok.sum())} PSF stars with clean stamps")
    stack = np.nanmedian(np.where(good[ok], stamps[ok] / core[ok, None, None], np.nan), axis=0)
    stack = np.nan_to_num(stack)
    # Amplitudes as full-kernel flux of model 0.
    amp = core / max(stack[c - 2 : c + 3, c - 2 : c + 3].sum() / stack.sum(), 1e-12)
    u = (x[idx] - (nx - 1) / 2.0) / (nx / 2.0)
    v = (y[idx] - (ny - 1) / 2.0) / (ny / 2.0)
    models = np.broadcast_to(stack / stack.sum(), stamps.shape)
    # Amplitudes come from the core only (2 FWHM): light of a neighbour beyond
    # its masked footprint, or an error of the model's far wings, must not
    # scale a star (the pixel solve then sees that star's core too low).
    yy, xx = np.mgrid[:kernel_size, :kernel_size] - c
    core_radius = max(3.0, 2.0 * fwhm_of_image(stack, oversample=4))
    amp_region = np.hypot(xx, yy) <= core_radius
    use = ok.copy()
    fit_order = 0
    basis = (stack / stack.sum())[None]
    chi2 = np.full(idx.size, np.nan)
    for iteration in range(max(1, int(max_iter)) + 1):
        # Amplitudes against the current model, with predicted-variance weights.
        vp = var_bg[:, None, None] + gain_var * np.maximum(amp[:, None, None] * models, 0.0)
        vp = vp + (model_error * np.maximum(amp[:, None, None] * models, 0.0)) ** 2
        w = np.where(good, 1.0 / vp, 0.0)
        w_core = w * amp_region
        num = (w_core * models * stamps).sum(axis=(1, 2))
        den = (w_core * models * models).sum(axis=(1, 2))
        amp = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        use &= np.isfinite(amp) & (amp > 0)
        fit_order = _order_for(int(use.sum()), order)
        terms = polynomial_terms(u, v, fit_order)
        norm = stamps / np.where(use, amp, 1.0)[:, None, None]
        wn = np.where(use[:, None, None], w * (amp**2)[:, None, None], 0.0)
        wn = np.nan_to_num(wn)
        ws = wn.reshape(idx.size, -1)
        ds = np.nan_to_num(norm.reshape(idx.size, -1))
        lhs = np.einsum("sp,sk,sl->pkl", ws, terms, terms)
        rhs = np.einsum("sp,sp,sk->pk", ws, ds, terms)
        nt = terms.shape[1]
        ridge = 1e-10 * np.maximum(np.trace(lhs, axis1=1, axis2=2), 1e-30)
        lhs = lhs + ridge[:, None, None] * np.eye(nt)[None]
        coef = np.linalg.solve(lhs, rhs[..., None])[..., 0]  # (p, nt)
        basis = coef.T.reshape(nt, kernel_size, kernel_size)
        total = basis[0].sum()
        basis = basis / total
        amp = amp * total
        models = np.tensordot(terms, basis, axes=1)
        models /= np.tensordot(terms, basis.sum(axis=(1, 2)), axes=1)[:, None, None]
        resid = stamps - amp[:, None, None] * models
        vp = var_bg[:, None, None] + gain_var * np.maximum(amp[:, None, None] * models, 0.0)
        vp = vp + (model_error * np.maximum(amp[:, None, None] * models, 0.0)) ** 2
        ngood = good.sum(axis=(1, 2))
        chi2 = np.where(good, resid**2 / vp, 0.0).sum(axis=(1, 2)) / np.maximum(ngood, 1)
        if iteration == max_iter:
            break
        cur = chi2[use]
        med = np.median(cur)
        mad = 1.4826 * np.median(np.abs(cur - med))
        limit = max(med + clip_sigma * max(mad, 0.05 * med), 1.2 * med)
        reject = use & (chi2 > limit)
        # Never reject below the minimum for order 0, nor more than 30% at once.
        n_max = max(0, min(int(0.3 * use.sum()), int(use.sum()) - MIN_PSF_STARS))
        if reject.sum() > n_max:
            worst = np.argsort(np.where(reject, -chi2, np.inf))[:n_max]
            reject = np.zeros_like(reject)
            reject[worst] = True
        if not reject.any():
            break
        use &= ~reject

    xs_used, ys_used = x[idx][use], y[idx][use]
    psf = PsfModel(
        basis=basis,
        order=fit_order,
        x_center=(nx - 1) / 2.0,
        y_center=(ny - 1) / 2.0,
        x_scale=nx / 2.0,
        y_scale=ny / 2.0,
        fit_box=(
            (xs_used.min(), xs_used.max(), ys_used.min(), ys_used.max()) if fit_order > 0 else None
        ),
    )
    psf = recenter_psf(psf)
    used_all[idx] = use
    chi2_all[idx] = chi2
    amp_all[idx] = amp
    fwhm = psf.fwhm_at(psf.x_center, psf.y_center)
    log.debug(
        "PSF: %d/%d stars, order %d, median chi2 %.2f, FWHM %.2f px",
        int(use.sum()),
        n_in,
        fit_order,
        float(np.median(chi2[use])),
        fwhm,
    )
    return PsfFitResult(
        psf=psf,
        used=used_all,
        chi2=chi2_all,
        amplitude=amp_all,
        n_used=int(use.sum()),
        order=fit_order,
        residual_rms=float(np.sqrt(np.median(chi2[use]))),
        fwhm=float(fwhm),
    )


def moffat_kernel(
    size: int, fwhm: float, beta: float, e1: float = 0.0, e2: float = 0.0, *, oversample: int = 5
) -> np.ndarray:
    """An elliptical Moffat PSF (unit sum) integrated over the pixels of a size x size kernel.

    ``fwhm`` is the geometric-mean FWHM in pixels; (e1, e2) the ellipticity
    (a^2 - b^2) / (a^2 + b^2) of its isophotes, as distortion components.
    """
    return _moffat_images(size, fwhm, beta, e1, e2, np.zeros(1), np.zeros(1), oversample)[0]


def _moffat_images(
    size: int,
    fwhm: float,
    beta: float,
    e1: float,
    e2: float,
    dx: np.ndarray,
    dy: np.ndarray,
    oversample: int,
) -> np.ndarray:
    """Pixel-integrated unit-flux Moffat images (n, size, size) centred at (dx, dy) from the
    central pixel."""
    half = size // 2
    sub = (np.arange(size * oversample) + 0.5) / oversample - 0.5 - half
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    e = min(np.hypot(e1, e2), 0.9)
    phi = 0.5 * np.arctan2(e2, e1)
    # Inverse second-moment-like matrix of the isophotes, determinant 1 / alpha^4.
    c, s_ = np.cos(phi), np.sin(phi)
    qa, qb = np.sqrt((1 - e) / (1 + e)), np.sqrt((1 + e) / (1 - e))
    q11 = (qa * c * c + qb * s_ * s_) / alpha**2
    q22 = (qa * s_ * s_ + qb * c * c) / alpha**2
    q12 = (qa - qb) * c * s_ / alpha**2
    u = sub[None, None, :] - np.asarray(dx)[:, None, None]
    v = sub[None, :, None] - np.asarray(dy)[:, None, None]
    fine = (1.0 + q11 * u * u + 2.0 * q12 * u * v + q22 * v * v) ** (-beta)
    n = fine.shape[0]
    binned = fine.reshape(n, size, oversample, size, oversample).sum(axis=(2, 4))
    # Unit flux of the infinite profile (the kernel box truncates the wings).
    total = np.pi * alpha**2 / (beta - 1.0) * oversample**2
    return binned / total


def fit_moffat_psf(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    x: np.ndarray,
    y: np.ndarray,
    *,
    kernel_size: int = 41,
    fwhm_guess: float = 4.0,
    segmentation: np.ndarray | None = None,
    source_ids: np.ndarray | None = None,
) -> PsfFitResult:
    """A constant elliptical Moffat PSF fitted jointly to a few compact sources (0-based x, y).

    The fallback when too few clean stars exist for a pixelised model: one
    shape (FWHM, beta, e1, e2) shared by every source, each with its own
    flux and sub-pixel centre, fitted by weighted least squares on stamps of
    4 guessed FWHM around each; masked pixels and other sources' footprints
    get zero weight. Raises :class:`PsfFitError` when nothing can be fitted.
    """
    from scipy.optimize import least_squares

    image = np.asarray(image)
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    ny, nx = image.shape
    half = int(np.clip(np.ceil(2.0 * fwhm_guess), 5, kernel_size // 2))
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    inside = (ix >= half) & (ix < nx - half) & (iy >= half) & (iy < ny - half)
    idx = np.flatnonzero(inside & np.isfinite(x) & np.isfinite(y))
    if idx.size == 0:
        raise PsfFitError("no compact source for a parametric PSF")
    data = cut_stamps(image, ix[idx], iy[idx], half).astype(np.float64)
    var = cut_stamps(np.asarray(variance), ix[idx], iy[idx], half).astype(np.float64)
    good = np.isfinite(data) & np.isfinite(var) & (var > 0)
    if mask is not None:
        good &= ~cut_stamps(np.asarray(mask, dtype=bool), ix[idx], iy[idx], half, fill=True)
    if segmentation is not None and source_ids is not None:
        seg = cut_stamps(np.asarray(segmentation), ix[idx], iy[idx], half)
        own = np.asarray(source_ids)[idx][:, None, None]
        good &= (seg == 0) | (seg == own)
    weight = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0)
    data = np.where(good, data, 0.0)
    size = 2 * half + 1
    n = idx.size
    flux0 = np.maximum(data.sum(axis=(1, 2)), 1.0)

    def model(p: np.ndarray) -> np.ndarray:
        fwhm, beta, e1, e2 = p[:4]
        dx, dy, flux = p[4 : 4 + n], p[4 + n : 4 + 2 * n], p[4 + 2 * n :]
        shapes = _moffat_images(size, fwhm, beta, e1, e2, dx, dy, 3)
        return flux[:, None, None] * shapes

    def residuals(p: np.ndarray) -> np.ndarray:
        return ((model(p) - data) * np.sqrt(weight)).ravel()

    start = np.concatenate([[fwhm_guess, 3.0, 0.0, 0.0], x[idx] - ix[idx], y[idx] - iy[idx], flux0])
    lower = np.concatenate([[0.8, 1.3, -0.5, -0.5], np.full(2 * n, -1.5), 0.1 * flux0])
    upper = np.concatenate([[6.0 * fwhm_guess, 10.0, 0.5, 0.5], np.full(2 * n, 1.5), 10 * flux0])
    fit = least_squares(residuals, np.clip(start, lower, upper), bounds=(lower, upper))
    if not fit.success or not np.all(np.isfinite(fit.x)):
        raise PsfFitError(f"parametric PSF fit failed: {fit.message}")
    fwhm, beta, e1, e2 = (float(v) for v in fit.x[:4])
    kernel = moffat_kernel(kernel_size, fwhm, beta, e1, e2)
    psf = PsfModel.constant(kernel)
    psf = PsfModel(
        basis=psf.basis,
        order=0,
        x_center=(nx - 1) / 2.0,
        y_center=(ny - 1) / 2.0,
        x_scale=nx / 2.0,
        y_scale=ny / 2.0,
    )
    chi2 = np.full(x.size, np.nan)
    resid = (model(fit.x) - data) ** 2 * weight
    chi2[idx] = resid.sum(axis=(1, 2)) / np.maximum(good.sum(axis=(1, 2)), 1)
    amplitude = np.full(x.size, np.nan)
    amplitude[idx] = fit.x[4 + 2 * n :]
    used = np.zeros(x.size, dtype=bool)
    used[idx] = True
    log.info(
        "parametric PSF (Moffat) from %d source(s): FWHM %.2f px, beta %.2f, e (%.3f, %.3f)",
        n,
        fwhm,
        beta,
        e1,
        e2,
    )
    return PsfFitResult(
        psf=psf,
        used=used,
        chi2=chi2,
        amplitude=amplitude,
        n_used=n,
        order=0,
        residual_rms=float(np.sqrt(np.median(chi2[idx]))),
        fwhm=float(psf.fwhm_at(psf.x_center, psf.y_center)),
        method="moffat",
    )


def recenter_psf(psf: PsfModel, *, tolerance: float = 1e-3) -> PsfModel:
    """Shift every basis plane so the kernel at the centre has its windowed centroid on the
    central pixel (positions measured with windowed centroids then agree with PSF fits)."""
    cx, cy = kernel_centroid(psf.kernel_at(psf.x_center, psf.y_center))
    if abs(cx) < tolerance and abs(cy) < tolerance:
        return psf
    a = LANCZOS_ORDER
    padded = np.pad(psf.basis, ((0, 0), (a, a), (a, a)))
    n = padded.shape[0]
    shifted = shift_stamps(padded, np.full(n, cx), np.full(n, cy))
    return PsfModel(
        basis=shifted,
        order=psf.order,
        x_center=psf.x_center,
        y_center=psf.y_center,
        x_scale=psf.x_scale,
        y_scale=psf.y_scale,
        fit_box=psf.fit_box,
    )


@dataclass(frozen=True)
class PsfStarSelection:
    """PSF star candidates: which detections were chosen, and why.

    ``selected``: one bool per detection row, the chosen stars, best first in
    ``ranked`` (row indices); ``score``: the quality score of every candidate
    that passed the hard cuts (NaN elsewhere); ``locus``: the stellar-locus
    size (pixels, windowed-moment radius); ``fwhm``: the FWHM estimate used.
    """

    selected: np.ndarray
    ranked: np.ndarray
    score: np.ndarray
    locus: float
    fwhm: float

    @property
    def n_selected(self) -> int:
        return int(self.selected.sum())


def select_psf_stars(
    detections: pd.DataFrame,
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    segmentation: np.ndarray | None = None,
    known_stars: np.ndarray | None = None,
    kernel_size: int = 41,
    fwhm: float | None = None,
    min_snr: float = 50.0,
    min_snr_floor: float = 20.0,
    wanted: int = 25,
    saturation: float | None = None,
    max_masked_fraction: float = 0.4,
    max_neighbor_ratio: float = 0.5,
    size_tolerance: float | None = None,
    max_stars: int = 400,
) -> PsfStarSelection:
    """PSF stars among ``detections``, ranked by a quality score (PSFEx-like).

    Only what is truly unusable is cut: a stamp off the image, a masked
    (saturated, CR, bad) pixel in the core, a core shared with another
    source, more than ``max_masked_fraction`` of the stamp masked or owned by
    other sources, or neighbours whose light near the star exceeds
    ``max_neighbor_ratio`` of its own. Faint neighbours do not disqualify a
    star: their footprints (``segmentation``) get zero weight in the PSF fit,
    and here their pixels are replaced by the star's mirror-image pixels
    before its size is measured. Stars then lie on the stellar locus, the
    most compact tight group of sizes (windowed second moments, so no
    absolute size is assumed and galaxies may outnumber stars);
    ``known_stars`` (bool per detection: matched to a reference-catalog
    star) anchors the locus on those when any is usable, so that one or two
    stars among many compact galaxies are still found. Candidates
    need S/N > ``min_snr`` in a 1.5 FWHM aperture, relaxed down to
    ``min_snr_floor`` while fewer than ``wanted`` stars qualify. The score
    ranks by S/N, penalised by masked fraction, neighbour light and distance
    from the locus; the best ``max_stars`` are selected. ``image`` is
    background-subtracted; positions are ``x_win``, ``y_win`` when present.
    """
    from workflow_lib.single_frame.background import native_float
    from workflow_lib.single_frame.detection import compact_locus, estimate_fwhm

    n = len(detections)
    nothing = np.zeros(n, dtype=bool)
    if n == 0:
        return PsfStarSelection(nothing, np.zeros(0, np.int64), np.full(0, np.nan), np.nan, np.nan)
    data = native_float(image)
    var = native_float(variance)
    ny, nx = data.shape
    bad = ~np.isfinite(data) | ~np.isfinite(var) | (var <= 0)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    x = detections["x_win" if "x_win" in detections else "x"].to_numpy(dtype=np.float64)
    y = detections["y_win" if "y_win" in detections else "y"].to_numpy(dtype=np.float64)
    if fwhm is None or not np.isfinite(fwhm):
        fwhm = estimate_fwhm(detections)
    fwhm = float(fwhm) if np.isfinite(fwhm) and fwhm > 0 else 3.0
    half = kernel_size // 2
    margin = psf_star_margin(kernel_size)
    cand = (x >= margin) & (x < nx - margin) & (y >= margin) & (y < ny - margin)
    cand &= np.isfinite(x) & np.isfinite(y)
    if "flags" in detections:
        # sep flags 16/32: aperture truncated / pixel-stack overflow. Crowded (1)
        # and deblended (2) stars stay: their neighbours are masked instead.
        cand &= (detections["flags"].to_numpy() & ~3) == 0
    if saturation is not None and "peak" in detections:
        cand &= detections["peak"].to_numpy() < saturation
    empty = PsfStarSelection(nothing, np.zeros(0, np.int64), np.full(n, np.nan), np.nan, fwhm)
    ci = _bright_enough(data, var, bad, x, y, np.flatnonzero(cand), fwhm, 0.7 * min_snr_floor)
    if ci.size == 0:
        return empty

    # Size, S/N and neighbours need the star's surroundings to 3 FWHM, not the whole kernel.
    near = int(min(half, np.ceil(3.0 * fwhm) + 1))
    stamps = _candidate_stamps(data, var, bad, segmentation, detections, ci, x, y, near, fwhm)
    snr = stamps["snr"]
    usable = stamps["usable"] & (stamps["masked"] <= max_masked_fraction)
    usable &= stamps["neighbor_ratio"] <= max_neighbor_ratio
    usable &= np.isfinite(stamps["size"]) & (snr > min_snr_floor)
    # The S/N cut is relaxed only while too few stars qualify.
    snr_cut = float(min_snr)
    while snr_cut > min_snr_floor and np.count_nonzero(usable & (snr > snr_cut)) < 2 * wanted:
        snr_cut = max(min_snr_floor, 0.7 * snr_cut)
    usable &= snr > snr_cut
    if usable.sum() < 1:
        return empty
    size = stamps["size"]
    known = np.zeros(ci.size, dtype=bool)
    if known_stars is not None:
        known = usable & np.asarray(known_stars, dtype=bool)[ci]
    if known.any():
        # Refcat stars blended with a galaxy look larger: their compact end.
        locus = compact_locus(size[known], rel_width=0.05, min_members=min(2, known.sum()))
    else:
        locus = compact_locus(size[usable], rel_width=0.05)
    rel = size / locus - 1.0
    if size_tolerance is None:
        close = usable & (np.abs(rel) < 0.1)
        spread = 1.4826 * np.median(np.abs(rel[close])) if close.sum() >= 3 else 0.03
        size_tolerance = float(np.clip(3.0 * spread, 0.04, 0.12))
    on_locus = usable & (np.abs(rel) < size_tolerance)
    score = np.full(n, np.nan)
    quality = (
        np.log10(np.clip(snr, 1.0, 1000.0))
        - 2.0 * stamps["masked"]
        - stamps["neighbor_ratio"]
        - 0.5 * np.abs(rel) / size_tolerance
        + 0.5 * known
    )
    score[ci[on_locus]] = quality[on_locus]
    ranked = ci[on_locus][np.argsort(-quality[on_locus], kind="stable")][:max_stars]
    selected = nothing.copy()
    selected[ranked] = True
    log.debug(
        "PSF stars: %d of %d detections (%d usable, S/N > %.0f, locus %.2f px, tol %.2f)",
        ranked.size,
        n,
        int(usable.sum()),
        snr_cut,
        locus,
        size_tolerance,
    )
    return PsfStarSelection(selected, ranked, score, float(locus), fwhm)


def _bright_enough(
    data: np.ndarray,
    var: np.ndarray,
    bad: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    fwhm: float,
    min_snr: float,
    *,
    max_candidates: int = 1500,
) -> np.ndarray:
    """Rows whose plain aperture S/N (1.5 FWHM) passes ``min_snr``, brightest first and at
    most ``max_candidates``: a cheap cut before the stamps of :func:`_candidate_stamps`."""
    import sep

    if rows.size == 0:
        return rows
    clean = np.where(bad, np.float32(0.0), data)
    err = np.sqrt(np.where(bad, np.float32(0.0), var))
    flux, flux_err, _ = sep.sum_circle(
        clean, x[rows], y[rows], 1.5 * fwhm, err=err, mask=bad, subpix=5
    )
    snr = np.where(flux_err > 0, flux / np.where(flux_err > 0, flux_err, 1.0), 0.0)
    keep = np.flatnonzero(snr > min_snr)
    keep = keep[np.argsort(-snr[keep], kind="stable")][:max_candidates]
    return np.sort(rows[keep])


def _candidate_stamps(
    data: np.ndarray,
    var: np.ndarray,
    bad: np.ndarray,
    segmentation: np.ndarray | None,
    detections: pd.DataFrame,
    ci: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    half: int,
    fwhm: float,
) -> dict[str, np.ndarray]:
    """Per candidate (rows ``ci``): S/N, masked fraction, neighbour light, size, usability.

    Pixels of other sources' footprints are replaced by the mirror-image pixel
    through the star's centre (zero weight where that one is not clean
    either), so a neighbour neither inflates the size nor the S/N.
    """
    from workflow_lib.single_frame.measure import windowed_moments

    ix = np.floor(x[ci] + 0.5).astype(np.int64)
    iy = np.floor(y[ci] + 0.5).astype(np.int64)
    sub = cut_stamps(data, ix, iy, half).astype(np.float64)
    sub_var = cut_stamps(var, ix, iy, half).astype(np.float64)
    masked = cut_stamps(bad, ix, iy, half, fill=True)
    if segmentation is not None:
        seg = cut_stamps(np.asarray(segmentation), ix, iy, half)
        own = detections["id"].to_numpy()[ci][:, None, None]
        others = (seg != 0) & (seg != own)
    else:
        others = np.zeros_like(masked)
    size = 2 * half + 1
    yy, xx = np.mgrid[:size, :size] - half
    r = np.hypot(xx[None] - (x[ci] - ix)[:, None, None], yy[None] - (y[ci] - iy)[:, None, None])
    core = r <= max(2.0, fwhm)
    # A core with masked pixels or shared with a neighbour cannot be repaired.
    usable = ~(core & masked).any(axis=(1, 2))
    usable &= (core & others).sum(axis=(1, 2)) <= 0.1 * core.sum(axis=(1, 2))
    excluded = masked | others
    mirror = excluded[:, ::-1, ::-1]
    repaired = np.where(excluded & ~mirror, sub[:, ::-1, ::-1], sub)
    good = ~(excluded & mirror)
    repaired = np.where(good, repaired, 0.0)
    inside = r <= 1.5 * fwhm
    flux = (repaired * inside).sum(axis=(1, 2))
    noise = np.sqrt((np.where(good, sub_var, 0.0) * inside).sum(axis=(1, 2)))
    snr = np.where(noise > 0, flux / np.where(noise > 0, noise, 1.0), 0.0)
    # Light of other sources near the star, relative to its own: their
    # footprint pixels weighted by a PSF-sized window around the star.
    window = np.exp(-0.5 * (r / max(fwhm, 1.0)) ** 2)
    neighbor = (np.where(others & ~masked, np.maximum(sub, 0.0), 0.0) * window).sum(axis=(1, 2))
    own_light = (np.maximum(repaired, 0.0) * window).sum(axis=(1, 2))
    neighbor_ratio = np.where(own_light > 0, neighbor / np.where(own_light > 0, own_light, 1), 9.0)
    sigma = max(fwhm / 2.3548, 0.8)
    cxx, cyy, cxy, _ = windowed_moments(repaired, good, half + x[ci] - ix, half + y[ci] - iy, sigma)
    radius = (cxx * cyy - cxy**2) ** 0.25
    return {
        "snr": snr,
        "masked": excluded.mean(axis=(1, 2)),
        "neighbor_ratio": neighbor_ratio,
        "size": np.where(np.isfinite(radius) & (radius > 0), radius, np.nan),
        "usable": usable & (flux > 0),
    }


def determine_psf(
    detections: pd.DataFrame,
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    segmentation: np.ndarray | None,
    *,
    known_stars: np.ndarray | Callable[[], np.ndarray | None] | None = None,
    kernel_size: int = 41,
    order: int = 2,
    max_fallback_sources: int = 5,
    enough_stars: int = 20,
) -> tuple[PsfFitResult, np.ndarray]:
    """The PSF of an image from its detections: pixelised if it can be, else parametric.

    Stars are chosen by :func:`select_psf_stars` and fitted by
    :func:`fit_psf_model`, whose spatial order drops as stars get fewer, down
    to a constant kernel from two stars. With fewer, a Moffat is fitted
    (:func:`fit_moffat_psf`) to the one star, or to the most compact sources
    of S/N > 10 (``result.method == "moffat"``). ``known_stars`` marks
    detections matched to reference-catalog stars; given as a function, it
    is called only when the size locus alone finds fewer than
    ``enough_stars`` (a pattern match costs more than the selection, and a
    star-rich image does not need it). Returns the fit and the
    detection rows offered to it (``result.used`` indexes them); raises
    :class:`PsfFitError` only when no point-like source exists at all.
    """

    def select(known: np.ndarray | None) -> PsfStarSelection:
        return select_psf_stars(
            detections,
            image,
            variance,
            mask,
            segmentation=segmentation,
            known_stars=known,
            kernel_size=kernel_size,
        )

    if callable(known_stars):
        selection = select(None)
        if selection.n_selected < enough_stars:
            known_stars = known_stars()
            if known_stars is not None:
                selection = select(known_stars)
    else:
        selection = select(known_stars)
    x = detections["x_win"].to_numpy(dtype=np.float64)
    y = detections["y_win"].to_numpy(dtype=np.float64)
    ids = detections["id"].to_numpy()
    rows = selection.ranked
    if rows.size >= MIN_PSF_STARS:
        try:
            fit = fit_psf_model(
                image,
                variance,
                mask,
                x[rows],
                y[rows],
                kernel_size=kernel_size,
                order=order,
                segmentation=segmentation,
                source_ids=ids[rows],
            )
            return fit, rows
        except PsfFitError as err:
            log.info("pixelised PSF not possible (%s); fitting a parametric one", err)
    if rows.size == 0:
        # No star on a locus: the most compact sources, with a loose size cut.
        # A reference match not yet made (still the callable) marks no star.
        known = None if callable(known_stars) else known_stars
        compact = select_psf_stars(
            detections,
            image,
            variance,
            mask,
            segmentation=segmentation,
            known_stars=known,
            kernel_size=kernel_size,
            min_snr=10.0,
            min_snr_floor=10.0,
            size_tolerance=0.3,
        )
        rows = compact.ranked
        fwhm_guess = compact.fwhm if np.isfinite(compact.locus) else selection.fwhm
    else:
        fwhm_guess = selection.fwhm
    rows = rows[:max_fallback_sources]
    if rows.size == 0:
        raise PsfFitError("no usable point-like source for a PSF model")
    fit = fit_moffat_psf(
        image,
        variance,
        mask,
        x[rows],
        y[rows],
        kernel_size=kernel_size,
        fwhm_guess=float(fwhm_guess),
        segmentation=segmentation,
        source_ids=ids[rows],
    )
    return fit, rows
