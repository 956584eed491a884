"""Instrument signature removal numerics (array in, array out; no file I/O).

Parsing FITS sections and assembling amplifiers (shared with the simulator's
tests); per-amplifier processing (row-by-row serial overscan, trim, gain,
saturation, read noise); master bias, dark and flat from lists of raw
exposures and defect maps from them; and :func:`run_isr`, which turns one
science raw into an :class:`~workflow_lib.core.exposure.Exposure` in electrons
with mask and variance planes, and :func:`eimage_exposure`, its counterpart
for already-calibrated single-HDU images. Missing calibrations are skipped and
recorded, never invented.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes
from workflow_lib.core.registry import Section, parse_section
from workflow_lib.core.timing import PhaseClock
from workflow_lib.single_frame.cosmic_rays import detect_cosmic_rays, interpolate_masked

log = logging.getLogger(__name__)


def amplifier_gains(amps: Sequence[tuple[np.ndarray, Mapping[str, Any]]]) -> list[float]:
    """The ``GAIN`` (e-/ADU) of every amplifier; KeyError naming the amplifier if absent."""
    gains = []
    for k, (_, header) in enumerate(amps):
        if "GAIN" not in header:
            raise KeyError(f"amplifier {header.get('EXTNAME', k)} has no GAIN keyword")
        gains.append(float(header["GAIN"]))
    return gains


def overscan_per_row(data: np.ndarray, biassec: Section, datasec: Section) -> np.ndarray:
    """Robust per-row overscan level for the rows of ``datasec``.

    The median of the BIASSEC pixels of each row (rows matched by index when
    BIASSEC covers the rows of DATASEC, otherwise one overall median).
    """
    biassec = _overscan_rows_of_data(biassec, datasec)
    over = np.asarray(data[biassec.slices], dtype=np.float64)
    if biassec.y == datasec.y:
        return np.median(over, axis=1)
    return np.full(datasec.shape[0], np.median(over))


def _overscan_rows_of_data(biassec: Section, datasec: Section) -> Section:
    """The rows of ``biassec`` that are the rows of ``datasec``, where it covers them all.

    A serial overscan given over the whole height of the amplifier (parallel
    prescan and overscan rows included) still has one row per data row; the
    rows beyond the data's are left out, so the level is fitted row by row.
    Otherwise ``biassec`` is returned as it is.
    """
    if biassec.y.start <= datasec.y.start and biassec.y.stop >= datasec.y.stop:
        return Section(x=biassec.x, y=datasec.y, x_flip=biassec.x_flip, y_flip=biassec.y_flip)
    return biassec


def assemble_amplifiers(
    amps: Sequence[tuple[np.ndarray, Mapping[str, Any]]],
    *,
    overscan_subtract: bool = False,
    dtype: type | np.dtype = np.float32,
) -> np.ndarray:
    """Place each amplifier's DATASEC pixels in the detector at its DETSEC.

    Axes flipped in DETSEC are reversed, so the assembled image has the
    detector's orientation. With ``overscan_subtract`` each data row first
    loses the median of the same row of BIASSEC (row-correlated bias jitter
    is common to data and overscan). The detector size is the union of the
    DETSECs.
    """
    if not amps:
        raise ValueError("no amplifiers to assemble")
    geometry = _amplifier_geometry(amps)
    ny = max(g.detsec.y.stop for g in geometry)
    nx = max(g.detsec.x.stop for g in geometry)
    image = np.zeros((ny, nx), dtype=dtype)
    for g in geometry:
        pix = np.asarray(g.data[g.datasec.slices], dtype=np.float64)
        if overscan_subtract:
            if g.biassec is None:
                raise KeyError(f"amplifier {g.name} lacks BIASSEC")
            pix = pix - overscan_per_row(g.data, g.biassec, g.datasec)[:, None]
        image[g.detsec.slices] = _place(pix, g.detsec)
    return image


@dataclass(frozen=True)
class _AmpGeometry:
    name: str
    data: np.ndarray
    header: Mapping[str, Any]
    datasec: Section
    detsec: Section
    biassec: Section | None


def _amplifier_geometry(amps: Sequence[tuple[np.ndarray, Mapping[str, Any]]]) -> list[_AmpGeometry]:
    """Parsed DATASEC/DETSEC/BIASSEC of every amplifier, with consistent sizes."""
    geometry = []
    for k, (data, header) in enumerate(amps):
        name = str(header.get("EXTNAME", k))
        try:
            datasec = parse_section(header["DATASEC"])
            detsec = parse_section(header["DETSEC"])
        except KeyError as err:
            raise KeyError(f"amplifier {name} lacks {err.args[0]}") from None
        if datasec.shape != detsec.shape:
            raise ValueError(
                f"amplifier {name}: DATASEC {header['DATASEC']} and DETSEC "
                f"{header['DETSEC']} differ in size"
            )
        biassec = parse_section(header["BIASSEC"]) if "BIASSEC" in header else None
        geometry.append(_AmpGeometry(name, np.asarray(data), header, datasec, detsec, biassec))
    return geometry


# --------------------------------------------------------------------------
# Per-amplifier processing
# --------------------------------------------------------------------------
RawAmplifiers = Sequence[tuple[np.ndarray, Mapping[str, Any]]]
RawExposure = tuple[Mapping[str, Any], RawAmplifiers]

_STRUCTURAL_KEYS = {
    "SIMPLE",
    "BITPIX",
    "NAXIS",
    "NAXIS1",
    "NAXIS2",
    "EXTEND",
    "PCOUNT",
    "GCOUNT",
    "CHECKSUM",
    "DATASUM",
    "BSCALE",
    "BZERO",
    "XTENSION",
    "BUNIT",
}


class UnprocessableExposure(ValueError):
    """The exposure holds no usable pixels (all NaN, all saturated, ...).

    The message names the problem, for the flagged CcdVisit row and the log.
    """


@dataclass(frozen=True)
class OverscanLevel:
    """Serial-overscan level of one amplifier, per data row, in ADU."""

    level: np.ndarray  # one value per DATASEC row
    noise: float  # robust per-pixel scatter of the overscan, ADU
    mode: str  # 'row', 'constant' or 'none'
    row_weight: float  # Wiener weight of the row-to-row part (0: fully smoothed)


def measure_overscan(
    data: np.ndarray,
    biassec: Section | None,
    datasec: Section,
    *,
    min_columns: int = 4,
    nsigma: float = 3.0,
    smooth_rows: int = 31,
) -> OverscanLevel:
    """Robust row-by-row serial-overscan level for the rows of ``datasec``.

    Each overscan row gives a clipped mean (``nsigma`` times the amplifier's
    robust pixel scatter around the row median, so a trailing bright pixel or
    a cosmic ray does not pull it). The per-row means are then split into a
    running median over ``smooth_rows`` (drifts) and a row-to-row part that is
    kept with the Wiener weight var_rows / (var_rows + var_noise): row-
    correlated bias jitter, which data and overscan share, is removed, while
    on a quiet amplifier the noise of a short overscan is not added to every
    row. A BIASSEC taller than DATASEC (parallel overscan rows included)
    contributes the rows of the data. With fewer than ``min_columns``
    overscan columns, or rows that do not cover the data's, one clipped mean
    is used; without BIASSEC, nothing.
    """
    ny = datasec.shape[0]
    if biassec is None or biassec.shape[1] == 0:
        return OverscanLevel(np.zeros(ny), float("nan"), "none", 0.0)
    biassec = _overscan_rows_of_data(biassec, datasec)
    over = np.asarray(data[biassec.slices], dtype=np.float64)
    finite = np.isfinite(over)
    if not finite.any():
        return OverscanLevel(np.zeros(ny), float("nan"), "none", 0.0)
    over = np.where(finite, over, np.nan)
    med_row = np.nanmedian(over, axis=1) if over.shape[1] > 1 else over[:, 0]
    med_row = np.where(np.isfinite(med_row), med_row, np.nanmedian(over))
    res = over - med_row[:, None]
    sigma = 1.4826 * float(np.nanmedian(np.abs(res)))
    if not sigma > 0:  # quantised, noiseless overscan
        sigma = max(float(np.nanstd(res)), 1e-3)
    ncol = over.shape[1]
    sigma *= np.sqrt(ncol / max(ncol - 1, 1))  # scatter about a row median underestimates
    keep = finite & (np.abs(res) <= nsigma * sigma)
    if ncol < min_columns or biassec.y != datasec.y:
        level = float(np.mean(over[keep])) if keep.any() else float(np.nanmedian(over))
        return OverscanLevel(np.full(ny, level), sigma, "constant", 0.0)
    count = keep.sum(axis=1)
    total = np.where(keep, over, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        row = np.where(count > 0, total / count, med_row)
    from scipy.ndimage import median_filter

    window = min(smooth_rows, ny if ny % 2 else ny - 1)
    smooth = median_filter(row, size=max(window, 1), mode="nearest")
    diff = row - smooth
    var_noise = sigma**2 / max(float(np.median(count)), 1.0)
    var_diff = (1.4826 * float(np.median(np.abs(diff - np.median(diff))))) ** 2
    var_rows = max(var_diff - var_noise, 0.0)
    weight = var_rows / (var_rows + var_noise) if var_rows + var_noise > 0 else 0.0
    return OverscanLevel(smooth + weight * diff, sigma, "row", weight)


@dataclass(frozen=True)
class AmpInfo:
    """What ISR learnt about one amplifier."""

    name: str
    slices: tuple[slice, slice]  # its pixels in the assembled detector
    gain: float  # e-/ADU
    read_noise: float  # e- (header RDNOISE, else measured)
    read_noise_measured: float  # e-, from the overscan scatter (nan without overscan)
    saturate: float  # ADU, raw value including bias (nan if absent)
    overscan_mode: str
    n_saturated: int


@dataclass
class AssembledFrame:
    """A detector image in electrons: overscan-subtracted, trimmed, assembled, gain-applied."""

    image: np.ndarray  # float32 (ny, nx), e-; NaN where the raw pixel was not finite
    saturated: np.ndarray  # bool: raw value >= SATURATE of its amplifier
    covered: np.ndarray  # bool: inside some amplifier's DETSEC
    amps: list[AmpInfo]
    header: Mapping[str, Any] = field(default_factory=dict)  # primary header

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    def read_noise_map(self) -> np.ndarray:
        """Per-pixel read noise (e-) from each amplifier's value."""
        rn = np.zeros(self.shape, dtype=np.float32)
        for amp in self.amps:
            rn[amp.slices] = amp.read_noise
        return rn

    @property
    def exptime(self) -> float:
        return float(self.header.get("EXPTIME", 0.0) or 0.0)

    @property
    def darktime(self) -> float:
        """DARKTIME, defaulting to EXPTIME (CONTRACT 1.1)."""
        value = self.header.get("DARKTIME")
        return float(value) if value is not None else self.exptime


