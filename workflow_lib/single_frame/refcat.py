"""Reference catalog: standard columns, calibration-star selection, HEALPix sharding.

A user's catalog (CONTRACT 1.3) arrives in any column layout; the column map of
the configuration (:class:`workflow_lib.core.config.RefcatColumns`) turns it into one
standard frame so that astrometry and photometric calibration never see the
original names. The catalog is split into HEALPix shards (nested ordering) so a
CCD job reads only the few shards around its detector instead of the whole
catalog, as the LSST stack's HTM-indexed reference catalogs do.

Numerics only: DataFrames and arrays in and out; file handling lives in
:mod:`workflow_lib.steps.refcat`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from workflow_lib.core.config import BANDS, RefcatColumns

#: Shard size used when nothing else is asked for: nside 64 pixels are ~0.9 deg
#: across, between an LSST detector (0.23 deg) and the focal plane (3.5 deg).
DEFAULT_NSIDE = 64

_TRUE_STRINGS = {"1", "t", "true", "y", "yes", "star"}
_FALSE_STRINGS = {"0", "f", "false", "n", "no", "", "nan", "none", "galaxy"}


def standard_columns(bands: Sequence[str]) -> list[str]:
    """Column names of a standardized reference catalog, in order."""
    cols = ["id", "ra", "dec"]
    for b in bands:
        cols += [f"{b}_mag", f"{b}_mag_err"]
    return [*cols, "is_star", "is_variable"]


def empty_refcat(bands: Sequence[str]) -> pd.DataFrame:
    """A standardized catalog with no rows (the right columns and dtypes)."""
    data: dict[str, np.ndarray] = {
        "id": np.zeros(0, np.int64),
        "ra": np.zeros(0),
        "dec": np.zeros(0),
    }
    for b in bands:
        data[f"{b}_mag"] = np.zeros(0)
        data[f"{b}_mag_err"] = np.zeros(0)
    data["is_star"] = np.zeros(0, bool)
    data["is_variable"] = np.zeros(0, bool)
    return pd.DataFrame(data)[standard_columns(bands)]


def _where(source: str) -> str:
    return f"{source}: " if source else "reference catalog: "


def _numeric(table: pd.DataFrame, name: str, what: str, source: str) -> np.ndarray:
    """Column ``name`` as float64; a clear error when it is not numeric."""
    values = pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=np.float64)
    raw = table[name]
    bad = np.isnan(values) & raw.notna().to_numpy()
    if bad.any():
        example = raw[bad].iloc[0]
        raise ValueError(
            f"{_where(source)}column '{name}' ({what}) is not numeric "
            f"({int(bad.sum())} value(s) such as {example!r})"
        )
    return values


def _flag(table: pd.DataFrame, name: str | None, default: bool, source: str) -> np.ndarray:
    """A 0/1, boolean or yes/no column as bool; ``default`` when the column is absent."""
    if name is None or name not in table.columns:
        return np.full(len(table), default, dtype=bool)
    col = table[name]
    if col.dtype == bool:
        return col.to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(col):
        values = col.to_numpy(dtype=np.float64)
        return np.where(np.isnan(values), default, values != 0)
    text = col.astype(str).str.strip().str.lower()
    out = np.full(len(table), default, dtype=bool)
    is_true = text.isin(_TRUE_STRINGS).to_numpy()
    is_false = text.isin(_FALSE_STRINGS).to_numpy()
    unknown = ~(is_true | is_false)
    if unknown.any():
        raise ValueError(
            f"{_where(source)}column '{name}' is not a flag (0/1, true/false): "
            f"value {col[unknown].iloc[0]!r}"
        )
    out[is_true] = True
    out[is_false] = False
    return out


def _band_columns(
    table: pd.DataFrame, columns: RefcatColumns, bands: Sequence[str] | None, source: str
) -> dict[str, str]:
    """band -> magnitude column, checked against the table."""
    if columns.mags:
        mapping = {b: c for b, c in columns.mags.items() if bands is None or b in bands}
    else:
        mapping = {b: b for b in BANDS if b in table.columns and (bands is None or b in bands)}
    if bands is not None:
        for b in bands:
            if b not in mapping:
                if columns.mags:
                    raise ValueError(
                        f"{_where(source)}band {b!r} is requested but the column map "
                        f"has no magnitude column for it (mags: {dict(columns.mags)})"
                    )
                mapping[b] = b
    for b, col in mapping.items():
        if col not in table.columns:
            raise ValueError(
                f"{_where(source)}missing magnitude column '{col}' for band {b!r} "
                f"(columns: {', '.join(map(str, table.columns))})"
            )
    if not mapping:
        raise ValueError(
            f"{_where(source)}no magnitude column found (expected one of the bands "
            f"{', '.join(BANDS)} as a column name, or a `mags` column map)"
        )
    return {b: mapping[b] for b in BANDS if b in mapping}


def _error_column(
    table: pd.DataFrame, columns: RefcatColumns, band: str, mag_col: str, source: str
) -> str | None:
    if band in columns.mag_errs:
        name = columns.mag_errs[band]
        if name not in table.columns:
            raise ValueError(
                f"{_where(source)}missing magnitude-error column '{name}' for band {band!r}"
            )
        return name
    for name in (f"{band}_err", f"{mag_col}_err", f"sigma_{mag_col}"):
        if name in table.columns:
            return name
    return None


def standardize_refcat(
    table: pd.DataFrame,
    columns: RefcatColumns,
    *,
    bands: Sequence[str] | None = None,
    source: str = "",
) -> pd.DataFrame:
    """Rename and check a reference catalog into the standard layout.

    Returns columns ``id`` (int64), ``ra``, ``dec`` (deg), ``{b}_mag`` and
    ``{b}_mag_err`` for every mapped band (``bands`` restricts them; an error
    column that is absent gives NaN), ``is_star`` (True when the catalog has no
    such column) and ``is_variable`` (False when absent). Magnitude errors are
    taken from ``columns.mag_errs``, else ``{band}_err``, ``{column}_err`` or
    ``sigma_{column}`` (the CatSim habit) when present.

    Raises ValueError naming ``source`` (the file) and the missing column or the
    problem: non-numeric values, ra outside [0, 360), dec outside [-90, 90], no rows,
    ids shared by several rows.
    Doing this once, up front, means a bad catalog fails before any pixel is read.
    """
    for what, name in (("id", columns.id), ("ra", columns.ra), ("dec", columns.dec)):
        if name not in table.columns:
            raise ValueError(
                f"{_where(source)}missing {what} column '{name}' "
                f"(columns: {', '.join(map(str, table.columns))})"
            )
    if len(table) == 0:
        raise ValueError(f"{_where(source)}the reference catalog has no rows")
    mag_cols = _band_columns(table, columns, bands, source)

    ra = _numeric(table, columns.ra, "ra", source)
    dec = _numeric(table, columns.dec, "dec", source)
    bad_ra = np.isfinite(ra) & ((ra < 0.0) | (ra >= 360.0))
    if bad_ra.any():
        raise ValueError(
            f"{_where(source)}column '{columns.ra}' (ra) outside [0, 360) deg: "
            f"{int(bad_ra.sum())} row(s), e.g. {ra[bad_ra][0]!r}"
        )
    bad_dec = np.isfinite(dec) & ((dec < -90.0) | (dec > 90.0))
    if bad_dec.any():
        raise ValueError(
            f"{_where(source)}column '{columns.dec}' (dec) outside [-90, 90] deg: "
            f"{int(bad_dec.sum())} row(s), e.g. {dec[bad_dec][0]!r}"
        )
    ids = _numeric(table, columns.id, "id", source)
    if not np.all(np.isfinite(ids)) or np.any(ids != np.round(ids)):
        raise ValueError(f"{_where(source)}column '{columns.id}' (id) is not an integer id")
    duplicated = table[columns.id].duplicated(keep=False)
    if duplicated.any():
        # A star listed twice is two references at one position: an ambiguous match.
        examples = ", ".join(str(v) for v in table.loc[duplicated, columns.id].unique()[:3])
        raise ValueError(
            f"{_where(source)}column '{columns.id}' (id) has {int(duplicated.sum())} rows "
            f"sharing an id, e.g. {examples}"
        )
    id_values = pd.to_numeric(table[columns.id]).to_numpy()
    data: dict[str, np.ndarray] = {
        "id": id_values.astype(np.int64),
        "ra": ra,
        "dec": dec,
    }
    for b, col in mag_cols.items():
        mag = _numeric(table, col, f"{b} magnitude", source)
        data[f"{b}_mag"] = mag
        err_col = _error_column(table, columns, b, col, source)
        if err_col is None:
            data[f"{b}_mag_err"] = np.full(len(table), np.nan)
        else:
            data[f"{b}_mag_err"] = _numeric(table, err_col, f"{b} magnitude error", source)
    data["is_star"] = _flag(table, columns.is_star, True, source)
    data["is_variable"] = _flag(table, columns.is_variable, False, source)
    out = pd.DataFrame(data)
    return out[standard_columns(list(mag_cols))]


def refcat_bands(refcat: pd.DataFrame) -> list[str]:
    """Bands present in a standardized catalog, in ugrizy order."""
    return [b for b in BANDS if f"{b}_mag" in refcat.columns]


def calibration_stars(refcat: pd.DataFrame) -> pd.DataFrame:
    """Rows usable for calibration: stars, not variable, with finite positions.

    Galaxies centroid and photometer differently from the PSF-like stars the
    calibration assumes, and variables break the zero point, so both go.
    """
    keep = (
        refcat["is_star"].to_numpy(bool)
        & ~refcat["is_variable"].to_numpy(bool)
        & np.isfinite(refcat["ra"].to_numpy(float))
        & np.isfinite(refcat["dec"].to_numpy(float))
    )
    return refcat.loc[keep].reset_index(drop=True)


# ------------------------------------------------------------------ sharding
def _healpix(nside: int):
    from astropy_healpix import HEALPix

    if nside < 1 or (nside & (nside - 1)) != 0:
        raise ValueError(f"HEALPix nside must be a power of 2, got {nside}")
    return HEALPix(nside=nside, order="nested")


def nside_for_size(size_deg: float) -> int:
    """The largest nside whose pixels are still at least ``size_deg`` across.

    Shards of about a detector's to a focal plane's size keep one CCD's read to
    one to four files, without thousands of tiny files.
    """
    if not size_deg > 0:
        raise ValueError(f"shard size must be positive, got {size_deg}")
    nside = 1
    # HEALPix pixel side ~ sqrt(4 pi / (12 nside^2)) rad = 58.6 / nside deg.
    while 58.6 / (nside * 2) >= size_deg and nside < 2**29:
        nside *= 2
    return nside


def healpix_index(ra: np.ndarray, dec: np.ndarray, *, nside: int) -> np.ndarray:
    """Nested HEALPix pixel (int64) of each position (deg)."""
    import astropy.units as u

    hp = _healpix(nside)
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    return np.asarray(hp.lonlat_to_healpix(ra * u.deg, dec * u.deg), dtype=np.int64)


def shards_for_region(ra: float, dec: float, radius_deg: float, *, nside: int) -> list[int]:
    """Nested HEALPix pixels that overlap the cone (sorted)."""
    import astropy.units as u

    if not radius_deg >= 0:
        raise ValueError(f"cone radius must be >= 0 deg, got {radius_deg}")
    hp = _healpix(nside)
    pix = hp.cone_search_lonlat(
        float(ra) * u.deg, float(dec) * u.deg, radius=max(float(radius_deg), 1e-9) * u.deg
    )
    # The cone search is exact for pixels whose corners or centre fall inside;
    # add the pixel of the centre itself for tiny cones.
    centre = healpix_index(np.array([ra]), np.array([dec]), nside=nside)
    return sorted({int(p) for p in np.asarray(pix)} | {int(centre[0])})


def angular_separation_deg(
    ra1: np.ndarray, dec1: np.ndarray, ra2: float, dec2: float
) -> np.ndarray:
    """Great-circle distance (deg) of positions from one point (haversine, stable when small)."""
    r1, d1 = np.deg2rad(np.asarray(ra1, float)), np.deg2rad(np.asarray(dec1, float))
    r2, d2 = np.deg2rad(ra2), np.deg2rad(dec2)
    h = np.sin((d1 - d2) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r1 - r2) / 2) ** 2
    return np.rad2deg(2.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def cut_to_cone(refcat: pd.DataFrame, ra: float, dec: float, radius_deg: float) -> pd.DataFrame:
    """Rows of ``refcat`` within ``radius_deg`` of (ra, dec)."""
    sep = angular_separation_deg(refcat["ra"].to_numpy(), refcat["dec"].to_numpy(), ra, dec)
    return refcat.loc[sep <= radius_deg].reset_index(drop=True)
