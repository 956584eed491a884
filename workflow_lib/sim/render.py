"""Render one (exposure, detector): the scene through PSF, WCS, sky and instrument.

The same scene (objects, PSF, WCS, sky level, photon-shot object pixels, cosmic
rays) is produced for the ``raw`` and the ``eimage`` format; only the
instrument signature (response pattern, dark, bias, readout) and the Poisson
realisation of the smooth part differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import galsim
import numpy as np
import pandas as pd
from astropy.time import Time

from workflow_lib.sim.camera import amp_layouts, amplifier_electronics
from workflow_lib.sim.instrument import (
    add_cosmic_rays,
    bleed,
    dark_rate_map,
    full_well_map,
    read_out,
    response_map,
)
from workflow_lib.sim.optics import PsfParameters, psf_parameters
from workflow_lib.sim.presets import WAVELENGTH_NM, ZERO_POINTS
from workflow_lib.sim.psf import GSPARAMS, PsfPhotons, make_psf
from workflow_lib.sim.scene import object_mags
from workflow_lib.sim.seeds import int_seed_for, rng_for
from workflow_lib.sim.survey import SurveyPlan

log = logging.getLogger(__name__)

# Point sources are always drawn by FFT (about 1 ms each); galaxies brighter
# than this (e-) too, fainter galaxies by photon shooting.
GALAXY_FFT_FLUX_MIN = 2.0e4
MIN_FLUX = 5.0  # e-: fainter objects are skipped (far below the noise)


@dataclass
class RenderedDetector:
    """Pixels and header cards of one (exposure, detector)."""

    header: dict[str, Any]
    amplifiers: list[tuple[np.ndarray, dict[str, Any]]] = field(default_factory=list)
    eimage: np.ndarray | None = None
    cr_mask: np.ndarray | None = None
    n_objects: int = 0


def detector_psf_parameters(
    plan: SurveyPlan,
    visit: int,
    detector: int,
    x: float,
    y: float,
    *,
    info: dict[str, Any] | None = None,
    origin: tuple[float, float] | None = None,
) -> PsfParameters:
    """The true PSF's parameters at pixel (x, y) of a detector in a visit.

    ``info`` (``plan.exposure_info(visit)``) and ``origin`` (the detector's
    focal-plane origin, ``detector_origin``) may be passed to save their look-ups.
    """
    info = plan.exposure_info(visit) if info is None else info
    x0, y0 = detector_origin(plan, detector) if origin is None else origin
    return psf_parameters(
        seeing=float(info["seeing"]),
        wind_g1=float(info["wind_g1"]),
        wind_g2=float(info["wind_g2"]),
        wavelength_nm=WAVELENGTH_NM[info["band"]],
        fx=x + x0,
        fy=y + y0,
        fp_radius=plan.fp_radius,
    )


def detector_origin(plan: SurveyPlan, detector: int) -> tuple[float, float]:
    """Focal-plane position (pixels) of the detector's pixel (0, 0)."""
    org = plan.origins.iloc[plan.detectors.index(detector)]
    return float(org["x0"]), float(org["y0"])


def detector_psf(
    plan: SurveyPlan,
    visit: int,
    detector: int,
    x: float,
    y: float,
    *,
    info: dict[str, Any] | None = None,
) -> galsim.GSObject:
    """The true PSF (sky coordinates, no pixel) at pixel (x, y) of a detector in a visit."""
    return make_psf(detector_psf_parameters(plan, visit, detector, x, y, info=info))


def primary_header(
    plan: SurveyPlan, exposure: int, detector: int, image_format: str
) -> dict[str, Any]:
    """Primary-HDU cards (CONTRACT section 1) of one file."""
    info = plan.exposure_info(exposure)
    p = plan.preset
    band = str(info["band"]) or "NONE"
    cards: dict[str, Any] = {
        "TELESCOP": "LSST-SIM",
        "INSTRUME": "DC2SIM",
        "OBSTYPE": str(info["obstype"]).upper(),
        "IMGTYPE": str(info["obstype"]).upper(),
        "EXPID": int(exposure),
        "DETECTOR": int(detector),
        "DETNAME": f"R22_S{detector // 3}{detector % 3}",
        "FILTER": band,
        "MJD-OBS": float(info["mjd"]),
        "DATE-OBS": Time(float(info["mjd"]), format="mjd", scale="tai").isot,
        "TIMESYS": "TAI",
        "EXPTIME": float(info["exptime"]),
        "DARKTIME": float(info["darktime"]),
        "RA": float(info["ra"]),
        "DEC": float(info["dec"]),
        "ROTANG": float(info.get("rotation_deg", 0.0)),
        "DETSIZE": f"[1:{p.det_nx},1:{p.det_ny}]",
        "RADESYS": "ICRS",
    }
    if p.obstype_keyword != "OBSTYPE":
        del cards["OBSTYPE"]  # an IMGTYPE camera writes IMGTYPE only
    cards.update(plan.header_wcs(exposure, detector))
    cards.update(
        {
            "SIMSEED": int(plan.seed),
            "SIMPRSET": p.name,
            "IMGFMT": image_format,
        }
    )
    if image_format == "eimage":
        cards.update({"GAIN": 1.0, "BUNIT": "electron"})
    return cards


