"""``sambridge export``: checkpoint -> standalone student file -> ``load_student`` predicts the same."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data_pipelines.batch import GroundingBatch
from sambridge.cli import main
from sambridge.export import export_student
from sambridge.inference import load_model
from sambridge.models import create_model, load_adapters, load_student
from sambridge.models.checkpoint_io import CheckpointError
from sambridge.models.lora import has_lora
from sambridge.models.standalone import STUDENT_FORMAT, read_student
from sambridge.modules import DistillModule, GroundingModule
from sambridge.modules.checkpoint import model_from_checkpoint, read_lightning_checkpoint


def fit_one_step(module: pl.LightningModule, batch: GroundingBatch, path: Path,
                 before_save: Callable[[pl.LightningModule], None] | None = None) -> Path:
    """One real optimisation step, then a real Lightning checkpoint (optimizer state and all)."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    if before_save is not None:
        before_save(module)
    trainer.save_checkpoint(path)
    return path


@torch.no_grad()
def predict(model: torch.nn.Module, batch: GroundingBatch) -> dict[str, torch.Tensor]:
    model.eval()
    out = model(batch.images, batch.phrases, batch.query_image)
    post = model.postprocess(out, top_k=5, score_threshold=0.0)
    return {
        "pred_logits": out["pred_logits"],
        "pred_boxes": out["pred_boxes"],
        "pred_masks": out["pred_masks"],
        "presence": out["presence_logit_dec"],
        "masks": post["masks"],
        "scores": post["scores"],
    }


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory, make_batch) -> tuple[DistillModule, Path]:
    torch.manual_seed(0)
    module = DistillModule(model="grounded_sam2_student_tiny", model_args={"image_size": 96})
    path = fit_one_step(module, make_batch(), tmp_path_factory.mktemp("distill") / "last.ckpt")
    return module, path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_then_load_predicts_exactly_like_the_module(distill_run, grounding_batch, tmp_path, suffix):
    module, checkpoint = distill_run
    out = export_student(checkpoint, tmp_path / f"student{suffix}")
    student = load_student(out)
    assert type(student) is type(module.model) and student.image_size == 96 and not student.training
    expected, got = predict(module.model, grounding_batch), predict(student, grounding_batch)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    name, model_args, state = read_student(out)
    assert name == "grounded_sam2_student_tiny" and model_args == {"image_size": 96}
    assert state.keys() == module.model.state_dict().keys()  # no teacher, no distillation adapters


def test_load_model_takes_student_files_and_a_distill_checkpoint_without_its_teacher(
    distill_run, grounding_batch, tmp_path
):
    module, checkpoint = distill_run
    blob = read_lightning_checkpoint(checkpoint)
    blob["hyper_parameters"]["teacher_checkpoint"] = str(tmp_path / "absent" / "sam3.pt")  # as on an inference machine
    moved = tmp_path / "moved.ckpt"
    torch.save(blob, moved)
    expected = predict(module.model, grounding_batch)
    for path in (
        moved,
        export_student(checkpoint, tmp_path / "s.pt"),
        export_student(checkpoint, tmp_path / "s.safetensors"),
    ):
        model = load_model(path)
        assert not model.training and model.image_size == 96, path.name
        got = predict(model, grounding_batch)
        for name in expected:
            assert torch.equal(expected[name], got[name]), (path.name, name)


def test_segment_command_runs_on_an_exported_student(distill_run, tmp_path, capsys):
    student = export_student(distill_run[1], tmp_path / "student.pt")
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(image)

    def segment(source: Path, out: str, *extra: str) -> int:
        argv = ["segment", "--checkpoint", str(student), "--input", str(source), "--out", str(tmp_path / out),
                "--text", "red circle", "--text", "star", "--threshold", "0", "--top-k", "2", "--workers", "0",
                "--overlays", *extra]
        try:
            main(argv)
        except SystemExit as stopped:
            return stopped.code
        return 0

    assert segment(image, "out") == 0
    width, height = Image.open(tmp_path / "out" / "overlays" / "image.png.png").size
    assert width * 80 == height * 120  # the image's aspect (small images are drawn upscaled)
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    phrase_of = {i["id"]: i["text_input"] for i in json.loads((tmp_path / "out" / "images.json").read_text())["images"]}
    assert sorted(phrase_of[r["image_id"]] for r in records) == ["red circle", "red circle", "star", "star"]  # top 2
    assert all(r["segmentation"]["size"] == [80, 120] for r in records)
    assert "'star': 2 instance(s)" in capsys.readouterr().out

    # a bad phrase: one line naming it and exit code 2, before any model work
    assert segment(image, "blank", "--text", "  ") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--text must be a noun phrase" in err[0], err
    # an unreadable image: named with the reason, exit code 1
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    deep = tmp_path / "deep.png"
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(deep)
    for source, message in ((text_file, "notes.png: not an image PIL can identify"), (deep, "deep.png: PIL mode I;16")):
        assert segment(source, source.stem) == 1
        assert message in capsys.readouterr().err


def test_torch_save_student_file_is_plain_tensors_and_strings(distill_run, tmp_path):
    out = export_student(distill_run[1], tmp_path / "student.pt")
    blob = torch.load(out, weights_only=True)
    assert blob["format"] == STUDENT_FORMAT and isinstance(blob["model_args"], str)
    assert all(isinstance(v, torch.Tensor) for v in blob["state_dict"].values())


