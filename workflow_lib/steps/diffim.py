"""Step: difference imaging of one calexp (LSST's ``imageDifference`` per CCD).

Reads the calexp and the template coadds of every patch listed for the CCD,
builds the CCD's template (:mod:`workflow_lib.diffim.template`), subtracts
(:mod:`workflow_lib.diffim.subtract`), finds DIASources
(:mod:`workflow_lib.diffim.sources`) and writes three products: the difference
image, the CCD's DIASources (CONTRACT ``DiaSource`` columns; ``diaObjectId``
is 0 until association) and its record (``diaCcd``: template coverage, which
image was convolved, outcome). A CCD without a calexp, without enough
template, or whose PSFs cannot be matched is a recorded skip: a failure
record in place of the difference image, an empty DIASource table and the
reason in the record, and the run goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from astropy.io import fits

from workflow_lib import __version__
from workflow_lib.core.config import DiffimConfig
from workflow_lib.core.exposure import Exposure
from workflow_lib.io import read_table, write_table
from workflow_lib.io.exposure import (
    ProcessingFailed,
    read_exposure,
    write_exposure,
    write_failure_record,
)
from workflow_lib.io.skymap import read_skymap

log = logging.getLogger(__name__)

DIA_SOURCE_COLUMNS: dict[str, str] = {
    "diaSourceId": "i8",
    "diaObjectId": "i8",
    "visit": "i8",
    "detector": "i8",
    "band": "object",
    "midpointMjdTai": "f8",
    "ra": "f8",
    "dec": "f8",
    "x": "f8",
    "y": "f8",
    "psfFlux": "f8",
    "psfFluxErr": "f8",
    "snr": "f8",
    "isDipole": "bool",
    "flags": "i8",
    "coordErr": "f8",
    "scienceFlux": "f8",
    "scienceFluxErr": "f8",
    "apCorr": "f8",
}
DIA_CCD_COLUMNS: dict[str, str] = {
    "visit": "i8",
    "detector": "i8",
    "band": "object",
    "midpointMjdTai": "f8",
    "templateCoverage": "f8",
    "templateSelfWeight": "f8",
    "nTemplatePatches": "i8",
    "convolved": "object",
    "method": "object",
    "residualRatio": "f8",
    "nResidualStars": "i8",
    "badSubtraction": "bool",
    "blankNoiseSigma": "f8",
    "nBlankPositions": "i8",
    "nDiaSources": "i8",
    "failed": "bool",
    "failReason": "object",
}


def dia_source_ids(visit: int, detector: int, n: int) -> np.ndarray:
    """Ids packing (visit, detector, sequence) like sourceIds, in a range of their own."""
    from workflow_lib.single_frame.calibrate import source_ids

    # Bit 62 set: a DIASource id never equals a Source id of the same CCD.
    return source_ids(visit, detector, n) | np.int64(1 << 62)


def _ccd_ids(visit: int, detector: int, row: pd.Series) -> dict[str, Any]:
    """The ids every DIA row of a CCD-visit carries, from its CcdVisit or DiaCcdVisit row."""
    return {
        "visit": int(visit),
        "detector": int(detector),
        "band": str(row["band"]),
        "midpointMjdTai": float(row["midpointMjdTai"]),
    }


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


# Sources at least this bright (S/N on the calexp) measure the subtraction's residual.
RESIDUAL_STAR_SNR = 50.0
# The noise check's blank places are this many PSF FWHM from every source.
BLANK_AVOID_FWHM = 3.0
# CCD points (every this many pixels) at which the visit's share of its template is judged.
SELF_WEIGHT_GRID_PX = 16


def _template_pieces(
    template_paths: list[str],
    template_psf_paths: list[str],
    patches: list[list[int]],
    skymap_path: str,
    calexp: Exposure,
    visit: int,
) -> tuple[list[Any], float]:
    """Each readable template coadd warped onto the calexp, with its inner-region mask;
    and the visit's own share of the template's input weight over the CCD (NaN if a
    coadd PSF does not record its inputs)."""
    from workflow_lib.diffim.template import (
        TemplatePiece,
        inner_region_mask,
        template_self_weight,
    )
    from workflow_lib.io.coadd_psf import read_coadd_psf
    from workflow_lib.static_sky.warp import warp_exposure

    sky = read_skymap(skymap_path)
    ny, nx = calexp.shape
    assert calexp.wcs is not None
    step = SELF_WEIGHT_GRID_PX
    gx, gy = np.meshgrid(np.arange(step / 2, nx, step), np.arange(step / 2, ny, step))
    grid_ra, grid_dec = calexp.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    pieces, shares = [], []
    unknown = False
    for path, psf_path, (tract, patch) in zip(
        template_paths, template_psf_paths, patches, strict=True
    ):
        try:
            coadd = read_exposure(path)
        except ProcessingFailed as err:
            log.info("template %s: %s", path, err)
            continue
        warp = warp_exposure(coadd, calexp.wcs, (0, 0, nx, ny))
        if warp is None:
            continue
        info = sky.patch(int(tract), int(patch))
        ox, oy = info.outer_bbox[0], info.outer_bbox[1]
        inner = (info.inner_bbox[0] - ox, info.inner_bbox[1] - oy, *info.inner_bbox[2:])
        pieces.append(TemplatePiece(warp=warp, inner=inner_region_mask(warp, info.wcs, inner)))
        assert coadd.wcs is not None
        cx, cy = coadd.wcs.all_world2pix(grid_ra, grid_dec, 0)
        try:
            shares.append(read_coadd_psf(psf_path).visit_weight_share(visit, cx, cy))
        except ValueError as err:
            log.info("template %s: visit share unknown: %s", psf_path, err)
            unknown = True
    self_weight = float("nan") if unknown else template_self_weight(shares)
    return pieces, self_weight


def _dia_source_table(
    found: pd.DataFrame, calexp: Exposure, psf_fwhm_px: float, ids: dict[str, Any]
) -> pd.DataFrame:
    """The CONTRACT's DiaSource rows of one CCD, with the direct flux and position errors.

    Difference and direct PSF fluxes both get the calexp's aperture correction
    (the difference is matched to the calexp's PSF where the template is the
    image convolved), so that they are on the scale of the Source fluxes.
    ``coordErr`` is a point source's centroid error per axis,
    sqrt(2) sigma_PSF / S/N (arcsec).
    """
    from workflow_lib.objects.forced import forced_photometry
    from workflow_lib.single_frame.calibrate import pixel_scale_arcsec
    from workflow_lib.single_frame.measure import ApertureCorrection

    assert calexp.wcs is not None
    x, y = found["x"].to_numpy(), found["y"].to_numpy()
    ra, dec = calexp.wcs.all_pix2world(x, y, 0)
    n = len(found)
    apcorr = ApertureCorrection.from_header(calexp.metadata)
    flux, flux_err = found["psf_flux"].to_numpy(), found["psf_flux_err"].to_numpy()
    ratio = np.ones(n)
    if apcorr is not None and n:
        ratio = apcorr.ratio_at(x, y)[0]
        flux, flux_err = apcorr.apply(x, y, flux, flux_err)
    diasource_ids = dia_source_ids(ids["visit"], ids["detector"], n)
    direct = forced_photometry(
        calexp,
        pd.DataFrame({"diaSourceId": diasource_ids, "ra": ra, "dec": dec}),
        id_column="diaSourceId",
        aperture_correction=apcorr,
        visit=ids["visit"],
        detector=ids["detector"],
        band=ids["band"],
        midpoint_mjd=ids["midpointMjdTai"],
    ).set_index("objectId")
    direct = direct.reindex(diasource_ids)
    snr = found["snr"].to_numpy()
    sigma_arcsec = psf_fwhm_px / 2.3548 * pixel_scale_arcsec(calexp.wcs)
    with np.errstate(divide="ignore", invalid="ignore"):
        coord_err = np.sqrt(2.0) * sigma_arcsec / np.abs(snr)
    table = pd.DataFrame(
        {
            "diaSourceId": diasource_ids,
            "diaObjectId": np.zeros(n, dtype=np.int64),
            "visit": np.int64(ids["visit"]),
            "detector": np.int64(ids["detector"]),
            "band": ids["band"],
            "midpointMjdTai": ids["midpointMjdTai"],
            "ra": ra,
            "dec": dec,
            "x": x,
            "y": y,
            "psfFlux": flux,
            "psfFluxErr": flux_err,
            "snr": snr,
            "isDipole": found["is_dipole"].astype(bool),
            "flags": found["flags"].astype(np.int64),
            "coordErr": coord_err,
            "scienceFlux": direct["psfFlux"].to_numpy(),
            "scienceFluxErr": direct["psfFluxErr"].to_numpy(),
            "apCorr": ratio,
        }
    )
    return table.astype(DIA_SOURCE_COLUMNS)


@dataclass(frozen=True)
class _Differenced:
    subtraction: Any  # diffim.subtract.SubtractionResult
    difference: Exposure  # its variance scaled as detection used it
    found: pd.DataFrame  # detect_dia_sources' rows
    table: pd.DataFrame  # the CONTRACT's DiaSource rows
    fwhm: float  # of the difference image's PSF, pixels


def _difference_and_sources(
    calexp: Exposure, template: Exposure, src: pd.DataFrame, cfg: DiffimConfig, ids: dict[str, Any]
) -> _Differenced:
    """Subtract the template from the calexp and find and measure the DIASources: the
    numerics of :func:`subtract_ccd`, shared with the injection check (:func:`inject_ccd`)."""
    from workflow_lib.core.flags import UNRELIABLE_SOURCE
    from workflow_lib.diffim.alard_lupton import AlardLuptonConfig
    from workflow_lib.diffim.sources import DiaDetectionConfig, detect_dia_sources
    from workflow_lib.diffim.subtract import SubtractionConfig, kernel_candidates, subtract_images

    subtraction = SubtractionConfig(
        alard_lupton=AlardLuptonConfig(max_stamps=cfg.max_kernel_sources),
        grid_spacing=cfg.kernel_grid_spacing,
        background_order=cfg.background_order,
        method=cfg.method,
        decorrelate=cfg.decorrelate,
    )
    candidates = kernel_candidates(src)
    kernel_xy = (candidates["x"].to_numpy(), candidates["y"].to_numpy())
    result = subtract_images(calexp, template, subtraction, kernel_sources=kernel_xy)
    diff = result.difference
    # Bright reliable sources, point-like or extended, measure the subtraction's residual
    # (a field of few stars has its galaxies); every source is where one can be (fluxes
    # in nJy, as the difference image).
    reliable = (src["flags"].to_numpy(dtype=np.int64) & UNRELIABLE_SOURCE) == 0
    bright = src[reliable & (src["psfFlux"] > RESIDUAL_STAR_SNR * src["psfFluxErr"]).to_numpy()]
    found = detect_dia_sources(
        diff.image,
        diff.variance,
        diff.mask,
        diff.mask_planes,
        result.psf,
        DiaDetectionConfig(cfg.detection_threshold, max_residual_ratio=cfg.max_residual_ratio),
        static_sources=src[["x", "y"]].assign(flux=src["psfFlux"]),
        reference_stars=bright[["x", "y"]].assign(flux=bright["psfFlux"]),
    )
    # The variance plane as detection used it: scaled so that PSF-weighted sums
    # (DIASource and forced fluxes) get the noise the filtered image has (the
    # template's own noise is correlated by its warps, which decorrelation does
    # not know).
    noise_scale = float(found.attrs.get("noise_scale", 1.0))
    diff.variance = (diff.variance * noise_scale**2).astype(diff.variance.dtype)
    diff.metadata["DIFFNSCL"] = (noise_scale, "variance scaled by this squared (PSF noise)")
    fwhm = result.psf.fwhm_at(result.psf.x_center, result.psf.y_center)
    table = _dia_source_table(found, calexp, fwhm, ids)
    return _Differenced(subtraction=result, difference=diff, found=found, table=table, fwhm=fwhm)


def subtract_ccd(
    *,
    calexp_path: str,
    ccdvisit_path: str,
    src_path: str,
    template_paths: list[str],
    template_psf_paths: list[str],
    skymap_path: str,
    difference_path: str,
    dia_source_path: str,
    dia_ccd_path: str,
    visit: int,
    detector: int,
    patches: list[list[int]],
    diffim: dict[str, Any],
) -> pd.DataFrame:
    """Difference image, DIASources and the CCD's record for one (visit, detector)."""
    from astropy.stats import mad_std

    from workflow_lib.diffim.sources import UNUSABLE_PLANES, blank_sky_pulls
    from workflow_lib.diffim.template import stitch_template
    from workflow_lib.static_sky.psf_matching import PsfMatchingError

    cfg = DiffimConfig.from_dict(diffim)
    provenance = {
        "package_version": __version__,
        "step": "subtract_ccd",
        "inputs": [calexp_path, src_path, *template_paths, *template_psf_paths],
        "diffim": diffim,
    }
    ids = _ccd_ids(visit, detector, read_table(ccdvisit_path).iloc[0])
    record: dict[str, Any] = {
        **ids,
        "templateCoverage": 0.0,
        "templateSelfWeight": 0.0,
        "nTemplatePatches": 0,
        "convolved": "",
        "nKernelStamps": 0,
        "method": cfg.method,
        "residualRatio": float("nan"),
        "nResidualStars": 0,
        "badSubtraction": False,
        "blankNoiseSigma": float("nan"),
        "nBlankPositions": 0,
        "nDiaSources": 0,
        "failed": True,
        "failReason": "",
    }
    table = _empty(DIA_SOURCE_COLUMNS)
    try:
        calexp = read_exposure(calexp_path)
        pieces, self_weight = _template_pieces(
            template_paths, template_psf_paths, patches, skymap_path, calexp, int(visit)
        )
        template = stitch_template(pieces, calexp.shape, calexp.wcs)
        record.update(
            templateCoverage=template.coverage,
            templateSelfWeight=self_weight,
            nTemplatePatches=template.n_patches,
        )
        if template.coverage < cfg.min_template_coverage or template.exposure.psf is None:
            raise ProcessingFailed(
                f"template covers {template.coverage:.1%} of the CCD "
                f"(< {cfg.min_template_coverage:.0%} required)"
            )
        if self_weight > cfg.max_template_self_weight:
            raise ProcessingFailed(
                f"the template is {self_weight:.0%} this visit's own pixels "
                f"(> {cfg.max_template_self_weight:.0%} allowed): the difference would "
                "subtract the visit from itself"
            )
        src = read_table(src_path)
        differenced = _difference_and_sources(calexp, template.exposure, src, cfg, ids)
        diff, found, table = differenced.difference, differenced.found, differenced.table
        result, fwhm = differenced.subtraction, differenced.fwhm
        pulls = blank_sky_pulls(
            diff.image,
            diff.variance,
            (diff.mask & diff.mask_planes.bitmask(*UNUSABLE_PLANES)) != 0,
            result.psf,
            np.r_[src["x"].to_numpy(), found["x"].to_numpy()],
            np.r_[src["y"].to_numpy(), found["y"].to_numpy()],
            avoid_radius=BLANK_AVOID_FWHM * fwhm,
            seed=int(visit) * 1000 + int(detector),
        )
        diff.metadata["TMPLCOV"] = (template.coverage, "fraction of the CCD with template")
        ratio = float(found.attrs["residual_ratio"])
        diff.metadata["DIFFRRAT"] = (
            ratio if np.isfinite(ratio) else -1.0,
            "residual / flux at bright sources (-1: unknown)",
        )
        write_exposure(diff, difference_path, provenance=provenance)
        record.update(
            convolved=result.convolved,
            method=result.method,
            nKernelStamps=result.n_kernel_stamps,
            residualRatio=ratio,
            nResidualStars=int(found.attrs["n_residual_stars"]),
            badSubtraction=bool(found.attrs["bad_subtraction"]),
            blankNoiseSigma=float(mad_std(pulls)) if pulls.size >= 20 else float("nan"),
            nBlankPositions=int(pulls.size),
            nDiaSources=len(table),
            failed=False,
        )
    except (ProcessingFailed, PsfMatchingError) as err:
        record["failReason"] = str(err)
        log.warning("visit %d detector %d: no difference image: %s", visit, detector, err)
        header = fits.Header()
        header["VISIT"], header["DETECTOR"] = int(visit), int(detector)
        write_failure_record(difference_path, header, reason=str(err))
    log.info(
        "visit %d detector %d: template coverage %.1f%%, %d DIASources",
        visit,
        detector,
        100 * record["templateCoverage"],
        len(table),
    )
    write_table(table, dia_source_path, provenance=provenance)
    write_table(pd.DataFrame([record]).astype(DIA_CCD_COLUMNS), dia_ccd_path, provenance=provenance)
    return table


