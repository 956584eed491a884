"""Steps: association per patch, forced photometry of DIAObjects per CCD, their tables.

dia_pipe's ``associationDriver`` and ``forcedPhotCcdDiaDriver``:

- :func:`associate_patch` takes the DIASources of every CCD that may overlap a
  patch, keeps those in the patch's inner region and its tract's inner region
  (so that no DIASource is associated twice), groups them into DIAObjects
  (:mod:`workflow_lib.association.associate`) and writes the patch's
  DIAObjects and the ``diaSourceId -> diaObjectId`` map.
- :func:`dia_forced_ccd` measures every DIAObject that falls on a CCD-visit on
  its difference image (``psfDiffFlux``) and its calexp (``psfFlux``).
- :func:`dia_source_table` is the consolidated DiaSource table with each
  DIASource's ``diaObjectId`` (0: not associated).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from workflow_lib import __version__
from workflow_lib.core.config import AssociationSection
from workflow_lib.core.flags import ARTIFACT_DIA_SOURCE, DiaForcedSourceFlag, ForcedSourceFlag
from workflow_lib.io import read_table, read_tables, write_table
from workflow_lib.io.exposure import ProcessingFailed, read_exposure
from workflow_lib.io.skymap import read_skymap

log = logging.getLogger(__name__)

DIA_ASSOC_COLUMNS = {"diaSourceId": "i8", "diaObjectId": "i8", "tract": "i8", "patch": "i8"}
DIA_FORCED_COLUMNS: dict[str, str] = {
    "diaObjectId": "i8",
    "visit": "i8",
    "detector": "i8",
    "band": "object",
    "midpointMjdTai": "f8",
    "psfDiffFlux": "f8",
    "psfDiffFluxErr": "f8",
    "psfFlux": "f8",
    "psfFluxErr": "f8",
    "x": "f8",
    "y": "f8",
    "tract": "i8",
    "patch": "i8",
    "flags": "i8",
    "diffFlags": "i8",
    "scienceFlags": "i8",
}


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


def selected_sources(sources: pd.DataFrame, cfg: AssociationSection) -> pd.DataFrame:
    """The DIASources of the configured visits and bands (dia_pipe's ``--selectId``)."""
    keep = np.ones(len(sources), dtype=bool)
    if cfg.visits is not None:
        keep &= sources["visit"].isin(cfg.visits).to_numpy()
    if cfg.bands is not None:
        keep &= sources["band"].isin(cfg.bands).to_numpy()
    return sources[keep].reset_index(drop=True)


def associate_patch(
    *,
    dia_source_paths: list[str],
    skymap_path: str,
    dia_object_path: str,
    dia_assoc_path: str,
    tract: int,
    patch: int,
    bands: list[str],
    association: dict[str, Any],
) -> pd.DataFrame:
    """DIAObjects of one patch from the DIASources in its inner region."""
    from workflow_lib.association.associate import (
        AssociationConfig,
        associate,
        position_errors,
        tangent_plane_arcsec,
    )
    from workflow_lib.association.dia_object import dia_object_table

    cfg = AssociationSection.from_dict(association)
    numerics = AssociationConfig(
        method=cfg.method,
        radius_arcsec=cfg.radius_arcsec,
        position_error_floor_arcsec=cfg.position_error_floor_arcsec,
        max_offset_sigma=cfg.max_offset_sigma,
    )
    provenance = {
        "package_version": __version__,
        "step": "associate_patch",
        "inputs": list(dia_source_paths),
        "association": association,
    }
    tract, patch = int(tract), int(patch)
    sources = read_tables(dia_source_paths)
    sky = read_skymap(skymap_path)
    info = sky.patch(tract, patch)
    ny, nx = info.outer_bbox[3], info.outer_bbox[2]
    ra0, dec0 = (float(v) for v in info.wcs.all_pix2world((nx - 1) / 2.0, (ny - 1) / 2.0, 0))
    if len(sources):
        sources = selected_sources(sources, cfg)
        ra, dec = sources["ra"].to_numpy(), sources["dec"].to_numpy()
        mine = info.in_inner_region(ra, dec) & (sky.find_tracts(ra, dec) == tract)
        sources = sources[mine].reset_index(drop=True)
    if not len(sources):
        objects = dia_object_table(
            pd.DataFrame({"band": [], "midpointMjdTai": []}),
            np.zeros(0, np.int64),
            np.zeros(0),
            np.zeros(0),
            np.ones(0),
            tract=tract,
            patch=patch,
            centre=(ra0, dec0),
            bands=bands,
        )
        assoc = _empty(DIA_ASSOC_COLUMNS)
    else:
        xi, eta = tangent_plane_arcsec(
            sources["ra"].to_numpy(), sources["dec"].to_numpy(), ra0, dec0
        )
        err = position_errors(sources["coordErr"].to_numpy(), cfg.position_error_floor_arcsec)
        can_seed = (sources["flags"].to_numpy() & ARTIFACT_DIA_SOURCE) == 0
        labels = associate(
            xi,
            eta,
            err,
            sources["midpointMjdTai"].to_numpy(),
            sources["visit"].to_numpy(),
            sources["diaSourceId"].to_numpy(),
            can_seed,
            numerics,
        )
        objects = dia_object_table(
            sources, labels, xi, eta, err, tract=tract, patch=patch, centre=(ra0, dec0), bands=bands
        )
        ids = objects["diaObjectId"].to_numpy()
        joined = labels >= 0
        assoc = pd.DataFrame(
            {
                "diaSourceId": sources["diaSourceId"].to_numpy()[joined],
                "diaObjectId": ids[labels[joined]],
                "tract": np.int64(tract),
                "patch": np.int64(patch),
            }
        ).astype(DIA_ASSOC_COLUMNS)
    log.info(
        "tract %d patch %d (%s): %d DIASources in the inner region, %d DIAObjects, %d associated",
        tract,
        patch,
        cfg.method,
        len(sources),
        len(objects),
        len(assoc),
    )
    write_table(objects, dia_object_path, provenance=provenance)
    write_table(assoc, dia_assoc_path, provenance=provenance)
    return objects


def dia_source_table(
    *, input_paths: list[str], assoc_paths: list[str], output_path: str
) -> pd.DataFrame:
    """The consolidated DiaSource table, each DIASource with its diaObjectId, tract, patch."""
    sources = read_tables(input_paths)
    if not len(sources):
        from workflow_lib.steps.diffim import DIA_SOURCE_COLUMNS

        sources = _empty(DIA_SOURCE_COLUMNS)
    assoc = read_tables(assoc_paths)
    if not len(assoc):
        assoc = _empty(DIA_ASSOC_COLUMNS)
    if assoc["diaSourceId"].duplicated().any():
        raise ValueError("DiaSource: a DIASource was associated in two patches")
    # A lookup, not a merge: a left merge would turn the 64-bit ids into floats.
    assoc = assoc.sort_values("diaSourceId")
    keys = assoc["diaSourceId"].to_numpy(dtype=np.int64)
    ids = sources["diaSourceId"].to_numpy(dtype=np.int64)
    at = np.clip(np.searchsorted(keys, ids), 0, max(len(keys) - 1, 0))
    found = (keys[at] == ids) if len(keys) else np.zeros(len(ids), dtype=bool)
    merged = sources.copy()
    for column, fill in (("diaObjectId", 0), ("tract", -1), ("patch", -1)):
        values = assoc[column].to_numpy(dtype=np.int64)
        merged[column] = np.where(found, values[at], fill) if len(keys) else fill
        merged[column] = merged[column].astype(np.int64)
    merged = merged[[*sources.columns, "tract", "patch"]]
    merged = merged.sort_values(["visit", "detector", "diaSourceId"], kind="stable")
    merged = merged.reset_index(drop=True)
    write_table(
        merged,
        output_path,
        provenance={
            "package_version": __version__,
            "table": "DiaSource",
            "n_inputs": len(input_paths),
            "n_assoc_inputs": len(assoc_paths),
        },
    )
    log.info(
        "DiaSource: %d rows, %d associated to %d DIAObjects",
        len(merged),
        int((merged["diaObjectId"] != 0).sum()),
        merged["diaObjectId"].nunique(),
    )
    return merged


def _forced_flags(flags: np.ndarray, failed_bit: int, center_bit: int) -> np.ndarray:
    """DiaForcedSourceFlag bits from one image's ForcedSourceFlag bits."""
    out = np.where(flags & int(ForcedSourceFlag.PSF_FLUX_FAILED), failed_bit, 0)
    out |= np.where(flags & int(ForcedSourceFlag.NO_DATA_CENTER), center_bit, 0)
    return out.astype(np.int64)


def dia_forced_ccd(
    *,
    calexp_path: str,
    difference_path: str,
    ccdvisit_path: str,
    dia_object_paths: list[str],
    forced_path: str,
    visit: int,
    detector: int,
) -> pd.DataFrame:
    """PSF fluxes of every DIAObject on one CCD-visit: difference image and calexp."""
    from workflow_lib.objects.forced import forced_photometry
    from workflow_lib.single_frame.measure import ApertureCorrection

    provenance = {
        "package_version": __version__,
        "step": "dia_forced_ccd",
        "inputs": [calexp_path, difference_path, *dia_object_paths],
    }
    objects = read_tables(dia_object_paths)
    row = read_table(ccdvisit_path).iloc[0]
    ids: dict[str, Any] = dict(
        visit=int(visit),
        detector=int(detector),
        band=str(row["band"]),
        midpoint_mjd=float(row["midpointMjdTai"]),
    )
    table = _empty(DIA_FORCED_COLUMNS)
    try:
        calexp = read_exposure(calexp_path)
    except ProcessingFailed as err:
        log.warning("visit %d detector %d: %s; no DIA forced photometry", visit, detector, err)
        calexp = None
    if calexp is not None and len(objects):
        apcorr = ApertureCorrection.from_header(calexp.metadata)
        common = dict(id_column="diaObjectId", aperture_correction=apcorr, **ids)
        science = forced_photometry(calexp, objects, **common).set_index("objectId")
        try:
            difference = read_exposure(difference_path)
        except ProcessingFailed as err:
            log.warning("visit %d detector %d: no difference image (%s)", visit, detector, err)
            difference = None
        diff = (
            forced_photometry(difference, objects, **common).set_index("objectId")
            if difference is not None
            else None
        )
        table = _dia_forced_table(science, diff, objects, ids)
    log.info(
        "visit %d detector %d: %d DIA forced measurements of %d DIAObjects",
        visit,
        detector,
        len(table),
        len(objects),
    )
    write_table(table, forced_path, provenance=provenance)
    return table


def _dia_forced_table(
    science: pd.DataFrame, diff: pd.DataFrame | None, objects: pd.DataFrame, ids: dict[str, Any]
) -> pd.DataFrame:
    """One row per DIAObject on the calexp, the difference measured at the same place."""
    n = len(science)
    where = objects.set_index("diaObjectId").loc[science.index]
    flags = _forced_flags(
        science["flags"].to_numpy(np.int64),
        int(DiaForcedSourceFlag.SCIENCE_FLUX_FAILED),
        int(DiaForcedSourceFlag.SCIENCE_NO_DATA_CENTER),
    )
    if diff is None:
        diff_flux = diff_err = np.full(n, np.nan)
        diff_flags = np.full(n, int(ForcedSourceFlag.PSF_FLUX_FAILED), dtype=np.int64)
        flags |= int(DiaForcedSourceFlag.NO_DIFFERENCE_IMAGE | DiaForcedSourceFlag.DIFF_FLUX_FAILED)
    else:
        diff = diff.reindex(science.index)
        diff_flux, diff_err = diff["psfFlux"].to_numpy(), diff["psfFluxErr"].to_numpy()
        # Off the difference image (no row there): the flux failed.
        diff_flags = diff["flags"].fillna(int(ForcedSourceFlag.PSF_FLUX_FAILED)).to_numpy(np.int64)
        flags |= _forced_flags(
            diff_flags,
            int(DiaForcedSourceFlag.DIFF_FLUX_FAILED),
            int(DiaForcedSourceFlag.DIFF_NO_DATA_CENTER),
        )
        blended = (diff_flags | science["flags"].to_numpy()) & int(ForcedSourceFlag.BLENDED)
        flags |= np.where(blended, int(DiaForcedSourceFlag.BLENDED), 0)
    table = pd.DataFrame(
        {
            "diaObjectId": science.index.to_numpy(dtype=np.int64),
            "visit": np.int64(ids["visit"]),
            "detector": np.int64(ids["detector"]),
            "band": ids["band"],
            "midpointMjdTai": ids["midpoint_mjd"],
            "psfDiffFlux": diff_flux,
            "psfDiffFluxErr": diff_err,
            "psfFlux": science["psfFlux"].to_numpy(),
            "psfFluxErr": science["psfFluxErr"].to_numpy(),
            "x": science["x"].to_numpy(),
            "y": science["y"].to_numpy(),
            "tract": where["tract"].to_numpy(dtype=np.int64),
            "patch": where["patch"].to_numpy(dtype=np.int64),
            "flags": flags,
            "diffFlags": diff_flags,
            "scienceFlags": science["flags"].to_numpy(dtype=np.int64),
        }
    )
    return table.astype(DIA_FORCED_COLUMNS)
