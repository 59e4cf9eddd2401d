"""GroundedSAM2 forward/postprocess/prompting contract on the tiny real-architecture model."""

import pytest
import torch

from sambridge.models.lora import apply_finetune_mode

SIZE = 128
STRIDE4 = SIZE // 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    from sambridge.models import create_model

    return create_model("grounded_sam2_tiny", image_size=SIZE).eval()


def test_eval_forward_shapes_and_keys(model, grounding_batch):
    b = grounding_batch
    with torch.no_grad():
        out = model(b.images, b.phrases, b.query_image)
    q, k = 4, model.num_queries
    assert out["pred_logits"].shape == (q, k, 1)
    assert out["pred_boxes"].shape == out["pred_boxes_xyxy"].shape == (q, k, 4)
    assert out["pred_masks"].shape == (q, k, STRIDE4, STRIDE4)
    assert out["presence_logit_dec"].shape == (q, 1)
    assert out["semantic_seg"].shape == (q, 1, STRIDE4, STRIDE4)
    assert "aux_outputs" not in out and "pred_logits_o2m" not in out and "indices" not in out
    boxes = out["pred_boxes_xyxy"]
    assert (boxes[..., 2:] >= boxes[..., :2]).all()
    assert [f.shape[-1] for f in out["sam2_backbone_fpn"]] == [32, 16, 8]
    assert torch.equal(out["query_image"], b.query_image) and out["input_hw"] == (SIZE, SIZE)


def test_image_encoder_runs_once_per_image_and_text_once_per_unique_phrase(model, grounding_batch):
    b = grounding_batch
    image_batches, text_batches = [], []
    hooks = [
        model.vision.trunk.register_forward_hook(lambda m, a, o: image_batches.append(a[0].shape[0])),
        model.text_encoder.tower.register_forward_hook(lambda m, a, o: text_batches.append(a[0].shape[0])),
    ]
    phrases = ["red box", "blue box", "red box", "green box", "red box"]
    with torch.no_grad():
        out = model(b.images, phrases, torch.tensor([0, 0, 1, 1, 1]))
    for h in hooks:
        h.remove()
    assert image_batches == [2] and text_batches == [3]
    assert out["pred_logits"].shape[0] == 5
    with torch.no_grad():  # rows of the same (image, phrase) agree, rows of different images do not
        again = model(b.images[:1], ["red box"], torch.tensor([0]))
    assert torch.allclose(again["pred_logits"][0], out["pred_logits"][0], atol=1e-5)
    assert not torch.allclose(out["pred_logits"][0], out["pred_logits"][2], atol=1e-3)


def test_other_canvas_sizes_are_resized_to_the_model_input(model, grounding_batch):
    b = grounding_batch
    big = torch.nn.functional.interpolate(b.images, size=(192, 192), mode="bilinear")
    with torch.no_grad():
        out = model(big, b.phrases, b.query_image)
    assert out["pred_masks"].shape[-1] == STRIDE4 and out["input_hw"] == (192, 192)
    post = model.postprocess(out, top_k=3, score_threshold=0.0)
    assert post["masks"].shape == (4, 3, 192, 192)


def test_bad_inputs_are_refused(model, grounding_batch):
    b = grounding_batch
    with pytest.raises(ValueError, match="one image index per phrase"):
        model(b.images, b.phrases[:3], b.query_image)
    with pytest.raises(ValueError, match="must index the 2 images"):
        model(b.images, b.phrases, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="images must be float"):
        model((b.images * 255).to(torch.uint8), b.phrases, b.query_image)


def test_train_forward_with_targets_carries_matching_and_refinement(tiny_grounded_sam2, grounding_batch):
    b = grounding_batch
    model = tiny_grounded_sam2().train()
    out = model(b.images, b.phrases, b.query_image, targets=b)
    k = model.num_queries
    assert out["pred_logits_o2m"].shape == (4, k, 1) and out["pred_masks_o2m"].shape == (
        4,
        k,
        STRIDE4,
        STRIDE4,
    )
    assert len(out["aux_outputs"]) == 2 and all("indices" in aux for aux in out["aux_outputs"])
    assert out["aux_outputs"][-1]["pred_boxes"].shape == (4, 8 * 8, 4)  # encoder proposals: one per token
    rows, queries, _ = out["indices"]
    assert rows.tolist() == [0, 0, 1, 2]  # 2 red + 1 blue in image 0, 1 red in image 1, no blue there
    assert len(set(queries[:2].tolist())) == 2  # two different queries for the two red boxes
    refine = out["refine"]
    assert refine["mask_logits"].shape == (4, 1, STRIDE4, STRIDE4)
    assert refine["iou_predictions"].shape == (4, 1) and refine["object_score_logits"].shape == (4, 1)
    assert refine["target_index"].tolist() == [0, 1, 2, 3]


