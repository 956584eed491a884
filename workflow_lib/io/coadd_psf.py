"""The exact coadd PSF on disk: input PSFs, weights, origins and coverage blocks.

One FITS file per coadd (beside it, e.g. ``coaddPsf_{tract}_{patch}_{band}.fits``):

- primary header: ``BLOCK`` (coverage block size), ``COADDNX``, ``COADDNY``,
  ``NINPUTS``, ``PSFSIZE`` and the POLYPIX fit's ``PSFORDER`` and residuals;
- ``INPUTS``: a table, one row per input: ``weight``, ``x0``, ``y0`` (its
  frame in the coadd), ``block_x0``, ``block_y0``, ``block_nx``,
  ``block_ny``, ``cov_offset`` (its coverage map in ``COVERAGE``),
  ``psf_order``, ``psf_xc``, ``psf_yc``, ``psf_xs``, ``psf_ys``,
  ``basis_offset``, ``n_terms`` (its PSF planes in ``PSFBASIS``), ``apCorr``
  (its aperture correction, NaN if unknown; older files lack the column),
  ``visit`` and ``detector`` (the calexp it was warped from; -1 if unknown,
  older files lack the columns);
- ``PSFBASIS``: the input PSFs' basis planes, stacked (n, s, s);
- ``COVERAGE``: every input's block counts, flattened one after the other;
- ``MODEL``: the POLYPIX fit, as the ``PSF`` HDU of an exposure.
"""

from __future__ import annotations

import os

import numpy as np
from astropy.io import fits
from astropy.table import Table

from workflow_lib.core.psf_model import PsfModel
from workflow_lib.io.atomic import atomic_output
from workflow_lib.io.fits import to_native
from workflow_lib.static_sky.coadd_psf import COVERAGE_DTYPE, CoaddPsf


def _psf_header(psf: PsfModel) -> fits.Header:
    header = fits.Header()
    for key, value, comment in psf.header_cards():
        if key == "COMMENT":
            header.add_comment(str(value))
        else:
            header[key] = (value, comment)
    return header


def write_coadd_psf(coadd_psf: CoaddPsf, path: str | os.PathLike[str]) -> None:
    """Write ``coadd_psf`` atomically (layout in the module docstring)."""
    size = coadd_psf.size
    rows, planes, coverage = [], [], []
    basis_offset = cov_offset = 0
    inputs = coadd_psf.input_table()
    apcorr = inputs["apCorr"].to_numpy(dtype=np.float64)
    for psf, weight, origin, block_origin, counts, ratio, visit, detector in zip(
        coadd_psf.psfs,
        coadd_psf.weights,
        coadd_psf.origins,
        coadd_psf.block_origin,
        coadd_psf.coverage,
        apcorr,
        inputs["visit"],
        inputs["detector"],
        strict=True,
    ):
        row = {
            "weight": float(weight),
            "x0": int(origin[0]),
            "y0": int(origin[1]),
            "block_x0": int(block_origin[0]),
            "block_y0": int(block_origin[1]),
            "block_nx": int(counts.shape[1]) if counts.ndim == 2 else 0,
            "block_ny": int(counts.shape[0]) if counts.ndim == 2 else 0,
            "cov_offset": cov_offset,
            "psf_order": -1,
            "psf_xc": 0.0,
            "psf_yc": 0.0,
            "psf_xs": 1.0,
            "psf_ys": 1.0,
            "basis_offset": basis_offset,
            "n_terms": 0,
            "apCorr": float(ratio),
            "visit": int(visit),
            "detector": int(detector),
        }
        coverage.append(np.asarray(counts, dtype=COVERAGE_DTYPE).ravel())
        cov_offset += counts.size
        if psf is not None:
            pad = (size - psf.size) // 2
            basis = np.pad(psf.basis, ((0, 0), (pad, pad), (pad, pad))) if pad else psf.basis
            planes.append(basis)
            row.update(
                psf_order=psf.order,
                psf_xc=psf.x_center,
                psf_yc=psf.y_center,
                psf_xs=psf.x_scale,
                psf_ys=psf.y_scale,
                n_terms=basis.shape[0],
            )
            basis_offset += basis.shape[0]
        rows.append(row)
    primary = fits.Header()
    primary["BLOCK"] = (coadd_psf.block, "coverage block side, coadd pixels")
    primary["COADDNX"] = (coadd_psf.shape[1], "coadd width")
    primary["COADDNY"] = (coadd_psf.shape[0], "coadd height")
    primary["NINPUTS"] = (len(rows), "inputs")
    primary["PSFSIZE"] = (size, "kernel side of every input PSF (padded)")
    primary["PSFORDER"] = (coadd_psf.order, "order of the POLYPIX fit")
    primary["PSFFRES"] = (coadd_psf.max_rms_residual, "max rms residual / peak of the fit")
    primary["PSFFMED"] = (coadd_psf.median_rms_residual, "median rms residual / peak")
    primary["PSFPURE"] = (coadd_psf.pure_cell_fraction, "fit cells of uniform coverage")
    basis = np.concatenate(planes) if planes else np.zeros((0, size, size))
    hdus = fits.HDUList(
        [
            fits.PrimaryHDU(header=primary),
            fits.BinTableHDU(Table(rows=rows) if rows else Table(), name="INPUTS"),
            fits.ImageHDU(basis.astype(np.float64), name="PSFBASIS"),
            fits.ImageHDU(
                np.concatenate(coverage) if coverage else np.zeros(0, COVERAGE_DTYPE),
                name="COVERAGE",
            ),
            fits.ImageHDU(coadd_psf.model.basis, header=_psf_header(coadd_psf.model), name="MODEL"),
        ]
    )
    with atomic_output(path) as tmp:
        hdus.writeto(tmp, checksum=True)


