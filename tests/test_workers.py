"""Worker processes start cheaply (forked where safe) and reuse their memory (docs/results.md,
"Preprocessing with workers"). Each check runs in a fresh interpreter: pytest's own process has
loaded torch and run threads, which rightly make lsdc spawn."""

from __future__ import annotations

import subprocess
import sys

import pytest

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and glibc")


def _run(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@linux_only
def test_a_process_that_showed_progress_bars_still_forks_its_workers() -> None:
    """A disabled bar (``progress=False``) and a shown one leave no monitor thread behind, so
    a second preprocess in one process (the demo, a benchmark) forks like the first."""
    code = (
        "import io, threading\n"
        "from lsdc.utils import worker_context\n"
        "from tqdm import tqdm\n"
        "for bar in (tqdm(total=2, disable=True), tqdm(total=2, file=io.StringIO())):\n"
        "    bar.update(2); bar.close()\n"
        "print(threading.active_count(), worker_context().get_start_method())"
    )
    assert _run(code) == "1 fork"


@linux_only
def test_freed_buffers_are_reused_not_faulted_in_again() -> None:
    """Five 40 MB buffers in turn (file contents as pydicom reads them; more than glibc ever
    keeps by default): without ``keep_freed_memory`` each one faults in its 10,240 pages
    afresh; with it only the first does."""
    code = (
        "import resource, sys\n"
        "from lsdc.utils import keep_freed_memory\n"
        "if sys.argv[1] == 'kept': assert keep_freed_memory()\n"
        'b"x" * (40 << 20)\n'
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        'for _ in range(4): b"x" * (40 << 20)\n'
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"
    )
    pages = (40 << 20) // 4096
    default = int(_run(code, "default"))
    kept = int(_run(code, "kept"))
    assert default >= 4 * pages * 0.9
    assert kept < pages / 10
