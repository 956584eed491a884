"""Plan of the static-sky rules (rules/coadd.smk, rules/objects.smk)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

from workflow_lib.plans.base import PlanState


class StaticSkyPlan(PlanState):
    """Sky map, warps, coadds, Objects and forced photometry."""

    # -- static sky: sky map, warps, coadds, Objects, forced photometry ----------------
    # Which patches a CCD feeds is decided here, before any pixel is processed,
    # from the header WCS of every file (registry corners) grown by a margin: the
    # DAG, and so `snakemake -n`, is complete at parse time. A CCD whose fitted
    # WCS misses a listed patch simply writes no warp for it.
    @cached_property
    def skymap(self) -> Any:
        """The sky map: rings (absolute) or discrete (fitted to every science file)."""
        from workflow_lib.static_sky.skymap import discrete_sky_map, rings_sky_map

        cfg = self.cfg.skymap
        common: dict[str, Any] = dict(
            pixel_scale_arcsec=cfg.pixel_scale_arcsec,
            patch_inner_size=cfg.patch_inner_size,
            patch_border=cfg.patch_border,
            projection=cfg.projection,
        )
        if cfg.kind == "rings":
            return rings_sky_map(
                num_rings=cfg.num_rings,
                tract_overlap_deg=cfg.tract_overlap_deg,
                ra_start_deg=cfg.ra_start_deg,
                **common,
            )
        # Fitted to every science file of the registry, not to the selection, so
        # that partitioned runs (by visit range) share one tract and patch grid.
        science = self.registry[self.registry["obstype"] == "science"]
        corners_ra = science[[f"corner_ra_{k}" for k in range(1, 5)]].to_numpy()
        corners_dec = science[[f"corner_dec_{k}" for k in range(1, 5)]].to_numpy()
        return discrete_sky_map(
            corners_ra.ravel(),
            corners_dec.ravel(),
            border_deg=cfg.discrete_border_deg,
            tract_id=cfg.discrete_tract_id,
            **common,
        )

    @cached_property
    def _ccd_patches(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """(visit, detector) -> the selected (tract, patch) pairs it may overlap."""
        from workflow_lib.static_sky.skymap import ccd_patches

        found = ccd_patches(
            self.science, self.skymap, margin_arcsec=self.cfg.skymap.footprint_margin_arcsec
        )
        tracts = self.cfg.select.tracts
        return {
            (int(v), int(d)): sorted(
                (int(t), int(p)) for t, p in pairs if tracts is None or t in tracts
            )
            for (v, d), pairs in found.items()
        }

    @cached_property
    def _band_of_ccd(self) -> dict[tuple[int, int], str]:
        return {
            (int(v), int(d)): str(b)
            for v, d, b in zip(
                self.science["visit"], self.science["detector"], self.science["band"], strict=True
            )
        }

    @cached_property
    def _patch_ccds(self) -> dict[tuple[int, int, str], list[tuple[int, int]]]:
        """(tract, patch, band) -> the CCDs that may overlap it, sorted."""
        out: dict[tuple[int, int, str], list[tuple[int, int]]] = {}
        for ccd, pairs in self._ccd_patches.items():
            band = self._band_of_ccd[ccd]
            for tract, patch in pairs:
                out.setdefault((tract, patch, band), []).append(ccd)
        return {key: sorted(ccds) for key, ccds in sorted(out.items())}

    @cached_property
    def science_bands(self) -> list[str]:
        """Bands of the selected science data: every Object table has columns for each."""
        return sorted(set(self.science["band"]))

    @property
    def coadd_ids(self) -> list[dict[str, Any]]:
        """Data ids of every (tract, patch, band) coadd that holds data."""
        return [{"tract": t, "patch": p, "band": b} for t, p, b in self._patch_ccds]

    @cached_property
    def patch_ids(self) -> list[tuple[int, int]]:
        return sorted({(t, p) for t, p, _ in self._patch_ccds})

    def patch_bands(self, tract: int, patch: int) -> list[str]:
        return sorted(b for t, p, b in self._patch_ccds if (t, p) == (tract, patch))

    @cached_property
    def forced_ids(self) -> list[tuple[int, int, int]]:
        """(visit, detector, tract) of every forced-photometry job."""
        return sorted({(v, d, t) for (v, d), pairs in self._ccd_patches.items() for t, _ in pairs})

    def skymap_definition(self) -> dict[str, Any]:
        """The sky map as JSON (a rule param: a changed sky map re-runs what depends on it)."""
        return self.skymap.to_dict()

    def warp_patches(self, wildcards: Mapping[str, str]) -> list[list[int]]:
        """[tract, patch] pairs the CCD named by ``wildcards`` is warped onto."""
        ccd = (int(wildcards["visit"]), int(wildcards["detector"]))
        return [list(pair) for pair in self._ccd_patches.get(ccd, [])]

    def warp_inputs(self, wildcards: Mapping[str, str]) -> dict[str, str]:
        ids = {"visit": int(wildcards["visit"]), "detector": int(wildcards["detector"])}
        return {
            "calexp_path": str(self.paths.path("calexp", **ids)),
            "ccdvisit_path": str(self.paths.path("ccdVisit", **ids)),
            "skymap_path": str(self.paths.path("skyMap")),
        }

    def _coadd_ccds(self, wildcards: Mapping[str, str]) -> list[tuple[int, int]]:
        key = (int(wildcards["tract"]), int(wildcards["patch"]), str(wildcards["band"]))
        return self._patch_ccds.get(key, [])

    def coadd_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        """Warp directories of the CCDs that may overlap a coadd, and the sky map."""
        return {
            "warp_dirs": [
                str(self.paths.path("warpDir", visit=v, detector=d))
                for v, d in self._coadd_ccds(wildcards)
            ],
            "skymap_path": str(self.paths.path("skyMap")),
        }

    def template_coadd_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        """A coadd's inputs plus the CcdVisit rows the template selection ranks."""
        return {
            **self.coadd_inputs(wildcards),
            "ccdvisit_paths": [
                str(self.paths.path("ccdVisit", visit=v, detector=d))
                for v, d in self._coadd_ccds(wildcards)
            ],
        }

    def objects_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        tract, patch = int(wildcards["tract"]), int(wildcards["patch"])
        return {
            "coadd_paths": [
                str(self.paths.path("deepCoadd", tract=tract, patch=patch, band=b))
                for b in self.patch_bands(tract, patch)
            ],
            "coadd_psf_paths": [
                str(self.paths.path("deepCoaddPsf", tract=tract, patch=patch, band=b))
                for b in self.patch_bands(tract, patch)
            ],
            "skymap_path": str(self.paths.path("skyMap")),
        }

    def forced_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        visit, detector = int(wildcards["visit"]), int(wildcards["detector"])
        tract = int(wildcards["tract"])
        patches = [p for t, p in self._ccd_patches.get((visit, detector), []) if t == tract]
        return {
            "calexp_path": str(self.paths.path("calexp", visit=visit, detector=detector)),
            "object_paths": [
                str(self.paths.path("objectTable", tract=tract, patch=p)) for p in patches
            ],
        }
