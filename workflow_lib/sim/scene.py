"""The simulated sky: stars, galaxies, transients and variable stars, with light curves.

Numpy only. The scene is one table (the ``truth_object`` table) generated from
the seed; every exposure job re-reads it, so all visits see the same sky.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from workflow_lib.sim.optics import ARCSEC, tan_deproject
from workflow_lib.sim.presets import BAND_ORDER
from workflow_lib.sim.seeds import rng_for
from workflow_lib.sim.survey import SurveyPlan

STAR_ID0 = 1_000_000
GALAXY_ID0 = 2_000_000
TRANSIENT_ID0 = 3_000_000
VARIABLE_ID0 = 4_000_000
STAR_MAG_RANGE = (15.0, 25.0)  # r
GALAXY_MAG_MIN = 17.5  # r; the faint end is the preset's galaxy_mag_max
SERSIC_N_CHOICES = (1.0, 1.5, 2.5, 4.0)  # discrete so GalSim caches Sersic tables


def _power_law_mags(rng: np.random.Generator, n: int, m0: float, m1: float, slope: float):
    """Magnitudes with dN/dm proportional to 10^(slope m) on [m0, m1]."""
    a, b = 10 ** (slope * m0), 10 ** (slope * m1)
    return np.log10(a + rng.uniform(size=n) * (b - a)) / slope


def _colours(rng: np.random.Generator, r: np.ndarray, *, galaxy: bool) -> dict[str, np.ndarray]:
    n = len(r)
    gr = rng.uniform(0.2, 1.2, n) if galaxy else rng.uniform(0.3, 1.4, n)
    ri = (
        (0.15 + 0.35 * gr + rng.normal(0, 0.05, n))
        if galaxy
        else (0.4 * gr + rng.normal(0, 0.04, n))
    )
    iz = 0.5 * ri + rng.normal(0, 0.03, n)
    zy = 0.3 * iz + rng.normal(0, 0.03, n)
    ug = 1.2 * gr + rng.normal(0, 0.1, n) + (0.3 if galaxy else 0.5)
    g = r + gr
    i = r - ri
    z = i - iz
    return {"u": g + ug, "g": g, "r": r, "i": i, "z": z, "y": z - zy}


def scene_half_width_deg(plan: SurveyPlan) -> float:
    """Half-size of the square sky patch that covers every dithered, rotated visit."""
    p = plan.preset
    dmax = float(np.max(np.hypot(plan.visits["dx_px"], plan.visits["dy_px"])))
    return (plan.fp_radius + dmax + 50.0) * p.pixel_scale * ARCSEC


def make_scene(plan: SurveyPlan) -> pd.DataFrame:
    """Generate the truth_object table of the survey (one row per object)."""
    p = plan.preset
    rng = rng_for(plan.seed, "scene", p.name)
    half = scene_half_width_deg(plan)
    area = (2 * half) ** 2
    bands = BAND_ORDER

    def positions(n: int) -> tuple[np.ndarray, np.ndarray]:
        return tan_deproject(
            rng.uniform(-half, half, n), rng.uniform(-half, half, n), p.ra0, p.dec0
        )

    # Stars: star_density counts those with STAR_MAG_RANGE[0] < r < STAR_MAG_RANGE[1].
    n_star = rng.poisson(p.star_density * area)
    r_star = _power_law_mags(rng, n_star, *STAR_MAG_RANGE, p.star_slope)
    ra, dec = positions(n_star)
    stars = pd.DataFrame({"id": STAR_ID0 + np.arange(n_star), "kind": "star", "ra": ra, "dec": dec})
    for b, m in _colours(rng, r_star, galaxy=False).items():
        stars[f"{b}_mag"] = m

    # Galaxies: single Sersic, sizes shrinking with magnitude; galaxy_density
    # counts those with GALAXY_MAG_MIN < r < galaxy_mag_max.
    n_gal = rng.poisson(p.galaxy_density * area)
    r_gal = _power_law_mags(rng, n_gal, GALAXY_MAG_MIN, p.galaxy_mag_max, p.galaxy_slope)
    ra, dec = positions(n_gal)
    gals = pd.DataFrame(
        {"id": GALAXY_ID0 + np.arange(n_gal), "kind": "galaxy", "ra": ra, "dec": dec}
    )
    for b, m in _colours(rng, r_gal, galaxy=True).items():
        gals[f"{b}_mag"] = m
    gals["sersic_n"] = rng.choice(SERSIC_N_CHOICES, size=n_gal, p=(0.45, 0.2, 0.15, 0.2))
    med_hlr = np.clip(0.35 + 0.12 * (24.0 - r_gal), 0.25, 1.2)
    gals["hlr_arcsec"] = np.clip(med_hlr * rng.lognormal(0.0, 0.35, n_gal), 0.2, 1.5)
    emag = np.clip(np.abs(rng.normal(0.0, 0.25, n_gal)), 0.0, 0.7)
    beta = rng.uniform(0.0, np.pi, n_gal)
    gals["e1"], gals["e2"] = emag * np.cos(2 * beta), emag * np.sin(2 * beta)

    variables = _make_variables(plan, rng)
    transients = _make_transients(plan, rng, gals)
    scene = pd.concat([stars, gals, transients, variables], ignore_index=True)
    for col in (
        "sersic_n",
        "hlr_arcsec",
        "e1",
        "e2",
        "t0_mjd",
        "bazin_t0_mjd",
        "rise_days",
        "fall_days",
        "period_days",
        "amplitude_mag",
        "phase",
    ):
        if col not in scene:
            scene[col] = np.nan
        scene[col] = scene[col].astype(np.float64)
    scene["host_id"] = scene["host_id"].fillna(-1).astype(np.int64) if "host_id" in scene else -1
    scene["id"] = scene["id"].astype(np.int64)
    scene["kind"] = scene["kind"].astype(str)
    point = scene["kind"].isin(["star", "variable"])
    in_ref = point & (scene["r_mag"] < p.refcat_mag_limit)
    bright_gal = scene.index[scene["kind"] == "galaxy"][
        np.argsort(scene.loc[scene["kind"] == "galaxy", "r_mag"].to_numpy())[:3]
    ]
    in_ref[bright_gal] = True
    scene["in_refcat"] = in_ref.astype(bool)
    keep = ["id", "kind", "ra", "dec", *[f"{b}_mag" for b in bands if b in p.bands]]
    band_mags = {f"{b}_mag" for b in bands}
    rest = [c for c in scene.columns if c not in keep and c not in band_mags]
    return scene[keep + rest].reset_index(drop=True)


def _make_variables(plan: SurveyPlan, rng: np.random.Generator) -> pd.DataFrame:
    p = plan.preset
    n = p.n_variables
    ra, dec = _central_positions(plan, rng, n, margin=30.0, band=None)
    r = rng.uniform(16.5, 20.0, n)
    df = pd.DataFrame({"id": VARIABLE_ID0 + np.arange(n), "kind": "variable", "ra": ra, "dec": dec})
    for b, m in _colours(rng, r, galaxy=False).items():
        df[f"{b}_mag"] = m
    df["period_days"] = rng.uniform(0.3, 20.0, n)
    df["amplitude_mag"] = rng.uniform(0.1, 0.6, n)
    df["t0_mjd"] = p.survey_mjd_start
    df["phase"] = rng.uniform(0.0, 2 * np.pi, n)
    return df


def _central_positions(
    plan: SurveyPlan, rng: np.random.Generator, n: int, *, margin: float, band: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Random positions that land on a detector in every later visit (of ``band``).

    Falls back to the best candidates (most visits covered) when the dithers
    leave too little common area.
    """
    p = plan.preset
    half = 0.9 * plan.fp_radius * p.pixel_scale * ARCSEC
    ncand = max(400, 50 * n)
    ra, dec = tan_deproject(
        rng.uniform(-half, half, ncand), rng.uniform(-half, half, ncand), p.ra0, p.dec0
    )
    visits = plan.later_visits(band)
    if band is None:
        visits = plan.visits
    covered = np.zeros(ncand, dtype=int)
    for v in visits["visit"]:
        det, _, _ = plan.locate(ra, dec, int(v), margin=margin)
        covered += det >= 0
    order = np.argsort(-covered, kind="stable")[:n]
    return ra[order], dec[order]


