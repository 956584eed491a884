"""The exposure registry: one row per input file, validated against the CONTRACT.

Numerics only: functions here take FITS headers and tables, never paths to
open. ``workflow_lib.steps.ingest`` reads the headers and calls them.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from workflow_lib.core.config import BANDS, Selection

_SECTION_RE = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")


@dataclass(frozen=True)
class Section:
    """A FITS image section as 0-based numpy slices.

    ``x``/``y`` always run upwards (``start < stop``); ``x_flip``/``y_flip``
    record that the FITS text listed that axis high-to-low, which for DETSEC
    means the amplifier reads that axis in reverse.
    """

    x: slice
    y: slice
    x_flip: bool = False
    y_flip: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the section."""
        return (self.y.stop - self.y.start, self.x.stop - self.x.start)

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(y, x)`` slices, to index a numpy image."""
        return (self.y, self.x)


def parse_section(text: str) -> Section:
    """Parse a FITS 1-based inclusive section ``'[x1:x2,y1:y2]'``.

    ``x1 > x2`` (or ``y1 > y2``) means that axis is flipped. Raises
    ValueError on anything else (missing brackets, zero or negative indices,
    non-integers).
    """
    if not isinstance(text, str):
        raise ValueError(f"section must be a string like '[1:512,1:2002]', got {text!r}")
    match = _SECTION_RE.match(text)
    if match is None:
        raise ValueError(f"malformed FITS section {text!r}; expected '[x1:x2,y1:y2]'")
    x1, x2, y1, y2 = (int(g) for g in match.groups())
    if min(x1, x2, y1, y2) < 1:
        raise ValueError(f"FITS section {text!r} has an index < 1 (sections are 1-based)")
    return Section(
        x=slice(min(x1, x2) - 1, max(x1, x2)),
        y=slice(min(y1, y2) - 1, max(y1, y2)),
        x_flip=x1 > x2,
        y_flip=y1 > y2,
    )


# Header-WCS footprint of a science file: the sky positions (deg) of the four
# outer pixel corners of the assembled detector, in the order of DETECTOR_CORNERS.
CORNER_RA_COLUMNS: tuple[str, ...] = tuple(f"corner_ra_{k}" for k in range(1, 5))
CORNER_DEC_COLUMNS: tuple[str, ...] = tuple(f"corner_dec_{k}" for k in range(1, 5))
CORNER_COLUMNS: tuple[str, ...] = CORNER_RA_COLUMNS + CORNER_DEC_COLUMNS

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
    *CORNER_COLUMNS,
    "n_amplifiers",
    "detector_nx",
    "detector_ny",
    "path",
)
# Integer columns a table may lack (an older registry, a simulator's plan): 0 = unknown.
_OPTIONAL_INT_COLUMNS = ("n_amplifiers", "detector_nx", "detector_ny")
OBSTYPES = ("science", "bias", "dark", "flat")
# Other instruments call a science frame an "object" frame.
_OBSTYPE_ALIASES = {"object": "science"}
AMPLIFIER_KEYWORDS = ("DATASEC", "BIASSEC", "DETSEC", "GAIN", "RDNOISE", "SATURATE")
WCS_KEYWORDS = (
    "CTYPE1",
    "CTYPE2",
    "CRVAL1",
    "CRVAL2",
    "CRPIX1",
    "CRPIX2",
    "CD1_1",
    "CD1_2",
    "CD2_1",
    "CD2_2",
)


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
    image_headers: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Validate the headers of one input file and return its registry row.

    ``amplifiers`` holds the header of every image extension (raw format) and
    is empty for eimages; ``image_headers`` holds the image-extension headers of
    an eimage (empty when its pixels are in the primary HDU), for its size.
    Science rows get the header-WCS footprint (``CORNER_COLUMNS``) of the
    assembled detector: the raw size from the amplifiers' DETSEC extents, the
    eimage size from NAXIS1/2. Raises BadInputFile naming the keyword and problem.
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
        detector_size = _check_amplifiers(amplifiers, path)
    else:
        gain = primary.get("GAIN", 1.0)
        if abs(number("GAIN", gain) - 1.0) > 1e-6:
            raise BadInputFile(
                path, f"keyword GAIN={gain}: eimage pixels must be electrons (GAIN=1)"
            )
        detector_size = _eimage_size(primary, image_headers, path)

    corners = dict.fromkeys(CORNER_COLUMNS, float("nan"))
    if obstype == "science":
        try:
            corner_ra, corner_dec = header_wcs_corners(primary, *detector_size)
        except ValueError as err:
            raise BadInputFile(path, f"header WCS: {err}") from None
        corners.update(zip(CORNER_RA_COLUMNS, corner_ra.tolist(), strict=True))
        corners.update(zip(CORNER_DEC_COLUMNS, corner_dec.tolist(), strict=True))

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
        **corners,
        "n_amplifiers": len(amplifiers),
        "detector_nx": detector_size[0],
        "detector_ny": detector_size[1],
        "path": path,
    }


def _band_of(value: Any, path: str) -> str:
    band = str(value).strip().lower()
    if band not in BANDS:
        raise BadInputFile(path, f"keyword FILTER={value!r} is not one of {' '.join(BANDS)}")
    return band


def detector_pixel_corners(nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions of the four outer corners of an ``nx`` x ``ny`` detector.

    Pixel centres are integers, so the outer edges lie half a pixel beyond the
    first and last centres. Order: (x0, y0), (x1, y0), (x1, y1), (x0, y1).
    """
    x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
    y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    return x, y


