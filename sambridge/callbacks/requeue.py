"""Checkpoint between two training steps when SLURM warns that the time limit is near, then requeue."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from sambridge.checkpointing import HPC_PATTERN, next_hpc_checkpoint_path

log = logging.getLogger(__name__)

Signal = Literal["SIGUSR1", "SIGUSR2"]


class Preempted(SystemExit):
    """Raised on every rank once the signal's checkpoint is written: the processes exit with status 0."""


class CheckpointOnSignal(Callback):
    """On a signal, write a checkpoint at the next optimizer-step boundary on all ranks together,
    requeue the SLURM job and exit.

    ``#SBATCH --signal=SIGUSR1@90`` makes SLURM send SIGUSR1 to every task 90 s before the time
    limit. The handler only records it. After each training batch that completed an optimizer step,
    the ranks agree whether any of them got the signal (one all-reduce of a flag); if so, all of them
    write ``hpc_ckpt_<n>.ckpt`` into ``trainer.default_root_dir`` together (Lightning's name for it),
    rank 0 deletes older ones beyond ``keep`` and runs ``scontrol requeue``, and every process exits
    with status 0. The requeued job resumes from that checkpoint (``fit`` under SLURM defaults to
    ``--ckpt_path auto``).

    Use it with ``SLURMEnvironment(auto_requeue=False)`` (``configs/trainer/slurm.yaml`` does):
    Lightning's own requeue writes the checkpoint inside the signal handler, at whatever point of a
    step the signal arrives (Lightning issue #21406). Leave a lead time covering one training step
    plus writing a checkpoint. SIGTERM stays Lightning's (it stops the run without a checkpoint).

    Args:
        signal: the signal to act on.
        requeue: run ``scontrol requeue`` on the SLURM job after the checkpoint (outside SLURM the
            process only checkpoints and exits).
        keep: ``hpc_ckpt_*.ckpt`` files to keep; older ones are deleted once a new one is written.
    """

    def __init__(self, signal: Signal = "SIGUSR1", requeue: bool = True, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.signal, self.requeue, self.keep = signal, requeue, keep
        self.received = False
        self._pid: int | None = None
        self._previous: Any = None
        self._step_at_start = 0

    # ------------------------------------------------------------------ the signal
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() == self._pid:  # forked DataLoader workers inherit the handler: ignore it there
            self.received = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.received, self._pid = False, os.getpid()
        self._previous = signal.signal(getattr(signal, self.signal), self._handle)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is not None:
            signal.signal(getattr(signal, self.signal), self._previous)
            self._previous = None

    # ------------------------------------------------------------------ between steps
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step_at_start:  # inside a gradient-accumulation window
            return
        if trainer.strategy.reduce_boolean_decision(self.received, all=False):
            self._checkpoint_and_exit(trainer)

    def _checkpoint_and_exit(self, trainer: pl.Trainer) -> None:
        path = Path(trainer.strategy.broadcast(str(next_hpc_checkpoint_path(trainer.default_root_dir))))
        trainer.save_checkpoint(path)
        trainer.strategy.barrier("CheckpointOnSignal")
        if trainer.is_global_zero:
            log.warning("%s received: wrote %s at step %d", self.signal, path, trainer.global_step)
            self._prune(path.parent)
            if self.requeue:
                requeue_slurm_job()
        raise Preempted(0)

    def _prune(self, directory: Path) -> None:
        checkpoints = sorted((p for p in directory.glob("hpc_ckpt_*.ckpt") if HPC_PATTERN.search(p.name)),
                             key=lambda p: int(HPC_PATTERN.search(p.name).group(1)))
        for old in checkpoints[:-self.keep]:
            old.unlink(missing_ok=True)


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array task included); returns whether SLURM accepted it."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("not a SLURM job (no SLURM_JOB_ID): nothing to requeue")
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if result.returncode:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
        return False
    log.warning("requeued SLURM job %s", job)
    return True
