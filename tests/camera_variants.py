"""Transformed copies of the tiny survey: other cameras and conventions within the CONTRACT.

The built-in simulator writes one convention (OBSTYPE, int32 pixels, plain
``.fits``, 2 x 2 amplifiers with prescan, data, then serial overscan, the
sky's usual parity). :func:`write_variant` rewrites every file of a simulated
survey (calibration exposures included) into another convention that
CONTRACT section 1 allows; :func:`process_variant` runs the real single-frame
steps on it (ingest, master calibrations, process_ccd) and
:func:`variant_figures` compares the products with the simulation's truth
(sky positions of the truth do not change under pixel transformations).

Pixel transformations are exact where they can be (a flip through DETSEC, an
amplifier split along its rows, overscan moved before the data); a re-cut into
amplifiers that straddle the original ones re-digitizes the electrons of each
pixel with one gain per new amplifier (see :func:`recut_amplifiers`).
"""

from __future__ import annotations

import gzip
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from astropy.io import fits

Amp = tuple[np.ndarray, fits.Header]
# A transform of one file: (primary header, amplifier HDUs, obstype) -> new ones.
Transform = Callable[[fits.Header, list[Amp], str], tuple[fits.Header, list[Amp]]]

PRESET, SEED = "tiny", 7
REFCAT_COLUMNS = {
    "id": "uniqueId",
    "ra": "raJ2000",
    "dec": "decJ2000",
    "is_star": "starnotgal",
    "is_variable": "isvariable",
    "mags": {"g": "lsst_g", "r": "lsst_r", "i": "lsst_i"},
}


# ---------------------------------------------------------------------------
# The simulated survey (a subset: 2 visits in different bands, their calibrations)
# ---------------------------------------------------------------------------
def choose_visits(n_bands: int = 2, preset: str = PRESET) -> list[int]:
    """The first science visit of each of ``n_bands`` different bands of the plan."""
    from workflow_lib.sim.presets import get_preset
    from workflow_lib.sim.survey import plan_survey

    registry = plan_survey(get_preset(preset), SEED).registry("raw")
    science = registry[registry["obstype"] == "science"].sort_values("exposure")
    firsts = science.drop_duplicates("band")
    return [int(v) for v in firsts["exposure"].iloc[:n_bands]]


def simulate_subset(
    root: Path, visits: Sequence[int], *, image_format: str = "raw", preset: str = PRESET
) -> Path:
    """Simulate the scene, ``visits`` and (raw) the calibrations they need under ``root``.

    Products follow the workflow's paths (``sim/raw``, ``sim/eimage``,
    ``sim/truth``, ``sim/refcat``); returns the directory of the image files.
    """
    from workflow_lib.core.paths import ProductPaths
    from workflow_lib.sim.presets import get_preset
    from workflow_lib.sim.survey import plan_survey
    from workflow_lib.steps.simulate import simulate_exposures, simulate_scene

    paths = ProductPaths(root)
    if not paths.path("truth_object").exists():
        simulate_scene(
            preset=preset,
            seed=SEED,
            truth_object_path=paths.path("truth_object"),
            truth_lightcurve_path=paths.path("truth_lightcurve"),
            truth_ccdvisit_path=paths.path("truth_ccdvisit"),
            truth_amplifier_path=paths.path("truth_amplifier"),
            refcat_path=paths.path("sim_refcat"),
        )
    registry = plan_survey(get_preset(preset), SEED).registry(image_format)
    bands = set(registry.loc[registry["exposure"].isin(visits), "band"])
    keep = registry["exposure"].isin(visits)
    if image_format == "raw":
        calib = registry["obstype"] != "science"
        keep |= calib & ((registry["obstype"] != "flat") | registry["band"].isin(bands))
    name = "sim_raw" if image_format == "raw" else "sim_eimage"
    output_paths: dict[int, dict[int, Path]] = {}
    rows = registry[keep]
    for exposure, detector in zip(rows["exposure"], rows["detector"], strict=True):
        output_paths.setdefault(int(exposure), {})[int(detector)] = paths.path(
            name, exposure=exposure, detector=detector
        )
    simulate_exposures(
        preset=preset,
        seed=SEED,
        output_paths=output_paths,
        truth_object_path=paths.path("truth_object"),
        image_format=image_format,
    )
    return paths.path(name, exposure=0, detector=0).parents[1]


