"""lsdc synth: a competition root that a loader for the real folder reads, with a known answer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from lsdc.cli import main
from lsdc.contract import (
    CONDITIONS,
    LABEL_COLUMNS,
    LEVELS,
    PRED_COLUMNS,
    SEVERITIES,
    labels_to_indices,
    labels_to_solution,
    load_label_coordinates,
    load_sample_submission,
    load_series_descriptions,
    load_solution,
    load_train_labels,
)
from lsdc.errors import UserError
from lsdc.evaluation.metric import official_score
from lsdc.synth import (
    ANSWER_FILES,
    REALISM_RATES,
    SynthConfig,
    generator,
    phantom,
    synthesize,
    tissues,
)
from lsdc.synth import labels as synth_labels
from lsdc.synth.generator import COMPETITION_MATRICES, COMPETITION_PIXEL_MM, _plan_series

COMPETITION_FILES = {
    "train.csv",
    "train_label_coordinates.csv",
    "train_series_descriptions.csv",
    "test_series_descriptions.csv",
    "sample_submission.csv",
    "train_images",
    "test_images",
}
SPEC_FREQUENCIES = {  # the spec's table: Normal/Mild, Moderate, Severe
    "spinal_canal_stenosis": (0.878, 0.075, 0.048),
    "neural_foraminal_narrowing": (0.78, 0.18, 0.04),
    "subarticular_stenosis": (0.714, 0.191, 0.095),
}

SMALL = SynthConfig(train_studies=3, test_studies=2, seed=11, image_size=32, slices=8)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("small") / "root", SMALL, progress=False)


@pytest.fixture(params=["default", "competition"])
def contract_root(request: pytest.FixtureRequest) -> tuple[Path, SynthConfig]:
    """A root of each size profile, with the config that wrote it: both must pass every
    data-contract check."""
    if request.param == "default":
        return request.getfixturevalue("small_root"), SMALL
    return request.getfixturevalue("competition_root"), request.getfixturevalue(
        "competition_config"
    )


@pytest.fixture(scope="module")
def default_geometry_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough pixels (48 px) to see the anatomy; realism on (oblique planes, varied matrices)."""
    config = SynthConfig(
        train_studies=4, test_studies=0, seed=5, image_size=48, slices=10, oblique_rate=1.0,
        coordinate_error_rate=0.0,
    )  # fmt: skip
    return synthesize(tmp_path_factory.mktemp("geometry") / "root", config, progress=False)


@pytest.fixture(params=["default", "competition"])
def geometry_root(request: pytest.FixtureRequest) -> Path:
    """Each size profile's root: the coordinates must point at the anatomy in both (the
    competition profile's thick, interpolated slices included)."""
    return request.getfixturevalue(
        "default_geometry_root" if request.param == "default" else "competition_root"
    )


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_identical_bytes(small_root: Path, tmp_path: Path) -> None:
    again = synthesize(tmp_path / "again", SMALL, progress=False)
    assert _tree_hashes(again) == _tree_hashes(small_root)


def test_other_seed_gives_other_data(small_root: Path, tmp_path: Path) -> None:
    other = synthesize(tmp_path / "other", dataclasses.replace(SMALL, seed=12), False)
    assert (other / "train.csv").read_bytes() != (small_root / "train.csv").read_bytes()


# --------------------------------------------------------------------------------- layout and CSVs
def test_root_holds_the_competition_files_and_the_answer_only(contract_root) -> None:
    root, _ = contract_root
    assert {p.name for p in root.iterdir()} == COMPETITION_FILES | set(ANSWER_FILES)


