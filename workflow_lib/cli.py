"""Command line: ``dc2-drp`` (or ``python -m workflow_lib``).

dc2-drp simulate --preset tiny --output sim/        # a survey in the CONTRACT formats
dc2-drp ingest RAW_DIR --output registry.parquet    # registry for input.registry
dc2-drp list results/ [DATASET_TYPE]                # what the reader API sees
dc2-drp check-config my.yaml                        # validate an override file
dc2-drp consolidate results/                        # tables from every per-CCD product on disk
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from workflow_lib.sim.presets import preset_names

log = logging.getLogger("workflow_lib.cli")


def _simulate(args: argparse.Namespace) -> int:
    from workflow_lib.core.paths import ProductPaths
    from workflow_lib.sim.presets import get_preset
    from workflow_lib.sim.survey import plan_survey
    from workflow_lib.steps.simulate import simulate_exposures, simulate_scene

    paths = ProductPaths(args.output)
    plan = plan_survey(get_preset(args.preset), args.seed)
    simulate_scene(
        preset=args.preset,
        seed=args.seed,
        truth_object_path=paths.path("truth_object"),
        truth_lightcurve_path=paths.path("truth_lightcurve"),
        truth_ccdvisit_path=paths.path("truth_ccdvisit"),
        truth_amplifier_path=paths.path("truth_amplifier"),
        refcat_path=paths.path("sim_refcat"),
    )
    name = "sim_raw" if args.format == "raw" else "sim_eimage"
    registry = plan.registry(args.format)
    groups: list[dict[int, dict[int, Path]]] = [{}]  # all calibrations in one task
    for exposure, rows in registry.groupby("exposure"):
        files = {int(d): paths.path(name, exposure=exposure, detector=d) for d in rows["detector"]}
        if rows["obstype"].iloc[0] == "science":
            groups.append({int(exposure): files})
        else:
            groups[0][int(exposure)] = files
    common = dict(
        preset=args.preset,
        seed=args.seed,
        truth_object_path=paths.path("truth_object"),
        image_format=args.format,
    )
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(_call, simulate_exposures, {**common, "output_paths": g})
            for g in groups
            if g
        ]
        for future in futures:
            future.result()
    n_exposures = registry["exposure"].nunique()
    log.info("simulated %d exposures (%d files) under %s", n_exposures, len(registry), args.output)
    return 0


def _call(func, kwargs):
    return func(**kwargs)


def _ingest(args: argparse.Namespace) -> int:
    from workflow_lib.steps.ingest import ingest_raw

    output = Path(args.output)
    ingest_raw(
        raw_dir=args.raw_dir,
        registry_path=str(output),
        problems_path=str(output.with_name(output.stem + "_problems.csv")),
        image_format=args.format,
        on_bad_file=args.on_bad_file,
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    from workflow_lib.io.butler import Butler

    butler = Butler(args.output_dir)
    if args.dataset_type is None:
        for name in butler.dataset_types():
            print(f"{name}: {len(butler.list(name)) or 1}")
    else:
        print(butler.list(args.dataset_type).to_string(index=False))
    return 0


def _metrics(args: argparse.Namespace) -> int:
    import json

    from workflow_lib.io.butler import Butler
    from workflow_lib.qa.metrics import single_frame_metrics

    butler = Butler(args.output_dir)
    metrics = single_frame_metrics(
        butler.get("Source"),
        butler.get("CcdVisit"),
        butler.get("truth_object"),
        butler.get("truth_ccdvisit"),
        snr_min=args.snr_min,
    )
    result: dict = {"single_frame": metrics}
    if args.static_sky and butler.exists("Object"):
        from workflow_lib.steps.quality import static_sky_quality

        window = (args.template_mjd_min, args.template_mjd_max)
        result["static_sky"] = static_sky_quality(args.output_dir, template_window=window)
    print(json.dumps(result, indent=2, default=_json_default))
    return 0


def _check_metrics(args: argparse.Namespace) -> int:
    import json

    import yaml

    from workflow_lib.qa.check import check_metrics

    try:
        metrics = json.loads(open(args.metrics, encoding="utf-8").read())
        thresholds = yaml.safe_load(open(args.thresholds, encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"dc2-drp check-metrics: {err}", file=sys.stderr)
        return 2
    if not isinstance(thresholds, dict):
        print(f"dc2-drp check-metrics: {args.thresholds}: expected a mapping", file=sys.stderr)
        return 2
    try:
        checks = check_metrics(metrics, thresholds)
    except ValueError as err:
        print(f"dc2-drp check-metrics: {args.thresholds}: {err}", file=sys.stderr)
        return 2
    for check in checks:
        print(check.describe())
    failed = [c for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} of {len(checks)} thresholds met")
    return 1 if failed else 0


def _json_default(value: object) -> object:
    """numpy scalars and arrays in the metrics become plain JSON."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _consolidate(args: argparse.Namespace) -> int:
    from workflow_lib.core.paths import ProductPaths
    from workflow_lib.steps.summary import write_run_summary
    from workflow_lib.steps.tables import consolidate_output_dir

    counts = consolidate_output_dir(output_dir=args.output_dir, tables=args.tables)
    for table, n_rows in counts.items():
        print(f"{table}: {n_rows} rows")
    paths = ProductPaths(args.output_dir)
    registry, problems = paths.path("registry"), paths.path("ingest_problems")
    if "CcdVisit" in counts and registry.exists() and problems.exists():
        # The run summary lists the failed CCDs of the CcdVisit table just built.
        write_run_summary(
            registry_path=str(registry),
            problems_path=str(problems),
            summary_path=str(paths.path("run_summary")),
            ccdvisit_table_path=str(paths.path("CcdVisit")),
        )
        print(f"run summary: {paths.path('run_summary')}")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from workflow_lib.core.config import load_config

    repo_default = Path(__file__).resolve().parents[1] / "config.yaml"
    merged: dict = yaml.safe_load(repo_default.read_text()) if repo_default.exists() else {}
    for path in args.configfiles:
        _merge(merged, yaml.safe_load(Path(path).read_text()) or {})
    load_config(merged)
    print("config OK")
    return 0


