"""Checkpoint files: atomic writes, truncation detection, newest-complete resolution, the CLI's writer."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pytest
import torch

from sambridge.checkpointing import (
    AtomicCheckpointIO,
    check_checkpoint,
    find_checkpoints,
    next_hpc_checkpoint_path,
    resolve_resume_checkpoint,
)
from sambridge.models.checkpoint_io import CheckpointError


def checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}


def saved(path: Path, step: int, mtime: float | None = None) -> Path:
    AtomicCheckpointIO().save_checkpoint(checkpoint(step), path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_an_interrupted_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = saved(tmp_path / "last.ckpt", 1)
    real_save = torch.save

    def dies_halfway(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(file.tell() // 2)
        raise KeyboardInterrupt  # the job is killed while the bytes are being written

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint(checkpoint(2), path)
    monkeypatch.undo()
    check_checkpoint(path)
    assert step_of(path) == 1
    # no temporary file left behind; the digest still describes the previous file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


def test_a_temporary_left_by_a_killed_write_is_removed_by_the_next_write(tmp_path):
    path = saved(tmp_path / "last.ckpt", 1)
    writer = ("import sys, time; from pathlib import Path; from data_pipelines.atomic import atomic_write; "
              "atomic_write(Path(sys.argv[1]), lambda f: (f.write(b'x'), f.flush(), time.sleep(120)))")
    child = subprocess.Popen([sys.executable, "-c", writer, str(path)])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".last.ckpt.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.1)
    child.kill()  # SIGKILL: no clean-up runs
    child.wait()
    assert len(list(tmp_path.glob(".last.ckpt.*.tmp"))) == 1
    busy = tmp_path / f".last.ckpt.{socket.gethostname()}.{os.getppid()}.tmp"  # a live writer's stays
    busy.touch()
    saved(path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "last.ckpt", "last.ckpt.sha256"]
    assert step_of(path) == 2


def test_the_temporary_file_is_renamed_within_the_target_directory(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))),
                                                         real_replace(src, dst)))
    path = saved(tmp_path / "run" / "step=3.ckpt", 3)
    assert step_of(path) == 3
    assert [target.name for _, target in renames] == ["step=3.ckpt", "step=3.ckpt.sha256"]
    for source, target in renames:  # same file system: the rename is atomic
        assert source.parent == target.parent == path.parent


def test_lightning_default_writer_stages_checkpoints_in_the_system_temp_directory(tmp_path):
    """Why sambridge installs its own writer: fsspec's local transaction writes to the system temp
    directory and moves the file afterwards, a copy when the run directory is on another file system."""
    target = tmp_path / "x.ckpt"
    fs = fsspec.filesystem("file")
    with fs.transaction:
        with fs.open(str(target), "wb") as file:
            file.write(b"data")
            staged = Path(file.temp)
    assert staged.parent == Path(tempfile.gettempdir()) != target.parent
    assert target.read_bytes() == b"data"


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_checkpoints_are_detected(tmp_path, keep):
    path = saved(tmp_path / "a.ckpt", 7)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated"):
        check_checkpoint(path)


def test_other_broken_checkpoints_are_detected(tmp_path):
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"text\.ckpt is truncated or corrupt"):
        check_checkpoint(tmp_path / "text.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        check_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "sharded.ckpt").mkdir()
    with pytest.raises(CheckpointError, match="meta.pt"):
        check_checkpoint(tmp_path / "sharded.ckpt")
    torch.save({"step": 1}, tmp_path / "sharded.ckpt" / "meta.pt")
    check_checkpoint(tmp_path / "sharded.ckpt")


def test_the_newest_complete_checkpoint_is_chosen_and_broken_newer_ones_are_named(tmp_path):
    old = saved(tmp_path / "lightning_logs/version_0/checkpoints/step=2.ckpt", 2, mtime=1000)
    middle = saved(tmp_path / "lightning_logs/version_0/checkpoints/step=4.ckpt", 4, mtime=2000)
    newest = saved(tmp_path / "hpc_ckpt_1.ckpt", 5, mtime=3000)
    assert find_checkpoints([tmp_path]) == [newest.resolve(), middle.resolve(), old.resolve()]
    assert resolve_resume_checkpoint([tmp_path]) == newest.resolve()

    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"hpc_ckpt_1\.ckpt is truncated.*resuming from an older checkpoint"):
        assert resolve_resume_checkpoint([tmp_path]) == middle.resolve()

    for path in (old, middle):
        path.write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume_checkpoint([tmp_path])
    assert resolve_resume_checkpoint([tmp_path / "empty"]) is None


def test_auto_resumes_the_furthest_step_not_the_last_modified_file(tmp_path):
    """A copied run directory gets new modification times: the step decides, not the clock."""
    furthest = saved(tmp_path / "checkpoints/epoch=1-step=20.ckpt", 20, mtime=1000)
    last = saved(tmp_path / "checkpoints/last.ckpt", 20, mtime=1500)
    earlier = saved(tmp_path / "checkpoints/epoch=0-step=10.ckpt", 10, mtime=2000)  # copied last
    assert find_checkpoints([tmp_path]) == [last.resolve(), furthest.resolve(), earlier.resolve()]
    assert step_of(resolve_resume_checkpoint([tmp_path])) == 20

    for path in (furthest, last, earlier):  # written by another writer: the step is read from the file
        path.with_name(path.name + ".sha256").unlink()
    assert step_of(resolve_resume_checkpoint([tmp_path])) == 20


def test_a_byte_flipped_inside_a_tensor_is_caught_by_the_digest(tmp_path):
    older = saved(tmp_path / "step=1.ckpt", 1)
    newer = saved(tmp_path / "step=2.ckpt", 2)
    blob = bytearray(newer.read_bytes())
    offset = blob.find(torch.full((64, 64), 2.0).numpy().tobytes()[:64])  # inside the tensor's bytes
    assert offset > 0
    blob[offset + 1] ^= 0xFF
    newer.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"step=2\.ckpt does not match its digest"):
        check_checkpoint(newer)
    with pytest.warns(UserWarning, match=r"step=2\.ckpt does not match its digest"):
        assert resolve_resume_checkpoint([tmp_path]) == older.resolve()


def test_removing_a_checkpoint_removes_its_digest(tmp_path):
    path = saved(tmp_path / "step=1.ckpt", 1)
    assert (tmp_path / "step=1.ckpt.sha256").is_file()
    AtomicCheckpointIO().remove_checkpoint(path)
    assert list(tmp_path.iterdir()) == []


def test_hpc_checkpoints_are_numbered_after_the_highest(tmp_path):
    assert next_hpc_checkpoint_path(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    for n in (1, 3):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").touch()
    assert next_hpc_checkpoint_path(tmp_path) == tmp_path / "hpc_ckpt_4.ckpt"


def test_the_cli_trainer_writes_checkpoints_atomically(tmp_path):
    from sambridge.cli import lightning_cli

    repo = Path(__file__).resolve().parents[1]
    cli = lightning_cli(["--config", str(repo / "configs/demo/grounding_tiny.yaml"),
                         "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_an_explicit_broken_ckpt_path_is_refused_before_loading(tmp_path, capsys):
    from sambridge.cli import main

    repo = Path(__file__).resolve().parents[1]
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(repo / "configs/demo/grounding_tiny.yaml"), "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(broken)])
    assert stopped.value.code == 2
    assert re.search(r"^error: checkpoint .*broken\.ckpt is truncated or corrupt",
                     capsys.readouterr().err.strip().splitlines()[-1])
