"""read_series: slice order, stack splitting, pixel values and every bad-input rule."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import (
    AXIAL,
    SAGITTAL,
    make_dataset,
    oblique,
    rotation,
    slice_pixels,
    write_stack,
)
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from lsdc.preprocessing.dicom import SeriesReadError, compact_dtype, read_series


def ranks(volume) -> list[int]:
    """True slice ranks written into row 0 of every slice by the factory."""
    return [int(v) for v in volume.array[:, 0, 0]]


def test_shuffled_files_with_gappy_instance_numbers_sort_by_position(tmp_path):
    folder = tmp_path / "s"
    truth = write_stack(folder, n_slices=6, instances=[7, 3, 9, 12, 1, 2])
    for k, t in enumerate(truth):  # names that say nothing about the order
        t["file"].rename(folder / f"img{(k * 5) % 6:03d}.dcm")
    (volume,) = read_series(folder).volumes
    assert ranks(volume) == [0, 1, 2, 3, 4, 5]
    assert volume.instance_numbers == (7, 3, 9, 12, 1, 2)
    np.testing.assert_allclose(volume.geometry.positions, [t["position"] for t in truth])
    assert volume.spacing == pytest.approx((4.0, 0.5, 0.75))
    assert volume.meta["manufacturer"] == "LSDC Test"
    assert volume.meta["field_strength"] == 1.5
    assert volume.meta["slice_thickness"] == 3.0


def test_sagittal_slices_run_right_to_left(tmp_path):
    # the sagittal normal is -x: slice k of the writer sits at decreasing x
    write_stack(tmp_path / "s", orientation=SAGITTAL, origin=(20.0, 0.0, 0.0), n_slices=5)
    (volume,) = read_series(tmp_path / "s", "Sagittal T2/STIR").volumes
    assert ranks(volume) == [4, 3, 2, 1, 0]
    assert np.all(np.diff(volume.geometry.positions[:, 0]) > 0)
    assert volume.series_description == "Sagittal T2/STIR"


def test_series_of_two_orientations_splits_into_two_stacks(tmp_path):
    folder = tmp_path / "axial"
    tilted = oblique(AXIAL, rotation("x", 12))
    write_stack(folder, n_slices=4, instances=[1, 2, 3, 4], origin=(0, 0, 0))
    write_stack(
        folder,
        n_slices=3,
        instances=[5, 6, 7],
        orientation=tilted,
        origin=(0, 0, 40),
        first_rank=10,
    )
    first, second = read_series(folder).volumes
    assert (first.instance_numbers, ranks(first)) == ((1, 2, 3, 4), [0, 1, 2, 3])
    assert (second.instance_numbers, ranks(second)) == ((5, 6, 7), [10, 11, 12])
    np.testing.assert_allclose(second.geometry.column_direction, tilted[3:], atol=1e-7)


def test_a_wide_gap_in_one_orientation_splits_but_one_missing_slice_does_not(tmp_path):
    write_stack(tmp_path / "a", n_slices=4, step=4.0, origin=(0, 0, 0), instances=[1, 2, 3, 4])
    write_stack(tmp_path / "a", n_slices=4, step=4.0, origin=(0, 0, 50), instances=[5, 6, 7, 8])
    assert [v.instance_numbers for v in read_series(tmp_path / "a").volumes] == [
        (1, 2, 3, 4),
        (5, 6, 7, 8),
    ]
    truth = write_stack(tmp_path / "b", n_slices=6)
    truth[3]["file"].unlink()
    (volume,) = read_series(tmp_path / "b").volumes
    assert volume.instance_numbers == (1, 2, 3, 5, 6)


def test_duplicate_positions_keep_the_lowest_instance(tmp_path):
    folder = tmp_path / "s"
    write_stack(folder, n_slices=3, instances=[4, 5, 6])
    write_stack(folder, n_slices=1, instances=[9], first_rank=7)  # same position as instance 4
    (volume,) = read_series(folder).volumes
    assert volume.instance_numbers == (4, 5, 6)
    assert ranks(volume) == [0, 1, 2]
    assert any("9.dcm: same position as instance 4" in w for w in volume.warnings)


def test_mixed_matrix_sizes_split_with_a_warning(tmp_path):
    folder = tmp_path / "s"
    write_stack(folder, n_slices=3, rows=16, cols=12, instances=[1, 2, 3])
    write_stack(folder, n_slices=2, rows=20, cols=20, instances=[4, 5], origin=(0, 0, 30))
    volumes = read_series(folder).volumes
    assert [v.array.shape for v in volumes] == [(3, 16, 12), (2, 20, 20)]
    assert all("2 matrix sizes (16x12, 20x20)" in " ".join(v.warnings) for v in volumes)


# ------------------------------------------------------------------------ transfer syntaxes
MR_SMALL_TWINS = [
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
]


@pytest.mark.parametrize("name", MR_SMALL_TWINS)
def test_pydicom_compressed_and_encoded_twins_decode_to_the_same_pixels(tmp_path, name):
    reference = _single(tmp_path / "ref", get_testdata_file("MR_small.dcm"))
    twin = _single(tmp_path / "twin", get_testdata_file(name))
    assert twin.meta["transfer_syntax"] != reference.meta["transfer_syntax"] or name.endswith(
        "expb.dcm"
    )
    np.testing.assert_array_equal(twin.array, reference.array)
    assert twin.array.shape == (1, 64, 64)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_stacks_we_compress_decode_to_their_uncompressed_twins(tmp_path, syntax):
    write_stack(tmp_path / "plain", n_slices=3, rows=32, cols=32)  # openjpeg needs >= 32 px
    for path in sorted((tmp_path / "plain").iterdir()):
        ds = pydicom.dcmread(path)
        ds.compress(syntax, ds.pixel_array)
        (tmp_path / "packed").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "packed" / path.name)
    (plain,) = read_series(tmp_path / "plain").volumes
    (packed,) = read_series(tmp_path / "packed").volumes
    assert packed.meta["transfer_syntax"] == syntax
    np.testing.assert_array_equal(packed.array, plain.array)


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, ImplicitVRLittleEndian])
def test_uncompressed_encodings_read_identically(tmp_path, syntax):
    write_stack(tmp_path / "le", n_slices=3)
    write_stack(tmp_path / "other", n_slices=3, transfer_syntax=syntax)
    (le,) = read_series(tmp_path / "le").volumes
    (other,) = read_series(tmp_path / "other").volumes
    np.testing.assert_array_equal(other.array, le.array)
    np.testing.assert_array_equal(other.geometry.positions, le.geometry.positions)


def test_jpeg_baseline_and_extended_decode(tmp_path):
    from PIL import Image

    pixels = (slice_pixels(1, 1, 32, 32) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    ds = make_dataset(pixels.astype(np.uint16), instance=1, position=(0, 0, 0), orientation=AXIAL)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    (tmp_path / "jpeg").mkdir()
    ds.save_as(tmp_path / "jpeg" / "1.dcm", enforce_file_format=True)
    (baseline,) = read_series(tmp_path / "jpeg").volumes
    assert np.abs(baseline.array[0].astype(int) - pixels).max() <= 8  # lossy, but close

    extended = _single(tmp_path / "ext", get_testdata_file("JPGExtended.dcm"))
    assert extended.array.shape == (1, 1024, 256)
    assert extended.array.max() > 0


# ------------------------------------------------------------------------------ pixel values
def test_rescale_is_applied_and_stays_integer_when_exact(tmp_path):
    write_stack(tmp_path / "int", n_slices=2, slope=2, intercept=-1024)
    write_stack(tmp_path / "raw", n_slices=2)
    (rescaled,) = read_series(tmp_path / "int").volumes
    (raw,) = read_series(tmp_path / "raw").volumes
    assert rescaled.array.dtype == np.int16
    assert raw.array.dtype == np.uint16  # stored pixels keep their dtype
    np.testing.assert_array_equal(rescaled.array, raw.array.astype(np.int32) * 2 - 1024)

    write_stack(tmp_path / "frac", n_slices=2, slope=0.5, intercept=0.25)
    (fractional,) = read_series(tmp_path / "frac").volumes
    assert fractional.array.dtype == np.float32
    np.testing.assert_allclose(fractional.array, raw.array * 0.5 + 0.25)


def test_monochrome1_is_inverted_over_the_stored_range(tmp_path):
    write_stack(tmp_path / "m1", n_slices=2, photometric="MONOCHROME1")
    write_stack(tmp_path / "m2", n_slices=2)
    (inverted,) = read_series(tmp_path / "m1").volumes
    (plain,) = read_series(tmp_path / "m2").volumes
    np.testing.assert_array_equal(inverted.array, 65535 - plain.array.astype(np.int64))
    assert inverted.meta["photometric_interpretation"] == "MONOCHROME1"


@pytest.mark.parametrize(
    ("lo", "hi", "integral", "dtype"),
    [
        (0, 4095, True, np.int16),
        (-1024, 3000, True, np.int16),
        (0, 65535, True, np.uint16),
        (-1, 40000, True, np.int32),
        (0, 1, False, np.float32),
    ],
)
def test_compact_dtype(lo, hi, integral, dtype):
    assert compact_dtype(lo, hi, integral) == dtype


# ------------------------------------------------------------------------- missing geometry
def test_missing_geometry_tags_fall_back_with_warnings(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    for k, instance in enumerate([3, 1, 2]):
        ds = make_dataset(
            slice_pixels(instance - 1, instance, 8, 8),
            instance=instance,
            position=None,
            orientation=None,
            pixel_spacing=None,
            slice_thickness=2.5,
        )
        ds.save_as(folder / f"f{k}.dcm", enforce_file_format=True)
    (volume,) = read_series(folder, "Sagittal T1").volumes
    text = " ".join(volume.warnings)
    assert "ImageOrientationPatient missing" in text and "sagittal default" in text
    assert "PixelSpacing missing; assumed 1 x 1 mm" in text
    assert "ImagePositionPatient missing in 3 file(s)" in text
    assert volume.geometry.pixel_spacing == (1.0, 1.0)
    np.testing.assert_allclose(volume.geometry.row_direction, SAGITTAL[:3])
    assert volume.spacing[0] == pytest.approx(2.5)
    # positions from instance numbers along -x, sorted so x increases: instance 3 first
    assert volume.instance_numbers == (3, 2, 1)


def test_missing_instance_number_comes_from_the_file_name(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    for instance in (4, 8):
        ds = make_dataset(
            slice_pixels(instance, instance, 8, 8),
            instance=None,
            position=(0, 0, instance * 3.0),
            orientation=AXIAL,
        )
        ds.save_as(folder / f"{instance}.dcm", enforce_file_format=True)
    (volume,) = read_series(folder).volumes
    assert volume.instance_numbers == (4, 8)


# --------------------------------------------------------------------------- bad input files
def test_truncated_non_image_and_non_dicom_files_are_skipped_and_named(tmp_path):
    folder = tmp_path / "s"
    write_stack(folder, n_slices=3)
    shutil.copy(get_testdata_file("MR_truncated.dcm"), folder / "90.dcm")
    shutil.copy(get_testdata_file("rtplan.dcm"), folder / "91.dcm")
    (folder / "92.dcm").write_text("not dicom at all")
    result = read_series(folder)
    (volume,) = result.volumes
    assert volume.instance_numbers == (1, 2, 3)
    problems = "\n".join(result.problems)
    assert f"{folder / '90.dcm'}: skipped: pixel data cannot be decoded" in problems
    assert f"{folder / '91.dcm'}: skipped: no pixel data (not an image)" in problems
    assert f"{folder / '92.dcm'}: skipped: not a DICOM file" in problems


def test_empty_missing_and_all_bad_folders_raise_series_read_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeriesReadError, match="empty series folder"):
        read_series(tmp_path / "empty")
    with pytest.raises(SeriesReadError, match="series folder not found"):
        read_series(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "bad" / "1.dcm")
    with pytest.raises(SeriesReadError, match=r"no readable image in 1 file\(s\).*1\.dcm"):
        read_series(tmp_path / "bad")


def _single(folder: Path, source: str):
    folder.mkdir(parents=True)
    shutil.copy(source, folder / "1.dcm")
    (volume,) = read_series(folder).volumes
    return volume


def test_file_without_preamble_or_file_meta_is_read_by_content(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    reference = ds.pixel_array
    del ds.file_meta
    ds.preamble = None
    (tmp_path / "raw").mkdir()
    ds.save_as(tmp_path / "raw" / "1.dcm", implicit_vr=False, little_endian=True)
    assert b"DICM" not in (tmp_path / "raw" / "1.dcm").read_bytes()[:200]
    (volume,) = read_series(tmp_path / "raw").volumes
    np.testing.assert_array_equal(volume.array[0], reference)


def test_degenerate_orientation_counts_as_missing(tmp_path):
    write_stack(tmp_path / "s", n_slices=2, orientation=(1.0, 0.0, 0.0, 1.0, 0.0, 0.0))
    (volume,) = read_series(tmp_path / "s", "Axial T2").volumes
    assert any("ImageOrientationPatient missing" in w for w in volume.warnings)
    np.testing.assert_array_equal(volume.geometry.column_direction, AXIAL[3:])
