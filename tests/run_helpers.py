"""Shared pieces of the multi-process training tests: tiny shards and the CLI arguments of a tiny run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipelines.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/demo/grounding_tiny.yaml"


def make_shards(root: Path) -> Path:
    """16 training images in 4 shards, 8 validation images in 2 shards, 64 px."""
    generate_synthetic(root, image_size=64, num_train=16, num_val=8, num_heldout=4, max_count=4)
    return root


def fit_args(shards: Path, out: Path, *extra: str, workers: int = 2) -> list[str]:
    """``fit`` of the tiny demo model at 64 px, batch 2, CSV logs and checkpoints under ``out``."""
    return ["fit", "--config", str(DEMO),
            "--data.init_args.train", str(shards / "train"), "--data.init_args.val", str(shards / "val"),
            "--data.init_args.image_size", "64", "--data.init_args.batch_size", "2",
            "--data.init_args.num_workers", str(workers), "--trainer.default_root_dir", str(out),
            "--trainer.logger.init_args.save_dir", str(out), f"--trainer.callbacks.dirpath={out / 'checkpoints'}",
            "--trainer.log_every_n_steps", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


def checkpoint_every(steps: int) -> list[str]:
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.every_n_train_steps={steps}", "--trainer.callbacks.save_top_k=-1"]


@pytest.fixture
def one_thread():
    """Runs in this process use one intra-op thread, as the child processes do (see ``cli_process``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_process(args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """``python train.py ARGS`` in the repository, as a child process with one intra-op thread (several
    processes share the test machine's cores; more threads than cores make OpenMP crawl)."""
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def exit_code(argv: list[str]) -> int:
    """``sambridge ARGV`` in this process; its exit code (0, or what it ended with)."""
    from sambridge.cli import main

    try:
        main(argv)
    except SystemExit as stopped:
        return stopped.code
    return 0


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> str:
    """Run ``python train.py ARGS`` to completion; returns its output, fails the test on an error."""
    proc = cli_process(args, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


def checkpoint_at(root: Path, step: int) -> Path:
    found = sorted(root.rglob(f"*step={step}.ckpt"))
    assert len(found) == 1, f"expected one checkpoint of step {step} under {root}, found {found}"
    return found[0]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
