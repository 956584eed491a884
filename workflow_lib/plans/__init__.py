"""The workflow plan by stage: what each stage's rules need at parse time.

:class:`~workflow_lib.workflow.WorkflowPlan` is made of these, one class per
stage (its ``rules/*.smk``), all reading the state the plan holds (the
validated config, the product paths, the registry and the selected science
and calibration exposures).
"""
