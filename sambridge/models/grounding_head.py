"""SAM3's detector head (fusion encoder, DETR decoder with presence token, scoring, segmentation),
built from the sam3 package's own classes with parameterised widths.

``HeadConfig()`` reproduces ``sam3.model_builder``'s dims exactly (same classes, same wiring, same
parameter names), so a SAM3 checkpoint's head weights load into it; ``TINY_HEAD`` is for tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
from sam3.model.geometry_encoders import SequenceGeometryEncoder
from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
from sam3.model.model_misc import MLP, DotProductScoring, MultiheadAttentionWrapper, TransformerWrapper
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.sam3_image import Sam3Image
from torch import nn

from sambridge.compat import apply_sam3_compat
from sambridge.models.checkpoint_io import CheckpointError, load_state_dict_strict, read_weights

HEAD_MODULES = ("transformer", "dot_prod_scoring", "segmentation_head", "geometry_encoder")
"""Sub-modules of sam3's ``Sam3Image`` that make up the grounding head (everything but the backbone)."""

SAM3_DETECTOR_PREFIX = "detector."
"""Prefix of the image-detector entries in an official ``sam3.pt``."""


@dataclass(frozen=True)
class HeadConfig:
    """Widths and depths of the grounding head (defaults = SAM3's).

    Attributes:
        d_model: Token width; must equal the vision neck's and the text resizer's output width.
        num_heads: Attention heads in every attention layer.
        dim_feedforward: Hidden width of the feed-forward blocks and the scoring MLP.
        encoder_layers: Text-image fusion encoder layers.
        decoder_layers: DETR decoder layers (each gives an auxiliary output in training).
        num_queries: Object queries per (image, phrase); in training as many one-to-many queries again.
        geometry_layers: Layers of the geometric (box/point exemplar) prompt encoder.
        dropout: Dropout in attention and feed-forward blocks.
    """

    d_model: int = 256
    num_heads: int = 8
    dim_feedforward: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 200
    geometry_layers: int = 3
    dropout: float = 0.1


SAM3_HEAD = HeadConfig()
"""SAM3's head (``sam3.model_builder`` dims)."""

TINY_HEAD = HeadConfig(
    d_model=64,
    num_heads=2,
    dim_feedforward=128,
    encoder_layers=1,
    decoder_layers=2,
    num_queries=16,
    geometry_layers=1,
    dropout=0.0,
)
"""Tiny head for tests (~0.65M params)."""


def _attention(cfg: HeadConfig, batch_first: bool | None, dropout: float | None = None) -> nn.Module:
    kwargs = {} if batch_first is None else {"batch_first": batch_first}
    return MultiheadAttentionWrapper(
        num_heads=cfg.num_heads,
        embed_dim=cfg.d_model,
        dropout=cfg.dropout if dropout is None else dropout,
        **kwargs,
    )


def build_transformer(cfg: HeadConfig) -> nn.Module:
    """``TransformerWrapper(TransformerEncoderFusion, TransformerDecoder)`` as in ``sam3.model_builder``.

    A single feature level (the decoder's box-relative position bias is single-scale) and
    activation checkpointing on (sam3 asserts it in training mode).
    """
    encoder_layer = TransformerEncoderLayer(
        activation="relu",
        d_model=cfg.d_model,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
        pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False,
        pos_enc_at_cross_attn_queries=False,
        pre_norm=True,
        self_attention=_attention(cfg, batch_first=True),
        cross_attention=_attention(cfg, batch_first=True),
    )
    encoder = TransformerEncoderFusion(
        layer=encoder_layer,
        num_layers=cfg.encoder_layers,
        d_model=cfg.d_model,
        num_feature_levels=1,
        frozen=False,
        use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False,
        pool_text_with_mask=True,
    )
    decoder_layer = TransformerDecoderLayer(
        activation="relu",
        d_model=cfg.d_model,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
        cross_attention=_attention(cfg, batch_first=None),
        n_heads=cfg.num_heads,
        use_text_cross_attention=True,
    )
    decoder = TransformerDecoder(
        layer=decoder_layer,
        num_layers=cfg.decoder_layers,
        num_queries=cfg.num_queries,
        return_intermediate=True,
        box_refine=True,
        num_o2m_queries=0,
        dac=True,
        boxRPB="log",
        d_model=cfg.d_model,
        frozen=False,
        interaction_layer=None,
        dac_use_selfatt_ln=True,
        use_act_checkpoint=True,
        presence_token=True,
    )
    return TransformerWrapper(encoder=encoder, decoder=decoder, d_model=cfg.d_model)


