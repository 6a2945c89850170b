"""``lsdc export``: trained runs -> one slim, self-describing folder for an offline notebook.

The competition is scored by a notebook with no internet, so what it needs must travel as files:
the served weights, what turns them into a submission, and lsdc itself. An export holds::

    DIR/README.md            how to install offline and predict
    DIR/requirements.txt     lsdc's pinned runtime dependencies (from its installed metadata)
    DIR/wheels/lsdc-*.whl    lsdc, built from its source (left out with ``--no-wheel``)
    DIR/wheels/*.whl         with ``--with-deps``: every runtime dependency of lsdc, at the version
                             installed here, but torch and torchvision (and what only they need),
                             which a Kaggle GPU image has; ``--with-torch`` adds those too
    DIR/<run>/               one per run, in the run-folder layout (lsdc.rundir), minus what
                             serving does not read: no last.pt (optimiser, scheduler, scaler,
                             RNG states), no OOF or metrics files
        config.yaml, class_prior.csv, calibration.json (when the run was calibrated)
        fold{k}/best.pt      the validated weights (the EMA's when EMA was on), config, task state
        fold{k}/best.json    fold, seed, epoch, score

``lsdc predict --run DIR/<run>`` reads an export exactly as it reads the run.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from lsdc.checkpoint import load_checkpoint, save_checkpoint
from lsdc.config import read_config_dict
from lsdc.errors import UserError
from lsdc.rundir import FoldDir, RunDir
from lsdc.utils import (
    check_input_dir,
    check_output_dir,
    disk_errors,
    reader_lock,
    write_text_atomic,
)

log = logging.getLogger(__name__)

DISTRIBUTION = "lsdc"
SERVED_KEYS = ("model", "config", "task_state")
"""The entries of ``best.pt`` that serving reads (:class:`lsdc.tasks.served.ServedRun`)."""

WHEEL_DIR = "wheels"
REQUIREMENTS = "requirements.txt"
README = "README.md"
_BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in")
_BUILD_GLOBS = ("README*", "LICEN[CS]E*")
"""What the build reads besides ``src/``: ``pyproject.toml`` names the readme and the licence."""
_NAME_LINE = re.compile(rf"""^name\s*=\s*["']{DISTRIBUTION}["']""", re.MULTILINE)
TORCH_DISTRIBUTIONS = ("torch", "torchvision")
"""What a Kaggle GPU image already has (with their own dependencies): bundled only with
``--with-torch``, since their CUDA wheels weigh gigabytes."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_runs` wrote, with the sizes before and after."""

    out_dir: Path
    runs: list[Path]
    wheel: Path | None
    runs_bytes: int
    export_bytes: int
    dependencies: list[str] = field(default_factory=list)
    """``name==version`` of each dependency wheel bundled in ``wheels/`` (empty without
    ``with_deps``)."""


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_exportable(run_dir: Path, allow_unfinished: bool = False) -> list[FoldDir]:
    """The folds of a finished run, or a one-line error saying what is missing.

    A run is finished when every fold its config trains (all of ``folds.n_folds``, or the one
    ``folds.fold`` names) has a folder whose ``last.pt`` says finished; an export (no
    ``last.pt``) serves its ``best.pt`` as it is. With ``allow_unfinished`` the folds that have
    weights are exported as they are, each unfinished one logged.

    Raises:
        UserError: not a run folder, no fold, a fold without its weights, or (unless
            ``allow_unfinished``) an unfinished fold, named.
    """
    run = RunDir(run_dir)
    check_input_dir(run.root, "run")
    for path, what in ((run.config, "config"), (run.class_prior, "class prior")):
        if not path.is_file():
            raise UserError(f"{path}: missing (the run's {what}); is {run.root} an lsdc train run?")
    unfinished = _unfinished_folds(run)
    if unfinished and not allow_unfinished:
        fold, why = unfinished[0]
        raise UserError(
            f"{run.root}: fold {fold} is not finished ({why}); finish it (lsdc train --resume) "
            "or pass `allow_unfinished=True` to export the folds as they are"
        )
    for fold, why in unfinished:
        log.warning("%s: exporting without finished fold %d (%s)", run.root, fold, why)
    folds = run.fold_dirs()
    if allow_unfinished:
        folds = [f for f in folds if f.best.is_file()]
    if not folds:
        raise UserError(f"{run.root}: no fold folder with weights; is it an lsdc train run folder?")
    for fold in folds:
        if not fold.best.is_file():
            raise UserError(
                f"{fold.best}: missing, so fold {fold.fold} has no weights to serve; finish the "
                "run (lsdc train --resume) or remove that fold folder"
            )
    return folds


def _unfinished_folds(run: RunDir) -> list[tuple[int, str]]:
    """(fold, why) for each fold the run's config trains that is not finished."""
    config = read_config_dict(run.config)["folds"]
    expected = range(config["n_folds"]) if config["fold"] is None else [config["fold"]]
    present = {f.fold: f for f in run.fold_dirs()}
    unfinished = []
    for k in sorted({*expected, *present}):
        fold = present.get(k)
        if fold is None:
            unfinished.append((k, f"{run.fold(k).root} does not exist: not trained yet"))
        elif fold.last.is_file():
            state = _read_last(fold.last)
            if not state.get("finished", False):
                epoch = state.get("epoch", -1) + 1
                unfinished.append((k, f"{fold.last}: {epoch} epoch(s) done, not finished"))
        elif not fold.best.is_file():
            unfinished.append((k, f"{fold.root} holds no checkpoint yet"))
    return unfinished


def _read_last(path: Path) -> dict:
    """A ``last.pt`` memory-mapped (its counters only are read, not its optimiser's tensors).

    Raises:
        UserError: unreadable.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


def _export_run(run_dir: Path, dest: Path, folds: list[FoldDir]) -> None:
    run, out = RunDir(run_dir), RunDir(dest)
    out.root.mkdir(parents=True)
    for path, target in (
        (run.config, out.config),
        (run.class_prior, out.class_prior),
        (run.calibration, out.calibration),
    ):
        if path.is_file():
            shutil.copyfile(path, target)
    for fold in folds:
        served = out.fold(fold.fold)
        served.root.mkdir()
        checkpoint = load_checkpoint(fold.best, map_location="cpu")
        missing = [key for key in SERVED_KEYS if key not in checkpoint]
        if missing:
            raise UserError(f"{fold.best}: lacks {missing}; it was not written by lsdc train")
        save_checkpoint({key: checkpoint[key] for key in SERVED_KEYS}, served.best)
        if fold.best_info.is_file():
            shutil.copyfile(fold.best_info, served.best_info)


# ------------------------------------------------------------------------------------ the wheel
def source_root() -> Path:
    """The source folder lsdc is installed from (an editable or a local-folder install records it
    in ``direct_url.json``), else the checkout around the imported package.

    Raises:
        UserError: lsdc was installed from a wheel or an index: there is no source to build.
    """
    candidates = []
    try:
        direct = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        direct = None
    if direct:
        url = urlparse(json.loads(direct).get("url", ""))
        if url.scheme == "file":
            candidates.append(Path(unquote(url.path)))
    package = Path(__file__).resolve().parents[1]  # lsdc/, found without importing the face
    candidates.extend(package.parents[0:2])
    for folder in candidates:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and _NAME_LINE.search(pyproject.read_text()):
            return folder
    raise UserError(
        f"cannot find the lsdc source to build its wheel (lsdc is imported from "
        f"{package}, not from a source checkout); pass `wheel=False` and ship "
        "the wheel you installed lsdc from"
    )


def build_wheel(dest: Path) -> Path:
    """Build the lsdc wheel into ``dest`` with pip, offline, from a copy of the source (so the
    build leaves no ``build/`` or ``*.egg-info`` in the checkout).

    Raises:
        UserError: no source found, or pip failed (its last line is in the message).
    """
    root = source_root()
    with tempfile.TemporaryDirectory(prefix="lsdc-wheel-") as tmp:
        copy = Path(tmp) / "src-copy"
        copy.mkdir()
        names = {*(n for n in _BUILD_FILES if (root / n).is_file())}
        names |= {p.name for g in _BUILD_GLOBS for p in root.glob(g) if p.is_file()}
        for name in names:
            shutil.copyfile(root / name, copy / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        shutil.copytree(root / "src", copy / "src", ignore=ignore)
        built = Path(tmp) / "wheels"
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        cmd += ["--no-index", "--quiet", "--wheel-dir", str(built), str(copy)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(built.glob(f"{DISTRIBUTION}-*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no wheel written"]
            raise UserError(f"building the lsdc wheel from {root} failed: {lines[-1]}")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheels[0], dest / wheels[0].name))


def runtime_requirements() -> list[str]:
    """lsdc's runtime dependencies as its installed metadata pins them (pyproject.toml is the
    one place they are pinned); optional extras (``dev``) left out."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise UserError("lsdc is not installed (no distribution metadata to read)") from exc
    return [r for r in requires if "extra ==" not in r.replace('"', "").replace("'", "")]