def _place(pix: np.ndarray, detsec: Section) -> np.ndarray:
    """Readout-order pixels flipped into detector orientation (a view)."""
    if detsec.x_flip:
        pix = pix[:, ::-1]
    if detsec.y_flip:
        pix = pix[::-1, :]
    return pix


def process_amplifiers(
    amplifiers: RawAmplifiers,
    *,
    header: Mapping[str, Any] | None = None,
    min_overscan_columns: int = 4,
) -> AssembledFrame:
    """Overscan-correct, trim, gain-correct and assemble the amplifiers of one exposure.

    Saturation is judged on the raw value (bias included), as SATURATE is
    defined. Read noise is the amplifier's RDNOISE, else the overscan scatter
    times the gain. Amplifiers without BIASSEC are not overscan-corrected
    (their bias then has to come from the master bias).
    """
    if not amplifiers:
        raise ValueError("no amplifiers to process")
    geometry = _amplifier_geometry(amplifiers)
    for g in geometry:
        if "GAIN" not in g.header:
            raise KeyError(f"amplifier {g.name} has no GAIN keyword")
    ny = max(g.detsec.y.stop for g in geometry)
    nx = max(g.detsec.x.stop for g in geometry)
    image = np.full((ny, nx), np.nan, dtype=np.float32)
    saturated = np.zeros((ny, nx), dtype=bool)
    covered = np.zeros((ny, nx), dtype=bool)
    infos = []
    for g in geometry:
        name, data, amp_header, datasec, detsec, biassec = (
            g.name,
            g.data,
            g.header,
            g.datasec,
            g.detsec,
            g.biassec,
        )
        if data.dtype.byteorder not in ("=", "|"):
            data = data.astype(data.dtype.newbyteorder("="))
        gain = float(amp_header["GAIN"])
        if not gain > 0:
            raise ValueError(f"amplifier {name}: GAIN must be > 0, not {gain}")
        over = measure_overscan(data, biassec, datasec, min_columns=min_overscan_columns)
        raw = data[datasec.slices]
        sat_adu = float(amp_header["SATURATE"]) if "SATURATE" in amp_header else float("nan")
        sat = raw >= sat_adu if np.isfinite(sat_adu) else np.zeros(raw.shape, dtype=bool)
        pix = (raw.astype(np.float32) - over.level[:, None].astype(np.float32)) * np.float32(gain)
        image[detsec.slices] = _place(pix, detsec)
        saturated[detsec.slices] = _place(sat, detsec)
        covered[detsec.slices] = True
        rn_meas = over.noise * gain
        rn_header = float(amp_header.get("RDNOISE", float("nan")) or float("nan"))
        rn = rn_header if rn_header > 0 else rn_meas
        if not rn > 0:
            rn = 0.0
            log.warning("amplifier %s: no RDNOISE and no overscan; read noise taken as 0", name)
        infos.append(
            AmpInfo(
                name,
                detsec.slices,
                gain,
                float(rn),
                float(rn_meas),
                sat_adu,
                over.mode,
                int(sat.sum()),
            )
        )
    return AssembledFrame(image, saturated, covered, infos, dict(header or {}))


