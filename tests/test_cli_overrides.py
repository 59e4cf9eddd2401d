"""Task arguments set from a YAML file and from command-line flags reach the module the CLI builds:
``loss``, ``prediction`` (dataclass arguments, merged field by field with the config's), ``compile``
and ``activation_checkpointing`` (applied to the image encoder when the Trainer sets up)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import DEMO, fit_args, make_shards, one_thread  # noqa: F401  (fixture)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from sambridge.acceleration import is_compiled
from sambridge.cli import lightning_cli, main
from sambridge.modules import DistillModule, GroundingModule

OVERRIDES = {
    "loss": {"presence": 3.5, "mask_dice": 4.0},
    "prediction": {"top_k": 7, "score_threshold": 0.25, "refine": True},
    "compile": True,
    "activation_checkpointing": True,
    "optimizer": {"fused": True},
}


def as_flags(overrides: dict, prefix: str = "--model.init_args") -> list[str]:
    """``{"loss": {"presence": 3.5}}`` -> ``["--model.init_args.loss.presence", "3.5"]``."""
    flags = []
    for name, value in overrides.items():
        if isinstance(value, dict):
            flags += as_flags(value, f"{prefix}.{name}")
        else:
            flags += [f"{prefix}.{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def build(*args: str):
    """The module ``train.py`` builds from these arguments (no fit)."""
    return lightning_cli(["--config", str(DEMO), "--trainer.logger", "false", *args], run=False).model


def assert_overrides_took_effect(module: GroundingModule) -> None:
    demo = yaml.safe_load(DEMO.read_text())["model"]["init_args"]
    assert module.loss_fn.presence_weight == 3.5
    assert module.loss_fn.detector_loss.loss_fns_find[2].weight_dict["loss_dice"] == 4.0
    # overrides merge with the demo config's own settings
    assert module.loss_fn.mask_stride == demo["loss"]["mask_stride"]
    assert module.optimizer_config.lr == demo["optimizer"]["lr"]
    assert (module.predict_settings.top_k, module.predict_settings.score_threshold) == (7, 0.25)
    assert module.model.refine_masks is True
    assert module.optimizer_config.fused is True
    assert module.compile_encoder and module.checkpoint_encoder
    module.configure_model()  # what the Trainer calls at set-up
    wrappers = [m for m in module.model.modules() if isinstance(m, CheckpointWrapper)]
    assert wrappers and all(is_compiled(m) for m in wrappers)


@pytest.mark.usefixtures("one_thread")
def test_overrides_from_flags() -> None:
    assert_overrides_took_effect(build(*as_flags(OVERRIDES)))


@pytest.mark.usefixtures("one_thread")
def test_overrides_from_a_yaml_file(tmp_path: Path) -> None:
    config = tmp_path / "overrides.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": OVERRIDES}}))
    assert_overrides_took_effect(build("--config", str(config)))


@pytest.mark.usefixtures("one_thread")
def test_distill_module_takes_the_switches_too() -> None:
    module = lightning_cli(["--config", str(DEMO.parent / "distill_tiny.yaml"), "--trainer.logger", "false",
                            "--model.init_args.teacher", "sam3_image_tiny",
                            "--model.init_args.teacher_checkpoint", "null",
                            *as_flags({"compile": True, "activation_checkpointing": True, "loss": {"presence": 3.5}})],
                           run=False).model
    assert isinstance(module, DistillModule)
    assert module.compile_encoder and module.checkpoint_encoder and module.gt_loss.presence_weight == 3.5


@pytest.mark.usefixtures("one_thread")
def test_fit_with_overrides_from_yaml_and_flags_records_them(tmp_path: Path) -> None:
    """A short fit: the YAML's settings and a flag on top of it train, and are saved with the run."""
    shards = make_shards(tmp_path / "shards")
    config = tmp_path / "overrides.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {
        "loss": {"presence": 3.5}, "prediction": {"top_k": 7}, "activation_checkpointing": True}}}))
    out = tmp_path / "run"
    main([*fit_args(shards, out, "--config", str(config), "--model.init_args.loss.mask_dice", "4.0",
                    "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.val_check_interval", "2", workers=0)])
    checkpoint = torch.load(sorted(out.rglob("*.ckpt"))[-1], map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    hparams = checkpoint["hyper_parameters"]
    assert hparams["loss"]["presence"] == 3.5 and hparams["loss"]["mask_dice"] == 4.0
    assert hparams["prediction"]["top_k"] == 7 and hparams["activation_checkpointing"] is True
    assert any("_checkpoint_wrapped_module" in key for key in checkpoint["state_dict"]) is False  # keys unchanged
    reloaded = GroundingModule.load_from_checkpoint(sorted(out.rglob("*.ckpt"))[-1], map_location="cpu",
                                                    weights_only=True)
    assert reloaded.loss_fn.presence_weight == 3.5 and reloaded.predict_settings.top_k == 7
    # on a checkpoint Lightning rebuilds the task from what it recorded; a prediction flag still applies
    tested = lightning_cli(["test", "--config", str(DEMO), "--trainer.logger", "false",
                            "--data.init_args.test", str(shards / "val"), "--data.init_args.image_size", "64",
                            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
                            "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
                            "--trainer.default_root_dir", str(out),
                            f"--trainer.callbacks.dirpath={out / 'checkpoints'}",
                            "--ckpt_path", str(sorted(out.rglob("*.ckpt"))[-1]),
                            "--model.init_args.prediction.score", "match"])
    assert tested.model.predict_settings.top_k == 7  # the checkpoint's
    assert tested.model.loss_fn.presence_weight == 3.5
    assert tested.model.model.detection_score == "match"  # the flag's (the run's: match_x_presence)


@pytest.mark.usefixtures("one_thread")
def test_a_new_run_directory_alone_moves_the_checkpoints_and_logs(tmp_path: Path, monkeypatch) -> None:
    """``--trainer.default_root_dir`` alone gives a demo config's run its own directory: the config's own
    (``runs/demo``) keeps its ``last.ckpt`` and logs untouched."""
    shards = make_shards(tmp_path / "shards")
    monkeypatch.chdir(tmp_path)  # the config's relative runs/demo would land here
    out = tmp_path / "other"
    main(["fit", "--config", str(DEMO), "--data.init_args.train", str(shards / "train"),
          "--data.init_args.val", str(shards / "val"), "--data.init_args.image_size", "64",
          "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--trainer.max_steps", "1",
          "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(out)])
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list(out.glob("lightning_logs/version_0/metrics.csv"))
    assert not (tmp_path / "runs").exists()
