"""Configuration: schema validation with defaults, and frozen per-section views.

The JSON schema (``schemas/config.schema.yaml``) is the single home of the
defaults. ``validate_config`` fills them in and reports the first violation as
one line naming the key; the dataclasses add the cross-field checks a schema
cannot express, so a bad value fails before any pixel is read.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jsonschema

# jsonschema and yaml are imported where the config is validated (when the
# Snakefile is parsed), not by every job that only reads config sections.

BANDS = ("u", "g", "r", "i", "z", "y")


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


@cache
def config_schema() -> dict[str, Any]:
    """The configuration schema, parsed once."""
    import yaml

    text = resources.files("workflow_lib").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def _validator_filling_defaults() -> type[jsonschema.protocols.Validator]:
    import jsonschema

    base = jsonschema.Draft7Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a validated copy of ``config`` with every default filled in.

    Raises ConfigError with a single line such as
    ``config: input.sourse: unknown key (allowed: source, raw_dir, ...)``.
    """
    import jsonschema

    filled = copy.deepcopy(dict(config))
    validator = _validator_filling_defaults()(config_schema())
    errors = list(validator.iter_errors(filled))
    if errors:
        raise ConfigError(_describe(jsonschema.exceptions.best_match(errors)))
    WorkflowConfig.from_dict(filled)  # cross-field checks
    return filled


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        key = f"{where}.{extra[0]}" if error.absolute_path else extra[0]
        return f"config: {key}: unknown key (allowed: {', '.join(allowed)})"
    if error.validator == "oneOf" or (error.absolute_path and error.absolute_path[0] == "select"):
        return f"config: {where}: {error.instance!r} is not a valid value ({_expected(error)})"
    return f"config: {where}: {error.message}"


def _expected(error: jsonschema.ValidationError) -> str:
    if "band" in error.absolute_path:
        return "expected null, 'g^r^i' or a list of bands"
    return "expected null, an id, '840..879[:step]' joined by '^', or a list of ids"