def simulate_own_survey(preset: Any, root: Path, *, image_format: str = "raw") -> dict[str, Any]:
    """A case's own survey of ``preset`` (a SimPreset), made under ``root`` in this process.

    The preset is registered here (a worker process may not know it), the first
    visits of 2 bands are simulated with their calibrations (raw) and the
    reference catalog is sharded; returns run_case's survey arguments.
    """
    from workflow_lib.sim.presets import register_preset

    register_preset(preset)
    visits = choose_visits(preset=preset.name)
    source = simulate_subset(root, visits, image_format=image_format, preset=preset.name)
    refcat = root / "sim/refcat/refcat_phosim.csv"
    return {
        "source_dir": source,
        "refcat": refcat,
        "refcat_manifest": shard_reference_catalog(refcat, root / "refcat_shards"),
        "truth_dir": root / "sim/truth",
        "visits": visits,
    }


# ---------------------------------------------------------------------------
# Header-WCS algebra
# ---------------------------------------------------------------------------
def _cd(header: Mapping[str, Any]) -> np.ndarray:
    return np.array([[header["CD1_1"], header["CD1_2"]], [header["CD2_1"], header["CD2_2"]]])


def _set_cd(header: fits.Header, cd: np.ndarray) -> None:
    for i in range(2):
        for j in range(2):
            header[f"CD{i + 1}_{j + 1}"] = float(cd[i, j])


def wcs_pixel_transform(header: fits.Header, matrix: np.ndarray, offset: np.ndarray) -> None:
    """Rewrite CRPIX/CD for new pixel coordinates p' = matrix @ p + offset (1-based FITS).

    The sky position of every physical pixel is unchanged: with
    p = M^-1 (p' - t), the new CD is CD M^-1 and the new CRPIX is M CRPIX + t.
    """
    crpix = np.array([header["CRPIX1"], header["CRPIX2"]], dtype=float)
    new_crpix = matrix @ crpix + offset
    header["CRPIX1"], header["CRPIX2"] = float(new_crpix[0]), float(new_crpix[1])
    _set_cd(header, _cd(header) @ np.linalg.inv(matrix))


def perturb_pointing(header: fits.Header, *, offset_arcsec: float, rotation_deg: float) -> None:
    """Move the header WCS by ``offset_arcsec`` (along Dec) and rotate it on the sky."""
    theta = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    _set_cd(header, rot @ _cd(header))
    header["CRVAL2"] = float(header["CRVAL2"]) + offset_arcsec / 3600.0


# ---------------------------------------------------------------------------
# Amplifier geometry helpers
# ---------------------------------------------------------------------------
def _section(text: str) -> tuple[int, int, int, int]:
    x, y = text.strip()[1:-1].split(",")
    x1, x2 = (int(v) for v in x.split(":"))
    y1, y2 = (int(v) for v in y.split(":"))
    return x1, x2, y1, y2


def _format(x1: int, x2: int, y1: int, y2: int) -> str:
    return f"[{x1}:{x2},{y1}:{y2}]"


def detector_size(amps: Sequence[Amp]) -> tuple[int, int]:
    """(nx, ny) of the assembled detector: the extent of the DETSECs."""
    nx = ny = 0
    for _, header in amps:
        x1, x2, y1, y2 = _section(header["DETSEC"])
        nx, ny = max(nx, x1, x2), max(ny, y1, y2)
    return nx, ny


def _amp_header(header: fits.Header) -> fits.Header:
    """The amplifier's keywords without the structural ones (astropy writes those)."""
    out = header.copy()  # copies the cards too: editing ``out`` leaves ``header`` as it was
    for key in (
        "XTENSION",
        "BITPIX",
        "NAXIS",
        "NAXIS1",
        "NAXIS2",
        "PCOUNT",
        "GCOUNT",
        "CHECKSUM",
        "DATASUM",
        "BZERO",
        "BSCALE",
    ):
        out.remove(key, ignore_missing=True, remove_all=True)
    return out


# ---------------------------------------------------------------------------
# Transforms: (primary, amplifiers, obstype) -> (primary, amplifiers); the factories
# return functools.partial objects, which the worker processes can unpickle.
# ---------------------------------------------------------------------------
def identity(primary: fits.Header, amps: list[Amp], obstype: str) -> tuple[fits.Header, list[Amp]]:
    return primary, amps


def imgtype(case: str) -> Transform:
    """OBSTYPE removed, IMGTYPE holding the value in ``case`` ('lower', 'upper' or 'title')."""
    return partial(_imgtype, case=case)


def _imgtype(primary, amps, obstype, *, case):  # type: ignore[no-untyped-def]
    value = str(primary.get("OBSTYPE", primary.get("IMGTYPE"))).strip()
    value = {"lower": value.lower(), "upper": value.upper(), "title": value.title()}[case]
    primary.remove("OBSTYPE", ignore_missing=True)
    primary["IMGTYPE"] = value
    return primary, amps


