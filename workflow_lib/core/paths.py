"""Where every product lives: one template per dataset type, in one place.

Products are named after their dataset type and data id, the product first and
every id in the file name, so a moved file still says what it is
(``calexp/{visit}/calexp_{visit}_{detector}.fits``). Rules ask this module for
Snakemake patterns; steps and the reader API ask it for concrete paths.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Regular expressions a dimension value must match (also used as Snakemake
# wildcard constraints, so patterns never match the wrong files).
DIMENSION_PATTERNS: dict[str, str] = {
    "visit": r"\d+",
    "exposure": r"\d+",
    "detector": r"\d+",
    "band": r"[ugrizy]",
    "tract": r"\d+",
    "patch": r"\d+",
    "obstype": r"[a-z]+",
}


@dataclass(frozen=True)
class DatasetType:
    """A kind of product: where it lives and what identifies one instance."""

    name: str
    template: str
    # how the reader API opens it: exposure | table | raw | csv | json | text |
    # directory | coadd_psf | picture (a PNG: the reader returns its path)
    storage: str

    @property
    def dimensions(self) -> tuple[str, ...]:
        fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
        return tuple(dict.fromkeys(fields))


_DATASET_TYPES: tuple[DatasetType, ...] = (
    # Built-in simulated survey (inputs in the CONTRACT formats, and truth).
    DatasetType("sim_raw", "sim/raw/{exposure}/raw_{exposure}_{detector}.fits", "raw"),
    DatasetType("sim_eimage", "sim/eimage/{exposure}/eimage_{exposure}_{detector}.fits", "raw"),
    DatasetType("sim_refcat", "sim/refcat/refcat_phosim.csv", "csv"),
    DatasetType("truth_object", "sim/truth/truth_object.parquet", "table"),
    DatasetType("truth_lightcurve", "sim/truth/truth_lightcurve.parquet", "table"),
    DatasetType("truth_ccdvisit", "sim/truth/truth_ccdvisit.parquet", "table"),
    DatasetType("truth_amplifier", "sim/truth/truth_amplifier.parquet", "table"),
    # Ingest.
    DatasetType("registry", "registry/exposures.parquet", "table"),
    DatasetType("ingest_problems", "registry/ingest_problems.csv", "csv"),
    DatasetType("scan_cache", "registry/scan_cache.json", "json"),
    # Run summary.
    DatasetType("run_summary", "summary/run_summary.json", "json"),
    # Reference catalog, sharded on the sky (HEALPix); the manifest is written last.
    DatasetType("refcat_manifest", "refcat/shards/manifest.json", "json"),
    # Master calibrations, per detector (flats per band).
    DatasetType("bias", "calib/bias/bias_{detector}.fits", "exposure"),
    DatasetType("dark", "calib/dark/dark_{detector}.fits", "exposure"),
    DatasetType("flat", "calib/flat/{band}/flat_{band}_{detector}.fits", "exposure"),
    DatasetType("defects", "calib/defects/defects_{detector}.fits", "exposure"),
    # Single-frame processing.
    DatasetType("calexp", "calexp/{visit}/calexp_{visit}_{detector}.fits", "exposure"),
    DatasetType("src", "src/{visit}/src_{visit}_{detector}.parquet", "table"),
    DatasetType("ccdVisit", "ccdVisit/{visit}/ccdVisit_{visit}_{detector}.parquet", "table"),
    # Sky map and warps: one directory per (visit, detector) holding its warp onto
    # every patch it overlaps, in three flavours (direct; PSF-matched to the
    # template model PSF; PSF-matched to the wider model deep coadds use to find
    # artifacts).
    DatasetType("skyMap", "skymap/skyMap.json", "json"),
    DatasetType("warpDir", "warp/{visit}/warp_{visit}_{detector}", "directory"),
    DatasetType(
        "directWarp",
        "warp/{visit}/warp_{visit}_{detector}/directWarp_{visit}_{detector}_{tract}_{patch}.fits",
        "exposure",
    ),
    DatasetType(
        "psfMatchedWarp",
        "warp/{visit}/warp_{visit}_{detector}/psfMatchedWarp_{visit}_{detector}_{tract}_{patch}.fits",
        "exposure",
    ),
    DatasetType(
        "rejectionWarp",
        "warp/{visit}/warp_{visit}_{detector}/rejectionWarp_{visit}_{detector}_{tract}_{patch}.fits",
        "exposure",
    ),
    # Coadds per (tract, patch, band) and the Objects measured on them.
    DatasetType(
        "deepCoadd", "coadd/{tract}/{patch}/deepCoadd_{tract}_{patch}_{band}.fits", "exposure"
    ),
    DatasetType(
        "templateCoadd",
        "coadd/{tract}/{patch}/templateCoadd_{tract}_{patch}_{band}.fits",
        "exposure",
    ),
    # The exact coadd PSF (input PSFs, weights, coverage) beside each coadd; the
    # coadd's own PSF HDU is its smooth POLYPIX fit.
    DatasetType(
        "deepCoaddPsf",
        "coadd/{tract}/{patch}/deepCoaddPsf_{tract}_{patch}_{band}.fits",
        "coadd_psf",
    ),
    DatasetType(
        "templateCoaddPsf",
        "coadd/{tract}/{patch}/templateCoaddPsf_{tract}_{patch}_{band}.fits",
        "coadd_psf",
    ),
    DatasetType("objectTable", "objects/{tract}/objectTable_{tract}_{patch}.parquet", "table"),
    # Forced photometry of a tract's Objects on one calexp (LSST's forcedPhotCcd).
    DatasetType(
        "forcedSource",
        "forced/{visit}/forcedSource_{visit}_{detector}_{tract}.parquet",
        "table",
    ),
    # Difference imaging per (visit, detector): the difference image, its
    # DIASources and the CCD's record (template coverage, method, outcome).
    DatasetType(
        "differenceExp", "diffim/{visit}/differenceExp_{visit}_{detector}.fits", "exposure"
    ),
    DatasetType("diaSrc", "diffim/{visit}/diaSrc_{visit}_{detector}.parquet", "table"),
    DatasetType("diaCcd", "diffim/{visit}/diaCcd_{visit}_{detector}.parquet", "table"),
    DatasetType("diaInjection", "diffim/{visit}/diaInjection_{visit}_{detector}.parquet", "table"),
    # Association per (tract, patch): its DIAObjects and which DIASource joined which;
    # forced photometry of the DIAObjects per (visit, detector).
    DatasetType("diaObjectTable", "association/{tract}/diaObject_{tract}_{patch}.parquet", "table"),
    DatasetType("diaAssoc", "association/{tract}/diaAssoc_{tract}_{patch}.parquet", "table"),
    DatasetType(
        "diaForcedSource", "diaForced/{visit}/diaForcedSource_{visit}_{detector}.parquet", "table"
    ),
    # Consolidated CONTRACT tables.
    DatasetType("CcdVisit", "tables/CcdVisit.parquet", "table"),
    DatasetType("Source", "tables/Source.parquet", "table"),
    DatasetType("Object", "tables/Object.parquet", "table"),
    DatasetType("ForcedSource", "tables/ForcedSource.parquet", "table"),
    DatasetType("DiaSource", "tables/DiaSource.parquet", "table"),
    DatasetType("DiaCcdVisit", "tables/DiaCcdVisit.parquet", "table"),
    DatasetType("DiaInjection", "tables/DiaInjection.parquet", "table"),
    DatasetType("DiaObject", "tables/DiaObject.parquet", "table"),
    DatasetType("DiaForcedSource", "tables/DiaForcedSource.parquet", "table"),
    # Quality assessment: the run's metrics and the report's figures.
    DatasetType("metrics", "qa/metrics.json", "json"),
    DatasetType("qaCcdVisitPlot", "qa/single_frame/ccd_visit_quality.png", "picture"),
    DatasetType("qaFailedCcds", "qa/single_frame/failed_ccd_visits.html", "text"),
    DatasetType("qaColorImage", "qa/coadd/color_{tract}_{patch}.png", "picture"),
    DatasetType("qaDiaCutouts", "qa/diffim/dia_cutouts.png", "picture"),
    DatasetType("qaLightCurves", "qa/diffim/light_curves.png", "picture"),
    DatasetType("qaInjectionPlot", "qa/diffim/injection.png", "picture"),
    DatasetType("qaTruthPlot", "qa/truth/truth_quality.png", "picture"),
)

DATASET_TYPES: dict[str, DatasetType] = {d.name: d for d in _DATASET_TYPES}


def dataset_type(name: str) -> DatasetType:
    """Look up a dataset type by name, with the known names in the error."""
    try:
        return DATASET_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(DATASET_TYPES))
        raise KeyError(f"unknown dataset type {name!r}; known: {known}") from None


class ProductPaths:
    """Concrete paths and Snakemake patterns of products under one output root."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, name: str, **data_id: Any) -> Path:
        """Path of one product; every dimension of the dataset type must be given."""
        dtype = dataset_type(name)
        missing = [d for d in dtype.dimensions if d not in data_id]
        if missing:
            raise KeyError(f"{name}: data id lacks {', '.join(missing)}")
        for dim in dtype.dimensions:
            value = str(data_id[dim])
            if not re.fullmatch(DIMENSION_PATTERNS[dim], value):
                raise ValueError(f"{name}: {dim}={value!r} is not a valid {dim}")
        return self.root / dtype.template.format(**{d: data_id[d] for d in dtype.dimensions})

    @classmethod
    def of_product(cls, name: str, path: str | os.PathLike[str]) -> ProductPaths:
        """The output root holding ``path``, an instance of dataset type ``name``
        without dimensions (a step given one product finds the others beside it)."""
        dtype = dataset_type(name)
        if dtype.dimensions:
            raise ValueError(f"{name} has dimensions {dtype.dimensions}: its root is ambiguous")
        full = Path(path)
        if not full.as_posix().endswith(dtype.template):
            raise ValueError(f"{path} is not a {name} product ({dtype.template})")
        return cls(full.as_posix()[: -len(dtype.template)].rstrip("/") or ".")

    def pattern(self, name: str) -> str:
        """Snakemake output pattern with wildcards named after the dimensions."""
        return str(self.root / dataset_type(name).template)

    def parse(self, name: str, path: str | os.PathLike[str]) -> dict[str, int | str] | None:
        """Data id of ``path`` if it is an instance of ``name``, else None."""
        dtype = dataset_type(name)
        regex = _template_regex(str(self.root / dtype.template))
        match = regex.fullmatch(str(Path(path)))
        if match is None:
            return None
        return {k: _coerce(v) for k, v in match.groupdict().items()}

    def existing(self, name: str) -> list[dict[str, int | str]]:
        """Data ids of every instance of ``name`` present on disk, sorted."""
        dtype = dataset_type(name)
        glob = dtype.template.format(**{d: "*" for d in dtype.dimensions})
        ids = [self.parse(name, p) for p in self.root.glob(glob)]
        found = [i for i in ids if i is not None]
        return sorted(found, key=lambda i: tuple(str(i[d]).zfill(12) for d in dtype.dimensions))


def wildcard_constraints() -> dict[str, str]:
    """Constraints for every dimension, for the Snakefile's ``wildcard_constraints``."""
    return dict(DIMENSION_PATTERNS)


def _template_regex(template: str) -> re.Pattern[str]:
    parts: list[str] = []
    seen: set[str] = set()
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field:
            if field in seen:
                parts.append(f"(?P={field})")
            else:
                parts.append(f"(?P<{field}>{DIMENSION_PATTERNS[field]})")
                seen.add(field)
    return re.compile("".join(parts))


def _coerce(value: str) -> int | str:
    return int(value) if value.isdigit() else value