def parse_id_selection(value: int | str | list[int] | None) -> tuple[int, ...] | None:
    """Expand the DC2 Cookbook id syntax into a sorted tuple of ids.

    ``840..879`` is inclusive, ``840..879:2`` takes every second id, ``^`` joins
    pieces (``840^845..847``). A list is taken as is; None selects everything.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"config: id selection: {value!r} is not an id")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(sorted({int(v) for v in value}))
    ids: set[int] = set()
    for piece in str(value).split("^"):
        m = re.fullmatch(r"(\d+)(?:\.\.(\d+)(?::(\d+))?)?", piece.strip())
        if m is None:
            raise ConfigError(f"config: id selection {value!r}: cannot parse {piece!r}")
        start = int(m.group(1))
        stop = int(m.group(2)) if m.group(2) else start
        step = int(m.group(3)) if m.group(3) else 1
        if stop < start or step < 1:
            raise ConfigError(f"config: id selection {value!r}: empty range {piece!r}")
        ids.update(range(start, stop + 1, step))
    return tuple(sorted(ids))


def parse_band_selection(value: str | list[str] | None) -> tuple[str, ...] | None:
    """Bands from ``'g^r^i'`` or a list, in ugrizy order; None selects all."""
    if value is None:
        return None
    bands = value.split("^") if isinstance(value, str) else list(value)
    unknown = [b for b in bands if b not in BANDS]
    if unknown:
        raise ConfigError(f"config: select.band: unknown band(s) {unknown}")
    return tuple(b for b in BANDS if b in bands)


@dataclass(frozen=True)
class RefcatColumns:
    """Reference-catalog column map (CONTRACT 1.3)."""

    id: str
    ra: str
    dec: str
    is_star: str | None
    is_variable: str | None
    mags: Mapping[str, str]
    mag_errs: Mapping[str, str]

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> RefcatColumns:
        return cls(
            id=section["id"],
            ra=section["ra"],
            dec=section["dec"],
            is_star=section["is_star"],
            is_variable=section["is_variable"],
            mags=dict(section["mags"]),
            mag_errs=dict(section["mag_errs"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ra": self.ra,
            "dec": self.dec,
            "is_star": self.is_star,
            "is_variable": self.is_variable,
            "mags": dict(self.mags),
            "mag_errs": dict(self.mag_errs),
        }


@dataclass(frozen=True)
class InputConfig:
    source: str
    raw_dir: str | None
    refcat: str | None
    refcat_columns: RefcatColumns
    registry: str | None
    on_bad_file: str

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> InputConfig:
        cfg = cls(
            source=section["source"],
            raw_dir=section["raw_dir"],
            refcat=section["refcat"],
            refcat_columns=RefcatColumns.from_dict(section["refcat_columns"]),
            registry=section["registry"],
            on_bad_file=section["on_bad_file"],
        )
        if cfg.source != "simulated":
            if cfg.raw_dir is None and cfg.registry is None:
                raise ConfigError(
                    f"config: input.raw_dir: required when input.source is {cfg.source!r}"
                )
            if cfg.refcat is None:
                raise ConfigError(
                    f"config: input.refcat: required when input.source is {cfg.source!r}"
                )
        return cfg


@dataclass(frozen=True)
class SimConfig:
    preset: str
    seed: int
    format: str

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> SimConfig:
        return cls(preset=section["preset"], seed=int(section["seed"]), format=section["format"])


@dataclass(frozen=True)
class Selection:
    """Which science data to process; None means everything."""

    visits: tuple[int, ...] | None
    detectors: tuple[int, ...] | None
    bands: tuple[str, ...] | None
    tracts: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> Selection:
        return cls(
            visits=parse_id_selection(section["visit"]),
            detectors=parse_id_selection(section["detector"]),
            bands=parse_band_selection(section["band"]),
            tracts=parse_id_selection(section.get("tract")),
        )


@dataclass(frozen=True)
class TemplateConfig:
    """Which calexps build a band's template coadd on a patch, and from which warps."""

    mjd_min: float | None
    mjd_max: float | None
    max_psf_fwhm: float | None  # None: relative to the survey (seeing_quantile, min_images)
    max_images: int
    seeing_quantile: float = 0.33
    min_images: int = 6
    warp_type: str = "direct"

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> TemplateConfig:
        fwhm = section["max_psf_fwhm"]
        cfg = cls(
            mjd_min=section["mjd_min"],
            mjd_max=section["mjd_max"],
            max_psf_fwhm=None if fwhm is None else float(fwhm),
            max_images=int(section["max_images"]),
            seeing_quantile=float(section["seeing_quantile"]),
            min_images=int(section["min_images"]),
            warp_type=str(section["warp_type"]),
        )
        if cfg.mjd_min is not None and cfg.mjd_max is not None and cfg.mjd_min >= cfg.mjd_max:
            raise ConfigError(
                f"config: template: mjd_min ({cfg.mjd_min}) must be below mjd_max ({cfg.mjd_max})"
            )
        return cfg

    @property
    def psf_matched(self) -> bool:
        return self.warp_type == "psf_matched"

    def selection(self) -> dict[str, Any]:
        """Keyword arguments of ``static_sky.coadd.select_template_ccd_visits``: an absolute
        FWHM cut where one is set, else the survey's best-seeing quantile."""
        relative = self.max_psf_fwhm is None
        return {
            "mjd_min": self.mjd_min,
            "mjd_max": self.mjd_max,
            "max_psf_fwhm": self.max_psf_fwhm,
            "max_images": self.max_images,
            "seeing_quantile": self.seeing_quantile if relative else None,
            "min_images": self.min_images if relative else 0,
        }

    def in_window(self, mjd: float) -> bool:
        """Whether an exposure midpoint ``mjd`` lies in [mjd_min, mjd_max] (None = open)."""
        if self.mjd_min is not None and mjd < self.mjd_min:
            return False
        return self.mjd_max is None or mjd <= self.mjd_max


@dataclass(frozen=True)
class IsrConfig:
    detect_cosmic_rays: bool

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> IsrConfig:
        return cls(detect_cosmic_rays=bool(section["detect_cosmic_rays"]))


