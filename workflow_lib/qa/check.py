"""Compare a run's ``metrics.json`` with thresholds: the regression gate.

A thresholds file (YAML) maps dotted paths into the metrics to bounds::

    survey.PA1_mmag.r.robust: {max: 15}
    truth.single_frame.astrometry_rms_mas: {max: 20}
    truth.static_sky.purity.purity: {min: 0.99}

A figure that is a yes/no (``passed``) counts as 1 or 0: ``{min: 1}`` asks
for true. A path that is absent from the metrics, or whose value is null (NaN when
written), fails: a figure that silently stopped being computed is a regression.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    """One threshold against one figure."""

    path: str
    value: float | None
    minimum: float | None
    maximum: float | None

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        if self.minimum is not None and self.value < self.minimum:
            return False
        return self.maximum is None or self.value <= self.maximum

    def describe(self) -> str:
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        value = "absent" if self.value is None else f"{self.value:g}"
        status = "ok  " if self.passed else "FAIL"
        return f"{status} {self.path} = {value} (goal {' and '.join(bounds)})"


def lookup(metrics: Mapping[str, Any], path: str) -> float | None:
    """The number at dotted ``path``; None where absent, null or not a number.

    Keys may hold dots themselves (``pa1_mmag_by_min_snr.50.0.robust``): the
    longest key that matches at each level is taken.
    """
    node: Any = metrics
    rest = path
    while rest:
        if not isinstance(node, Mapping):
            return None
        keys = [k for k in node if rest == k or rest.startswith(f"{k}.")]
        if not keys:
            return None
        key = max(keys, key=len)
        node, rest = node[key], rest[len(key) + 1 :]
    if not isinstance(node, (int, float)):  # bool is an int: true = 1, false = 0
        return None
    return float(node)


def check_metrics(metrics: Mapping[str, Any], thresholds: Mapping[str, Any]) -> list[Check]:
    """Every threshold checked, in the thresholds' order."""
    checks = []
    for path, bounds in thresholds.items():
        if not isinstance(bounds, Mapping) or not set(bounds) & {"min", "max"}:
            raise ValueError(f"threshold {path!r}: expected a mapping with min and/or max")
        unknown = set(bounds) - {"min", "max"}
        if unknown:
            raise ValueError(f"threshold {path!r}: unknown keys {sorted(unknown)}")
        checks.append(
            Check(
                path=str(path),
                value=lookup(metrics, str(path)),
                minimum=None if bounds.get("min") is None else float(bounds["min"]),
                maximum=None if bounds.get("max") is None else float(bounds["max"]),
            )
        )
    return checks
