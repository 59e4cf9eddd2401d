"""The Grounded SAM2 builder and its registered variants.

========================  ===================  ===========  ================  ===================
name                      SAM2 config          head         text tower        default image size
========================  ===================  ===========  ================  ===================
grounded_sam2_tiny        sam2.1_hiera_t tiny  ``TINY``     ViT-S-32 64-d     128 (tests, demo)
grounded_sam2_hiera_t     sam2.1_hiera_t       SAM3         MobileCLIP-S1     1024
grounded_sam2_hiera_s     sam2.1_hiera_s       SAM3         MobileCLIP-S1     1024
grounded_sam2_hiera_b+    sam2.1_hiera_b+      SAM3         MobileCLIP-S1     1024
grounded_sam2_hiera_l     sam2.1_hiera_l       SAM3         MobileCLIP-S1     1024
========================  ===================  ===========  ================  ===================

Every argument of ``build_grounded_sam2`` can be overridden through ``create_model``. Real
variants start from random weights unless given ``sam2_checkpoint`` (official
``sam2.1_hiera_*.pt``), ``text_pretrained`` (an open_clip tag already cached locally, e.g.
``"datacompdr"``, or a local weight file) and optionally ``sam3_checkpoint`` (``sam3.pt``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from sam3.model.vl_combiner import SAM3VLBackbone

from sambridge.models.grounded_sam2 import GroundedSAM2
from sambridge.models.grounding_head import SAM3_HEAD, TINY_HEAD, HeadConfig, build_detector, load_sam3_head
from sambridge.models.registry import register_model
from sambridge.models.sam2_builder import SAM2_TINY_OVERRIDES, build_sam2
from sambridge.models.sam2_decoder import Sam2PromptDecoder
from sambridge.models.text_encoder import OpenClipTextEncoder
from sambridge.models.vision import Sam2VisionAdapter


def build_grounded_sam2(
    sam2_config: str = "sam2.1_hiera_t",
    image_size: int = 1024,
    sam2_checkpoint: str | os.PathLike | None = None,
    sam2_overrides: Sequence[str] = (),
    head: HeadConfig = SAM3_HEAD,
    sam3_checkpoint: str | os.PathLike | None = None,
    text_model: str = "MobileCLIP-S1",
    text_pretrained: str | os.PathLike | None = None,
    text_cfg: dict | None = None,
    text_context_length: int = 32,
    freeze_text: bool = True,
    text_vocabulary: Sequence[str] | None = None,
    dual_neck: bool = True,
    refine_multimask_output: bool = False,
) -> GroundedSAM2:
    """Assemble a ``GroundedSAM2`` from the sam2, sam3 and open_clip packages (on the CPU).

    Args:
        sam2_config: SAM2.1 config name (``sam2.1_hiera_t|s|b+|l``).
        image_size: Square model input size, a multiple of 32.
        sam2_checkpoint: Official SAM2 checkpoint for the trunk, neck(s), prompt encoder and mask decoder.
        sam2_overrides: Extra hydra overrides for SAM2 (e.g. the tiny test architecture).
        head: Grounding head dims; ``d_model`` must equal SAM2's neck width (256 for SAM2.1).
        sam3_checkpoint: A ``sam3.pt`` whose detector head initialises the grounding head.
        text_model: open_clip model whose text tower encodes the phrases.
        text_pretrained: open_clip tag (locally cached) or local weight file for the text tower.
        text_cfg: Overrides of the open_clip text config (tests use a tiny tower).
        text_context_length: Tokens per phrase.
        freeze_text: Keep the text tower fixed (its output projection still trains).
        text_vocabulary: Fixed phrase list whose frozen text features are computed once.
        dual_neck: Give the head its own FPN neck so SAM2's neck stays as trained for its decoder.
        refine_multimask_output: Three SAM2 masks per matched box in training (best one supervised).
    """
    sam2 = build_sam2(
        sam2_config, image_size=image_size, checkpoint=sam2_checkpoint, overrides=sam2_overrides
    )
    neck_width = sam2.image_encoder.neck.d_model
    if neck_width != head.d_model:
        raise ValueError(f"head.d_model ({head.d_model}) must equal the SAM2 neck width ({neck_width})")
    vision = Sam2VisionAdapter(sam2.image_encoder.trunk, sam2.image_encoder.neck, dual_neck=dual_neck)
    text = OpenClipTextEncoder(
        head.d_model,
        model_name=text_model,
        pretrained=text_pretrained,
        context_length=text_context_length,
        text_cfg=text_cfg,
        frozen=freeze_text,
        vocabulary=text_vocabulary,
    )
    detector = build_detector(SAM3VLBackbone(visual=vision, text=text, scalp=1), head)
    if sam3_checkpoint is not None:
        load_sam3_head(detector, sam3_checkpoint)
    return GroundedSAM2(
        detector,
        image_size=image_size,
        prompt_decoder=Sam2PromptDecoder.from_sam2(sam2),
        refine_multimask_output=refine_multimask_output,
    )


def _register(name: str, summary: str, **defaults) -> None:
    factory = functools.partial(build_grounded_sam2, **defaults)
    factory.__doc__ = f"{summary}\n\nArguments: see ``build_grounded_sam2``."
    register_model(name)(factory)


_register(
    "grounded_sam2_tiny",
    "Real architecture at tiny width (~5M params, 3.2M of them the token table) for CPU tests and demos.",
    sam2_config="sam2.1_hiera_t",
    image_size=128,
    sam2_overrides=SAM2_TINY_OVERRIDES,
    head=TINY_HEAD,
    text_model="ViT-S-32",
    text_cfg={"width": 64, "heads": 2, "layers": 1},
    freeze_text=False,
)
for _size in ("t", "s", "b+", "l"):
    _register(
        f"grounded_sam2_hiera_{_size}",
        f"SAM2.1 Hiera-{_size.upper()} + SAM3's detector head (200 queries) + MobileCLIP-S1 text tower.",
        sam2_config=f"sam2.1_hiera_{_size}",
        text_model="MobileCLIP-S1",
    )
