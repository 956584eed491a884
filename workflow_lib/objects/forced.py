"""Forced photometry: PSF fluxes at fixed positions.

The PSF flux of a source at a *fixed* position (no recentring) is linear in
the data: the amplitude ``f`` minimising ``sum_p (d_p - f m_p)^2`` over the
PSF-fit stamp, with ``m`` the PSF model at the sub-pixel position,

    f = sum(m d) / sum(m^2),    var(f) = sum(m^2 v) / sum(m^2)^2,

unweighted as in meas_base's PsfFlux (so a variance plane that contains the
sources' own photon noise cannot bias it), its error from the variance plane
``v``. Masked pixels get zero weight. Sources whose stamps overlap are fitted
*simultaneously* (one amplitude each, the same unweighted least squares over
the union of their pixels), so a neighbour's light is not counted twice; the
errors then come from the full covariance ``A^-1 (M^T V M) A^-1``.

On an image with uncorrelated pixel noise (a calexp) these errors are exact;
on a resampled coadd they miss the noise correlation (see
:func:`workflow_lib.objects.measure_objects.noise_correlation_factor`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pandas as pd
from astropy.wcs import WCS

from workflow_lib.core.exposure import Exposure
from workflow_lib.core.flags import ForcedSourceFlag
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.single_frame.background import native_float
from workflow_lib.single_frame.calibrate import pixel_scale_arcsec
from workflow_lib.single_frame.psf import cut_stamps, kernel_centroid

log = logging.getLogger(__name__)

# Mask planes whose pixels carry no usable signal on a calexp (single-frame's choice).
UNUSABLE_PLANES: tuple[str, ...] = ("BAD", "SAT", "CR", "NO_DATA", "EDGE")


def psf_fit_half_size(
    psf: PsfModel, *, fit_radius_fwhm: float = 2.0, fwhm: float | None = None
) -> int:
    """Half-size (pixels) of the PSF-fit stamp: ``fit_radius_fwhm`` FWHM, within the kernel.

    ``fwhm`` (pixels) saves re-measuring the model's FWHM (~0.1 s) when known.
    """
    if fwhm is None:
        fwhm = psf.fwhm_at(psf.x_center, psf.y_center)
    return int(min(psf.size // 2, max(3, np.ceil(fit_radius_fwhm * fwhm))))


def psf_centroid_offset(psf: PsfModel, *, fwhm: float | None = None) -> tuple[float, float]:
    """Windowed centroid (dx, dy) of the PSF kernel at the model centre, in pixels.

    Positions are windowed (or PSF-fit) centroids; a model whose kernel is
    not centred on its central pixel is shifted by this much so that a star's
    model lands where its centroid was measured (zero for recentred models).
    """
    sigma = None if fwhm is None else max(fwhm / 2.3548200450309493, 0.5)
    return kernel_centroid(psf.kernel_at(psf.x_center, psf.y_center), sigma=sigma)


def model_stamps(
    psf: PsfModel,
    x: np.ndarray,
    y: np.ndarray,
    half: int,
    *,
    offset: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF models (n, 2 half + 1, 2 half + 1) of unit flux at (x, y), and the integer pixel
    of each stamp's centre (within a pixel of (x, y)). ``offset``: the model's
    :func:`psf_centroid_offset`, if already known."""
    from workflow_lib.single_frame.measure import psf_model_stamps

    dx, dy = psf_centroid_offset(psf) if offset is None else offset
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    # Stamps are centred on round(x - dx); the model inside sits at (x - dx).
    return psf_model_stamps(psf, x - dx, y - dy, half)


