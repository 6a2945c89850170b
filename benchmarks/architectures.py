"""The five MONAI architectures in their two-stage roles, beside their whole-series baselines.

Two commands::

    python benchmarks/architectures.py steps [--steps 5] [--batch-size B]
    python benchmarks/architectures.py table --out DIR [--data ROOT --cache DIR]
        [--train-studies 1000] [--test-studies 100] [--seed 0] [--architectures a,b,...]
        [--two-stage KEY=VALUE] [--whole KEY=VALUE] [--synth=--ARG=VALUE] [--reuse]
        [--skip-whole | --skip-two-stage]
        [key=value ...]

``steps`` times optimiser steps of every stage-1 and stage-2 network at the size its shipped config
gives it (``configs/{architecture}.yaml`` over ``two_stage_demo.yaml``), on random inputs of the
config's shapes (batch ``data.batch_size`` studies: 3 series on the localizer grid, 25 crops), in
this process's threads (set ``OMP_NUM_THREADS``): the compute of one training step without data
loading or validation. It prints CPU seconds per step (what a quiet machine's wall clock would
read, however loaded this one is) of each network and of each architecture's pair, the pair's
wall-clock seconds, the pair's compute for the config's epochs over ``--train-studies`` x 2/3
(fold 0 of 3), and the pair's cost against the default (basicunet + level_grader): multiply the
default's measured training time by it to budget an architecture.

``table`` trains each architecture in turn with ``lsdc train`` in its two-stage role
(``--config ARCH``) and its whole-series baseline (``WHOLE_CONFIGS``), fold 0 of the configs' 3
folds, on one synthetic split (the demo's by default: ``lsdc synth`` defaults, seed 0, 1,000 + 100
studies), serves each run with ``lsdc predict`` (flip TTA, no calibration), scores it with the
official metric on ``solution_test.csv``, and prints per architecture: test score and share of
the prior->oracle gap closed for both roles, training seconds (the engine's, validation
included), epochs, and stage 1's out-of-fold localisation error (median and p90 mm).
``--skip-whole`` or ``--skip-two-stage`` trains one role only (the class prior then comes from
the run that was trained). ``key=value`` overrides apply to every training (e.g.
``optim.epochs=1`` to prove the script), ``--two-stage`` / ``--whole`` (repeatable) to one
role's; ``--synth`` passes an argument on to ``lsdc synth`` (e.g. ``--synth=--image-size=32``).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from common import prepare_root, run_verb

from lsdc.config import load_config
from lsdc.contract import load_solution, load_train_labels
from lsdc.evaluation.localization import localization_oof, summarize_localization
from lsdc.evaluation.metric import official_score
from lsdc.inference.predict import prior_submission
from lsdc.tasks.served import ServedRun

ARCHITECTURES: dict[str, str] = {
    "basicunet": "localizer",
    "segresnet": "localizer",
    "dynunet": "localizer",
    "swinunetr": "localizer",
    "resnet3d": "grader",
    "vit": "grader",
    "timm": "both",
}
"""Each architecture's two-stage role; its config is ``configs/{name}.yaml`` (basicunet, with the
2D level_grader: the default ``two_stage_demo``; timm, both stages from timm's ResNet-10-T:
``two_stage_timm_demo``)."""

TWO_STAGE_CONFIGS = {name: name for name in ARCHITECTURES} | {
    "basicunet": "two_stage_demo",
    "timm": "two_stage_timm_demo",
}

WHOLE_CONFIGS: dict[str, str | None] = {
    "basicunet": None,
    "segresnet": "whole_segresnet",
    "dynunet": "whole_dynunet",
    "swinunetr": "whole_swinunetr",
    "resnet3d": "whole_baseline",
    "vit": "whole_vit",
    "timm": None,
}
"""Each architecture's whole-series baseline at the demo's size (basicunet has none)."""

TRAIN_SHARE = 2 / 3
"""Fold 0 of 3 trains on two thirds of the studies."""


# ------------------------------------------------------------------------------------ steps
def _locating_loss(localizer, volumes, points, mask, sigma):
    from lsdc.models.localizer import heads_loss

    return heads_loss(localizer.heatmaps(volumes), points, mask, sigma)


def _sum(*losses):
    return sum(loss() for loss in losses)


def _grading_loss(grader, crops, targets, any_severe_weight):
    from lsdc.tasks.losses import severity_loss

    return severity_loss(grader(crops), targets, any_severe_weight)


def _time(step, steps: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of ``steps`` calls after one warm-up call. On a shared
    machine the CPU seconds (of this process, all its threads) are what a quiet one would take."""
    step()
    wall, cpu = [], []
    for _ in range(steps):
        started, started_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return float(np.median(wall)), float(np.median(cpu))


