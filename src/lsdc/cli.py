"""The face of lsdc: one verb per pipeline stage, each a thin call of :mod:`lsdc.api`.

Every verb is a pair (``_add_<verb>`` declares its arguments, ``_run_<verb>`` calls the API).
Building the parser imports no stage (``lsdc score --help`` loads neither torch nor MONAI).
Errors the user can fix (bad files, bad config keys) end as one clear line on stderr and exit 2,
never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from lsdc import api
from lsdc.contract import N_LABELS, SPLITS
from lsdc.errors import LsdcWarning, UserError
from lsdc.utils import disk_error, usable_cpus

_OVERRIDES_HELP = (
    "dotted config overrides, e.g. optim.epochs=3 folds.fold=0 (anywhere among the flags)"
)


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
    from lsdc.contract import load_solution, load_submission
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
    from lsdc.synth.config import PACS_LAYOUTS, PHANTOMS, PROFILES, REALISM_RATES, SynthConfig

    defaults = SynthConfig()
    p.add_argument("--out", required=True, type=Path, help="new or empty folder to write")
    p.add_argument(
        "--phantom",
        choices=list(PHANTOMS),
        default=defaults.phantom,
        help="; ".join(f"{k}: {v}" for k, v in PHANTOMS.items()),
    )
    p.add_argument(
        "--profile",
        choices=list(PROFILES),
        default=defaults.profile,
        help="sizes: " + "; ".join(f"{k}: {v}" for k, v in PROFILES.items()),
    )
    p.add_argument("--train-studies", type=int, default=defaults.train_studies)
    p.add_argument("--test-studies", type=int, default=defaults.test_studies)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--image-size", type=int, default=defaults.image_size, help="matrix (rows = columns)"
    )
    p.add_argument("--slices", type=int, default=defaults.slices, help="sagittal slices per series")
    p.add_argument(
        "--axial-slices", type=int, default=None, help="Axial T2 slices per study (2 x --slices)"
    )
    p.add_argument(
        "--pacs",
        choices=list(PACS_LAYOUTS),
        default=defaults.pacs,
        help="also write the test studies as a PACS export (DIR/test_pacs, extra series, vendor "
        "descriptions, sequence tags; DIR/test_pacs_study_ids.csv for lsdc predict --dicom "
        "--study-id): " + "; ".join(f"{k}: {v}" for k, v in PACS_LAYOUTS.items()),
    )
    p.add_argument(
        "--no-realism", action="store_true", help="turn every realism switch off (rates below = 0)"
    )
    for name, help_text in REALISM_RATES.items():
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=getattr(defaults, name),
            help=f"{help_text} (default %(default)s)",
        )
    p.add_argument(
        "--workers",
        type=int,
        default=usable_cpus(),
        help="processes rendering studies in parallel; the output is the same for any count "
        "(default: one per CPU this process may use, %(default)s here)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_synth(args: argparse.Namespace) -> int:
    from lsdc.synth.config import REALISM_RATES, SynthConfig

    config = SynthConfig(
        train_studies=args.train_studies,
        test_studies=args.test_studies,
        seed=args.seed,
        image_size=args.image_size,
        slices=args.slices,
        axial_slices=args.axial_slices,
        profile=args.profile,
        phantom=args.phantom,
        pacs=args.pacs,
        **{name: getattr(args, name) for name in REALISM_RATES},
    )
    if args.no_realism:
        config = config.without_realism()
    out = api.synthesize(args.out, config, workers=args.workers, progress=not args.quiet)
    print(
        f"lsdc synth: wrote {config.train_studies} train and {config.test_studies} test studies "
        f"to {out}"
    )
    return 0


# ------------------------------------------------------------------------------------- preprocess
def _add_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="competition root folder")
    p.add_argument("--cache", required=True, type=Path, help="cache folder to fill")
    p.add_argument("--split", required=True, choices=SPLITS, help="which split to cache")
    p.add_argument("--workers", type=int, default=1, help="worker processes, one series at a time")
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar="MM",
        help="resample every stack to this (slice, row, col) spacing in mm; default: keep",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_preprocess(args: argparse.Namespace) -> int:
    from lsdc.preprocessing.cachedir import CacheDir

    report = api.preprocess(
        args.data,
        args.cache,
        args.split,
        workers=args.workers,
        spacing=args.spacing,
        progress=not args.quiet,
    )
    counts = report["status"].value_counts()
    print(
        f"{counts.get('ok', 0)} stacks ok, {counts.get('warning', 0)} with warnings, "
        f"{counts.get('error', 0)} series failed; report: {CacheDir(args.cache).report}"
    )
    return 0


# ------------------------------------------------------------------------------------------ train
def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="YAML config: a path, or the name of a shipped config (e.g. tiny, two_stage_demo)",
    )
    p.add_argument("--data", required=True, type=Path, help="competition root (train.csv)")
    p.add_argument("--cache", required=True, type=Path, help="cache of the train split")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from each fold's last checkpoint",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train (auto: CUDA when available)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (the one-line summary of each epoch stays)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (the config key data.threads; default: usable CPUs - loader workers)",
    )


def _threads_override(threads: int | None) -> list[str]:
    """``--threads N`` is the config key ``data.threads``, so the run folder records it."""
    return [] if threads is None else [f"data.threads={threads}"]


def _run_train(args: argparse.Namespace) -> int:
    api.train(
        args.config,
        args.data,
        args.cache,
        args.out,
        overrides=[*args.overrides, *_threads_override(args.threads)],
        resume=args.resume,
        device=args.device,
        progress=not args.no_progress,
    )
    return 0


# --------------------------------------------------------------------------------------- evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pred",
        type=Path,
        help="prediction CSV (row_id, normal_mild, moderate, severe): a run's oof.csv or a "
        "submission; default RUN/oof.csv when --run is given",
    )
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument(
        "--data",
        type=Path,
        metavar="ROOT",
        help="score against ROOT/train.csv (for out-of-fold predictions; only the studies the "
        "prediction file holds are scored)",
    )
    labels.add_argument(
        "--solution",
        type=Path,
        help="score against a solution file, e.g. ROOT/solution_test.csv (for test predictions; "
        "every scored row must be predicted)",
    )
    p.add_argument(
        "--run",
        type=Path,
        help="the run the out-of-fold predictions come from: fit a temperature per condition on "
        "them, store it in RUN/calibration.json (used by lsdc predict) and report the score "
        "before and after; needs --data",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="folder for report.html and metrics.json (default: RUN/evaluation with --run, "
        "else an 'evaluation' folder beside the prediction file)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        help="the cache of the predicted studies (with --run): the report adds a gallery of the "
        "studies with the largest loss and a few random ones, each linking to its full page "
        "(OUT/studies/), and, for a two-stage run, the localisation error per level and side",
    )
    p.add_argument(
        "--tta",
        choices=("none", "flip"),
        help="with --run, --data and --cache (the training cache): re-make the out-of-fold "
        "predictions as lsdc predict --tta will serve them (each fold's model on its own "
        "validation studies), save them as OUT/oof_served.csv, and fit the calibration on them "
        "(default: RUN/oof.csv, made without TTA)",
    )


def _run_evaluate(args: argparse.Namespace) -> int:
    from lsdc.evaluation.report import summary_lines

    metrics = api.evaluate(
        args.pred, args.data, args.solution, args.run, args.out, args.cache, args.tta
    )
    print("\n".join(summary_lines(metrics)))
    return 0


# ------------------------------------------------------------------------------------------- show
def _add_show(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="ROOT",
        help="competition root: train.csv and train_label_coordinates.csv give a training "
        "study's truth and labelled points; {split}_series_descriptions.csv names missing series",
    )
    p.add_argument(
        "--cache",
        required=True,
        type=Path,
        help="cache holding the study (lsdc preprocess; lsdc predict --cache keeps the test one)",
    )
    p.add_argument(
        "--run",
        required=True,
        type=Path,
        help="run folder whose model predicts the study (its validation fold's model, else "
        "every fold's mean), with points and crops for a two-stage run",
    )
    p.add_argument("--study", required=True, type=int, help="the study_id to show")
    p.add_argument(
        "--out",
        type=Path,
        help="FILE.html (a self-contained page) or FILE.png (one picture); default "
        "study_ID.html in the current folder",
    )


def _run_show(args: argparse.Namespace) -> int:
    out = api.show(args.data, args.cache, args.run, args.study, args.out)
    print(f"study {args.study}: {out}")
    return 0


# ---------------------------------------------------------------------------------------- predict
def _add_predict(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        type=Path,
        metavar="ROOT",
        help="competition root holding {split}_series_descriptions.csv and {split}_images/ "
        "(read only; the Kaggle input folder works as is)",
    )
    source.add_argument(
        "--dicom",
        type=Path,
        metavar="DIR",
        help="any folder tree of DICOM files (a PACS export, files named anything): series get "
        "their roles from their headers (series_roles.csv), rows use each StudyInstanceUID "
        "(or --study-id), and readings/{study}.md and competition_layout/ go beside --out",
    )
    p.add_argument(
        "--run",
        required=True,
        nargs="+",
        type=Path,
        help="one or more run folders (lsdc train) or exported runs (lsdc export); every fold "
        "of every run is averaged, each run calibrated with its own RUN/calibration.json",
    )
    p.add_argument("--out", type=Path, default=Path("submission.csv"), help="submission CSV")
    p.add_argument(
        "--split",
        choices=SPLITS[::-1],
        help="with --data: whose series CSV and images to predict (default test; "
        "sample_submission.csv orders the test split)",
    )
    p.add_argument(
        "--study-id",
        type=Path,
        metavar="CSV",
        help="with --dicom: columns StudyInstanceUID, study_id: the id each study's rows use "
        "(letters, digits, dots, dashes); default the StudyInstanceUID",
    )
    p.add_argument(
        "--check-descriptions",
        action="store_true",
        help="with --data: compare each series' CSV description with the role its DICOM headers "
        "give; warn where they disagree and write series_roles.csv beside --out",
    )
    p.add_argument(
        "--tta",
        choices=("none", "flip"),
        default="none",
        help="flip: also predict the left-right mirror (left/right labels swapped back) and average",
    )
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="ignore RUN/calibration.json (raw ensemble probabilities)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        help="keep the preprocessed cache in this folder (default: a temporary folder, removed)",
    )
    p.add_argument("--workers", type=int, default=1, help="preprocessing processes")
    p.add_argument(
        "--device",
        help="torch device: cpu, cuda, cuda:1 or auto (default: cuda if available); a device "
        "this machine lacks is an error",
    )
    p.add_argument(
        "--allow-fallback",
        action="store_true",
        help="where a fold cannot load, the run's folds differ in config, the device does not "
        "exist, --workers is invalid or --cache is unusable, write the class prior for the "
        "studies concerned (counted on the last line) instead of stopping with an error",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of the model (default 0: usable CPUs - the run's loader workers)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_predict(args: argparse.Namespace) -> int:
    shared = {
        "tta_flip": args.tta == "flip",
        "calibrate": not args.no_calibration,
        "cache_dir": args.cache,
        "workers": args.workers,
        "device": args.device,
        "threads": args.threads,
        "progress": not args.quiet,
        "allow_fallback": args.allow_fallback,
    }
    if args.dicom is not None:
        for flag, given in (
            ("--split", args.split),
            ("--check-descriptions", args.check_descriptions),
        ):
            if given:
                raise UserError(f"{flag} goes with --data (a competition root), not --dicom")
        dicom = api.predict_dicom(args.dicom, args.run, args.out, study_ids=args.study_id, **shared)
        result = dicom.predict
    else:
        if args.study_id is not None:
            raise UserError("--study-id goes with --dicom; a competition root has its study ids")
        result = api.predict(
            args.data,
            args.run,
            args.out,
            split=args.split or "test",
            check_descriptions=args.check_descriptions,
            **shared,
        )
    counts = result.report["source"].value_counts()
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("model", "model_partial", "prior"))
    n_studies = len(result.submission) // N_LABELS
    unlisted = counts.get("not_listed", 0)
    print(
        f"{result.submission_path}: {len(result.submission)} rows, {n_studies} studies ({summary})"
        + (f"; {unlisted} study folder(s) in neither CSV, not predicted" if unlisted else "")
    )
    if args.dicom is not None:
        roles = dicom.roles
        missing = roles[roles["series_instance_uid"] == ""]
        print(
            f"{dicom.roles_path}: {int(roles['used'].sum())} series used of "
            f"{int((roles['series_instance_uid'] != '').sum())}; "
            f"{len(missing)} role(s) missing in {missing['study'].nunique()} studies; "
            f"readings: {dicom.readings[0].parent if dicom.readings else '-'}"
        )
    print(
        f"{result.n_prior} of {n_studies} studies got the class prior; report: {result.report_path}"
    )
    return 0


# ----------------------------------------------------------------------------------------- export
def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", required=True, nargs="+", type=Path, help="one or more finished run folders"
    )
    p.add_argument("--out", required=True, type=Path, help="new or empty folder to write")
    p.add_argument(
        "--no-wheel",
        action="store_true",
        help="leave out the lsdc wheel (otherwise built from lsdc's source with pip, offline)",
    )
    p.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="export the folds of a run that has not finished training as they are (otherwise "
        "refused, naming the unfinished fold); a run being trained is refused either way",
    )


def _run_export(args: argparse.Namespace) -> int:
    result = api.export(
        args.run, args.out, wheel=not args.no_wheel, allow_unfinished=args.allow_unfinished
    )
    mb = 2**20
    print(
        f"lsdc export: {len(result.runs)} run(s) to {result.out_dir}: "
        f"{result.export_bytes / mb:.1f} MB (the run folders: {result.runs_bytes / mb:.1f} MB)"
    )
    print(f"offline install and predict: {result.out_dir / 'README.md'}")
    return 0


# ------------------------------------------------------------------------------------------- demo
def _add_demo(p: argparse.ArgumentParser) -> None:
    from lsdc.demo import DEMO_CONFIG, DEMO_TEST_STUDIES, DEMO_TRAIN_STUDIES

    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for every artefact")
    p.add_argument(
        "--config",
        default=DEMO_CONFIG,
        help=f"training config (default {DEMO_CONFIG}; 'whole_baseline' for the whole-series baseline)",
    )
    p.add_argument(
        "--train-studies", type=int, default=DEMO_TRAIN_STUDIES, help="synthetic training studies"
    )
    p.add_argument(
        "--test-studies", type=int, default=DEMO_TEST_STUDIES, help="synthetic test studies"
    )
    p.add_argument("--image-size", type=int, help="synthetic matrix size (default: synth's)")
    p.add_argument("--slices", type=int, help="synthetic sagittal slices (default: synth's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument(
        "--workers",
        type=int,
        default=usable_cpus(),
        help="synth and preprocessing processes (default: one per CPU this process may use, "
        "%(default)s here)",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from lsdc.demo import run_demo

    synth_overrides = {"train_studies": args.train_studies, "test_studies": args.test_studies}
    synth_overrides |= {
        key: value
        for key, value in (("image_size", args.image_size), ("slices", args.slices))
        if value is not None
    }
    run_demo(
        args.out,
        config=args.config,
        seed=args.seed,
        workers=args.workers,
        synth_overrides=synth_overrides,
        train_overrides=list(args.overrides),
    )
    return 0


Verb = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
VERBS: dict[str, Verb] = {
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
    "show": (
        "one study as the model sees it: slices with its points, crops, the 25 rows (HTML/PNG)",
        _add_show,
        _run_show,
    ),
    "predict": (
        "write submission.csv for a split from one or more runs (offline)",
        _add_predict,
        _run_predict,
    ),
    "export": (
        "slim copy of trained runs + the lsdc wheel, for an offline notebook",
        _add_export,
        _run_export,
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

TAKES_OVERRIDES = frozenset({"train", "demo"})
"""Verbs whose free ``key=value`` words are config overrides; they may stand anywhere."""


def build_parser() -> argparse.ArgumentParser:
    """The ``lsdc`` parser: one sub-command per verb."""
    parser = argparse.ArgumentParser(
        prog="lsdc", description="Lumbar spine degenerative classification: DICOM to submission."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (help_text, add, _) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        if name in TAKES_OVERRIDES:
            p.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides stand anywhere among a verb's flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if w.startswith("-") or "=" not in w]
    if stray or (extra and args.verb not in TAKES_OVERRIDES):
        parser.parse_args(argv)  # let argparse report the unknown words, as it always has
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    return args


def _written_folder(args: argparse.Namespace) -> Path:
    """The folder a verb writes (its ``--out``, the parent of an output file, or ``--cache``)."""
    for name in ("out", "cache"):
        value = getattr(args, name, None)
        if isinstance(value, Path):
            return value.parent if value.suffix else value
    return Path.cwd()


PARAMETER_FLAGS: dict[str, str] = {
    "data_root": "--data",
    "dicom_dir": "--dicom",
    "cache_dir": "--cache",
    "out_dir": "--out",
    "out_path": "--out",
    "run_dir": "--run",
    "run_dirs": "--run",
    "predictions": "--pred",
    "study_ids": "--study-id",
    "study_id": "--study",
    "tta_flip=True": "--tta flip",
    "wheel=False": "--no-wheel",
}
"""The Python API's parameters -> the CLI's flags, where the flag is not the name with dashes
(``allow_fallback`` -> ``--allow-fallback``, ``resume=True`` -> ``--resume``)."""

_PARAMETER = re.compile(r"`(\w+)(?:=([^`]*))?`")
"""How library messages name a parameter: ```out_dir``` or ```out_dir=RUN```."""


def as_flags(message: str) -> str:
    """A library message naming the API's parameters, with the CLI's flags in their place."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.groups()
        if f"{name}={value}" in PARAMETER_FLAGS:
            return PARAMETER_FLAGS[f"{name}={value}"]
        spelled = PARAMETER_FLAGS.get(name, "--" + name.replace("_", "-"))
        return spelled if value in (None, "True") else f"{spelled} {value}"

    return _PARAMETER.sub(flag, message)