def test_every_csv_reads_through_the_contract_loaders(contract_root) -> None:
    small_root, config = contract_root
    labels = load_train_labels(small_root / "train.csv")
    assert len(labels) == config.train_studies
    coordinates = load_label_coordinates(small_root / "train_label_coordinates.csv")
    assert set(coordinates["study_id"]) <= set(labels["study_id"])
    sample = load_sample_submission(small_root / "sample_submission.csv")
    test_series = load_series_descriptions(small_root / "test_series_descriptions.csv")
    assert len(sample) == 25 * config.test_studies
    assert set(test_series["study_id"]) == {int(r.split("_")[0]) for r in sample["row_id"]}
    assert np.allclose(sample[list(PRED_COLUMNS)].to_numpy(), 1 / 3)
    solution = load_solution(small_root / "solution_test.csv")
    assert set(solution["row_id"]) <= set(sample["row_id"])
    for split in ("train", "test"):
        oracle = pd.read_csv(small_root / f"oracle_{split}.csv")
        assert list(oracle.columns) == ["row_id", *PRED_COLUMNS]
        assert np.allclose(oracle[list(PRED_COLUMNS)].sum(axis=1), 1.0)
    oracle_ids = pd.read_csv(small_root / "oracle_train.csv")["row_id"]
    assert len(oracle_ids) == 25 * config.train_studies


def test_series_csv_matches_the_image_folders(contract_root) -> None:
    small_root, _ = contract_root
    for split in ("train", "test"):
        table = load_series_descriptions(small_root / f"{split}_series_descriptions.csv")
        listed = {
            (int(s), int(r)) for s, r in zip(table["study_id"], table["series_id"], strict=True)
        }
        on_disk = {
            (int(p.parent.name), int(p.name)) for p in (small_root / f"{split}_images").glob("*/*")
        }
        assert listed == on_disk
        assert all(
            any((small_root / f"{split}_images" / f"{s}/{r}").glob("*.dcm")) for s, r in listed
        )


def test_ids_look_like_the_real_ones(contract_root) -> None:
    small_root, _ = contract_root
    table = pd.concat(
        load_series_descriptions(small_root / f"{s}_series_descriptions.csv")
        for s in ("train", "test")
    )
    ids = np.concatenate([table["study_id"].unique(), table["series_id"].to_numpy()])
    assert (ids >= 10**6).all() and (ids < 10**10).all()
    assert table["series_id"].is_unique


# ------------------------------------------------------------------------------------------ DICOM
def test_dicom_files_are_valid_mr_with_the_geometry_tags(contract_root) -> None:
    small_root, _ = contract_root
    table = load_series_descriptions(small_root / "train_series_descriptions.csv")
    for study_id, series_id, description in table.itertuples(index=False):
        files = sorted((small_root / "train_images" / str(study_id) / str(series_id)).glob("*.dcm"))
        for path in files:
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.Modality == "MR"
            # The CSV keeps the competition's description; the tag is the site's own name for
            # its protocol, and the protocol's timings are tagged (TI on STIR only).
            protocol = generator._protocol_of(
                generator.Series(
                    0, description, "STIR" if "IR" in ds.ScanningSequence else "T2", []
                )
            )
            assert ds.SeriesDescription in generator.SERIES_TAGS[ds.Manufacturer][protocol]
            low, high = tissues.PROTOCOLS[protocol].repetition
            assert low <= float(ds.RepetitionTime) <= high and float(ds.EchoTime) > 0
            assert ("InversionTime" in ds) == (protocol == "sagittal_stir")
            assert float(ds.MagneticFieldStrength) in (1.5, 3.0)
            assert int(ds.InstanceNumber) == int(path.stem)
            for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
                assert tag in ds, f"{path} lacks {tag}"
            assert float(ds.SliceThickness) > 0
            assert ds.BitsAllocated == 16 and ds.PhotometricInterpretation == "MONOCHROME2"
            pixels = ds.pixel_array
            assert pixels.dtype == np.uint16 and pixels.shape == (ds.Rows, ds.Columns)
            assert pixels.std() > 0
            normal = np.cross(*np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3)))
            main_axis = int(np.argmax(np.abs(normal)))
            assert main_axis == (2 if description == "Axial T2" else 0)


