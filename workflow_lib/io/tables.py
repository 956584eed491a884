"""Table I/O: Parquet for products, CSV/FITS/Parquet accepted on input."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from workflow_lib.core.timing import ProgressLog
from workflow_lib.io.atomic import atomic_output

log = logging.getLogger(__name__)

_PROVENANCE_KEY = b"dc2_drp_provenance"


def write_table(
    table: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """Write ``table`` as Parquet atomically, with optional provenance metadata.

    Provenance (package version, config section, inputs) is stored as JSON in
    the Parquet schema metadata, where ``read_provenance`` finds it.
    """
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    if provenance is not None:
        meta = dict(arrow.schema.metadata or {})
        meta[_PROVENANCE_KEY] = json.dumps(provenance, default=str).encode()
        arrow = arrow.replace_schema_metadata(meta)
    with atomic_output(path) as tmp:
        pq.write_table(arrow, tmp)


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the provenance record stored by ``write_table`` (empty if none)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(_PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def write_csv(
    table: pd.DataFrame, path: str | os.PathLike[str], *, header_prefix: str = ""
) -> None:
    """Write a CSV atomically; ``header_prefix`` (e.g. ``'#'``) prefixes the header line."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(header_prefix)
            table.to_csv(fh, index=False)


def read_table(path: str | os.PathLike[str], *, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet, CSV or FITS table into a DataFrame in native byte order.

    CSV header lines may start with ``#`` (the phoSim/CatSim convention); the
    ``#`` is dropped and column names are stripped of surrounding blanks.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(p, columns=columns)
    if name.endswith((".csv", ".csv.gz", ".txt")):
        df = pd.read_csv(p, skipinitialspace=True)
        df.columns = [str(c).lstrip("#").strip() for c in df.columns]
        return df[columns] if columns is not None else df
    if name.endswith((".fits", ".fit", ".fits.gz")):
        from astropy.table import Table

        tab = Table.read(p, hdu=1)
        df = tab.to_pandas()
        for col in df.columns:
            if df[col].dtype.byteorder == ">":
                df[col] = df[col].to_numpy().astype(df[col].dtype.newbyteorder("="))
        return df[columns] if columns is not None else df
    raise ValueError(f"{p}: unsupported table format (expected .parquet, .csv or .fits)")


def read_tables(paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """The tables at ``paths`` concatenated (empty ones skipped; all empty: the first's
    columns, no rows; no paths: an empty DataFrame)."""
    progress = ProgressLog(log, "reading tables", total=len(paths))
    pieces = []
    for path in paths:
        pieces.append(read_table(path))
        progress.step()
    non_empty = [p for p in pieces if len(p)]
    return pd.concat(non_empty or pieces[:1], ignore_index=True) if pieces else pd.DataFrame()
