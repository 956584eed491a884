"""Association of DIASources into DIAObjects: the three algorithms and the aggregates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workflow_lib.association.associate import (
    METHODS,
    AssociationConfig,
    associate,
    from_tangent_plane_arcsec,
    tangent_plane_arcsec,
)
from workflow_lib.association.dia_object import dia_object_ids, dia_object_table


def _survey(seed: int, n_objects: int = 60, n_visits: int = 25, n_false: int = 8):
    """True objects >= 3" apart detected with probability 0.7 per visit, plus false positives."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2) * 6.0
    truth = grid[rng.choice(len(grid), n_objects, replace=False)] + rng.uniform(
        -1, 1, (n_objects, 2)
    )
    rows = []
    for visit in range(n_visits):
        seen = np.flatnonzero(rng.random(n_objects) < 0.7)
        err = rng.uniform(0.03, 0.12, len(seen))
        pos = truth[seen] + rng.normal(size=(len(seen), 2)) * err[:, None]
        fp = rng.uniform(-3, 60, (n_false, 2))
        rows.append(
            pd.DataFrame(
                {
                    "x": np.r_[pos[:, 0], fp[:, 0]],
                    "y": np.r_[pos[:, 1], fp[:, 1]],
                    "err": np.r_[err, np.full(n_false, 0.1)],
                    "visit": visit,
                    "epoch": 60000.0 + 3 * visit,
                    "truth": np.r_[seen, np.full(n_false, -1)],
                }
            )
        )
    table = pd.concat(rows, ignore_index=True)
    table["rank"] = np.arange(len(table)) * 7 + 3
    return table


def _labels(table: pd.DataFrame, method: str, can_seed=None, **kw) -> np.ndarray:
    seed = np.ones(len(table), bool) if can_seed is None else can_seed
    return associate(
        table["x"].to_numpy(),
        table["y"].to_numpy(),
        table["err"].to_numpy(),
        table["epoch"].to_numpy(),
        table["visit"].to_numpy(),
        table["rank"].to_numpy(),
        seed,
        AssociationConfig(method=method, **kw),
    )


@pytest.mark.parametrize("method", METHODS)
def test_every_true_object_is_one_dia_object(method):
    """Objects 3"+ apart, 0.03-0.12" errors: each true object's detections are one DIAObject."""
    table = _survey(1)
    labels = _labels(table, method)
    real = table["truth"].to_numpy() >= 0
    for t in np.unique(table["truth"][real]):
        got = np.unique(labels[table["truth"].to_numpy() == t])
        assert len(got) == 1 and got[0] >= 0, (t, got)
        members = table["truth"].to_numpy()[labels == got[0]]
        # Only false positives that happen to fall within 1" may join it.
        assert set(members) <= {t, -1}
    # Labels are 0..n-1 without gaps.
    assert set(labels[labels >= 0]) == set(range(labels.max() + 1))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), method=st.sampled_from(METHODS))
def test_labels_do_not_depend_on_row_order(seed, method):
    table = _survey(seed % 7, n_objects=30, n_visits=8, n_false=10)
    labels = _labels(table, method)
    perm = np.random.default_rng(seed).permutation(len(table))
    shuffled = table.iloc[perm].reset_index(drop=True)
    np.testing.assert_array_equal(_labels(shuffled, method), labels[perm])


def _two_object_case() -> pd.DataFrame:
    """Visit 0 makes objects A (0, 0) and B (0.8, 0); visit 1 has two sources both nearest A
    (errors 0.15": both objects within 5 sigma of the second source)."""
    return pd.DataFrame(
        {
            "x": [0.0, 0.8, -0.05, 0.3],
            "y": [0.0, 0.0, 0.0, 0.0],
            "err": [0.15, 0.15, 0.15, 0.15],
            "visit": [0, 0, 1, 1],
            "epoch": [1.0, 1.0, 2.0, 2.0],
            "rank": [10, 11, 12, 13],
        }
    )


def test_bipartite_gives_one_source_per_object_per_visit_and_the_next_best_joins():
    labels = _labels(_two_object_case(), "bipartite")
    # The source at 0.3" is nearest A but A takes the -0.05" one: it joins B (0.5" away).
    assert labels.tolist() == [0, 1, 0, 1]


def test_sequential_lets_one_object_take_two_sources_of_a_visit():
    """dia_pipe's behaviour (kept for comparison): each source takes its nearest object."""
    assert _labels(_two_object_case(), "sequential").tolist() == [0, 1, 0, 0]


def test_cluster_chains_neighbours():
    table = _two_object_case()
    assert _labels(table, "cluster", radius_arcsec=1.0).tolist() == [0, 0, 0, 0]
    assert _labels(table, "cluster", radius_arcsec=0.4).tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("method", METHODS)
