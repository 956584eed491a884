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
from typing import Any

import pandas as pd

from workflow_lib.config import ConfigError, WorkflowConfig, validate_config
from workflow_lib.paths import ProductPaths
from workflow_lib.registry import as_registry, select_calibrations, select_science


class WorkflowPlan:
    """The validated configuration, the registry and the products to make."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config: dict[str, Any] = validate_config(config)
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
            planned["n_amplifiers"] = 0
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

    # -- reference catalog and master calibrations ------------------------------------
    @property
    def refcat_path(self) -> str:
        if self.simulated:
            return str(self.paths.path("sim_refcat"))
        return str(self.cfg.input.refcat)

    @property
    def refcat_columns(self) -> dict[str, Any]:
        """Column map of the reference catalog (the simulator's own layout when simulated)."""
        if self.simulated:
            from workflow_lib.sim.truth import phosim_refcat_columns

            return phosim_refcat_columns(sorted(set(self.registry["band"]) - {""}))
        return dict(self.config["input"]["refcat_columns"])

    def _calib_rows(self, obstype: str, detector: int, band: str = "") -> pd.DataFrame:
        rows = self.calibrations
        index = self._calib_index.get((obstype, detector, band), [])
        return rows.iloc[index]

    @cached_property
    def _calib_index(self) -> dict[tuple[str, int, str], list[int]]:
        """Row positions in ``calibrations`` per (obstype, detector, band), and per
        (obstype, detector, "") for every band: built once, so that the input
        functions are dictionary look-ups instead of a table filter per job."""
        index: dict[tuple[str, int, str], list[int]] = {}
        rows = self.calibrations
        for position, (obstype, detector, band) in enumerate(
            zip(rows["obstype"], rows["detector"], rows["band"], strict=True)
        ):
            index.setdefault((str(obstype), int(detector), ""), []).append(position)
            if band:
                index.setdefault((str(obstype), int(detector), str(band)), []).append(position)
        return index

    def has_calib(self, obstype: str, detector: int, band: str = "") -> bool:
        return bool(self._calib_index.get((obstype, detector, band)))

    def _master(self, obstype: str, detector: int, band: str = "") -> dict[str, str]:
        """{f'{obstype}_path': master} if raw frames exist to build it, else {}."""
        if not self.has_calib(obstype, detector, band):
            return {}
        data_id = {"detector": detector, **({"band": band} if band else {})}
        return {f"{obstype}_path": str(self.paths.path(obstype, **data_id))}

    def master_bias_inputs(self, wildcards: Mapping[str, str]) -> dict[str, list[str]]:
        return {"raw_paths": list(self._calib_rows("bias", int(wildcards["detector"]))["path"])}

    def master_dark_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        detector = int(wildcards["detector"])
        return {
            "raw_paths": list(self._calib_rows("dark", detector)["path"]),
            **self._master("bias", detector),
        }

    def master_flat_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        detector, band = int(wildcards["detector"]), wildcards["band"]
        return {
            "raw_paths": list(self._calib_rows("flat", detector, band)["path"]),
            **self._master("bias", detector),
            **self._master("dark", detector),
        }

    def defects_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        detector = int(wildcards["detector"])
        bands = sorted(set(self._calib_rows("flat", detector)["band"]))
        return {
            **self._master("dark", detector),
            "flat_paths": [str(self.paths.path("flat", detector=detector, band=b)) for b in bands],
        }

    def _has_defects(self, detector: int) -> bool:
        return self.has_calib("dark", detector) or self.has_calib("flat", detector)

    # -- single-frame processing ---------------------------------------------------------
    @property
    def science_ids(self) -> list[tuple[int, int]]:
        """(visit, detector) of every selected science CCD."""
        return sorted(
            zip(self.science["visit"].tolist(), self.science["detector"].tolist(), strict=True)
        )

    @cached_property
    def _science_by_ccd(self) -> dict[tuple[int, int], tuple[str, str] | None]:
        """(band, path) of every selected science file per (visit, detector), built
        once; None for a (visit, detector) with more than one file."""
        science = self.science
        # tolist() converts each column at C speed (seconds saved at 10^6 rows).
        ccds = list(zip(science["visit"].tolist(), science["detector"].tolist(), strict=True))
        files = zip(science["band"].tolist(), science["path"].tolist(), strict=True)
        by_ccd: dict[tuple[int, int], tuple[str, str] | None] = dict(zip(ccds, files, strict=True))
        if len(by_ccd) < len(ccds):
            duplicated = pd.Series(ccds).duplicated(keep=False).to_numpy()
            for ccd in {c for c, dup in zip(ccds, duplicated, strict=True) if dup}:
                by_ccd[ccd] = None
        return by_ccd

    def process_ccd_inputs(self, wildcards: Mapping[str, str]) -> dict[str, str]:
        visit, detector = int(wildcards["visit"]), int(wildcards["detector"])
        found = self._science_by_ccd.get((visit, detector))
        if found is None:
            raise ValueError(f"visit {visit} detector {detector} is not a selected science CCD")
        band, raw_path = found
        # Every CCD of a (detector, band) shares its calibration inputs: built once.
        shared = self._ccd_calib_inputs.get((detector, band))
        if shared is None:
            shared = {"refcat_manifest_path": str(self.paths.path("refcat_manifest"))}
            if self.image_format == "raw":
                shared.update(self._master("bias", detector))
                shared.update(self._master("dark", detector))
                shared.update(self._master("flat", detector, band))
                if self._has_defects(detector):
                    shared["defects_path"] = str(self.paths.path("defects", detector=detector))
            self._ccd_calib_inputs[(detector, band)] = shared
        return {"raw_path": raw_path, **shared}

    @cached_property
    def _ccd_calib_inputs(self) -> dict[tuple[int, str], dict[str, str]]:
        return {}

    def per_ccd_paths(self, name: str) -> list[str]:
        """Paths of a per-(visit, detector) product for every selected science CCD."""
        # The pattern formatted directly: ids from the registry are valid, and
        # ProductPaths.path's per-id checks cost seconds at 10^6 CCDs.
        pattern = self.paths.pattern(name)
        return [pattern.format(visit=v, detector=d) for v, d in self.science_ids]

    def final_targets(self) -> list[str]:
        """Products of ``rule all`` (grows as the stages land)."""
        targets = [
            self.paths.path("registry"),
            self.paths.path("run_summary"),
            self.paths.path("CcdVisit"),
            self.paths.path("Source"),
        ]
        if self.simulated:
            targets += [self.paths.path("truth_object"), self.paths.path("sim_refcat")]
        return [str(t) for t in targets]
