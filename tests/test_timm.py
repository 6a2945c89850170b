"""timm networks in both stages (lsdc.models.timm_backbones): a timm slice encoder and the 2.5D
grader, the per-slice U-Net localizer, ``pretrained: PATH`` loaded by timm's own code from a local
file (parameters equal to the file's), one-line errors for a wrong file, and a run that trains,
serves with flip TTA and exports after the weight files are gone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from tiny_overrides import TINY_FOLD0

from lsdc.config import load_config, without_initial_weights
from lsdc.errors import UserError
from lsdc.models import create_model
from lsdc.models.localizer import localizer_loss, soft_argmax
from lsdc.tasks.base import build_registered_model
from lsdc.tasks.losses import severity_loss
from lsdc.tasks.two_stage import TwoStageTask

torch.set_num_threads(1)


def _weights_file(tmp_path: Path, name: str, suffix: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A timm model's ImageNet-shaped weights (RGB stem, 1,000 classes) saved as a user would
    download them."""
    torch.manual_seed(7)
    state = timm.create_model(name).state_dict()
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path, state


def _assert_loaded(own: dict[str, torch.Tensor], file: dict[str, torch.Tensor], stem: str, chans):
    """Every tensor equals the file's; the RGB stem as timm adapts it to ``chans`` channels
    (1: summed over RGB; 3: as it is)."""
    for key, value in own.items():
        if key == stem:
            rgb = file[key]
            expected = rgb.sum(1, keepdim=True) if chans == 1 else rgb
            torch.testing.assert_close(value, expected)
        else:
            assert torch.equal(value, file[key]), key


