"""Synthetic images for the coadd-object and forced-photometry tests (GalSim-rendered).

Pixel convention as everywhere: 0-based pixel centres; a source at x = 12.3
is drawn 0.3 pixel right of the centre of column 12.
"""

from __future__ import annotations

from dataclasses import dataclass

import galsim
import numpy as np
from astropy.wcs import WCS

from workflow_lib.core.exposure import Exposure, MaskPlanes
from workflow_lib.core.psf_model import PsfModel

PIXEL_SCALE = 0.2  # arcsec
KERNEL_SIZE = 41


def tan_wcs(
    shape: tuple[int, int],
    *,
    ra0: float = 56.0,
    dec0: float = -30.0,
    scale: float = PIXEL_SCALE,
    rotation_deg: float = 0.0,
) -> WCS:
    """A TAN WCS with its reference point at the image centre (0-based pixels)."""
    ny, nx = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra0, dec0]
    wcs.wcs.crpix = [(nx - 1) / 2.0 + 1.0, (ny - 1) / 2.0 + 1.0]
    c, s = np.cos(np.deg2rad(rotation_deg)), np.sin(np.deg2rad(rotation_deg))
    wcs.wcs.cd = scale / 3600.0 * np.array([[-c, s], [s, c]])
    return wcs


def moffat_psf(fwhm: float, *, beta: float = 3.5) -> galsim.GSObject:
    """A Moffat PSF (pixel units): 99.98% of its flux within a 41 x 41 kernel for FWHM ~4."""
    return galsim.Moffat(beta=beta, fwhm=fwhm)


def psf_kernel(profile: galsim.GSObject, size: int = KERNEL_SIZE) -> np.ndarray:
    """The effective (pixel-convolved) PSF on a size x size grid, unit sum."""
    image = profile.drawImage(nx=size, ny=size, scale=1.0).array.astype(np.float64)
    return image / image.sum()


def add_profile(
    image: np.ndarray,
    profile: galsim.GSObject,
    x: float,
    y: float,
    *,
    stamp: int = 65,
    method: str = "auto",
) -> None:
    """Draw ``profile`` (pixel units, its flux) centred at (x, y) into ``image``."""
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    drawn = profile.drawImage(
        nx=stamp, ny=stamp, scale=1.0, offset=(x - ix, y - iy), method=method
    ).array
    half = stamp // 2
    ny, nx = image.shape
    y0, y1 = max(iy - half, 0), min(iy + half + 1, ny)
    x0, x1 = max(ix - half, 0), min(ix + half + 1, nx)
    if y0 >= y1 or x0 >= x1:
        return
    image[y0:y1, x0:x1] += drawn[y0 - iy + half : y1 - iy + half, x0 - ix + half : x1 - ix + half]


def add_model_star(image: np.ndarray, psf: PsfModel, x: float, y: float, flux: float) -> None:
    """A star drawn from the PSF *model* at its own position (quintic interpolation by GalSim)."""
    kernel = psf.kernel_at(x, y)
    profile = galsim.InterpolatedImage(galsim.Image(kernel, scale=1.0), flux=flux)
    add_profile(image, profile, x, y, stamp=kernel.shape[0] + 4, method="no_pixel")


def linear_psf_model(fwhm_left: float, fwhm_right: float, nx: int, ny: int) -> PsfModel:
    """Order-1 PSF model whose kernel goes from a Moffat of ``fwhm_left`` at x = 0 to one of
    ``fwhm_right`` at x = nx - 1, slightly elliptical towards the top (non-Gaussian, varying)."""
    left = psf_kernel(moffat_psf(fwhm_left))
    right = psf_kernel(moffat_psf(fwhm_right))
    mid = psf_kernel(moffat_psf(0.5 * (fwhm_left + fwhm_right)))
    top = psf_kernel(moffat_psf(0.5 * (fwhm_left + fwhm_right)).shear(g1=0.05, g2=0.0))
    basis = np.stack([mid, 0.5 * (right - left), top - mid])
    return PsfModel(
        basis=basis,
        order=1,
        x_center=(nx - 1) / 2.0,
        y_center=(ny - 1) / 2.0,
        x_scale=(nx - 1) / 2.0,
        y_scale=(ny - 1) / 2.0,
    )


@dataclass
class Scene:
    """Truth of a synthetic image: positions (pixels), fluxes per band (nJy), kinds."""

    x: np.ndarray
    y: np.ndarray
    flux: dict[str, np.ndarray]
    kind: np.ndarray  # "star" | "galaxy"
    hlr: np.ndarray  # half-light radius, pixels (0 for stars)


def exposure_from(
    image: np.ndarray,
    variance: np.ndarray,
    *,
    wcs: WCS,
    psf: PsfModel,
    no_data: np.ndarray | None = None,
    origin=(0, 0),
) -> Exposure:
    """An Exposure with the default mask planes and NO_DATA where given (image 0 there)."""
    planes = MaskPlanes()
    mask = np.zeros(image.shape, dtype=np.int32)
    image = image.copy()
    variance = variance.copy()
    if no_data is not None:
        mask[no_data] |= planes.bitmask("NO_DATA")
        image[no_data] = 0.0
        variance[no_data] = np.inf
    return Exposure(image, variance, mask, wcs=wcs, psf=psf, mask_planes=planes, origin=origin)


def render_band(
    shape: tuple[int, int],
    scene: Scene,
    band: str,
    psf: galsim.GSObject,
    *,
    sky_sigma: float,
    rng: np.random.Generator,
    galaxy_e: tuple[float, float] = (0.2, 0.1),
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy image and its (exact) variance: sky noise of ``sky_sigma`` nJy per pixel."""
    image = np.zeros(shape)
    for x, y, flux, kind, hlr in zip(
        scene.x, scene.y, scene.flux[band], scene.kind, scene.hlr, strict=True
    ):
        if flux <= 0:
            continue
        if kind == "star":
            add_profile(image, psf.withFlux(float(flux)), x, y)
        else:
            gal = galsim.Exponential(half_light_radius=float(hlr), flux=float(flux))
            add_profile(
                image,
                galsim.Convolve(gal.shear(e1=galaxy_e[0], e2=galaxy_e[1]), psf),
                x,
                y,
                stamp=97,
            )
    variance = np.full(shape, sky_sigma**2)
    return image + rng.normal(0.0, sky_sigma, shape), variance
