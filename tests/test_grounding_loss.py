"""GroundingLoss: SAM3 detector recipe + SAM2 refinement recipe on a GroundingBatch."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sambridge.losses import GroundingLoss, GroundingLossWeights

WEIGHTS = {
    "loss_bbox": 5.0,
    "loss_giou": 2.0,
    "loss_ce": 20.0,
    "presence_loss": 20.0,
    "loss_mask": 200.0,
    "loss_dice": 10.0,
    "refine_loss_mask": 20.0,
    "refine_loss_dice": 1.0,
    "refine_loss_iou": 1.0,
    "refine_loss_class": 1.0,
}


def weighted_total(terms: dict) -> torch.Tensor:
    """Sum of weight x term (``*_o2m`` terms come already multiplied by the ``o2m`` weight, as in sam3)."""
    total = torch.zeros(())
    for name, value in terms.items():
        if name != "loss":
            total = total + WEIGHTS[name.replace("_o2m", "").split("_aux_")[0]] * value
    return total


@pytest.fixture(scope="module")
def trained_outputs(make_batch):
    """Train-mode outputs (with matching) of a tiny model on the default batch."""
    from sambridge.models import create_model

    torch.manual_seed(0)
    model = create_model("grounded_sam2_tiny").train()
    batch = make_batch()
    return model, batch, model(batch.images, batch.phrases, batch.query_image, targets=batch)


def test_every_term_is_returned_and_the_total_is_their_weighted_sum(trained_outputs):
    _, batch, out = trained_outputs
    terms = GroundingLoss()(out, batch)
    expected = {
        "loss",
        "loss_bbox",
        "loss_giou",
        "loss_ce",
        "presence_loss",
        "loss_mask",
        "loss_dice",
        "loss_bbox_o2m",
        "loss_giou_o2m",
        "loss_ce_o2m",
        "loss_mask_o2m",
        "loss_dice_o2m",
        "loss_bbox_aux_0",
        "loss_giou_aux_0",
        "loss_ce_aux_0",
        "presence_loss_aux_0",
        "loss_bbox_aux_0_o2m",
        "loss_giou_aux_0_o2m",
        "loss_ce_aux_0_o2m",
        "loss_bbox_aux_1",  # the two-stage query selection's proposals
        "loss_giou_aux_1",
        "loss_ce_aux_1",
        "refine_loss_mask",
        "refine_loss_dice",
        "refine_loss_iou",
        "refine_loss_class",
    }
    assert set(terms) == expected
    assert all(torch.isfinite(v) and v >= 0 for v in terms.values())
    assert torch.allclose(terms["loss"], weighted_total(terms), rtol=1e-5)
    assert terms["loss"].requires_grad


def test_every_weight_is_a_constructor_argument(trained_outputs):
    _, batch, out = trained_outputs
    zero = {
        name: 0.0
        for name in (
            "box_l1",
            "box_giou",
            "score",
            "presence",
            "mask_focal",
            "mask_dice",
            "refine_focal",
            "refine_dice",
            "refine_iou",
            "refine_object_score",
        )
    }
    only_dice = GroundingLoss(GroundingLossWeights(**{**zero, "refine_dice": 3.0}))(out, batch)
    assert torch.allclose(only_dice["loss"], 3.0 * only_dice["refine_loss_dice"])
    only_giou = GroundingLoss(GroundingLossWeights(**{**zero, "box_giou": 1.0}, o2m=0.5))(out, batch)
    assert torch.allclose(
        only_giou["loss"], sum(v for k, v in only_giou.items() if k.startswith("loss_giou"))
    )
    default_o2m = GroundingLoss()(out, batch)
    assert torch.allclose(only_giou["loss_giou_o2m"], default_o2m["loss_giou_o2m"] / 4)  # 0.5 vs 2.0


def test_mask_stride_compares_upsampled_head_masks_at_full_resolution(trained_outputs):
    from sam3.train.loss.loss_fns import dice_loss

    _, batch, out = trained_outputs
    native, same, full = (GroundingLoss(GroundingLossWeights(mask_stride=s))(out, batch) for s in (None, 4, 1))
    assert torch.equal(native["loss_dice"], same["loss_dice"])  # stride 4 is the head's own 32 px at 128 px
    assert torch.equal(native["loss_giou"], full["loss_giou"]) and torch.equal(native["loss_ce"], full["loss_ce"])
    assert not torch.allclose(native["loss_dice"], full["loss_dice"])
    rows, queries, target = out["indices"]
    target = torch.arange(len(rows)) if target is None else target
    logits = F.interpolate(out["pred_masks"][rows, queries][:, None], size=batch.masks.shape[-2:], mode="bilinear",
                           align_corners=False)[:, 0]
    expected = dice_loss(logits.flatten(1), batch.masks[target].float().flatten(1), num_boxes=len(rows))
    assert torch.allclose(full["loss_dice"], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="mask_stride"):
        GroundingLoss(GroundingLossWeights(mask_stride=0))


def test_outputs_without_matching_are_refused(trained_outputs):
    _, batch, out = trained_outputs
    with pytest.raises(ValueError, match="targets=batch"):
        GroundingLoss()({k: v for k, v in out.items() if k != "indices"}, batch)


def test_presence_skips_non_exhaustive_negatives(trained_outputs):
    _, batch, out = trained_outputs
    logits = out["presence_logit_dec"][:, 0]
    present = (batch.num_instances > 0).float()
    for exhaustive, known in (([True] * 4, [0, 1, 2, 3]), ([True, True, True, False], [0, 1, 2])):
        varied = dataclasses.replace(batch, exhaustive=torch.tensor(exhaustive))
        got = GroundingLoss()(out, varied)["presence_loss"]
        expected = 0.5 * F.binary_cross_entropy_with_logits(
            logits[known], present[known]
        )  # alpha 0.5, gamma 0
        assert torch.allclose(got, expected, atol=1e-6)


def test_unmatched_predictions_of_non_exhaustive_queries_are_not_negatives(trained_outputs):
    _, batch, out = trained_outputs
    matched = set(out["indices"][1][out["indices"][0] == 2].tolist())
    unmatched = [k for k in range(out["pred_logits"].shape[1]) if k not in matched]
    pushed = dict(out)
    pushed["pred_logits"] = out["pred_logits"].detach().clone()
    pushed["pred_logits"][2, unmatched] += 5.0  # query 2 ("red box" in image 1) fires everywhere
    loss = GroundingLoss()
    for exhaustive, changes in ((True, True), (False, False)):
        varied = dataclasses.replace(batch, exhaustive=torch.tensor([True, True, exhaustive, True]))
        before, after = loss(out, varied)["loss_ce"], loss(pushed, varied)["loss_ce"]
        assert changes == (not torch.allclose(before, after)), exhaustive


def test_global_normalisation_with_a_process_group_matches_local(trained_outputs, tmp_path):
    _, batch, out = trained_outputs
    local = GroundingLoss()(out, batch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed = GroundingLoss()(out, batch)
    finally:
        dist.destroy_process_group()
    for name, value in local.items():
        assert torch.allclose(value, distributed[name]), name


def test_multimask_refinement_supervises_the_best_mask(make_batch):
    from sambridge.models import create_model

    torch.manual_seed(0)
    model = create_model("grounded_sam2_tiny", refine_multimask_output=True).train()
    batch = make_batch()
    out = model(batch.images, batch.phrases, batch.query_image, targets=batch)
    assert out["refine"]["mask_logits"].shape[1] == 3
    terms = GroundingLoss()(out, batch)
    single = {
        **out["refine"],
        "mask_logits": out["refine"]["mask_logits"][:, :1],
        "iou_predictions": out["refine"]["iou_predictions"][:, :1],
    }
    first_only = GroundingLoss()({**out, "refine": single}, batch)
    best = 20.0 * terms["refine_loss_mask"] + terms["refine_loss_dice"]
    assert best <= 20.0 * first_only["refine_loss_mask"] + first_only["refine_loss_dice"] + 1e-6


def test_overfitting_one_batch_lowers_the_loss_and_learns_presence(make_batch):
    from sambridge.models import create_model

    torch.manual_seed(0)
    model = create_model("grounded_sam2_tiny").train()
    batch = make_batch()
    loss_fn = GroundingLoss()
    optimiser = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0
    )
    history = []
    for _ in range(40):
        losses = loss_fn(model(batch.images, batch.phrases, batch.query_image, targets=batch), batch)
        optimiser.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimiser.step()
        history.append({k: v.item() for k, v in losses.items()})
    # one-to-many terms start near zero and grow as predictions improve and more of them match
    one_to_one = [weighted_total({k: v for k, v in h.items() if "o2m" not in k}) for h in history]
    first, last = history[0], sum(one_to_one[-5:]) / 5
    assert last < 0.5 * one_to_one[0], (one_to_one[0], last)
    # margins hold across seeds; CPU float summation order (thread timing) varies the trajectory a little
    ratios = {"loss_giou": 0.7, "loss_mask": 0.5, "presence_loss": 0.2, "refine_loss_dice": 0.85}
    for term, ratio in ratios.items():
        assert history[-1][term] < ratio * first[term], term
    model.eval()
    with torch.no_grad():
        presence = model(batch.images, batch.phrases, batch.query_image)["presence_logit_dec"][:, 0].sigmoid()
    negative = batch.num_instances == 0
    assert negative.tolist() == [False, False, False, True]
    assert presence[~negative].min() > 0.5 > 0.1 > presence[negative].max(), presence


def test_batch_without_any_instance_trains_presence_only(make_batch):
    from sambridge.models import create_model

    torch.manual_seed(0)
    model = create_model("grounded_sam2_tiny").train()
    batch = make_batch(queries=((0, "green box", True), (1, "blue box", False)))
    out = model(batch.images, batch.phrases, batch.query_image, targets=batch)
    assert out["refine"]["mask_logits"].shape[0] == 0
    terms = GroundingLoss()(out, batch)
    logit = out["presence_logit_dec"][0, 0]  # only the exhaustive negative has a known presence
    assert torch.allclose(terms["presence_loss"], 0.5 * F.softplus(logit), atol=1e-6)
    assert all(v == 0 for k, v in terms.items() if not k.startswith(("loss", "presence_loss")))
    assert all(terms[k] == 0 for k in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice"))
    terms["loss"].backward()
    assert model.detector.transformer.decoder.presence_token.weight.grad is not None


def test_binary_score_target_pushes_a_matched_score_up_where_the_iou_target_pushes_it_down():
    from sam3.train.loss import loss_fns

    from sambridge.losses.grounding import BinaryTargetIABCE

    def matched_logit_gradient(loss_class) -> float:
        logits = torch.tensor([[[0.4], [-2.0]]], requires_grad=True)  # matched score sigmoid(0.4) = 0.6
        outputs = {"pred_logits": logits,
                   "pred_boxes_xyxy": torch.tensor([[[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]]])}
        targets = {"boxes_xyxy": torch.tensor([[0.1, 0.1, 0.5, 0.5]]), "is_exhaustive": torch.tensor([True])}
        loss = loss_class(pos_weight=10.0, weight_dict={"loss_ce": 1.0}, weak_loss=True, alpha=0.25, gamma=2.0)
        loss.get_loss(outputs, targets, (torch.tensor([0]), torch.tensor([0]), None), num_boxes=1)["loss_ce"].backward()
        return float(logits.grad[0, 0, 0])

    # box IoU 0.25: SAM3's target 0.6^0.25 * 0.25^0.75 = 0.31 lowers the score, the binary one raises it
    assert matched_logit_gradient(loss_fns.IABCEMdetr) > 0 > matched_logit_gradient(BinaryTargetIABCE)
    with pytest.raises(ValueError, match="score_target must be"):
        GroundingLoss(GroundingLossWeights(score_target="soft"))


def test_score_absent_trains_the_query_scores_of_an_absent_phrase_towards_zero(make_batch):
    from sambridge.models import create_model

    torch.manual_seed(0)
    model = create_model("grounded_sam2_tiny").train()
    batch = make_batch(queries=((0, "green box", True), (1, "blue box", False)))
    out = model(batch.images, batch.phrases, batch.query_image, targets=batch)

    def score_gradient(score_absent: bool) -> torch.Tensor:
        logits = out["pred_logits"].detach().requires_grad_(True)
        terms = GroundingLoss(GroundingLossWeights(score_absent=score_absent))({**out, "pred_logits": logits}, batch)
        terms["loss_ce"].backward()
        return logits.grad[..., 0]

    assert not score_gradient(False).any()  # SAM3: an absent phrase trains presence only
    grad = score_gradient(True)
    assert (grad[0] > 0).all()  # the exhaustive negative: every query score pushed down
    assert not grad[1].any()  # a non-exhaustive query without instances: nothing known, nothing learnt


def test_refinement_runs_in_training_only_when_a_refine_weight_is_set(make_batch):
    from sambridge.modules import GroundingModule

    batch = make_batch()
    off = GroundingLossWeights(refine_focal=0.0, refine_dice=0.0, refine_iou=0.0, refine_object_score=0.0)
    for weights, refined in ((GroundingLossWeights(), True), (off, False)):
        module = GroundingModule(model="grounded_sam2_tiny", loss=weights).train()
        out = module.model(batch.images, batch.phrases, batch.query_image, targets=batch)
        assert ("refine" in out) is refined
        terms = module.loss_fn(out, batch)
        assert any(k.startswith("refine_") for k in terms) is refined


@pytest.mark.parametrize("on_bar", [None, False])
def test_the_training_loss_is_on_the_progress_bar_only_where_reading_it_is_free(make_batch, on_bar):
    """Lightning reads progress-bar metrics off the device after every batch: on a CPU that is free, on a
    GPU (``loss_on_progress_bar`` left at None there means False) the loss stays in the logger only."""
    import lightning.pytorch as pl

    from sambridge.modules import GroundingModule

    module = GroundingModule(model="grounded_sam2_tiny")
    module.loss_on_progress_bar = on_bar
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(module, torch.utils.data.DataLoader([make_batch()], batch_size=None))
    assert ("train_loss" in trainer.progress_bar_metrics) is (on_bar is None)
    assert "train_loss" in trainer.callback_metrics


def test_auxiliary_one_to_many_layers_are_matched_in_one_read_with_sam3s_results(make_batch):
    """Four decoder layers: sam3 would match the three auxiliary one-to-many outputs one call (one device
    read) each; the loss matches them together and gets sam3's terms exactly."""
    import dataclasses

    from sambridge.losses.grounding import _without_presence
    from sambridge.models import create_model
    from sambridge.models.matching import to_sam3_targets
    from sambridge.profiling import HostSyncCounter

    torch.manual_seed(0)
    model = create_model("grounded_sam2_tiny", head={"decoder_layers": 4}).train()
    batch = dataclasses.replace(make_batch(), max_instances=2)
    out = model(batch.images, batch.phrases, batch.query_image, targets=batch)
    assert sum("pred_logits_o2m" in aux for aux in out["aux_outputs"]) == 3
    loss = GroundingLoss()
    matcher = loss.detector_loss.matcher
    targets = to_sam3_targets(batch, mask_size=tuple(out["pred_masks"].shape[-2:]))
    with HostSyncCounter() as sam3_way:
        expected = loss.detector_loss.compute_loss(_without_presence(out), targets)
    with HostSyncCounter() as ours:
        got = loss._sam3_loss(_without_presence(out), targets)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, msg=name)
    assert sam3_way.syncs.get("cpu", 0) - ours.syncs.get("cpu", 0) == 2, (sam3_way.syncs, ours.syncs)
    assert loss.detector_loss.matcher is matcher  # put back
