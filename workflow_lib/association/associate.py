"""Association of DIASources into DIAObjects: sequential, bipartite and cluster.

All three work on positions in a local tangent plane (arcsec), so a 2-d
KD-tree is exact over a patch. Each returns, per DIASource, the index of its
DIAObject (``-1``: not associated), with objects numbered in a canonical order
(by the smallest ``rank`` among their members, e.g. the ``diaSourceId``), so
that the result does not depend on the order of the rows given.

- ``sequential``: dia_pipe's running match. Visits in time order; each DIASource
  joins the nearest DIAObject within the radius or starts a new one. Unlike
  dia_pipe, the object's position is the error-weighted mean of all its
  members (dia_pipe's running mean jumps to the second source), and the
  spatial index follows the objects as they move.
- ``bipartite`` (Rubin's association since 2026): every DIAObject within the
  radius is a candidate; the cost of a pair is the negative log-likelihood of
  the offset under both position errors; each visit's DIASources are paired
  with DIAObjects by a minimum-cost bipartite matching that first maximises
  the number of pairs, so one object never takes two sources of a visit and a
  source whose nearest object is taken joins the next-best one.
- ``cluster``: friends-of-friends over every DIASource at once (for comparison;
  it chains neighbours that are each within the radius).

DIASources that may not seed objects (``can_seed`` false: artifacts) join an
existing object when one is in reach, and are otherwise left unassociated.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from workflow_lib.core.sky import from_tangent_plane_arcsec, tangent_plane_arcsec

__all__ = [
    "METHODS",
    "AssociationConfig",
    "associate",
    "from_tangent_plane_arcsec",
    "position_errors",
    "tangent_plane_arcsec",
]
METHODS = ("sequential", "bipartite", "cluster")


@dataclass(frozen=True)
class AssociationConfig:
    """How DIASources are grouped (the schema's ``association`` section holds the defaults)."""

    method: str = "bipartite"
    radius_arcsec: float = 1.0
    position_error_floor_arcsec: float = 0.05
    # bipartite: a candidate must also lie within this many sigma (both errors).
    max_offset_sigma: float = 10.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"association method must be one of {METHODS}, not {self.method!r}")
        if not self.radius_arcsec > 0:
            raise ValueError(f"association radius must be > 0 arcsec, not {self.radius_arcsec}")
        if not self.position_error_floor_arcsec > 0:
            raise ValueError("association position_error_floor_arcsec must be > 0")
        if not self.max_offset_sigma > 0:
            raise ValueError("association max_offset_sigma must be > 0")


def position_errors(err: np.ndarray, floor: float) -> np.ndarray:
    """Position errors (arcsec) raised to ``floor``; NaN takes the floor."""
    err = np.asarray(err, dtype=np.float64)
    return np.where(np.isfinite(err), np.maximum(err, floor), floor)


def associate(
    x: np.ndarray,
    y: np.ndarray,
    err: np.ndarray,
    epoch: np.ndarray,
    visit: np.ndarray,
    rank: np.ndarray,
    can_seed: np.ndarray,
    config: AssociationConfig,
) -> np.ndarray:
    """The DIAObject index of every DIASource (``-1`` where none), canonically numbered.

    ``x``, ``y``: tangent-plane positions (arcsec); ``err``: 1-sigma position
    error per axis (arcsec, raised to the configured floor; NaN takes the
    floor); ``epoch`` orders the visits in time (ties by ``visit``); ``rank``:
    a unique, stable key per DIASource (its id) that fixes every remaining
    order.
    """
    n = len(x)
    if len(np.unique(rank)) != n:
        raise ValueError("association needs a unique rank (diaSourceId) per DIASource")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    err = position_errors(err, config.position_error_floor_arcsec)
    can_seed = np.asarray(can_seed, dtype=bool)
    if config.method == "cluster":
        labels = _cluster(x, y, can_seed, config.radius_arcsec)
    else:
        labels = _running(x, y, err, epoch, visit, rank, can_seed, config)
    return _canonical(labels, rank)


