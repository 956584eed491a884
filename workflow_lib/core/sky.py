"""Sky geometry shared by the stages: a local tangent plane in arcsec."""

from __future__ import annotations

import numpy as np


def tangent_plane_arcsec(
    ra: np.ndarray, dec: np.ndarray, ra0: float | np.ndarray, dec0: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic projection about (ra0, dec0) (one centre, or one per point), all in
    degrees; returns arcsec."""
    ra_r, dec_r = np.deg2rad(ra), np.deg2rad(dec)
    ra0_r, dec0_r = np.deg2rad(ra0), np.deg2rad(dec0)
    cos_c = np.sin(dec0_r) * np.sin(dec_r) + np.cos(dec0_r) * np.cos(dec_r) * np.cos(ra_r - ra0_r)
    xi = np.cos(dec_r) * np.sin(ra_r - ra0_r) / cos_c
    eta = (
        np.cos(dec0_r) * np.sin(dec_r) - np.sin(dec0_r) * np.cos(dec_r) * np.cos(ra_r - ra0_r)
    ) / cos_c
    scale = np.rad2deg(1.0) * 3600.0
    return xi * scale, eta * scale


def from_tangent_plane_arcsec(
    xi: np.ndarray, eta: np.ndarray, ra0: float, dec0: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`tangent_plane_arcsec`: (ra, dec) in degrees."""
    x, y = np.deg2rad(np.asarray(xi) / 3600.0), np.deg2rad(np.asarray(eta) / 3600.0)
    ra0_r, dec0_r = np.deg2rad(ra0), np.deg2rad(dec0)
    rho = np.hypot(x, y)
    c = np.arctan(rho)
    with np.errstate(invalid="ignore", divide="ignore"):
        dec = np.arcsin(
            np.cos(c) * np.sin(dec0_r) + np.where(rho > 0, y * np.sin(c) * np.cos(dec0_r) / rho, 0)
        )
    ra = ra0_r + np.arctan2(
        x * np.sin(c), rho * np.cos(dec0_r) * np.cos(c) - y * np.sin(dec0_r) * np.sin(c)
    )
    return np.rad2deg(ra) % 360.0, np.rad2deg(dec)
