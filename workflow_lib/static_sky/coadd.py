"""Coadds: weighted mean of warps with artifact rejection, the coadd PSF, template selection.

``assemble_coadd`` follows LSST's CompareWarpAssembleCoadd. Artifacts
(transients, cosmic rays, satellite trails) are found on *PSF-matched* warps,
which all share one model PSF, so a star looks the same in every one of them
whatever the seeing of its visit: each warp is compared with a robust
reference (median-seeded, sigma-clipped weighted mean) and the significant
parts of its difference, if they appear in only a minority of the epochs
covering a pixel, are rejected (:mod:`workflow_lib.static_sky.compare_warp`). The coadd
itself is then a plain weighted mean of the *direct* warps without those
pixels, so bright-star cores of visits with different seeing are never
clipped and the coadd PSF (the same weighted mean of the input PSFs,
:mod:`workflow_lib.static_sky.coadd_psf`) describes the stars. Direct pixels whose
PSF-matched partner has no data (the border the matching kernel eats) could
hide artifacts and are left out, as LSST does with PSF-matched valid polygons;
with fewer than three epochs nothing can be rejected and every pixel is used.

Everything is done in row strips: memory is bounded by strip rows x patch
width x the number of overlapping inputs (:mod:`workflow_lib.static_sky.coadd_inputs`),
never by the patch area times the number of inputs. Inputs implement
:class:`WarpInput` (in memory: :class:`ExposureWarpInput`; from FITS files:
``workflow_lib.io.warp_input.FitsWarpInput``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS

from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes, PhotoCalib
from workflow_lib.core.flags import CcdVisitFlag
from workflow_lib.core.psf_model import PsfModel, fwhm_of_image
from workflow_lib.static_sky.coadd_inputs import (
    ExposureWarpInput,
    PreparedInput,
    Stack,
    WarpInput,
    WarpRows,
    header_value,
    measure_weight,
    pack_layers,
    prepare_inputs,
    read_stack,
    warp_ids,
)
from workflow_lib.static_sky.coadd_psf import COVERAGE_DTYPE, CoaddPsf, block_sums, build_coadd_psf
from workflow_lib.static_sky.compare_warp import (
    RejectionParams,
    Verdict,
    estimate_noise_correlation,
    find_artifacts,
    gaussian_1d,
    max_epochs,
)

log = logging.getLogger(__name__)

__all__ = [
    "CoaddResult",
    "ExposureWarpInput",
    "WarpInput",
    "WarpRows",
    "assemble_coadd",
    "select_template_ccd_visits",
    "select_template_visits",
    "warp_ids",
]

# Input pixels with these planes never enter the coadd (LSST's badMaskPlanes).
DEFAULT_BAD_MASK_PLANES: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "SUSPECT", "EDGE")
# Planes of used inputs that are not ORed into the coadd mask: detection planes
# belong to the coadd's own detection; the others are set here by the assembly.
NOT_PROPAGATED_PLANES: tuple[str, ...] = (
    "DETECTED",
    "DETECTED_NEGATIVE",
    "NOT_DEBLENDED",
    "CLIPPED",
    "REJECTED",
    "SENSOR_EDGE",
    "INEXACT_PSF",
)
# A bad plane is set in the coadd where the inputs it excluded carry at least
# this fraction of the pixel's covering weight (LSST's maskPropagationThresholds).
DEFAULT_MASK_PROPAGATION: dict[str, float] = {"SAT": 0.1}

# CcdVisit flags that make a calexp unusable for any coadd.
UNUSABLE_CCD_FLAGS = int(
    CcdVisitFlag.FAILED
    | CcdVisitFlag.BAD_IMAGE
    | CcdVisitFlag.PSF_FAILED
    | CcdVisitFlag.ASTROMETRY_FAILED
    | CcdVisitFlag.PHOTOCAL_FAILED
)

BAND_KEYS = ("BAND", "FILTER")
MJD_KEYS = ("MJD", "MJD-MID", "MJD-OBS")
# Bytes held per (layer, row, column) of a strip: stacks plus temporaries.
_BYTES_PER_DIRECT = 24
_BYTES_PER_REJECTION = 32


# --------------------------------------------------------------------------
# Template selection
# --------------------------------------------------------------------------


def select_template_ccd_visits(
    ccd_visits: pd.DataFrame,
    *,
    band: str,
    mjd_min: float | None,
    mjd_max: float | None,
    max_psf_fwhm: float | None,
    max_images: int | None,
    min_psf_fwhm: float | None = None,
    seeing_quantile: float | None = None,
    min_images: int = 0,
    per_detector: bool = True,
    exclude_flags: int = UNUSABLE_CCD_FLAGS,
) -> pd.DataFrame:
    """CcdVisit rows (calexps) chosen for a template coadd, best seeing first.

    dia_pipe's TimeBestSeeingWcsSelectImagesTask: among the calexps of
    ``band`` (pass only those overlapping the patch) taken within
    [``mjd_min``, ``mjd_max``] (``midpointMjdTai``, inclusive, None = open)
    whose PSF FWHM (``seeing``, arcsec) is <= ``max_psf_fwhm`` (and >=
    ``min_psf_fwhm``; None = no cut), keep the ``max_images`` with the
    smallest FWHM (None = all). ``seeing_quantile`` q keeps only the best
    round(q n) of the n that pass, but at least ``min_images`` (LSST's
    BestSeeingQuantileSelectVisitsTask, qMax and nVisitsMin): a cut relative
    to the survey's own seeing. As in dia_pipe the unit is the calexp (one
    CCD of a visit), so a visit's best CCDs may be chosen and its worse ones not.
    ``per_detector=False`` ranks whole visits instead (LSST's Gen3
    BestSeeingSelectVisitsTask): a visit's FWHM and MJD are the medians over
    its rows, ``max_images`` counts visits and all their rows are returned.
    Rows with ``exclude_flags`` bits set (failed calexps) or no seeing are
    never chosen.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    if seeing_quantile is not None and not 0.0 < seeing_quantile <= 1.0:
        raise ValueError(f"seeing_quantile must be in (0, 1] or None, got {seeing_quantile}")
    rows = ccd_visits[ccd_visits["band"].astype(str) == str(band)]
    usable = np.isfinite(rows["seeing"].to_numpy(dtype=np.float64))
    if "flags" in rows:
        usable &= (rows["flags"].to_numpy(dtype=np.int64) & int(exclude_flags)) == 0
    rows = rows[usable]
    if per_detector:
        units = rows.assign(_unit=np.arange(len(rows)))
    else:
        units = rows.assign(_unit=rows["visit"].to_numpy())
    per_unit = units.groupby("_unit").agg(
        seeing=("seeing", "median"), mjd=("midpointMjdTai", "median"), visit=("visit", "min")
    )
    keep = np.ones(len(per_unit), dtype=bool)
    seeing = per_unit["seeing"].to_numpy(dtype=np.float64)
    mjd = per_unit["mjd"].to_numpy(dtype=np.float64)
    if max_psf_fwhm is not None:
        keep &= seeing <= max_psf_fwhm
    if min_psf_fwhm is not None:
        keep &= seeing >= min_psf_fwhm
    if mjd_min is not None:
        keep &= mjd >= mjd_min
    if mjd_max is not None:
        keep &= mjd <= mjd_max
    # Ties broken by visit then row order, so the choice is reproducible.
    ranked = per_unit[keep].sort_values(["seeing", "visit"], kind="mergesort")
    if seeing_quantile is not None:
        ranked = ranked.head(max(int(np.round(seeing_quantile * len(ranked))), int(min_images)))
    if max_images is not None:
        ranked = ranked.head(int(max_images))
    chosen = units[units["_unit"].isin(ranked.index)]
    order = {unit: rank for rank, unit in enumerate(ranked.index)}
    chosen = chosen.assign(_rank=chosen["_unit"].map(order))
    chosen = chosen.sort_values(["_rank", "seeing", "detector"], kind="mergesort")
    log.info(
        "template selection: %d of %d %s (%s)",
        len(ranked),
        len(per_unit),
        "calexps" if per_detector else "visits",
        f"FWHM {ranked['seeing'].min():.3f}-{ranked['seeing'].max():.3f} arcsec"
        if len(ranked)
        else "none",
    )
    return chosen.drop(columns=["_unit", "_rank"])


