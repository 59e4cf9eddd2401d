"""SAM3 as a distillation teacher, behind the same call interface as ``GroundedSAM2``.

::

    images [0,1] --resize to image_size, normalise mean=std=0.5--> sam3 ViT + SimpleFPN neck
    phrases --> sam3 VETextEncoder (once per unique phrase)           |
                        \\--> sam3 Sam3Image head (fusion encoder, DETR decoder + presence token,
                            dot-product scoring, segmentation head), once per (image, phrase) query

``teacher(images, phrases, query_image)`` and ``teacher.postprocess(...)`` take and return what
``GroundedSAM2`` does (the teacher has no SAM2 refinement decoder: masks are the head's own), so
a teacher and a student can share one batch and one evaluation path. Two models:

===============  ===========================================================  ======  =====
name             architecture                                                 params  input
===============  ===========================================================  ======  =====
sam3_image       sam3's own ``build_sam3_image_model`` (ViT-L/14, 6+6 head)   840M    1008
sam3_image_tiny  the same classes, tiny widths (ViT 128-d x6 /16, 64-d head)  5.5M    128
===============  ===========================================================  ======  =====

Both are frozen (eval mode, no gradients) when built; ``apply_finetune_mode(teacher, "full")``
unfreezes one, which is how the tiny teacher is trained with ``GroundingModule``
(``configs/demo/teacher_tiny.yaml``). A frozen teacher on CUDA runs under bf16 autocast.

Features for feature-level distillation (``teacher(..., return_features=True)`` or
:meth:`SAM3Teacher.encode_text`), with S = image_size, p = ViT patch size (14: 72 x 72 at 1008),
d = d_model (256 for SAM3), U unique phrases, L = 32 tokens::

    vision_features    (B, d, S/p, S/p)  the neck's stride-p map the head attends to
    language_features  (L, U, d)         text tokens after the resizer, sequence-first
    language_mask      (U, L) bool       True = padding
    text_ids           (Q,) long         row of each query's phrase among the U unique phrases
    unique_phrases     list of U str

Official ``sam3.pt`` (``{"model": {...}}`` or the bare dict; sam3's loader accepts both) holds
``detector.*`` (the image detector: exactly this teacher's state-dict keys, loaded strictly) and
``tracker.*`` (the video tracker: memory encoder/attention and a SAM2-style mask decoder) plus
``detector.backbone.vision_backbone.sam2_convs.*`` (the tracker's copy of the FPN neck). The image
teacher uses neither of the last two; they are set aside, everything else must match.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import open_clip
import torch
from sam3.model.decoder import TransformerDecoder
from sam3.model.necks import Sam3DualViTDetNeck
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.text_encoder_ve import VETextEncoder
from sam3.model.tokenizer_ve import SimpleTokenizer
from sam3.model.vitdet import ViT
from sam3.model.vl_combiner import SAM3VLBackbone
from torch import Tensor, nn

from data_pipelines.batch import GroundingBatch
from sambridge.compat import apply_sam3_compat
from sambridge.models.checkpoint_io import CheckpointError, load_state_dict_strict, read_weights
from sambridge.models.grounded_sam2 import GroundedSAM2, _unique
from sambridge.models.grounding_head import TINY_HEAD, GroundingDetector, HeadConfig, build_detector
from sambridge.models.matching import FiniteCostMatcher
from sambridge.models.registry import create_model, list_models, register_model

SAM3_IMAGE_SIZE = 1008
"""Input size of the official SAM3 image model (its ViT's RoPE tables are built for 72 x 72 patches)."""

SAM3_PIXEL_MEAN = (0.5, 0.5, 0.5)
SAM3_PIXEL_STD = (0.5, 0.5, 0.5)

DETECTOR_PREFIX = "detector."
UNUSED_CHECKPOINT_PREFIXES = ("tracker.", "detector.backbone.vision_backbone.sam2_convs.")
"""Entries of an official ``sam3.pt`` that belong to the video tracker, not to the image teacher."""

SAM3_IMAGE = "sam3_image"
SAM3_IMAGE_TINY = "sam3_image_tiny"
TEACHER_MODELS = (SAM3_IMAGE, SAM3_IMAGE_TINY)
"""Registered names whose models are ``SAM3Teacher`` instances."""


def sam3_bpe_path() -> Path:
    """The BPE vocabulary SAM3's tokenizer needs; the sam3 wheel lacks it, open_clip ships the same file."""
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"SAM3's BPE vocabulary not found at {path} (it ships with open_clip)")
    return path


