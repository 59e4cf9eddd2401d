"""Grounding head = sam3's detector head: same modules as sam3.model_builder, SAM3-checkpoint init."""

import dataclasses

import pytest
import sam3.model.decoder
import sam3.model.position_encoding
import torch
from sam3.model.necks import Sam3DualViTDetNeck
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.sam3_image import Sam3Image
from sam3.model.text_encoder_ve import VETextEncoder
from sam3.model.tokenizer_ve import SimpleTokenizer
from sam3.model.vitdet import ViT
from sam3.model.vl_combiner import SAM3VLBackbone
from sam3.train.matcher import BinaryHungarianMatcherV2

from sambridge.compat import apply_sam3_compat
from sambridge.models import TINY_HEAD, CheckpointError, HeadConfig
from sambridge.models.grounding_head import (
    HEAD_MODULES,
    QUERY_SELECTION_PREFIX,
    build_dot_product_scoring,
    build_geometry_encoder,
    build_segmentation_head,
    build_transformer,
    head_state_dict,
)
from sambridge.models.matching import FiniteCostMatcher


def test_compat_shim_is_idempotent():
    apply_sam3_compat()
    patched = (
        sam3.model.decoder.TransformerDecoder.__init__,
        sam3.model.position_encoding.PositionEmbeddingSine.__init__,
    )
    apply_sam3_compat()
    assert patched == (
        sam3.model.decoder.TransformerDecoder.__init__,
        sam3.model.position_encoding.PositionEmbeddingSine.__init__,
    )


def test_default_head_equals_sam3_model_builder():
    apply_sam3_compat()  # model_builder's factories precompute caches on CUDA otherwise
    import sam3.model_builder as mb

    reference = {
        "transformer": mb._create_sam3_transformer(),
        "dot_prod_scoring": mb._create_dot_product_scoring(),
        "segmentation_head": mb._create_segmentation_head(),
        "geometry_encoder": mb._create_geometry_encoder(),
    }
    cfg = HeadConfig()
    ours = {
        "transformer": build_transformer(cfg),
        "dot_prod_scoring": build_dot_product_scoring(cfg),
        "segmentation_head": build_segmentation_head(cfg),
        "geometry_encoder": build_geometry_encoder(cfg),
    }
    total = 0
    for name in HEAD_MODULES:
        shapes = {k: tuple(v.shape) for k, v in ours[name].state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in reference[name].state_dict().items()}, name
        count = sum(p.numel() for p in ours[name].parameters())
        assert count == sum(p.numel() for p in reference[name].parameters())
        total += count
    assert total == 32_745_270
    assert ours["transformer"].decoder.num_queries == reference["transformer"].decoder.num_queries == 200


def tiny_sam3_image() -> Sam3Image:
    """A tiny SAM3 image model (ViT backbone, SAM3 text encoder) built from the sam3 classes."""
    import open_clip

    apply_sam3_compat()
    torch.manual_seed(7)
    d, bpe = TINY_HEAD.d_model, open_clip.tokenizer.default_bpe()
    vit = ViT(
        img_size=56,
        pretrain_img_size=56,
        patch_size=14,
        embed_dim=48,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=(1,),
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=4,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
        use_act_checkpoint=False,
    )
    neck = Sam3DualViTDetNeck(
        position_encoding=PositionEmbeddingSine(num_pos_feats=d, normalize=True),
        d_model=d,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        trunk=vit,
        add_sam2_neck=False,
    )
    text = VETextEncoder(tokenizer=SimpleTokenizer(bpe_path=bpe), d_model=d, width=32, heads=2, layers=1)
    return Sam3Image(
        backbone=SAM3VLBackbone(visual=neck, text=text, scalp=1),
        transformer=build_transformer(TINY_HEAD),
        input_geometry_encoder=build_geometry_encoder(TINY_HEAD),
        segmentation_head=build_segmentation_head(TINY_HEAD),
        num_feature_levels=1,
        o2m_mask_predict=True,
        dot_prod_scoring=build_dot_product_scoring(TINY_HEAD),
        use_instance_query=False,
        multimask_output=True,
        inst_interactive_predictor=None,
    )