def test_artifacts_join_but_never_seed(method):
    table = pd.DataFrame(
        {
            "x": [0.0, 0.02, 30.0, 30.01],
            "y": [0.0, 0.01, 0.0, 0.0],
            "err": 0.05,
            "visit": [0, 1, 0, 1],
            "epoch": [1.0, 2.0, 1.0, 2.0],
            "rank": [1, 2, 3, 4],
        }
    )
    can_seed = np.array([True, False, False, False])
    assert _labels(table, method, can_seed=can_seed).tolist() == [0, 0, -1, -1]


def test_running_position_follows_the_objects_as_they_move():
    """A slow mover (0.4"/visit, 1" radius, 0.2" errors) stays one object while its mean
    keeps up: the mean and the index move."""
    n = 3000  # past the index's rebuild threshold
    rng = np.random.default_rng(3)
    bg = rng.uniform(100, 2000, (n, 2))
    rows = []
    for v in range(12):
        rows.append(
            pd.DataFrame(
                {
                    "x": np.r_[0.4 * v, bg[:, 0]],
                    "y": np.r_[0.0, bg[:, 1]],
                    "visit": v,
                    "epoch": float(v),
                    "mover": np.r_[True, np.zeros(n, bool)],
                }
            )
        )
    table = pd.concat(rows, ignore_index=True)
    table["err"] = 0.2
    table["rank"] = np.arange(len(table))
    for method in ("sequential", "bipartite"):
        labels = _labels(table, method)
        mover = labels[table["mover"].to_numpy()]
        # The error-weighted mean lags a linear mover by half its span: it keeps up
        # for the first visits, then the source steps out of the radius and a new
        # object starts; what matters is that no visit is lost in between.
        assert len(np.unique(mover)) <= 3 and (np.diff(mover) >= 0).all()
        assert labels.max() + 1 == n + len(np.unique(mover))


def test_rank_must_be_unique():
    table = _two_object_case()
    table["rank"] = 1
    with pytest.raises(ValueError, match="unique rank"):
        _labels(table, "bipartite")


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="method"):
        AssociationConfig(method="nearest")
    with pytest.raises(ValueError, match="radius"):
        AssociationConfig(radius_arcsec=-1.0)


def test_tangent_plane_round_trip():
    ra = np.array([10.0, 10.01, 359.99, 0.02])
    dec = np.array([-30.0, -29.99, -30.02, -30.0])
    xi, eta = tangent_plane_arcsec(ra, dec, 0.0, -30.0)
    back_ra, back_dec = from_tangent_plane_arcsec(xi, eta, 0.0, -30.0)
    np.testing.assert_allclose(back_ra, ra, atol=1e-10)
    np.testing.assert_allclose(back_dec, dec, atol=1e-10)


def test_dia_object_ids_are_unique_and_in_their_own_range():
    a = dia_object_ids(3, 7, 5)
    b = dia_object_ids(3, 8, 5)
    assert len(set(a) | set(b)) == 10 and (a > 0).all()
    assert all(int(i) >> 61 == 1 for i in a)
    with pytest.raises(ValueError):
        dia_object_ids(3, 1 << 16, 1)


def test_dia_object_aggregates_exclude_nans_and_weight_by_errors():
    sources = pd.DataFrame(
        {
            "band": ["g", "g", "g", "r", "r"],
            "midpointMjdTai": [5.0, 1.0, 3.0, 2.0, 4.0],
            "psfFlux": [10.0, 20.0, np.nan, 5.0, 7.0],
            "psfFluxErr": [1.0, 2.0, 1.0, 1.0, np.nan],
        }
    )
    labels = np.array([0, 0, 0, 0, -1])
    xi = np.array([0.0, 0.2, 0.1, 0.0, 9.0])
    eta = np.zeros(5)
    err = np.array([0.1, 0.1, 0.1, 0.2, 0.1])
    table = dia_object_table(
        sources, labels, xi, eta, err, tract=0, patch=1, centre=(50.0, -30.0), bands=["g", "r"]
    )
    assert len(table) == 1
    row = table.iloc[0]
    assert row["nDiaSources"] == 4
    assert (row["firstDiaSourceMjdTai"], row["lastDiaSourceMjdTai"]) == (1.0, 5.0)
    mean = (10 / 1 + 20 / 4) / (1 + 1 / 4)
    assert row["g_psfFluxMean"] == pytest.approx(mean)
    assert row["g_psfFluxMeanErr"] == pytest.approx(1 / np.sqrt(1.25))
    assert row["g_psfFluxNdata"] == 2
    assert row["g_psfFluxSigma"] == pytest.approx(np.std([10, 20], ddof=1))
    assert row["g_psfFluxChi2"] == pytest.approx((10 - mean) ** 2 + (20 - mean) ** 2 / 4)
    assert row["r_psfFluxNdata"] == 1 and np.isnan(row["r_psfFluxSigma"])
    # Error-weighted position: xi = (0 + 0.2 + 0.1) / 3 * 100 + 0 * 25, over 325.
    ra, _ = from_tangent_plane_arcsec(np.array([30.0 / 325.0]), np.array([0.0]), 50.0, -30.0)
    assert row["ra"] == pytest.approx(ra[0], abs=1e-12)