def _merge(base: dict, update: dict) -> None:
    """Snakemake's --configfile semantics: nested dictionaries are updated key by key."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dc2-drp", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="write the built-in survey in the CONTRACT formats")
    sim.add_argument("--preset", default="tiny", choices=list(preset_names()))
    sim.add_argument("--seed", type=int, default=20261121)
    sim.add_argument("--format", default="raw", choices=["raw", "eimage"])
    sim.add_argument("--output", required=True, help="directory; products follow workflow paths")
    sim.add_argument("--jobs", type=int, default=1, help="exposures simulated in parallel")
    sim.set_defaults(func=_simulate)

    ing = sub.add_parser("ingest", help="scan a raw directory and write a registry")
    ing.add_argument("raw_dir")
    ing.add_argument("--output", required=True, help="registry Parquet file to write")
    ing.add_argument("--format", default="raw", choices=["raw", "eimage"])
    ing.add_argument("--on-bad-file", default="fail", choices=["fail", "skip"])
    ing.set_defaults(func=_ingest)

    lst = sub.add_parser("list", help="list products under an output directory")
    lst.add_argument("output_dir")
    lst.add_argument("dataset_type", nargs="?")
    lst.set_defaults(func=_list)

    met = sub.add_parser("metrics", help="quality of a simulated run's products against its truth")
    met.add_argument("output_dir")
    met.add_argument("--snr-min", type=float, default=50.0, help="bright-star S/N threshold")
    met.add_argument(
        "--no-static-sky",
        dest="static_sky",
        action="store_false",
        help="single-frame figures only (the static-sky ones re-measure template coadds)",
    )
    met.add_argument("--template-mjd-min", type=float, default=None)
    met.add_argument(
        "--template-mjd-max", type=float, default=60630.0, help="the run's template.mjd_max"
    )
    met.set_defaults(func=_metrics)

    cm = sub.add_parser(
        "check-metrics",
        help="compare a run's qa/metrics.json with thresholds; exit 1 if one is not met",
    )
    cm.add_argument("metrics", help="a metrics.json written by the workflow")
    cm.add_argument("--thresholds", required=True, help="YAML: dotted metric path -> {min, max}")
    cm.set_defaults(func=_check_metrics)

    con = sub.add_parser(
        "consolidate",
        help="build the consolidated tables from every per-CCD product on disk (no DAG), "
        "e.g. after partitioned runs",
    )
    con.add_argument("output_dir")
    con.add_argument(
        "--tables", nargs="+", default=["CcdVisit", "Source"], choices=["CcdVisit", "Source"]
    )
    con.set_defaults(func=_consolidate)

    chk = sub.add_parser("check-config", help="validate config.yaml merged with override files")
    chk.add_argument("configfiles", nargs="*")
    chk.set_defaults(func=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as err:  # one clear line for the user; tracebacks are for --debug runs
        from workflow_lib.core.config import ConfigError
        from workflow_lib.steps.ingest import IngestError

        if isinstance(err, (ConfigError, IngestError, FileNotFoundError, KeyError)):
            print(f"dc2-drp: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
