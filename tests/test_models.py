"""Every registered model trains (forward, backward, output shape); the adapters hide each
MONAI network's quirks behind forward_features."""

from __future__ import annotations

import pytest
import torch

from lsdc.config import ConfigError, TrainConfig
from lsdc.errors import UserError
from lsdc.models import create_model, list_models
from lsdc.models.encoders import DynUNetEncoder, ResNetEncoder, SwinEncoder, ViTEncoder
from lsdc.tasks.base import build_registered_model

torch.set_num_threads(1)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    inputs = model.example_input(2)
    out = model(*inputs)
    outputs = out if isinstance(out, dict) else {"out": out}
    if not isinstance(out, dict):
        assert tuple(out.shape) == tuple(model.output_shape(2))
    sum(o.float().sum() for o in outputs.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    for o in outputs.values():
        assert torch.isfinite(o).all()


def test_whole_study_names_are_registered() -> None:
    assert {"resnet3d", "segresnet", "swinunetr", "dynunet", "vit"} <= set(list_models())


def test_whole_study_model_uses_metadata_and_every_series() -> None:
    torch.manual_seed(0)
    model = create_model("resnet3d", n_meta=4, dropout=0.0).eval()
    volumes, meta = model.example_input(1)
    base = model(volumes, meta)
    assert not torch.allclose(base, model(volumes, meta + 1.0))
    for s in range(3):
        changed = volumes.clone()
        changed[:, s] = 0.0
        assert not torch.allclose(base, model(changed, meta)), f"series {s} is ignored"


def test_shared_encoder_has_one_encoder_and_a_series_embedding() -> None:
    shared = create_model("resnet3d", shared_encoder=True)
    separate = create_model("resnet3d", shared_encoder=False)
    assert len(shared.encoders) == 1 and shared.series_embedding.shape[0] == 3
    assert len(separate.encoders) == 3 and separate.series_embedding is None


def test_vit_adapter_returns_a_grid_not_the_hidden_states_tuple() -> None:
    encoder = ViTEncoder(img_size=(16, 32, 32), patch_size=(8, 8, 8), hidden_size=32, num_heads=2)
    fmap = encoder.forward_features(torch.randn(2, 1, 16, 32, 32))
    assert fmap.shape == (2, 32, 2, 4, 4)


def test_dynunet_adapter_has_one_output_shape_in_train_and_eval() -> None:
    encoder = DynUNetEncoder(filters=(4, 8, 8))
    x = torch.randn(2, 1, 16, 32, 32)
    train_shape = encoder.train().forward_features(x).shape
    eval_shape = encoder.eval().forward_features(x).shape
    assert train_shape == eval_shape == (2, 8, 4, 8, 8)


def test_swin_adapter_refuses_sizes_not_divisible_by_32() -> None:
    with pytest.raises(UserError, match="divisible by 32"):
        SwinEncoder(img_size=(16, 32, 32))


def test_unknown_model_parameter_names_the_key() -> None:
    config = TrainConfig()
    config.model.params = {"widthz": [4, 4, 4, 4]}
    with pytest.raises(ConfigError, match="model.params.widthz"):
        build_registered_model(config, n_meta=0)


WHOLE_STUDY_MODELS = ("resnet3d", "segresnet", "swinunetr", "dynunet", "vit")


@pytest.mark.parametrize("name", WHOLE_STUDY_MODELS)
def test_attention_head_trains_on_every_whole_study_architecture(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, head="attention", hidden=16, attention_heads=2, n_meta=4)
    volumes, meta = model.example_input(2)
    tokens = model.forward_features(volumes)
    out = model(volumes, meta)
    assert out.shape == (2, 25, 3)
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[2] == model.num_features
    assert tokens.shape[1] == model.head.position.shape[0]  # one position per series cell
    out.sum().backward()
    assert model.head.queries.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders.parameters())


def test_attention_head_labels_attend_to_their_own_cells() -> None:
    torch.manual_seed(0)
    model = create_model("resnet3d", head="attention", hidden=16, attention_heads=2).eval()
    tokens = torch.randn(1, model.head.position.shape[0], model.num_features)
    base = model.forward_head(tokens, None)
    changed = tokens.clone()
    changed[0, 0] += 5.0
    moved = model.forward_head(changed, None)
    assert not torch.allclose(base, moved)  # every label sees every cell of every series
    assert not torch.allclose(base[0, 0], base[0, 1])  # and the labels differ from each other


def test_resnet_stages_and_strides_keep_a_map_fine_enough_for_the_levels() -> None:
    x = torch.randn(1, 1, 16, 64, 64)
    coarse = ResNetEncoder(widths=(4, 8, 16, 32)).eval()
    fine = ResNetEncoder(widths=(4, 8, 16, 32), no_max_pool=True, stages=3).eval()
    finer = ResNetEncoder(
        widths=(4, 8, 16, 32), no_max_pool=True, stages=3, stem_stride=(1, 2, 2)
    ).eval()
    assert coarse.forward_features(x).shape == (1, 32, 1, 2, 2)
    assert fine.forward_features(x).shape == (1, 16, 2, 8, 8)
    assert finer.forward_features(x).shape == (1, 16, 4, 8, 8)
    assert fine.num_features == 16 and not hasattr(fine.net, "layer4")  # no dead weights


def test_grid_head_sees_every_level_row_of_a_fine_map() -> None:
    model = create_model(
        "resnet3d",
        img_size=(16, 64, 64),
        widths=(4, 8, 16, 32),
        no_max_pool=True,
        stages=3,
        pool_grid=(2, 8, 2),
    )
    assert model.forward_features(model.example_input(1)[0]).shape == (1, 3 * 16 * 2 * 8 * 2)


def test_bad_head_or_stage_count_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown head 'mlp'"):
        create_model("resnet3d", head="mlp")
    with pytest.raises(UserError, match="stages must be 1 to 4, got 5"):
        create_model("resnet3d", stages=5)
    with pytest.raises(UserError, match="not divisible by heads 3"):
        create_model("resnet3d", head="attention", hidden=16, attention_heads=3)


def test_grid_head_keeps_the_weight_names_of_earlier_checkpoints() -> None:
    keys = set(create_model("resnet3d").state_dict())
    assert {"head.1.weight", "head.1.bias", "head.4.weight", "head.4.bias"} <= keys
