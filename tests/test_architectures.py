"""Every stage-1 localizer and stage-2 grader of the two-stage model, by registered name: forward,
backward, output shape and a few optimiser steps; then each trains, resumes, serves and exports
through the one engine in a tiny run. (Whole-series models: tests/test_models.py.)"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_overrides import TINY_FOLD0

from lsdc.checkpoint import load_checkpoint
from lsdc.config import ConfigError, load_config
from lsdc.errors import UserError
from lsdc.models import create_model, list_models
from lsdc.models.localizer import localizer_loss
from lsdc.tasks.losses import severity_loss

torch.set_num_threads(1)

LOCALIZERS = list_models("localizer")
GRADERS = list_models("grader")
GRID = (16, 32, 32)
CROP = (3, 16, 16)

TINY: dict[str, dict] = {
    "basicunet": {"features": [4, 4, 8, 8, 8, 4]},
    "unet": {"channels": [4, 8, 8], "num_res_units": 1},
    "segresnet": {"init_filters": 4, "blocks_down": [1, 1, 1]},
    "dynunet": {"filters": [4, 8, 8, 8], "deep_supervision": 2},
    "swinunetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]},
    "timm_unet": {"encoder": "test_efficientnet", "encoder_depth": 2, "decoder_channels": [8, 8]},
    "level_grader": {"widths": [4, 8, 8, 8]},
    "level_grader_25d": {"backbone": "timm:test_efficientnet"},
    "resnet3d": {"widths": [4, 8, 8, 8]},
    "vit": {"hidden_size": 16, "mlp_dim": 32, "num_layers": 1, "num_heads": 2},
}
"""Tiny sizes of every localizer and grader (the registry defaults are small, these are smaller)."""


def test_every_localizer_and_grader_has_tiny_sizes() -> None:
    """A newly registered name must be added above, so that it is tested through the engine."""
    assert set(TINY) == set(LOCALIZERS) | set(GRADERS)
    assert {"basicunet", "segresnet", "dynunet", "swinunetr", "unet"} <= set(LOCALIZERS)
    assert {"level_grader", "level_grader_25d", "resnet3d", "vit"} <= set(GRADERS)
    assert "timm_unet" in LOCALIZERS


def _localizer(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, "localizer", grid=GRID, **TINY[name])


def _grader(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, "grader", crop_shape=CROP, **TINY[name])


def _points(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    points = torch.rand(batch, 25, 3, generator=torch.Generator().manual_seed(0))
    return points * (torch.tensor(GRID) - 1), torch.ones(batch, 25, dtype=torch.bool)


def _every_parameter_learns(model: torch.nn.Module) -> None:
    """Every parameter got a gradient (an unused one breaks DistributedDataParallel)."""
    dead = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not dead, f"parameters without a gradient: {dead[:5]}"


def _fits(loss_of, model: torch.nn.Module, steps: int = 4) -> tuple[float, float]:
    """Loss before and after ``steps`` Adam steps on one fixed batch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss_of().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of().backward()
        optimizer.step()
    return first, loss_of().item()


@pytest.mark.parametrize("name", LOCALIZERS)
def test_localizer_gives_25_heatmaps_and_trains(name: str) -> None:
    model = _localizer(name).train()
    image = torch.randn(2, 1, *model.grid)
    heads = model.heatmaps(image)
    assert [tuple(h.shape) for h in heads] == [(2, 25, *GRID)] * (1 + model.deep_supervision)
    assert tuple(model(image).shape) == model.output_shape(2) == (2, 25, *GRID)
    points, mask = _points(2)
    sum(localizer_loss(h, points, mask) for h in heads).backward()
    _every_parameter_learns(model)
    assert all(torch.isfinite(h).all() for h in heads)
    before, after = _fits(lambda: localizer_loss(model(image), points, mask), model)
    assert after < before
    eval_heads = model.eval().heatmaps(image)
    assert len(eval_heads) == 1 and eval_heads[0].shape == heads[0].shape  # served: one map


@pytest.mark.parametrize("name", GRADERS)
def test_grader_gives_25_x_3_logits_and_trains(name: str) -> None:
    model = _grader(name).train()
    (crops,) = model.example_input(2)
    assert tuple(crops.shape) == (2, 25, *CROP)
    logits = model(crops)
    assert tuple(logits.shape) == model.output_shape(2) == (2, 25, 3)
    target = torch.randint(0, 3, (2, 25), generator=torch.Generator().manual_seed(0))
    severity_loss(logits, target).backward()
    _every_parameter_learns(model)
    before, after = _fits(lambda: severity_loss(model(crops), target), model)
    assert after < before


@pytest.mark.parametrize("name", ["dynunet", "swinunetr", "unet", "segresnet"])
def test_padded_localizers_cut_the_padding_off(name: str) -> None:
    """A grid the network cannot take as it is runs zero-padded to its multiple; the heatmaps
    come back on the grid itself, not resampled."""
    model = create_model(name, "localizer", grid=(20, 24, 40), **TINY[name]).eval()
    padded = model.padded_grid((20, 24, 40))
    assert all(
        p % m == 0 and p >= n
        for p, n, m in zip(padded, (20, 24, 40), model.size_multiple, strict=True)
    )
    assert model(torch.randn(1, 1, 20, 24, 40)).shape == (1, 25, 20, 24, 40)