def reset_device_caches(module: nn.Module) -> None:
    """Drop what sam3 modules cache on the device of their first use (or on ``cuda:0`` at build time).

    ``PositionEmbeddingSine.cache``, the decoder's box-RPB coordinates and the ``_device`` attribute
    of ``Sam3Image``/``UniversalSegmentationHead`` survive ``module.to(...)``; after a move they would
    point at the old device (a DDP rank on ``cuda:1`` would get ``cuda:0`` tensors). They refill lazily.
    """
    for m in module.modules():
        if isinstance(m, PositionEmbeddingSine):
            m.cache = {}
        if isinstance(m, TransformerDecoder) and hasattr(m, "coord_cache"):
            m.compilable_cord_cache, m.compilable_stored_size, m.coord_cache = None, None, {}
        if "_device" in vars(m):
            m._device = None


def init_text_embeddings(text: VETextEncoder) -> None:
    """Initialise what sam3 leaves as ``torch.empty`` (its weights always come from a checkpoint).

    ``VETextEncoder``'s positional embedding and text projection are allocated uninitialised, so a
    randomly initialised model can hold NaN there. They are drawn as open_clip's ``TextTransformer``
    draws them (the token embedding too, for the same scale).
    """
    encoder = text.encoder
    nn.init.normal_(encoder.token_embedding.weight, std=0.02)
    nn.init.normal_(encoder.positional_embedding, std=0.01)
    if isinstance(encoder.text_projection, nn.Parameter):
        nn.init.normal_(encoder.text_projection, std=encoder.width**-0.5)


