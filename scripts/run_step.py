"""Snakemake script adapter: every rule runs its step through this file."""

from workflow_lib.steps.runner import run_snakemake_job

run_snakemake_job(snakemake)  # type: ignore[name-defined] # noqa: F821
