"""Characterize and calibrate one CCD: the chain of isr -> calexp + src + CcdVisit.

Numerics only (arrays, WCS objects and tables in; a result dataclass out): the
step ``workflow_lib.steps.process_ccd`` reads and writes. Every expected
failure (too few stars for a PSF, no reference stars, no astrometric match, no
photometric calibration) ends in a flagged CcdVisit row and no calexp, never
in an exception that stops the run.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from workflow_lib.core.config import CalibrateConfig
from workflow_lib.core.exposure import Exposure, PhotoCalib, copy_cards
from workflow_lib.core.flags import UNRELIABLE_SOURCE, CcdVisitFlag, SourceFlag
from workflow_lib.core.timing import PhaseClock

if TYPE_CHECKING:
    from workflow_lib.single_frame.measure import ApertureCorrection

log = logging.getLogger(__name__)

# Planes whose pixels carry no usable signal for background and detection.
UNUSABLE_PLANES = ("BAD", "SAT", "CR", "NO_DATA", "EDGE")
HEADER_WCS_KEYS = (
    "CTYPE1",
    "CTYPE2",
    "CRVAL1",
    "CRVAL2",
    "CRPIX1",
    "CRPIX2",
    "CD1_1",
    "CD1_2",
    "CD2_1",
    "CD2_2",
    "CUNIT1",
    "CUNIT2",
    "RADESYS",
    "EQUINOX",
)

SOURCE_COLUMNS = (
    "sourceId",
    "visit",
    "detector",
    "band",
    "ra",
    "dec",
    "x",
    "y",
    "psfFlux",
    "psfFluxErr",
    "apFlux",
    "apFluxErr",
    "extendedness",
    "flags",
)


class SingleFrameFailure(RuntimeError):
    """Processing of a CCD cannot go on; ``flag`` says why (a CcdVisitFlag)."""

    def __init__(self, flag: CcdVisitFlag, reason: str) -> None:
        super().__init__(reason)
        self.flag = flag
        self.reason = reason


@dataclass
class SingleFrameResult:
    """What one CCD yields: a calexp (None if failed), its sources and CcdVisit row."""

    calexp: Exposure | None
    sources: pd.DataFrame
    ccd_visit: dict[str, Any]
    qa: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.calexp is None


def _boresight(header: Mapping[str, Any]) -> tuple[float, float] | None:
    """The optical axis (``RA``, ``DEC`` primary keywords, deg) when present and finite."""
    try:
        ra, dec = float(header["RA"]), float(header["DEC"])
    except (KeyError, TypeError, ValueError):
        return None
    return (ra, dec) if np.isfinite(ra) and np.isfinite(dec) and abs(dec) <= 90.0 else None


def approximate_wcs(header: Mapping[str, Any]) -> WCS:
    """The header's TAN WCS (a pointing hint only; CONTRACT 1.1)."""
    cards = fits.Header()
    for key in HEADER_WCS_KEYS:
        if key in header:
            cards[key] = header[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(cards)


def pixel_scale_arcsec(wcs: WCS) -> float:
    """Mean pixel scale (arcsec) of a WCS at its reference point."""
    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)


def source_ids(visit: int, detector: int, n: int) -> np.ndarray:
    """Unique int64 ids packing (visit, detector, sequence), as LSST packs them."""
    if detector >= 1000 or n >= 1_000_000:
        raise ValueError(f"cannot pack detector {detector} with {n} sources into a sourceId")
    return (np.int64(visit) * 1000 + detector) * 1_000_000 + np.arange(n, dtype=np.int64)


def empty_sources() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_SOURCE_DTYPES.get(c, "f8")) for c in SOURCE_COLUMNS})


_SOURCE_DTYPES = {
    "sourceId": "i8",
    "visit": "i8",
    "detector": "i8",
    "band": "object",
    "flags": "i8",
}