class SAM3Teacher(GroundedSAM2):
    """SAM3's image detector with ``GroundedSAM2``'s interface (forward, postprocess, matching, groups).

    Build it with ``create_model("sam3_image" | "sam3_image_tiny")``, or load it with
    ``sambridge.modules.checkpoint.load_teacher``.
    Differences from ``GroundedSAM2``: inputs are resized to ``image_size`` (a multiple of the ViT
    patch size, 1008 for SAM3) and normalised with mean = std = 0.5; there is no SAM2 prompt
    decoder (``refine`` is ignored, masks come from the head at stride p/4); it starts frozen.

    Args:
        detector: sam3 ``GroundingDetector`` (``Sam3Image``) around a ``SAM3VLBackbone`` of a
            ``Sam3DualViTDetNeck`` and a ``VETextEncoder``.
        image_size: Square model input size, a multiple of the ViT patch size.
        frozen: Start frozen (no gradients, eval mode whatever ``train()`` asks).
        bf16: Run a frozen teacher under bf16 autocast on CUDA devices that support it.
        matcher: One-to-one matcher used when targets are given (default: SAM3's, NaN-guarded).
        model_name: The registered name it was built under (recorded by pseudo-labelling).
    """

    def __init__(
        self,
        detector: GroundingDetector,
        image_size: int,
        frozen: bool = True,
        bf16: bool = True,
        matcher: FiniteCostMatcher | None = None,
        model_name: str | None = None,
    ) -> None:
        patch = detector.backbone.vision_backbone.trunk.patch_embed.proj.kernel_size[0]

        def check_size(size: int) -> None:
            if size <= 0 or size % patch:
                raise ValueError(f"image_size must be a positive multiple of the ViT patch size {patch}, got {size}")

        super().__init__(detector, image_size, prompt_decoder=None, matcher=matcher, refine_masks=False,
                         check_size=check_size, pixel_mean=SAM3_PIXEL_MEAN, pixel_std=SAM3_PIXEL_STD)
        self.patch_size = patch
        self.bf16 = bf16
        self.model_name = model_name
        reset_device_caches(self)
        if frozen:
            self.freeze()

    # ------------------------------------------------------------------ frozen state
    @property
    def frozen(self) -> bool:
        """No parameter requires a gradient (``apply_finetune_mode`` unfreezes)."""
        return not any(p.requires_grad for p in self.parameters())

    def freeze(self) -> SAM3Teacher:
        """No gradients, eval mode (kept through later ``train()`` calls)."""
        return self.requires_grad_(False)

    def requires_grad_(self, requires_grad: bool = True) -> SAM3Teacher:
        """As ``nn.Module.requires_grad_``, and the mode follows: frozen in eval mode, unfrozen in
        training mode (as a freshly built model), so ``apply_finetune_mode(teacher, "full")`` trains it."""
        super().requires_grad_(requires_grad)
        return self.train(requires_grad)

    def train(self, mode: bool = True) -> SAM3Teacher:
        return super().train(mode and not self.frozen)

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        reset_device_caches(self)
        return result

    @contextlib.contextmanager
    def _frozen_context(self, device: torch.device) -> Iterator[None]:
        """No autograd graph for a frozen teacher, and bf16 autocast for it on capable CUDA devices."""
        with contextlib.ExitStack() as stack:
            if self.frozen:
                stack.enter_context(torch.no_grad())
                if self.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
                    stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
            yield

    # ------------------------------------------------------------------ forward
    def encode_images(self, images: Tensor) -> dict:
        """Backbone features of (B, 3, H, W) images in [0, 1] (sam3 ``forward_image`` dict)."""
        with self._frozen_context(images.device):
            return super().encode_images(images)

    def ground(self, features: dict, phrases: list[str], query_image: Tensor) -> dict:
        """Text encoder (once per unique phrase) and head (once per query) on ``encode_images`` features."""
        with self._frozen_context(features["vision_features"].device):
            return super().ground(features, phrases, query_image)

    def encode_text(self, phrases: Sequence[str]) -> dict:
        """Text-token features of the unique phrases (shapes in the module docstring)."""
        device = self.pixel_mean.device
        unique, text_ids = _unique(list(phrases), device)
        with self._frozen_context(device):
            text = self.detector.backbone.forward_text(unique, device=device)
        return {
            "language_features": text["language_features"],
            "language_mask": text["language_mask"],
            "text_ids": text_ids,
            "unique_phrases": unique,
        }

    def forward(
        self,
        images: Tensor,
        phrases: list[str],
        query_image: Tensor,
        targets: GroundingBatch | None = None,
        return_features: bool = False,
    ) -> dict:
        """Ground every (image, phrase) query, as ``GroundedSAM2.forward`` (no ``refine`` output).

        Args:
            images: (B, 3, H, W) float RGB in [0, 1] on any square canvas (resized to ``image_size``).
            phrases: Q noun phrases.
            query_image: (Q,) long, the image of each phrase.
            targets: The batch's ground truth; when given the outputs carry the matching (``indices``).
            return_features: Also return ``vision_features``, ``language_features``,
                ``language_mask``, ``text_ids`` and ``unique_phrases`` (the text encoder runs a
                second time for these).

        Returns:
            sam3's output dict: ``pred_logits`` (Q, K, 1), ``pred_boxes``/``pred_boxes_xyxy`` (Q, K, 4)
            normalised, ``pred_masks`` (Q, K, 4S/p, 4S/p) logits, ``presence_logit_dec`` (Q, 1),
            ``semantic_seg``, ``queries``; in training ``aux_outputs`` and ``*_o2m``; plus
            ``backbone_fpn``, ``query_image`` and ``input_hw``. bf16 where the frozen teacher ran
            under autocast.
        """
        out = super().forward(images, phrases, query_image, targets=targets)
        if return_features:
            out["vision_features"] = out["backbone_fpn"][-1]
            out.update(self.encode_text(phrases))
        return out


# ---------------------------------------------------------------------- checkpoints
def _official_state(blob: dict, source: str) -> dict[str, Tensor]:
    """The image-detector entries of an official SAM3 checkpoint dict (tracker entries set aside)."""
    if isinstance(blob.get("model"), dict):
        blob = blob["model"]
    if not any(k.startswith(DETECTOR_PREFIX) for k in blob):
        raise CheckpointError(
            f"{source} has no '{DETECTOR_PREFIX}*' entries (first keys: {sorted(blob)[:5]}): not an official "
            "SAM3 checkpoint; a sambridge training checkpoint of a teacher loads with "
            "sambridge.modules.checkpoint.load_teacher()"
        )
    return {k: v for k, v in blob.items() if not k.startswith(UNUSED_CHECKPOINT_PREFIXES)}


