"""LSST-style Data Release Processing, emulated as a Snakemake workflow.

Layers: numerics (``workflow_lib.<domain>``) work on arrays; steps
(``workflow_lib.steps``) read inputs, call numerics and write products; the
Snakemake rules under ``rules/`` only wire files together.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dc2-drp-workflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
