"""Footprints, deblending and measurement of each object on its own pixels (coadds).

Parents are the connected footprints of the merged detections; a footprint
with several peaks is deblended SDSS-style (:func:`deblend_fractions`), and
every object (isolated, child or parent) is measured on a stamp where its
own footprint keeps its (shared) pixels and every other footprint is
replaced by noise of the variance plane, as LSST's NoiseReplacer does.
Stamps are measured together (vectorised; apertures and windowed centroids by
``sep`` on a mosaic of the stamps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import ndimage

from workflow_lib.core.exposure import Exposure
from workflow_lib.core.flags import ObjectFlag
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.objects.forced import model_stamps, psf_centroid_offset, psf_fit_half_size
from workflow_lib.single_frame.background import native_float
from workflow_lib.single_frame.measure import windowed_moments
from workflow_lib.single_frame.psf import cut_stamps
from workflow_lib.static_sky.coadd_psf import CoaddPsf

FWHM_TO_SIGMA = 1.0 / 2.3548200450309493
MEASUREMENT_BAD_PLANES: tuple[str, ...] = ("NO_DATA", "BAD", "SAT")


def bad_pixels(exposure: Exposure, planes: Sequence[str]) -> np.ndarray:
    """Pixels in any of ``planes`` (those the exposure knows) or with non-finite values."""
    known = [p for p in planes if p in exposure.mask_planes.bits]
    bad = exposure.mask_of(*known) if known else np.zeros(exposure.shape, dtype=bool)
    return (
        bad
        | ~np.isfinite(exposure.image)
        | ~np.isfinite(exposure.variance)
        | (exposure.variance < 0)
    )


def psf_of(exposure: Exposure) -> PsfModel:
    """The exposure's PSF model (an error if it has none)."""
    if exposure.psf is None:
        raise ValueError("coadd measurement needs a PSF model")
    return exposure.psf


