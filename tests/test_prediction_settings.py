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