def load_sam3_checkpoint(teacher: SAM3Teacher, path: str | os.PathLike) -> SAM3Teacher:
    """Load an official ``sam3.pt`` into ``teacher`` (strict: names every missing/unexpected key).

    ``tracker.*`` and ``detector.backbone.vision_backbone.sam2_convs.*`` (SAM3's video tracker
    and its neck) are not part of the image teacher and are set aside.
    """
    source = f"SAM3 checkpoint {path}"
    load_state_dict_strict(teacher, _official_state(read_weights(path, "SAM3 checkpoint"), source), source)
    return teacher


def official_teacher(blob: dict, path: str | os.PathLike, model: str | None = None, **overrides) -> SAM3Teacher:
    """The teacher ``model`` (default ``sam3_image``) built and loaded from an official SAM3 checkpoint's
    contents ``blob`` (read from ``path``), strictly, tracker entries set aside; not yet frozen.

    A sambridge training checkpoint of a teacher loads with ``sambridge.modules.checkpoint.load_teacher``
    (which takes either kind).

    Args:
        blob: What ``read_weights`` read from ``path``.
        path: Where it came from (error messages).
        model: Registered teacher to build (default ``sam3_image``).
        overrides: Further ``create_model`` overrides (e.g. ``bf16=False``).
    """
    name = model or SAM3_IMAGE
    check_teacher_name(name, path)
    teacher = create_model(name, **overrides)
    source = f"SAM3 checkpoint {path}"
    load_state_dict_strict(teacher, _official_state(blob, source), source)
    return teacher


def check_teacher_name(name: object, path: str | os.PathLike) -> None:
    """Refuse a registered name that is not a SAM3 teacher (``path``: the checkpoint, for the message)."""
    if name not in TEACHER_MODELS:
        raise ValueError(f"{path}: model {name!r} is not a SAM3 teacher; teachers: {list(TEACHER_MODELS)} "
                         f"(registered models: {list_models()})")


# ---------------------------------------------------------------------- builders
def build_sam3_detector() -> GroundingDetector:
    """sam3's image model at full size (``build_sam3_image_model`` with segmentation, without the
    interactive tracker), assembled from the same sam3 builder parts but as a ``GroundingDetector``
    (``Sam3Image`` with matching moved out of the forward), so no instance changes class afterwards."""
    from sam3 import model_builder as sam3_builder  # imports sam3's video/tracker modules

    apply_sam3_compat()
    backbone = sam3_builder._create_vl_backbone(
        sam3_builder._create_vision_backbone(enable_inst_interactivity=False),
        sam3_builder._create_text_encoder(str(sam3_bpe_path())),
    )
    detector = GroundingDetector(
        backbone=backbone,
        transformer=sam3_builder._create_sam3_transformer(),
        input_geometry_encoder=sam3_builder._create_geometry_encoder(),
        segmentation_head=sam3_builder._create_segmentation_head(),
        num_feature_levels=1,
        o2m_mask_predict=True,
        dot_prod_scoring=sam3_builder._create_dot_product_scoring(),
        use_instance_query=False,
        multimask_output=True,
        inst_interactive_predictor=None,
        matcher=None,
    )
    init_text_embeddings(detector.backbone.language_backbone)
    return detector


def build_sam3_teacher(
    sam3_checkpoint: str | os.PathLike | None = None,
    image_size: int = SAM3_IMAGE_SIZE,
    frozen: bool = True,
    bf16: bool = True,
) -> SAM3Teacher:
    """The official SAM3 image model (sam3's ``build_sam3_image_model`` architecture) as a teacher, on the CPU.

    Without ``sam3_checkpoint`` the weights are random (~40 s and 3.4 GB to build on a CPU).

    Args:
        sam3_checkpoint: Official ``sam3.pt``, loaded strictly (tracker entries set aside).
        image_size: Must be 1008: the ViT's RoPE tables are built for 72 x 72 patches (any canvas
            is resized to it).
        frozen: Start frozen.
        bf16: bf16 autocast for the frozen teacher on CUDA.
    """
    if image_size != SAM3_IMAGE_SIZE:
        raise ValueError(f"the SAM3 image model runs at {SAM3_IMAGE_SIZE} px (got image_size={image_size}); "
                         "the teacher resizes any canvas to it")
    teacher = SAM3Teacher(build_sam3_detector(), image_size=image_size, frozen=frozen, bf16=bf16,
                          model_name=SAM3_IMAGE)
    if sam3_checkpoint is not None:
        load_sam3_checkpoint(teacher, sam3_checkpoint)
    return teacher


