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
import pyarrow.compute
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


def write_concatenated(
    paths: Sequence[str | os.PathLike[str]],
    output_path: str | os.PathLike[str],
    *,
    sort_keys: Sequence[str] = (),
    provenance: Mapping[str, Any] | None = None,
    row_group_rows: int = 256_000,
) -> int:
    """Concatenate the Parquet tables at ``paths`` into ``output_path``, streaming.

    Never holds more than one row group (``row_group_rows``) of the output in
    memory, nor more than one input open, whatever the number of inputs: 10^4
    per-CCD Source files are consolidated in the memory of a few of them. Rows
    come out sorted by ``sort_keys`` (stable: input order among equal keys).
    Pieces whose keys are constant (one per-CCD file, one (visit, detector)) are
    ordered from their Parquet footers alone; if one is not, the pieces are read
    whole and sorted in memory, with a warning. Returns the number of rows written.
    """
    if not paths:
        raise ValueError(f"{output_path}: no input tables to concatenate")
    # One pass over the footers, keeping only what ordering needs (a footer
    # object is tens of kB: 10^4 of them would outweigh the data in flight).
    schemas: list[pa.Schema] = []
    first_with_rows: pa.Schema | None = None
    n_rows_of: list[int] = []
    piece_keys: list[tuple | bool | None] = []
    for path in paths:
        footer = pq.read_metadata(path)
        piece_schema = footer.schema.to_arrow_schema()
        if not any(piece_schema.equals(known, check_metadata=True) for known in schemas):
            schemas.append(piece_schema)
        if first_with_rows is None and footer.num_rows:
            first_with_rows = piece_schema
        n_rows_of.append(footer.num_rows)
        piece_keys.append(_constant_keys(footer, piece_schema.names, sort_keys))
    schema = _unified_schema(schemas, first_with_rows or schemas[0], provenance)
    keys = [k for k in sort_keys if k in schema.names]
    if keys and any(k is False for k in piece_keys):
        log.warning("%s: pieces span several %s; sorting in memory", output_path, keys)
        merged = pa.concat_tables([_conformed(pq.read_table(p), schema) for p in paths])
        merged = merged.take(pa.compute.sort_indices(merged, [(k, "ascending") for k in keys]))
        with atomic_output(output_path) as tmp:
            pq.write_table(merged, tmp, row_group_size=row_group_rows)
        return merged.num_rows
    # Empty pieces (key None) contribute no rows: their place does not matter.
    order = sorted(
        (i for i in range(len(paths)) if n_rows_of[i]), key=lambda i: piece_keys[i] or ()
    )
    n_rows = n_buffered = 0
    buffered: list[pa.Table] = []
    with atomic_output(output_path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for index in order:
            piece = _conformed(pq.read_table(paths[index]), schema)
            buffered.append(piece)
            n_rows += piece.num_rows
            n_buffered += piece.num_rows
            if n_buffered >= row_group_rows:
                writer.write_table(pa.concat_tables(buffered), row_group_size=row_group_rows)
                buffered, n_buffered = [], 0
        if buffered or n_rows == 0:
            writer.write_table(
                pa.concat_tables(buffered) if buffered else schema.empty_table(),
                row_group_size=row_group_rows,
            )
    return n_rows


def _unified_schema(
    schemas: Sequence[pa.Schema], first: pa.Schema, provenance: Mapping[str, Any] | None
) -> pa.Schema:
    """One schema for every piece: an empty piece's all-null column takes the others' type.

    Field order and pandas metadata are those of ``first`` (the first piece with rows).
    """
    unified = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    names = list(first.names) + [n for n in unified.names if n not in first.names]
    unified = pa.schema([unified.field(n) for n in names])
    meta = dict(first.metadata or {})
    meta.pop(_PROVENANCE_KEY, None)
    if provenance is not None:
        meta[_PROVENANCE_KEY] = json.dumps(provenance, default=str).encode()
    return unified.with_metadata(meta)


def _conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, order and types (absent columns null)."""
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _constant_keys(
    footer: pq.FileMetaData, names: Sequence[str], keys: Sequence[str]
) -> tuple | bool | None:
    """The piece's ``keys`` values if constant over its rows; None if it is empty; False
    if they vary, a key column is missing or its statistics are. ``names``: its columns."""
    if footer.num_rows == 0:
        return None
    values = []
    for key in keys:
        if key not in names:
            return False
        column = names.index(key)
        seen: set[Any] = set()
        for group in range(footer.num_row_groups):
            stats = footer.row_group(group).column(column).statistics
            if stats is None or not stats.has_min_max or stats.null_count:
                return False
            seen.update((stats.min, stats.max))
        if len(seen) != 1:
            return False
        values.append(seen.pop())
    return tuple(values)


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
