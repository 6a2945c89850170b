"""The report's figures, rendered off-screen to PNG bytes so the HTML can embed them.

Each function takes the JSON-ready numbers of :func:`lsdc.evaluation.diagnostics.diagnose` (not
the raw predictions), so a figure always shows exactly what ``metrics.json`` holds.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers or in Kaggle notebooks

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from lsdc.contract import CONDITIONS, LEVELS, PRED_COLUMNS, SEVERITIES  # noqa: E402


def figure_to_png(fig: plt.Figure) -> bytes:
    """Render a figure to PNG bytes and close it (figures left open leak memory in loops)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def img_tag(image: bytes, alt: str, mime: str = "image/png") -> str:
    """An ``<img>`` holding the encoded image as a data URI, so a page needs no file beside it."""
    data = base64.b64encode(image).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{data}">'


def confusion_matrices_png(confusion: dict[str, list[list[int]]]) -> bytes:
    """One confusion matrix per condition (rows = true class, columns = argmax prediction)."""
    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(4 * len(CONDITIONS), 3.8))
    short = ["normal/mild", "moderate", "severe"]
    for ax, cond in zip(axes, CONDITIONS, strict=True):
        ConfusionMatrixDisplay(np.asarray(confusion[cond]), display_labels=short).plot(
            ax=ax, colorbar=False, cmap="Blues"
        )
        ax.set_title(cond.replace("_", " "), fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return figure_to_png(fig)


def reliability_png(reliability: dict[str, list[dict[str, Any]]]) -> bytes:
    """Reliability diagram per class: mean prediction vs weighted observed frequency per bin."""
    fig, axes = plt.subplots(1, len(PRED_COLUMNS), figsize=(12, 4), sharey=True)
    for ax, name, title in zip(axes, PRED_COLUMNS, SEVERITIES, strict=True):
        bins = reliability[name]
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect")
        if bins:
            x = [b["mean_predicted"] for b in bins]
            y = [b["observed"] for b in bins]
            n = np.array([b["n"] for b in bins], dtype=float)
            ax.plot(x, y, color="tab:blue", lw=1)
            ax.scatter(x, y, s=20 + 180 * n / n.max(), color="tab:blue", zorder=3, label="bins")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.set_xlabel("mean predicted probability")
    axes[0].set_ylabel("observed frequency (weighted 1/2/4)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return figure_to_png(fig)


def level_heatmap_png(grid: dict[str, dict[str, float | None]]) -> bytes:
    """Weighted log loss per condition x level: where along the spine the model loses points."""
    values = np.array(
        [[np.nan if grid[c][lv] is None else grid[c][lv] for lv in LEVELS] for c in CONDITIONS]
    )
    fig, ax = plt.subplots(figsize=(7, 3.8))
    im = ax.imshow(values, cmap="Reds", aspect="auto")
    ax.set_xticks(range(len(LEVELS)), [lv.upper().replace("_", "/") for lv in LEVELS])
    ax.set_yticks(range(len(CONDITIONS)), [c.replace("_", " ") for c in CONDITIONS], fontsize=8)
    dark = np.nanmin(values) + 0.6 * (np.nanmax(values) - np.nanmin(values))
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                color = "white" if values[i, j] > dark else "black"
                ax.text(
                    j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color
                )
    fig.colorbar(im, ax=ax, label="weighted log loss")
    fig.tight_layout()
    return figure_to_png(fig)


LOCALIZATION_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("spinal canal (Sagittal T2/STIR)", ("spinal_canal_stenosis",)),
    (
        "neural foramina (Sagittal T1)",
        ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"),
    ),
    (
        "subarticular zones (Axial T2)",
        ("left_subarticular_stenosis", "right_subarticular_stenosis"),
    ),
)


def localization_error_png(per_label: dict[str, dict[str, dict[str, float] | None]]) -> bytes:
    """Stage 1's point error per level and side: the median (marker) and the 90th percentile
    (end of the bar), one panel per grading series."""
    fig, axes = plt.subplots(1, len(LOCALIZATION_GROUPS), figsize=(13, 3.6), sharey=True)
    x = np.arange(len(LEVELS))
    for ax, (title, conditions) in zip(axes, LOCALIZATION_GROUPS, strict=True):
        for k, condition in enumerate(conditions):
            shift = (k - (len(conditions) - 1) / 2) * 0.12
            stats = [per_label[condition][lv] for lv in LEVELS]
            median = np.array([np.nan if s is None else s["median_mm"] for s in stats])
            p90 = np.array([np.nan if s is None else s["p90_mm"] for s in stats])
            side = condition.split("_")[0] if len(conditions) > 1 else "centre"
            ax.errorbar(
                x + shift,
                median,
                yerr=[np.zeros_like(median), p90 - median],
                fmt="o-",
                capsize=3,
                label=side,
            )
        ax.set_xticks(x, [lv.upper().replace("_", "/") for lv in LEVELS])
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("point error, mm (median; bar to p90)")
    axes[0].set_ylim(bottom=0)
    fig.tight_layout()
    return figure_to_png(fig)
