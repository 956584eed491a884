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

:func:`fit_wcs` fits a TAN(-SIP) WCS by weighted least squares about a tangent
point at the CRPIX sky position (re-centred iteratively), and fits the inverse
SIP polynomials so that ``world_to_pixel`` works in any FITS reader, not only
in astropy's iterative solver. It holds with a handful of matches as with
thousands: the model (a similarity below 5 stars, a linear TAN, SIP orders up
to the configured one) is chosen by closed-form leave-one-out cross-validation
plus the noise of the mapping over the whole CCD, and SIP orders are only
considered where the stars are numerous and spread enough to pin the
polynomial down over the CCD (their mean leverage on a grid over it); outliers
go by iterative clipping whose scale never drops below the centroid errors and
which, among few stars, judges each star against the fit to the others and
removes one at a time.

Pixel coordinates are 0-based (numpy/astropy ``origin=0``) throughout; only
``crpix`` follows the 1-based FITS convention.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from itertools import combinations
from typing import cast

import numpy as np
from astropy.wcs import WCS, Sip
from scipy.linalg import solve_triangular
from scipy.optimize import brentq
from scipy.spatial import ConvexHull, QhullError, cKDTree
from scipy.special import pdtrc

from workflow_lib.single_frame.refcat import angular_separation_deg

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


def _refit_similarity(
    sim: _Similarity,
    z: np.ndarray,
    zr: np.ndarray,
    ref_tree: cKDTree,
    radius: float,
    tight: float,
) -> tuple[_Similarity, int]:
    """Least-squares similarity to the matches of ``sim`` within ``radius``, then to
    those within ``tight`` of it; returns it and how many sources it brings within
    ``tight`` of a reference star."""
    r = radius
    n = 0
    for _ in range(3):
        pred = sim.apply(z)
        i, j, _ = _match_nearest(np.column_stack([pred.real, pred.imag]), ref_tree, r)
        n = len(i)
        if n < 3:
            return sim, n
        a = np.column_stack([z[i] - sim.c, np.ones(n)])
        (alpha, shift), *_ = np.linalg.lstsq(a, zr[j] - sim.c, rcond=None)
        sim = _Similarity(a=complex(alpha), t=complex(shift), c=sim.c)
        r = tight
    pred = sim.apply(z)
    i, _, _ = _match_nearest(np.column_stack([pred.real, pred.imag]), ref_tree, tight)
    return sim, len(i)


# Photometric confirmation of a pattern match: the zero points m_ref + 2.5 log10(flux)
# of true pairs agree within this many robust sigma of their median (clipped to the
# window below, mag); a chance pair lands there with the probability measured over all
# the pairs.
_PHOT_NSIG = 3.0
_PHOT_WINDOW = (0.2, 0.5)