@dataclass(frozen=True)
class CalibrateConfig:
    """Characterize + calibrate of one CCD."""

    detection_threshold: float
    psf_kernel_size: int
    psf_order: int
    ap_flux_radius_arcsec: float
    calib_aperture_radius_arcsec: float
    sip_order: int
    astrometry_max_offset_arcsec: float
    astrometry_max_rotation_deg: float
    photocal_min_snr: float

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> CalibrateConfig:
        cfg = cls(**{name: section[name] for name in cls.__dataclass_fields__})
        if cfg.psf_kernel_size % 2 == 0:
            raise ConfigError(
                f"config: calibrate.psf_kernel_size: must be odd, got {cfg.psf_kernel_size}"
            )
        if cfg.calib_aperture_radius_arcsec < cfg.ap_flux_radius_arcsec:
            raise ConfigError(
                "config: calibrate.calib_aperture_radius_arcsec: must be at least "
                f"ap_flux_radius_arcsec ({cfg.ap_flux_radius_arcsec})"
            )
        return cfg


@dataclass(frozen=True)
class SkyMapConfig:
    """Geometry of the sky map (DC2's makeSkyMapConfig.py in the defaults)."""

    kind: str
    pixel_scale_arcsec: float
    patch_inner_size: int
    patch_border: int
    projection: str
    footprint_margin_arcsec: float
    discrete_border_deg: float
    discrete_tract_id: int
    num_rings: int
    tract_overlap_deg: float
    ra_start_deg: float

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> SkyMapConfig:
        return cls(
            kind=section["kind"],
            pixel_scale_arcsec=float(section["pixel_scale_arcsec"]),
            patch_inner_size=int(section["patch_inner_size"]),
            patch_border=int(section["patch_border"]),
            projection=section["projection"],
            footprint_margin_arcsec=float(section["footprint_margin_arcsec"]),
            discrete_border_deg=float(section["discrete"]["border_deg"]),
            discrete_tract_id=int(section["discrete"]["tract_id"]),
            num_rings=int(section["rings"]["num_rings"]),
            tract_overlap_deg=float(section["rings"]["tract_overlap_deg"]),
            ra_start_deg=float(section["rings"]["ra_start_deg"]),
        )


@dataclass(frozen=True)
class CoaddConfig:
    """Warps and coadds; ``model_psf_fwhm_arcsec`` is resolved against the template cut."""

    model_psf_fwhm_arcsec: float | None  # None: no PSF-matched template warps
    rejection_psf_fwhm_arcsec: float
    reject_artifacts: bool
    clip_sigma: float
    do_interp: bool

    @classmethod
    def from_dict(cls, section: Mapping[str, Any], template: TemplateConfig) -> CoaddConfig:
        fwhm = section["model_psf_fwhm_arcsec"]
        fwhm = template.max_psf_fwhm if fwhm is None else float(fwhm)
        if template.psf_matched and fwhm is None:
            raise ConfigError(
                "config: template.warp_type psf_matched needs a model PSF: set "
                "coadd.model_psf_fwhm_arcsec or template.max_psf_fwhm"
            )
        # A PSF-matched warp can only widen a PSF: visits the template admits
        # (FWHM up to max_psf_fwhm) must all fit under the model PSF.
        if fwhm is not None and template.max_psf_fwhm is not None and fwhm < template.max_psf_fwhm:
            raise ConfigError(
                f"config: coadd.model_psf_fwhm_arcsec ({fwhm}) must be at least "
                f"template.max_psf_fwhm ({template.max_psf_fwhm}): PSF matching cannot "
                "sharpen the visits the template admits"
            )
        return cls(
            model_psf_fwhm_arcsec=fwhm,
            rejection_psf_fwhm_arcsec=float(section["rejection_psf_fwhm_arcsec"]),
            reject_artifacts=bool(section["reject_artifacts"]),
            clip_sigma=float(section["clip_sigma"]),
            do_interp=bool(section["do_interp"]),
        )


