"""Per-(visit, detector) single-frame processing: raw -> calexp, src, CcdVisit row.

The Cookbook's processEimage.py / LSST's isr + characterizeImage +
calibrateImage as one job. A CCD that cannot be calibrated is not a crash: its
CcdVisit row is flagged with the reason, its src table is empty and its calexp
file is a header-only failure record (see io.exposure.write_failure_record).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from workflow_lib import __version__
from workflow_lib.core.config import CalibrateConfig, IsrConfig
from workflow_lib.core.flags import CcdVisitFlag
from workflow_lib.core.timing import PhaseClock
from workflow_lib.io import read_header, read_image_hdus, write_table
from workflow_lib.io.exposure import write_exposure, write_failure_record
from workflow_lib.single_frame.calibrate import (
    approximate_wcs,
    ccd_visit_row,
    empty_sources,
    pixel_scale_arcsec,
    process_single_frame,
)

log = logging.getLogger(__name__)

# ISR steps that, when skipped, are recorded as CcdVisit flags.
_SKIP_FLAGS = {
    "bias": CcdVisitFlag.NO_BIAS,
    "dark": CcdVisitFlag.NO_DARK,
    "flat": CcdVisitFlag.NO_FLAT,
}


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, keep freed memory in the process for reuse (glibc only).

    glibc serves every array over 32 MB (each full 4k x 4k float32 frame) by
    mmap and unmaps it when freed, so the next frame is page-faulted in
    again: 10-20 ms of system time per 64 MB, over a hundred times in one CCD.
    Serving them from the heap and not trimming it removes that cost; the
    peak memory is the same. The defaults are restored and the heap trimmed
    after the block. A no-op where the C library has no ``mallopt``.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)
    try:
        yield
    finally:
        mallopt(m_mmap_max, 65536)  # glibc's defaults
        mallopt(m_trim_threshold, 128 * 1024)
        malloc_trim(0)


# Freed memory is kept for reuse for the whole step (see reuse_freed_memory).
@reuse_freed_memory()
def process_ccd(
    *,
    raw_path: str,
    refcat_manifest_path: str,
    calexp_path: str,
    src_path: str,
    ccdvisit_path: str,
    visit: int,
    detector: int,
    image_format: str,
    isr: dict[str, Any],
    calibrate: dict[str, Any],
    bias_path: str | None = None,
    dark_path: str | None = None,
    flat_path: str | None = None,
    defects_path: str | None = None,
) -> None:
    """Process one CCD and write its three products (always all three)."""
    from workflow_lib.single_frame import isr as isr_numerics
    from workflow_lib.steps.calibs import read_defects, read_master
    from workflow_lib.steps.refcat import load_refcat_region

    clock = PhaseClock()
    isr_config = IsrConfig.from_dict(isr)
    calib_config = CalibrateConfig.from_dict(calibrate)
    try:
        primary, hdus = read_image_hdus(raw_path)
        read_error = None
    except (OSError, ValueError) as err:  # damaged since ingest, or only now seen to be
        primary, hdus = _header_or_empty(raw_path), []
        read_error = f"raw file unreadable: {' '.join(str(err).split())}"
    clock.lap("read_raw")
    band = str(primary.get("FILTER", "")).strip().lower()
    mjd, exptime = float(primary.get("MJD-OBS", np.nan)), float(primary.get("EXPTIME", np.nan))
    ids: dict[str, Any] = dict(visit=visit, detector=detector, band=band, mjd=mjd, exptime=exptime)
    provenance = {
        "package_version": __version__,
        "step": "process_ccd",
        "inputs": [p for p in (raw_path, bias_path, dark_path, flat_path, defects_path) if p],
        "isr": isr,
        "calibrate": calibrate,
    }

    masters: dict[str, Any] = {}
    try:
        if read_error is not None:
            raise isr_numerics.UnprocessableExposure(read_error)
        if image_format == "eimage":
            isr_result = isr_numerics.eimage_exposure(
                hdus[0][0], primary, cosmic_rays=isr_config.detect_cosmic_rays
            )
        else:
            masters = {
                "bias": read_master(bias_path) if bias_path else None,
                "dark": read_master(dark_path) if dark_path else None,
                "flat": read_master(flat_path) if flat_path else None,
                "defects": read_defects(defects_path) if defects_path else None,
            }
            clock.lap("read_calibs")
            isr_result = isr_numerics.run_isr(
                primary, hdus, **masters, cosmic_rays=isr_config.detect_cosmic_rays
            )
        # The raw pixels and the master calibrations are not needed again:
        # free them (~0.6 GB on a 4k x 4k detector) before characterization.
        del hdus, masters
        clock.lap("isr")
    except isr_numerics.UnprocessableExposure as err:
        reason = f"ISR: {err}"
        log.warning("visit %d detector %d: %s", visit, detector, reason)
        flags = int(CcdVisitFlag.FAILED | CcdVisitFlag.BAD_IMAGE)
        _write(
            None,
            empty_sources(),
            ccd_visit_row(flags=flags, fail_reason=reason, **ids),
            calexp_path,
            src_path,
            ccdvisit_path,
            primary,
            provenance,
        )
        return

    log.info("QA isr_timings_s = %s", {k: round(v, 3) for k, v in isr_result.timings.items()})
    log.info(
        "QA isr_cpu_timings_s = %s", {k: round(v, 3) for k, v in isr_result.cpu_timings.items()}
    )
    isr_flags = 0
    for step, status in isr_result.steps.items():
        log.info("ISR %s: %s", step, status)
        if step in _SKIP_FLAGS and status.startswith("skipped"):
            isr_flags |= _SKIP_FLAGS[step]
    exposure = isr_result.exposure

    # Reference stars around the CCD: its half-diagonal plus the pointing slack.
    header_wcs = approximate_wcs(primary)
    ny, nx = exposure.shape
    center = header_wcs.pixel_to_world((nx - 1) / 2.0, (ny - 1) / 2.0)
    radius_deg = (
        0.5 * np.hypot(nx, ny) * pixel_scale_arcsec(header_wcs)
        + 2.0 * calib_config.astrometry_max_offset_arcsec
    ) / 3600.0
    refcat = load_refcat_region(
        shard_dir=str(Path(refcat_manifest_path).parent),
        ra=float(center.ra.deg),
        dec=float(center.dec.deg),
        radius_deg=radius_deg,
    )
    clock.lap("refcat")
    result = process_single_frame(exposure, refcat, config=calib_config, isr_flags=isr_flags, **ids)
    del exposure, isr_result  # the calexp holds what is kept of them (ISR_* cards included)
    clock.lap("characterize+calibrate")
    for key, value in result.qa.items():
        log.info("QA %s = %s", key, value)
    if not result.failed:
        for key in ("seeing", "zeroPoint", "astromRms", "nAstromStars", "nPhotStars", "nSources"):
            log.info("%s = %s", key, result.ccd_visit[key])
    _write(
        result.calexp,
        result.sources,
        result.ccd_visit,
        calexp_path,
        src_path,
        ccdvisit_path,
        primary,
        provenance,
    )
    clock.lap("write")
    log.info("QA step_timings_s = %s", clock.rounded()["wall"])
    log.info("QA step_cpu_timings_s = %s", clock.rounded()["cpu"])


def _header_or_empty(path: str) -> Any:
    """The primary header of a file that cannot be read whole, for its failure record."""
    from astropy.io import fits

    try:
        return read_header(path)
    except (OSError, ValueError):
        return fits.Header()


def _write(calexp, sources, row, calexp_path, src_path, ccdvisit_path, primary, provenance):
    import pandas as pd

    if calexp is None:
        write_failure_record(calexp_path, primary, reason=row["failReason"])
    else:
        write_exposure(calexp, calexp_path, provenance=provenance)
    write_table(sources, src_path, provenance=provenance)
    # The row goes last: its presence says the CCD's products are complete.
    write_table(pd.DataFrame([row]), ccdvisit_path, provenance=provenance)
