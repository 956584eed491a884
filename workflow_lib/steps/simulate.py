"""Steps of the built-in survey simulator: the scene with its truth, and one exposure.

I/O only: the numerics live in :mod:`workflow_lib.sim`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from astropy.io import fits

from workflow_lib import __version__
from workflow_lib.io import read_table, write_csv, write_image_file, write_raw_file, write_table
from workflow_lib.sim.presets import get_preset
from workflow_lib.sim.scene import make_scene
from workflow_lib.sim.survey import plan_survey
from workflow_lib.sim.truth import (
    reference_catalog,
    truth_amplifier,
    truth_ccdvisit,
    truth_lightcurve,
)

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


def _provenance(preset: str, seed: int, **extra: object) -> dict[str, object]:
    return {
        "package_version": __version__,
        "step": "simulate",
        "preset": preset,
        "seed": seed,
        **extra,
    }


def simulate_scene(
    *,
    preset: str,
    seed: int,
    truth_object_path: PathLike,
    truth_lightcurve_path: PathLike,
    truth_ccdvisit_path: PathLike,
    truth_amplifier_path: PathLike,
    refcat_path: PathLike,
) -> None:
    """Generate the sky of a preset and write the four truth tables and the refcat."""
    plan = plan_survey(get_preset(preset), seed)
    scene = make_scene(plan)
    prov = _provenance(preset, seed)
    write_table(scene, truth_object_path, provenance=prov)
    write_table(truth_lightcurve(plan, scene), truth_lightcurve_path, provenance=prov)
    write_table(truth_ccdvisit(plan), truth_ccdvisit_path, provenance=prov)
    write_table(truth_amplifier(plan), truth_amplifier_path, provenance=prov)
    refcat = reference_catalog(plan, scene)
    write_csv(refcat, refcat_path, header_prefix="#")
    log.info(
        "scene %s seed %d: %d objects (%s), %d refcat rows",
        preset,
        seed,
        len(scene),
        scene["kind"].value_counts().to_dict(),
        len(refcat),
    )


def _header(cards: Mapping[str, object]) -> fits.Header:
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    return header


def simulate_exposures(
    *,
    preset: str,
    seed: int,
    output_paths: Mapping[int, Mapping[int, PathLike]],
    truth_object_path: PathLike | None = None,
    image_format: str = "raw",
) -> None:
    """Render every detector of each exposure and write one file per detector.

    ``output_paths`` maps exposure id -> {detector id -> file}; every detector
    of the plan must be present. Science exposures need ``truth_object_path``
    (the scene). Raw files hold a data-less primary HDU and one HDU per
    amplifier; eimages hold float32 electrons in the primary HDU. Calibration
    frames are cheap, so a workflow renders all of them in one job.
    """
    from workflow_lib.sim.render import render_exposure_detector

    plan = plan_survey(get_preset(preset), seed)
    scene = None
    for exposure, per_detector in output_paths.items():
        exposure = int(exposure)
        paths = {int(d): path for d, path in per_detector.items()}
        missing = set(plan.detectors) - set(paths)
        if missing:
            raise ValueError(f"exposure {exposure}: output_paths lacks detectors {sorted(missing)}")
        info = plan.exposure_info(exposure)
        if info["obstype"] == "science" and scene is None:
            if truth_object_path is None:
                raise ValueError(f"science exposure {exposure} needs truth_object_path")
            scene = read_table(truth_object_path)
        for detector in plan.detectors:
            out = Path(paths[detector])
            rendered = render_exposure_detector(
                plan, scene, exposure, detector, image_format=image_format
            )
            header = _header(rendered.header)
            if image_format == "eimage":
                assert rendered.eimage is not None
                data = np.asarray(rendered.eimage, np.float32)
                write_image_file(out, header, [], primary_data=data)
            else:
                amps = [(data, _header(cards)) for data, cards in rendered.amplifiers]
                write_raw_file(out, header, amps)
            log.info(
                "wrote %s (%s exposure %d detector %d, %d objects)",
                out,
                info["obstype"],
                exposure,
                detector,
                rendered.n_objects,
            )