def object_for_science(primary, amps, obstype):  # type: ignore[no-untyped-def]
    """Science frames called 'Object' (as many observatories write), in IMGTYPE or OBSTYPE."""
    if obstype == "science":
        primary["OBSTYPE" if "OBSTYPE" in primary else "IMGTYPE"] = "Object"
    return primary, amps


def no_darktime(primary, amps, obstype):  # type: ignore[no-untyped-def]
    """DARKTIME left out (CONTRACT 1.1: it defaults to EXPTIME)."""
    primary.remove("DARKTIME", ignore_missing=True)
    return primary, amps


def pixel_dtype(dtype: str) -> Transform:
    """Pixels stored as ``uint16`` (clipped at 65535, SATURATE capped), ``float32``, or
    ``int16_scaled``: BITPIX 16 with BSCALE 2 and BZERO 65536 (read back as floats)."""
    return partial(_pixel_dtype, dtype=dtype)


def _pixel_dtype(primary, amps, obstype, *, dtype):  # type: ignore[no-untyped-def]
    out = []
    for data, header in amps:
        header = _amp_header(header)
        if dtype == "float32":
            new = data.astype(np.float32)
        elif dtype == "uint16":
            new = np.clip(data, 0, 65535).astype(np.uint16)
            header["SATURATE"] = min(float(header["SATURATE"]), 65535.0)
        elif dtype == "int16_scaled":  # written by write_file with BSCALE 2
            new = np.clip(data, 0, 131070).astype(np.float64)
            header["SATURATE"] = min(float(header["SATURATE"]), 131070.0)
        else:
            raise ValueError(dtype)
        out.append((new, header))
    return primary, out


def wcs_offset(offset_arcsec: float, rotation_deg: float) -> Transform:
    """The science header WCS off by ``offset_arcsec`` and rotated by ``rotation_deg``."""
    return partial(_wcs_offset, offset_arcsec=offset_arcsec, rotation_deg=rotation_deg)


def _wcs_offset(primary, amps, obstype, *, offset_arcsec, rotation_deg):  # type: ignore[no-untyped-def]
    if obstype == "science":
        perturb_pointing(primary, offset_arcsec=offset_arcsec, rotation_deg=rotation_deg)
    return primary, amps


def flip_detsec(*, x: bool, y: bool) -> Transform:
    """Mirror the assembled detector through DETSEC (``x``, ``y`` or both = 180 deg).

    Raw pixels and the readout order stay; only where each amplifier lands in
    the detector changes, so the assembled image is mirrored. The header WCS
    follows, so that each physical pixel keeps its sky position.
    """
    return partial(_flip_detsec, x=x, y=y)


def _flip_detsec(primary, amps, obstype, *, x, y):  # type: ignore[no-untyped-def]
    nx, ny = detector_size(amps)
    out = []
    for data, header in amps:
        header = header.copy()
        x1, x2, y1, y2 = _section(header["DETSEC"])
        if x:
            x1, x2 = nx + 1 - x1, nx + 1 - x2
        if y:
            y1, y2 = ny + 1 - y1, ny + 1 - y2
        header["DETSEC"] = _format(x1, x2, y1, y2)
        out.append((data, header))
    if "CRPIX1" in primary:
        matrix = np.diag([-1.0 if x else 1.0, -1.0 if y else 1.0])
        offset = np.array([nx + 1.0 if x else 0.0, ny + 1.0 if y else 0.0])
        wcs_pixel_transform(primary, matrix, offset)
    return primary, out


def overscan_first(primary, amps, obstype):  # type: ignore[no-untyped-def]
    """Serial overscan columns moved before the prescan and data (BIASSEC on the left)."""
    out = []
    for data, header in amps:
        header = header.copy()
        bx1, bx2, by1, by2 = _section(header["BIASSEC"])
        dx1, dx2, dy1, dy2 = _section(header["DATASEC"])
        if not dx2 < bx1:
            raise ValueError("expected the simulator's overscan after the data")
        nb = bx2 - bx1 + 1
        over = data[:, bx1 - 1 : bx2]
        rest = np.delete(data, np.s_[bx1 - 1 : bx2], axis=1)
        header["BIASSEC"] = _format(1, nb, by1, by2)
        header["DATASEC"] = _format(dx1 + nb, dx2 + nb, dy1, dy2)
        out.append((np.ascontiguousarray(np.hstack([over, rest])), header))
    return primary, out


def parallel_overscan(prescan_rows: int, overscan_rows: int) -> Transform:
    """Rows of parallel prescan below and parallel overscan above each amplifier's data.

    The new rows hold bias and read noise (drawn from the amplifier's serial
    overscan level and scatter); DATASEC moves up by ``prescan_rows`` and
    BIASSEC spans the amplifier's full height, as in files that give the
    serial overscan column block whole.
    """
    return partial(_parallel_overscan, prescan_rows=prescan_rows, overscan_rows=overscan_rows)


