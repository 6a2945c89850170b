"""Config overrides the tests share (imported by conftest.py and test modules)."""

TINY_TWO_STAGE = [
    "data.volume_size=[16,32,32]",
    "data.batch_size=2",
    "model.params={widths: [8, 8, 16, 16], layers: [1, 1, 1, 1]}",
    "task_params.localizer.params={features: [4, 4, 8, 8, 8, 4]}",
    "task_params.crop_size=16",
    "task_params.crop_slices=3",
    "optim.epochs=1",
    "folds.n_folds=2",
]
"""Overrides that shrink ``two_stage_demo`` to seconds on ``synth_cache``."""

TINY_FOLD0 = [
    "data.volume_size=[16,32,32]",
    "data.batch_size=2",
    "task_params.crop_size=16",
    "task_params.crop_slices=3",
    "folds.n_folds=2",
    "folds.fold=0",
    "optim.ema_decay=0.5",
]
"""Fold 0 of 2 on the tiny grid and crops, the network left to the test (no epochs given)."""