# ------------------------------------------------------------------------ the dependency wheels
def installed_closure(roots: Iterable[str], stop: Collection[str] = ()) -> dict[str, str]:
    """Every installed distribution that ``roots`` need, with its version: the Requires-Dist of
    each walked recursively through the installed metadata, markers evaluated for this
    interpreter, a distribution's extras followed only where a requirement asks for them
    (``cuda-toolkit[cublas]``). The walk does not enter the distributions named in ``stop``.

    Returns:
        canonical name -> installed version, the roots included.

    Raises:
        UserError: a needed distribution is not installed, or its metadata cannot be parsed.
    """
    stopped = {canonicalize_name(name) for name in stop}
    versions: dict[str, str] = {}
    walked: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(root), "the export") for root in roots]
    while todo:
        requirement, needed_by = todo.pop()
        name, extras = canonicalize_name(requirement.name), frozenset(requirement.extras)
        if name in stopped or (name, extras) in walked:
            continue
        walked.add((name, extras))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise UserError(
                f"{requirement} (needed by {needed_by}) is not installed, so its wheel cannot be "
                "pinned; install lsdc's dependencies first"
            ) from exc
        versions[name] = dist.version
        for line in dist.requires or []:
            try:
                dependency = Requirement(line)
            except InvalidRequirement as exc:
                raise UserError(f"{name} {dist.version}: unreadable requirement {line!r}") from exc
            environments = [{"extra": extra} for extra in ("", *sorted(extras))]
            if dependency.marker is None or any(map(dependency.marker.evaluate, environments)):
                todo.append((dependency, f"{name} {dist.version}"))
    return dict(sorted(versions.items()))


