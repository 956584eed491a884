"""PSF matching of an exposure to a model PSF (the "psfMatchedWarp" flavour).

LSST's ``WarpAndPsfMatchTask`` convolves each calexp, in its own pixel frame and
before warping, with a spatially varying kernel that turns its PSF into a
configured model PSF (``modelPsf``: a double Gaussian from
``GaussianPsfFactory``); the template recipe of the DC2 Cookbook coadds such
warps. Here:

* :func:`model_psf` builds the double Gaussian (core + a wing ``wing_fwhm_factor``
  wider whose peak is ``wing_amplitude`` of the core's, LSST's defaults 2.5 and
  0.1). ``fwhm_pixels`` is the FWHM of the whole profile (the number a
  ``max_psf_fwhm`` cut is compared with); ``core_fwhm=True`` gives LSST's
  meaning (the FWHM of the core Gaussian, the profile being ~7% wider).
* At the nodes of a coarse grid (``grid_spacing`` pixels) the matching kernel
  K with PSF * K = model is solved in Fourier space from the pixelized PSF
  model (Wiener-regularised division), cropped to ``kernel_size`` and
  normalised to unit sum (flux conserved). Each node is checked: the model
  must be at least as wide as the PSF (FWHM from the area above half
  maximum), K must not amplify any spatial frequency by more than
  ``max_gain`` (1.5: an elongated PSF wider than the model along one axis
  would need deconvolution; Moffat-like wings wider than the model's need
  gains up to ~1.3) and PSF * K must reproduce the model to ``max_residual``
  (relative L2); otherwise :class:`PsfMatchingError` says where and why.
  Matching never deconvolves: such a CCD is refused, not returned half-matched.
* The image is convolved cell by cell (cells between nodes, FFTs on each
  cell with a margin) with the kernels of the cell's four corner nodes, and
  the four results blended bilinearly: the kernel varies smoothly, is exact
  at the nodes and sums to one everywhere. The variance is convolved with K^2
  the same way (K^2 blended bilinearly, a second-order approximation of the
  square of the blended kernel).
* Mask bits are grown by the kernel's effective radius (the box holding 95%
  of sum |K| at every node: K is peaked with a low, broad pedestal that would
  otherwise grow every cosmic ray by the whole kernel); the BAD, CR and INTRP
  bits of interpolated pixels (repaired defects and cosmic rays, which hold
  sky) only by the 50% radius. Missing data biases
  fluxes, so NO_DATA grows by the 99% radius and the border strip of that
  width (where the convolution ran off the image) is NO_DATA too; NO_DATA
  pixels have image and variance 0.

The result's PSF is ``model``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import fft
from scipy.optimize import brentq

from workflow_lib.core.convolution import fft_convolve
from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes
from workflow_lib.core.psf_model import PsfModel, fwhm_of_image
from workflow_lib.single_frame.measure import without_aperture_correction

log = logging.getLogger(__name__)

GAUSSIAN_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


class PsfMatchingError(ValueError):
    """The exposure cannot be matched to the model PSF (model too narrow, poor match)."""


def _double_gaussian_half_max_radius(wing_fwhm_factor: float, wing_amplitude: float) -> float:
    """Radius (in units of the core sigma) where the double Gaussian falls to half its peak."""
    s2 = wing_fwhm_factor

    def profile(r: float) -> float:
        core = np.exp(-0.5 * r * r) + wing_amplitude * np.exp(-0.5 * r * r / (s2 * s2))
        return core / (1.0 + wing_amplitude) - 0.5

    return float(brentq(profile, 0.0, 10.0 * max(s2, 1.0)))


def model_psf(
    fwhm_pixels: float,
    size: int | None = None,
    *,
    wing_fwhm_factor: float = 2.5,
    wing_amplitude: float = 0.1,
    core_fwhm: bool = False,
) -> PsfModel:
    """LSST-like model PSF: a double Gaussian sampled at pixel centres, constant over the image.

    ``fwhm_pixels``: FWHM of the whole profile (or of the core Gaussian when
    ``core_fwhm``). ``size``: odd kernel size; by default it spans +-3.5
    sigma of the wing (at least 5 pixels).
    """
    if not np.isfinite(fwhm_pixels) or fwhm_pixels <= 0:
        raise ValueError(f"model PSF FWHM must be positive, got {fwhm_pixels}")
    if wing_amplitude < 0 or wing_fwhm_factor <= 0:
        raise ValueError("wing_amplitude must be >= 0 and wing_fwhm_factor > 0")
    if core_fwhm:
        sigma1 = fwhm_pixels / GAUSSIAN_FWHM_PER_SIGMA
    else:
        sigma1 = (
            0.5 * fwhm_pixels / _double_gaussian_half_max_radius(wing_fwhm_factor, wing_amplitude)
        )
    sigma2 = wing_fwhm_factor * sigma1
    if size is None:
        size = 2 * int(np.ceil(3.5 * max(sigma1, sigma2))) + 1
    size = int(size)
    if size < 5 or size % 2 == 0:
        raise ValueError(f"model PSF size must be odd and >= 5, got {size}")
    r = np.arange(size) - size // 2
    r2 = r[None, :] ** 2 + r[:, None] ** 2
    kernel = np.exp(-0.5 * r2 / sigma1**2) + wing_amplitude * np.exp(-0.5 * r2 / sigma2**2)
    return PsfModel.constant(kernel)


# --------------------------------------------------------------------------
# Matching kernels
# --------------------------------------------------------------------------
def _core_fwhm(kernel: np.ndarray) -> float:
    """FWHM (area above half maximum) measured on the kernel's core only (fast)."""
    k = np.asarray(kernel, dtype=np.float64)
    c = k.shape[0] // 2
    above = np.count_nonzero(k >= 0.5 * k.max())
    half = min(c, int(np.ceil(1.5 * np.sqrt(above / np.pi))) + 3)
    return fwhm_of_image(k[c - half : c + half + 1, c - half : c + half + 1])