def test_swinunetr_runs_a_16_slice_grid_padded_to_32() -> None:
    model = _localizer("swinunetr")
    assert model.size_multiple == (32, 32, 32) and model.padded_grid(GRID) == (32, 32, 32)


def test_dynunet_deep_supervision_off_leaves_no_dead_heads() -> None:
    model = create_model(
        "dynunet", "localizer", grid=GRID, filters=[4, 8, 8, 8], deep_supervision=0
    ).train()
    image = torch.randn(2, 1, *GRID)
    assert len(model.heatmaps(image)) == 1
    points, mask = _points(2)
    localizer_loss(model(image), points, mask).backward()
    _every_parameter_learns(model)


def test_deep_supervision_heads_are_trained_at_halving_weights() -> None:
    from lsdc.models.localizer import heads_loss

    model = _localizer("dynunet").train()
    heads = model.heatmaps(torch.randn(2, 1, *GRID))
    points, mask = _points(2)
    each = [localizer_loss(h, points, mask, sigma=1.5) for h in heads]
    expected = (each[0] + 0.5 * each[1] + 0.25 * each[2]) / 1.75
    torch.testing.assert_close(heads_loss(heads, points, mask, 1.5), expected)
    assert not torch.allclose(each[0], each[1])  # the heads are different maps


def test_a_grid_too_small_for_the_localizer_is_refused() -> None:
    with pytest.raises(UserError, match="one-voxel bottleneck; give one axis at least 32"):
        create_model("basicunet", "localizer", grid=(16, 16, 16))


def test_one_key_chooses_the_architecture_in_its_two_stage_role(tmp_path: Path) -> None:
    """The architecture's config name (and, in a two-stage config, the one key that names its
    stage) gives it its strong role; a network's params belong to its name, so naming another
    network drops them; a stage-1 name where the grader goes is refused with the key to use."""
    from lsdc.tasks.base import create_task

    for name in ("segresnet", "dynunet", "swinunetr"):
        config = load_config(name)
        assert config.task == "two_stage" and config.task_params["localizer"]["name"] == name
    for name in ("resnet3d", "vit"):
        config = load_config(name)
        assert config.task == "two_stage" and config.model.name == name
    config = load_config("two_stage_demo", ["model.name=vit"])
    assert config.model.params == {}  # level_grader's widths are not vit's
    config = load_config("two_stage_demo", ["task_params.localizer.name=unet"])
    assert config.task_params["localizer"] == {"name": "unet"}
    config = load_config("two_stage_demo", ["model.name=segresnet"])
    with pytest.raises(ConfigError, match="write task_params.localizer.name: segresnet"):
        create_task(config, tmp_path, None)
    config = load_config("segresnet", ["task_params.localizer.params.features=[4, 8]"])
    with pytest.raises(ConfigError, match="task_params.localizer.params.features"):
        create_task(config, tmp_path, None)


def _runs() -> list[tuple[str, str]]:
    """(localizer, grader) pairs covering every name of both roles, in as few runs as there
    are localizers."""
    graders = itertools.cycle(GRADERS)
    return [(localizer, next(graders)) for localizer in LOCALIZERS]


@pytest.mark.parametrize(("localizer", "grader"), _runs())
def test_architecture_trains_resumes_serves_and_exports_through_the_engine(
    localizer: str,
    grader: str,
    synth_root: Path,
    synth_cache: Path,
    synth_test_cache: Path,
    tmp_path: Path,
) -> None:
    from lsdc.cli import main
    from lsdc.inference.runs import predict_run
    from lsdc.preprocessing.cache import read_cache_index

    run = tmp_path / "run"
    overrides = [
        *TINY_FOLD0,
        f"task_params.localizer={{name: {localizer}, params: {TINY[localizer]}}}",
        f"model={{name: {grader}, params: {TINY[grader]}}}",
    ]
    argv = ["train", "--config", "two_stage_demo", "--data", str(synth_root), "--cache"]
    argv += [str(synth_cache), "--out", str(run), "--no-progress", *overrides]
    assert main([*argv, "optim.epochs=1"]) == 0
    first = load_checkpoint(run / "fold0" / "last.pt")
    assert first["epoch"] == 0
    assert main([*argv, "optim.epochs=2", "--resume"]) == 0
    resumed = load_checkpoint(run / "fold0" / "last.pt")
    assert resumed["epoch"] == 1 and len(resumed["history"]) == 2
    assert resumed["history"][0] == first["history"][0]  # epoch 0 continued, not retrained
    assert resumed["config"]["task_params"]["localizer"]["name"] == localizer
    assert resumed["config"]["model"]["name"] == grader
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) > 0 and np.isfinite(oof[["normal_mild", "moderate", "severe"]]).all().all()

    test_ids = sorted(read_cache_index(synth_test_cache)["study_id"].unique().tolist())
    probs = predict_run(run, synth_test_cache, test_ids, tta_flip=True, device="cpu")
    assert probs.shape == (len(test_ids), 25, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export"), "--no-wheel"]) == 0
    exported = predict_run(
        tmp_path / "export" / run.name, synth_test_cache, test_ids, tta_flip=True, device="cpu"
    )
    np.testing.assert_allclose(exported, probs, atol=1e-6)  # the export serves the same model
