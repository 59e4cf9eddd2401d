"""Bottom-up grounding outputs: instances as connected components of the phrase's semantic mask."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sambridge.losses import GroundingLoss, GroundingLossWeights
from sambridge.models.components import semantic_components


def blob_logits() -> torch.Tensor:
    """(2, 1, 32, 32) logits: query 0 has a 6x6 blob (p 0.9), a 4x8 blob (p 0.7), a 1-px speck; query 1 none."""
    logits = torch.full((2, 1, 32, 32), -8.0)
    logits[0, 0, 2:8, 3:9] = torch.logit(torch.tensor(0.9))
    logits[0, 0, 20:24, 10:18] = torch.logit(torch.tensor(0.7))
    logits[0, 0, 30, 30] = 8.0
    return logits


def test_components_are_the_blobs_best_first_with_their_boxes_and_scores():
    found = semantic_components(blob_logits(), torch.tensor([0.5, 1.0]), top_k=3, out_hw=(32, 32),
                                min_area_fraction=2 / 1024)
    assert found["masks"].shape == (2, 3, 32, 32) and found["scores"].shape == (2, 3)
    torch.testing.assert_close(found["scores"][0], torch.tensor([0.45, 0.35, 0.0]), atol=1e-4, rtol=0)
    assert found["masks"][0, 0].sum() == 36 and found["masks"][0, 0, 2:8, 3:9].all()
    assert found["masks"][0, 1].sum() == 32 and found["masks"][0, 1, 20:24, 10:18].all()
    assert not found["masks"][0, 2].any() and not found["masks"][1].any()  # the speck is under min_area
    torch.testing.assert_close(found["boxes_xyxy"][0, 0], torch.tensor([3, 2, 9, 8]) / 32)
    torch.testing.assert_close(found["boxes_xyxy"][0, 1], torch.tensor([10, 20, 18, 24]) / 32)
    assert found["scores"][1].eq(0).all()


def test_components_are_split_at_the_output_size_and_capped_at_top_k():
    found = semantic_components(blob_logits(), torch.ones(2), top_k=1, out_hw=(64, 64))
    assert found["masks"].shape == (2, 1, 64, 64)
    assert 80 <= found["masks"][0, 0].sum() <= 150  # the 6x6 blob, about 10-12 px a side after upsampling
    assert found["masks"][0, 0, 6:14, 8:16].all()


def test_postprocess_with_components_keeps_the_contract(tiny_grounded_sam2, grounding_batch):
    model, b = tiny_grounded_sam2().eval(), grounding_batch
    with torch.no_grad():
        out = model(b.images, b.phrases, b.query_image)
    out["semantic_seg"] = torch.full_like(out["semantic_seg"], -8.0)
    out["semantic_seg"][0, 0, 4:12, 4:12] = 8.0  # query 0: one square, presence decides its score
    out["presence_logit_dec"] = torch.full_like(out["presence_logit_dec"], 8.0)
    queries = model.postprocess(out, top_k=5, score_threshold=0.5)
    post = model.postprocess(out, top_k=5, score_threshold=0.5, instances="components")
    assert {k: v.shape for k, v in post.items()} == {k: v.shape for k, v in queries.items()}
    assert post["keep"].sum() == 1 and post["keep"][0, 0] and post["scores"][0, 0] > 0.95
    assert post["masks"][0, 0, 18:46, 18:46].all() and post["masks"].sum() == post["masks"][0, 0].sum()
    assert post["semantic_masks"][0].equal(post["masks"][0, 0]) and post["query_indices"].eq(-1).all()
    model.instances = "components"
    assert torch.equal(model.postprocess(out, top_k=5, score_threshold=0.5)["masks"], post["masks"])
    with pytest.raises(ValueError, match="instances must be one of"):
        type(model)(model.detector, model.image_size, instances="blobs")


def test_semantic_loss_is_bce_and_dice_against_the_union_of_each_querys_instances(make_batch):
    from sam3.train.loss.loss_fns import dice_loss

    from sambridge.models import create_model

    torch.manual_seed(0)
    model, batch = create_model("grounded_sam2_tiny").train(), make_batch()
    out = model(batch.images, batch.phrases, batch.query_image, targets=batch)
    assert "loss_semantic_seg" not in GroundingLoss()(out, batch)  # off by default (SAM3's image recipe)
    weights = {"semantic_bce": 3.0, "semantic_dice": 2.0}
    terms = GroundingLoss(GroundingLossWeights(mask_stride=1, **weights))(out, batch)
    union = torch.zeros(batch.num_queries, *batch.masks.shape[-2:])
    for mask, query in zip(batch.masks, batch.instance_query, strict=True):
        union[query] = torch.maximum(union[query], mask.float())
    logits = F.interpolate(out["semantic_seg"], size=union.shape[-2:], mode="bilinear")[:, 0].flatten(1)
    bce = F.binary_cross_entropy_with_logits(logits, union.flatten(1))
    torch.testing.assert_close(terms["loss_semantic_seg"], bce, rtol=1e-5, atol=1e-6)  # every query is known
    positive = batch.num_instances > 0  # dice only where the phrase has instances (sam3's presence-head form)
    dice = dice_loss(logits[positive], union.flatten(1)[positive], num_boxes=int(positive.sum()))
    torch.testing.assert_close(terms["loss_semantic_dice"], dice, rtol=1e-5, atol=1e-6)
    without = GroundingLoss(GroundingLossWeights(mask_stride=1))(out, batch)["loss"]
    added = 3.0 * terms["loss_semantic_seg"] + 2.0 * terms["loss_semantic_dice"]
    torch.testing.assert_close(terms["loss"] - without, added)
    terms["loss"].backward()
    head = model.detector.segmentation_head.semantic_seg_head.weight
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_semantic_loss_leaves_out_non_exhaustive_negatives(make_batch):
    from sambridge.models import create_model

    torch.manual_seed(0)
    model, batch = create_model("grounded_sam2_tiny").train(), make_batch()
    with torch.no_grad():
        out = model(batch.images, batch.phrases, batch.query_image, targets=batch)
    negative = int((batch.num_instances == 0).nonzero()[0])
    fired = dict(out, semantic_seg=out["semantic_seg"].clone())
    fired["semantic_seg"][negative] = 10.0  # the negative phrase fires everywhere
    loss = GroundingLoss(GroundingLossWeights(semantic_bce=1.0, semantic_dice=1.0))
    for exhaustive, changes in ((True, True), (False, False)):
        flags = batch.exhaustive.clone()
        flags[negative] = exhaustive
        varied = dataclasses.replace(batch, exhaustive=flags)
        before, after = loss(out, varied)["loss_semantic_seg"], loss(fired, varied)["loss_semantic_seg"]
        assert changes == bool(after > before + 1e-3), exhaustive


def test_a_student_file_keeps_its_detection_source(tiny_grounded_sam2, tmp_path):
    from sambridge.models import load_student
    from sambridge.models.standalone import save_student

    model = tiny_grounded_sam2()
    model.instances = "components"
    save_student(model, "grounded_sam2_tiny", {}, tmp_path / "student.safetensors")
    assert load_student(tmp_path / "student.safetensors").instances == "components"
