"""PSF models.

``PsfModel`` is a pixelized kernel whose pixels vary as a polynomial over the
image (the PSFEx representation): kernel(x, y) = sum_k P_k(u, v) basis[k] with
u = (x - x_center) / x_scale, v = (y - y_center) / y_scale and P_k the
monomials u^i v^j ordered by total degree (1, u, v, u^2, u v, v^2, ...). All
kernels share one odd size, as PSF matching needs fixed-size kernels.

On disk it is a FITS image cube (HDU ``PSF``) with cards PSFTYPE='POLYPIX',
PSFORDER, PSFXC, PSFYC, PSFXS, PSFYS, so it can be evaluated from astropy alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def monomial_exponents(order: int) -> list[tuple[int, int]]:
    """(i, j) exponents of u^i v^j, by total degree: (0,0), (1,0), (0,1), (2,0), ..."""
    return [(degree - j, j) for degree in range(order + 1) for j in range(degree + 1)]


@dataclass(frozen=True)
class PsfModel:
    """Spatially varying pixelized PSF; kernels are normalised to unit sum."""

    basis: np.ndarray  # (n_terms, size, size)
    order: int = 0
    x_center: float = 0.0
    y_center: float = 0.0
    x_scale: float = 1.0
    y_scale: float = 1.0

    def __post_init__(self) -> None:
        basis = np.asarray(self.basis, dtype=np.float64)
        if basis.ndim == 2:
            basis = basis[None]
        n_terms = len(monomial_exponents(self.order))
        if basis.ndim != 3 or basis.shape[0] != n_terms:
            raise ValueError(f"PSF basis of shape {basis.shape} does not fit order {self.order}")
        if basis.shape[1] != basis.shape[2] or basis.shape[1] % 2 == 0:
            raise ValueError(f"PSF kernels must be square with odd size, got {basis.shape[1:]}")
        if self.x_scale <= 0 or self.y_scale <= 0:
            raise ValueError("PSF polynomial scales must be positive")
        object.__setattr__(self, "basis", basis)

    @classmethod
    def constant(cls, kernel: np.ndarray) -> PsfModel:
        """A PSF that is the same everywhere."""
        kernel = np.asarray(kernel, dtype=np.float64)
        return cls(basis=(kernel / kernel.sum())[None], order=0)

    @property
    def size(self) -> int:
        return int(self.basis.shape[1])

    def kernel_at(self, x: float, y: float) -> np.ndarray:
        """The PSF image centred on the kernel's central pixel, summing to 1."""
        u = (x - self.x_center) / self.x_scale
        v = (y - self.y_center) / self.y_scale
        weights = np.array([u**i * v**j for i, j in monomial_exponents(self.order)])
        kernel = np.tensordot(weights, self.basis, axes=1)
        total = kernel.sum()
        if not np.isfinite(total) or total <= 0:
            raise ValueError(f"PSF model evaluates to a non-positive kernel at ({x}, {y})")
        return kernel / total

    def fwhm_at(self, x: float, y: float) -> float:
        """FWHM in pixels, from the area above half maximum (exact for any profile shape)."""
        kernel = self.kernel_at(x, y)
        return fwhm_of_image(kernel)

    def header_cards(self) -> list[tuple[str, object, str]]:
        return [
            ("PSFTYPE", "POLYPIX", "pixelized kernel, polynomial in position"),
            ("PSFORDER", self.order, "polynomial order"),
            ("PSFXC", self.x_center, "u = (x - PSFXC) / PSFXS, 0-based pixels"),
            ("PSFYC", self.y_center, "v = (y - PSFYC) / PSFYS"),
            ("PSFXS", self.x_scale, ""),
            ("PSFYS", self.y_scale, ""),
            ("COMMENT", "kernel = sum_k u^i v^j PLANE_k, (i,j) by total degree, then /sum", ""),
        ]

    @classmethod
    def from_header_and_cube(cls, header: dict | object, cube: np.ndarray) -> PsfModel:
        get = header.get  # type: ignore[attr-defined]
        if str(get("PSFTYPE", "POLYPIX")).strip() != "POLYPIX":
            raise ValueError(f"unsupported PSF type {get('PSFTYPE')!r}")
        return cls(
            basis=np.asarray(cube, dtype=np.float64),
            order=int(get("PSFORDER", 0)),
            x_center=float(get("PSFXC", 0.0)),
            y_center=float(get("PSFYC", 0.0)),
            x_scale=float(get("PSFXS", 1.0)),
            y_scale=float(get("PSFYS", 1.0)),
        )


