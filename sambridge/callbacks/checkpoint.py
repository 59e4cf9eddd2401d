"""Lightning's ``ModelCheckpoint``, writing into the run directory whatever the logger."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose default ``dirpath`` is ``<trainer.default_root_dir>/checkpoints``.

    Lightning's own default follows the first logger (``<save_dir>/<name>/<version>/checkpoints``: for
    wandb a folder named after the run id), so a config that shares its checkpoint callback between runs
    (``configs/trainer/default.yaml``) could not say where ``last.ckpt`` lands. With this callback every
    run keeps it at ``<run directory>/checkpoints/last.ckpt``, and ``--ckpt_path auto`` finds it under
    the run directory. An explicit ``dirpath`` and all other arguments are Lightning's.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:  # noqa: D102
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)