def select_template_visits(
    ccd_visits: pd.DataFrame,
    *,
    band: str,
    mjd_min: float | None,
    mjd_max: float | None,
    max_psf_fwhm: float | None,
    max_images: int | None,
    **kwargs: Any,
) -> list[int]:
    """Visits of :func:`select_template_ccd_visits`, ascending.

    With the default per-calexp selection a visit is listed when any of its
    CCDs is chosen; the template coadd should use the chosen (visit,
    detector) pairs of :func:`select_template_ccd_visits`, not every CCD of
    these visits.
    """
    chosen = select_template_ccd_visits(
        ccd_visits,
        band=band,
        mjd_min=mjd_min,
        mjd_max=mjd_max,
        max_psf_fwhm=max_psf_fwhm,
        max_images=max_images,
        **kwargs,
    )
    return sorted({int(v) for v in chosen["visit"]})


# --------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------


@dataclass
class CoaddResult:
    """A coadd, the table of its inputs, the number of inputs used per pixel, its PSF.

    ``exposure.psf`` is the smooth POLYPIX fit; ``coadd_psf`` evaluates the
    exact weighted mean of the input PSFs anywhere (:mod:`workflow_lib.static_sky.coadd_psf`).
    """

    exposure: Exposure
    inputs: pd.DataFrame
    n_image: np.ndarray
    coadd_psf: CoaddPsf | None = None