def ccd_visit_row(
    *,
    visit: int,
    detector: int,
    band: str,
    mjd: float,
    exptime: float,
    flags: int,
    fail_reason: str = "",
    **measured: Any,
) -> dict[str, Any]:
    """A CcdVisit row with every CONTRACT column (NaN where not measured)."""
    row: dict[str, Any] = {
        "visit": int(visit),
        "detector": int(detector),
        "band": band,
        "midpointMjdTai": float(mjd) + 0.5 * float(exptime) / 86400.0,
        "expTime": float(exptime),
        "seeing": np.nan,
        "zeroPoint": np.nan,
        "zeroPointErr": np.nan,
        "skyBg": np.nan,
        "skyNoise": np.nan,
        "astromRms": np.nan,
        "nAstromStars": 0,
        "nPhotStars": 0,
        "nPsfStars": 0,
        "nSources": 0,
        "ra": np.nan,
        "dec": np.nan,
        "psfOrder": -1,
        "apCorr": np.nan,
        "flags": int(flags),
        "failReason": fail_reason,
    }
    unknown = set(measured) - set(row)
    if unknown:
        raise KeyError(f"unknown CcdVisit columns {sorted(unknown)}")
    row.update(measured)
    return row


def process_single_frame(
    exposure: Exposure,
    refcat: pd.DataFrame,
    *,
    visit: int,
    detector: int,
    band: str,
    mjd: float,
    exptime: float,
    config: CalibrateConfig,
    isr_flags: int = 0,
) -> SingleFrameResult:
    """Background, detection, PSF, measurement, astrometry and photometry of one CCD.

    ``exposure`` is the ISR output: image and variance in electrons with the
    sky still in, the raw primary header in ``metadata``. ``refcat`` is the
    standardized reference catalog around the CCD (``workflow_lib.single_frame.refcat``).
    """
    ids: dict[str, Any] = dict(visit=visit, detector=detector, band=band, mjd=mjd, exptime=exptime)
    try:
        return _process(exposure, refcat, config=config, isr_flags=isr_flags, **ids)
    except SingleFrameFailure as failure:
        log.warning("visit %d detector %d not calibrated: %s", visit, detector, failure.reason)
        flags = isr_flags | CcdVisitFlag.FAILED | failure.flag
        row = ccd_visit_row(flags=int(flags), fail_reason=failure.reason, **ids)
        return SingleFrameResult(calexp=None, sources=empty_sources(), ccd_visit=row)


