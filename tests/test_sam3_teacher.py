"""SAM3Teacher: GroundedSAM2's interface on sam3's own model, strict official checkpoints, freezing,
training with GroundingLoss and loading back from a GroundingModule checkpoint (tiny architecture)."""

from __future__ import annotations

import pytest
import torch

from sambridge.models import (
    CheckpointError,
    apply_finetune_mode,
    create_model,
    list_models,
    load_sam3_checkpoint,
)
from sambridge.models.sam3_teacher import SAM3Teacher
from sambridge.modules.checkpoint import load_teacher

SIZE = 128
CORE_KEYS = (
    "pred_logits", "pred_boxes", "pred_boxes_xyxy", "pred_masks", "presence_logit_dec", "semantic_seg"
)


def tiny_teacher(seed: int = 0, **overrides) -> SAM3Teacher:
    torch.manual_seed(seed)
    return create_model("sam3_image_tiny", **overrides)


@pytest.fixture(scope="module")
def teacher() -> SAM3Teacher:
    return tiny_teacher()


def official_layout(teacher: SAM3Teacher) -> dict[str, torch.Tensor]:
    """The teacher's weights as an official sam3.pt lays them out: ``detector.*`` plus the tracker's
    neck copy (``detector.backbone.vision_backbone.sam2_convs.*``) and ``tracker.*`` entries."""
    state = dict(teacher.state_dict())
    neck = "detector.backbone.vision_backbone."
    state.update({k.replace(f"{neck}convs.", f"{neck}sam2_convs."): v.clone()
                  for k, v in teacher.state_dict().items() if k.startswith(f"{neck}convs.")})
    state["tracker.maskmem_backbone.out_proj.weight"] = torch.randn(4, 4)
    state["tracker.sam_mask_decoder.iou_token.weight"] = torch.randn(1, 8)
    return state


def outputs(model, batch) -> dict:
    with torch.no_grad():
        return model(batch.images, batch.phrases, batch.query_image)


# ---------------------------------------------------------------------- interface
def test_registered_frozen_and_a_few_million_parameters(teacher):
    assert {"sam3_image", "sam3_image_tiny"} <= set(list_models("sam3_*"))
    assert teacher.model_name == "sam3_image_tiny" and teacher.image_size == SIZE
    assert teacher.frozen and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()  # a frozen teacher stays in eval mode (Lightning calls train() on whole modules)
    assert not any(m.training for m in teacher.modules())
    student = create_model("grounded_sam2_tiny")
    params = sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in student.parameters()) <= params < 8e6


def test_frozen_forward_builds_no_graph(teacher, grounding_batch):
    b = grounding_batch
    with torch.enable_grad():
        out = teacher(b.images, b.phrases, b.query_image)
    assert not any(out[k].requires_grad for k in CORE_KEYS)