def check_usable(image: np.ndarray, saturated: np.ndarray, *, min_fraction: float = 0.01) -> None:
    """Raise :class:`UnprocessableExposure` naming the problem if almost no pixel is usable."""
    finite = np.isfinite(image)
    n = image.size
    if not finite.any():
        raise UnprocessableExposure("every pixel is NaN or infinite")
    if finite.sum() < min_fraction * n:
        raise UnprocessableExposure(
            f"only {finite.sum()} of {n} pixels are finite (the rest NaN or infinite)"
        )
    usable = finite & ~saturated
    if not usable.any():
        raise UnprocessableExposure("every pixel is saturated")
    if usable.sum() < min_fraction * n:
        raise UnprocessableExposure(
            f"only {usable.sum()} of {n} pixels are finite and unsaturated "
            f"({saturated.mean():.1%} saturated)"
        )
    # A blank or zeroed image (a failed readout) has no noise at all. The
    # subsample check is cheap and almost always decides; only a constant
    # subsample pays for the full pass.
    sample = image[::7, ::7][usable[::7, ::7]]
    if sample.size and sample.min() == sample.max():
        values = image[usable]
        if values.min() == values.max():
            raise UnprocessableExposure(
                f"every usable pixel has the same value ({values[0]:g}): a blank image"
            )