def _parallel_overscan(primary, amps, obstype, *, prescan_rows, overscan_rows):  # type: ignore[no-untyped-def]
    seed = int(primary.get("EXPID", 0)) * 100 + int(primary["DETECTOR"])
    rng = np.random.default_rng(seed)
    out = []
    for data, header in amps:
        header = header.copy()
        dx1, dx2, dy1, dy2 = _section(header["DATASEC"])
        bx1, bx2, by1, by2 = _section(header["BIASSEC"])
        if (dy1, dy2) != (1, data.shape[0]) or (by1, by2) != (dy1, dy2):
            raise ValueError("expected data and serial overscan over every row")
        over = data[:, bx1 - 1 : bx2].astype(float)
        level = float(np.median(over))
        noise = 1.4826 * float(np.median(np.abs(over - np.median(over, axis=1)[:, None])))
        below = rng.normal(level, noise, size=(prescan_rows, data.shape[1]))
        above = rng.normal(level, noise, size=(overscan_rows, data.shape[1]))
        new = np.vstack([np.round(below), data, np.round(above)]).astype(data.dtype)
        ny = new.shape[0]
        header["DATASEC"] = _format(dx1, dx2, dy1 + prescan_rows, dy2 + prescan_rows)
        header["BIASSEC"] = _format(bx1, bx2, 1, ny)
        out.append((np.ascontiguousarray(new), header))
    return primary, out


def split_rows(n: int) -> Transform:
    """Each amplifier cut into ``n`` amplifiers along its rows (exact: 2 rows -> 2n rows).

    Every piece keeps its rows of prescan, data and serial overscan, the gain,
    read noise and saturation of its parent; DETSEC follows the parent's
    orientation.
    """
    return partial(_split_rows, n=n)


def _split_rows(primary, amps, obstype, *, n):  # type: ignore[no-untyped-def]
    out = []
    for data, header in amps:
        dx1, dx2, dy1, dy2 = _section(header["DATASEC"])
        bx1, bx2, _, _ = _section(header["BIASSEC"])
        sx1, sx2, sy1, sy2 = _section(header["DETSEC"])
        rows = dy2 - dy1 + 1
        if rows % n:
            raise ValueError(f"{rows} rows do not split into {n}")
        step = rows // n
        sign = 1 if sy2 >= sy1 else -1
        for k in range(n):
            piece = data[dy1 - 1 + k * step : dy1 - 1 + (k + 1) * step]
            h = _amp_header(header)
            h["EXTNAME"] = f"{header.get('EXTNAME', 'A')}_{k}"
            h["DATASEC"] = _format(dx1, dx2, 1, step)
            h["BIASSEC"] = _format(bx1, bx2, 1, step)
            start = sy1 + sign * k * step
            h["DETSEC"] = _format(sx1, sx2, start, start + sign * (step - 1))
            out.append((np.ascontiguousarray(piece), h))
    return primary, out


def recut_amplifiers(n_cols: int, n_rows: int) -> Transform:
    """The detector re-cut into ``n_cols`` x ``n_rows`` amplifiers (1 x 1: one amplifier).

    Each original amplifier is overscan-corrected row by row (median of its
    overscan row) and multiplied by its gain: electrons. Every new amplifier
    then digitizes the electrons of its pixels with one gain (the median of
    the originals'), a bias level of 1000 ADU and a fresh 32-column overscan
    of read noise after a 4-column prescan; amplifiers on the right half are
    read from the right, top ones from the top (flipped DETSEC), as on LSST
    CCDs. SATURATE is the lowest level at which an original amplifier
    saturated, in the new ADU.
    """
    return partial(_recut_amplifiers, n_cols=n_cols, n_rows=n_rows)


