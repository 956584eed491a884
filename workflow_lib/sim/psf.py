"""GalSim PSF profiles built from :class:`~workflow_lib.sim.optics.PsfParameters`.

The PSF is atmosphere (Kolmogorov, Kolmogorov wings) convolved with an
obscured-pupil Airy and an elliptical optics/charge-diffusion blur; it is never
a plain Gaussian.
"""

from __future__ import annotations

from functools import cache

import galsim
import numpy as np

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


# Radii (in units of the profile's size) tabulated for the photon offsets: from
# far inside the core to where the profile's remaining light is negligible for a
# galaxy stamp (the obscured Airy's encircled energy converges only as 1/r).
_TABLE_RADII = np.geomspace(1e-4, 1e3, 8192)
# The inverse CDF sampled at this many equal steps of enclosed light: a photon's
# radius is then one linear interpolation between neighbours, no search.
_INVERSE_STEPS = 1 << 16


@cache
def _inverse_radial_cdf(kind: str, obscuration: float = 0.0) -> np.ndarray:
    """Radius enclosing each of ``_INVERSE_STEPS + 1`` equally spaced fractions of
    the light of a unit-size round profile (Kolmogorov of FWHM 1, obscured Airy of
    lam/D 1), from GalSim's own radial profile."""
    if kind == "kolmogorov":
        profile: galsim.GSObject = galsim.Kolmogorov(fwhm=1.0, gsparams=GSPARAMS)
    else:
        profile = galsim.Airy(lam_over_diam=1.0, obscuration=obscuration, gsparams=GSPARAMS)
    r = np.concatenate([[0.0], _TABLE_RADII])
    brightness = np.array([profile.xValue(galsim.PositionD(float(x), 0.0)) for x in r])
    ring = np.pi * (r[1:] ** 2 - r[:-1] ** 2) * 0.5 * (brightness[1:] + brightness[:-1])
    cdf = np.concatenate([[0.0], np.cumsum(ring)])
    return np.interp(np.linspace(0.0, 1.0, _INVERSE_STEPS + 1), cdf / cdf[-1], r)


def _radii(table: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Inverse-CDF radii for uniform deviates in [0, 1)."""
    position = uniform * (len(table) - 1)
    index = position.astype(np.int64)
    return table[index] + (position - index) * (table[index + 1] - table[index])


def _sheared(x: np.ndarray, y: np.ndarray, g1: float, g2: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions under GalSim's area-preserving shear (g1, g2)."""
    norm = 1.0 / np.sqrt(1.0 - g1 * g1 - g2 * g2)
    return norm * ((1.0 + g1) * x + g2 * y), norm * (g2 * x + (1.0 - g1) * y)


class PsfPhotons(galsim.PhotonOp):
    """Convolves shot photons with :func:`make_psf`'s PSF: each photon moves by one
    draw from each of its three components (as GalSim's ``Convolve`` shoots), the
    sheared Kolmogorov and the round obscured Airy by inverse radial CDFs of their
    unit-size profiles, the sheared Gaussian by normal deviates. The same profile as
    shooting through the ``Convolve`` at a fraction of the cost: GalSim samples the
    obscured Airy's rings and the Kolmogorov photon by photon (about 0.6 us of the
    0.75 us a faint galaxy's photon costs), here a table look-up does it in bulk.
    """

    def __init__(self, params: PsfParameters) -> None:
        self.params = params

    def offsets(self, n: int, rng: galsim.BaseDeviate) -> tuple[np.ndarray, np.ndarray]:
        """``n`` offsets (arcsec on the sky) drawn from the PSF, seeded by ``rng``."""
        p = self.params
        generator = np.random.default_rng(int(rng.raw()))
        x, y = np.zeros(n), np.zeros(n)
        for kind, size, obscuration in (
            ("kolmogorov", p.atm_fwhm, 0.0),
            ("airy", p.lam_over_diam, p.obscuration),
        ):
            r = size * _radii(_inverse_radial_cdf(kind, obscuration), generator.random(n))
            phi = 2.0 * np.pi * generator.random(n)
            dx, dy = r * np.cos(phi), r * np.sin(phi)
            if kind == "kolmogorov":
                dx, dy = _sheared(dx, dy, p.atm_g1, p.atm_g2)
            x += dx
            y += dy
        sigma = p.opt_fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        normal = generator.standard_normal((2, n))
        dx, dy = _sheared(sigma * normal[0], sigma * normal[1], p.opt_g1, p.opt_g2)
        return x + dx, y + dy

    def applyTo(
        self,
        photon_array: galsim.PhotonArray,
        local_wcs: galsim.BaseWCS | None = None,
        rng: galsim.BaseDeviate | None = None,
    ) -> None:
        """Move the photons (image coordinates) by PSF offsets through ``local_wcs``."""
        if local_wcs is None:
            raise ValueError("PsfPhotons needs the local WCS (arcsec -> pixels)")
        du, dv = self.offsets(len(photon_array), galsim.BaseDeviate(rng))
        jac = local_wcs.jacobian()
        inverse = np.linalg.inv([[jac.dudx, jac.dudy], [jac.dvdx, jac.dvdy]])
        photon_array.x += inverse[0, 0] * du + inverse[0, 1] * dv
        photon_array.y += inverse[1, 0] * du + inverse[1, 1] * dv
