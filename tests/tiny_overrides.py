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