def _recut_amplifiers(primary, amps, obstype, *, n_cols, n_rows):  # type: ignore[no-untyped-def]
    prescan, overscan, bias_level = 4, 32, 1000.0
    nx, ny = detector_size(amps)
    electrons = np.zeros((ny, nx))
    gains, noises, sat_e = [], [], []
    for data, header in amps:
        dx1, dx2, dy1, dy2 = _section(header["DATASEC"])
        bx1, bx2, by1, by2 = _section(header["BIASSEC"])
        sx1, sx2, sy1, sy2 = _section(header["DETSEC"])
        gain = float(header["GAIN"])
        level = np.median(data[by1 - 1 : by2, bx1 - 1 : bx2].astype(float), axis=1)
        pix = (data[dy1 - 1 : dy2, dx1 - 1 : dx2] - level[:, None]) * gain
        if sx1 > sx2:
            pix = pix[:, ::-1]
        if sy1 > sy2:
            pix = pix[::-1]
        electrons[min(sy1, sy2) - 1 : max(sy1, sy2), min(sx1, sx2) - 1 : max(sx1, sx2)] = pix
        gains.append(gain)
        noises.append(float(header["RDNOISE"]))
        sat_e.append((float(header["SATURATE"]) - float(np.median(level))) * gain)
    gain, noise = float(np.median(gains)), float(np.median(noises))
    saturate = float(np.floor(bias_level + min(sat_e) / gain))
    if nx % n_cols or ny % n_rows:
        raise ValueError(f"{nx}x{ny} does not cut into {n_cols}x{n_rows}")
    ax, ay = nx // n_cols, ny // n_rows
    rng = np.random.default_rng(int(primary.get("EXPID", 0)) * 100 + int(primary["DETECTOR"]))
    out = []
    for row in range(n_rows):
        for col in range(n_cols):
            pix = electrons[row * ay : (row + 1) * ay, col * ax : (col + 1) * ax]
            x1, x2 = col * ax + 1, (col + 1) * ax
            y1, y2 = row * ay + 1, (row + 1) * ay
            if n_cols > 1 and col >= n_cols / 2:
                pix, (x1, x2) = pix[:, ::-1], (x2, x1)
            if n_rows > 1 and row >= n_rows / 2:
                pix, (y1, y2) = pix[::-1], (y2, y1)
            width = prescan + ax + overscan
            raw = bias_level + rng.normal(0.0, noise / gain, size=(ay, width))
            raw[:, prescan : prescan + ax] = bias_level + pix / gain
            raw = np.clip(np.round(raw), 0, saturate)
            h = fits.Header()
            h["EXTNAME"] = f"A{row}{col}"
            h["DATASEC"] = _format(prescan + 1, prescan + ax, 1, ay)
            h["BIASSEC"] = _format(prescan + ax + 1, width, 1, ay)
            h["DETSEC"] = _format(x1, x2, y1, y2)
            h["GAIN"], h["RDNOISE"], h["SATURATE"] = gain, noise, saturate
            out.append((raw.astype(np.int32), h))
    return primary, out


def transpose_eimage(primary, amps, obstype):  # type: ignore[no-untyped-def]
    """An eimage with x and y swapped (a 90 deg turn and a mirror; no DETSEC can say it)."""
    ((data, _),) = amps
    wcs_pixel_transform(primary, np.array([[0.0, 1.0], [1.0, 0.0]]), np.zeros(2))
    return primary, [(np.ascontiguousarray(data.T), primary)]


def rotate90_eimage(primary, amps, obstype):  # type: ignore[no-untyped-def]
    """An eimage turned by 90 deg: new pixel (x', y') = (ny + 1 - y, x), 1-based."""
    ((data, _),) = amps
    ny = data.shape[0]
    matrix = np.array([[0.0, -1.0], [1.0, 0.0]])
    wcs_pixel_transform(primary, matrix, np.array([ny + 1.0, 0.0]))
    return primary, [(np.ascontiguousarray(np.rot90(data, k=-1)), primary)]


def compose(*transforms: Transform) -> Transform:
    """The transforms applied in turn."""
    return partial(_compose, transforms=transforms)


def _compose(primary, amps, obstype, *, transforms):  # type: ignore[no-untyped-def]
    for t in transforms:
        primary, amps = t(primary, amps, obstype)
    return primary, amps


