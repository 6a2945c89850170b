"""What ``lsdc export --with-deps`` adds to an export, with and without ``--with-torch``.

    python benchmarks/bundle_size.py

Fetches the dependency wheels exactly as the export does (``dependency_pins`` then
``download_wheels`` of ``lsdc.inference.export``, from the index pip is configured with) into a
temporary folder, once without and once with torch, and prints the number of wheels, their size
in MiB and the seconds ``pip download`` took. Nothing is kept.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from lsdc.inference.export import dependency_pins, download_wheels, folder_bytes


def main() -> None:
    for with_torch in (False, True):
        with tempfile.TemporaryDirectory(prefix="lsdc-bundle-size-") as tmp:
            pins = dependency_pins(with_torch)
            start = time.perf_counter()
            download_wheels(pins, Path(tmp) / "wheels")
            seconds = time.perf_counter() - start
            mib = folder_bytes(Path(tmp)) / 2**20
            print(f"with_torch={with_torch}: {len(pins)} wheels, {mib:.0f} MiB, {seconds:.0f} s")


if __name__ == "__main__":
    main()
