"""Consolidated CONTRACT tables: one Parquet per table from the per-CCD pieces."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from workflow_lib import __version__
from workflow_lib.core.paths import ProductPaths
from workflow_lib.io import write_concatenated

log = logging.getLogger(__name__)


def consolidate_table(*, input_paths: list[str], output_path: str, table: str) -> int:
    """Concatenate per-CCD tables, sorted by (visit, detector), into ``output_path``.

    Streamed (``io.write_concatenated``): memory does not grow with the number
    of pieces. Returns the number of rows.
    """
    n_rows = write_concatenated(
        input_paths,
        output_path,
        sort_keys=("visit", "detector"),
        provenance={"package_version": __version__, "table": table, "n_inputs": len(input_paths)},
    )
    log.info("%s: %d rows from %d files", table, n_rows, len(input_paths))
    return n_rows


# Consolidated table -> the per-CCD dataset type it is built from.
PER_CCD_SOURCES: dict[str, str] = {"CcdVisit": "ccdVisit", "Source": "src"}


def consolidate_output_dir(
    *, output_dir: str | os.PathLike[str], tables: Sequence[str] = tuple(PER_CCD_SOURCES)
) -> dict[str, int]:
    """Build the consolidated tables of ``output_dir`` from every per-CCD product on disk.

    No DAG: whatever runs made the per-CCD products (one full run, or
    partitions by visit range writing into the same ``output_dir``), the
    tables come out as one full run would have made them, rows sorted by
    (visit, detector). Returns the row count of each table.
    """
    paths = ProductPaths(output_dir)
    counts: dict[str, int] = {}
    for table in tables:
        if table not in PER_CCD_SOURCES:
            known = ", ".join(PER_CCD_SOURCES)
            raise KeyError(f"consolidate: no per-CCD source for table {table!r} (known: {known})")
        source = PER_CCD_SOURCES[table]
        data_ids = paths.existing(source)
        if not data_ids:
            raise FileNotFoundError(f"consolidate: no {source} products under {output_dir}")
        input_paths = [
            str(paths.path(source, **i))
            for i in sorted(data_ids, key=lambda i: (int(i["visit"]), int(i["detector"])))
        ]
        counts[table] = consolidate_table(
            input_paths=input_paths, output_path=str(paths.path(table)), table=table
        )
    return counts
