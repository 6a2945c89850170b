"""The study viewer's pages: one study on one self-contained page or PNG (``lsdc show``), and the
gallery of report.html.

On real data the first question is "where did it look?": a localizer one level too high, an
axial stack read upside down or a crop that misses the foramen is a bad number in a table and an
obvious mistake in a picture. For one study a page shows each series at its most informative
slices with the points the run predicts and, where labels exist, the labelled points (their
distance in mm written); the 25 predicted rows against the truth; and the crops the run's task
reads, if it reads any. A run whose task shows no points or crops gets the same slices and
table; a study without labels gets the predictions alone; a series the study lacks, or that
could not be read, shows as missing.

``lsdc show`` writes one such page (or one PNG); ``lsdc evaluate --run RUN --cache CACHE`` adds
to report.html a gallery of compact panels (the studies with the largest loss and a few random
ones), each linking to its full page in ``studies/``, and stage 1's error per level and side.
Every page is self-contained (images are JPEG and PNG data URIs) and opens offline in any browser.

Three concerns, three modules: ``study_view.py`` chooses the slices (running the run through
:class:`lsdc.tasks.served.ServedRun`), ``drawing.py`` draws them, this module lays out pages.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lsdc.contract import (
    CONDITIONS,
    IGNORE_INDEX,
    LABEL_COLUMNS,
    LEVEL_NAMES,
    LEVELS,
    N_LABELS,
    PRED_COLUMNS,
    SEVERITIES,
    study_row_ids,
)
from lsdc.errors import UserError
from lsdc.evaluation import plots
from lsdc.evaluation.drawing import crop_image, crop_montage, crop_window, jpeg_tag, slice_image
from lsdc.evaluation.metric import weighted_log_loss
from lsdc.evaluation.study_view import SliceView, StudyView, StudyViewer
from lsdc.utils import atomic_path, write_text_atomic

PAGE_SIDE = 300
"""Pixels of a slice's longer side (in mm) on a full page."""
THUMB_SIDE = 120
"""Pixels of a sagittal slice's longer side in a gallery panel."""
AXIAL_THUMB_SIDE = 72
CROP_CELL = 40
"""Pixels per side of one crop plane on a full page (the demo's crops are 32 px)."""

GALLERY_WORST = 8
"""Gallery panels of the studies with the largest loss."""
GALLERY_RANDOM = 4
"""Gallery panels of studies drawn at random (seeded) from the rest: what a typical study looks like."""
STUDIES_DIR = "studies"
"""Folder beside report.html holding the gallery's full pages, ``{study_id}.html``."""

CONDITION_SHORT: dict[str, str] = {
    "spinal_canal_stenosis": "canal",
    "left_neural_foraminal_narrowing": "L foramen",
    "right_neural_foraminal_narrowing": "R foramen",
    "left_subarticular_stenosis": "L subarticular",
    "right_subarticular_stenosis": "R subarticular",
}


# ------------------------------------------------------------------------------------- HTML
PANEL_STYLE = (
    "figure{display:inline-block;margin:0 10px 10px 0;vertical-align:top}"
    "figcaption{font-size:12px;max-width:320px;color:#444}"
    "figure img{display:block}"
    ".missing{display:flex;align-items:center;justify-content:center;text-align:center;"
    "background:#f3f3f3;border:1px dashed #b00;color:#b00;font-size:12px;padding:6px;"
    "box-sizing:border-box}"
    ".legend{font-size:13px;color:#333}"
    ".panel{border:1px solid #ccc;border-radius:4px;padding:6px;margin:0 0 12px 0}"
    ".panel .thumbs{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start;margin-top:4px}"
    ".panel figure{margin:0}.panel figcaption{font-size:10px;max-width:130px}"
    "table.grid{margin:0}"
    "table.grid td{font-size:10px;padding:1px 3px;text-align:center;min-width:34px}"
    "table.grid th{font-size:10px;padding:1px 3px;text-align:left}"
)
"""CSS of the gallery panels, shared by a study page and report.html."""

STYLE = (
    "body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}"
    "td.true{outline:2px solid #000;outline-offset:-2px;font-weight:bold}"
    "table.crops td{padding:2px}table.crops img{display:block}table.crops th{text-align:center}"
    ".pair{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}.pair p{font-size:13px}"
    + PANEL_STYLE
)

LEGEND = (
    '<p class="legend"><b style="color:rgb(255,40,40)">+</b> stage 1&rsquo;s predicted point '
    '&nbsp; <b style="color:rgb(40,180,80)">&#9675;</b> labelled point '
    "(train_label_coordinates.csv) &nbsp; a yellow line joins the two; the number beside a point "
    "is their distance in mm, and (&plusmn;k sl) says the point lies k slices off the shown slice "
    "(it is drawn where it projects onto it).</p>"
)


