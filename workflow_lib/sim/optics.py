"""True WCS (TAN + cubic radial distortion) and PSF parameters across the focal plane.

Numpy only (GalSim-free), so the survey plan can use it while Snakemake parses
the workflow. The distortion is radial about the optical axis,
``u' = u (1 + k r^2)`` in focal-plane pixels, which is exactly a TAN-SIP of
order 3 with CRVAL at the boresight, CRPIX at the optical axis
(``A_3_0 = A_1_2 = B_2_1 = B_0_3 = k``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ARCSEC = 1.0 / 3600.0


def cd_matrix(pixel_scale: float, rotation_deg: float) -> np.ndarray:
    """CD matrix (deg/pixel) with north up, east left at zero rotation."""
    th = np.deg2rad(rotation_deg)
    s = pixel_scale * ARCSEC
    return s * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])


def tan_project(
    ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic projection: (ra, dec) -> standard coordinates (xi east, eta north), deg."""
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    da = a - a0
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(da)
    xi = np.cos(d) * np.sin(da) / cosc
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(da)) / cosc
    return np.rad2deg(xi), np.rad2deg(eta)


def tan_deproject(
    xi: np.ndarray, eta: np.ndarray, ra0: float | np.ndarray, dec0: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`tan_project` (inputs in deg; a centre per point may be given)."""
    x, y = np.deg2rad(xi), np.deg2rad(eta)
    d0 = np.deg2rad(dec0)
    denom = np.cos(d0) - y * np.sin(d0)
    ra = ra0 + np.rad2deg(np.arctan2(x, denom))
    dec = np.rad2deg(np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, denom)))
    return np.mod(ra, 360.0), dec


@dataclass(frozen=True)
class TrueWCS:
    """The true pixel <-> sky mapping of one (visit, detector).

    ``crpix`` is 1-based (FITS); methods take and return 0-based pixels.
    """

    crval: tuple[float, float]
    crpix: tuple[float, float]
    cd: tuple[tuple[float, float], tuple[float, float]]
    k: float  # radial distortion coefficient, 1/pixel^2

    @property
    def cd_array(self) -> np.ndarray:
        return np.array(self.cd, dtype=float)

    def pixel_to_sky(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = np.asarray(x, float) + 1.0 - self.crpix[0]
        v = np.asarray(y, float) + 1.0 - self.crpix[1]
        f = 1.0 + self.k * (u * u + v * v)
        cd = self.cd_array
        xi = cd[0, 0] * u * f + cd[0, 1] * v * f
        eta = cd[1, 0] * u * f + cd[1, 1] * v * f
        return tan_deproject(xi, eta, *self.crval)

    def sky_to_pixel(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xi, eta = tan_project(np.asarray(ra, float), np.asarray(dec, float), *self.crval)
        inv = np.linalg.inv(self.cd_array)
        up = inv[0, 0] * xi + inv[0, 1] * eta
        vp = inv[1, 0] * xi + inv[1, 1] * eta
        rp = np.hypot(up, vp)
        r = rp.copy()
        for _ in range(6):  # Newton on r + k r^3 = r'
            r -= (r + self.k * r**3 - rp) / (1.0 + 3.0 * self.k * r**2)
        scale = np.where(rp > 0, r / np.where(rp > 0, rp, 1.0), 1.0)
        return up * scale + self.crpix[0] - 1.0, vp * scale + self.crpix[1] - 1.0

    def local_jacobian(self, x: float, y: float) -> np.ndarray:
        """d(west, north)/d(x, y) in arcsec/pixel at pixel (x, y) (0-based).

        West/north (rather than east) keeps the parity of the pixel grid, so a
        zero-rotation visit has a positive-diagonal Jacobian; GalSim's local
        ``JacobianWCS`` takes this matrix.
        """
        u = x + 1.0 - self.crpix[0]
        v = y + 1.0 - self.crpix[1]
        f = 1.0 + self.k * (u * u + v * v)
        dist = np.array(
            [
                [f + 2 * self.k * u * u, 2 * self.k * u * v],
                [2 * self.k * u * v, f + 2 * self.k * v * v],
            ]
        )
        jac = self.cd_array @ dist / ARCSEC
        jac[0, :] *= -1.0
        return jac

    def header_cards(self) -> dict[str, Any]:
        """FITS cards of this WCS as a TAN-SIP (astropy reads them)."""
        cd = self.cd_array
        cards: dict[str, Any] = {
            "WCSAXES": 2,
            "CTYPE1": "RA---TAN-SIP",
            "CTYPE2": "DEC--TAN-SIP",
            "CUNIT1": "deg",
            "CUNIT2": "deg",
            "CRVAL1": float(self.crval[0]),
            "CRVAL2": float(self.crval[1]),
            "CRPIX1": float(self.crpix[0]),
            "CRPIX2": float(self.crpix[1]),
            "CD1_1": float(cd[0, 0]),
            "CD1_2": float(cd[0, 1]),
            "CD2_1": float(cd[1, 0]),
            "CD2_2": float(cd[1, 1]),
            "RADESYS": "ICRS",
            "A_ORDER": 3,
            "B_ORDER": 3,
        }
        for p in range(4):
            for q in range(4 - p):
                if p + q < 2:
                    continue
                cards[f"A_{p}_{q}"] = 0.0
                cards[f"B_{p}_{q}"] = 0.0
        cards["A_3_0"] = cards["A_1_2"] = float(self.k)
        cards["B_2_1"] = cards["B_0_3"] = float(self.k)
        return cards

    def header_string(self) -> str:
        """The WCS as a FITS header string (``astropy.io.fits.Header.fromstring``)."""
        from astropy.io import fits

        header = fits.Header()
        for key, value in self.header_cards().items():
            header[key] = value
        return header.tostring()


def distortion_coefficient(edge_shift_px: float, fp_radius_px: float) -> float:
    """k such that the distortion shifts the focal-plane corner by ``edge_shift_px``."""
    return float(edge_shift_px / fp_radius_px**3)


@dataclass(frozen=True)
class PsfParameters:
    """Ingredients of the PSF at one focal-plane position of one visit."""

    atm_fwhm: float  # arcsec, Kolmogorov
    atm_g1: float
    atm_g2: float
    opt_fwhm: float  # arcsec, Gaussian-like optics/sensor blur
    opt_g1: float
    opt_g2: float
    lam_over_diam: float  # arcsec, Airy diffraction (obscured pupil)
    obscuration: float


def psf_parameters(
    *,
    seeing: float,
    wind_g1: float,
    wind_g2: float,
    wavelength_nm: float,
    fx: float,
    fy: float,
    fp_radius: float,
) -> PsfParameters:
    """PSF parameters at focal-plane pixel position ``(fx, fy)`` (optical axis at 0).

    Atmosphere: Kolmogorov of FWHM ``seeing`` with a wind-shake shear and a
    weak gradient. Optics: an obscured Airy (8.36 m, 61% obscuration) and an
    aberration/charge-diffusion blur that grows towards the field edge with an
    astigmatism-like (tangential) ellipticity pattern.
    """
    rx, ry = fx / fp_radius, fy / fp_radius
    r2 = rx * rx + ry * ry
    lam_over_diam = wavelength_nm * 1e-9 / 8.36 * 206264.806
    return PsfParameters(
        atm_fwhm=seeing * (1.0 + 0.015 * r2),
        atm_g1=wind_g1 + 0.01 * rx,
        atm_g2=wind_g2 - 0.008 * ry,
        opt_fwhm=0.25 + 0.2 * r2,
        opt_g1=0.06 * (rx * rx - ry * ry),
        opt_g2=0.06 * 2.0 * rx * ry,
        lam_over_diam=lam_over_diam,
        obscuration=0.61,
    )
