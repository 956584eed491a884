"""The one adapter between a Snakemake job and a step function.

A rule names its step in ``params: step="module:function"`` (module relative
to ``workflow_lib.steps``). Named inputs, named outputs, the other params and
the wildcards the function asks for become keyword arguments; unnamed inputs
and outputs exist for the DAG only. Logging goes to the rule's log file.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any


def resolve_step(spec: str) -> Callable[..., Any]:
    """``'ingest:ingest_raw'`` -> workflow_lib.steps.ingest.ingest_raw."""
    module_name, _, func_name = spec.partition(":")
    module = importlib.import_module(f"workflow_lib.steps.{module_name}")
    return getattr(module, func_name)


def step_kwargs(
    func: Callable[..., Any],
    *,
    named_inputs: Mapping[str, Any],
    named_outputs: Mapping[str, Any],
    params: Mapping[str, Any],
    wildcards: Mapping[str, str],
) -> dict[str, Any]:
    """Keyword arguments for ``func``; a named item it does not take is an error."""
    accepted = inspect.signature(func).parameters
    kwargs: dict[str, Any] = {}
    for source in (named_inputs, named_outputs, params):
        for key, value in source.items():
            if key not in accepted:
                raise TypeError(f"{func.__name__} takes no argument {key!r} (from the rule)")
            kwargs[key] = value
    for key, value in wildcards.items():
        if key in accepted and key not in kwargs:
            kwargs[key] = int(value) if str(value).isdigit() else value
    return kwargs


def configure_logging(log_path: str | None) -> None:
    # The job's log file is where Snakemake points users; the console keeps
    # Snakemake's own progress. Without a log file, log to stderr.
    handler: logging.Handler = (
        logging.FileHandler(log_path, mode="w") if log_path else logging.StreamHandler(sys.stderr)
    )
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[handler],
        force=True,
    )
    logging.captureWarnings(True)


def _seconds_since_process_start() -> float:
    """Wall seconds since this process was created: the job's fixed start-up cost
    (interpreter, Snakemake's script preamble, the step's imports)."""
    import psutil  # a Snakemake dependency

    return time.time() - psutil.Process().create_time()


def run_snakemake_job(smk: Any) -> Any:
    """Run the step of a Snakemake job (``smk`` is the ``snakemake`` object of a script)."""
    # OpenMP libraries (astroscrappy's among them) otherwise take every core of
    # the node, oversubscribing it when Snakemake runs jobs side by side.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(smk.threads))))
    configure_logging(smk.log[0] if len(smk.log) else None)
    params = dict(smk.params.items())
    spec = params.pop("step")
    func = resolve_step(spec)
    kwargs = step_kwargs(
        func,
        named_inputs=dict(smk.input.items()),
        named_outputs=dict(smk.output.items()),
        params=params,
        wildcards=dict(smk.wildcards.items()),
    )
    log = logging.getLogger("workflow_lib.steps")
    log.info(
        "rule %s: step %s (%.2f s after the job's process started)",
        smk.rule,
        spec,
        _seconds_since_process_start(),
    )
    start = time.perf_counter()
    try:
        result = func(**kwargs)
    except BaseException:
        # The job's log is where Snakemake points the user: the traceback goes there
        # too (and on to Snakemake's own output when the exception propagates).
        log.exception("step %s failed after %.2f s", spec, time.perf_counter() - start)
        raise
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    log.info(
        "step %s done in %.2f s, peak memory %.0f MB", spec, time.perf_counter() - start, peak_mb
    )
    return result