def test_dia_source_table_keeps_64_bit_ids_exact(tmp_path):
    """The consolidated DiaSource gets each diaObjectId bit for bit (no float round trip)."""
    from workflow_lib.io import read_table, write_table
    from workflow_lib.steps.association import dia_source_table
    from workflow_lib.steps.diffim import DIA_SOURCE_COLUMNS, dia_source_ids

    ids = dia_source_ids(400100, 3, 4)
    sources = pd.DataFrame(
        {c: pd.Series(np.zeros(4), dtype=t) for c, t in DIA_SOURCE_COLUMNS.items()}
    )
    sources["diaSourceId"], sources["visit"], sources["detector"] = ids, 400100, 3
    write_table(sources, tmp_path / "diaSrc.parquet")
    object_ids = dia_object_ids(7, 12, 3)
    assoc = pd.DataFrame(
        {"diaSourceId": ids[[3, 0, 1]], "diaObjectId": object_ids, "tract": 7, "patch": 12}
    )
    write_table(assoc, tmp_path / "assoc.parquet")
    out = tmp_path / "DiaSource.parquet"
    dia_source_table(
        input_paths=[str(tmp_path / "diaSrc.parquet")],
        assoc_paths=[str(tmp_path / "assoc.parquet")],
        output_path=str(out),
    )
    table = read_table(out).set_index("diaSourceId")
    assert table.loc[ids[3], "diaObjectId"] == object_ids[0]
    assert table.loc[ids[0], "diaObjectId"] == object_ids[1]
    assert table.loc[ids[2], "diaObjectId"] == 0 and table.loc[ids[2], "tract"] == -1
    assert table["diaObjectId"].dtype == np.int64


@pytest.mark.parametrize("seed", range(5))
def test_cluster_on_the_grid_is_friends_of_friends_exactly(seed):
    """The grid FoF gives the connected components of the every-pair graph."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    n = 2000
    centres = rng.uniform(0, 50, (100, 2))
    spread = rng.uniform(0.05, 0.8, (n, 1))
    points = centres[rng.integers(0, 100, n)] + rng.normal(size=(n, 2)) * spread
    radius = rng.uniform(0.3, 1.5)
    pairs = cKDTree(points).query_pairs(radius, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, reference = connected_components(graph, directed=False)
    table = pd.DataFrame(
        {
            "x": points[:, 0],
            "y": points[:, 1],
            "err": 0.05,
            "visit": 0,
            "epoch": 0.0,
            "rank": np.arange(n),
        }
    )
    labels = _labels(table, "cluster", radius_arcsec=radius)
    # Same partition: a one-to-one map between the two labellings.
    both = pd.DataFrame({"a": labels, "b": reference})
    assert both.groupby("a")["b"].nunique().max() == 1
    assert both.groupby("b")["a"].nunique().max() == 1


def test_a_patch_without_dia_sources_gets_empty_tables(tmp_path):
    """No DIASource in the patch (or none at all): empty DiaObject and map, not an error."""
    from workflow_lib.io import read_table, write_table
    from workflow_lib.io.skymap import write_skymap
    from workflow_lib.static_sky.skymap import discrete_sky_map
    from workflow_lib.steps.association import associate_patch
    from workflow_lib.steps.diffim import DIA_SOURCE_COLUMNS

    sky = discrete_sky_map(
        np.array([56.0, 56.1]),
        np.array([-30.0, -29.9]),
        border_deg=0.01,
        tract_id=0,
        pixel_scale_arcsec=0.2,
        patch_inner_size=1000,
        patch_border=50,
        projection="TAN",
    )
    write_skymap(sky, tmp_path / "skyMap.json")
    empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in DIA_SOURCE_COLUMNS.items()})
    write_table(empty, tmp_path / "diaSrc.parquet")
    section = {
        "enabled": True,
        "method": "bipartite",
        "radius_arcsec": 1.0,
        "position_error_floor_arcsec": 0.05,
        "max_offset_sigma": 10.0,
        "visit": None,
        "band": None,
    }
    objects = associate_patch(
        dia_source_paths=[str(tmp_path / "diaSrc.parquet")],
        skymap_path=str(tmp_path / "skyMap.json"),
        dia_object_path=str(tmp_path / "diaObject.parquet"),
        dia_assoc_path=str(tmp_path / "diaAssoc.parquet"),
        tract=0,
        patch=0,
        bands=["g", "r"],
        association=section,
    )
    assert len(objects) == 0 and "g_psfFluxMean" in objects
    assert len(read_table(tmp_path / "diaAssoc.parquet")) == 0
