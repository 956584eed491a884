"""GalSim PSF profiles built from :class:`~workflow_lib.sim.optics.PsfParameters`.

The PSF is atmosphere (Kolmogorov, Kolmogorov wings) convolved with an
obscured-pupil Airy and an elliptical optics/charge-diffusion blur; it is never
a plain Gaussian.
"""

from __future__ import annotations

import galsim

from workflow_lib.sim.optics import PsfParameters

# Accurate enough for photometry at the mmag level, fast enough for ~1000
# objects per detector.
GSPARAMS = galsim.GSParams(folding_threshold=5e-3, maxk_threshold=2e-3)


def make_psf(params: PsfParameters, *, gsparams: galsim.GSParams = GSPARAMS) -> galsim.GSObject:
    """The (pixel-free) PSF profile in sky coordinates (arcsec)."""
    atm = galsim.Kolmogorov(fwhm=params.atm_fwhm, gsparams=gsparams).shear(
        g1=params.atm_g1, g2=params.atm_g2
    )
    airy = galsim.Airy(
        lam_over_diam=params.lam_over_diam, obscuration=params.obscuration, gsparams=gsparams
    )
    optics = galsim.Gaussian(fwhm=params.opt_fwhm, gsparams=gsparams).shear(
        g1=params.opt_g1, g2=params.opt_g2
    )
    return galsim.Convolve(atm, airy, optics, gsparams=gsparams)


def measure_fwhm(psf: galsim.GSObject, *, pixel_scale: float, oversample: int = 5) -> float:
    """FWHM (arcsec) of the effective PSF (profile convolved with one pixel).

    Drawn on a grid ``oversample`` times finer than the pixels and measured
    with ``Image.calculateFWHM``, i.e. what a PSF model fitted to the image
    would report.
    """
    eff = galsim.Convolve(psf, galsim.Pixel(pixel_scale))
    fine = pixel_scale / oversample
    size = int(8.0 / fine) | 1
    image = eff.drawImage(nx=size, ny=size, scale=fine, method="no_pixel")
    return float(image.calculateFWHM())
