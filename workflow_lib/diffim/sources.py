"""DIASources: detection and measurement on a difference image.

LSST's ``detectAndMeasure`` of ``imageDifference``: the difference image is
searched for positive *and* negative excursions above ``threshold_sigma``
with the difference's PSF as matched filter (``detection.detect_sources``,
run on D and on -D), a positive and a negative detection side by side are
one dipole (a mis-registered or mis-subtracted static source, or a moving
one), and every DIASource gets a PSF flux on the difference at its position
(``forced.fixed_psf_fluxes``) and the artifact bits of its central pixels.
Positions are the windowed centroids of the detection (the flux-weighted
midpoint of the two lobes for a dipole). Pixel units throughout; the step
converts positions to the sky and fluxes to nJy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.stats import mad_std
from scipy.spatial import cKDTree

from workflow_lib.core.convolution import fft_convolve
from workflow_lib.core.exposure import MaskPlanes
from workflow_lib.core.flags import DiaSourceFlag
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.diffim.template import TEMPLATE_SATURATED_PLANE
from workflow_lib.objects.forced import fixed_psf_fluxes
from workflow_lib.single_frame.background import dilate_mask, subsample_stride
from workflow_lib.single_frame.detection import detect_sources

# Mask planes that keep a pixel out of detection and the PSF fit.
UNUSABLE_PLANES = ("NO_DATA", "BAD")


@dataclass(frozen=True)
class DiaDetectionConfig:
    """How DIASources are found (LSST's ``detection.thresholdValue`` = 5.0)."""

    threshold_sigma: float = 5.0
    # Pixels above the threshold on the PSF-filtered image. One, as LSST's minPixels:
    # the matched filter's peak is the detection statistic; more pixels would ask a
    # faint source for a peak above it (3 pixels: up to 5.3-5.8 sigma at a 5-sigma
    # threshold for a FWHM of 5-3 pixels).
    min_area: int = 1
    # The noise of the filtered image is measured away from the calexp's sources.
    noise_avoid_fwhm: float = 3.0
    # A positive and a negative detection closer than this many FWHM whose weaker lobe
    # holds at least ``dipole_min_lobe_ratio`` of the stronger's flux are one dipole.
    dipole_max_separation_fwhm: float = 2.0
    dipole_min_lobe_ratio: float = 0.2
    fit_radius_fwhm: float = 2.0
    # The subtraction's residual at static sources (see residual_ratio): measured within
    # this many FWHM of bright sources, from at least residual_min_stars of them;
    # a CCD-visit whose ratio exceeds max_residual_ratio fails the quality gate.
    residual_radius_fwhm: float = 2.0
    residual_min_stars: int = 5
    max_residual_ratio: float = 0.1
    # A DIASource at a static source must exceed this many times the typical residual
    # there (the ratio is the median of each star's largest lobe, not a Gaussian sigma).
    residual_margin: float = 2.0


def _detections(difference, variance, bad, kernel, config: DiaDetectionConfig, fwhm: float):
    """Windowed positions and isophotal fluxes of the positive and the negative detections."""
    out = []
    for sign in (1.0, -1.0):
        det = detect_sources(
            sign * difference,
            variance,
            bad,
            threshold_sigma=config.threshold_sigma,
            min_area=config.min_area,
            fwhm=fwhm,
            kernel=kernel,
        )
        t = det.table
        out.append(
            pd.DataFrame(
                {
                    "x": t["x_win"].to_numpy(),
                    "y": t["y_win"].to_numpy(),
                    "lobe_flux": t["flux"].to_numpy(),
                    "sign": sign,
                }
            )
        )
    return out


def pair_dipoles(
    positive: pd.DataFrame, negative: pd.DataFrame, max_separation: float, min_lobe_ratio: float
) -> list[tuple[int, int]]:
    """(positive row, negative row) pairs that form dipoles: closest pairs first, each once."""
    if not len(positive) or not len(negative):
        return []
    tree = cKDTree(negative[["x", "y"]].to_numpy())
    dist, j = tree.query(
        positive[["x", "y"]].to_numpy(),
        k=min(3, len(negative)),
        distance_upper_bound=max_separation,
    )
    dist, j = np.atleast_2d(dist.T).T, np.atleast_2d(j.T).T
    candidates = [
        (float(dist[i, k]), i, int(j[i, k]))
        for i in range(len(positive))
        for k in range(dist.shape[1])
        if np.isfinite(dist[i, k])
    ]
    pos_flux = np.abs(positive["lobe_flux"].to_numpy())
    neg_flux = np.abs(negative["lobe_flux"].to_numpy())
    pairs, taken_p, taken_n = [], set(), set()
    for _, i, k in sorted(candidates):
        if i in taken_p or k in taken_n:
            continue
        weak, strong = sorted((pos_flux[i], neg_flux[k]))
        if strong > 0 and weak >= min_lobe_ratio * strong:
            pairs.append((i, k))
            taken_p.add(i)
            taken_n.add(k)
    return pairs


def _merge_lobes(positive: pd.DataFrame, negative: pd.DataFrame, pairs) -> pd.DataFrame:
    """One row per DIASource: unpaired lobes as they are, each dipole at its lobes' midpoint."""
    paired_p = {i for i, _ in pairs}
    paired_n = {k for _, k in pairs}
    rows = [positive.drop(index=list(paired_p)), negative.drop(index=list(paired_n))]
    if pairs:
        p = positive.loc[[i for i, _ in pairs]].reset_index(drop=True)
        n = negative.loc[[k for _, k in pairs]].reset_index(drop=True)
        wp, wn = np.abs(p["lobe_flux"]), np.abs(n["lobe_flux"])
        rows.append(
            pd.DataFrame(
                {
                    "x": (wp * p["x"] + wn * n["x"]) / (wp + wn),
                    "y": (wp * p["y"] + wn * n["y"]) / (wp + wn),
                    "lobe_flux": p["lobe_flux"] - n["lobe_flux"].abs(),
                    "sign": 0.0,
                }
            )
        )
    merged = pd.concat([r for r in rows if len(r)] or rows[:1], ignore_index=True)
    # A stable order independent of sep's: by position.
    return merged.sort_values(["y", "x"], kind="stable").reset_index(drop=True)


def _bits_near(mask, planes: MaskPlanes, x, y, names, half: int = 1) -> np.ndarray:
    """Whether any of ``names`` is set within ``half`` pixels (a square) of each (x, y)."""
    present = [n for n in names if n in planes.bits]
    if not present or not len(x):
        return np.zeros(len(x), dtype=bool)
    bits = planes.bitmask(*present)
    ny, nx = mask.shape
    ix = np.clip(np.floor(np.asarray(x) + 0.5).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.floor(np.asarray(y) + 0.5).astype(np.int64), 0, ny - 1)
    hit = np.zeros(len(x), dtype=bool)
    for dy in range(-half, half + 1):
        for dx in range(-half, half + 1):
            hit |= (mask[np.clip(iy + dy, 0, ny - 1), np.clip(ix + dx, 0, nx - 1)] & bits) != 0
    return hit


def psf_flux_map(difference: np.ndarray, bad: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The PSF flux of a point source centred on each pixel (the matched filter over the
    PSF's norm), bad pixels taken as zero."""
    k = kernel / kernel.sum()
    data = np.where(bad, 0.0, difference)
    return fft_convolve(data, k[::-1, ::-1], mode="same") / float((k**2).sum())


def residual_ratio(
    flux_map: np.ndarray,
    bad: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    radius: float,
    *,
    min_stars: int = 5,
) -> tuple[float, int]:
    """How much of a static source's flux the subtraction leaves, and from how many stars.

    For each bright source at (x, y) of calexp PSF flux ``flux`` (no bad
    pixel within ``radius``): the largest |PSF flux| of the difference within
    ``radius`` over ``flux`` (a residual's lobes, not their sum, are what
    detection finds); the median of these ratios. NaN with fewer than
    ``min_stars`` stars. It is the subtraction's quality figure (LSST's
    kernel-source residual check) and its error floor at static sources.
    """
    ny, nx = flux_map.shape
    r = int(np.ceil(radius))
    ratios = []
    for xi, yi, fi in zip(np.asarray(x), np.asarray(y), np.asarray(flux), strict=True):
        ix, iy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        if not (fi > 0 and r <= ix < nx - r and r <= iy < ny - r):
            continue
        box = (slice(iy - r, iy + r + 1), slice(ix - r, ix + r + 1))
        if bad[box].any():
            continue
        ratios.append(float(np.abs(flux_map[box]).max()) / float(fi))
    if len(ratios) < min_stars:
        return float("nan"), len(ratios)
    return float(np.median(ratios)), len(ratios)


def brightest_within(
    static_x: np.ndarray,
    static_y: np.ndarray,
    static_flux: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    radius: float,
) -> np.ndarray:
    """Flux of the brightest static source within ``radius`` of each (x, y) (0: none;
    negative and NaN fluxes count as 0)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.size)
    if not x.size or not len(static_x):
        return out
    positive = np.clip(np.nan_to_num(np.asarray(static_flux, dtype=np.float64)), 0.0, None)
    tree = cKDTree(np.c_[static_x, static_y])
    for i, near in enumerate(tree.query_ball_point(np.c_[x, y], radius)):
        if near:
            out[i] = positive[near].max()
    return out


def static_residuals(
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    flux_err: np.ndarray,
    static_x: np.ndarray,
    static_y: np.ndarray,
    static_flux: np.ndarray,
    ratio: float,
    radius: float,
    threshold: float,
    margin: float,
) -> np.ndarray:
    """DIASources not significant once the subtraction's error at the static sources
    beneath is counted: |flux| < sqrt((threshold err)^2 + (margin ratio F)^2), F the
    brightest calexp source within ``radius`` (0 where none; a NaN ratio flags nothing)."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(ratio) or not x.size or not len(static_x):
        return np.zeros(x.size, dtype=bool)
    brightest = brightest_within(static_x, static_y, static_flux, x, y, radius)
    noise = threshold * np.asarray(flux_err, dtype=np.float64)
    floor = np.sqrt(noise**2 + (margin * ratio * brightest) ** 2)
    with np.errstate(invalid="ignore"):
        return np.abs(np.asarray(flux, dtype=np.float64)) < floor


def blank_sky_pulls(
    difference: np.ndarray,
    variance: np.ndarray,
    bad: np.ndarray,
    psf: PsfModel,
    avoid_x: np.ndarray,
    avoid_y: np.ndarray,
    *,
    avoid_radius: float,
    n_positions: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """PSF flux / error at random blank places of a difference image: the noise check.

    Positions are drawn uniformly (seeded), kept where no source (``avoid_x``,
    ``avoid_y``: the calexp's sources and the DIASources) lies within
    ``avoid_radius`` pixels and the fit stamp has no bad pixel; their PSF fluxes
    (fitted alone, with the variance plane's errors) should scatter as N(0, 1)
    when the variance plane is right for PSF-weighted sums.
    """
    ny, nx = difference.shape
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, nx - 1, n_positions)
    y = rng.uniform(0, ny - 1, n_positions)
    if len(avoid_x):
        d, _ = cKDTree(np.c_[avoid_x, avoid_y]).query(np.c_[x, y])
        x, y = x[d > avoid_radius], y[d > avoid_radius]
    if not x.size:
        return np.zeros(0)
    fit = fixed_psf_fluxes(difference, variance, bad, psf, x, y, joint=False)
    usable = ~(fit["flag"] | fit["flag_edge"] | fit["flag_masked"]).to_numpy(dtype=bool)
    usable &= fit["masked_fraction"].to_numpy() == 0
    flux = fit["psf_flux"].to_numpy()[usable]
    err = fit["psf_flux_err"].to_numpy()[usable]
    return flux / err


def psf_noise_scale(
    difference: np.ndarray,
    variance: np.ndarray,
    bad: np.ndarray,
    kernel: np.ndarray,
    avoid: np.ndarray | None = None,
) -> float:
    """Ratio of the measured to the predicted noise of the PSF-filtered difference image.

    A convolved image's noise is correlated: its variance plane is right per
    pixel but a PSF-weighted sum (the matched filter of detection, and a PSF
    flux) has more noise than white noise of that variance would. The ratio is
    measured on the filtered image itself (robust sigma) and is 1 for white
    noise; scaling the variance plane by its square makes detection thresholds
    and PSF-flux errors right. ``avoid`` (bool) keeps pixels out of the
    measurement: the places of static sources, whose subtraction residuals would
    otherwise widen the distribution by a few per cent, raising every threshold
    (ignored where it would leave less than a fifth of the usable pixels).
    """
    k = kernel / kernel.sum()
    data = np.where(bad, 0.0, difference)
    var = np.where(bad, 0.0, variance)
    filtered = fft_convolve(data, k[::-1, ::-1], mode="same", single=True)
    smoothed = fft_convolve(var, (k**2)[::-1, ::-1], mode="same", single=True)
    predicted = np.sqrt(np.maximum(smoothed, 0.0))
    h = k.shape[0] // 2
    use = ~dilate_mask(bad, radius=h) & (predicted > 0)
    use[:h], use[-h:], use[:, :h], use[:, -h:] = False, False, False, False
    if avoid is not None:
        blank = use & ~avoid
        if blank.sum() >= 0.2 * use.sum():
            use = blank
    if use.sum() < 100:
        return 1.0
    # About a million pixels are enough for the robust sigma (as in variance_scale).
    stride = subsample_stride(use.size)
    use, filtered, predicted = (a[::stride, ::stride] for a in (use, filtered, predicted))
    return float(max(mad_std(filtered[use] / predicted[use]), 1e-3))


def source_neighbourhood(
    shape: tuple[int, int], x: np.ndarray, y: np.ndarray, radius: float
) -> np.ndarray:
    """Pixels within ``radius`` (a square's half-side) of any of the positions (x, y)."""
    near = np.zeros(shape, dtype=bool)
    ix = np.round(np.asarray(x, dtype=np.float64)).astype(np.int64)
    iy = np.round(np.asarray(y, dtype=np.float64)).astype(np.int64)
    inside = (ix >= 0) & (ix < shape[1]) & (iy >= 0) & (iy < shape[0])
    near[iy[inside], ix[inside]] = True
    return dilate_mask(near, radius=radius)


def detect_dia_sources(
    difference: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    mask_planes: MaskPlanes,
    psf: PsfModel,
    config: DiaDetectionConfig | None = None,
    static_sources: pd.DataFrame | None = None,
    reference_stars: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """DIASources of a difference image: x, y (0-based), psf_flux, psf_flux_err, snr,
    is_dipole and flags (:class:`DiaSourceFlag`), in image units, ordered by position.

    The variance plane is first scaled so that the PSF-filtered image's noise
    is what it predicts (:func:`psf_noise_scale`; ``attrs["noise_scale"]``).
    ``reference_stars`` (x, y, flux: the calexp's bright reliable sources) measure
    the subtraction's residual ratio (:func:`residual_ratio`;
    ``attrs["residual_ratio"]``, ``attrs["n_residual_stars"]``); DIASources
    within ``residual_margin`` times that residual of the flux of the
    ``static_sources`` beneath (x, y, flux: every calexp source) are flagged
    STATIC_RESIDUAL, and every DIASource BAD_SUBTRACTION
    when the ratio exceeds ``config.max_residual_ratio``
    (``attrs["bad_subtraction"]``).
    """
    config = config or DiaDetectionConfig()
    bad = (mask & mask_planes.bitmask(*UNUSABLE_PLANES)) != 0
    cx, cy = psf.x_center, psf.y_center
    kernel = psf.kernel_at(cx, cy)
    fwhm = psf.fwhm_at(cx, cy)
    avoid = None
    if static_sources is not None and len(static_sources):
        radius = config.noise_avoid_fwhm * fwhm
        avoid = source_neighbourhood(
            difference.shape, static_sources["x"], static_sources["y"], radius
        )
    noise_scale = psf_noise_scale(difference, variance, bad, kernel, avoid)
    variance = variance * noise_scale**2
    positive, negative = _detections(difference, variance, bad, kernel, config, fwhm)
    pairs = pair_dipoles(
        positive, negative, config.dipole_max_separation_fwhm * fwhm, config.dipole_min_lobe_ratio
    )
    found = _merge_lobes(positive, negative, pairs)
    x, y = found["x"].to_numpy(), found["y"].to_numpy()
    fit = fixed_psf_fluxes(
        difference, variance, bad, psf, x, y, fit_radius_fwhm=config.fit_radius_fwhm
    )
    flags = np.zeros(len(found), dtype=np.int64)

    def flag(where, bit: DiaSourceFlag) -> None:
        flags[np.asarray(where, dtype=bool)] |= int(bit)

    flag(fit["flag"], DiaSourceFlag.PSF_FLUX_FAILED)
    flag(fit["flag_edge"], DiaSourceFlag.EDGE)
    flag(fit["flag_masked"], DiaSourceFlag.MASKED)
    flag(fit["center_bad"], DiaSourceFlag.NO_DATA_CENTER)
    flag(
        _bits_near(mask, mask_planes, x, y, ("SAT", TEMPLATE_SATURATED_PLANE)),
        DiaSourceFlag.SATURATED_CENTER,
    )
    flag(_bits_near(mask, mask_planes, x, y, ("CR",)), DiaSourceFlag.CR_CENTER)
    flag(_bits_near(mask, mask_planes, x, y, ("INTRP",)), DiaSourceFlag.INTERPOLATED_CENTER)
    # Within a FWHM of NO_DATA: the template's (or the calexp's) edge.
    near_edge = _bits_near(mask, mask_planes, x, y, ("NO_DATA",), half=max(int(np.ceil(fwhm)), 2))
    flag(near_edge, DiaSourceFlag.TEMPLATE_EDGE)
    ratio, n_stars = float("nan"), 0
    radius = config.residual_radius_fwhm * fwhm
    if reference_stars is not None and len(reference_stars):
        flux_map = psf_flux_map(difference, bad, kernel)
        ratio, n_stars = residual_ratio(
            flux_map,
            bad,
            reference_stars["x"],
            reference_stars["y"],
            reference_stars["flux"],
            radius,
            min_stars=config.residual_min_stars,
        )
    if static_sources is not None:
        flag(
            static_residuals(
                x,
                y,
                fit["psf_flux"],
                fit["psf_flux_err"],
                static_sources["x"],
                static_sources["y"],
                static_sources["flux"],
                ratio,
                radius,
                config.threshold_sigma,
                config.residual_margin,
            ),
            DiaSourceFlag.STATIC_RESIDUAL,
        )
    bad_subtraction = bool(np.isfinite(ratio) and ratio > config.max_residual_ratio)
    flag(np.full(len(found), bad_subtraction), DiaSourceFlag.BAD_SUBTRACTION)
    flag(found["sign"].to_numpy() < 0, DiaSourceFlag.NEGATIVE)
    is_dipole = found["sign"].to_numpy() == 0
    flag(is_dipole, DiaSourceFlag.DIPOLE)
    flux = fit["psf_flux"].to_numpy(dtype=np.float64)
    err = fit["psf_flux_err"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(err > 0, flux / err, np.nan)
    table = pd.DataFrame(
        {
            "x": x,
            "y": y,
            "psf_flux": flux,
            "psf_flux_err": err,
            "snr": snr,
            "is_dipole": is_dipole,
            "flags": flags,
        }
    )
    table.attrs.update(
        noise_scale=noise_scale,
        residual_ratio=ratio,
        n_residual_stars=n_stars,
        bad_subtraction=bad_subtraction,
    )
    return table
