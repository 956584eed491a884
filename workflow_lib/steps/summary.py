"""The run summary: what was ingested, what was skipped and why.

Later stages add their outcomes (CCDs skipped with their reasons, products
made), so the end of a run says in one place what happened.
"""

from __future__ import annotations

import json
import logging

import pandas as pd

from workflow_lib import __version__
from workflow_lib.core.flags import CcdVisitFlag
from workflow_lib.io import atomic_output, read_table

log = logging.getLogger(__name__)


def summarize_registry(registry: pd.DataFrame) -> dict:
    """Counts of input files by type, band, visit and detector."""
    science = registry[registry["obstype"] == "science"]
    return {
        "n_files": len(registry),
        "files_by_obstype": {k: int(v) for k, v in registry.groupby("obstype").size().items()},
        "visits_by_band": {
            k: int(v) for k, v in science.groupby("band")["visit"].nunique().items()
        },
        "n_visits": int(science["visit"].nunique()),
        "detectors": sorted(int(d) for d in registry["detector"].unique()),
        "mjd_range": [float(science["mjd"].min()), float(science["mjd"].max())]
        if len(science)
        else None,
    }


def summarize_ccd_visits(ccd_visits: pd.DataFrame) -> dict:
    """Processed and failed CCDs, with the reason of every failure."""
    failed = ccd_visits[(ccd_visits["flags"] & int(CcdVisitFlag.FAILED)) != 0]
    ok = ccd_visits.drop(failed.index)
    return {
        "n_processed": len(ok),
        "n_failed": len(failed),
        "failed": [
            {"visit": int(r.visit), "detector": int(r.detector), "reason": r.failReason}
            for r in failed.itertuples()
        ],
        "median_seeing_arcsec": float(ok["seeing"].median()) if len(ok) else None,
        "median_astrom_rms_arcsec": float(ok["astromRms"].median()) if len(ok) else None,
    }


def summarize_coadds(coadd_paths: list[str], object_table: pd.DataFrame | None) -> dict:
    """Coadds made and skipped (with the reason), and Object counts."""
    from astropy.io import fits

    made, skipped = [], []
    for path in coadd_paths:
        header = fits.getheader(path, 0)
        entry = {
            "type": str(header.get("COADDTYP", "")),
            "tract": int(header.get("TRACT", -1)),
            "patch": int(header.get("PATCH", -1)),
            "band": str(header.get("BAND", "")),
        }
        if header.get("PROCSTAT") == "FAILED":
            skipped.append({**entry, "reason": str(header.get("PROCFAIL", ""))})
        else:
            made.append({**entry, "n_inputs": int(header.get("NINPUTS", 0))})
    summary: dict = {"n_coadds": len(made), "coadds": made, "skipped_coadds": skipped}
    if object_table is not None:
        summary["n_objects"] = len(object_table)
        summary["n_primary_objects"] = (
            int(object_table["detect_isPrimary"].sum()) if len(object_table) else 0
        )
    return summary


def summarize_difference_imaging(
    dia_ccd: pd.DataFrame, dia_sources: pd.DataFrame, dia_objects: pd.DataFrame | None
) -> dict:
    """CCD-visits subtracted and skipped (with the reason), DIASource and DIAObject counts."""
    failed = dia_ccd["failed"].astype(bool).to_numpy()
    summary: dict = {
        "n_subtracted": int((~failed).sum()),
        "skipped": [
            {"visit": int(r.visit), "detector": int(r.detector), "reason": str(r.failReason)}
            for r in dia_ccd[failed].itertuples()
        ],
        "n_dia_sources": len(dia_sources),
        "methods": dia_ccd.loc[~failed, "method"].value_counts().to_dict(),
    }
    if dia_objects is not None:
        summary["n_dia_objects"] = len(dia_objects)
        summary["n_dia_sources_associated"] = int((dia_sources["diaObjectId"] != 0).sum())
    return summary


def write_run_summary(
    *,
    registry_path: str,
    problems_path: str,
    summary_path: str,
    ccdvisit_table_path: str | None = None,
    coadd_paths: list[str] | None = None,
    object_table_path: str | None = None,
    dia_ccd_table_path: str | None = None,
    dia_source_table_path: str | None = None,
    dia_object_table_path: str | None = None,
) -> dict:
    """Write the JSON run summary and log it in human-readable form."""
    registry = read_table(registry_path)
    problems = read_table(problems_path) if _has_rows(problems_path) else pd.DataFrame()
    summary = {
        "package_version": __version__,
        "inputs": summarize_registry(registry),
        "skipped_inputs": problems["problem"].tolist() if "problem" in problems else [],
    }
    if ccdvisit_table_path is not None:
        summary["single_frame"] = summarize_ccd_visits(read_table(ccdvisit_table_path))
    if coadd_paths is not None:
        objects = read_table(object_table_path) if object_table_path else None
        summary["static_sky"] = summarize_coadds(list(coadd_paths), objects)
    if dia_ccd_table_path is not None and dia_source_table_path is not None:
        summary["difference_imaging"] = summarize_difference_imaging(
            read_table(dia_ccd_table_path),
            read_table(dia_source_table_path),
            read_table(dia_object_table_path) if dia_object_table_path else None,
        )
    with atomic_output(summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    inputs = summary["inputs"]
    log.info(
        "run summary: %d input files, %d visits (%s), detectors %s, %d skipped inputs",
        inputs["n_files"],
        inputs["n_visits"],
        ", ".join(f"{b}: {n}" for b, n in inputs["visits_by_band"].items()),
        inputs["detectors"],
        len(summary["skipped_inputs"]),
    )
    for line in summary["skipped_inputs"]:
        log.warning("skipped input: %s", line)
    for ccd in summary.get("single_frame", {}).get("failed", []):
        log.warning("CCD not calibrated: visit %(visit)d detector %(detector)d: %(reason)s", ccd)
    for coadd in summary.get("static_sky", {}).get("skipped_coadds", []):
        log.warning(
            "%(type)s coadd not made: tract %(tract)d patch %(patch)d band %(band)s: %(reason)s",
            coadd,
        )
    for ccd in summary.get("difference_imaging", {}).get("skipped", []):
        log.warning("no difference image: visit %(visit)d detector %(detector)d: %(reason)s", ccd)
    return summary


def _has_rows(path: str) -> bool:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh) > 1
