"""Check the label model of ``lsdc synth``: class frequencies against the spec's table, the level
profile, and the oracle's official score against the class prior's.

Usage:
    python benchmarks/synth_labels.py --studies 20000          # the label model alone
    python benchmarks/synth_labels.py --root DIR                # a root written by lsdc synth

With ``--root`` it reads ``train.csv`` and ``oracle_train.csv`` and ``solution_test.csv`` /
``oracle_test.csv``: the prior is the per-column class frequency of train.csv, scored on both
splits. Prints one block of figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.contract import (
    LABEL_COLUMNS,
    PRED_COLUMNS,
    SEVERITIES,
    all_row_ids,
    labels_to_indices,
    labels_to_solution,
    load_solution,
    load_train_labels,
)
from lsdc.evaluation.metric import official_score
from lsdc.synth import labels as synth_labels

SPEC = {
    "spinal_canal_stenosis": (0.878, 0.075, 0.048),
    "neural_foraminal_narrowing": (0.78, 0.18, 0.04),
    "subarticular_stenosis": (0.714, 0.191, 0.095),
}


def _draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    severity = np.stack([synth_labels.draw_latent_severity(rng) for _ in range(n)])
    probabilities = synth_labels.class_probabilities(severity)
    classes = synth_labels.draw_classes(rng, probabilities)
    return np.arange(10**6, 10**6 + n), probabilities, classes


def _prior(classes: np.ndarray) -> np.ndarray:
    counts = np.stack([np.bincount(c[c >= 0], minlength=3) for c in classes.T]).astype(float)
    return counts / counts.sum(axis=1, keepdims=True)


def _frame(study_ids: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(probabilities.reshape(-1, 3), columns=list(PRED_COLUMNS))
    frame.insert(0, "row_id", all_row_ids(study_ids))
    return frame


def _report(classes: np.ndarray) -> None:
    for family, expected in SPEC.items():
        columns = [k for k, c in enumerate(LABEL_COLUMNS) if family in c]
        values = classes[:, columns].ravel()
        freq = np.bincount(values[values >= 0], minlength=3) / (values >= 0).sum()
        print(
            f"{family:28s} normal/mild {freq[0]:6.1%} moderate {freq[1]:6.1%} severe {freq[2]:6.1%}"
            f"   (spec {expected[0]:.1%} / {expected[1]:.1%} / {expected[2]:.1%})"
        )
    abnormal = (classes > 0).reshape(len(classes), 5, 5).sum(axis=(0, 1))
    share = abnormal / abnormal.sum()
    print("moderate+severe by level L1/L2..L5/S1: " + " ".join(f"{s:.1%}" for s in share))
    print(
        f"unlabelled entries: {(classes < 0).mean():.2%} ({(classes < 0).any(axis=1).mean():.1%} of studies)"
    )


def _scores(name: str, solution: pd.DataFrame, oracle: pd.DataFrame, prior: pd.DataFrame) -> None:
    o, p = official_score(solution, oracle), official_score(solution, prior)
    print(
        f"{name}: oracle {o.score:.4f}  prior {p.score:.4f}  ratio {o.score / p.score:.3f}   "
        f"(oracle parts {o.spinal:.3f} {o.foraminal:.3f} {o.subarticular:.3f} "
        f"{o.any_severe_spinal:.3f}; prior parts {p.spinal:.3f} {p.foraminal:.3f} "
        f"{p.subarticular:.3f} {p.any_severe_spinal:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, help="score a root written by lsdc synth instead")
    args = parser.parse_args()

    if args.root is None:
        study_ids, probabilities, classes = _draw(args.studies, args.seed)
        print(f"label model alone, {args.studies} studies, seed {args.seed}")
        _report(classes)
        wide = pd.DataFrame(np.asarray(SEVERITIES, dtype=object)[classes], columns=LABEL_COLUMNS)
        wide.insert(0, "study_id", study_ids)
        prior = np.broadcast_to(_prior(classes), probabilities.shape)
        _scores(
            "all",
            labels_to_solution(wide),
            _frame(study_ids, probabilities),
            _frame(study_ids, prior),
        )
        return

    labels = load_train_labels(args.root / "train.csv")
    classes = labels_to_indices(labels)
    print(f"{args.root}: {len(labels)} train studies")
    _report(classes)
    prior_table = _prior(classes)
    splits = {"train": labels_to_solution(labels)}
    if (args.root / "solution_test.csv").is_file():
        splits["test"] = load_solution(args.root / "solution_test.csv")
    for split, solution in splits.items():
        oracle = pd.read_csv(args.root / f"oracle_{split}.csv")
        study_ids = oracle["row_id"].str.split("_").str[0].astype(int).unique()
        prior = _frame(study_ids, np.broadcast_to(prior_table, (len(study_ids), 25, 3)))
        _scores(split, solution, oracle, prior)


if __name__ == "__main__":
    main()