def test_clean_config_gives_regular_series(tmp_path: Path) -> None:
    config = SynthConfig(train_studies=2, test_studies=1, image_size=24, slices=5).without_realism()
    root = synthesize(tmp_path / "clean", config, progress=False)
    table = load_series_descriptions(root / "train_series_descriptions.csv")
    assert sorted(table["series_description"]) == sorted(
        ["Sagittal T1", "Sagittal T2/STIR", "Axial T2"] * 2
    )
    for study_id, series_id, description in table.itertuples(index=False):
        series = _read_series(root / "train_images" / str(study_id) / str(series_id))
        series.sort(key=lambda d: int(d.InstanceNumber))
        assert [int(d.InstanceNumber) for d in series] == list(range(1, len(series) + 1))
        iop = np.asarray(series[0].ImageOrientationPatient, float)
        expected = [1, 0, 0, 0, 1, 0] if description == "Axial T2" else [0, 1, 0, 0, 0, -1]
        assert np.allclose(iop, expected)
        normal = np.cross(iop[:3], iop[3:])
        along = np.array([np.asarray(d.ImagePositionPatient, float) @ normal for d in series])
        step = float(series[0].SpacingBetweenSlices)
        assert np.allclose(np.abs(np.diff(along)), step, atol=1e-3)  # instance order = slice order
        x_or_z = np.array(
            [float(d.ImagePositionPatient[2 if "Axial" in description else 0]) for d in series]
        )
        assert np.all(np.diff(x_or_z) > 0)  # sagittal: patient right to left; axial: upwards
    assert load_train_labels(root / "train.csv")[list(LABEL_COLUMNS)].notna().all().all()


def test_realism_switches_change_what_they_name(tmp_path: Path) -> None:
    config = dataclasses.replace(
        SynthConfig(train_studies=3, test_studies=0, image_size=20, slices=4).without_realism(),
        instance_gap_rate=1.0,
        missing_spacing_rate=1.0,
        two_axial_series_rate=1.0,
        unlabelled_rate=1.0,
    )
    root = synthesize(tmp_path / "real", config, progress=False)
    table = load_series_descriptions(root / "train_series_descriptions.csv")
    assert (table.groupby("study_id")["series_description"].apply(list).map(
        lambda d: d.count("Axial T2")) == 2).all()  # fmt: skip
    for study_id, series_id, _ in table.itertuples(index=False):
        series = _read_series(root / "train_images" / str(study_id) / str(series_id))
        assert min(int(d.InstanceNumber) for d in series) > 1
        assert not any("SpacingBetweenSlices" in d for d in series)
    labels = load_train_labels(root / "train.csv")
    assert labels[list(LABEL_COLUMNS)].isna().any(axis=1).all()
    coordinates = load_label_coordinates(root / "train_label_coordinates.csv")
    labelled = labels.set_index("study_id")
    for row in coordinates.itertuples():
        assert isinstance(labelled.loc[row.study_id, f"{row.condition_key}_{row.level_key}"], str)


def test_multi_stack_axial_series_holds_two_orientations(tmp_path: Path) -> None:
    config = dataclasses.replace(
        SynthConfig(train_studies=1, test_studies=0, image_size=20, slices=4).without_realism(),
        multi_stack_axial_rate=1.0,
    )
    root = synthesize(tmp_path / "stacks", config, progress=False)
    table = load_series_descriptions(root / "train_series_descriptions.csv")
    axial = table[table["series_description"] == "Axial T2"]
    assert len(axial) == 1
    series = _read_series(root / "train_images" / str(axial.iloc[0, 0]) / str(axial.iloc[0, 1]))
    orientations = {
        tuple(np.round(np.asarray(d.ImageOrientationPatient, float), 3)) for d in series
    }
    assert len(orientations) == 2


# --------------------------------------------------------------------------------------- geometry
class _Slice:
    """One DICOM slice's tags: pixel (x = column, y = row) <-> patient mm."""

    def __init__(self, ds: pydicom.Dataset) -> None:
        iop = np.asarray(ds.ImageOrientationPatient, float)
        self.row, self.col = iop[:3], iop[3:]
        self.normal = np.cross(self.row, self.col)
        self.origin = np.asarray(ds.ImagePositionPatient, float)
        self.spacing = np.asarray(ds.PixelSpacing, float)  # (between rows, between columns)
        self.pixels = ds.pixel_array.astype(float)

    def to_patient(self, x: float, y: float) -> np.ndarray:
        return self.origin + x * self.spacing[1] * self.row + y * self.spacing[0] * self.col

    def to_pixel(self, point: np.ndarray) -> tuple[float, float, float]:
        d = point - self.origin
        return d @ self.row / self.spacing[1], d @ self.col / self.spacing[0], abs(d @ self.normal)


