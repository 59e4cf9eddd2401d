"""timm trunks behind the VisionAdapter contract, and the timm-backbone student end to end."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from sambridge.losses import GroundingLoss
from sambridge.models import create_model
from sambridge.models.checkpoint_io import CheckpointError
from sambridge.models.sam2_builder import SAM2_TINY_OVERRIDES
from sambridge.models.timm_vision import TimmTrunk, TimmVisionAdapter
from sambridge.models.variants import STUDENT_TINY_HEAD

TINY_TIMM_STUDENT = {
    "image_size": 128,
    "head": STUDENT_TINY_HEAD,
    "sam2_overrides": SAM2_TINY_OVERRIDES,
    "text_model": "ViT-S-32",
    "text_cfg": {"width": 32, "heads": 2, "layers": 1},
    "freeze_text": False,
}


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("convnext_atto", [320, 160, 80, 40]),  # four stages at strides 4..32
        ("resnet18", [512, 256, 128, 64]),  # five levels (stride 2 first): the stride-2 one is skipped
    ],
)
def test_trunk_returns_strides_4_to_32_highest_resolution_first(name, channels):
    trunk = TimmTrunk(name)
    assert trunk.channel_list == channels  # SAM2's order: lowest resolution first
    levels = trunk(torch.rand(1, 3, 64, 64))
    assert [tuple(x.shape[1:]) for x in levels] == [
        (c, 64 // s, 64 // s) for c, s in zip(channels[::-1], (4, 8, 16, 32), strict=True)
    ]


def test_trunk_without_the_needed_strides_is_refused():
    with pytest.raises(ValueError, match="feature strides \\[16, 16, 16\\].*missing \\[4, 8, 32\\]"):
        TimmTrunk("vit_tiny_patch16_224", out_indices=(-3, -2, -1))


def test_adapter_normalises_with_the_timm_config_and_returns_both_necks():
    adapter = TimmVisionAdapter("convnext_atto", d_model=32)
    assert adapter.pixel_mean == timm.data.IMAGENET_DEFAULT_MEAN and adapter.d_model == 32
    det, det_pos, sam2, sam2_pos = adapter(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in det] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    assert [f.shape for f in sam2] == [f.shape for f in det] and [p.shape for p in det_pos] == [
        f.shape for f in det
    ]
    assert adapter.detector_neck is not adapter.sam2_neck
    single = TimmVisionAdapter("convnext_atto", d_model=32, dual_neck=False)
    outputs = single(torch.rand(1, 3, 64, 64))
    assert all(a is b for a, b in zip(outputs[0], outputs[2], strict=True))  # one neck, shared


def test_pretrained_file_loads_into_the_trunk(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("convnext_atto")
    path = tmp_path / "convnext_atto.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    trunk = TimmTrunk("convnext_atto", pretrained_file=path)
    loaded = dict(trunk.body.named_parameters())
    assert torch.equal(loaded["stem_0.weight"], reference.stem[0].weight)
    assert torch.equal(
        loaded["stages_3.blocks.1.mlp.fc2.weight"], reference.stages[3].blocks[1].mlp.fc2.weight
    )
    with pytest.raises(
        CheckpointError, match="timm weight file for 'convnext_atto' not found: .*missing.pth"
    ):
        TimmTrunk("convnext_atto", pretrained_file=tmp_path / "missing.pth")


def test_timm_student_forward_and_backward(grounding_batch):
    torch.manual_seed(0)
    model = create_model("grounded_timm_convnext_atto", **TINY_TIMM_STUDENT).train()
    b = grounding_batch
    out = model(b.images, b.phrases, b.query_image, targets=b)
    assert out["pred_logits"].shape == (b.num_queries, STUDENT_TINY_HEAD.num_queries, 1)
    # the registered timm student's head works on strides 8 and 16; SAM2's decoder sees stride 4 too
    assert out["pred_masks"].shape[-2:] == (16, 16) and [f.shape[-1] for f in out["backbone_fpn"]] == [16, 8]
    assert [f.shape[-1] for f in out["sam2_backbone_fpn"]] == [32, 16, 8]
    assert "refine" in out  # SAM2's prompt decoder refines matched boxes on the timm features
    GroundingLoss()(out, b)["loss"].backward()
    trunk_grads = [p.grad for p in model.vision.trunk.parameters()]
    assert all(g is not None for g in trunk_grads) and sum(g.abs().sum() for g in trunk_grads) > 0
    groups = model.parameter_groups()
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in model.vision.parameters()}


def test_timm_student_head_width_must_match_the_sam2_decoder():
    args = dict(TINY_TIMM_STUDENT, sam2_overrides=())  # SAM2's real decoder is 256 wide, the head 64
    with pytest.raises(ValueError, match="head.d_model \\(64\\) must equal .* SAM2 decoder width \\(256\\)"):
        create_model("grounded_timm_convnext_atto", **args)


def test_head_on_stride_8_skips_the_finest_level_but_sam2_keeps_it(grounding_batch):
    torch.manual_seed(0)
    model = create_model("grounded_sam2_student_tiny", head_min_stride=8).eval()
    b = grounding_batch
    with torch.no_grad():
        out = model(b.images, b.phrases, b.query_image)
        post = model.postprocess(out, top_k=3, score_threshold=0.0)
    assert [f.shape[-1] for f in out["backbone_fpn"]] == [16, 8]  # head: strides 8, 16 of 128 px
    assert [f.shape[-1] for f in out["sam2_backbone_fpn"]] == [32, 16, 8]
    assert out["pred_masks"].shape[-2:] == (16, 16) and post["masks"].shape[-2:] == (128, 128)
    with pytest.raises(ValueError, match="head_min_stride must be 4 or 8, got 16"):
        create_model("grounded_sam2_student_tiny", head_min_stride=16)
