"""Ingest: scan an input directory and write the validated exposure registry.

The scan never stops at the first bad file: every problem becomes one line
naming the file and what is wrong. A per-file cache (path, size, mtime) makes
re-scans of an unchanged directory cheap, because the Snakefile scans at parse
time to build the DAG from the registry.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from workflow_lib import __version__
from workflow_lib.core.registry import (
    CORNER_COLUMNS,
    BadInputFile,
    as_registry,
    find_duplicates,
    find_inconsistent_files,
    registry_record,
)
from workflow_lib.core.timing import ProgressLog
from workflow_lib.io import atomic_output, read_table, write_csv, write_table
from workflow_lib.io.fits import is_fits_name, read_headers

log = logging.getLogger(__name__)

# Bumped whenever registry rows gain or change columns, so old caches are re-read
# (2: header-WCS footprint corners; 3: assembled detector size).
_CACHE_VERSION = 3


class IngestError(RuntimeError):
    """Bad input files were found and the configuration says to stop."""


@dataclass
class ScanResult:
    registry: pd.DataFrame
    problems: list[str] = field(default_factory=list)

    def raise_if_problems(self, *, on_bad_file: str) -> None:
        """Stop with every problem listed, or log them when told to skip bad files."""
        if not self.problems:
            return
        if on_bad_file == "fail":
            lines = "\n".join(self.problems)
            raise IngestError(
                f"{len(self.problems)} bad input file(s) "
                f"(set input.on_bad_file: skip to leave them out):\n{lines}"
            )
        for line in self.problems:
            log.warning("skipping bad input: %s", line)


def list_input_files(raw_dir: str | os.PathLike[str]) -> list[Path]:
    """Every FITS file below ``raw_dir`` (recursively), sorted."""
    root = Path(raw_dir)
    if not root.is_dir():
        raise IngestError(f"{root}: input directory does not exist")
    return sorted(p for p in root.rglob("*") if p.is_file() and is_fits_name(p.name))


def scan_files(
    files: Iterable[str | os.PathLike[str]],
    *,
    image_format: str,
    cache_path: str | os.PathLike[str] | None = None,
) -> ScanResult:
    """Validate the headers of ``files`` and build the registry.

    Files whose (size, mtime) match the cache are not reopened.
    """
    cache = _load_cache(cache_path, image_format)
    new_cache: dict[str, dict] = {}
    records = []
    problems = []
    files = list(files)
    progress = ProgressLog(log, "header scan", total=len(files))
    for file in files:
        path = str(file)
        stat = os.stat(path)
        key = [stat.st_size, stat.st_mtime_ns]
        entry = cache.get(path)
        if entry is None or entry["key"] != key:
            entry = {"key": key, **_scan_one(path, image_format)}
        new_cache[path] = entry
        if entry["record"] is not None:
            records.append(entry["record"])
        else:
            problems.append(entry["problem"])
        progress.step()
    registry = as_registry(records)
    duplicates = find_duplicates(registry)
    if duplicates:
        problems.extend(duplicates)
        registry = registry.drop_duplicates(["exposure", "detector"], keep=False)
        registry = registry.reset_index(drop=True)
    inconsistent, bad_paths = find_inconsistent_files(registry)
    if inconsistent:
        problems.extend(inconsistent)
        registry = registry[~registry["path"].isin(bad_paths)].reset_index(drop=True)
    if cache_path is not None and new_cache != cache:
        _save_cache(cache_path, image_format, new_cache)
    return ScanResult(registry=registry, problems=problems)


def scan_raw_directory(
    raw_dir: str | os.PathLike[str],
    *,
    image_format: str,
    cache_path: str | os.PathLike[str] | None = None,
) -> ScanResult:
    """Scan ``raw_dir`` recursively; an empty directory is itself a problem."""
    files = list_input_files(raw_dir)
    if not files:
        raise IngestError(f"{raw_dir}: no *.fits, *.fits.gz or *.fits.fz files found")
    return scan_files(files, image_format=image_format, cache_path=cache_path)


def _scan_one(path: str, image_format: str) -> dict:
    try:
        primary, extensions = read_headers(path)
    except Exception as err:  # any unreadable file is one problem line, not a crash
        return {"record": None, "problem": f"{path}: cannot read as FITS ({err})"}
    try:
        amps = extensions if image_format == "raw" else []
        images = extensions if image_format == "eimage" else []
        record = registry_record(
            primary, amps, path=path, image_format=image_format, image_headers=images
        )
    except BadInputFile as err:
        return {"record": None, "problem": str(err)}
    return {"record": record, "problem": None}


def _load_cache(cache_path: str | os.PathLike[str] | None, image_format: str) -> dict:
    if cache_path is None or not Path(cache_path).exists():
        return {}
    try:
        payload = json.loads(Path(cache_path).read_text())
    except (OSError, ValueError):
        return {}
    if payload.get("version") != _CACHE_VERSION or payload.get("format") != image_format:
        return {}
    return payload.get("files", {})


def _save_cache(cache_path: str | os.PathLike[str], image_format: str, files: dict) -> None:
    payload = {"version": _CACHE_VERSION, "format": image_format, "files": files}
    with atomic_output(cache_path) as tmp:
        tmp.write_text(json.dumps(payload))


def ingest_raw(
    *,
    raw_dir: str,
    registry_path: str,
    problems_path: str,
    image_format: str,
    on_bad_file: str,
    expected_files: list[str] | None = None,
) -> pd.DataFrame:
    """Scan ``raw_dir`` and write the registry product and the list of problems.

    ``expected_files`` (the files the DAG was built from) must all be in the
    registry: a file that was good at parse time and is bad now stops the run.
    """
    result = scan_raw_directory(raw_dir, image_format=image_format)
    problems = pd.DataFrame({"problem": result.problems}, dtype=str)
    write_csv(problems, problems_path)
    result.raise_if_problems(on_bad_file=on_bad_file)
    if expected_files is not None:
        missing = sorted(set(map(str, expected_files)) - set(result.registry["path"]))
        if missing:
            raise IngestError(f"{missing[0]}: expected input is missing from the registry")
    provenance = {
        "package_version": __version__,
        "step": "ingest_raw",
        "raw_dir": str(raw_dir),
        "image_format": image_format,
        "n_files": len(result.registry),
        "n_problems": len(result.problems),
    }
    write_table(result.registry, registry_path, provenance=provenance)
    counts = result.registry.groupby(["obstype", "band"]).size()
    log.info("registry: %d files\n%s", len(result.registry), counts.to_string())
    return result.registry


def read_registry(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a registry written by ``ingest_raw`` (or ``dc2-drp ingest``).

    A registry from a version without the footprint columns is refused with a
    clear message: the sky map needs them, and NaN corners would silently drop
    every CCD from the coadds.
    """
    table = read_table(path)
    missing = [col for col in CORNER_COLUMNS if col not in table.columns]
    if missing:
        raise IngestError(
            f"{path}: registry lacks the footprint columns {', '.join(missing)} "
            "(written by an older version of the workflow); re-create it with "
            f"`dc2-drp ingest RAW_DIR --output {path}`"
        )
    return as_registry(table)