class _StderrHandler(logging.Handler):
    """lsdc's log records on stderr as the CLI has always written them: a warning as
    ``lsdc VERB: warning: MESSAGE``, anything else as its bare line, above any progress bar."""

    def __init__(self, verb: str) -> None:
        super().__init__(logging.INFO)
        self.verb = verb

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm  # tqdm.write: a running progress bar is redrawn below the line

        try:
            line = as_flags(record.getMessage())
            if record.levelno >= logging.WARNING:
                line = f"lsdc {self.verb}: warning: {line}"
            tqdm.write(line, file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's contract: emitting a record never raises
            self.handleError(record)


@contextlib.contextmanager
def _library_output(verb: str) -> Iterator[None]:
    """While a verb runs, show lsdc's ``logging`` records (INFO and up) and its
    :class:`~lsdc.errors.LsdcWarning` s on stderr; other warnings keep Python's format. Undone
    afterwards, so a Python caller of :func:`main` keeps its own logging setup."""
    logger = logging.getLogger("lsdc")
    handler = _StderrHandler(verb)
    level, show = logger.level, warnings.showwarning

    def show_warning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: object = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, LsdcWarning):
            handler.handle(logging.makeLogRecord({"msg": str(message), "levelno": logging.WARNING}))
        else:
            show(message, category, filename, lineno, file, line)  # type: ignore[arg-type]

    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    warnings.showwarning = show_warning
    try:
        yield
    finally:
        warnings.showwarning = show
        logger.setLevel(level)
        logger.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        with _library_output(args.verb):
            return int(VERBS[args.verb][2](args) or 0)
    except UserError as exc:
        print(f"lsdc {args.verb}: error: {as_flags(str(exc))}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # a path the system refused (read-only, full disk)
        filename = getattr(exc, "filename", None)
        folder = Path(filename).parent if filename else _written_folder(args)
        error = disk_error(exc, folder)
        if error is not None:
            print(f"lsdc {args.verb}: error: {error}", file=sys.stderr)
        elif isinstance(exc, OSError) and filename is not None:
            print(f"lsdc {args.verb}: error: {filename}: {exc.strerror}", file=sys.stderr)
        else:
            raise
        return 2
    except KeyboardInterrupt:
        print(f"lsdc {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