def _make_transients(
    plan: SurveyPlan, rng: np.random.Generator, gals: pd.DataFrame
) -> pd.DataFrame:
    p = plan.preset
    n = p.n_transients
    if n == 0:
        return pd.DataFrame()
    later_r = plan.later_visits("r")
    first_later = float(later_r["mjd"].min()) if len(later_r) else p.explosion_mjd_min + 5
    hostless = np.zeros(n, dtype=bool)
    hostless[: p.n_hostless] = True
    guaranteed = np.zeros(n, dtype=bool)
    guaranteed[: p.guaranteed_transients] = True
    if p.guaranteed_transients > 1 and p.n_hostless >= 1:
        hostless[:] = False
        hostless[0] = True  # one guaranteed transient is hostless, the next has a host
        hostless[p.guaranteed_transients : p.guaranteed_transients + p.n_hostless - 1] = True

    # Candidate hosts: reasonably bright galaxies, preferring ones that every
    # later r visit sees (for guaranteed transients).
    hosts = gals[(gals["r_mag"] < 23.0) & (gals["hlr_arcsec"] < 1.2)]
    cover = np.zeros(len(hosts), dtype=int)
    for v in later_r["visit"]:
        det, _, _ = plan.locate(hosts["ra"].to_numpy(), hosts["dec"].to_numpy(), int(v), margin=40)
        cover += det >= 0
    host_order = hosts.index[np.argsort(-cover, kind="stable")]
    central_ra, central_dec = _central_positions(plan, rng, n, margin=40.0, band="r")

    rows = []
    used: set[int] = set()
    for k in range(n):
        rise = rng.uniform(1.5, 4.0)
        fall = rng.uniform(15.0, 35.0)
        if guaranteed[k]:
            t_exp = rng.uniform(
                p.explosion_mjd_min + 0.3, max(p.explosion_mjd_min + 0.5, first_later - 3)
            )
            r_peak = rng.uniform(20.0, 21.0)
        else:
            t_exp = rng.uniform(p.explosion_mjd_min + 0.3, p.survey_mjd_end - 10.0)
            r_peak = rng.uniform(19.5, 23.0)
        host_id = -1
        if hostless[k]:
            ra, dec = central_ra[k], central_dec[k]
        else:
            pool = host_order if guaranteed[k] else rng.permutation(hosts.index)
            idx = next(i for i in pool if i not in used)
            used.add(int(idx))
            host = gals.loc[idx]
            host_id = int(host["id"])
            off = rng.uniform(0.2, 1.0) * host["hlr_arcsec"] * ARCSEC
            ang = rng.uniform(0, 2 * np.pi)
            dec = host["dec"] + off * np.sin(ang)
            ra = host["ra"] + off * np.cos(ang) / np.cos(np.deg2rad(dec))
        row = {
            "id": TRANSIENT_ID0 + k,
            "kind": "transient",
            "ra": ra,
            "dec": dec,
            "host_id": host_id,
            "t0_mjd": t_exp,
            "bazin_t0_mjd": t_exp + 3.0 * rise,
            "rise_days": rise,
            "fall_days": fall,
        }
        offsets = {
            "u": rng.uniform(0.0, 1.0),
            "g": rng.uniform(-0.3, 0.3),
            "r": 0.0,
            "i": rng.uniform(-0.2, 0.4),
            "z": rng.uniform(-0.1, 0.6),
            "y": rng.uniform(0.0, 0.8),
        }
        for b in BAND_ORDER:
            row[f"{b}_mag"] = r_peak + offsets[b]
        rows.append(row)
    return pd.DataFrame(rows)


