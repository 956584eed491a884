"""A small reader API over an output directory (the role of the LSST Butler's get).

>>> from workflow_lib.io.butler import Butler
>>> butler = Butler("results")
>>> butler.list("calexp")                       # data ids present on disk
>>> calexp = butler.get("calexp", visit=159400, detector=1)
>>> ccd = butler.get("CcdVisit")                # a pandas DataFrame
>>> lc = butler.light_curve(dia_object_id=...)  # or ra=, dec=, radius_arcsec=
"""

from __future__ import annotations

import builtins
import json
import os
from typing import Any

import pandas as pd

from workflow_lib.core.paths import DATASET_TYPES, ProductPaths, dataset_type
from workflow_lib.io import read_image_hdus, read_table
from workflow_lib.io.exposure import read_exposure


class Butler:
    """Get products by dataset type and data id; list what exists."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.paths = ProductPaths(output_dir)

    def path(self, name: str, **data_id: Any):
        """Where the product would be (it need not exist)."""
        return self.paths.path(name, **data_id)

    def exists(self, name: str, **data_id: Any) -> bool:
        return self.path(name, **data_id).exists()

    def get(self, name: str, **data_id: Any) -> Any:
        """Read one product.

        Returns an ``Exposure`` (calexps, coadds, difference images), a
        DataFrame (tables, catalogs), ``(primary_header, [(data, header)])``
        (raw and eimage inputs), a dict (JSON records) or the path of a picture.
        """
        path = self.path(name, **data_id)
        if not path.exists():
            ids = ", ".join(f"{k}={v}" for k, v in data_id.items()) or "no data id"
            raise FileNotFoundError(f"{name} ({ids}) does not exist: {path}")
        storage = dataset_type(name).storage
        if storage == "exposure":
            return read_exposure(path)
        if storage in ("table", "csv"):
            return read_table(path)
        if storage == "raw":
            return read_image_hdus(path)
        if storage == "json":
            return json.loads(path.read_text())
        if storage == "coadd_psf":
            from workflow_lib.io.coadd_psf import read_coadd_psf

            return read_coadd_psf(path)
        if storage == "directory":
            return sorted(path.iterdir())
        if storage == "picture":
            return path
        return path.read_text()

    def list(self, name: str) -> pd.DataFrame:
        """Data ids of every instance of ``name`` on disk (one column per dimension)."""
        dims = dataset_type(name).dimensions
        ids = self.paths.existing(name)
        return pd.DataFrame(ids, columns=list(dims))

    def light_curve(
        self,
        dia_object_id: int | None = None,
        *,
        ra: float | None = None,
        dec: float | None = None,
        radius_arcsec: float = 1.0,
    ) -> pd.DataFrame:
        """DiaForcedSource rows of one DIAObject, or of those within a radius of (ra, dec).

        Sorted by DIAObject (nearest first) then time, with band, the difference
        and direct PSF fluxes and whether a DIASource was found at that visit
        (``detected``); plot with
        :func:`workflow_lib.association.light_curves.plot_light_curve`.
        """
        from workflow_lib.association.light_curves import light_curve, objects_near

        if (dia_object_id is None) == (ra is None or dec is None):
            raise ValueError("light_curve: give a dia_object_id, or ra and dec (not both)")
        if dia_object_id is not None:
            ids = [int(dia_object_id)]
        else:
            assert ra is not None and dec is not None
            ids = list(objects_near(self.get("DiaObject"), ra, dec, radius_arcsec))
        return light_curve(self.get("DiaForcedSource"), ids, self.get("DiaSource"))

    def dataset_types(self) -> builtins.list[str]:  # `list` here: the method
        """Names of the dataset types that have at least one product on disk."""
        return [name for name in DATASET_TYPES if len(self.paths.existing(name)) > 0]