def _nearest_slice(folder: Path, point: np.ndarray) -> tuple[_Slice, float, float, float]:
    best = None
    for path in folder.glob("*.dcm"):
        s = _Slice(pydicom.dcmread(path))
        x, y, distance = s.to_pixel(point)
        if best is None or distance < best[3]:
            best = (s, x, y, distance)
    assert best is not None
    return best


def _points(root: Path) -> pd.DataFrame:
    """Every labelled coordinate mapped to patient space through its own series' tags."""
    coordinates = load_label_coordinates(root / "train_label_coordinates.csv")
    points = []
    for row in coordinates.itertuples():
        path = root / "train_images" / f"{row.study_id}/{row.series_id}/{row.instance_number}.dcm"
        points.append(_Slice(pydicom.dcmread(path)).to_patient(row.x, row.y))
    coordinates[["px", "py", "pz"]] = np.array(points)
    return coordinates


def test_findings_of_one_level_agree_across_series_in_patient_space(geometry_root: Path) -> None:
    points = _points(geometry_root)
    for (_, level), group in points.groupby(["study_id", "level_key"]):
        by = group.set_index("condition_key")[["px", "py", "pz"]]
        if "spinal_canal_stenosis" not in by.index:
            continue
        canal = by.loc["spinal_canal_stenosis"].to_numpy()
        for condition, point in by.iterrows():
            offset = point.to_numpy() - canal
            # Same disc (z) whichever series the point was marked on (a foramen's keyhole lies
            # above its disc, beside the body above); left = +x, right = -x.
            assert abs(offset[2]) < (13.0 if "foraminal" in condition else 7.0), (level, offset)
            if condition.startswith("left_"):
                assert 3.0 < offset[0] < 30.0, (level, condition, offset)
            elif condition.startswith("right_"):
                assert -30.0 < offset[0] < -3.0, (level, condition, offset)
    # Levels run from superior (L1/L2) to inferior (L5/S1).
    canal = points[points["condition_key"] == "spinal_canal_stenosis"]
    for _, group in canal.groupby("study_id"):
        z = group.set_index("level_key").loc[
            [lv for lv in LEVELS if lv in set(group["level_key"])], "pz"
        ]
        assert np.all(np.diff(z.to_numpy()) < -20.0)


def test_canal_point_maps_onto_the_canal_of_the_axial_series(geometry_root: Path) -> None:
    """A mid-sagittal canal point, through the tags alone, lands on bright CSF on Axial T2."""
    points = _points(geometry_root)
    oracle = pd.read_csv(geometry_root / "oracle_train.csv").set_index("row_id")
    table = load_series_descriptions(geometry_root / "train_series_descriptions.csv")
    checked = 0
    for row in points[points["condition_key"] == "spinal_canal_stenosis"].itertuples():
        if (
            oracle.loc[f"{row.study_id}_spinal_canal_stenosis_{row.level_key}", "normal_mild"]
            < 0.99
        ):
            continue  # a narrowed canal is not bright; check the open ones
        axial = table[
            (table["study_id"] == row.study_id) & (table["series_description"] == "Axial T2")
        ]
        point = np.array([row.px, row.py, row.pz])
        candidates = [
            _nearest_slice(geometry_root / "train_images" / f"{row.study_id}/{sid}", point)
            for sid in axial["series_id"]
        ]
        if not candidates:
            continue
        s, x, y, distance = min(candidates, key=lambda c: c[3])
        if distance > 4.0:
            continue  # no axial slice through this disc
        value = s.pixels[int(round(y)), int(round(x))]
        assert value > np.percentile(s.pixels, 75), (row.study_id, row.level_key)
        checked += 1
    assert checked >= 5


def test_coordinates_point_at_visible_findings(geometry_root: Path) -> None:
    """At an open finding's coordinate the grading image shows the space that narrows:
    bright CSF (canal, T2) or bright fat (foramen, T1)."""
    points = _points(geometry_root)
    oracle = pd.read_csv(geometry_root / "oracle_train.csv").set_index("row_id")
    checked = 0
    for row in points.itertuples():
        if "subarticular" in row.condition_key:
            continue
        rid = f"{row.study_id}_{row.condition_key}_{row.level_key}"
        if oracle.loc[rid, "normal_mild"] < 0.99:
            continue
        path = (
            geometry_root
            / "train_images"
            / f"{row.study_id}/{row.series_id}/{row.instance_number}.dcm"
        )
        pixels = pydicom.dcmread(path).pixel_array.astype(float)
        # The brightest of the 3 x 3 pixels at the point: at 48 px (4.4 mm pixels) a foramen's
        # fat keyhole is about one pixel, partial volume included.
        r, c = int(round(row.y)), int(round(row.x))
        value = pixels[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2].max()
        assert value > np.percentile(pixels, 75), rid
        checked += 1
    assert checked >= 5 * len(load_train_labels(geometry_root / "train.csv"))


