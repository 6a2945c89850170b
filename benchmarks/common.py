"""Pieces the benchmark scripts share: running a verb and laying out a synthetic root."""

from __future__ import annotations

import time
from pathlib import Path

from lsdc.cli import main as lsdc


def run_verb(argv: list[str]) -> float:
    """Run one lsdc verb, fail loudly, return its wall-clock seconds."""
    started = time.perf_counter()
    code = lsdc(argv)
    if code != 0:
        raise SystemExit(f"lsdc {' '.join(argv)} failed with exit code {code}")
    return time.perf_counter() - started


def prepare_root(
    out: Path,
    data: Path | None,
    cache: Path | None,
    seed: int,
    train_studies: int,
    test_studies: int,
    synth_flags: list[str] | tuple[str, ...] = (),
) -> tuple[Path, Path, Path]:
    """A synthetic root and its train and test caches, reused when present.

    With ``data`` the root is that folder (its caches ``cache/train`` and ``cache/test``, default
    ``out/cache``); without it one is written to ``out/root`` with ``lsdc synth``.

    Returns:
        (root, train cache, test cache).
    """
    if data is not None:
        root = data
        cache_dir = cache if cache is not None else out / "cache"
        train_cache, test_cache = cache_dir / "train", cache_dir / "test"
    else:
        root, train_cache, test_cache = out / "root", out / "cache_train", out / "cache_test"
    if not (root / "solution_test.csv").is_file():
        if data is not None:
            raise SystemExit(f"{root}: not a synthetic root (no solution_test.csv)")
        synth = ["synth", "--out", str(root), "--seed", str(seed), "--quiet"]
        synth += ["--train-studies", str(train_studies), "--test-studies", str(test_studies)]
        run_verb([*synth, *synth_flags])
    for split, split_cache in (("train", train_cache), ("test", test_cache)):
        if not (split_cache / "index.csv").is_file():
            run_verb(
                ["preprocess", "--data", str(root), "--cache", str(split_cache), "--split", split]
            )
    return root, train_cache, test_cache
