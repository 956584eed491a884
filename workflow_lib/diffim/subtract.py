"""Image subtraction of one CCD: science minus its PSF-matched template.

LSST's ``subtractImages``: the template (already in the calexp's pixels,
:mod:`workflow_lib.diffim.template`) is convolved so that its PSF becomes the
science PSF (``convolveTemplate``, the default); where that cannot be done (the science
PSF is the sharper somewhere on the CCD, or its shape differs), both images
are convolved to a common model PSF a little wider than either (as LSST's
PSF-matched warps are), and the result says which (``convolved``). The matching kernel
here comes from the two PSF models (:func:`~workflow_lib.static_sky.psf_matching.
psf_match_exposure`, the machinery of the PSF-matched warps: spatially varying
kernels at grid nodes, masks grown by the kernel). A smooth differential
background (a low-order polynomial, fitted with sigma clipping to pixels away
from sources) is removed from the difference.

The difference keeps the calexp's mask planes, plus the template's NO_DATA,
BAD and its saturation as ``SAT_TEMPLATE``; its variance is the sum of the
two (the convolved template's variance convolved with K^2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from astropy.stats import mad_std

from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes
from workflow_lib.core.flags import UNRELIABLE_SOURCE, SourceFlag
from workflow_lib.core.psf_model import (
    PsfModel,
    fit_psf_model,
    polynomial_image,
    polynomial_terms,
)
from workflow_lib.diffim.alard_lupton import (
    AlardLuptonConfig,
    AlardLuptonSolution,
    KernelFitError,
    fit_kernel,
)
from workflow_lib.diffim.decorrelation import (
    convolved_psf,
    decorrelate,
    decorrelation_kernel,
    variance_scale,
)
from workflow_lib.diffim.template import TEMPLATE_SATURATED_PLANE
from workflow_lib.diffim.zogy import zogy_difference
from workflow_lib.static_sky.psf_matching import (
    GAUSSIAN_FWHM_PER_SIGMA,
    PsfMatchingError,
    convolve_exposure,
    model_psf,
    psf_match_exposure,
)

log = logging.getLogger(__name__)

# The template's planes that carry into the difference (its DETECTED, CLIPPED, ... do not).
TEMPLATE_PLANES = ("NO_DATA", "BAD", TEMPLATE_SATURATED_PLANE)


@dataclass(frozen=True)
class SubtractionConfig:
    """Settings of the subtraction (LSST's ``subtractImages`` defaults where it has them)."""

    grid_spacing: float = 256.0  # pixels between matching-kernel nodes
    max_residual: float = 0.03  # of the PSF match (relative L2), else the CCD is refused
    # Where the template cannot be convolved into the science's PSF, both are matched to
    # a model PSF this much wider than the widest of the two PSFs over the CCD.
    common_psf_factor: float = 1.15
    method: str = "alard_lupton"  # or "psf_models" or "zogy"
    alard_lupton: AlardLuptonConfig = field(default_factory=AlardLuptonConfig)
    decorrelate: bool = True  # LSST's doDecorrelation
    scale_variance: bool = True  # LSST's doScaleVariance
    background_order: int = 1  # differential background polynomial; -1 for none
    background_clip_sigma: float = 3.0


@dataclass(frozen=True)
class Subtraction:
    """A difference image and how it was made."""

    difference: Exposure  # image = science - matched template (or matched science - template)
    psf: PsfModel  # the difference's PSF
    convolved: str  # "template", "science", or "both" (to a common model PSF)
    background: np.ndarray  # coefficients of the differential background removed
    method: str = "psf_models"  # or "alard_lupton"
    n_kernel_stamps: int = 0


class _RawDifference(NamedTuple):
    """A difference before decorrelation, background and variance scaling."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    planes: MaskPlanes
    psf: PsfModel


def _merge_masks(science: Exposure, template: Exposure) -> tuple[np.ndarray, MaskPlanes]:
    planes = MaskPlanes(dict(science.mask_planes.bits))
    mask = science.mask.astype(MASK_DTYPE)
    for name in TEMPLATE_PLANES:
        if name in template.mask_planes.bits:
            bit = np.int32(1 << planes.add(name))
            mask = np.where(template.mask_of(name), mask | bit, mask)
    return mask.astype(MASK_DTYPE), planes


def _max_fwhm(exposure: Exposure) -> float:
    """The widest FWHM (pixels) of the exposure's PSF on a 3 x 3 grid over the image."""
    assert exposure.psf is not None
    ny, nx = exposure.shape
    return max(
        exposure.psf.fwhm_at(x, y)
        for x in (0.0, (nx - 1) / 2, nx - 1.0)
        for y in (0.0, (ny - 1) / 2, ny - 1.0)
    )


def fit_background(
    image: np.ndarray, usable: np.ndarray, order: int, clip_sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """A polynomial of ``order`` in normalised position fitted to ``image`` where ``usable``,
    sigma-clipped so sources and residuals do not pull it; returns (model, coefficients)."""
    ny, nx = image.shape
    if order < 0 or usable.sum() < 10 * (order + 1) ** 2:
        return np.zeros_like(image, dtype=np.float64), np.zeros(0)
    step = max(1, int(np.sqrt(usable.sum() / 20000)))  # a subsample keeps the fit cheap
    yy, xx = np.mgrid[0:ny:step, 0:nx:step]
    keep = usable[::step, ::step]
    u, v = (xx[keep] - (nx - 1) / 2) / (nx / 2), (yy[keep] - (ny - 1) / 2) / (ny / 2)
    terms = polynomial_terms(u, v, order)
    values = image[::step, ::step][keep].astype(np.float64)
    good = np.ones(values.size, dtype=bool)
    coef = np.zeros(terms.shape[1])
    for _ in range(5):
        coef, *_ = np.linalg.lstsq(terms[good], values[good], rcond=None)
        resid = values - terms @ coef
        sigma = mad_std(resid[good])
        new = np.abs(resid) < clip_sigma * max(sigma, 1e-30)
        if np.array_equal(new, good):
            break
        good = new
    u_row = (np.arange(nx) - (nx - 1) / 2) / (nx / 2)
    v_col = (np.arange(ny) - (ny - 1) / 2) / (ny / 2)
    return polynomial_image(coef, order, u_row, v_col), coef


def kernel_candidates(
    sources: pd.DataFrame, *, min_snr: float = 10.0, max_snr: float = 500.0
) -> pd.DataFrame:
    """The calexp's sources fit for the kernel fit: point-like, reliable (unsaturated,
    unblended, off the edge), S/N between ``min_snr`` and ``max_snr`` (LSST's kernel
    candidates); the kernel fit rejects the variable ones. The rows of ``sources``."""
    snr = sources["psfFlux"] / sources["psfFluxErr"]
    bad = int(UNRELIABLE_SOURCE | SourceFlag.BLENDED)
    use = (
        (sources["extendedness"] < 0.5)
        & ((sources["flags"].astype(np.int64) & bad) == 0)
        & (snr > min_snr)
        & (snr < max_snr)
    )
    return sources[use]


def _match_psf_models(science: Exposure, template: Exposure, config: SubtractionConfig):
    """(plus, minus, convolved, psf) with kernels from the two PSF models."""
    assert science.psf is not None and template.psf is not None
    match: dict[str, Any] = dict(grid_spacing=config.grid_spacing, max_residual=config.max_residual)
    try:
        matched = psf_match_exposure(template, science.psf, **match)
        return science, matched, "template", science.psf
    except PsfMatchingError as err:
        # The template is not the sharper everywhere (or its PSF's shape cannot become
        # the science's): both go to a common model PSF a little wider than either.
        fwhm = config.common_psf_factor * max(_max_fwhm(science), _max_fwhm(template))
        common = model_psf(fwhm)
        log.info("template not sharper than the science (%s): both matched to %.2f px", err, fwhm)
        plus = psf_match_exposure(science, common, **match)
        minus = psf_match_exposure(template, common, **match)
        return plus, minus, "both", common


def _sigma_at_centre(exposure: Exposure) -> float:
    assert exposure.psf is not None
    ny, nx = exposure.shape
    return exposure.psf.fwhm_at((nx - 1) / 2.0, (ny - 1) / 2.0) / GAUSSIAN_FWHM_PER_SIGMA


def _match_alard_lupton(science, template, x, y, config: SubtractionConfig):
    """(plus, minus, convolved, psf, solution, phi): the sharper image convolved by a kernel
    fitted on the stamps at (x, y); phi is the decorrelation kernel (None when off)."""
    convolve_template = _sigma_at_centre(template) <= _sigma_at_centre(science)
    sharp, broad = (template, science) if convolve_template else (science, template)
    bad = sharp.mask_of("NO_DATA", "BAD", "SAT") | broad.mask_of("NO_DATA", "BAD", "SAT")
    solution = fit_kernel(
        sharp.image,
        broad.image,
        sharp.variance,
        broad.variance,
        bad,
        x,
        y,
        template_sigma=_sigma_at_centre(sharp),
        science_sigma=_sigma_at_centre(broad),
        config=config.alard_lupton,
    )
    kernels = solution.to_matching_kernels(sharp.shape, grid_spacing=config.grid_spacing)
    assert broad.psf is not None
    matched = convolve_exposure(sharp, kernels, broad.psf)
    matched.image -= solution.background(sharp.shape).astype(np.float32)
    ny, nx = science.shape
    phi = None
    if config.decorrelate:
        usable = ~bad
        phi = decorrelation_kernel(
            solution.kernel_at((nx - 1) / 2.0, (ny - 1) / 2.0),
            float(np.median(broad.variance[usable])),
            float(np.median(sharp.variance[usable])),
        )
    if convolve_template:
        return science, matched, "template", science.psf, solution, phi
    # The science convolved: a point source of the science now has the PSF K * P_science
    # (what the kernel made of it, whatever the template's PSF model says), and the
    # difference is in the template's photometric units until divided by K's sum.
    centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    scale = solution.kernel_sum_at(*centre)
    assert science.psf is not None and template.psf is not None
    size = min(max(science.psf.size, template.psf.size), science.psf.size + solution.size - 1)
    psf = _kernel_convolved_psf(science.psf, solution, science.shape, size)
    return _scaled(matched, 1 / scale), _scaled(template, 1 / scale), "science", psf, solution, phi


def _kernel_convolved_psf(
    psf: PsfModel, solution: AlardLuptonSolution, shape: tuple[int, int], size: int
) -> PsfModel:
    """The PSF K(x, y) * P(x, y) of an image convolved by the solution's kernel.

    Both vary as polynomials over the CCD, so a model of their summed order, fitted to
    the products on a grid, holds both variations.
    """
    order = psf.order + solution.spatial_order
    ny, nx = shape
    n_side = order + 3
    gx, gy = (
        g.ravel()
        for g in np.meshgrid(np.linspace(0, nx - 1, n_side), np.linspace(0, ny - 1, n_side))
    )
    kernels = np.stack(
        [
            convolved_psf(psf, solution.kernel_at(x, y), size).kernel_at(x, y)
            for x, y in zip(gx, gy, strict=True)
        ]
    )
    return fit_psf_model(gx, gy, kernels, order, shape)


def _scaled(exposure: Exposure, factor: float) -> Exposure:
    """A copy with the image times ``factor`` and the variance times its square."""
    image = (exposure.image * factor).astype(np.float32)
    return replace(
        exposure, image=image, variance=(exposure.variance * factor**2).astype(np.float32)
    )


def zogy_flux_ratio(
    science: Exposure, template: Exposure, x: np.ndarray, y: np.ndarray, min_stars: int = 3
) -> float:
    """The photometric scale science / template (ZOGY's F_n / F_r) from the kernel stars.

    Each image's PSF fluxes are measured with its own PSF model; the scale is the slope
    of a straight line through (template flux, science flux), fitted with the errors of
    both and 3-sigma clipping. The intercept takes up what a leftover background adds to
    every PSF flux alike (the background times the sum over the square of the PSF),
    which would bias a ratio of fluxes. 1.0 (the images' common calibration) with fewer
    than ``min_stars``.
    """
    from workflow_lib.objects.forced import fixed_psf_fluxes

    assert science.psf is not None and template.psf is not None
    bad = science.mask_of("NO_DATA", "BAD", "SAT") | template.mask_of("NO_DATA", "BAD", "SAT")
    measure: dict[str, Any] = dict(joint=False, max_masked_fraction=0.05)
    sci = fixed_psf_fluxes(science.image, science.variance, bad, science.psf, x, y, **measure)
    tmpl = fixed_psf_fluxes(template.image, template.variance, bad, template.psf, x, y, **measure)
    f_s, e_s = sci["psf_flux"].to_numpy(), sci["psf_flux_err"].to_numpy()
    f_t, e_t = tmpl["psf_flux"].to_numpy(), tmpl["psf_flux_err"].to_numpy()
    use = ~(sci["flag"].to_numpy() | tmpl["flag"].to_numpy()) & (f_t > 10 * e_t)
    slope = 1.0
    for _ in range(5):
        if use.sum() < max(min_stars, 3):
            return 1.0
        weight = 1.0 / (e_s[use] ** 2 + slope**2 * e_t[use] ** 2)
        design = np.column_stack([f_t[use], np.ones(use.sum())]) * np.sqrt(weight)[:, None]
        (slope, intercept), *_ = np.linalg.lstsq(design, f_s[use] * np.sqrt(weight), rcond=None)
        pull = (f_s - slope * f_t - intercept) / np.sqrt(e_s**2 + slope**2 * e_t**2)
        keep = use & (np.abs(pull) < 3.0 * max(float(mad_std(pull[use])), 1.0))
        if np.array_equal(keep, use):
            break
        use = keep
    return float(slope) if np.isfinite(slope) and slope > 0 else 1.0


def _subtract_zogy(
    science: Exposure, template: Exposure, kernel_sources: tuple[np.ndarray, np.ndarray] | None
) -> tuple[_RawDifference, float]:
    """ZOGY's difference with the PSFs at the CCD's centre, the template first brought to
    the science's photometric scale (fitted on the kernel stars); returns the scale too."""
    assert science.psf is not None and template.psf is not None
    ny, nx = science.shape
    centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    scale = 1.0 if kernel_sources is None else zogy_flux_ratio(science, template, *kernel_sources)
    template = _scaled(template, scale)
    assert template.psf is not None  # _scaled keeps the PSF
    mask, planes = _merge_masks(science, template)
    unusable = (mask & planes.bitmask("NO_DATA", "BAD")) != 0
    # Repaired defects and cosmic rays (BAD with INTRP) hold interpolated sky: masking them
    # would grow one bad pixel into a hole of the proper PSF's 99% radius (~25 px).
    if "INTRP" in planes.bits:
        unusable &= ~(
            ((mask & planes.bitmask("INTRP")) != 0) & ((mask & planes.bitmask("NO_DATA")) == 0)
        )
    result = zogy_difference(
        science.image.astype(np.float64),
        template.image.astype(np.float64),
        science.variance.astype(np.float64),
        template.variance.astype(np.float64),
        science.psf.kernel_at(*centre),
        template.psf.kernel_at(*centre),
        mask=unusable,
    )
    grown = result.mask & ~unusable
    mask = np.where(grown, mask | np.int32(planes.bitmask("NO_DATA")), mask).astype(MASK_DTYPE)
    raw = _RawDifference(
        result.difference, result.variance, mask, planes, PsfModel.constant(result.psf)
    )
    return raw, scale


def subtract_images(
    science: Exposure,
    template: Exposure,
    config: SubtractionConfig | None = None,
    kernel_sources: tuple[np.ndarray, np.ndarray] | None = None,
) -> Subtraction:
    """Science minus template, PSF-matched (see the module notes).

    ``config.method`` "alard_lupton" fits the kernel on stamps at
    ``kernel_sources`` (x, y of point-like, unsaturated stars); with too few
    stamps (:class:`KernelFitError`) it falls back to the PSF models, and the
    result says so (``method``). Raises :class:`PsfMatchingError` when not even
    the PSF models can be matched: the caller records the CCD.
    """
    config = config or SubtractionConfig()
    if science.psf is None or template.psf is None:
        raise ValueError("subtraction needs the PSF models of the science and the template")
    method, solution, phi = "psf_models", None, None
    if config.method == "zogy":
        raw, scale = _subtract_zogy(science, template, kernel_sources)
        result = _finish(science, raw, config, "both", "zogy")
        result.difference.metadata["DIFFFSCL"] = (scale, "ZOGY: template scaled by this")
        return result
    if config.method == "alard_lupton" and kernel_sources is not None:
        try:
            plus, minus, convolved, psf, solution, phi = _match_alard_lupton(
                science, template, *kernel_sources, config
            )
            method = "alard_lupton"
        except KernelFitError as err:
            log.warning("Alard-Lupton kernel fit failed (%s): kernel from the PSF models", err)
    if solution is None:
        plus, minus, convolved, psf = _match_psf_models(science, template, config)
    mask, planes = _merge_masks(plus, minus)
    unusable = (mask & planes.bitmask("NO_DATA", "BAD")) != 0
    image = np.where(unusable, 0.0, plus.image.astype(np.float64) - minus.image)
    variance = np.where(unusable, 0.0, plus.variance.astype(np.float64) + minus.variance)
    raw = _RawDifference(image, variance, mask, planes, psf)
    return _finish(science, raw, config, convolved, method, solution, phi)


def _finish(
    science: Exposure,
    raw: _RawDifference,
    config: SubtractionConfig,
    convolved: str,
    method: str,
    solution: AlardLuptonSolution | None = None,
    phi: np.ndarray | None = None,
) -> Subtraction:
    """Decorrelation, differential background, variance scaling and the header cards."""
    image, variance, mask, planes, psf = raw
    unusable = (mask & planes.bitmask("NO_DATA", "BAD")) != 0
    image = np.where(unusable, 0.0, image)
    variance = np.where(unusable, 0.0, variance)
    if phi is not None:
        image, variance = decorrelate(image, variance, phi)
        image = np.where(unusable, 0.0, image)
        psf = convolved_psf(psf, phi)
    quiet = ~unusable
    if "DETECTED" in planes.bits:
        quiet &= (mask & planes.bitmask("DETECTED")) == 0
    background, coef = fit_background(
        image, quiet, config.background_order, config.background_clip_sigma
    )
    image = np.where(unusable, 0.0, image - background)
    # doScaleVariance: the variance plane made to match the pixels' own variance.
    scale = variance_scale(image, variance, unusable) if config.scale_variance else 1.0
    metadata = science.metadata.copy()
    metadata["DIFFCONV"] = (convolved, "image convolved to match the other's PSF")
    metadata["DIFFMETH"] = (method, "alard_lupton, psf_models or zogy")
    metadata["DIFFDECO"] = (phi is not None, "decorrelation afterburner applied")
    metadata["DIFFVSCL"] = (float(scale), "variance plane scaled by this")
    if solution is not None:
        metadata["DIFFNSTM"] = (int(solution.n_stamps), "kernel stamps used")
        metadata["DIFFKORD"] = (int(solution.spatial_order), "kernel spatial order")
    difference = Exposure(
        image,
        variance * scale,
        mask,
        wcs=science.wcs,
        psf=psf,
        photo_calib=science.photo_calib,
        metadata=metadata,
        mask_planes=planes,
    )
    return Subtraction(
        difference=difference,
        psf=psf,
        convolved=convolved,
        background=coef,
        method=method,
        n_kernel_stamps=0 if solution is None else int(solution.n_stamps),
    )
