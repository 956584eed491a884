"""The exposure registry: one row per input file, validated against the CONTRACT.

Numerics only: functions here take FITS headers and tables, never paths to
open. ``workflow_lib.steps.ingest`` reads the headers and calls them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from workflow_lib.config import BANDS, Selection

# Column order of the registry table; `path` is where the file lives.
REGISTRY_COLUMNS: tuple[str, ...] = (
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
    "n_amplifiers",
    "path",
)
OBSTYPES = ("science", "bias", "dark", "flat")
# Other instruments call a science frame an "object" frame.
_OBSTYPE_ALIASES = {"object": "science"}
AMPLIFIER_KEYWORDS = ("DATASEC", "BIASSEC", "DETSEC", "GAIN", "RDNOISE", "SATURATE")
WCS_KEYWORDS = (
    "CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2",
    "CD1_1", "CD1_2", "CD2_1", "CD2_2",
)  # fmt: skip


class BadInputFile(ValueError):
    """An input file that breaks the CONTRACT; the message is one line naming it."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def registry_record(
    primary: Mapping[str, Any],
    amplifiers: Sequence[Mapping[str, Any]],
    *,
    path: str,
    image_format: str,
) -> dict[str, Any]:
    """Validate the headers of one input file and return its registry row.

    ``amplifiers`` holds the header of every image extension (raw format) and
    is empty for eimages. Raises BadInputFile naming the keyword and problem.
    """

    def need(key: str, header: Mapping[str, Any] = primary, where: str = "primary HDU") -> Any:
        if key not in header or header[key] is None or str(header[key]).strip() == "":
            raise BadInputFile(path, f"missing keyword {key} in {where}")
        return header[key]

    def number(key: str, value: Any, where: str = "primary HDU") -> float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise BadInputFile(
                path, f"keyword {key}={value!r} in {where} is not a number"
            ) from None
        if not math.isfinite(out):
            raise BadInputFile(path, f"keyword {key}={value!r} in {where} is not finite")
        return out

    def integer(key: str) -> int:
        value = need(key)
        try:
            out = int(str(value).strip())
        except ValueError:
            raise BadInputFile(path, f"keyword {key}={value!r} is not an integer") from None
        if out < 0:
            raise BadInputFile(path, f"keyword {key}={value!r} is negative")
        return out

    obstype_key = "OBSTYPE" if "OBSTYPE" in primary else "IMGTYPE"
    raw_obstype = str(need(obstype_key)).strip().lower()
    obstype = _OBSTYPE_ALIASES.get(raw_obstype, raw_obstype)
    if obstype not in OBSTYPES:
        raise BadInputFile(
            path, f"keyword {obstype_key}={raw_obstype!r} is not one of {', '.join(OBSTYPES)}"
        )
    if image_format == "eimage" and obstype != "science":
        raise BadInputFile(path, f"{obstype_key}={raw_obstype!r}: eimage inputs must be science")

    exposure = integer("EXPID")
    detector = integer("DETECTOR")
    mjd = number("MJD-OBS", need("MJD-OBS"))
    exptime = number("EXPTIME", need("EXPTIME"))
    if exptime < 0 or (obstype in ("science", "flat", "dark") and exptime <= 0):
        raise BadInputFile(path, f"keyword EXPTIME={exptime} is not a valid {obstype} time")
    darktime = number("DARKTIME", primary["DARKTIME"]) if "DARKTIME" in primary else exptime

    band = ""
    if obstype in ("science", "flat"):
        band = _band_of(need("FILTER"), path)
    ra = dec = float("nan")
    if obstype == "science":
        ra = number("RA", need("RA"))
        dec = number("DEC", need("DEC"))
        if not (0.0 <= ra % 360.0 < 360.0 and -90.0 <= dec <= 90.0):
            raise BadInputFile(path, f"boresight RA={ra}, DEC={dec} out of range")
        for key in WCS_KEYWORDS:
            need(key)
        for key in WCS_KEYWORDS[2:]:
            number(key, primary[key])

    if image_format == "raw":
        _check_amplifiers(amplifiers, path)
    else:
        gain = primary.get("GAIN", 1.0)
        if abs(number("GAIN", gain) - 1.0) > 1e-6:
            raise BadInputFile(
                path, f"keyword GAIN={gain}: eimage pixels must be electrons (GAIN=1)"
            )

    return {
        "exposure": exposure,
        "visit": exposure if obstype == "science" else -1,
        "detector": detector,
        "obstype": obstype,
        "band": band,
        "mjd": mjd,
        "exptime": exptime,
        "darktime": darktime,
        "ra": ra,
        "dec": dec,
        "n_amplifiers": len(amplifiers),
        "path": path,
    }


