"""Where validation and inference take instance masks from, and duplicate suppression, per run settings."""

from __future__ import annotations

from sambridge.modules import GroundingModule
from sambridge.modules.grounding import PredictSettings, refine_by_default


def test_mask_source_defaults_to_sam2_only_when_sam2_weights_were_loaded():
    assert refine_by_default(None, None) is False  # random SAM2 decoder: the head's masks
    assert refine_by_default("checkpoints/sam2.1_hiera_tiny.pt", None) is True
    assert refine_by_default("checkpoints/sam2.1_hiera_tiny.pt", PredictSettings(refine=False)) is False
    assert refine_by_default(None, PredictSettings(refine=True)) is True


def test_module_sets_the_models_mask_source_and_passes_nms():
    module = GroundingModule(model="grounded_sam2_tiny")
    assert module.model.refine_masks is False
    module = GroundingModule(model="grounded_sam2_tiny", prediction=PredictSettings(refine=True, nms_iou=0.6))
    assert module.model.refine_masks is True and module.predict_settings.nms_iou == 0.6


def test_one_to_many_outputs_are_the_dac_queries_and_need_nms(grounding_batch):
    import pytest
    import torch

    with pytest.raises(ValueError, match="one_to_many needs prediction.nms_iou"):
        PredictSettings(outputs="one_to_many")
    torch.manual_seed(0)
    module = GroundingModule(model="grounded_sam2_tiny",
                             prediction=PredictSettings(outputs="one_to_many", nms_iou=0.5))
    model, b = module.model, grounding_batch
    assert model.one_to_many_outputs and model.nms_iou == 0.5
    with torch.no_grad():
        dac = model.train()(b.images, b.phrases, b.query_image)  # training runs both query sets
        o2m = model.eval()(b.images, b.phrases, b.query_image)
        model.one_to_many_outputs = False
        o2o = model(b.images, b.phrases, b.query_image)
    assert o2m["pred_logits"].shape == o2o["pred_logits"].shape == (4, model.num_queries, 1)
    torch.testing.assert_close(o2m["pred_logits"], dac["pred_logits_o2m"])
    torch.testing.assert_close(o2m["pred_boxes"], dac["pred_boxes_o2m"])
    torch.testing.assert_close(o2o["pred_logits"], dac["pred_logits"])
    assert not torch.allclose(o2m["pred_logits"], o2o["pred_logits"])


def test_component_outputs_come_from_the_semantic_mask():
    import pytest

    module = GroundingModule(model="grounded_sam2_tiny", prediction=PredictSettings(outputs="components"))
    assert module.model.instances == "components" and not module.model.one_to_many_outputs
    assert GroundingModule(model="grounded_sam2_tiny").model.instances == "queries"
    with pytest.raises(ValueError, match="one_to_one, one_to_many or components"):
        PredictSettings(outputs="blobs")


def test_detection_score_is_the_match_alone_when_absent_phrases_trained_it(grounding_batch, tmp_path):
    import pytest
    import torch

    from sambridge.losses import GroundingLossWeights
    from sambridge.models import load_student
    from sambridge.models.standalone import save_student

    sam3 = GroundingModule(model="grounded_sam2_tiny")
    absent = GroundingModule(model="grounded_sam2_tiny", loss=GroundingLossWeights(score_absent=True))
    forced = GroundingModule(model="grounded_sam2_tiny", loss={"score_absent": True},
                             prediction={"score": "match_x_presence"})
    assert sam3.model.detection_score == "match_x_presence" and absent.model.detection_score == "match"
    assert forced.model.detection_score == "match_x_presence"
    with pytest.raises(ValueError, match="prediction.score must be one of"):
        PredictSettings(score="presence")
    model, b = absent.model.eval(), grounding_batch
    with torch.no_grad():
        out = model(b.images, b.phrases, b.query_image)
    match = out["pred_logits"][..., 0].sigmoid()
    torch.testing.assert_close(model.scores(out), match)
    torch.testing.assert_close(sam3.model.scores(out), match * out["presence_logit_dec"].sigmoid())
    assert not torch.allclose(model.scores(out), sam3.model.scores(out))
    kept = model.postprocess(out, score_threshold=0.0)["scores"]
    torch.testing.assert_close(kept, match.sort(dim=1, descending=True).values[:, :kept.shape[1]])
    save_student(model, "grounded_sam2_tiny", {}, tmp_path / "student.safetensors")
    assert load_student(tmp_path / "student.safetensors").detection_score == "match"


def test_mask_nms_drops_a_part_of_an_object_and_keeps_a_touching_one():
    import torch

    from sambridge.models.grounded_sam2 import suppress_contained

    whole, part, touching = (torch.zeros(16, 16, dtype=torch.bool) for _ in range(3))
    whole[2:10, 2:10], part[2:10, 2:5], touching[2:10, 10:16] = True, True, True
    masks = torch.stack([whole, part, touching])[None]  # best first
    keep = torch.ones(1, 3, dtype=torch.bool)
    assert suppress_contained(masks, keep, 0.5).tolist() == [[True, False, True]]
    assert suppress_contained(masks, torch.tensor([[False, True, True]]), 0.5).tolist() == [[False, True, True]]
    # a dropped detection drops nothing: c lies in b (3/4 of c), b mostly in a (5/8 of b), c not in a
    a, b, c = (torch.zeros(16, 16, dtype=torch.bool) for _ in range(3))
    a[2:10, 0:8], b[2:10, 3:11], c[2:10, 8:12] = True, True, True
    assert suppress_contained(torch.stack([a, b, c])[None], keep, 0.5).tolist() == [[True, False, True]]


def test_mask_nms_is_a_run_setting_that_reaches_the_model_and_suffices_for_one_to_many(grounding_batch):
    import pytest
    import torch

    with pytest.raises(ValueError, match="mask_nms must be in"):
        PredictSettings(mask_nms=1.5)
    module = GroundingModule(model="grounded_sam2_tiny",
                             prediction=PredictSettings(outputs="one_to_many", mask_nms=0.5))
    model, b = module.model.eval(), grounding_batch
    assert model.mask_nms == 0.5 and model.nms_iou is None
    with torch.no_grad():
        out = model(b.images, b.phrases, b.query_image)
        suppressed = model.postprocess(out, score_threshold=0.0)  # the model's own setting
        model.mask_nms = None
        unsuppressed = model.postprocess(out, score_threshold=0.0)
    assert suppressed["keep"].sum() < unsuppressed["keep"].sum()  # untrained queries pile up on one blob
    assert not (suppressed["masks"] & ~suppressed["keep"][..., None, None]).any()
