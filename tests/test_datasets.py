"""The whole-study dataset: three series on a fixed grid, labels with an ignore index, metadata
normalised with training-fold statistics only, reproducible augmentation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lsdc.contract import IGNORE_INDEX, LABEL_COLUMNS, load_train_labels
from lsdc.datasets.transforms import training_transforms
from lsdc.datasets.whole_study import (
    META_FEATURES,
    N_META,
    StudyVolumeStore,
    WholeStudyDataset,
    fit_meta_normaliser,
    meta_vector,
)
from lsdc.preprocessing.cache import read_cache_index

torch.set_num_threads(1)

SIZE = (8, 16, 16)


@pytest.fixture(scope="module")
def store(synth_cache) -> StudyVolumeStore:
    return StudyVolumeStore(synth_cache, SIZE)


@pytest.fixture(scope="module")
def study_ids(synth_cache) -> list[int]:
    return sorted(read_cache_index(synth_cache)["study_id"].unique().tolist())


def test_store_resamples_every_series_to_the_grid_and_zscores_it(store, study_ids) -> None:
    loaded = store.load(study_ids[0])
    assert loaded["volumes"].shape == (3, *SIZE) and loaded["volumes"].dtype == np.float32
    for s in np.flatnonzero(loaded["missing"] == 0):
        v = loaded["volumes"][s]
        assert abs(v.mean()) < 1e-4 and abs(v.std() - 1) < 1e-3
    assert loaded["meta_raw"].shape == (3, len(META_FEATURES))


def test_a_study_without_series_is_zero_volumes_with_missing_flags(store) -> None:
    loaded = store.load(1)  # no such study in the cache
    assert loaded["missing"].tolist() == [1.0, 1.0, 1.0]
    assert not loaded["volumes"].any()
    assert np.isnan(loaded["meta_raw"]).all()


def test_metadata_is_normalised_with_the_training_fold_only(store, study_ids) -> None:
    train, val = study_ids[:4], study_ids[4:]
    normaliser = fit_meta_normaliser(store, train)
    vectors = np.stack([meta_vector(store.load(s), normaliser) for s in train])
    assert vectors.shape == (len(train), N_META)
    continuous = vectors[:, : 3 * len(META_FEATURES)]
    assert np.allclose(continuous.mean(axis=0), 0.0, atol=1e-5)
    everyone = fit_meta_normaliser(store, study_ids)
    assert normaliser != everyone, "statistics must depend on which studies they come from"
    assert np.isfinite(np.stack([meta_vector(store.load(s), normaliser) for s in val])).all()


def test_targets_are_class_indices_with_ignore_for_unlabelled(store, study_ids, synth_root) -> None:
    labels = load_train_labels(synth_root / "train.csv")
    labels = labels[labels["study_id"].isin(study_ids)].reset_index(drop=True)
    labels.loc[0, LABEL_COLUMNS[3]] = np.nan
    labels.loc[0, LABEL_COLUMNS[4]] = "Severe"
    normaliser = fit_meta_normaliser(store, study_ids)
    ds = WholeStudyDataset(store, [int(labels["study_id"][0])], normaliser, labels=labels)
    item = ds[0]
    assert item["target"].dtype == torch.int64 and item["target"].shape == (25,)
    assert item["target"][3] == IGNORE_INDEX and item["target"][4] == 2
    assert item["volumes"].shape == (3, *SIZE) and item["meta"].shape == (N_META,)
    assert item["study_id"] == labels["study_id"][0]


def test_unlabelled_dataset_has_no_target(store, study_ids) -> None:
    ds = WholeStudyDataset(store, study_ids[:2], fit_meta_normaliser(store, study_ids))
    assert "target" not in ds[0] and len(ds) == 2


def test_augmented_items_replay_per_epoch(store, study_ids, augment) -> None:
    normaliser = fit_meta_normaliser(store, study_ids)
    labels = pd.DataFrame({"study_id": study_ids, **{c: "Normal/Mild" for c in LABEL_COLUMNS}})
    ds = WholeStudyDataset(
        store,
        study_ids,
        normaliser,
        labels,
        transform=training_transforms(augment),
        seed=0,
    )
    ds.set_epoch(1)
    a, b = ds[2]["volumes"], ds[2]["volumes"]
    ds.set_epoch(2)
    c = ds[2]["volumes"]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not np.shares_memory(a.numpy(), store.load(study_ids[2])["volumes"])
