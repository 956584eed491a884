"""The survey plan: which exposures exist and how each was taken.

GalSim-free and fast: the plan is built while Snakemake parses the workflow
(``plan_survey`` for the default preset takes a few milliseconds). Everything
is derived from ``(preset, seed)`` with keyed random streams, so every job that
rebuilds the plan sees the same survey.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from workflow_lib.core.registry import (
    CORNER_DEC_COLUMNS,
    CORNER_RA_COLUMNS,
    detector_pixel_corners,
)
from workflow_lib.sim.camera import detector_origins, focal_plane_radius
from workflow_lib.sim.optics import (
    ARCSEC,
    TrueWCS,
    cd_matrix,
    distortion_coefficient,
    tan_deproject,
)
from workflow_lib.sim.presets import (
    BAND_ORDER,
    DARK_SKY,
    ZERO_POINTS,
    SimPreset,
)
from workflow_lib.sim.seeds import rng_for

FIRST_VISIT = 400_100
VISIT_STEP = 7
BIAS_BASE = 900_000
DARK_BASE = 900_100
FLAT_BASE = 900_200
REGISTRY_COLUMNS = (
    "exposure",
    "visit",
    "detector",
    "obstype",
    "band",
    "mjd",
    "exptime",
    "darktime",
    "ra",
    "dec",
    *CORNER_RA_COLUMNS,
    *CORNER_DEC_COLUMNS,
)
HEADER_WCS_KEYS = (
    "CRVAL1",
    "CRVAL2",
    "CRPIX1",
    "CRPIX2",
    "CD1_1",
    "CD1_2",
    "CD2_1",
    "CD2_2",
)
READOUT_S = 1.0  # darktime - exptime


@dataclass(frozen=True)
class SurveyPlan:
    """All exposures of a simulated survey with their design values.

    ``visits``: one row per science visit (visit, band, mjd, exptime, darktime,
    ra, dec, rotation_deg, seeing (atmospheric FWHM, arcsec), sky_mag,
    sky_e (e-/pixel before flat response), extinction, wind_g1, wind_g2,
    template_quality). ``calibrations``: exposure, obstype, band, mjd,
    exptime, darktime. ``detectors``: detector ids.
    """

    preset: SimPreset
    seed: int
    visits: pd.DataFrame
    calibrations: pd.DataFrame
    detectors: tuple[int, ...]
    origins: pd.DataFrame = field(repr=False)
    fp_radius: float
    distortion_k: float

    # ----------------------------------------------------------------- registry
    def registry(self, image_format: str) -> pd.DataFrame:
        """One row per planned (exposure, detector) file.

        ``image_format`` is ``'raw'`` (science and calibration exposures) or
        ``'eimage'`` (science only: e-images need no calibration).
        """
        if image_format not in ("raw", "eimage"):
            raise ValueError(f"image_format must be 'raw' or 'eimage', not {image_format!r}")
        expos = self.exposures()
        if image_format == "eimage":
            expos = expos[expos["obstype"] == "science"]
        rows = expos.loc[expos.index.repeat(len(self.detectors))].reset_index(drop=True)
        rows["detector"] = np.tile(np.asarray(self.detectors, dtype=np.int64), len(expos))
        out = pd.DataFrame(
            {
                "exposure": rows["exposure"].astype(np.int64),
                "visit": rows["visit"].astype(np.int64),
                "detector": rows["detector"].astype(np.int64),
                "obstype": rows["obstype"].astype(str),
                "band": rows["band"].astype(str),
                "mjd": rows["mjd"].astype(np.float64),
                "exptime": rows["exptime"].astype(np.float64),
                "darktime": rows["darktime"].astype(np.float64),
                "ra": rows["ra"].astype(np.float64),
                "dec": rows["dec"].astype(np.float64),
            }
        )
        corner_ra, corner_dec = self._header_corners(out)
        out[list(CORNER_RA_COLUMNS)] = corner_ra
        out[list(CORNER_DEC_COLUMNS)] = corner_dec
        return out[list(REGISTRY_COLUMNS)].sort_values(["exposure", "detector"], ignore_index=True)

    def _header_corners(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Sky corners (n, 4) of each row's detector from the header WCS it is written with.

        The same plain TAN the headers carry, evaluated here without astropy;
        calibration rows get NaN (the scan of the written files does the same).
        """
        n = len(rows)
        corner_ra = np.full((n, 4), np.nan)
        corner_dec = np.full((n, 4), np.nan)
        science = (rows["obstype"] == "science").to_numpy()
        if not science.any():
            return corner_ra, corner_dec
        table = self.header_wcs_table(
            rows.loc[science, "exposure"].to_numpy(), rows.loc[science, "detector"].to_numpy()
        )
        px, py = detector_pixel_corners(self.preset.det_nx, self.preset.det_ny)
        u = px[None, :] + 1.0 - table["CRPIX1"].to_numpy()[:, None]
        v = py[None, :] + 1.0 - table["CRPIX2"].to_numpy()[:, None]
        col = {key: table[key].to_numpy()[:, None] for key in HEADER_WCS_KEYS}
        xi = col["CD1_1"] * u + col["CD1_2"] * v
        eta = col["CD2_1"] * u + col["CD2_2"] * v
        ra, dec = tan_deproject(xi, eta, col["CRVAL1"], col["CRVAL2"])
        corner_ra[science], corner_dec[science] = ra, dec
        return corner_ra, corner_dec

    def exposures(self) -> pd.DataFrame:
        """One row per exposure (science and calibration), registry columns less detector."""
        sci = pd.DataFrame(
            {
                "exposure": self.visits["visit"],
                "visit": self.visits["visit"],
                "obstype": "science",
                "band": self.visits["band"],
                "mjd": self.visits["mjd"],
                "exptime": self.visits["exptime"],
                "darktime": self.visits["darktime"],
                "ra": self.visits["ra"],
                "dec": self.visits["dec"],
            }
        )
        cal = self.calibrations.assign(visit=-1, ra=self.preset.ra0, dec=self.preset.dec0)
        return pd.concat([sci, cal[sci.columns]], ignore_index=True)

    def exposure_info(self, exposure: int) -> dict[str, Any]:
        """Design values of one exposure (visit columns for science exposures)."""
        match = self.visits[self.visits["visit"] == exposure]
        if len(match):
            info = match.iloc[0].to_dict()
            info.update(exposure=int(exposure), obstype="science")
            return info
        match = self.calibrations[self.calibrations["exposure"] == exposure]
        if not len(match):
            raise KeyError(f"exposure {exposure} is not in the {self.preset.name!r} survey plan")
        info = match.iloc[0].to_dict()
        info.update(
            visit=-1,
            ra=self.preset.ra0,
            dec=self.preset.dec0,
            rotation_deg=0.0,
        )
        return info

    # --------------------------------------------------------------------- WCS
    def true_wcs(self, exposure: int, detector: int) -> TrueWCS:
        """True TAN-SIP WCS of ``detector`` in ``exposure``."""
        info = self.exposure_info(exposure)
        org = self.origins.set_index("detector").loc[detector]
        cd = cd_matrix(self.preset.pixel_scale, float(info["rotation_deg"]))
        if self.preset.parity_flip:
            cd[:, 0] *= -1.0  # the detector x axis is mirrored on the sky
        return TrueWCS(
            crval=(float(info["ra"]), float(info["dec"])),
            crpix=(1.0 - float(org["x0"]), 1.0 - float(org["y0"])),
            cd=((cd[0, 0], cd[0, 1]), (cd[1, 0], cd[1, 1])),
            k=self.distortion_k,
        )

    def header_wcs(self, exposure: int, detector: int) -> dict[str, Any]:
        """Approximate header WCS (plain TAN at the detector centre).

        The true sky position of the centre is offset by a pointing error
        (``preset.header_wcs_offset_arcsec`` rms per axis per exposure, plus a
        quarter of that per detector: 4" and 1" by default) and the rotation is
        wrong by ``preset.header_wcs_rotation_deg`` (0.1-0.3 deg by default);
        no distortion terms. A parity-flipped camera writes its mirrored CD
        matrix (det > 0).
        """
        row = self.header_wcs_table(np.array([exposure]), np.array([detector])).iloc[0]
        return {
            "CTYPE1": "RA---TAN",
            "CTYPE2": "DEC--TAN",
            **{key: float(row[key]) for key in HEADER_WCS_KEYS},
        }

    def header_wcs_table(self, exposures: np.ndarray, detectors: np.ndarray) -> pd.DataFrame:
        """:meth:`header_wcs` of many (exposure, detector) pairs: one row each, TAN keys.

        Vectorised over the pairs (the registry needs them at DAG-build time);
        the random pointing and rotation errors come from the same keyed
        streams whatever the batch.
        """
        p = self.preset
        exposures = np.asarray(exposures, dtype=np.int64)
        detectors = np.asarray(detectors, dtype=np.int64)
        ra0, dec0, rotation = self._pointings(exposures)
        sigma = float(p.header_wcs_offset_arcsec)
        rot_lo, rot_hi = (float(r) for r in p.header_wcs_rotation_deg)
        errors = {}
        for e in np.unique(exposures).tolist():
            rng_e = rng_for(self.seed, "header_wcs", e)
            offset = rng_e.normal(0.0, sigma, size=2)
            rot_err = rng_e.choice([-1.0, 1.0]) * rng_e.uniform(rot_lo, rot_hi)
            errors[e] = (offset, rot_err)
        offset = np.array([errors[int(e)][0] for e in exposures]).reshape(-1, 2)
        offset = offset + np.array(
            [
                rng_for(self.seed, "header_wcs", int(e), int(d)).normal(0.0, sigma / 4.0, size=2)
                for e, d in zip(exposures, detectors, strict=True)
            ]
        ).reshape(-1, 2)
        rot_err = np.array([errors[int(e)][1] for e in exposures])
        org = self.origins.set_index("detector").loc[detectors]
        # Sky position of the detector centre through the true WCS (see true_wcs:
        # CRPIX = 1 - origin, so the centre sits at origin + centre in focal-plane pixels).
        cx, cy = (p.det_nx - 1) / 2.0, (p.det_ny - 1) / 2.0
        u = cx + org["x0"].to_numpy(float)
        v = cy + org["y0"].to_numpy(float)
        f = 1.0 + self.distortion_k * (u * u + v * v)
        cd_true = _cd_arrays(p.pixel_scale, rotation, flip=p.parity_flip)
        xi = cd_true[0] * u * f + cd_true[1] * v * f
        eta = cd_true[2] * u * f + cd_true[3] * v * f
        ra_c, dec_c = tan_deproject(xi, eta, ra0, dec0)
        dec_h = dec_c + offset[:, 1] * ARCSEC
        ra_h = ra_c + offset[:, 0] * ARCSEC / np.cos(np.deg2rad(dec_h))
        cd = _cd_arrays(p.pixel_scale, rotation + rot_err, flip=p.parity_flip)
        return pd.DataFrame(
            {
                "exposure": exposures,
                "detector": detectors,
                "CRVAL1": ra_h % 360.0,
                "CRVAL2": dec_h,
                "CRPIX1": np.full(len(exposures), cx + 1.0),
                "CRPIX2": np.full(len(exposures), cy + 1.0),
                "CD1_1": cd[0],
                "CD1_2": cd[1],
                "CD2_1": cd[2],
                "CD2_2": cd[3],
            }
        )

    def _pointings(self, exposures: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boresight (ra, dec) and rotation (deg) of each exposure, as in :meth:`exposure_info`."""
        visits = self.visits.set_index("visit")
        science = np.isin(exposures, visits.index)
        unknown = ~science & ~np.isin(exposures, self.calibrations["exposure"])
        if unknown.any():
            raise KeyError(
                f"exposure {exposures[unknown][0]} is not in the {self.preset.name!r} survey plan"
            )
        rows = visits.reindex(np.where(science, exposures, visits.index[0]))
        ra = np.where(science, rows["ra"].to_numpy(float), self.preset.ra0)
        dec = np.where(science, rows["dec"].to_numpy(float), self.preset.dec0)
        rotation = np.where(science, rows["rotation_deg"].to_numpy(float), 0.0)
        return ra, dec, rotation

    def locate(
        self, ra: np.ndarray, dec: np.ndarray, exposure: int, *, margin: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detector (-1 if none) and true 0-based pixel position of sky positions.

        ``margin`` (pixels) shrinks the accepted area of each detector.
        """
        ra = np.atleast_1d(np.asarray(ra, float))
        dec = np.atleast_1d(np.asarray(dec, float))
        det = np.full(ra.shape, -1, dtype=np.int64)
        xs = np.full(ra.shape, np.nan)
        ys = np.full(ra.shape, np.nan)
        p = self.preset
        for d in self.detectors:
            x, y = self.true_wcs(exposure, d).sky_to_pixel(ra, dec)
            ok = (
                (x >= -0.5 + margin)
                & (x < p.det_nx - 0.5 - margin)
                & (y >= -0.5 + margin)
                & (y < p.det_ny - 0.5 - margin)
                & (det < 0)
            )
            det[ok], xs[ok], ys[ok] = d, x[ok], y[ok]
        return det, xs, ys

    def template_visits(self) -> pd.DataFrame:
        return self.visits[self.visits["template_quality"]]

    def later_visits(self, band: str | None = None) -> pd.DataFrame:
        later = self.visits[~self.visits["template_quality"]]
        return later if band is None else later[later["band"] == band]


def _cd_arrays(
    pixel_scale: float, rotation_deg: np.ndarray, *, flip: bool = False
) -> tuple[np.ndarray, ...]:
    """(CD1_1, CD1_2, CD2_1, CD2_2) of :func:`cd_matrix` for an array of rotations.

    ``flip`` mirrors the pixel x axis (negates the first column), as
    :meth:`SurveyPlan.true_wcs` does for a parity-flipped camera.
    """
    th = np.deg2rad(np.asarray(rotation_deg, float))
    s = pixel_scale * ARCSEC
    if flip:
        return s * np.cos(th), s * np.sin(th), -s * np.sin(th), s * np.cos(th)
    return -s * np.cos(th), s * np.sin(th), s * np.sin(th), s * np.cos(th)


def sky_electrons(sky_mag: float, band: str, *, exptime: float, pixel_scale: float) -> float:
    """Sky e- per pixel (before the flat response) for a sky of ``sky_mag`` mag/arcsec^2."""
    return float(10 ** (-0.4 * (sky_mag - ZERO_POINTS[band])) * exptime * pixel_scale**2)


def plan_survey(preset: SimPreset, seed: int) -> SurveyPlan:
    """Build the survey plan of ``preset`` for ``seed`` (deterministic, GalSim-free)."""
    rng = rng_for(seed, "plan", preset.name)
    width = preset.n_det_x * (preset.det_nx + preset.gap_px) - preset.gap_px
    height = preset.n_det_y * (preset.det_ny + preset.gap_px) - preset.gap_px
    dither_px = (
        preset.dither_frac * min(width, height)
        if preset.n_det_y > 1
        else (preset.dither_frac * width)
    )
    rows: list[dict[str, Any]] = []
    for band, n_tmpl, n_later in sorted(preset.visits, key=lambda v: BAND_ORDER.index(v[0])):
        t_days = np.sort(
            rng.choice(
                np.arange(int(preset.survey_mjd_start), int(preset.template_mjd_end) - 1),
                size=n_tmpl,
                replace=False,
            )
        )
        l_days = np.sort(
            rng.choice(
                np.arange(int(preset.explosion_mjd_min) + 1, int(preset.survey_mjd_end)),
                size=n_later,
                replace=False,
            )
        )
        for day, tmpl in [(d, True) for d in t_days] + [(d, False) for d in l_days]:
            seeing = rng.uniform(*(preset.template_seeing if tmpl else preset.later_seeing))
            sky_mag = DARK_SKY[band] - (rng.uniform(0.0, 0.2) if tmpl else rng.uniform(0.0, 0.8))
            rows.append(
                {
                    "band": band,
                    "mjd": float(day) + rng.uniform(0.05, 0.35),
                    "seeing": seeing,
                    "sky_mag": sky_mag,
                    "extinction": rng.uniform(0.0, 0.05) if tmpl else rng.uniform(0.0, 0.3),
                    "template_quality": bool(tmpl),
                    "dx_px": rng.uniform(-dither_px, dither_px),
                    "dy_px": rng.uniform(-dither_px, dither_px),
                    "rotation_deg": rng.uniform(-preset.rot_max_deg, preset.rot_max_deg)
                    + preset.rotation_offset_deg,
                    "wind_g1": rng.normal(0.0, 0.015),
                    "wind_g2": rng.normal(0.0, 0.015),
                }
            )
    visits = pd.DataFrame(rows).sort_values("mjd", ignore_index=True)
    visits.insert(0, "visit", (FIRST_VISIT + VISIT_STEP * np.arange(len(visits))).astype(np.int64))
    xi = -visits["dx_px"].to_numpy() * preset.pixel_scale * ARCSEC
    eta = visits["dy_px"].to_numpy() * preset.pixel_scale * ARCSEC
    ra, dec = tan_deproject(xi, eta, preset.ra0, preset.dec0)
    visits["ra"], visits["dec"] = ra, dec
    visits["exptime"] = float(preset.exptime)
    visits["darktime"] = float(preset.exptime) + READOUT_S
    visits["sky_e"] = [
        sky_electrons(m, b, exptime=preset.exptime, pixel_scale=preset.pixel_scale)
        for m, b in zip(visits["sky_mag"], visits["band"], strict=True)
    ]

    cal_rows: list[dict[str, Any]] = []
    t_cal = preset.survey_mjd_start - 0.6
    for i in range(preset.n_bias):
        cal_rows.append(dict(exposure=BIAS_BASE + i, obstype="bias", band="", exptime=0.0))
    for i in range(preset.n_dark):
        cal_rows.append(
            dict(exposure=DARK_BASE + i, obstype="dark", band="", exptime=preset.dark_exptime)
        )
    for bi, band in enumerate(preset.bands):
        for i in range(preset.n_flat):
            cal_rows.append(
                dict(exposure=FLAT_BASE + 10 * bi + i, obstype="flat", band=band, exptime=5.0)
            )
    calibs = pd.DataFrame(cal_rows)
    calibs["exposure"] = calibs["exposure"].astype(np.int64)
    calibs["mjd"] = t_cal + 0.001 * np.arange(len(calibs))
    calibs["darktime"] = np.where(calibs["exptime"] > 0, calibs["exptime"] + READOUT_S, 0.0)

    fp_radius = focal_plane_radius(preset)
    return SurveyPlan(
        preset=preset,
        seed=int(seed),
        visits=visits,
        calibrations=calibs,
        detectors=tuple(range(preset.n_detectors)),
        origins=detector_origins(preset),
        fp_radius=fp_radius,
        distortion_k=distortion_coefficient(preset.distortion_edge_px, fp_radius),
    )