# ---------------------------------------------------------------------------
# Writing a variant
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One case of the matrix."""

    name: str
    what: str
    transform: Transform = identity
    suffix: str = ".fits"  # .fits, .fits.gz or .fits.fz
    compression: str = "RICE_1"  # for .fits.fz
    drop: tuple[str, ...] = ()  # obstypes whose files are left out ('bias', 'dark', 'flat')
    config: Mapping[str, Any] = field(default_factory=dict)  # override of the workflow config
    masters_from: str | None = None  # reuse the masters of another case (science-only change)
    image_format: str = "raw"  # raw amplifier files, or eimage (one HDU of electrons)
    # A SimPreset: the case simulates its own survey of it in its worker (simulate_own_survey)
    # instead of transforming the shared one.
    preset: Any = None


def _obstype(primary: fits.Header) -> str:
    return str(primary.get("OBSTYPE", primary.get("IMGTYPE", ""))).strip().lower()


def write_file(path: Path, primary: fits.Header, amps: Sequence[Amp], variant: Variant) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if variant.image_format == "eimage":  # the pixels in the primary HDU
        ((data, _),) = amps
        fits.PrimaryHDU(data=data, header=_amp_header(primary)).writeto(path, overwrite=True)
        return
    hdus: list[Any] = [fits.PrimaryHDU(header=primary)]
    for data, header in amps:
        header = _amp_header(header)
        if variant.suffix == ".fits.fz":
            hdus.append(
                fits.CompImageHDU(data=data, header=header, compression_type=variant.compression)
            )
        else:
            hdu = fits.ImageHDU(data=data, header=header)
            if data.dtype == np.float64:  # int16_scaled: BITPIX 16, BSCALE 2, BZERO 65536
                hdu.scale("int16", bscale=2.0, bzero=65536.0)
            hdus.append(hdu)
    if variant.suffix == ".fits.gz":  # astropy's own gzip is level 9: ten times slower
        with gzip.open(path, "wb", compresslevel=1) as out:
            fits.HDUList(hdus).writeto(out)
        return
    fits.HDUList(hdus).writeto(path, overwrite=True)


def write_variant(source_dir: Path, target_dir: Path, variant: Variant) -> list[Path]:
    """Transform every raw file under ``source_dir`` into ``target_dir``; returns the files."""
    from workflow_lib.io import read_image_hdus

    written = []
    for path in sorted(source_dir.rglob("*.fits")):
        primary, amps = read_image_hdus(path)
        obstype = _obstype(primary)
        if obstype in variant.drop:
            continue
        if variant.image_format == "eimage":
            amps = [(amps[0][0], primary)]
        primary, amps = variant.transform(primary, [(d, h) for d, h in amps], obstype)
        name = path.name[: -len(".fits")] + variant.suffix
        target = target_dir / path.parent.name / name
        write_file(target, primary, amps, variant)
        written.append(target)
    return written


# ---------------------------------------------------------------------------
# Processing: the real steps, in-process
# ---------------------------------------------------------------------------
def workflow_config(
    raw_dir: Path,
    output_dir: Path,
    refcat: Path,
    visits: Sequence[int],
    *,
    image_format: str = "raw",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "output_dir": str(output_dir),
        "input": {
            "source": image_format,
            "raw_dir": str(raw_dir),
            "refcat": str(refcat),
            "refcat_columns": REFCAT_COLUMNS,
        },
        "select": {"visit": list(visits)},
    }
    for key, value in (extra or {}).items():
        config[key] = {**config.get(key, {}), **value}
    return config


def shard_reference_catalog(refcat: Path, output_dir: Path) -> Path:
    """The sharded reference catalog, made once and shared by every case."""
    from workflow_lib.steps.refcat import MANIFEST_NAME, shard_refcat

    manifest = output_dir / MANIFEST_NAME
    if not manifest.exists():
        shard_refcat(
            refcat_path=str(refcat), columns=REFCAT_COLUMNS, nside=64, output_dir=str(output_dir)
        )
    return manifest


def process_variant(
    config: Mapping[str, Any], refcat_manifest: Path, masters_dir: Path | None = None
) -> dict[str, float]:
    """Ingest, master calibrations and process_ccd of every selected CCD; timings (s).

    ``masters_dir``: the output directory of a case whose masters are reused
    (copied), for a case that changes science files only.
    """
    from workflow_lib.steps import calibs
    from workflow_lib.steps.ingest import ingest_raw
    from workflow_lib.steps.process_ccd import process_ccd
    from workflow_lib.workflow import WorkflowPlan

    timings: dict[str, float] = {}
    start = time.perf_counter()
    plan = WorkflowPlan(config)
    paths = plan.paths
    ingest_raw(
        raw_dir=plan.raw_dir,
        registry_path=str(paths.path("registry")),
        problems_path=str(paths.path("ingest_problems")),
        image_format=plan.image_format,
        on_bad_file="fail",
        expected_files=plan.input_files,
    )
    timings["ingest"] = time.perf_counter() - start

    start = time.perf_counter()
    detectors = sorted(set(plan.science["detector"]))
    if plan.image_format == "raw" and masters_dir is not None:
        shutil.copytree(Path(masters_dir) / "calib", paths.root / "calib", dirs_exist_ok=True)
    elif plan.image_format == "raw":
        for detector in detectors:
            ids = {"detector": str(detector)}
            if plan.has_calib("bias", detector):
                calibs.make_master_bias(
                    **plan.master_bias_inputs(ids),
                    output_path=str(paths.path("bias", detector=detector)),
                )
            if plan.has_calib("dark", detector):
                calibs.make_master_dark(
                    **plan.master_dark_inputs(ids),
                    output_path=str(paths.path("dark", detector=detector)),
                )
            for band in sorted(set(plan.science["band"])):
                if plan.has_calib("flat", detector, band):
                    calibs.make_master_flat(
                        **plan.master_flat_inputs({**ids, "band": band}),
                        band=band,
                        output_path=str(paths.path("flat", detector=detector, band=band)),
                    )
            if plan._has_defects(detector):
                calibs.make_defects(
                    **plan.defects_inputs(ids),
                    output_path=str(paths.path("defects", detector=detector)),
                )
    timings["calibs"] = time.perf_counter() - start

    start = time.perf_counter()
    for visit, detector in plan.science_ids:
        inputs = plan.process_ccd_inputs({"visit": str(visit), "detector": str(detector)})
        inputs["refcat_manifest_path"] = str(refcat_manifest)
        process_ccd(
            **inputs,
            calexp_path=str(paths.path("calexp", visit=visit, detector=detector)),
            src_path=str(paths.path("src", visit=visit, detector=detector)),
            ccdvisit_path=str(paths.path("ccdVisit", visit=visit, detector=detector)),
            visit=visit,
            detector=detector,
            image_format=plan.image_format,
            isr=plan.section("isr"),
            calibrate=plan.section("calibrate"),
        )
    timings["process_ccd"] = time.perf_counter() - start
    return timings


def variant_figures(output_dir: Path, truth_dir: Path) -> dict[str, Any]:
    """The dc2-drp metrics figures of a case against the simulation's truth."""
    from workflow_lib.core.flags import CcdVisitFlag
    from workflow_lib.io import read_table
    from workflow_lib.qa.metrics import single_frame_metrics

    ccd = pd.concat(
        [read_table(p) for p in sorted(output_dir.glob("ccdVisit/*/*.parquet"))], ignore_index=True
    )
    pieces = [read_table(p) for p in sorted(output_dir.glob("src/*/*.parquet"))]
    sources = pd.concat([p for p in pieces if len(p)] or pieces[:1], ignore_index=True)
    truth = read_table(truth_dir / "truth_object.parquet")
    truth_ccd = read_table(truth_dir / "truth_ccdvisit.parquet")
    failed = (ccd["flags"] & int(CcdVisitFlag.FAILED)) != 0
    registry = read_table(output_dir / "registry/exposures.parquet")
    figures: dict[str, Any] = {
        "n_ccds": len(ccd),
        "n_calibrated": int((~failed).sum()),
        "fail_reasons": sorted(set(ccd.loc[failed, "failReason"])),
        "n_files": len(registry),
        "obstypes": sorted(set(registry["obstype"])),
        "n_amplifiers": sorted(set(registry["n_amplifiers"].tolist())),
    }
    isr_cards: dict[str, str] = {}
    for path in sorted(output_dir.glob("calexp/*/*.fits")):
        header = fits.getheader(path, 0)
        if header.get("PROCSTAT", "") != "FAILED":
            isr_cards = {k: str(header[k]) for k in header if str(k).startswith("ISR_")}
            break
    figures["isr"] = isr_cards
    if (~failed).any():
        m = single_frame_metrics(sources, ccd, truth, truth_ccd)
        figures.update(
            zp_abs_median_mmag=m["zero_point_abs_diff_median_mmag"],
            astrom_rms_mas=m["astrometry_rms_mas"],
            seeing_ratio_median=m["seeing_ratio_median"],
            seeing_abs_rel_diff_max=m["seeing_abs_rel_diff_max"],
            n_bright_stars=m["n_bright_stars"],
            zp_median_error_mmag=zp_median_error_mmag(ccd[~failed]),
        )
    return figures