@pytest.mark.parametrize(
    ("backbone", "pooling", "crop"),
    [
        ("timm:test_resnet", "gru", (3, 16, 16)),
        ("timm:test_efficientnet", "attention", (3, 16, 16)),
        ("timm:test_convnext", "gru", (5, 32, 32)),
    ],
)
def test_a_timm_slice_encoder_trains_with_either_pooling(backbone, pooling, crop) -> None:
    torch.manual_seed(0)
    model = create_model(
        "level_grader", "grader", crop_shape=crop, backbone=backbone, pooling=pooling
    ).train()
    (crops,) = model.example_input(2)
    target = torch.randint(0, 3, (2, 25), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):  # a zero-initialised last norm of a residual block (timm's ResNets)
        optimizer.zero_grad()  # passes a gradient to its branch from the second step
        logits = model(crops)
        severity_loss(logits, target).backward()
        optimizer.step()
    assert logits.shape == (2, 25, 3)
    # The attention score's bias shifts every slice's score alike, so the softmax over slices
    # cancels it: its gradient is zero up to rounding, and rounding decides its sign of life.
    shift_invariant = {"encoder.pool.weight.bias"}
    dead = [
        n
        for n, p in model.named_parameters()
        if n not in shift_invariant and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not dead, dead[:5]


def test_the_25d_grader_reads_the_slices_as_channels() -> None:
    model = create_model("level_grader_25d", "grader", crop_shape=(5, 16, 16)).eval()
    assert model.encoder.net.conv1[0].in_channels == 5
    (crops,) = model.example_input(1)
    base = model(crops)
    for s in range(5):  # every slice of the crop reaches the output
        changed = crops.clone()
        changed[:, :, s] = 0
        assert not torch.allclose(base, model(changed))


def test_a_crop_too_small_for_the_network_is_refused_in_one_line() -> None:
    with pytest.raises(UserError, match=r"task_params.crop_size': timm:test_convnext cannot read"):
        create_model(
            "level_grader", "grader", crop_shape=(3, 16, 16), backbone="timm:test_convnext"
        )
    with pytest.raises(UserError, match="timm has no model 'resnet_nope'"):
        create_model("level_grader", "grader", backbone="timm:resnet_nope")


def test_monai_resnet_sizes_beside_a_timm_backbone_are_refused_not_ignored() -> None:
    """The base config's widths would otherwise sit in the resolved config doing nothing."""
    overrides = ["model.params.backbone=timm:test_resnet"]
    params = load_config("two_stage_demo", overrides).model.params
    with pytest.raises(UserError, match=r"'model.params.widths' sizes the MONAI ResNet backbone"):
        create_model("level_grader", "grader", crop_shape=(3, 32, 32), **params)
    params |= {"widths": None, "layers": None}
    grader = create_model("level_grader", "grader", crop_shape=(3, 32, 32), **params)
    assert grader(torch.randn(1, 25, 3, 32, 32)).shape == (1, 25, 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_file_loads_into_the_slice_encoder_through_a_config(tmp_path, suffix) -> None:
    path, state = _weights_file(tmp_path, "test_resnet", suffix)
    config = load_config(
        "two_stage_demo",
        [
            "model.params={backbone: 'timm:test_resnet', pooling: gru, widths: null, layers: null}",
            f"model.params.pretrained={path}",
        ],
    )
    model = build_registered_model(config, role="grader", crop_shape=(3, 16, 16))
    _assert_loaded(model.encoder.net.state_dict(), state, "conv1.0.weight", 1)
    random = build_registered_model(
        without_initial_weights(config), role="grader", crop_shape=(3, 16, 16)
    )
    key = "layer1.0.conv1.weight"
    assert not torch.equal(random.encoder.net.state_dict()[key], state[key])  # served: no file


def test_pretrained_file_loads_into_the_25d_grader_and_the_localizer(tmp_path, synth_cache):
    path, state = _weights_file(tmp_path, "test_resnet", ".safetensors")
    grader = create_model(
        "level_grader_25d", "grader", crop_shape=(3, 16, 16), pretrained=str(path)
    )
    _assert_loaded(grader.encoder.net.state_dict(), state, "conv1.0.weight", 3)
    overrides = [
        "task_params.localizer={name: timm_unet, params: {encoder: test_resnet, context_slices: 0}}",
        f"task_params.localizer.params.pretrained={path}",
    ]
    task = TwoStageTask(load_config("two_stage_demo", overrides), synth_cache, None)
    encoder = task.build_localizer().net.net.encoder.model.state_dict()
    stem = encoder.pop("conv1.0.weight")  # 1 image + 3 coordinate channels from RGB
    assert stem.shape[1] == 4
    torch.testing.assert_close(stem, state["conv1.0.weight"].repeat(1, 2, 1, 1)[:, :4] * 0.75)
    _assert_loaded(encoder, state, "", 0)


def test_a_wrong_pretrained_file_is_one_line_naming_key_file_and_shapes(tmp_path) -> None:
    path, state = _weights_file(tmp_path, "test_resnet", ".pth")
    grader = ["model.params={backbone: 'timm:test_convnext', widths: null, layers: null}"]

    def build(*overrides: str):
        config = load_config("two_stage_demo", [*grader, *overrides])
        return build_registered_model(config, role="grader", crop_shape=(3, 32, 32))

    with pytest.raises(UserError, match=r"'model.params.pretrained': .*gone.pth: file not found"):
        build(f"model.params.pretrained={tmp_path / 'gone.pth'}")
    with pytest.raises(UserError) as other:
        build(f"model.params.pretrained={path}")
    message = str(other.value)
    assert "\n" not in message and str(path) in message
    assert (
        "not a test_convnext file: test_convnext's tensor 'stem.0.weight' (24, 1, 4, 4)" in message
    )
    state["layer1.0.conv1.weight"] = torch.zeros(8, 8, 3, 3)
    torch.save(state, path)
    grader[0] = "model.params={backbone: 'timm:test_resnet', widths: null, layers: null}"
    with pytest.raises(
        UserError,
        match=r"tensor 'layer1.0.conv1.weight' has shape \(8, 8, 3, 3\) "
        r"in the file but \(32, 32, 3, 3\) in test_resnet",
    ):
        build(f"model.params.pretrained={path}")


def test_the_slice_unet_gives_one_3d_heatmap_per_point_and_learns() -> None:
    torch.manual_seed(0)
    model = create_model(
        "timm_unet", "localizer", grid=(8, 32, 32), encoder_depth=2, decoder_channels=[8, 8]
    ).train()
    assert model.padded_grid((8, 30, 30)) == (8, 32, 32)  # slices are never padded
    image = torch.randn(2, 1, 8, 32, 32)
    points = torch.rand(2, 25, 3) * torch.tensor([7.0, 31.0, 31.0])
    mask = torch.ones(2, 25, dtype=torch.bool)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = localizer_loss(model(image), points, mask)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predicted = soft_argmax(model.eval()(image))
    assert predicted.shape == (2, 25, 3) and loss.item() < 0.8 * first
    assert (predicted[..., 0] - points[..., 0]).abs().mean() < 2.0  # the slice is learnt


def test_a_pretrained_timm_run_serves_with_tta_and_exports_without_the_files(
    synth_root, synth_cache, synth_test_cache, tmp_path
) -> None:
    from lsdc.cli import main
    from lsdc.inference.runs import predict_run
    from lsdc.preprocessing.cache import read_cache_index
    from lsdc.tasks.served import ServedRun

    grader_file, _ = _weights_file(tmp_path, "test_efficientnet", ".safetensors")
    localizer_file, _ = _weights_file(tmp_path, "test_resnet", ".pth")
    run = tmp_path / "run"
    overrides = [
        *TINY_FOLD0,
        "optim.epochs=1",
        "model={name: level_grader, params: {backbone: 'timm:test_efficientnet', pooling: gru,"
        " widths: null, layers: null}}",
        f"model.params.pretrained={grader_file}",
        "task_params.localizer={name: timm_unet, params: {encoder_depth: 2, decoder_channels: [8, 8]}}",
        f"task_params.localizer.params.pretrained={localizer_file}",
    ]
    argv = ["train", "--config", "two_stage_demo", "--data", str(synth_root), "--cache"]
    assert main([*argv, str(synth_cache), "--out", str(run), "--no-progress", *overrides]) == 0
    grader_file.unlink()
    localizer_file.unlink()
    ids = sorted(read_cache_index(synth_test_cache)["study_id"].unique().tolist())
    probs = predict_run(run, synth_test_cache, ids, tta_flip=True, device="cpu")
    assert probs.shape == (len(ids), 25, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export"), "--no-wheel"]) == 0
    exported = predict_run(tmp_path / "export" / "run", synth_test_cache, ids, tta_flip=True)
    np.testing.assert_allclose(exported, probs, atol=1e-6)
    served = ServedRun(tmp_path / "export" / "run", synth_test_cache, "cpu")
    points = served.locate(ids[0])  # the U-Net built under no_grad, as lsdc show and the OOF do
    assert points.shape == (25, 3) and np.isfinite(points).all()
    explained = served.explain(ids[0])
    assert explained.crops is not None and np.allclose(explained.points, points)


@pytest.mark.parametrize("name", ["two_stage_timm_demo", "two_stage_timm"])
def test_the_timm_configs_build_timm_networks_in_both_stages(name, synth_cache) -> None:
    config = load_config(name)
    net = TwoStageTask(config, synth_cache, None).build_model({})
    assert net.localizer.net.net.encoder.model.__class__.__module__.startswith("timm")
    assert net.grader.encoder.net.__class__.__module__.startswith("timm")
    assert config.task_params["localizer"]["name"] == "timm_unet"