@pytest.fixture(scope="module")
def sam3_state():
    """sam3.pt layout: detector.* (backbone + head) and tracker.* entries under "model"."""
    state = {f"detector.{k}": v for k, v in tiny_sam3_image().state_dict().items()}
    state["tracker.maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)
    return state


def _save(path, state):
    torch.save({"model": state}, path)
    return path


def test_sam3_checkpoint_initialises_the_head(tmp_path, sam3_state, tiny_grounded_sam2):
    path = _save(tmp_path / "sam3.pt", sam3_state)
    model = tiny_grounded_sam2(seed=1, sam3_checkpoint=path)
    loaded = head_state_dict(model.detector)
    sam3_keys = [k for k in loaded if not k.startswith(QUERY_SELECTION_PREFIX)]
    assert sam3_keys and all(torch.equal(loaded[k], sam3_state[f"detector.{k}"]) for k in sam3_keys)
    untouched = tiny_grounded_sam2(seed=1)  # neither the backbone nor query selection (not in SAM3) come from it
    for k, v in untouched.vision.state_dict().items():
        assert torch.equal(v, model.vision.state_dict()[k])
    selection = {k: v for k, v in head_state_dict(untouched.detector).items() if k.startswith(QUERY_SELECTION_PREFIX)}
    assert selection and all(torch.equal(v, loaded[k]) for k, v in selection.items())


def test_sam3_checkpoint_leaves_the_region_alignment_initialised(tmp_path, sam3_state, tiny_grounded_sam2):
    path = _save(tmp_path / "sam3.pt", sam3_state)
    model = tiny_grounded_sam2(seed=1, sam3_checkpoint=path, head={"region_alignment": True})
    untouched = tiny_grounded_sam2(seed=1, head={"region_alignment": True})
    own = {k: v for k, v in head_state_dict(untouched.detector).items()
           if k.startswith("transformer.region_alignment.")}
    assert own and all(torch.equal(v, head_state_dict(model.detector)[k]) for k, v in own.items())


def test_sam3_checkpoint_with_missing_or_extra_head_keys_is_refused(tmp_path, sam3_state, tiny_grounded_sam2):
    missing = dict(sam3_state)
    del missing["detector.transformer.decoder.presence_token.weight"]
    with pytest.raises(
        CheckpointError, match="missing keys \\(1\\): transformer.decoder.presence_token.weight"
    ):
        tiny_grounded_sam2(sam3_checkpoint=_save(tmp_path / "missing.pt", missing))
    extra = {**sam3_state, "detector.dot_prod_scoring.bonus": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="unexpected keys \\(1\\): dot_prod_scoring.bonus"):
        tiny_grounded_sam2(sam3_checkpoint=_save(tmp_path / "extra.pt", extra))


def test_file_without_head_keys_is_refused(tmp_path, tiny_grounded_sam2):
    path = _save(tmp_path / "sam2.pt", {"image_encoder.trunk.pos_embed": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="has no 'detector."):
        tiny_grounded_sam2(sam3_checkpoint=path)


def test_real_size_sam3_checkpoint_into_tiny_head_names_shape_mismatches(tmp_path, tiny_grounded_sam2):
    state = {f"detector.{k}": v for k, v in build_dot_product_scoring(HeadConfig()).state_dict().items()}
    tiny_state = {f"detector.{k}": v for k, v in tiny_sam3_image().state_dict().items()}
    tiny_state.update({k.replace("detector.", "detector.dot_prod_scoring."): v for k, v in state.items()})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        tiny_grounded_sam2(sam3_checkpoint=_save(tmp_path / "big.pt", tiny_state))


def test_matcher_survives_nan_and_inf_predictions():
    matcher = FiniteCostMatcher(
        BinaryHungarianMatcherV2(focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    )
    logits = torch.tensor([[[float("nan")], [float("-inf")], [0.3]]])
    boxes = torch.tensor([[[float("nan")] * 4, [0.5, 0.5, 0.0, 0.0], [0.4, 0.4, 0.2, 0.2]]])
    targets = {"num_boxes": torch.tensor([1]), "boxes_padded": torch.tensor([[[0.4, 0.4, 0.2, 0.2]]])}
    with pytest.raises(ValueError, match="invalid numeric entries"):  # what it guards against
        BinaryHungarianMatcherV2(focal=True)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    rows, queries, _ = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert rows.tolist() == [0] and queries.tolist() == [2]
    assert matcher.num_sanitized == 1
    matcher(
        {"pred_logits": logits.nan_to_num(0.0).clamp(-5, 5), "pred_boxes": boxes.nan_to_num(0.5)}, targets
    )
    assert matcher.num_sanitized == 1  # finite predictions are not counted


def test_a_head_dict_changes_only_its_fields_and_mask_assignment_trains_the_proposals(grounding_batch):
    from sambridge.losses.grounding import GroundingLoss, GroundingLossWeights
    from sambridge.models import create_model
    from sambridge.models.matching import mask_assignment
    from sambridge.models.variants import TINY_GROUNDING_HEAD

    torch.manual_seed(0)
    model = create_model("grounded_sam2_tiny", head={"proposal_assignment": "mask"})
    assert model.num_queries == TINY_GROUNDING_HEAD.num_queries  # the tiny head, not SAM3's 200 queries
    assert model.detector.transformer.query_selection.assignment == "mask"
    with pytest.raises(ValueError, match="proposal_assignment"):
        HeadConfig(proposal_assignment="nearest")
    model.train()
    b = grounding_batch
    out = model(b.images, b.phrases, b.query_image, targets=b)
    proposals = out["aux_outputs"][-1]
    expected = mask_assignment(proposals["proposal_grid"], b)
    assert all(torch.equal(a, e) for a, e in zip(proposals["indices"], expected, strict=True))
    assert len(expected[0]) > b.boxes.shape[0]  # one-to-many: several tokens per instance
    loss = GroundingLoss(GroundingLossWeights(score_target="binary"))(out, b)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert model.detector.transformer.query_selection.box.layers[-1].weight.grad.abs().sum() > 0


def test_sam3_score_loss_f1_is_torchmetrics_f1_without_host_reads():
    """compat patch 5: the ``ce_f1`` sam3's score loss logs, same value, no device read."""
    import torchmetrics

    from sambridge.compat.sam3 import binary_f1
    from sambridge.profiling import HostSyncCounter

    apply_sam3_compat()
    generator = torch.Generator().manual_seed(0)
    for preds, target in ((torch.rand(64, generator=generator), torch.randint(0, 2, (64,), generator=generator)),
                          (torch.zeros(8), torch.zeros(8, dtype=torch.long))):  # nothing true, nothing predicted
        expected = torchmetrics.functional.f1_score(preds, target, task="binary")
        with HostSyncCounter() as counter:
            got = sam3.train.loss.loss_fns.torchmetrics.functional.f1_score(preds, target, task="binary")
        torch.testing.assert_close(got, expected)
        assert counter.total == 0, counter.syncs
    assert binary_f1 is sam3.train.loss.loss_fns.torchmetrics.functional.f1_score


def test_sam3_giou_without_prod_has_the_same_values_and_gradients_without_host_reads():
    """compat patch 6: the GIoU of sam3's box loss equals sam3's batched GIoU (values and gradients), and
    neither its forward nor its backward reads the device."""
    from sam3.model import box_ops

    from sambridge.profiling import HostSyncCounter

    generator = torch.Generator().manual_seed(0)
    boxes = torch.rand(2, 32, 4, generator=generator)
    boxes[..., 2:] += boxes[..., :2]
    boxes[1, 0] = boxes[0, 0]  # identical boxes: GIoU 1
    boxes[1, 1, :2], boxes[1, 1, 2:] = boxes[0, 1, 2:] + 0.1, boxes[0, 1, 2:] + 0.2  # disjoint: negative GIoU
    apply_sam3_compat()
    results = []
    for patched in (False, True):
        first, second = boxes[0].clone().requires_grad_(), boxes[1].clone().requires_grad_()
        with HostSyncCounter() as counter:
            if patched:
                value = box_ops.fast_diag_generalized_box_iou(first, second)
            else:
                value = box_ops.generalized_box_iou(first, second).diagonal()
            value.sum().backward()
        results.append((value.detach(), first.grad, second.grad, counter.total))
    for expected, got in zip(results[0][:3], results[1][:3], strict=True):
        torch.testing.assert_close(got, expected)
    assert results[1][0][0] == 1 and results[1][0][1] < 0
    assert results[1][3] == 0, "the patched GIoU reads the device"
    with pytest.raises(ValueError, match="as many boxes"):
        box_ops.fast_diag_generalized_box_iou(boxes[0], boxes[1, :3])


def test_a_training_step_reads_the_device_a_handful_of_times(make_batch):
    """Forward, matching, loss and backward of the tiny model: the reads left are the Hungarian matcher's
    one copy per call (final + auxiliary layers in the forward, auxiliary one-to-many layers in the loss),
    the one-to-many matcher's top-k (``quantile``, ``nonzero``). Before sam3's decoder was told its feature
    size, its GIoU lost ``prod`` and its mask loss its boolean filter, the same step made 44."""
    from sambridge.losses.grounding import GroundingLoss, GroundingLossWeights
    from sambridge.models import create_model
    from sambridge.profiling import HostSyncCounter

    torch.manual_seed(0)
    model = create_model("grounded_sam2_tiny").train()
    batch = dataclasses.replace(make_batch(), max_instances=2)  # as the collate function sets it
    assert int(batch.num_instances.max()) == batch.max_instances
    loss_fn = GroundingLoss(GroundingLossWeights(score_target="binary"))
    loss_fn(model(batch.images, batch.phrases, batch.query_image, targets=batch), batch)["loss"].backward()
    with HostSyncCounter() as counter:
        loss = loss_fn(model(batch.images, batch.phrases, batch.query_image, targets=batch), batch)["loss"]
        loss.backward()
    assert counter.total <= 4, counter.syncs


def test_proposal_nms_selects_other_objects_before_a_duplicate():
    from sambridge.models.grounding_head import QuerySelection

    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.31, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2],
                           [0.3, 0.31, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]]])  # 1 and 3 duplicate 0
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    plain = QuerySelection(HeadConfig(d_model=8, query_selection=True))
    nms = QuerySelection(HeadConfig(d_model=8, query_selection=True, proposal_nms=0.5))
    assert plain.select(scores, boxes, 3).tolist() == [[0, 1, 2]]
    assert nms.select(scores, boxes, 3).tolist() == [[0, 2, 4]]
    assert nms.select(scores, boxes, 5).tolist() == [[0, 2, 4, 1, 3]]  # duplicates last, still by score
    with pytest.raises(ValueError, match="proposal_nms"):
        HeadConfig(proposal_nms=1.5)


