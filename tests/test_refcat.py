"""Reference catalog: standard columns, clear errors, HEALPix shards and cone loading."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from workflow_lib.core.config import RefcatColumns
from workflow_lib.io import read_table, write_csv
from workflow_lib.single_frame.refcat import (
    angular_separation_deg,
    calibration_stars,
    healpix_index,
    nside_for_size,
    shards_for_region,
    standardize_refcat,
)
from workflow_lib.steps.refcat import load_refcat_region, read_manifest, shard_refcat

DEFAULT = RefcatColumns(
    id="id", ra="ra", dec="dec", is_star="is_star", is_variable="is_variable", mags={}, mag_errs={}
)
PHOSIM = {
    "id": "uniqueId",
    "ra": "raJ2000",
    "dec": "decJ2000",
    "is_star": "starnotgal",
    "is_variable": "isvariable",
    "mags": {"g": "lsst_g", "r": "lsst_r", "i": "lsst_i"},
    "mag_errs": {},
}


def default_table(rng: np.random.Generator, n: int = 50) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": np.arange(n) + 10,
            "ra": rng.uniform(10, 11, n),
            "dec": rng.uniform(-1, 1, n),
            "g": rng.uniform(15, 22, n),
            "r": rng.uniform(15, 22, n),
            "r_err": np.full(n, 0.01),
        }
    )


@pytest.fixture(scope="module")
def tiny_refcat(tmp_path_factory):
    """The built-in tiny survey's phoSim-layout refcat as written by the simulator."""
    from workflow_lib.sim.presets import get_preset
    from workflow_lib.sim.scene import make_scene
    from workflow_lib.sim.survey import plan_survey
    from workflow_lib.sim.truth import reference_catalog

    plan = plan_survey(get_preset("tiny"), 7)
    scene = make_scene(plan)
    path = tmp_path_factory.mktemp("refcat") / "refcat_phosim.csv"
    write_csv(reference_catalog(plan, scene), path, header_prefix="#")
    return path, scene


# -------------------------------------------------------------- standardize
def test_standardize_default_layout():
    rng = np.random.default_rng(1)
    out = standardize_refcat(default_table(rng), DEFAULT)
    assert list(out.columns) == [
        "id",
        "ra",
        "dec",
        "g_mag",
        "g_mag_err",
        "r_mag",
        "r_mag_err",
        "is_star",
        "is_variable",
    ]
    assert out["id"].dtype == np.int64 and out["is_star"].all() and not out["is_variable"].any()
    assert out["g_mag_err"].isna().all() and (out["r_mag_err"] == 0.01).all()
    only_r = standardize_refcat(default_table(rng), DEFAULT, bands=["r"])
    assert "g_mag" not in only_r and "r_mag" in only_r


def test_standardize_phosim_layout(tiny_refcat):
    path, scene = tiny_refcat
    raw = read_table(path)
    out = standardize_refcat(raw, RefcatColumns.from_dict(PHOSIM), source=str(path))
    assert len(out) == len(raw)
    assert (out["is_star"].to_numpy() == (raw["starnotgal"] == 1).to_numpy()).all()
    assert (out["is_variable"].to_numpy() == (raw["isvariable"] == 1).to_numpy()).all()
    # CatSim's sigma_lsst_r is picked up as the error column.
    assert np.allclose(out["r_mag_err"], raw["sigma_lsst_r"])
    cal = calibration_stars(out)
    assert cal["is_star"].all() and not cal["is_variable"].any()
    kinds = scene.set_index("id").loc[cal["id"], "kind"]
    assert (kinds == "star").all() and len(cal) == ((out["is_star"]) & ~out["is_variable"]).sum()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop(columns="ra"), "cat.csv: missing ra column 'ra'"),
        (lambda t: t.assign(ra=t["ra"].astype(str).where(t.index > 0, "ten")), "not numeric"),
        (lambda t: t.assign(ra=t["ra"] + 355.0), r"outside \[0, 360\)"),
        (lambda t: t.assign(dec=t["dec"] - 90.0), r"outside \[-90, 90\]"),
        (lambda t: t.iloc[:0], "no rows"),
        (lambda t: t.drop(columns=["g", "r"]), "no magnitude column"),
        (lambda t: t.assign(is_star="maybe"), "not a flag"),
    ],
)
def test_standardize_errors_name_the_file_and_problem(change, message):
    rng = np.random.default_rng(2)
    table = change(default_table(rng))
    with pytest.raises(ValueError, match=message) as err:
        standardize_refcat(table, DEFAULT, source="cat.csv")
    assert str(err.value).startswith("cat.csv: ")


def test_missing_mapped_magnitude_column():
    rng = np.random.default_rng(3)
    cols = RefcatColumns.from_dict({**PHOSIM, "id": "id", "ra": "ra", "dec": "dec"})
    with pytest.raises(ValueError, match="missing magnitude column 'lsst_g'"):
        standardize_refcat(default_table(rng), cols, source="x.fits")


