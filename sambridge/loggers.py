"""A wandb logger that is offline by default and continues the same wandb run when training resumes."""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

from data_pipelines.atomic import atomic_write

RUN_ID_FILE = "wandb-run-id"
"""File in ``save_dir`` that holds the run's wandb id."""


def read_run_id(save_dir: str | os.PathLike) -> str | None:
    """The wandb run id stored in ``save_dir``, if any."""
    path = Path(save_dir) / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` that keeps one wandb run per run directory.

    The run id is read from ``<save_dir>/wandb-run-id``, or made and written there (atomically, by
    rank 0) on first use, so a run resumed from a checkpoint (a requeued SLURM job, ``--ckpt_path
    auto``) logs into the same wandb run. Use a new ``save_dir`` for a new run. Offline by default:
    nothing leaves the machine until ``wandb sync <save_dir>/wandb/offline-run-*``; set
    ``offline: false`` (and ``WANDB_API_KEY``) to log online.

    Args:
        project: wandb project.
        save_dir: the run directory: wandb files, the run id file and, unless a checkpoint callback
            says otherwise, checkpoints go below it.
        name: display name of the run.
        offline: log to local files only.
        id: wandb run id (default: the stored one, else a new one).
        **kwargs: further ``lightning.pytorch.loggers.WandbLogger`` / ``wandb.init`` arguments
            (``entity``, ``tags``, ``group``, ``log_model``...).
    """

    def __init__(self, project: str = "sambridge", save_dir: str = "runs", name: str | None = None,
                 offline: bool = True, id: str | None = None, **kwargs: Any) -> None:
        run_id = id or read_run_id(save_dir) or new_run_id()
        _store_run_id(save_dir, run_id)
        super().__init__(project=project, save_dir=save_dir, name=name, offline=offline, id=run_id, **kwargs)


def new_run_id() -> str:
    """A fresh wandb-style run id: 8 characters of ``[a-z0-9]``, independent of the run's seeds."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


@rank_zero_only
def _store_run_id(save_dir: str | os.PathLike, run_id: str) -> None:
    if read_run_id(save_dir) == run_id:
        return
    atomic_write(Path(save_dir) / RUN_ID_FILE, run_id + "\n")
