"""Models: Grounded SAM2 (SAM2 + SAM3's grounding head), its parts, registry and LoRA helpers.

``sambridge.models.variants`` registers the built-in variants and ``sambridge.models.sam3_teacher``
the SAM3 teachers; both are imported here so that ``create_model`` knows them as soon as this
package is imported.
"""

from sambridge.models import variants
from sambridge.models.checkpoint_io import CheckpointError
from sambridge.models.grounded_sam2 import DETECTION_SCORES, GroundedSAM2
from sambridge.models.grounding_head import SAM3_HEAD, TINY_HEAD, HeadConfig
from sambridge.models.lora import (
    LoraSettings,
    apply_finetune_mode,
    apply_lora,
    load_adapters,
    merge_lora,
    save_adapters,
)
from sambridge.models.registry import create_model, list_models, register_model
from sambridge.models.sam3_teacher import SAM3Teacher, load_sam3_checkpoint
from sambridge.models.standalone import load_student, save_student
from sambridge.models.variants import build_grounded_sam2
from sambridge.models.vision import Sam2VisionAdapter, VisionAdapter

__all__ = [
    "DETECTION_SCORES",
    "SAM3_HEAD",
    "TINY_HEAD",
    "CheckpointError",
    "GroundedSAM2",
    "HeadConfig",
    "LoraSettings",
    "SAM3Teacher",
    "Sam2VisionAdapter",
    "VisionAdapter",
    "apply_finetune_mode",
    "apply_lora",
    "build_grounded_sam2",
    "create_model",
    "list_models",
    "load_adapters",
    "load_sam3_checkpoint",
    "load_student",
    "merge_lora",
    "register_model",
    "save_adapters",
    "save_student",
    "variants",
]