def _draw_objects(
    plan: SurveyPlan, scene: pd.DataFrame, exposure: int, detector: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Expected e- of FFT-drawn bright objects and photon counts of the faint ones.

    Both are before the flat response (photons arriving at the detector).
    """
    info = plan.exposure_info(exposure)
    p = plan.preset
    band = str(info["band"])
    wcs = plan.true_wcs(exposure, detector)
    mags = object_mags(scene, band, float(info["mjd"])) + float(info["extinction"])
    with np.errstate(over="ignore"):
        flux = np.where(
            np.isfinite(mags),
            10 ** (-0.4 * (mags - ZERO_POINTS[band])) * float(info["exptime"]),
            0.0,
        )
    x, y = wcs.sky_to_pixel(scene["ra"].to_numpy(), scene["dec"].to_numpy())
    seeing = float(info["seeing"])
    star_half = round(max(8.0, 5.0 * seeing) / p.pixel_scale)
    margin = float(max(40, star_half))  # pixels: objects this far off the edge still count
    sel = (
        (flux > MIN_FLUX)
        & (x > -margin)
        & (x < p.det_nx + margin)
        & (y > -margin)
        & (y < p.det_ny + margin)
    )
    smooth = galsim.ImageF(p.det_nx, p.det_ny)  # bounds 1..nx: galsim pixel = numpy + 1
    photons = galsim.ImageF(p.det_nx, p.det_ny)
    kind = scene["kind"].to_numpy()
    sersic_n = scene["sersic_n"].to_numpy()
    hlr = scene["hlr_arcsec"].to_numpy()
    e1, e2 = scene["e1"].to_numpy(), scene["e2"].to_numpy()
    ids = scene["id"].to_numpy()
    gal_pad = round((3.2 + max(0.0, 2.5 * (seeing - 1.2))) / p.pixel_scale)
    wing_px = 12.0 * (0.2 / p.pixel_scale)  # 2.4 arcsec per decade^1.5 of flux
    max_half = max(128, round(25.6 / p.pixel_scale))
    n_drawn = 0
    origin = detector_origin(plan, detector)
    for i in np.flatnonzero(sel):
        params = detector_psf_parameters(
            plan, exposure, detector, float(x[i]), float(y[i]), info=info, origin=origin
        )
        is_gal = kind[i] == "galaxy"
        shot = is_gal and flux[i] < GALAXY_FFT_FLUX_MIN
        if is_gal:
            gal = galsim.Sersic(
                n=float(sersic_n[i]), half_light_radius=float(hlr[i]), gsparams=GSPARAMS
            ).shear(e1=float(e1[i]), e2=float(e2[i]))
        if shot:
            # The galaxy's photons, each moved by a draw from the PSF (PsfPhotons:
            # the same convolution as shooting through galsim.Convolve, faster).
            prof = gal.withFlux(float(flux[i]))
        elif is_gal:
            prof = galsim.Convolve(gal, make_psf(params), gsparams=GSPARAMS)
            prof = prof.withFlux(float(flux[i]))
        else:
            prof = make_psf(params).withFlux(float(flux[i]))
        jac = wcs.local_jacobian(float(x[i]), float(y[i]))
        local = galsim.JacobianWCS(jac[0, 0], jac[0, 1], jac[1, 0], jac[1, 1])
        center = galsim.PositionD(float(x[i]) + 1.0, float(y[i]) + 1.0)
        # Stamp half-size: >= 8 arcsec (5 seeing FWHM in poor seeing) for
        # every point source (FFT cost hardly depends on it, and apertures
        # then see the same PSF fraction for faint and bright stars), more for
        # the brightest stars' wings; galaxies get 5 half-light radii plus
        # 3.2 arcsec (more in seeing worse than 1.2 arcsec).
        if is_gal:
            half = int(5.0 * hlr[i] / p.pixel_scale) + gal_pad
        else:
            half = star_half + int(wing_px * max(0.0, np.log10(max(flux[i], 1.0) / 1e5)) ** 1.5)
        half = min(half, max_half)
        if not shot:
            target = smooth
            method: dict[str, Any] = {"method": "auto"}
        else:
            target = photons
            method = {
                "method": "phot",
                "rng": galsim.BaseDeviate(
                    int_seed_for(plan.seed, "phot", exposure, detector, int(ids[i]))
                ),
                "photon_ops": [PsfPhotons(params)],
            }
        ix, iy = int(np.floor(center.x + 0.5)), int(np.floor(center.y + 0.5))
        bounds = galsim.BoundsI(ix - half, ix + half, iy - half, iy + half)
        overlap = bounds & target.bounds
        if not overlap.isDefined():
            continue
        stamp = galsim.ImageF(bounds, wcs=local)
        prof.drawImage(image=stamp, center=center, **method)
        target[overlap] += stamp[overlap]
        n_drawn += 1
    return smooth.array.astype(np.float64), photons.array.astype(np.float64), n_drawn


def render_exposure_detector(
    plan: SurveyPlan,
    scene: pd.DataFrame | None,
    exposure: int,
    detector: int,
    *,
    image_format: str = "raw",
) -> RenderedDetector:
    """Render one detector of one exposure (science or calibration)."""
    if image_format not in ("raw", "eimage"):
        raise ValueError(f"image_format must be 'raw' or 'eimage', not {image_format!r}")
    p = plan.preset
    info = plan.exposure_info(exposure)
    obstype = str(info["obstype"])
    if image_format == "eimage" and obstype != "science":
        raise ValueError(f"exposure {exposure} is a {obstype}; eimages exist for science only")
    org = plan.origins.set_index("detector").loc[detector]
    amps = amp_layouts(p)
    electronics = amplifier_electronics(p, plan.seed)
    electronics = electronics[electronics["detector"] == detector]
    shape = (p.det_ny, p.det_nx)
    darktime = float(info["darktime"])
    noise_rng = rng_for(plan.seed, "noise", exposure, detector, image_format)
    band = str(info["band"])
    resp = None
    if band:
        resp = response_map(
            p,
            plan.seed,
            detector,
            band,
            x0=float(org["x0"]),
            y0=float(org["y0"]),
            fp_radius=plan.fp_radius,
        )

    electrons = np.zeros(shape, dtype=np.float64)
    n_obj = 0
    if obstype == "science":
        if scene is None:
            raise ValueError("a science exposure needs the scene table")
        assert resp is not None  # a science exposure has a band
        smooth, photons, n_obj = _draw_objects(plan, scene, exposure, detector)
        expected = smooth + float(info["sky_e"])
        if image_format == "raw":
            electrons += noise_rng.poisson(np.maximum(expected * resp, 0.0)) + photons * resp
        else:
            med = float(np.median(resp))
            electrons += noise_rng.poisson(np.maximum(expected * med, 0.0)) + photons * med
    elif obstype == "flat":
        assert resp is not None  # a flat has a band
        level = p.flat_level * rng_for(plan.seed, "flat_level", exposure).uniform(0.8, 1.2)
        electrons += noise_rng.poisson(level * resp)
    if image_format == "raw" and darktime > 0:
        electrons += noise_rng.poisson(dark_rate_map(p, plan.seed, detector) * darktime)
    cr_mask = np.zeros(shape, dtype=bool)
    if darktime > 0:
        cr_rng = rng_for(plan.seed, "cosmic_rays", exposure, detector)
        cr_mask = add_cosmic_rays(electrons, cr_rng, rate=p.cr_rate, darktime=darktime)
    bleed(electrons, full_well_map(p, amps, electronics))

    result = RenderedDetector(
        header=primary_header(plan, exposure, detector, image_format),
        cr_mask=cr_mask,
        n_objects=n_obj,
    )
    if image_format == "eimage":
        result.eimage = electrons.astype(np.float32)
    else:
        readout_rng = rng_for(plan.seed, "readout", exposure, detector)
        result.amplifiers = read_out(
            electrons,
            amps,
            electronics,
            readout_rng,
            seed=plan.seed,
            detector=detector,
            raw_dtype=p.raw_dtype,
        )
    log.debug("exposure %d detector %d: %d objects drawn", exposure, detector, n_obj)
    return result
