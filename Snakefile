# DC2-style Data Release Processing, emulated with Snakemake.
# The DAG is built from the exposure registry (workflow_lib.workflow); every
# rule runs one step of workflow_lib through scripts/run_step.py.
import os

from snakemake.utils import min_version

from workflow_lib.core.paths import wildcard_constraints as dimension_constraints
from workflow_lib.plans.slurm_status import read_cancelled_jobs_as_cancelled
from workflow_lib.plans.stale_locks import clear_stale_locks_and_register
from workflow_lib.workflow import WorkflowPlan

min_version("9.0")

# A run killed hard leaves Snakemake's lock behind; the same command restarts it.
# A SLURM job cancelled with scancel must fail (and be retried), not hang the run.
if workflow.is_main_process:
    clear_stale_locks_and_register(".snakemake")
    read_cancelled_jobs_as_cancelled()


configfile: os.path.join(workflow.basedir, "config.yaml")


plan = WorkflowPlan(config)
paths = plan.paths


wildcard_constraints:
    **dimension_constraints(),


include: "rules/simulate.smk"
include: "rules/ingest.smk"
include: "rules/refcat.smk"
include: "rules/calibs.smk"
include: "rules/process_ccd.smk"
include: "rules/coadd.smk"
include: "rules/objects.smk"
include: "rules/diffim.smk"
include: "rules/association.smk"
include: "rules/summary.smk"
include: "rules/qa.smk"


rule all:
    input:
        plan.final_targets(),
    default_target: True
