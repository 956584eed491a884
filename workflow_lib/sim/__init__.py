"""Built-in DC2-like survey simulator (GalSim rendering, LSSTCam-like raw format).

Import-light on purpose: ``workflow_lib.sim.survey`` (the survey plan) must not
pull in GalSim, because the plan is built while Snakemake parses the workflow.
GalSim is imported only by :mod:`workflow_lib.sim.psf` and
:mod:`workflow_lib.sim.render`.
"""
