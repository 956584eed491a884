"""The package's layering, checked on its import graph (what import-linter contracts state).

- The stage folders form a ladder: ``core`` (the shared layer) <- ``single_frame`` <-
  ``static_sky`` <- ``objects`` <- ``diffim`` <- ``association``; a stage imports only
  ``core`` and the stages before it. ``qa`` and ``sim`` stand on ``core`` alone.
- Numerics (the stage folders, ``core``, ``qa``, ``sim``) never import ``io``, ``steps`` or
  the workflow layer (``workflow``, ``cli``): they work on arrays and never touch files.
- ``io`` never imports ``steps`` or the workflow layer; ``steps`` never import the workflow
  layer; the stage plans (``plans``, the workflow layer's parse-time logic per stage) never
  open a file through ``io`` and never import the steps.
- No import cycle between modules at import time (an import inside a function, the one
  way to break a cycle, is counted for the layers but not for cycles).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "workflow_lib"
LADDER = ("core", "single_frame", "static_sky", "objects", "diffim", "association")
ALLOWED: dict[str, set[str]] = {stage: {"core", *LADDER[: i + 1]} for i, stage in enumerate(LADDER)}
ALLOWED |= {
    "qa": {"core", "qa"},
    "sim": {"core", "sim"},
    "io": {*LADDER, "qa", "io"},
    "steps": {*LADDER, "qa", "sim", "io", "steps"},
    "plans": {*LADDER, "sim", "plans"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported workflow_lib module, at import time?) for every import in the file."""
    tree = ast.parse(path.read_text())
    # Imports under `if TYPE_CHECKING:` at module level never run.
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            child_eager = eager and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            if isinstance(child, ast.Import):
                found.extend((a.name, child_eager) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in MODULES else child.module, child_eager))
            visit(child, child_eager)

    visit(tree, True)
    return [(m, e) for m, e in found if m == "workflow_lib" or m.startswith("workflow_lib.")]


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in ALLOWED))
def test_module_imports_only_its_own_and_lower_layers(module):
    layer = _layer(module)
    wrong = sorted(
        {m for m, _ in GRAPH[module] if m != "workflow_lib" and _layer(m) not in ALLOWED[layer]}
    )
    assert not wrong, f"{module} ({layer}) imports {wrong}; allowed: {sorted(ALLOWED[layer])}"


def test_every_module_is_in_a_layer():
    loose = sorted(
        m
        for m in MODULES
        if _layer(m) not in ALLOWED
        and m
        not in {
            "workflow_lib",
            "workflow_lib.__main__",
            "workflow_lib.cli",
            "workflow_lib.workflow",
        }
    )
    assert not loose, f"modules outside every layer (give them a stage folder): {loose}"


def test_no_import_cycles():
    eager = {
        m: sorted({t for t, at_import in deps if at_import and t in MODULES and t != m})
        for m, deps in GRAPH.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in eager[m]:
            if state.get(t) == 1:
                return [*stack[stack.index(t) :], t]
            if t not in state and (cycle := walk(t)):
                return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(eager):
        if m not in state and (cycle := walk(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_a_violation(tmp_path):
    """The graph reader finds imports in functions and ignores TYPE_CHECKING blocks."""
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import workflow_lib.io\n"
        "def f():\n    from workflow_lib.steps import runner\n"
        "from workflow_lib.core import flags\n"
    )
    found = dict(_imports(src))
    assert found == {"workflow_lib.steps.runner": False, "workflow_lib.core.flags": True}
