"""Which samples each training step saw: one JSON line per batch and rank, for audits and loss spikes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from data_pipelines.batch import GroundingBatch


class SampleLog(Callback):
    """Appends ``{"epoch", "batch", "step", "keys"}`` for every training batch to
    ``samples-rank<r>.jsonl`` (one file per rank, so ranks never write to the same file).

    Answers "which images were in the step where the loss spiked?" and shows what each rank read;
    a resumed run appends to the same files, so the last line of an (epoch, batch) is the one that
    counted.

    Args:
        output_dir: where to write (default: ``<trainer.default_root_dir>/samples``).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self.path: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        directory = Path(self.output_dir or Path(trainer.default_root_dir) / "samples")
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"samples-rank{trainer.global_rank}.jsonl"

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not isinstance(batch, GroundingBatch):
            raise TypeError(f"SampleLog records the sample keys of a GroundingBatch, got "
                            f"{type(batch).__name__}")
        record = {"epoch": trainer.current_epoch, "batch": batch_idx, "step": trainer.global_step,
                  "keys": list(batch.keys)}
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")


def read_sample_log(path: str | Path) -> dict[tuple[int, int], list[str]]:
    """(epoch, batch) -> sample keys of a ``SampleLog`` file; a batch logged twice keeps its last line."""
    lines = Path(path).read_text().splitlines()
    return {(r["epoch"], r["batch"]): r["keys"] for r in map(json.loads, lines)}
