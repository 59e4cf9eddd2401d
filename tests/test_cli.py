"""The LightningCLI entry: every shipped config parses; fit/validate/test/predict run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from pycocotools import mask as mask_utils

from data_pipelines.synthetic import generate_synthetic
from sambridge.callbacks import RunCheckpoint
from sambridge.cli import SambridgeCLI, lightning_cli, main
from sambridge.evaluate import main as evaluate_main
from sambridge.modules import BaseTask, GroundingModule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml"))
TRAINER_CONFIGS = [p for p in CONFIGS if p.parent.name in ("trainer", "data")]  # presets stacked on a task config
TASK_CONFIGS = [p for p in CONFIGS if p not in TRAINER_CONFIGS]


class ParseOnlyCLI(SambridgeCLI):
    """Parses and type-checks a config (class paths, argument names and types) without building."""

    def instantiate_classes(self) -> None:
        pass


def parse(args: list[str]) -> LightningCLI:
    from lightning.pytorch import LightningDataModule

    return ParseOnlyCLI(BaseTask, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        auto_configure_optimizers=False, args=args, run=False)


@pytest.mark.parametrize("config", TASK_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_task_config_parses(config: Path) -> None:
    cli = parse(["--config", str(config)])
    assert cli.config["model"]["class_path"].startswith("sambridge.modules.")
    assert cli.config["data"]["class_path"] == "data_pipelines.ShardDataModule"


@pytest.mark.parametrize("config", TRAINER_CONFIGS, ids=lambda p: p.name)
def test_trainer_configs_combine_with_a_task_config(config: Path) -> None:
    parse(["--config", str(REPO / "configs/demo/grounding_tiny.yaml"), "--config", str(config)])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two-shard synthetic train split plus val/heldout, 64 px."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, image_size=64, num_train=16, num_val=8, num_heldout=8, max_count=8)
    return root


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/demo/grounding_tiny.yaml"),
            "--data.init_args.train", str(shards / "train"), "--data.init_args.val", str(shards / "val"),
            "--data.init_args.test", str(shards / "heldout"), "--data.init_args.predict", str(shards / "heldout"),
            "--data.init_args.image_size", "64", "--data.init_args.batch_size", "4",
            "--data.init_args.num_workers", "0", "--trainer.default_root_dir", str(out),
            f"--trainer.callbacks.dirpath={out / 'checkpoints'}", "--trainer.logger", "false", *extra]


def test_fit_then_test_and_predict_from_the_checkpoint(shards: Path, tmp_path: Path) -> None:
    main(["fit", *_args(shards, tmp_path, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                        "--trainer.limit_val_batches", "1")])
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["last.ckpt"]  # what the docs' test/predict commands read
    saved = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    assert (tmp_path / "config.yaml").exists()

    main(["test", *_args(shards, tmp_path, "--ckpt_path", str(checkpoints[-1]), "--trainer.limit_test_batches", "1")])

    out = tmp_path / "pred"
    main(["predict", *_args(shards, tmp_path, "--ckpt_path", str(checkpoints[-1]),
                            "--trainer.callbacks+=sambridge.callbacks.PredictionWriter",
                            f"--trainer.callbacks.output_dir={out}", "--trainer.callbacks.overlays=2",
                            "--trainer.callbacks.overlay_threshold=0.0")])
    predictions = json.loads((out / "predictions.json").read_text())
    ground_truth = json.loads((out / "ground_truth.json").read_text())
    sizes = {img["id"]: (img["height"], img["width"]) for img in ground_truth["images"]}
    assert len(sizes) == len(ground_truth["images"])
    for record in predictions:
        assert record["image_id"] in sizes
        assert mask_utils.decode(record["segmentation"]).shape == sizes[record["image_id"]]
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert all(img["file_name"] == f"{img['sample_key']}.png" for img in ground_truth["images"])

    # the grid finds each query's image in the shards the ground truth was predicted from
    grid = tmp_path / "grid.png"
    assert evaluate_main(["--gt", str(out / "ground_truth.json"), "--pred", str(out / "predictions.json"),
                          "--grid", str(grid), "--image-root", str(shards / "heldout"), "--grid-queries", "1"]) == 0
    assert grid.stat().st_size > 0


def test_checkpoint_reload_gives_identical_outputs(shards: Path, tmp_path: Path, grounding_batch) -> None:
    cli = lightning_cli(_args(shards, tmp_path, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                              "--trainer.limit_val_batches", "1"),
                        run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = sorted((tmp_path / "checkpoints").glob("*.ckpt"))[-1]
    reloaded = GroundingModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    trained = cli.model.eval()
    with torch.no_grad():
        a, b = trained(grounding_batch), reloaded(grounding_batch)
    for key in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec"):
        assert torch.equal(a[key], b[key]), key
    assert reloaded.hparams.model == "grounded_sam2_demo" and reloaded.model.image_size == 64


def test_tool_commands_are_reachable(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "synthetic" in printed and printed.startswith("usage: sambridge data ")


def test_the_demo_config_alone_writes_the_checkpoint_the_docs_read() -> None:
    cli = lightning_cli(["--config", str(REPO / "configs/demo/grounding_tiny.yaml")], run=False)
    (callback,) = cli.trainer.checkpoint_callbacks
    assert isinstance(callback, RunCheckpoint) and callback.save_last  # <default_root_dir>/checkpoints at set-up
    assert callback.dirpath is None and Path(cli.trainer.default_root_dir).resolve() == Path("runs/demo").resolve()
    for doc in ("docs/evaluation.md", "docs/training.md"):
        assert "--ckpt_path runs/demo/checkpoints/last.ckpt" in (REPO / doc).read_text()