def zp_median_error_mmag(ccd_visits: pd.DataFrame) -> float:
    """Standard error (mmag) of the median |zeroPoint - truth| over these CCDs.

    A test matrix has 4 CCDs per case and each zero point is known to its
    zeroPointErr (4-10 mmag where a CCD has 50-150 stars), so the median of
    four differences scatters by 1.25 sigma / sqrt(4): a bound at exactly the
    target would fail on noise half the time for an unbiased pipeline.
    """
    errors = 1000.0 * ccd_visits["zeroPointErr"].to_numpy(dtype=float)
    return float(1.2533 * np.median(errors) / np.sqrt(max(len(errors), 1)))


def run_case(
    variant: Variant,
    source_dir: Path | None,
    work_dir: Path,
    refcat: Path | None,
    refcat_manifest: Path | None,
    truth_dir: Path | None,
    visits: Sequence[int] | None,
    image_format: str = "raw",
) -> dict[str, Any]:
    """Write, process and measure one case; errors become a result, not an exception.

    A case with its own ``preset`` first simulates its survey, which replaces the
    survey arguments (``source_dir`` ... ``visits``).
    """
    start = time.perf_counter()
    result: dict[str, Any] = {"case": variant.name}
    try:
        if variant.preset is not None:
            own = simulate_own_survey(
                variant.preset, work_dir / variant.name / "sim", image_format=image_format
            )
            source_dir, refcat = own["source_dir"], own["refcat"]
            refcat_manifest, truth_dir = own["refcat_manifest"], own["truth_dir"]
            visits = own["visits"]
            result["t_sim"] = time.perf_counter() - start
        assert source_dir and refcat and refcat_manifest and truth_dir and visits is not None
        raw_dir = work_dir / variant.name / "raw"
        write_variant(source_dir, raw_dir, variant)
        result["t_write"] = time.perf_counter() - start - result.get("t_sim", 0.0)
        output_dir = work_dir / variant.name / "out"
        config = workflow_config(
            raw_dir, output_dir, refcat, visits, image_format=image_format, extra=variant.config
        )
        masters = work_dir / variant.masters_from / "out" if variant.masters_from else None
        result.update(
            {f"t_{k}": v for k, v in process_variant(config, refcat_manifest, masters).items()}
        )
        result.update(variant_figures(output_dir, truth_dir))
    except Exception:  # the test reports it for this case
        result["error"] = traceback.format_exc()
    result["t_total"] = time.perf_counter() - start
    return result