def _photometric_consistency(
    zp: np.ndarray, src_mag: np.ndarray, ref_mag: np.ndarray
) -> tuple[int, float]:
    """(pairs within the window of the median zero point, chance probability of a pair).

    ``zp`` of the candidate's pairs (NaN where a flux is unusable); ``src_mag``
    (-2.5 log10 flux, NaN if unusable) and ``ref_mag`` of all the sources and
    reference stars a chance pair could come from.
    """
    good = zp[np.isfinite(zp)]
    if len(good) < 3:
        return 0, 1.0
    med = float(np.median(good))
    mad = 1.4826 * float(np.median(np.abs(good - med)))
    half = float(np.clip(_PHOT_NSIG * mad, *_PHOT_WINDOW))
    n_ok = int(np.sum(np.abs(good - med) <= half))
    s = src_mag[np.isfinite(src_mag)]
    m = np.sort(ref_mag[np.isfinite(ref_mag)])
    total = len(src_mag) * len(ref_mag)
    if total == 0:
        return n_ok, 1.0
    # zp = m - s within med +- half  <=>  m in [med + s - half, med + s + half]
    hits = np.searchsorted(m, med + s + half, "right") - np.searchsorted(m, med + s - half)
    return n_ok, float(min(1.0, hits.sum() / total))


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
    searched; a parity flip is not (the parity is the header's: a mirrored
    detector needs a header CD matrix of positive determinant). ``flux`` (any
    unit) and ``ref_mag`` only rank objects by brightness: the pattern uses the
    ``n_brightest`` of each (all triangles), then, if that fails, the brightest
    ~120 of each with triangles of nearest neighbours. Each candidate transform
    is refitted to the sources it brings near reference stars and must then
    bring at least ``min_matches`` of them within a tight radius, well above
    the chance rate: 5-6 detected reference stars on a CCD full of galaxies
    suffice; with 4 or fewer no match is statistically safe and it fails. A
    candidate short of that count is still accepted when its pairs agree in
    photometry (``ref_mag + 2.5 log10 flux`` within ~0.2-0.5 mag of their
    median, :func:`_photometric_consistency`): chance pairs rarely do, which
    lowers the count needed at the same false-match probability.
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
        np.isfinite(rx)
        & np.isfinite(ry)
        & (rx > lo[0] - margin)
        & (rx < hi[0] + margin)
        & (ry > lo[1] - margin)
        & (ry < hi[1] + margin)
    )
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
    # A candidate is refitted to the sources it brings within verify_radius and judged
    # by those within tight_radius of the refitted transform: chance matches are
    # Poisson, plus the three vertices of the triangle that voted; ask for a count that
    # all the candidates tried together reach by chance < 1e-3.
    tight_radius = max(verify_radius / 3.0, 1.5, 0.3 / scale_arcsec)
    expected = n_verify * len(ref_idx) / area * np.pi * tight_radius**2
    need = max(min_matches, 3 + _poisson_isf(1e-3 / 30, expected) + 1)
    # For the photometric test: instrumental magnitudes of the verification sources.
    fv = flux[good_src[verify_src]]
    with np.errstate(divide="ignore", invalid="ignore"):
        src_mag_v = np.where(np.isfinite(fv) & (fv > 0), -2.5 * np.log10(fv), np.nan)
    m_tree = ref_mag[ref_idx]

    def photometric_need(sim: _Similarity) -> tuple[int, int]:
        """(matches that count, how many are needed) under the photometric test.

        The three vertices of the voting triangle match whatever their photometry;
        the others, by chance, only with the probability ``p`` of a chance pair
        agreeing in zero point. One pair off in photometry (a saturated or blended
        star) may be a vertex; with more, the candidate fails the test.
        """
        pred = sim.apply(zs_all[verify_src])
        i, j, _ = _match_nearest(np.column_stack([pred.real, pred.imag]), ref_tree, tight_radius)
        zp = m_tree[j] - src_mag_v[i]
        n_ok, p = _photometric_consistency(zp, src_mag_v, m_tree)
        need_p = max(min_matches, 3 + _poisson_isf(0.5e-3 / 30, expected * p) + 1)
        log.debug(
            "photometric test: zero points %s, %d consistent, chance %.3f per pair, need %d",
            np.round(zp, 2),
            n_ok,
            p,
            need_p,
        )
        # Half the false-match budget of the count-only test (1e-3 over ~30 candidates).
        return (len(zp) if n_ok >= max(4, len(zp) - 1) else 0), need_p

    best: tuple[_Similarity, int, int] | None = None
    phot: tuple[_Similarity, int, int, int] | None = None  # sim, votes, n_ok, need
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
            zs_all[ss],
            zr_all[rr],
            vs,
            vr,
            fs,
            fr,
            centre,
            tol_feature=0.01,
            max_shift_px=max_shift_px,
            max_rotation_rad=max_rot,
            max_scale_change=max_scale_change,
            tol_shift_px=tol_shift,
        )
        for sim, votes in cands:
            pred = sim.apply(zs_all[verify_src])
            i, _, _ = _match_nearest(
                np.column_stack([pred.real, pred.imag]), ref_tree, verify_radius
            )
            if len(i) < 3 or (best is not None and len(i) <= best[2]):
                continue
            sim, n_tight = _refit_similarity(
                sim, zs_all[verify_src], zr_all, ref_tree, verify_radius, tight_radius
            )
            if best is None or n_tight > best[2]:
                best = (sim, votes, n_tight)
            if n_tight < need and n_tight >= min_matches:
                n_ok, need_p = photometric_need(sim)
                if n_ok >= need_p and (phot is None or n_ok - need_p > phot[2] - phot[3]):
                    phot = (sim, votes, n_ok, need_p)
        log.debug(
            "pattern (%s, %d): %d candidate(s), best %s match(es), need %d",
            kind,
            n,
            len(cands),
            best[2] if best else 0,
            need,
        )
        if best is not None and best[2] >= need:
            break
    if (best is None or best[2] < need) and phot is not None:
        log.debug(
            "pattern: %d photometrically consistent match(es) accepted (need %d)",
            phot[2],
            phot[3],
        )
        best = (phot[0], phot[1], phot[2])
        need = phot[3]
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
    g = np.linspace(0.0, 1.0, _COVERAGE_GRID)
    gx, gy = np.meshgrid(lo[0] + g * (hi[0] - lo[0]), lo[1] + g * (hi[1] - lo[1]))
    gu, gv = (gx.ravel() - centre_xy[0]) / norm, (gy.ravel() - centre_xy[1]) / norm
    for radius in radii:
        i, j, _ = _match_nearest(pxy, ref_tree, radius)
        if len(i) < 3:
            break
        un = (sxy[i] - centre_xy) / norm
        order = _order_for(un[:, 0], un[:, 1], 3, gu, gv)
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
        result.n_matches,
        len(good_src),
        len(ref_idx),
        result.offset_arcsec,
        result.rotation_deg,
        result.scale,
        result.residual_arcsec,
    )
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
# The models of the pixel -> tangent-plane mapping, by complexity ("order"):
# 0 = similarity (shift, rotation, one scale; the parity given by the header),
# 1 = linear (TAN with a full CD matrix), k >= 2 = TAN-SIP of order k.
_COVERAGE_GRID = 13  # points per side of the grid over the CCD the coverage is measured on
# SIP orders >= 2 only where the stars pin the polynomial down: the mean leverage over the
# CCD (variance of the mapping in units of one star's) at most 2 for the default model and
# the pattern refinement, at most 10 for a candidate (its score then weighs the noise).
_CLEAN_MEAN_LEVERAGE = 2.0
_MAX_MEAN_LEVERAGE = 10.0
_SMALL_N = 30  # below this many stars, clip one star at a time
_LN4 = float(np.log(4.0))  # median of chi^2 with 2 degrees of freedom
_VAR_FLOOR = 1e-12  # arcsec^2: noise-free input still gets finite weights
_MODEL_NAMES = {-1: "radial", 0: "similarity", 1: "linear"}


def _model_name(order: int) -> str:
    return _MODEL_NAMES.get(order, f"sip{order}")


@dataclass(frozen=True)
class WcsFitResult:
    """A fitted TAN-SIP WCS and its quality.

    ``residuals`` (n, 2) are (east, north) offsets in arcsec of the fitted
    position from the reference position for every input star (NaN where the
    input was not finite); ``rms_arcsec`` is the rms of their length over the
    ``used`` (unclipped) stars. ``inverse_max_err_mas`` is the largest pixel ->
    sky -> pixel error of the inverse SIP polynomials over the fitted area.

    ``sip_order`` is the order chosen by cross-validation (1 for a plain TAN,
    ``model`` "similarity" or "linear"); ``max_order`` the highest order the
    number and spread of the used stars allowed (at most the requested one,
    0 when only a similarity could be fitted). ``coverage`` is the fraction
    of the CCD (or of the stars' bounding box) inside the convex hull of the
    used stars; ``scatter_arcsec`` the per-axis scatter fitted beyond the
    quoted errors (with no weights given: the whole per-axis scatter).
    """

    wcs: WCS
    rms_arcsec: float
    n_used: int
    used: np.ndarray
    residuals: np.ndarray
    sip_order: int
    inverse_max_err_mas: float
    max_order: int = -1
    model: str = ""
    coverage: float = float("nan")
    scatter_arcsec: float = 0.0


def _n_coef(order: int) -> int:
    """Complex coefficients of a model (the similarity: shift and scale-rotation)."""
    return 2 if order <= 0 else (order + 1) * (order + 2) // 2


def _min_stars(order: int) -> int:
    """Fewest stars with which a model is considered at all: 3 for the similarity, 5
    for a linear TAN, twice the coefficients per axis for SIP orders (12 quadratic, 20
    cubic). Whether they pin the polynomial down over the CCD is a separate test
    (:func:`_mean_leverage`)."""
    if order <= 0:
        return 3
    return 5 if order == 1 else 2 * _n_coef(order)


