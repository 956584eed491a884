"""What the Snakefile needs at parse time: the validated config and the registry.

The DAG is driven by the exposure registry, built *before* the DAG so that
``snakemake -n`` lists every job:

* ``simulated``: the survey plan of the built-in simulator (no pixels needed);
* ``raw`` / ``eimage``: a header scan of ``input.raw_dir``, cached per file, or
  a registry written beforehand by ``dc2-drp ingest`` (``input.registry``).

Path and data-id logic lives here, where pytest reaches it, not in ``rules/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import pandas as pd

from workflow_lib.core.config import ConfigError, WorkflowConfig, validate_config
from workflow_lib.core.paths import ProductPaths
from workflow_lib.core.registry import as_registry, select_calibrations, select_science


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

    def per_ccd_paths(
        self, name: str, ccds: Sequence[tuple[int, int]] | None = None
    ) -> list[str]:
        """Paths of a per-(visit, detector) product for ``ccds`` (every selected science CCD)."""
        # The pattern formatted directly: ids from the registry are valid, and
        # ProductPaths.path's per-id checks cost seconds at 10^6 CCDs.
        pattern = self.paths.pattern(name)
        ccds = self.science_ids if ccds is None else ccds
        return [pattern.format(visit=v, detector=d) for v, d in ccds]

    def final_targets(self) -> list[str]:
        """Products of ``rule all`` (grows as the stages land)."""
        targets = [
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
        if self.association_enabled:
            targets += [self.paths.path("DiaObject"), self.paths.path("DiaForcedSource")]
        if self.simulated:
            targets += [self.paths.path("truth_object"), self.paths.path("sim_refcat")]
        return [str(t) for t in targets]

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
        common = dict(
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
        return sorted(
            {(v, d, t) for (v, d), pairs in self._ccd_patches.items() for t, _ in pairs}
        )

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

    # -- difference imaging: one job per calexp against the template coadds it overlaps --
    def diffim_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        """The calexp, its CcdVisit row, the sky map and its band's template coadds."""
        ids = {"visit": int(wildcards["visit"]), "detector": int(wildcards["detector"])}
        band = self._band_of_ccd[(ids["visit"], ids["detector"])]
        return {
            **self.warp_inputs(wildcards),
            "src_path": str(self.paths.path("src", **ids)),
            "template_paths": [
                str(self.paths.path("templateCoadd", tract=t, patch=p, band=band))
                for t, p in self.warp_patches(wildcards)
            ],
        }

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

    # -- association per patch, DIA forced photometry per CCD ---------------------------
    @property
    def association_enabled(self) -> bool:
        return self.cfg.diffim.enabled and self.cfg.association.enabled

    def association_inputs(self, wildcards: Mapping[str, str]) -> dict[str, Any]:
        """DIASources of every CCD (any band) that may overlap the patch, and the sky map."""
        tract, patch = int(wildcards["tract"]), int(wildcards["patch"])
        ccds = sorted(
            {ccd for (t, p, _), found in self._patch_ccds.items() if (t, p) == (tract, patch)
             for ccd in found}
        )  # fmt: skip
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
