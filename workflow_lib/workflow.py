"""What the Snakefile needs at parse time: the validated config and the registry.

The DAG is driven by the exposure registry, built *before* the DAG so that
``snakemake -n`` lists every job:

* ``simulated``: the survey plan of the built-in simulator (no pixels needed);
* ``raw`` / ``eimage``: a header scan of ``input.raw_dir``, cached per file, or
  a registry written beforehand by ``dc2-drp ingest`` (``input.registry``).

Path and data-id logic lives here, where pytest reaches it, not in ``rules/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from workflow_lib.core.config import ConfigError, WorkflowConfig, validate_config
from workflow_lib.core.paths import ProductPaths
from workflow_lib.core.registry import as_registry, select_calibrations, select_science
from workflow_lib.plans.association import AssociationPlan
from workflow_lib.plans.diffim import DiffimPlan
from workflow_lib.plans.qa import QaPlan
from workflow_lib.plans.single_frame import SingleFramePlan
from workflow_lib.plans.static_sky import StaticSkyPlan


class WorkflowPlan(SingleFramePlan, StaticSkyPlan, DiffimPlan, AssociationPlan, QaPlan):
    """The validated configuration, the registry and the products to make.

    Each stage's rules find what they need in that stage's plan (``workflow_lib.plans``).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config: dict[str, Any] = with_simulated_template_season(validate_config(config))
        self.cfg = WorkflowConfig.from_dict(self.config)
        self.paths = ProductPaths(self.cfg.output_dir)
        self.registry = self._build_registry()
        self.science = select_science(self.registry, self.cfg.select)
        if self.science.empty:
            raise ConfigError(
                "config: select: keeps no science exposure "
                f"(the registry has {int((self.registry['obstype'] == 'science').sum())})"
            )
        self.calibrations = select_calibrations(self.registry, self.science)
        if self.cfg.diffim.enabled:
            self._check_template_window()

    # -- registry ---------------------------------------------------------------
    @property
    def simulated(self) -> bool:
        return self.cfg.input.source == "simulated"

    @property
    def image_format(self) -> str:
        return self.cfg.image_format

    @property
    def raw_dir(self) -> str:
        """Directory holding the input files."""
        if self.simulated:
            name = "sim_raw" if self.image_format == "raw" else "sim_eimage"
            template = self.paths.pattern(name)
            return template[: template.index("{")].rstrip("/")
        return str(self.cfg.input.raw_dir)

    @cached_property
    def _survey_plan(self) -> Any:
        from workflow_lib.sim.presets import get_preset
        from workflow_lib.sim.survey import plan_survey

        return plan_survey(get_preset(self.cfg.sim.preset), self.cfg.sim.seed)

    def _build_registry(self) -> pd.DataFrame:
        if self.simulated:
            planned = self._survey_plan.registry(self.image_format).copy()
            name = "sim_raw" if self.image_format == "raw" else "sim_eimage"
            planned["path"] = [
                str(self.paths.path(name, exposure=e, detector=d))
                for e, d in zip(planned["exposure"], planned["detector"], strict=True)
            ]
            return as_registry(planned)
        from workflow_lib.steps.ingest import read_registry, scan_raw_directory

        if self.cfg.input.registry is not None:
            return read_registry(self.cfg.input.registry)
        result = scan_raw_directory(
            self.raw_dir,
            image_format=self.image_format,
            cache_path=self.paths.path("scan_cache"),
        )
        result.raise_if_problems(on_bad_file=self.cfg.input.on_bad_file)
        return result.registry

    # -- what rules need ----------------------------------------------------------
    def section(self, name: str) -> dict[str, Any]:
        """A config section, for a rule's ``params:`` (so reruns track it)."""
        return dict(self.config[name])

    @property
    def input_files(self) -> list[str]:
        """Every input file the selected data needs (science and calibrations)."""
        return sorted(set(self.science["path"]) | set(self.calibrations["path"]))

    @property
    def sim_detectors(self) -> list[int]:
        return sorted(set(self.registry["detector"]))

    @property
    def _sim_name(self) -> str:
        return "sim_raw" if self.image_format == "raw" else "sim_eimage"

    def sim_exposure_outputs(self) -> list[str]:
        """Output patterns of one simulated science exposure ({exposure} left as wildcard)."""
        pattern = self.paths.pattern(self._sim_name)
        return [pattern.replace("{detector}", str(d)) for d in self.sim_detectors]

    def sim_output_paths(self, wildcards: Mapping[str, str]) -> dict[int, dict[int, str]]:
        """{exposure: {detector: file}} of the science exposure named by ``wildcards``."""
        exposure = int(wildcards["exposure"])
        files = self._sim_files_by_exposure.get(exposure)
        return {exposure: dict(files)} if files else {}

    @cached_property
    def _sim_files_by_exposure(self) -> dict[int, dict[int, str]]:
        # Built once: one registry filter per job would make the DAG O(N^2).
        return self._sim_files(self.registry)

    @property
    def sim_calibration_paths(self) -> dict[int, dict[int, str]]:
        """{exposure: {detector: file}} of every simulated calibration exposure."""
        return self._sim_files(self.registry[self.registry["obstype"] != "science"])

    @property
    def sim_calibration_outputs(self) -> list[str]:
        return sorted(p for files in self.sim_calibration_paths.values() for p in files.values())

    @staticmethod
    def _sim_files(rows: pd.DataFrame) -> dict[int, dict[int, str]]:
        files: dict[int, dict[int, str]] = {}
        for exposure, detector, path in zip(
            rows["exposure"], rows["detector"], rows["path"], strict=True
        ):
            files.setdefault(int(exposure), {})[int(detector)] = str(path)
        return files

    def final_targets(self) -> list[str]:
        """Products of ``rule all`` (grows as the stages land)."""
        targets: list[Path | str] = [
            self.paths.path("registry"),
            self.paths.path("run_summary"),
            self.paths.path("CcdVisit"),
            self.paths.path("Source"),
            self.paths.path("Object"),
            self.paths.path("ForcedSource"),
        ]
        targets += [self.paths.path("templateCoadd", **ids) for ids in self.coadd_ids]
        if self.cfg.diffim.enabled:
            targets += [self.paths.path("DiaSource"), self.paths.path("DiaCcdVisit")]
            if self.cfg.diffim.injection:
                targets.append(self.paths.path("DiaInjection"))
        if self.association_enabled:
            targets += [self.paths.path("DiaObject"), self.paths.path("DiaForcedSource")]
        if self.simulated:
            targets += [self.paths.path("truth_object"), self.paths.path("sim_refcat")]
        targets += self.qa_targets()
        return [str(t) for t in targets]


def with_simulated_template_season(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (validated) with, on the built-in simulated survey, an open template
    window set to the survey's template season: visits of excellent seeing before the
    preset's ``template_mjd_end``, after which the transients explode, as a real survey's
    window would be set from its observing history. Other inputs keep their window."""
    window = config["template"]
    simulated = config["input"]["source"] == "simulated"
    if not simulated or window["mjd_min"] is not None or window["mjd_max"] is not None:
        return config
    from workflow_lib.sim.presets import get_preset

    try:
        window["mjd_max"] = float(get_preset(config["sim"]["preset"]).template_mjd_end)
    except ValueError as err:
        raise ConfigError(f"config: sim.preset: {err}") from None
    return config