def _band_of(value: Any, path: str) -> str:
    band = str(value).strip().lower()
    if band not in BANDS:
        raise BadInputFile(path, f"keyword FILTER={value!r} is not one of {' '.join(BANDS)}")
    return band


def _check_amplifiers(amplifiers: Sequence[Mapping[str, Any]], path: str) -> None:
    from workflow_lib.isr import parse_section

    if not amplifiers:
        raise BadInputFile(path, "no amplifier image HDUs (raw format needs one HDU per amplifier)")
    covered = 0
    extent_x = extent_y = 0
    for index, header in enumerate(amplifiers, start=1):
        where = f"HDU {index}"
        for key in AMPLIFIER_KEYWORDS:
            if key not in header or str(header[key]).strip() == "":
                raise BadInputFile(path, f"missing keyword {key} in {where}")
        for key in ("GAIN", "RDNOISE", "SATURATE"):
            try:
                value = float(header[key])
            except (TypeError, ValueError):
                raise BadInputFile(
                    path, f"keyword {key}={header[key]!r} in {where} is not a number"
                ) from None
            if not (math.isfinite(value) and value > 0):
                raise BadInputFile(
                    path, f"keyword {key}={header[key]!r} in {where} must be positive"
                )
        sections = {}
        for key in ("DATASEC", "BIASSEC", "DETSEC"):
            try:
                sections[key] = parse_section(str(header[key]))
            except ValueError as err:
                raise BadInputFile(path, f"keyword {key} in {where}: {err}") from None
        nx, ny = int(header.get("NAXIS1", 0)), int(header.get("NAXIS2", 0))
        for key in ("DATASEC", "BIASSEC"):
            sec = sections[key]
            if sec.x.stop > nx or sec.y.stop > ny:
                raise BadInputFile(
                    path, f"keyword {key}={header[key]} in {where} exceeds the {nx}x{ny} image"
                )
        data, det = sections["DATASEC"], sections["DETSEC"]
        if data.shape != det.shape:
            raise BadInputFile(
                path,
                f"{where}: DATASEC {header['DATASEC']} and DETSEC {header['DETSEC']} "
                "differ in size",
            )
        covered += det.shape[0] * det.shape[1]
        extent_x = max(extent_x, det.x.stop)
        extent_y = max(extent_y, det.y.stop)
    if covered != extent_x * extent_y:
        raise BadInputFile(
            path, f"amplifier DETSECs cover {covered} pixels of a {extent_x}x{extent_y} detector"
        )


def find_duplicates(registry: pd.DataFrame) -> list[str]:
    """One problem line per (exposure, detector) that appears in several files."""
    problems = []
    dup = registry[registry.duplicated(["exposure", "detector"], keep=False)]
    for (exposure, detector), rows in dup.groupby(["exposure", "detector"]):
        files = ", ".join(sorted(rows["path"]))
        problems.append(
            f"{files}: exposure {exposure} detector {detector} appears in several files"
        )
    return problems


def empty_registry() -> pd.DataFrame:
    """A registry with no rows but the right columns and dtypes."""
    return as_registry([])


def as_registry(records: Sequence[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Registry table with the canonical columns, dtypes and row order."""
    table = pd.DataFrame(list(records) if not isinstance(records, pd.DataFrame) else records)
    for col in REGISTRY_COLUMNS:
        if col not in table:
            table[col] = pd.Series(dtype=object)
    table = table[list(REGISTRY_COLUMNS)].astype(
        {
            "exposure": np.int64,
            "visit": np.int64,
            "detector": np.int64,
            "obstype": str,
            "band": str,
            "mjd": np.float64,
            "exptime": np.float64,
            "darktime": np.float64,
            "ra": np.float64,
            "dec": np.float64,
            "n_amplifiers": np.int64,
            "path": str,
        }
    )
    return table.sort_values(["obstype", "exposure", "detector"], kind="stable").reset_index(
        drop=True
    )


def select_science(registry: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """Science rows that the selection keeps."""
    keep = registry["obstype"] == "science"
    if selection.visits is not None:
        keep &= registry["visit"].isin(selection.visits)
    if selection.detectors is not None:
        keep &= registry["detector"].isin(selection.detectors)
    if selection.bands is not None:
        keep &= registry["band"].isin(selection.bands)
    return registry[keep].reset_index(drop=True)


def select_calibrations(registry: pd.DataFrame, science: pd.DataFrame) -> pd.DataFrame:
    """Calibration rows needed by the selected science: their detectors, flats of their bands."""
    detectors = set(science["detector"])
    bands = set(science["band"])
    calib = registry[(registry["obstype"] != "science") & registry["detector"].isin(detectors)]
    calib = calib[(calib["obstype"] != "flat") | calib["band"].isin(bands)]
    return calib.reset_index(drop=True)