def _process(
    exposure: Exposure,
    refcat: pd.DataFrame,
    *,
    visit: int,
    detector: int,
    band: str,
    mjd: float,
    exptime: float,
    config: CalibrateConfig,
    isr_flags: int,
) -> SingleFrameResult:
    from workflow_lib.single_frame import astrometry, photocal
    from workflow_lib.single_frame.detection import detect_with_background
    from workflow_lib.single_frame.measure import (
        aperture_column,
        fit_aperture_correction,
        measure_sources,
        neighbour_flux_fraction,
    )
    from workflow_lib.single_frame.psf import PsfFitError, determine_psf
    from workflow_lib.single_frame.refcat import calibration_stars

    ny, nx = exposure.shape
    flags = int(isr_flags)
    clock = PhaseClock()
    header_wcs = approximate_wcs(exposure.metadata)
    approx_scale = pixel_scale_arcsec(header_wcs)
    planes = _plane_reader(exposure)
    unusable = planes(*UNUSABLE_PLANES)
    bad_or_no_data = planes("BAD", "NO_DATA")
    if not (np.isfinite(exposure.image) & ~unusable).any():
        raise SingleFrameFailure(CcdVisitFlag.BAD_IMAGE, "no usable pixel (all masked or NaN)")
    variance = exposure.variance

    # -- characterize: background, detection, PSF --------------------------------------
    with clock.phase("background+detection"):
        # Saturated cores stay in for detection (masking them splits bright stars).
        background, detections = detect_with_background(
            exposure.image,
            variance,
            bad_or_no_data,
            threshold_sigma=config.detection_threshold,
            fwhm=_TYPICAL_SEEING_ARCSEC / approx_scale,
        )
        image = np.subtract(exposure.image, background.image, dtype=np.float32)
    catalog = detections.table
    exposure.set_mask("DETECTED", detections.footprints)
    if len(catalog) == 0:
        raise SingleFrameFailure(CcdVisitFlag.PSF_FAILED, "no sources detected")
    x0, y0 = catalog["x_win"].to_numpy(), catalog["y_win"].to_numpy()
    stars = calibration_stars(refcat)
    with clock.phase("psf"):

        def refcat_stars() -> np.ndarray | None:
            return _reference_stars_among(catalog, stars, band, header_wcs, config)

        try:
            psf_fit, psf_rows = determine_psf(
                catalog,
                image,
                variance,
                unusable,
                detections.segmentation,
                known_stars=refcat_stars,
                kernel_size=config.psf_kernel_size,
                order=config.psf_order,
            )
        except PsfFitError as err:
            raise SingleFrameFailure(CcdVisitFlag.PSF_FAILED, f"PSF model: {err}") from None
    psf_model = psf_fit.psf
    if psf_fit.order < config.psf_order:
        flags |= CcdVisitFlag.PSF_REDUCED_ORDER
    if psf_fit.method != "pixel":
        flags |= CcdVisitFlag.PSF_FALLBACK
    psf_used = np.zeros(len(catalog), dtype=bool)
    psf_used[psf_rows[psf_fit.used]] = True

    # -- measurement and aperture correction ---------------------------------------------
    ap_radius = config.ap_flux_radius_arcsec / approx_scale
    calib_radius = config.calib_aperture_radius_arcsec / approx_scale
    ap_stem, calib_stem = aperture_column(ap_radius), aperture_column(calib_radius)
    flag_planes = {
        "saturated": planes("SAT"),
        "interpolated": planes("INTRP"),
        "cr": planes("CR"),
        "bad": bad_or_no_data,
        "edge": planes("EDGE"),
    }
    with clock.phase("measurement"):
        sources = measure_sources(
            image,
            variance,
            unusable,
            psf=psf_model,
            x=x0,
            y=y0,
            aperture_radii=[ap_radius, calib_radius],
            flag_planes=flag_planes,
            segmentation=detections.segmentation,
            source_ids=catalog["id"].to_numpy(),
        )
        source_flags = _source_flags(sources, catalog, ap_stem)
        x, y = sources["x"].to_numpy(), sources["y"].to_numpy()
        reliable = (source_flags & UNRELIABLE_SOURCE) == 0
        contamination = neighbour_flux_fraction(
            image,
            detections.segmentation,
            catalog["id"].to_numpy(),
            x,
            y,
            calib_radius,
            sources[f"{calib_stem}_flux"].to_numpy(),
        )
        apcorr = fit_aperture_correction(
            x,
            y,
            sources["psf_flux"].to_numpy(),
            sources["psf_flux_err"].to_numpy(),
            sources[f"{calib_stem}_flux"].to_numpy(),
            sources[f"{calib_stem}_flux_err"].to_numpy(),
            used=_clean_aperture_stars(psf_used & reliable, contamination),
            x_center=(nx - 1) / 2.0,
            y_center=(ny - 1) / 2.0,
            x_scale=nx / 2.0,
            y_scale=ny / 2.0,
        )
        flux_e, _ = apcorr.apply(
            x, y, sources["psf_flux"].to_numpy(), sources["psf_flux_err"].to_numpy()
        )
        # The correction's own uncertainty is common to every source of the CCD: it
        # belongs to the zero point's error, not to each flux's (where it would cap
        # the S/N of bright stars, the ones the zero point needs, at 1 / its error).
        ratio, _ = apcorr.ratio_at(x, y)
        flux_e_err = sources["psf_flux_err"].to_numpy() * ratio
    source_flags |= np.where(np.isfinite(flux_e), 0, int(SourceFlag.APCORR_FAILED))

    # -- astrometry ---------------------------------------------------------------------------
    if len(stars) == 0:
        raise SingleFrameFailure(
            CcdVisitFlag.NO_REFERENCE_STARS, "no reference stars overlap this CCD"
        )
    mag_column = _reference_mag_column(stars, band)
    good = reliable & np.isfinite(flux_e) & (flux_e > 0)
    centroid_err = np.hypot(sources["x_err"].to_numpy(), sources["y_err"].to_numpy()) / np.sqrt(2)
    # Centroid noise plus a 5 mas floor (reference-catalog errors, PSF model).
    weights = 1.0 / ((np.nan_to_num(centroid_err, nan=1.0) * approx_scale) ** 2 + 0.005**2)
    # Every detection takes part in the pattern match, ranked by its detection
    # flux (saturated stars are the refcat's brightest); only reliable ones fit.
    positioned = np.isfinite(x) & np.isfinite(y)
    with clock.phase("astrometry"):
        try:
            match, wcs_fit = astrometry.solve_astrometry(
                x[positioned],
                y[positioned],
                catalog["flux"].to_numpy()[positioned],
                stars["ra"].to_numpy(),
                stars["dec"].to_numpy(),
                stars[mag_column].to_numpy(),
                header_wcs,
                image_shape=(ny, nx),
                sip_order=config.sip_order,
                max_offset_arcsec=config.astrometry_max_offset_arcsec,
                max_rotation_deg=config.astrometry_max_rotation_deg,
                weights=weights[positioned],
                fit_mask=good[positioned],
                boresight=_boresight(exposure.metadata),
            )
        except astrometry.AstrometryError as err:
            raise SingleFrameFailure(CcdVisitFlag.ASTROMETRY_FAILED, f"astrometry: {err}") from None
    wcs = wcs_fit.wcs
    # Flagged when the number or spread of the stars capped the order below the configured
    # one, not when cross-validation found the higher terms unnecessary.
    if wcs_fit.max_order < config.sip_order:
        flags |= CcdVisitFlag.SIP_REDUCED_ORDER
    src_index = np.flatnonzero(positioned)[match.source_index]
    ref_index = np.asarray(match.reference_index)
    astrom_used = np.zeros(len(sources), dtype=bool)
    astrom_used[src_index[wcs_fit.used]] = True

    # -- photometric calibration ----------------------------------------------------------
    if f"{band}_mag" not in stars:
        raise SingleFrameFailure(
            CcdVisitFlag.PHOTOCAL_FAILED, f"the reference catalog has no {band}-band magnitudes"
        )
    snr = flux_e / flux_e_err
    pair_ok = (snr[src_index] >= config.photocal_min_snr) & good[src_index]
    with clock.phase("photocal"):
        try:
            zp_fit = photocal.fit_zero_point(
                flux_e[src_index[pair_ok]] / exptime,
                flux_e_err[src_index[pair_ok]] / exptime,
                stars[f"{band}_mag"].to_numpy()[ref_index[pair_ok]],
                stars[f"{band}_mag_err"].to_numpy()[ref_index[pair_ok]],
            )
        except photocal.PhotoCalError as err:
            raise SingleFrameFailure(CcdVisitFlag.PHOTOCAL_FAILED, f"photometry: {err}") from None
    phot_used = np.zeros(len(sources), dtype=bool)
    phot_used[src_index[pair_ok][zp_fit.used]] = True

    # -- products ------------------------------------------------------------------------------
    ratio_c, ratio_err_c = apcorr.ratio_at(np.array([(nx - 1) / 2.0]), np.array([(ny - 1) / 2.0]))
    zero_point_err = float(np.hypot(zp_fit.zero_point_err, 1.0857 * ratio_err_c[0] / ratio_c[0]))
    njy = PhotoCalib.njy_per_electron(zp_fit.zero_point, exptime)
    image *= np.float32(njy)  # our own array: scaled to nJy in place
    calexp = Exposure(
        image=image,
        variance=variance * njy**2,
        mask=exposure.mask,
        wcs=wcs,
        psf=psf_model,
        photo_calib=PhotoCalib(1.0, zero_point=zp_fit.zero_point, zero_point_err=zero_point_err),
        metadata=_calexp_metadata(exposure.metadata, apcorr),
        mask_planes=exposure.mask_planes,
        origin=exposure.origin,
    )
    ra, dec = wcs.all_pix2world(x, y, 0)
    source_flags |= np.where(psf_used, int(SourceFlag.USED_PSF), 0)
    source_flags |= np.where(astrom_used, int(SourceFlag.USED_ASTROMETRY), 0)
    source_flags |= np.where(phot_used, int(SourceFlag.USED_PHOTOCAL), 0)
    table = pd.DataFrame(
        {
            "sourceId": source_ids(visit, detector, len(sources)),
            "visit": np.int64(visit),
            "detector": np.int64(detector),
            "band": band,
            "ra": ra,
            "dec": dec,
            "x": x,
            "y": y,
            "psfFlux": flux_e * njy,
            "psfFluxErr": flux_e_err * njy,
            "apFlux": sources[f"{ap_stem}_flux"].to_numpy() * njy,
            "apFluxErr": sources[f"{ap_stem}_flux_err"].to_numpy() * njy,
            "extendedness": sources["extendedness"].to_numpy(),
            "flags": source_flags,
            "xErr": sources["x_err"].to_numpy(),
            "yErr": sources["y_err"].to_numpy(),
            "snr": snr,
            "ixx": sources["shape_xx"].to_numpy(),
            "iyy": sources["shape_yy"].to_numpy(),
            "ixy": sources["shape_xy"].to_numpy(),
            "psfChi2": sources["psf_chi2"].to_numpy(),
        }
    )
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    center_ra, center_dec = wcs.all_pix2world([cx], [cy], 0)
    scale = pixel_scale_arcsec(wcs)
    row = ccd_visit_row(
        visit=visit,
        detector=detector,
        band=band,
        mjd=mjd,
        exptime=exptime,
        flags=flags,
        seeing=psf_model.fwhm_at(cx, cy) * scale,
        zeroPoint=zp_fit.zero_point,
        zeroPointErr=zero_point_err,
        skyBg=_smooth_map_median(background.image),
        skyNoise=float(background.global_rms),
        astromRms=wcs_fit.rms_arcsec,
        nAstromStars=int(wcs_fit.n_used),
        nPhotStars=int(zp_fit.n_used),
        nPsfStars=int(psf_used.sum()),
        nSources=len(table),
        ra=float(center_ra[0]),
        dec=float(center_dec[0]),
        psfOrder=int(psf_fit.order),
        apCorr=float(apcorr.ratio_at(np.array([cx]), np.array([cy]))[0][0]),
    )
    qa = {
        "n_detections": len(catalog),
        "n_psf_candidates": int(psf_rows.size),
        "psf_method": psf_fit.method,
        "n_matches": len(src_index),
        "zero_point_scatter_mag": float(zp_fit.scatter_mag),
        "header_wcs_offset_arcsec": _offset_arcsec(header_wcs, wcs, nx, ny),
        "timings_s": clock.rounded()["wall"],
        "cpu_timings_s": clock.rounded()["cpu"],
    }
    return SingleFrameResult(calexp=calexp, sources=table, ccd_visit=row, qa=qa)


