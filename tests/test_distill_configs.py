"""The distillation configs parse; the demo one trains in-process, reloads and exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipelines.synthetic import generate_synthetic
from sambridge.cli import lightning_cli, main
from sambridge.losses.distill import DistillWeights
from sambridge.models import load_student
from sambridge.modules import DistillModule
from sambridge.modules.checkpoint import read_lightning_checkpoint

REPO = Path(__file__).resolve().parents[1]
DISTILL_CONFIGS = [
    REPO / "configs/demo/distill_tiny.yaml",
    *sorted((REPO / "configs/distill").glob("*.yaml")),
]


@pytest.mark.parametrize("config", DISTILL_CONFIGS, ids=lambda p: p.name)
def test_config_parses_against_the_module_signatures(config: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        lightning_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: sambridge.modules.DistillModule" in printed and "teacher:" in printed
    assert "teacher_checkpoint:" in printed


def test_demo_config_fits_reloads_and_exports(tmp_path: Path, grounding_batch) -> None:
    shards = tmp_path / "synthetic"
    generate_synthetic(shards, image_size=64, num_train=8, num_val=4, num_heldout=4, max_count=6)
    out = tmp_path / "run"
    args = [
        "--config",
        str(REPO / "configs/demo/distill_tiny.yaml"),
        "--model.init_args.teacher_checkpoint",
        "null",  # a random sam3_image_tiny teacher: no trained one in tests
        "--model.init_args.distill.score",
        "10.0",
        "--data.init_args.train",
        str(shards / "train"),
        "--data.init_args.val",
        str(shards / "val"),
        "--data.init_args.test",
        str(shards / "heldout"),
        "--data.init_args.image_size",
        "64",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        "--trainer.max_steps",
        "1",
        "--trainer.val_check_interval",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger",
        "false",
        "--trainer.callbacks.init_args.dirpath",
        str(out / "checkpoints"),
    ]
    main(["fit", *args])
    checkpoint = out / "checkpoints" / "last.ckpt"
    assert read_lightning_checkpoint(checkpoint)["global_step"] == 1

    reloaded = DistillModule.load_from_checkpoint(checkpoint, map_location="cpu")
    assert reloaded.distill_weights == DistillWeights(score=10.0, ground_truth=0.25)  # the config's, one overridden
    assert reloaded.model.image_size == 128  # the student's own size, not the 64 px canvas

    main(["export", "--checkpoint", str(checkpoint), "--out", str(out / "student.pt")])
    student = load_student(out / "student.pt")
    b = grounding_batch
    with torch.no_grad():
        expected = reloaded.model.eval()(b.images, b.phrases, b.query_image)
        got = student(b.images, b.phrases, b.query_image)
    assert torch.equal(expected["pred_logits"], got["pred_logits"])
