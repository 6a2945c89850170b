"""Augmentation: the left-right flip mirrors every series and swaps left/right labels;
random transforms draw once per sample and replay from a seed."""

from __future__ import annotations

import pytest
import torch

from lsdc.contract import LABEL_COLUMNS, LEFT_RIGHT_PERMUTATION, label_index, load_train_labels
from lsdc.datasets.transforms import (
    RandFlipLeftRightd,
    flip_left_right,
    sample_seed,
    seed_transform,
    training_transforms,
)
from lsdc.datasets.whole_study import StudyVolumeStore, WholeStudyDataset

torch.set_num_threads(1)


def _sample() -> dict:
    volumes = torch.arange(3 * 4 * 5 * 6, dtype=torch.float32).reshape(3, 4, 5, 6)
    return {
        "volumes": volumes,
        "lr_axis": torch.tensor([0, 0, 2]),
        "target": torch.arange(25, dtype=torch.int64),
    }


def test_flip_mirrors_each_series_along_its_left_right_axis() -> None:
    sample = _sample()
    out = flip_left_right(sample)
    assert torch.equal(out["volumes"][0], torch.flip(sample["volumes"][0], dims=(0,)))
    assert torch.equal(out["volumes"][1], torch.flip(sample["volumes"][1], dims=(0,)))
    assert torch.equal(out["volumes"][2], torch.flip(sample["volumes"][2], dims=(2,)))
    twice = flip_left_right(out)
    assert torch.equal(twice["volumes"], sample["volumes"])
    assert torch.equal(twice["target"], sample["target"])


def test_flip_swaps_left_and_right_labels() -> None:
    out = flip_left_right(_sample())
    left = label_index("left_neural_foraminal_narrowing", "l4_l5")
    right = label_index("right_neural_foraminal_narrowing", "l4_l5")
    spinal = label_index("spinal_canal_stenosis", "l4_l5")
    assert out["target"][left] == right and out["target"][right] == left
    assert out["target"][spinal] == spinal


def test_flip_on_a_synthetic_study_whose_sides_differ(synth_root, synth_cache) -> None:
    labels = load_train_labels(synth_root / "train.csv")
    left_cols = [c for c in LABEL_COLUMNS if c.startswith("left_")]
    right_cols = ["right_" + c[len("left_") :] for c in left_cols]
    differs = (labels[left_cols].to_numpy() != labels[right_cols].to_numpy()).any(axis=1)
    assert differs.any(), "the tiny synth should have a study with asymmetric findings"
    study = int(labels["study_id"][differs].iloc[0])
    store = StudyVolumeStore(synth_cache, (8, 16, 16))
    normaliser = {"mean": [0.0] * 21, "std": [1.0] * 21}
    item = WholeStudyDataset(store, [study], normaliser, labels=labels)[0]
    # sagittal slices run along patient x (left-right); axial columns do
    assert item["lr_axis"].tolist() == [0, 0, 2]
    flipped = flip_left_right(item)
    for left, right in zip(left_cols, right_cols, strict=True):
        assert (
            flipped["target"][LABEL_COLUMNS.index(left)]
            == item["target"][LABEL_COLUMNS.index(right)]
        )
    assert torch.equal(flipped["volumes"][0], torch.flip(item["volumes"][0], dims=(0,)))
    assert not torch.equal(flipped["target"], item["target"])


@pytest.mark.parametrize(("prob", "flipped"), [(1.0, True), (0.0, False)])
def test_random_flip_respects_its_probability(prob: float, flipped: bool) -> None:
    sample = _sample()
    out = RandFlipLeftRightd(prob=prob)(sample)
    expected = torch.as_tensor(LEFT_RIGHT_PERMUTATION) if flipped else sample["target"]
    assert torch.equal(out["target"], expected)


def test_training_transforms_replay_from_a_seed_and_keep_shapes(augment) -> None:
    transform = training_transforms(augment)
    sample = _sample()
    sample["volumes"] = torch.randn(3, 8, 16, 16)
    seed_transform(transform, sample_seed(0, 0, 3))
    first = transform(dict(sample))
    seed_transform(transform, sample_seed(0, 0, 3))
    again = transform(dict(sample))
    seed_transform(transform, sample_seed(0, 1, 3))
    other_epoch = transform(dict(sample))
    assert first["volumes"].shape == (3, 8, 16, 16) and first["volumes"].dtype == torch.float32
    assert type(first["volumes"]) is torch.Tensor  # no MetaTensor leaks into collate
    assert torch.equal(first["volumes"], again["volumes"])
    assert not torch.allclose(first["volumes"], other_epoch["volumes"])


def test_sample_seed_depends_on_epoch_and_index_only() -> None:
    seeds = {sample_seed(0, e, i) for e in range(3) for i in range(3)}
    assert len(seeds) == 9
    assert sample_seed(0, 2, 1) == sample_seed(0, 2, 1)
    assert sample_seed(1, 2, 1) != sample_seed(0, 2, 1)