# --------------------------------------------------------------------------
# Master calibrations (built in workflow_lib.single_frame.master_calibs)
# --------------------------------------------------------------------------
@dataclass
class MasterCalib:
    """A master bias (e-), dark (e-/s) or flat (relative response, median 1).

    ``variance`` is the variance of ``image`` (the error of the clipped
    mean); ``mask`` is True where no input frame survived clipping or the
    value is not finite (the image holds a neutral value there).
    """

    kind: str
    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    n_frames: int
    band: str = ""
    stats: dict[str, float] = field(default_factory=dict)


def _check_shape(master: MasterCalib | None, shape: tuple[int, int], what: str) -> None:
    if master is not None and master.image.shape != shape:
        raise ValueError(f"master {what} is {master.image.shape}, the frames are {shape}")


def _robust_std(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    step = max(1, x.size // 1_000_000)
    q25, q75 = np.percentile(x[::step], [25, 75])
    return float((q75 - q25) / 1.349)


# --------------------------------------------------------------------------
# ISR of one science exposure
# --------------------------------------------------------------------------
_STEP_CARDS = {
    "overscan": "ISR_OVSC",
    "assemble": "ISR_ASSM",
    "gain": "ISR_GAIN",
    "saturation": "ISR_SAT",
    "bias": "ISR_BIAS",
    "dark": "ISR_DARK",
    "flat": "ISR_FLAT",
    "defects": "ISR_DEFS",
    "cosmic_rays": "ISR_CR",
    "interpolation": "ISR_INTP",
    "variance": "ISR_VAR",
}


@dataclass
class IsrResult:
    """The ISR'd exposure (image and variance in electrons), what ran, and QA numbers."""

    exposure: Exposure
    steps: dict[str, str]
    stats: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per sub-step
    cpu_timings: dict[str, float] = field(default_factory=dict)  # process CPU seconds


@dataclass(frozen=True)
class CosmicRayConfig:
    """astroscrappy settings (:func:`~workflow_lib.single_frame.cosmic_rays.detect_cosmic_rays`)."""

    sigclip: float = 5.0
    sigfrac: float = 0.3
    objlim: float = 8.0
    niter: int = 2


def _metadata(primary: Mapping[str, Any]) -> fits.Header:
    header = fits.Header()
    items = primary.cards if isinstance(primary, fits.Header) else primary.items()
    for item in items:
        key, value, comment = (
            (item.keyword, item.value, item.comment)
            if isinstance(item, fits.Card)
            else (item[0], item[1], "")
        )
        if key in _STRUCTURAL_KEYS or key in ("", "COMMENT", "HISTORY"):
            continue
        try:
            header[key] = (value, comment)
        except (ValueError, TypeError):
            log.debug("primary card %s not copied", key)
    return header


def _header_wcs(primary: Mapping[str, Any]) -> WCS | None:
    if "CTYPE1" not in primary:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            header = primary if isinstance(primary, fits.Header) else _metadata(primary)
            return WCS(header, naxis=2)
        except Exception as err:  # a malformed pointing hint must not stop ISR
            log.warning("header WCS unreadable (%s); none attached", err)
            return None


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0 or not mask.any():
        return mask
    from scipy.ndimage import binary_dilation

    rows = np.flatnonzero(mask.any(axis=1))
    lo, hi = max(rows[0] - radius, 0), min(rows[-1] + radius + 1, mask.shape[0])
    out = mask.copy()
    out[lo:hi] = binary_dilation(mask[lo:hi], iterations=radius)
    return out


def _finish(
    image: np.ndarray,
    variance: np.ndarray,
    *,
    saturated: np.ndarray,
    bad: np.ndarray,
    suspect: np.ndarray | None,
    no_data: np.ndarray | None,
    read_noise: float,
    cosmic_rays: bool,
    cr_config: CosmicRayConfig,
    saturation_grow: int,
    metadata: fits.Header,
    wcs: WCS | None,
    steps: dict[str, str],
    stats: dict[str, float],
    clock: PhaseClock,
) -> IsrResult:
    """Masks, cosmic rays, interpolation and the Exposure: shared by raw and eimage ISR."""
    planes = MaskPlanes()
    mask = np.zeros(image.shape, dtype=MASK_DTYPE)
    sat = _grow(saturated, saturation_grow)
    nonfinite = ~np.isfinite(image) | ~np.isfinite(variance)
    bad = bad | nonfinite
    if no_data is not None:
        bad &= ~no_data
        sat &= ~no_data
    mask[sat] |= planes.bitmask("SAT")
    mask[bad] |= planes.bitmask("BAD")
    if suspect is not None:
        mask[suspect] |= planes.bitmask("SUSPECT")
    if no_data is not None and no_data.any():
        mask[no_data] |= planes.bitmask("NO_DATA")
        image[no_data] = 0.0
        variance[no_data] = 0.0
    stats.update(n_saturated=int(sat.sum()), n_bad=int(bad.sum()))
    clock.lap("masks")

    unusable = sat | bad | (no_data if no_data is not None else False)
    if cosmic_rays:
        # Copies only where a non-finite pixel needs filling (detection reads, never writes).
        filled, finite_variance = image, variance
        if nonfinite.any():
            filled = np.where(unusable, np.float32(0.0), image)
            finite_variance = np.where(nonfinite, np.float32(1.0), variance)
        cr = detect_cosmic_rays(
            filled,
            finite_variance,
            mask=unusable,
            read_noise=read_noise,
            sigclip=cr_config.sigclip,
            sigfrac=cr_config.sigfrac,
            objlim=cr_config.objlim,
            niter=cr_config.niter,
        )
        mask[cr.mask] |= planes.bitmask("CR")
        n_cr = int(cr.mask.sum())
        steps["cosmic_rays"] = (
            f"done: {n_cr} pixels (astroscrappy niter={cr_config.niter}, "
            f"{cr.fraction_searched:.0%} of frame searched)"
        )
        stats.update(n_cr_pixels=n_cr, cr_fraction_searched=cr.fraction_searched)
        crmask = cr.mask
    else:
        steps["cosmic_rays"] = "skipped: disabled"
        crmask = np.zeros(image.shape, dtype=bool)
    clock.lap("cosmic_rays")

    interp = sat | bad | crmask
    if no_data is not None:
        interp &= ~no_data
    if interp.any():
        interpolate_masked(image, interp, variance=variance)
        mask[interp] |= planes.bitmask("INTRP")
    steps["interpolation"] = f"done: {int(interp.sum())} BAD/SAT/CR pixels"
    stats["n_interpolated"] = int(interp.sum())
    floor = np.float32(max(read_noise, 1e-3) ** 2 * 1e-3)
    np.maximum(variance, floor, out=variance)
    if no_data is not None and no_data.any():
        variance[no_data] = 0.0
    clock.lap("interpolation")

    metadata["BUNIT"] = ("electron", "image unit after ISR")
    for step, text in steps.items():
        value, comment = text[:68], f"ISR {step}"
        # The comment only where it fits the 80-character card (astropy warns and cuts it).
        fits_card = 10 + max(len(value), 8) + 2 + 3 + len(comment) <= 80
        key = _STEP_CARDS.get(step, "ISR_" + step[:4].upper())
        metadata[key] = (value, comment) if fits_card else value
    for key, value in (
        ("ISR_NSAT", "n_saturated"),
        ("ISR_NBAD", "n_bad"),
        ("ISR_NCR", "n_cr_pixels"),
        ("ISR_NINT", "n_interpolated"),
    ):
        if value in stats:
            metadata[key] = (int(stats[value]), f"ISR {value}")
    metadata["RDNOISE"] = (float(round(read_noise, 4)), "median read noise, e-")
    exposure = Exposure(
        image=image, variance=variance, mask=mask, wcs=wcs, metadata=metadata, mask_planes=planes
    )
    return IsrResult(
        exposure=exposure, steps=steps, stats=stats, timings=clock.wall, cpu_timings=clock.cpu
    )


def run_isr(
    primary_header: Mapping[str, Any],
    amplifiers: RawAmplifiers,
    *,
    bias: MasterCalib | None,
    dark: MasterCalib | None,
    flat: MasterCalib | None,
    defects: np.ndarray | None,
    cosmic_rays: bool = True,
    cr_config: CosmicRayConfig = CosmicRayConfig(),
    saturation_grow: int = 1,
    min_flat: float = 0.05,
) -> IsrResult:
    """Instrument signature removal of one science raw, to electrons with mask and variance.

    Overscan (row by row), trim, assemble, gain; master bias; master dark
    times DARKTIME (default EXPTIME); master flat. The variance is that of
    the flat-fielded image: (photons + dark charge + read noise^2) / flat^2,
    photons taken from the bias-subtracted image itself (clipped at 0), plus
    the masters' own errors. SAT (grown by ``saturation_grow`` pixels), BAD
    (defects, pixels the flat cannot correct: response < ``min_flat``, and
    non-finite raw pixels) and SUSPECT (pixels a master could not estimate)
    are set; cosmic rays are found with astroscrappy and flagged CR; BAD,
    SAT and CR pixels are interpolated (INTRP), SAT kept. A missing master
    skips its step, recorded in ``steps`` and as an ISR_* card. Raises
    :class:`UnprocessableExposure` when almost no pixel is usable.
    """
    clock = PhaseClock()
    steps: dict[str, str] = {}
    frame = process_amplifiers(amplifiers, header=primary_header)
    check_usable(frame.image, frame.saturated)
    image = frame.image
    shape = frame.shape
    modes = sorted({a.overscan_mode for a in frame.amps})
    steps["overscan"] = f"done: {'/'.join(modes)} ({len(frame.amps)} amplifiers)"
    steps["assemble"] = f"done: {shape[1]}x{shape[0]}"
    steps["gain"] = (
        f"done: {min(a.gain for a in frame.amps):.3f}-{max(a.gain for a in frame.amps):.3f} e-/ADU"
    )
    n_sat_amps = sum(np.isfinite(a.saturate) for a in frame.amps)
    steps["saturation"] = (
        f"done: SATURATE of {n_sat_amps}/{len(frame.amps)} amplifiers"
        if n_sat_amps
        else "skipped: no SATURATE keyword"
    )
    rn_map = frame.read_noise_map()
    read_noise = float(np.median([a.read_noise for a in frame.amps]))
    clock.lap("assemble")

    suspect = np.zeros(shape, dtype=bool)
    for master, what in ((bias, "bias"), (dark, "dark"), (flat, "flat")):
        _check_shape(master, shape, what)
        if master is not None:
            suspect |= master.mask
    if defects is not None and defects.shape != shape:
        raise ValueError(f"defect mask is {defects.shape}, the exposure is {shape}")
    variance = rn_map
    variance *= rn_map  # read noise^2, in place: the map is ours
    # One scratch frame for the products below, instead of a new frame each.
    scratch = np.empty_like(image)
    if bias is not None:
        image -= bias.image
        variance += bias.variance
        steps["bias"] = f"done: master of {bias.n_frames} frames"
    else:
        steps["bias"] = "skipped: no master bias"
    variance += np.maximum(image, np.float32(0.0), out=scratch)  # photons and dark charge, e-
    darktime = frame.darktime
    if dark is not None:
        image -= np.multiply(dark.image, np.float32(darktime), out=scratch)
        variance += np.multiply(dark.variance, np.float32(darktime**2), out=scratch)
        steps["dark"] = f"done: master of {dark.n_frames} frames x {darktime:g} s"
    else:
        steps["dark"] = "skipped: no master dark"
    bad = ~np.isfinite(image)
    if flat is not None:
        unusable = ~(flat.image >= min_flat)
        unusable |= ~np.isfinite(flat.image)
        bad |= unusable
        f = np.where(unusable, np.float32(1.0), flat.image)
        image /= f
        f2 = np.multiply(f, f, out=f)
        variance /= f2
        # + image^2 var(flat) / f^2, the flat's error (none where it is unusable)
        np.multiply(image, image, out=scratch)
        scratch *= flat.variance
        scratch[unusable] = 0.0
        scratch /= f2
        variance += scratch
        del f, f2
        band = str(primary_header.get("FILTER", "")).strip()
        note = "" if not flat.band or flat.band == band else f" (flat band {flat.band}!)"
        steps["flat"] = f"done: master of {flat.n_frames} frames{note}"
        if note:
            log.warning("flat of band %r applied to a %r exposure", flat.band, band)
    else:
        steps["flat"] = "skipped: no master flat"
    if defects is not None:
        bad |= defects.astype(bool)
        steps["defects"] = f"done: {int(defects.sum())} BAD pixels"
    else:
        steps["defects"] = "skipped: no defect map"
    steps["variance"] = "done: (photons + dark + read noise^2) / flat^2 + master errors"
    clock.lap("calibrate")

    no_data = ~frame.covered
    result = _finish(
        image,
        variance,
        saturated=frame.saturated,
        bad=bad,
        suspect=suspect if suspect.any() else None,
        no_data=no_data if no_data.any() else None,
        read_noise=read_noise,
        cosmic_rays=cosmic_rays,
        cr_config=cr_config,
        saturation_grow=saturation_grow,
        metadata=_metadata(primary_header),
        wcs=_header_wcs(primary_header),
        steps=steps,
        stats={"read_noise": read_noise, "darktime": darktime},
        clock=clock,
    )
    for amp in frame.amps:
        result.exposure.metadata[f"HIERARCH ISR {amp.name} RDNOISE"] = round(amp.read_noise, 4)
    log.info("ISR: %s", "; ".join(f"{k} {v}" for k, v in steps.items()))
    return result


def _plateau_saturation(image: np.ndarray, *, min_run: int = 3) -> np.ndarray:
    """Pixels of runs of >= ``min_run`` identical values in the top half of the range.

    Charge capped at full well leaves exactly equal values along the bleed
    trail; photon noise never does at high levels. A fallback when an image
    in electrons carries no SATURATE keyword. An eimage says nothing about
    its readout direction (a detector may be stored transposed, CONTRACT
    1.2), so runs along rows count as well as runs along columns.
    """
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros(image.shape, dtype=bool)
    high = image >= 0.5 * float(np.max(image[finite]))
    high &= image > 1000.0
    if not high.any():
        return np.zeros(image.shape, dtype=bool)
    along_columns = _vertical_runs(image, high, min_run)
    along_rows = _vertical_runs(image.T, high.T, min_run).T
    return along_columns | along_rows


def _vertical_runs(image: np.ndarray, high: np.ndarray, min_run: int) -> np.ndarray:
    """``high`` pixels in runs of >= ``min_run`` equal values up and down a column."""
    eq = np.zeros(image.shape, dtype=bool)
    eq[1:] = (image[1:] == image[:-1]) & high[1:] & high[:-1]  # equal to the pixel below
    # Runs of min_run equal values = (min_run - 1) consecutive 'equal to below' links.
    run = eq.copy()
    for k in range(1, min_run - 1):
        run[k:] &= eq[:-k] if k else eq
        run[:k] = False
    out = run.copy()
    for k in range(1, min_run):
        out[:-k] |= run[k:]
    return out & high


def eimage_exposure(
    data: np.ndarray,
    primary_header: Mapping[str, Any],
    *,
    read_noise: float | None = None,
    saturation: float | None = None,
    cosmic_rays: bool = True,
    cr_config: CosmicRayConfig = CosmicRayConfig(),
    saturation_grow: int = 1,
) -> IsrResult:
    """An :class:`IsrResult` for an already calibrated image in electrons (CONTRACT 1.2).

    No ISR; pixels are multiplied by GAIN if the header has one other than 1.
    Variance = max(image, 0) + read_noise^2, the read noise being the
    argument, else RDNOISE, else 1 e-; if the measured pixel-to-pixel noise
    of the background is well above that model (a sky-subtracted image, say),
    the excess is added as a constant floor. SAT from ``saturation`` or
    SATURATE (e-), else from flat-topped runs (charge capped at full
    well). Cosmic rays are found and interpolated as for raws.
    """
    clock = PhaseClock()
    steps: dict[str, str] = {
        "overscan": "skipped: eimage",
        "bias": "skipped: eimage",
        "dark": "skipped: eimage",
        "flat": "skipped: eimage",
    }
    image = np.array(data, dtype=np.float32, copy=True)
    if image.ndim != 2:
        raise ValueError(f"an eimage must be 2-d, got shape {image.shape}")
    gain = float(primary_header.get("GAIN", 1.0) or 1.0)
    if gain != 1.0:
        image *= np.float32(gain)
    steps["gain"] = f"done: x{gain:g}" if gain != 1.0 else "skipped: GAIN = 1"
    sat_level = saturation if saturation is not None else primary_header.get("SATURATE")
    if sat_level is not None:
        saturated = image >= float(sat_level)
        steps["saturation"] = f"done: >= {float(sat_level):g} e-"
    else:
        saturated = _plateau_saturation(image)
        steps["saturation"] = f"done: no SATURATE, {int(saturated.sum())} flat-topped pixels"
    check_usable(image, saturated)
    if read_noise is None:
        read_noise = float(primary_header.get("RDNOISE", 1.0) or 1.0)
    variance = np.maximum(image, 0.0) + np.float32(read_noise**2)
    # Compare the model with the measured background noise (adjacent-pixel differences).
    finite = np.isfinite(image) & ~saturated
    step = max(1, image.shape[0] // 1024)
    rows = image[::step]
    d = (rows[:, 1:] - rows[:, :-1])[finite[::step, 1:] & finite[::step, :-1]]
    measured = _robust_std(d) ** 2 / 2.0 if d.size else float("nan")
    level = float(np.median(variance[finite][:: max(1, int(finite.sum()) // 1_000_000)]))
    excess = measured - level if np.isfinite(measured) else 0.0
    if excess > 0.2 * level:
        variance += np.float32(excess)
        steps["variance"] = f"done: image + rn^2 + {excess:.3g} e-^2 measured excess"
    else:
        steps["variance"] = "done: max(image, 0) + read noise^2"
    steps["defects"] = "skipped: eimage"
    clock.lap("calibrate")
    return _finish(
        image,
        variance,
        saturated=saturated,
        bad=~np.isfinite(image),
        suspect=None,
        no_data=None,
        read_noise=float(read_noise),
        cosmic_rays=cosmic_rays,
        cr_config=cr_config,
        saturation_grow=saturation_grow,
        metadata=_metadata(primary_header),
        wcs=_header_wcs(primary_header),
        steps=steps,
        stats={"read_noise": float(read_noise), "variance_excess": max(excess, 0.0)},
        clock=clock,
    )
