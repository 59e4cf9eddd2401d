"""Evaluation reports: the per-phrase table (CSV and Markdown) and a PNG grid of the best and worst queries.

The grid shows one query per row (image, ground-truth overlay, prediction overlay), best queries
first, then the worst, ranked by :meth:`sambridge.metrics.QueryTable.quality`. Figures are built
with matplotlib's object API on the Agg canvas (no pyplot, no GUI, no global backend switch) and
can be logged to a Lightning ``WandbLogger`` or ``TensorBoardLogger``.

Shared by the ``EvaluationReport`` callback (during training) and ``sambridge evaluate`` (from files;
its ``saco_query_grid`` reads the images), so it sits in the training layer (docs/architecture.md).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipelines.atomic import atomic_write
from data_pipelines.overlay import draw_masks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sambridge.metrics.calibration import Calibration

#: Columns of the per-phrase table (:meth:`sambridge.metrics.QueryTable.per_phrase`), in order.
PHRASE_COLUMNS = ("phrase", "queries", "positives", "gt", "pred", "F1", "F1@0.5", "IL_accuracy", "mIoU",
                  "count_mae")


# ----------------------------------------------------------------------------------------------
# per-phrase table
# ----------------------------------------------------------------------------------------------
def _cell(value: Any, digits: int | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}"
    return str(value)


def phrase_table_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = PHRASE_COLUMNS) -> str:
    """The per-phrase rows as CSV text (empty cells where a value is undefined)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(row.get(c)) for c in columns] for row in rows)
    return buffer.getvalue()


def phrase_table_markdown(rows: Sequence[Mapping[str, Any]], digits: int = 3,
                          columns: Sequence[str] = PHRASE_COLUMNS) -> str:
    """The per-phrase rows as a Markdown table (``|`` in phrases escaped)."""
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join(":---" if c == "phrase" else "---:" for c in columns) + "|"]
    for row in rows:
        cells = [_cell(row.get(c), digits).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_phrase_table(rows: Sequence[Mapping[str, Any]], csv_path: str | Path,
                       markdown_path: str | Path | None = None, columns: Sequence[str] = PHRASE_COLUMNS) -> None:
    """Write the per-phrase rows as CSV and, optionally, Markdown (atomic writes)."""
    atomic_write(csv_path, phrase_table_csv(rows, columns))
    if markdown_path is not None:
        atomic_write(markdown_path, phrase_table_markdown(rows, columns=columns))


#: Per-phrase columns that a comparison repeats for the reference predictions.
COMPARED_COLUMNS = ("F1", "F1@0.5", "IL_accuracy", "mIoU", "count_mae")


def compare_phrase_rows(rows: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]],
                        name: str = "baseline") -> tuple[list[dict[str, Any]], list[str]]:
    """Per-phrase rows of a run with ``{name}_<column>`` of a reference run on the same queries beside them.

    Returns the merged rows (the run's order) and their columns.
    """
    by_phrase = {row["phrase"]: row for row in reference}
    if set(by_phrase) != {row["phrase"] for row in rows}:
        raise ValueError("the two prediction files were scored on different phrases")
    merged = [{**row, **{f"{name}_{c}": by_phrase[row["phrase"]][c] for c in COMPARED_COLUMNS}} for row in rows]
    columns = ["phrase", "queries", "positives", "gt"]
    for column in COMPARED_COLUMNS:
        columns += [column, f"{name}_{column}"]
    return merged, columns


# ----------------------------------------------------------------------------------------------
# best / worst query grid
# ----------------------------------------------------------------------------------------------
@dataclass
class QueryView:
    """What the grid draws for one query.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        phrase: the noun phrase.
        gt_masks: (N, H, W) bool ground-truth instances.
        pred_masks: (K, H, W) bool predictions (those above the score threshold).
        caption: a line under the phrase, e.g. the query's F1 and IoU.
    """

    image: np.ndarray
    phrase: str
    gt_masks: np.ndarray
    pred_masks: np.ndarray
    caption: str = ""