def header_wcs_corners(
    header: Mapping[str, Any], nx: int, ny: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sky positions (RA, Dec in deg) of the outer detector corners from a header WCS.

    The header is read by astropy, so any projection and distortion keywords it
    holds are honoured. Raises ValueError when the header gives no finite sky
    position for a corner (a singular or unreadable WCS).
    """
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    if not isinstance(header, fits.Header):
        cards = fits.Header()
        for key, value in header.items():
            if isinstance(value, (str, int, float, bool, np.number)):
                cards[key] = value
        header = cards
    x, y = detector_pixel_corners(nx, ny)
    try:
        with warnings.catch_warnings():
            # Date and equinox fix-ups of unrelated keywords are no concern here.
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header, naxis=2)
            ra, dec = wcs.all_pix2world(x, y, 0)
    except Exception as err:  # astropy/wcslib raise their own error types
        reason = " ".join(str(err).split())  # problem lines are one line
        raise ValueError(f"cannot be evaluated ({reason})") from None
    if not wcs.has_celestial:
        raise ValueError("no celestial axes (CTYPE1/2 must be RA---xxx/DEC--xxx)")
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    if not (np.isfinite(ra).all() and np.isfinite(dec).all()):
        raise ValueError("no finite sky position for the detector corners")
    return ra % 360.0, dec


def _eimage_size(
    primary: Mapping[str, Any], image_headers: Sequence[Mapping[str, Any]], path: str
) -> tuple[int, int]:
    """(nx, ny) of an eimage: its first image extension, else its primary HDU."""
    for header in (*image_headers, primary):
        if int(header.get("NAXIS", 0) or 0) >= 2:
            nx, ny = int(header.get("NAXIS1", 0)), int(header.get("NAXIS2", 0))
            if nx > 0 and ny > 0:
                return nx, ny
    raise BadInputFile(path, "no 2-d image (NAXIS1/NAXIS2) in the primary HDU or an extension")


def _check_amplifiers(amplifiers: Sequence[Mapping[str, Any]], path: str) -> tuple[int, int]:
    """Validate the amplifier headers; return the assembled detector size (nx, ny)."""
    if not amplifiers:
        raise BadInputFile(path, "no amplifier image HDUs (raw format needs one HDU per amplifier)")
    covered = 0
    extent_x = extent_y = 0
    placed: list[tuple[int, Section]] = []
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
        for other_index, other in placed:
            if _overlap(det, other):
                raise BadInputFile(
                    path,
                    f"{where}: DETSEC {header['DETSEC']} overlaps that of HDU {other_index}",
                )
        placed.append((index, det))
        covered += det.shape[0] * det.shape[1]
        extent_x = max(extent_x, det.x.stop)
        extent_y = max(extent_y, det.y.stop)
    # Disjoint rectangles whose areas add up to their bounding box tile it exactly.
    if covered != extent_x * extent_y:
        raise BadInputFile(
            path, f"amplifier DETSECs cover {covered} pixels of a {extent_x}x{extent_y} detector"
        )
    return extent_x, extent_y


def _overlap(a: Section, b: Section) -> bool:
    """Whether two detector sections share a pixel."""
    x = a.x.start < b.x.stop and b.x.start < a.x.stop
    return x and a.y.start < b.y.stop and b.y.start < a.y.stop


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


def find_inconsistent_files(registry: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Files that disagree with the other files of their detector or visit.

    Every file of a detector must have the same amplifier layout (a file that
    lost amplifier HDUs can still tile a smaller detector), and every detector
    of a science visit the same band. The value most files share is taken as
    right; when no value is in the majority, every file of the group is out.
    Returns (one problem line per file, the paths to leave out).
    """
    problems: list[str] = []
    bad: list[str] = []
    sized = registry[registry["detector_nx"] > 0]
    for detector, rows in sized.groupby("detector"):
        layout = [
            f"{n} amplifier(s) on a {nx}x{ny} detector"
            for n, nx, ny in rows[["n_amplifiers", "detector_nx", "detector_ny"]].itertuples(
                index=False
            )
        ]
        _odd_ones_out(
            rows, pd.Series(layout, index=rows.index), f"detector {detector}", problems, bad
        )
    science = registry[registry["obstype"] == "science"]
    for visit, rows in science.groupby("visit"):
        bands = "band " + rows["band"].astype(str)
        _odd_ones_out(rows, bands, f"visit {visit}", problems, bad)
    return problems, bad


def _odd_ones_out(
    rows: pd.DataFrame, values: pd.Series, group: str, problems: list[str], bad: list[str]
) -> None:
    counts = values.value_counts()
    if len(counts) < 2:
        return
    majority = counts.index[0] if counts.iloc[0] > counts.iloc[1] else None
    for index, value in values.items():
        if value == majority:
            continue
        path = str(rows.at[index, "path"])
        if majority is None:
            seen = "; ".join(f"{v} in {c} file(s)" for v, c in counts.items())
            problems.append(f"{path}: {value}, but the files of {group} disagree ({seen})")
        else:
            problems.append(
                f"{path}: {value}, but {counts.iloc[0]} other file(s) of {group} have {majority}"
            )
        bad.append(path)


def empty_registry() -> pd.DataFrame:
    """A registry with no rows but the right columns and dtypes."""
    return as_registry([])


def as_registry(records: Sequence[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Registry table with the canonical columns, dtypes and row order."""
    table = pd.DataFrame(list(records) if not isinstance(records, pd.DataFrame) else records)
    for col in REGISTRY_COLUMNS:
        if col not in table:
            table[col] = 0 if col in _OPTIONAL_INT_COLUMNS else pd.Series(dtype=object)
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
            **dict.fromkeys(CORNER_COLUMNS, np.float64),
            "n_amplifiers": np.int64,
            "detector_nx": np.int64,
            "detector_ny": np.int64,
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
