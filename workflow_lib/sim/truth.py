"""Truth tables and the reference catalog of a simulated survey.

``truth_lightcurve`` and the refcat are numpy only; ``truth_ccdvisit`` measures
the PSF FWHM on the GalSim profile, so it imports the PSF module lazily.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from workflow_lib.sim.camera import amplifier_electronics
from workflow_lib.sim.instrument import response_map
from workflow_lib.sim.presets import BAND_ORDER, ZERO_POINTS
from workflow_lib.sim.scene import mag_to_njy, object_mags
from workflow_lib.sim.seeds import rng_for
from workflow_lib.sim.survey import SurveyPlan


def truth_lightcurve(plan: SurveyPlan, scene: pd.DataFrame) -> pd.DataFrame:
    """One row per (transient or variable, visit): true magnitude, flux and position."""
    varying = scene[scene["kind"].isin(["transient", "variable"])].reset_index(drop=True)
    rows = []
    for v in plan.visits.itertuples(index=False):
        mags = object_mags(varying, v.band, float(v.mjd))
        det, x, y = plan.locate(varying["ra"].to_numpy(), varying["dec"].to_numpy(), int(v.visit))
        rows.append(
            pd.DataFrame(
                {
                    "id": varying["id"].to_numpy(np.int64),
                    "visit": np.int64(v.visit),
                    "band": v.band,
                    "mjd": float(v.mjd),
                    "mag": mags,
                    "flux": mag_to_njy(mags),
                    "detector": det,
                    "x": x,
                    "y": y,
                }
            )
        )
    out = pd.concat(rows, ignore_index=True)
    out["band"] = out["band"].astype(str)
    return out


def median_response(plan: SurveyPlan, detector: int, band: str) -> float:
    """Median of the true response of a detector: the scale of its flat-fielded image.

    A flat normalised to median 1 per detector turns raw e- into e- of
    ``response / median_response`` = 1, so flat-fielded (and eimage) pixels
    carry ``median_response`` times the photons that arrived.
    """
    org = plan.origins.iloc[plan.detectors.index(detector)]
    resp = response_map(
        plan.preset,
        plan.seed,
        detector,
        band,
        x0=float(org["x0"]),
        y0=float(org["y0"]),
        fp_radius=plan.fp_radius,
    )
    return float(np.median(resp))


def truth_ccdvisit(plan: SurveyPlan) -> pd.DataFrame:
    """One row per (visit, detector): seeing, zero point, sky, extinction, true WCS.

    ``zero_point`` is for the flat-fielded image (flat normalised to median 1
    on the detector) and the eimage; ``sky`` is the mean sky e-/pixel there;
    ``seeing`` the FWHM of the effective (pixel-convolved) PSF at the
    detector centre, measured on the GalSim profile.
    """
    from workflow_lib.sim.psf import measure_fwhm
    from workflow_lib.sim.render import detector_psf

    p = plan.preset
    med = {(d, b): median_response(plan, d, b) for d in plan.detectors for b in p.bands}
    cx, cy = (p.det_nx - 1) / 2.0, (p.det_ny - 1) / 2.0
    rows = []
    for v in plan.visits.itertuples(index=False):
        info = plan.exposure_info(int(v.visit))
        for d in plan.detectors:
            psf = detector_psf(plan, int(v.visit), d, cx, cy, info=info)
            m = med[(d, v.band)]
            rows.append(
                {
                    "visit": np.int64(v.visit),
                    "detector": np.int64(d),
                    "band": str(v.band),
                    "mjd": float(v.mjd),
                    "exptime": float(v.exptime),
                    "seeing": measure_fwhm(psf, pixel_scale=p.pixel_scale),
                    "seeing_atmosphere": float(v.seeing),
                    "zero_point": ZERO_POINTS[v.band] - float(v.extinction) + 2.5 * np.log10(m),
                    "sky": float(v.sky_e) * m,
                    "extinction": float(v.extinction),
                    "median_response": m,
                    "template_quality": bool(v.template_quality),
                    "wcs_header": plan.true_wcs(int(v.visit), d).header_string(),
                }
            )
    return pd.DataFrame(rows)


def truth_amplifier(plan: SurveyPlan) -> pd.DataFrame:
    """One row per (detector, amplifier): gain, read noise (e-), bias level and SATURATE (ADU)."""
    amp = amplifier_electronics(plan.preset, plan.seed)
    amp["detector"] = amp["detector"].astype(np.int64)
    amp["amplifier"] = amp["amplifier"].astype(str)
    return amp[
        ["detector", "amplifier", "gain", "read_noise", "bias_level", "saturate", "full_well"]
    ]


def reference_catalog(plan: SurveyPlan, scene: pd.DataFrame) -> pd.DataFrame:
    """phoSim/CatSim-layout reference catalog of the bright objects flagged ``in_refcat``.

    Positions carry 5 mas and magnitudes 5 mmag (plus a faint-end term) of
    random error relative to the truth; variables are flagged ``isvariable``.
    """
    ref = scene[scene["in_refcat"]].reset_index(drop=True)
    rng = rng_for(plan.seed, "refcat")
    n = len(ref)
    sig_pos = 0.005 / 3600.0
    dec = ref["dec"].to_numpy() + rng.normal(0.0, sig_pos, n)
    ra = ref["ra"].to_numpy() + rng.normal(0.0, sig_pos, n) / np.cos(np.deg2rad(dec))
    out = pd.DataFrame({"uniqueId": ref["id"].to_numpy(np.int64), "raJ2000": ra, "decJ2000": dec})
    bands = [b for b in BAND_ORDER if b in plan.preset.bands]
    sigmas = {}
    for b in bands:
        true = ref[f"{b}_mag"].to_numpy()
        sig = 0.005 + 0.01 * 10 ** (0.4 * (true - 22.0))
        out[f"lsst_{b}"] = np.round(true + rng.normal(0.0, 1.0, n) * sig, 5)
        sigmas[f"sigma_lsst_{b}"] = np.round(sig, 5)
    out["starnotgal"] = ref["kind"].isin(["star", "variable"]).astype(int).to_numpy()
    out["isvariable"] = (ref["kind"] == "variable").astype(int).to_numpy()
    for k, v in sigmas.items():
        out[k] = v
    return out


def phosim_refcat_columns(bands: list[str] | tuple[str, ...]) -> dict[str, object]:
    """The ``input.refcat_columns`` map that reads ``reference_catalog``'s CSV layout."""
    return {
        "id": "uniqueId",
        "ra": "raJ2000",
        "dec": "decJ2000",
        "is_star": "starnotgal",
        "is_variable": "isvariable",
        "mags": {b: f"lsst_{b}" for b in bands},
        "mag_errs": {b: f"sigma_lsst_{b}" for b in bands},
    }
