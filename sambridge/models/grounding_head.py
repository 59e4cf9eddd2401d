"""SAM3's detector head (fusion encoder, DETR decoder with presence token, scoring, segmentation),
built from the sam3 package's own classes with parameterised widths.

``HeadConfig()`` reproduces ``sam3.model_builder``'s dims exactly (same classes, same wiring, same
parameter names), so a SAM3 checkpoint's head weights load into it; ``TINY_HEAD`` is for tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from sam3.model.box_ops import box_cxcywh_to_xyxy, box_iou
from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
from sam3.model.geometry_encoders import SequenceGeometryEncoder
from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
from sam3.model.model_misc import MLP, DotProductScoring, MultiheadAttentionWrapper, TransformerWrapper, inverse_sigmoid
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.sam3_image import Sam3Image
from torch import Tensor, nn

from sambridge.compat import apply_sam3_compat
from sambridge.models.checkpoint_io import CheckpointError, load_state_dict_strict, read_weights
from sambridge.models.region_alignment import RegionPhraseAlignment

HEAD_MODULES = ("transformer", "dot_prod_scoring", "segmentation_head", "geometry_encoder")
"""Sub-modules of sam3's ``Sam3Image`` that make up the grounding head (everything but the backbone)."""

SAM3_DETECTOR_PREFIX = "detector."
"""Prefix of the image-detector entries in an official ``sam3.pt``."""

QUERY_SELECTION_PREFIX = "transformer.query_selection."
"""Head entries SAM3 does not have (``HeadConfig.query_selection``): a SAM3 head leaves them initialised."""

OWN_HEAD_PREFIXES = (QUERY_SELECTION_PREFIX, "transformer.region_alignment.")
"""Every head entry SAM3 does not have (``query_selection``, ``region_alignment``)."""