def _networks(config_name: str, batch_size: int | None):
    """The localizer and grader of a two-stage config, and random training inputs of its shapes."""
    import torch

    from lsdc.contract import N_LABELS
    from lsdc.tasks.base import build_network
    from lsdc.tasks.two_stage import TwoStageParams

    config = load_config(config_name)
    params = TwoStageParams.from_config(config)
    spec = params.crop_spec()
    batch = batch_size or config.data.batch_size
    grid = tuple(config.data.volume_size)
    torch.manual_seed(0)
    localizer = build_network(
        "localizer",
        params.localizer.name,
        params.localizer.params,
        "task_params.localizer",
        n_points=N_LABELS,
        grid=grid,
    )
    crop_shape = (spec.n_slices, spec.size, spec.size)
    grader = build_network(
        "grader", config.model.name, config.model.params, "model", crop_shape=crop_shape
    )
    volumes = torch.randn(batch * 3, 1, *grid)
    points = torch.rand(batch * 3, N_LABELS, 3) * (torch.tensor(grid) - 1)
    crops = torch.randn(batch, N_LABELS, *crop_shape)
    targets = torch.randint(0, 3, (batch, N_LABELS))
    return config, params, localizer, grader, (volumes, points, crops, targets)


def _step_seconds(networks: list, loss, steps: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of one AdamW step of ``networks`` on ``loss()``."""
    import torch

    optimizer = torch.optim.AdamW([p for n in networks for p in n.parameters()], lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()

    return _time(step, steps)


def _steps(args: argparse.Namespace) -> None:
    import torch

    rows = []
    for name, role in ARCHITECTURES.items():
        config, params, localizer, grader, inputs = _networks(
            TWO_STAGE_CONFIGS[name], args.batch_size
        )
        volumes, points, crops, targets = inputs
        mask = torch.ones(points.shape[:2], dtype=torch.bool)
        locate = partial(_locating_loss, localizer, volumes, points, mask, params.heatmap_sigma)
        grade = partial(_grading_loss, grader, crops, targets, config.loss.any_severe_weight)
        localizer.train(), grader.train()
        measured = {
            "localizer": _step_seconds([localizer], locate, args.steps),
            "grader": _step_seconds([grader], grade, args.steps),
            "pair": _step_seconds([localizer, grader], partial(_sum, locate, grade), args.steps),
        }
        seconds = {f"{k}_cpu_s": cpu for k, (_, cpu) in measured.items()}
        seconds["pair_wall_s"] = measured["pair"][0]
        batch = args.batch_size or config.data.batch_size
        steps_per_epoch = math.ceil(args.train_studies * TRAIN_SHARE / batch)
        rows.append(
            {
                "architecture": name,
                "role": role,
                "config": TWO_STAGE_CONFIGS[name],
                "localizer": params.localizer.name,
                "grader": config.model.name,
                **seconds,
                "epochs": config.optim.epochs,
                "compute_min": seconds["pair_cpu_s"] * steps_per_epoch * config.optim.epochs / 60,
                "localizer_M": sum(p.numel() for p in localizer.parameters()) / 1e6,
                "grader_M": sum(p.numel() for p in grader.parameters()) / 1e6,
            }
        )
        print(f"{name}: {seconds}", flush=True)
    table = pd.DataFrame(rows).set_index("architecture")
    default = table.loc["basicunet", "pair_cpu_s"]
    table["vs_default"] = table["pair_cpu_s"] / default
    pd.set_option("display.width", 160)
    print(
        f"\nCPU seconds per optimiser step (median of {args.steps}, after one warm-up; "
        "pair_wall_s: wall-clock), "
        f"{torch.get_num_threads()} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"load average {os.getloadavg()[0]:.2f}; compute_min: pair_cpu_s x "
        f"{math.ceil(args.train_studies * TRAIN_SHARE)} studies / batch x epochs (no data "
        "loading, no validation)"
    )
    print(table.round(3).to_string())


# ------------------------------------------------------------------------------------ table
def _train_and_score(
    config: str,
    role_overrides: list[str],
    root: Path,
    train_cache: Path,
    test_cache: Path,
    run: Path,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Train fold 0 of ``config`` (unless reused), serve the test split, score it."""
    if not (args.reuse and any(run.glob("fold*/best.pt"))):
        shutil.rmtree(run, ignore_errors=True)
        run_verb(
            ["train", "--config", config, "--data", str(root), "--cache", str(train_cache)]
            + ["--out", str(run), "--no-progress", "folds.fold=0", *args.overrides]
            + role_overrides
        )
    submission = run.parent / f"submission_{run.name}.csv"
    run_verb(
        ["predict", "--data", str(root), "--run", str(run), "--cache", str(test_cache)]
        + ["--out", str(submission), "--tta", "flip", "--no-calibration", "--quiet"]
    )
    metrics = pd.concat([pd.read_csv(p) for p in sorted(run.glob("fold*/metrics.csv"))])
    solution = load_solution(root / "solution_test.csv")
    return {
        "score": official_score(solution, pd.read_csv(submission)).score,
        "train_s": float(metrics["seconds"].sum()),
        "epochs": len(metrics),
    }


def _table(args: argparse.Namespace) -> None:
    out: Path = args.out
    root, train_cache, test_cache = prepare_root(
        out, args.data, args.cache, args.seed, args.train_studies, args.test_studies, args.synth
    )

    solution = load_solution(root / "solution_test.csv")
    oracle = official_score(solution, pd.read_csv(root / "oracle_test.csv")).score
    rows = []
    for name in args.architectures:
        row: dict[str, object] = {"architecture": name, "role": ARCHITECTURES[name]}
        prior_run = None
        if not args.skip_two_stage:
            prior_run = out / f"run_{name}"
            row |= _train_and_score(
                TWO_STAGE_CONFIGS[name],
                args.two_stage,
                root,
                train_cache,
                test_cache,
                prior_run,
                args,
            )
            localisation = summarize_localization(
                localization_oof(ServedRun(prior_run, train_cache, "cpu"), root)
            )
            overall = localisation.set_index("group").loc["all"]
            row |= {"median_mm": float(overall["median_mm"]), "p90_mm": float(overall["p90_mm"])}
        whole_config = None if args.skip_whole else WHOLE_CONFIGS[name]
        if whole_config is not None:
            whole_run = out / f"run_whole_{name}"
            whole = _train_and_score(
                whole_config, args.whole, root, train_cache, test_cache, whole_run, args
            )
            row |= {f"whole_{k}": v for k, v in whole.items()}
            prior_run = prior_run or whole_run
        if prior_run is None:
            continue
        row["prior"] = official_score(
            solution, prior_submission(prior_run, solution["row_id"])
        ).score
        rows.append(row)
        print(f"{name}: {row}", flush=True)

    if not rows:
        raise SystemExit("nothing to train: no architecture named has a whole-series baseline")
    table = pd.DataFrame(rows).set_index("architecture")
    for prefix in ("", "whole_"):
        if f"{prefix}score" in table:
            gap = (table["prior"] - table[f"{prefix}score"]) / (table["prior"] - oracle)
            table[f"{prefix}gap_closed"] = gap
    columns = ["role", "score", "gap_closed", "train_s", "epochs", "median_mm", "p90_mm"]
    columns += ["whole_score", "whole_gap_closed", "whole_train_s", "whole_epochs"]
    columns = [c for c in columns if c in table]
    pd.set_option("display.width", 160)
    n_train = len(load_train_labels(root / "train.csv"))
    print(
        f"\nSplit {root}: {n_train} train studies, fold 0 of 3, flip TTA; class prior "
        f"{table['prior'].iloc[0]:.4f}, oracle {oracle:.4f} on the test split; overrides "
        f"{args.overrides or 'none'}, two-stage {args.two_stage or 'none'}, whole-series "
        f"{args.whole or 'none'}; load average {os.getloadavg()[0]:.2f} at the end"
    )
    print(table[columns].round(4).to_string())
    table.to_csv(out / "architectures.csv")
    print(f"\nfigures: {out / 'architectures.csv'}")
    scores = table[[c for c in ("score", "whole_score") if c in table]]
    if not np.isfinite(scores.to_numpy(dtype=float)).all():
        raise SystemExit("a score is not finite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    steps = commands.add_parser("steps", help="seconds per training step of every network")
    steps.add_argument("--steps", type=int, default=5)
    steps.add_argument("--batch-size", type=int, help="studies per step (default: the config's)")
    steps.add_argument("--train-studies", type=int, default=1000)
    table = commands.add_parser("table", help="train, serve and score every architecture")
    table.add_argument("--out", type=Path, required=True, help="scratch folder (reused)")
    table.add_argument("--data", type=Path, help="an existing synthetic root (skips synth)")
    table.add_argument("--cache", type=Path, help="with --data: its caches, DIR/train and DIR/test")
    table.add_argument("--train-studies", type=int, default=1000)
    table.add_argument("--test-studies", type=int, default=100)
    table.add_argument("--seed", type=int, default=0)
    table.add_argument(
        "--synth", action="append", default=[], metavar="ARG", help="an extra lsdc synth argument"
    )
    table.add_argument(
        "--architectures",
        type=lambda s: s.split(","),
        default=list(ARCHITECTURES),
        help=f"comma-separated, of {list(ARCHITECTURES)}",
    )
    for flag, role in (("--two-stage", "two-stage"), ("--whole", "whole-series")):
        table.add_argument(
            flag, action="append", default=[], metavar="KEY=VALUE", help=f"a {role} override"
        )
    table.add_argument("--reuse", action="store_true", help="keep finished runs in --out")
    skip = table.add_mutually_exclusive_group()
    skip.add_argument(
        "--skip-whole", action="store_true", help="the two-stage roles only (no whole-series runs)"
    )
    skip.add_argument(
        "--skip-two-stage",
        action="store_true",
        help="the whole-series baselines only (no two-stage runs, no localisation error)",
    )
    table.add_argument("overrides", nargs="*", metavar="key=value", help="for every training")
    args = parser.parse_args()
    unknown = set(getattr(args, "architectures", [])) - set(ARCHITECTURES)
    if unknown:
        parser.error(f"unknown architectures {sorted(unknown)}; known: {list(ARCHITECTURES)}")
    _steps(args) if args.command == "steps" else _table(args)


if __name__ == "__main__":
    main()