def test_query_selection_seeds_the_decoder_with_the_top_encoder_proposals(tiny_grounded_sam2, grounding_batch):
    b = grounding_batch
    model = tiny_grounded_sam2().eval()
    seen = {}
    detector = model.detector
    detector.transformer.query_selection.register_forward_hook(lambda m, args, out: seen.update(proposals=out))
    detector.transformer.decoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(reference=kwargs["reference_boxes"]), with_kwargs=True)
    with torch.no_grad():
        model(b.images, b.phrases, b.query_image)
    scores, boxes = seen["proposals"]
    assert scores.shape == (4, 64, 1) and boxes.shape == (4, 64, 4)  # 8 x 8 tokens of a 128 px image
    top = scores[..., 0].topk(model.num_queries, dim=1).indices
    expected = torch.stack([boxes[q, top[q]] for q in range(4)], dim=1)
    assert torch.equal(seen["reference"], expected)

    model.train()
    out = model(b.images, b.phrases, b.query_image, targets=b)
    proposals = out["aux_outputs"][-1]  # the proposals train through their own loss terms
    (proposals["pred_logits"].sum() + proposals["pred_boxes"].sum()).backward()
    grads = [p.grad for p in detector.transformer.query_selection.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_head_token_stride_8_gives_a_finer_token_grid(tiny_grounded_sam2, grounding_batch):
    b = grounding_batch
    model = tiny_grounded_sam2(head_token_stride=8).eval()
    with torch.no_grad():
        out = model(b.images, b.phrases, b.query_image)
    assert [f.shape[-1] for f in out["backbone_fpn"]] == [32, 16]  # strides 4 and 8 of 128 px
    assert [f.shape[-1] for f in out["sam2_backbone_fpn"]] == [32, 16, 8]  # SAM2's decoder keeps its levels
    assert out["pred_masks"].shape[-2:] == (STRIDE4, STRIDE4)
    with pytest.raises(ValueError, match="head_token_stride must be 8 or 16"):
        tiny_grounded_sam2(head_token_stride=32)


def test_postprocess_scores_keep_and_masks(model, grounding_batch):
    b = grounding_batch
    with torch.no_grad():
        out = model(b.images, b.phrases, b.query_image)
    scores = out["pred_logits"][..., 0].sigmoid() * out["presence_logit_dec"].sigmoid()
    threshold = float(scores.flatten().sort().values[-6])  # exactly 6 detections pass
    for refine in (True, False):
        post = model.postprocess(out, top_k=5, score_threshold=threshold, refine=refine, out_hw=(64, 80))
        assert post["scores"].shape == post["keep"].shape == post["query_indices"].shape == (4, 5)
        assert torch.allclose(post["scores"], scores.topk(5, dim=1).values)
        assert post["boxes_xyxy"].shape == (4, 5, 4)
        assert (post["boxes_xyxy"] >= 0).all() and (post["boxes_xyxy"] <= 1).all()
        assert post["masks"].shape == (4, 5, 64, 80) and post["masks"].dtype == torch.bool
        assert int(post["keep"].sum()) == sum(min(5, int((row >= threshold).sum())) for row in scores) > 0
        assert not post["masks"][~post["keep"]].any()
        assert torch.equal(post["semantic_masks"], post["masks"].any(1))
        assert torch.allclose(post["presence"], out["presence_logit_dec"][:, 0].sigmoid())


def test_postprocess_nms_drops_duplicates_of_a_kept_box_only(model, grounding_batch):
    b = grounding_batch
    with torch.no_grad():
        out = model(b.images, b.phrases, b.query_image)
    out = dict(out)
    boxes = out["pred_boxes_xyxy"].clone()
    boxes[0, :3] = torch.tensor([0.1, 0.1, 0.4, 0.4])  # query 0: three copies of one box ...
    boxes[0, 3] = torch.tensor([0.6, 0.6, 0.9, 0.9])  # ... and one elsewhere
    logits = torch.full_like(out["pred_logits"], -20.0)
    logits[0, :4] = 20.0
    out.update(pred_boxes_xyxy=boxes, pred_logits=logits, presence_logit_dec=torch.full_like(
        out["presence_logit_dec"], 20.0))
    plain = model.postprocess(out, top_k=5, score_threshold=0.5, refine=False)
    suppressed = model.postprocess(out, top_k=5, score_threshold=0.5, refine=False, nms_iou=0.5)
    assert int(plain["keep"][0].sum()) == 4
    assert int(suppressed["keep"][0].sum()) == 2  # one of the three copies and the other box
    kept_boxes = suppressed["boxes_xyxy"][0][suppressed["keep"][0]]
    assert torch.allclose(kept_boxes.sort(0).values, torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.6, 0.6, 0.9, 0.9]]))
    assert not suppressed["masks"][0][~suppressed["keep"][0]].any()