def dependency_pins(with_torch: bool = False) -> list[str]:
    """``name==version`` of each distribution lsdc needs at run time, as installed here, lsdc
    left out; without ``with_torch`` the walk stops at torch and torchvision, so what only they
    need (CUDA libraries, triton, sympy) is left out too."""
    stop = () if with_torch else TORCH_DISTRIBUTIONS
    closure = installed_closure([DISTRIBUTION], stop=stop)
    return [f"{name}=={version}" for name, version in closure.items() if name != DISTRIBUTION]


def download_wheels(pins: Sequence[str], dest: Path) -> None:
    """Fetch the wheel of each pin into ``dest`` with ``pip download`` (no dependencies, wheels
    only, from the index and find-links pip is configured with), for this interpreter and
    platform.

    Raises:
        UserError: pip failed; the message names the package pip stopped at and quotes its
            error line.
    """
    dest.mkdir(parents=True, exist_ok=True)
    log.info("fetching %d dependency wheels with pip download", len(pins))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--quiet", "--dest", str(dest), *pins]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return
    lines = (done.stderr + done.stdout).strip().splitlines()
    errors = [line for line in lines if line.startswith("ERROR:")] or lines or ["no output"]
    line = errors[-1].removeprefix("ERROR:").strip()
    named = [pin for pin in pins if pin in line or pin.split("==")[0] in line]
    package = named[0] if named else "the dependency wheels"
    raise UserError(f"pip download of {package} failed (exit {done.returncode}): {line}")


