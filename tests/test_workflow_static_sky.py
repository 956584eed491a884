"""The static-sky part of the DAG, decided at parse time: patches, coadds, forced jobs."""

from __future__ import annotations

import numpy as np
import pytest

from workflow_lib.static_sky.skymap import ccd_corners
from workflow_lib.workflow import WorkflowPlan

TINY = {"sim": {"preset": "tiny", "seed": 7}, "skymap": {"patch_inner_size": 800}}


def plan_for(**sections: object) -> WorkflowPlan:
    config = {**TINY, **sections}
    return WorkflowPlan(config)


def test_every_ccd_feeds_the_patches_its_footprint_meets():
    plan = plan_for()
    sky = plan.skymap
    assert plan.patch_ids, "the tiny survey holds data"
    ra, dec = ccd_corners(plan.science)
    ccds = zip(plan.science["visit"], plan.science["detector"], strict=True)
    for i, (visit, detector) in enumerate(ccds):
        listed = {tuple(p) for p in plan.warp_patches({"visit": visit, "detector": detector})}
        # Dense points inside the CCD (bilinear in the corner polygon) fall in listed patches.
        u, v = np.meshgrid(np.linspace(0, 1, 9), np.linspace(0, 1, 9))
        c_ra, c_dec = ra[i], dec[i]
        pts_ra = (1 - u) * (1 - v) * c_ra[0] + u * (1 - v) * c_ra[1] + u * v * c_ra[2]
        pts_ra += (1 - u) * v * c_ra[3]
        pts_dec = (1 - u) * (1 - v) * c_dec[0] + u * (1 - v) * c_dec[1] + u * v * c_dec[2]
        pts_dec += (1 - u) * v * c_dec[3]
        tract = sky.tract(0)
        x, y = tract.sky_to_pixel(pts_ra.ravel(), pts_dec.ravel())
        for xi, yi in zip(x, y, strict=True):
            hits = {
                (0, p.patch)
                for p in (tract.patch(k) for k in range(np.prod(tract.n_patches)))
                if p.outer_bbox[0] - 0.5 <= xi < p.outer_bbox[0] + p.outer_bbox[2] - 0.5
                and p.outer_bbox[1] - 0.5 <= yi < p.outer_bbox[1] + p.outer_bbox[3] - 0.5
            }
            assert hits and hits <= listed, (visit, detector, xi, yi)


def test_coadds_exist_only_for_bands_that_reach_a_patch():
    plan = plan_for()
    for ids in plan.coadd_ids:
        inputs = plan.coadd_inputs({k: str(v) for k, v in ids.items()})
        assert inputs["warp_dirs"]
        visits = {int(p.rsplit("_", 2)[-2]) for p in inputs["warp_dirs"]}
        bands = set(plan.science.loc[plan.science["visit"].isin(visits), "band"])
        assert bands == {ids["band"]}


def test_visit_selection_keeps_the_discrete_sky_map():
    # Partitions by visit range must share one tract and patch grid.
    whole = plan_for()
    part = plan_for(select={"visit": [int(whole.science["visit"].iloc[0])]})
    assert part.skymap_definition() == whole.skymap_definition()
    assert set(part.patch_ids) <= set(whole.patch_ids)


def test_tract_selection_narrows_coadds_and_forced_jobs():
    plan = plan_for(skymap={"kind": "rings", "patch_inner_size": 800})
    tracts = sorted({t for t, _ in plan.patch_ids})
    assert tracts, "rings sky map: the tiny survey lies in some tract"
    rings = {"kind": "rings", "patch_inner_size": 800}
    chosen = plan_for(skymap=rings, select={"tract": tracts[0]})
    assert {t for t, _ in chosen.patch_ids} == {tracts[0]}
    assert {t for _, _, t in chosen.forced_ids} == {tracts[0]}
    with pytest.raises(KeyError):
        chosen.skymap.tract(10**9)
