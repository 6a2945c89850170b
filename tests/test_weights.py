"""``model.weights``: initial weights from a local file, loaded when a registered model is built
(lsdc.models.weights); shape mismatches and wrong files fail with one clear line; serving never
needs the file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from lsdc.config import ConfigError, load_config
from lsdc.errors import UserError
from lsdc.models.weights import load_weights, read_state_dict
from lsdc.tasks.base import build_registered_model

torch.set_num_threads(1)

GRADER = ["model.params.widths=[4, 8, 8, 8]", "model.params.layers=[1, 1, 1, 1]"]
"""The two_stage_demo grader, smaller."""


def _grader_config(*overrides: str):
    return load_config("two_stage_demo", [*GRADER, *overrides])


def _build(*overrides: str) -> torch.nn.Module:
    return build_registered_model(_grader_config(*overrides), role="grader")


def _backbone(model: torch.nn.Module) -> str:
    """Dotted name of the grader's 2D MONAI ResNet: the part a user brings pretrained."""
    from monai.networks.nets import ResNet

    return next(name for name, module in model.named_modules() if isinstance(module, ResNet))


def test_backbone_weights_are_loaded_and_the_rest_keeps_its_initialisation(tmp_path, caplog):
    torch.manual_seed(1)
    donor = _build()
    backbone = _backbone(donor)
    state = donor.get_submodule(backbone).state_dict()
    state["fc.weight"] = torch.randn(10, 8)  # a classifier the backbone does not have
    path = tmp_path / "backbone.pt"
    torch.save(state, path)

    torch.manual_seed(0)
    plain = _build()
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="lsdc"):
        model = _build(f"model.weights={path}", f"model.weights_module={backbone}")
    loaded = model.state_dict()
    for name, tensor in plain.state_dict().items():
        if name.startswith(f"{backbone}."):
            assert torch.equal(loaded[name], state[name.removeprefix(f"{backbone}.")]), name
        else:
            assert torch.equal(loaded[name], tensor), f"{name} is not in the file: initialisation"
    first_conv = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    assert not torch.equal(
        plain.get_submodule(backbone).state_dict()[first_conv], state[first_conv]
    )
    log = caplog.text
    assert f"loaded {len(state) - 1} tensors of {path} into level_grader.{backbone}" in log
    assert "skipped 1 the model lacks (fc.weight)" in log


def test_an_earlier_runs_checkpoint_loads_as_the_whole_model(tmp_path):
    torch.manual_seed(3)
    donor = _build()
    path = tmp_path / "best.pt"
    torch.save({"model": donor.state_dict(), "epoch": 4}, path)  # an lsdc best.pt nests it
    model = _build(f"model.weights={path}")
    for name, tensor in donor.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    result = load_weights(model, path, model_name="level_grader")
    assert result.loaded == len(donor.state_dict()) and result.skipped == result.kept == []


def test_a_shape_mismatch_names_the_parameter_and_both_shapes(tmp_path):
    wider = _build("model.params.widths=[6, 8, 8, 8]").state_dict()
    own = _build().state_dict()
    key = next(k for k in wider if wider[k].shape != own[k].shape)
    path = tmp_path / "wider.pt"
    torch.save(wider, path)
    with pytest.raises(UserError) as error:
        _build(f"model.weights={path}")
    message = str(error.value)
    assert "\n" not in message
    assert f"parameter {key!r} has shape {tuple(wider[key].shape)} in the file" in message
    assert f"but {tuple(own[key].shape)} in level_grader" in message


def test_a_missing_or_foreign_file_is_one_clear_line(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=r"nope\.pt: model.weights file not found"):
        _build(f"model.weights={missing}")
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(UserError, match=r"notes\.txt: not a readable weights file") as error:
        read_state_dict(text)
    assert "\n" not in str(error.value)


def test_no_common_name_points_at_weights_module(tmp_path):
    model = _build()
    path = tmp_path / "backbone.pt"
    torch.save(model.get_submodule(_backbone(model)).state_dict(), path)
    with pytest.raises(UserError, match="set model.weights_module"):
        _build(f"model.weights={path}")  # the backbone's names, offered to the whole model
    with pytest.raises(UserError, match="has no submodule 'no.such'"):
        _build(f"model.weights={path}", "model.weights_module=no.such")


def test_weights_module_without_weights_is_a_config_error():
    with pytest.raises(ConfigError, match="model.weights_module"):
        _grader_config("model.weights_module=encoder.net")


def test_an_export_of_a_run_from_a_weights_file_serves_without_the_file(
    tiny_run, synth_root, synth_cache, synth_test_cache, tmp_path
):
    """Predict, show and evaluate all open a run through one serving path, which drops
    ``model.weights``: an export of a run fine-tuned from a file no longer there works in all
    three (before, show and evaluate --cache looked for the file)."""
    from lsdc import api
    from lsdc.contract import load_series_descriptions
    from lsdc.inference.export import export_runs
    from lsdc.inference.runs import predict_run

    weights = tmp_path / "start.pt"
    shutil.copy(tiny_run / "fold0" / "best.pt", weights)
    run = api.train(
        "tiny",
        synth_root,
        synth_cache,
        tmp_path / "run",
        overrides=[f"model.weights={weights}", "folds.fold=0", "optim.epochs=1"],
        progress=False,
    )
    served = export_runs([run], tmp_path / "export", wheel=False).runs[0]
    weights.unlink()
    ids = sorted(load_series_descriptions(synth_root / "test_series_descriptions.csv")["study_id"])
    probs = predict_run(served, synth_test_cache, ids, device="cpu")
    np.testing.assert_allclose(probs, predict_run(run, synth_test_cache, ids, device="cpu"))
    page = api.show(synth_root, synth_test_cache, served, ids[0], tmp_path / "study.html")
    assert "<html" in page.read_text()
    metrics = api.evaluate(
        run / "oof.csv",
        synth_root,
        run_dir=served,
        out_dir=tmp_path / "eval",
        cache_dir=synth_cache,
    )
    assert metrics["gallery"] and (served / "calibration.json").is_file()