def _bazin(t: np.ndarray, t0: np.ndarray, rise: np.ndarray, fall: np.ndarray) -> np.ndarray:
    x = np.clip(-(t - t0) / rise, -500, 500)
    return np.exp(np.clip(-(t - t0) / fall, -500, 500)) / (1.0 + np.exp(x))


def object_mags(scene: pd.DataFrame, band: str, mjd: float) -> np.ndarray:
    """AB magnitude of every object in ``band`` at ``mjd`` (inf where no flux).

    Transients follow a Bazin curve (centre ``bazin_t0_mjd``) less its value at
    the explosion ``t0_mjd``, scaled to the tabulated peak magnitude, so the
    flux rises continuously from zero at the explosion and is zero before;
    variables are sinusoidal in magnitude about the tabulated mean with
    peak-to-peak ``amplitude_mag``.
    """
    mags = scene[f"{band}_mag"].to_numpy(dtype=float).copy()
    kind = scene["kind"].to_numpy()
    tr = kind == "transient"
    if tr.any():
        t0 = scene["bazin_t0_mjd"].to_numpy()[tr]
        rise = scene["rise_days"].to_numpy()[tr]
        fall = scene["fall_days"].to_numpy()[tr]
        tpk = t0 + rise * np.log(np.maximum(fall / rise - 1.0, 1e-3))
        b_exp = _bazin(scene["t0_mjd"].to_numpy()[tr], t0, rise, fall)
        rel = (_bazin(np.full(tr.sum(), mjd), t0, rise, fall) - b_exp) / (
            _bazin(tpk, t0, rise, fall) - b_exp
        )
        rel = np.where(mjd > scene["t0_mjd"].to_numpy()[tr], np.maximum(rel, 0.0), 0.0)
        with np.errstate(divide="ignore"):
            mags[tr] = np.where(rel > 0, mags[tr] - 2.5 * np.log10(np.maximum(rel, 1e-300)), np.inf)
    var = kind == "variable"
    if var.any():
        ph = (
            2
            * np.pi
            * (mjd - scene["t0_mjd"].to_numpy()[var])
            / scene["period_days"].to_numpy()[var]
        )
        mags[var] += (
            0.5
            * scene["amplitude_mag"].to_numpy()[var]
            * np.sin(ph + scene["phase"].to_numpy()[var])
        )
    return mags


def mag_to_njy(mag: np.ndarray) -> np.ndarray:
    """AB magnitude -> flux in nJy (0 for infinite magnitudes)."""
    with np.errstate(over="ignore"):
        return np.where(np.isfinite(mag), 10 ** (-0.4 * (np.asarray(mag) - 31.4)), 0.0)
