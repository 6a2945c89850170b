"""The house rule (docs/ARCHITECTURE.md): dependencies point one way along the pipeline.

The import graph is read with ``ast`` (no module is executed), so a lazy import inside a function
counts the same as one at the top of a file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lsdc"

BASE = {"errors", "utils"}
CORE = BASE | {"contract", "config", "rundir", "checkpoint", "distributed"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "utils": {"errors"},
    "contract": BASE,
    "config": BASE,
    "rundir": BASE,
    "checkpoint": BASE,
    "distributed": BASE,
    "synth": BASE | {"contract"},
    "preprocessing": BASE | {"contract"},
    "datasets": CORE | {"preprocessing"},
    "models": CORE,
    "tasks": CORE | {"preprocessing", "datasets", "models"},
    "evaluation": CORE | {"preprocessing", "datasets", "models", "tasks"},
    "training": CORE | {"preprocessing", "datasets", "models", "tasks", "evaluation"},
    "inference": CORE | {"preprocessing", "datasets", "models", "tasks", "evaluation"},
    "api": set(),  # the face: anything but cli (checked below)
    "demo": set(),
}
"""Unit (a top-level module or package of lsdc) -> the units it may import."""

FACE = {"api", "demo", "cli", "__init__"}


def _unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_units(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "lsdc":
                names = [f"lsdc.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts == ["lsdc"]:
                found.add("__init__")  # the package face itself (``import lsdc``)
            elif parts[0] == "lsdc":
                found.add(parts[1])
    return found


def _graph() -> dict[Path, set[str]]:
    return {p: _imported_units(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_unit_has_a_rule() -> None:
    units = {_unit(p) for p in PACKAGE.rglob("*.py")}
    assert units - FACE <= set(ALLOWED), sorted(units - FACE - set(ALLOWED))


@pytest.mark.parametrize("unit", sorted(set(ALLOWED) - {"api", "demo"}))
def test_unit_imports_only_what_the_rule_allows(unit: str) -> None:
    broken = {
        str(path.relative_to(PACKAGE)): sorted(imported - ALLOWED[unit] - {unit})
        for path, imported in _graph().items()
        if _unit(path) == unit and imported - ALLOWED[unit] - {unit}
    }
    assert not broken, f"{unit} may import only {sorted(ALLOWED[unit])}; found {broken}"


def test_inference_never_imports_training() -> None:
    offenders = [
        str(p.relative_to(PACKAGE))
        for p, imported in _graph().items()
        if _unit(p) == "inference" and "training" in imported
    ]
    assert offenders == []


def test_nothing_imports_the_cli() -> None:
    offenders = [
        str(p.relative_to(PACKAGE)) for p, imported in _graph().items() if "cli" in imported
    ]
    assert offenders == []


def test_the_checker_sees_a_broken_rule(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from lsdc.training.engine import train_run\n    import lsdc.cli\n"
    )
    assert _imported_units(bad) == {"training", "cli"}
    face = tmp_path / "face.py"
    face.write_text("def g():\n    import lsdc\n    return lsdc.__file__\n")
    assert _imported_units(face) == {"__init__"}


def test_score_help_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "from lsdc.cli import main\n"
        "try:\n    main(['score', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"
