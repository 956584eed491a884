"""Source measurement: centroids, PSF and aperture fluxes, shapes, extendedness,
pixel flags, and the aperture correction of PSF fluxes.

Everything is vectorised over sources (stamps stacked into (n, s, s) arrays),
so thousands of sources on a 4k x 4k detector take a fraction of a second.
Column names follow LSST's meas_base in spirit: each algorithm has its own
``<algo>_flag``; pixel flags say which mask planes touch the source.

The PSF flux is the unweighted linear least-squares amplitude of the PSF
model at the source position, ``sum(m d) / sum(m^2)``, as in meas_base's
PsfFlux: unweighted, so a variance plane computed from the noisy image
itself cannot bias it; its error comes from the variance plane.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import sep
from astropy.io import fits

from workflow_lib.core.psf_model import (
    PsfModel,
    evaluate_kernels,
    monomial_exponents,
    polynomial_terms,
)
from workflow_lib.single_frame.background import native_float
from workflow_lib.single_frame.psf import (
    LANCZOS_ORDER,
    cut_stamps,
    lanczos_weights,
    resample_stamps,
    shift_stamps,
)

log = logging.getLogger(__name__)

FWHM_TO_SIGMA = 1.0 / 2.3548200450309493


def aperture_column(radius: float) -> str:
    """Column stem of a circular aperture: 12.0 px -> ``ap_12_0``."""
    return "ap_" + f"{float(radius):.1f}".replace(".", "_")


def psf_model_stamps(
    psf: PsfModel, x: np.ndarray, y: np.ndarray, half: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF model images (n, 2 half + 1, 2 half + 1) at sub-pixel positions.

    Stamp pixel (half, half) is image pixel (round(x), round(y)); returns the
    stamps and those integer centres. Each model carries the full kernel's
    normalisation (a point source of flux f is f * stamp, plus what falls
    outside the stamp).
    """
    a = LANCZOS_ORDER
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    kernels = evaluate_kernels(psf, x, y, half=half + a)
    if kernels.shape[1] < 2 * (half + a) + 1:  # kernel smaller than the stamp + taps
        pad = (2 * (half + a) + 1 - kernels.shape[1]) // 2
        kernels = np.pad(kernels, ((0, 0), (pad, pad), (pad, pad)))
    # Model at pixel i (relative to ix) = kernel(i - dx): sample the kernel at -dx.
    stamps = shift_stamps(kernels, -(x - ix), -(y - iy))
    return stamps, ix, iy


