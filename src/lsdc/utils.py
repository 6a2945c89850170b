"""Small helpers shared by every stage: atomic file writes, JSON, output-path checks and worker
processes that die with their parent."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lsdc.errors import MachineError, UserError

tqdm.monitor_interval = 0
"""No tqdm monitor thread (it only tunes ``miniters`` for bars that stall): a process that
has shown a progress bar still runs one thread, so :func:`worker_context` may fork."""

DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
}
"""The write failures that are the disk's, not lsdc's nor the data's."""
_MACHINE_ERRNOS = {*DISK_ERRNOS, errno.ENOMEM, errno.EIO, errno.EMFILE, errno.ENFILE}
_NEARLY_FULL = 1 << 20
"""Free bytes under which a write error that names no cause is the disk's: numpy's short write
(``OSError`` without errno) and ``torch.save``'s ``RuntimeError: unexpected pos`` say no more."""


class DiskError(MachineError):
    """A write the disk refused (full, over quota, read-only), naming the folder being written."""


def free_bytes(folder: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``folder`` (or of its
    nearest existing parent)."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    stats = os.statvfs(existing)
    return stats.f_bavail * stats.f_frsize


def disk_error(exc: BaseException, folder: Path, needed: int | None = None) -> DiskError | None:
    """The one-line error for ``exc`` met while writing under ``folder``, when the disk caused
    it (see DISK_ERRNOS; an error without a cause on a nearly full disk too); else None."""
    code = getattr(exc, "errno", None)
    if code not in DISK_ERRNOS:
        if not isinstance(exc, (OSError, RuntimeError)):
            return None
        try:
            if free_bytes(folder) >= max(needed or 0, _NEARLY_FULL):
                return None
        except OSError:
            return None
        code = errno.ENOSPC
    detail = ""
    if code != errno.EROFS:
        with contextlib.suppress(OSError):
            free = free_bytes(folder)
            detail = f"; {_mb(needed)} needed, {_mb(free)} free" if needed else ""
            detail = detail or f"; {_mb(free)} free"
    return DiskError(f"{folder}: {DISK_ERRNOS[code]} while writing there{detail}")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


@contextlib.contextmanager
def disk_errors(folder: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a write the disk refuses inside the block into a :class:`DiskError` naming
    ``folder`` (and ``needed`` bytes when known), instead of a traceback naming some file (or
    torch's ``unexpected pos``)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        error = disk_error(exc, Path(folder), needed)
        if error is None:
            raise
        raise error from exc


def is_machine_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine's failure (memory, disk, permission, a busy folder), not a
    verdict on the data being read: such a failure is raised, never recorded against a file."""
    if isinstance(exc, (MemoryError, PermissionError, MachineError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _MACHINE_ERRNOS


@contextlib.contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or a kill inside the block leaves ``path`` untouched (old content or absent), never
    half-written. The temporary file lives in the same folder so the rename is atomic. A write
    the disk refuses is a :class:`DiskError` naming the folder (``needed``: the bytes the file
    takes, when known).
    """
    path = Path(path)
    with disk_errors(path.parent, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with disk_errors(path.parent, needed):  # asked while the partial file still fills the disk
            yield tmp
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_files() -> Iterator[Callable[[str | Path], Path]]:
    """Publish several files together or none of them: ``stage(path)`` gives a temporary path
    beside ``path`` (as :func:`atomic_path`); they are renamed into place one after another
    when the block succeeds, and all removed when it fails (a full disk at the last file leaves
    the first ones as they were, so files that describe each other never disagree)."""
    with contextlib.ExitStack() as stack:
        yield lambda path: stack.enter_context(atomic_path(path))


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON lsdc writes (numpy scalars and arrays, paths included)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj))
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
    ``what`` (the API parameter, in backticks as messages write it: ``"`data_root`"``, or
    what the folder holds: ``"run"``) and the path, instead of a traceback
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


def check_output_file(path: str | Path, param: str) -> Path:
    """Refuse, before any work, an output file path that cannot be written: an existing folder,
    or a parent that is a file or not writable (one line naming ``param``, the API parameter that
    named it (``"`out_path`"``; the CLI shows its flag), and the path).

    Raises:
        UserError: the problem, naming the path.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: {param} is a folder; give the path of a file")
    _check_writable_ancestor(path.parent, param, path)
    return path


def check_output_dir(path: str | Path, param: str) -> Path:
    """Refuse, before any work, an output folder that cannot be written: an existing file, or a
    folder (or its nearest existing parent) that is not writable.

    Raises:
        UserError: the problem, naming the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: {param} is a file, not a folder")
    _check_writable_ancestor(path, param, path)
    return path


def _check_writable_ancestor(folder: Path, param: str, target: Path) -> None:
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{target}: {param} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{target}: {param} cannot be written: {existing} is read-only")


class FolderBusyError(MachineError):
    """Another process holds a folder's writer lock (:func:`writer_lock`)."""


@contextlib.contextmanager
def writer_lock(
    folder: Path, name: str, param: str, busy: str, error: type[UserError] = FolderBusyError
) -> Iterator[None]:
    """Hold the writer lock of ``folder`` (``flock`` on the file ``name`` in it) for the block.

    One writer per folder (a cache, a run): a second one refuses at once, naming the pid of the
    holder, before it touches anything. The lock file holds the holder's pid and is emptied when
    the block ends; a process killed inside it leaves its pid in the file but no lock (the
    kernel drops it), so no stale lock ever needs removing.

    Args:
        folder: the folder to lock (created if missing).
        name: the lock file's name in it.
        param: the API parameter that named the folder (``"`cache_dir`"``), for the messages.
        busy: the refusal after ``{folder}: ``, with ``{pid}`` where the holder's pid goes.
        error: the exception type of the refusal.

    Raises:
        UserError: the folder is a file or cannot be written.
        FolderBusyError: (or ``error``) another process holds the lock.
    """
    check_output_dir(folder, param)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"{folder}: {param} cannot be written ({exc.strerror})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error(f"{folder}: {busy.format(pid=_lock_holder(fd))}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def reader_lock(folder: Path, name: str, busy: str) -> Iterator[None]:
    """Hold a shared lock on the writer lock of ``folder`` for the block: refuse at once while a
    writer (:func:`writer_lock`) holds it, and keep any writer out until the block ends.

    Reads only: a folder without the lock file has never had a writer lock, so nobody writes it.

    Raises:
        FolderBusyError: a writer holds the lock (``busy`` as in :func:`writer_lock`).
    """
    try:
        fd = os.open(folder / name, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusyError(f"{folder}: {busy.format(pid=_lock_holder(fd))}") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """The pid a writer left in its lock file ("unknown" while only readers hold it)."""
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"


_PR_SET_PDEATHSIG = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEPT_HEAP_BYTES = 64 << 20
"""Freed buffers up to this size stay in the process's heap (:func:`keep_freed_memory`)."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or ``taskset``'s limit),
    not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity call
        return os.cpu_count() or 1


def worker_context() -> multiprocessing.context.BaseContext:
    """How lsdc starts worker processes: ``fork`` where it is safe, else ``spawn``.

    A spawned worker starts a fresh interpreter and imports numpy, pandas and pydicom again
    (0.6 s a worker here), which at 0.05 s a competition-size study is most of what a second
    worker gains over 50 studies; a forked one starts in milliseconds. Forking is safe on Linux
    while this process runs one thread and has not loaded torch (whose OpenMP and CUDA state a
    child would inherit half-held; lsdc's progress bars start no thread, see ``tqdm`` above); a
    caller's threads, a loaded torch or another platform gets ``spawn``.
    """
    if (
        sys.platform.startswith("linux")
        and threading.active_count() == 1
        and "torch" not in sys.modules
    ):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed buffers of up to :data:`KEPT_HEAP_BYTES` (and keep up
    to twice that free at the top of the heap) instead of unmapping them; returns False where
    the C library has no ``mallopt`` (not glibc).

    Decoding a series allocates and frees a buffer per file and one per stack (0.3-40 MB).
    glibc's default maps the larger ones fresh and unmaps them when freed, so every series
    faults in pages the kernel must first zero: 16,000 page faults per 4 competition studies,
    15-20% of a preprocessing worker's CPU, and the work that scales worst across cores on a
    virtual machine (docs/results.md, "Preprocessing with workers"). With this, a worker's
    heap stays at its peak (one series, ~1.4x its decoded bytes) and is reused.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    kept = mallopt(_M_MMAP_THRESHOLD, KEPT_HEAP_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, 2 * KEPT_HEAP_BYTES) == 1 and kept


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
