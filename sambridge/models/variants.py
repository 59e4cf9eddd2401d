"""The Grounded SAM2 builder and its registered variants.

===========================  ===================  ================  =============  ==================
name                         image backbone       head              text tower     default image size
===========================  ===================  ================  =============  ==================
grounded_sam2_tiny           sam2.1_hiera_t tiny  ``TINY``          ViT-S-32 64-d  128 (tests)
grounded_sam2_demo           hiera_t tiny, 2x     ``TINY``          ViT-S-32 64-d  128 (CPU demo)
grounded_sam2_hiera_t        sam2.1_hiera_t       SAM3              MobileCLIP-S1  1024
grounded_sam2_hiera_s        sam2.1_hiera_s       SAM3              MobileCLIP-S1  1024
grounded_sam2_hiera_b+       sam2.1_hiera_b+      SAM3              MobileCLIP-S1  1024
grounded_sam2_hiera_l        sam2.1_hiera_l       SAM3              MobileCLIP-S1  1024
grounded_sam2_student_tiny   sam2.1_hiera_t tiny  ``STUDENT_TINY``  ViT-S-32 32-d  128 (tests, demo)
grounded_sam2_student        sam2.1_hiera_t       ``STUDENT`` /8    ViTamin-S 16t  384
grounded_timm_convnext_atto  timm convnext_atto   ``STUDENT`` /8    ViTamin-S 16t  384
===========================  ===================  ================  =============  ==================

The ``student`` variants are distillation students of SAM3 (``sambridge.modules.DistillModule``).
The head's per-phrase cost dominates with many phrases, so the real-size students lighten it:
``STUDENT_HEAD`` (half the fusion-encoder and decoder layers, queries and feed-forward width), a
head on strides 8 and 16 (``head_min_stride=8``: its per-phrase pixel decoder skips the stride-4
stage; SAM2's decoder still refines boxes into stride-4 masks), 16 text tokens and 384 px input
(>= 15x faster than SAM3 at 1008 px with ten phrases on a CPU; ``image_size=512`` sees small
objects better at about 12x).
``build_grounded_sam2(timm_model=...)`` puts any timm ``features_only`` trunk in place of Hiera
(``sambridge.models.timm_vision``).

Every argument of the builder can be overridden through ``create_model`` (``head`` also as a dict
of ``HeadConfig`` fields; fields it leaves out take SAM3's values). Real variants start from random
weights unless given ``sam2_checkpoint`` (official ``sam2.1_hiera_*.pt``), ``text_pretrained`` (an
open_clip tag already cached locally, e.g. ``"datacompdr"``, or a local weight file), optionally
``sam3_checkpoint`` (``sam3.pt``, whose head dims must match) and, for timm trunks,
``timm_pretrained`` (a local timm weight file).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Sequence

from sam3.model.vl_combiner import SAM3VLBackbone
from torch import nn

from sambridge.models.grounded_sam2 import GroundedSAM2
from sambridge.models.grounding_head import SAM3_HEAD, TINY_HEAD, HeadConfig, build_detector, load_sam3_head
from sambridge.models.registry import register_model
from sambridge.models.sam2_builder import SAM2_DEMO_OVERRIDES, SAM2_TINY_OVERRIDES, build_sam2
from sambridge.models.sam2_decoder import Sam2PromptDecoder
from sambridge.models.text_encoder import OpenClipTextEncoder
from sambridge.models.timm_vision import HeadLevelsAdapter, TimmVisionAdapter
from sambridge.models.vision import VisionAdapter

STUDENT_HEAD = HeadConfig(encoder_layers=3, decoder_layers=3, num_queries=100, dim_feedforward=1024,
                          geometry_layers=1)
"""Head of the real-size distillation students (SAM3's widths, half its depth, queries and FFN)."""

STUDENT_TINY_HEAD = dataclasses.replace(TINY_HEAD, decoder_layers=1)
"""Head of the tiny test/demo student (``TINY_HEAD`` with one decoder layer)."""

TINY_GROUNDING_HEAD = dataclasses.replace(TINY_HEAD, query_selection=True)
"""Head of the tiny Grounded SAM2 variants: ``TINY_HEAD`` with two-stage query selection."""


def build_grounded_sam2(
    sam2_config: str = "sam2.1_hiera_t",
    image_size: int = 1024,
    sam2_checkpoint: str | os.PathLike | None = None,
    sam2_overrides: Sequence[str] = (),
    head: HeadConfig | dict = SAM3_HEAD,
    sam3_checkpoint: str | os.PathLike | None = None,
    text_model: str = "MobileCLIP-S1",
    text_pretrained: str | os.PathLike | None = None,
    text_cfg: dict | None = None,
    text_context_length: int = 32,
    freeze_text: bool = True,
    text_vocabulary: Sequence[str] | None = None,
    dual_neck: bool = True,
    head_min_stride: int = 4,
    head_token_stride: int = 16,
    refine_multimask_output: bool = False,
    timm_model: str | None = None,
    timm_pretrained: str | os.PathLike | None = None,
) -> GroundedSAM2:
    """Assemble a ``GroundedSAM2`` from the sam2, sam3, open_clip (and timm) packages (on the CPU).

    Args:
        sam2_config: SAM2.1 config name (``sam2.1_hiera_t|s|b+|l``): the image trunk and neck, and the
            prompt encoder + mask decoder that refine boxes into masks.
        image_size: Square model input size, a multiple of 32.
        sam2_checkpoint: Official SAM2 checkpoint for the trunk, neck(s), prompt encoder and mask
            decoder (with ``timm_model``: only its prompt encoder and mask decoder are kept).
        sam2_overrides: Extra hydra overrides for SAM2 (e.g. the tiny test architecture).
        head: Grounding head dims (a dict given to ``create_model`` changes only the fields it names
            of the variant's head); ``d_model`` must equal SAM2's neck width (256 for SAM2.1).
        sam3_checkpoint: A ``sam3.pt`` whose detector head initialises the grounding head.
        text_model: open_clip model whose text tower encodes the phrases.
        text_pretrained: open_clip tag (locally cached) or local weight file for the text tower.
        text_cfg: Overrides of the open_clip text config (tests use a tiny tower).
        text_context_length: Tokens per phrase.
        freeze_text: Keep the text tower fixed (its output projection still trains).
        text_vocabulary: Fixed phrase list whose frozen text features are computed once.
        dual_neck: Give the head its own FPN neck so SAM2's neck stays as trained for its decoder.
        head_min_stride: Finest feature level of the grounding head: 4, or 8 for a head about half
            as costly per phrase at 512 px whose own masks come at stride 8 (SAM2's decoder still
            refines boxes into masks from stride-4 features).
        head_token_stride: Feature level the head's fusion encoder and decoder attend to: 16 (SAM3's
            recipe at 1,024 px), or 8 for small inputs (16 x 16 tokens at 128 px instead of 8 x 8);
            Hiera trunks only.
        refine_multimask_output: Three SAM2 masks per matched box in training (best one supervised).
        timm_model: A timm model with ``features_only`` strides 4, 8, 16 and 32 (e.g.
            ``convnext_atto``) as the image trunk, with its own FPN neck, in place of SAM2's Hiera.
        timm_pretrained: Local timm weight file for that trunk (random init otherwise).
    """
    sam2 = build_sam2(
        sam2_config, image_size=image_size, checkpoint=sam2_checkpoint, overrides=sam2_overrides
    )
    head = _head_config(head)
    if timm_model is None:
        vision = HeadLevelsAdapter(sam2.image_encoder.trunk, sam2.image_encoder.neck, dual_neck, head_min_stride,
                                   head_token_stride)
    elif head_token_stride != 16:
        raise ValueError(f"head_token_stride={head_token_stride}: a timm trunk's head attends to stride 16 only")
    else:
        vision = TimmVisionAdapter(timm_model, d_model=head.d_model, pretrained_file=timm_pretrained,
                                   dual_neck=dual_neck, head_min_stride=head_min_stride)
    text = OpenClipTextEncoder(head.d_model, model_name=text_model, pretrained=text_pretrained,
                               context_length=text_context_length, text_cfg=text_cfg, frozen=freeze_text,
                               vocabulary=text_vocabulary)
    return _assemble(vision, text, sam2, head, image_size, sam3_checkpoint, refine_multimask_output)


def _head_config(head: HeadConfig | dict) -> HeadConfig:
    return HeadConfig(**head) if isinstance(head, dict) else head


def _assemble(
    vision: VisionAdapter,
    text: OpenClipTextEncoder,
    sam2: nn.Module,
    head: HeadConfig,
    image_size: int,
    sam3_checkpoint: str | os.PathLike | None,
    refine_multimask_output: bool,
) -> GroundedSAM2:
    """sam3's detector around ``vision`` and ``text``, plus the prompt decoder of ``sam2`` (``SAM2Base``)."""
    decoder_width = sam2.image_encoder.neck.d_model
    if decoder_width != head.d_model or vision.d_model != head.d_model:
        raise ValueError(
            f"head.d_model ({head.d_model}) must equal the vision neck width ({vision.d_model}) and the "
            f"SAM2 decoder width ({decoder_width})"
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
    partial = functools.partial(build_grounded_sam2, **defaults)
    default_head = inspect.signature(partial).parameters["head"].default

    def factory(**overrides):
        head = overrides.get("head")
        if isinstance(head, dict):  # a dict changes only the fields it names of the variant's head
            overrides["head"] = dataclasses.replace(_head_config(default_head), **head)
        return partial(**overrides)

    factory.__signature__ = inspect.signature(partial)
    factory.__doc__ = f"{summary}\n\nArguments: see ``build_grounded_sam2``."
    register_model(name)(factory)


for _name, _summary, _overrides, _head, _text_width in (
    ("grounded_sam2_tiny",
     "Real architecture at tiny width (~5M params, 3.2M of them the token table) for CPU tests.",
     SAM2_TINY_OVERRIDES, TINY_GROUNDING_HEAD, 64),
    ("grounded_sam2_demo",
     "``grounded_sam2_tiny`` with a twice wider, deeper Hiera trunk (32-d, 8 blocks; 6.3M params): the CPU "
     "demo's model, which learns the demo's concepts faster than the test-sized trunk.",
     SAM2_DEMO_OVERRIDES, TINY_GROUNDING_HEAD, 64),
    ("grounded_sam2_student_tiny",
     "Tiny distillation student (tiny Hiera, one-layer decoder, 32-d text tower) for CPU tests and demos.",
     SAM2_TINY_OVERRIDES, STUDENT_TINY_HEAD, 32),
):
    _register(
        _name,
        _summary,
        sam2_config="sam2.1_hiera_t",
        image_size=128,
        sam2_overrides=_overrides,
        head=_head,
        text_model="ViT-S-32",
        text_cfg={"width": _text_width, "heads": 2, "layers": 1},
        freeze_text=False,
    )
for _size in ("t", "s", "b+", "l"):
    _register(
        f"grounded_sam2_hiera_{_size}",
        f"SAM2.1 Hiera-{_size.upper()} + SAM3's detector head (200 queries) + MobileCLIP-S1 text tower.",
        sam2_config=f"sam2.1_hiera_{_size}",
        text_model="MobileCLIP-S1",
    )
_register(
    "grounded_sam2_student",
    "SAM3 distillation student: SAM2.1 Hiera-T at 384 px, a lighter SAM3 head (100 queries, stride 8-16), "
    "ViTamin-S text (16 tokens).",
    sam2_config="sam2.1_hiera_t",
    image_size=384,
    head=STUDENT_HEAD,
    head_min_stride=8,
    text_model="ViTamin-S",
    text_context_length=16,
)
_register(
    "grounded_timm_convnext_atto",
    "SAM3 distillation student on timm's ConvNeXt-Atto (random init) at 384 px + the student head.",
    timm_model="convnext_atto",
    image_size=384,
    head=STUDENT_HEAD,
    head_min_stride=8,
    text_model="ViTamin-S",
    text_context_length=16,
)
