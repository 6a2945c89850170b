"""The study viewer (``lsdc show``, the report's gallery): pages for every kind of run and study,
points drawn where the geometry puts them, missing series shown as missing."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lsdc.cli import main
from lsdc.contract import (
    IGNORE_INDEX,
    LABEL_COLUMNS,
    PRED_COLUMNS,
    label_index,
    labels_to_solution,
    load_label_coordinates,
    load_train_labels,
    study_row_ids,
)
from lsdc.datasets.levels import StackStore
from lsdc.evaluation.drawing import PREDICTED_RGB, slice_image
from lsdc.evaluation.metric import weighted_log_loss
from lsdc.evaluation.study_view import StudyViewer
from lsdc.evaluation.viewer import gallery
from lsdc.preprocessing.geometry import project_point

torch.set_num_threads(1)


def _show(root: Path, cache: Path, run: Path, study: int, out: Path) -> int:
    argv = ["show", "--data", str(root), "--cache", str(cache), "--run", str(run)]
    return main([*argv, "--study", str(study), "--out", str(out)])


def _images(page: str) -> list[Image.Image]:
    """Every image of a page, decoded: they must all be inline (data URIs)."""
    sources = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert sources and all(re.match(r"data:image/(png|jpeg);base64,", s) for s in sources)
    return [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) for s in sources]


def _oof_probs(run: Path, study_id: int) -> pd.DataFrame:
    oof = pd.read_csv(run / "oof.csv").set_index("row_id")
    return oof.reindex(study_row_ids(study_id))[list(PRED_COLUMNS)]


def _red_centroid(image: Image.Image) -> tuple[float, float]:
    rgb = np.asarray(image.convert("RGB")).astype(int)
    red = (np.abs(rgb - np.array(PREDICTED_RGB)).max(axis=-1) < 30) & (
        rgb[..., 0] - rgb[..., 1] > 150
    )
    assert red.sum() > 4, "no predicted-point marker in the image"
    ys, xs = np.nonzero(red)
    return float(xs.mean()), float(ys.mean())


# ----------------------------------------------------------------------------------- pages
def test_page_of_a_two_stage_run_shows_points_crops_and_its_out_of_fold_model(
    synth_root: Path, synth_cache: Path, tiny_two_stage_run: Path, tmp_path: Path
) -> None:
    folds = pd.read_csv(tiny_two_stage_run / "folds.csv")
    study_id, fold = int(folds["study_id"].iloc[0]), int(folds["fold"].iloc[0])
    out = tmp_path / "study.html"
    assert _show(synth_root, synth_cache, tiny_two_stage_run, study_id, out) == 0
    page = out.read_text()
    assert f"Study {study_id}" in page and f"fold {fold} model" in page
    assert "http" not in page  # self-contained: nothing to fetch
    images = _images(page)
    # 3 sagittal views + 5 axial levels + 25 crops (3 planes of 40 px, 2 px apart).
    assert len(images) == 3 + 5 + 25
    assert sum(img.size == (3 * 40 + 2 * 2, 40) for img in images) == 25
    for label in LABEL_COLUMNS:
        assert f'<td title="{label}">' in page

    view = StudyViewer(tiny_two_stage_run, synth_cache, synth_root).view(study_id)
    assert view.predicted_points is not None and np.isfinite(view.predicted_points).all()
    assert view.labelled_points is not None and view.crops is not None
    assert view.crops.shape == (25, 3, 16, 16) and view.crops_present.all()
    assert any(m.predicted for v in view.sagittal for m in v.marks)
    assert any(not m.predicted for v in view.sagittal for m in v.marks)
    # The page serves the model that did not see the study: its rows are the run's OOF rows.
    oof = _oof_probs(tiny_two_stage_run, study_id)
    known = oof.notna().all(axis=1).to_numpy()
    assert known.sum() >= 20
    np.testing.assert_allclose(view.probs[known], oof.to_numpy()[known], atol=1e-5)
    truth = load_train_labels(synth_root / "train.csv").set_index("study_id").loc[study_id]
    assert view.truth is not None and (view.truth != IGNORE_INDEX).sum() == truth.notna().sum()


def test_page_of_a_whole_series_run_has_labelled_points_but_no_stage_one(
    synth_root: Path, synth_cache: Path, tiny_run: Path, tmp_path: Path
) -> None:
    study_id = int(pd.read_csv(tiny_run / "folds.csv")["study_id"].iloc[1])
    out = tmp_path / "study.html"
    assert _show(synth_root, synth_cache, tiny_run, study_id, out) == 0
    page = out.read_text()
    assert "no stage 2" in page and "no stage 1" in page
    assert len(_images(page)) == 3 + 5  # the same slices, no crops
    view = StudyViewer(tiny_run, synth_cache, synth_root).view(study_id)
    assert view.predicted_points is None and view.crops is None
    marks = [m for v in view.sagittal + view.axial for m in v.marks]
    assert marks and not any(m.predicted for m in marks)  # labelled points only
    oof = _oof_probs(tiny_run, study_id)
    known = oof.notna().all(axis=1).to_numpy()
    np.testing.assert_allclose(view.probs[known], oof.to_numpy()[known], atol=1e-5)


def test_unlabelled_test_study_as_page_and_png(
    synth_root: Path, synth_test_cache: Path, tiny_two_stage_run: Path, tmp_path: Path
) -> None:
    study_id = int(StackStore(synth_test_cache).study_ids()[0])
    out = tmp_path / "test_study.html"
    assert _show(synth_root, synth_test_cache, tiny_two_stage_run, study_id, out) == 0
    page = out.read_text()
    assert "no labels" in page and "mean of the fold models 0, 1" in page
    view = StudyViewer(tiny_two_stage_run, synth_test_cache, synth_root).view(study_id)
    assert view.truth is None and view.labelled_points is None and view.loss is None
    np.testing.assert_allclose(view.probs.sum(axis=1), 1.0, atol=1e-5)
    png = tmp_path / "test_study.png"
    assert _show(synth_root, synth_test_cache, tiny_two_stage_run, study_id, png) == 0
    image = Image.open(png)
    assert image.format == "PNG" and min(image.size) > 800


def test_show_refuses_what_it_cannot_draw(
    synth_root: Path, synth_cache: Path, tiny_run: Path, tmp_path: Path, capsys
) -> None:
    assert _show(synth_root, synth_cache, tiny_run, 123, tmp_path / "x.html") == 2
    assert "study 123: not in" in capsys.readouterr().err
    study_id = int(StackStore(synth_cache).study_ids()[0])
    assert _show(synth_root, synth_cache, tiny_run, study_id, tmp_path / "x.pdf") == 2
    assert "must end in .html or .png" in capsys.readouterr().err
    assert _show(synth_root, synth_cache, tmp_path, study_id, tmp_path / "x.html") == 2
    assert "no fold*/best.pt" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


# ----------------------------------------------------------------------------- geometry
def test_planted_points_are_drawn_where_the_geometry_puts_them(
    synth_root: Path, synth_cache: Path, tiny_run: Path
) -> None:
    """A canal point planted at a known voxel of Sagittal T2, and a lateral-recess point given
    as a pixel of a Sagittal T2 instance (near the labelled L4/L5 canal) and carried into Axial T2
    by ``project_point``, are shown on the slice they lie on, their red cross centred on the
    pixel their voxel is resized onto."""
    viewer = StudyViewer(tiny_run, synth_cache, synth_root)
    study_id = int(viewer.store.study_ids()[0])
    sagittal = viewer.store.load(viewer.store.best[(study_id, "Sagittal T2/STIR")])
    n, rows, cols = sagittal.array.shape
    planted = np.array([n // 2 + 1, rows * 0.35 + 0.3, cols * 0.55 + 0.2])
    canal = label_index("spinal_canal_stenosis", "l3_l4")
    points = np.full((25, 3), np.nan)
    points[canal] = sagittal.geometry.voxel_to_patient(planted[None])[0]

    coordinates = load_label_coordinates(synth_root / "train_label_coordinates.csv")
    labelled = coordinates[
        (coordinates["study_id"] == study_id)
        & (coordinates["condition_key"] == "spinal_canal_stenosis")
        & (coordinates["level_key"] == "l4_l5")
    ].iloc[0]
    source = sagittal.source_geometry
    instance, x, y = int(labelled.instance_number), labelled.x + 2.25, labelled.y - 1.4
    recess = label_index("left_subarticular_stenosis", "l4_l5")
    points[recess] = source.pixel_to_patient(instance, x, y)

    views, axial = viewer.slices(study_id, points, None)
    canal_view = views[0]
    assert f"slice {int(planted[0]) + 1} of {n}" in canal_view.note
    (mark,) = [m for m in canal_view.marks if m.label == canal]
    np.testing.assert_allclose([mark.row, mark.col, mark.off_slices], [*planted[1:], 0], atol=1e-6)

    # The axial view shows the slice of an axial stack that the projected point lies on.
    axial_view = next(v for v in axial if v.title.endswith("L4/L5"))
    on_shown_slice = []
    for key in viewer.store.stacks(study_id, "Axial T2"):
        stack = viewer.store.load(key)
        voxel = project_point(source, instance, x, y, stack.geometry)
        k = int(np.round(voxel[0]))
        if 0 <= k < len(stack.array) and np.array_equal(axial_view.image, stack.array[k]):
            on_shown_slice.append(voxel)
    assert len(on_shown_slice) == 1
    expected = on_shown_slice[0]

    for view, (row, col) in ((canal_view, planted[1:]), (axial_view, expected[1:])):
        view.marks = [m for m in view.marks if m.label in (canal, recess)]
        image = slice_image(view, 300)
        height_mm = view.image.shape[0] * view.pixel_spacing[0]
        width_mm = view.image.shape[1] * view.pixel_spacing[1]
        px_per_mm = 300 / max(height_mm, width_mm)
        # The centre of voxel (row, col) is (index + 0.5) pixels of spacing mm from the edge.
        want_x = (col + 0.5) * view.pixel_spacing[1] * px_per_mm - 0.5
        want_y = (row + 0.5) * view.pixel_spacing[0] * px_per_mm - 0.5
        got_x, got_y = _red_centroid(image)
        assert abs(got_x - want_x) < 1.0 and abs(got_y - want_y) < 1.0, (view.title, got_x, got_y)


def test_missing_series_shows_as_missing(
    synth_root: Path, synth_cache: Path, tiny_two_stage_run: Path, tmp_path: Path
) -> None:
    """One study loses its cached Sagittal T1 (listed, unreadable), another is listed without
    any Axial T2, a third has nothing cached at all: every page renders and says why."""
    cache, root = tmp_path / "cache", tmp_path / "root"
    shutil.copytree(synth_cache, cache)
    root.mkdir()
    for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv"):
        shutil.copy(synth_root / name, root / name)
    index = pd.read_csv(cache / "index.csv")
    series = pd.read_csv(root / "train_series_descriptions.csv")
    unreadable, absent, empty = (int(s) for s in StackStore(synth_cache).study_ids()[:3])
    drop_t1 = (index["study_id"] == unreadable) & (index["series_description"] == "Sagittal T1")
    drop_axial = (index["study_id"] == absent) & (index["series_description"] == "Axial T2")
    index = index[~(drop_t1 | drop_axial | (index["study_id"] == empty))]
    index.to_csv(cache / "index.csv", index=False)
    series = series[
        ~((series["study_id"] == absent) & (series["series_description"] == "Axial T2"))
    ]
    series.to_csv(root / "train_series_descriptions.csv", index=False)

    viewer = StudyViewer(tiny_two_stage_run, cache, root)
    view = viewer.view(unreadable)
    assert set(view.missing) == {"Sagittal T1"}
    assert (
        "listed in train_series_descriptions.csv but not in the cache"
        in view.missing["Sagittal T1"]
    )
    assert [v.image is None for v in view.sagittal] == [False, True, True]
    foramina = [
        label_index(c, level)
        for c in ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing")
        for level in ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
    ]
    assert not view.crops_present[foramina].any()  # no T1, no foramen crop
    assert view.crops_present[label_index("spinal_canal_stenosis", "l4_l5")]
    assert viewer.view(absent).missing == {"Axial T2": "the study has no such series"}

    for study_id, missing_boxes in ((unreadable, 2), (absent, 1), (empty, 4)):
        out = tmp_path / f"{study_id}.html"
        assert _show(root, cache, tiny_two_stage_run, study_id, out) == 0
        page = out.read_text()
        assert page.count('<div class="missing"') == missing_boxes, study_id
        assert _show(root, cache, tiny_two_stage_run, study_id, out.with_suffix(".png")) == 0
    page = (tmp_path / f"{empty}.html").read_text()
    for description in ("Sagittal T1", "Sagittal T2/STIR", "Axial T2"):
        assert f"<li>{description}: series " in page


# -------------------------------------------------------------------------------- report
def test_report_gallery_shows_the_worst_studies_and_the_localisation_error(
    synth_root: Path, synth_cache: Path, tiny_two_stage_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_two_stage_run, run)  # evaluate --run writes calibration.json into it
    out = tmp_path / "eval"
    argv = ["evaluate", "--run", str(run), "--data", str(synth_root), "--cache", str(synth_cache)]
    assert main([*argv, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.html").read_text()

    # Per-study weighted log loss of oof.csv against train.csv, computed here independently.
    solution = labels_to_solution(load_train_labels(synth_root / "train.csv"))
    oof = pd.read_csv(run / "oof.csv").set_index("row_id")
    scored = solution[(solution["sample_weight"] > 0) & solution["row_id"].isin(oof.index)]
    study = scored["row_id"].str.split("_").str[0].astype(int)
    losses = {
        int(s): weighted_log_loss(
            rows[list(PRED_COLUMNS)].to_numpy(),
            oof.loc[rows["row_id"], list(PRED_COLUMNS)].to_numpy(),
            rows["sample_weight"].to_numpy(),
        )
        for s, rows in scored.groupby(study)
    }
    ranked = sorted(losses, key=losses.get, reverse=True)
    entries = metrics["gallery"]
    assert [e["study_id"] for e in entries] == ranked  # 6 studies: all of them, worst first
    for entry in entries:
        assert entry["loss"] == pytest.approx(losses[entry["study_id"]], rel=1e-9)
        assert (out / entry["page"]).is_file()
        assert f'href="{entry["page"]}"' in report
    assert report.index(f"study {ranked[0]}</b>") < report.index(f"study {ranked[-1]}</b>")
    assert "http" not in report
    assert len(_images(report)) >= 6 * 9  # each panel: 3 + 5 slices and a crop montage

    loc = metrics["localization"]
    groups = {r["group"]: r for r in loc["summary"]}
    assert set(groups) == {"spinal", "foraminal", "subarticular", "all"}
    canal = [loc["per_label"]["spinal_canal_stenosis"][lv] for lv in ("l1_l2", "l5_s1")]
    assert all(c is not None and 0 <= c["median_mm"] <= c["p90_mm"] for c in canal)
    assert 'alt="localisation error per level"' in report


def test_gallery_adds_random_studies_beside_the_worst(
    synth_root: Path, synth_cache: Path, tiny_run: Path, tmp_path: Path
) -> None:
    solution = labels_to_solution(load_train_labels(synth_root / "train.csv"))
    oof = pd.read_csv(tiny_run / "oof.csv")
    viewer = StudyViewer(tiny_run, synth_cache, synth_root)
    entries, html = gallery(viewer, solution, oof, tmp_path, n_worst=2, n_random=2)
    worst = [e for e in entries if e["why"] == "largest loss"]
    drawn = [e for e in entries if e["why"] == "random"]
    assert len(worst) == 2 and len(drawn) == 2
    assert worst[0]["loss"] >= worst[1]["loss"] >= max(e["loss"] for e in drawn)
    assert len({e["study_id"] for e in entries}) == 4
    assert html.count('class="panel"') == 4
    assert len(list((tmp_path / "studies").glob("*.html"))) == 4


def test_evaluate_cache_needs_the_run(synth_root: Path, synth_cache: Path, capsys) -> None:
    argv = ["evaluate", "--pred", str(synth_root / "oracle_train.csv"), "--data", str(synth_root)]
    assert main([*argv, "--cache", str(synth_cache)]) == 2
    assert "give --run RUN too" in capsys.readouterr().err


def test_labelled_points_come_from_the_coordinates(synth_root: Path, synth_cache: Path, tiny_run):
    """The green circles are train_label_coordinates.csv's pixels: on the canal view, at the
    labelled (row, col) of the labelled instance's slice."""
    viewer = StudyViewer(tiny_run, synth_cache, synth_root)
    study_id = int(viewer.store.study_ids()[0])
    view = viewer.view(study_id)
    coordinates = load_label_coordinates(synth_root / "train_label_coordinates.csv")
    rows = coordinates[
        (coordinates["study_id"] == study_id)
        & (coordinates["condition_key"] == "spinal_canal_stenosis")
    ]
    stack = viewer.store.load(viewer.store.best[(study_id, "Sagittal T2/STIR")])
    assert len(rows) >= 3
    for row in rows.itertuples():
        (mark,) = [
            m
            for m in view.sagittal[0].marks
            if m.label == label_index(row.condition_key, row.level_key) and not m.predicted
        ]
        voxel = stack.geometry.patient_to_voxel(
            stack.source_geometry.pixel_to_patient(int(row.instance_number), row.x, row.y)[None]
        )[0]
        np.testing.assert_allclose([mark.row, mark.col], voxel[1:], atol=1e-6)
