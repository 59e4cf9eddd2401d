"""GPU checks of the shipped trainer presets on a real-size model (skipped without CUDA).

    python -m pytest tests/test_gpu.py -m gpu -s     # prints the measured images/s
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from run_helpers import REPO, checkpoint_at, run_cli

from data_pipelines.synthetic import generate_synthetic

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TASK = REPO / "configs/grounding/sam2.1_hiera_t_full.yaml"
SHARED = ["--config", str(REPO / "configs/trainer/default.yaml"), "--config", str(REPO / "configs/data/shards.yaml")]
"""What the run config is stacked on (its header's command)."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu-shards")
    generate_synthetic(root, image_size=1024, num_train=16, num_val=4, num_heldout=2, max_count=4)
    return root


def real_size_args(shards: Path, out: Path, *extra: str) -> list[str]:
    """grounded_sam2_hiera_t at 1024 px from random weights (no official checkpoint needed)."""
    return ["fit", *SHARED, "--config", str(TASK), "--config", str(REPO / "configs/trainer/bf16.yaml"),
            "--model.init_args.sam2_checkpoint", "null", "--model.init_args.model_args", "{}",
            "--data.init_args.train", str(shards / "train"), "--data.init_args.val", str(shards / "val"),
            "--data.init_args.batch_size", "1", "--data.init_args.num_workers", "2",
            "--trainer.devices", str(torch.cuda.device_count()), "--trainer.max_steps", "4",
            "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(out),
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=sambridge.callbacks.throughput.Throughput", "--trainer.callbacks.window=2",
            *extra]


def check_run(out: Path) -> dict[str, float]:
    state = torch.load(checkpoint_at(out, 4), map_location="cpu", weights_only=True)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert losses and all(math.isfinite(loss) for loss in losses)
    rates = [{k: float(v) for k, v in r.items() if v} for r in rows if r.get("train_images_per_s")]
    assert rates, "no throughput logged"
    assert rates[-1]["train_images_per_s"] > 0 and 0 <= rates[-1]["train_data_wait"] <= 1
    return rates[-1]


@pytest.mark.timeout(900)
def test_ddp_bf16_steps_of_the_real_size_model(shards, tmp_path):
    run_cli(real_size_args(shards, tmp_path, "--config", str(REPO / "configs/trainer/ddp.yaml")), timeout=850)
    last = check_run(tmp_path)
    print(f"\ngrounded_sam2_hiera_t 1024 px, DDP bf16, batch 1/GPU on {torch.cuda.device_count()} "
          f"{torch.cuda.get_device_name()}: {last['train_images_per_s']:.2f} images/s, "
          f"{last['train_step_s']:.3f} s/step, data wait {last['train_data_wait']:.2f}")


@pytest.mark.timeout(900)
def test_fsdp_bf16_steps_of_the_real_size_model(shards, tmp_path):
    run_cli(real_size_args(shards, tmp_path, "--config", str(REPO / "configs/trainer/fsdp.yaml")),
            timeout=850)
    last = check_run(tmp_path)
    print(f"\ngrounded_sam2_hiera_t 1024 px, FSDP bf16: {last['train_images_per_s']:.2f} images/s")