def fwhm_of_image(kernel: np.ndarray, *, oversample: int = 16) -> float:
    """FWHM (pixels) of a centred PSF image from the area above half maximum.

    The kernel is resampled by cubic splines on a grid ``oversample`` times
    finer so that the pixelised area converges; FWHM = 2 sqrt(area / pi),
    exact for a circular profile of any radial shape.
    """
    from scipy.ndimage import map_coordinates

    kernel = np.asarray(kernel, dtype=np.float64)
    ny, nx = kernel.shape
    step = 1.0 / oversample
    yy, xx = np.meshgrid(
        np.arange(0, ny - 1 + step / 2, step), np.arange(0, nx - 1 + step / 2, step), indexing="ij"
    )
    fine = map_coordinates(kernel, [yy, xx], order=3, mode="nearest")
    area = np.count_nonzero(fine >= 0.5 * fine.max()) * step**2
    return float(2.0 * np.sqrt(area / np.pi))


# --------------------------------------------------------------------------
# Fitting a PsfModel to stars (PSFEx-like)
# --------------------------------------------------------------------------

LANCZOS_ORDER = 3
# Fewest stars for each polynomial order (order 0 needs MIN_PSF_STARS).
MIN_STARS_FOR_ORDER: dict[int, int] = {0: 5, 1: 8, 2: 20, 3: 35, 4: 55}
MIN_PSF_STARS = 5


class PsfFitError(ValueError):
    """Too few usable stars to fit a PSF model."""


@dataclass(frozen=True)
class PsfFitResult:
    """A fitted PSF model and how each input star was used.

    ``used``: stars that entered the final fit; ``chi2``: reduced chi^2 of
    each star's stamp against the final model (NaN where it could not be
    cut out); ``amplitude``: fitted flux in kernel units (sum of the kernel).
    """

    psf: PsfModel
    used: np.ndarray
    chi2: np.ndarray
    amplitude: np.ndarray
    n_used: int
    order: int
    residual_rms: float
    fwhm: float


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


