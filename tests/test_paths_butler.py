"""Product paths and the reader API."""

import numpy as np
import pandas as pd
import pytest

from workflow_lib.core.exposure import Exposure
from workflow_lib.core.paths import DATASET_TYPES, ProductPaths
from workflow_lib.io import write_table
from workflow_lib.io.butler import Butler
from workflow_lib.io.exposure import write_exposure


def test_path_names_product_and_every_id(tmp_path):
    paths = ProductPaths(tmp_path)
    p = paths.path("calexp", visit=159400, detector=3)
    assert p == tmp_path / "calexp/159400/calexp_159400_3.fits"
    assert paths.parse("calexp", p) == {"visit": 159400, "detector": 3}
    assert paths.parse("calexp", tmp_path / "calexp/159400/calexp_159401_3.fits") is None
    assert paths.pattern("calexp").endswith("calexp/{visit}/calexp_{visit}_{detector}.fits")


def test_bad_data_ids_are_rejected(tmp_path):
    paths = ProductPaths(tmp_path)
    with pytest.raises(KeyError, match="lacks detector"):
        paths.path("calexp", visit=1)
    with pytest.raises(ValueError, match="visit"):
        paths.path("calexp", visit="../1", detector=1)
    with pytest.raises(KeyError, match="unknown dataset type"):
        paths.path("calexpp")


def test_every_template_parses_its_own_paths(tmp_path):
    paths = ProductPaths(tmp_path)
    example = {
        "visit": 12,
        "exposure": 12,
        "detector": 4,
        "band": "r",
        "tract": 0,
        "patch": 7,
        "obstype": "flat",
    }
    for name, dtype in DATASET_TYPES.items():
        data_id = {d: example[d] for d in dtype.dimensions}
        assert paths.parse(name, paths.path(name, **data_id)) == data_id, name


def test_butler_get_and_list(tmp_path):
    butler = Butler(tmp_path)
    rng = np.random.default_rng(1)
    for visit, detector in [(5, 1), (5, 0), (7, 1)]:
        exp = Exposure(rng.normal(size=(8, 9)), np.ones((8, 9)), np.zeros((8, 9)))
        write_exposure(exp, butler.path("calexp", visit=visit, detector=detector))
    listing = butler.list("calexp")
    assert listing.to_dict("records") == [
        {"visit": 5, "detector": 0},
        {"visit": 5, "detector": 1},
        {"visit": 7, "detector": 1},
    ]
    assert butler.get("calexp", visit=7, detector=1).shape == (8, 9)
    write_table(pd.DataFrame({"visit": [5]}), butler.path("CcdVisit"))
    assert butler.get("CcdVisit")["visit"].tolist() == [5]
    assert set(butler.dataset_types()) == {"calexp", "CcdVisit"}
    with pytest.raises(FileNotFoundError, match="calexp \\(visit=9, detector=1\\)"):
        butler.get("calexp", visit=9, detector=1)


def test_the_output_root_is_found_from_a_product_without_dimensions(tmp_path):
    from workflow_lib.core.paths import ProductPaths

    root = tmp_path / "out"
    paths = ProductPaths(root)
    assert ProductPaths.of_product("metrics", paths.path("metrics")).root == root
    assert ProductPaths.of_product("DiaSource", paths.path("DiaSource")).root == root
    with pytest.raises(ValueError, match="not a metrics product"):
        ProductPaths.of_product("metrics", root / "qa" / "other.json")
    with pytest.raises(ValueError, match="ambiguous"):
        ProductPaths.of_product("calexp", paths.path("calexp", visit=1, detector=2))
