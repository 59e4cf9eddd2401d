"""Checkpoint files that survive being killed: atomic writes, integrity checks, "resume from the newest".

* :class:`AtomicCheckpointIO` writes ``torch.save`` output to a temporary file next to the target,
  flushes it to disk and renames it over the target, so a checkpoint path holds either the old or the
  new complete file. (Lightning's own writer stages the file in the system temp directory and then
  *moves* it; across file systems - node-local ``/tmp`` to a shared run directory, the usual cluster
  layout - that move is a copy, which a kill can interrupt halfway.) ``train.py`` installs it.
* :func:`check_checkpoint` tells a complete checkpoint from a truncated or corrupt one without
  unpickling it: a ``torch.save`` file is a zip archive whose directory is written last.
* :func:`resolve_resume_checkpoint` picks the newest complete checkpoint of a run directory
  (``--ckpt_path auto``), warning about each newer one it had to pass over.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities import rank_zero_warn

from sambridge.models.checkpoint_io import CheckpointError

AUTO = "auto"
"""``--ckpt_path`` value that resumes from the newest complete checkpoint of the run."""

HPC_PATTERN = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")
"""Lightning's name for checkpoints written before a SLURM requeue (``hpc_ckpt_<n>.ckpt``)."""

SHARDED_METADATA = "meta.pt"
"""The file Lightning writes last into a sharded (FSDP ``state_dict_type: sharded``) checkpoint."""


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    path = Path(str(path).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing local checkpoints atomically (:func:`atomic_torch_save`).

    Remote paths (``s3://``...) keep Lightning's fsspec writer, whose object stores commit a whole
    object or nothing.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_torch_save(checkpoint, path)


def use_atomic_checkpoint_io(trainer) -> bool:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` unless it was configured with another
    writer. Returns whether it did."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True


def check_checkpoint(path: _PATH) -> None:
    """Raise ``CheckpointError`` unless ``path`` is a complete checkpoint.

    A file must be a readable zip archive (what ``torch.save`` writes) with a pickle and no member
    reaching past the end of the file; a directory (sharded checkpoint) must hold its
    ``meta.pt``, which is written last. Nothing is unpickled.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / SHARDED_METADATA).is_file():
            raise CheckpointError(f"checkpoint {path} is a directory without {SHARDED_METADATA}: the sharded "
                                  "checkpoint was not finished")
        check_checkpoint(path / SHARDED_METADATA)
        return
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({size} bytes): {err}") from err
    if not any(m.filename.endswith("data.pkl") for m in members):
        raise CheckpointError(f"checkpoint {path} is a zip archive without a pickle: not a torch.save file")
    past_end = [m.filename for m in members if m.header_offset + m.compress_size > size]
    if past_end:
        raise CheckpointError(f"checkpoint {path} is truncated: {past_end[:3]} reach past its end "
                              f"({size} bytes)")


def find_checkpoints(roots: Iterable[_PATH]) -> list[Path]:
    """Every checkpoint (``*.ckpt`` file or sharded directory) under ``roots``, newest first.

    Newest means last modified; ties go to the later ``hpc_ckpt_<n>``, then the name.
    """
    found: dict[Path, None] = {}
    for root in roots:
        root = Path(root)
        if root.is_dir():
            for path in sorted(root.rglob("*.ckpt")):
                if not any(parent.suffix == ".ckpt" for parent in path.relative_to(root).parents):
                    found[path.resolve()] = None

    def order(path: Path) -> tuple[float, int, str]:
        stamped = path / SHARDED_METADATA if path.is_dir() else path
        modified = stamped.stat().st_mtime if stamped.exists() else 0.0
        return modified, _hpc_number(path), path.name
    return sorted(found, key=order, reverse=True)


def resolve_resume_checkpoint(roots: Iterable[_PATH]) -> Path | None:
    """The newest complete checkpoint under ``roots`` (None when there is none at all).

    Each newer checkpoint that is truncated or corrupt is skipped with a warning naming it.

    Raises:
        CheckpointError: when checkpoints exist but none is complete (starting over would silently
            discard the run).
    """
    candidates = find_checkpoints(roots)
    problems = []
    for path in candidates:
        try:
            check_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            rank_zero_warn(f"{err}; resuming from an older checkpoint instead")
            continue
        return path
    if problems:
        raise CheckpointError("no complete checkpoint to resume from: " + "; ".join(problems)
                              + " (remove them, or use a new run directory to start over)")
    return None


def next_hpc_checkpoint_path(directory: _PATH) -> Path:
    """``directory/hpc_ckpt_<n>.ckpt`` numbered one past the highest there (Lightning's naming)."""
    directory = Path(directory)
    highest = max((_hpc_number(p) for p in directory.glob("hpc_ckpt_*.ckpt")), default=0)
    return directory / f"hpc_ckpt_{max(highest, 0) + 1}.ckpt"


def _hpc_number(path: Path) -> int:
    match = HPC_PATTERN.search(path.name)
    return int(match.group(1)) if match else -1
