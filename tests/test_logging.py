"""Library code reports through ``logging`` and ``warnings``; only the face (cli.py, demo.py,
lsdc/__init__.py) prints, and the CLI shows those reports on stderr as it always has."""

from __future__ import annotations

import ast
import logging
import shutil
import warnings
from pathlib import Path

import pytest

from lsdc import api
from lsdc.cli import _library_output, as_flags, main
from lsdc.errors import LsdcWarning
from lsdc.inference.dicom_input import _own_names

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lsdc"
FACE = {PACKAGE / "cli.py", PACKAGE / "demo.py", PACKAGE / "__init__.py"}


def _writes_output(node: ast.AST) -> bool:
    """``print(...)``, ``sys.stderr.write(...)`` / ``sys.stdout.write(...)`` or ``tqdm.write(...)``."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return func.id == "print"
    if isinstance(func, ast.Attribute) and func.attr == "write":
        target = func.value
        if isinstance(target, ast.Name):
            return target.id == "tqdm"
        return (
            isinstance(target, ast.Attribute)
            and target.attr in {"stderr", "stdout"}
            and isinstance(target.value, ast.Name)
            and target.value.id == "sys"
        )
    return False


def test_no_library_module_prints() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in FACE
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if _writes_output(node)
    ]
    assert found == [], "library code logs (logging, warnings); only the face prints"


def test_the_walk_would_see_a_print(tmp_path: Path) -> None:
    code = "import sys\nprint('x')\nsys.stderr.write('y')\ntqdm.write('z')\nlog.info('ok')\n"
    assert [_writes_output(n) for n in ast.walk(ast.parse(code))].count(True) == 3


def _broken_cache(synth_cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the cache whose first entry lost its array; returns (cache, entry)."""
    cache = tmp_path / "cache"
    shutil.copytree(synth_cache, cache)
    entry = sorted(p.parent for p in cache.glob("*/*/series.json"))[0]
    (entry / "0.npy").unlink()
    return cache, entry


def test_an_api_call_reports_through_logging_not_on_stderr(
    synth_root: Path, synth_cache: Path, tmp_path: Path, caplog, capsys
) -> None:
    cache, entry = _broken_cache(synth_cache, tmp_path)
    with caplog.at_level(logging.WARNING, logger="lsdc"):
        api.preprocess(synth_root, cache, "train", progress=False)
    [record] = [r for r in caplog.records if "broken cache entry" in r.getMessage()]
    assert (record.name, record.levelno) == ("lsdc.preprocessing.cache", logging.WARNING)
    assert record.getMessage() == f"{entry}: broken cache entry (0.npy missing); redoing it"
    assert "broken cache entry" not in capsys.readouterr().err


def test_the_cli_shows_the_same_report_on_stderr(
    synth_root: Path, synth_cache: Path, tmp_path: Path, capsys
) -> None:
    cache, entry = _broken_cache(synth_cache, tmp_path)
    argv = ["preprocess", "--data", str(synth_root), "--cache", str(cache), "--split", "train"]
    assert main([*argv, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert (
        f"lsdc preprocess: warning: {entry}: broken cache entry (0.npy missing); redoing it\n"
        in err
    )
    assert logging.getLogger("lsdc").handlers == [], "the CLI's handler outlives the verb"


def test_the_cli_handler_shows_info_bare_warnings_prefixed_and_nothing_else(capsys) -> None:
    before = warnings.showwarning
    with _library_output("train"), warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.getLogger("lsdc.training.engine").info("fold 0 epoch 0: train_loss 1.0000")
        logging.getLogger("lsdc.training.engine").debug("not shown: debug")
        logging.getLogger("elsewhere").info("not shown: not lsdc's logger")
        warnings.warn("a tolerated argument", LsdcWarning, stacklevel=1)
    assert capsys.readouterr().err == (
        "fold 0 epoch 0: train_loss 1.0000\nlsdc train: warning: a tolerated argument\n"
    )
    assert warnings.showwarning is before
    assert logging.getLogger("lsdc").level == logging.NOTSET


def test_an_argument_that_is_tolerated_is_a_warning_naming_the_parameter() -> None:
    with pytest.warns(LsdcWarning) as caught:
        assert _own_names(["1.2.3"], {"9.9": "a"}) == {"1.2.3": "1.2.3"}
    assert [str(w.message) for w in caught] == [
        "StudyInstanceUID 1.2.3 is not in `study_ids`; its rows use the UID",
        "`study_ids` names StudyInstanceUID 9.9, which the folder does not hold",
    ]


def test_the_cli_spells_the_api_parameters_as_its_flags() -> None:
    assert as_flags("`out_dir`: `cache_dir` and `run_dirs`, not `predictions`") == (
        "--out: --cache and --run, not --pred"
    )
    assert as_flags(
        "give `run_dir=RUN`; `allow_fallback=True`; `wheel=False`; `tta_flip=True`"
    ) == ("give --run RUN; --allow-fallback; --no-wheel; --tta flip")
    assert as_flags("`image_size` and `device=cuda:1`") == "--image-size and --device cuda:1"
