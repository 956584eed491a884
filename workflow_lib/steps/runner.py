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
from dataclasses import dataclass
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


def seconds_since_process_start() -> float:
    """Wall seconds since this process was created: the job's fixed start-up cost
    (interpreter, Snakemake's script preamble, the step's imports)."""
    import psutil  # a Snakemake dependency

    return time.time() - psutil.Process().create_time()


def _plain(value: Any) -> Any:
    """Snakemake's named lists and IO strings as builtins (picklable without Snakemake)."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class Job:
    """What a step needs of its Snakemake job, in builtins only, so that a warm
    worker (``warm_start``) can receive it without importing Snakemake."""

    rule: str
    step: str
    threads: int
    log_path: str | None
    named_inputs: dict[str, Any]
    named_outputs: dict[str, Any]
    params: dict[str, Any]
    wildcards: dict[str, str]

    @classmethod
    def from_snakemake(cls, smk: Any) -> Job:
        """From the ``snakemake`` object of a script (``params: step=`` names the step)."""
        params = _plain(dict(smk.params.items()))
        return cls(
            rule=str(smk.rule),
            step=params.pop("step"),
            threads=max(1, int(smk.threads)),
            log_path=str(smk.log[0]) if len(smk.log) else None,
            named_inputs=_plain(dict(smk.input.items())),
            named_outputs=_plain(dict(smk.output.items())),
            params=params,
            wildcards=_plain(dict(smk.wildcards.items())),
        )


def run_job(job: Job, *, startup_s: float, forked_from: int | None = None) -> Any:
    """Run the job's step, logging to the job's log; ``startup_s`` is what the job's
    process spent before it, ``forked_from`` the warm-start server this process was
    forked from, if any (both reported in the log)."""
    # OpenMP libraries (astroscrappy's among them) otherwise take every core of
    # the node, oversubscribing it when Snakemake runs jobs side by side.
    os.environ.setdefault("OMP_NUM_THREADS", str(job.threads))
    configure_logging(job.log_path)
    func = resolve_step(job.step)
    kwargs = step_kwargs(
        func,
        named_inputs=job.named_inputs,
        named_outputs=job.named_outputs,
        params=job.params,
        wildcards=job.wildcards,
    )
    log = logging.getLogger("workflow_lib.steps")
    warm = f"; forked from warm-start server {forked_from}" if forked_from else ""
    log.info(
        "rule %s: step %s (%.2f s after the job's process started%s)",
        job.rule,
        job.step,
        startup_s,
        warm,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        result = func(**kwargs)
    except BaseException:
        # The job's log is where Snakemake points the user: the traceback goes there
        # too (and on to Snakemake's own output when the exception propagates).
        log.exception("step %s failed after %.2f s", job.step, time.perf_counter() - start)
        raise
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    log.info(
        "step %s done in %.2f s, CPU %.2f s, peak memory %.0f MB",
        job.step,
        time.perf_counter() - start,
        time.process_time() - cpu_start,
        peak_mb,
    )
    return result


def run_snakemake_job(smk: Any, *, warm: bool = False) -> Any:
    """Run the step of a Snakemake job (``smk`` is the ``snakemake`` object of a script).

    With ``warm``, the step runs in a child forked from this machine's warm worker
    (``warm_start``) when one is up, and this process only waits for it; otherwise
    (or when none is up yet, starting one for the next jobs) it runs here.
    """
    job = Job.from_snakemake(smk)
    if warm:
        from workflow_lib.steps import warm_start

        exit_code = warm_start.run_in_worker(job, startup_s=seconds_since_process_start())
        if exit_code is not None:
            if exit_code:
                raise SystemExit(exit_code)
            return None
    return run_job(job, startup_s=seconds_since_process_start())
