"""The skeleton every sambridge LightningModule shares (torchgeo's BaseTask pattern)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from sambridge.optim import OptimizerConfig, build_optimizer


class BaseTask(pl.LightningModule):
    """Hook order: ``save_hyperparameters`` -> ``configure_models`` -> ``configure_losses`` ->
    ``configure_metrics``. Subclasses implement those and ``_shared_step(batch, stage)``.

    ``monitor``/``mode`` name the metric checkpoints and early stopping key on.
    """

    monitor = "val_loss"
    mode = "min"

    def __init__(self, optimizer: OptimizerConfig | None = None, image_size: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    # ------------------------------------------------------------------ hooks for subclasses
    def configure_models(self) -> None:
        """Build ``self.model`` (and any frozen helper models)."""
        raise NotImplementedError

    def configure_losses(self) -> None:
        """Build ``self.loss_fn``."""

    def configure_metrics(self) -> None:
        """Build per-stage metric collections."""

    def trainable_parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named trainable parameters grouped for per-group learning rates."""
        return {"all": [(n, p) for n, p in self.named_parameters() if p.requires_grad]}

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor | None:
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning plumbing
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optimizer_config
        total = config.total_steps or int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = build_optimizer(self.trainable_parameter_groups(), config, max(total, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