# --------------------------------------------------------------- healpix
def test_shards_for_region_contain_every_point_of_the_cone():
    """Property: any point within the cone lies in one of the returned shards."""
    rng = np.random.default_rng(4)
    for nside in (16, 64, 256):
        for ra0, dec0 in [(0.05, 0.0), (359.95, -30.0), (120.0, 89.9), (200.0, -89.5)]:
            radius = rng.uniform(0.05, 1.0)
            shards = set(shards_for_region(ra0, dec0, radius, nside=nside))
            # Random points on the sphere near the centre, kept if inside the cone.
            dra = rng.uniform(-180, 180, 20000)
            ddec = rng.uniform(-2 * radius, 2 * radius, 20000)
            ra = np.mod(ra0 + dra, 360.0)
            dec = np.clip(dec0 + ddec, -90.0, 90.0)
            inside = angular_separation_deg(ra, dec, ra0, dec0) <= radius
            pix = healpix_index(ra[inside], dec[inside], nside=nside)
            assert set(pix.tolist()) <= shards
            pixel_area = 41253.0 / (12 * nside**2)  # deg^2
            assert len(shards) < 3 * np.pi * (radius + 1.5 * pixel_area**0.5) ** 2 / pixel_area
    assert nside_for_size(0.5) == 64 and nside_for_size(3.0) == 16
    with pytest.raises(ValueError, match="power of 2"):
        healpix_index(np.zeros(1), np.zeros(1), nside=3)


# ------------------------------------------------------------------ the step
def test_shard_and_load_phosim_refcat(tiny_refcat, tmp_path):
    path, _ = tiny_refcat
    out = tmp_path / "shards"
    shard_refcat(refcat_path=str(path), columns=PHOSIM, output_dir=str(out), nside=256)
    manifest = read_manifest(out)
    assert manifest["nside"] == 256 and manifest["bands"] == ["g", "r", "i"]
    assert sum(manifest["counts"].values()) == manifest["n_rows"] == len(read_table(path))
    assert sorted(p.name for p in out.glob("refcat_*.parquet")) == sorted(
        f"refcat_{p}.parquet" for p in manifest["shards"]
    )
    full = standardize_refcat(read_table(path), RefcatColumns.from_dict(PHOSIM))
    ra0, dec0 = float(full["ra"].median()), float(full["dec"].median())
    for radius in (0.01, 0.03, 0.2):
        got = load_refcat_region(shard_dir=str(out), ra=ra0, dec=dec0, radius_deg=radius)
        want = full[angular_separation_deg(full["ra"], full["dec"], ra0, dec0) <= radius]
        assert set(got["id"]) == set(want["id"])
        assert list(got.columns) == list(full.columns)
    # A cone away from the catalog is empty, not an error.
    empty = load_refcat_region(shard_dir=str(out), ra=ra0 + 90, dec=0.0, radius_deg=0.2)
    assert len(empty) == 0 and list(empty.columns) == list(full.columns)
    # Rerun at another nside through the rule's manifest path: stale shards go away.
    shard_refcat(
        refcat_path=str(path), columns=PHOSIM, manifest_path=str(out / "manifest.json"), nside=64
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["nside"] == 64
    assert len(list(out.glob("refcat_*.parquet"))) == len(manifest["shards"])


def test_fits_refcat_big_endian_and_defaults(tmp_path):
    rng = np.random.default_rng(5)
    table = default_table(rng)
    t = Table.from_pandas(table)
    for name in t.colnames:
        t[name] = t[name].astype(t[name].dtype.newbyteorder(">"))
    path = tmp_path / "cat.fits"
    t.write(path)
    shard_refcat(refcat_path=str(path), columns={}, output_dir=str(tmp_path / "s"), nside=32)
    got = load_refcat_region(shard_dir=str(tmp_path / "s"), ra=10.5, dec=0.0, radius_deg=3.0)
    assert len(got) == len(table) and got["ra"].dtype.byteorder in "=|"
    assert np.allclose(np.sort(got["r_mag"]), np.sort(table["r"]))


def test_bad_refcat_and_missing_manifest(tmp_path):
    rng = np.random.default_rng(6)
    table = default_table(rng).drop(columns="dec")
    write_csv(table, tmp_path / "bad.csv")
    with pytest.raises(ValueError, match=r"bad\.csv: missing dec column 'dec'"):
        shard_refcat(
            refcat_path=str(tmp_path / "bad.csv"),
            columns={},
            nside=32,
            output_dir=str(tmp_path / "s"),
        )
    assert not (tmp_path / "s" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_refcat_region(shard_dir=str(tmp_path / "s"), ra=0.0, dec=0.0, radius_deg=1.0)
