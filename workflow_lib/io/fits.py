"""FITS reading and writing of raw and processed images.

Reads return arrays in native byte order. Writes are atomic and never leave a
partial file behind.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from astropy.io import fits

from workflow_lib.io.atomic import atomic_output

FITS_SUFFIXES = (".fits", ".fits.gz", ".fits.fz", ".fit", ".fz")


def to_native(array: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Return ``array`` in native byte order (a no-op view if it already is).

    With ``in_place`` a writable array that owns its buffer (just read from a
    file) is swapped where it lies instead of copied: no second full-size
    array, and one pass over memory instead of two.
    """
    array = np.asarray(array)
    if array.dtype.byteorder not in ("=", "|") and array.dtype.byteorder != _native_order():
        native = array.dtype.newbyteorder("=")
        if in_place and array.flags.writeable and array.flags.c_contiguous:
            return array.byteswap(inplace=True).view(native)
        return array.astype(native)
    return array


def _native_order() -> str:
    return "<" if np.little_endian else ">"


def is_fits_name(path: str | os.PathLike[str]) -> bool:
    """True if the file name has one of the FITS suffixes the workflow reads."""
    return str(path).lower().endswith(FITS_SUFFIXES)


def read_header(path: str | os.PathLike[str], ext: int | str = 0) -> fits.Header:
    """Read one header without touching pixel data."""
    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        return hdul[ext].header.copy()


def read_image_hdus(
    path: str | os.PathLike[str],
) -> tuple[fits.Header, list[tuple[np.ndarray, fits.Header]]]:
    """Read a multi-extension image file.

    Returns the primary header and, for every image extension that holds data,
    ``(data, header)`` with data in native byte order; a damaged file raises
    DamagedFitsFile. For tile-compressed files the primary header of the
    compressed container is returned, which fpack keeps identical to the original.
    """
    images: list[tuple[np.ndarray, fits.Header]] = []
    try:
        # checksum=True: where the file has CHECKSUM/DATASUM cards, damaged bytes
        # raise DamagedFitsFile instead of passing as pixels.
        with _damage_as_error(), fits.open(path, memmap=False, checksum=True) as hdul:
            primary = hdul[0].header.copy()
            for hdu in hdul[1:]:
                if isinstance(hdu, (fits.ImageHDU, fits.CompImageHDU)) and hdu.data is not None:
                    images.append((to_native(hdu.data, in_place=True), hdu.header.copy()))
            if not images and hdul[0].data is not None:
                images.append((to_native(hdul[0].data, in_place=True), primary))
    except (DamagedFitsFile, OSError, MemoryError):
        raise
    except Exception as err:  # a decoder's own error types (cfitsio, zlib, numpy)
        text = " ".join(str(err).split())
        raise DamagedFitsFile(f"damaged FITS file ({type(err).__name__}: {text})") from err
    return primary, images


def write_raw_file(
    path: str | os.PathLike[str],
    primary_header: fits.Header,
    amplifiers: Sequence[tuple[np.ndarray, fits.Header]],
) -> None:
    """Write a raw exposure: a data-less primary HDU and one HDU per amplifier."""
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [fits.PrimaryHDU(header=primary_header)]
    for data, header in amplifiers:
        hdus.append(fits.ImageHDU(data=data, header=header))
    _write_hdulist(path, fits.HDUList(hdus))


def write_image_file(
    path: str | os.PathLike[str],
    primary_header: fits.Header,
    extensions: Sequence[tuple[str, np.ndarray, fits.Header]],
    *,
    primary_data: np.ndarray | None = None,
) -> None:
    """Write a primary HDU followed by named image extensions ``(name, data, header)``."""
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [
        fits.PrimaryHDU(data=primary_data, header=primary_header)
    ]
    for name, data, header in extensions:
        hdus.append(fits.ImageHDU(data=data, header=header, name=name))
    _write_hdulist(path, fits.HDUList(hdus))


