"""The state every stage's plan reads (set by WorkflowPlan.__init__)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from workflow_lib.core.config import WorkflowConfig
from workflow_lib.core.paths import ProductPaths


class PlanState:
    """Attributes the stage plans share; WorkflowPlan sets them."""

    config: dict[str, Any]
    cfg: WorkflowConfig
    paths: ProductPaths
    registry: pd.DataFrame
    science: pd.DataFrame
    calibrations: pd.DataFrame

    if TYPE_CHECKING:
        # Read-only properties of WorkflowPlan (declared for the type checker only).
        @property
        def simulated(self) -> bool: ...

        @property
        def image_format(self) -> str: ...
