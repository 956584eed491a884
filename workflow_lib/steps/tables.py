"""Consolidated CONTRACT tables: one Parquet per table from the per-CCD pieces."""

from __future__ import annotations

import logging

import pandas as pd

from workflow_lib import __version__
from workflow_lib.io import read_table, write_table

log = logging.getLogger(__name__)


def consolidate_table(*, input_paths: list[str], output_path: str, table: str) -> pd.DataFrame:
    """Concatenate per-CCD tables, sorted by (visit, detector), into ``output_path``."""
    pieces = [read_table(p) for p in input_paths]
    non_empty = [p for p in pieces if len(p)]
    combined = pd.concat(non_empty or pieces[:1], ignore_index=True) if pieces else pd.DataFrame()
    if {"visit", "detector"} <= set(combined.columns):
        combined = combined.sort_values(["visit", "detector"], kind="stable").reset_index(drop=True)
    write_table(
        combined,
        output_path,
        provenance={"package_version": __version__, "table": table, "n_inputs": len(input_paths)},
    )
    log.info("%s: %d rows from %d files", table, len(combined), len(input_paths))
    return combined