def _psf_fwhm(psf: PsfModel | None, shape: tuple[int, int]) -> float:
    if psf is None:
        return float("nan")
    try:
        kernel = psf.kernel_at((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
        return fwhm_of_image(kernel, oversample=4)
    except ValueError:
        return float("nan")


def _auto_strip_rows(
    n_direct: int, n_rejection: int, nx: int, halo: int, memory_limit_mb: float
) -> int:
    """Rows per strip: the direct and the rejection stacks (with halo) are never held at once;
    64 bytes per column and row cover the strip's accumulators."""
    budget = memory_limit_mb * 2**20
    rows = int(budget / (nx * (n_direct * _BYTES_PER_DIRECT + 64)))
    if n_rejection:
        rows = min(rows, int(budget / (nx * (n_rejection * _BYTES_PER_REJECTION + 64))) - 2 * halo)
    return max(rows, 16, 2 * halo)


def assemble_coadd(
    inputs: Sequence[WarpInput],
    *,
    shape: tuple[int, int],
    wcs: WCS | None,
    rejection_inputs: Sequence[WarpInput] | None = None,
    clip_sigma: float = 3.0,
    do_interp: bool = False,
    detect_sigma: float = 5.0,
    model_error: float = 0.05,
    max_num_epochs: int = 2,
    max_fraction_epochs_low: float = 0.4,
    max_fraction_epochs_high: float = 0.03,
    grow_nsigma: float = 2.4,
    do_reject: bool = True,
    bad_mask_planes: Sequence[str] = DEFAULT_BAD_MASK_PLANES,
    rejection_bad_mask_planes: Sequence[str] = ("NO_DATA",),
    mask_propagation: Mapping[str, float] | None = None,
    strip_rows: int | None = None,
    memory_limit_mb: float = 1024.0,
    weight_sample_rows: int | None = 512,
    psf_cell_size: int | None = None,
    psf_order: int = 3,
    psf_block: int = 8,
    origin: tuple[int, int] = (0, 0),
    metadata: fits.Header | None = None,
) -> CoaddResult:
    """Inverse-variance weighted mean of warps with CompareWarp artifact rejection.

    ``inputs``: warps on the coadd grid (``shape`` = (ny, nx), ``wcs`` of
    its 0-based pixels), images in nJy (times ``photo_calib.njy_per_unit``
    if set). ``rejection_inputs``: the PSF-matched warps of the same (visit,
    detector) for a deep coadd, on which artifacts are detected; None means
    the inputs themselves (a template coadd of PSF-matched warps).

    Each input's weight is 1 / its sigma-clipped mean variance (from
    ``weight_sample_rows`` rows; None = all). A rejection input's pixel is
    rejected where the PSF-smoothed S/N of its difference from a robust
    reference (``clip_sigma`` clipped mean, ``model_error`` fractional
    tolerance) exceeds ``detect_sigma``, grown by ``grow_nsigma`` PSF sigmas,
    and at most min(low N, max_num_epochs + high N) of the N epochs there
    are candidates (with N < 3 nothing can be rejected; the metadata say so).
    Pixels with ``bad_mask_planes`` never enter the coadd; a rejection
    input's pixels are compared wherever they lack ``rejection_bad_mask_planes``
    (as LSST's PSF-matched valid polygons: the matching kernel spreads each
    interpolated defect's BAD bit over ~30 x 30 pixels of interpolated sky,
    which would leave a third of a CCD unchecked, hence unused). ``mask_propagation``
    (default SAT: 0.1) sets a bad plane where the inputs it excluded carry
    that fraction of the covering weight. The coadd mask is the OR of the
    used inputs' other planes, plus NO_DATA (nothing used: image and
    variance NaN, or interpolated if ``do_interp``, which also sets INTRP),
    CLIPPED (an input rejected as artifact), REJECTED (an input excluded by
    a bad plane), SENSOR_EDGE (by EDGE) and INEXACT_PSF (any of those: the
    coadd PSF assumes all covering inputs). Variance = sum w^2 var / (sum w)^2.

    Rows are processed in strips of ``strip_rows`` (default: the most whose
    stacks fit in ``memory_limit_mb``, besides the coadd planes themselves,
    16 bytes per pixel); the result does not depend on the strip size.
    The coadd PSF (``coadd_psf``) knows, per ``psf_block`` x ``psf_block``
    block, the pixels each input contributed; its POLYPIX fit (``exposure.psf``,
    of ``psf_order``) uses cells of ``psf_cell_size`` pixels (default: a
    32nd of the patch, 16 to 128). See :mod:`workflow_lib.static_sky.coadd_psf`.
    """
    ny, nx = (int(shape[0]), int(shape[1]))
    if not inputs:
        raise ValueError("assemble_coadd needs at least one input")
    planes = MaskPlanes()
    for name in (*bad_mask_planes, "CLIPPED", "REJECTED", "SENSOR_EDGE", "INEXACT_PSF", "INTRP"):
        planes.add(name)
    propagation = dict(DEFAULT_MASK_PROPAGATION if mask_propagation is None else mask_propagation)
    direct = prepare_inputs(inputs, (ny, nx), planes, bad_mask_planes)
    template_mode = rejection_inputs is None
    if rejection_inputs is None:
        rejection = direct
    else:
        rejection = prepare_inputs(rejection_inputs, (ny, nx), planes, rejection_bad_mask_planes)

    # Smoothing (a matched filter for the model PSF) and growth radius.
    fwhms = [_psf_fwhm(p.source.psf, p.source.shape) for p in rejection[:25]]
    finite = [f for f in fwhms if np.isfinite(f) and f > 0]
    model_fwhm = float(np.median(finite)) if finite else 3.0
    psf_sigma = model_fwhm / 2.3548200450309493
    smoothing = gaussian_1d(max(psf_sigma, 0.5), 3.0)
    grow_radius = math.ceil(grow_nsigma * psf_sigma)

    for p in direct if template_mode else [*direct, *rejection]:
        measure_weight(p, sample_rows=weight_sample_rows)
    n_epochs = len({p.source.visit for p in rejection if p.weight > 0})
    reject_reason = ""
    if not do_reject:
        reject_reason = "disabled"
    elif n_epochs < 3:
        reject_reason = f"{n_epochs} visit(s): rejection needs >= 3"
    rejecting = not reject_reason
    # Rejection input -> direct input of the same (visit, detector).
    partner: dict[int, int] = {}
    if rejecting and template_mode:
        partner = {p.index: p.index for p in direct}
    elif rejecting:
        by_id = {(p.source.visit, p.source.detector): p.index for p in direct}
        for q in rejection:
            key = (q.source.visit, q.source.detector)
            if key in by_id:
                partner[q.index] = by_id[key]
        missing = len(direct) - len(set(partner.values()))
        if missing:
            log.warning("%d input(s) without a rejection input: never clipped", missing)

    n_layers = pack_layers(direct)
    n_rej_layers = pack_layers(rejection) if rejecting and not template_mode else 0
    params = RejectionParams(
        clip_sigma=clip_sigma,
        detect_sigma=detect_sigma,
        model_error=model_error,
        max_num_epochs=max_num_epochs,
        max_fraction_epochs_low=max_fraction_epochs_low,
        max_fraction_epochs_high=max_fraction_epochs_high,
        smoothing=smoothing,
        grow_radius=grow_radius,
    )
    # Rows beyond a strip that its artifact masks depend on: smoothing + growth.
    halo = smoothing.size // 2 + grow_radius + 1 if rejecting else 0
    if strip_rows is None:
        n_rej = (n_layers if template_mode else n_rej_layers) if rejecting else 0
        strip_rows = _auto_strip_rows(n_layers, n_rej, nx, halo, memory_limit_mb)
    strip_rows = max(1, min(int(strip_rows), ny))
    if rejecting:
        estimate_noise_correlation(rejection, (ny, nx), planes, params, weight_sample_rows)
    if psf_cell_size is None:
        psf_cell_size = int(np.clip(min(ny, nx) // 32, 16, 128))

    out = _Output.empty((ny, nx), planes, direct, max(1, int(psf_block)))
    propagation = {k: v for k, v in propagation.items() if k in planes.bits}
    or_bits = 0
    for name, b in planes.bits.items():
        if name not in NOT_PROPAGATED_PLANES and name not in bad_mask_planes:
            or_bits |= 1 << b
    n_possible = 0
    for y0 in range(0, ny, strip_rows):
        y1 = min(ny, y0 + strip_rows)
        verdicts: dict[int, Verdict] = {}
        if rejecting:
            h0, h1 = max(0, y0 - halo), min(ny, y1 + halo)
            rstack = read_stack(rejection, h0, h1, nx, planes, with_mask=False)
            if rstack.image.shape[0]:
                core = slice(y0 - h0, y1 - h0)
                found = find_artifacts(rstack, rejection, core, params)
                n_epochs_core = rstack.valid[:, core].sum(axis=0)
                n_possible += int((max_epochs(n_epochs_core, params) > 0).sum())
                for q_index, verdict in found.items():
                    if q_index in partner:
                        verdicts[partner[q_index]] = verdict
            del rstack
        stack = read_stack(direct, y0, y1, nx, planes, with_mask=True)
        _combine_strip(
            stack,
            verdicts,
            set(partner.values()),
            y0,
            out,
            or_bits=or_bits,
            propagation=propagation,
        )
        del stack

    bit = out.bit
    no_data = out.n_image == 0
    out.mask[no_data] |= bit["NO_DATA"]
    if do_interp and no_data.any() and not no_data.all():
        from workflow_lib.single_frame.cosmic_rays import interpolate_masked

        interpolate_masked(out.image, no_data, variance=out.variance)
        out.mask[no_data] |= bit["INTRP"]

    weights = np.array([p.weight for p in direct])
    apcorr = [header_value(p.source.metadata, ["APCORR"]) for p in direct]
    coadd_psf = build_coadd_psf(
        [p.source.psf for p in direct],
        weights,
        [(p.x0, p.y0) for p in direct],
        out.coverage,
        out.block_origin,
        block=out.block,
        shape=(ny, nx),
        cell_size=psf_cell_size,
        order=psf_order,
        aperture_corrections=[float("nan") if a is None else float(a) for a in apcorr],
        input_ids=[(int(p.source.visit), int(p.source.detector)) for p in direct],
    )
    table = _input_table(direct, rejection, partner, out.stats)
    header = _coadd_header(
        metadata,
        table,
        reject_reason=reject_reason,
        template_mode=template_mode,
        params=params,
        n_possible=n_possible,
        no_data=no_data,
        strip_rows=strip_rows,
        model_fwhm=model_fwhm,
        coadd_psf=coadd_psf,
        do_interp=do_interp,
        psf_cell_size=psf_cell_size,
    )
    exposure = Exposure(
        image=out.image,
        variance=out.variance,
        mask=out.mask,
        wcs=wcs,
        psf=coadd_psf.model if coadd_psf is not None else None,
        photo_calib=PhotoCalib(njy_per_unit=1.0),
        metadata=header,
        mask_planes=planes,
        origin=(int(origin[0]), int(origin[1])),
    )
    log.info(
        "coadd %dx%d from %d inputs (%d visits): rejection %s, %.1f%% of pixels with data",
        nx,
        ny,
        len(direct),
        table["visit"].nunique(),
        reject_reason or "compare-warp",
        100.0 * (1.0 - no_data.mean()),
    )
    return CoaddResult(
        exposure=exposure,
        inputs=table,
        n_image=out.n_image,
        coadd_psf=coadd_psf,
    )


@dataclass
class _Output:
    """The coadd planes being filled, with per-input tallies and PSF coverage blocks."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    n_image: np.ndarray
    stats: np.ndarray  # (n_inputs, 5) pixels: covered, valid, used, clipped, unchecked
    block: int
    coverage: list[np.ndarray]  # per input: pixels used per block over its bbox
    block_origin: list[tuple[int, int]]  # per input: (bx, by) of its first block
    bit: dict[str, np.int32]

    @classmethod
    def empty(
        cls, shape: tuple[int, int], planes: MaskPlanes, inputs: list[PreparedInput], block: int
    ) -> _Output:
        coverage, origin = [], []
        for p in inputs:
            if p.layer < 0:
                coverage.append(np.zeros((0, 0), COVERAGE_DTYPE))
                origin.append((0, 0))
                continue
            bx0, by0 = p.bx0 // block, p.by0 // block
            nbx, nby = (p.bx1 - 1) // block - bx0 + 1, (p.by1 - 1) // block - by0 + 1
            coverage.append(np.zeros((nby, nbx), COVERAGE_DTYPE))
            origin.append((bx0, by0))
        return cls(
            image=np.full(shape, np.nan, np.float32),
            variance=np.full(shape, np.nan, np.float32),
            mask=np.zeros(shape, MASK_DTYPE),
            n_image=np.zeros(shape, np.int32),
            stats=np.zeros((len(inputs), 5), np.int64),
            block=block,
            coverage=coverage,
            block_origin=origin,
            bit={name: np.int32(1 << b) for name, b in planes.bits.items()},
        )

    def add_coverage(self, index: int, used: np.ndarray, y_start: int, x_start: int) -> None:
        counts = block_sums(used, y_start, x_start, self.block)
        bx0, by0 = self.block_origin[index]
        jy, jx = y_start // self.block - by0, x_start // self.block - bx0
        self.coverage[index][jy : jy + counts.shape[0], jx : jx + counts.shape[1]] += counts.astype(
            COVERAGE_DTYPE
        )


def _verdict_on(verdict: Verdict | None, rs: slice, cs: slice) -> tuple[np.ndarray, np.ndarray]:
    """(checked, rejected) over a direct input's region from its partner's verdict."""
    checked = np.zeros((rs.stop - rs.start, cs.stop - cs.start), bool)
    rejected = np.zeros_like(checked)
    if verdict is None:
        return checked, rejected
    vrs, vcs, valid, grown = verdict
    lo, hi = max(rs.start, vrs.start), min(rs.stop, vrs.stop)
    c0, c1 = max(cs.start, vcs.start), min(cs.stop, vcs.stop)
    if hi > lo and c1 > c0:
        src = (slice(lo - vrs.start, hi - vrs.start), slice(c0 - vcs.start, c1 - vcs.start))
        dst = (slice(lo - rs.start, hi - rs.start), slice(c0 - cs.start, c1 - cs.start))
        checked[dst] = valid[src]
        rejected[dst] = grown[src]
    return checked, rejected


def _combine_strip(
    stack: Stack,
    verdicts: Mapping[int, Verdict],
    checked_inputs: set[int],
    y0: int,
    out: _Output,
    *,
    or_bits: int,
    propagation: Mapping[str, float],
) -> None:
    """Weighted mean of one strip's layers without bad or clipped pixels, into ``out``.

    Inputs in ``checked_inputs`` (those with a rejection input) contribute
    only pixels their rejection input had valid and did not reject
    (``verdicts``, by direct input): a direct pixel whose PSF-matched
    partner has no data there (its border, lost to the matching kernel)
    could hide an artifact, so it is left out, as LSST's CompareWarp does
    by shrinking the direct warps' valid polygons to the PSF-matched ones.
    """
    if not stack.image.shape[0]:
        return  # nothing covers these rows: the planes stay NaN, NO_DATA is set later
    rows, nx = stack.image.shape[1:]
    y1 = y0 + rows
    bit = out.bit
    num = np.zeros((rows, nx))
    den = np.zeros((rows, nx))
    vnum = np.zeros((rows, nx))
    n_used = np.zeros((rows, nx), np.int32)
    mask_or = np.zeros((rows, nx), MASK_DTYPE)
    covered_w = np.zeros((rows, nx))
    bad_w = {name: np.zeros((rows, nx)) for name in propagation}
    excluded_any = np.zeros((rows, nx), bool)
    edge_any = np.zeros((rows, nx), bool)
    clipped_any = np.zeros((rows, nx), bool)
    regions: dict[int, list[tuple[int, slice, slice]]] = {}
    for index, layer, rs, cs in stack.regions:
        regions.setdefault(layer, []).append((index, rs, cs))
    for layer, sp in enumerate(stack.spans()):
        # Work on the columns this layer occupies; local slices are relative to them.
        valid = stack.valid[layer, :, sp]
        w_cov = stack.weight[layer, :, sp]
        covered = w_cov > 0
        msk = stack.mask[layer, :, sp]
        used = valid.copy()
        clipped = np.zeros_like(valid)
        local = [
            (i, rs, cs, slice(cs.start - sp.start, cs.stop - sp.start))
            for i, rs, cs in regions.get(layer, [])
        ]
        for index, rs, cs, lc in local:
            if index in checked_inputs:
                checked, rejected = _verdict_on(verdicts.get(index), rs, cs)
                clipped[rs, lc] = valid[rs, lc] & rejected
                used[rs, lc] &= checked & ~rejected
        w = np.where(used, w_cov, np.float32(0.0))
        num[:, sp] += w * stack.image[layer, :, sp]
        den[:, sp] += w
        vnum[:, sp] += w * w * stack.variance[layer, :, sp]
        n_used[:, sp] += used
        mask_or[:, sp] |= np.where(used, msk & or_bits, 0).astype(MASK_DTYPE)
        clipped_any[:, sp] |= clipped
        excluded = covered & ~valid
        excluded_any[:, sp] |= excluded
        if "EDGE" in bit:
            edge_any[:, sp] |= excluded & ((msk & bit["EDGE"]) != 0)
        covered_w[:, sp] += w_cov
        for name, acc in bad_w.items():
            acc[:, sp] += np.where((msk & bit[name]) != 0, w_cov, np.float32(0.0))
        for index, rs, cs, lc in local:
            u = used[rs, lc]
            n_valid = int(valid[rs, lc].sum())
            n_clipped = int(clipped[rs, lc].sum())
            out.stats[index] += (
                int(covered[rs, lc].sum()),
                n_valid,
                int(u.sum()),
                n_clipped,
                n_valid - int(u.sum()) - n_clipped,
            )
            if u.any():
                out.add_coverage(index, u, y0 + rs.start, cs.start)
    has = den > 0
    safe = np.where(has, den, 1.0)
    out.image[y0:y1] = np.where(has, num / safe, np.nan)
    out.variance[y0:y1] = np.where(has, vnum / safe**2, np.nan)
    flags = {
        "CLIPPED": clipped_any,
        "REJECTED": excluded_any,
        "SENSOR_EDGE": edge_any,
        "INEXACT_PSF": (clipped_any | excluded_any) & has,
    }
    for name, acc in bad_w.items():
        frac = np.divide(acc, covered_w, out=np.zeros_like(acc), where=covered_w > 0)
        flags[name] = flags.get(name, False) | (frac >= propagation[name])
    for name, where in flags.items():
        mask_or |= np.where(where, bit[name], 0).astype(MASK_DTYPE)
    out.mask[y0:y1] = mask_or
    out.n_image[y0:y1] = n_used


def _input_table(direct, rejection, partner, stats) -> pd.DataFrame:
    correlation = {d: rejection[q].noise_correlation for q, d in partner.items()}
    rows = []
    for p in direct:
        meta = p.source.metadata
        band = header_value(meta, BAND_KEYS)
        mjd = header_value(meta, MJD_KEYS)
        covered, valid, used, clipped, unchecked = (int(v) for v in stats[p.index])
        sy, sx = p.source.shape
        rows.append(
            {
                "visit": int(p.source.visit),
                "detector": int(p.source.detector),
                "band": str(band).strip() if band is not None else "",
                "mjd": float(mjd) if mjd is not None else float("nan"),
                "weight": float(p.weight),
                "mean_variance": float(p.mean_variance),
                "x0": p.x0,
                "y0": p.y0,
                "nx": int(sx),
                "ny": int(sy),
                "psf_fwhm": _psf_fwhm(p.source.psf, p.source.shape),
                "n_covered": covered,
                "n_valid": valid,
                "n_used": used,
                "n_clipped": clipped,
                "n_unchecked": unchecked,
                "clipped_fraction": clipped / valid if valid else 0.0,
                "has_rejection_input": p.index in correlation,
                "noise_correlation": float(correlation.get(p.index, np.nan)),
                "used": used > 0,
            }
        )
    return pd.DataFrame(rows)


def _coadd_header(
    metadata,
    table,
    *,
    reject_reason,
    template_mode,
    params,
    n_possible,
    no_data,
    strip_rows,
    model_fwhm,
    coadd_psf,
    do_interp,
    psf_cell_size,
) -> fits.Header:
    header = fits.Header() if metadata is None else metadata.copy()
    bands = sorted({b for b in table["band"] if b})
    if len(bands) == 1:
        header["BAND"] = (bands[0], "band of every input")
    header["NINPUTS"] = (int(table["used"].sum()), "inputs used (visit, detector)")
    header["NVISITS"] = (int(table.loc[table["used"], "visit"].nunique()), "visits used")
    if np.isfinite(table["mjd"]).any():
        header["MJDMIN"] = (float(np.nanmin(table["mjd"])), "earliest input MJD")
        header["MJDMAX"] = (float(np.nanmax(table["mjd"])), "latest input MJD")
    header["REJINPUT"] = (
        "SELF" if template_mode else "PARTNER",
        "artifacts found on: the inputs (SELF), partner warps",
    )
    header["STATISTC"] = ("MEAN", "inverse-variance weighted mean")
    header["REJECT"] = ("NONE" if reject_reason else "COMPAREWARP", "artifact rejection")
    if reject_reason:
        header["REJWHY"] = (reject_reason[:68], "why no artifact rejection")
    covered = max(int((~no_data).sum()), 1)
    header["REJFRAC"] = (round(n_possible / covered, 5), "fraction of data pixels with >= 3 epochs")
    header["CLIPSIG"] = (params.clip_sigma, "reference clip, sigma")
    header["DETSIG"] = (params.detect_sigma, "artifact detection threshold, sigma")
    header["MODELERR"] = (params.model_error, "fractional tolerance of the reference")
    header["MAXEPOCH"] = (params.max_num_epochs, "maxNumEpochs")
    header["EPOCHLO"] = (params.max_fraction_epochs_low, "maxFractionEpochsLow")
    header["EPOCHHI"] = (params.max_fraction_epochs_high, "maxFractionEpochsHigh")
    header["MODLFWHM"] = (round(model_fwhm, 4), "PSF FWHM of the rejection warps, pixels")
    header["NCLIPPED"] = (int(table["n_clipped"].sum()), "input pixels rejected as artifacts")
    header["COVFRAC"] = (round(1.0 - float(no_data.mean()), 6), "fraction of pixels with data")
    header["STRIPROW"] = (int(strip_rows), "rows per assembly strip")
    header["DOINTERP"] = (bool(do_interp), "NO_DATA pixels interpolated")
    if coadd_psf is not None:
        header["PSFCELL"] = (int(psf_cell_size), "cell size of the POLYPIX PSF fit, pixels")
        header["PSFBLOCK"] = (coadd_psf.block, "block size of the PSF coverage maps, pixels")
        header["PSFORDER"] = (coadd_psf.order, "order of the POLYPIX coadd PSF")
        residual = round(coadd_psf.max_rms_residual, 6)
        header["PSFFRES"] = (residual, "max rms residual / peak of the PSF fit")
        pure = round(coadd_psf.pure_cell_fraction, 4)
        header["PSFPURE"] = (pure, "fraction of PSF fit cells of uniform coverage")
        ny, nx = coadd_psf.shape
        centre = coadd_psf.aperture_correction_at(
            np.array([(nx - 1) / 2.0]), np.array([(ny - 1) / 2.0])
        )[0]
        if np.isfinite(centre):
            header["APCORR"] = (round(float(centre), 6), "inputs' aperture correction at centre")
    return header