def test_outputs_and_postprocess_match_grounded_sam2(teacher, grounding_batch):
    b = grounding_batch
    torch.manual_seed(0)
    student = create_model("grounded_sam2_tiny").eval()
    t_out, s_out = outputs(teacher, b), outputs(student, b)
    for key in CORE_KEYS:
        assert t_out[key].shape == s_out[key].shape, key
    assert t_out["pred_masks"].shape == (4, teacher.num_queries, SIZE // 4, SIZE // 4)
    assert torch.equal(t_out["query_image"], b.query_image) and t_out["input_hw"] == (SIZE, SIZE)
    t_post = teacher.postprocess(t_out, top_k=5, score_threshold=0.0, refine=False, out_hw=(64, 80))
    s_post = student.postprocess(s_out, top_k=5, score_threshold=0.0, refine=False, out_hw=(64, 80))
    assert t_post.keys() == s_post.keys()
    for key in t_post:
        assert t_post[key].shape == s_post[key].shape and t_post[key].dtype == s_post[key].dtype, key
    scores = t_out["pred_logits"][..., 0].sigmoid() * t_out["presence_logit_dec"].sigmoid()
    assert torch.allclose(t_post["scores"], scores.topk(5, dim=1).values)
    # refine=True is accepted and ignored: the teacher has no SAM2 decoder, masks are the head's
    assert torch.equal(teacher.postprocess(t_out, top_k=5, score_threshold=0.0, out_hw=(64, 80))["masks"],
                       t_post["masks"])


def test_image_encoded_once_and_each_unique_phrase_once(teacher, grounding_batch):
    b = grounding_batch
    image_batches, text_batches = [], []
    hooks = [
        teacher.vision.trunk.register_forward_hook(lambda m, a, o: image_batches.append(a[0].shape[0])),
        teacher.text_encoder.encoder.register_forward_hook(lambda m, a, o: text_batches.append(len(a[0]))),
    ]
    phrases = ["red box", "blue box", "red box", "green box", "red box"]
    try:
        with torch.no_grad():
            out = teacher(b.images, phrases, torch.tensor([0, 0, 1, 1, 1]))
    finally:
        for h in hooks:
            h.remove()
    assert image_batches == [2] and text_batches == [3] and out["pred_logits"].shape[0] == 5
    with torch.no_grad():
        alone = teacher(b.images[1:], ["red box"], torch.tensor([0]))
    assert torch.allclose(alone["pred_logits"][0], out["pred_logits"][2], atol=1e-5)


def test_features_for_distillation(teacher, grounding_batch):
    b = grounding_batch
    phrases = ["red box", "blue box", "red box", "a much longer phrase about boxes"]
    with torch.no_grad():
        out = teacher(b.images, phrases, b.query_image, return_features=True)
    d, grid = 64, SIZE // teacher.patch_size
    assert out["vision_features"].shape == (2, d, grid, grid)
    assert out["unique_phrases"] == ["red box", "blue box", "a much longer phrase about boxes"]
    assert out["text_ids"].tolist() == [0, 1, 0, 2]
    assert out["language_features"].shape == (32, 3, d) and out["language_mask"].shape == (3, 32)
    tokens = (~out["language_mask"]).sum(1).tolist()  # start + words + end, the rest is padding
    assert tokens[0] == tokens[1] == 4 and tokens[2] > 4
    with torch.no_grad():
        single = teacher.encode_text(["blue box"])
    assert torch.allclose(single["language_features"][:, 0], out["language_features"][:, 1], atol=1e-5)


def test_any_canvas_is_resized_to_the_teacher_input(teacher, grounding_batch):
    b = grounding_batch
    big = torch.nn.functional.interpolate(b.images, size=(224, 224), mode="bilinear")
    out = outputs(teacher, type(b)(**{**vars(b), "images": big}))
    assert out["pred_masks"].shape[-1] == SIZE // 4 and out["input_hw"] == (224, 224)
    assert teacher.postprocess(out, top_k=3, score_threshold=0.0)["masks"].shape == (4, 3, 224, 224)
    with pytest.raises(ValueError, match="multiple of the ViT patch size 16"):
        tiny_teacher(image_size=120)


def test_moving_resets_sam3_device_caches(grounding_batch):
    model = tiny_teacher()
    outputs(model, grounding_batch)  # fills position-encoding and box-RPB caches on the CPU
    model.to("meta")
    assert model.detector.device.type == "meta" and model.detector.segmentation_head.device.type == "meta"
    assert all(not m.cache for m in model.modules() if type(m).__name__ == "PositionEmbeddingSine")
    assert model.detector.transformer.decoder.compilable_cord_cache is None


# ---------------------------------------------------------------------- official checkpoints
@pytest.mark.parametrize("wrapped", [True, False], ids=["model-dict", "bare-dict"])
def test_official_checkpoint_layout_loads_strictly(teacher, grounding_batch, tmp_path, wrapped):
    state = official_layout(teacher)
    path = tmp_path / "sam3.pt"
    torch.save({"model": state} if wrapped else state, path)
    other = tiny_teacher(seed=7, sam3_checkpoint=path)
    a, b = outputs(teacher, grounding_batch), outputs(other, grounding_batch)
    for key in CORE_KEYS:
        assert torch.equal(a[key], b[key]), key


def test_tampered_checkpoint_fails_naming_the_keys(teacher, tmp_path):
    state = official_layout(teacher)
    del state["detector.transformer.decoder.query_embed.weight"]
    state["detector.transformer.decoder.extra_head.weight"] = torch.zeros(3)
    state["detector.dot_prod_scoring.prompt_proj.weight"] = torch.zeros(5, 5)
    path = tmp_path / "tampered.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_sam3_checkpoint(tiny_teacher(), path)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys (1): detector.transformer.decoder.query_embed.weight" in message
    assert "unexpected keys (1): detector.transformer.decoder.extra_head.weight" in message
    assert "detector.dot_prod_scoring.prompt_proj.weight (file (5, 5) vs model (64, 64))" in message


def test_missing_or_foreign_checkpoint_is_a_clear_error(teacher, tmp_path):
    missing = tmp_path / "nowhere" / "sam3.pt"
    with pytest.raises(CheckpointError, match=f"SAM3 checkpoint not found: {missing}"):
        tiny_teacher(sam3_checkpoint=missing)
    foreign = tmp_path / "plain.pt"
    torch.save({k.removeprefix("detector."): v for k, v in teacher.state_dict().items()}, foreign)
    with pytest.raises(CheckpointError, match="no 'detector.\\*' entries"):
        load_teacher(foreign, model="sam3_image_tiny")
    with pytest.raises(ValueError, match="'sam3_image_tiny' does not take \\['sam2_checkpoint'\\]"):
        tiny_teacher(sam2_checkpoint="sam2.1_hiera_tiny.pt")  # a SAM3 teacher has no SAM2 parts


# ---------------------------------------------------------------------- training
def test_full_finetune_mode_makes_it_trainable(grounding_batch):
    model = apply_finetune_mode(tiny_teacher(), "full")
    assert not model.frozen and all(m.training for m in model.modules())
    groups = model.parameter_groups()
    assert sum(len(v) for v in groups.values()) == sum(1 for _ in model.parameters())
    assert groups["sam2_decoder"] == [] and groups["adapters"] == []
    apply_finetune_mode(model, "frozen_encoder")
    assert model.parameter_groups()["backbone"] == [] and model.parameter_groups()["text"]


def test_tiny_teacher_learns_a_fixed_batch_with_grounding_loss(grounding_batch):
    from sambridge.losses import GroundingLoss

    b = grounding_batch
    model = apply_finetune_mode(tiny_teacher(), "full")
    loss_fn = GroundingLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        terms = loss_fn(model(b.images, b.phrases, b.query_image, targets=b), b)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert not any(k.startswith("refine_") for k in terms)  # no SAM2 refinement branch
    assert {"loss_ce_o2m", "loss_bbox_aux_0", "presence_loss"} <= set(terms)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


def test_load_teacher_from_a_grounding_module_checkpoint(grounding_batch, tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from sambridge.modules import GroundingModule
    from sambridge.optim import OptimizerConfig

    b = grounding_batch
    torch.manual_seed(0)
    module = GroundingModule(model="sam3_image_tiny", image_size=SIZE,
                             optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([b, b], batch_size=None, collate_fn=lambda x: x))
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_teacher(path)
    assert isinstance(loaded, SAM3Teacher) and loaded.frozen and loaded.model_name == "sam3_image_tiny"
    trained = module.model.freeze()
    a, c = outputs(trained, b), outputs(loaded, b)
    for key in CORE_KEYS:
        assert torch.equal(a[key], c[key]), key
    with pytest.raises(ValueError, match="holds a 'sam3_image_tiny' model, not 'sam3_image'"):
        load_teacher(path, model="sam3_image")


def test_load_teacher_refuses_a_student_checkpoint(tmp_path):
    path = tmp_path / "student.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": "grounded_sam2_tiny"}}, path)
    with pytest.raises(ValueError, match="'grounded_sam2_tiny' is not a SAM3 teacher"):
        load_teacher(path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_frozen_teacher_runs_in_bf16_on_cuda(grounding_batch):
    b = grounding_batch
    model = tiny_teacher().to("cuda")
    out = model(b.images.cuda(), b.phrases, b.query_image.cuda())
    assert out["pred_logits"].dtype == torch.bfloat16
    assert model.postprocess(out, top_k=3, score_threshold=0.0)["masks"].shape == (4, 3, SIZE, SIZE)


def test_teacher_demo_config_builds_a_trainable_teacher():
    from pathlib import Path

    from sambridge.cli import lightning_cli

    config = Path(__file__).resolve().parents[1] / "configs/demo/teacher_tiny.yaml"
    cli = lightning_cli(["--config", str(config)], run=False)
    model = cli.model.model
    assert isinstance(model, SAM3Teacher) and not model.frozen and model.training
    assert model.image_size == cli.datamodule.image_size == SIZE