def _write_hdulist(path: str | os.PathLike[str], hdul: fits.HDUList) -> None:
    target = Path(path)
    with atomic_output(target) as tmp:
        if target.name.lower().endswith(".fz"):
            # Tile-compress every image extension, as fpack would.
            packed = [fits.PrimaryHDU(header=hdul[0].header)]
            packed += [
                fits.CompImageHDU(data=h.data, header=h.header, name=h.name) for h in hdul[1:]
            ]
            fits.HDUList(packed).writeto(tmp, checksum=True)
        else:
            hdul.writeto(tmp, checksum=True)


class DamagedFitsFile(ValueError):
    """A FITS file whose bytes do not match what its headers declare."""


def read_headers(path: str | os.PathLike[str]) -> tuple[fits.Header, list[fits.Header]]:
    """Primary header and the header of every image extension, without pixel data.

    For tile-compressed extensions astropy presents the uncompressed image
    header, so NAXISn describe the image either way. A file shorter or longer
    than its headers declare (a cut copy, a gzip stream that stops early) or
    whose headers astropy had to repair raises DamagedFitsFile: astropy itself
    only warns, and would hand back the HDUs before the cut as a whole file.
    """
    with _damage_as_error(), fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        primary = hdul[0].header.copy()
        extensions = [
            hdu.header.copy()
            for hdu in hdul[1:]
            if isinstance(hdu, (fits.ImageHDU, fits.CompImageHDU))
        ]
        last = hdul.fileinfo(len(hdul) - 1)
        declared = int(last["datLoc"]) + int(last["datSpan"])
    size, gzipped = _stream_size(path)
    if gzipped and size != declared % 2**32:
        raise DamagedFitsFile(
            "damaged FITS file: the gzip stream is cut or corrupt (its length trailer "
            f"says {size} bytes, the headers declare {declared})"
        )
    if not gzipped and size != declared:
        raise DamagedFitsFile(
            f"damaged FITS file: {size} bytes where its {len(extensions) + 1} HDU headers "
            f"declare {declared}"
        )
    if "NEXTEND" in primary and int(primary["NEXTEND"]) != len(extensions):
        raise DamagedFitsFile(
            f"primary header says NEXTEND={primary['NEXTEND']} but the file has "
            f"{len(extensions)} image extension(s)"
        )
    return primary, extensions


def _stream_size(path: str | os.PathLike[str]) -> tuple[int, bool]:
    """(length of the FITS byte stream, whether it is gzipped).

    For gzip that length is the ISIZE trailer, the uncompressed length modulo
    2**32; a cut gzip file ends in deflate bytes instead, which match the
    declared length by chance only.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        if stream.read(2) != b"\x1f\x8b":
            return size, False
        if size < 18:  # shorter than a gzip header and trailer
            return 0, True
        stream.seek(-4, os.SEEK_END)
        return int.from_bytes(stream.read(4), "little"), True


# What astropy says, as a warning only, of a damaged file: cut short, a header it
# had to repair (a block of garbage, non-ASCII bytes), pixels whose DATASUM
# fails. Other warnings (a non-standard keyword, say) are not damage and are
# passed on. CHECKSUM is left out on purpose: it covers the header too, which a
# keyword edited by hand breaks (the header is validated at ingest), while
# DATASUM still guards the pixels.
_DAMAGE_WARNINGS = (
    "may have been truncated",
    "Error validating header",
    "non-ASCII characters",
    "Datasum verification failed",
    "Unexpected bytes trailing",
)


@contextmanager
def _damage_as_error() -> Iterator[None]:
    """Raise DamagedFitsFile where astropy only warns of a damaged file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        text = " ".join(str(warning.message).split())
        if any(marker in text for marker in _DAMAGE_WARNINGS):
            raise DamagedFitsFile(f"damaged FITS file ({text})")
    for warning in caught:  # not damage: let the caller's filters decide
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
