"""Snakemake script adapter: every rule runs its step through this file.

Local jobs run warm (workflow_lib/steps/warm_start.py: forked from a process that
has imported the library once); ``DC2_WARM_START=0`` runs each in its own process.
"""

from workflow_lib.steps.runner import run_snakemake_job

run_snakemake_job(snakemake, warm=True)  # type: ignore[name-defined] # noqa: F821
