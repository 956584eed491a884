"""Light curves of DIAObjects from the DiaForcedSource table (tables in, tables out).

>>> from workflow_lib.io.butler import Butler
>>> lc = Butler("results").light_curve(ra=56.01, dec=-30.02, radius_arcsec=1.0)
>>> plot_light_curve(lc)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from workflow_lib.core.bands import BAND_COLOURS
from workflow_lib.core.sky import tangent_plane_arcsec

LIGHT_CURVE_COLUMNS = (
    "diaObjectId",
    "visit",
    "detector",
    "band",
    "midpointMjdTai",
    "psfDiffFlux",
    "psfDiffFluxErr",
    "psfFlux",
    "psfFluxErr",
    "flags",
    "detected",
)


def objects_near(objects: pd.DataFrame, ra: float, dec: float, radius_arcsec: float) -> np.ndarray:
    """diaObjectIds of the DIAObjects within ``radius_arcsec`` of (ra, dec), nearest first."""
    if not len(objects):
        return np.zeros(0, dtype=np.int64)
    xi, eta = tangent_plane_arcsec(
        objects["ra"].to_numpy(dtype=np.float64),
        objects["dec"].to_numpy(dtype=np.float64),
        float(ra),
        float(dec),
    )
    distance = np.hypot(xi, eta)
    near = np.flatnonzero(distance <= radius_arcsec)
    near = near[np.argsort(distance[near], kind="stable")]
    return objects["diaObjectId"].to_numpy(dtype=np.int64)[near]


def light_curve(
    forced: pd.DataFrame,
    dia_object_ids: Sequence[int] | np.ndarray,
    dia_sources: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Every DiaForcedSource row of the given DIAObjects, sorted by object then time.

    ``detected`` says whether the DIAObject had a DIASource in that visit
    (when ``dia_sources`` is given; otherwise False).
    """
    ids = np.asarray(dia_object_ids, dtype=np.int64)
    rows = forced[forced["diaObjectId"].isin(ids)].copy()
    rows["detected"] = False
    if dia_sources is not None and len(rows):
        seen = dia_sources.loc[dia_sources["diaObjectId"].isin(ids), ["diaObjectId", "visit"]]
        key = pd.MultiIndex.from_frame(rows[["diaObjectId", "visit"]])
        rows["detected"] = key.isin(pd.MultiIndex.from_frame(seen.drop_duplicates()))
    order = {int(i): k for k, i in enumerate(ids)}
    rows["_order"] = rows["diaObjectId"].map(order)
    rows = rows.sort_values(["_order", "midpointMjdTai", "visit", "detector"], kind="stable")
    return rows[list(LIGHT_CURVE_COLUMNS)].reset_index(drop=True)


def plot_light_curve(
    curve: pd.DataFrame, *, ax: Any = None, flux: str = "psfDiffFlux", title: str | None = None
) -> Any:
    """Flux (nJy) against MJD per band with 1-sigma error bars; detected epochs filled.

    ``flux``: ``psfDiffFlux`` (the difference, default) or ``psfFlux`` (direct).
    Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if flux not in ("psfDiffFlux", "psfFlux"):
        raise ValueError(f"flux must be psfDiffFlux or psfFlux, not {flux!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for band, rows in curve.groupby("band", sort=False):
        colour = BAND_COLOURS.get(str(band), None)
        ax.errorbar(
            rows["midpointMjdTai"],
            rows[flux],
            yerr=rows[f"{flux}Err"],
            fmt="none",
            ecolor=colour,
            alpha=0.6,
        )
        detected = rows["detected"].to_numpy(dtype=bool)
        ax.plot(
            rows["midpointMjdTai"][detected],
            rows[flux][detected],
            "o",
            color=colour,
            label=f"{band} (detected)",
        )
        ax.plot(
            rows["midpointMjdTai"][~detected],
            rows[flux][~detected],
            "o",
            color=colour,
            mfc="none",
            label=f"{band} (forced)",
        )
    if flux == "psfDiffFlux":
        ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("MJD (TAI)")
    ax.set_ylabel(f"{flux} (nJy)")
    if title is None and curve["diaObjectId"].nunique() == 1:
        title = f"diaObjectId {int(curve['diaObjectId'].iloc[0])}"
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small", ncol=2)
    return ax
