"""The run summary: what was ingested, what was skipped and why.

Later stages add their outcomes (CCDs skipped with their reasons, products
made), so the end of a run says in one place what happened.
"""

from __future__ import annotations

import json
import logging

import pandas as pd

from workflow_lib import __version__
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


def write_run_summary(*, registry_path: str, problems_path: str, summary_path: str) -> dict:
    """Write the JSON run summary and log it in human-readable form."""
    registry = read_table(registry_path)
    problems = read_table(problems_path) if _has_rows(problems_path) else pd.DataFrame()
    summary = {
        "package_version": __version__,
        "inputs": summarize_registry(registry),
        "skipped_inputs": problems["problem"].tolist() if "problem" in problems else [],
    }
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
    return summary


def _has_rows(path: str) -> bool:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh) > 1
