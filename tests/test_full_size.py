"""The real data's sizes: the localizer grids paid once, and two_stage.yaml (the GPU config,
unshrunk) stepping on a competition-profile study on CPU."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lsdc.config import load_config
from lsdc.datasets import levels
from lsdc.datasets.levels import LOCALIZER_SERIES, StackStore
from lsdc.datasets.loader import make_loader
from lsdc.distributed import DistContext
from lsdc.preprocessing.cache import preprocess_split
from lsdc.preprocessing.cachedir import CacheDir
from lsdc.tasks.base import create_task
from lsdc.tasks.predict_loop import autocast_context

GRID = (16, 32, 32)


@pytest.fixture
def own_cache(synth_cache: Path, tmp_path: Path) -> Path:
    """A copy of the session's train cache that a test may write grids into."""
    return Path(shutil.copytree(synth_cache, tmp_path / "cache"))


def test_localizer_volumes_are_computed_once_then_read_back(
    own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first read writes each series' grid beside the study's entries; a new store (another
    worker, another epoch) reads exactly the same volume, grid and stack intensities back without
    sampling the stacks; a stack cached again is sampled anew."""
    computed = StackStore(own_cache, in_memory=False)
    study = int(computed.study_ids()[0])
    first = {d: computed.stored_series_volume(study, d, GRID) for d in LOCALIZER_SERIES}
    for description, (volume, _) in first.items():
        assert CacheDir(own_cache).series_grid(study, description, GRID).is_file()
        expected, _ = computed.series_volume(study, description, GRID)
        np.testing.assert_array_equal(volume, expected)

    def no_sampling(*args: object) -> None:
        raise AssertionError("sampled the stacks although the grid was stored")

    monkeypatch.setattr(levels, "sample_series", no_sampling)
    reader = StackStore(own_cache, in_memory=False)
    for description, (volume, grid) in first.items():
        again, again_grid = reader.stored_series_volume(study, description, GRID)
        np.testing.assert_array_equal(again, volume)
        np.testing.assert_array_equal(again_grid.to_patient(np.zeros((1, 3))),
                                      grid.to_patient(np.zeros((1, 3))))  # fmt: skip
    monkeypatch.setattr(reader, "load", no_sampling)  # the intensities came with the grids
    for description in LOCALIZER_SERIES:
        for key in reader.stacks(study, description):
            assert reader.intensity(key) == computed.intensity(key)

    key = reader.stacks(study, LOCALIZER_SERIES[0])[0]
    npy = CacheDir(own_cache).stack(*key)[0]
    os.utime(npy, ns=(npy.stat().st_atime_ns, npy.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="sampled the stacks"):
        StackStore(own_cache, in_memory=False).stored_series_volume(
            study, LOCALIZER_SERIES[0], GRID
        )


def test_two_stage_config_steps_on_a_competition_study(
    competition_root: Path, tmp_path: Path
) -> None:
    """two_stage.yaml as shipped (32 x 128 x 128 grids, 25 crops of 5 x 64 x 64, the full
    grader), batch size 1, on CPU in fp32 (its bf16 is for a GPU: on a CPU without native bf16 it
    runs many times slower, benchmarks/cpu_bf16.py): one training item of a 320-512 px study
    with a two-stack Axial T2 goes forward and backward, and every parameter of both stages gets
    a finite gradient."""
    cache = tmp_path / "cache"
    preprocess_split(competition_root, cache, "train", progress=False)
    config = load_config(
        "two_stage",
        ["data.batch_size=1", "data.num_workers=0", "data.cache_in_memory=false", "optim.amp=none"],
    )
    task = create_task(config, cache, competition_root)
    ids = task.training_labels()["study_id"].to_numpy()[:1]
    dataset = task.build_dataset(ids, task.fit_state(ids), train=True)
    cpu = DistContext(rank=0, world_size=1, device=torch.device("cpu"))
    batch = next(iter(make_loader(dataset, config, cpu, train=True)))
    assert batch["volumes"].shape == (1, 3, 1, 32, 128, 128)
    assert batch["volume_present"].all()
    assert batch["crops"].shape == (1, 25, 5, 64, 64)
    torch.manual_seed(0)
    model = task.build_model({})
    with autocast_context(config.optim.amp, cpu.device):
        outputs = task.forward(model, batch)
        loss = task.loss(outputs, batch)
    assert outputs["logits"].shape == (1, 25, 3)
    assert outputs["heatmaps"].shape == (1, 3, 25, 32, 128, 128)
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_a_store_travels_to_spawned_workers_without_its_stacks(own_cache: Path) -> None:
    """Loader workers started by spawn or forkserver receive the dataset pickled: a store that
    has opened every stack (as placing the labels does) must not carry their pixels along."""
    import pickle

    store = StackStore(own_cache, in_memory=False)
    keys = [key for s in store.study_ids() for d in LOCALIZER_SERIES for key in store.stacks(s, d)]
    pixels = sum(store.load(key).array.nbytes for key in keys)
    travelled = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 0.05 * pixels
    for key in keys:
        np.testing.assert_array_equal(travelled.load(key).array, store.load(key).array)
