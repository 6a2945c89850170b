"""The training stage: config system, loss, folds, schedules, the engine end to end, exact
resume, checkpoints and serving a run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lsdc.checkpoint import load_checkpoint
from lsdc.cli import main
from lsdc.config import (
    SHIPPED_CONFIG_DIR,
    ConfigError,
    TrainConfig,
    load_config,
    write_config,
)
from lsdc.contract import (
    IGNORE_INDEX,
    LABEL_COLUMNS,
    PRED_COLUMNS,
    labels_to_indices,
    labels_to_solution,
    load_train_labels,
)
from lsdc.distributed import DistContext
from lsdc.errors import UserError
from lsdc.evaluation.metric import official_score
from lsdc.inference.runs import predict_run
from lsdc.tasks.base import build_registered_model, create_task
from lsdc.tasks.losses import severity_loss
from lsdc.tasks.predict_loop import predictions_frame
from lsdc.training.engine import build_scheduler, train_fold
from lsdc.training.folds import make_folds

torch.set_num_threads(1)

CPU = DistContext(rank=0, world_size=1, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------ config
def test_tiny_config_follows_its_base_and_overrides(tmp_path: Path) -> None:
    config = load_config("tiny", ["optim.lr=0.01", "folds.fold=1", "model.params.hidden=8"])
    assert config.data.volume_size == (8, 32, 32)  # from tiny.yaml
    assert config.optim.weight_decay == 0.01  # from base.yaml
    assert config.optim.lr == 0.01 and config.folds.fold == 1
    assert config.model.params["hidden"] == 8 and config.model.params["widths"] == [4, 8, 8, 8]
    write_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_unknown_key_in_a_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("base: tiny.yaml\noptim:\n  learning_rate: 0.1\n")  # base from configs/
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'optim\.learning_rate'"):
        load_config(path)


def test_unknown_override_and_wrong_type_are_refused() -> None:
    with pytest.raises(ConfigError, match="command-line override.*'optim.lrr'"):
        load_config("tiny", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="'optim.epochs' must be an integer"):
        load_config("tiny", ["optim.epochs=two"])
    with pytest.raises(ConfigError, match="optim.scheduler"):
        load_config("tiny", ["optim.scheduler=linear"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")


def test_whole_study_task_refuses_task_params(tmp_path: Path) -> None:
    config = load_config("tiny", ["task_params.crop_size=3"])
    with pytest.raises(ConfigError, match=r"whole_study takes no task_params; got \['crop_size'\]"):
        create_task(config, tmp_path, None)


def test_every_shipped_config_loads_and_builds_its_model(synth_root, synth_cache) -> None:
    """two_stage.yaml, the GPU config, included (tests/test_full_size.py also steps it)."""
    built = set()
    for path in sorted(SHIPPED_CONFIG_DIR.glob("*.yaml")):
        config = load_config(path)
        if config.task == "whole_study":
            model = build_registered_model(
                config, img_size=config.data.volume_size, n_series=3, n_meta=24
            )
            assert model.output_shape(1) == (1, 25, 3), path.name
        else:
            task = create_task(config, synth_cache, synth_root)
            model = task.build_model(task.fit_state(np.array([])))
            assert {name for name, _ in model.named_children()} == {"localizer", "grader"}
        assert sum(p.numel() for p in model.parameters()) > 0, path.name
        built.add(path.stem)
    assert {"two_stage", "two_stage_demo", "base", "whole_baseline"} <= built


def test_the_old_name_of_the_whole_series_baseline_names_the_new_one(tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match="now called 'whole_baseline'.*`config=whole_baseline`"):
        load_config("demo")
    argv = ["train", "--config", "demo.yaml", "--data", str(tmp_path), "--cache", str(tmp_path)]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert "--config whole_baseline" in capsys.readouterr().err
    (tmp_path / "demo.yaml").write_text("base: base.yaml\n")  # a file of one's own still loads
    assert load_config(tmp_path / "demo.yaml").task == "whole_study"


# -------------------------------------------------------------------------------------- loss
def _random_case(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 25, 3, generator=g) * 2
    targets = torch.multinomial(torch.tensor([0.6, 0.25, 0.15]), n * 25, True, generator=g)
    targets = targets.view(n, 25)
    targets[0, :4] = IGNORE_INDEX
    return logits, targets


def _as_frames(logits: torch.Tensor, targets: torch.Tensor) -> tuple[pd.DataFrame, pd.DataFrame]:
    ids = np.arange(1, len(targets) + 1)
    severity = np.array(["Normal/Mild", "Moderate", "Severe"], dtype=object)
    t = targets.numpy()
    wide = pd.DataFrame(
        np.where(t == IGNORE_INDEX, None, severity[t.clip(0)]), columns=LABEL_COLUMNS
    )
    wide.insert(0, "study_id", ids)
    submission = predictions_frame(ids, logits.softmax(-1).double().numpy())
    return labels_to_solution(wide), submission


def test_loss_equals_the_official_score_of_its_softmax() -> None:
    logits, targets = _random_case(16, 0)
    solution, submission = _as_frames(logits, targets)
    expected = official_score(solution, submission)
    loss = severity_loss(logits.double(), targets, any_severe_weight=1.0)
    assert float(loss) == pytest.approx(expected.score, rel=1e-5)
    three_groups = np.mean([expected.spinal, expected.foraminal, expected.subarticular])
    assert float(severity_loss(logits, targets, 0.0)) == pytest.approx(three_groups, rel=1e-5)


def test_ignored_entries_do_not_change_the_loss_and_get_no_gradient() -> None:
    logits, targets = _random_case(4, 1)
    logits.requires_grad_(True)
    changed = logits.detach().clone()
    changed[0, :4] += 5.0
    assert torch.allclose(severity_loss(logits, targets), severity_loss(changed, targets))
    severity_loss(logits, targets, 1.0).backward()
    assert torch.all(logits.grad[0, :4] == 0)


# ------------------------------------------------------------------------------------- folds
def _labels(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = rng.choice(["Normal/Mild", "Moderate", "Severe"], p=[0.8, 0.15, 0.05], size=(n, 25))
    frame = pd.DataFrame(values, columns=LABEL_COLUMNS)
    frame.insert(0, "study_id", rng.choice(10**6, size=n, replace=False))
    return frame


def test_folds_cover_every_study_once_and_spread_severe_studies() -> None:
    labels = _labels(60, 0)
    folds = make_folds(labels, 5, seed=3)
    assert folds["study_id"].tolist() == labels["study_id"].tolist()
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    assert folds["fold"].value_counts().max() - folds["fold"].value_counts().min() <= 2
    severe_spinal = (labels_to_indices(labels)[:, :5] == 2).any(axis=1)
    per_fold = folds.loc[severe_spinal, "fold"].value_counts()
    assert per_fold.max() - per_fold.min() <= 2
    assert make_folds(labels, 5, seed=3).equals(folds)
    assert not make_folds(labels, 5, seed=4).equals(folds)


def test_too_few_studies_for_the_folds_is_a_user_error() -> None:
    with pytest.raises(UserError, match="cannot make 5 folds"):
        make_folds(_labels(3, 0), 5, seed=0)


# ---------------------------------------------------------------------------------- schedules
def _lrs(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.optim.lr)
    scheduler, per_step = build_scheduler(opt, config, steps_per_epoch)
    seen = []
    for _ in range(config.optim.epochs):
        for _ in range(steps_per_epoch):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            if per_step:
                scheduler.step()
        if not per_step:
            scheduler.step()
    return seen


def test_exponential_schedule_decays_once_per_epoch_not_per_batch() -> None:
    config = load_config(
        "tiny", ["optim.scheduler=exponential", "optim.gamma=0.5", "optim.epochs=3"]
    )
    lrs = _lrs(config, steps_per_epoch=7)
    assert lrs[:7] == [config.optim.lr] * 7
    assert lrs[7] == pytest.approx(config.optim.lr * 0.5)
    assert lrs[-1] == pytest.approx(config.optim.lr * 0.25)


def test_cosine_schedule_warms_up_then_decays() -> None:
    config = load_config("tiny", ["optim.epochs=4", "optim.warmup_epochs=1"])
    lrs = _lrs(config, steps_per_epoch=10)
    peak = int(np.argmax(lrs))
    assert 8 <= peak <= 11 and lrs[peak] == pytest.approx(config.optim.lr, rel=0.1)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert lrs[-1] < 0.01 * config.optim.lr


# ------------------------------------------------------------------------------ the whole run
def test_tiny_run_writes_the_run_folder(tiny_run: Path, synth_root: Path) -> None:
    labels = load_train_labels(synth_root / "train.csv")
    for name in ("config.yaml", "folds.csv", "class_prior.csv", "metrics.csv", "oof.csv"):
        assert (tiny_run / name).is_file(), name
    for k in (0, 1):
        for name in ("last.pt", "best.pt", "best.json", "oof.csv", "metrics.csv"):
            assert (tiny_run / f"fold{k}" / name).is_file()
    oof = pd.read_csv(tiny_run / "oof.csv")
    assert list(oof.columns) == ["row_id", *PRED_COLUMNS]
    assert sorted(oof["row_id"]) == sorted(labels_to_solution(labels)["row_id"])
    assert np.allclose(oof[list(PRED_COLUMNS)].sum(axis=1), 1.0, atol=1e-5)
    metrics = pd.read_csv(tiny_run / "metrics.csv")
    assert len(metrics) == 2 * 2 and metrics["val_score"].notna().all()
    assert list(metrics.columns) == [
        "fold",
        "epoch",
        "train_loss",
        "val_loss",
        "val_score",
        "lr",
        "seconds",
    ]
    prior = pd.read_csv(tiny_run / "class_prior.csv")
    assert list(prior["label_column"]) == list(LABEL_COLUMNS)
    assert np.allclose(prior[list(PRED_COLUMNS)].sum(axis=1), 1.0)
    folds = pd.read_csv(tiny_run / "folds.csv")
    assert sorted(folds["study_id"]) == sorted(labels["study_id"])
    saved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert saved["data"]["volume_size"] == [8, 32, 32]


def test_best_checkpoint_holds_the_best_epoch(tiny_run: Path) -> None:
    metrics = pd.read_csv(tiny_run / "fold0" / "metrics.csv")
    best = load_checkpoint(tiny_run / "fold0" / "best.pt")
    assert best["epoch"] == int(metrics["val_score"].idxmin())
    assert best["metric"] == pytest.approx(metrics["val_score"].min())
    last = load_checkpoint(tiny_run / "fold0" / "last.pt")
    for key in ("optimizer", "scheduler", "scaler", "ema", "rng", "epoch", "config", "task_state"):
        assert key in last
    assert last["finished"] and last["epoch"] == 1


def test_existing_run_needs_resume(
    tiny_run: Path, synth_root: Path, synth_cache: Path, capsys
) -> None:
    argv = ["train", "--config", "tiny", "--data", str(synth_root), "--cache", str(synth_cache)]
    assert main([*argv, "--out", str(tiny_run), "--no-progress"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*argv, "--out", str(tiny_run), "--no-progress", "--resume"]) == 0


def test_cli_reports_a_bad_override_in_one_line(synth_root, synth_cache, tmp_path, capsys) -> None:
    argv = ["train", "--config", "tiny", "--data", str(synth_root), "--cache", str(synth_cache)]
    assert main([*argv, "--out", str(tmp_path / "run"), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "Traceback" not in err


def _state_dicts_close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_killed_and_resumed_ends_with_the_same_weights(synth_root, synth_cache, tmp_path) -> None:
    overrides = ["optim.epochs=3", "optim.ema_decay=0.5", "folds.fold=0", "optim.scheduler=cosine"]
    config = load_config("tiny", overrides)
    argv = ["train", "--config", "tiny", "--data", str(synth_root), "--cache", str(synth_cache)]
    assert main([*argv, "--out", str(tmp_path / "whole"), "--no-progress", *overrides]) == 0

    task = create_task(config, synth_cache, synth_root)
    labels = task.study_labels()
    folds = make_folds(labels, config.folds.n_folds, config.seed)
    run = tmp_path / "killed"
    run.mkdir()
    write_config(config, run / "config.yaml")
    folds.to_csv(run / "folds.csv", index=False)
    train_fold(
        task, config, labels, folds, 0, run, CPU, resume=False, progress=False, stop_after_epoch=0
    )
    assert load_checkpoint(run / "fold0" / "last.pt")["epoch"] == 0
    assert main([*argv, "--out", str(run), "--no-progress", "--resume", *overrides]) == 0

    whole = load_checkpoint(tmp_path / "whole" / "fold0" / "last.pt")
    resumed = load_checkpoint(run / "fold0" / "last.pt")
    assert whole["epoch"] == resumed["epoch"] == 2
    assert _state_dicts_close(whole["model"], resumed["model"])
    assert _state_dicts_close(whole["ema"], resumed["ema"])
    history = [pd.DataFrame(c["history"]).drop(columns="seconds") for c in (whole, resumed)]
    pd.testing.assert_frame_equal(history[0], history[1])


def test_ema_and_bf16_train_on_cpu_and_fp16_is_refused(synth_root, synth_cache, tmp_path, capsys):
    argv = ["train", "--config", "tiny", "--data", str(synth_root), "--cache", str(synth_cache)]
    extra = ["optim.epochs=1", "folds.fold=1", "optim.ema_decay=0.9", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "bf16"), "optim.amp=bf16", *extra]) == 0
    best = load_checkpoint(tmp_path / "bf16" / "fold1" / "best.pt")
    assert all(torch.isfinite(v.float()).all() for v in best["model"].values())
    assert not (tmp_path / "bf16" / "fold0").exists()
    assert main([*argv, "--out", str(tmp_path / "fp16"), "optim.amp=fp16", *extra]) == 2
    assert "fp16 needs CUDA" in capsys.readouterr().err


def test_val_every_validates_every_kth_and_the_last_epoch(
    synth_root, synth_cache, tmp_path, capsys
):
    argv = ["train", "--config", "tiny", "--data", str(synth_root), "--cache", str(synth_cache)]
    extra = ["optim.epochs=3", "optim.val_every=2", "folds.fold=0", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "run"), *extra]) == 0
    metrics = pd.read_csv(tmp_path / "run" / "fold0" / "metrics.csv")
    assert metrics["val_score"].isna().tolist() == [True, False, False]
    assert metrics["train_loss"].notna().all()
    best = load_checkpoint(tmp_path / "run" / "fold0" / "best.pt")
    assert best["epoch"] == int(metrics["val_score"].idxmin())
    printed = capsys.readouterr()
    assert "epoch 0: train_loss" in printed.out + printed.err
    assert "not validated" in printed.out + printed.err
    assert main([*argv, "--out", str(tmp_path / "bad"), "optim.val_every=0", *extra[:1]]) == 2


# ----------------------------------------------------------------------------------- serving
def test_predict_run_averages_folds_and_serves_missing_studies(tiny_run, synth_test_cache) -> None:
    from lsdc.preprocessing.cache import read_cache_index

    test_ids = sorted(read_cache_index(synth_test_cache)["study_id"].unique().tolist())
    ids = [*test_ids, 12345]  # the last one has no cached series at all
    probs = predict_run(tiny_run, synth_test_cache, ids)
    assert probs.shape == (len(ids), 25, 3)
    assert np.allclose(probs.sum(axis=-1), 1.0, atol=1e-5) and (probs > 0).all()
    again = predict_run(tiny_run, synth_test_cache, ids[::-1])
    assert np.allclose(again[::-1], probs, atol=1e-6)
    flipped = predict_run(tiny_run, synth_test_cache, ids, tta_flip=True)
    assert flipped.shape == probs.shape and not np.allclose(flipped, probs)
    assert np.allclose(flipped.sum(axis=-1), 1.0, atol=1e-5)


def test_predict_run_refuses_a_folder_without_checkpoints(tmp_path, synth_test_cache) -> None:
    with pytest.raises(UserError, match="no fold\\*/best.pt"):
        predict_run(tmp_path, synth_test_cache, [1])


def test_oof_matches_the_best_checkpoints(tiny_run: Path, synth_root: Path) -> None:
    labels = load_train_labels(synth_root / "train.csv")
    oof = pd.read_csv(tiny_run / "oof.csv")
    scores = [load_checkpoint(tiny_run / f"fold{k}" / "best.pt")["metric"] for k in (0, 1)]
    folds = pd.read_csv(tiny_run / "folds.csv")
    for k in (0, 1):
        ids = set(folds.loc[folds["fold"] == k, "study_id"])
        sol = labels_to_solution(labels[labels["study_id"].isin(ids)])
        assert official_score(sol, oof).score == pytest.approx(scores[k], rel=1e-6)
    assert math.isfinite(sum(scores))


def test_ema_keeps_integer_buffers_exact() -> None:
    """EMA averages weights, never indices: a level index 3 stays 3 after many updates."""
    from torch.optim.swa_utils import AveragedModel

    from lsdc.training.engine import ema_update_fn

    model = torch.nn.Linear(2, 2)
    model.register_buffer("level", torch.tensor([0, 1, 2, 3, 4]))
    ema = AveragedModel(model, multi_avg_fn=ema_update_fn(0.9), use_buffers=True)
    start = model.weight.detach().clone()
    expected = None
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
        current = start + step
        expected = current if expected is None else 0.9 * expected + 0.1 * current
    assert ema.module.level.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(ema.module.weight, expected)
