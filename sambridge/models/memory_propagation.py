"""SAM2's memory (memory encoder + memory attention) carrying objects from frame to frame, in bounded memory.

This is ``sam2.SAM2VideoPredictor``'s per-object state machine run forward in a stream: each object
keeps its own output dict of conditioning frames (masks given to it, e.g. detections) and
propagated frames, and ``SAM2Base.track_step`` fuses the current frame's features with them. Unlike
the predictor, which keeps every frame of a video, only the frames SAM2 can still attend to are
kept (its ``num_maskmem`` memory frames and ``max_obj_ptrs_in_encoder`` object pointers, and the
latest ``max_conditioning_frames`` prompts), so a long video runs in flat memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sambridge.models.sam2_builder import build_sam2

STREAM_LENGTH = 2**31 - 1
"""``num_frames`` given to SAM2 for a stream of unknown length (it only bounds look-ups)."""


@dataclass
class FrameFeatures:
    """One frame's SAM2 features, flattened as ``SAM2Base._prepare_backbone_features`` returns them."""

    vision_feats: list[Tensor]
    vision_pos_embeds: list[Tensor]
    feat_sizes: list[tuple[int, int]]


class MemoryPropagator(nn.Module):
    """Objects in, their masks in later frames out, through SAM2's memory.

    Args:
        sam2: A ``sam2.modeling.sam2_base.SAM2Base`` (``sambridge.models.sam2_builder.build_sam2``); its
            image encoder is not used: frame features come from the caller.
        max_conditioning_frames: Prompts (given masks) kept per object: the latest ones.
        storage_dtype: SAM2VideoPredictor stores memory features in bfloat16; so does this.
    """

    def __init__(self, sam2: nn.Module, max_conditioning_frames: int = 2,
                 storage_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if max_conditioning_frames < 1:
            raise ValueError(f"max_conditioning_frames must be >= 1, got {max_conditioning_frames}")
        self.sam2 = sam2.eval()
        self.max_conditioning_frames = max_conditioning_frames
        self.storage_dtype = storage_dtype
        stride = sam2.memory_temporal_stride_for_eval
        self.window = max(sam2.num_maskmem * stride, sam2.max_obj_ptrs_in_encoder)
        self.states: dict[int, dict[str, dict[int, dict]]] = {}
        self._maskmem_pos_enc: list[Tensor] | None = None

    @property
    def image_size(self) -> int:
        return self.sam2.image_size

    @torch.no_grad()
    def frame_features(self, backbone_out: dict) -> FrameFeatures:
        """Flatten a frame's SAM2-neck output (``vision_pos_enc`` and un-projected ``backbone_fpn``, batch 1).

        ``GroundedSAM2.encode_images(...)["sam2_backbone_out"]`` is such an output, so tracking reuses
        the features the detector ran on.
        """
        fpn = list(backbone_out["backbone_fpn"])
        if self.sam2.use_high_res_features_in_sam:  # as SAM2Base.forward_image
            fpn[0] = self.sam2.sam_mask_decoder.conv_s0(fpn[0])
            fpn[1] = self.sam2.sam_mask_decoder.conv_s1(fpn[1])
        prepared = self.sam2._prepare_backbone_features({"backbone_fpn": fpn,
                                                          "vision_pos_enc": list(backbone_out["vision_pos_enc"])})
        _, feats, pos, sizes = prepared
        return FrameFeatures(feats, pos, sizes)

    @torch.no_grad()
    def prompt(self, obj_id: int, frame_idx: int, features: FrameFeatures, mask: Tensor) -> Tensor:
        """Give object ``obj_id`` its (S, S) bool ``mask`` at ``frame_idx`` (a conditioning frame).

        Returns the object's mask logits at the model size (S, S).
        """
        state = self.states.setdefault(obj_id, {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}})
        mask_inputs = self._mask_input(mask)
        is_init = not state["cond_frame_outputs"] and not state["non_cond_frame_outputs"]
        out = self._step(state, frame_idx, features, is_init, mask_inputs)
        state["non_cond_frame_outputs"].pop(frame_idx, None)
        state["cond_frame_outputs"][frame_idx] = out
        self._prune(state, frame_idx)
        return self._logits(out)

    @torch.no_grad()
    def propagate(self, obj_id: int, frame_idx: int, features: FrameFeatures) -> tuple[Tensor, float]:
        """Object ``obj_id``'s mask logits (S, S) at ``frame_idx`` from its memory, and its object-score logit
        (SAM2's "is it visible" output: below 0 means occluded or gone)."""
        state = self.states[obj_id]
        out = self._step(state, frame_idx, features, False, None)
        state["non_cond_frame_outputs"][frame_idx] = out
        self._prune(state, frame_idx)
        return self._logits(out), float(out["object_score_logits"].item())

    def forget(self, obj_id: int) -> None:
        """Drop an object's memory (its track ended)."""
        self.states.pop(obj_id, None)

    def stored_frames(self, obj_id: int) -> int:
        """Frames of memory held for an object (bounded by ``window + max_conditioning_frames``)."""
        state = self.states.get(obj_id, {})
        return sum(len(v) for v in state.values())

    def _mask_input(self, mask: Tensor) -> Tensor:
        size = self.image_size
        mask = mask.to(torch.float32)[None, None]
        if tuple(mask.shape[-2:]) != (size, size):  # as SAM2VideoPredictor.add_new_mask
            mask = F.interpolate(mask, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            mask = (mask >= 0.5).float()
        return mask

    def _step(self, state: dict, frame_idx: int, features: FrameFeatures, is_init: bool,
              mask_inputs: Tensor | None) -> dict:
        out = self.sam2.track_step(
            frame_idx=frame_idx, is_init_cond_frame=is_init, current_vision_feats=features.vision_feats,
            current_vision_pos_embeds=features.vision_pos_embeds, feat_sizes=features.feat_sizes,
            point_inputs=None, mask_inputs=mask_inputs, output_dict=state, num_frames=STREAM_LENGTH,
            track_in_reverse=False, run_mem_encoder=True, prev_sam_mask_logits=None,
        )
        if self._maskmem_pos_enc is None:  # the same for every frame: one copy, as the predictor keeps
            self._maskmem_pos_enc = [x[:1].clone() for x in out["maskmem_pos_enc"]]
        return {  # SAM2VideoPredictor's compact per-frame output
            "maskmem_features": out["maskmem_features"].to(self.storage_dtype),
            "maskmem_pos_enc": self._maskmem_pos_enc,
            "pred_masks": out["pred_masks"],
            "obj_ptr": out["obj_ptr"],
            "object_score_logits": out["object_score_logits"],
        }

    def _prune(self, state: dict, frame_idx: int) -> None:
        """Keep the frames SAM2 can still attend to; the latest prompts."""
        oldest = frame_idx - self.window
        past = state["non_cond_frame_outputs"]
        for t in [t for t in past if t < oldest]:
            del past[t]
        cond = state["cond_frame_outputs"]
        for t in sorted(cond)[:-self.max_conditioning_frames]:
            del cond[t]

    def _logits(self, out: dict) -> Tensor:
        size = self.image_size
        return F.interpolate(out["pred_masks"].float(), size=(size, size), mode="bilinear",
                             align_corners=False)[0, 0]


def memory_for(model: nn.Module, sam2_config: str, sam2_checkpoint: str | os.PathLike | None,
               sam2_overrides: Sequence[str] = (), max_conditioning_frames: int = 2) -> MemoryPropagator:
    """SAM2's memory for a ``GroundedSAM2``: the memory encoder, memory attention and object pointers of
    an official SAM2 checkpoint (strictly loaded), with the model's own prompt encoder and mask decoder.

    The model's SAM2 neck must be the one that checkpoint trained (the shipped configs' SAM2 trunk, full,
    frozen or LoRA-tuned). Without a checkpoint the memory is random: only for tests.
    """
    decoder = getattr(model, "prompt_decoder", None)
    if decoder is None:
        raise ValueError("SAM2 memory needs a model with SAM2's prompt decoder (a Grounded SAM2 with a Hiera trunk)")
    sam2 = build_sam2(sam2_config, image_size=model.image_size, checkpoint=sam2_checkpoint, overrides=sam2_overrides)
    sam2.image_encoder = nn.Identity()  # frames are encoded once, by the grounding model
    sam2.sam_prompt_encoder, sam2.sam_mask_decoder = decoder.prompt_encoder, decoder.mask_decoder
    return MemoryPropagator(sam2.eval(), max_conditioning_frames=max_conditioning_frames)