# ---------------------------------------------------------------------------------- size profiles
COMMITTED_SWITCHES = (
    "missing_series_rate", "two_axial_series_rate", "multi_stack_axial_rate", "instance_gap_rate",
    "unordered_instances_rate", "oblique_rate", "matrix_variation_rate", "missing_spacing_rate",
    "unlabelled_rate",
)  # fmt: skip
"""The realism switches the generator had when the pinned output below was taken."""


PINNED_OUTPUT = Path(__file__).parent / "data" / "synth_default_5047459.npz"
"""What commit 5047459's generator (before ``--profile``) wrote for the config below: every CSV's
columns, every DICOM's header elements and pixels, as ``synth_fingerprint`` reads them (taken
2026-12-01 from a worktree of that commit: ``synth_fingerprint(synthesize(...))`` saved with
``np.savez_compressed``)."""

NUMERIC_VRS = {"DS", "IS", "FD", "FL", "US", "UL", "SS", "SL"}


def synth_fingerprint(root: Path) -> dict[str, np.ndarray]:
    """A synthetic root as arrays that survive a change of CPU: the generator's floats may round
    differently in the last bit on another machine (AVX2 or AVX-512 paths), so bytes cannot be
    pinned across machines; values can, within a tolerance. Per file: ``text`` (names and
    non-numeric values), ``numbers`` (numeric values), ``pixels`` (DICOM only)."""
    entries: dict[str, np.ndarray] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        text, numbers = [], []
        if path.suffix == ".csv":
            frame = pd.read_csv(path)
            for column in frame.columns:
                values = frame[column].to_numpy()
                if values.dtype.kind in "fiub":
                    text.append(column)
                    numbers.extend(values.astype(float))
                else:
                    text.extend([column, *values.astype(str)])
        elif path.suffix == ".dcm":
            dataset = pydicom.dcmread(path)
            entries[f"{name}|pixels"] = dataset.pixel_array.astype(np.int32)
            for element in dataset:
                if element.keyword in ("PixelData", "") or element.VR == "SQ":
                    continue
                value = element.value
                values = list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]
                if element.VR in NUMERIC_VRS:
                    text.append(element.keyword)
                    numbers.extend(float(v) for v in values)
                else:
                    text.append(f"{element.keyword}={'|'.join(str(v) for v in values)}")
        else:
            text.append(hashlib.sha256(path.read_bytes()).hexdigest())
        entries[f"{name}|text"] = np.asarray(text, dtype=str)
        entries[f"{name}|numbers"] = np.asarray(numbers, dtype=float)
    return entries


def test_default_profile_writes_what_it_wrote_before_profiles_existed(tmp_path: Path) -> None:
    """The demo's data did not move when the competition profile came: every file, column,
    header element and pixel of the generator's output before it (realism switches added since
    are set to 0, their own tests cover them), to the last bit's rounding (pixels within 1)."""
    newer = {name: 0.0 for name in REALISM_RATES if name not in COMMITTED_SWITCHES}
    config = SynthConfig(
        train_studies=3, test_studies=1, seed=4, image_size=24, slices=6,
        two_axial_series_rate=0.3, multi_stack_axial_rate=0.3, matrix_variation_rate=0.5,
        missing_series_rate=0.2, phantom="simple", **newer,
    )  # fmt: skip
    written = synth_fingerprint(synthesize(tmp_path / "pin", config, False))
    assert_matches_pin(written, PINNED_OUTPUT, lambda moved: moved.max() <= 1)


