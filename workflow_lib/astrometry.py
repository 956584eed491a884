"""Astrometric calibration: pattern matching to the reference catalog, TAN-SIP fitting.

The header WCS of a raw frame is only a pointing hint (CONTRACT 1.1): tens of
arcsec off, a degree or more rotated, no distortion. A nearest-neighbour match
fails as soon as the offset exceeds the typical star separation, so
:func:`match_sources` first finds the transform by *pattern* matching, the way
the LSST stack's matchOptimisticB and astrometry tools such as astroalign do:
triangles of the brightest detections and of the brightest reference stars
(projected into the pixel plane with the header WCS) are compared through their
similarity invariants, every pair of similar triangles votes for a rotation,
scale and shift within the allowed ranges, and the winning transform is
verified by how many stars it brings onto a reference star. It is then refined
with all matches in a shrinking radius.

:func:`fit_wcs` fits a TAN-SIP WCS by linear least squares about a tangent
point at the CRPIX sky position (re-centred iteratively) with sigma clipping,
and fits the inverse SIP polynomials so that ``world_to_pixel`` works in any
FITS reader, not only in astropy's iterative solver.

Pixel coordinates are 0-based (numpy/astropy ``origin=0``) throughout; only
``crpix`` follows the 1-based FITS convention.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np
from astropy.wcs import WCS, Sip
from scipy.spatial import cKDTree
from scipy.special import pdtrc

from workflow_lib.refcat import angular_separation_deg

log = logging.getLogger(__name__)

ARCSEC = 1.0 / 3600.0
MAS_PER_DEG = 3.6e6


class AstrometryError(ValueError):
    """Astrometric calibration failed; the message says why (for the CCD's QA record)."""


# ----------------------------------------------------------- sky geometry
def tan_project(
    ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic projection about (ra0, dec0): standard coordinates (xi east, eta north), deg."""
    a, d = np.deg2rad(np.asarray(ra, float)), np.deg2rad(np.asarray(dec, float))
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    da = a - a0
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(da)
    xi = np.cos(d) * np.sin(da) / cosc
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(da)) / cosc
    return np.rad2deg(xi), np.rad2deg(eta)


def tan_deproject(
    xi: np.ndarray, eta: np.ndarray, ra0: float, dec0: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`tan_project` (inputs and outputs in deg)."""
    x, y = np.deg2rad(np.asarray(xi, float)), np.deg2rad(np.asarray(eta, float))
    d0 = np.deg2rad(dec0)
    denom = np.cos(d0) - y * np.sin(d0)
    ra = ra0 + np.rad2deg(np.arctan2(x, denom))
    dec = np.rad2deg(np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, denom)))
    return np.mod(ra, 360.0), dec


def local_pixel_scale_arcsec(wcs: WCS, x: float, y: float) -> float:
    """Pixel scale (arcsec, sqrt of the Jacobian area) of ``wcs`` at 0-based pixel (x, y).

    Derived from the WCS itself so that no instrument's pixel scale is assumed.
    """
    px = np.array([x, x + 1.0, x])
    py = np.array([y, y, y + 1.0])
    ra, dec = wcs.all_pix2world(px, py, 0)
    xi, eta = tan_project(ra, dec, float(ra[0]), float(dec[0]))
    jac = np.array([[xi[1] - xi[0], xi[2] - xi[0]], [eta[1] - eta[0], eta[2] - eta[0]]])
    return float(np.sqrt(abs(np.linalg.det(jac))) * 3600.0)


