"""Low-latency inference over a fixed vocabulary: phrases encoded once, static shapes, no host reads.

::

    grounder = FixedVocabularyGrounder(load_student("student.pt"), ["ripe apple", "leaf"], top_k=20)
    out = grounder(images)                       # (B, 3, S, S) float in [0, 1] at the model's size
    out.scores, out.boxes_xyxy, out.mask_logits  # (B, P, K), (B, P, K, 4), (B, P, K, h, w)
    fast = compile_grounder(grounder)            # torch.compile; CUDA graphs on a GPU

Every image is grounded with every phrase (B x P queries). The text tower runs once, in
``__init__`` (followed by one warm-up call, see ``warm_up``); ``forward`` is tensors in, tensors out,
with shapes fixed by (B, P, K) and, compiled, no value read back to the host
(``sambridge.profiling.HostSyncCounter`` counts none, a test checks): what
``torch.compile(mode="reduce-overhead")`` needs to replay the whole call as one CUDA graph and what
ONNX export traces. Build it on the device it runs on. Detections are the top K decoder queries per
(image, phrase) by the model's detection score (``GroundedSAM2.scores``, as ``postprocess``) with
the head's own mask logits (stride 4; the students' stride 8) or, with ``refine=True``, SAM2's decoder's
for every top-K box in one batched call; thresholding and resizing are the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sambridge.models.grounded_sam2 import GroundedSAM2

TEXT_KEYS = ("language_features", "language_mask", "language_embeds")
"""The encoded-phrase tensors the head reads (``GroundedSAM2.encode_phrases``), kept as buffers."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
"""``torch.compile`` modes of :func:`compile_grounder` (``reduce-overhead`` = CUDA graphs on a GPU)."""


class VocabularyOutputs(NamedTuple):
    """Top-K detections of every (image, phrase): ``scores`` (B, P, K) in [0, 1], ``boxes_xyxy``
    (B, P, K, 4) normalised, ``mask_logits`` (B, P, K, h, w) at the head's mask resolution,
    ``presence`` (B, P) in [0, 1]."""

    scores: Tensor
    boxes_xyxy: Tensor
    mask_logits: Tensor
    presence: Tensor


class FixedVocabularyGrounder(nn.Module):
    """A grounding model with its vocabulary's text features computed once.

    Args:
        model: A ``GroundedSAM2`` (Grounded SAM2 or a distilled student), in eval mode.
        phrases: The vocabulary: P noun phrases, each image is grounded with all of them.
        top_k: Detections kept per (image, phrase), at most the model's queries.
        refine: Masks from SAM2's mask decoder prompted with every top-K box, in one batched call
            (``postprocess(refine=True)``'s masks, at stride 4), instead of the head's own.
    """

    def __init__(self, model: GroundedSAM2, phrases: Sequence[str], top_k: int = 20, refine: bool = False) -> None:
        super().__init__()
        self.phrases = list(phrases)
        if not self.phrases or len(set(self.phrases)) != len(self.phrases):
            raise ValueError(f"phrases must be a non-empty list of distinct phrases, got {self.phrases}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if refine and model.prompt_decoder is None:
            raise ValueError("refine=True needs a model with SAM2's prompt decoder")
        self.model = model.eval()
        self.refine = refine
        self.top_k = min(top_k, model.num_queries)
        self.image_size = model.image_size
        with torch.no_grad():
            text = model.encode_phrases(self.phrases)
        for key in TEXT_KEYS:
            if key in text:
                self.register_buffer(key, text[key].detach(), persistent=False)
        self.warm_up()

    @torch.no_grad()
    def warm_up(self) -> None:
        """One eager call, which fills sam3's lazily built caches (sine position encodings, the decoder's
        box-RPB coordinates) that a compiled graph cannot build: their sizes come from tensor values."""
        device = self.language_features.device
        self(torch.zeros(1, 3, self.image_size, self.image_size, device=device))

    @property
    def num_phrases(self) -> int:
        """P, the vocabulary size."""
        return len(self.phrases)

    def forward(self, images: Tensor) -> VocabularyOutputs:
        """Ground every phrase in (B, 3, S, S) float images in [0, 1] at ``image_size``."""
        batch, phrases = images.shape[0], self.num_phrases
        query = torch.arange(batch * phrases, device=images.device)
        text = {key: getattr(self, key) for key in TEXT_KEYS if hasattr(self, key)}
        out = self.model.ground_encoded(self.model.encode_images(images), text, query % phrases,
                                        torch.div(query, phrases, rounding_mode="floor"))
        top = self.model.scores(out).topk(self.top_k, dim=1)
        rows = torch.arange(len(query), device=images.device)[:, None]
        boxes = out["pred_boxes_xyxy"][rows, top.indices].clamp(0, 1)
        k = self.top_k
        if self.refine:  # detection (q, k) is in image q // P: flat row r = q * K + k in r // (K * P)
            image = torch.div(torch.arange(batch * phrases * k, device=images.device), k * phrases,
                              rounding_mode="floor")
            logits = self.model.prompt_decoder(out["sam2_backbone_fpn"], image_index=image,
                                               boxes=boxes.reshape(-1, 4))[0]
            masks = logits[:, 0].view(len(query), k, *logits.shape[-2:])
        else:
            masks = out["pred_masks"][rows, top.indices]
        presence = out["presence_logit_dec"][:, 0].sigmoid()
        return VocabularyOutputs(
            scores=top.values.view(batch, phrases, k),
            boxes_xyxy=boxes.view(batch, phrases, k, 4),
            mask_logits=masks.view(batch, phrases, k, *masks.shape[-2:]),
            presence=presence.view(batch, phrases),
        )


def compile_grounder(grounder: FixedVocabularyGrounder, mode: str = "reduce-overhead",
                     backend: str = "inductor") -> nn.Module:
    """``torch.compile`` of the whole grounder, one graph (``fullgraph``) of static shapes.

    ``reduce-overhead`` captures a CUDA graph on a GPU (launch overhead gone: what batch-1 latency
    needs); on a CPU it compiles as ``default``. The first call per batch size compiles (seconds to
    minutes); later calls of the same shape replay.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
    return torch.compile(grounder, mode=mode, backend=backend, fullgraph=True, dynamic=False)