def assert_matches_pin(written: dict[str, np.ndarray], pin: Path, pixels_close) -> None:
    """Every entry of a fingerprint as pinned: text exactly, numbers to 1e-6, pixels as
    ``pixels_close(|written - pinned|)`` allows."""
    with np.load(pin) as pinned:
        assert sorted(written) == sorted(pinned.files)
        for key in pinned.files:
            expected, actual = pinned[key], written[key]
            assert expected.shape == actual.shape, key
            if key.endswith("|pixels"):
                assert pixels_close(np.abs(actual - expected)), key
            elif expected.dtype.kind == "f":
                assert np.allclose(actual, expected, rtol=1e-6, atol=1e-6, equal_nan=True), key
            else:
                assert (actual == expected).all(), key


ANATOMICAL_PIN = Path(__file__).parent / "data" / "synth_anatomical.npz"
"""What the anatomical phantom wrote for ANATOMICAL_PIN_CONFIG when it landed (issue 20):
``synth_fingerprint(synthesize(...))`` saved with ``np.savez_compressed``. A change to the
phantom that moves its output must say so by re-pinning (and re-measuring the demo)."""
ANATOMICAL_PIN_CONFIG = SynthConfig(
    train_studies=2, test_studies=1, seed=4, image_size=32, slices=6, motion_ghost_rate=0.5,
    wrap_rate=0.5, label_error_rate=0.2, coordinate_error_rate=0.2,
)  # fmt: skip


def test_anatomical_phantom_writes_what_it_wrote_when_pinned(tmp_path: Path) -> None:
    """Every file, column and header element as pinned; pixels to the last bit's rounding on
    another CPU: a sample that lands on a shape's boundary may fall on its other side, so a
    few pixels per thousand may move by more than one."""
    written = synth_fingerprint(synthesize(tmp_path / "pin", ANATOMICAL_PIN_CONFIG, False))
    assert_matches_pin(
        written, ANATOMICAL_PIN, lambda moved: (moved > 1).mean() < 0.003 and moved.mean() < 0.05
    )


def test_competition_profile_draws_the_real_sets_sizes() -> None:
    """Over 300 planned studies (nothing rendered): matrices 320-1024, most <= 512; pixel
    spacing 0.3-0.9 mm; sagittal series of 15-22 slices 3-4.5 mm apart; Axial T2 in one to three
    stacks of 15-60 slices, about half of the split ones tilted to their discs; about 75 files
    and 18-25 MB a study, as in the real training set."""
    config = SynthConfig(profile="competition")
    plans = []
    for i in range(300):
        rng = np.random.default_rng([0, i])
        anatomy = phantom.draw_anatomy(rng, np.full(25, 0.2))
        plans.append(_plan_series(rng, config, anatomy, np.arange(10**6, 10**6 + 5)))
    stacks = [(s.description, st) for plan in plans for s in plan for st in s.stacks]
    matrices = np.array([st.rows for _, st in stacks])
    assert set(matrices) <= set(COMPETITION_MATRICES["sagittal"])
    assert np.mean(matrices <= 512) > 0.9 and (matrices >= 768).sum() > 5
    spacing = np.array([st.pixel_spacing for _, st in stacks])
    low, high = COMPETITION_PIXEL_MM
    assert spacing.min() >= low - 1e-6 and spacing.max() <= high + 1e-6
    sagittal = [st for d, st in stacks if d.startswith("Sagittal")]
    assert {len(st.positions) for st in sagittal} == set(range(15, 23))
    steps = np.array([np.abs(np.diff(st.positions @ st.normal)).mean() for st in sagittal])
    assert steps.min() >= 3.0 - 1e-3 and steps.max() <= 4.5 + 1e-3
    axial = [[st for s in plan if s.description == "Axial T2" for st in s.stacks] for plan in plans]
    assert {len(a) for a in axial if a} == {1, 2, 3}
    slices = np.array([len(st.positions) for a in axial for st in a])
    assert slices.min() >= 15 and slices.max() <= 60
    tilted = [abs(st.normal[2]) < np.cos(np.deg2rad(3.0)) for a in axial if len(a) > 1 for st in a]
    assert 0.3 < np.mean(tilted) < 0.8
    for _, st in stacks:
        assert st.slice_thickness <= np.abs(np.diff(st.positions @ st.normal)).mean() + 1e-3
    files = [sum(len(st.positions) for s in plan for st in s.stacks) for plan in plans]
    megabytes = [
        sum(len(st.positions) * st.rows * st.columns * 2 for s in plan for st in s.stacks) / 2**20
        for plan in plans
    ]
    assert 70 < np.mean(files) < 82 and 17 < np.median(megabytes) < 25, (files, megabytes)


