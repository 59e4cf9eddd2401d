"""Exact resume: the data continues where a killed run stopped, and training ends where it would have."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from run_helpers import (
    checkpoint_at,
    checkpoint_every,
    cli_process,
    fit_args,
    make_shards,
    one_thread,  # noqa: F401  (fixture)
    run_cli,
    weights,
)
from test_datamodule import EpochProbe
from test_datamodule import module as datamodule
from test_pipeline import as_list, key_of, run_epoch, write_shards

from data_pipelines.pipeline import ShardStream, resolve_shards, resume_order
from data_pipelines.synthetic import generate_synthetic
from sambridge.callbacks.sample_log import read_sample_log
from sambridge.cli import main


# -------------------------------------------------------------------------------- the stream
def test_resume_order_follows_the_loaders_round_robin():
    assert resume_order([3, 3], 0) == (0, [0, 0])
    assert resume_order([3, 3], 3) == (1, [2, 1])
    assert resume_order([3, 1], 3) == (0, [2, 1])  # worker 1 ran out after one batch
    assert resume_order([3, 1], 4) == (0, [3, 1])  # the whole epoch
    assert resume_order([2, 0, 2], 3) == (2, [2, 0, 1])
    with pytest.raises(ValueError, match="the epoch has 4"):
        resume_order([3, 1], 5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,rank", [("exact", 0), ("exact", 1), ("resampled", 0)])
def test_a_resumed_epoch_is_the_tail_of_the_uninterrupted_one(tmp_path, mode, rank):
    write_shards(tmp_path, [7, 5, 4, 4, 3, 2])  # unequal shards: workers hold different numbers of batches

    def epoch(resume_after: int | None = None) -> list[list[str]]:
        data = ShardStream(resolve_shards(str(tmp_path)), key_of, as_list, mode=mode, batch_size=2, rank=rank,
                           world_size=2, num_workers=3, seed=5, shuffle_buffer=4, num_samples=30)
        data.epoch.set(3)
        if resume_after is not None:
            data.resume_at(3, resume_after)
        return run_epoch(data, persistent_workers=True)

    full = epoch()
    assert len(full) >= 4
    for consumed in range(len(full) + 1):
        assert epoch(consumed) == full[consumed:], f"resuming after {consumed} batches"


# --------------------------------------------------------------------------- the data module
@pytest.fixture(scope="module")
def datamodule_shards(tmp_path_factory) -> Path:
    """48 training images in 4 shards: 10 batches of (at most) 5 per epoch with 2 workers."""
    root = tmp_path_factory.mktemp("datamodule-shards")
    generate_synthetic(root, image_size=64, num_train=48, num_val=6, num_heldout=6, max_count=12, seed=1)
    return root


@pytest.mark.timeout(180)
def test_checkpoints_record_the_data_position_and_a_resumed_fit_sees_the_same_batches(datamodule_shards,
                                                                                      tmp_path):
    def fit(max_steps: int, ckpt_path: str | None = None) -> EpochProbe:
        probe = EpochProbe()
        every_3 = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=3, save_top_k=-1)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                            callbacks=[every_3],
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0)
        trainer.fit(probe, datamodule=datamodule(datamodule_shards, num_workers=2), ckpt_path=ckpt_path)
        return probe

    whole = fit(14)  # 10 batches per epoch
    positions = {step: torch.load(tmp_path / f"step={step}.ckpt", weights_only=True)["ShardDataModule"]
                 for step in (3, 9, 12)}
    assert [(p["epoch"], p["batches"]) for p in positions.values()] == [(0, 3), (0, 9), (1, 2)]
    assert positions[3]["batches_per_epoch"] == 10 and positions[3]["num_workers"] == 2

    resumed = fit(14, ckpt_path=str(tmp_path / "step=9.ckpt"))
    last_batch = resumed.train_keys[0]  # the resumed epoch 0 holds only its 10th batch, not a replay
    assert 0 < len(last_batch) <= 5 and last_batch == whole.train_keys[0][-len(last_batch):]
    assert resumed.train_keys[1] == whole.train_keys[1]


def test_a_checkpoint_from_the_end_of_an_epoch_starts_the_next(datamodule_shards):
    dm = datamodule(datamodule_shards, num_workers=2)
    dm.setup("fit")
    dm.load_state_dict({"epoch": 2, "seed": 0, "batches": 10, "batches_per_epoch": 10, "world_size": 1,
                        "num_workers": 2, "batch_size": 5})
    assert dm.epoch == 3 and dm.streams["train"].resume is None
    with pytest.warns(UserWarning, match="different data layout"):
        dm.load_state_dict({"epoch": 2, "seed": 0, "batches": 4, "batches_per_epoch": 10, "world_size": 2,
                            "num_workers": 2, "batch_size": 5})
    assert dm.epoch == 2 and dm.streams["train"].resume == (2, 4)


# ----------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("resume-shards"))


def run_args(shards: Path, out: Path, *extra: str) -> list[str]:
    """10 steps over 8 batches per epoch, checkpoints every 2 steps, validation every 4."""
    return fit_args(shards, out, "--trainer.max_steps", "10", "--trainer.val_check_interval", "4",
                    "--trainer.limit_val_batches", "1", *checkpoint_every(2),
                    "--trainer.callbacks+=sambridge.callbacks.sample_log.SampleLog", *extra)


def wait_for(path_glob: str, root: Path, proc, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.rglob(path_glob))
        if found:
            return found[0]
        assert proc.poll() is None, "the run ended before writing the checkpoint"
        time.sleep(0.05)
    raise TimeoutError(f"no {path_glob} under {root} after {timeout} s")


@pytest.mark.slow  # about a minute on two cores
@pytest.mark.timeout(300)
def test_a_killed_run_resumes_from_its_last_complete_checkpoint_and_ends_like_an_uninterrupted_one(
        shards, tmp_path):
    """Killed (SIGKILL) mid-epoch, its newest checkpoint cut short as if killed while writing it: the
    run resumed in a new process falls back to the previous checkpoint, sees the same batches and ends
    with the same weights as the uninterrupted run, bit for bit (both runs in fresh processes: state
    earlier tests leave in this one, such as TorchScript's compiled graphs, changes the rounding)."""
    run_cli(run_args(shards, tmp_path / "whole"))

    killed = tmp_path / "killed"
    proc = cli_process(run_args(shards, killed), stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
    try:
        wait_for("*step=4.ckpt", killed, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    written = sorted(killed.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    newest, fallback = written[-1], written[-2]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # as if killed while writing it

    output = run_cli(run_args(shards, killed, "--ckpt_path", "auto"))
    assert f"{newest.name} is truncated" in output and f"resuming from {fallback}" in output
    assert 0 < torch.load(fallback, weights_only=True)["global_step"] < 8  # inside the first epoch

    final = torch.load(checkpoint_at(killed / "lightning_logs/version_1", 10), weights_only=True)
    assert final["global_step"] == 10 and final["ShardDataModule"]["epoch"] == 1
    # the same batches, in the same order, across the kill and the epoch boundary
    assert read_sample_log(killed / "samples/samples-rank0.jsonl") == \
        read_sample_log(tmp_path / "whole/samples/samples-rank0.jsonl")
    expected = weights(checkpoint_at(tmp_path / "whole", 10))
    for name, value in final["state_dict"].items():
        assert torch.equal(value, expected[name]), name


# --------------------------------------------------------------------------- SLURM's warning
def fake_scontrol(folder: Path) -> Path:
    """An ``scontrol`` that records its arguments (the test machine has no SLURM)."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "calls"}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder / "calls"


@pytest.mark.slow  # 22 s; the default suite keeps the killed-run resume above (make test-all runs this)
@pytest.mark.timeout(300)
def test_sigusr1_checkpoints_between_steps_requeues_and_the_job_resumes(shards, tmp_path):
    calls = fake_scontrol(tmp_path / "bin")
    run = tmp_path / "run"
    args = run_args(shards, run, "--trainer.callbacks+=sambridge.callbacks.requeue.CheckpointOnSignal")
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = cli_process(args, env, stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
    try:
        wait_for("*step=2.ckpt", run, proc)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=240) == 0
    finally:
        proc.kill()
    hpc = run / "hpc_ckpt_1.ckpt"
    state = torch.load(hpc, weights_only=True)
    assert 2 <= state["global_step"] < 10
    assert calls.read_text().split() == ["requeue", "4242"]

    output = run_cli(run_args(shards, run, "--ckpt_path", "auto"))
    assert f"resuming from {hpc}" in output
    final = torch.load(checkpoint_at(run, 10), weights_only=True)
    assert final["global_step"] == 10


# ---------------------------------------------------------------------------------------- wandb
def wandb_run_ids(save_dir: Path) -> list[str]:
    """Run ids of the offline wandb runs under ``save_dir`` (one directory per process that logged)."""
    return sorted(p.name.rsplit("-", 1)[1] for p in (save_dir / "wandb").glob("offline-run-*"))


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_thread")
def test_a_resumed_run_logs_into_the_same_offline_wandb_run(shards, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # Lightning sets it for offline loggers; restored afterwards
    monkeypatch.setenv("WANDB_SILENT", "true")

    def fit(run: Path, steps: int, *extra: str) -> None:
        main(fit_args(shards, run, "--trainer.logger=sambridge.loggers.WandbLogger",
                      f"--trainer.logger.init_args.save_dir={run}", "--trainer.max_steps", str(steps),
                      "--trainer.limit_val_batches", "0", *checkpoint_every(2), *extra, workers=0))
        wandb.finish()  # what the end of the process does

    fit(tmp_path / "run", 2)
    stored = (tmp_path / "run" / "wandb-run-id").read_text().strip()
    fit(tmp_path / "run", 4, "--ckpt_path", "auto")
    assert wandb_run_ids(tmp_path / "run") == [stored, stored]  # two processes, one wandb run
    assert torch.load(checkpoint_at(tmp_path / "run", 4), weights_only=True)["global_step"] == 4

    fit(tmp_path / "other", 2)
    assert wandb_run_ids(tmp_path / "other") != [stored]  # a new run directory is a new wandb run