def polynomial_terms(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """Monomials (n, n_terms) of PsfModel's ordering at normalised (u, v)."""
    u = np.atleast_1d(np.asarray(u, dtype=np.float64))
    v = np.atleast_1d(np.asarray(v, dtype=np.float64))
    return np.stack([u**i * v**j for i, j in monomial_exponents(order)], axis=1)


def evaluate_kernels(psf: PsfModel, x: np.ndarray, y: np.ndarray, *, half: int | None = None):
    """Kernels at many positions (n, s, s), each normalised by its full-kernel sum.

    ``half`` crops to the central (2 half + 1)^2 pixels *after* normalising,
    so a cropped kernel still carries the full model's flux scale.
    """
    u = (np.asarray(x, dtype=np.float64) - psf.x_center) / psf.x_scale
    v = (np.asarray(y, dtype=np.float64) - psf.y_center) / psf.y_scale
    terms = polynomial_terms(u, v, psf.order)
    totals = terms @ psf.basis.sum(axis=(1, 2))
    c = psf.size // 2
    h = c if half is None else min(int(half), c)
    basis = psf.basis[:, c - h : c + h + 1, c - h : c + h + 1]
    kernels = np.tensordot(terms, basis, axes=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernels /= totals[:, None, None]
    return kernels


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
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    inside = (ix - big >= 0) & (ix + big < nx) & (iy - big >= 0) & (iy + big < ny)
    inside &= np.isfinite(x) & np.isfinite(y)
    idx = np.flatnonzero(inside)
    chi2_all = np.full(n_in, np.nan)
    amp_all = np.full(n_in, np.nan)
    used_all = np.zeros(n_in, dtype=bool)
    _order_for(idx.size, order)  # fail early

    # Stamps first, then float64 and the bad-pixel test on the stamps only.
    data = cut_stamps(image, ix[idx], iy[idx], big).astype(np.float64)
    var_big = cut_stamps(variance, ix[idx], iy[idx], big).astype(np.float64)
    bad = ~np.isfinite(data) | ~np.isfinite(var_big) | (var_big <= 0)
    if mask is not None:
        bad |= cut_stamps(np.asarray(mask, dtype=bool), ix[idx], iy[idx], big)
    data[bad] = 0.0
    if segmentation is not None and source_ids is not None:
        seg = cut_stamps(np.asarray(segmentation), ix[idx], iy[idx], big)
        own = np.asarray(source_ids)[idx][:, None, None]
        bad |= (seg != 0) & (seg != own)
    # A resampled pixel is bad if any input pixel of its Lanczos footprint is.
    from scipy.ndimage import maximum_filter

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
    use = ok.copy()
    fit_order = 0
    basis = (stack / stack.sum())[None]
    chi2 = np.full(idx.size, np.nan)
    for iteration in range(max(1, int(max_iter)) + 1):
        # Amplitudes against the current model, with predicted-variance weights.
        vp = var_bg[:, None, None] + gain_var * np.maximum(amp[:, None, None] * models, 0.0)
        vp = vp + (model_error * np.maximum(amp[:, None, None] * models, 0.0)) ** 2
        w = np.where(good, 1.0 / vp, 0.0)
        num = (w * models * stamps).sum(axis=(1, 2))
        den = (w * models * models).sum(axis=(1, 2))
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

    psf = PsfModel(
        basis=basis,
        order=fit_order,
        x_center=(nx - 1) / 2.0,
        y_center=(ny - 1) / 2.0,
        x_scale=nx / 2.0,
        y_scale=ny / 2.0,
    )
    psf = recenter_psf(psf)
    used_all[idx] = use
    chi2_all[idx] = chi2
    amp_all[idx] = amp
    fwhm = psf.fwhm_at(psf.x_center, psf.y_center)
    log.debug(
        "PSF: %d/%d stars, order %d, median chi2 %.2f, FWHM %.2f px",
        int(use.sum()), n_in, fit_order, float(np.median(chi2[use])), fwhm,
    )  # fmt: skip
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
    )


def select_psf_stars(
    detections: pd.DataFrame,
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    kernel_size: int = 41,
    fwhm: float | None = None,
    min_snr: float = 50.0,
    saturation: float | None = None,
    isolation_radius: float | None = None,
    neighbor_flux_ratio: float = 0.01,
    size_tolerance: float | None = None,
    max_stars: int = 400,
) -> np.ndarray:
    """Boolean index (one per detection row) of stars fit for PSF modelling.

    Criteria: S/N > ``min_snr`` in an aperture of radius 1.5 FWHM; no masked
    pixel (saturated, CR, bad, ...) within 2 FWHM of the centre and under 10%
    of the stamp masked; peak below ``saturation`` if given; stamp inside the
    image; no neighbour brighter than ``neighbor_flux_ratio`` times the star
    within ``isolation_radius`` (default: kernel half-size), and none at all
    within 2 FWHM; half-light radius within ``size_tolerance`` of the mode of
    the bright sources' radii (the stellar locus: no absolute size is
    assumed). ``image`` is background-subtracted; positions are ``x_win``,
    ``y_win`` when present.
    """
    import sep
    from scipy.spatial import cKDTree

    from workflow_lib.background import native_float
    from workflow_lib.detection import estimate_fwhm, robust_mode

    n = len(detections)
    selected = np.zeros(n, dtype=bool)
    if n == 0:
        return selected
    data = native_float(image)
    var = native_float(variance)
    ny, nx = data.shape
    bad = ~np.isfinite(data) | ~np.isfinite(var) | (var <= 0)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    data = np.where(bad, np.float32(0.0), data)
    err = np.where(bad, np.float32(0.0), var)
    np.sqrt(err, out=err)
    xcol = "x_win" if "x_win" in detections else "x"
    ycol = "y_win" if "y_win" in detections else "y"
    x = detections[xcol].to_numpy(dtype=np.float64)
    y = detections[ycol].to_numpy(dtype=np.float64)
    if fwhm is None or not np.isfinite(fwhm):
        fwhm = estimate_fwhm(detections)
    fwhm = float(fwhm) if np.isfinite(fwhm) else 3.0
    half = kernel_size // 2
    margin = half + LANCZOS_ORDER + 1
    cand = (x >= margin) & (x < nx - margin) & (y >= margin) & (y < ny - margin)
    if "flags" in detections:
        # sep flags: 1 = crowded (had neighbours), 2 = merged; 16/32 truncated/overflow.
        cand &= (detections["flags"].to_numpy() & ~1) == 0
    if not cand.any():
        return selected
    ci = np.flatnonzero(cand)
    flux, flux_err, _ = sep.sum_circle(data, x[ci], y[ci], 1.5 * fwhm, err=err, mask=bad, subpix=5)
    snr = np.where(flux_err > 0, flux / np.where(flux_err > 0, flux_err, 1.0), 0.0)
    keep = snr > min_snr
    # Masked pixels: none in the core, few in the stamp (cut-outs of the S/N-passing few).
    core_h = max(2, int(np.ceil(2.0 * fwhm)))
    kk = np.flatnonzero(keep)
    if kk.size:
        jx = np.floor(x[ci[kk]] + 0.5)
        jy = np.floor(y[ci[kk]] + 0.5)
        stamp_bad = cut_stamps(bad, jx, jy, half, fill=True)
        n_core = stamp_bad[:, half - core_h : half + core_h + 1, half - core_h : half + core_h + 1]
        keep[kk] = ~n_core.any(axis=(1, 2)) & (stamp_bad.sum(axis=(1, 2)) < 0.1 * kernel_size**2)
    if saturation is not None and "peak" in detections:
        keep &= detections["peak"].to_numpy()[ci] < saturation
    # Isolation against every detection.
    tree = cKDTree(np.column_stack([x, y]))
    iso_r = float(half if isolation_radius is None else isolation_radius)
    det_flux = np.maximum(detections["flux"].to_numpy(dtype=np.float64), 0.0)
    for k in np.flatnonzero(keep):
        j = ci[k]
        neighbours = [m for m in tree.query_ball_point([x[j], y[j]], iso_r) if m != j]
        if not neighbours:
            continue
        nb = np.asarray(neighbours)
        dist = np.hypot(x[nb] - x[j], y[nb] - y[j])
        if np.any(dist < 2.0 * fwhm) or np.any(
            det_flux[nb] > neighbor_flux_ratio * max(det_flux[j], 1e-30)
        ):
            keep[k] = False
    if keep.sum() < 3:
        return selected
    # Stellar locus: the mode of half-light radii of the bright candidates.
    r_half, rflag = sep.flux_radius(
        data, x[ci[keep]], y[ci[keep]], np.full(int(keep.sum()), 3.0 * fwhm), 0.5,
        mask=bad, subpix=5,
    )  # fmt: skip
    ok = (rflag == 0) & np.isfinite(r_half) & (r_half > 0)
    mode = robust_mode(r_half[ok], rel_bandwidth=0.03)
    rel = r_half / mode - 1.0
    if size_tolerance is None:
        near = ok & (np.abs(rel) < 0.2)
        spread = 1.4826 * np.median(np.abs(rel[near])) if near.sum() >= 3 else 0.05
        size_tolerance = float(np.clip(3.0 * spread, 0.04, 0.15))
    compact = ok & (np.abs(rel) < size_tolerance)
    chosen = ci[np.flatnonzero(keep)[compact]]
    if chosen.size > max_stars:
        order = np.argsort(-snr[np.searchsorted(ci, chosen)])
        chosen = chosen[order[:max_stars]]
    selected[chosen] = True
    log.debug(
        "PSF stars: %d of %d detections (S/N > %.0f, r_half mode %.2f px, tol %.2f)",
        int(selected.sum()), n, min_snr, mode, size_tolerance,
    )  # fmt: skip
    return selected