def build_sam3_teacher_tiny(
    image_size: int = 128,
    patch_size: int = 16,
    vit_dim: int = 128,
    vit_depth: int = 6,
    vit_heads: int = 4,
    window_size: int = 4,
    global_blocks: Sequence[int] = (2, 5),
    text_width: int = 64,
    text_heads: int = 2,
    text_layers: int = 2,
    head: HeadConfig = TINY_HEAD,
    sam3_checkpoint: str | os.PathLike | None = None,
    frozen: bool = True,
    bf16: bool = True,
) -> SAM3Teacher:
    """SAM3's architecture (same classes and wiring as ``build_sam3_image_model``) at tiny width.

    The ViT's absolute position table covers ``window_size`` patches and is tiled, as SAM3's
    (24 patches of 14 px, tiled to 72); its global blocks' RoPE tables follow ``image_size``.

    Args:
        image_size: Square model input size, a multiple of ``patch_size``.
        patch_size: ViT patch size (SAM3: 14).
        vit_dim: ViT width (SAM3: 1024).
        vit_depth: ViT blocks (SAM3: 32).
        vit_heads: ViT attention heads (SAM3: 16).
        window_size: Window of the windowed-attention blocks, in patches (SAM3: 24).
        global_blocks: Blocks with global attention (SAM3: 7, 15, 23, 31).
        text_width: Text transformer width (SAM3: 1024).
        text_heads: Text transformer heads (SAM3: 16).
        text_layers: Text transformer layers (SAM3: 24).
        head: Grounding-head dims; its ``d_model`` is also the neck and text output width.
        sam3_checkpoint: A checkpoint in the official SAM3 layout for this architecture.
        frozen: Start frozen.
        bf16: bf16 autocast for the frozen teacher on CUDA.
    """
    if not global_blocks or max(global_blocks) != vit_depth - 1 or min(global_blocks) < 0:
        raise ValueError(f"global_blocks {tuple(global_blocks)} must index the {vit_depth} ViT blocks and "
                         "include the last one (the neck reads its output)")
    apply_sam3_compat()
    vit = ViT(
        img_size=image_size,
        pretrain_img_size=window_size * patch_size,
        patch_size=patch_size,
        embed_dim=vit_dim,
        depth=vit_depth,
        num_heads=vit_heads,
        mlp_ratio=4.0,
        norm_layer="LayerNorm",
        drop_path_rate=0.0,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=tuple(global_blocks),
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=window_size,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
    )
    position = PositionEmbeddingSine(num_pos_feats=head.d_model, normalize=True, temperature=10000)
    neck = Sam3DualViTDetNeck(
        trunk=vit, position_encoding=position, d_model=head.d_model, scale_factors=[4.0, 2.0, 1.0, 0.5]
    )
    text = VETextEncoder(
        d_model=head.d_model,
        tokenizer=SimpleTokenizer(bpe_path=str(sam3_bpe_path())),
        width=text_width,
        heads=text_heads,
        layers=text_layers,
        use_act_checkpoint=False,
    )
    init_text_embeddings(text)
    detector = build_detector(SAM3VLBackbone(visual=neck, text=text, scalp=1), head)
    teacher = SAM3Teacher(detector, image_size=image_size, frozen=frozen, bf16=bf16,
                          model_name=SAM3_IMAGE_TINY)
    if sam3_checkpoint is not None:
        load_sam3_checkpoint(teacher, sam3_checkpoint)
    return teacher


register_model(SAM3_IMAGE)(build_sam3_teacher)
register_model(SAM3_IMAGE_TINY)(build_sam3_teacher_tiny)