PROPOSAL_ASSIGNMENTS = ("hungarian", "mask")


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
        query_selection: Two-stage query selection (Deformable DETR / DINO): every fusion-encoder
            token proposes a box and a phrase score, trained like a decoder layer; the top
            ``num_queries`` proposals become the decoder's reference boxes instead of SAM3's
            learned ones. Off in SAM3's recipe; a head trained from scratch converges much faster.
        proposal_assignment: How the query-selection proposals are trained: ``hungarian`` (one
            token per instance) or ``mask`` (every token whose centre lies inside the instance).
        proposal_nms: With ``query_selection``: box IoU above which a proposal is a duplicate of a
            higher-scoring one and is selected only after every other (Fast NMS over the top
            ``4 × num_queries`` proposals; ``None``: plain top-k). Neighbouring tokens of one object
            propose near-identical boxes, so plain top-k spends several queries on each salient
            object, which then split its score between them.
        region_alignment: Score each annotated instance's image feature against the phrases of its
            image in training (``models.region_alignment``; its loss is ``loss.region_phrase``).
        activation_checkpointing: Recompute the segmentation head and geometry encoder in the
            backward pass (SAM3's setting: less memory, more compute); the fusion encoder and DETR
            decoder always checkpoint in training (sam3 asserts it).
    """

    d_model: int = 256
    num_heads: int = 8
    dim_feedforward: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 200
    geometry_layers: int = 3
    dropout: float = 0.1
    query_selection: bool = False
    proposal_assignment: str = "hungarian"
    proposal_nms: float | None = None
    region_alignment: bool = False
    activation_checkpointing: bool = True

    def __post_init__(self) -> None:
        if self.proposal_assignment not in PROPOSAL_ASSIGNMENTS:
            raise ValueError(f"proposal_assignment must be one of {PROPOSAL_ASSIGNMENTS}, "
                             f"got {self.proposal_assignment!r}")
        if self.proposal_nms is not None and not 0 < self.proposal_nms < 1:
            raise ValueError(f"proposal_nms must be a box IoU in (0, 1) or None, got {self.proposal_nms}")


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
    activation_checkpointing=False,
)
"""Tiny head for tests and the CPU demo (~0.65M params; no recompute: memory is no concern there)."""


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
    decoder = HostSizeDecoder(
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
    transformer = TransformerWrapper(encoder=encoder, decoder=decoder, d_model=cfg.d_model)
    if cfg.query_selection:
        transformer.query_selection = QuerySelection(cfg)
    if cfg.region_alignment:
        transformer.region_alignment = RegionPhraseAlignment(cfg.d_model)
    return transformer


class HostSizeDecoder(TransformerDecoder):
    """sam3's ``TransformerDecoder``, told its feature size as Python ints.

    sam3 hands the box-relative position bias of every layer the feature size as two 0-d device
    tensors (``spatial_shapes[0, 0]``, ``spatial_shapes[0, 1]``) and compares and asserts on them:
    seven device reads per layer and step. ``GroundingDetector`` sets ``feat_size`` from the
    backbone's feature shape before every call, so the same code reads nothing.
    """

    feat_size: tuple[int, int] | None = None

    def _get_rpb_matrix(self, reference_boxes: Tensor, feat_size) -> Tensor:
        return super()._get_rpb_matrix(reference_boxes, feat_size if self.feat_size is None else self.feat_size)


class QuerySelection(nn.Module):
    """Encoder proposals for two-stage query selection (Deformable DETR's ``two_stage``, DINO's
    mixed query selection: positions from the encoder, content queries stay learned).

    Each fusion-encoder token predicts a phrase score (sam3's dot-product scoring against the
    pooled phrase) and a box relative to an anchor centred on the token, two tokens wide. The
    proposals are trained with the decoder's box and score losses (one more auxiliary output);
    the top-scoring ones, detached, seed the decoder's reference boxes.
    """

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.assignment = cfg.proposal_assignment
        self.nms_iou = cfg.proposal_nms
        self.scoring = build_dot_product_scoring(cfg)
        self.box = MLP(cfg.d_model, cfg.d_model, 4, 3)
        nn.init.zeros_(self.box.layers[-1].weight)
        nn.init.zeros_(self.box.layers[-1].bias)

    def forward(self, memory: Tensor, feat_size: tuple[int, int], prompt: Tensor, prompt_mask: Tensor,
                padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(HW, B, d) tokens of one (H, W) level -> scores (B, HW, 1) and cxcywh boxes (B, HW, 4)."""
        height, width = feat_size
        feats = self.norm(memory.transpose(0, 1))
        scores = self.scoring(feats[None], prompt, prompt_mask)[0]
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask[..., None], -self.scoring.clamp_max_val)
        ys, xs = torch.meshgrid(torch.arange(height, device=memory.device), torch.arange(width, device=memory.device),
                                indexing="ij")
        centres = torch.stack([(xs.flatten() + 0.5) / width, (ys.flatten() + 0.5) / height], -1)
        sides = centres.new_tensor([2.0 / width, 2.0 / height]).expand_as(centres)
        anchors = torch.cat([centres, sides], -1).to(feats.dtype)
        boxes = (inverse_sigmoid(anchors)[None] + self.box(feats)).sigmoid()
        return scores, boxes

    @torch.no_grad()
    def select(self, scores: Tensor, boxes: Tensor, count: int) -> Tensor:
        """(B, count) indices of the proposals that seed the decoder, best first: the top scores, or
        with ``nms_iou`` the top scores among non-duplicates, then the duplicates (no device read)."""
        if self.nms_iou is None:
            return scores.topk(count, dim=1).indices
        candidates = scores.topk(min(4 * count, scores.shape[1]), dim=1)
        xyxy = box_cxcywh_to_xyxy(boxes.gather(1, candidates.indices[..., None].expand(-1, -1, 4)).float())
        overlap = torch.triu(box_iou(xyxy, xyxy)[0].nan_to_num(0.0), diagonal=1)  # [i, j]: i scores higher than j
        duplicate = overlap.amax(dim=1) > self.nms_iou  # YOLACT's Fast NMS
        rank = torch.where(duplicate, candidates.values.float() - 1e4, candidates.values.float())
        return candidates.indices.gather(1, rank.topk(count, dim=1).indices)


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
        act_ckpt=cfg.activation_checkpointing,
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
        use_act_ckpt=cfg.activation_checkpointing,
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

    one_to_many_outputs = False
    """At inference, return the one-to-many (DAC) queries' predictions instead of the one-to-one ones
    (they need NMS: several queries predict each object)."""

    def _run_decoder(self, pos_embed, memory, src_mask, out, prompt, prompt_mask, encoder_out):
        """sam3's decoder, with reference boxes from ``transformer.query_selection`` when the head has
        it, and the one-to-many queries as the outputs at inference when ``one_to_many_outputs``."""
        decoder = self.transformer.decoder
        feat_size = tuple(int(v) for v in encoder_out["vis_feat_sizes"][0])  # a torch.Size: no device read
        decoder.feat_size = feat_size
        selection = getattr(self.transformer, "query_selection", None)
        o2m_inference = self.one_to_many_outputs and decoder.dac and not self.training
        if selection is None and not o2m_inference:
            return super()._run_decoder(pos_embed, memory, src_mask, out, prompt, prompt_mask, encoder_out)
        bs = memory.shape[1]
        reference = None
        if selection is not None:
            enc_scores, enc_boxes = selection(memory, feat_size, prompt, prompt_mask, src_mask)
            top = selection.select(enc_scores[..., 0], enc_boxes, decoder.num_queries)  # (B, K)
            reference = enc_boxes.gather(1, top[..., None].expand(-1, -1, 4)).detach().transpose(0, 1)
        tgt = decoder.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        if selection is not None:  # content: the selected tokens themselves, so no slot carries a fixed prior
            tokens = selection.norm(memory.transpose(0, 1))
            tgt = tgt + tokens.gather(1, top[..., None].expand(-1, -1, tokens.shape[-1])).transpose(0, 1)
        hs, reference_boxes, presence_out, presence_feats = decoder(
            tgt=tgt, memory=memory, memory_key_padding_mask=src_mask, pos=pos_embed, reference_boxes=reference,
            level_start_index=encoder_out["level_start_index"], spatial_shapes=encoder_out["spatial_shapes"],
            valid_ratios=encoder_out["valid_ratios"], tgt_mask=None, memory_text=prompt,
            text_attention_mask=prompt_mask, apply_dac=decoder.dac and (self.training or o2m_inference),
        )
        hs, reference_boxes = hs.transpose(1, 2), reference_boxes.transpose(1, 2)  # batch-first
        if o2m_inference:  # keep the second (one-to-many) half of the queries
            hs, reference_boxes = hs[:, :, decoder.num_queries:], reference_boxes[:, :, decoder.num_queries:]
        out["presence_feats"] = presence_feats
        self._update_scores_and_boxes(out, hs, reference_boxes, prompt, prompt_mask,
                                      dec_presence_out=None if presence_out is None else presence_out.transpose(1, 2))
        if selection is not None and self.training:  # the proposals are one more auxiliary output
            out.setdefault("aux_outputs", []).append(
                {"pred_logits": enc_scores, "pred_boxes": enc_boxes, "pred_boxes_xyxy": box_cxcywh_to_xyxy(enc_boxes),
                 "proposal_grid": feat_size, "proposal_assignment": selection.assignment})
        return out, hs


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
        use_act_checkpoint_seg_head=cfg.activation_checkpointing,
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
    view = _HeadView(detector)
    load_state_dict_strict(view, with_own_head_entries(head, view.state_dict()),
                           f"SAM3 checkpoint {path} (head keys)")


def with_own_head_entries(sam3_head: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sam3_head`` plus ``own``'s entries that SAM3's head does not have (query selection, region
    alignment; they keep their initialisation)."""
    return {**{k: v for k, v in own.items() if k.startswith(OWN_HEAD_PREFIXES)}, **sam3_head}


class _HeadView(nn.Module):
    """The head modules of a ``Sam3Image`` under their own names, for a strict head-only load."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        for name in HEAD_MODULES:
            self.add_module(name, getattr(detector, name))