def coadd_psf_model_stamps(
    coadd_psf: CoaddPsf,
    fallback: PsfModel,
    x: np.ndarray,
    y: np.ndarray,
    half: int,
    *,
    offset: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`workflow_lib.objects.forced.model_stamps`, with the exact coadd PSF at
    each source.

    The coadd PSF is the weighted mixture of the PSFs of the inputs that
    covered each place, so it jumps at the inputs' edges, where a smooth
    model (``fallback``, used where the coadd PSF has no data) is biased.
    """
    from workflow_lib.single_frame.measure import LANCZOS_ORDER, shift_stamps

    x = np.asarray(x, dtype=np.float64) - offset[0]
    y = np.asarray(y, dtype=np.float64) - offset[1]
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    need = half + LANCZOS_ORDER
    kernels = coadd_psf.kernels_at(x, y)
    size = kernels.shape[1]
    if size < 2 * need + 1:
        pad = (2 * need + 1 - size) // 2
        kernels = np.pad(kernels, ((0, 0), (pad, pad), (pad, pad)))
    elif size > 2 * need + 1:
        cut = (size - 2 * need - 1) // 2
        kernels = kernels[:, cut : cut + 2 * need + 1, cut : cut + 2 * need + 1]
    stamps = shift_stamps(kernels, -(x - ix), -(y - iy))
    empty = ~(np.abs(kernels).sum(axis=(1, 2)) > 0)
    if empty.any():
        stamps[empty] = model_stamps(
            fallback, x[empty] + offset[0], y[empty] + offset[1], half, offset=offset
        )[0]
    return stamps, ix, iy


def disk(radius: float) -> np.ndarray:
    """Boolean disc of ``radius`` pixels on an odd square grid."""
    r = max(int(np.ceil(radius)), 1)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx**2 + yy**2 <= radius**2 + 1e-9


KIND_ISOLATED, KIND_CHILD, KIND_PARENT = 0, 1, 2


class Entities:
    """Everything that gets a row: isolated objects, deblended parents and their children."""

    def __init__(self, n_bands: int) -> None:
        self.kind: list[int] = []
        self.label: list[int] = []
        self.peak: list[int] = []  # row of the merged table (brightest peak for a parent)
        self.parent: list[int] = []  # entity index of the parent, -1 for none
        self.n_child: list[int] = []
        self.flags: list[int] = []
        self.detected: list[np.ndarray] = []
        self.n_bands = n_bands

    def add(
        self,
        kind: int,
        label: int,
        peak: int,
        parent: int,
        n_child: int,
        flags: int,
        detected: npt.ArrayLike,
    ) -> int:
        self.kind.append(kind)
        self.label.append(label)
        self.peak.append(peak)
        self.parent.append(parent)
        self.n_child.append(n_child)
        self.flags.append(flags)
        self.detected.append(np.asarray(detected, dtype=bool))
        return len(self.kind) - 1

    def arrays(self) -> dict[str, np.ndarray]:
        n = len(self.kind)
        return {
            "kind": np.asarray(self.kind, dtype=np.int64),
            "label": np.asarray(self.label, dtype=np.int64),
            "peak": np.asarray(self.peak, dtype=np.int64),
            "parent": np.asarray(self.parent, dtype=np.int64),
            "n_child": np.asarray(self.n_child, dtype=np.int64),
            "flags": np.asarray(self.flags, dtype=np.int64),
            "detected": (np.vstack(self.detected) if n else np.zeros((0, self.n_bands), bool)),
        }


def footprint_labels(
    coadds: Mapping[str, Exposure], px: np.ndarray, py: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Parent footprints: the union of the bands' DETECTED planes, plus a disc of
    ``radius`` around any peak outside them; connected components, 8-connected."""
    shape = next(iter(coadds.values())).shape
    footprints = np.zeros(shape, dtype=bool)
    for coadd in coadds.values():
        if "DETECTED" in coadd.mask_planes.bits:
            footprints |= coadd.mask_of("DETECTED")
    ny, nx = shape
    ix = np.clip(np.floor(px + 0.5).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.floor(py + 0.5).astype(np.int64), 0, ny - 1)
    stamp = disk(radius)
    r = stamp.shape[0] // 2
    for k in np.flatnonzero(~footprints[iy, ix]):
        y0, y1 = max(iy[k] - r, 0), min(iy[k] + r + 1, ny)
        x0, x1 = max(ix[k] - r, 0), min(ix[k] + r + 1, nx)
        footprints[y0:y1, x0:x1] |= stamp[
            y0 - iy[k] + r : y1 - iy[k] + r, x0 - ix[k] + r : x1 - ix[k] + r
        ]
    labels, _ = ndimage.label(footprints, structure=np.ones((3, 3), dtype=bool))
    return labels.astype(np.int32), labels[iy, ix].astype(np.int64)


def build_entities(
    merged: pd.DataFrame,
    peak_label: np.ndarray,
    slices: Sequence[tuple[slice, slice] | None],
    bands: Sequence[str],
    *,
    max_children: int,
    max_deblend_pixels: int,
) -> Entities:
    """Isolated objects, and for footprints with several peaks a parent and its children."""
    detected = (
        np.column_stack(
            [
                merged[f"{b}_detected"].to_numpy(dtype=bool)
                if f"{b}_detected" in merged
                else np.zeros(len(merged), dtype=bool)
                for b in bands
            ]
        )
        if bands
        else np.zeros((len(merged), 0), dtype=bool)
    )
    snr_cols = [f"{b}_snr" for b in bands if f"{b}_snr" in merged]
    strength = (
        merged[snr_cols].to_numpy(dtype=np.float64) if snr_cols else np.zeros((len(merged), 1))
    )
    strength = np.nan_to_num(strength, nan=-np.inf).max(axis=1)
    entities = Entities(len(bands))
    order = np.argsort(peak_label, kind="stable")
    bounds = np.searchsorted(peak_label[order], np.unique(peak_label), side="left")
    groups = np.split(order, bounds[1:])
    for group in groups:
        if group.size == 0:
            continue
        label = int(peak_label[group[0]])
        group = group[np.argsort(-strength[group], kind="stable")]
        any_detected = detected[group].any(axis=0)
        if group.size == 1:
            entities.add(KIND_ISOLATED, label, int(group[0]), -1, 0, 0, detected[group[0]])
            continue
        sl = slices[label - 1]
        area = 0 if sl is None else (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start)
        if group.size > max_children or area * group.size > max_deblend_pixels:
            entities.add(
                KIND_ISOLATED,
                label,
                int(group[0]),
                -1,
                0,
                int(ObjectFlag.DEBLEND_SKIPPED),
                any_detected,
            )
            continue
        parent = entities.add(
            KIND_PARENT,
            label,
            int(group[0]),
            -1,
            int(group.size),
            int(ObjectFlag.DEBLEND_PARENT),
            any_detected,
        )
        for peak in group:
            entities.add(
                KIND_CHILD,
                label,
                int(peak),
                parent,
                0,
                int(ObjectFlag.DEBLEND_CHILD),
                detected[peak],
            )
    return entities


def monotonic_plan(h: int, w: int, cx: int, cy: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rings of an (h, w) grid around pixel (cx, cy): for ring r = 1, 2, ... the flat
    indices of its pixels and of each one's inward neighbour (one step towards the peak
    along the dominant axis, and along the other too when the ray is near a diagonal)."""
    yy, xx = np.mgrid[0:h, 0:w]
    dx, dy = xx - cx, yy - cy
    ring = np.maximum(np.abs(dx), np.abs(dy)).ravel()
    inner_x = np.clip(
        xx - (2 * np.abs(dx) >= np.maximum(np.abs(dx), np.abs(dy))) * np.sign(dx), 0, w - 1
    )
    inner_y = np.clip(
        yy - (2 * np.abs(dy) >= np.maximum(np.abs(dx), np.abs(dy))) * np.sign(dy), 0, h - 1
    )
    inner = (inner_y * w + inner_x).ravel()
    order = np.argsort(ring, kind="stable")
    bounds = np.searchsorted(ring[order], np.arange(1, int(ring.max()) + 2))
    return [
        (order[bounds[r - 1] : bounds[r]], inner[order[bounds[r - 1] : bounds[r]]])
        for r in range(1, int(ring.max()) + 1)
    ]


def monotonic_template(
    template: np.ndarray,
    cx: int,
    cy: int,
    *,
    plan: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> np.ndarray:
    """Non-negative ``template`` made non-increasing outwards from pixel (cx, cy).

    Each pixel is capped by its inward neighbour (:func:`monotonic_plan`, which
    may be given to save recomputing it); rings of growing Chebyshev distance
    are done in turn, so a capped pixel caps the next ring, and once a whole
    ring is zero so is everything beyond. Light of an unrelated source that a
    symmetric template picks up is removed this way.
    """
    out = np.array(template, dtype=np.float64, copy=True)
    h, w = out.shape
    if plan is None:
        plan = monotonic_plan(h, w, cx, cy)
    flat = out.ravel()
    for k, (idx, inner) in enumerate(plan):
        capped = np.minimum(flat[idx], flat[inner])
        flat[idx] = capped
        if not capped.any():
            for rest, _ in plan[k + 1 :]:
                flat[rest] = 0.0
            break
    return out


def refine_peaks(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Peaks moved to the brightest pixel of ``image`` within one pixel, then to the vertex
    of a parabola through it and its neighbours (per axis). Merged peaks come from
    blurred detection images, where a neighbour drags them; templates need this band's."""
    ny, nx = image.shape
    ix = np.clip(np.floor(np.asarray(x) + 0.5).astype(np.int64), 1, nx - 2)
    iy = np.clip(np.floor(np.asarray(y) + 0.5).astype(np.int64), 1, ny - 2)
    box = cut_stamps(image, ix, iy, 1)
    best = box.reshape(len(ix), 9).argmax(axis=1)
    jx = np.clip(ix + best % 3 - 1, 1, nx - 2)
    jy = np.clip(iy + best // 3 - 1, 1, ny - 2)
    out = []
    for j, lo, hi in (
        (jx, image[jy, jx - 1], image[jy, jx + 1]),
        (jy, image[jy - 1, jx], image[jy + 1, jx]),
    ):
        mid = image[jy, jx]
        curvature = lo - 2.0 * mid + hi
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.where(curvature < 0, 0.5 * (lo - hi) / curvature, 0.0)
        out.append(j + np.clip(np.nan_to_num(shift), -0.5, 0.5))
    return out[0], out[1]


def deblend_fractions(
    data: np.ndarray,
    own: np.ndarray,
    origin: tuple[int, int],
    peaks_x: np.ndarray,
    peaks_y: np.ndarray,
    *,
    floor: float,
    fwhm: float,
    iterations: int = 2,
) -> np.ndarray:
    """Share of each pixel of one footprint belonging to each peak (SDSS-style deblending).

    ``data`` is the whole image, ``own`` the footprint's boolean mask inside
    its bounding box whose corner is ``origin`` = (x0, y0), ``peaks_x/y`` the
    peak positions (sub-pixel, see :func:`refine_peaks`). A peak's template
    is the image made symmetric about the peak (``min(I(p), I(2c - p))``, c
    rounded to the nearest half pixel; zero where either pixel is outside the
    footprint), clipped at zero and made monotonic (:func:`monotonic_template`),
    as in LSST's meas_deblender. Pixels are shared in proportion to the
    templates, plus ``floor`` times a slowly falling function of distance so
    that pixels outside every template still go to the nearest peaks. Then
    ``iterations`` times, each template is rebuilt from the child's own share
    of the image and the pixels shared again.
    Returns (n_peaks, h, w) fractions summing to 1 on ``own``, 0 elsewhere.
    """
    h, w = own.shape
    x0, y0 = origin
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    sub = np.where(own, data[y0 : y0 + h, x0 : x0 + w], 0.0)
    n = len(peaks_x)
    mirrors = []
    floors = np.empty((n, h, w))
    for k, (cx, cy) in enumerate(zip(peaks_x, peaks_y, strict=True)):
        # Mirror about the half-pixel point nearest the peak: 2c is an integer there.
        two_cx, two_cy = int(np.floor(2.0 * cx + 0.5)), int(np.floor(2.0 * cy + 0.5))
        ry, rx = two_cy - 2 * y0 - (yy - y0), two_cx - 2 * x0 - (xx - x0)
        valid = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
        ry, rx = np.clip(ry, 0, h - 1), np.clip(rx, 0, w - 1)
        valid &= own[ry, rx] & own
        centre = (int(np.floor(cx + 0.5)) - x0, int(np.floor(cy + 0.5)) - y0)
        mirrors.append((ry, rx, valid, centre, monotonic_plan(h, w, *centre)))
        distance2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / max(fwhm, 1.0) ** 2
        floors[k] = floor / (1.0 + distance2)

    def shares(images: np.ndarray) -> np.ndarray:
        weights = np.empty((n, h, w))
        for k, (ry, rx, valid, centre, plan) in enumerate(mirrors):
            image = images[k]
            template = np.where(valid, np.minimum(image, image[ry, rx]), 0.0)
            template = monotonic_template(np.maximum(template, 0.0), *centre, plan=plan)
            weights[k] = template + floors[k]
        weights *= own
        total = weights.sum(axis=0)
        return np.where(own, weights / np.where(total > 0, total, 1.0), 0.0)

    fractions = shares(np.broadcast_to(sub, (n, h, w)))
    # Templates rebuilt from each child's own share: light that went to a neighbour no
    # longer props up a template whose mirror image landed on that neighbour.
    for _ in range(int(iterations)):
        fractions = shares(fractions * sub)
    return fractions


class BandImages:
    """One band's pixels prepared for measurement: other footprints replaced by noise,
    and the deblending shares of every child."""

    def __init__(
        self,
        coadd: Exposure,
        labels: np.ndarray,
        ents: dict[str, np.ndarray],
        peaks_x: np.ndarray,
        peaks_y: np.ndarray,
        *,
        seed: Sequence[int],
        fwhm: float | None = None,
        shares: dict[int, tuple[int, int, np.ndarray]] | None = None,
        coadd_psf: CoaddPsf | None = None,
    ) -> None:
        self.psf = psf_of(coadd)
        self.coadd_psf = coadd_psf
        self.fwhm = self.psf.fwhm_at(self.psf.x_center, self.psf.y_center) if fwhm is None else fwhm
        centre_psf = self.psf
        if coadd_psf is not None:
            # The smooth model's kernel can be a blend of PSFs no source sees (an input's
            # edge nearby); the centring convention comes from a real mixture.
            kernel = coadd_psf.kernel_at(self.psf.x_center, self.psf.y_center)
            if kernel.sum() > 0:
                centre_psf = PsfModel.constant(kernel)
        self.offset = psf_centroid_offset(centre_psf, fwhm=self.fwhm)
        self.bad = bad_pixels(coadd, MEASUREMENT_BAD_PLANES)
        self.sat = coadd.mask_of("SAT") if "SAT" in coadd.mask_planes.bits else None
        self.data = np.where(self.bad, 0.0, coadd.image).astype(np.float32)
        self.var = np.where(self.bad, 0.0, coadd.variance).astype(np.float32)
        self.labels = labels
        footprint = labels > 0
        rng = np.random.default_rng(list(seed))
        noise = rng.standard_normal(int(footprint.sum())).astype(np.float32)
        self.base = self.data.copy()
        self.base[footprint] = noise * np.sqrt(self.var[footprint])
        if shares is not None:
            self.shares = shares
            return
        self.shares = {}
        slices = ndimage.find_objects(labels)
        sigma = float(np.sqrt(np.median(self.var[~self.bad]))) if (~self.bad).any() else 1.0
        kind, parent = ents["kind"], ents["parent"]
        for p in np.flatnonzero(kind == KIND_PARENT):
            children = np.flatnonzero(parent == p)
            sy, sx = slices[int(ents["label"][p]) - 1]
            own = labels[sy, sx] == ents["label"][p]
            cx, cy = refine_peaks(
                self.data, peaks_x[ents["peak"][children]], peaks_y[ents["peak"][children]]
            )
            fractions = deblend_fractions(
                self.data, own, (sx.start, sy.start), cx, cy, floor=1e-3 * sigma, fwhm=self.fwhm
            )
            for k, child in enumerate(children):
                self.shares[int(child)] = (sx.start, sy.start, fractions[k].astype(np.float32))

    def stamps(
        self,
        ents: dict[str, np.ndarray],
        which: np.ndarray,
        ix: np.ndarray,
        iy: np.ndarray,
        half: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Data, variance and good-pixel stamps of entities ``which`` centred on (ix, iy)."""
        raw = cut_stamps(self.data, ix, iy, half).astype(np.float64)
        base = cut_stamps(self.base, ix, iy, half).astype(np.float64)
        lab = cut_stamps(self.labels, ix, iy, half, fill=0)
        var = cut_stamps(self.var, ix, iy, half).astype(np.float64)
        good = cut_stamps(self.bad.astype(np.float32), ix, iy, half, fill=1.0) == 0
        own = lab == ents["label"][which][:, None, None]
        share = np.ones(raw.shape)
        size = 2 * half + 1
        for k in np.flatnonzero(ents["kind"][which] == KIND_CHILD):
            x0, y0, frac = self.shares[int(which[k])]
            h, w = frac.shape
            sx0, sy0 = int(ix[k]) - half, int(iy[k]) - half
            # Overlap of the stamp with the parent's bounding box.
            ax0, ax1 = max(sx0, x0), min(sx0 + size, x0 + w)
            ay0, ay1 = max(sy0, y0), min(sy0 + size, y0 + h)
            if ax0 < ax1 and ay0 < ay1:
                share[k, ay0 - sy0 : ay1 - sy0, ax0 - sx0 : ax1 - sx0] = frac[
                    ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0
                ]
        data = np.where(own, raw * share, base)
        return data, var, good


def _mosaic(stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stamps (n, s, s) tiled into one 2-d array (for sep), and each tile's (x0, y0)."""
    n, s, _ = stamps.shape
    cols = max(1, int(np.ceil(np.sqrt(n))))
    rows = max(1, int(np.ceil(n / cols)))
    padded = np.zeros((rows * cols, s, s), dtype=stamps.dtype)
    padded[:n] = stamps
    mosaic = padded.reshape(rows, cols, s, s).transpose(0, 2, 1, 3).reshape(rows * s, cols * s)
    k = np.arange(n)
    return np.ascontiguousarray(mosaic), (k % cols) * s, (k // cols) * s


def measure_band(
    images: BandImages,
    ents: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    centroid: bool,
    aperture_radii: Sequence[float],
    fit_radius_fwhm: float,
    max_masked_fraction: float,
    which: np.ndarray | None = None,
    chunk: int = 2000,
) -> dict[str, np.ndarray]:
    """Centroid (optional), PSF flux, apertures, shape and extendedness ratio of entities
    at (x, y), each on its own pixels. Errors are variance-plane errors (no correlation)."""
    import sep

    psf, fwhm = images.psf, images.fwhm
    ny, nx = images.data.shape
    which = np.arange(len(ents["kind"])) if which is None else np.asarray(which)
    n = which.size
    hf = psf_fit_half_size(psf, fit_radius_fwhm=fit_radius_fwhm, fwhm=fwhm)
    max_shift = 2
    half = int(max(hf + max_shift, np.ceil(max(aperture_radii, default=0.0)) + max_shift + 1))
    sigma = max(fwhm * FWHM_TO_SIGMA, 0.5)
    out: dict[str, np.ndarray] = {
        "x": x[which].astype(np.float64).copy(),
        "y": y[which].astype(np.float64).copy(),
        "centroid_flag": np.zeros(n, dtype=bool),
    }
    for key in (
        "psf_flux",
        "psf_flux_err",
        "masked_fraction",
        "shape_xx",
        "shape_yy",
        "shape_xy",
        "ext_ratio",
        "ext_ratio_err",
    ):
        out[key] = np.full(n, np.nan)
    for key in ("psf_flag", "edge", "center_bad", "center_sat", "shape_flag", "masked"):
        out[key] = np.zeros(n, dtype=bool)
    for r in aperture_radii:
        out[f"ap_{r}"] = np.full(n, np.nan)
        out[f"ap_{r}_err"] = np.full(n, np.nan)
        out[f"ap_{r}_flag"] = np.ones(n, dtype=bool)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        ids = which[sl]
        xs, ys = out["x"][sl], out["y"][sl]
        ix, iy = np.floor(xs + 0.5).astype(np.int64), np.floor(ys + 0.5).astype(np.int64)
        data, var, good = images.stamps(ents, ids, ix, iy, half)
        xl, yl = xs - ix + half, ys - iy + half
        mosaic, ox, oy = _mosaic(data)
        bad_mosaic = _mosaic(~good)[0]
        if centroid and len(ids):
            xw, yw, _ = sep.winpos(
                native_float(mosaic, np.float64),
                xl + ox,
                yl + oy,
                np.full(len(ids), sigma),
                mask=bad_mosaic,
            )
            xw, yw = xw - ox, yw - oy
            ok = np.isfinite(xw) & np.isfinite(yw) & (np.hypot(xw - xl, yw - yl) < max_shift)
            xl, yl = np.where(ok, xw, xl), np.where(ok, yw, yl)
            out["centroid_flag"][sl] = ~ok
            xs, ys = xl + ix - half, yl + iy - half
            out["x"][sl], out["y"][sl] = xs, ys
        # PSF flux at (xs, ys): the model stamp sits at most max_shift pixels off the stamp centre.
        if images.coadd_psf is not None:
            models, jx, jy = coadd_psf_model_stamps(
                images.coadd_psf, psf, xs, ys, hf, offset=images.offset
            )
        else:
            models, jx, jy = model_stamps(psf, xs, ys, hf, offset=images.offset)
        offx = np.clip(jx - ix, hf - half, half - hf)
        offy = np.clip(jy - iy, hf - half, half - hf)
        rows = half + offy[:, None] - hf + np.arange(2 * hf + 1)[None, :]
        cols = half + offx[:, None] - hf + np.arange(2 * hf + 1)[None, :]
        k = np.arange(len(ids))[:, None, None]
        dd, vv = (
            data[k, rows[:, :, None], cols[:, None, :]],
            var[k, rows[:, :, None], cols[:, None, :]],
        )
        gg = good[k, rows[:, :, None], cols[:, None, :]]
        mg = models * gg
        a = (mg * mg).sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            flux = (mg * dd).sum(axis=(1, 2)) / a
            err = np.sqrt((mg * mg * vv).sum(axis=(1, 2))) / a
            masked = 1.0 - a / (models * models).sum(axis=(1, 2))
        out["psf_flux"][sl], out["psf_flux_err"][sl], out["masked_fraction"][sl] = flux, err, masked
        off_image = (jx - hf < 0) | (jx + hf >= nx) | (jy - hf < 0) | (jy + hf >= ny)
        out["edge"][sl] = off_image
        out["masked"][sl] = masked > max_masked_fraction
        out["psf_flag"][sl] = (
            ~np.isfinite(flux) | ~np.isfinite(err) | (masked > max_masked_fraction)
        )
        out["psf_flag"][sl] |= (jx != ix + offx) | (jy != iy + offy)
        centre = good[:, half - 1 : half + 2, half - 1 : half + 2]
        out["center_bad"][sl] = ~centre.all(axis=(1, 2))
        if images.sat is not None:
            out["center_sat"][sl] = cut_stamps(images.sat, jx, jy, 1, fill=False).any(axis=(1, 2))
        # Extendedness: data over the PSF model inside ~2 FWHM, on the same pixels.
        r_ext = min(max(2.0, 2.0 * fwhm), float(hf))
        off = np.arange(-hf, hf + 1, dtype=np.float64)
        rr2 = ((jx - xs)[:, None, None] + off[None, None, :]) ** 2 + (
            (jy - ys)[:, None, None] + off[None, :, None]
        ) ** 2
        circ = (rr2 <= r_ext**2) & gg
        with np.errstate(divide="ignore", invalid="ignore"):
            predicted = flux * (models * circ).sum(axis=(1, 2))
            var_ap = (vv * circ).sum(axis=(1, 2))
            var_pred = (err * (models * circ).sum(axis=(1, 2))) ** 2
            out["ext_ratio"][sl] = (dd * circ).sum(axis=(1, 2)) / predicted
            out["ext_ratio_err"][sl] = np.sqrt(
                np.maximum(var_ap - var_pred, 0.1 * var_ap)
            ) / np.abs(predicted)
        # Apertures on the tiled stamps (sep), and windowed shapes.
        err_mosaic = np.sqrt(_mosaic(var)[0])
        for r in aperture_radii:
            if not len(ids):
                continue
            flux_r, err_r, flag_r = sep.sum_circle(
                native_float(mosaic, np.float64),
                xl + ox,
                yl + oy,
                float(r),
                err=native_float(err_mosaic, np.float64),
                mask=bad_mosaic,
                subpix=5,
            )
            inside = (xl - r >= -0.5) & (xl + r <= 2 * half + 0.5)
            inside &= (yl - r >= -0.5) & (yl + r <= 2 * half + 0.5)
            truncated = (
                (xs - r < -0.5) | (xs + r > nx - 0.5) | (ys - r < -0.5) | (ys + r > ny - 0.5)
            )
            out[f"ap_{r}"][sl], out[f"ap_{r}_err"][sl] = flux_r, err_r
            flagged = (np.asarray(flag_r) & (sep.APER_TRUNC | sep.APER_HASMASKED)) != 0
            out[f"ap_{r}_flag"][sl] = flagged | ~inside | truncated
        cxx, cyy, cxy, sflag = windowed_moments(data, good, xl, yl, sigma)
        out["shape_xx"][sl], out["shape_yy"][sl], out["shape_xy"][sl] = cxx, cyy, cxy
        out["shape_flag"][sl] = sflag
    return out
