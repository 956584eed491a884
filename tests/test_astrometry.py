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

from workflow_lib.astrometry import (
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


def true_wcs(rng: np.random.Generator, *, scale: float = 0.2) -> WCS:
    """TAN-SIP with CRPIX at an optical axis ~7000 px off the detector, random rotation."""
    w = WCS(naxis=2)
    rot = np.deg2rad(rng.uniform(-180, 180))
    s = scale / 3600.0
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [rng.uniform(0, 360), rng.uniform(-70, 30)]
    w.wcs.crpix = [-6000.0 + rng.uniform(-500, 500), -4000.0 + rng.uniform(-500, 500)]
    w.wcs.cd = s * np.array([[-np.cos(rot), np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    k = 8.0 / 15000.0**3  # 8 px at 15000 px from the axis
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
) -> dict:
    """A synthetic detector: detections, reference catalog, truth and header WCS."""
    tw = true_wcs(rng)
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
            10 ** (-0.4 * (rng.uniform(20, 25, n_extra) - 31.5)),
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
        f["tx"][star], f["ty"][star], f["true_ra"][i], f["true_dec"][i],
        crpix=(2048.5, 2048.5), image_shape=f["shape"],
    )  # fmt: skip
    assert res.sip_order == 3 and res.n_used == star.sum()
    assert res.wcs.wcs.ctype[0] == "RA---TAN-SIP" and res.wcs.wcs.ctype[1] == "DEC--TAN-SIP"
    assert res.rms_arcsec * 1000 < 0.01
    # CRVAL is the sky position of CRPIX.
    ra_c, dec_c = f["true_wcs"].all_pix2world(2047.5, 2047.5, 0)
    assert np.hypot((res.wcs.wcs.crval[0] - ra_c) * np.cos(np.deg2rad(dec_c)),
                    res.wcs.wcs.crval[1] - dec_c) < 0.01 * MAS  # fmt: skip
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
    res = fit_wcs(x, y, f["ref_ra"][ri], f["ref_dec"][ri], crpix=(2048.5, 2048.5), weights=w,
                  image_shape=f["shape"])  # fmt: skip
    assert not res.used[bad].any()
    assert res.used.mean() > 0.95
    bright = (f["truth"] >= 0) & (f["snr"] > 50)
    err = _error_vs_truth_mas(res.wcs, f, bright)
    assert np.sqrt(np.mean(err**2)) < 5.0
    # Residuals are (east, north) arcsec and consistent with the errors put in.
    pull = res.residuals[res.used] / np.sqrt(sig_arcsec[res.used, None] ** 2 + 0.005**2)
    assert 0.8 < np.std(pull) < 1.2


def test_fit_wcs_lowers_the_order_with_few_stars_and_fails_with_too_few():
    rng = np.random.default_rng(4)
    f = make_field(rng, nx=2048, ny=2048, n_ref=400, n_det=400)
    star = np.flatnonzero(f["truth"] >= 0)
    i = f["truth"][star]
    orders = {}
    for n in (40, 20, 8):
        res = fit_wcs(f["tx"][star[:n]], f["ty"][star[:n]], f["true_ra"][i[:n]],
                      f["true_dec"][i[:n]], crpix=(1024.5, 1024.5))  # fmt: skip
        orders[n] = res.sip_order
        # A lower order still fits the detector to well under a pixel.
        assert res.rms_arcsec < 0.05
    assert orders == {40: 3, 20: 2, 8: 1}
    res = fit_wcs(f["tx"][star[:8]], f["ty"][star[:8]], f["true_ra"][i[:8]],
                  f["true_dec"][i[:8]], crpix=(1024.5, 1024.5))  # fmt: skip
    assert res.wcs.wcs.ctype[0] == "RA---TAN" and res.wcs.sip is None
    with pytest.raises(AstrometryError, match="too few stars"):
        fit_wcs(f["tx"][star[:2]], f["ty"][star[:2]], f["true_ra"][i[:2]], f["true_dec"][i[:2]],
                crpix=(1024.5, 1024.5))  # fmt: skip


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


def test_match_full_size_detector_and_big_endian_input():
    rng = np.random.default_rng(5)
    f = make_field(rng, nx=4096, ny=4096, n_ref=1500, n_det=3000, offset=60.0, rot=2.0,
                   scale_err=0.04)  # fmt: skip
    for key in ("x", "y", "flux", "ref_ra", "ref_dec"):
        f[key] = f[key].astype(">f8")
    m = _match(f)
    assert (f["truth"][m.source_index] == m.reference_index).all()
    assert m.n_matches > 0.9 * (f["truth"] >= 0).sum()
    assert abs(abs(m.rotation_deg) - 2.0) < 0.05 and abs(m.scale - 1 / 1.04) < 0.005
    # The affine maps sources onto the header-WCS pixels of their reference stars.
    rx, ry = f["header_wcs"].all_world2pix(f["ref_ra"][m.reference_index],
                                           f["ref_dec"][m.reference_index], 0)  # fmt: skip
    xy1 = np.column_stack([f["x"][m.source_index], f["y"][m.source_index], np.ones(m.n_matches)])
    pred = xy1 @ m.affine.T
    assert np.median(np.hypot(pred[:, 0] - rx, pred[:, 1] - ry)) < 2.0


def test_match_failures_raise_astrometry_error():
    rng = np.random.default_rng(6)
    f = make_field(rng)
    with pytest.raises(AstrometryError, match="too few sources"):
        match_sources(f["x"][:2], f["y"][:2], f["flux"][:2], f["ref_ra"], f["ref_dec"],
                      f["ref_mag"], f["header_wcs"])  # fmt: skip
    with pytest.raises(AstrometryError, match="does not cover"):  # catalog elsewhere on the sky
        match_sources(f["x"], f["y"], f["flux"], np.mod(f["ref_ra"] + 5.0, 360), f["ref_dec"],
                      f["ref_mag"], f["header_wcs"])  # fmt: skip
    with pytest.raises(AstrometryError, match="no consistent pattern"):  # unrelated stars
        scramble = rng.permutation(len(f["ref_ra"]))
        match_sources(f["x"], f["y"], f["flux"], f["ref_ra"] + rng.normal(0, 0.01, len(scramble)),
                      f["ref_dec"][scramble], f["ref_mag"], f["header_wcs"])  # fmt: skip
    assert issubclass(AstrometryError, ValueError)


def test_solve_astrometry_and_rematch():
    rng = np.random.default_rng(7)
    f = make_field(rng, nx=2048, ny=2048, n_ref=300, n_det=600)
    w = 1.0 / ((f["sigma_px"] * 0.2) ** 2 + 0.005**2)
    m, res = solve_astrometry(
        f["x"], f["y"], f["flux"], f["ref_ra"], f["ref_dec"], f["ref_mag"], f["header_wcs"],
        image_shape=f["shape"], weights=w,
    )  # fmt: skip
    assert (f["truth"][m.source_index] == m.reference_index).mean() > 0.99
    bright = (f["truth"] >= 0) & (f["snr"] > 50)
    assert np.sqrt(np.mean(_error_vs_truth_mas(res.wcs, f, bright) ** 2)) < 5.0
    si, ri, sep = match_by_position(f["x"], f["y"], f["ref_ra"], f["ref_dec"], res.wcs,
                                    radius_arcsec=0.5)  # fmt: skip
    assert len(si) == len(set(ri)) and (sep <= 0.5).all()


# ----------------------------------------------- the built-in simulated survey
def test_tiny_survey_header_wcs_is_corrected():
    """True positions of tiny-survey stars, matched with the header WCS: fit within 10 mas."""
    from workflow_lib.config import RefcatColumns
    from workflow_lib.refcat import calibration_stars, standardize_refcat
    from workflow_lib.sim.presets import get_preset
    from workflow_lib.sim.scene import make_scene
    from workflow_lib.sim.survey import plan_survey
    from workflow_lib.sim.truth import reference_catalog

    plan = plan_survey(get_preset("tiny"), 7)
    scene = make_scene(plan)
    cols = RefcatColumns(id="uniqueId", ra="raJ2000", dec="decJ2000", is_star="starnotgal",
                         is_variable="isvariable", mags={"r": "lsst_r"}, mag_errs={})  # fmt: skip
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
                xs, ys, flux, ref["ra"].to_numpy(), ref["dec"].to_numpy(),
                ref["r_mag"].to_numpy(), hw, image_shape=(n, n),
            )  # fmt: skip
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