def rank_queries(quality: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Indices of the ``k`` best queries (best first) and the ``k`` worst (worst first), disjoint."""
    order = np.argsort(-np.asarray(quality, dtype=np.float64), kind="stable")
    k = min(k, len(order) // 2 if len(order) > 1 else len(order))
    best = order[:k].tolist()
    worst = order[::-1][:k].tolist() if len(order) > 1 else []
    return best, worst


def query_grid_figure(best: Sequence[QueryView], worst: Sequence[QueryView],
                      panel_inches: float = 2.6) -> Figure:
    """A figure with one row per query (best, then worst): image | ground truth | prediction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [("best", i + 1, v) for i, v in enumerate(best)]
    rows += [("worst", i + 1, v) for i, v in enumerate(worst)]
    figure = Figure(figsize=(3 * panel_inches, max(1, len(rows)) * panel_inches), dpi=100)
    FigureCanvasAgg(figure)
    if not rows:
        figure.text(0.5, 0.5, "no queries to show", ha="center", va="center")
        return figure
    axes = figure.subplots(len(rows), 3, squeeze=False)
    for r, (group, rank, view) in enumerate(rows):
        panels = (view.image, draw_masks(view.image, view.gt_masks, alpha=0.5),
                  draw_masks(view.image, view.pred_masks, alpha=0.5))
        titles = (f"{group} {rank}: {view.phrase!r}\n{view.caption}", f"ground truth ({len(view.gt_masks)})",
                  f"prediction ({len(view.pred_masks)})")
        for ax, panel, title in zip(axes[r], panels, titles, strict=True):
            ax.imshow(panel)
            ax.set_title(title, fontsize=7, y=1.0)  # a fixed title position: no per-draw search
            ax.set_axis_off()
    # a fixed layout with room for two 7-pt title lines (tight_layout measured every axes: 2x slower grids)
    title_inches = 0.4
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02 / len(rows),
                           top=1 - title_inches / (len(rows) * panel_inches),
                           wspace=0.05, hspace=title_inches / (panel_inches - title_inches))
    return figure


def reliability_figure(curves: Mapping[str, Calibration], inches: float = 4.0) -> Figure:
    """Reliability diagram: precision (IoU >= 0.5) against mean score per score bin, one line per curve,
    with the detections per bin underneath; a calibrated model lies on the diagonal."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(inches, inches * 1.4), dpi=100)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for i, (name, cal) in enumerate(curves.items()):
        filled = cal.count > 0
        centres = (cal.edges[:-1] + cal.edges[1:]) / 2
        top.plot(cal.mean_score[filled], cal.precision[filled], marker="o", label=f"{name} (ECE {cal.ece:.3f})")
        width = (cal.edges[1] - cal.edges[0]) / (len(curves) + 1)
        bottom.bar(centres - 0.5 * (cal.edges[1] - cal.edges[0]) + (i + 1) * width, cal.count, width=width,
                   label=name)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="fraction right (IoU >= 0.5)", title="score calibration")
    top.legend(fontsize=7, loc="upper left")
    bottom.set(xlabel="detection score", ylabel="detections")
    bottom.set_yscale("symlog")
    figure.tight_layout()
    return figure


def figure_png(figure: Figure) -> bytes:
    """The figure rendered as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def save_figure(figure: Figure, path: str | Path) -> None:
    """Write the figure as a PNG file (atomically)."""
    atomic_write(path, figure_png(figure))


def figure_array(figure: Figure) -> np.ndarray:
    """The figure rendered as an (H, W, 3) uint8 RGB array."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def log_figure(logger: Any, figure: Figure, key: str, step: int | None = None) -> bool:
    """Log the figure as an image to a Lightning ``WandbLogger`` or ``TensorBoardLogger``.

    Returns False (and logs nothing) for other loggers. wandb itself is only imported by the
    logger; run it offline with ``WandbLogger(offline=True)`` or ``WANDB_MODE=offline``.
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[figure_array(figure)], step=step)
        return True
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, figure_array(figure), global_step=step, dataformats="HWC")
        return True
    return False
