"""Exposure FITS files per CONTRACT section 3.

Layout: an empty primary HDU with the metadata, provenance and photometric
calibration; ``IMAGE``, ``MASK`` and ``VARIANCE`` extensions each carrying the
full WCS; ``MP_<NAME>`` cards in ``MASK``; the PSF model as HDU ``PSF``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from workflow_lib import __version__
from workflow_lib.core.exposure import MASK_DTYPE, Exposure, MaskPlanes, PhotoCalib
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.io.fits import to_native, write_image_file


def write_exposure(
    exposure: Exposure,
    path: str | os.PathLike[str],
    *,
    bunit: str = "nJy",
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """Write ``exposure`` atomically; ``bunit`` names the IMAGE unit (VARIANCE is its square)."""
    primary = exposure.metadata.copy()
    primary["PKGVERS"] = (__version__, "dc2-drp-workflow version")
    if provenance is not None:
        primary["PROVENAN"] = json.dumps(provenance, default=str, separators=(",", ":"))
    if exposure.photo_calib is not None:
        for key, value, comment in exposure.photo_calib.to_cards():
            if np.isfinite(value):  # FITS has no NaN; an absent card reads back as NaN
                primary[key] = (value, comment)
    primary["LTV1"] = (-exposure.origin[0], "minus x of pixel [0,0] in the parent frame")
    primary["LTV2"] = (-exposure.origin[1], "minus y of pixel [0,0] in the parent frame")

    wcs_cards = exposure.wcs.to_header(relax=True) if exposure.wcs is not None else fits.Header()

    def with_wcs(extra: list[tuple[str, Any, str]]) -> fits.Header:
        header = wcs_cards.copy()
        for key, value, comment in extra:
            header[key] = (value, comment)
        return header

    # np.asarray: no copy of planes that already have the written dtype.
    extensions: list[tuple[str, np.ndarray, fits.Header]] = [
        ("IMAGE", np.asarray(exposure.image, np.float32), with_wcs([("BUNIT", bunit, "")])),
        (
            "MASK",
            np.asarray(exposure.mask, MASK_DTYPE),
            with_wcs(exposure.mask_planes.to_cards()),
        ),
        (
            "VARIANCE",
            np.asarray(exposure.variance, np.float32),
            with_wcs([("BUNIT", f"{bunit}**2" if bunit else "", "")]),
        ),
    ]
    if exposure.psf is not None:
        psf_header = fits.Header()
        for key, card_value, comment in exposure.psf.header_cards():
            if key == "COMMENT":
                psf_header.add_comment(str(card_value))
            else:
                psf_header[key] = (card_value, comment)
        extensions.append(("PSF", exposure.psf.basis.astype(np.float64), psf_header))
    write_image_file(path, primary, extensions)


@dataclass(frozen=True)
class ExposureHeaders:
    """What an exposure file says besides its pixels (see :func:`read_exposure_headers`)."""

    metadata: fits.Header  # primary cards less LTV1, LTV2, PKGVERS
    origin: tuple[int, int]
    photo_calib: PhotoCalib | None
    psf: PsfModel | None


def read_exposure_headers(hdul: fits.HDUList, path: str | os.PathLike[str]) -> ExposureHeaders:
    """Check an open exposure file's layout and read its metadata, origin, calibration and
    PSF; raises ProcessingFailed for a failure record, ValueError for a missing HDU."""
    primary = hdul[0].header.copy()
    if primary.get("PROCSTAT") == "FAILED":
        reason = primary.get("PROCFAIL", "unknown reason")
        raise ProcessingFailed(f"{path}: processing failed ({reason}); no image")
    names = {hdu.name.upper() for hdu in hdul}
    for required in ("IMAGE", "MASK", "VARIANCE"):
        if required not in names:
            raise ValueError(f"{path}: no {required} HDU (found {', '.join(sorted(names))})")
    psf = None
    if "PSF" in names:
        psf = PsfModel.from_header_and_cube(hdul["PSF"].header, to_native(hdul["PSF"].data))
    origin = (-int(primary.get("LTV1", 0)), -int(primary.get("LTV2", 0)))
    for key in ("LTV1", "LTV2", "PKGVERS"):
        primary.remove(key, ignore_missing=True)
    return ExposureHeaders(primary, origin, PhotoCalib.from_header(primary), psf)


def read_exposure(path: str | os.PathLike[str]) -> Exposure:
    """Read an exposure written by ``write_exposure`` (or any file of the same layout)."""
    with fits.open(path, memmap=False) as hdul:
        headers = read_exposure_headers(hdul, path)
        image_header = hdul["IMAGE"].header
        mask_header = hdul["MASK"].header
        # Read without memmap, so the arrays are ours: swap them in place.
        image = to_native(hdul["IMAGE"].data, in_place=True)
        mask = to_native(hdul["MASK"].data, in_place=True).astype(MASK_DTYPE, copy=False)
        variance = to_native(hdul["VARIANCE"].data, in_place=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(image_header, relax=True) if "CTYPE1" in image_header else None
    # Keep our own plane bits: translate whatever bits the file used.
    file_planes = MaskPlanes.from_header(mask_header)
    planes = MaskPlanes()
    mask = file_planes.translate(mask, planes) if file_planes.bits != planes.bits else mask
    return Exposure(
        image=image,
        variance=variance,
        mask=mask,
        wcs=wcs,
        psf=headers.psf,
        photo_calib=headers.photo_calib,
        metadata=headers.metadata,
        mask_planes=planes,
        origin=headers.origin,
    )


class ProcessingFailed(RuntimeError):
    """The product is a failure record: processing of its data id did not succeed."""


def write_failure_record(
    path: str | os.PathLike[str], metadata: fits.Header, *, reason: str
) -> None:
    """Write a header-only FITS that says processing failed and why.

    It has no IMAGE, MASK or VARIANCE HDU, so nothing can mistake it for an
    image; ``read_exposure`` raises ProcessingFailed with the reason.
    """
    header = metadata.copy()
    header["PROCSTAT"] = ("FAILED", "processing failed: no pixels in this file")
    header["PROCFAIL"] = (reason[:68], "why processing failed")
    header["PKGVERS"] = (__version__, "dc2-drp-workflow version")
    write_image_file(path, header, [])


def is_failure_record(path: str | os.PathLike[str]) -> bool:
    return fits.getheader(path, 0).get("PROCSTAT") == "FAILED"