def test_a_student_file_with_an_unknown_scoring_is_refused_naming_the_field(distill_run, tmp_path):
    out = export_student(distill_run[1], tmp_path / "student.pt")
    blob = torch.load(out, weights_only=True)
    blob["detection_score"] = "match_squared"
    torch.save(blob, out)
    with pytest.raises(CheckpointError, match=r"student\.pt: header field 'detection_score' is 'match_squared'"):
        load_student(out)


def test_lora_checkpoint_exports_a_merged_plain_model_or_its_adapters(grounding_batch, tmp_path, capsys):
    torch.manual_seed(0)
    module = GroundingModule(model="grounded_sam2_tiny", finetune="lora", image_size=96,
                             loss={"score_absent": True})  # as LightningCLI passes it: scores are the match alone

    @torch.no_grad()
    def make_adapters_matter(trained: GroundingModule) -> None:  # one warm-up step barely moves them
        for name, p in trained.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)

    checkpoint = fit_one_step(module, grounding_batch, tmp_path / "lora.ckpt", before_save=make_adapters_matter)
    student = load_student(export_student(checkpoint, tmp_path / "student.safetensors"))
    assert not has_lora(student) and student.image_size == 96 and student.detection_score == "match"
    assert model_from_checkpoint(checkpoint)[0].detection_score == "match"
    expected, got = predict(module.model, grounding_batch), predict(student, grounding_batch)
    for name in ("pred_logits", "pred_boxes", "pred_masks", "presence"):
        assert torch.allclose(expected[name], got[name], atol=1e-4), name

    adapters = tmp_path / "adapters.safetensors"
    main(["export", "--checkpoint", str(checkpoint), "--out", str(adapters), "--adapters-only"])
    assert "adapters written to" in capsys.readouterr().out
    torch.manual_seed(0)  # the same random base the run started from (a real run: the official checkpoint)
    rebuilt = load_adapters(create_model("grounded_sam2_tiny", image_size=96), adapters)
    assert has_lora(rebuilt)
    got = predict(rebuilt, grounding_batch)
    for name in ("pred_logits", "pred_boxes", "pred_masks", "presence"):
        assert torch.equal(expected[name], got[name]), name


def test_cli_export_and_its_errors(distill_run, tmp_path, capsys):
    out = tmp_path / "student.pt"
    main(["export", "--checkpoint", str(distill_run[1]), "--out", str(out)])
    assert "student written to" in capsys.readouterr().out and out.is_file()
    for args, message in (
        (["--out", str(out)], "student.pt exists"),
        (["--out", str(tmp_path / "a.safetensors"), "--adapters-only"], "not trained with finetune: lora"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(["export", "--checkpoint", str(distill_run[1]), *args])
        assert stopped.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        export_student(out, tmp_path / "again.pt")  # a student file is not a training checkpoint
    with pytest.raises(CheckpointError, match="Lightning checkpoint not found: .*nope.ckpt"):
        export_student(tmp_path / "nope.ckpt", tmp_path / "again.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a sambridge student file"):
        load_student(tmp_path / "other.pt")


def test_a_text_tag_that_changes_the_architecture_is_refused(tmp_path):
    args = {
        "text_model": "ViT-B-32",
        "text_pretrained": "openai",
        "text_cfg": {"width": 32, "heads": 2, "layers": 1},
    }
    checkpoint = tmp_path / "quick_gelu.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"model": "grounded_sam2_tiny", "model_args": args}},
        checkpoint,
    )
    with pytest.raises(CheckpointError, match="text_pretrained='openai' gives 'ViT-B-32' QuickGELU"):
        export_student(checkpoint, tmp_path / "student.pt")
    assert not (tmp_path / "student.pt").exists()


def test_checkpoints_from_before_the_loss_weights_moved_still_read(tmp_path, monkeypatch):
    """``GroundingLossWeights`` moved from ``sambridge.modules.grounding`` to ``sambridge.losses``; a
    checkpoint that pickled it under the old name reads with ``weights_only=True``."""
    from sambridge.losses import GroundingLossWeights

    monkeypatch.setattr(GroundingLossWeights, "__module__", "sambridge.modules.grounding")
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"loss": GroundingLossWeights(mask_stride=1)}}, path)
    monkeypatch.undo()
    loss = read_lightning_checkpoint(path)["hyper_parameters"]["loss"]
    assert isinstance(loss, GroundingLossWeights) and loss.mask_stride == 1


def test_the_validated_read_out_travels_with_the_student_file(grounding_batch, tmp_path):
    torch.manual_seed(0)
    module = GroundingModule(model="grounded_sam2_tiny", image_size=96,
                             prediction={"outputs": "one_to_many", "nms_iou": 0.4, "mask_nms": 0.5})
    checkpoint = fit_one_step(module, grounding_batch, tmp_path / "o2m.ckpt")
    for suffix in (".pt", ".safetensors"):
        student = load_student(export_student(checkpoint, tmp_path / f"student{suffix}"))
        assert (student.one_to_many_outputs, student.nms_iou, student.mask_nms) == (True, 0.4, 0.5), suffix
        expected, got = predict(module.model, grounding_batch), predict(student, grounding_batch)
        assert torch.equal(expected["scores"], got["scores"]) and torch.equal(expected["masks"], got["masks"])

    blob = torch.load(tmp_path / "student.pt", weights_only=True)
    blob["mask_nms"] = "1.5"
    torch.save(blob, tmp_path / "student.pt")
    with pytest.raises(CheckpointError, match=r"student\.pt: header field 'mask_nms' is '1.5', expected null or a"):
        load_student(tmp_path / "student.pt")