def _centred(kernel: np.ndarray, n: int) -> np.ndarray:
    """``kernel`` (odd size) embedded in an n x n array with its centre at index (0, 0)."""
    out = np.zeros((n, n))
    h = kernel.shape[0] // 2
    out[: kernel.shape[0], : kernel.shape[1]] = kernel
    return np.roll(out, (-h, -h), axis=(0, 1))


def matching_kernel(
    psf_kernel: np.ndarray,
    model_kernel: np.ndarray,
    kernel_size: int,
    *,
    regularization: float = 1e-6,
) -> tuple[np.ndarray, float]:
    """Kernel K (kernel_size^2, sum 1) with psf * K ~ model; and the relative L2 residual.

    Wiener-regularised Fourier division on a grid large enough for no
    wrap-around, cropped to ``kernel_size`` and renormalised; the residual
    ||psf * K - model|| / ||model|| is measured after the crop.
    """
    p = np.asarray(psf_kernel, dtype=np.float64)
    m = np.asarray(model_kernel, dtype=np.float64)
    p = p / p.sum()
    m = m / m.sum()
    n = fft.next_fast_len(2 * max(p.shape[0], m.shape[0], kernel_size) + 1)
    pf = fft.rfft2(_centred(p, n))
    mf = fft.rfft2(_centred(m, n))
    power = (pf * pf.conj()).real
    kf = mf * pf.conj() / (power + regularization * power.max())
    full = np.roll(fft.irfft2(kf, s=(n, n)), (kernel_size // 2,) * 2, axis=(0, 1))
    kernel = full[:kernel_size, :kernel_size]
    kernel = kernel / kernel.sum()
    conv = fft_convolve(p, kernel, mode="full")
    size = max(conv.shape[0], m.shape[0])
    a = np.zeros((size, size))
    b = np.zeros((size, size))
    oa, ob = (size - conv.shape[0]) // 2, (size - m.shape[0]) // 2
    a[oa : oa + conv.shape[0], oa : oa + conv.shape[0]] = conv
    b[ob : ob + m.shape[0], ob : ob + m.shape[0]] = m
    residual = float(np.sqrt(((a - b) ** 2).sum() / (b**2).sum()))
    return kernel, residual


def frequency_gain(kernel: np.ndarray) -> float:
    """Largest factor by which convolving with ``kernel`` amplifies a spatial frequency.

    1 for any smoothing kernel with non-negative Fourier transform (unit sum);
    above 1 the kernel deconvolves along some direction.
    """
    n = fft.next_fast_len(4 * kernel.shape[0])
    return float(np.abs(fft.rfft2(kernel, s=(n, n))).max())


def _effective_radius(kernel: np.ndarray, fraction: float = 0.99) -> int:
    """Smallest box half-size holding ``fraction`` of sum |kernel|."""
    k = np.abs(kernel)
    c = k.shape[0] // 2
    total = k.sum()
    for r in range(c + 1):
        if k[c - r : c + r + 1, c - r : c + r + 1].sum() >= fraction * total:
            return r
    return c


@dataclass(frozen=True)
class MatchingKernels:
    """Matching kernels at the nodes xs x ys of the exposure's pixel grid."""

    xs: np.ndarray
    ys: np.ndarray
    kernels: np.ndarray  # (len(ys), len(xs), size, size)
    residuals: np.ndarray  # (len(ys), len(xs))
    gains: np.ndarray  # (len(ys), len(xs))
    psf_fwhm: np.ndarray  # (len(ys), len(xs))
    model_fwhm: np.ndarray
    radius: int  # box half-size holding 95% of sum |K| (mask growth)
    edge_radius: int  # ... 99% (NO_DATA growth and the border strip)
    core_radius: int = 0  # ... 50% (growth of repaired pixels' bits)


def _node_positions(n: int, spacing: float) -> np.ndarray:
    cells = max(1, round((n - 1) / spacing))
    return np.linspace(0.0, n - 1.0, cells + 1)


def fit_matching_kernels(
    psf: PsfModel,
    model: PsfModel,
    shape: tuple[int, int],
    *,
    grid_spacing: float = 512.0,
    kernel_size: int | None = None,
    regularization: float = 1e-6,
    max_residual: float = 0.02,
    fwhm_tolerance: float = 0.0,
    max_gain: float = 1.5,
) -> MatchingKernels:
    """Matching kernels at grid nodes, refusing (PsfMatchingError) any node that can't match."""
    ny, nx = shape
    size = model.size if kernel_size is None else int(kernel_size)
    if size % 2 == 0 or size < 3:
        raise ValueError(f"matching kernel size must be odd and >= 3, got {size}")
    xs, ys = _node_positions(nx, grid_spacing), _node_positions(ny, grid_spacing)
    kernels = np.empty((ys.size, xs.size, size, size))
    residuals = np.empty((ys.size, xs.size))
    gains = np.empty((ys.size, xs.size))
    psf_fwhm = np.empty((ys.size, xs.size))
    model_fwhm = np.empty((ys.size, xs.size))
    # A constant model: its kernel and FWHM once, else None.
    m_fixed: np.ndarray | None = None
    fm_fixed: float | None = None
    if model.order == 0:
        m_fixed = model.kernel_at(0.0, 0.0)
        fm_fixed = _core_fwhm(m_fixed)
    radius = edge_radius = core_radius = 0
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            p = psf.kernel_at(float(x), float(y))
            m = m_fixed if m_fixed is not None else model.kernel_at(float(x), float(y))
            fp = _core_fwhm(p)
            fm = fm_fixed if fm_fixed is not None else _core_fwhm(m)
            psf_fwhm[j, i], model_fwhm[j, i] = fp, fm
            if fp > fm * (1.0 + fwhm_tolerance):
                raise PsfMatchingError(
                    f"model PSF (FWHM {fm:.3f} px) is narrower than the exposure's PSF "
                    f"(FWHM {fp:.3f} px at x={x:.0f}, y={y:.0f}): matching would deconvolve"
                )
            k, res = matching_kernel(p, m, size, regularization=regularization)
            if not np.isfinite(res) or res > max_residual:
                raise PsfMatchingError(
                    f"PSF cannot be matched to the model at x={x:.0f}, y={y:.0f}: relative "
                    f"residual {res:.3f} > {max_residual} (PSF FWHM {fp:.3f} px, model "
                    f"{fm:.3f} px; an elongated PSF wider than the model along one axis?)"
                )
            gain = frequency_gain(k)
            if gain > max_gain:
                raise PsfMatchingError(
                    f"matching kernel at x={x:.0f}, y={y:.0f} amplifies spatial frequencies by "
                    f"{gain:.2f} (> {max_gain}): the exposure's PSF is wider than the model "
                    f"along some direction (FWHM {fp:.3f} px vs model {fm:.3f} px; elongated?)"
                )
            kernels[j, i] = k
            residuals[j, i] = res
            gains[j, i] = gain
            radius = max(radius, _effective_radius(k, 0.95))
            edge_radius = max(edge_radius, _effective_radius(k, 0.99))
            core_radius = max(core_radius, _effective_radius(k, 0.5))
    return MatchingKernels(
        xs, ys, kernels, residuals, gains, psf_fwhm, model_fwhm, radius, edge_radius, core_radius
    )


# --------------------------------------------------------------------------
# Spatially varying convolution
# --------------------------------------------------------------------------
def _cell_bounds(nodes: np.ndarray, n: int) -> np.ndarray:
    inner = np.rint(nodes[1:-1]).astype(int)
    return np.concatenate([[0], inner, [n]])


def convolve_varying(
    image: np.ndarray, variance: np.ndarray, kernels: MatchingKernels
) -> tuple[np.ndarray, np.ndarray]:
    """Image convolved with K(x, y), variance with K(x, y)^2; K bilinear between nodes.

    Outside the image counts as zero (the caller flags the border).
    """
    ny, nx = image.shape
    size = kernels.kernels.shape[-1]
    h = size // 2
    bx, by = _cell_bounds(kernels.xs, nx), _cell_bounds(kernels.ys, ny)
    cell_w, cell_h = int(np.diff(bx).max()), int(np.diff(by).max())
    lx, ly = (
        fft.next_fast_len(cell_w + 2 * h, real=True),
        fft.next_fast_len(cell_h + 2 * h, real=True),
    )

    def spectrum(k: np.ndarray) -> np.ndarray:
        out = np.zeros((ly, lx), dtype=np.float32)
        out[:size, :size] = k
        return fft.rfft2(np.roll(out, (-h, -h), axis=(0, 1)), workers=1)

    nyn, nxn = kernels.kernels.shape[:2]
    kspec = [[spectrum(kernels.kernels[j, i]) for i in range(nxn)] for j in range(nyn)]
    k2spec = [[spectrum(kernels.kernels[j, i] ** 2) for i in range(nxn)] for j in range(nyn)]
    padded_img = np.pad(image.astype(np.float32), h)
    padded_var = np.pad(variance.astype(np.float32), h)
    out_img = np.empty((ny, nx), dtype=np.float32)
    out_var = np.empty((ny, nx), dtype=np.float32)
    for j in range(by.size - 1):
        y0, y1 = int(by[j]), int(by[j + 1])
        v = np.clip((np.arange(y0, y1) - kernels.ys[j]) / (kernels.ys[j + 1] - kernels.ys[j]), 0, 1)
        v = v.astype(np.float32)[:, None]
        for i in range(bx.size - 1):
            x0, x1 = int(bx[i]), int(bx[i + 1])
            u = np.clip(
                (np.arange(x0, x1) - kernels.xs[i]) / (kernels.xs[i + 1] - kernels.xs[i]), 0, 1
            ).astype(np.float32)[None, :]
            weights = ((1 - v) * (1 - u), (1 - v) * u, v * (1 - u), v * u)
            corners = ((j, i), (j, i + 1), (j + 1, i), (j + 1, i + 1))
            for src, specs, out in (
                (padded_img, kspec, out_img),
                (padded_var, k2spec, out_var),
            ):
                block = src[y0 : y1 + 2 * h, x0 : x1 + 2 * h]
                bf = fft.rfft2(block, s=(ly, lx), workers=1)
                acc = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
                for w, (cj, ci) in zip(weights, corners, strict=True):
                    conv = fft.irfft2(bf * specs[cj][ci], s=(ly, lx), workers=1)
                    acc += w * conv[h : h + y1 - y0, h : h + x1 - x0]
                out[y0:y1, x0:x1] = acc
    return out_img, out_var


def _dilate_bits(mask: np.ndarray, radius: int) -> np.ndarray:
    """OR of every bit over a (2 radius + 1)^2 box around each pixel."""
    if radius <= 0:
        return mask.copy()
    out = mask
    for axis in (0, 1):
        src = np.pad(out, [(radius, radius) if ax == axis else (0, 0) for ax in (0, 1)])
        acc = src.copy()
        span = 1
        width = 2 * radius + 1
        while span < width:
            shift = min(span, width - span)
            prev = acc.copy()
            if axis == 1:
                acc[:, :-shift] |= prev[:, shift:]
            else:
                acc[:-shift] |= prev[shift:]
            span += shift
        out = acc[:, : mask.shape[1]] if axis == 1 else acc[: mask.shape[0]]
    return np.ascontiguousarray(out)


def psf_match_exposure(
    exposure: Exposure,
    model: PsfModel,
    *,
    grid_spacing: float = 512.0,
    kernel_size: int | None = None,
    regularization: float = 1e-6,
    max_residual: float = 0.02,
    fwhm_tolerance: float = 0.0,
    max_gain: float = 1.5,
) -> Exposure:
    """Convolve ``exposure`` so that its PSF becomes ``model`` everywhere (see module notes).

    Raises :class:`PsfMatchingError` (a ValueError) when the model is narrower
    than the exposure's PSF anywhere (beyond ``fwhm_tolerance``, relative), the
    kernel would deconvolve (gain > ``max_gain``) or the match is poor: the
    caller flags that CCD and leaves it out.
    """
    if exposure.psf is None:
        raise ValueError("cannot PSF-match an exposure without a PSF model")
    kernels = fit_matching_kernels(
        exposure.psf,
        model,
        exposure.shape,
        grid_spacing=grid_spacing,
        kernel_size=kernel_size,
        regularization=regularization,
        max_residual=max_residual,
        fwhm_tolerance=fwhm_tolerance,
        max_gain=max_gain,
    )
    return convolve_exposure(exposure, kernels, model)


def convolve_exposure(exposure: Exposure, kernels: MatchingKernels, psf: PsfModel) -> Exposure:
    """``exposure`` convolved with the spatially varying ``kernels``; its PSF becomes ``psf``.

    Image and variance by :func:`convolve_varying`; mask bits grown by the
    kernels' radii, NO_DATA by the 99% radius and on the border strip (see the
    module notes). Used by PSF matching and by difference imaging, whose
    kernels are fitted on stars instead.
    """
    planes = MaskPlanes(dict(exposure.mask_planes.bits))
    no_data = planes.bitmask("NO_DATA")
    image = np.asarray(exposure.image, dtype=np.float32)
    variance = np.asarray(exposure.variance, dtype=np.float32)
    finite = np.isfinite(image) & np.isfinite(variance)
    unusable = ~finite | ((exposure.mask & no_data) != 0)
    mask = exposure.mask | np.where(finite, 0, planes.bitmask("BAD")).astype(MASK_DTYPE)
    if unusable.any():
        image = np.where(unusable, np.float32(0), image)
        variance = np.where(unusable, np.float32(0), variance)
    out_img, out_var = convolve_varying(image, variance, kernels)
    r, r_edge = kernels.radius, kernels.edge_radius
    mask = mask.astype(MASK_DTYPE)
    # Interpolated defects and cosmic rays carry sky: their bits spread over the
    # kernel's core only. Over its 95% box, a CCD's scattered hot pixels would flag a
    # third of the matched image (every other bit: SAT cores, EDGE, ... spreads fully).
    repaired = 0
    if "INTRP" in planes.bits:
        repaired = planes.bitmask(*(p for p in ("BAD", "CR", "INTRP") if p in planes.bits))
    interpolated = (mask & planes.bitmask("INTRP")) != 0 if repaired else None
    if interpolated is not None and interpolated.any():
        spread = np.where(interpolated, mask & np.int32(~repaired), mask)
        out_mask = _dilate_bits(spread & np.int32(~no_data), r)
        out_mask |= _dilate_bits(
            np.where(interpolated, mask & np.int32(repaired), 0).astype(MASK_DTYPE),
            kernels.core_radius,
        )
    else:
        out_mask = _dilate_bits(mask & np.int32(~no_data), r)
    if (mask & no_data).any():
        out_mask |= _dilate_bits(mask & np.int32(no_data), r_edge)
    if r_edge > 0:
        edge = np.zeros(out_mask.shape, dtype=bool)
        edge[:r_edge] = edge[-r_edge:] = True
        edge[:, :r_edge] = edge[:, -r_edge:] = True
        out_mask[edge] |= np.int32(no_data)
    dead = (out_mask & no_data) != 0
    out_img[dead] = 0.0
    out_var[dead] = 0.0
    # The input's aperture correction was measured for its own PSF, not the model's.
    metadata = without_aperture_correction(exposure.metadata)
    metadata["PSFMATCH"] = (True, "PSF-matched to a model PSF")
    metadata["PSFMFWHM"] = (float(kernels.model_fwhm.max()), "[px] FWHM of the model PSF")
    metadata["PSFMIFWH"] = (float(kernels.psf_fwhm.max()), "[px] max FWHM of the input PSF")
    metadata["PSFMGAIN"] = (float(kernels.gains.max()), "max frequency gain of the kernels")
    metadata["PSFMRES"] = (float(kernels.residuals.max()), "max relative residual of the match")
    metadata["PSFMKSZ"] = (int(kernels.kernels.shape[-1]), "[px] matching kernel size")
    metadata["PSFMGROW"] = (int(r), "[px] mask growth (box with 95% of sum |K|)")
    metadata["PSFMGRWI"] = (int(kernels.core_radius), "[px] growth of interpolated pixels")
    metadata["PSFMEDGE"] = (int(r_edge), "[px] NO_DATA growth and border (99% of sum |K|)")
    log.debug(
        "PSF matching: %d nodes, FWHM %.2f-%.2f -> %.2f px, residual <= %.3g, radius %d",
        kernels.residuals.size,
        kernels.psf_fwhm.min(),
        kernels.psf_fwhm.max(),
        kernels.model_fwhm.max(),
        kernels.residuals.max(),
        r,
    )
    return Exposure(
        image=out_img,
        variance=out_var,
        mask=out_mask,
        wcs=exposure.wcs,
        psf=psf,
        photo_calib=exposure.photo_calib,
        metadata=metadata,
        mask_planes=planes,
        origin=exposure.origin,
    )
