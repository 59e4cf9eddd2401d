"""The throughput callback: images/s and queries/s match the pace of the loop, data wait shows starvation."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from conftest import make_grounding_batch
from lightning.pytorch.loggers import CSVLogger

from sambridge.callbacks.throughput import Throughput

IMAGES, QUERIES = 2, 4  # per batch of the synthetic GroundingBatch


class PacedBatches(torch.utils.data.IterableDataset):
    """``count`` synthetic batches, each taking ``delay`` seconds to produce."""

    def __init__(self, count: int, delay: float) -> None:
        self.count, self.delay = count, delay

    def __iter__(self):
        for i in range(self.count):
            time.sleep(self.delay)
            yield make_grounding_batch(32, seed=i)


class PacedModule(L.LightningModule):
    """A training step that takes ``step_time`` seconds."""

    def __init__(self, step_time: float) -> None:
        super().__init__()
        self.step_time = step_time
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_time)
        return (self.weight * batch.images.mean()).sum() + self.weight.pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def measure(tmp_path: Path, data_delay: float, step_time: float) -> list[dict[str, float]]:
    callback = Throughput(window=5)
    trainer = L.Trainer(accelerator="cpu", max_steps=11, logger=CSVLogger(tmp_path), callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(PacedBatches(20, data_delay), batch_size=None)
    trainer.fit(PacedModule(step_time), loader)
    rows = csv.DictReader(next(tmp_path.rglob("metrics.csv")).open())
    logged = [{k: float(v) for k, v in row.items() if v} for row in rows if row.get("train_images_per_s")]
    assert [row["step"] for row in logged] == [6, 11]  # the first batch has no measured wait
    assert logged[-1]["train_images_per_s"] == pytest.approx(callback.last_metrics["train_images_per_s"])
    return logged


@pytest.mark.timeout(60)
def test_a_starving_loop_shows_its_data_wait(tmp_path):
    data_delay, step_time = 0.15, 0.01
    for row in measure(tmp_path, data_delay, step_time):
        pace = IMAGES / (data_delay + step_time)  # the fastest the loop can go
        assert 0.5 * pace < row["train_images_per_s"] <= 1.05 * pace
        assert row["train_queries_per_s"] == pytest.approx(row["train_images_per_s"] * QUERIES / IMAGES)
        assert row["train_data_wait"] > 0.6
        assert step_time <= row["train_step_s"] < 0.1


@pytest.mark.timeout(60)
def test_a_compute_bound_loop_barely_waits(tmp_path):
    step_time = 0.15
    for row in measure(tmp_path, 0.0, step_time):
        assert 0.5 * IMAGES / step_time < row["train_images_per_s"] <= 1.05 * IMAGES / step_time
        assert row["train_data_wait"] < 0.25
        assert row["train_step_s"] == pytest.approx(step_time, abs=0.1)


def test_only_grounding_batches_are_counted():
    with pytest.raises(TypeError, match="GroundingBatch"):
        Throughput().on_train_batch_end(None, None, None, torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="window"):
        Throughput(window=0)