def test_competition_profile_refuses_the_default_profiles_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UserError, match="`image_size`: the competition profile draws its own"):
        SynthConfig(profile="competition", image_size=256).validate()
    with pytest.raises(UserError, match="`profile` must be one of"):
        SynthConfig(profile="real").validate()
    argv = ["synth", "--out", str(tmp_path / "r"), "--profile", "competition", "--slices", "20"]
    assert main(argv) == 2
    assert "--slices: the competition profile" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_thick_slices_average_the_tissue_they_cut() -> None:
    """A competition slice is as thick as its tag says: across the thecal sac's side wall
    (along the slice normal, x), a 4 mm slice sees a ramp where a 0.7 mm one sees a step, and
    the same signal on average."""
    anatomy = phantom.draw_anatomy(np.random.default_rng(0), np.full(25, 0.1))
    lower, upper = phantom.spine_region(anatomy)
    layered = phantom.LayeredPhantom(anatomy, lower, upper)
    table = phantom.tissue_signal(np.random.default_rng(1), anatomy)["T2"]
    z = float(anatomy.disc_z[3] + anatomy.pitch / 2)  # mid-body: the sac is open
    xs = anatomy.centre[0] + np.linspace(-20.0, 20.0, 401)
    line = np.stack([xs, np.full_like(xs, anatomy.canal_y(z)), np.full_like(xs, z)], axis=1)
    normal = np.array([1.0, 0.0, 0.0])
    thin = layered.sample("T2", table, line, normal, 0.7)
    thick = layered.sample("T2", table, line, normal, 4.0)
    assert np.abs(np.diff(thick)).max() < 0.5 * np.abs(np.diff(thin)).max()
    assert abs(thick.mean() - thin.mean()) < 0.05 * thin.mean()


# ----------------------------------------------------------------------------------------- labels
def _draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    severity = np.stack([synth_labels.draw_latent_severity(rng) for _ in range(n)])
    probabilities = synth_labels.class_probabilities(severity)
    return probabilities, synth_labels.draw_classes(rng, probabilities)


def test_label_frequencies_follow_the_spec_table() -> None:
    _, classes = _draw(4000, seed=0)
    for family, expected in SPEC_FREQUENCIES.items():
        columns = [k for k, c in enumerate(LABEL_COLUMNS) if family in c]
        freq = np.bincount(classes[:, columns].ravel(), minlength=3) / classes[:, columns].size
        assert np.abs(freq - np.asarray(expected)).max() < 0.03, (family, freq)
    abnormal = (classes > 0).reshape(len(classes), len(CONDITIONS), len(LEVELS)).sum(axis=(0, 1))
    assert abnormal[3:].sum() > 0.6 * abnormal.sum()  # most findings at L4/L5 and L5/S1


def test_train_labels_are_drawn_from_the_oracle(small_root: Path) -> None:
    labels = labels_to_indices(load_train_labels(small_root / "train.csv"))
    oracle = pd.read_csv(small_root / "oracle_train.csv")[list(PRED_COLUMNS)].to_numpy()
    drawn = labels.reshape(-1)
    chance = oracle[drawn >= 0, drawn[drawn >= 0]]
    assert chance.min() > 0.001  # no label the oracle calls impossible


def test_oracle_beats_the_class_prior_by_a_wide_margin() -> None:
    probabilities, classes = _draw(3000, seed=1)
    study_ids = np.arange(10**6, 10**6 + len(classes))
    wide = pd.DataFrame(np.asarray(SEVERITIES, dtype=object)[classes], columns=list(LABEL_COLUMNS))
    wide.insert(0, "study_id", study_ids)
    solution = labels_to_solution(wide)
    oracle = pd.DataFrame(probabilities.reshape(-1, 3), columns=list(PRED_COLUMNS))
    oracle.insert(0, "row_id", [f"{s}_{c}" for s in study_ids for c in LABEL_COLUMNS])
    prior_table = np.stack(
        [np.bincount(classes[:, k], minlength=3) / len(classes) for k in range(25)]
    )
    prior = oracle.copy()
    prior[list(PRED_COLUMNS)] = np.tile(prior_table, (len(classes), 1))
    ratio = official_score(solution, oracle).score / official_score(solution, prior).score
    assert 0.3 <= ratio <= 0.5, ratio