def _first_seeds_overlap(proposal_nms: float | None, batch, count: int = 8) -> tuple[float, int]:
    """Largest box IoU between two of the first ``count`` proposals a tiny model seeds its decoder with,
    and the device reads of its forward."""
    from sam3.model.box_ops import box_cxcywh_to_xyxy, box_iou

    from sambridge.models import create_model
    from sambridge.profiling import HostSyncCounter

    torch.manual_seed(0)
    model = create_model("grounded_sam2_tiny", head={"proposal_nms": proposal_nms}).eval()
    selection, picked = model.detector.transformer.query_selection, []
    select = selection.select
    selection.select = lambda scores, boxes, k: picked.append((boxes, select(scores, boxes, k))) or picked[-1][1]
    with torch.no_grad(), HostSyncCounter() as counter:
        model(batch.images, batch.phrases, batch.query_image)
    boxes, top = picked[0]
    seeds = box_cxcywh_to_xyxy(boxes.gather(1, top[:, :count, None].expand(-1, -1, 4)))
    return float(torch.triu(box_iou(seeds, seeds)[0], diagonal=1).amax()), counter.total


def test_a_model_with_proposal_nms_seeds_distinct_boxes_without_reading_the_device(grounding_batch):
    # untrained proposals are 2-token anchors: neighbours overlap by IoU 1/3
    assert _first_seeds_overlap(None, grounding_batch)[0] > 0.2
    overlap, reads = _first_seeds_overlap(0.2, grounding_batch)
    assert overlap <= 0.2 and reads == 0
