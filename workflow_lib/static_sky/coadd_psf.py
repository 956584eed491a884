"""The PSF of a coadd: the weighted mean of the PSFs of the inputs used at each place.

A coadd pixel is sum_i w_i I_i / sum_i w_i over the inputs used there, so a
star's profile is sum_i w_i K_i / sum_i w_i over those same inputs (K_i the
PSF of input i there, of unit flux). Which inputs are used changes across
the patch (CCD edges, chip gaps, rejected pixels), so the assembly counts,
per small block of the coadd, the pixels each input contributed; that is
LSST's CoaddPsf with coverage maps in place of valid polygons.

:class:`CoaddPsf` keeps the input PSFs, weights, origins and block counts,
and evaluates the exact mixture anywhere (``kernel_at``, ``psf_at``,
``groups`` for measuring sources block by block). Its ``model`` is a POLYPIX
:class:`~workflow_lib.single_frame.psf.PsfModel` fitted to the mixture on coarse cells:
smooth in position, which existing measurement code takes, but unable to
follow the PSF's jumps at coverage edges of shallow coadds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from workflow_lib.core.psf_model import PsfModel, evaluate_kernels, fit_psf_model, polynomial_terms

COVERAGE_DTYPE = np.uint16


def block_sums(used: np.ndarray, y_start: int, x_start: int, block: int) -> np.ndarray:
    """Counts of ``used`` pixels per ``block`` x ``block`` block of the coadd grid.

    ``used`` starts at coadd pixel (x_start, y_start); the result covers the
    blocks it touches, the first being (y_start // block, x_start // block).
    """
    ny, nx = used.shape
    y_starts = np.maximum(np.arange((y_start // block) * block, y_start + ny, block) - y_start, 0)
    x_starts = np.maximum(np.arange((x_start // block) * block, x_start + nx, block) - x_start, 0)
    rows = np.add.reduceat(used.astype(np.int32), y_starts, axis=0)
    return np.add.reduceat(rows, x_starts, axis=1)


@dataclass(frozen=True)
class CoaddPsf:
    """Input PSFs with the weights and coverage that make the coadd PSF anywhere.

    ``coverage[i]`` counts, per block of ``block`` x ``block`` coadd pixels
    starting at block ``block_origin[i]`` = (bx, by), the pixels input i
    contributed; ``origins[i]`` = (x0, y0) places its own pixel frame (where
    its PSF lives) in the coadd. ``model`` is the smooth POLYPIX fit.
    """

    psfs: tuple[PsfModel | None, ...]
    weights: np.ndarray
    origins: np.ndarray
    block: int
    block_origin: np.ndarray
    coverage: tuple[np.ndarray, ...]
    shape: tuple[int, int]
    model: PsfModel
    order: int
    max_rms_residual: float  # of the POLYPIX fit against the cell mixtures, / peak
    median_rms_residual: float
    pure_cell_fraction: float  # of the fit's cells, those no coverage edge crosses
    # Each input's aperture correction (reference-aperture / PSF flux on its calexp);
    # NaN where unknown, None if no input had one.
    aperture_corrections: np.ndarray | None = None
    # (visit, detector) of each input, (n, 2); None where not recorded (older files).
    input_ids: np.ndarray | None = None

    @property
    def size(self) -> int:
        return max(p.size for p in self.psfs if p is not None)

    def fractions(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n_sources, n_inputs): fraction of each source's block that each input covered."""
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        ny, nx = self.shape
        b = self.block
        bx = np.clip(np.floor((x + 0.5) / b), 0, (nx - 1) // b).astype(np.int64)
        by = np.clip(np.floor((y + 0.5) / b), 0, (ny - 1) // b).astype(np.int64)
        area = (np.minimum(b, ny - by * b) * np.minimum(b, nx - bx * b)).astype(np.float64)
        out = np.zeros((x.size, len(self.psfs)))
        for i, counts in enumerate(self.coverage):
            if self.psfs[i] is None or counts.size == 0:
                continue
            jy = by - self.block_origin[i][1]
            jx = bx - self.block_origin[i][0]
            inside = (jy >= 0) & (jy < counts.shape[0]) & (jx >= 0) & (jx < counts.shape[1])
            out[inside, i] = counts[jy[inside], jx[inside]] / area[inside]
        return out

    def visit_weight_share(self, visit: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Share of the coadd's input weight at coadd positions that is ``visit``'s own.

        sum over the visit's inputs of w_i f_i / sum over all inputs of w_i f_i
        (f_i the input's coverage of the position's block): 1 where the coadd
        is that visit alone, NaN where no input covers the position (or it is off
        the coadd). A
        difference image of a visit against a template that is largely the
        visit itself subtracts the visit from itself. Raises ValueError when
        the inputs' ids were not recorded.
        """
        if self.input_ids is None:
            raise ValueError("the coadd PSF does not record its inputs' visits")
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        weighted = self.fractions(x, y) * self.weights[None, :]
        own = weighted[:, self.input_ids[:, 0] == int(visit)].sum(axis=1)
        total = weighted.sum(axis=1)
        # fractions() clamps to the edge blocks; off the coadd nothing covers.
        ny, nx = self.shape
        total[~((x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5))] = 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, own / total, np.nan)

    def kernels_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Coadd PSF kernels (n, s, s), unit sum, at coadd positions; zeros where no data."""
        return self._mixture(self.fractions(x, y), x, y)

    def _input_kernels(
        self, fractions: np.ndarray, x: np.ndarray, y: np.ndarray
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(input i, rows it covers, its kernels there padded to ``size``) for each input."""
        size = self.size
        for i, psf in enumerate(self.psfs):
            sel = np.flatnonzero(fractions[:, i] * self.weights[i] > 0)
            if psf is None or sel.size == 0:
                continue
            k = evaluate_kernels(psf, x[sel] - self.origins[i][0], y[sel] - self.origins[i][1])
            pad = (size - psf.size) // 2
            if pad:
                k = np.pad(k, ((0, 0), (pad, pad), (pad, pad)))
            yield i, sel, k

    def _mixture(self, fractions: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Kernels sum_i w_i f_i K_i(x, y) / sum_i w_i f_i for each row of ``fractions``."""
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        frac = fractions * self.weights[None, :]
        size = self.size
        acc = np.zeros((x.size, size, size))
        for i, sel, k in self._input_kernels(fractions, x, y):
            acc[sel] += frac[sel, i, None, None] * k
        total = frac.sum(axis=1)
        return np.divide(acc, total[:, None, None], out=acc, where=total[:, None, None] > 0)

    def aperture_correction_at(
        self, x: np.ndarray, y: np.ndarray, *, chunk: int = 64
    ) -> np.ndarray:
        """The coadd's aperture correction at coadd positions: NaN where no input covers
        the place or a covering input's correction is unknown.

        Input i holds a star of calibrated flux F as (F / A_i) K_i, so the coadd
        holds F sum_i v_i K_i / A_i (v_i the normalised weights of the inputs
        used there) and a fit of the coadd PSF M = sum_i v_i K_i gives
        F sum_i c_i / A_i with c_i = v_i <K_i, M> / <M, M> (the c_i sum to 1):
        sharper inputs count for more. The correction is that mean's inverse;
        LSST's CoaddApCorrMap takes the plain weighted mean of the A_i, which is
        off by the spread of the A_i times the spread of the c_i / v_i.
        """
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        out = np.full(x.size, np.nan)
        if self.aperture_corrections is None:
            return out
        frac = self.fractions(x, y)
        inverse = 1.0 / np.asarray(self.aperture_corrections, dtype=np.float64)
        known = np.isfinite(inverse) & (inverse > 0)
        used = frac * self.weights[None, :] > 0
        ok = used.any(axis=1) & ~used[:, ~known].any(axis=1)
        index = np.flatnonzero(ok)
        for start in range(0, index.size, chunk):
            rows = index[start : start + chunk]
            # Each input's kernels once: they make the mixture M, then <K_i, M>.
            parts = list(self._input_kernels(frac[rows], x[rows], y[rows]))
            shares = [frac[rows[sel], i] * self.weights[i] for i, sel, _ in parts]
            mixture = np.zeros((rows.size, self.size, self.size))
            for (_, sel, kernels), share in zip(parts, shares, strict=True):
                mixture[sel] += share[:, None, None] * kernels
            overlap = np.zeros(rows.size)
            weighted = np.zeros(rows.size)
            for (i, sel, kernels), share in zip(parts, shares, strict=True):
                dot = share * np.einsum("nij,nij->n", kernels, mixture[sel])
                overlap[sel] += dot
                weighted[sel] += dot * inverse[i]
            out[rows] = overlap / weighted
        return out

    def kernel_at(self, x: float, y: float) -> np.ndarray:
        return self.kernels_at(np.array([x]), np.array([y]))[0]

    def psf_at(self, x: float, y: float) -> PsfModel:
        """The exact coadd PSF at (x, y) as a constant PsfModel (for ``measure_sources``)."""
        return PsfModel.constant(self.kernel_at(x, y))

    def groups(
        self, x: np.ndarray, y: np.ndarray, *, cell: int = 128
    ) -> Iterator[tuple[PsfModel, np.ndarray]]:
        """(PSF, source indices) for sources sharing their inputs' coverage and a ``cell``.

        Within a group the coadd PSF is one kernel (the input PSFs vary
        negligibly across ``cell`` pixels), so ``measure_sources`` can be
        called once per group with exact PSFs for every source.
        """
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        frac = np.round(self.fractions(x, y), 3)
        cells = np.column_stack([np.floor(x / cell), np.floor(y / cell)])
        keys = np.concatenate([cells, frac], axis=1)
        _, labels = np.unique(keys, axis=0, return_inverse=True)
        labels = labels.ravel()
        for label in np.unique(labels):
            index = np.flatnonzero(labels == label)
            # The group's own coverage, the input PSFs at its mean position.
            kernel = self._mixture(frac[index[:1]], np.mean(x[index]), np.mean(y[index]))[0]
            if kernel.sum() > 0:
                yield PsfModel.constant(kernel), index

    def input_table(self) -> pd.DataFrame:
        """One row per input: weight, origin, coverage block origin (for storage)."""
        return pd.DataFrame(
            {
                "weight": self.weights,
                "x0": self.origins[:, 0],
                "y0": self.origins[:, 1],
                "block_x0": self.block_origin[:, 0],
                "block_y0": self.block_origin[:, 1],
                "block_nx": [c.shape[1] for c in self.coverage],
                "block_ny": [c.shape[0] for c in self.coverage],
                "has_psf": [p is not None for p in self.psfs],
                "visit": self._ids_column(0),
                "detector": self._ids_column(1),
                "apCorr": (
                    np.full(len(self.psfs), np.nan)
                    if self.aperture_corrections is None
                    else self.aperture_corrections
                ),
            }
        )

    def _ids_column(self, k: int) -> np.ndarray:
        if self.input_ids is None:
            return np.full(len(self.psfs), -1, dtype=np.int64)
        return self.input_ids[:, k]


def build_coadd_psf(
    psfs: Sequence[PsfModel | None],
    weights: np.ndarray,
    origins: Sequence[tuple[int, int]],
    coverage: Sequence[np.ndarray],
    block_origin: Sequence[tuple[int, int]],
    *,
    block: int,
    shape: tuple[int, int],
    cell_size: int,
    order: int = 3,
    full_fraction: float = 0.9,
    aperture_corrections: Sequence[float] | None = None,
    input_ids: Sequence[tuple[int, int]] | None = None,
) -> CoaddPsf | None:
    """The coadd PSF from the inputs' block coverage, with its POLYPIX fit.

    The fit uses the mixture on cells of ``cell_size`` pixels (a multiple of
    ``block``), each input's PSF evaluated at the mean position of its
    pixels in the cell; cells are weighted by their share of the data, and
    by 10 less where a coverage edge crosses them (an input there has less
    than ``full_fraction`` of the best-covered input's pixels), as such a
    mixture is what no star sees. Returns None if no input has a PSF or
    nothing is covered. ``aperture_corrections`` (per input, NaN where
    unknown) make :meth:`CoaddPsf.aperture_correction_at`; ``input_ids``
    (visit, detector) per input make :meth:`CoaddPsf.visit_weight_share`.
    """
    if not any(p is not None for p in psfs):
        return None
    ids = None
    if input_ids is not None:
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1, 2)
        if len(ids) != len(psfs):
            raise ValueError(f"{len(ids)} input ids for {len(psfs)} inputs")
    apcorr = None
    if aperture_corrections is not None:
        apcorr = np.asarray(aperture_corrections, dtype=np.float64).reshape(-1)
        if apcorr.size != len(psfs):
            raise ValueError(f"{apcorr.size} aperture corrections for {len(psfs)} inputs")
        if not np.isfinite(apcorr).any():
            apcorr = None
    ny, nx = shape
    per_cell = max(1, int(cell_size) // block)
    ncy, ncx = -(-ny // (per_cell * block)), -(-nx // (per_cell * block))
    n_cells = ncy * ncx
    size = max(p.size for p in psfs if p is not None)
    acc = np.zeros((n_cells, size, size))
    wsum = np.zeros(n_cells)
    wx = np.zeros(n_cells)
    wy = np.zeros(n_cells)
    per_input: list[np.ndarray | None] = []
    for i, psf in enumerate(psfs):
        counts = coverage[i].astype(np.float64)
        if psf is None or weights[i] <= 0 or not counts.any():
            per_input.append(None)
            continue
        jy, jx = np.nonzero(counts)
        n = counts[jy, jx]
        gy, gx = jy + block_origin[i][1], jx + block_origin[i][0]
        cell = (gy // per_cell) * ncx + gx // per_cell
        cn = np.bincount(cell, weights=n, minlength=n_cells)
        sx = np.bincount(cell, weights=n * (gx * block + (block - 1) / 2.0), minlength=n_cells)
        sy = np.bincount(cell, weights=n * (gy * block + (block - 1) / 2.0), minlength=n_cells)
        per_input.append(cn)
        sel = np.flatnonzero(cn > 0)
        mx, my = sx[sel] / cn[sel], sy[sel] / cn[sel]
        kernels = evaluate_kernels(psf, mx - origins[i][0], my - origins[i][1])
        pad = (size - psf.size) // 2
        if pad:
            kernels = np.pad(kernels, ((0, 0), (pad, pad), (pad, pad)))
        w = weights[i] * cn[sel]
        acc[sel] += w[:, None, None] * kernels
        wsum[sel] += w
        wx[sel] += w * mx
        wy[sel] += w * my
    good = wsum > 0
    if not good.any():
        return None
    counted = np.array([c for c in per_input if c is not None])
    best = counted.max(axis=0)
    w_full = np.zeros(n_cells)
    for i, counts_i in enumerate(per_input):
        if counts_i is not None:
            w_full += np.where(
                (counts_i > 0) & (counts_i >= full_fraction * best), weights[i] * counts_i, 0.0
            )
    purity = np.divide(w_full, wsum, out=np.zeros(n_cells), where=good)

    kernels = acc[good] / wsum[good, None, None]
    cx, cy = wx[good] / wsum[good], wy[good] / wsum[good]
    fill = counted.sum(axis=0)[good]
    fit_weight = (fill / fill.max()) * np.where(purity[good] > 0.99, 1.0, 0.1)
    fit_order = max(int(order), 0)
    while fit_order > 0 and (fit_order + 1) * (fit_order + 2) > int(good.sum()):
        fit_order -= 1
    model = fit_psf_model(cx, cy, kernels, fit_order, (ny, nx), weights=fit_weight)
    terms = polynomial_terms(*model.normalized_position(cx, cy), fit_order)
    flat = kernels.reshape(len(kernels), -1)
    fitted = terms @ model.basis.reshape(len(model.basis), -1)
    rel = np.sqrt(((flat - fitted) ** 2).mean(axis=1)) / flat.max(axis=1)
    return CoaddPsf(
        psfs=tuple(psfs),
        weights=np.asarray(weights, dtype=np.float64),
        origins=np.asarray(origins, dtype=np.int64).reshape(-1, 2),
        block=int(block),
        block_origin=np.asarray(block_origin, dtype=np.int64).reshape(-1, 2),
        coverage=tuple(np.asarray(c, dtype=COVERAGE_DTYPE) for c in coverage),
        shape=(int(ny), int(nx)),
        model=model,
        order=fit_order,
        max_rms_residual=float(rel.max()),
        median_rms_residual=float(np.median(rel)),
        pure_cell_fraction=float(np.mean(purity[good] > 0.99)),
        aperture_corrections=apcorr,
        input_ids=ids,
    )