def _readme(
    run_names: Sequence[str], wheel: Path | None, version: str, dependencies: Sequence[str]
) -> str:
    runs = " ".join(f"$EXPORT/{name}" for name in run_names)
    if dependencies:
        install = _bundle_install(wheel, version, dependencies)
    elif wheel is not None:
        install = (
            "pip install --no-index --find-links $EXPORT/wheels lsdc\n"
            "```\n\n"
            "pip also needs the pinned dependencies of `requirements.txt` (torch, MONAI, ...). "
            "Where the notebook lacks some, download their wheels beforehand on a machine with "
            "internet (`pip download -r requirements.txt -d wheels`, same Python version and "
            "platform as the notebook) and add them to `wheels/`; or add `--no-deps` to use the "
            "notebook's own packages (then check them against `requirements.txt`)."
        )
    else:
        install = (
            f"# exported with --no-wheel: add the lsdc {version} wheel you installed from\n"
            f"pip install --no-index --find-links /path/to/that/wheel/folder lsdc=={version}\n"
            "```"
        )
    return (
        f"# lsdc export: {len(run_names)} run(s) for offline inference\n\n"
        f"Written by `lsdc export` (lsdc {version}) on {datetime.date.today().isoformat()}: "
        f"{', '.join(run_names)}. Each run folder holds only what `lsdc predict` reads: every "
        "fold's served weights (`fold{k}/best.pt`: model state, config, task state), the config, "
        "the class prior (the fallback) and the calibration when the run was calibrated.\n\n"
        "## Install (no internet)\n\n"
        "```bash\n"
        "EXPORT=/kaggle/input/your-export   # where this folder is\n"
        f"{install}\n\n"
        "## Predict\n\n"
        "```bash\n"
        f"lsdc predict --data /kaggle/input/rsna-2024-lumbar-spine-degenerative-classification \\\n"
        f"    --run {runs} --out submission.csv\n"
        "```\n\n"
        "(`python -m lsdc.cli predict ...` does the same where pip's script folder is not on "
        "the PATH.) "
        "Every fold of every run is averaged, each run calibrated with its own "
        "`calibration.json`; `predict_report.csv` beside the submission says which studies fell "
        "back to the class prior, and why.\n"
    )


def _bundle_install(wheel: Path | None, version: str, dependencies: Sequence[str]) -> str:
    """The README's install paragraphs for an export that bundles its dependency wheels."""
    bundled = {canonicalize_name(pin.split("==")[0]) for pin in dependencies}
    python = f"Python {sys.version_info.major}.{sys.version_info.minor}"
    where = f"{python} on {platform.system()} {platform.machine()}"
    paragraphs = [
        f"pip install --no-index --find-links $EXPORT/wheels lsdc=={version}\n```",
        f"`wheels/` holds the wheels of the {len(dependencies)} runtime dependencies of lsdc, at "
        f"the versions installed where it was exported ({where}: the notebook needs the same "
        f"Python and platform): {', '.join(dependencies)}.",
    ]
    if wheel is None:
        paragraphs.append(f"Exported with --no-wheel: add the lsdc {version} wheel to `wheels/`.")
    if not bundled >= set(TORCH_DISTRIBUTIONS):
        torch_pins = [
            pin
            for pin in runtime_requirements()
            if canonicalize_name(Requirement(pin).name) in TORCH_DISTRIBUTIONS
        ]
        paragraphs.append(
            f"It expects {' and '.join(torch_pins)} to be installed, with their own dependencies "
            "(a Kaggle GPU image has torch and torchvision); where the notebook's torch is another "
            "version, pip refuses, naming it: then export with `--with-torch`, which bundles "
            "torch, torchvision and their CUDA libraries too (gigabytes)."
        )
    return "\n\n".join(paragraphs)