# A first detection pass needs a filter width before any PSF is known.
_TYPICAL_SEEING_ARCSEC = 0.8


def _clean_aperture_stars(candidates: np.ndarray, contamination: np.ndarray) -> np.ndarray:
    """The stars for the aperture correction: PSF stars whose calibration aperture holds
    the least light of other sources (under 0.2% of their own where at least three
    are that clean, else under 1%, else the three cleanest)."""
    for limit in (0.002, 0.01):
        clean = candidates & (contamination < limit)
        if clean.sum() >= 3:
            return clean
    order = np.argsort(np.where(candidates, contamination, np.inf), kind="stable")[:3]
    cleanest = np.zeros_like(candidates)
    cleanest[order] = candidates[order]
    return cleanest


def _reference_stars_among(
    catalog: pd.DataFrame, stars: pd.DataFrame, band: str, header_wcs: WCS, config: CalibrateConfig
) -> np.ndarray | None:
    """Detections that a first pattern match puts on reference-catalog stars (bool per row).

    Where stars are few and galaxies many, the size locus alone cannot tell a
    lone star from compact galaxies; the catalog's star flag can. None when
    there is no reference star or the match fails (astrometry reports that
    later, with the measured centroids).
    """
    from workflow_lib.single_frame import astrometry

    if len(stars) == 0 or not any(c.endswith("_mag") for c in stars.columns):
        return None
    positioned = np.isfinite(catalog["x_win"].to_numpy()) & np.isfinite(catalog["y_win"].to_numpy())
    mag_column = _reference_mag_column(stars, band)
    try:
        match = astrometry.match_sources(
            catalog["x_win"].to_numpy()[positioned],
            catalog["y_win"].to_numpy()[positioned],
            catalog["flux"].to_numpy()[positioned],
            stars["ra"].to_numpy(),
            stars["dec"].to_numpy(),
            stars[mag_column].to_numpy(),
            header_wcs,
            max_offset_arcsec=config.astrometry_max_offset_arcsec,
            max_rotation_deg=config.astrometry_max_rotation_deg,
        )
    except astrometry.AstrometryError:
        return None
    known = np.zeros(len(catalog), dtype=bool)
    known[np.flatnonzero(positioned)[match.source_index]] = True
    return known