def fixed_psf_fluxes(
    image: np.ndarray,
    variance: np.ndarray,
    bad: np.ndarray | None,
    psf: PsfModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    fit_radius_fwhm: float = 2.0,
    joint: bool = True,
    alone: np.ndarray | None = None,
    max_masked_fraction: float = 0.2,
    max_group_size: int = 2000,
    bad_bits: int | None = None,
) -> pd.DataFrame:
    """PSF fluxes at fixed positions (0-based pixels of ``image``) with variance-plane errors.

    ``bad`` (bool) marks pixels to ignore; with ``bad_bits`` it is an integer
    mask plane image instead, and pixels with any of those bits are ignored.
    With ``joint`` sources whose fit stamps overlap are fitted together; ``alone``
    (bool per source) keeps some
    out of the joint fits (a deblended parent would duplicate its children).
    Returns per source: ``psf_flux``, ``psf_flux_err``, ``masked_fraction``,
    ``group_size`` (1 = fitted alone), ``flag_edge`` (stamp leaves the image),
    ``flag_masked``, ``center_bad`` (a bad pixel in the central 3x3) and
    ``flag`` (no usable flux).
    """
    ny, nx = image.shape
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    n = x.size
    finite = np.isfinite(x) & np.isfinite(y)
    xs, ys = np.where(finite, x, 0.0), np.where(finite, y, 0.0)
    fwhm = psf.fwhm_at(psf.x_center, psf.y_center)
    half = psf_fit_half_size(psf, fit_radius_fwhm=fit_radius_fwhm, fwhm=fwhm)
    models, ix, iy = model_stamps(psf, xs, ys, half, offset=psf_centroid_offset(psf, fwhm=fwhm))
    # Everything on the stamps only: a 4k image is never copied or converted whole.
    d = cut_stamps(image, ix, iy, half, fill=np.nan).astype(np.float64)
    v = cut_stamps(variance, ix, iy, half, fill=np.nan).astype(np.float64)
    bad_stamp = ~np.isfinite(d) | ~np.isfinite(v) | (v < 0)  # off the image: NaN fill
    if bad is not None and bad_bits is not None:
        bad_stamp |= (cut_stamps(bad, ix, iy, half, fill=0) & bad_bits) != 0
    elif bad is not None:
        bad_stamp |= cut_stamps(np.asarray(bad, dtype=bool), ix, iy, half, fill=True)
    d[bad_stamp] = 0.0
    v[bad_stamp] = 0.0
    good = ~bad_stamp
    mg = models * good
    a_diag = (mg * mg).sum(axis=(1, 2))
    b = (mg * d).sum(axis=(1, 2))
    noise_diag = (mg * mg * v).sum(axis=(1, 2))
    full = (models * models).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = b / a_diag
        err = np.sqrt(noise_diag) / a_diag
        masked = 1.0 - a_diag / full
    group_size = np.ones(n, dtype=np.int64)
    if joint and n > 1:
        solo = ~finite if alone is None else (~finite | np.asarray(alone, dtype=bool))
        flux, err, group_size = _joint_fit(
            mg, d, v, ix, iy, half, flux, err, a_diag, b, noise_diag, solo, max_group_size
        )
    in_image = (ix - half >= 0) & (ix + half < nx) & (iy - half >= 0) & (iy + half < ny)
    centre = bad_stamp[:, half - 1 : half + 2, half - 1 : half + 2] if half >= 1 else bad_stamp
    flag = ~finite | ~np.isfinite(flux) | ~np.isfinite(err) | (masked > max_masked_fraction)
    return pd.DataFrame(
        {
            "psf_flux": np.where(finite, flux, np.nan),
            "psf_flux_err": np.where(finite, err, np.nan),
            "masked_fraction": np.where(finite, masked, 1.0),
            "group_size": group_size,
            "flag_edge": ~in_image | ~finite,
            "flag_masked": masked > max_masked_fraction,
            "center_bad": centre.any(axis=(1, 2)) | ~finite,
            "flag": flag,
        }
    )


def _overlapping_pairs(ix: np.ndarray, iy: np.ndarray, half: int, use: np.ndarray) -> np.ndarray:
    """Index pairs (i < j) of sources in ``use`` whose (2 half + 1)^2 stamps share pixels."""
    from scipy.spatial import cKDTree

    idx = np.flatnonzero(use)
    if idx.size < 2:
        return np.zeros((0, 2), dtype=np.int64)
    tree = cKDTree(np.column_stack([ix[idx], iy[idx]]).astype(np.float64))
    pairs = tree.query_pairs(r=2 * half, p=np.inf, output_type="ndarray")
    return idx[pairs] if len(pairs) else np.zeros((0, 2), dtype=np.int64)


