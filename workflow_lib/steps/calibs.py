"""Steps of the master calibrations: bias, dark, flat per band, and the defect map.

I/O only: read raw calibration exposures, call :mod:`workflow_lib.single_frame.master_calibs`,
write each master as an Exposure-layout FITS file (IMAGE, MASK, VARIANCE;
BUNIT ``electron``, ``electron/s`` or ``''``) with provenance and QA cards.
:func:`read_master` and :func:`read_defects` read them back for ISR.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from astropy.io import fits

from workflow_lib import __version__
from workflow_lib.core.exposure import Exposure, MaskPlanes
from workflow_lib.io import read_image_hdus
from workflow_lib.io.exposure import read_exposure, write_exposure
from workflow_lib.single_frame.isr import AssembledFrame, MasterCalib, process_amplifiers
from workflow_lib.single_frame.master_calibs import (
    build_master_bias,
    build_master_dark,
    build_master_flat,
    find_defects,
)

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
_BUNIT = {"bias": "electron", "dark": "electron/s", "flat": ""}
_QA_KEYS = {
    "n_frames": "NFRAMES",
    "clipped_fraction": "CLIPFRAC",
    "mean": "MEANLEV",
    "robust_std": "RSTD",
    "median_rate": "MEDRATE",
    "darktime_total": "DARKTOT",
    "mean_level_e": "FLATLEV",
    "median_noise": "MEDNOISE",
}


def _provenance(step: str, inputs: Sequence[PathLike], **extra: object) -> dict[str, Any]:
    return {
        "package_version": __version__,
        "step": step,
        "inputs": [os.fspath(p) for p in inputs],
        **extra,
    }


def _read_frames(paths: Sequence[PathLike], obstype: str) -> list[AssembledFrame]:
    """Read and assemble raw calibration exposures, one at a time (raws are not kept)."""
    if not paths:
        raise ValueError(f"no raw {obstype} exposures given")
    frames = []
    for path in paths:
        primary, amps = read_image_hdus(path)
        found = str(primary.get("OBSTYPE", primary.get("IMGTYPE", ""))).strip().lower()
        if found and found != obstype:
            raise ValueError(f"{path}: OBSTYPE is {found!r}, expected {obstype!r}")
        frames.append(process_amplifiers(amps, header=primary))
    return frames


def write_master(
    master: MasterCalib, path: PathLike, *, provenance: Mapping[str, Any] | None = None
) -> None:
    """Write a master calibration: IMAGE, VARIANCE and MASK (BAD where it has no value)."""
    planes = MaskPlanes()
    mask = np.where(master.mask, planes.bitmask("BAD"), 0)
    header = fits.Header()
    header["CALIBTYP"] = (master.kind, "master calibration type")
    header["NFRAMES"] = (int(master.n_frames), "input frames")
    if master.band:
        header["FILTER"] = (master.band, "band of the flat")
    for key, value in master.stats.items():
        card = _QA_KEYS.get(key)
        if card and np.isfinite(value):
            header[card] = (float(value), f"QA {key}")
    exposure = Exposure(
        image=master.image, variance=master.variance, mask=mask, metadata=header, mask_planes=planes
    )
    write_exposure(exposure, path, bunit=_BUNIT.get(master.kind, ""), provenance=provenance)


def read_master(path: PathLike) -> MasterCalib:
    """Read a master written by :func:`write_master` (or any file of that layout)."""
    exposure = read_exposure(path)
    meta = exposure.metadata
    stats = {name: float(meta[card]) for name, card in _QA_KEYS.items() if card in meta}
    return MasterCalib(
        kind=str(meta.get("CALIBTYP", "")).strip(),
        image=exposure.image,
        variance=exposure.variance,
        mask=exposure.mask_of("BAD"),
        n_frames=int(meta.get("NFRAMES", 0)),
        band=str(meta.get("FILTER", "")).strip(),
        stats=stats,
    )


def _read_optional(path: PathLike | None, kind: str) -> MasterCalib | None:
    if path is None or os.fspath(path) == "":
        log.info("no master %s given: not applied", kind)
        return None
    return read_master(path)


def _log_qa(kind: str, master: MasterCalib, output_path: PathLike) -> None:
    log.info(
        "master %s%s -> %s: %s; %d pixels without a value",
        kind,
        f" ({master.band})" if master.band else "",
        os.fspath(output_path),
        ", ".join(f"{k} {v:.4g}" for k, v in master.stats.items()),
        int(master.mask.sum()),
    )


def make_master_bias(*, raw_paths: Sequence[PathLike], output_path: PathLike) -> None:
    """Build and write the master bias of one detector from its raw bias exposures."""
    master = build_master_bias(_read_frames(raw_paths, "bias"))
    write_master(master, output_path, provenance=_provenance("make_master_bias", raw_paths))
    _log_qa("bias", master, output_path)


def make_master_dark(
    *,
    raw_paths: Sequence[PathLike],
    output_path: PathLike,
    bias_path: PathLike | None = None,
) -> None:
    """Build and write the master dark (e-/s) of one detector."""
    bias = _read_optional(bias_path, "bias")
    master = build_master_dark(_read_frames(raw_paths, "dark"), bias=bias)
    inputs = [*raw_paths, *([bias_path] if bias is not None and bias_path is not None else [])]
    write_master(master, output_path, provenance=_provenance("make_master_dark", inputs))
    _log_qa("dark", master, output_path)


def make_master_flat(
    *,
    raw_paths: Sequence[PathLike],
    output_path: PathLike,
    band: str,
    bias_path: PathLike | None = None,
    dark_path: PathLike | None = None,
) -> None:
    """Build and write the master flat of one detector in ``band`` (median 1)."""
    bias = _read_optional(bias_path, "bias")
    dark = _read_optional(dark_path, "dark")
    frames = _read_frames(raw_paths, "flat")
    for frame, path in zip(frames, raw_paths, strict=True):
        found = str(frame.header.get("FILTER", "")).strip()
        if found != band:
            raise ValueError(f"{path}: FILTER is {found!r}, expected flat of band {band!r}")
    master = build_master_flat(frames, bias=bias, dark=dark)
    given = ((bias_path, bias), (dark_path, dark))
    inputs = [*raw_paths, *(p for p, m in given if m is not None and p is not None)]
    write_master(master, output_path, provenance=_provenance("make_master_flat", inputs, band=band))
    _log_qa("flat", master, output_path)


def write_defects(
    defects: np.ndarray,
    path: PathLike,
    *,
    provenance: Mapping[str, Any] | None = None,
    counts: Mapping[str, int] | None = None,
) -> None:
    """Write a defect map: IMAGE 1 on bad pixels, 0 elsewhere; MASK with BAD set there."""
    bad = np.asarray(defects, dtype=bool)
    planes = MaskPlanes()
    header = fits.Header()
    header["CALIBTYP"] = ("defects", "defect map")
    header["NDEFECT"] = (int(bad.sum()), "BAD pixels")
    for key, value in (counts or {}).items():
        header[f"HIERARCH DEFECTS {key.upper()}"] = int(value)
    exposure = Exposure(
        image=bad.astype(np.float32),
        variance=np.zeros(bad.shape, np.float32),
        mask=np.where(bad, planes.bitmask("BAD"), 0),
        metadata=header,
        mask_planes=planes,
    )
    write_exposure(exposure, path, bunit="", provenance=provenance)


def read_defects(path: PathLike) -> np.ndarray:
    """Boolean defect mask (True = BAD) from :func:`write_defects`'s layout.

    A plain FITS image (first HDU with data, non-zero = bad) is accepted too,
    so a defect list from elsewhere can be used.
    """
    with fits.open(path, memmap=False) as hdul:
        names = {hdu.name.upper() for hdu in hdul}
    if "MASK" in names:
        return read_exposure(path).mask_of("BAD")
    _, images = read_image_hdus(path)
    if not images:
        raise ValueError(f"{path}: no image HDU holding a defect mask")
    return np.asarray(images[0][0]) != 0


def make_defects(
    *,
    output_path: PathLike,
    dark_path: PathLike | None = None,
    flat_paths: Sequence[PathLike] = (),
) -> None:
    """Find hot (dark) and dead/low-response (flats) pixels and columns; write the BAD mask."""
    dark = _read_optional(dark_path, "dark")
    flats = [read_master(p) for p in flat_paths]
    result = find_defects(dark=dark, flats=flats)
    inputs = [*([dark_path] if dark is not None and dark_path is not None else []), *flat_paths]
    write_defects(
        result.mask,
        output_path,
        provenance=_provenance("make_defects", inputs),
        counts=result.counts,
    )
    log.info(
        "defects -> %s: %s (%.4f%% of the detector)",
        os.fspath(output_path),
        ", ".join(f"{k} {v}" for k, v in result.counts.items()),
        100.0 * result.mask.mean(),
    )
