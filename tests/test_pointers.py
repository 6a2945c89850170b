"""Every module, file and CLI flag that the configs and the docs name exists.

Docs and config comments are read by people who then type what they read: a pointer to a module
that moved (``lsdc/training/config.py``) or a flag that was renamed (``evaluate --calibrate``) sends
them nowhere. This test reads the text, not the code, so it fails as soon as a rename forgets one.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from lsdc.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "lsdc"
TEXTS = sorted(
    [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(PACKAGE / "configs").glob("*.yaml")]
)

FILE_PATH = re.compile(
    r"(?<![\w/.])((?:src/)?lsdc/[\w/]+\.py|(?:benchmarks|scripts|tests)/[\w/]+\.py)"
)
DOTTED = re.compile(r"(?<![\w.])(lsdc(?:\.\w+)+)")
COMMAND = re.compile(r"(?<![\w.-])lsdc ([a-z][a-z-]*)([^`\n]*)")
"""``lsdc VERB ...`` anywhere in a config's line."""
CODE_COMMAND = re.compile(r"^\s*(?:\$\s*)?lsdc ([a-z][a-z-]*)([^`\n]*)", re.M)
"""``lsdc VERB ...`` at the start of a line of Markdown code (a sentence may say "lsdc reads")."""
FENCE = re.compile(r"```.*?```", re.S)
INLINE = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _top_level_names(module: Path) -> dict[str, set[str]]:
    """Names a module defines at top level -> the names each class defines (empty for others)."""
    tree = ast.parse(module.read_text())
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            inner = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inner.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    inner.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    inner |= {t.id for t in item.targets if isinstance(t, ast.Name)}
            names[node.name] = inner
        elif isinstance(node, ast.Assign):
            names.update({t.id: set() for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = set()
        elif isinstance(node, ast.ImportFrom):
            names.update({(a.asname or a.name): set() for a in node.names})
    return names


def dotted_exists(dotted: str) -> bool:
    """``lsdc.a.b`` names a module, or a module's top-level name, or a class's attribute."""
    parts = dotted.split(".")[1:]
    base = PACKAGE
    for i, part in enumerate(parts):
        if (base / part).is_dir():
            base = base / part
            continue
        module = base / f"{part}.py"
        rest = parts[i + 1 :]
        if not module.is_file():
            module, rest = base / "__init__.py", parts[i:]
        if not rest:
            return True
        names = _top_level_names(module)
        if rest[0] not in names:
            return False
        return len(rest) == 1 or (len(rest) == 2 and rest[1] in names[rest[0]])
    return True


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _verbs() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: _flags(p) for name, p in sub.choices.items()}


def _code(name: str, text: str) -> list[str]:
    """Where a text writes commands: a config's every line; a Markdown file's code."""
    if name.endswith(".yaml"):
        return text.splitlines()
    blocks = FENCE.findall(text)
    return [*blocks, *INLINE.findall(FENCE.sub("", text))]


def pointers(name: str, text: str) -> list[tuple[str, str, str]]:
    """(text name, kind, pointer) for every file, module, verb and flag a text names."""
    found = [(name, "file", m) for m in FILE_PATH.findall(text)]
    found += [(name, "module", m) for m in DOTTED.findall(text)]
    command = COMMAND if name.endswith(".yaml") else CODE_COMMAND
    for code in _code(name, text):
        for verb, rest in command.findall(code):
            found.append((name, "verb", verb))
            found += [(name, "flag", f"{verb} {flag}") for flag in FLAG.findall(rest)]
    return found


def stale(found: list[tuple[str, str, str]]) -> list[str]:
    """The pointers of ``found`` that name nothing, as ``text: kind pointer`` lines."""
    verbs = _verbs()
    missing = []
    for where, kind, pointer in found:
        if kind == "file":
            ok = (REPO / pointer).is_file() or (REPO / "src" / pointer).is_file()
        elif kind == "module":
            ok = dotted_exists(pointer)
        elif kind == "verb":
            ok = pointer in verbs
        else:
            verb, flag = pointer.split(" ")
            ok = verb not in verbs or flag in verbs[verb]
        if not ok:
            missing.append(f"{where}: {kind} {pointer}")
    return missing


def test_every_pointer_of_the_docs_and_configs_exists() -> None:
    found = [p for path in TEXTS for p in pointers(_rel(path), path.read_text())]
    assert len(found) > 100  # the patterns still match the texts
    missing = stale(found)
    assert not missing, "\n".join(missing)


def test_the_checker_tells_stale_pointers() -> None:
    text = (
        "See src/lsdc/training/config.py and `lsdc.tasks.two_stage.localization_oof`.\n"
        "```\nlsdc evaluate --run RUN --calibrate\nlsdc frobnicate --x\n```\n"
        "Kept: `lsdc.tasks.served.ServedRun.predict`, src/lsdc/rundir.py, `lsdc show --study 1`;\n"
        "prose such as lsdc reads the cache is no command.\n"
    )
    assert stale(pointers("doc.md", text)) == [
        "doc.md: file src/lsdc/training/config.py",
        "doc.md: module lsdc.tasks.two_stage.localization_oof",
        "doc.md: flag evaluate --calibrate",
        "doc.md: verb frobnicate",
    ]


@pytest.mark.parametrize(
    ("pointer", "exists"),
    [
        ("lsdc.tasks.served.ServedRun.predict", True),
        ("lsdc.rundir", True),
        ("lsdc.tasks.two_stage.localization_oof", False),
        ("lsdc.training.config", False),
        ("lsdc.tasks.served.ServedRun.no_such_method", False),
    ],
)
def test_the_checker_resolves_dotted_names(pointer: str, exists: bool) -> None:
    assert dotted_exists(pointer) is exists