def _joint_fit(mg, d, v, ix, iy, half, flux, err, a_diag, b, noise_diag, solo, max_group_size):
    """Simultaneous unweighted fit of the amplitudes of sources with overlapping stamps."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(flux)
    group_size = np.ones(n, dtype=np.int64)
    pairs = _overlapping_pairs(ix, iy, half, ~solo)
    if len(pairs) == 0:
        return flux, err, group_size
    size = 2 * half + 1
    a_off = np.empty(len(pairs))
    n_off = np.empty(len(pairs))
    # The overlap of two stamps depends only on their offset: one vectorised product
    # per distinct offset instead of one per pair.
    ox_all = (ix[pairs[:, 1]] - ix[pairs[:, 0]]).astype(np.int64)
    oy_all = (iy[pairs[:, 1]] - iy[pairs[:, 0]]).astype(np.int64)
    span = 2 * size + 1
    keys, which = np.unique((ox_all + size) * span + (oy_all + size), return_inverse=True)
    by_offset = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[by_offset], np.arange(len(keys) + 1))
    for g, key in enumerate(keys):
        ox, oy = int(key // span) - size, int(key % span) - size
        ks = by_offset[bounds[g] : bounds[g + 1]]
        i, j = pairs[ks, 0], pairs[ks, 1]
        ri, ci = slice(max(0, oy), size + min(0, oy)), slice(max(0, ox), size + min(0, ox))
        rj, cj = slice(max(0, -oy), size + min(0, -oy)), slice(max(0, -ox), size + min(0, -ox))
        prod = mg[i, ri, ci] * mg[j, rj, cj]
        a_off[ks] = prod.sum(axis=(1, 2))
        n_off[ks] = (prod * v[i, ri, ci]).sum(axis=(1, 2))
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    by_label = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[by_label], np.arange(labels.max() + 2))
    pair_group = labels[pairs[:, 0]]
    order = np.argsort(pair_group, kind="stable")
    bounds = np.searchsorted(pair_group[order], np.arange(labels.max() + 2))
    flux, err = flux.copy(), err.copy()
    for g in np.unique(pair_group):
        idx = by_label[starts[g] : starts[g + 1]]
        if idx.size > max_group_size:
            log.warning("a group of %d overlapping sources is fitted one by one", idx.size)
            continue
        sel = order[bounds[g] : bounds[g + 1]]
        ii = np.searchsorted(idx, pairs[sel, 0])  # idx is sorted (stable argsort)
        jj = np.searchsorted(idx, pairs[sel, 1])
        amat = np.diag(a_diag[idx])
        nmat = np.diag(noise_diag[idx])
        amat[ii, jj] = amat[jj, ii] = a_off[sel]
        nmat[ii, jj] = nmat[jj, ii] = n_off[sel]
        usable = a_diag[idx] > 0
        if not usable.any():
            continue
        sub = np.ix_(usable, usable)
        try:
            inv = np.linalg.inv(amat[sub])
        except np.linalg.LinAlgError:
            continue
        target = idx[usable]
        flux[target] = inv @ b[target]
        cov = inv @ nmat[sub] @ inv
        err[target] = np.sqrt(np.maximum(np.diag(cov), 0.0))
        group_size[idx] = idx.size
    return flux, err, group_size


def _on_image_candidates(wcs: WCS, shape: tuple[int, int], ra: np.ndarray, dec: np.ndarray):
    """Sources within the circle around the image's corners (a cheap pre-selection
    before the iterative SIP inversion, which may not converge far off the image)."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    ny, nx = shape
    cx, cy = (
        np.array([-0.5, nx - 0.5, nx - 0.5, -0.5, (nx - 1) / 2]),
        np.array([-0.5, -0.5, ny - 0.5, ny - 0.5, (ny - 1) / 2]),
    )
    cra, cdec = wcs.all_pix2world(cx, cy, 0)
    centre = SkyCoord(cra[-1] * u.deg, cdec[-1] * u.deg)
    radius = centre.separation(SkyCoord(cra[:4] * u.deg, cdec[:4] * u.deg)).deg.max()
    sep = centre.separation(SkyCoord(ra * u.deg, dec * u.deg)).deg
    return sep < 1.05 * radius + 10.0 / 3600.0


