"""The learning rate of every optimiser step, pinned: the values ``build_scheduler`` gave on
2026-12-02 (commit 869a5f4: AdamW, warmup + cosine per step, exponential per epoch). Building the
optimiser and schedule another way (timm's factories, a registry) must keep these curves."""

from __future__ import annotations

import pytest
import torch

from lsdc.config import load_config
from lsdc.training.engine import build_scheduler

STEPS_PER_EPOCH, EPOCHS = 4, 3

PINNED: dict[str, tuple[list[str], bool, list[float]]] = {
    "cosine, one warmup epoch": (
        ["optim.scheduler=cosine", "optim.warmup_epochs=1.0"],
        True,
        [
            0.0002,
            0.0004,
            0.0006,
            0.0008,
            0.001,
            0.0009619397662556434,
            0.0008535533905932737,
            0.000691341716182545,
            0.0005,
            0.0003086582838174551,
            0.00014644660940672628,
            3.806023374435663e-05,
        ],
    ),  # fmt: skip
    "cosine, half a warmup epoch": (
        ["optim.scheduler=cosine", "optim.warmup_epochs=0.5"],
        True,
        [
            0.0003333333333333333,
            0.0006666666666666666,
            0.001,
            0.0009755282581475768,
            0.0009045084971874737,
            0.0007938926261462366,
            0.0006545084971874737,
            0.0005,
            0.00034549150281252633,
            0.00020610737385376348,
            9.549150281252633e-05,
            2.4471741852423235e-05,
        ],
    ),  # fmt: skip
    "exponential": (
        ["optim.scheduler=exponential", "optim.gamma=0.9"],
        False,
        [0.001] * 4 + [0.0009] * 4 + [0.00081] * 4,
    ),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_the_learning_rate_of_every_step_is_todays(name: str) -> None:
    overrides, per_step_expected, expected = PINNED[name]
    config = load_config("tiny", [*overrides, "optim.lr=0.001", f"optim.epochs={EPOCHS}"])
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=config.optim.lr)
    scheduler, per_step = build_scheduler(optimizer, config, STEPS_PER_EPOCH)
    assert per_step is per_step_expected
    seen = []
    for _ in range(EPOCHS):
        for _ in range(STEPS_PER_EPOCH):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if per_step:
                scheduler.step()
        if not per_step:
            scheduler.step()
    assert seen == pytest.approx(expected, rel=1e-12)