def test_lsdc_score_ranks_the_oracle_far_ahead_of_the_prior(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = SynthConfig(
        train_studies=30, test_studies=30, seed=2, image_size=16, slices=3, axial_slices=6
    )
    root = synthesize(tmp_path / "score", config, progress=False)
    train = labels_to_indices(load_train_labels(root / "train.csv"))
    prior_table = np.stack(
        [np.bincount(train[:, k][train[:, k] >= 0], minlength=3) for k in range(25)]
    ).astype(float)
    prior_table /= prior_table.sum(axis=1, keepdims=True)
    sample = load_sample_submission(root / "sample_submission.csv")
    sample[list(PRED_COLUMNS)] = np.tile(prior_table, (len(sample) // 25, 1))
    sample.to_csv(tmp_path / "prior.csv", index=False)
    scores = {}
    for name, submission in (
        ("oracle", root / "oracle_test.csv"),
        ("prior", tmp_path / "prior.csv"),
    ):
        assert main(["score", "--solution", str(root / "solution_test.csv"),
                     "--submission", str(submission), "--json"]) == 0  # fmt: skip
        scores[name] = json.loads(capsys.readouterr().out.splitlines()[-1])["score"]
    assert scores["oracle"] < 0.7 * scores["prior"], scores


# ----------------------------------------------------------------------------------------- errors
def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        synthesize(tmp_path / "root", SMALL, progress=False)
    assert (tmp_path / "root" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (["--image-size", "8"], "--image-size must be >= 16"),
        (["--slices", "2"], "--slices must be >= 3"),
        (["--oblique-rate", "1.5"], "--oblique-rate must be within"),
        (["--train-studies", "0", "--test-studies", "0"], "nothing to write"),
    ],
)
def test_cli_reports_bad_values_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argument: list[str], message: str
) -> None:
    assert main(["synth", "--out", str(tmp_path / "x"), "--quiet", *argument]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_writes_a_root(tmp_path: Path) -> None:
    argv = ["synth", "--out", str(tmp_path / "cli"), "--train-studies", "1", "--test-studies", "1",
            "--image-size", "16", "--slices", "3", "--axial-slices", "6", "--no-realism", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert {p.name for p in (tmp_path / "cli").iterdir()} == COMPETITION_FILES | set(ANSWER_FILES)
    assert set(REALISM_RATES) <= set(vars(SynthConfig()))


# ---------------------------------------------------------------------------------------- phantom
def test_each_finding_changes_the_phantom_only_around_itself_and_grows_with_severity() -> None:
    rng = np.random.default_rng(0)
    base = np.full(25, 0.1)
    anatomy = phantom.draw_anatomy(rng, base)
    lower, upper = anatomy.centre - [45, 60, 110], anatomy.centre + [45, 60, 110]

    def codes(severity: np.ndarray) -> tuple[phantom.TissueGrid, np.ndarray]:
        grid = phantom.TissueGrid(lower, upper, 1.5)
        phantom.paint_anatomy(grid, dataclasses.replace(anatomy, severity=severity))
        return grid, grid.codes

    grid, reference = codes(base)
    axes = np.meshgrid(
        *(grid.origin[k] + 1.5 * np.arange(reference.shape[k]) for k in range(3)), indexing="ij"
    )
    for k, column in enumerate(LABEL_COLUMNS):
        condition, level = column[: -len("_l1_l2")], LEVELS.index(column[-len("l1_l2") :])
        changed = {}
        for s in (0.5, 1.0):
            severity = base.copy()
            severity[k] = s
            changed[s] = codes(severity)[1] != reference
        points = np.stack([a[changed[1.0]] for a in axes], axis=1)
        distance = np.linalg.norm(points - anatomy.finding_centre(condition, level), axis=1)
        assert distance.max() < 20.0, (column, distance.max())
        assert changed[1.0].sum() > 1.5 * changed[0.5].sum() > 0, column