def _model_central_differences(
    psf: PsfModel, x: np.ndarray, y: np.ndarray, half: int, *, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """(m(x + eps) - m(x - eps)) / 2 eps and the same in y, m = :func:`psf_model_stamps`.

    Where x +- eps rounds to the same stamp centre (most sources) the
    difference is that of the Lanczos taps, resampled once from the kernels
    at (x, y) (their change over 0.1 px is ~1e-5 of the difference);
    elsewhere the two stamps are made and subtracted.
    """
    a = LANCZOS_ORDER
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    kernels = evaluate_kernels(psf, x, y, half=half + a)
    if kernels.shape[1] < 2 * (half + a) + 1:
        pad = (2 * (half + a) + 1 - kernels.shape[1]) // 2
        kernels = np.pad(kernels, ((0, 0), (pad, pad), (pad, pad)))
    sx, sy = -(x - ix), -(y - iy)  # the model samples the kernel at -dx
    wx, wy = lanczos_weights(sx), lanczos_weights(sy)
    dwx = (lanczos_weights(sx - eps) - lanczos_weights(sx + eps)) / (2 * eps)
    dwy = (lanczos_weights(sy - eps) - lanczos_weights(sy + eps)) / (2 * eps)
    mx = resample_stamps(kernels, dwx, wy)
    my = resample_stamps(kernels, wx, dwy)
    for diff, straddles, step in (
        (mx, np.floor(x + eps + 0.5) != np.floor(x - eps + 0.5), (eps, 0.0)),
        (my, np.floor(y + eps + 0.5) != np.floor(y - eps + 0.5), (0.0, eps)),
    ):
        k = np.flatnonzero(straddles)
        if k.size:
            xs, ys = x[k], y[k]
            plus = psf_model_stamps(psf, xs + step[0], ys + step[1], half)[0]
            minus = psf_model_stamps(psf, xs - step[0], ys - step[1], half)[0]
            diff[k] = (plus - minus) / (2 * eps)
    return mx, my


def windowed_moments(
    data: np.ndarray, good: np.ndarray, x: np.ndarray, y: np.ndarray, sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Second moments (xx, yy, xy; pixels^2) with a Gaussian window of ``sigma`` removed.

    ``x``, ``y`` are positions in stamp pixels. For a Gaussian source the
    windowed moments are ``(C^-1 + W^-1)^-1``; inverting that gives C, so the
    result does not depend on the window. Returns NaN and a flag where the
    moments are not positive-definite.
    """
    size = data.shape[1]
    off = np.arange(size, dtype=np.float64)
    dx = off[None, None, :] - x[:, None, None]
    dy = off[None, :, None] - y[:, None, None]
    weighted = np.exp(-(dx**2 + dy**2) / (2.0 * sigma**2)) * good * data
    s0 = weighted.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        mxx = (weighted * dx**2).sum(axis=(1, 2)) / s0
        myy = (weighted * dy**2).sum(axis=(1, 2)) / s0
        mxy = (weighted * dx * dy).sum(axis=(1, 2)) / s0
        det = mxx * myy - mxy**2
        ixx, iyy, ixy = myy / det - 1 / sigma**2, mxx / det - 1 / sigma**2, -mxy / det
        det2 = ixx * iyy - ixy**2
        cxx, cyy, cxy = iyy / det2, ixx / det2, -ixy / det2
    ok = (s0 > 0) & (det > 0) & (det2 > 0) & (cxx > 0) & (cyy > 0)
    return np.where(ok, cxx, np.nan), np.where(ok, cyy, np.nan), np.where(ok, cxy, np.nan), ~ok


def encircled_energy(psf: PsfModel, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Fraction of the PSF kernel inside a circle of ``radius`` pixels, at each position.

    A linear functional of the basis planes, so it is exact for the model's
    spatial variation at the cost of one aperture sum per plane.
    """
    c = psf.size // 2
    planes = [native_float(p, np.float64) for p in psf.basis]
    inside = np.array(
        [sep.sum_circle(p, [float(c)], [float(c)], float(radius), subpix=11)[0][0] for p in planes]
    )
    u, v = psf.normalized_position(x, y)
    terms = polynomial_terms(u, v, psf.order)
    return (terms @ inside) / (terms @ psf.basis.sum(axis=(1, 2)))


def measure_sources(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    *,
    psf: PsfModel,
    x: np.ndarray,
    y: np.ndarray,
    aperture_radii: Sequence[float] = (3.0, 4.5, 6.0, 9.0, 12.0, 17.0),
    flag_planes: Mapping[str, np.ndarray] | None = None,
    segmentation: np.ndarray | None = None,
    source_ids: np.ndarray | None = None,
    fit_radius_fwhm: float = 2.0,
    refine_centroids: bool = True,
    extendedness_radius_fwhm: float = 2.0,
    extendedness_floor: float = 0.02,
    max_masked_fraction: float = 0.2,
    fixed_positions: bool = False,
) -> pd.DataFrame:
    """Measure sources at (x, y) (0-based) on a background-subtracted image.

    ``mask`` (bool) marks pixels to ignore (bad, saturated, CR, no data);
    ``flag_planes`` maps a flag name (``saturated``, ``interpolated``,
    ``cr``, ``edge``, ``bad`` ...) to a boolean map and yields
    ``pixel_flag_<name>`` (any such pixel within the PSF-fit stamp) and
    ``pixel_flag_<name>_center`` (in the central 3x3). Pixels of *other*
    sources (``segmentation`` labels, ``source_ids`` of these sources) are
    left out of the PSF fit, so blends are fitted on their own pixels.

    Positions are first moved to the windowed centroid (``sep.winpos``), then
    refined by a linearised PSF fit (``refine_centroids``). With
    ``fixed_positions`` (forced photometry) neither happens: everything is
    measured at the given (x, y), ``x_err``/``y_err`` are NaN and
    ``centroid_flag`` only marks non-finite or off-image positions.

    Returns one row per input position with ``x``, ``y`` (PSF-fit centroid,
    falling back to the windowed one; the input with ``fixed_positions``),
    ``x_err``, ``y_err``, ``psf_flux``, ``psf_flux_err``,
    ``ap_<r>_flux``/``_flux_err``/``_flag`` per radius, ``shape_xx/yy/xy``
    (deconvolved windowed moments, pixels^2), ``extendedness`` (0
    point-like, 1 extended, NaN unknown) and flags.

    Only the arrays ``sep`` needs are copied at full size (float32 data and
    noise with masked pixels zeroed); everything else is cut into per-source
    stamps first, so a 4k x 4k image costs a few hundred MB at most.
    """
    image = np.asarray(image)
    variance = np.asarray(variance)
    ny, nx = image.shape
    bad = ~np.isfinite(image)
    bad |= ~np.isfinite(variance)
    bad |= variance < 0
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    # sep's inputs: native float32, masked pixels zeroed.
    data32 = np.where(bad, np.float32(0.0), native_float(image, np.float32))
    err32 = np.where(bad, np.float32(0.0), native_float(variance, np.float32))
    np.sqrt(err32, out=err32)
    x_in = np.asarray(x, dtype=np.float64).ravel()
    y_in = np.asarray(y, dtype=np.float64).ravel()
    x, y = x_in.copy(), y_in.copy()
    n = x.size
    out: dict[str, np.ndarray] = {}
    fwhm = psf.fwhm_at(psf.x_center, psf.y_center)
    sigma = max(fwhm * FWHM_TO_SIGMA, 0.5)
    half = int(min(psf.size // 2, max(3, np.ceil(fit_radius_fwhm * fwhm))))
    finite = np.isfinite(x) & np.isfinite(y)
    x[~finite] = 0.0
    y[~finite] = 0.0
    own = None
    if segmentation is not None and source_ids is not None:
        own = np.asarray(source_ids)

    def stamps_at(xx, yy):
        """Model, data, variance and usable-pixel stamps."""
        m, ix, iy = psf_model_stamps(psf, xx, yy, half)
        g = ~cut_stamps(bad, ix, iy, half, fill=True)
        if own is not None:
            seg = cut_stamps(np.asarray(segmentation), ix, iy, half)
            g &= (seg == 0) | (seg == own[:, None, None])
        d = _clean_stamps(image, ix, iy, half, g)
        v = _clean_stamps(variance, ix, iy, half, g)
        return m, d, v, g, ix, iy

    # 1. Windowed centroid (robust start), then PSF-fit refinement.
    centroid_flag = ~finite | (x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)
    x_err = np.full(n, np.nan)
    y_err = np.full(n, np.nan)
    if n and not fixed_positions:
        xw, yw, _wflag = sep.winpos(data32, x, y, np.full(n, sigma), mask=bad)
        okw = np.isfinite(xw) & np.isfinite(yw) & (np.hypot(xw - x, yw - y) < max(2.0, fwhm))
        x = np.where(okw, xw, x)
        y = np.where(okw, yw, y)
        centroid_flag |= ~okw
    if n and refine_centroids and not fixed_positions:
        # Linearised fit d ~ f m + f dx mx + f dy my for (f, dx, dy), the model's
        # position derivatives by central differences over +-eps pixels. NB where
        # x +- eps straddles a half pixel the two stamps are centred one pixel
        # apart and the difference is no derivative: such sources (~20%) in
        # effect keep their windowed centroid. Exact derivatives were tried and
        # made tiny-survey astrometry worse (the unweighted PSF-fit centroid is
        # noisier than the windowed one), so that is left for a weighted fit.
        m, d, v, g, ix, iy = stamps_at(x, y)
        mx, my = _model_central_differences(psf, x, y, half, eps=0.05)
        basis = np.stack([m, mx, my], axis=1).reshape(n, 3, -1)
        basis *= g.reshape(n, 1, -1)
        basis_t = basis.transpose(0, 2, 1)
        lhs = basis @ basis_t
        rhs = (basis @ d.reshape(n, -1, 1))[:, :, 0]
        det = np.linalg.det(lhs)
        solvable = np.isfinite(det) & (np.abs(det) > 0)
        lhs[~solvable] = np.eye(3)
        inv = np.linalg.inv(lhs)
        beta = (inv @ rhs[:, :, None])[:, :, 0]
        f = beta[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            dx = beta[:, 1] / f
            dy = beta[:, 2] / f
            noise = (basis * v.reshape(n, 1, -1)) @ basis_t
            cov = inv @ noise @ inv.transpose(0, 2, 1)
            ex = np.sqrt(np.maximum(cov[:, 1, 1], 0)) / np.abs(f)
            ey = np.sqrt(np.maximum(cov[:, 2, 2], 0)) / np.abs(f)
        del basis, basis_t, m, mx, my, d, v, g
        step_ok = solvable & (f > 0) & np.isfinite(dx) & np.isfinite(dy)
        step_ok &= (np.abs(dx) < 1.0) & (np.abs(dy) < 1.0) & ~centroid_flag
        x = np.where(step_ok, x + dx, x)
        y = np.where(step_ok, y + dy, y)
        x_err = np.where(step_ok, ex, x_err)
        y_err = np.where(step_ok, ey, y_err)
        centroid_flag |= ~step_ok & (f > 0) & solvable
    m, d, v, g, ix, iy = stamps_at(x, y)
    if fixed_positions:
        out["x"], out["y"] = x_in, y_in
    else:
        out["x"], out["y"] = x, y
    out["x_err"] = x_err
    out["y_err"] = y_err
    out["centroid_flag"] = centroid_flag

    # 2. PSF flux at the final position.
    mg = m * g
    s_mm = np.einsum("nij,nij->n", mg, m)
    s_all = np.einsum("nij,nij->n", m, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        psf_flux = np.einsum("nij,nij->n", mg, d) / s_mm
        psf_err = np.sqrt(np.einsum("nij,nij,nij->n", mg, mg, v)) / s_mm
        masked_frac = 1.0 - s_mm / s_all
    in_image = (ix - half >= 0) & (ix + half < nx) & (iy - half >= 0) & (iy + half < ny)
    out["psf_flux"] = psf_flux
    out["psf_flux_err"] = psf_err
    out["psf_flux_flag_edge"] = ~in_image
    out["psf_flux_flag_masked"] = masked_frac > max_masked_fraction
    out["psf_flux_flag"] = (
        ~in_image | (masked_frac > max_masked_fraction) | ~np.isfinite(psf_flux) | ~finite
    )
    resid = d - psf_flux[:, None, None] * m
    resid *= resid
    model_resid = np.einsum("nij,nij->n", resid, g)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["psf_chi2"] = model_resid / np.maximum(np.einsum("nij,nij->n", v, g), 1e-30)
    del resid, mg

    # 3. Apertures.
    for r in aperture_radii:
        stem = aperture_column(r)
        if n:
            flux, ferr, aflag = sep.sum_circle(
                data32, x, y, float(r), err=err32, mask=bad, subpix=5
            )
        else:
            flux = ferr = np.zeros(0)
            aflag = np.zeros(0, dtype=np.int64)
        out[f"{stem}_flux"] = np.asarray(flux, dtype=np.float64)
        out[f"{stem}_flux_err"] = np.asarray(ferr, dtype=np.float64)
        out[f"{stem}_flag"] = (np.asarray(aflag) & (sep.APER_TRUNC | sep.APER_HASMASKED)) != 0
    del data32, err32

    # 4. Shapes: windowed moments around the final centroid.
    sh = int(min(max(3, np.ceil(4 * sigma)), 3 * half + 3))
    jx, jy = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
    gs = ~cut_stamps(bad, jx, jy, sh, fill=True)
    ds = _clean_stamps(image, jx, jy, sh, gs)
    # Positions in stamp pixels: the stamps are centred on (jx, jy).
    cxx, cyy, cxy, sflag = windowed_moments(ds, gs, x - jx + sh, y - jy + sh, sigma)
    out["shape_xx"], out["shape_yy"], out["shape_xy"] = cxx, cyy, cxy
    out["shape_flag"] = sflag

    # 5. Extendedness: data over PSF model inside ~2 FWHM, on this source's own
    # (unmasked, not-neighbour) pixels, so neighbours and masks cancel out.
    r_ext = min(max(2.0, extendedness_radius_fwhm * fwhm), float(half))
    off = np.arange(-half, half + 1, dtype=np.float64)
    rr2 = ((ix - x)[:, None, None] + off[None, None, :]) ** 2 + (
        (iy - y)[:, None, None] + off[None, :, None]
    ) ** 2
    circ = (rr2 <= r_ext**2) & g
    with np.errstate(divide="ignore", invalid="ignore"):
        model_in = np.einsum("nij,nij->n", m, circ)
        pred = psf_flux * model_in
        ratio = np.einsum("nij,nij->n", d, circ) / pred
        # Nested estimators on the same pixels: var(ap - pred) ~ var(ap) - var(pred).
        var_ap = np.einsum("nij,nij->n", v, circ)
        var_pred = (psf_err * model_in) ** 2
        ratio_err = np.sqrt(np.maximum(var_ap - var_pred, 0.1 * var_ap)) / np.abs(pred)
        snr = psf_flux / psf_err
    locus_sel = np.isfinite(ratio) & (snr > 50) & (np.abs(ratio - 1) < 0.05)
    locus = float(np.median(ratio[locus_sel])) if locus_sel.sum() >= 10 else 1.0
    excess = ratio / locus - 1.0
    ext = (excess > np.maximum(extendedness_floor, 3.0 * ratio_err)).astype(np.float64)
    valid = np.isfinite(ratio) & (psf_flux > 0) & ~out["psf_flux_flag"]
    out["extendedness_ratio"] = ratio / locus
    out["extendedness"] = np.where(valid, ext, np.nan)
    out["extendedness_flag"] = ~valid

    # 6. Pixel flags.
    cx, cy = np.clip(jx, 0, nx - 1), np.clip(jy, 0, ny - 1)
    for name, plane in (flag_planes or {}).items():
        plane = np.asarray(plane)
        around = cut_stamps(plane, jx, jy, half, fill=0)
        centre = cut_stamps(plane, cx, cy, 1, fill=0)
        # cast: numpy's stubs type a reduction over some axes as maybe a scalar.
        out[f"pixel_flag_{name}"] = cast(np.ndarray, (around > 0).any(axis=(1, 2)))
        out[f"pixel_flag_{name}_center"] = cast(np.ndarray, (centre > 0).any(axis=(1, 2)))
    out["pixel_flag_off_image"] = ~finite | ~in_image
    table = pd.DataFrame(out)
    return table


def neighbour_flux_fraction(
    image: np.ndarray,
    segmentation: np.ndarray,
    source_ids: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    radius: float,
    flux: np.ndarray,
) -> np.ndarray:
    """Light of *other* sources' footprints inside a circle of ``radius`` around each source,
    as a fraction of ``flux`` (inf where ``flux`` is not positive).

    An aperture flux includes that light; the aperture correction must be
    fitted on stars whose apertures hold none of it.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    half = int(np.ceil(radius)) + 1
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    seg = cut_stamps(np.asarray(segmentation), ix, iy, half)
    data = cut_stamps(np.asarray(image), ix, iy, half).astype(np.float64)
    off = np.arange(-half, half + 1, dtype=np.float64)
    dx = off[None, None, :] - (x - ix)[:, None, None]
    dy = off[None, :, None] - (y - iy)[:, None, None]
    others = (seg != 0) & (seg != np.asarray(source_ids)[:, None, None])
    inside = dx**2 + dy**2 <= radius**2
    light = np.where(others & inside & np.isfinite(data), np.maximum(data, 0.0), 0.0)
    flux = np.asarray(flux, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, light.sum(axis=(1, 2)) / flux, np.inf)


def _clean_stamps(
    array: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int, good: np.ndarray
) -> np.ndarray:
    """float64 cut-outs of ``array`` with the pixels that are not ``good`` set to 0."""
    stamps = cut_stamps(array, ix, iy, half).astype(np.float64)
    stamps[~good] = 0.0
    return stamps


_APCORR_CARD = re.compile(r"^APC(ORD|XC|YC|XS|YS|NUSED|SCAT|\d+)$")


def without_aperture_correction(header: fits.Header) -> fits.Header:
    """``header`` less the cards of :meth:`ApertureCorrection.to_cards` (for images whose
    PSF or pixel frame is no longer the one the correction was measured for)."""
    out = header.copy()
    for key in [k for k in out.keys() if _APCORR_CARD.match(k)]:
        del out[key]
    return out


@dataclass(frozen=True)
class ApertureCorrection:
    """Smooth map of (reference-aperture flux / PSF flux) over the image.

    ``coefficients`` of monomials in u = (x - x_center) / x_scale (same for
    v) in :func:`~workflow_lib.single_frame.psf.monomial_exponents` order; ``covariance``
    their covariance, so the correction's own uncertainty can be propagated.
    """

    coefficients: np.ndarray
    covariance: np.ndarray
    order: int
    x_center: float
    y_center: float
    x_scale: float
    y_scale: float
    n_used: int
    scatter: float  # robust rms of the ratio about the fit (fractional)
    used: np.ndarray

    def ratio_at(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Correction factor and its 1-sigma uncertainty at (x, y)."""
        u = (np.asarray(x, dtype=np.float64) - self.x_center) / self.x_scale
        v = (np.asarray(y, dtype=np.float64) - self.y_center) / self.y_scale
        t = polynomial_terms(u, v, self.order)
        value = t @ self.coefficients
        err = np.sqrt(np.maximum(np.einsum("nk,kl,nl->n", t, self.covariance, t), 0.0))
        return value, err

    def to_cards(self) -> list[tuple[str, Any, str]]:
        """Header cards that carry the correction with the image it was measured on
        (``APC*``; read back with :meth:`from_header`)."""
        cards: list[tuple[str, Any, str]] = [
            ("APCORD", int(self.order), "aperture correction: polynomial order"),
            ("APCXC", float(self.x_center), "aperture correction: x centre, pixels"),
            ("APCYC", float(self.y_center), "aperture correction: y centre, pixels"),
            ("APCXS", float(self.x_scale), "aperture correction: x scale, pixels"),
            ("APCYS", float(self.y_scale), "aperture correction: y scale, pixels"),
            ("APCNUSED", int(self.n_used), "aperture correction: stars used"),
            ("APCSCAT", float(self.scatter), "aperture correction: fractional scatter"),
        ]
        cards += [
            (f"APC{k}", float(c), "aperture correction: coefficient")
            for k, c in enumerate(self.coefficients)
        ]
        return cards

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> ApertureCorrection | None:
        """The correction written by :meth:`to_cards`, or None if the header has none."""
        if "APCORD" not in header:
            return None
        order = int(header["APCORD"])
        n_terms = len(monomial_exponents(order))
        keys = [f"APC{k}" for k in range(n_terms)]
        if any(key not in header for key in keys):
            raise ValueError(f"aperture correction cards {keys} incomplete in the header")
        return cls(
            coefficients=np.array([float(header[key]) for key in keys]),
            covariance=np.zeros((n_terms, n_terms)),
            order=order,
            x_center=float(header["APCXC"]),
            y_center=float(header["APCYC"]),
            x_scale=float(header["APCXS"]),
            y_scale=float(header["APCYS"]),
            n_used=int(header.get("APCNUSED", 0)),
            scatter=float(header.get("APCSCAT", float("nan"))),
            used=np.zeros(0, dtype=bool),
        )

    def apply(
        self, x: np.ndarray, y: np.ndarray, flux: np.ndarray, err: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Aperture-corrected fluxes and errors (the correction's error added in quadrature)."""
        ratio, ratio_err = self.ratio_at(x, y)
        flux = np.asarray(flux, dtype=np.float64)
        err = np.asarray(err, dtype=np.float64)
        new = flux * ratio
        new_err = np.sqrt((err * ratio) ** 2 + (flux * ratio_err) ** 2)
        return new, new_err


def fit_aperture_correction(
    x: np.ndarray,
    y: np.ndarray,
    psf_flux: np.ndarray,
    psf_flux_err: np.ndarray,
    ap_flux: np.ndarray,
    ap_flux_err: np.ndarray,
    *,
    used: np.ndarray | None = None,
    order: int = 1,
    clip_sigma: float = 3.0,
    max_iter: int = 5,
    x_center: float | None = None,
    y_center: float | None = None,
    x_scale: float | None = None,
    y_scale: float | None = None,
    min_stars_per_term: int = 5,
) -> ApertureCorrection:
    """Fit the ratio ap_flux / psf_flux of bright isolated stars as a low-order polynomial.

    The PSF model's fixed-size kernel (and its normalisation) misses the
    PSF wings; a large reference aperture (radius ~3-4 FWHM, the caller's
    choice) catches them, and the zero point is then fitted on the corrected
    PSF fluxes. Weights come from the ratio's errors (plus the robust scatter
    in quadrature, so very bright stars do not dominate), outliers are
    clipped, and the order drops when stars are few. The image frame of
    (u, v) defaults to the stars' bounding box.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    pf = np.asarray(psf_flux, dtype=np.float64)
    af = np.asarray(ap_flux, dtype=np.float64)
    ae = np.asarray(ap_flux_err, dtype=np.float64)
    sel = np.ones(x.size, dtype=bool) if used is None else np.asarray(used, dtype=bool).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = af / pf
        # The aperture flux dominates the noise of the ratio (the PSF flux is
        # measured on a subset of the same pixels): use its error alone;
        # ``psf_flux_err`` is accepted for symmetry and future weighting.
        ratio_err = np.abs(ratio) * np.sqrt((ae / af) ** 2)
    sel &= np.isfinite(ratio) & np.isfinite(ratio_err) & (pf > 0) & (af > 0) & (ratio_err > 0)
    if sel.sum() < 1:
        raise ValueError("no usable stars for the aperture correction")
    xc = float(0.5 * (x[sel].min() + x[sel].max())) if x_center is None else float(x_center)
    yc = float(0.5 * (y[sel].min() + y[sel].max())) if y_center is None else float(y_center)
    xs = float(max(0.5 * (x[sel].max() - x[sel].min()), 1.0)) if x_scale is None else x_scale
    ys = float(max(0.5 * (y[sel].max() - y[sel].min()), 1.0)) if y_scale is None else y_scale
    u, v = (x - xc) / xs, (y - yc) / ys
    base = sel.copy()
    fit_order = int(order)
    n_terms = len(monomial_exponents(fit_order))
    while fit_order > 0 and base.sum() < min_stars_per_term * n_terms:
        fit_order -= 1
        n_terms = len(monomial_exponents(fit_order))
    t = polynomial_terms(u, v, fit_order)
    # Start from the median ratio (robust to the blends a first fit would follow),
    # then clip about the current fit; clipped stars may come back later.
    coef = np.zeros(t.shape[1])
    coef[0] = float(np.median(ratio[base]))
    scatter = 1.4826 * float(np.median(np.abs(ratio[base] - coef[0])))
    cov = np.zeros((t.shape[1], t.shape[1]))
    for _ in range(max(1, int(max_iter))):
        resid = ratio - t @ coef
        pull = resid / np.sqrt(ratio_err**2 + scatter**2)
        new_sel = base & (np.abs(pull) < clip_sigma)
        if new_sel.sum() < t.shape[1]:
            new_sel = base
        w = 1.0 / (ratio_err**2 + scatter**2)
        a = t[new_sel] * np.sqrt(w[new_sel])[:, None]
        coef, *_ = np.linalg.lstsq(a, ratio[new_sel] * np.sqrt(w[new_sel]), rcond=None)
        resid = ratio - t @ coef
        # Intrinsic scatter beyond the errors (in ratio units), from robust moments.
        rs = resid[new_sel]
        excess = (1.4826 * np.median(np.abs(rs))) ** 2 - np.median(ratio_err[new_sel] ** 2)
        scatter = float(np.sqrt(max(excess, 0.0)))
        converged = np.array_equal(new_sel, sel)
        sel = new_sel
        if converged:
            break
    if sel.sum() >= 1:
        w = 1.0 / (ratio_err**2 + scatter**2)
        a = t[sel] * np.sqrt(w[sel])[:, None]
        coef, *_ = np.linalg.lstsq(a, ratio[sel] * np.sqrt(w[sel]), rcond=None)
        cov = np.linalg.pinv(a.T @ a)
        chi2 = float(np.sum(((ratio - t @ coef) ** 2 * w)[sel]))
        dof = max(int(sel.sum()) - t.shape[1], 1)
        cov = cov * max(chi2 / dof, 1.0)
    resid = (ratio - t @ coef)[sel]
    frac_scatter = float(
        1.4826 * np.median(np.abs(resid - np.median(resid))) / np.median(ratio[sel])
    )
    log.debug(
        "aperture correction: %d stars, order %d, scatter %.4f", sel.sum(), fit_order, frac_scatter
    )
    return ApertureCorrection(
        coefficients=np.asarray(coef, dtype=np.float64),
        covariance=np.asarray(cov, dtype=np.float64),
        order=fit_order,
        x_center=xc,
        y_center=yc,
        x_scale=xs,
        y_scale=ys,
        n_used=int(sel.sum()),
        scatter=frac_scatter,
        used=sel,
    )
