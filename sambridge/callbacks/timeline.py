"""Where a run's start-up time goes, and when its fit ended (to time the process exit)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

MARKER = "sambridge timeline"
"""Prefix of the machine-readable line ``Timeline`` prints at the end of fit (JSON follows it)."""

STAGES = (
    ("imports", "imports_done"),
    ("model, data, trainer built", "built"),
    ("trainer set up", "fit_start"),
    ("sanity validation", "sanity_done"),
    ("first batch (workers, loading)", "first_batch"),
    ("first step", "first_step_done"),
)
"""(label, mark) in order; each stage runs from the previous mark to its own."""


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``, 10 ms resolution); ``None`` elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)


class Timeline(Callback):
    """Start-up milestones in seconds since the process started, printed (rank 0) when the first
    training step ends:

    * ``imports``: Python, torch, Lightning and sambridge imported (``train.py`` reached the CLI);
    * ``model, data, trainer built``: the CLI parsed the config and built the classes (weights loaded);
    * ``trainer set up``: strategy, devices, ``configure_model`` (compile / activation checkpointing
      wrappers), optimisers;
    * ``sanity validation``: Lightning's validation steps before training (0 with
      ``num_sanity_val_steps: 0``);
    * ``first batch``: DataLoader workers started and the first batch loaded and moved to the device;
    * ``first step``: the first optimiser step.

    At the end of fit it prints ``sambridge timeline {...}``: the marks (seconds since process start)
    and ``fit_end_unix`` (wall-clock time), from which a caller times the process exit. ``times``
    holds the marks. ``train.py`` records the first two marks (``mark``); without them (a Trainer
    outside the CLI) the table starts at the trainer's set-up.
    """

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._reported = False

    def mark(self, name: str, unix_time: float | None = None) -> None:
        """Record milestone ``name`` at ``unix_time`` (default: now), as seconds since process start."""
        age = process_age()
        if age is None:
            return
        now = time.time()
        self.times[name] = age - (now - (unix_time if unix_time is not None else now))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.mark("setup")
        if "setup" in self.times:  # outside the CLI: building is not timed
            self.times.setdefault("built", self.times["setup"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark("fit_start")

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark("sanity_done")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if "first_batch" not in self.times:
            if "fit_start" in self.times:  # no sanity validation
                self.times.setdefault("sanity_done", self.times["fit_start"])
            self.mark("first_batch")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._reported:
            return
        if pl_module.device.type == "cuda":
            import torch

            torch.cuda.synchronize(pl_module.device)
        self.mark("first_step_done")
        self._reported = True
        rank_zero_info(self.summary())

    def summary(self) -> str:
        """``start-up: imports 7.1 s | ... | first step 0.9 s | first step done 14.2 s after start``."""
        parts, previous = [], 0.0
        for label, name in STAGES:
            if name in self.times:
                parts.append(f"{label} {self.times[name] - previous:.1f} s")
                previous = self.times[name]
        return f"start-up: {' | '.join(parts)} | first step done {previous:.1f} s after the process started"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark("fit_end")
        record = {**{k: round(v, 3) for k, v in self.times.items()}, "fit_end_unix": time.time()}
        rank_zero_info(f"{MARKER} {json.dumps(record)}")
