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
    "tangent_plane_arcsec",
]
METHODS = ("sequential", "bipartite", "cluster")
# Pair costs are shifted down by this much, so that a matching with more pairs
# always beats one with fewer: the unmatched option costs 0.
_PAIR_BONUS = 1.0e6


@dataclass(frozen=True)
class AssociationConfig:
    """How DIASources are grouped (the schema's ``association`` section holds the defaults)."""

    method: str = "bipartite"
    radius_arcsec: float = 1.0
    position_error_floor_arcsec: float = 0.05

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"association method must be one of {METHODS}, not {self.method!r}")
        if not self.radius_arcsec > 0:
            raise ValueError(f"association radius must be > 0 arcsec, not {self.radius_arcsec}")
        if not self.position_error_floor_arcsec > 0:
            raise ValueError("association position_error_floor_arcsec must be > 0")


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
    floor = config.position_error_floor_arcsec
    err = np.where(np.isfinite(err), np.maximum(err, floor), floor)
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
    n = len(x)
    pairs = cKDTree(np.c_[x, y]).query_pairs(radius, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    seeded = np.zeros(labels.max() + 1, dtype=bool)
    seeded[labels[can_seed]] = True
    return np.where(seeded[labels], labels, -1).astype(np.int64)


class _Objects:
    """DIAObjects being built: error-weighted position sums and a moving-aware index.

    The KD-tree is built over a snapshot of the positions; queries widen the
    radius by the largest drift since the snapshot and check the exact
    distance on the current positions, so no candidate is missed as objects
    move; objects created since the snapshot are searched in a small tree of
    their own. The index is rebuilt when either grows large.
    """

    def __init__(self, capacity: int) -> None:
        self.n = 0
        self.sum_w = np.zeros(capacity)
        self.sum_wx = np.zeros(capacity)
        self.sum_wy = np.zeros(capacity)
        self._snapshot = np.zeros((0, 2))
        self._tree: cKDTree | None = None
        self._drift = 0.0

    def positions(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        sl = slice(0, self.n) if isinstance(idx, slice) else idx
        return np.c_[self.sum_wx[sl] / self.sum_w[sl], self.sum_wy[sl] / self.sum_w[sl]]

    def variance(self, idx: np.ndarray) -> np.ndarray:
        return 1.0 / self.sum_w[idx]

    def add(self, obj: np.ndarray, x: np.ndarray, y: np.ndarray, err: np.ndarray) -> None:
        """Add sources to existing objects ``obj`` (repeats allowed)."""
        if not len(obj):
            return
        built = obj[obj < len(self._snapshot)]
        w = 1.0 / err**2
        np.add.at(self.sum_w, obj, w)
        np.add.at(self.sum_wx, obj, w * x)
        np.add.at(self.sum_wy, obj, w * y)
        if len(built):
            moved = np.hypot(*(self.positions(built) - self._snapshot[built]).T)
            self._drift = max(self._drift, float(moved.max()))

    def create(self, x: np.ndarray, y: np.ndarray, err: np.ndarray) -> np.ndarray:
        """New objects, one per source; returns their indices."""
        new = np.arange(self.n, self.n + len(x))
        self.n += len(x)
        w = 1.0 / err**2
        self.sum_w[new], self.sum_wx[new], self.sum_wy[new] = w, w * x, w * y
        return new

    def candidates(self, points: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """(source, object) index pairs within ``radius``, sorted by source then object."""
        if self.n == 0 or not len(points):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        n_built = len(self._snapshot)
        if self._drift > 0.5 * radius or self.n - n_built > max(1000, n_built // 5):
            self._snapshot = self.positions()
            self._tree = cKDTree(self._snapshot) if self.n else None
            self._drift, n_built = 0.0, self.n
        src_tree = cKDTree(points)
        found_s, found_o = [], []
        if self._tree is not None and n_built:
            pairs = src_tree.sparse_distance_matrix(
                self._tree, radius + self._drift, output_type="ndarray"
            )
            found_s.append(pairs["i"].astype(np.int64))
            found_o.append(pairs["j"].astype(np.int64))
        if self.n > n_built:
            recent = cKDTree(self.positions(np.arange(n_built, self.n)))
            pairs = src_tree.sparse_distance_matrix(recent, radius, output_type="ndarray")
            found_s.append(pairs["i"].astype(np.int64))
            found_o.append(pairs["j"].astype(np.int64) + n_built)
        s = np.concatenate(found_s) if found_s else np.zeros(0, np.int64)
        o = np.concatenate(found_o) if found_o else np.zeros(0, np.int64)
        d = np.hypot(*(points[s] - self.positions(o)).T) if len(s) else np.zeros(0)
        keep = d <= radius
        s, o = s[keep], o[keep]
        order = np.lexsort((o, s))
        return s[order], o[order]


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
    objects = _Objects(len(x))
    labels = np.full(len(x), -1, dtype=np.int64)
    match = _match_sequential if config.method == "sequential" else _match_bipartite
    for start, stop in zip(starts, stops, strict=True):
        idx = order[start:stop]
        points = np.c_[x[idx], y[idx]]
        s, o = objects.candidates(points, config.radius_arcsec)
        chosen = match(s, o, points, err[idx], objects, len(idx))
        joined = chosen >= 0
        objects.add(chosen[joined], x[idx][joined], y[idx][joined], err[idx][joined])
        labels[idx[joined]] = chosen[joined]
        seeds = ~joined & can_seed[idx]
        labels[idx[seeds]] = objects.create(x[idx][seeds], y[idx][seeds], err[idx][seeds])
    return labels


def _match_sequential(
    s: np.ndarray, o: np.ndarray, points: np.ndarray, err: np.ndarray, objects: _Objects, n: int
) -> np.ndarray:
    """Each source takes its nearest object (ties: the lower index), shared or not."""
    chosen = np.full(n, -1, dtype=np.int64)
    if not len(s):
        return chosen
    d2 = np.sum((points[s] - objects.positions(o)) ** 2, axis=1)
    best = np.lexsort((o, d2, s))
    first = np.r_[True, s[best][1:] != s[best][:-1]]
    chosen[s[best][first]] = o[best][first]
    return chosen


def _match_bipartite(
    s: np.ndarray, o: np.ndarray, points: np.ndarray, err: np.ndarray, objects: _Objects, n: int
) -> np.ndarray:
    """Minimum-cost matching of one visit's sources to objects, most pairs first."""
    chosen = np.full(n, -1, dtype=np.int64)
    if not len(s):
        return chosen
    var = err[s] ** 2 + objects.variance(o)
    d2 = np.sum((points[s] - objects.positions(o)) ** 2, axis=1)
    cost = d2 / (2.0 * var) + np.log(2.0 * np.pi * var) - _PAIR_BONUS
    # Independent sub-problems: connected components of the candidate graph.
    obj_ids, o_local = np.unique(o, return_inverse=True)
    n_nodes = n + len(obj_ids)
    graph = coo_matrix((np.ones(len(s)), (s, n + o_local)), shape=(n_nodes, n_nodes))
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[s]
    size = np.bincount(pair_comp, minlength=comp.max() + 1)
    single = size[pair_comp] == 1  # one source, one object, one pair: it is the match
    chosen[s[single]] = o[single]
    rest = np.flatnonzero(~single)
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