def _world_to_pixel(wcs: WCS, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(ra) == 0:
        return np.zeros(0), np.zeros(0)
    if wcs.sip is None:
        x, y = wcs.wcs_world2pix(ra, dec, 0)
    else:
        x, y = wcs.all_world2pix(ra, dec, 0, quiet=True)
    return np.asarray(x, float), np.asarray(y, float)


# ------------------------------------------------------- pattern matching


def _poisson_isf(q: float, mean: float) -> int:
    """Smallest k with P(N > k) <= q for N ~ Poisson(mean): ``scipy.stats.poisson.isf``
    from ``scipy.special`` (importing scipy.stats costs ~0.5 s of a single-CCD job)."""
    ks = np.arange(0, int(mean + 20.0 * np.sqrt(mean) + 50))
    return int(ks[np.argmax(pdtrc(ks, mean) <= q)])


@dataclass(frozen=True)
class MatchResult:
    """Source <-> reference matches of one detector.

    ``source_index``/``reference_index`` index the arrays given to :func:`match_sources`.
    ``affine`` (2 x 3) maps a source pixel ``(x, y, 1)`` to the pixel of its
    reference star under the approximate WCS; ``offset_arcsec``,
    ``rotation_deg`` and ``scale`` describe the pattern solution at the centre
    of the sources (how wrong the header WCS was). ``residual_arcsec`` is the
    rms separation of the final matches under the refined mapping.
    """

    source_index: np.ndarray
    reference_index: np.ndarray
    separation_arcsec: np.ndarray
    affine: np.ndarray
    residual_arcsec: float
    offset_arcsec: float
    rotation_deg: float
    scale: float
    n_pattern_votes: int

    @property
    def n_matches(self) -> int:
        return len(self.source_index)


def _combinations(n: int) -> np.ndarray:
    return np.array(list(combinations(range(n), 3)), dtype=np.int64).reshape(-1, 3)


def _nn_triangles(xy: np.ndarray, k: int) -> np.ndarray:
    """Triangles of every point with pairs of its ``k`` nearest neighbours."""
    n = len(xy)
    k = min(k, n - 1)
    if k < 2:
        return np.zeros((0, 3), np.int64)
    _, nn = cKDTree(xy).query(xy, k=k + 1)
    pairs = np.array(list(combinations(range(1, k + 1), 2)))
    tri = np.concatenate(
        [np.column_stack([nn[:, 0], nn[:, a], nn[:, b]]) for a, b in pairs], axis=0
    )
    tri = np.unique(np.sort(tri, axis=1), axis=0)
    return tri


def _triangle_features(
    xy: np.ndarray, tri: np.ndarray, *, min_side: float, min_ratio: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarity invariants of triangles, with vertices in a canonical order.

    Vertices are ordered by the length of the opposite side (shortest first);
    features are (s0/s2, s1/s2, 10 * orientation), the last keeping mirrored
    triangles apart because a parity flip is not a valid solution.
    """
    p = xy[tri]  # (m, 3, 2)
    opp = np.stack(
        [
            np.hypot(*(p[:, 1] - p[:, 2]).T),
            np.hypot(*(p[:, 0] - p[:, 2]).T),
            np.hypot(*(p[:, 0] - p[:, 1]).T),
        ],
        axis=1,
    )
    order = np.argsort(opp, axis=1)
    sides = np.take_along_axis(opp, order, axis=1)
    verts = np.take_along_axis(tri, order, axis=1)
    q = xy[verts]
    cross = (q[:, 1, 0] - q[:, 0, 0]) * (q[:, 2, 1] - q[:, 0, 1]) - (q[:, 1, 1] - q[:, 0, 1]) * (
        q[:, 2, 0] - q[:, 0, 0]
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        f0 = sides[:, 0] / sides[:, 2]
        f1 = sides[:, 1] / sides[:, 2]
    keep = (sides[:, 2] >= min_side) & (f0 >= min_ratio) & np.isfinite(f0)
    feats = np.column_stack([f0, f1, 10.0 * np.sign(cross)])
    return feats[keep], verts[keep], sides[keep, 2]


@dataclass(frozen=True)
class _Similarity:
    a: complex  # scale * exp(i rotation)
    t: complex  # shift at the centre
    c: complex  # centre of the sources

    def apply(self, z: np.ndarray) -> np.ndarray:
        return self.c + self.a * (z - self.c) + self.t

    def affine(self) -> np.ndarray:
        a, t, c = self.a, self.t, self.c
        off = c - a * c + t
        return np.array([[a.real, -a.imag, off.real], [a.imag, a.real, off.imag]])


def _vote(
    zs: np.ndarray,
    zr: np.ndarray,
    tri_s: np.ndarray,
    tri_r: np.ndarray,
    feat_s: np.ndarray,
    feat_r: np.ndarray,
    centre: complex,
    *,
    tol_feature: float,
    max_shift_px: float,
    max_rotation_rad: float,
    max_scale_change: float,
    tol_shift_px: float,
    max_candidates: int = 30,
) -> list[tuple[_Similarity, int]]:
    """Candidate similarity transforms from pairs of similar triangles, best first."""
    if len(feat_s) == 0 or len(feat_r) == 0:
        return []
    pairs = cKDTree(feat_s).sparse_distance_matrix(
        cKDTree(feat_r), tol_feature, output_type="ndarray"
    )
    if len(pairs) == 0:
        return []
    a_s = zs[tri_s[pairs["i"]]]  # (m, 3) complex
    a_r = zr[tri_r[pairs["j"]]]
    ms, mr = a_s.mean(axis=1), a_r.mean(axis=1)
    cs, cr = a_s - ms[:, None], a_r - mr[:, None]
    a = (np.conj(cs) * cr).sum(axis=1) / (np.abs(cs) ** 2).sum(axis=1)
    fit_err = np.abs(cr - a[:, None] * cs).max(axis=1) / np.abs(cr).max(axis=1)
    t = mr - centre - a * (ms - centre)
    rot = np.angle(a)
    scale = np.abs(a)
    ok = (
        (np.abs(rot) <= max_rotation_rad * 1.05 + 1e-3)
        & (np.abs(scale - 1.0) <= max_scale_change * 1.05 + 1e-3)
        & (np.abs(t) <= max_shift_px * 1.05 + tol_shift_px)
        & (fit_err < 3.0 * tol_feature)
    )
    if not ok.any():
        return []
    a, t = a[ok], t[ok]
    tol_rot = max(2.0 * tol_shift_px / max(np.abs(cs[ok]).max(), 1.0), 1e-3)
    params = np.column_stack(
        [
            t.real / tol_shift_px,
            t.imag / tol_shift_px,
            np.angle(a) / tol_rot,
            np.log(np.abs(a)) / tol_rot,
        ]
    )
    tree = cKDTree(params)
    counts = tree.query_ball_point(params, r=1.0, return_length=True)
    order = np.argsort(-counts, kind="stable")
    taken = np.zeros(len(params), bool)
    out: list[tuple[_Similarity, int]] = []
    for i in order:
        if taken[i] or len(out) >= max_candidates:
            continue
        members = np.array(tree.query_ball_point(params[i], r=1.0), dtype=np.int64)
        taken[members] = True
        sim = _Similarity(
            a=complex(np.median(a[members].real), np.median(a[members].imag)),
            t=complex(np.median(t[members].real), np.median(t[members].imag)),
            c=centre,
        )
        out.append((sim, len(members)))
    return out


def _match_nearest(
    pred: np.ndarray, ref_tree: cKDTree, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one nearest matches of predicted positions (n, 2) to the tree within ``radius``."""
    if len(pred) == 0 or ref_tree.n == 0:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0)
    dist, j = ref_tree.query(pred, k=1, distance_upper_bound=radius)
    i = np.flatnonzero(np.isfinite(dist))
    j, dist = j[i], dist[i]
    order = np.lexsort((dist, j))  # per reference, the closest source first
    i, j, dist = i[order], j[order], dist[order]
    first = np.ones(len(j), bool)
    first[1:] = j[1:] != j[:-1]
    return i[first], j[first], dist[first]


def _poly_design(x: np.ndarray, y: np.ndarray, order: int, min_order: int = 0) -> np.ndarray:
    cols = [
        x**p * y**q for n in range(min_order, order + 1) for p in range(n, -1, -1) for q in [n - p]
    ]
    return np.column_stack(cols)


@dataclass(frozen=True)
class _PolyMap:
    """Polynomial source pixel -> reference pixel, in normalised coordinates."""

    coef_x: np.ndarray
    coef_y: np.ndarray
    order: int
    centre: np.ndarray
    norm: float

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        u = (xy - self.centre) / self.norm
        m = _poly_design(u[:, 0], u[:, 1], self.order)
        return np.column_stack([m @ self.coef_x, m @ self.coef_y])


def _fit_poly(
    src: np.ndarray, ref: np.ndarray, order: int, centre: np.ndarray, norm: float
) -> _PolyMap:
    u = (src - centre) / norm
    m = _poly_design(u[:, 0], u[:, 1], order)
    cx, *_ = np.linalg.lstsq(m, ref[:, 0], rcond=None)
    cy, *_ = np.linalg.lstsq(m, ref[:, 1], rcond=None)
    return _PolyMap(cx, cy, order, centre, norm)


def _order_for(n: int) -> int:
    if n >= 40:
        return 3
    if n >= 20:
        return 2
    return 1


def match_sources(
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    ref_ra: np.ndarray,
    ref_dec: np.ndarray,
    ref_mag: np.ndarray,
    approx_wcs: WCS,
    *,
    max_offset_arcsec: float = 60.0,
    max_rotation_deg: float = 3.0,
    max_scale_change: float = 0.05,
    match_radius_arcsec: float = 1.0,
    n_brightest: int = 40,
    min_matches: int = 5,
) -> MatchResult:
    """Match detections (0-based pixels) to reference stars despite a poor header WCS.

    Offsets up to ``max_offset_arcsec`` at the centre of the sources, rotations
    up to ``max_rotation_deg`` and scale errors up to ``max_scale_change`` are
    searched; a parity flip is not. ``flux`` (any unit) and ``ref_mag`` only
    rank objects by brightness: the pattern uses the ``n_brightest`` of each
    (all triangles), then, if that fails, the brightest ~120 of each with
    triangles of nearest neighbours. The solution must bring at least
    ``min_matches`` sources onto reference stars, well above the chance rate.
    Final matches are one-to-one within ``match_radius_arcsec`` after a
    polynomial refinement.

    Raises AstrometryError when there are too few usable sources, too few
    reference stars on the footprint (a catalog that does not cover the
    detector), or no consistent pattern.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    ref_ra = np.asarray(ref_ra, dtype=np.float64)
    ref_dec = np.asarray(ref_dec, dtype=np.float64)
    ref_mag = np.asarray(ref_mag, dtype=np.float64)
    if not (len(x) == len(y) == len(flux)):
        raise ValueError("x, y and flux must have the same length")
    if not (len(ref_ra) == len(ref_dec) == len(ref_mag)):
        raise ValueError("ref_ra, ref_dec and ref_mag must have the same length")

    good_src = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if len(good_src) < max(3, min_matches):
        raise AstrometryError(
            f"too few sources for astrometric matching ({len(good_src)}, "
            f"need {max(3, min_matches)})"
        )
    sxy = np.column_stack([x[good_src], y[good_src]])
    lo, hi = sxy.min(axis=0), sxy.max(axis=0)
    centre_xy = 0.5 * (lo + hi)
    half_diag = 0.5 * float(np.hypot(*(hi - lo)))
    ra_c, dec_c = approx_wcs.all_pix2world(centre_xy[0], centre_xy[1], 0)
    ra_c, dec_c = float(ra_c), float(dec_c)
    scale_arcsec = local_pixel_scale_arcsec(approx_wcs, *centre_xy)
    max_shift_px = max_offset_arcsec / scale_arcsec
    max_rot = np.deg2rad(max_rotation_deg)
    margin = max_shift_px + (max_rot + max_scale_change) * half_diag + 5.0

    # Reference stars that can land on the detector, projected with the header WCS.
    ok_ref = np.isfinite(ref_ra) & np.isfinite(ref_dec)
    radius_deg = (half_diag + margin) * scale_arcsec * 1.5 * ARCSEC
    near = np.zeros(len(ref_ra), bool)
    near[ok_ref] = (
        angular_separation_deg(ref_ra[ok_ref], ref_dec[ok_ref], ra_c, dec_c) <= radius_deg
    )
    cand = np.flatnonzero(near)
    rx, ry = _world_to_pixel(approx_wcs, ref_ra[cand], ref_dec[cand])
    inside = (
        np.isfinite(rx) & np.isfinite(ry)
        & (rx > lo[0] - margin) & (rx < hi[0] + margin)
        & (ry > lo[1] - margin) & (ry < hi[1] + margin)
    )  # fmt: skip
    ref_idx = cand[inside]
    rxy = np.column_stack([rx[inside], ry[inside]])
    if len(ref_idx) < max(3, min_matches):
        raise AstrometryError(
            f"too few reference stars on the detector footprint ({len(ref_idx)} within "
            f"{max_offset_arcsec:.0f} arcsec of it, need {max(3, min_matches)}): the reference "
            "catalog does not cover this CCD, or the header WCS is far off"
        )
    ref_tree = cKDTree(rxy)
    zs_all = sxy[:, 0] + 1j * sxy[:, 1]
    zr_all = rxy[:, 0] + 1j * rxy[:, 1]
    centre = complex(centre_xy[0], centre_xy[1])

    # Brightness order; sources without a usable flux come last.
    f = flux[good_src]
    s_order = np.argsort(np.where(np.isfinite(f) & (f > 0), -f, np.inf), kind="stable")
    m = ref_mag[ref_idx]
    r_order = np.argsort(np.where(np.isfinite(m), m, np.inf), kind="stable")

    field = max(float(np.max(hi - lo)), 1.0)
    tol_shift = max(2.0, 0.002 * field)
    verify_radius = max(1.0 / scale_arcsec, 3.0, 0.0015 * 2 * half_diag)
    area = float(np.prod(hi - lo + 2 * margin))
    n_verify = min(len(good_src), 4 * len(ref_idx) + 50)
    verify_src = s_order[:n_verify]
    expected = n_verify * len(ref_idx) / area * np.pi * verify_radius**2
    # Chance matches are Poisson, plus the three vertices of the triangle that voted;
    # ask for a count that all the candidates tried together reach by chance < 1e-3.
    need = max(min_matches, 3 + _poisson_isf(1e-3 / 30, expected) + 1)

    best: tuple[_Similarity, int, int] | None = None
    strategies = [("all", min(n_brightest, 60)), ("nn", 120)]
    for kind, n in strategies:
        ss, rr = s_order[: min(n, len(s_order))], r_order[: min(n, len(r_order))]
        if len(ss) < 3 or len(rr) < 3:
            continue
        if kind == "all":
            tri_s, tri_r = _combinations(len(ss)), _combinations(len(rr))
        else:
            tri_s, tri_r = _nn_triangles(sxy[ss], 7), _nn_triangles(rxy[rr], 7)
        min_side = 0.02 * field
        fs, vs, _ = _triangle_features(sxy[ss], tri_s, min_side=min_side, min_ratio=0.1)
        fr, vr, _ = _triangle_features(rxy[rr], tri_r, min_side=min_side, min_ratio=0.1)
        cands = _vote(
            zs_all[ss], zr_all[rr], vs, vr, fs, fr, centre,
            tol_feature=0.01, max_shift_px=max_shift_px, max_rotation_rad=max_rot,
            max_scale_change=max_scale_change, tol_shift_px=tol_shift,
        )  # fmt: skip
        for sim, votes in cands:
            pred = sim.apply(zs_all[verify_src])
            i, _, _ = _match_nearest(
                np.column_stack([pred.real, pred.imag]), ref_tree, verify_radius
            )
            if best is None or len(i) > best[2]:
                best = (sim, votes, len(i))
        log.debug(
            "pattern (%s, %d): %d candidate(s), best %s match(es), need %d",
            kind, n, len(cands), best[2] if best else 0, need,
        )  # fmt: skip
        if best is not None and best[2] >= need:
            break
    if best is None or best[2] < need:
        got = 0 if best is None else best[2]
        raise AstrometryError(
            f"no consistent pattern between {len(good_src)} sources and {len(ref_idx)} "
            f"reference stars (best candidate {got} matches, need {need}; searched offsets "
            f"<= {max_offset_arcsec:.0f} arcsec, rotations <= {max_rotation_deg:.1f} deg, "
            f"scale changes <= {max_scale_change:.0%})"
        )
    sim, votes, _ = best

    # Refinement: re-match everything in a shrinking radius with a growing model.
    final_radius = match_radius_arcsec / scale_arcsec
    model: _PolyMap | None = None
    pred = sim.apply(zs_all)
    pxy = np.column_stack([pred.real, pred.imag])
    radii = np.geomspace(max(verify_radius, final_radius), final_radius, 4)
    norm = max(half_diag, 1.0)
    for radius in radii:
        i, j, _ = _match_nearest(pxy, ref_tree, radius)
        if len(i) < 3:
            break
        order = _order_for(len(i))
        model = _fit_poly(sxy[i], rxy[j], order, centre_xy, norm)
        pxy = model(sxy)
    i, j, dist = _match_nearest(pxy, ref_tree, final_radius)
    if len(i) < min_matches:
        raise AstrometryError(
            f"pattern found but only {len(i)} source(s) within {match_radius_arcsec} arcsec of "
            f"a reference star after refinement (need {min_matches})"
        )
    affine_map = _fit_poly(sxy[i], rxy[j], 1, np.zeros(2), 1.0)
    # _poly_design order 1 columns: 1, x, y
    affine = np.array(
        [
            [affine_map.coef_x[1], affine_map.coef_x[2], affine_map.coef_x[0]],
            [affine_map.coef_y[1], affine_map.coef_y[2], affine_map.coef_y[0]],
        ]
    )
    sep = dist * scale_arcsec
    order_by_src = np.argsort(i)
    result = MatchResult(
        source_index=good_src[i[order_by_src]].astype(np.int64),
        reference_index=ref_idx[j[order_by_src]].astype(np.int64),
        separation_arcsec=sep[order_by_src],
        affine=affine,
        residual_arcsec=float(np.sqrt(np.mean(sep**2))),
        offset_arcsec=float(abs(sim.t) * scale_arcsec),
        rotation_deg=float(np.rad2deg(np.angle(sim.a))),
        scale=float(abs(sim.a)),
        n_pattern_votes=int(votes),
    )
    log.info(
        "matched %d of %d sources to %d reference stars: header WCS off by %.2f arcsec, "
        "%.3f deg, scale %.4f; match rms %.3f arcsec",
        result.n_matches, len(good_src), len(ref_idx), result.offset_arcsec,
        result.rotation_deg, result.scale, result.residual_arcsec,
    )  # fmt: skip
    return result


def match_by_position(
    x: np.ndarray,
    y: np.ndarray,
    ref_ra: np.ndarray,
    ref_dec: np.ndarray,
    wcs: WCS,
    *,
    radius_arcsec: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one nearest matches under an already good WCS: (source, reference, sep_arcsec).

    For re-matching after a WCS fit (when the pattern step is no longer needed).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ref_ra, ref_dec = np.asarray(ref_ra, float), np.asarray(ref_dec, float)
    ok_s = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    ok_r = np.flatnonzero(np.isfinite(ref_ra) & np.isfinite(ref_dec))
    e = np.zeros(0, np.int64)
    if len(ok_s) == 0 or len(ok_r) == 0:
        return e, e, np.zeros(0)
    ra, dec = wcs.all_pix2world(x[ok_s], y[ok_s], 0)
    ra0, dec0 = float(np.median(ra)), float(np.median(dec))
    sx, sy = tan_project(ra, dec, ra0, dec0)
    rx, ry = tan_project(ref_ra[ok_r], ref_dec[ok_r], ra0, dec0)
    front = np.isfinite(rx) & (np.hypot(rx, ry) < 30.0)
    tree = cKDTree(np.column_stack([rx[front], ry[front]]))
    i, j, dist = _match_nearest(np.column_stack([sx, sy]), tree, radius_arcsec * ARCSEC)
    order = np.argsort(i)
    return ok_s[i[order]], ok_r[np.flatnonzero(front)[j[order]]], dist[order] * 3600.0


# ---------------------------------------------------------------- WCS fit
@dataclass(frozen=True)
class WcsFitResult:
    """A fitted TAN-SIP WCS and its quality.

    ``residuals`` (n, 2) are (east, north) offsets in arcsec of the fitted
    position from the reference position for every input star (NaN where the
    input was not finite); ``rms_arcsec`` is the rms of their length over the
    ``used`` (unclipped) stars. ``inverse_max_err_mas`` is the largest pixel ->
    sky -> pixel error of the inverse SIP polynomials over the fitted area.
    """

    wcs: WCS
    rms_arcsec: float
    n_used: int
    used: np.ndarray
    residuals: np.ndarray
    sip_order: int
    inverse_max_err_mas: float


def _min_stars(order: int) -> int:
    """Stars needed for a SIP order: three per fitted coefficient of one axis."""
    return 3 * (order + 1) * (order + 2) // 2


def _fit_sip_inverse(
    wcs_cd: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    order: int,
    box: tuple[float, float, float, float],
    crpix: tuple[float, float],
    scale_arcsec: float,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit AP/BP on a grid over ``box`` (0-based x0, x1, y0, y1).

    Returns AP, BP and the largest round-trip error in mas.
    """
    gx, gy = np.meshgrid(np.linspace(box[0], box[1], 41), np.linspace(box[2], box[3], 41))
    u = gx.ravel() + 1.0 - crpix[0]
    v = gy.ravel() + 1.0 - crpix[1]
    f = _sip_eval(a, u, v)
    g = _sip_eval(b, u, v)
    uu, vv = u + f, v + g
    norm = max(float(np.abs(np.concatenate([uu, vv])).max()), 1.0)
    err_mas = np.inf
    ap = bp = np.zeros((1, 1))
    for inv_order in range(order + 1, order + 4):
        m = _poly_design(uu / norm, vv / norm, inv_order, min_order=1)
        cu, *_ = np.linalg.lstsq(m, u - uu, rcond=None)
        cv, *_ = np.linalg.lstsq(m, v - vv, rcond=None)
        err_px = np.hypot(m @ cu - (u - uu), m @ cv - (v - vv)).max()
        ap = _coef_matrix(cu, inv_order, norm, min_order=1)
        bp = _coef_matrix(cv, inv_order, norm, min_order=1)
        err_mas = float(err_px * scale_arcsec * 1000.0)
        if err_mas < 0.1:
            break
    return ap, bp, err_mas


def _coef_matrix(coef: np.ndarray, order: int, norm: float, *, min_order: int) -> np.ndarray:
    """Coefficients in _poly_design order (normalised) -> SIP matrix M[p, q] (pixels)."""
    out = np.zeros((order + 1, order + 1))
    k = 0
    for n in range(min_order, order + 1):
        for p in range(n, -1, -1):
            q = n - p
            out[p, q] = coef[k] / norm**n
            k += 1
    return out


def _sip_eval(mat: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(u)
    for p in range(mat.shape[0]):
        for q in range(mat.shape[1]):
            if mat[p, q] != 0.0:
                out = out + mat[p, q] * u**p * v**q
    return out


def fit_wcs(
    x: np.ndarray,
    y: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    *,
    crpix: tuple[float, float],
    weights: np.ndarray | None = None,
    sip_order: int = 3,
    clip_sigma: float = 3.0,
    max_iter: int = 5,
    image_shape: tuple[int, int] | None = None,
) -> WcsFitResult:
    """Fit a TAN-SIP WCS to matched (0-based pixel, sky) pairs.

    ``crpix`` is the 1-based FITS reference pixel (the detector centre of an
    ``nx`` x ``ny`` image is ``((nx + 1) / 2, (ny + 1) / 2)``); CRVAL becomes
    its fitted sky position. The projection plane is re-centred on CRVAL until
    the fit has no constant term, so the SIP polynomials (orders 2 ..
    ``sip_order``) describe distortion only. The order drops to 2, then to a
    plain TAN (order 1, CTYPE ``RA---TAN``), when there are fewer than 30 / 18
    usable stars, so that few stars never feed a wild polynomial. ``weights``
    are inverse variances (relative values suffice). Outliers beyond
    ``clip_sigma`` robust standard deviations are clipped, up to ``max_iter`` times.
    The inverse polynomials AP/BP are fitted over ``image_shape`` (ny, nx) when
    given, else over the stars' bounding box, so that any FITS reader can go
    from sky to pixel.

    Raises AstrometryError with fewer than 3 usable stars.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    n = len(x)
    if not (len(y) == len(ra) == len(dec) == n):
        raise ValueError("x, y, ra and dec must have the same length")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(ra) & np.isfinite(dec)
    finite &= np.isfinite(w) & (w > 0)
    if finite.sum() < 3:
        raise AstrometryError(f"too few stars to fit a WCS ({int(finite.sum())}, need 3)")
    w = np.where(finite, w, 0.0)
    w = w / np.median(w[finite])
    u = x + 1.0 - crpix[0]
    v = y + 1.0 - crpix[1]
    norm = max(float(np.abs(np.concatenate([u[finite], v[finite]])).max()), 1.0)
    un, vn = u / norm, v / norm

    # Initial tangent point: the mean direction of the stars.
    r, d = np.deg2rad(ra[finite]), np.deg2rad(dec[finite])
    vec = np.array([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)]).mean(axis=1)
    crval = (float(np.rad2deg(np.arctan2(vec[1], vec[0])) % 360.0),
             float(np.rad2deg(np.arcsin(vec[2] / np.linalg.norm(vec)))))  # fmt: skip

    used = finite.copy()
    order = max(int(sip_order), 1)
    cx = cy = np.zeros(1)
    resid = np.full((n, 2), np.nan)
    for iteration in range(max_iter + 1):
        while order > 1 and used.sum() < _min_stars(order):
            order -= 1
        m_all = _poly_design(un[finite], vn[finite], order)
        sw = np.sqrt(w[finite])
        for _ in range(10):  # re-centre CRVAL until the constant term vanishes
            xi, eta = tan_project(ra[finite], dec[finite], *crval)
            sel = used[finite]
            msw = m_all[sel] * sw[sel, None]
            cx, *_ = np.linalg.lstsq(msw, xi[sel] * sw[sel], rcond=None)
            cy, *_ = np.linalg.lstsq(msw, eta[sel] * sw[sel], rcond=None)
            if np.hypot(cx[0], cy[0]) * MAS_PER_DEG < 1e-4:
                break
            ra0, dec0 = tan_deproject(np.array([cx[0]]), np.array([cy[0]]), *crval)
            crval = (float(ra0[0]), float(dec0[0]))
        resid = np.full((n, 2), np.nan)
        resid[finite, 0] = (m_all @ cx - xi) * 3600.0
        resid[finite, 1] = (m_all @ cy - eta) * 3600.0
        rlen = np.hypot(resid[:, 0], resid[:, 1]) * np.sqrt(w)
        # For a 2-D Gaussian of per-axis sigma s, median(|r|) = 1.1774 s.
        sigma = max(float(np.median(rlen[used])) / 1.1774, 1e-5)
        new_used = finite & (rlen <= clip_sigma * sigma)
        if iteration == max_iter or new_used.sum() < 3 or np.array_equal(new_used, used):
            break
        used = new_used

    # Polynomial coefficients -> CD and SIP A/B (pixels, relative to CRPIX).
    cxm = _coef_matrix(cx, order, norm, min_order=0)
    cym = _coef_matrix(cy, order, norm, min_order=0)
    cd = np.array([[cxm[1, 0], cxm[0, 1]], [cym[1, 0], cym[0, 1]]])
    wcs = WCS(naxis=2)
    wcs.wcs.crpix = [float(crpix[0]), float(crpix[1])]
    wcs.wcs.crval = [crval[0], crval[1]]
    wcs.wcs.cd = cd
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.cunit = ["deg", "deg"]
    scale_arcsec = float(np.sqrt(abs(np.linalg.det(cd))) * 3600.0)
    inv_err = 0.0
    if order >= 2:
        cd_inv = np.linalg.inv(cd)
        a = np.zeros((order + 1, order + 1))
        b = np.zeros((order + 1, order + 1))
        for p in range(order + 1):
            for q in range(order + 1 - p):
                if p + q >= 2:
                    a[p, q], b[p, q] = cd_inv @ np.array([cxm[p, q], cym[p, q]])
        if image_shape is not None:
            box = (-0.5, image_shape[1] - 0.5, -0.5, image_shape[0] - 0.5)
        else:
            box = (float(x[finite].min()), float(x[finite].max()),
                   float(y[finite].min()), float(y[finite].max()))  # fmt: skip
        ap, bp, inv_err = _fit_sip_inverse(cd, a, b, order, box, crpix, scale_arcsec)
        wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        wcs.sip = Sip(a, b, ap, bp, wcs.wcs.crpix)
        if inv_err > 1.0:
            log.warning("inverse SIP round trip error %.2f mas exceeds 1 mas", inv_err)
    else:
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.set()
    # Residuals in (east, north) arcsec through the finished WCS (what users will see).
    fra, fdec = wcs.all_pix2world(x[finite], y[finite], 0)
    exi, eeta = tan_project(fra, fdec, *crval)
    rxi, reta = tan_project(ra[finite], dec[finite], *crval)
    resid = np.full((n, 2), np.nan)
    resid[finite, 0] = (exi - rxi) * 3600.0
    resid[finite, 1] = (eeta - reta) * 3600.0
    rms = float(np.sqrt(np.mean(np.sum(resid[used] ** 2, axis=1))))
    log.info(
        "WCS fit: %d of %d stars used, SIP order %d, rms %.1f mas, inverse error %.3f mas",
        int(used.sum()), int(finite.sum()), order, rms * 1000.0, inv_err,
    )  # fmt: skip
    return WcsFitResult(
        wcs=wcs, rms_arcsec=rms, n_used=int(used.sum()), used=used, residuals=resid,
        sip_order=order, inverse_max_err_mas=inv_err,
    )  # fmt: skip


def solve_astrometry(
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    ref_ra: np.ndarray,
    ref_dec: np.ndarray,
    ref_mag: np.ndarray,
    approx_wcs: WCS,
    *,
    image_shape: tuple[int, int],
    sip_order: int = 3,
    max_offset_arcsec: float = 60.0,
    max_rotation_deg: float = 3.0,
    max_scale_change: float = 0.05,
    match_radius_arcsec: float = 1.0,
    weights: np.ndarray | None = None,
    fit_mask: np.ndarray | None = None,
) -> tuple[MatchResult, WcsFitResult]:
    """Pattern-match, fit, re-match under the fitted WCS and fit again.

    ``fit_mask`` (per source) says which sources may enter the WCS fits: the
    pattern match uses every source (the brightest reference stars are often
    saturated in the image, and their detections still match), while only
    sources with reliable centroids constrain the WCS. The returned match then
    holds the fitted pairs only, aligned with the fit's ``used``.

    The second match uses the fitted WCS with a tighter radius (three times
    the first fit's rms, at least 0.2 arcsec and at most ``match_radius_arcsec``),
    which recovers stars the first, affine-plus-polynomial match missed near
    the edges. ``weights`` (per source, inverse variance of the centroid) are
    passed to the fit. CRPIX is the detector centre of ``image_shape`` (ny, nx).
    """
    match = match_sources(
        x, y, flux, ref_ra, ref_dec, ref_mag, approx_wcs,
        max_offset_arcsec=max_offset_arcsec, max_rotation_deg=max_rotation_deg,
        max_scale_change=max_scale_change, match_radius_arcsec=match_radius_arcsec,
    )  # fmt: skip
    crpix = ((image_shape[1] + 1) / 2.0, (image_shape[0] + 1) / 2.0)
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    wts = None if weights is None else np.asarray(weights, float)
    allowed = np.ones(len(x), dtype=bool) if fit_mask is None else np.asarray(fit_mask, bool)

    def fittable(si: np.ndarray, ri: np.ndarray, sep: np.ndarray):  # type: ignore[no-untyped-def]
        keep = allowed[si]
        return si[keep], ri[keep], sep[keep]

    def fit(si: np.ndarray, ri: np.ndarray) -> WcsFitResult:
        return fit_wcs(
            x[si], y[si], np.asarray(ref_ra, float)[ri], np.asarray(ref_dec, float)[ri],
            crpix=crpix, weights=None if wts is None else wts[si], sip_order=sip_order,
            image_shape=image_shape,
        )  # fmt: skip

    si0, ri0, sep0 = fittable(
        np.asarray(match.source_index), np.asarray(match.reference_index),
        np.asarray(match.separation_arcsec),
    )  # fmt: skip
    if len(si0) < 3:
        raise AstrometryError(f"only {len(si0)} matched sources have reliable centroids")
    first = fit(si0, ri0)
    radius = float(np.clip(3.0 * first.rms_arcsec, 0.2, match_radius_arcsec))
    si, ri, sep = fittable(
        *match_by_position(x, y, ref_ra, ref_dec, first.wcs, radius_arcsec=radius)
    )
    if len(si) < 3:
        first_match = replace(match, source_index=si0, reference_index=ri0, separation_arcsec=sep0)
        return first_match, first
    second = fit(si, ri)
    rematch = MatchResult(
        source_index=si, reference_index=ri, separation_arcsec=sep, affine=match.affine,
        residual_arcsec=float(np.sqrt(np.mean(sep**2))), offset_arcsec=match.offset_arcsec,
        rotation_deg=match.rotation_deg, scale=match.scale, n_pattern_votes=match.n_pattern_votes,
    )  # fmt: skip
    return rematch, second
