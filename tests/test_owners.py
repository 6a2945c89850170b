"""Every file name of a run folder and of a cache folder is spelled by its owner alone.

``RunDir`` (``lsdc/rundir.py``) owns a run's layout and ``CacheDir``
(``lsdc/preprocessing/cachedir.py``) a cache's: another module that writes ``run / "oof.csv"``
or ``cache / "index.csv"`` keeps working until the owner renames the file, and then reads a file
that is no longer written. The test reads every string literal of ``src/lsdc`` (docstrings
aside: prose may name the files) and fails on one that is a path to an owned file.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from lsdc.preprocessing.cachedir import CacheDir
from lsdc.rundir import FoldDir, RunDir

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lsdc"
OWNERS = {PACKAGE / "rundir.py", PACKAGE / "preprocessing" / "cachedir.py"}
SUFFIXES = (".npy", ".npz")
"""Suffixes of the cache's stack and grid files (their names are formatted by ``CacheDir``)."""


def _owned_names() -> set[str]:
    """The file names the owners spell, read from the owners themselves (folders aside: an
    ``evaluation`` folder is also made beside any prediction file)."""
    names = set()
    for owner in (RunDir("RUN"), FoldDir(Path("RUN/fold0"), 0), CacheDir("CACHE")):
        for attr, value in inspect.getmembers(type(owner)):
            if isinstance(value, property):
                found = getattr(owner, attr)
                names.add(found.name if isinstance(found, Path) else str(found))
    names.add(CacheDir("CACHE").record(1, 2).name)
    return {name for name in names if "." in name}


NAMES = _owned_names()


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (a module's, class's, function's or
    attribute's: a string statement of its own)."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }


def spelled_names(source: str) -> list[str]:
    """The literals of ``source`` that spell a path to an owned file (whitespace-free, last
    part an owned name) or a cache file's suffix."""
    tree = ast.parse(source)
    prose = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        text = node.value.strip()
        if id(node) in prose or not text or any(c.isspace() for c in text):
            continue
        if text.rsplit("/", 1)[-1] in NAMES or text in SUFFIXES:
            found.append(text)
    return found


def test_the_owners_name_their_files() -> None:
    assert {"oof.csv", "best.pt", "train.lock", "index.csv", "preprocess_report.csv"} <= NAMES
    assert {"cache.json", "preprocess.lock", "series.json", "oof_score.json"} <= NAMES


def test_the_check_finds_a_spelling() -> None:
    bad = (
        '"""index.csv in a docstring is prose."""\n'
        "def f(run, cache, k):\n"
        '    """oof.csv here too."""\n'
        '    a = run / "oof.csv"\n'
        "    b = f\"{cache / 'preprocess_report.csv'}\"\n"
        '    c = cache / f"{k}.npy"\n'
        '    d = "RUN/fold0/best.pt"\n'
        '    return "see the preprocess_report.csv of the cache"\n'
    )
    assert sorted(spelled_names(bad)) == [
        ".npy",
        "RUN/fold0/best.pt",
        "oof.csv",
        "preprocess_report.csv",
    ]


@pytest.mark.parametrize(
    "module",
    sorted(p for p in PACKAGE.rglob("*.py") if p not in OWNERS),
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_no_module_spells_an_owned_file(module: Path) -> None:
    spelled = spelled_names(module.read_text())
    assert not spelled, (
        f"{module.relative_to(PACKAGE)} spells {spelled}: go through RunDir or CacheDir"
    )