def _plane_reader(exposure: Exposure) -> Callable[..., np.ndarray]:
    """``exposure.mask_of`` through one reused int32 scratch frame.

    ``mask_of`` makes a new full-size int32 temporary per call; on a 4k x 4k
    detector each costs as much in page faults as the test itself.
    """
    scratch = np.empty(exposure.mask.shape, dtype=exposure.mask.dtype)

    def planes(*names: str) -> np.ndarray:
        np.bitwise_and(exposure.mask, exposure.mask_planes.bitmask(*names), out=scratch)
        return scratch != 0

    return planes


def _smooth_map_median(smooth: np.ndarray) -> float:
    """Median of a smooth map (the sky model) from a 1-in-16 subsample: the same
    value to far better than its noise, at a sixteenth of the cost."""
    return float(np.median(smooth[::4, ::4]))


def _source_flags(sources: pd.DataFrame, catalog: pd.DataFrame, ap_stem: str) -> np.ndarray:
    """The Source ``flags`` bits from the measurement's per-algorithm flags."""
    import sep

    def bits(column: str, flag: SourceFlag) -> np.ndarray:
        if column not in sources:
            return np.zeros(len(sources), dtype=np.int64)
        return np.where(sources[column].to_numpy().astype(bool), int(flag), 0)

    flags = (
        bits("centroid_flag", SourceFlag.CENTROID_FAILED)
        | bits("psf_flux_flag", SourceFlag.PSF_FLUX_FAILED)
        | bits(f"{ap_stem}_flag", SourceFlag.AP_FLUX_FAILED)
        | bits("psf_flux_flag_edge", SourceFlag.EDGE)
        | bits("pixel_flag_edge_center", SourceFlag.EDGE)
        | bits("pixel_flag_saturated_center", SourceFlag.SATURATED_CENTER)
        | bits("pixel_flag_interpolated_center", SourceFlag.INTERPOLATED_CENTER)
        | bits("pixel_flag_cr_center", SourceFlag.CR_CENTER)
        | bits("pixel_flag_bad_center", SourceFlag.BAD_CENTER)
    )
    merged = (catalog["flags"].to_numpy().astype(np.int64) & sep.OBJ_MERGED) != 0
    return (flags | np.where(merged, int(SourceFlag.BLENDED), 0)).astype(np.int64)