@dataclass(frozen=True)
class ObjectsConfig:
    detection_threshold: float
    ref_band_priority: tuple[str, ...]

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> ObjectsConfig:
        priority = tuple(section["ref_band_priority"])
        if len(set(priority)) != len(priority):
            raise ConfigError(
                f"config: objects.ref_band_priority: lists a band twice: {list(priority)}"
            )
        return cls(
            detection_threshold=float(section["detection_threshold"]),
            ref_band_priority=priority,
        )


@dataclass(frozen=True)
class DiffimConfig:
    """Difference imaging (the schema's ``diffim`` section holds the defaults)."""

    enabled: bool
    method: str
    min_template_coverage: float
    detection_threshold: float
    kernel_grid_spacing: float
    background_order: int
    decorrelate: bool
    max_template_self_weight: float
    max_residual_ratio: float
    max_kernel_sources: int
    injection: bool = False  # make the DiaInjection table (section ``injection``)

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> DiffimConfig:
        injection = section.get("injection", {})
        if injection.get("enabled") and injection["snr_min"] >= injection["snr_max"]:
            raise ConfigError(
                f"config: diffim: injection: snr_min ({injection['snr_min']}) must be below "
                f"snr_max ({injection['snr_max']})"
            )
        return cls(
            enabled=bool(section["enabled"]),
            method=str(section["method"]),
            min_template_coverage=float(section["min_template_coverage"]),
            detection_threshold=float(section["detection_threshold"]),
            kernel_grid_spacing=float(section["kernel_grid_spacing"]),
            background_order=int(section["background_order"]),
            decorrelate=bool(section["decorrelate"]),
            max_template_self_weight=float(section["max_template_self_weight"]),
            max_residual_ratio=float(section["max_residual_ratio"]),
            max_kernel_sources=int(section["max_kernel_sources"]),
            injection=bool(injection.get("enabled", False)),
        )


@dataclass(frozen=True)
class AssociationSection:
    """Association and DIA forced photometry (the schema's ``association`` section)."""

    enabled: bool
    method: str
    radius_arcsec: float
    position_error_floor_arcsec: float
    max_offset_sigma: float
    visits: tuple[int, ...] | None
    bands: tuple[str, ...] | None

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> AssociationSection:
        return cls(
            enabled=bool(section["enabled"]),
            method=str(section["method"]),
            radius_arcsec=float(section["radius_arcsec"]),
            position_error_floor_arcsec=float(section["position_error_floor_arcsec"]),
            max_offset_sigma=float(section["max_offset_sigma"]),
            visits=parse_id_selection(section["visit"]),
            bands=parse_band_selection(section["band"]),
        )


@dataclass(frozen=True)
class WorkflowConfig:
    """The whole validated configuration, as frozen per-section views."""

    output_dir: str
    input: InputConfig
    sim: SimConfig
    select: Selection
    template: TemplateConfig
    isr: IsrConfig
    calibrate: CalibrateConfig
    skymap: SkyMapConfig
    coadd: CoaddConfig
    objects: ObjectsConfig
    diffim: DiffimConfig
    association: AssociationSection

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> WorkflowConfig:
        template = TemplateConfig.from_dict(config["template"])
        return cls(
            output_dir=config["output_dir"],
            input=InputConfig.from_dict(config["input"]),
            sim=SimConfig.from_dict(config["sim"]),
            select=Selection.from_dict(config["select"]),
            template=template,
            isr=IsrConfig.from_dict(config["isr"]),
            calibrate=CalibrateConfig.from_dict(config["calibrate"]),
            skymap=SkyMapConfig.from_dict(config["skymap"]),
            coadd=CoaddConfig.from_dict(config["coadd"], template),
            objects=ObjectsConfig.from_dict(config["objects"]),
            diffim=DiffimConfig.from_dict(config["diffim"]),
            association=AssociationSection.from_dict(config["association"]),
        )

    @property
    def image_format(self) -> str:
        """raw or eimage: the format of the input files the workflow reads."""
        if self.input.source == "simulated":
            return self.sim.format
        return self.input.source


def load_config(config: Mapping[str, Any]) -> WorkflowConfig:
    """Validate a raw config mapping and return its frozen view."""
    return WorkflowConfig.from_dict(validate_config(config))
