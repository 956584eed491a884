"""Warps on disk as coadd inputs: rows read on demand, never the whole image.

A warp file is what ``write_exposure`` writes (HDUs IMAGE, MASK, VARIANCE,
PSF; the origin in the patch frame as ``LTV1 = -x0``, ``LTV2 = -y0`` in the
primary header). ``FitsWarpInput`` reads the headers and the PSF once, then
only the requested rows of IMAGE, VARIANCE and MASK with fitsio, so a coadd
of hundreds of warps holds one strip of each at a time.
"""

from __future__ import annotations

import os
from types import TracebackType

import fitsio
import numpy as np
from astropy.io import fits

from workflow_lib.core.exposure import MASK_DTYPE, MaskPlanes, PhotoCalib
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.io.exposure import read_exposure_headers
from workflow_lib.io.fits import to_native
from workflow_lib.static_sky.coadd_inputs import WarpRows, warp_ids


class FitsWarpInput:
    """A :class:`~workflow_lib.static_sky.coadd_inputs.WarpInput` backed by a warp FITS file.

    The file is opened on the first read and kept open until :meth:`close`
    (or the end of a ``with`` block); ``keep_open=False`` reopens it for
    every read instead, for callers that must not hold many descriptors.
    Mask bits are returned in the file's own planes (``mask_planes``, from
    its ``MP_*`` cards).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        visit: int | None = None,
        detector: int | None = None,
        keep_open: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.keep_open = keep_open
        self._fits: fitsio.FITS | None = None
        with fits.open(self.path, memmap=False, lazy_load_hdus=True) as hdul:
            headers = read_exposure_headers(hdul, self.path)
            image_header = hdul["IMAGE"].header
            self._shape = (int(image_header["NAXIS2"]), int(image_header["NAXIS1"]))
            self._mask_planes = MaskPlanes.from_header(hdul["MASK"].header)
        self._psf = headers.psf
        self._origin = headers.origin
        self._photo_calib = headers.photo_calib
        self._metadata = headers.metadata
        self.visit, self.detector = warp_ids(headers.metadata, visit=visit, detector=detector)

    @property
    def origin(self) -> tuple[int, int]:
        return self._origin

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def psf(self) -> PsfModel | None:
        return self._psf

    @property
    def photo_calib(self) -> PhotoCalib | None:
        return self._photo_calib

    @property
    def metadata(self) -> fits.Header:
        return self._metadata

    @property
    def mask_planes(self) -> MaskPlanes:
        return self._mask_planes

    def _handle(self) -> fitsio.FITS:
        if self._fits is None:
            self._fits = fitsio.FITS(self.path, "r")
        return self._fits

    def read_rows(self, y0: int, y1: int) -> WarpRows:
        """Rows ``y0:y1`` (warp frame) of IMAGE, VARIANCE and MASK, native byte order."""
        ny = self._shape[0]
        y0, y1 = max(0, int(y0)), min(ny, int(y1))
        if y1 <= y0:
            empty = np.zeros((0, self._shape[1]), np.float32)
            return WarpRows(empty, empty.copy(), np.zeros(empty.shape, MASK_DTYPE))
        handle = self._handle()
        try:
            image = to_native(handle["IMAGE"][y0:y1, :]).astype(np.float32, copy=False)
            variance = to_native(handle["VARIANCE"][y0:y1, :]).astype(np.float32, copy=False)
            mask = to_native(handle["MASK"][y0:y1, :]).astype(MASK_DTYPE, copy=False)
        finally:
            if not self.keep_open:
                self.close()
        return WarpRows(image, variance, mask)

    def close(self) -> None:
        if self._fits is not None:
            self._fits.close()
            self._fits = None

    def __enter__(self) -> FitsWarpInput:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
