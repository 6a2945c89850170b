"""A file that lies about its size costs what its bytes are worth (docs/reliability.md): the
declared pixel size is checked against a per-file limit and against what the compressed bytes
can hold before anything is decoded; a PixelSpacing of zero is named as such."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pydicom
import pytest
from dicom_factory import write_stack
from pydicom.uid import RLELossless

from lsdc.preprocessing import dicom as dicom_module
from lsdc.preprocessing.dicom import MAX_DECODED_BYTES, read_series


def lie_about_size(path, rows: int, columns: int, compress: bool) -> None:
    """Rewrite one file of a stack so that its header declares ``rows`` x ``columns``."""
    ds = pydicom.dcmread(path)
    if compress:
        ds.compress(RLELossless, ds.pixel_array)
    ds.Rows, ds.Columns = rows, columns
    ds.save_as(path)


@pytest.mark.parametrize("compress", [True, False])
def test_a_small_file_declaring_40000_squared_pixels_is_refused_before_decoding(tmp_path, compress):
    write_stack(tmp_path, n_slices=4, rows=32, cols=32)
    liar = tmp_path / "2.dcm"
    lie_about_size(liar, 40000, 40000, compress)
    assert liar.stat().st_size < 16 << 10
    tracemalloc.start()
    started = time.perf_counter()
    result = read_series(tmp_path)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 5 and peak < 64 << 20, (seconds, peak)
    (problem,) = result.problems
    assert problem.startswith(f"{liar}: skipped: declares 40000 x 40000 x 1 frame(s) x 2 byte(s)")
    assert f"over the limit of {MAX_DECODED_BYTES >> 20} MB per file" in problem
    assert [v.array.shape for v in result.volumes] == [(3, 32, 32)]


def test_a_compressed_file_declaring_more_than_its_bytes_can_hold_is_refused(tmp_path):
    write_stack(tmp_path, n_slices=3, rows=32, cols=32)
    liar = tmp_path / "1.dcm"
    lie_about_size(liar, 4096, 4096, compress=True)  # 32 MB, under the per-file limit
    (problem,) = read_series(tmp_path).problems
    assert "declares 4096 x 4096 x 1 frame(s) x 2 byte(s) = 32 MB of pixels in" in problem
    assert f"more than {dicom_module.MAX_EXPANSION} times them" in problem


def test_compressed_files_of_honest_sizes_still_decode(tmp_path):
    write_stack(tmp_path / "plain", n_slices=2, rows=512, cols=512)
    (tmp_path / "packed").mkdir()
    for path in sorted((tmp_path / "plain").iterdir()):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless, np.zeros_like(ds.pixel_array))  # 512 KB to a few hundred bytes
        ds.save_as(tmp_path / "packed" / path.name)
    result = read_series(tmp_path / "packed")
    assert not result.problems and result.volumes[0].array.shape == (2, 512, 512)


@pytest.mark.parametrize(("spacing", "named"), [((0.0, 0.5), "[0.0, 0.5] is not positive")])
def test_a_pixel_spacing_of_zero_is_named_as_such(tmp_path, spacing, named):
    write_stack(tmp_path, n_slices=3, pixel_spacing=spacing)
    (volume,) = read_series(tmp_path).volumes
    assert any(f"PixelSpacing {named}; assumed 1 x 1 mm" in w for w in volume.warnings)
    write_stack(tmp_path / "negative", n_slices=3, pixel_spacing=(-0.5, 0.5))
    (volume,) = read_series(tmp_path / "negative").volumes
    assert any("PixelSpacing [-0.5, 0.5] is not positive" in w for w in volume.warnings)