def read_coadd_psf(path: str | os.PathLike[str]) -> CoaddPsf:
    """Read a file written by :func:`write_coadd_psf`."""
    with fits.open(path, memmap=False) as hdul:
        primary = hdul[0].header
        table = Table.read(hdul["INPUTS"])
        basis = to_native(hdul["PSFBASIS"].data)
        coverage = to_native(hdul["COVERAGE"].data)
        model = PsfModel.from_header_and_cube(hdul["MODEL"].header, to_native(hdul["MODEL"].data))
    psfs: list[PsfModel | None] = []
    maps = []
    for row in table:
        n = int(row["block_nx"]) * int(row["block_ny"])
        start = int(row["cov_offset"])
        maps.append(coverage[start : start + n].reshape(int(row["block_ny"]), int(row["block_nx"])))
        if int(row["n_terms"]) == 0:
            psfs.append(None)
            continue
        b0 = int(row["basis_offset"])
        psfs.append(
            PsfModel(
                basis=basis[b0 : b0 + int(row["n_terms"])],
                order=int(row["psf_order"]),
                x_center=float(row["psf_xc"]),
                y_center=float(row["psf_yc"]),
                x_scale=float(row["psf_xs"]),
                y_scale=float(row["psf_ys"]),
            )
        )
    n_inputs = len(table)
    apcorr = None
    if "apCorr" in table.colnames and n_inputs:
        apcorr = np.asarray(table["apCorr"], dtype=np.float64)
        apcorr = apcorr if np.isfinite(apcorr).any() else None
    input_ids = None
    if {"visit", "detector"} <= set(table.colnames) and n_inputs:
        input_ids = np.column_stack([table["visit"], table["detector"]]).astype(np.int64)
        input_ids = None if (input_ids < 0).any() else input_ids
    return CoaddPsf(
        psfs=tuple(psfs),
        weights=np.asarray(table["weight"], dtype=np.float64) if n_inputs else np.zeros(0),
        origins=np.column_stack([table["x0"], table["y0"]]).astype(np.int64).reshape(-1, 2),
        block=int(primary["BLOCK"]),
        block_origin=np.column_stack([table["block_x0"], table["block_y0"]])
        .astype(np.int64)
        .reshape(-1, 2),
        coverage=tuple(np.asarray(m, dtype=COVERAGE_DTYPE) for m in maps),
        shape=(int(primary["COADDNY"]), int(primary["COADDNX"])),
        model=model,
        order=int(primary["PSFORDER"]),
        max_rms_residual=float(primary["PSFFRES"]),
        median_rms_residual=float(primary["PSFFMED"]),
        pure_cell_fraction=float(primary["PSFPURE"]),
        aperture_corrections=apcorr,
        input_ids=input_ids,
    )
