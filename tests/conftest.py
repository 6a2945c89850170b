"""Session-wide fixtures: one tiny synthetic competition root and its caches, built once.

Tiny on purpose (32 px, 8 sagittal slices, 6 train + 2 test studies): every test that trains
reads these instead of writing its own, so the whole suite stays fast on two CPU cores.
Other test modules may add fixtures here; keep them additive.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_overrides import TINY_TWO_STAGE

from lsdc.config import AugmentConfig
from lsdc.synth.config import SynthConfig

TINY_SYNTH = {
    "train_studies": 6, "test_studies": 2, "seed": 0, "image_size": 32, "slices": 8,
    "coordinate_error_rate": 0.0,  # tests compare stage 1 and the crops with the true points
}  # fmt: skip


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic competition root (``lsdc synth`` at TINY_SYNTH)."""
    from lsdc.synth.generator import SynthConfig, synthesize

    return synthesize(
        tmp_path_factory.mktemp("synth") / "root", SynthConfig(**TINY_SYNTH), progress=False
    )


COMPETITION_SYNTH = {
    "train_studies": 2, "test_studies": 1, "seed": 6, "profile": "competition",
    "coordinate_error_rate": 0.0,
}  # fmt: skip
"""Three studies at the real data's sizes (seed 6: 320-512 px, an Axial T2 of two tilted stacks
in one series and one split into two series)."""


@pytest.fixture(scope="session")
def competition_config() -> SynthConfig:
    """The config of ``competition_root``."""
    return SynthConfig(**COMPETITION_SYNTH)


@pytest.fixture(scope="session")
def competition_root(
    competition_config: SynthConfig, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A synthetic root of ``lsdc synth --profile competition`` (COMPETITION_SYNTH)."""
    from lsdc.synth.generator import synthesize

    return synthesize(
        tmp_path_factory.mktemp("competition") / "root", competition_config, progress=False
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


@pytest.fixture(scope="session")
def tiny_two_stage_run(
    synth_root: Path, synth_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A finished ``lsdc train --config two_stage_demo`` run (TINY_TWO_STAGE) over
    ``synth_cache`` (every fold)."""
    from lsdc.cli import main

    run = tmp_path_factory.mktemp("runs") / "two_stage"
    argv = ["train", "--config", "two_stage_demo", "--data", str(synth_root)]
    argv += ["--cache", str(synth_cache), "--out", str(run), "--no-progress", *TINY_TWO_STAGE]
    assert main(argv) == 0
    return run


@pytest.fixture
def augment() -> AugmentConfig:
    """Augmentation with every random transform switched on (elastic excepted: slow and covered
    by MONAI's own tests)."""
    return AugmentConfig(
        flip_prob=0.5,
        affine_prob=1.0,
        rotate_degrees=10.0,
        scale=0.1,
        elastic_prob=0.0,
        noise_prob=1.0,
        noise_std=0.1,
        shift_prob=1.0,
        intensity_shift=0.1,
    )
