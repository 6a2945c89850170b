"""Small helpers shared by every stage: atomic file writes, JSON, output-path checks and worker
processes that die with their parent."""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lsdc.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or a kill inside the block leaves ``path`` untouched (old content or absent), never
    half-written. The temporary file lives in the same folder so the rename is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return path


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def check_input_dir(path: str | Path, what: str) -> Path:
    """Refuse, before any work, an input folder that is missing or is a file: one line naming
    ``what`` (a flag, or what the folder holds: ``"run"``) and the path, instead of a traceback
    from deep inside.

    Raises:
        UserError: the problem, naming the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: {what} is a file, not a folder")
    if not path.is_dir():
        raise UserError(f"{path}: {what} folder not found")
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse, before any work, an output file path that cannot be written: an existing folder,
    or a parent that is a file or not writable (one line naming ``flag`` and the path).

    Raises:
        UserError: the problem, naming the path.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: {flag} is a folder; give the path of a file")
    _check_writable_ancestor(path.parent, flag, path)
    return path


def check_output_dir(path: str | Path, flag: str) -> Path:
    """Refuse, before any work, an output folder that cannot be written: an existing file, or a
    folder (or its nearest existing parent) that is not writable.

    Raises:
        UserError: the problem, naming the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: {flag} is a file, not a folder")
    _check_writable_ancestor(path, flag, path)
    return path


def _check_writable_ancestor(folder: Path, flag: str, target: Path) -> None:
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{target}: {flag} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{target}: {flag} cannot be written: {existing} is read-only")


_PR_SET_PDEATHSIG = 1


def worker_context() -> multiprocessing.context.BaseContext:
    """How lsdc starts worker processes: ``fork`` where it is safe, else ``spawn``.

    A spawned worker starts a fresh interpreter and imports numpy, pandas and pydicom again
    (0.6 s a worker here), which at 0.05 s a competition-size study is most of what a second
    worker gains over 50 studies; a forked one starts in milliseconds. Forking is safe on Linux
    while this process runs one thread and has not loaded torch (whose OpenMP and CUDA state a
    child would inherit half-held); a progress bar's monitor thread, a loaded torch or another
    platform gets ``spawn``.
    """
    if (
        sys.platform.startswith("linux")
        and threading.active_count() == 1
        and "torch" not in sys.modules
    ):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def init_worker(parent_pid: int) -> None:
    """Initializer of every worker process lsdc starts: the worker dies with its parent.

    On Linux the kernel sends SIGKILL to the worker when the parent dies, however it dies
    (``kill -9`` included), so no orphan goes on writing into a cache; a parent already gone
    when the worker starts ends it at once. Ctrl-C is left to the parent, which cancels the work
    not started and waits for the running tasks.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:
        os._exit(1)
