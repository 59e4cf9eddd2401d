"""Checkpoint files that survive being killed: atomic writes, integrity checks, "resume from the newest".

* :class:`AtomicCheckpointIO` writes ``torch.save`` output through
  :func:`data_pipelines.atomic.atomic_write` (a temporary file next to the target, flushed to disk
  and renamed over it), so a checkpoint path holds either the old or the new complete file.
  (Lightning's own writer stages the file in the system temp directory and then *moves* it; across
  file systems - node-local ``/tmp`` to a shared run directory, the usual cluster layout - that move
  is a copy, which a kill can interrupt halfway.) ``train.py`` installs it.
  Beside each file it writes a digest, ``<name>.sha256`` (sha256, size and global step, as JSON). A
  temporary left by a killed write is removed by the next write of the same file on that host.
* :func:`check_checkpoint` tells a complete checkpoint from a truncated or corrupt one without
  unpickling it: a ``torch.save`` file is a zip archive whose directory is written last, and a file
  with a digest must match it byte for byte (a flipped byte inside a tensor fails).
* :func:`resolve_resume_checkpoint` picks the complete checkpoint of a run directory that is
  furthest into training (``--ckpt_path auto``), warning about each further one it had to pass over.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities import rank_zero_warn

from data_pipelines.atomic import atomic_write, write_json_atomic
from data_pipelines.writer import sha256_of
from sambridge.models.checkpoint_io import CheckpointError

AUTO = "auto"
"""``--ckpt_path`` value that resumes from the complete checkpoint of the run furthest into training."""

HPC_PATTERN = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")
"""Lightning's name for checkpoints written before a SLURM requeue (``hpc_ckpt_<n>.ckpt``)."""

STEP_PATTERN = re.compile(r"step=(\d+)")
"""The global step in Lightning's checkpoint file names (``epoch=0-step=40.ckpt``)."""

DIGEST_SUFFIX = ".sha256"
"""Suffix of the digest file written beside each checkpoint (``last.ckpt`` -> ``last.ckpt.sha256``)."""

SHARDED_METADATA = "meta.pt"
"""The file Lightning writes last into a sharded (FSDP ``state_dict_type: sharded``) checkpoint."""


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def digest_path(path: _PATH) -> Path:
    """Where the digest of checkpoint ``path`` lives."""
    return Path(f"{path}{DIGEST_SUFFIX}")


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same directory and an atomic rename,
    then its digest beside it (:func:`digest_path`).

    A kill between the two leaves a checkpoint whose digest is the previous file's: it fails
    :func:`check_checkpoint` and ``--ckpt_path auto`` passes over it, naming it.
    """
    path = atomic_write(str(path).removeprefix("file://"), lambda file: torch.save(obj, file))
    step = obj.get("global_step") if isinstance(obj, dict) else None
    record = {"sha256": sha256_of(path), "bytes": path.stat().st_size,
              "global_step": step if isinstance(step, int) else None}
    write_json_atomic(digest_path(path), record)


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

    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove a checkpoint (``ModelCheckpoint`` keeping its top k) and its digest."""
        super().remove_checkpoint(path)
        if _is_local(path):
            digest_path(str(path).removeprefix("file://")).unlink(missing_ok=True)


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
    _check_digest(path, size)


def _read_digest(path: Path) -> dict | None:
    recorded = digest_path(path)
    if not recorded.is_file():
        return None
    try:
        record = json.loads(recorded.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError("no 'sha256' string")
    except ValueError as err:
        raise CheckpointError(f"checkpoint digest {recorded} is unreadable ({err}): remove it to accept "
                              f"{path.name} unchecked") from err
    return record


def _check_digest(path: Path, size: int) -> None:
    record = _read_digest(path)
    if record is None:
        return  # written by another writer: the zip structure is all there is to check
    if record.get("bytes") not in (None, size) or sha256_of(path) != record["sha256"]:
        raise CheckpointError(f"checkpoint {path} does not match its digest {digest_path(path).name} "
                              "(corrupt, or the job was killed between writing the two): remove the "
                              "digest to accept the file unchecked")


def checkpoint_step(path: _PATH) -> int:
    """The global step a checkpoint was saved at: its digest's record, else its ``global_step`` entry
    (read with ``mmap`` and ``weights_only``), else the ``step=N`` of Lightning's file names (so a
    broken file still ranks where it belongs, and is named when passed over); -1 when none is there."""
    path = Path(path)
    if not path.is_dir():
        try:
            record = _read_digest(path)
        except CheckpointError:
            record = None
        if record is not None and isinstance(record.get("global_step"), int):
            return record["global_step"]
    stamped = path / SHARDED_METADATA if path.is_dir() else path
    try:
        step = torch.load(stamped, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # noqa: BLE001 - check_checkpoint names what is wrong with the file
        step = None
    if isinstance(step, int):
        return step
    named = STEP_PATTERN.search(path.name)
    return int(named.group(1)) if named else -1


def find_checkpoints(roots: Iterable[_PATH]) -> list[Path]:
    """Every checkpoint (``*.ckpt`` file or sharded directory) under ``roots``, furthest first.

    Furthest means the highest global step (:func:`checkpoint_step`); ties go to the last modified,
    then the later ``hpc_ckpt_<n>``, then the name.
    """
    found: dict[Path, None] = {}
    for root in roots:
        root = Path(root)
        if root.is_dir():
            for path in sorted(root.rglob("*.ckpt")):
                if not any(parent.suffix == ".ckpt" for parent in path.relative_to(root).parents):
                    found[path.resolve()] = None

    def order(path: Path) -> tuple[int, float, int, str]:
        stamped = path / SHARDED_METADATA if path.is_dir() else path
        modified = stamped.stat().st_mtime if stamped.exists() else 0.0
        return checkpoint_step(path), modified, _hpc_number(path), path.name
    return sorted(found, key=order, reverse=True)


def resolve_resume_checkpoint(roots: Iterable[_PATH]) -> Path | None:
    """The complete checkpoint under ``roots`` furthest into training (None when there is none at all).

    Each further checkpoint that is truncated or corrupt is skipped with a warning naming it.

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
