"""Sky map, warps and coadds: read calexps/warps, call the numerics, write.

* ``write_skymap``: the sky map definition computed at parse time, as JSON.
* ``make_warps``: one CCD onto every patch it overlaps, in three flavours
  (direct; PSF-matched to the template model; PSF-matched to the wider model
  used to find artifacts), into one directory with a ``manifest.json``.
* ``assemble_deep_coadd`` / ``assemble_template_coadd``: one (tract, patch, band).

A product that cannot be made (a failed calexp, a patch no warp reaches, no
visit passing the template selection) is a flagged, logged skip: the warp
directory's manifest says why, a coadd becomes a header-only failure record.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from workflow_lib import __version__
from workflow_lib.core.config import CoaddConfig, TemplateConfig
from workflow_lib.io import read_table
from workflow_lib.io.exposure import (
    ProcessingFailed,
    read_exposure,
    write_exposure,
    write_failure_record,
)
from workflow_lib.io.skymap import read_skymap

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WARP_FLAVOURS = ("directWarp", "psfMatchedWarp", "rejectionWarp")


def write_skymap(*, skymap_path: str, skymap: dict[str, Any]) -> None:
    """Write the sky map definition (already computed by the workflow plan)."""
    from workflow_lib.io.skymap import write_skymap as write_skymap_file
    from workflow_lib.static_sky.skymap import SkyMap

    sky = SkyMap.from_dict(skymap)  # validates the definition
    write_skymap_file(sky, skymap_path)
    log.info("sky map %s written", sky.kind)


def make_warps(
    *,
    calexp_path: str,
    ccdvisit_path: str,
    skymap_path: str,
    warp_dir: str,
    visit: int,
    detector: int,
    patches: list[list[int]],
    coadd: dict[str, Any],
    template: dict[str, Any],
) -> dict[str, Any]:
    """Warp one calexp onto each listed (tract, patch); returns the manifest."""
    from workflow_lib.single_frame.calibrate import pixel_scale_arcsec
    from workflow_lib.static_sky.warp import model_psf, psf_match_exposure, warp_exposure

    template_cfg = TemplateConfig.from_dict(template)
    coadd_cfg = CoaddConfig.from_dict(coadd, template_cfg)
    sky = read_skymap(skymap_path)
    row = read_table(ccdvisit_path).iloc[0]
    manifest: dict[str, Any] = {
        "visit": visit,
        "detector": detector,
        "band": str(row["band"]),
        "midpointMjdTai": float(row["midpointMjdTai"]),
        "seeing": float(row["seeing"]),
        "warps": [],
        "notes": [],
        "package_version": __version__,
    }
    out = Path(warp_dir)
    tmp_dir = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        try:
            calexp = read_exposure(calexp_path)
        except ProcessingFailed as err:
            manifest["notes"].append(f"no warps: {err}")
            log.warning("visit %d detector %d: %s", visit, detector, err)
            calexp = None
        if calexp is not None and patches:
            flavours = {"directWarp": calexp}
            scale = pixel_scale_arcsec(calexp.wcs)
            seeing = float(row["seeing"])
            models = {
                "psfMatchedWarp": coadd_cfg.model_psf_fwhm_arcsec,
                "rejectionWarp": coadd_cfg.rejection_psf_fwhm_arcsec,
            }
            for flavour, fwhm_arcsec in models.items():
                if flavour == "rejectionWarp" and not coadd_cfg.reject_artifacts:
                    continue
                if flavour == "psfMatchedWarp":
                    # Only for PSF-matched templates, and only template-eligible CCDs:
                    # in the MJD window and sharp enough.
                    if not template_cfg.psf_matched or fwhm_arcsec is None:
                        continue
                    if not template_cfg.in_window(float(row["midpointMjdTai"])):
                        continue
                    if template_cfg.max_psf_fwhm is not None and not (
                        seeing <= template_cfg.max_psf_fwhm
                    ):
                        continue
                # The model at its own size (+-3.5 sigma of its wing): cut to the
                # calexp PSF's box, a wide model loses its wing and no kernel matches it.
                assert fwhm_arcsec is not None  # None only for psfMatchedWarp, skipped above
                model = model_psf(fwhm_arcsec / scale)
                try:
                    flavours[flavour] = psf_match_exposure(calexp, model)
                except ValueError as err:
                    note = f"{flavour}: not made ({err})"
                    manifest["notes"].append(note)
                    log.warning("visit %d detector %d: %s", visit, detector, note)
            for tract_id, patch_id in patches:
                patch = sky.tract(int(tract_id)).patch(int(patch_id))
                _, _, nx, ny = patch.outer_bbox
                for flavour, exposure in flavours.items():
                    warp = warp_exposure(exposure, patch.wcs, (0, 0, nx, ny))
                    if warp is None:
                        continue
                    warp.metadata["TRACT"] = (int(tract_id), "tract of the patch")
                    warp.metadata["PATCH"] = (int(patch_id), "patch this warp lies on")
                    warp.metadata["WARPTYPE"] = (flavour, "direct or PSF-matched")
                    name = _warp_file_name(
                        flavour, visit=visit, detector=detector, tract=tract_id, patch=patch_id
                    )
                    write_exposure(warp, tmp_dir / name, provenance={"step": "make_warps"})
                    manifest["warps"].append(
                        {
                            "flavour": flavour,
                            "tract": int(tract_id),
                            "patch": int(patch_id),
                            "file": name,
                            "origin": list(warp.origin),
                            "shape": list(warp.shape),
                        }
                    )
            if not any(w["flavour"] == "directWarp" for w in manifest["warps"]):
                manifest["notes"].append("the fitted WCS overlaps none of the listed patches")
        (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp_dir, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info(
        "visit %d detector %d: %d warps on %d listed patches",
        visit,
        detector,
        len(manifest["warps"]),
        len(patches),
    )
    return manifest


def _warp_file_name(flavour: str, **data_id: int) -> str:
    """File name of a warp, from its dataset type (the directory is the job's output)."""
    from workflow_lib.core.paths import dataset_type

    return Path(dataset_type(flavour).template.format(**data_id)).name


def _warps_for_patch(warp_dirs: list[str], tract: int, patch: int) -> dict[str, dict]:
    """flavour -> {(visit, detector): file} of the warps on (tract, patch), from the manifests."""
    found: dict[str, dict[tuple[int, int], Path]] = {f: {} for f in WARP_FLAVOURS}
    for directory in warp_dirs:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
        ccd = (int(manifest["visit"]), int(manifest["detector"]))
        for warp in manifest["warps"]:
            if (warp["tract"], warp["patch"]) == (tract, patch):
                found[warp["flavour"]][ccd] = Path(directory) / warp["file"]
    return found


def _write_coadd(
    result: Any, coadd_path: str, coadd_psf_path: str, ids: dict[str, Any], provenance: dict
) -> None:
    from workflow_lib.io.coadd_psf import write_coadd_psf

    exposure = result.exposure
    for key, value in ids.items():
        exposure.metadata[key.upper()[:8]] = value
    exposure.metadata["NINPUTS"] = (len(result.inputs), "warps coadded")
    inputs = result.inputs
    visits = sorted({int(v) for v in inputs["visit"]}) if "visit" in inputs else []
    provenance = {**provenance, "input_visits": visits}
    if result.coadd_psf is not None:
        write_coadd_psf(result.coadd_psf, coadd_psf_path)
    else:
        write_failure_record(coadd_psf_path, _failure_header(ids), reason="no coadd PSF")
    write_exposure(exposure, coadd_path, provenance=provenance)


def _write_skipped_coadd(
    coadd_path: str, coadd_psf_path: str, ids: dict[str, Any], reason: str
) -> None:
    """A coadd that cannot be made: both products become failure records saying why."""
    log.warning(reason)
    write_failure_record(coadd_psf_path, _failure_header(ids), reason=reason)
    write_failure_record(coadd_path, _failure_header(ids), reason=reason)


def _patch_geometry(sky: Any, tract: int, patch: int) -> tuple[tuple[int, int], Any]:
    info = sky.tract(tract).patch(patch)
    _, _, nx, ny = info.outer_bbox
    return (ny, nx), info.wcs


def assemble_deep_coadd(
    *,
    warp_dirs: list[str],
    skymap_path: str,
    coadd_path: str,
    coadd_psf_path: str,
    tract: int,
    patch: int,
    band: str,
    coadd: dict[str, Any],
    template: dict[str, Any],
) -> None:
    """Deep coadd of every direct warp on the patch; artifacts found on PSF-matched warps."""
    from workflow_lib.io.warp_input import FitsWarpInput
    from workflow_lib.static_sky.coadd import assemble_coadd

    coadd_cfg = CoaddConfig.from_dict(coadd, TemplateConfig.from_dict(template))
    ids = {"tract": tract, "patch": patch, "band": band, "coaddtyp": "deep"}
    warps = _warps_for_patch(warp_dirs, tract, patch)
    direct, rejection = warps["directWarp"], warps["rejectionWarp"]
    provenance = {"step": "assemble_deep_coadd", "n_warps": len(direct), "coadd": coadd}
    if not direct:
        reason = f"no warp of band {band} reaches tract {tract} patch {patch}"
        _write_skipped_coadd(coadd_path, coadd_psf_path, ids, reason)
        return
    sky = read_skymap(skymap_path)
    shape, wcs = _patch_geometry(sky, tract, patch)
    keys = sorted(direct)
    unprotected = [k for k in keys if k not in rejection]
    if unprotected and coadd_cfg.reject_artifacts:
        log.warning(
            "%d of %d inputs have no PSF-matched warp to find artifacts with (PSF wider than "
            "the rejection model): they are coadded without artifact rejection: %s",
            len(unprotected),
            len(keys),
            unprotected,
        )
    result = assemble_coadd(
        [FitsWarpInput(direct[k]) for k in keys],
        shape=shape,
        wcs=wcs,
        rejection_inputs=[FitsWarpInput(rejection[k]) for k in keys if k in rejection],
        do_reject=coadd_cfg.reject_artifacts,
        clip_sigma=coadd_cfg.clip_sigma,
        do_interp=coadd_cfg.do_interp,
    )
    _write_coadd(result, coadd_path, coadd_psf_path, ids, provenance)
    log.info("deep coadd tract %d patch %d band %s: %d inputs", tract, patch, band, len(keys))


def assemble_template_coadd(
    *,
    warp_dirs: list[str],
    ccdvisit_paths: list[str],
    skymap_path: str,
    coadd_path: str,
    coadd_psf_path: str,
    tract: int,
    patch: int,
    band: str,
    coadd: dict[str, Any],
    template: dict[str, Any],
) -> None:
    """Template coadd of the best-seeing calexps on the patch (``template`` section): their
    direct warps with artifact rejection as in deep coadds, or their PSF-matched warps."""
    from workflow_lib.io.warp_input import FitsWarpInput
    from workflow_lib.static_sky.coadd import assemble_coadd, select_template_ccd_visits

    template_cfg = TemplateConfig.from_dict(template)
    coadd_cfg = CoaddConfig.from_dict(coadd, template_cfg)
    ids = {"tract": tract, "patch": patch, "band": band, "coaddtyp": "template"}
    warps = _warps_for_patch(warp_dirs, tract, patch)
    flavour = "psfMatchedWarp" if template_cfg.psf_matched else "directWarp"
    candidates = warps[flavour]
    rows = pd.concat([read_table(p) for p in ccdvisit_paths], ignore_index=True)
    ccds = zip(rows["visit"], rows["detector"], strict=True)
    rows = rows[[(int(v), int(d)) in candidates for v, d in ccds]]
    chosen = select_template_ccd_visits(rows, band=band, **template_cfg.selection())
    keys = sorted(
        (int(v), int(d)) for v, d in zip(chosen["visit"], chosen["detector"], strict=True)
    )
    visits = sorted({v for v, _ in keys})
    provenance = {
        "step": "assemble_template_coadd",
        "visits": [int(v) for v in visits],
        "warp_type": template_cfg.warp_type,
        "coadd": coadd,
        "template": template,
    }
    if not keys:
        fwhm = template_cfg.max_psf_fwhm
        cut = f"PSF FWHM <= {fwhm} arcsec" if fwhm is not None else "seeing quantile"
        reason = (
            f"no visit of band {band} on tract {tract} patch {patch} passes the template "
            f"selection (MJD {template_cfg.mjd_min}..{template_cfg.mjd_max}, {cut})"
        )
        _write_skipped_coadd(coadd_path, coadd_psf_path, ids, reason)
        return
    sky = read_skymap(skymap_path)
    shape, wcs = _patch_geometry(sky, tract, patch)
    if template_cfg.psf_matched:
        rejection = None  # the PSF-matched inputs themselves
    else:
        rejection = [
            FitsWarpInput(warps["rejectionWarp"][k]) for k in keys if k in warps["rejectionWarp"]
        ]
    result = assemble_coadd(
        [FitsWarpInput(candidates[k]) for k in keys],
        shape=shape,
        wcs=wcs,
        rejection_inputs=rejection,
        do_reject=coadd_cfg.reject_artifacts,
        clip_sigma=coadd_cfg.clip_sigma,
        do_interp=coadd_cfg.do_interp,
    )
    _write_coadd(result, coadd_path, coadd_psf_path, ids, provenance)
    log.info(
        "template coadd tract %d patch %d band %s (%s warps): visits %s",
        tract,
        patch,
        band,
        template_cfg.warp_type,
        list(visits),
    )


def _failure_header(ids: dict[str, Any]) -> Any:
    from astropy.io import fits

    header = fits.Header()
    for key, value in ids.items():
        header[key.upper()[:8]] = value
    return header