def test_postprocess_mask_source_follows_refine_masks(model, grounding_batch):
    b = grounding_batch
    with torch.no_grad():
        out = model(b.images, b.phrases, b.query_image)
    head = model.postprocess(out, top_k=3, score_threshold=0.0, refine=False)
    sam2 = model.postprocess(out, top_k=3, score_threshold=0.0, refine=True)
    assert not torch.equal(head["masks"], sam2["masks"])
    original = model.refine_masks
    try:
        for flag, expected in ((False, head), (True, sam2)):
            model.refine_masks = flag
            assert torch.equal(model.postprocess(out, top_k=3, score_threshold=0.0)["masks"], expected["masks"])
    finally:
        model.refine_masks = original


def test_geometric_prompts_alone(model, grounding_batch):
    images = grounding_batch.images
    box = torch.tensor([[10, 15, 50, 55], [30, 30, 90, 75]]) / SIZE
    with torch.no_grad():
        by_box = model.segment_with_prompts(images, boxes=box)
        by_click = model.segment_with_prompts(
            images,
            points=torch.tensor([[[0.25, 0.28]], [[0.47, 0.41]]]),
            point_labels=torch.ones(2, 1),
            multimask_output=True,
        )
        previous = by_box["mask_logits"]
        by_mask = model.segment_with_prompts(images, mask_inputs=previous, out_hw=(64, 64))
    assert by_box["masks"].shape == (2, 1, SIZE, SIZE) and by_box["iou_predictions"].shape == (2, 1)
    assert by_box["mask_logits"].shape == (2, 1, STRIDE4, STRIDE4)
    assert by_click["masks"].shape == (2, 3, SIZE, SIZE) and by_click["object_score_logits"].shape == (2, 1)
    assert by_mask["masks"].shape == (2, 1, 64, 64)
    assert not torch.allclose(by_box["mask_logits"][0], by_box["mask_logits"][1])


def test_geometric_prompt_combined_with_a_phrase(model, grounding_batch):
    images = grounding_batch.images
    click = torch.tensor([[[0.5, 0.7]], [[0.3, 0.3]]])
    with torch.no_grad():
        grounded = model(images, ["red box", "red box"], torch.tensor([0, 1]))
        result = model.segment_with_prompts(
            images, points=click, point_labels=torch.ones(2, 1), phrases=["red box", "red box"]
        )
    assert result["masks"].shape == (2, 1, SIZE, SIZE)
    assert result["grounding_boxes_xyxy"].shape == (2, 4) and result["grounding_scores"].shape == (2,)
    scores = model.scores(grounded)
    for row in range(2):  # the chosen detection is the best one among those containing the click
        boxes = grounded["pred_boxes_xyxy"][row].clamp(0, 1)
        x, y = click[row, 0]
        inside = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
        candidates = scores[row] if not inside.any() else torch.where(inside, scores[row], -1.0)
        assert torch.allclose(result["grounding_boxes_xyxy"][row], boxes[candidates.argmax()])
    with pytest.raises(ValueError, match="either boxes or phrases"):
        model.segment_with_prompts(images, boxes=torch.rand(2, 4), phrases=["a", "b"])
    with pytest.raises(ValueError, match="at least one prompt"):
        model.segment_with_prompts(images)


def test_state_dict_round_trip_gives_identical_outputs(model, tiny_grounded_sam2, grounding_batch, tmp_path):
    b = grounding_batch
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other = tiny_grounded_sam2(seed=123)
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    other.eval()
    with torch.no_grad():
        a, c = model(b.images, b.phrases, b.query_image), other(b.images, b.phrases, b.query_image)
    for key in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec", "semantic_seg"):
        assert torch.equal(a[key], c[key]), key


def test_parameter_groups_cover_every_trainable_parameter_once(tiny_grounded_sam2):
    model = tiny_grounded_sam2()
    groups = model.parameter_groups()
    assert set(groups) == {"backbone", "text", "head", "sam2_decoder", "adapters"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in groups["backbone"]) == sum(p.numel() for p in model.vision.parameters())
    assert groups["adapters"] == []
    apply_finetune_mode(model, "frozen_encoder")
    groups = model.parameter_groups()
    assert groups["backbone"] == [] and groups["head"] and groups["sam2_decoder"]


def test_moving_the_model_updates_the_device_sam3_caches(tiny_grounded_sam2):
    model = tiny_grounded_sam2()
    assert model.detector.device.type == "cpu"
    model.to("meta")  # sam3's Sam3Image caches its device; Lightning moves models with .to()
    assert model.detector.device.type == "meta"
    assert model.detector._get_dummy_prompt(2).box_embeddings.device.type == "meta"