# ------------------------------------------------------------------------------------ the export
EXPORT_BUSY = "lsdc train (pid {pid}) is writing this run; export it once the training has ended"


def export_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    wheel: bool = True,
    allow_unfinished: bool = False,
    with_deps: bool = False,
    with_torch: bool = False,
) -> ExportResult:
    """Write the export of ``run_dirs`` to ``out_dir`` (see the module docstring).

    Everything is written into a temporary folder beside ``out_dir`` and renamed onto it at the
    end: an interrupted export leaves no half-written folder. Each run's lock
    (``RUN/train.lock``) is held shared for the whole export: a run being trained is refused,
    and no training starts into it while it is copied.

    Args:
        run_dirs: finished run folders (lsdc train); their folder names must differ.
        out_dir: a new or empty folder.
        wheel: also build the lsdc wheel (needs lsdc's source; see :func:`source_root`).
        allow_unfinished: export the folds of an unfinished run that have weights.
        with_deps: also fetch the wheel of every runtime dependency but torch and torchvision
            (:func:`dependency_pins`) with ``pip download``, so that the notebook installs with
            no index.
        with_torch: bundle torch, torchvision and their dependencies too (implies ``with_deps``).

    Raises:
        UserError: a run being trained, an unfinished or incomplete run, two runs of the same
            name, a non-empty ``out_dir``, no source to build the wheel from, a dependency that
            is not installed, or a ``pip download`` that failed (naming the package).
    """
    out = check_output_dir(out_dir, "`out_dir`").absolute()
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out}: `out_dir` exists and is not empty; pick a new folder")
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise UserError("nothing to export: give at least one run folder in `run_dirs`")
    names = [r.resolve().name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"two runs share a folder name ({names}); export them separately")
    pins = dependency_pins(with_torch) if with_deps or with_torch else []
    with contextlib.ExitStack() as locks:
        for r in runs:
            locks.enter_context(reader_lock(r, RunDir(r).lock_name, EXPORT_BUSY))
        folds = [check_exportable(r, allow_unfinished) for r in runs]
        return _write_export(runs, names, folds, out, wheel, pins)


def _write_export(
    runs: list[Path],
    names: list[str],
    folds: list[list[FoldDir]],
    out: Path,
    wheel: bool,
    pins: list[str],
) -> ExportResult:
    version = importlib.metadata.version(DISTRIBUTION)
    requirements = runtime_requirements()
    with disk_errors(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        with disk_errors(out.parent):
            _fill_staging(runs, names, folds, staging, wheel, version, requirements, pins)
        if out.is_dir():
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    built = next((out / WHEEL_DIR).glob(f"{DISTRIBUTION}-*.whl"), None) if wheel else None
    return ExportResult(
        out_dir=out,
        runs=[out / n for n in names],
        wheel=built,
        runs_bytes=sum(folder_bytes(r) for r in runs),
        export_bytes=folder_bytes(out),
        dependencies=pins,
    )


def _fill_staging(
    runs: list[Path],
    names: list[str],
    folds: list[list[FoldDir]],
    staging: Path,
    wheel: bool,
    version: str,
    requirements: list[str],
    pins: list[str],
) -> None:
    """Write every file of the export into ``staging``."""
    if pins:
        download_wheels(pins, staging / WHEEL_DIR)
    for run, name, run_folds in zip(runs, names, folds, strict=True):
        _export_run(run, staging / name, run_folds)
    built = build_wheel(staging / WHEEL_DIR) if wheel else None
    header = f"# runtime dependencies of lsdc {version}, as pinned in its pyproject.toml\n"
    write_text_atomic(header + "\n".join(requirements) + "\n", staging / REQUIREMENTS)
    write_text_atomic(_readme(names, built, version, pins), staging / README)