def format_table(results: Iterable[Mapping[str, Any]]) -> str:
    """The figures of every case as a fixed-width table (times in s: total, and the
    writing of the files, ingest, master calibrations, process_ccd of the 4 CCDs;
    first the simulation where a case simulated its own survey)."""
    results = list(results)
    keys = ("t_write", "t_ingest", "t_calibs", "t_process_ccd")
    if any("t_sim" in r for r in results):
        keys = ("t_sim", *keys)
    head = (
        f"{'case':<22} {'n_cal':>5} {'ZP |d| mmag':>11} {'+-':>5} {'astrom mas':>10} "
        f"{'seeing ratio':>12} {'max |d|see':>10} {'n_star':>6} {'time s':>7}  "
        + "/".join(k.removeprefix("t_").replace("process_ccd", "ccds") for k in keys)
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            last = r["error"].strip().splitlines()[-1]
            lines.append(f"{r['case']:<22} ERROR {last[:90]}")
            continue
        cells = [
            _cell(r, "zp_abs_median_mmag", "11.2f"),
            _cell(r, "zp_median_error_mmag", "5.1f"),
            _cell(r, "astrom_rms_mas", "10.2f"),
            _cell(r, "seeing_ratio_median", "12.4f"),
            _cell(r, "seeing_abs_rel_diff_max", "10.4f"),
            _cell(r, "n_bright_stars", "6d"),
        ]
        n_cal = f"{r['n_calibrated']}/{r['n_ccds']}"
        steps = "/".join(f"{r.get(k, 0.0):.1f}" for k in keys)
        lines.append(f"{r['case']:<22} {n_cal:>5} {' '.join(cells)} {r['t_total']:7.1f}  {steps}")
    return "\n".join(lines)


def _cell(result: Mapping[str, Any], key: str, fmt: str) -> str:
    value = result.get(key)
    width = int(fmt.split(".")[0].rstrip("df"))
    return format(value, fmt) if value is not None else "-".rjust(width)


def run_matrix(
    variants: Sequence[Variant],
    *,
    work_dir: Path,
    sources: Mapping[str, Path] | None = None,
    refcat: Path | None = None,
    refcat_manifest: Path | None = None,
    truth_dir: Path | None = None,
    visits: Sequence[int] | None = None,
    workers: int = 2,
) -> list[dict[str, Any]]:
    """Run every case, ``workers`` at a time; a case reusing another's masters waits for it.

    ``sources``: the simulated image directory per image format (raw, eimage);
    the shared survey's arguments may be left out when every case has its own
    ``preset``. Cases start in the order of ``variants``; results come back in it.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    by_name = {v.name: v for v in variants}
    results: dict[str, dict[str, Any]] = {}
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    )
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_worker_init
    ) as pool:
        running: dict[Future, str] = {}
        waiting = list(variants)

        def submit_ready() -> None:
            for v in list(waiting):
                if v.masters_from is None or v.masters_from in results:
                    waiting.remove(v)
                    future = pool.submit(
                        run_case,
                        v,
                        (sources or {}).get(v.image_format),
                        work_dir,
                        refcat,
                        refcat_manifest,
                        truth_dir,
                        visits,
                        v.image_format,
                    )
                    running[future] = v.name

        submit_ready()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = future.result()
            submit_ready()
    return [results[v.name] for v in by_name.values()]


def _worker_init() -> None:
    # One thread per process: the workers already fill the cores (astroscrappy's OpenMP).
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
