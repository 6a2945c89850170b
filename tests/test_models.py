"""Every registered model trains (forward, backward, output shape); the adapters hide each
MONAI network's quirks behind forward_features."""

from __future__ import annotations

import pytest
import torch

from lsdc.errors import UserError
from lsdc.models import create_model, list_models
from lsdc.models.encoders import DynUNetEncoder, SwinEncoder, ViTEncoder
from lsdc.training.config import ConfigError, TrainConfig
from lsdc.training.tasks import build_registered_model

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
