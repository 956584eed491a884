"""Astrometry: pattern matching against a poor header WCS, and TAN-SIP fitting.

Synthetic fields have a true TAN-SIP WCS with a cubic radial distortion about an
optical axis off the detector (as the built-in simulator and real cameras do),
a reference catalog with 5 mas position noise, detections with S/N-dependent
centroid noise plus objects that are not in the catalog, and a header WCS that
is a plain TAN off by 30-60 arcsec, 1-2 deg and up to 3% in scale.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip

from workflow_lib.single_frame.astrometry import (
    AstrometryError,
    fit_wcs,
    local_pixel_scale_arcsec,
    match_by_position,
    match_sources,
    solve_astrometry,
    tan_deproject,
    tan_project,
)

MAS = 1.0 / 3.6e6  # deg


def true_wcs(
    rng: np.random.Generator,
    *,
    scale: float = 0.2,
    axis: tuple[float, float] | None = None,
    k: float = 8.0 / 15000.0**3,
    mirrored: bool = False,
) -> WCS:
    """TAN-SIP with cubic radial distortion ``k`` (default: 8 px at 15000 px) about an
    optical axis (1-based pixel; default ~7000 px off the detector), random rotation.
    ``mirrored`` flips the pixel y axis (det CD > 0, unlike a usual east-left image)."""
    w = WCS(naxis=2)
    rot = np.deg2rad(rng.uniform(-180, 180))
    s = scale / 3600.0
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if k else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [rng.uniform(0, 360), rng.uniform(-70, 30)]
    if axis is None:
        axis = (-6000.0 + rng.uniform(-500, 500), -4000.0 + rng.uniform(-500, 500))
    w.wcs.crpix = list(axis)
    w.wcs.cd = s * np.array([[-np.cos(rot), np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    if mirrored:
        w.wcs.cd = w.wcs.cd @ np.diag([1.0, -1.0])
    if k:
        a, b = np.zeros((4, 4)), np.zeros((4, 4))
        a[3, 0] = a[1, 2] = b[2, 1] = b[0, 3] = k
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def header_wcs(rng, tw: WCS, nx: int, ny: int, offset: float, rot: float, scale_err: float) -> WCS:
    """Plain TAN at the detector centre, off by ``offset`` arcsec, ``rot`` deg, ``scale_err``."""
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    ra, dec = tw.all_pix2world([cx, cx + 1, cx], [cy, cy, cy + 1], 0)
    xi, eta = tan_project(ra, dec, ra[0], dec[0])
    cd = np.array([[xi[1] - xi[0], xi[2] - xi[0]], [eta[1] - eta[0], eta[2] - eta[0]]])
    th = np.deg2rad(rot)
    cd = (1 + scale_err) * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) @ cd
    ang = rng.uniform(0, 2 * np.pi)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [
        ra[0] + offset * np.cos(ang) / 3600 / np.cos(np.deg2rad(dec[0])),
        dec[0] + offset * np.sin(ang) / 3600,
    ]
    w.wcs.crpix = [cx + 1, cy + 1]
    w.wcs.cd = cd
    w.wcs.set()
    return w


def _magnitudes(rng, n: int, bounds: tuple[float, float], slope: float | None) -> np.ndarray:
    lo, hi = bounds
    if slope is None:
        return rng.uniform(lo, hi, n)
    return lo + np.log10(1 + rng.uniform(size=n) * (10 ** (slope * (hi - lo)) - 1)) / slope


def make_field(
    rng: np.random.Generator,
    *,
    nx: int = 1024,
    ny: int = 1024,
    n_ref: int = 60,
    n_det: int = 200,
    offset: float = 45.0,
    rot: float = 1.5,
    scale_err: float = 0.01,
    ref_noise_mas: float = 5.0,
    extra_mag: tuple[float, float] = (20.0, 25.0),
    extra_slope: float | None = None,
    mirrored: bool = False,
) -> dict:
    """A synthetic detector: detections, reference catalog, truth and header WCS.

    ``extra_mag`` is the magnitude range of the detections not in the catalog
    (galaxies, faint stars), uniform or with counts rising as
    ``10**(extra_slope * mag)`` (galaxies: 0.33); the reference stars are 14-22 mag.
    """
    tw = true_wcs(rng, mirrored=mirrored)
    pad = 800
    n_star = int(n_ref * (nx + 2 * pad) * (ny + 2 * pad) / (nx * ny))
    sx, sy = rng.uniform(-pad, nx + pad, n_star), rng.uniform(-pad, ny + pad, n_star)
    slope = 0.3
    mag = 14 + np.log10(1 + rng.uniform(size=n_star) * (10 ** (slope * 8) - 1)) / slope
    ra, dec = tw.all_pix2world(sx, sy, 0)
    on = (sx >= 0) & (sx < nx) & (sy >= 0) & (sy < ny)
    det_star = np.flatnonzero(on & (rng.uniform(size=n_star) > 0.1))  # 10% undetected
    n_extra = max(n_det - len(det_star), 0)  # galaxies, faint stars: not in the refcat
    flux = np.concatenate(
        [
            10 ** (-0.4 * (mag[det_star] - 31.5)),
            10 ** (-0.4 * (_magnitudes(rng, n_extra, extra_mag, extra_slope) - 31.5)),
        ]
    )
    snr = flux / np.sqrt(flux + 6e4)
    sig = np.hypot(0.9 / snr, 0.002)  # pixels
    tx = np.concatenate([sx[det_star], rng.uniform(0, nx, n_extra)])
    ty = np.concatenate([sy[det_star], rng.uniform(0, ny, n_extra)])
    perm = rng.permutation(len(tx))
    s = ref_noise_mas * MAS
    rdec = dec + rng.normal(0, s, n_star)
    rra = ra + rng.normal(0, s, n_star) / np.cos(np.deg2rad(rdec))
    hw = header_wcs(rng, tw, nx, ny, offset, rot * rng.choice([-1, 1]), scale_err)
    return {
        "x": (tx + rng.normal(0, 1, len(tx)) * sig)[perm],
        "y": (ty + rng.normal(0, 1, len(ty)) * sig)[perm],
        "flux": flux[perm],
        "sigma_px": sig[perm],
        "snr": snr[perm],
        "tx": tx[perm],
        "ty": ty[perm],
        "truth": np.concatenate([det_star, np.full(n_extra, -1)])[perm],
        "ref_ra": rra,
        "ref_dec": rdec,
        "ref_mag": mag,
        "true_ra": ra,
        "true_dec": dec,
        "true_wcs": tw,
        "header_wcs": hw,
        "shape": (ny, nx),
    }


def _match(f: dict, **kw):
    return match_sources(
        f["x"], f["y"], f["flux"], f["ref_ra"], f["ref_dec"], f["ref_mag"], f["header_wcs"], **kw
    )


def _error_vs_truth_mas(wcs: WCS, f: dict, sel: np.ndarray) -> np.ndarray:
    ra, dec = wcs.all_pix2world(f["tx"][sel], f["ty"][sel], 0)
    i = f["truth"][sel]
    tr, td = f["true_ra"][i], f["true_dec"][i]
    return np.hypot((ra - tr) * np.cos(np.deg2rad(td)), dec - td) * 3.6e6


# ------------------------------------------------------------------ geometry
def test_tan_projection_round_trip_and_pixel_scale():
    rng = np.random.default_rng(1)
    ra0, dec0 = 359.9, -89.0  # RA wrap and near the pole
    ra = np.mod(ra0 + rng.uniform(-3, 3, 100), 360)
    dec = np.clip(dec0 + rng.uniform(-0.5, 0.5, 100), -89.99, 89.99)
    r2, d2 = tan_deproject(*tan_project(ra, dec, ra0, dec0), ra0, dec0)
    dra = (r2 - ra + 180) % 360 - 180
    assert np.max(np.abs(dra * np.cos(np.deg2rad(dec)))) < 1e-9 and np.max(np.abs(d2 - dec)) < 1e-9
    tw = true_wcs(rng, scale=0.37)
    assert local_pixel_scale_arcsec(tw, 500.0, 500.0) == pytest.approx(0.37, rel=2e-3)


# --------------------------------------------------------------- WCS fitting
def test_fit_wcs_reproduces_a_true_tan_sip_exactly():
    """Noise-free pairs: the cubic TAN-SIP about an off-detector axis is refitted to < 0.01 mas."""
    rng = np.random.default_rng(2)
    f = make_field(rng, nx=4096, ny=4096, n_ref=400, n_det=400)
    star = f["truth"] >= 0
    i = f["truth"][star]
    res = fit_wcs(
        f["tx"][star],
        f["ty"][star],
        f["true_ra"][i],
        f["true_dec"][i],
        crpix=(2048.5, 2048.5),
        image_shape=f["shape"],
    )
    assert res.sip_order == 3 and res.n_used == star.sum()
    assert res.wcs.wcs.ctype[0] == "RA---TAN-SIP" and res.wcs.wcs.ctype[1] == "DEC--TAN-SIP"
    assert res.rms_arcsec * 1000 < 0.01
    # CRVAL is the sky position of CRPIX.
    ra_c, dec_c = f["true_wcs"].all_pix2world(2047.5, 2047.5, 0)
    assert (
        np.hypot(
            (res.wcs.wcs.crval[0] - ra_c) * np.cos(np.deg2rad(dec_c)), res.wcs.wcs.crval[1] - dec_c
        )
        < 0.01 * MAS
    )
    # Inverse SIP: pixel -> focal -> pixel over the detector without astropy's iteration.
    gx, gy = np.meshgrid(np.linspace(-0.5, 4095.5, 30), np.linspace(-0.5, 4095.5, 30))
    pix = np.column_stack([gx.ravel(), gy.ravel()])
    back = res.wcs.sip.foc2pix(res.wcs.sip.pix2foc(pix, 0), 0)
    assert np.abs(back - pix).max() * 0.2 * 1000 < 1.0  # mas
    assert res.inverse_max_err_mas < 1.0
    # The header (what files carry) gives the same mapping, both ways.
    hdr = res.wcs.to_header(relax=True)
    assert hdr["A_ORDER"] == 3 and "AP_ORDER" in hdr
    again = WCS(fits.Header(hdr))
    ra1, dec1 = res.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    _, dec2 = again.all_pix2world(gx.ravel(), gy.ravel(), 0)
    assert np.max(np.abs(dec1 - dec2)) < 1e-3 * MAS
    x2, y2 = again.all_world2pix(ra1, dec1, 0)
    assert np.max(np.hypot(x2 - gx.ravel(), y2 - gy.ravel())) * 0.2 * 1000 < 1.0


def test_fit_wcs_recovers_true_positions_with_noise_and_outliers():
    """Weighted fit on a matched noisy catalog: bright-star positions good to < 5 mas rms."""
    rng = np.random.default_rng(3)
    f = make_field(rng, nx=4096, ny=4096, n_ref=1500, n_det=3000)
    m = _match(f)
    si, ri = m.source_index, m.reference_index
    assert (f["truth"][si] == ri).mean() > 0.99  # a missed star may catch a neighbour
    x, y = f["x"][si].copy(), f["y"][si].copy()
    bad = rng.choice(len(si), size=len(si) // 50, replace=False)  # 2% gross outliers
    x[bad] += rng.choice([-1, 1], len(bad)) * rng.uniform(5, 10, len(bad))
    sig_arcsec = f["sigma_px"][si] * 0.2
    w = 1.0 / (sig_arcsec**2 + 0.005**2)
    res = fit_wcs(
        x,
        y,
        f["ref_ra"][ri],
        f["ref_dec"][ri],
        crpix=(2048.5, 2048.5),
        weights=w,
        image_shape=f["shape"],
    )
    assert not res.used[bad].any()
    assert res.used.mean() > 0.95
    bright = (f["truth"] >= 0) & (f["snr"] > 50)
    err = _error_vs_truth_mas(res.wcs, f, bright)
    assert np.sqrt(np.mean(err**2)) < 5.0
    # Residuals are (east, north) arcsec and consistent with the errors put in.
    pull = res.residuals[res.used] / np.sqrt(sig_arcsec[res.used, None] ** 2 + 0.005**2)
    assert 0.8 < np.std(pull) < 1.2


def test_fit_wcs_lowers_the_order_with_few_stars_and_fails_with_too_few():
    """Noise-free pairs of a true cubic: the highest order the number of stars allows."""
    rng = np.random.default_rng(4)
    f = make_field(rng, nx=2048, ny=2048, n_ref=400, n_det=400)
    star = np.flatnonzero(f["truth"] >= 0)
    i = f["truth"][star]
    got = {}
    for n in (40, 20, 12, 8, 5, 4, 3):
        res = fit_wcs(
            f["tx"][star[:n]],
            f["ty"][star[:n]],
            f["true_ra"][i[:n]],
            f["true_dec"][i[:n]],
            crpix=(1024.5, 1024.5),
        )
        got[n] = (res.model, res.max_order)
        # A lower order still fits the detector to well under a pixel.
        assert res.rms_arcsec < 0.05
        if res.sip_order == 1:
            assert res.wcs.wcs.ctype[0] == "RA---TAN" and res.wcs.sip is None
    assert got == {
        40: ("sip3", 3),
        20: ("sip3", 3),
        12: ("sip2", 2),
        8: ("linear", 1),
        5: ("linear", 1),
        4: ("similarity", 0),
        3: ("similarity", 0),
    }
    with pytest.raises(AstrometryError, match="too few stars"):
        fit_wcs(
            f["tx"][star[:2]],
            f["ty"][star[:2]],
            f["true_ra"][i[:2]],
            f["true_dec"][i[:2]],
            crpix=(1024.5, 1024.5),
        )


# Simulator-like distortion: 3 px at the corner of a 2 x 2 mosaic of 1024^2 CCDs, seen on
# the CCD at its corner (optical axis at the CCD's pixel (0, 0)): 46 mas rms, 210 mas at
# most, of non-linear distortion over the CCD.
_K_MOSAIC = 3.0 / (np.hypot(2048.0, 2048.0) / 2.0) ** 3
# Bounds (mas) on the median over seeds of the WCS error against truth over the CCD, with
# 5 mas of centroid noise: (distortion, coverage) -> {N: bound}.
_GRID_BOUNDS = {
    ("none", "full"): {5: 12, 8: 10, 15: 6, 40: 3, 300: 1.5},
    ("none", "half"): {5: 20, 8: 12, 15: 10, 40: 5, 300: 2.5},
    ("cubic", "full"): {5: 100, 8: 90, 15: 25, 40: 10, 300: 3},
    ("cubic", "half"): {5: 150, 8: 150, 15: 130, 40: 60, 300: 45},
}


def _grid_case(
    n: int,
    distortion: str,
    coverage: str,
    seed: int,
    noise_mas: float = 5.0,
    boresight: bool = False,
):
    """(error of the fitted WCS, error of a plain linear fit, the fit) over a 1024^2 CCD, mas.
    ``boresight``: the fit is given the optical axis (the true WCS's CRVAL)."""
    nx = 1024
    rng = np.random.default_rng(seed)
    tw = true_wcs(rng, axis=(0.0, 0.0), k=_K_MOSAIC if distortion == "cubic" else 0.0)
    x = rng.uniform(nx / 2 if coverage == "half" else -0.5, nx - 0.5, n)
    y = rng.uniform(-0.5, nx - 0.5, n)
    ra, dec = tw.all_pix2world(x, y, 0)
    sig = noise_mas / 200.0  # pixels
    xo, yo = x + rng.normal(0, sig, n), y + rng.normal(0, sig, n)
    w = np.full(n, 1.0 / (noise_mas / 1000.0) ** 2)
    bore = tuple(float(c) for c in tw.wcs.crval) if boresight else None
    res = fit_wcs(
        xo,
        yo,
        ra,
        dec,
        crpix=((nx + 1) / 2, (nx + 1) / 2),
        weights=w,
        image_shape=(nx, nx),
        boresight=bore,
    )
    g = np.linspace(-0.5, nx - 0.5, 21)
    gx, gy = (a.ravel() for a in np.meshgrid(g, g))
    tr, td = tw.all_pix2world(gx, gy, 0)
    fr, fd = res.wcs.all_pix2world(gx, gy, 0)
    err = np.hypot((fr - tr) * np.cos(np.deg2rad(td)), fd - td) * 3.6e6
    # The plain linear fit (TAN with a CD matrix, all stars) for comparison.
    ra0, dec0 = (float(c[0]) for c in tw.all_pix2world([nx / 2], [nx / 2], 0))
    xi, eta = tan_project(ra, dec, ra0, dec0)
    m = np.column_stack([np.ones(n), xo, yo])
    cx, *_ = np.linalg.lstsq(m, xi, rcond=None)
    cy, *_ = np.linalg.lstsq(m, eta, rcond=None)
    gxi, geta = tan_project(tr, td, ra0, dec0)
    mg = np.column_stack([np.ones(len(gx)), gx, gy])
    lin = np.hypot(mg @ cx - gxi, mg @ cy - geta) * 3.6e6
    return float(np.sqrt(np.mean(err**2))), float(np.sqrt(np.mean(lin**2))), res


@pytest.mark.parametrize("distortion", ["none", "cubic"])
@pytest.mark.parametrize("coverage", ["full", "half"])
def test_wcs_error_over_the_ccd_with_few_to_many_stars(distortion, coverage):
    """N = 5 .. 300 matches, 5 mas noise: bounded error over the whole CCD, never worse
    than a linear fit by more than the noise, and no polynomial where stars are absent."""
    bounds = _GRID_BOUNDS[(distortion, coverage)]
    for n, bound in bounds.items():
        errs, lins, orders = [], [], []
        for seed in range(8):
            err, lin, res = _grid_case(n, distortion, coverage, 1000 * n + seed)
            # With 5 stars and strong distortion, a true star 0.25" off the others' fit
            # cannot be told from a mismatch: only the median is bounded there.
            if n >= 8 or distortion == "none":
                assert err <= lin + 5.0, (n, seed, err, lin, res.model)
            lins.append(lin)
            errs.append(err)
            orders.append(res.sip_order if res.model != "similarity" else 0)
            if coverage == "half":
                assert res.sip_order <= 2 and res.coverage < 0.55
        assert np.median(errs) <= bound, (n, errs, orders)
        assert np.median(errs) <= np.median(lins) + 5.0
        if distortion == "none":  # nothing to gain from a polynomial
            assert np.mean(np.array(orders) == 1) >= 0.75
        elif coverage == "full" and n >= 40:  # the cubic is needed and pinned down
            assert min(orders) >= 2 and (n < 300 or set(orders) == {3})


# With the boresight given: the one-parameter radial model about it.
_GRID_BOUNDS_BORESIGHT = {
    ("none", "full"): {5: 12, 8: 10, 15: 6, 300: 1.5},
    ("none", "half"): {5: 20, 8: 12, 15: 10, 300: 2.5},
    ("cubic", "full"): {5: 15, 8: 12, 15: 6, 40: 4, 300: 1.5},
    ("cubic", "half"): {5: 30, 8: 25, 15: 12, 40: 6, 300: 2.5},
}


@pytest.mark.parametrize("distortion", ["none", "cubic"])
@pytest.mark.parametrize("coverage", ["full", "half"])
def test_wcs_error_over_the_ccd_with_the_boresight(distortion, coverage):
    """Radial distortion about a known boresight: the one-parameter model brings a few
    stars' WCS from the linear fit's 60-100 mas to ~10 mas, and costs little without
    distortion; a chosen radial model is a standard TAN-SIP of order 3."""
    for n, bound in _GRID_BOUNDS_BORESIGHT[(distortion, coverage)].items():
        errs, lins, models = [], [], []
        for seed in range(8):
            err, lin, res = _grid_case(n, distortion, coverage, 1000 * n + seed, boresight=True)
            errs.append(err)
            lins.append(lin)
            models.append(res.model)
            if res.model == "radial":
                assert res.sip_order == 3 and res.wcs.sip is not None
                assert res.inverse_max_err_mas < 1.0
        assert np.median(errs) <= bound, (n, errs, models)
        assert np.median(errs) <= np.median(lins) + 2.0
        if distortion == "cubic" and n >= 8:
            assert models.count("radial") >= 4, models


@pytest.mark.parametrize("n", [5, 8, 15, 40])
def test_one_gross_outlier_does_not_drag_the_fit(n):
    """A mismatch 0.3-1 arcsec off among n stars is rejected; the WCS stays as good."""
    worse = []
    for seed in range(6):
        clean, _, _ = _grid_case(n, "none", "full", 7000 + seed)
        rng = np.random.default_rng(7000 + seed)
        tw = true_wcs(rng, axis=(0.0, 0.0), k=0.0)
        x, y = rng.uniform(-0.5, 1023.5, n), rng.uniform(-0.5, 1023.5, n)
        ra, dec = tw.all_pix2world(x, y, 0)
        x, y = x + rng.normal(0, 0.025, n), y + rng.normal(0, 0.025, n)
        off = rng.uniform(0.3, 1.0) / 0.2
        ang = rng.uniform(0, 2 * np.pi)
        x[0] += off * np.cos(ang)
        y[0] += off * np.sin(ang)
        res = fit_wcs(
            x,
            y,
            ra,
            dec,
            crpix=(512.5, 512.5),
            weights=np.full(n, 1 / 0.005**2),
            image_shape=(1024, 1024),
        )
        assert not res.used[0] and res.used[1:].sum() >= n - 2
        g = np.linspace(-0.5, 1023.5, 21)
        gx, gy = (a.ravel() for a in np.meshgrid(g, g))
        tr, td = tw.all_pix2world(gx, gy, 0)
        fr, fd = res.wcs.all_pix2world(gx, gy, 0)
        err = np.sqrt(np.mean(((fr - tr) * np.cos(np.deg2rad(td))) ** 2 + (fd - td) ** 2)) * 3.6e6
        worse.append(err - clean)
        # A fit dragged by the outlier would be off by a good fraction of its offset.
        assert err < (30.0 if n == 5 else 15.0)
    assert np.median(worse) < (10.0 if n == 5 else 3.0)


def test_stars_in_one_corner_get_no_polynomial():
    """300 stars in one quadrant of a distorted CCD: no cubic extrapolated over the rest."""
    rng = np.random.default_rng(11)
    tw = true_wcs(rng, axis=(0.0, 0.0), k=_K_MOSAIC)
    x, y = rng.uniform(-0.5, 300, 300), rng.uniform(-0.5, 300, 300)
    ra, dec = tw.all_pix2world(x, y, 0)
    res = fit_wcs(
        x + rng.normal(0, 0.025, 300),
        y + rng.normal(0, 0.025, 300),
        ra,
        dec,
        crpix=(512.5, 512.5),
        weights=np.full(300, 1 / 0.005**2),
        image_shape=(1024, 1024),
    )
    assert res.max_order <= 2 and res.sip_order <= 2 and res.coverage < 0.1


def test_similarity_with_three_or_four_stars_keeps_the_parity():
    """3-4 stars: shift, rotation and scale only, with the parity asked for (or found)."""
    for mirrored in (False, True):
        rng = np.random.default_rng(12)
        tw = true_wcs(rng, axis=(512.5, 512.5), k=0.0, mirrored=mirrored)
        x, y = rng.uniform(0, 1023, 4), rng.uniform(0, 1023, 4)
        ra, dec = tw.all_pix2world(x, y, 0)
        for parity in (None, -1 if not mirrored else 1):
            res = fit_wcs(
                x, y, ra, dec, crpix=(512.5, 512.5), parity=parity, image_shape=(1024, 1024)
            )
            assert res.model == "similarity" and res.max_order == 0 and res.sip_order == 1
            assert np.sign(np.linalg.det(res.wcs.wcs.cd)) == (1 if mirrored else -1)
            assert res.rms_arcsec < 1e-4
            cd = res.wcs.wcs.cd
            assert abs(np.hypot(*cd[0]) - np.hypot(*cd[1])) < 1e-12  # one scale, no shear


# ----------------------------------------------------------------- matching
def test_match_is_robust_over_many_random_fields():
    """>= 49 of 50 seeded fields matched, all matches correct, offsets > star separation."""
    ok = 0
    for seed in range(50):
        rng = np.random.default_rng(100 + seed)
        offset = rng.uniform(30, 60)
        f = make_field(
            rng, offset=offset, rot=rng.uniform(1, 2), scale_err=rng.uniform(-0.03, 0.03)
        )
        # The offset is larger than the typical separation of the reference stars.
        on = np.isin(np.arange(len(f["ref_ra"])), f["truth"])
        separation = 1024 * 0.2 / np.sqrt(on.sum())
        assert offset > separation
        try:
            m = _match(f)
        except AstrometryError:
            continue
        correct = f["truth"][m.source_index] == m.reference_index
        assert correct.mean() > 0.98, seed
        assert m.n_matches >= 0.8 * on.sum()
        assert abs(m.offset_arcsec - offset) < 3.0
        ok += 1
    assert ok >= 49


@pytest.mark.parametrize("mirrored", [False, True])
def test_match_few_reference_stars_among_many_galaxies(mirrored):
    """5-10 reference stars among 50-300 detections (galaxy counts rising to 25 mag),
    header 30" and 2 deg off, either parity: every field with 6 or more detected stars is
    matched, and no match is ever wrong."""
    matched = 0
    for seed in range(18):
        rng = np.random.default_rng(5000 + seed)
        f = make_field(
            rng,
            n_ref=5 + seed % 6,
            n_det=(50, 120, 300)[seed % 3],
            offset=30.0,
            rot=2.0,
            scale_err=0.005,
            extra_mag=(18.0, 25.0),
            extra_slope=0.33,
            mirrored=mirrored,
        )
        on = int((f["truth"] >= 0).sum())
        assert np.sign(np.linalg.det(f["header_wcs"].pixel_scale_matrix)) == (1 if mirrored else -1)
        try:
            m = _match(f)
        except AstrometryError as err:
            assert on < 6, (seed, on, str(err))
            continue
        assert (f["truth"][m.source_index] == m.reference_index).all(), seed
        assert m.n_matches >= on - 1
        assert abs(m.offset_arcsec - 30.0) < 3.0 and abs(abs(m.rotation_deg) - 2.0) < 0.2
        matched += 1
    assert matched >= 12


def test_match_five_stars_confirmed_by_photometry():
    """5 detected reference stars among galaxies (0.05 mag photometric scatter): matched
    thanks to their zero points agreeing, always correctly; with the reference stars
    moved elsewhere on the sky (no true match), never matched."""
    tried = matched = 0
    for seed in range(40):
        rng = np.random.default_rng(7000 + seed)
        f = make_field(
            rng,
            n_ref=5,
            n_det=(50, 120, 300)[seed % 3],
            offset=30.0,
            rot=2.0,
            scale_err=0.005,
            extra_mag=(18.0, 25.0),
            extra_slope=0.33,
        )
        f["flux"] = f["flux"] * 10 ** (-0.4 * rng.normal(0, 0.05, len(f["flux"])))
        if int((f["truth"] >= 0).sum()) != 5:
            continue
        tried += 1
        null = dict(f)
        null["ref_ra"] = rng.permutation(f["ref_ra"]) + rng.uniform(-0.05, 0.05, len(f["ref_ra"]))
        null["ref_dec"] = rng.permutation(f["ref_dec"]) + rng.uniform(-0.05, 0.05, len(f["ref_ra"]))
        with pytest.raises(AstrometryError):
            _match(null)
        try:
            m = _match(f)
        except AstrometryError:
            continue
        assert (f["truth"][m.source_index] == m.reference_index).all(), seed
        matched += 1
    print(f"5-star fields matched: {matched} of {tried}")
    assert tried >= 5 and matched >= 0.8 * tried, (matched, tried)


def test_solve_astrometry_mirrored_detector_with_few_stars():
    """A mirrored detector (det CD > 0 in the header) with ~8 stars: the fitted WCS keeps
    the parity and puts the stars within 15 mas of the truth."""
    for seed in range(4):
        rng = np.random.default_rng(900 + seed)
        f = make_field(
            rng,
            n_ref=9,
            n_det=150,
            offset=30.0,
            rot=2.0,
            scale_err=0.005,
            extra_mag=(18.0, 25.0),
            extra_slope=0.33,
            mirrored=True,
        )
        w = 1.0 / ((f["sigma_px"] * 0.2) ** 2 + 0.005**2)
        m, res = solve_astrometry(
            f["x"],
            f["y"],
            f["flux"],
            f["ref_ra"],
            f["ref_dec"],
            f["ref_mag"],
            f["header_wcs"],
            image_shape=f["shape"],
            weights=w,
        )
        assert (f["truth"][m.source_index] == m.reference_index).all()
        assert np.linalg.det(res.wcs.wcs.cd) > 0 and res.model in ("similarity", "linear")
        bright = (f["truth"] >= 0) & (f["snr"] > 50)
        assert np.sqrt(np.mean(_error_vs_truth_mas(res.wcs, f, bright) ** 2)) < 15.0


def test_match_full_size_detector_and_big_endian_input():
    rng = np.random.default_rng(5)
    f = make_field(
        rng, nx=4096, ny=4096, n_ref=1500, n_det=3000, offset=60.0, rot=2.0, scale_err=0.04
    )
    for key in ("x", "y", "flux", "ref_ra", "ref_dec"):
        f[key] = f[key].astype(">f8")
    m = _match(f)
    assert (f["truth"][m.source_index] == m.reference_index).all()
    assert m.n_matches > 0.9 * (f["truth"] >= 0).sum()
    assert abs(abs(m.rotation_deg) - 2.0) < 0.05 and abs(m.scale - 1 / 1.04) < 0.005
    # The affine maps sources onto the header-WCS pixels of their reference stars.
    rx, ry = f["header_wcs"].all_world2pix(
        f["ref_ra"][m.reference_index], f["ref_dec"][m.reference_index], 0
    )
    xy1 = np.column_stack([f["x"][m.source_index], f["y"][m.source_index], np.ones(m.n_matches)])
    pred = xy1 @ m.affine.T
    assert np.median(np.hypot(pred[:, 0] - rx, pred[:, 1] - ry)) < 2.0


def test_match_failures_raise_astrometry_error():
    rng = np.random.default_rng(6)
    f = make_field(rng)
    with pytest.raises(AstrometryError, match="too few sources"):
        match_sources(
            f["x"][:2],
            f["y"][:2],
            f["flux"][:2],
            f["ref_ra"],
            f["ref_dec"],
            f["ref_mag"],
            f["header_wcs"],
        )
    with pytest.raises(AstrometryError, match="does not cover"):  # catalog elsewhere on the sky
        match_sources(
            f["x"],
            f["y"],
            f["flux"],
            np.mod(f["ref_ra"] + 5.0, 360),
            f["ref_dec"],
            f["ref_mag"],
            f["header_wcs"],
        )
    with pytest.raises(AstrometryError, match="no consistent pattern"):  # unrelated stars
        scramble = rng.permutation(len(f["ref_ra"]))
        match_sources(
            f["x"],
            f["y"],
            f["flux"],
            f["ref_ra"] + rng.normal(0, 0.01, len(scramble)),
            f["ref_dec"][scramble],
            f["ref_mag"],
            f["header_wcs"],
        )
    assert issubclass(AstrometryError, ValueError)


def test_solve_astrometry_and_rematch():
    rng = np.random.default_rng(7)
    f = make_field(rng, nx=2048, ny=2048, n_ref=300, n_det=600)
    w = 1.0 / ((f["sigma_px"] * 0.2) ** 2 + 0.005**2)
    m, res = solve_astrometry(
        f["x"],
        f["y"],
        f["flux"],
        f["ref_ra"],
        f["ref_dec"],
        f["ref_mag"],
        f["header_wcs"],
        image_shape=f["shape"],
        weights=w,
    )
    assert (f["truth"][m.source_index] == m.reference_index).mean() > 0.99
    bright = (f["truth"] >= 0) & (f["snr"] > 50)
    assert np.sqrt(np.mean(_error_vs_truth_mas(res.wcs, f, bright) ** 2)) < 5.0
    si, ri, sep = match_by_position(
        f["x"], f["y"], f["ref_ra"], f["ref_dec"], res.wcs, radius_arcsec=0.5
    )
    assert len(si) == len(set(ri)) and (sep <= 0.5).all()


# ----------------------------------------------- the built-in simulated survey
def test_tiny_survey_header_wcs_is_corrected():
    """True positions of tiny-survey stars, matched with the header WCS: fit within 10 mas."""
    from workflow_lib.core.config import RefcatColumns
    from workflow_lib.sim.presets import get_preset
    from workflow_lib.sim.scene import make_scene
    from workflow_lib.sim.survey import plan_survey
    from workflow_lib.sim.truth import reference_catalog
    from workflow_lib.single_frame.refcat import calibration_stars, standardize_refcat

    plan = plan_survey(get_preset("tiny"), 7)
    scene = make_scene(plan)
    cols = RefcatColumns(
        id="uniqueId",
        ra="raJ2000",
        dec="decJ2000",
        is_star="starnotgal",
        is_variable="isvariable",
        mags={"r": "lsst_r"},
        mag_errs={},
    )
    ref = calibration_stars(standardize_refcat(reference_catalog(plan, scene), cols))
    truth = scene.set_index("id")
    rng = np.random.default_rng(8)
    n = plan.preset.det_nx
    for visit in plan.visits["visit"].iloc[[0, -1]]:
        for det in plan.detectors:
            tw = plan.true_wcs(int(visit), det)
            true_wcs_astropy = WCS(fits.Header.fromstring(tw.header_string()))
            hw = WCS(fits.Header(plan.header_wcs(int(visit), det)))
            x, y = tw.sky_to_pixel(scene["ra"].to_numpy(), scene["dec"].to_numpy())
            on = (x > 0) & (x < n - 1) & (y > 0) & (y < n - 1) & (scene["r_mag"] < 24).to_numpy()
            xs = x[on] + rng.normal(0, 0.02, on.sum())
            ys = y[on] + rng.normal(0, 0.02, on.sum())
            flux = 10 ** (-0.4 * scene["r_mag"].to_numpy()[on])
            m, res = solve_astrometry(
                xs,
                ys,
                flux,
                ref["ra"].to_numpy(),
                ref["dec"].to_numpy(),
                ref["r_mag"].to_numpy(),
                hw,
                image_shape=(n, n),
            )
            ids = scene["id"].to_numpy()[on][m.source_index]
            assert (ids == ref["id"].to_numpy()[m.reference_index]).all()
            assert m.n_matches >= 30
            # Positions of the matched stars vs truth, through the fitted WCS.
            ra, dec = res.wcs.all_pix2world(x[on][m.source_index], y[on][m.source_index], 0)
            t = truth.loc[ids]
            d = np.hypot((ra - t["ra"]) * np.cos(np.deg2rad(t["dec"])), dec - t["dec"]) * 3.6e6
            assert np.sqrt(np.mean(d**2)) < 10.0
            # And the fitted WCS agrees with the true one over the detector.
            g = np.linspace(0, n - 1, 9)
            gx, gy = np.meshgrid(g, g)
            r1, d1 = res.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
            r2, d2 = true_wcs_astropy.all_pix2world(gx.ravel(), gy.ravel(), 0)
            dd = np.hypot((r1 - r2) * np.cos(np.deg2rad(d2)), d1 - d2) * 3.6e6
            assert np.sqrt(np.mean(dd**2)) < 15.0


def _pulled_case(seed: int, n: int = 38, quoted_mas: float = 30.0):
    """A 2"-seeing CCD: ``n`` stars over a 1024^2 detector at the corner of the simulator's
    mosaic (radial distortion about the boresight), 25 mas of centroid noise quoted as 30,
    and half the stars pulled ~110 mas towards a random neighbour (as in the camera
    preset seeing_2.0). Returns (fit, rms of its error over the CCD against truth, the
    largest error in the central 80 % of each axis), mas."""
    nx = 1024
    rng = np.random.default_rng(seed)
    tw = true_wcs(rng, axis=(0.0, 0.0), k=_K_MOSAIC)
    x, y = rng.uniform(-0.5, nx - 0.5, n), rng.uniform(-0.5, nx - 0.5, n)
    ra, dec = tw.all_pix2world(x, y, 0)
    off = rng.normal(0.0, 25.0 / 200.0 / np.sqrt(2.0), (n, 2))
    pulled = rng.random(n) < 0.5
    ang = rng.uniform(0.0, 2.0 * np.pi, n)
    mag = rng.rayleigh(110.0 / 200.0 / np.sqrt(2.0), n)
    off[pulled] += np.column_stack([mag * np.cos(ang), mag * np.sin(ang)])[pulled]
    w = np.full(n, 1.0 / (quoted_mas / 1000.0) ** 2)
    res = fit_wcs(
        x + off[:, 0],
        y + off[:, 1],
        ra,
        dec,
        crpix=((nx + 1) / 2, (nx + 1) / 2),
        weights=w,
        image_shape=(nx, nx),
        boresight=tuple(float(c) for c in tw.wcs.crval),
    )
    g = np.linspace(-0.5, nx - 0.5, 21)
    gx, gy = (a.ravel() for a in np.meshgrid(g, g))
    tr, td = tw.all_pix2world(gx, gy, 0)
    fr, fd = res.wcs.all_pix2world(gx, gy, 0)
    err = np.hypot((fr - tr) * np.cos(np.deg2rad(td)), fd - td) * 3.6e6
    central = (np.abs(gx - nx / 2) <= 0.4 * nx) & (np.abs(gy - nx / 2) <= 0.4 * nx)
    return res, float(np.sqrt(np.mean(err**2))), float(err[central].max())


def test_noisy_centroids_do_not_trade_the_radial_model_for_a_cubic():
    """Regression (camera preset seeing_2.0, visit 400107 detector 1): 38 stars whose
    centroids neighbours pull by ~100 mas. The cubic SIP, the default from 30 stars on,
    kept its place against a radial model of equal score and was 60-100 mas rms off over
    the CCD (up to ~145 mas in its central 80 %, ~300-400 at a corner) in 4 of 20 such
    fields. With the boresight the radial model is the default; SIP must beat it."""
    rms, central = [], []
    for seed in range(20):
        res, e_rms, e_central = _pulled_case(seed)
        rms.append(e_rms)
        central.append(e_central)
        assert e_rms <= 60.0 and e_central <= 100.0, (seed, res.model, e_rms, e_central)
    assert np.median(rms) <= 30.0, rms


def test_boresight_does_not_keep_sip_from_a_non_radial_distortion():
    """With many stars a distortion the radial model cannot describe (a quadratic term,
    ~1 px at the edges) still gets a SIP polynomial, boresight or not."""
    nx, n = 1024, 300
    rng = np.random.default_rng(7)
    tw = true_wcs(rng, axis=(0.0, 0.0), k=_K_MOSAIC)
    tw.sip.a[2, 0] += 1.0 / 512.0**2
    tw.sip.b[0, 2] -= 0.7 / 512.0**2
    tw = WCS(tw.to_header(relax=True))
    x, y = rng.uniform(-0.5, nx - 0.5, n), rng.uniform(-0.5, nx - 0.5, n)
    ra, dec = tw.all_pix2world(x, y, 0)
    xo, yo = x + rng.normal(0, 0.025, n), y + rng.normal(0, 0.025, n)
    res = fit_wcs(
        xo,
        yo,
        ra,
        dec,
        crpix=((nx + 1) / 2, (nx + 1) / 2),
        weights=np.full(n, 1.0 / 0.005**2),
        image_shape=(nx, nx),
        boresight=tuple(float(c) for c in tw.wcs.crval),
    )
    assert res.model.startswith("sip") and res.sip_order >= 2, res.model
    assert res.rms_arcsec < 0.015
