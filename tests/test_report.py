"""Reports: per-phrase CSV/Markdown rows, the best/worst PNG grid, and logging it to wandb / TensorBoard."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines.overlay import draw_masks
from sambridge.metrics import QueryTable, true_positives
from sambridge.report import (
    PHRASE_COLUMNS,
    QueryView,
    log_figure,
    phrase_table_markdown,
    query_grid_figure,
    rank_queries,
    save_figure,
    write_phrase_table,
)


@pytest.fixture
def table() -> QueryTable:
    # apple: one perfect query and one missed; "a|b" (a pipe, escaped in Markdown): a correct negative
    tp = np.stack([true_positives(np.eye(2)), np.zeros(10, int), np.zeros(10, int)])
    return QueryTable(
        phrases=["apple", "apple", "a|b"],
        image_ids=[1, 2, 3],
        tp=tp,
        num_gt=np.array([2, 1, 0]),
        num_pred=np.array([2, 0, 0]),
        inter=np.array([50, 0, 0]),
        union=np.array([50, 30, 0]),
    )


def test_phrase_table_csv_and_markdown(tmp_path, table):
    rows = table.per_phrase()
    write_phrase_table(rows, tmp_path / "p.csv", tmp_path / "p.md")
    with open(tmp_path / "p.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == list(PHRASE_COLUMNS)
    apple, negative = read  # most queries first
    assert (apple["phrase"], apple["queries"], apple["positives"], apple["gt"], apple["pred"]) == (
        "apple",
        "2",
        "2",
        "3",
        "2",
    )
    assert float(apple["mIoU"]) == pytest.approx(0.5) and float(apple["count_mae"]) == pytest.approx(0.5)
    assert float(apple["IL_accuracy"]) == 0.5 and float(apple["F1"]) == pytest.approx(0.8, abs=1e-3)
    assert negative["phrase"] == "a|b" and negative["F1"] == "" and float(negative["mIoU"]) == 1.0
    markdown = (tmp_path / "p.md").read_text().splitlines()
    assert len(markdown) == 4 and markdown[0].startswith("| phrase | queries")
    assert markdown[3].startswith("| a\\|b | 1 | 0 |") and "| 0.800 |" in markdown[2]
    assert phrase_table_markdown([]).count("\n") == 2


def test_rank_queries_best_first_worst_first_disjoint():
    best, worst = rank_queries(np.array([0.2, 0.9, 0.5, 0.0, 1.0]), 2)
    assert best == [4, 1] and worst == [3, 0]
    assert rank_queries(np.array([0.3, 0.4, 0.1]), 5) == ([1], [2])
    assert rank_queries(np.array([0.3]), 2) == ([0], [])


def _view(seed: int) -> QueryView:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    masks = np.zeros((2, 30, 40), dtype=bool)
    masks[0, :10, :10] = masks[1, 15:, 20:] = True
    return QueryView(
        image=image, phrase=f"phrase {seed}", gt_masks=masks, pred_masks=masks[:1], caption="F1 0.50"
    )


def test_overlay_colours_masked_pixels_only():
    view = _view(0)
    drawn = draw_masks(view.image, view.gt_masks, alpha=0.5)
    assert (drawn[~view.gt_masks.any(0)] == view.image[~view.gt_masks.any(0)]).all()
    assert (drawn[view.gt_masks[0]] != view.image[view.gt_masks[0]]).any()


def test_grid_png_has_one_row_per_query(tmp_path):
    figure = query_grid_figure([_view(1), _view(2)], [_view(3)])
    assert len(figure.axes) == 9 and "best 1: 'phrase 1'" in figure.axes[0].get_title()
    assert figure.axes[6].get_title().startswith("worst 1")
    save_figure(figure, tmp_path / "out" / "grid.png")
    with Image.open(tmp_path / "out" / "grid.png") as png:
        assert png.format == "PNG" and png.size == (780, 780)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "grid.png"]  # no temp files left
    assert len(query_grid_figure([], []).texts) == 1


def test_log_figure_to_wandb_offline_and_tensorboard(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    figure = query_grid_figure([_view(4)], [_view(5)])
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="sambridge-test")
    assert log_figure(wandb_logger, figure, "val_queries", step=3)
    wandb_logger.experiment.finish()
    pngs = list(tmp_path.glob("wandb/offline-run-*/files/media/images/val_queries_*.png"))
    assert len(pngs) == 1
    with Image.open(pngs[0]) as png:
        assert png.size == (780, 520)

    tb_logger = TensorBoardLogger(str(tmp_path), name="tb")
    assert log_figure(tb_logger, figure, "val_queries", step=3)
    tb_logger.experiment.flush()
    events = EventAccumulator(tb_logger.log_dir)
    events.Reload()
    image = events.Images("val_queries")[0]
    assert image.step == 3 and Image.open(io.BytesIO(image.encoded_image_string)).size == (780, 520)

    assert not log_figure(CSVLogger(str(tmp_path)), figure, "val_queries")