def _canonical(labels: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Objects renumbered 0.. in the order of their smallest member rank."""
    out = np.full(len(labels), -1, dtype=np.int64)
    used = labels >= 0
    if not used.any():
        return out
    ids, inverse = np.unique(labels[used], return_inverse=True)
    first = np.full(len(ids), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, inverse, rank[used].astype(np.int64))
    new_number = np.empty(len(ids), dtype=np.int64)
    new_number[np.argsort(first, kind="stable")] = np.arange(len(ids))
    out[used] = new_number[inverse]
    return out


def _cluster(x: np.ndarray, y: np.ndarray, can_seed: np.ndarray, radius: float) -> np.ndarray:
    """Friends-of-friends at ``radius``, on a grid instead of every pair.

    Enumerating the pairs costs memory quadratic in a clump's size (a source seen
    in 1000 visits has 500,000 pairs). Cells of side radius / sqrt(2) join their
    own points outright; two cells up to two apart join if their points' bounding
    boxes are within the radius at their farthest, and are checked point by point
    only where the boxes straddle it.
    """
    side = radius / np.sqrt(2.0)
    cx = np.floor((x - x.min()) / side).astype(np.int64)
    cy = np.floor((y - y.min()) / side).astype(np.int64)
    stride = int(cy.max()) + 5
    cells, cell_of = np.unique((cx + 2) * stride + (cy + 2), return_inverse=True)
    order = np.argsort(cell_of, kind="stable")
    starts = np.searchsorted(cell_of[order], np.arange(len(cells) + 1))
    xs, ys = x[order], y[order]
    box = [
        np.minimum.reduceat(xs, starts[:-1]),
        np.maximum.reduceat(xs, starts[:-1]),
        np.minimum.reduceat(ys, starts[:-1]),
        np.maximum.reduceat(ys, starts[:-1]),
    ]
    a_all, b_all = [], []
    for dx in range(0, 3):
        for dy in range(-2, 3):
            if dx == 0 and dy <= 0:
                continue  # each neighbouring pair once
            j = np.searchsorted(cells, cells + dx * stride + dy)
            j = np.minimum(j, len(cells) - 1)
            found = cells[j] == cells + dx * stride + dy
            a_all.append(np.flatnonzero(found))
            b_all.append(j[found])
    a, b = np.concatenate(a_all), np.concatenate(b_all)
    x0, x1, y0, y1 = (v[a] for v in box)
    u0, u1, v0, v1 = (v[b] for v in box)
    near = np.hypot(
        np.maximum(0.0, np.maximum(x0, u0) - np.minimum(x1, u1)),
        np.maximum(0.0, np.maximum(y0, v0) - np.minimum(y1, v1)),
    )
    far = np.hypot(np.maximum(x1, u1) - np.minimum(x0, u0), np.maximum(y1, v1) - np.minimum(y0, v0))
    linked = far <= radius
    for k in np.flatnonzero((near <= radius) & ~linked):
        pa = np.c_[xs[starts[a[k]] : starts[a[k] + 1]], ys[starts[a[k]] : starts[a[k] + 1]]]
        pb = np.c_[xs[starts[b[k]] : starts[b[k] + 1]], ys[starts[b[k]] : starts[b[k] + 1]]]
        d, _ = cKDTree(pa).query(pb, distance_upper_bound=radius * (1 + 1e-12))
        linked[k] = bool(np.isfinite(d).any())
    n_cells = len(cells)
    graph = coo_matrix(
        (np.ones(int(linked.sum())), (a[linked], b[linked])), shape=(n_cells, n_cells)
    )
    _, cell_label = connected_components(graph, directed=False)
    labels = cell_label[cell_of]
    seeded = np.zeros(labels.max() + 1, dtype=bool)
    seeded[labels[can_seed]] = True
    return np.where(seeded[labels], labels, -1).astype(np.int64)


class _Objects:
    """DIAObjects being built: error-weighted position sums and a moving-aware index.

    A KD-tree holds a snapshot of the positions. An object that has moved more
    than ``slack`` since the snapshot, or was created after it, is "loose": it
    is searched in a small tree of the loose objects' current positions, and
    the main tree is searched with the radius widened by ``slack``; the exact
    distance on the current positions decides. So no candidate is missed as
    objects move (dia_pipe's index did not follow them), and the main tree is
    rebuilt only when the loose set outgrows a small tree.
    """

    def __init__(self, capacity: int, slack: float) -> None:
        self.n = 0
        self.visits_seen = 0  # visits matched so far
        self.slack = float(slack)
        self.n_sources = np.zeros(capacity, dtype=np.int64)
        self.born = np.zeros(capacity, dtype=np.int64)  # visits_seen when created
        self.sum_w = np.zeros(capacity)
        self.sum_wx = np.zeros(capacity)
        self.sum_wy = np.zeros(capacity)
        self._snapshot = np.zeros((0, 2))
        self._tree: cKDTree | None = None
        self._loose = np.zeros(capacity, dtype=bool)  # of the objects in the snapshot
        self._n_loose = 0

    def positions(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        sl = slice(0, self.n) if isinstance(idx, slice) else idx
        return np.c_[self.sum_wx[sl] / self.sum_w[sl], self.sum_wy[sl] / self.sum_w[sl]]

    def variance(self, idx: np.ndarray) -> np.ndarray:
        return 1.0 / self.sum_w[idx]

    def detection_rate(self, idx: np.ndarray) -> np.ndarray:
        """How often each object has been seen since it was made: (n + 1) / (visits + 2)."""
        return (self.n_sources[idx] + 1.0) / (self.visits_seen - self.born[idx] + 2.0)

    def add(self, obj: np.ndarray, x: np.ndarray, y: np.ndarray, err: np.ndarray) -> None:
        """Add sources to existing objects ``obj`` (repeats allowed)."""
        if not len(obj):
            return
        w = 1.0 / err**2
        np.add.at(self.sum_w, obj, w)
        np.add.at(self.n_sources, obj, 1)
        np.add.at(self.sum_wx, obj, w * x)
        np.add.at(self.sum_wy, obj, w * y)
        built = np.unique(obj[obj < len(self._snapshot)])
        built = built[~self._loose[built]]
        if len(built):
            moved = np.hypot(*(self.positions(built) - self._snapshot[built]).T)
            newly = built[moved > self.slack]
            self._loose[newly] = True
            self._n_loose += len(newly)

    def create(self, x: np.ndarray, y: np.ndarray, err: np.ndarray) -> np.ndarray:
        """New objects, one per source; returns their indices."""
        new = np.arange(self.n, self.n + len(x))
        self.n += len(x)
        self.n_sources[new], self.born[new] = 1, self.visits_seen
        w = 1.0 / err**2
        self.sum_w[new], self.sum_wx[new], self.sum_wy[new] = w, w * x, w * y
        return new

    def candidates(self, points: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """(source, object) index pairs within ``radius``, sorted by source then object."""
        if self.n == 0 or not len(points):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        n_built = len(self._snapshot)
        if self._n_loose + self.n - n_built > max(2000, n_built // 20):
            self._snapshot = self.positions()
            self._tree = cKDTree(self._snapshot)
            self._loose[:] = False
            self._n_loose, n_built = 0, self.n
        found_s, found_o = [], []
        if self._tree is not None:
            s_part, o_part = _ball_pairs(self._tree, points, radius + self.slack)
            keep = ~self._loose[o_part]  # the loose ones are found below
            found_s.append(s_part[keep])
            found_o.append(o_part[keep])
        loose = np.r_[np.flatnonzero(self._loose[:n_built]), np.arange(n_built, self.n)]
        if len(loose):
            s_part, o_part = _ball_pairs(cKDTree(self.positions(loose)), points, radius)
            found_s.append(s_part)
            found_o.append(loose[o_part])
        s = np.concatenate(found_s)
        o = np.concatenate(found_o)
        d = np.hypot(*(points[s] - self.positions(o)).T) if len(s) else np.zeros(0)
        keep = d <= radius
        s, o = s[keep], o[keep]
        order = np.lexsort((o, s))
        return s[order], o[order]


def _ball_pairs(tree: cKDTree, points: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(point, tree index) pairs within ``radius`` (a ball query: several times faster
    than a dual-tree distance matrix for a small set of points against a large tree)."""
    found = tree.query_ball_point(points, radius, return_sorted=False)
    counts = np.fromiter(map(len, found), dtype=np.int64, count=len(found))
    if not counts.sum():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.repeat(np.arange(len(points)), counts), np.concatenate(found).astype(np.int64)


def _running(
    x: np.ndarray,
    y: np.ndarray,
    err: np.ndarray,
    epoch: np.ndarray,
    visit: np.ndarray,
    rank: np.ndarray,
    can_seed: np.ndarray,
    config: AssociationConfig,
) -> np.ndarray:
    """Sequential and bipartite: visits in time order against the objects so far."""
    order = np.lexsort((rank, visit, epoch))
    visits_sorted = np.asarray(visit)[order]
    starts = np.flatnonzero(np.r_[True, visits_sorted[1:] != visits_sorted[:-1]])
    stops = np.r_[starts[1:], len(order)]
    objects = _Objects(len(x), slack=0.1 * config.radius_arcsec)
    # A DIASource that is no known object is a new one, placed anywhere in the field
    # at the visit's density of DIASources: the likelihood of "unmatched".
    area = max(float(np.ptp(x)) * float(np.ptp(y)), 1.0)
    labels = np.full(len(x), -1, dtype=np.int64)
    for start, stop in zip(starts, stops, strict=True):
        idx = order[start:stop]
        points = np.c_[x[idx], y[idx]]
        s, o = objects.candidates(points, config.radius_arcsec)
        if config.method == "sequential":
            chosen = _match_sequential(s, o, points, objects, len(idx))
        else:
            chosen = _match_bipartite(
                s, o, points, err[idx], objects, len(idx), len(idx) / area, config.max_offset_sigma
            )
        joined = chosen >= 0
        objects.add(chosen[joined], x[idx][joined], y[idx][joined], err[idx][joined])
        objects.visits_seen += 1
        labels[idx[joined]] = chosen[joined]
        seeds = ~joined & can_seed[idx]
        labels[idx[seeds]] = objects.create(x[idx][seeds], y[idx][seeds], err[idx][seeds])
    return labels


def _match_sequential(
    s: np.ndarray, o: np.ndarray, points: np.ndarray, objects: _Objects, n: int
) -> np.ndarray:
    """Each source takes its nearest object (ties: the lower index), shared or not:
    dia_pipe's rule, the radius alone decides."""
    chosen = np.full(n, -1, dtype=np.int64)
    if not len(s):
        return chosen
    d2 = np.sum((points[s] - objects.positions(o)) ** 2, axis=1)
    best = np.lexsort((o, d2, s))
    first = np.r_[True, s[best][1:] != s[best][:-1]]
    chosen[s[best][first]] = o[best][first]
    return chosen


def _match_bipartite(
    s: np.ndarray,
    o: np.ndarray,
    points: np.ndarray,
    err: np.ndarray,
    objects: _Objects,
    n: int,
    new_density: float,
    max_offset_sigma: float,
) -> np.ndarray:
    """Minimum-cost matching of one visit's sources to objects (see the module notes)."""
    chosen = np.full(n, -1, dtype=np.int64)
    if not len(s):
        return chosen
    var = err[s] ** 2 + objects.variance(o)
    d2 = np.sum((points[s] - objects.positions(o)) ** 2, axis=1)
    # Negative log-likelihood ratio of "this object" to "a new object": the Gaussian
    # density of the offset (variance: both errors) times the prior that the object
    # shows up at all (one seen once in forty visits, most likely a false detection,
    # must be much nearer than one seen in most), against the density of new
    # DIASources. A pair is taken only where it is the likelier; a noisy object
    # does not outbid a well-measured one (its log-variance counts against it).
    rate = np.minimum(objects.detection_rate(o), 1.0)
    cost = d2 / (2.0 * var) + np.log(2.0 * np.pi * var) - np.log(rate) + np.log(new_density)
    # Every candidate within the radius beats no match (the radius is the acceptance
    # rule); a pair less likely than a new object is capped just below the unmatched
    # option, so that it is taken only where nothing likelier competes for it.
    cost = np.minimum(cost, -1.0e-9)
    # ... but not one many sigma away: a residual that seeded an object 1" from a real
    # source would otherwise take it (and pull the mean position off).
    near = d2 / var <= max_offset_sigma**2
    s, o, cost = s[near], o[near], cost[near]
    if not len(s):
        return chosen
    # Independent sub-problems: connected components of the candidate graph.
    obj_ids, o_local = np.unique(o, return_inverse=True)
    n_nodes = n + len(obj_ids)
    graph = coo_matrix((np.ones(len(s)), (s, n + o_local)), shape=(n_nodes, n_nodes))
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[s]
    n_comp = comp.max() + 1
    # Sources and objects per component (each node is in one component).
    n_src = np.bincount(comp[np.unique(s)], minlength=n_comp)
    n_obj = np.bincount(comp[n + np.unique(o_local)], minlength=n_comp)
    # A star (one source or one object): the cheapest pair is the whole matching.
    star = np.minimum(n_src, n_obj)[pair_comp] == 1
    idx = np.flatnonzero(star)
    best = idx[np.lexsort((o[idx], s[idx], cost[idx], pair_comp[idx]))]
    first = np.r_[True, pair_comp[best][1:] != pair_comp[best][:-1]] if len(best) else best
    chosen[s[best[first]]] = o[best[first]]
    rest = np.flatnonzero(~star)
    if not len(rest):
        return chosen
    by_comp = rest[np.argsort(pair_comp[rest], kind="stable")]
    bounds = np.flatnonzero(np.r_[True, np.diff(pair_comp[by_comp]) != 0, True])
    for a, b in itertools.pairwise(bounds):
        pairs = by_comp[a:b]
        rows, r_inv = np.unique(s[pairs], return_inverse=True)
        cols, c_inv = np.unique(o[pairs], return_inverse=True)
        matrix = np.zeros((len(rows), len(cols)))  # 0 = the unmatched option
        matrix[r_inv, c_inv] = cost[pairs]
        ri, ci = linear_sum_assignment(matrix)
        real = matrix[ri, ci] < 0
        chosen[rows[ri[real]]] = cols[ci[real]]
    return chosen
