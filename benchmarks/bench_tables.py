"""Consolidating per-CCD tables: wall time and peak memory of the Source table step.

    python -m benchmarks.run consolidate-sources            # 10^4 files of 5k rows
    python -m benchmarks.bench_tables --pieces 1000 --rows 5000

The pieces are Source tables in the CONTRACT's columns (seeded random values,
one (visit, detector) each, written in shuffled order); the step is the one
the ``source_table`` rule runs, in its own process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.harness import Measurement, measure

PYTHON = sys.executable
FLOAT_COLUMNS = (
    "ra",
    "dec",
    "x",
    "y",
    "psfFlux",
    "psfFluxErr",
    "apFlux",
    "apFluxErr",
    "extendedness",
    "xErr",
    "yErr",
    "snr",
    "ixx",
    "iyy",
    "ixy",
    "psfChi2",
)


def make_pieces(directory: Path, n_pieces: int, n_rows: int, seed: int = 1) -> list[str]:
    """``n_pieces`` per-CCD Source files of ``n_rows`` rows; reused when already there."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / f"pieces_{n_pieces}x{n_rows}.json"
    if manifest.exists():
        return json.loads(manifest.read_text())
    rng = np.random.default_rng(seed)
    values = {name: rng.normal(size=n_rows) for name in FLOAT_COLUMNS}
    paths = []
    for index in rng.permutation(n_pieces):
        visit, detector = divmod(int(index), 189)
        table = pa.table(
            {
                "sourceId": np.arange(n_rows, dtype=np.int64) + int(index) * n_rows,
                "visit": np.full(n_rows, visit, dtype=np.int64),
                "detector": np.full(n_rows, detector, dtype=np.int64),
                "band": pa.array(["r"] * n_rows, type=pa.large_string()),
                **values,
                "flags": np.zeros(n_rows, dtype=np.int64),
            }
        )
        path = directory / f"src_{visit}_{detector}.parquet"
        pq.write_table(table, path)
        paths.append(str(path))
    manifest.write_text(json.dumps(paths))
    return paths


def bench_consolidate(n_pieces: int, n_rows: int, repeats: int, work: Path) -> Measurement:
    paths = make_pieces(work / "source-pieces", n_pieces, n_rows)
    list_file = work / "source-pieces" / f"inputs_{n_pieces}x{n_rows}.json"
    list_file.write_text(json.dumps(paths))
    output = work / "Source.parquet"
    code = (
        "import json, sys\n"
        "from workflow_lib.steps.tables import consolidate_table\n"
        f"paths = json.load(open({str(list_file)!r}))\n"
        f"consolidate_table(input_paths=paths, output_path={str(output)!r}, table='Source')\n"
    )
    gigabytes = n_pieces * n_rows * (len(FLOAT_COLUMNS) + 4) * 8 / 1e9
    name = f"consolidate {n_pieces}x{n_rows} rows ({gigabytes:.1f} GB in memory)"
    measurement = measure(name, [PYTHON, "-c", code], repeats=repeats)
    assert pq.ParquetFile(output).metadata.num_rows == n_pieces * n_rows
    return measurement


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pieces", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="keep the pieces here")
    args = parser.parse_args(argv)
    if args.work is not None:
        print(bench_consolidate(args.pieces, args.rows, args.repeats, args.work).line())
        return 0
    with tempfile.TemporaryDirectory(prefix="dc2-bench-") as tmp:
        print(bench_consolidate(args.pieces, args.rows, args.repeats, Path(tmp)).line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
