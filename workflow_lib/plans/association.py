"""Plan of the association rules (rules/association.smk)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from workflow_lib.plans.base import PlanState


class AssociationPlan(PlanState):
    """Association per patch and DIA forced photometry per CCD."""

    if TYPE_CHECKING:
        # Provided by the sibling plans WorkflowPlan is made of (for the type checker only).
        @property
        def _patch_ccds(self) -> dict[tuple[int, int, str], list[tuple[int, int]]]: ...

        @property
        def coadd_ids(self) -> list[dict[str, Any]]: ...

        @property
        def patch_ids(self) -> list[tuple[int, int]]: ...

        @property
        def forced_ids(self) -> list[tuple[int, int, int]]: ...

        def warp_patches(self, wildcards: Mapping[str, str]) -> list[list[int]]: ...

        def per_ccd_paths(
            self, name: str, ccds: Sequence[tuple[int, int]] | None = None
        ) -> list[str]: ...

    # -- association per patch, DIA forced photometry per CCD ---------------------------
    @property
    def association_enabled(self) -> bool:
        return self.cfg.diffim.enabled and self.cfg.association.enabled

    def association_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        """DIASources of every CCD (any band) that may overlap the patch, and the sky map."""
        tract, patch = int(wildcards["tract"]), int(wildcards["patch"])
        ccds = sorted(
            {
                ccd
                for (t, p, _), found in self._patch_ccds.items()
                if (t, p) == (tract, patch)
                for ccd in found
            }
        )
        return {
            "dia_source_paths": self.per_ccd_paths("diaSrc", ccds),
            "skymap_path": str(self.paths.path("skyMap")),
        }

    def dia_forced_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        """Calexp, difference image, CcdVisit row and the DIAObjects of every patch it overlaps."""
        ids = {"visit": int(wildcards["visit"]), "detector": int(wildcards["detector"])}
        return {
            "calexp_path": str(self.paths.path("calexp", **ids)),
            "difference_path": str(self.paths.path("differenceExp", **ids)),
            "ccdvisit_path": str(self.paths.path("ccdVisit", **ids)),
            "dia_object_paths": [
                str(self.paths.path("diaObjectTable", tract=t, patch=p))
                for t, p in self.warp_patches(wildcards)
            ],
        }

    def coadd_paths(self) -> list[str]:
        """Every deep and template coadd (the run summary reports made and skipped ones)."""
        return [
            str(self.paths.path(kind, **ids))
            for kind in ("deepCoadd", "templateCoadd")
            for ids in self.coadd_ids
        ]

    def per_patch_paths(self, name: str) -> list[str]:
        return [str(self.paths.path(name, tract=t, patch=p)) for t, p in self.patch_ids]

    def forced_paths(self) -> list[str]:
        return [
            str(self.paths.path("forcedSource", visit=v, detector=d, tract=t))
            for v, d, t in self.forced_ids
        ]
