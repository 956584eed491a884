"""Plan of the quality-assessment rules (rules/qa.smk): metrics and the report's figures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from workflow_lib.plans.base import PlanState


class QaPlan(PlanState):
    """The run's metrics.json and the figures ``snakemake --report`` gathers."""

    if TYPE_CHECKING:
        # Provided by the sibling plans WorkflowPlan is made of (for the type checker only).
        @property
        def association_enabled(self) -> bool: ...

        @property
        def patch_ids(self) -> list[tuple[int, int]]: ...

        def patch_bands(self, tract: int, patch: int) -> list[str]: ...

    @property
    def qa_enabled(self) -> bool:
        return bool(self.config["qa"]["enabled"])

    def _table(self, name: str) -> str:
        return str(self.paths.path(name))

    def _truth_inputs(self) -> dict[str, str]:
        if not self.simulated:
            return {}
        names = ("truth_object", "truth_ccdvisit", "truth_lightcurve")
        return {f"{n}_path": str(self.paths.path(n)) for n in names}

    def _dia_inputs(self) -> dict[str, str]:
        inputs: dict[str, str] = {}
        if self.cfg.diffim.enabled:
            inputs["dia_source_table_path"] = self._table("DiaSource")
            inputs["dia_ccd_table_path"] = self._table("DiaCcdVisit")
            if self.cfg.diffim.injection:
                inputs["dia_injection_table_path"] = self._table("DiaInjection")
        if self.association_enabled:
            inputs["dia_object_table_path"] = self._table("DiaObject")
            inputs["dia_forced_table_path"] = self._table("DiaForcedSource")
        return inputs

    def metrics_inputs(self, wildcards: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Every consolidated table (and, for a simulated survey, the truth)."""
        return {
            "ccdvisit_table_path": self._table("CcdVisit"),
            "source_table_path": self._table("Source"),
            "object_table_path": self._table("Object"),
            "forced_table_path": self._table("ForcedSource"),
            **self._dia_inputs(),
            **self._truth_inputs(),
        }

    def color_image_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        """A patch's deep and template coadds of every band, and its Objects."""
        tract, patch = int(wildcards["tract"]), int(wildcards["patch"])
        bands = self.patch_bands(tract, patch)
        ids = {"tract": tract, "patch": patch}
        return {
            "deep_paths": [str(self.paths.path("deepCoadd", **ids, band=b)) for b in bands],
            "template_paths": [str(self.paths.path("templateCoadd", **ids, band=b)) for b in bands],
            "object_table_path": str(self.paths.path("objectTable", **ids)),
        }

    def qa_targets(self) -> list[str]:
        """The QA products of ``rule all``."""
        if not self.qa_enabled:
            return []
        names = ["metrics", "qaCcdVisitPlot", "qaFailedCcds"]
        if self.cfg.diffim.enabled:
            names.append("qaDiaCutouts")
        if self.association_enabled:
            names.append("qaLightCurves")
        if self.cfg.diffim.enabled and self.cfg.diffim.injection:
            names.append("qaInjectionPlot")
        if self.simulated:
            names.append("qaTruthPlot")
        targets = [str(self.paths.path(n)) for n in names]
        targets += [
            str(self.paths.path("qaColorImage", tract=t, patch=p)) for t, p in self.patch_ids
        ]
        return targets
