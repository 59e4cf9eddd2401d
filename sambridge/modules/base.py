"""The skeleton every sambridge LightningModule shares (torchgeo's BaseTask pattern)."""

from __future__ import annotations

import os
from typing import Any, TypeVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from sambridge.acceleration import checkpoint_image_encoder, compile_image_encoder
from sambridge.optim import OptimizerConfig, build_optimizer

Config = TypeVar("Config")


def config_arg(value: Config | dict[str, Any] | None, cls: type[Config]) -> Config:
    """A dataclass argument as given, from its fields (LightningCLI passes and records dataclass arguments
    as dicts), or its defaults when ``None``."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value


class BaseTask(pl.LightningModule):
    """The task to train: a sambridge LightningModule, GroundingModule or DistillModule.

    (The first line titles ``--model`` in ``sambridge fit --help``.) Hook order: ``save_hyperparameters``
    -> ``configure_models`` -> ``configure_losses`` -> ``configure_metrics``. Subclasses implement those
    and ``_shared_step(batch, stage)``.

    ``monitor``/``mode`` name the metric checkpoints and early stopping key on.

    When the Trainer sets up, ``configure_model`` applies the speed/memory switches to the image
    encoder of ``self.model`` (:mod:`sambridge.acceleration`). Each training step reseeds torch
    from (seed, epoch, batch, rank), so dropout and drop-path masks do not depend on what ran before
    the step (validation, loader start-up) and a resumed run draws the same masks as an
    uninterrupted one (the seed is the run's ``seed_everything``); training steps run TorchScript
    functions unoptimised, so a new process computes its first steps like an old one its later ones.

    Args:
        optimizer: learning rates, parameter groups, warm-up and cosine schedule.
        image_size: model input size (square, multiple of 32); linked to the data module's.
        compile: ``torch.compile`` the image encoder (each SAM2 Hiera block, or the timm trunk).
        activation_checkpointing: recompute the image encoder's activations in the backward pass
            (each Hiera block, or each timm stage) instead of storing them: less memory, about a
            third more encoder compute. sam3's grounding head always checkpoints in training.
    """

    monitor = "val_loss"
    mode = "min"

    def __init__(self, optimizer: OptimizerConfig | None = None, image_size: int | None = None,
                 compile: bool = False, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_config = config_arg(optimizer, OptimizerConfig)
        self.compile_encoder, self.checkpoint_encoder = compile, activation_checkpointing
        self._encoder_compiled = False
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

    def _shared_step(self, batch: Any, stage: str) -> dict[str, Any]:
        """Loss (and, outside training, predictions) for one batch: ``{"loss": ..., ...}``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning plumbing
    def setup(self, stage: str) -> None:
        # Adam moments of parameters that get no gradient (e.g. unused rows of a text tower's
        # token table) decay into denormal floats, which make CPU float ops ~100x slower: on a
        # CPU that was two thirds of a tiny model's step. Flushing them to zero changes nothing else.
        torch.set_flush_denormal(True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # TorchScript functions (sam3's box IoUs in the loss) switch to their own autodiff after their
        # first calls in a process, which rounds gradients differently; unoptimised, every step of every
        # process computes the same way, so a resumed run matches an uninterrupted one
        with torch.jit.optimized_execution(False):
            return self._shared_step(batch, "train")["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._shared_step(batch, "test")

    def configure_model(self) -> None:
        """Apply ``activation_checkpointing`` and ``compile`` to the image encoder (once; Lightning calls
        this hook at every fit/validate/test/predict, inside the strategy's set-up context)."""
        if self.checkpoint_encoder:
            checkpoint_image_encoder(self.model)
        if self.compile_encoder and not self._encoder_compiled:
            compile_image_encoder(self.model)
            self._encoder_compiled = True

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(step_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), self.current_epoch, batch_idx,
                                    self.global_rank))

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip as Lightning would, also for optimisers that unscale gradients themselves (fused AdamW, which
        ``configure_optimizers`` builds on GPUs); Lightning's mixed-precision plugin refuses to clip those.

        bf16 gradients need no unscaling; with an fp16 gradient scaler they are unscaled here first (the
        scaler's ``step`` then tells the fused optimiser not to unscale again). Under FSDP the norm is
        computed over the shards by FSDP's own ``clip_grad_norm_``. No host synchronisation either way.
        """
        if not gradient_clip_val:
            return
        from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self.trainer.strategy
        scaler = getattr(strategy.precision_plugin, "scaler", None)
        by_value = str(gradient_clip_algorithm or "norm") == "value"
        if isinstance(strategy, FSDPStrategy) and not by_value:
            if scaler is not None:
                scaler.unscale_(optimizer)
            strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        if not _optimizer_handles_unscaling(optimizer):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if by_value:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optimizer_config
        total = config.total_steps or int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = build_optimizer(self.trainable_parameter_groups(), config, max(total, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The torch seed of one training step: a hash of (seed, epoch, batch index in the epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1, np.uint64)[0] >> 1)
