"""Training throughput and data starvation: images/s, queries/s and the share of time spent waiting."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from data_pipelines.batch import GroundingBatch


class Throughput(Callback):
    """Logs, every ``window`` training batches, over those batches:

    * ``train_images_per_s`` / ``train_queries_per_s``: images and (image, phrase) queries trained on
      per second, all ranks together;
    * ``train_data_wait``: the fraction of wall time between one step's end and the next step's start,
      i.e. waiting for the next batch, on the rank that waited most. Near 0 the data keeps up; above
      ~0.1 the accelerators starve (more ``num_workers``, faster or closer storage, cheaper decoding);
    * ``train_step_s``: mean wall time of a step (compute, with the device synchronised at its end);
    * ``train_peak_memory_mb``: peak memory so far on the rank that used most: CUDA memory allocated
      by tensors on a GPU, the process's peak resident set on a CPU.

    Batches after a gap holding a validation, an epoch end or a checkpoint write are left out (their
    wait is unknown), as is the first batch of the run. The device is
    synchronised at the end of each step so that asynchronous CUDA work is charged to the step, not to
    the wait that follows it. ``last_metrics`` holds the latest values.

    Why not Lightning's ``ThroughputMonitor``: it gives rates only (one rank's times the world size, a fixed
    batch size assumed), not the data-wait/compute split, queries per batch that vary, or peak memory.

    Args:
        window: batches per measurement (default: the trainer's ``log_every_n_steps``).
        synchronize: synchronise CUDA at the end of each step (exact split of compute and wait).
    """

    def __init__(self, window: int | None = None, synchronize: bool = True) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window, self.synchronize = window, synchronize
        self._last_end: float | None = None
        self._start, self._timed = 0.0, False
        self.last_metrics: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self.batches, self.images, self.queries, self.wait, self.busy = 0, 0, 0, 0.0, 0.0

    def _pause(self, *args: Any, **kwargs: Any) -> None:
        self._last_end = None

    on_train_epoch_start = on_train_epoch_end = on_validation_start = on_save_checkpoint = _pause

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start = time.perf_counter()
        self._timed = self._last_end is not None
        if self._timed:
            self.wait += self._start - self._last_end

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(batch, GroundingBatch):
            raise TypeError(f"Throughput counts the images and queries of a GroundingBatch, got "
                            f"{type(batch).__name__}")
        if self.synchronize and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        end = time.perf_counter()
        self._last_end = end
        if not self._timed:
            return
        self.busy += end - self._start
        self.batches += 1
        self.images += batch.num_images
        self.queries += batch.num_queries
        if self.batches >= (self.window or trainer.log_every_n_steps):
            self._log(trainer, pl_module)
            self._reset()

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        local = torch.tensor([self.images, self.queries, self.wait, self.busy, self.batches,
                              peak_memory_mb(pl_module.device)], dtype=torch.float64, device=pl_module.device)
        ranks = pl_module.all_gather(local).reshape(-1, 6).cpu()
        images, queries = ranks[:, 0].sum().item(), ranks[:, 1].sum().item()
        elapsed = (ranks[:, 2] + ranks[:, 3]).max().item()
        metrics = {
            "train_images_per_s": images / elapsed,
            "train_queries_per_s": queries / elapsed,
            "train_data_wait": (ranks[:, 2] / (ranks[:, 2] + ranks[:, 3])).max().item(),
            "train_step_s": (ranks[:, 3] / ranks[:, 4]).mean().item(),
            "train_peak_memory_mb": ranks[:, 5].max().item(),
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self.last_metrics = metrics


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device`` so far, or on a CPU the process's peak resident set (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