class AppliesApertureCorrection(Protocol):
    """An aperture correction as :func:`forced_photometry` applies it (such as
    :class:`~workflow_lib.single_frame.measure.ApertureCorrection`)."""

    def apply(
        self, x: np.ndarray, y: np.ndarray, flux: np.ndarray, err: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


def forced_photometry(
    calexp: Exposure,
    objects: pd.DataFrame,
    *,
    visit: int | None = None,
    detector: int | None = None,
    band: str | None = None,
    midpoint_mjd: float | None = None,
    id_column: str = "objectId",
    aperture_correction: str | float | AppliesApertureCorrection | None = "fit",
    calib_aperture_radius_arcsec: float = 4.0,
    min_apcorr_snr: float = 50.0,
    min_apcorr_stars: int = 5,
    fit_radius_fwhm: float = 2.0,
    joint: bool = True,
    max_masked_fraction: float = 0.2,
    unusable_planes: Sequence[str] = UNUSABLE_PLANES,
) -> pd.DataFrame:
    """PSF fluxes of ``objects`` (``ra``, ``dec``, deg) at fixed positions on a calexp.

    Positions come from the calexp's fitted WCS and are not recentred;
    objects off the image are skipped (no row), those whose fit stamp is
    partly off or masked keep a row with ``flags`` set (ForcedSourceFlag).
    Overlapping objects are fitted jointly; deblended parents
    (``deblend_nChild > 0``) are fitted alone.

    ``aperture_correction``: ``"fit"`` measures ap(``calib_aperture_radius``)
    / PSF flux on this image's bright point-like, isolated objects (as
    single-frame measurement corrects Source PSF fluxes, so the two agree);
    a number or an object with ``apply(x, y, flux, err)`` (an
    :class:`~workflow_lib.single_frame.measure.ApertureCorrection`) is applied as given;
    ``None`` leaves the fluxes uncorrected. Ids default to the calexp
    metadata (EXPID/VISIT, DETECTOR, FILTER, MJD-OBS + EXPTIME / 2).

    Returns the CONTRACT ForcedSource columns (``objectId, visit, detector,
    band, midpointMjdTai, psfFlux, psfFluxErr``) plus ``x``, ``y``,
    ``psfFlux_flag``, ``apCorr`` (the factor applied), ``nFit`` (size of the
    joint fit) and ``flags``.
    """
    if calexp.wcs is None or calexp.psf is None:
        raise ValueError("forced photometry needs a calexp with a WCS and a PSF model")
    meta = calexp.metadata
    visit = int(visit if visit is not None else meta.get("VISIT", meta.get("EXPID", -1)))
    detector = int(detector if detector is not None else meta.get("DETECTOR", -1))
    band = str(band if band is not None else meta.get("BAND", meta.get("FILTER", ""))).strip()
    if midpoint_mjd is None:
        midpoint_mjd = (
            float(meta.get("MJD-OBS", np.nan)) + 0.5 * float(meta.get("EXPTIME", 0.0)) / 86400.0
        )
    ny, nx = calexp.shape
    ra = objects["ra"].to_numpy(dtype=np.float64)
    dec = objects["dec"].to_numpy(dtype=np.float64)
    near = np.zeros(len(objects), dtype=bool)
    if len(objects):
        near = _on_image_candidates(calexp.wcs, (ny, nx), ra, dec)
    idx = np.flatnonzero(near)
    x = np.full(len(objects), np.nan)
    y = np.full(len(objects), np.nan)
    if idx.size:
        x[idx], y[idx] = calexp.wcs.all_world2pix(ra[idx], dec[idx], 0, quiet=True)
    on = np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < nx - 0.5)
    on &= (y >= -0.5) & (y < ny - 0.5)
    idx = np.flatnonzero(on)
    sel = objects.iloc[idx]
    x, y = x[idx], y[idx]
    planes = [p for p in unusable_planes if p in calexp.mask_planes.bits]
    bad_bits = calexp.mask_planes.bitmask(*planes) if planes else 0
    parents = (
        sel["deblend_nChild"].to_numpy() > 0
        if "deblend_nChild" in sel
        else np.zeros(len(sel), dtype=bool)
    )
    fit = fixed_psf_fluxes(
        calexp.image,
        calexp.variance,
        calexp.mask,
        calexp.psf,
        x,
        y,
        fit_radius_fwhm=fit_radius_fwhm,
        joint=joint,
        alone=parents,
        max_masked_fraction=max_masked_fraction,
        bad_bits=bad_bits,
    )
    flux = fit["psf_flux"].to_numpy()
    err = fit["psf_flux_err"].to_numpy()
    flags = np.zeros(len(sel), dtype=np.int64)
    flags |= np.where(fit["flag"], int(ForcedSourceFlag.PSF_FLUX_FAILED), 0)
    flags |= np.where(fit["flag_edge"], int(ForcedSourceFlag.EDGE), 0)
    flags |= np.where(fit["center_bad"], int(ForcedSourceFlag.NO_DATA_CENTER), 0)
    flags |= np.where(fit["flag_masked"], int(ForcedSourceFlag.MASKED), 0)
    flags |= np.where(fit["group_size"] > 1, int(ForcedSourceFlag.BLENDED), 0)

    ratio = np.ones(len(sel))
    if isinstance(aperture_correction, str):
        if aperture_correction != "fit":
            raise ValueError(
                f"aperture_correction must be 'fit', a number, or None: {aperture_correction!r}"
            )
        scale = pixel_scale_arcsec(calexp.wcs)
        bad = (calexp.mask & bad_bits) != 0
        apcorr, used = fit_image_aperture_correction(
            calexp.image,
            calexp.variance,
            bad,
            x,
            y,
            flux,
            err,
            flags == 0,
            radius=calib_aperture_radius_arcsec / scale,
            point_like=_point_like(sel),
            parents=parents,
            min_snr=min_apcorr_snr,
            min_stars=min_apcorr_stars,
            shape=(ny, nx),
        )
        if apcorr is None:
            flags |= int(ForcedSourceFlag.APCORR_FAILED)
        else:
            corrected, err = apcorr.apply(x, y, flux, err)
            ratio = apcorr.ratio_at(x, y)[0]
            flux = corrected
            flags |= np.where(used, int(ForcedSourceFlag.USED_APCORR), 0)
    elif aperture_correction is not None:
        if hasattr(aperture_correction, "apply"):
            corrected, err = aperture_correction.apply(x, y, flux, err)
            ratio = np.where(flux != 0, corrected / np.where(flux != 0, flux, 1.0), np.nan)
            flux = corrected
        else:
            ratio = np.full(len(sel), float(aperture_correction))
            flux, err = flux * ratio, err * ratio
    return pd.DataFrame(
        {
            "objectId": sel[id_column].to_numpy(dtype=np.int64),
            "visit": np.full(len(sel), visit, dtype=np.int64),
            "detector": np.full(len(sel), detector, dtype=np.int64),
            "band": pd.Series([band] * len(sel), dtype=object),
            "midpointMjdTai": np.full(len(sel), float(midpoint_mjd)),
            "psfFlux": flux,
            "psfFluxErr": err,
            "x": x,
            "y": y,
            "psfFlux_flag": (flags & int(ForcedSourceFlag.PSF_FLUX_FAILED)) != 0,
            "apCorr": ratio,
            "nFit": fit["group_size"].to_numpy(),
            "flags": flags,
        }
    )


