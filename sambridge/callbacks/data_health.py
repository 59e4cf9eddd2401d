"""Make skipped data visible: per-epoch skip counts as metrics, and a summary when a run ends."""

from __future__ import annotations

from collections import Counter

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class DataHealth(Callback):
    """Log the bad samples/shards the data module skipped, by split and reason, and sum them up.

    Works with any data module that has ``skipped_by_reason() -> {split: {reason: count}}``
    (``data_pipelines.ShardDataModule``). After each training and validation epoch it logs
    ``data/skipped_{split}`` (that epoch's count, summed over ranks) and, when not zero, one
    ``data/skipped_{split}/{reason}`` per reason (spaces as ``_``); when fit, validate or test ends it prints the
    run's totals, or that nothing was skipped. ``train.py`` adds it to every run.
    """

    def __init__(self) -> None:
        self._logged: dict[str, Counter] = {}

    def _counts(self, trainer: Trainer) -> dict[str, dict[str, int]]:
        source = getattr(trainer, "datamodule", None)
        return source.skipped_by_reason() if hasattr(source, "skipped_by_reason") else {}

    def _log_split(self, trainer: Trainer, module: LightningModule, split: str) -> None:
        counts = Counter(self._counts(trainer).get(split, {}))
        if not counts and split not in self._logged:
            return
        new = counts - self._logged.get(split, Counter())
        self._logged[split] = counts
        reasons = sorted(counts)
        values = torch.tensor([float(new[r]) for r in reasons], device=module.device)
        values = trainer.strategy.reduce(values, reduce_op="sum")  # every rank logs the same sums
        metrics = {f"data/skipped_{split}": float(values.sum())}
        metrics |= {f"data/skipped_{split}/{r.replace(' ', '_')}": float(v)
                    for r, v in zip(reasons, values, strict=True) if v}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        self._log_split(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        if not trainer.sanity_checking:
            self._log_split(trainer, pl_module, "val")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        self._summarise(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        if trainer.state.fn == "validate":
            self._summarise(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        self._summarise(trainer)

    def _summarise(self, trainer: Trainer) -> None:
        counts = self._counts(trainer)
        if not counts:
            return
        parts = []
        for split, reasons in counts.items():
            detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()) if n)
            parts.append(f"{split} {sum(reasons.values())}" + (f" ({detail})" if detail else ""))
        rank_zero_info(f"data health (rank 0): skipped samples/shards: {'; '.join(parts)}")
