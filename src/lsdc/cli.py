"""The face of lsdc: one verb per pipeline stage, each a thin call into that stage's public API.

Every verb is a pair (``_add_<verb>`` declares its arguments, ``_run_<verb>`` calls the stage).
Errors the user can fix (bad files, bad config keys) end as one clear line on stderr and exit 2,
never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lsdc.errors import UserError


# ------------------------------------------------------------------------------------------ score
def _add_score(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--solution",
        required=True,
        type=Path,
        help="solution CSV (row_id, normal_mild, moderate, severe, sample_weight)",
    )
    p.add_argument(
        "--submission",
        required=True,
        type=Path,
        help="submission CSV (row_id, normal_mild, moderate, severe)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def _run_score(args: argparse.Namespace) -> int:
    from lsdc.data.contract import load_solution, load_submission
    from lsdc.evaluation.metric import official_score

    solution = load_solution(args.solution)
    submission = load_submission(args.submission)
    result = official_score(solution, submission).as_dict()
    for key, value in result.items():
        print(f"{key:>18s}  {value:.6f}")
    if args.json:
        print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------ synth
def _add_synth(p: argparse.ArgumentParser) -> None:
    from lsdc.data.synth import add_synth_arguments

    add_synth_arguments(p)


def _run_synth(args: argparse.Namespace) -> int:
    from lsdc.data.synth import synth_from_args

    synth_from_args(args)
    return 0


# ------------------------------------------------------------------------------------- preprocess
def _add_preprocess(p: argparse.ArgumentParser) -> None:
    from lsdc.data.cache import add_preprocess_arguments

    add_preprocess_arguments(p)


def _run_preprocess(args: argparse.Namespace) -> int:
    from lsdc.data.cache import preprocess_from_args

    return preprocess_from_args(args)


# ------------------------------------------------------------------------------------------ train
def _add_train(p: argparse.ArgumentParser) -> None:
    from lsdc.training.train import add_train_arguments

    add_train_arguments(p)


def _run_train(args: argparse.Namespace) -> int:
    from lsdc.training.train import train_from_args

    return train_from_args(args)


# --------------------------------------------------------------------------------------- evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    from lsdc.evaluation.report import add_evaluate_arguments

    add_evaluate_arguments(p)


def _run_evaluate(args: argparse.Namespace) -> int:
    from lsdc.evaluation.report import evaluate_from_args

    return evaluate_from_args(args)


# ---------------------------------------------------------------------------------------- predict
def _add_predict(p: argparse.ArgumentParser) -> None:
    from lsdc.inference.predict import add_predict_arguments

    add_predict_arguments(p)


def _run_predict(args: argparse.Namespace) -> int:
    from lsdc.inference.predict import predict_from_args

    return predict_from_args(args)


# ------------------------------------------------------------------------------------------- demo
def _add_demo(p: argparse.ArgumentParser) -> None:
    from lsdc.demo import add_demo_arguments

    add_demo_arguments(p)


def _run_demo(args: argparse.Namespace) -> int:
    from lsdc.demo import demo_from_args

    return demo_from_args(args)


VERBS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {
    "synth": ("write a synthetic competition root with a known answer", _add_synth, _run_synth),
    "preprocess": (
        "DICOM series -> cached, oriented volumes + geometry",
        _add_preprocess,
        _run_preprocess,
    ),
    "train": ("train a model over folds (AMP, EMA, exact resume, DDP)", _add_train, _run_train),
    "evaluate": (
        "official score, per-condition diagnostics, calibration and report.html",
        _add_evaluate,
        _run_evaluate,
    ),
    "predict": (
        "write submission.csv for a split from one or more runs (offline)",
        _add_predict,
        _run_predict,
    ),
    "score": (
        "official competition score of a submission against a solution",
        _add_score,
        _run_score,
    ),
    "demo": (
        "the whole chain on the synthetic default: synth, preprocess, train, evaluate, predict",
        _add_demo,
        _run_demo,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsdc", description="Lumbar spine degenerative classification: DICOM to submission."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (help_text, add, _) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(VERBS[args.verb][2](args) or 0)
    except UserError as exc:
        print(f"lsdc {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lsdc {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
