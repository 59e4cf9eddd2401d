"""Teacher soft targets: what a SAM3 teacher contributes per query, online or cached in shards.

Both distillation modes go through :func:`select_teacher_targets`, so the offline targets read
from ``teacher.safetensors`` are exactly the online ones (same top-k selection, same fp16
rounding) and the two modes give the same loss on the same batch.

Geometry: boxes are normalised (cx, cy, w, h) and mask logits cover the whole square canvas the
pipeline builds (longest side resized, padded at the bottom/right). Such coordinates do not
depend on the canvas size, so a teacher at 1008 px and a student at 1024 px share them; the
DataModule applies no flip or scale jitter to samples that carry teacher targets.

Per query (first dimension Q, one row per query of the sample json, in order)::

    logits          (Q, K)        fp16  detection logits of the teacher's top-K queries
    boxes           (Q, K, 4)     fp16  their normalised cxcywh boxes
    presence_logit  (Q,)          fp16  the presence logit
    mask_logits     (Q, K, M, M)  fp16  their low-resolution mask logits
    pooled_features (Q, D)        fp16  optional: the teacher's pooled query-conditioned features
                                        (:func:`pooled_query_features` of its outputs)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

TARGET_KEYS = ("logits", "boxes", "presence_logit", "mask_logits")
POOLED_FEATURES = "pooled_features"
OPTIONAL_KEYS = (POOLED_FEATURES,)
STORAGE_DTYPE = torch.float16


def select_teacher_targets(outputs: dict[str, Tensor], top_k: int = 16, mask_size: int = 64) -> dict[str, Tensor]:
    """The top-``top_k`` detections per query of a grounding model's outputs, rounded to fp16.

    Args:
        outputs: sam3-style outputs: ``pred_logits`` (Q, N, 1), ``pred_boxes`` (Q, N, 4) cxcywh,
            ``pred_masks`` (Q, N, h, w) logits, ``presence_logit_dec`` (Q, 1).
        top_k: detections kept per query, ranked by score (sigmoid(logit) x sigmoid(presence)).
        mask_size: side of the stored mask logits (bilinear resize).
    """
    logits = outputs["pred_logits"][..., 0].float()
    presence = outputs["presence_logit_dec"][:, 0].float()
    k = min(top_k, logits.shape[1])
    order = (logits.sigmoid() * presence.sigmoid()[:, None]).topk(k, dim=1).indices
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    masks = outputs["pred_masks"][rows, order].float()
    if masks.shape[-1] != mask_size or masks.shape[-2] != mask_size:
        masks = F.interpolate(masks, size=(mask_size, mask_size), mode="bilinear", align_corners=False)
    targets = {"logits": logits[rows, order], "boxes": outputs["pred_boxes"][rows, order].float(),
               "presence_logit": presence, "mask_logits": masks}
    return {name: value.to(STORAGE_DTYPE) for name, value in targets.items()}


def pooled_query_features(outputs: dict[str, Tensor]) -> Tensor:
    """(Q, d) mean over image tokens of the fusion encoder's per-query states (``encoder_hidden_states``,
    (HW, Q, d)): the pooled query-conditioned features a teacher file may cache as ``pooled_features``."""
    return outputs["encoder_hidden_states"].float().mean(0)


def encode_teacher_file(targets: dict[str, Tensor]) -> bytes:
    """One sample's targets -> ``teacher.safetensors`` bytes (no pickle)."""
    missing = [k for k in TARGET_KEYS if k not in targets]
    if missing:
        raise ValueError(f"teacher targets miss {missing}")
    return save_safetensors({k: v.detach().to("cpu", STORAGE_DTYPE).contiguous() for k, v in targets.items()})


def decode_teacher_file(data: bytes) -> dict[str, Tensor]:
    """``teacher.safetensors`` bytes -> tensors (safetensors: loading never executes code)."""
    return load_safetensors(data)
