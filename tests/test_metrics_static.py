"""Static-sky quality metrics against the truth (workflow_lib.qa.metrics, issue 4)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic_sky import Scene, exposure_from, moffat_psf, psf_kernel, render_band, tan_wcs

from workflow_lib.core.flags import ForcedSourceFlag
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.objects import measure_objects as objects
from workflow_lib.qa import metrics

RA0, DEC0 = 56.0, -30.0
ARCSEC = 1.0 / 3600.0


def _truth(rng, n_star=400, n_gal=100, half_arcmin=3.0):
    n = n_star + n_gal
    dec = DEC0 + rng.uniform(-half_arcmin, half_arcmin, n) / 60.0
    ra = RA0 + rng.uniform(-half_arcmin, half_arcmin, n) / 60.0 / np.cos(np.deg2rad(DEC0))
    return pd.DataFrame(
        {
            "id": np.arange(n) + 1000,
            "kind": ["star"] * n_star + ["galaxy"] * n_gal,
            "ra": ra,
            "dec": dec,
            "r_mag": rng.uniform(18.0, 26.0, n),
            "hlr_arcsec": np.r_[np.zeros(n_star), rng.uniform(0.3, 1.5, n_gal)],
        }
    )


def _objects_from(truth, rows, *, offsets_arcsec=0.05, rng, flux_scale=1.0, snr=200.0):
    """An Object table with one primary row per truth row in ``rows`` (r band)."""
    sel = truth.loc[rows]
    n = len(sel)
    flux = 10 ** (-0.4 * (sel["r_mag"].to_numpy() - 31.4)) * flux_scale
    return pd.DataFrame(
        {
            "objectId": np.arange(n) + 1,
            "ra": sel["ra"].to_numpy()
            + rng.normal(0, offsets_arcsec, n) * ARCSEC / np.cos(np.deg2rad(DEC0)),
            "dec": sel["dec"].to_numpy() + rng.normal(0, offsets_arcsec, n) * ARCSEC,
            "detect_isPrimary": np.ones(n, dtype=bool),
            "refBand": "r",
            "r_psfFlux": flux,
            "r_psfFluxErr": flux / snr,
            "r_detected": np.ones(n, dtype=bool),
            "r_flags": np.zeros(n, dtype=np.int64),
        }
    )


def test_completeness_fit_recovers_the_50_percent_magnitude():
    rng = np.random.default_rng(1)
    truth = _truth(rng, n_star=3000, n_gal=0)
    mag = truth["r_mag"].to_numpy()
    found = rng.uniform(size=len(truth)) < 0.98 / (1 + np.exp((mag - 24.5) / 0.15))
    table = _objects_from(truth, truth.index[found], rng=rng)
    region = lambda ra, dec: np.ones(np.size(ra), dtype=bool)  # noqa: E731
    result = metrics.point_source_completeness(
        table, truth, band="r", depth_mag=24.4, region=region
    )
    assert result["m50"] == pytest.approx(24.5, abs=0.05)
    assert result["c_max"] == pytest.approx(0.98, abs=0.02)
    assert result["passed"] and result["m50_minus_depth"] == pytest.approx(0.1, abs=0.05)
    assert not metrics.point_source_completeness(
        table, truth, band="r", depth_mag=24.0, region=region
    )["passed"]
    # Objects not detected in the band do not count.
    table["r_detected"] = False
    assert metrics.point_source_completeness(table, truth, band="r", region=region)["n_found"] == 0


def test_purity_counts_unmatched_objects_and_allows_galaxy_sizes():
    rng = np.random.default_rng(2)
    truth = _truth(rng)
    table = _objects_from(truth, truth.index, rng=rng)
    galaxy = truth.index[truth["kind"] == "galaxy"][0]
    # A galaxy detected 1.2 hlr off its centre still matches (within 2 hlr).
    table.loc[galaxy, "dec"] = (
        truth.loc[galaxy, "dec"] + 1.2 * truth.loc[galaxy, "hlr_arcsec"] * ARCSEC
    )
    assert metrics.object_purity(table, truth)["purity"] == 1.0
    spurious = table.iloc[:8].copy()
    spurious["dec"] += 20 * ARCSEC
    spurious["objectId"] += 10_000
    result = metrics.object_purity(pd.concat([table, spurious], ignore_index=True), truth)
    assert result["n_unmatched"] == 8 and not result["passed"]
    assert set(result["unmatched_object_ids"]) <= set(spurious["objectId"])
    # Faint spurious objects (S/N < 10) do not count.
    spurious["r_psfFluxErr"] = spurious["r_psfFlux"] / 5.0
    result = metrics.object_purity(pd.concat([table, spurious], ignore_index=True), truth)
    assert result["n_unmatched"] == 0 and result["passed"]


def test_bright_star_bias_in_mmag_and_isolation():
    rng = np.random.default_rng(3)
    truth = _truth(rng, n_star=300, n_gal=0)
    truth["r_mag"] = rng.uniform(17.0, 20.0, len(truth))
    table = _objects_from(truth, truth.index, rng=rng, flux_scale=10 ** (-0.4 * 0.003))
    result = metrics.bright_star_flux_bias(table, truth, band="r")
    assert result["median_mmag"] == pytest.approx(3.0, abs=0.01)
    assert result["passed"]
    # A bright truth neighbour 1 arcsec away removes a star from the sample.
    neighbour = truth.iloc[[0]].copy()
    neighbour["id"] = 99
    neighbour["dec"] += 1.0 * ARCSEC
    neighbour["r_mag"] = truth["r_mag"].iloc[0] - 1.0
    crowded = pd.concat([truth, neighbour], ignore_index=True)
    assert (
        metrics.bright_star_flux_bias(table, crowded, band="r")["n_stars"] == result["n_stars"] - 1
    )
    biased = _objects_from(truth, truth.index, rng=rng, flux_scale=10 ** (-0.4 * 0.01))
    assert not metrics.bright_star_flux_bias(biased, truth, band="r")["passed"]


def _forced_rows(truth, table, rng, *, err_scale=1.0, visits=8):
    flux = 10 ** (-0.4 * (truth["r_mag"].to_numpy() - 31.4))
    rows = []
    for visit in range(visits):
        err = np.sqrt(200.0**2 + 5.0 * flux)  # sky + photon noise
        rows.append(
            pd.DataFrame(
                {
                    "objectId": table["objectId"].to_numpy(),
                    "visit": visit,
                    "detector": 0,
                    "band": "r",
                    "midpointMjdTai": 60600.0 + visit,
                    "psfFlux": flux + rng.normal(0, 1, len(flux)) * err,
                    "psfFluxErr": err * err_scale,
                    "flags": np.zeros(len(flux), dtype=np.int64),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def test_forced_pulls_detect_wrong_errors():
    rng = np.random.default_rng(4)
    truth = _truth(rng, n_star=500, n_gal=0)
    truth["r_mag"] = rng.uniform(20.0, 25.0, len(truth))
    table = _objects_from(truth, truth.index, rng=rng)
    good = metrics.forced_photometry_pulls(_forced_rows(truth, table, rng), table, truth)
    assert good["n"] > 1000 and 0.93 < good["sigma"] < 1.07 and good["passed"]
    assert abs(good["median"]) < 0.1
    small = metrics.forced_photometry_pulls(
        _forced_rows(truth, table, rng, err_scale=0.8), table, truth
    )
    assert small["sigma"] > 1.15 and not small["passed"]
    flagged = _forced_rows(truth, table, rng, err_scale=0.8)
    flagged["flags"] = int(ForcedSourceFlag.EDGE)
    assert metrics.forced_photometry_pulls(flagged, table, truth)["n"] == 0


def test_transients_dark_in_the_template_window_must_not_be_objects():
    rng = np.random.default_rng(5)
    truth = _truth(rng, n_star=50, n_gal=10)
    host = truth.index[truth["kind"] == "galaxy"][0]
    transients = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "kind": "transient",
            # 1: on its host, 0.5" off centre; 2: hostless; 3: bright in the template window.
            "ra": [truth.loc[host, "ra"], RA0 + 0.01, RA0 - 0.01],
            "dec": [truth.loc[host, "dec"] + 0.5 * ARCSEC, DEC0 + 0.01, DEC0 - 0.01],
            "r_mag": 21.0,
            "hlr_arcsec": 0.0,
        }
    )
    truth = pd.concat([truth, transients], ignore_index=True)
    lightcurve = pd.DataFrame(
        {
            "id": [1, 1, 2, 2, 3, 3],
            "visit": [10, 11, 10, 11, 10, 11],
            "mjd": [60600.0, 60700.0] * 3,
            "flux": [0.0, 5e4, 0.0, 5e4, 3e4, 5e4],
        }
    )
    statics = truth.index[truth["kind"] != "transient"]
    template = _objects_from(truth, statics, rng=rng, offsets_arcsec=0.02)
    check = dict(mjd_min=None, mjd_max=60630.0)
    result = metrics.transients_absent_from_template(template, truth, lightcurve, **check)
    assert result["n_transients_checked"] == 2 and result["passed"]
    # The hostless transient showing up in the template is caught; transient 3 is allowed.
    with_transients = pd.concat(
        [
            template,
            _objects_from(
                truth, truth.index[truth["id"].isin([2, 3])], rng=rng, offsets_arcsec=0.02
            ),
        ],
        ignore_index=True,
    )
    result = metrics.transients_absent_from_template(with_transients, truth, lightcurve, **check)
    assert result["detected_ids"] == [2] and not result["passed"]


def test_detection_completeness_reaches_the_predicted_depth():
    """End to end on a synthetic coadd: detection at 5 sigma finds half the stars at the
    5-sigma depth that coadd_psf_depth predicts from the variance plane and the PSF."""
    rng = np.random.default_rng(6)
    shape = (420, 420)
    sky = 20.0
    profile = moffat_psf(3.8)
    psf = PsfModel.constant(psf_kernel(profile))
    wcs = tan_wcs(shape)
    empty = exposure_from(np.zeros(shape), np.full(shape, sky**2), wcs=wcs, psf=psf)
    depth = objects.coadd_psf_depth(empty)["depth_median"]
    n = 500
    x = rng.uniform(10, shape[1] - 10, n)
    y = rng.uniform(10, shape[0] - 10, n)
    mag = rng.uniform(depth - 1.2, depth + 1.0, n)
    flux = 10 ** (-0.4 * (mag - 31.4))
    scene = Scene(x, y, {"r": flux}, np.array(["star"] * n), np.zeros(n))
    image, variance = render_band(shape, scene, "r", profile, sky_sigma=sky, rng=rng)
    coadd = exposure_from(image, variance, wcs=wcs, psf=psf)
    detections = objects.detect_coadd_sources(coadd)
    # The depth of the real coadd with its measured noise factor (white noise here, but
    # 250 undetected stars in 420^2 pixels add ~15% of confusion noise), as detection uses.
    measured = objects.coadd_psf_depth(coadd)
    assert 1.0 <= measured["noise_factor"] < 1.3
    depth = measured["depth_median"]
    merged = objects.merge_detections({"r": detections}, wcs)
    table = objects.measure_objects({"r": coadd}, merged, id_base=0)
    ra, dec = wcs.all_pix2world(x, y, 0)
    truth = pd.DataFrame(
        {"id": np.arange(n), "kind": "star", "ra": ra, "dec": dec, "r_mag": mag, "hlr_arcsec": 0.0}
    )
    inner = lambda r, d: np.ones(np.size(r), dtype=bool)  # noqa: E731
    result = metrics.point_source_completeness(
        table, truth, band="r", depth_mag=depth, region=inner
    )
    assert result["passed"], result
    assert result["c_max"] > 0.9
    # Against the variance-plane depth (no noise factor) too.
    plain = objects.coadd_psf_depth(coadd, noise_factor=1.0)["depth_median"]
    assert abs(result["m50"] - plain) <= 0.3


def test_systematic_floor_of_bright_star_pulls():
    rng = np.random.default_rng(7)
    truth = _truth(rng, n_star=500, n_gal=0)
    truth["r_mag"] = rng.uniform(17.0, 20.0, len(truth))
    table = _objects_from(truth, truth.index, rng=rng)
    rows = _forced_rows(truth, table, rng)
    true = 10 ** (-0.4 * (truth.set_index("id").loc[1000 + rows["objectId"] - 1, "r_mag"] - 31.4))
    # A 2% calibration scatter on top of the (correct) statistical errors.
    rows["psfFlux"] += rng.normal(0.0, 0.02, len(rows)) * true.to_numpy()
    result = metrics.forced_photometry_pulls(rows, table, truth)
    assert result["systematic_floor_mmag"] == pytest.approx(21.7, rel=0.1)
    assert result["by_snr"]["100-1e+09"]["sigma"] > 2.0


def test_completeness_not_reaching_half_gives_a_lower_limit():
    rng = np.random.default_rng(9)
    truth = _truth(rng, n_star=800, n_gal=0)
    truth["r_mag"] = rng.uniform(18.0, 24.0, len(truth))
    table = _objects_from(truth, truth.index, rng=rng)  # all found
    region = lambda ra, dec: np.ones(np.size(ra), dtype=bool)  # noqa: E731
    deep = metrics.point_source_completeness(table, truth, band="r", depth_mag=26.0, region=region)
    assert not deep["m50_reached"] and np.isnan(deep["m50"])
    assert deep["m50_lower_limit"] == pytest.approx(23.4, abs=0.1)
    assert deep["passed"] is None
    shallow = metrics.point_source_completeness(
        table, truth, band="r", depth_mag=22.0, region=region
    )
    assert shallow["passed"] is False


@pytest.mark.parametrize("coadd_loss", [1.0, 1.3])
def test_depth_gain_compares_coadd_errors_with_the_inputs_combined(coadd_loss):
    # 50 point sources seen on 4 to 12 calexps of unequal depth; the coadd error is the
    # inverse-variance combination times coadd_loss (1: the full sqrt(N) gain).
    rng = np.random.default_rng(3)
    rows, ids, coadd_err = [], np.arange(1, 51), []
    for obj in ids:
        n = int(rng.integers(4, 13))
        err = rng.uniform(80.0, 160.0, n)
        coadd_err.append(coadd_loss / np.sqrt(np.sum(1.0 / err**2)))
        rows.append(
            pd.DataFrame(
                {"objectId": obj, "band": "r", "psfFlux": 1e3, "psfFluxErr": err, "flags": 0}
            )
        )
    forced = pd.concat(rows, ignore_index=True)
    coadd_err = np.array(coadd_err)
    table = pd.DataFrame(
        {
            "objectId": ids,
            "detect_isPrimary": True,
            "refExtendedness": 0.0,
            "r_psfFlux": 20.0 * coadd_err,
            "r_psfFluxErr": coadd_err,
            "r_flags": 0,
        }
    )
    gain = metrics.coadd_depth_gain(table, forced, band="r")
    assert gain["n"] == 50
    assert gain["ratio"] == pytest.approx(coadd_loss, rel=1e-6)
    assert gain["passed"] == (coadd_loss == 1.0)
    # Equal-ish inputs: the gain in magnitudes follows 1.25 log10(N) when nothing is lost.
    if coadd_loss == 1.0:
        assert gain["gain_mag"] == pytest.approx(gain["expected_gain_mag"], abs=0.1)


def test_data_footprint_selects_stars_where_a_coadd_has_data():
    from astropy.wcs import WCS

    from workflow_lib.steps.quality import DataFootprint

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [56.0, -31.0]
    wcs.wcs.crpix = [50.5, 50.5]
    wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    has_data = np.zeros((100, 100), dtype=bool)
    has_data[:, :60] = True  # the right side of the coadd is a hole
    footprint = DataFootprint()
    footprint.add(wcs, has_data)
    x = np.array([10.0, 59.4, 60.6, 95.0, 150.0])
    ra, dec = wcs.all_pix2world(x, np.full(x.size, 40.0), 0)
    np.testing.assert_array_equal(footprint(ra, dec), [True, True, False, False, False])
    shifted = wcs.deepcopy()
    shifted.wcs.crpix = [-49.5, 50.5]  # a second coadd further along, with data everywhere
    footprint.add(shifted, np.ones((100, 100), dtype=bool))
    np.testing.assert_array_equal(footprint(ra, dec), [True, True, False, False, True])
