"""Difference-imaging methods side by side on one finished run, against its truth.

    python -m benchmarks.diffim_methods RUN_DIR [METHOD ...]

``RUN_DIR`` holds a finished simulated run (``RUN_DIR/results``, e.g. the tiny survey
run by ``snakemake --config sim='{preset: tiny}'``, or the test suite's tiny run). For
each method (default: alard_lupton psf_models zogy) the workflow is run again there with
``diffim: {enabled: true, method: ...}`` (only the difference-imaging jobs run), and the
DIASources of the CCD-visits after the template window are matched to the truth (1"):
detections of the transients and variables, and clean DIASources that match nothing;
where association ran, its figures and the light-curve pulls (workflow_lib.qa.dia_metrics).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.spatial import cKDTree

from workflow_lib.core.flags import ARTIFACT_DIA_SOURCE

REPO = Path(__file__).resolve().parents[1]
MATCH_ARCSEC = 1.0


def _run(run_dir: Path, method: str) -> float:
    config = (
        yaml.safe_load((run_dir / "override.yaml").read_text())
        if (run_dir / "override.yaml").exists()
        else {}
    )
    config["diffim"] = {"enabled": True, "method": method}
    override = run_dir / f"diffim_{method}.yaml"
    override.write_text(yaml.safe_dump(config))
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    start = time.perf_counter()
    subprocess.run(
        [
            snakemake,
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(run_dir),
            "--configfile",
            str(override),
            "--cores",
            "2",
            "-q",
        ],
        check=True,
    )
    return time.perf_counter() - start


def _merged(base: dict, override: dict) -> dict:
    """``base`` with ``override`` laid over it, mapping by mapping (Snakemake's merge)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def figures(results: Path, template_end_mjd: float) -> dict[str, object]:
    dia = pd.read_parquet(results / "tables/DiaSource.parquet")
    truth = pd.read_parquet(results / "sim/truth/truth_object.parquet")
    ccds = pd.read_parquet(results / "tables/DiaCcdVisit.parquet")
    cos_dec = np.cos(np.deg2rad(float(truth["dec"].mean())))
    tree = cKDTree(np.c_[truth["ra"] * cos_dec, truth["dec"]] * 3600.0)
    d, i = tree.query(np.c_[dia["ra"] * cos_dec, dia["dec"]] * 3600.0)
    dia["kind"] = np.where(d < MATCH_ARCSEC, truth["kind"].to_numpy()[i], "none")
    dia["truth_id"] = np.where(d < MATCH_ARCSEC, truth["id"].to_numpy()[i], -1)
    clean = dia[((dia["flags"] & ARTIFACT_DIA_SOURCE) == 0)]
    later = clean[clean["midpointMjdTai"] > template_end_mjd]
    later_ccds = ccds[(~ccds["failed"]) & (ccds["midpointMjdTai"] > template_end_mjd)]
    unmatched = (
        later[later["kind"] == "none"]
        .groupby(["visit", "detector"])
        .size()
        .reindex(pd.MultiIndex.from_frame(later_ccds[["visit", "detector"]]), fill_value=0)
    )
    found = {
        k: later[later["kind"] == k].groupby("truth_id")["visit"].nunique().to_dict()
        for k in ("transient", "variable")
    }
    association: dict[str, object] = {}
    if (results / "tables/DiaObject.parquet").exists():
        from workflow_lib.qa.dia_metrics import association_metrics, light_curve_pulls

        objects = pd.read_parquet(results / "tables/DiaObject.parquet")
        forced = pd.read_parquet(results / "tables/DiaForcedSource.parquet")
        lightcurve = pd.read_parquet(results / "sim/truth/truth_lightcurve.parquet")
        association = {
            "association": association_metrics(dia, objects, truth),
            "light_curve_pulls": light_curve_pulls(
                forced, objects, dia, truth, lightcurve, template_window=(None, template_end_mjd)
            ),
        }
    return {
        **association,
        "later_ccd_visits": len(later_ccds),
        "clean_by_kind": later.groupby("kind").size().to_dict(),
        "unmatched_per_ccd_visit_median": float(unmatched.median()),
        "unmatched_per_ccd_visit_range": (int(unmatched.min()), int(unmatched.max())),
        "ccd_visits_detected_per_truth_object": found,
    }


def main(argv: list[str]) -> None:
    run_dir = Path(argv[0])
    methods = argv[1:] or ["alard_lupton", "psf_models", "zogy"]
    from workflow_lib.core.config import validate_config
    from workflow_lib.workflow import with_simulated_template_season

    # The run's own template window, resolved as the workflow resolves it (on a simulated
    # survey with an open window: the preset's template season).
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    if (run_dir / "override.yaml").exists():
        config = _merged(config, yaml.safe_load((run_dir / "override.yaml").read_text()) or {})
    window = with_simulated_template_season(validate_config(config))["template"]
    template_end = window["mjd_max"]
    if template_end is None:
        raise SystemExit("the run has no template.mjd_max: which visits are 'later'?")
    for method in methods:
        wall = _run(run_dir, method)
        print(f"{method}: {wall:.0f} s wall;", figures(run_dir / "results", float(template_end)))


if __name__ == "__main__":
    main(sys.argv[1:])
