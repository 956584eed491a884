"""A cancelled SLURM job must count as failed, or the whole run waits for it forever.

``sacct`` reports a job cancelled with ``scancel`` as ``CANCELLED by <uid>``;
snakemake-executor-plugin-slurm (2.8.0, the newest release) compares the state
with ``CANCELLED`` exactly, so it takes such a job for still running and the
workflow never ends (seen on the test cluster: the run sat idle with nothing
queued). The old Snakemake-Profiles/slurm status script had the same bug and
fixed it by keeping the first word of the state; this does the same to the
plugin's status query, in the main Snakemake process, when the plugin is loaded.
A cancelled job then fails, the profile's ``retries`` resubmit it, and the rest
of the DAG goes on.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

_PLUGIN = "snakemake_executor_plugin_slurm"


def first_word_states(statuses: dict[str, str] | None) -> dict[str, str] | None:
    """``{job id: state}`` with each state cut to its first word (``CANCELLED by 0``)."""
    if statuses is None:
        return None
    return {job: state.split(" ", 1)[0] if state else state for job, state in statuses.items()}


def read_cancelled_jobs_as_cancelled() -> bool:
    """Wrap the loaded plugin's status query; True if it was wrapped now."""
    plugin: Any = sys.modules.get(_PLUGIN)  # Any: the plugin's attributes are patched
    original = getattr(plugin, "query_job_status", None)
    if original is None or getattr(original, "first_word_states", False):
        return False

    async def query_job_status(command: str, logger: Any) -> tuple[Any, Any]:
        statuses, duration = await original(command, logger)
        return first_word_states(statuses), duration

    # mypy does not model attributes set on a function object.
    query_job_status.first_word_states = True  # type: ignore[attr-defined]
    plugin.query_job_status = query_job_status
    log.debug("%s: job states are read by their first word (CANCELLED by <uid>)", _PLUGIN)
    return True