DIA_INJECTION_COLUMNS: dict[str, str] = {
    "injectionId": "i8",
    "visit": "i8",
    "detector": "i8",
    "band": "object",
    "midpointMjdTai": "f8",
    "ra": "f8",
    "dec": "f8",
    "x": "f8",
    "y": "f8",
    "injectedFlux": "f8",
    "diffFlux": "f8",
    "diffFluxErr": "f8",
    "snr": "f8",
    "hostFlux": "f8",
    "detected": "bool",
    "clean": "bool",
    "flags": "i8",
    "psfFlux": "f8",
    "raOffset": "f8",
    "decOffset": "f8",
}
# Injected sources keep this many difference-PSF FWHM from NO_DATA and BAD pixels (the
# PSF fit's radius and the TEMPLATE_EDGE flag's reach) and from the run's DIASources.
INJECTION_CLEARANCE_FWHM = 3.0
INJECTION_MIN_SEPARATION_FWHM = 10.0
INJECTION_MATCH_FWHM = 1.0


def _injection_sites(
    before: Exposure,
    found_before: pd.DataFrame,
    injection: dict[str, Any],
    fwhm: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions and fluxes of the sources to inject, from the run's difference image:
    where it has data, clear of its DIASources, at log-uniform S/N by its errors."""
    from workflow_lib.diffim.injection import injection_positions
    from workflow_lib.diffim.sources import UNUSABLE_PLANES, source_neighbourhood
    from workflow_lib.objects.forced import fixed_psf_fluxes
    from workflow_lib.single_frame.background import dilate_mask

    assert before.psf is not None
    clearance = INJECTION_CLEARANCE_FWHM * fwhm
    unusable = (before.mask & before.mask_planes.bitmask(*UNUSABLE_PLANES)) != 0
    blocked = dilate_mask(unusable, radius=clearance)
    blocked |= source_neighbourhood(
        before.shape, found_before["x"].to_numpy(), found_before["y"].to_numpy(), clearance
    )
    border = int(np.ceil(clearance))
    blocked[:border], blocked[-border:], blocked[:, :border], blocked[:, -border:] = (True,) * 4
    usable = ~blocked
    n_wanted = round(float(injection["per_megapixel"]) * usable.sum() / 1e6)
    x, y = injection_positions(usable, n_wanted, INJECTION_MIN_SEPARATION_FWHM * fwhm, rng)
    expected_err = fixed_psf_fluxes(
        before.image, before.variance, unusable, before.psf, x, y, joint=False
    )["psf_flux_err"].to_numpy()
    lo, hi = float(injection["snr_min"]), float(injection["snr_max"])
    flux = np.exp(rng.uniform(np.log(lo), np.log(hi), x.size)) * expected_err
    keep = np.isfinite(flux) & (flux > 0)
    return x[keep], y[keep], flux[keep]


def _matched_columns(found: pd.DataFrame, match: np.ndarray, ra: np.ndarray, dec: np.ndarray):
    """flags, PSF flux (PSF-model scale) and offsets (arcsec) of each injected source's
    DIASource (``match`` row, -1: none; 0 and NaN where none)."""
    from workflow_lib.core.sky import tangent_plane_arcsec

    hit = match >= 0
    n = match.size
    flags, flux = np.zeros(n, dtype=np.int64), np.full(n, np.nan)
    d_ra, d_dec = np.full(n, np.nan), np.full(n, np.nan)
    if hit.any():
        rows = found.iloc[match[hit]]
        flags[hit] = rows["flags"].to_numpy()
        flux[hit] = (rows["psfFlux"] / rows["apCorr"]).to_numpy()
        d_ra[hit], d_dec[hit] = tangent_plane_arcsec(
            rows["ra"].to_numpy(), rows["dec"].to_numpy(), ra[hit], dec[hit]
        )
    return flags, flux, d_ra, d_dec


def inject_ccd(
    *,
    calexp_path: str,
    ccdvisit_path: str,
    src_path: str,
    template_paths: list[str],
    template_psf_paths: list[str],
    skymap_path: str,
    difference_path: str,
    dia_source_path: str,
    dia_ccd_path: str,
    injection_path: str,
    visit: int,
    detector: int,
    patches: list[list[int]],
    diffim: dict[str, Any],
) -> pd.DataFrame:
    """Point sources injected into one calexp, differenced and searched as the run did:
    which are found, and how well they are measured (``diaInjection`` rows).

    Sources of log-uniform S/N (``diffim.injection``) go where the run's difference
    image has data, clear of its DIASources (:func:`_injection_sites`); each is then
    measured on the new difference image by forced PSF photometry at its position
    (``diffFlux``, ``diffFluxErr``; ``snr`` = injectedFlux / diffFluxErr, its true S/N)
    and looked for among the new DIASources (within a FWHM). A CCD-visit the run did
    not difference gets no rows.
    """
    from workflow_lib.core.flags import ARTIFACT_DIA_SOURCE
    from workflow_lib.diffim.injection import match_injected, point_source_image
    from workflow_lib.diffim.sources import UNUSABLE_PLANES, brightest_within
    from workflow_lib.diffim.template import stitch_template
    from workflow_lib.objects.forced import fixed_psf_fluxes
    from workflow_lib.single_frame.calibrate import source_ids

    cfg = DiffimConfig.from_dict(diffim)
    provenance = {
        "package_version": __version__,
        "step": "inject_ccd",
        "inputs": [calexp_path, difference_path, *template_paths],
        "diffim": diffim,
    }
    record = read_table(dia_ccd_path).iloc[0]
    if bool(record["failed"]):
        log.info("visit %d detector %d: not differenced, nothing injected", visit, detector)
        table = _empty(DIA_INJECTION_COLUMNS)
        write_table(table, injection_path, provenance=provenance)
        return table
    ids = _ccd_ids(visit, detector, record)
    calexp = read_exposure(calexp_path)
    before = read_exposure(difference_path)
    assert before.psf is not None and calexp.wcs is not None and calexp.psf is not None
    fwhm = before.psf.fwhm_at(before.psf.x_center, before.psf.y_center)
    rng = np.random.default_rng([int(diffim["injection"]["seed"]), int(visit), int(detector)])
    x, y, flux = _injection_sites(
        before, read_table(dia_source_path), diffim["injection"], fwhm, rng
    )

    added = point_source_image(calexp.shape, calexp.psf, x, y, flux)
    calexp.image = (calexp.image + added).astype(np.float32)
    pieces, _ = _template_pieces(
        template_paths, template_psf_paths, patches, skymap_path, calexp, int(visit)
    )
    template = stitch_template(pieces, calexp.shape, calexp.wcs)
    src = read_table(src_path)
    differenced = _difference_and_sources(calexp, template.exposure, src, cfg, ids)
    diff, found = differenced.difference, differenced.table
    assert diff.psf is not None
    bad = (diff.mask & diff.mask_planes.bitmask(*UNUSABLE_PLANES)) != 0
    forced = fixed_psf_fluxes(diff.image, diff.variance, bad, diff.psf, x, y, joint=False)
    match = match_injected(
        x, y, found["x"].to_numpy(), found["y"].to_numpy(), INJECTION_MATCH_FWHM * fwhm
    )
    ra, dec = calexp.wcs.all_pix2world(x, y, 0)
    flags, measured, d_ra, d_dec = _matched_columns(found, match, ra, dec)
    err = forced["psf_flux_err"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / err
    n = x.size
    table = pd.DataFrame(
        {
            "injectionId": source_ids(int(visit), int(detector), n) | np.int64(1 << 61),
            "visit": np.full(n, ids["visit"]),
            "detector": np.full(n, ids["detector"]),
            "band": ids["band"],
            "midpointMjdTai": ids["midpointMjdTai"],
            "ra": ra,
            "dec": dec,
            "x": x,
            "y": y,
            "injectedFlux": flux,
            "diffFlux": forced["psf_flux"].to_numpy(dtype=np.float64),
            "diffFluxErr": err,
            "snr": snr,
            "hostFlux": brightest_within(src["x"], src["y"], src["psfFlux"], x, y, 2.0 * fwhm),
            "detected": match >= 0,
            "clean": (match >= 0) & ((flags & int(ARTIFACT_DIA_SOURCE)) == 0),
            "flags": flags,
            "psfFlux": measured,
            "raOffset": d_ra,
            "decOffset": d_dec,
        }
    ).astype(DIA_INJECTION_COLUMNS)
    log.info(
        "visit %d detector %d: %d sources injected, %d found, %d clean",
        visit,
        detector,
        n,
        int(table["detected"].sum()),
        int(table["clean"].sum()),
    )
    write_table(table, injection_path, provenance=provenance)
    return table