def _point_like(objects: pd.DataFrame) -> np.ndarray:
    """Objects usable as aperture-correction stars: point-like where known."""
    if "refExtendedness" in objects:
        return objects["refExtendedness"].to_numpy(dtype=np.float64) < 0.5
    return np.ones(len(objects), dtype=bool)


def fit_image_aperture_correction(
    image: np.ndarray,
    variance: np.ndarray,
    bad: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    psf_flux: np.ndarray,
    psf_flux_err: np.ndarray,
    clean: np.ndarray,
    *,
    radius: float,
    point_like: np.ndarray,
    parents: np.ndarray,
    min_snr: float,
    min_stars: int,
    shape: tuple[int, int],
):
    """Aperture correction (ap flux in ``radius`` pixels / PSF flux) from bright isolated
    point sources at fixed positions; ``(None, used)`` when there are too few of them."""
    import sep
    from scipy.spatial import cKDTree

    from workflow_lib.single_frame.measure import fit_aperture_correction

    ny, nx = shape
    n = len(x)
    used = np.zeros(n, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = psf_flux / psf_flux_err
    cand = clean & point_like & ~parents & (snr > min_snr)
    cand &= (x > radius) & (x < nx - 1 - radius) & (y > radius) & (y < ny - 1 - radius)
    if n > 1 and cand.any():
        # Isolated: no other object inside the aperture (plus a margin of 3 pixels).
        tree = cKDTree(np.column_stack([x, y]))
        counts = np.array(
            [
                len(c)
                for c in tree.query_ball_point(np.column_stack([x[cand], y[cand]]), radius + 3.0)
            ]
        )
        cand[np.flatnonzero(cand)[counts > 1]] = False
    if cand.sum() < min_stars:
        return None, used
    data = native_float(np.where(bad, 0.0, image), np.float32)
    err = native_float(np.sqrt(np.where(bad | ~np.isfinite(variance), 0.0, variance)), np.float32)
    ci = np.flatnonzero(cand)
    ap, ap_err, ap_flag = sep.sum_circle(
        data, x[ci], y[ci], float(radius), err=err, mask=np.ascontiguousarray(bad), subpix=5
    )
    ok = (np.asarray(ap_flag) & (sep.APER_TRUNC | sep.APER_HASMASKED)) == 0
    ci, ap, ap_err = ci[ok], ap[ok], ap_err[ok]
    if ci.size < min_stars:
        return None, used
    try:
        apcorr = fit_aperture_correction(
            x[ci],
            y[ci],
            psf_flux[ci],
            psf_flux_err[ci],
            ap,
            ap_err,
            x_center=(nx - 1) / 2.0,
            y_center=(ny - 1) / 2.0,
            x_scale=nx / 2.0,
            y_scale=ny / 2.0,
        )
    except ValueError:
        return None, used
    used[ci[apcorr.used]] = True
    return apcorr, used