def _model_design(un: np.ndarray, vn: np.ndarray, order: int, parity: int) -> np.ndarray:
    """Design matrix of ``xi + i eta`` in normalised pixel offsets (complex for order 0).

    The similarity ``w = alpha z + gamma`` (parity +1, det CD > 0) or
    ``alpha conj(z) + gamma`` (parity -1, the usual east-left sky image); a real
    polynomial basis otherwise (one fit serves both axes).
    """
    if order <= 0:
        z = un + 1j * vn
        return np.column_stack([np.ones(len(z), complex), z if parity > 0 else np.conj(z)])
    return _poly_design(un, vn, order)


def _qr(d: np.ndarray) -> np.ndarray | None:
    """R of a thin QR, None when the design is (nearly) singular."""
    # cast: mode "r" returns R alone; numpy's stub says a QRResult for every mode.
    r = cast(np.ndarray, np.linalg.qr(d, mode="r"))
    diag = np.abs(np.diag(r))
    if len(diag) == 0 or d.shape[0] < d.shape[1] or diag.min() <= 1e-10 * diag.max():
        return None
    return r


def _leverage_at(r: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``d (A^H A)^-1 d^H`` per row of ``d``, for ``A = QR``."""
    z = solve_triangular(r, d.conj().T, trans="C", check_finite=False)
    return np.sum(np.abs(z) ** 2, axis=0)


def _mean_leverage(d_stars: np.ndarray, d_grid: np.ndarray) -> float:
    """Unweighted leverage of the stars' geometry averaged over a grid on the CCD.

    The variance of the fitted mapping at a grid point in units of one star's
    variance: about (coefficients / stars) when the stars cover the CCD, far
    more where a polynomial has to extrapolate into an empty region.
    """
    r = _qr(d_stars)
    return float("inf") if r is None else float(np.mean(_leverage_at(r, d_grid)))


def _order_for(
    un: np.ndarray, vn: np.ndarray, max_order: int, gu: np.ndarray, gv: np.ndarray
) -> int:
    """Highest polynomial order (1 .. ``max_order``) that the points (normalised
    coordinates ``un``, ``vn``) support over the grid ``gu``, ``gv``: enough of
    them (:func:`_min_stars`) and spread so that the mean leverage over the
    grid stays below ``_CLEAN_MEAN_LEVERAGE``."""
    best = 1
    for order in range(2, max_order + 1):
        if len(un) < _min_stars(order):
            break
        lev = _mean_leverage(_poly_design(un, vn, order), _poly_design(gu, gv, order))
        if lev > _CLEAN_MEAN_LEVERAGE:
            break
        best = order
    return best


def _hull_fraction(xy: np.ndarray, area: float) -> float:
    if len(xy) < 3 or area <= 0:
        return 0.0
    try:
        return float(min(ConvexHull(xy).volume / area, 1.0))
    except QhullError:  # collinear
        return 0.0


def _scatter2(r2: np.ndarray, var: np.ndarray, omh: np.ndarray) -> float:
    """Per-axis variance s^2 >= 0 beyond ``var`` making the median of the
    chi^2 (2 dof) of the residuals ``r2 / ((var + s^2) omh)`` its expected ln 4."""
    t = r2 / omh
    if len(t) == 0:
        return 0.0
    if not np.any(var > _VAR_FLOOR):
        return float(np.median(t)) / _LN4

    def excess(s2: float) -> float:
        return float(np.median(t / (var + s2))) - _LN4

    if excess(0.0) <= 0.0:
        return 0.0
    hi = max(float(np.median(t)) / _LN4, 1e-12)
    while excess(hi) > 0.0:
        hi *= 4.0
    return float(brentq(excess, 0.0, hi, xtol=1e-14, rtol=1e-6))


def _robust_start(
    z: np.ndarray, w: np.ndarray, parities: tuple[int, ...]
) -> tuple[int, np.ndarray]:
    """Least-median-of-squares similarity: parity and residuals (deg) of every point.

    Every pair of points (or 300 pairs drawn with a fixed seed when there are
    many) defines a similarity ``w = alpha z + gamma``; the one whose median
    residual over the other points is smallest wins, whatever up to half the
    points do.
    """
    n = len(z)
    sub = np.arange(n)
    if n <= 45:
        i, j = np.array(list(combinations(range(n), 2))).T
    else:  # score on a subset: enough to find the bulk of many stars
        rng = np.random.default_rng(20240607)
        sub = np.sort(rng.choice(n, size=min(n, 150), replace=False))
        i, j = sub[rng.integers(0, len(sub), (2, 300))]
        keep = i != j
        i, j = i[keep][:150], j[keep][:150]
    span = max(float(np.ptp(z.real)), float(np.ptp(z.imag)), 1e-12)
    far = np.abs(z[i] - z[j]) > 0.05 * span
    if far.any():
        i, j = i[far], j[far]
    m = len(sub)
    k = min(m - 1, (m + 2) // 2)
    best = (np.inf, parities[0], 0j, 0j)
    for parity in parities:
        zz = z if parity > 0 else np.conj(z)
        alpha = (w[j] - w[i]) / (zz[j] - zz[i])
        gamma = w[i] - alpha * zz[i]
        res = np.abs(alpha[:, None] * zz[None, sub] + gamma[:, None] - w[None, sub])
        score = np.partition(res, k, axis=1)[:, k]
        b = int(np.argmin(score))
        if score[b] < best[0]:
            best = (float(score[b]), parity, alpha[b], gamma[b])
    _, parity, alpha, gamma = best
    return parity, np.abs(alpha * (z if parity > 0 else np.conj(z)) + gamma - w)


@dataclass
class _Problem:
    """The matched stars of one fit in the tangent plane of a fixed point (deg)."""

    un: np.ndarray  # normalised pixel offsets from CRPIX, finite stars
    vn: np.ndarray
    w: np.ndarray  # xi + i eta, deg
    var: np.ndarray  # quoted per-axis variance, arcsec^2 (0 when unknown)
    parity: int
    gu: np.ndarray  # grid over the CCD, normalised
    gv: np.ndarray

    def __post_init__(self) -> None:
        self._designs: dict[int, np.ndarray] = {}

    def design(self, order: int, sel: np.ndarray | slice = slice(None)) -> np.ndarray:
        d = self._designs.get(order)
        if d is None:
            d = self._designs[order] = _model_design(self.un, self.vn, order, self.parity)
        return d[sel]

    def fit(
        self, order: int, used: np.ndarray, s2: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Weighted fit on ``used``: (coef, r2 arcsec^2 of all, h of all, R), None if singular.

        ``h`` is the leverage for the used stars and, for the others, the
        prediction variance at their position in units of their own variance.
        """
        var = np.maximum(self.var + s2, _VAR_FLOOR)
        sw = 1.0 / np.sqrt(var)
        d = self.design(order)
        r = _qr(d[used] * sw[used, None])
        if r is None:
            return None
        rhs = solve_triangular(
            r,
            (d[used] * sw[used, None]).conj().T @ (self.w[used] * sw[used]),
            trans="C",
            check_finite=False,
        )
        coef = solve_triangular(r, rhs, check_finite=False)
        r2 = np.abs(d @ coef - self.w) ** 2 * 3600.0**2
        h = _leverage_at(r, d) / var
        return coef, r2, h, r


def _clip_order(n: int, top: int) -> int:
    """Highest order (<= ``top``) that ``n`` stars determine well enough to judge each of
    them by the others: at least twice as many stars as coefficients per axis."""
    order = 0
    while order < top and n >= max(_min_stars(order + 1), 2 * _n_coef(order + 1)):
        order += 1
    return order


def _external_t2(
    prob: _Problem, order: int, used: np.ndarray, s2: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Squared residual of each used star from the fit to all the *other* used stars:
    in units of its expected variance (quoted error plus a scatter fitted to those
    others), and in arcsec^2. The exact leave-one-out test, so that an outlier among
    few stars can neither hide by pulling the fit nor inflate the scale it is judged by."""
    var = np.maximum(prob.var + s2, _VAR_FLOOR)
    idx = np.flatnonzero(used)
    sw = 1.0 / np.sqrt(var[idx])
    a = prob.design(order, idx) * sw[:, None]
    r = _qr(a)
    if r is None:
        return None
    b = solve_triangular(r, a.conj().T, trans="C", check_finite=False)  # R^-H A^H
    hat = b.conj().T @ b  # (n, n)
    coef = solve_triangular(r, b @ (prob.w[idx] * sw), check_finite=False)
    e = (prob.w[idx] - prob.design(order, idx) @ coef) * 3600.0 * sw  # normalised
    h = np.clip(hat.diagonal().real, 0.0, 1.0 - 1e-9)
    n = len(idx)
    out = np.empty(n)
    loo2 = np.empty(n)
    for i in range(n):
        # Residuals and leverages of the others in the fit without star i (rank-one downdate).
        others = np.arange(n) != i
        e_i = e[others] + hat[others, i] * e[i] / (1.0 - h[i])
        h_i = h[others] - np.abs(hat[others, i]) ** 2 / (1.0 - h[i])
        omh = np.clip(1.0 - h_i, 1e-9, None)
        r2 = np.abs(e_i) ** 2 * var[idx[others]]  # back to arcsec^2
        s2_i = _scatter2(r2, prob.var[idx[others]], omh)
        e_loo2 = np.abs(e[i]) ** 2 * var[idx[i]] / (1.0 - h[i]) ** 2
        out[i] = e_loo2 * (1.0 - h[i]) / max(prob.var[idx[i]] + s2_i, _VAR_FLOOR)
        loo2[i] = e_loo2
    t2 = np.full(len(used), np.nan)
    t2[idx] = out
    r2 = np.full(len(used), np.nan)
    r2[idx] = loo2
    return t2, r2


def _clean(
    prob: _Problem,
    top: int,
    used: np.ndarray,
    eligible: np.ndarray,
    s2: float,
    *,
    clip_sigma: float,
    max_iter: int,
    min_outlier_arcsec: float = 0.0,
) -> tuple[np.ndarray, float]:
    """Iterative rejection; returns the used stars and the fitted scatter s^2.

    The scale of the residuals is the quoted error of each star plus a scatter
    fitted so that the median chi^2 is the expected one: the clipping never
    gets tighter than the centroid errors allow, and an outlier does not
    inflate it. The model is the most flexible one (up to ``top``) that the
    stars determine (:func:`_clip_order`). With fewer than ``_SMALL_N`` stars,
    each star is judged against the fit to the others (:func:`_external_t2`)
    and only the worst goes per iteration, never more than half of them nor
    below three; otherwise residuals are studentised (by ``1 - h``) and all
    beyond ``clip_sigma`` go at once. Rejected stars that fit come back.
    """
    n_elig = int(eligible.sum())
    small = n_elig < _SMALL_N
    min_keep = max(3, (n_elig + 1) // 2)
    clip2 = clip_sigma**2
    for _ in range(max(max_iter, n_elig) if small else max_iter):
        order = _clip_order(int(used.sum()), top)
        got = prob.fit(order, used, s2)
        if got is None:
            break
        _, r2, h, _ = got
        s2 = _scatter2(r2[used], prob.var[used], np.clip(1.0 - h[used], 1e-6, None))
        # Raw residuals of the fitted stars: studentising them would single out a lone
        # star in a corner (leverage near one) whenever its neighbours' errors are
        # larger than quoted; the prediction variance for the others.
        t2 = r2 / (np.maximum(prob.var + s2, _VAR_FLOOR) * np.where(used, 1.0, 1.0 + h))
        if small:
            new = used | (eligible & (t2 <= clip2))
            ext = _external_t2(prob, order, used, s2)
            if ext is not None and used.sum() - 1 >= min_keep:
                t2_ext, loo2 = ext
                worst = int(np.nanargmax(t2_ext))
                if t2_ext[worst] > (clip_sigma + 2.0) ** 2 and loo2[worst] > min_outlier_arcsec**2:
                    new[worst] = False
                    log.debug(
                        "rejecting star %d of %d: %.1f sigma, %.1f mas off the others' fit "
                        "(order %d)",
                        worst,
                        int(used.sum()),
                        np.sqrt(t2_ext[worst]),
                        np.sqrt(loo2[worst]) * 1e3,
                        order,
                    )
        else:
            new = eligible & (t2 <= clip2)
            if new.sum() < min_keep:
                break
        if np.array_equal(new, used):
            break
        used = new
    return used, s2


# ------------------------------------------------- radial model about the boresight
_RADIAL = -1  # key of the "linear TAN + radial" model among the orders
_MIN_RADIAL_STARS = 5


@dataclass
class _RadialFit:
    """Linear TAN + cubic radial distortion about the optical axis, in the boresight's
    tangent plane: ``W = a0 + a1 u' + a2 v'`` (arcsec) of the undistorted normalised
    pixel offsets ``p' = c + (p - c)(1 + k |p - c|^2)``, ``c`` the boresight's pixel
    position (``W(c) = 0``)."""

    a: np.ndarray  # (a0, a1, a2) complex, arcsec
    k: float  # per normalised unit^2
    c: complex  # normalised pixel offsets from CRPIX
    bore: tuple[float, float]  # (ra, dec) of the tangent point, deg
    loo: np.ndarray  # per used star, as in _choose_order (arcsec^2)
    score: float  # arcsec^2
    r2: np.ndarray  # squared residuals of all finite stars, arcsec^2
    omh: np.ndarray  # 1 - leverage of all finite stars (per axis, mean of the two)

    def plane(self, un: np.ndarray, vn: np.ndarray) -> np.ndarray:
        du, dv = un - self.c.real, vn - self.c.imag
        f = 1.0 + self.k * (du * du + dv * dv)
        return self.a[0] + self.a[1] * (self.c.real + du * f) + self.a[2] * (self.c.imag + dv * f)


def _radial_jacobian(
    un: np.ndarray, vn: np.ndarray, a: np.ndarray, k: float, c: complex
) -> tuple[np.ndarray, np.ndarray]:
    """Model (complex, arcsec) and real Jacobian (2n x 7: a0, a1, a2 x/y, k), x rows first."""
    du, dv = un - c.real, vn - c.imag
    r2 = du * du + dv * dv
    pu, pv = c.real + du * (1.0 + k * r2), c.imag + dv * (1.0 + k * r2)
    model = a[0] + a[1] * pu + a[2] * pv
    g = (a[1] * du + a[2] * dv) * r2
    n = len(un)
    one, zero = np.ones(n), np.zeros(n)
    jx = np.column_stack([one, zero, pu, zero, pv, zero, g.real])
    jy = np.column_stack([zero, one, zero, pu, zero, pv, g.imag])
    return model, np.vstack([jx, jy])


def _boresight_pixel(a: np.ndarray) -> complex:
    m = np.array([[a[1].real, a[2].real], [a[1].imag, a[2].imag]])
    xy = np.linalg.solve(m, [-a[0].real, -a[0].imag])
    return complex(xy[0], xy[1])


def _fit_radial(
    prob: _Problem,
    wb: np.ndarray,
    used: np.ndarray,
    s2: float,
    bore: tuple[float, float],
    n_iter: int = 8,
) -> _RadialFit | None:
    """Gauss-Newton fit of the radial model to the ``used`` stars (``wb``: their
    boresight-plane positions, arcsec), scored like the polynomial models: closed-form
    leave-one-out residuals (2 x 2 leverage blocks of the linearised fit) less their
    expected noise, plus twice the mapping's mean variance over the CCD grid."""
    idx = np.flatnonzero(used)
    n = len(idx)
    if n < _MIN_RADIAL_STARS:
        return None
    un, vn, w = prob.un[idx], prob.vn[idx], wb[idx]
    var = np.maximum(prob.var[idx] + s2, _VAR_FLOOR)
    sw = np.concatenate([1.0 / np.sqrt(var)] * 2)
    d = np.column_stack([np.ones(n), un, vn]) / np.sqrt(var)[:, None]
    try:
        a, *_ = np.linalg.lstsq(d, w / np.sqrt(var), rcond=None)
        c = _boresight_pixel(a)
    except np.linalg.LinAlgError:
        return None
    k = 0.0
    jac = None
    for _ in range(n_iter):
        model, jac = _radial_jacobian(un, vn, a, k, c)
        res = w - model
        step, *_ = np.linalg.lstsq(
            jac * sw[:, None], np.concatenate([res.real, res.imag]) * sw, rcond=None
        )
        a = a + step[0:6:2] + 1j * step[1:6:2]
        k += float(step[6])
        try:
            c = _boresight_pixel(a)
        except np.linalg.LinAlgError:
            return None
        if abs(step[6]) <= 1e-10 * max(abs(k), 1e-12) and np.max(np.abs(step[:6])) < 1e-9:
            break
    model, jac = _radial_jacobian(un, vn, a, k, c)
    jw = jac * sw[:, None]
    r = _qr(jw)
    if r is None:
        return None
    q = jw @ np.linalg.inv(r)  # thin Q
    e = np.concatenate([(w - model).real, (w - model).imag]) * sw
    rows = np.stack([q[:n], q[n:]], axis=1)  # (n, 2, 7)
    hii = rows @ rows.transpose(0, 2, 1)  # 2 x 2 leverage blocks
    imh = np.eye(2) - hii
    if np.linalg.det(imh).min() < 1e-9:
        return None
    inv = np.linalg.inv(imh)
    rl = np.einsum("nij,nj->ni", inv, np.column_stack([e[:n], e[n:]]))
    loo = var * (np.sum(rl**2, axis=1) - np.trace(inv @ hii, axis1=1, axis2=2))
    hdiag = 0.5 * np.trace(hii, axis1=1, axis2=2)
    _, gjac = _radial_jacobian(prob.gu, prob.gv, a, k, c)
    z = solve_triangular(r, gjac.T, trans="T", check_finite=False)
    grid = float(np.mean(np.sum(z**2, axis=0).reshape(2, -1).sum(axis=0)))  # var_x + var_y
    wn = (1.0 / var) / np.sum(1.0 / var)
    fit = _RadialFit(
        a=a, k=k, c=c, bore=bore, loo=loo, score=0.0, r2=np.array([]), omh=np.array([])
    )
    fit.score = float(np.sum(wn * loo) + grid)
    fit.r2 = np.abs(fit.plane(prob.un, prob.vn) - wb) ** 2
    omh = np.ones(len(prob.un))
    omh[idx] = np.clip(1.0 - hdiag, 1e-6, None)
    fit.omh = omh
    return fit


def _radial_polynomial(
    fit: _RadialFit, gu: np.ndarray, gv: np.ndarray, crval: tuple[float, float]
) -> np.ndarray:
    """Cubic coefficients (complex, deg, ``_poly_design`` order) of the radial model in
    the tangent plane of ``crval``, fitted on a dense grid (``gu``, ``gv``) over the CCD."""
    wb = fit.plane(gu, gv) / 3600.0
    ra, dec = tan_deproject(wb.real, wb.imag, *fit.bore)
    xi, eta = tan_project(ra, dec, *crval)
    coef, *_ = np.linalg.lstsq(_poly_design(gu, gv, 3), xi + 1j * eta, rcond=None)
    return coef


def _choose_order(
    prob: _Problem,
    used: np.ndarray,
    s2: float,
    max_order: int,
    radial: _RadialFit | None = None,
) -> tuple[int, int, dict[int, float]]:
    """Cross-validated model: (chosen order, highest allowed order, scores in arcsec^2).

    Models up to ``max_order`` are candidates when there are enough stars
    (:func:`_min_stars`) and, for SIP orders, when the stars spread over the
    CCD (mean unweighted leverage over a grid on it <= ``_MAX_MEAN_LEVERAGE``).
    Each is scored by the expected squared error of the mapping averaged over
    the CCD: the leave-one-out residuals (closed form, ``e / (1 - h)``, weighted
    by the stars' precision) less their expected noise, plus the noise of the
    fitted mapping over the grid. The default is the highest order the stars
    pin down well (three stars per coefficient of an axis and a mean leverage
    <= ``_CLEAN_MEAN_LEVERAGE``): what a camera's
    distortion usually needs, and at the corners, where the stars that would
    show it are few, cross-validation at the stars cannot see it. Another
    model replaces it only when its score is better by more than one standard
    error of the difference.

    ``radial`` (the "linear TAN + radial" model about the boresight, key
    ``_RADIAL``) is a candidate scored the same way and, when given, is the
    default whatever the number of stars (a prior on the distortion's form: one
    parameter that the CCD's stars pin down, corners included, where a SIP
    polynomial needs many). The reason for defaulting to a high SIP order, the
    distortion at the corners that cross-validation at the stars cannot see, is
    what the radial model already describes; a SIP order has to earn its place
    by a score better by more than the standard error. Left as the default, a
    cubic fitted to a few dozen stars with centroids pulled by neighbours (tens
    of mas, correlated) won over a radial model of equal score and was off by
    hundreds of mas at the CCD's edges.
    """
    n = int(used.sum())
    grid_d = {}
    scores: dict[int, float] = {}
    per_star: dict[int, np.ndarray] = {}
    allowed = default = 0
    var = np.maximum(prob.var[used] + s2, _VAR_FLOOR)
    wn = (1.0 / var) / np.sum(1.0 / var)  # the precise stars tell the mapping's bias best
    for order in range(0, max(max_order, 1) + 1):
        if order == 0 and n >= _min_stars(1):
            continue  # the similarity only where a linear fit is impossible
        if n < _min_stars(order):
            break
        grid_d[order] = _model_design(prob.gu, prob.gv, order, prob.parity)
        lev = _mean_leverage(prob.design(order, used), grid_d[order]) if order >= 2 else 0.0
        if lev > _MAX_MEAN_LEVERAGE:
            break
        allowed = order
        got = prob.fit(order, used, s2)
        if got is None:
            continue
        _, r2, h, r = got
        h = h[used]
        if h.max() > 1.0 - 1e-6:
            continue
        loo = r2[used] / (1.0 - h) ** 2 - 2.0 * var * h / (1.0 - h)
        per_star[order] = loo
        scores[order] = float(np.sum(wn * loo) + 2.0 * np.mean(_leverage_at(r, grid_d[order])))
        if lev <= _CLEAN_MEAN_LEVERAGE and n >= 3 * _n_coef(order):
            default = order
    if radial is not None:
        scores[_RADIAL] = radial.score
        per_star[_RADIAL] = radial.loo
        default = _RADIAL
    if not scores:
        return 0, allowed, scores
    best = min(scores, key=scores.__getitem__)
    if default not in scores or best == default:
        return best, allowed, scores
    diff = per_star[default] - per_star[best]
    mean_diff = float(np.sum(wn * diff))
    se = float(np.sqrt(np.sum(wn**2 * (diff - mean_diff) ** 2)))
    if scores[best] + se < scores[default]:
        return best, allowed, scores
    return default, allowed, scores


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
    parity: int | None = None,
    min_outlier_arcsec: float = 0.25,
    boresight: tuple[float, float] | None = None,
) -> WcsFitResult:
    """Fit a TAN(-SIP) WCS to matched (0-based pixel, sky) pairs.

    ``crpix`` is the 1-based FITS reference pixel (the detector centre of an
    ``nx`` x ``ny`` image is ``((nx + 1) / 2, (ny + 1) / 2)``); CRVAL becomes
    its fitted sky position. The projection plane is re-centred on CRVAL until
    the fit has no constant term, so the SIP polynomials (orders 2 ..) describe
    distortion only.

    ``sip_order`` is the highest order tried. The model is chosen by
    cross-validation (:func:`_choose_order`) among a similarity (shift,
    rotation, scale: what 3-4 stars allow), a linear TAN (order 1, CTYPE
    ``RA---TAN``) and SIP orders 2 .. ``sip_order``, each only with enough
    stars spread over the CCD (``image_shape`` (ny, nx), else the stars'
    bounding box), so that few stars, or stars in one corner, never feed a
    wild polynomial. ``parity`` is the sign of det(CD) the similarity keeps
    (the header WCS's; None: whichever fits better).

    ``weights`` are inverse variances of the position per axis in arcsec^-2
    (centroid and reference errors): they weight the fit and set the floor of
    the clipping scale, to which a scatter fitted from the residuals is
    added. Without them the stars count equally and the scale is the robust
    scatter alone. Clipping uses the most flexible model the number of stars
    determines (whatever their spread, so that distortion at the corners is
    not taken for outliers), stars beyond ``clip_sigma`` (2-D) going:

    * with 30 stars or more, all at once (raw residuals: studentising them would
      single out a lone star in a corner), up to ``max_iter`` times;
    * with fewer, one at a time, each star judged against the fit to the
      others (exact leave-one-out, two sigma more), never more than half of
      them, and only when it lies more than ``min_outlier_arcsec`` off that
      fit: a mismatch or a blend is further off, while a stiff model's misfit
      to the distortion at a corner, among few stars, can reach that much.

    Clipped stars that fit again come back. The inverse polynomials AP/BP
    are fitted over ``image_shape`` when given, else over the stars' bounding
    box, so that any FITS reader can go from sky to pixel.

    ``boresight`` (ra, dec) in deg, the optical axis (the raw header's
    ``RA``/``DEC``), adds the candidate "linear TAN + radial": a linear TAN in
    the boresight's tangent plane of the pixels undistorted by
    ``p' = c + (p - c)(1 + k |p - c|^2)``, ``c`` the boresight's pixel position
    (off the CCD for an off-axis detector), ``k`` fitted. With 5 stars or more
    it replaces the linear TAN as the default (:func:`_choose_order`); when
    chosen it is written exactly as TAN-SIP of order 3 (model "radial").

    Raises AstrometryError with fewer than 3 usable stars.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    n = len(x)
    if not (len(y) == len(ra) == len(dec) == n):
        raise ValueError("x, y, ra and dec must have the same length")
    w_in = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(ra) & np.isfinite(dec)
    finite &= np.isfinite(w_in) & (w_in > 0)
    if finite.sum() < 3:
        raise AstrometryError(f"too few stars to fit a WCS ({int(finite.sum())}, need 3)")
    fi = np.flatnonzero(finite)
    u = x[fi] + 1.0 - crpix[0]
    v = y[fi] + 1.0 - crpix[1]
    if image_shape is not None:
        box = (-0.5, image_shape[1] - 0.5, -0.5, image_shape[0] - 0.5)
    else:
        box = (float(x[fi].min()), float(x[fi].max()), float(y[fi].min()), float(y[fi].max()))
    corners = (
        np.array([box[0], box[1]]) + 1.0 - crpix[0],
        np.array([box[2], box[3]]) + 1.0 - crpix[1],
    )
    norm = max(float(np.abs(np.concatenate([u, v, *corners])).max()), 1.0)
    g = np.linspace(0.0, 1.0, _COVERAGE_GRID)
    gx, gy = np.meshgrid(box[0] + g * (box[1] - box[0]), box[2] + g * (box[3] - box[2]))
    gu = (gx.ravel() + 1.0 - crpix[0]) / norm
    gv = (gy.ravel() + 1.0 - crpix[1]) / norm
    var = np.zeros(len(fi)) if weights is None else 1.0 / w_in[fi]

    # Initial tangent point: the mean direction of the stars.
    r, d = np.deg2rad(ra[fi]), np.deg2rad(dec[fi])
    vec = np.array([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)]).mean(axis=1)
    crval = (
        float(np.rad2deg(np.arctan2(vec[1], vec[0])) % 360.0),
        float(np.rad2deg(np.arcsin(vec[2] / np.linalg.norm(vec)))),
    )

    def plane(crval: tuple[float, float]) -> np.ndarray:
        xi, eta = tan_project(ra[fi], dec[fi], *crval)
        return xi + 1j * eta

    # Robust start (gross outliers); re-centre the plane on its CRPIX position.
    zw = plane(crval)
    parities = (1, -1) if parity is None else (1 if parity > 0 else -1,)
    par, res0 = _robust_start(u / norm + 1j * v / norm, zw, parities)
    prob = _Problem(un=u / norm, vn=v / norm, w=zw, var=var, parity=par, gu=gu, gv=gv)
    r2 = (res0 * 3600.0) ** 2
    s2 = _scatter2(r2, var, np.ones(len(fi)))
    eligible = np.ones(len(fi), dtype=bool)
    seed = r2 <= 100.0 * np.maximum(var + s2, _VAR_FLOOR)
    got = prob.fit(0, seed if seed.sum() >= 3 else eligible, s2)
    if got is not None:
        const = got[0][0]
        ra0, dec0 = tan_deproject(np.array([const.real]), np.array([const.imag]), *crval)
        crval = (float(ra0[0]), float(dec0[0]))
        prob.w = plane(crval)

    # Clip with the most flexible model that the number of stars determines well, whatever
    # their spread (a stiffer one would take the distortion at the corners for outliers;
    # the spread matters for the mapping between the stars, not for the fit at them), then
    # let cross-validation choose the model, its scatter re-fitted without more clipping.
    req = max(int(sip_order), 1)
    top = _clip_order(int(eligible.sum()), req)
    # Every star takes part from the start: the similarity's misfit to the distortion
    # at the corners would keep true corner stars out, and the polynomial fitted
    # without them extrapolates there.
    used = eligible.copy()
    used, s2 = _clean(
        prob,
        top,
        used,
        eligible,
        s2,
        clip_sigma=clip_sigma,
        max_iter=max_iter,
        min_outlier_arcsec=min_outlier_arcsec,
    )
    radial = wb = None
    if boresight is not None and all(np.isfinite(boresight)):
        bore = (float(boresight[0]) % 360.0, float(boresight[1]))
        bxi, beta = tan_project(ra[fi], dec[fi], *bore)
        wb = (bxi + 1j * beta) * 3600.0
        radial = _fit_radial(prob, wb, used, s2, bore)
    order, max_order, scores = _choose_order(prob, used, s2, req, radial)
    log.debug(
        "WCS fit: %d stars, clipped at order %d -> %d used; scores (arcsec^2) %s",
        len(fi),
        top,
        int(used.sum()),
        scores,
    )
    is_radial = order == _RADIAL
    if is_radial:
        assert radial is not None and wb is not None
        s2 = _scatter2(radial.r2[used], var[used], radial.omh[used])
        radial = _fit_radial(prob, wb, used, s2, radial.bore) or radial
        # Exactly as TAN-SIP of order 3: CRVAL the model's sky position at CRPIX, the
        # cubic polynomial in the CCD's tangent plane fitted on a dense grid.
        order = 3
        g = np.linspace(0.0, 1.0, 21)
        dgx, dgy = np.meshgrid(box[0] + g * (box[1] - box[0]), box[2] + g * (box[3] - box[2]))
        dgu = (dgx.ravel() + 1.0 - crpix[0]) / norm
        dgv = (dgy.ravel() + 1.0 - crpix[1]) / norm
        c0 = radial.plane(np.zeros(1), np.zeros(1)) / 3600.0
        ra0, dec0 = tan_deproject(c0.real, c0.imag, *radial.bore)
        crval = (float(ra0[0]), float(dec0[0]))
        prob.w = plane(crval)
        coef = _radial_polynomial(radial, dgu, dgv, crval)
    else:
        got = prob.fit(order, used, s2)
        if got is not None:
            omh = np.clip(1.0 - got[2][used], 1e-6, None)
            s2 = _scatter2(got[1][used], var[used], omh)

    # Final fit at the chosen model, re-centring CRVAL until the constant term vanishes.
    if not is_radial:
        coef = np.zeros(_n_coef(order), complex)
    for _ in range(0 if is_radial else 10):
        got = prob.fit(order, used, s2)
        if got is None:
            raise AstrometryError(f"degenerate star positions for a {_model_name(order)} WCS fit")
        coef = got[0]
        if abs(coef[0]) * MAS_PER_DEG < 1e-4:
            break
        ra0, dec0 = tan_deproject(np.array([coef[0].real]), np.array([coef[0].imag]), *crval)
        crval = (float(ra0[0]), float(dec0[0]))
        prob.w = plane(crval)

    # Coefficients -> CD and SIP A/B (pixels, relative to CRPIX).
    if order == 0:
        a, b = coef[1].real / norm, coef[1].imag / norm
        cd = np.array([[a, -b], [b, a]]) if par > 0 else np.array([[a, b], [b, -a]])
    else:
        cxm = _coef_matrix(coef.real, order, norm, min_order=0)
        cym = _coef_matrix(coef.imag, order, norm, min_order=0)
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
        ap, bp, inv_err = _fit_sip_inverse(cd, a, b, order, box, crpix, scale_arcsec)
        wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        wcs.sip = Sip(a, b, ap, bp, wcs.wcs.crpix)
        if inv_err > 1.0:
            log.warning("inverse SIP round trip error %.2f mas exceeds 1 mas", inv_err)
    else:
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.set()
    # Residuals in (east, north) arcsec through the finished WCS (what users will see).
    fra, fdec = wcs.all_pix2world(x[fi], y[fi], 0)
    exi, eeta = tan_project(fra, fdec, *crval)
    rxi, reta = tan_project(ra[fi], dec[fi], *crval)
    resid = np.full((n, 2), np.nan)
    resid[fi, 0] = (exi - rxi) * 3600.0
    resid[fi, 1] = (eeta - reta) * 3600.0
    used_all = np.zeros(n, dtype=bool)
    used_all[fi[used]] = True
    rms = float(np.sqrt(np.mean(np.sum(resid[used_all] ** 2, axis=1))))
    area = (box[1] - box[0]) * (box[3] - box[2])
    coverage = _hull_fraction(np.column_stack([x[fi[used]], y[fi[used]]]), area)
    log.info(
        "WCS fit: %d of %d stars used, %s (order %d, up to %d allowed), coverage %.2f, "
        "rms %.1f mas, inverse error %.3f mas",
        int(used.sum()),
        len(fi),
        "radial" if is_radial else _model_name(order),
        max(order, 1),
        max_order,
        coverage,
        rms * 1000.0,
        inv_err,
    )
    return WcsFitResult(
        wcs=wcs,
        rms_arcsec=rms,
        n_used=int(used.sum()),
        used=used_all,
        residuals=resid,
        sip_order=max(order, 1),
        inverse_max_err_mas=inv_err,
        max_order=max_order,
        model="radial" if is_radial else _model_name(order),
        coverage=coverage,
        scatter_arcsec=float(np.sqrt(s2)),
    )


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
    boresight: tuple[float, float] | None = None,
) -> tuple[MatchResult, WcsFitResult]:
    """Pattern-match, fit, re-match under the fitted WCS and fit again.

    ``fit_mask`` (per source) says which sources may enter the WCS fits: the
    pattern match uses every source (the brightest reference stars are often
    saturated in the image, and their detections still match), while only
    sources with reliable centroids constrain the WCS. The returned match then
    holds the fitted pairs only, aligned with the fit's ``used``.

    The second match uses the fitted WCS with a tighter radius (three times
    the first fit's rms, and enough to keep every star that fit used; at least
    0.2 arcsec and at most ``match_radius_arcsec``), which recovers stars the
    first, affine-plus-polynomial match missed near the edges. ``weights``
    (per source, inverse variance of the centroid per axis, arcsec^-2) are
    passed to the fit, and so is the parity of the header WCS (the sign of the
    determinant of its CD matrix), which a fit of a few stars keeps. CRPIX is
    the detector centre of ``image_shape`` (ny, nx). ``boresight`` (ra, dec of
    the optical axis, deg) enables the radial distortion model of :func:`fit_wcs`.
    """
    match = match_sources(
        x,
        y,
        flux,
        ref_ra,
        ref_dec,
        ref_mag,
        approx_wcs,
        max_offset_arcsec=max_offset_arcsec,
        max_rotation_deg=max_rotation_deg,
        max_scale_change=max_scale_change,
        match_radius_arcsec=match_radius_arcsec,
    )
    crpix = ((image_shape[1] + 1) / 2.0, (image_shape[0] + 1) / 2.0)
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    wts = None if weights is None else np.asarray(weights, float)
    allowed = np.ones(len(x), dtype=bool) if fit_mask is None else np.asarray(fit_mask, bool)
    parity = 1 if np.linalg.det(approx_wcs.pixel_scale_matrix) > 0 else -1

    def fittable(si: np.ndarray, ri: np.ndarray, sep: np.ndarray):
        keep = allowed[si]
        return si[keep], ri[keep], sep[keep]

    def fit(si: np.ndarray, ri: np.ndarray) -> WcsFitResult:
        return fit_wcs(
            x[si],
            y[si],
            np.asarray(ref_ra, float)[ri],
            np.asarray(ref_dec, float)[ri],
            crpix=crpix,
            weights=None if wts is None else wts[si],
            sip_order=sip_order,
            image_shape=image_shape,
            parity=parity,
            boresight=boresight,
        )

    si0, ri0, sep0 = fittable(
        np.asarray(match.source_index),
        np.asarray(match.reference_index),
        np.asarray(match.separation_arcsec),
    )
    if len(si0) < 3:
        raise AstrometryError(f"only {len(si0)} matched sources have reliable centroids")
    first = fit(si0, ri0)
    worst = float(np.max(np.hypot(*first.residuals[first.used].T)))
    radius = float(np.clip(max(3.0 * first.rms_arcsec, 1.2 * worst), 0.2, match_radius_arcsec))
    si, ri, sep = fittable(
        *match_by_position(x, y, ref_ra, ref_dec, first.wcs, radius_arcsec=radius)
    )
    if len(si) < 3:
        first_match = replace(match, source_index=si0, reference_index=ri0, separation_arcsec=sep0)
        return first_match, first
    second = fit(si, ri)
    rematch = MatchResult(
        source_index=si,
        reference_index=ri,
        separation_arcsec=sep,
        affine=match.affine,
        residual_arcsec=float(np.sqrt(np.mean(sep**2))),
        offset_arcsec=match.offset_arcsec,
        rotation_deg=match.rotation_deg,
        scale=match.scale,
        n_pattern_votes=match.n_pattern_votes,
    )
    return rematch, second