def _reference_mag_column(stars: pd.DataFrame, band: str) -> str:
    """The refcat magnitude used to rank stars for matching: this band, else any."""
    if f"{band}_mag" in stars:
        return f"{band}_mag"
    available = [c for c in stars.columns if c.endswith("_mag")]
    if not available:
        raise SingleFrameFailure(
            CcdVisitFlag.NO_REFERENCE_STARS, "reference catalog has no magnitudes"
        )
    return available[0]


def _calexp_metadata(raw_header: Mapping[str, Any], apcorr: ApertureCorrection) -> fits.Header:
    """Raw primary cards minus the pointing-hint WCS (the fitted one is in every HDU),
    plus the aperture correction (warps carry it on to the coadd's)."""
    structural = ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "COMMENT", "HISTORY", "")
    header = copy_cards(raw_header, lambda key: key in HEADER_WCS_KEYS or key in structural)
    header["BUNIT"] = "nJy"
    for key, value, comment in apcorr.to_cards():
        header[key] = (value, comment)
    return header


def _offset_arcsec(header_wcs: WCS, wcs: WCS, nx: int, ny: int) -> float:
    x, y = (nx - 1) / 2.0, (ny - 1) / 2.0
    a = header_wcs.pixel_to_world(x, y)
    b = wcs.pixel_to_world(x, y)
    return float(a.separation(b).arcsec)