def build_dot_product_scoring(cfg: HeadConfig) -> nn.Module:
    prompt_mlp = MLP(
        input_dim=cfg.d_model,
        hidden_dim=cfg.dim_feedforward,
        output_dim=cfg.d_model,
        num_layers=2,
        dropout=cfg.dropout,
        residual=True,
        out_norm=nn.LayerNorm(cfg.d_model),
    )
    return DotProductScoring(d_model=cfg.d_model, d_proj=cfg.d_model, prompt_mlp=prompt_mlp)


def build_segmentation_head(cfg: HeadConfig) -> nn.Module:
    pixel_decoder = PixelDecoder(
        num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=cfg.d_model
    )
    return UniversalSegmentationHead(
        hidden_dim=cfg.d_model,
        upsampling_stages=3,
        aux_masks=False,
        presence_head=False,
        dot_product_scorer=None,
        act_ckpt=True,
        cross_attend_prompt=_attention(cfg, None, dropout=0.0),
        pixel_decoder=pixel_decoder,
    )


def build_geometry_encoder(cfg: HeadConfig) -> nn.Module:
    layer = TransformerEncoderLayer(
        activation="relu",
        d_model=cfg.d_model,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
        pos_enc_at_attn=False,
        pre_norm=True,
        pos_enc_at_cross_attn_queries=False,
        pos_enc_at_cross_attn_keys=True,
        self_attention=_attention(cfg, batch_first=False),
        cross_attention=_attention(cfg, batch_first=False),
    )
    return SequenceGeometryEncoder(
        pos_enc=PositionEmbeddingSine(num_pos_feats=cfg.d_model, normalize=True, temperature=10000),
        encode_boxes_as_points=False,
        points_direct_project=True,
        points_pool=True,
        points_pos_enc=True,
        boxes_direct_project=True,
        boxes_pool=True,
        boxes_pos_enc=True,
        d_model=cfg.d_model,
        num_layers=cfg.geometry_layers,
        layer=layer,
        use_act_ckpt=True,
        add_cls=True,
        add_post_encode_proj=True,
    )


class GroundingDetector(Sam3Image):
    """sam3's ``Sam3Image`` with Hungarian matching taken out of ``forward_grounding``.

    sam3 matches inside the forward against its own target type; ``GroundedSAM2`` matches against
    a ``GroundingBatch`` after the forward (and only when targets are given), so one forward
    serves training, validation and inference.
    """

    def back_convert(self, targets):
        return targets

    def _apply(self, fn, recurse=True):
        self._device = None  # Sam3Image caches its device and only resets it in its own .to()
        return super()._apply(fn, recurse)

    def _compute_matching(self, out, targets):
        return None


def build_detector(backbone: nn.Module, cfg: HeadConfig) -> nn.Module:
    """sam3 ``Sam3Image`` (as ``GroundingDetector``) around ``backbone`` (a ``SAM3VLBackbone``)."""
    apply_sam3_compat()
    return GroundingDetector(
        backbone=backbone,
        transformer=build_transformer(cfg),
        input_geometry_encoder=build_geometry_encoder(cfg),
        segmentation_head=build_segmentation_head(cfg),
        num_feature_levels=1,
        o2m_mask_predict=True,
        dot_prod_scoring=build_dot_product_scoring(cfg),
        use_instance_query=False,
        multimask_output=True,
        inst_interactive_predictor=None,
        matcher=None,
        use_act_checkpoint_seg_head=True,
    )


def head_state_dict(detector: nn.Module) -> dict:
    """The grounding head's entries of ``detector.state_dict()`` (keys as in ``Sam3Image``)."""
    return {k: v for k, v in detector.state_dict().items() if k.split(".", 1)[0] in HEAD_MODULES}


def load_sam3_head(detector: nn.Module, path: str | os.PathLike) -> None:
    """Initialise the head from a SAM3 checkpoint (``sam3.pt``: ``detector.*`` keys, optionally under
    ``"model"``); strict on the head's keys, everything else in the file (backbone, tracker) is ignored.
    """
    blob = read_weights(path, "SAM3 checkpoint")
    if isinstance(blob.get("model"), dict):
        blob = blob["model"]
    head = {
        k[len(SAM3_DETECTOR_PREFIX) :]: v
        for k, v in blob.items()
        if k.startswith(SAM3_DETECTOR_PREFIX)
        and k[len(SAM3_DETECTOR_PREFIX) :].split(".", 1)[0] in HEAD_MODULES
    }
    if not head:
        raise CheckpointError(
            f"SAM3 checkpoint {path} has no '{SAM3_DETECTOR_PREFIX}{{{','.join(HEAD_MODULES)}}}.*' "
            f"entries (first keys: {sorted(blob)[:5]})"
        )
    load_state_dict_strict(_HeadView(detector), head, f"SAM3 checkpoint {path} (head keys)")


class _HeadView(nn.Module):
    """The head modules of a ``Sam3Image`` under their own names, for a strict head-only load."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        for name in HEAD_MODULES:
            self.add_module(name, getattr(detector, name))
