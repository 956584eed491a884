"""Plan of the difference-imaging rules (rules/diffim.smk)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from workflow_lib.core.config import ConfigError
from workflow_lib.plans.base import PlanState


class DiffimPlan(PlanState):
    """One subtraction per calexp against the template coadds it overlaps."""

    if TYPE_CHECKING:
        # Provided by the sibling plans WorkflowPlan is made of (for the type checker only).
        @property
        def association_enabled(self) -> bool: ...

        @property
        def science_ids(self) -> list[tuple[int, int]]: ...

        @property
        def _band_of_ccd(self) -> dict[tuple[int, int], str]: ...

        @property
        def _ccd_patches(self) -> dict[tuple[int, int], list[tuple[int, int]]]: ...

        def warp_patches(self, wildcards: Mapping[str, str]) -> list[list[int]]: ...

        def warp_inputs(self, wildcards: Mapping[str, str]) -> dict[str, str]: ...

        def per_ccd_paths(
            self, name: str, ccds: Sequence[tuple[int, int]] | None = None
        ) -> list[str]: ...

    # -- difference imaging: one job per calexp against the template coadds it overlaps --
    def diffim_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        """The calexp, its CcdVisit row, the sky map and its band's template coadds with
        their coadd PSFs (which say whose pixels each template holds)."""
        ids = {"visit": int(wildcards["visit"]), "detector": int(wildcards["detector"])}
        band = self._band_of_ccd[(ids["visit"], ids["detector"])]
        patches = self.warp_patches(wildcards)
        return {
            **self.warp_inputs(wildcards),
            "src_path": str(self.paths.path("src", **ids)),
            "template_paths": [
                str(self.paths.path("templateCoadd", tract=t, patch=p, band=band))
                for t, p in patches
            ],
            "template_psf_paths": [
                str(self.paths.path("templateCoaddPsf", tract=t, patch=p, band=band))
                for t, p in patches
            ],
        }

    def subtraction_section(self) -> dict[str, Any]:
        """The ``diffim`` section for subtraction's ``params:``, without the injection
        settings: turning injection on reruns the injection, not the subtraction."""
        return {k: v for k, v in self.config["diffim"].items() if k != "injection"}

    def injection_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        """What subtraction read, and what it made: the run's difference image, its
        DIASources (kept clear of) and its record (was the CCD-visit differenced)."""
        ids = {"visit": int(wildcards["visit"]), "detector": int(wildcards["detector"])}
        return {
            **self.diffim_inputs(wildcards),
            "difference_path": str(self.paths.path("differenceExp", **ids)),
            "dia_source_path": str(self.paths.path("diaSrc", **ids)),
            "dia_ccd_path": str(self.paths.path("diaCcd", **ids)),
        }

    def _check_template_window(self) -> None:
        """Stop before any job when the template's MJD window holds no science exposure.

        Every template coadd would be empty and every subtraction a skip; the
        window is known from the registry, so the run need not find out per CCD.
        The window is judged on exposure midpoints, as the template selection does,
        over every science exposure of the registry, not only the selected ones: a
        partition of late visits (docs/hpc.md) is no error, its CCDs are recorded skips.
        """
        window = self.cfg.template
        science = self.registry[self.registry["obstype"] == "science"]
        midpoints = science["mjd"] + 0.5 * science["exptime"] / 86400.0
        if not any(window.in_window(float(mjd)) for mjd in midpoints):
            raise ConfigError(
                f"config: template: the window mjd_min={window.mjd_min}, "
                f"mjd_max={window.mjd_max} holds none of the {midpoints.size} science "
                f"exposures (MJD {midpoints.min():.3f} to {midpoints.max():.3f}): difference "
                "imaging would have no template"
            )

    def diffim_ccd_ids(self) -> list[tuple[int, int]]:
        """Science CCDs that overlap at least one patch (the others have no template)."""
        return [ccd for ccd in self.science_ids if self._ccd_patches.get(ccd)]

    def diffim_paths(self, name: str) -> list[str]:
        return self.per_ccd_paths(name, self.diffim_ccd_ids())

    def summary_dia_inputs(self) -> dict[str, str]:
        """The difference-imaging tables the run summary reports, where those stages run."""
        if not self.cfg.diffim.enabled:
            return {}
        inputs = {
            "dia_ccd_table_path": str(self.paths.path("DiaCcdVisit")),
            "dia_source_table_path": str(self.paths.path("DiaSource")),
        }
        if self.association_enabled:
            inputs["dia_object_table_path"] = str(self.paths.path("DiaObject"))
        return inputs