def _figure(view: SliceView, side: int, errors: np.ndarray | None, caption: bool = True) -> str:
    text = html.escape(view.title) + (f"<br>{html.escape(view.note)}" if caption else "")
    if view.image is None:
        why = html.escape(view.note) if caption else "missing"
        box = f'<div class="missing" style="width:{side}px;height:{side}px">{why}</div>'
        return (
            f'<figure style="width:{side}px">{box}'
            f"<figcaption>{html.escape(view.title)}</figcaption></figure>"
        )
    image = slice_image(view, side, errors)
    tag = jpeg_tag(image, view.title)
    return f'<figure style="width:{image.size[0]}px">{tag}<figcaption>{text}</figcaption></figure>'


def _prob_cell(p: float, is_true: bool) -> str:
    if not np.isfinite(p):
        return "<td>&ndash;</td>"
    colour = "#fff" if p > 0.6 else "#000"
    cls = ' class="true"' if is_true else ""
    return f'<td{cls} style="background:rgba(31,119,180,{p:.2f});color:{colour}">{p:.3f}</td>'


def probability_table(view: StudyView) -> str:
    """The 25 rows: probabilities coloured by value (the true class outlined), the truth, the
    row's log loss coloured by size, and stage 1's point error."""
    losses, errors = view.row_losses, view.point_errors
    header = ["label", *SEVERITIES, "truth", "&minus;log p", "point error mm"]
    body = []
    for j, column in enumerate(LABEL_COLUMNS):
        truth = IGNORE_INDEX if view.truth is None else int(view.truth[j])
        name = f"{CONDITION_SHORT[CONDITIONS[j // len(LEVELS)]]} {LEVEL_NAMES[j % len(LEVELS)]}"
        cells = [f'<td title="{column}">{name}</td>']
        cells += [_prob_cell(float(view.probs[j, k]), truth == k) for k in range(3)]
        cells.append(f"<td>{SEVERITIES[truth] if truth != IGNORE_INDEX else '&ndash;'}</td>")
        loss = losses[j]
        cells.append(
            f'<td style="background:rgba(214,39,40,{min(loss / 2.5, 1.0):.2f})">{loss:.3f}</td>'
            if np.isfinite(loss)
            else "<td>&ndash;</td>"
        )
        cells.append(f"<td>{errors[j]:.1f}</td>" if np.isfinite(errors[j]) else "<td>&ndash;</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def crops_table(view: StudyView) -> str:
    """The 25 crops, every plane, as the grader reads them: conditions down, levels across."""
    if view.crops is None or view.crops_present is None:
        return "<p>This run has no stage 2: it reads whole series, not crops.</p>"
    window = crop_window(view.crops, view.crops_present)
    head = "<th></th>" + "".join(f"<th>{name}</th>" for name in LEVEL_NAMES)
    rows = []
    for c, condition in enumerate(CONDITIONS):
        cells = [f"<td>{CONDITION_SHORT[condition]}</td>"]
        for lv in range(len(LEVELS)):
            j = c * len(LEVELS) + lv
            if not view.crops_present[j]:
                cells.append('<td class="missing">no image</td>')
                continue
            tag = jpeg_tag(crop_image(view.crops[j], window, CROP_CELL), LABEL_COLUMNS[j])
            cells.append(f"<td>{tag}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="crops"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _summary_line(view: StudyView) -> str:
    parts = []
    loss = view.loss
    if loss is not None:
        parts.append(f"weighted log loss {loss:.3f}")
    elif view.truth is None:
        parts.append("no labels (not in train.csv)")
    errors = view.point_errors
    if np.isfinite(errors).any():
        parts.append(f"median point error {np.nanmedian(errors):.1f} mm")
    return "; ".join(parts)


def _sources(view: StudyView) -> str:
    if view.probs_from == view.points_from:
        return f"Probabilities, points and crops: {view.probs_from}."
    return f"Probabilities: {view.probs_from}. Points: {view.points_from}."


def study_page_html(view: StudyView) -> str:
    """One study on one self-contained page (what ``lsdc show`` writes)."""
    errors = view.point_errors
    missing = "".join(
        f"<li>{html.escape(d)}: {html.escape(why)}</li>" for d, why in view.missing.items()
    )
    parts = [
        f"<h1>Study {view.study_id}</h1>",
        f"<p>{html.escape(_summary_line(view))}</p>",
        f"<p>{html.escape(_sources(view))}</p>",
        f"<p><b>Missing series</b></p><ul>{missing}</ul>" if missing else "",
        LEGEND,
        "<h2>Sagittal series</h2>",
        "".join(_figure(v, PAGE_SIDE, errors) for v in view.sagittal),
        "<h2>Axial T2 nearest each level</h2>",
        "".join(_figure(v, PAGE_SIDE * 2 // 3, errors) for v in view.axial),
        '<div class="pair"><section><h2>Predictions against the truth</h2>',
        probability_table(view),
        "</section><section><h2>Stage-2 crops, as the grader reads them</h2>",
        "<p>Right-sided crops are mirrored onto the left; every plane, one intensity window.</p>",
        crops_table(view),
        "</section></div>",
    ]
    return _document(f"lsdc study {view.study_id}", "\n".join(p for p in parts if p))


def _document(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"{body}\n</body></html>\n"
    )


def loss_grid(view: StudyView) -> str:
    """A 5 x 5 table (conditions x levels): the truth's initial and its predicted probability,
    red by the row's loss; hovering shows the three probabilities."""
    losses = view.row_losses
    head = "<th></th>" + "".join(f"<th>{name}</th>" for name in LEVEL_NAMES)
    rows = []
    for c, condition in enumerate(CONDITIONS):
        cells = [f"<th>{CONDITION_SHORT[condition]}</th>"]
        for lv in range(len(LEVELS)):
            j = c * len(LEVELS) + lv
            p = view.probs[j]
            tip = " / ".join(f"{x:.2f}" for x in p) if np.isfinite(p).all() else "not predicted"
            truth = IGNORE_INDEX if view.truth is None else int(view.truth[j])
            if truth == IGNORE_INDEX or not np.isfinite(losses[j]):
                cells.append(f'<td title="{tip}">&ndash;</td>')
                continue
            alpha = min(losses[j] / 2.5, 1.0)
            cells.append(
                f'<td title="{tip}" style="background:rgba(214,39,40,{alpha:.2f})">'
                f"{SEVERITIES[truth][0]} {p[truth]:.2f}</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def study_panel_html(view: StudyView, href: str, why: str) -> str:
    """A compact panel of one study for the report's gallery, linking to its full page."""
    thumbs = [_figure(v, THUMB_SIDE, None, caption=False) for v in view.sagittal]
    thumbs += [_figure(v, AXIAL_THUMB_SIDE, None, caption=False) for v in view.axial]
    if view.crops is not None and view.crops_present is not None:
        montage = crop_montage(view.crops, view.crops_present, 24)
        thumbs.append(
            "<figure>"
            + jpeg_tag(montage, "crops")
            + "<figcaption>crops (middle planes; rows = conditions)</figcaption></figure>"
        )
    missing = f" · missing: {', '.join(view.missing)}" if view.missing else ""
    summary = html.escape(_summary_line(view))
    return (
        f'<div class="panel"><a href="{html.escape(href)}"><b>study {view.study_id}</b></a> '
        f"&middot; {html.escape(why)} &middot; {summary}{html.escape(missing)}"
        f'<div class="thumbs">{"".join(thumbs)}{loss_grid(view)}</div></div>'
    )


# ---------------------------------------------------------------------------------- the PNG
def study_png(view: StudyView) -> bytes:
    """The page's content as one image: slices with their points, crops, probabilities."""
    import matplotlib.pyplot as plt

    errors = view.point_errors
    n_axial = max(len(view.axial), 1)
    fig = plt.figure(figsize=(15, 13))
    grid = fig.add_gridspec(3, 1, height_ratios=[1.25, 0.9, 1.5])
    top = grid[0].subgridspec(1, len(view.sagittal))
    middle = grid[1].subgridspec(1, n_axial)
    bottom = grid[2].subgridspec(1, 2, width_ratios=[1.3, 1])
    panels = [(view.sagittal[i], fig.add_subplot(top[i])) for i in range(len(view.sagittal))]
    panels += [(view.axial[i], fig.add_subplot(middle[i])) for i in range(len(view.axial))]
    for slice_view, ax in panels:
        ax.set_axis_off()
        ax.set_title(slice_view.title, fontsize=9)
        if slice_view.image is None:
            ax.text(0.5, 0.5, slice_view.note, ha="center", va="center", wrap=True, color="#b00")
            continue
        ax.imshow(np.asarray(slice_image(slice_view, PAGE_SIDE, errors)))
    ax = fig.add_subplot(bottom[0])
    ax.set_title("stage-2 crops (middle planes)", fontsize=9)
    if view.crops is not None and view.crops_present is not None:
        cell = 32
        ax.imshow(np.asarray(crop_montage(view.crops, view.crops_present, cell)))
        ticks = np.arange(len(LEVELS)) * (cell + 2) + cell / 2
        ax.set_xticks(ticks, LEVEL_NAMES, fontsize=8)
        ax.set_yticks(ticks, [CONDITION_SHORT[c] for c in CONDITIONS], fontsize=8)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no stage 2 (whole-series run)", ha="center", va="center")
    ax = fig.add_subplot(bottom[1])
    ax.imshow(np.nan_to_num(view.probs, nan=0.0), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(3), SEVERITIES, fontsize=8)
    ax.set_yticks(range(N_LABELS), LABEL_COLUMNS, fontsize=6)
    ax.set_title("probabilities (truth boxed red)", fontsize=9)
    for j in range(N_LABELS):
        for k in range(3):
            p = view.probs[j, k]
            if np.isfinite(p):
                colour = "white" if p > 0.6 else "black"
                ax.text(k, j, f"{p:.2f}", ha="center", va="center", fontsize=6, color=colour)
        if view.truth is not None and view.truth[j] != IGNORE_INDEX:
            ax.add_patch(
                plt.Rectangle(
                    (view.truth[j] - 0.5, j - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5
                )
            )
    fig.suptitle(f"study {view.study_id}: {_summary_line(view)}", fontsize=12)
    return plots.figure_to_png(fig)


# --------------------------------------------------------------------------- lsdc show / report
def show_study(
    data_root: str | Path,
    cache_dir: str | Path,
    run_dir: str | Path,
    study_id: int,
    out_path: str | Path | None = None,
) -> Path:
    """Write one study's page (``.html``) or picture (``.png``); returns its path.

    Raises:
        UserError: ``out_path`` is neither .html nor .png, the run or the cache is unreadable,
            or the study is in neither the cache nor the root's series CSVs.
    """
    out = Path(out_path) if out_path is not None else Path(f"study_{int(study_id)}.html")
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise UserError(f"{out}: `out_path` must end in .html or .png")
    view = StudyViewer(run_dir, cache_dir, data_root).view(int(study_id))
    if suffix == ".png":
        with atomic_path(out) as tmp:
            tmp.write_bytes(study_png(view))
    else:
        write_text_atomic(study_page_html(view), out)
    return out


def gallery(
    viewer: StudyViewer,
    solution: pd.DataFrame,
    predictions: pd.DataFrame,
    out_dir: str | Path,
    n_worst: int = GALLERY_WORST,
    n_random: int = GALLERY_RANDOM,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], str]:
    """Write the full pages of the gallery's studies into ``out_dir/studies`` and return the
    gallery's entries (for metrics.json) and its HTML (for report.html).

    The studies are the ``n_worst`` with the largest weighted log loss, then ``n_random`` drawn
    (seeded) from the rest. Each page's table shows the prediction file's probabilities, so a
    panel's loss is the one the report counts.
    """
    from lsdc.evaluation.diagnostics import align

    rows = align(solution, predictions)
    losses = pd.Series(
        {
            int(s): weighted_log_loss(rows.onehot[m], rows.probs[m], rows.weight[m])
            for s in np.unique(rows.study_id)
            for m in [rows.study_id == s]
        }
    ).sort_values(ascending=False, kind="stable")
    worst = [int(s) for s in losses.index[:n_worst]]
    rest = np.array([int(s) for s in losses.index[n_worst:]], dtype=np.int64)
    rng = np.random.default_rng(seed)
    drawn = sorted(rng.choice(rest, size=min(n_random, rest.size), replace=False).tolist())
    probs_by_row = predictions.set_index("row_id")[list(PRED_COLUMNS)]
    truth_by_row = _solution_truth(solution)
    entries, panels = [], []
    for study_id, why in [(s, "largest loss") for s in worst] + [(s, "random") for s in drawn]:
        row_ids = study_row_ids(study_id)
        probs = probs_by_row.reindex(row_ids).to_numpy(np.float64)
        truth = np.array([truth_by_row.get(r, IGNORE_INDEX) for r in row_ids], dtype=np.int64)
        view = viewer.view(study_id, probs=probs, truth=truth, probs_from="the evaluated file")
        href = f"{STUDIES_DIR}/{study_id}.html"
        write_text_atomic(study_page_html(view), Path(out_dir) / href)
        errors = view.point_errors
        entries.append(
            {
                "study_id": study_id,
                "why": why,
                "loss": view.loss,
                "median_point_error_mm": (
                    float(np.nanmedian(errors)) if np.isfinite(errors).any() else None
                ),
                "page": href,
            }
        )
        panels.append(study_panel_html(view, href, why))
    return entries, LEGEND + "\n".join(panels)


def _solution_truth(solution: pd.DataFrame) -> dict[str, int]:
    """row_id -> true class index of every scored row of a solution."""
    onehot = solution[list(PRED_COLUMNS)].to_numpy(np.float64)
    scored = (onehot.sum(axis=1) > 0) & (solution["sample_weight"].to_numpy(np.float64) > 0)
    return {
        str(r): int(k)
        for r, k in zip(solution["row_id"][scored], onehot[scored].argmax(axis=1), strict=True)
    }
