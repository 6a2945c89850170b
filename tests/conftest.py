"""Session-wide fixtures: one tiny synthetic competition root and its caches, built once.

Tiny on purpose (32 px, 8 sagittal slices, 6 train + 2 test studies): every test that trains
reads these instead of writing its own, so the whole suite stays fast on two CPU cores.
Other test modules may add fixtures here; keep them additive.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SYNTH = {"train_studies": 6, "test_studies": 2, "seed": 0, "image_size": 32, "slices": 8}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic competition root (``lsdc synth`` at TINY_SYNTH)."""
    from lsdc.synth.generator import SynthConfig, synthesize

    return synthesize(
        tmp_path_factory.mktemp("synth") / "root", SynthConfig(**TINY_SYNTH), progress=False
    )


@pytest.fixture(scope="session")
def synth_cache(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The train split of ``synth_root``, preprocessed."""
    from lsdc.preprocessing.cache import preprocess_split

    cache = tmp_path_factory.mktemp("cache") / "train"
    preprocess_split(synth_root, cache, "train", progress=False)
    return cache


@pytest.fixture(scope="session")
def synth_test_cache(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test split of ``synth_root``, preprocessed."""
    from lsdc.preprocessing.cache import preprocess_split

    cache = tmp_path_factory.mktemp("cache") / "test"
    preprocess_split(synth_root, cache, "test", progress=False)
    return cache


@pytest.fixture(scope="session")
def tiny_run(synth_root: Path, synth_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ``lsdc train --config tiny`` run over ``synth_cache`` (every fold)."""
    from lsdc.cli import main

    run = tmp_path_factory.mktemp("runs") / "tiny"
    argv = ["train", "--config", "tiny", "--data", str(synth_root), "--cache", str(synth_cache)]
    assert main([*argv, "--out", str(run), "--no-progress"]) == 0
    return run


@pytest.fixture
def augment_kwargs() -> dict:
    """Arguments of ``training_transforms`` with every random transform switched on (elastic
    excepted: slow and covered by MONAI's own tests)."""
    return {
        "flip_prob": 0.5,
        "affine_prob": 1.0,
        "rotate_degrees": 10.0,
        "scale": 0.1,
        "elastic_prob": 0.0,
        "noise_prob": 1.0,
        "noise_std": 0.1,
        "shift_prob": 1.0,
        "intensity_shift": 0.1,
    }
