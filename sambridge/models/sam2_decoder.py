"""SAM2's prompt encoder + mask decoder on SAM2-neck features (the ``SAM2ImagePredictor`` path)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Sam2PromptDecoder(nn.Module):
    """Masks from geometric prompts (points, boxes, low-res masks), batched over prompts.

    Prompt coordinates are normalised to [0, 1] on the model input (x, y order), like the
    grounding head's boxes. A box is encoded as two corner points placed before any clicks, as
    ``SAM2ImagePredictor`` does. SAM2's ``dynamic_multimask_via_stability`` must be off (the
    sambridge builder does that): with it, single-mask outputs can silently come from the
    (untrained for boxes) multimask tokens.

    Args:
        prompt_encoder: SAM2's ``PromptEncoder``.
        mask_decoder: SAM2's ``MaskDecoder`` (with ``conv_s0``/``conv_s1`` for high-res features).
        no_mem_embed: SAM2's (1, 1, C) "no memory" embedding, added to the lowest-res features
            of a single image.
        image_size: The model input size the prompt encoder was built for.
    """

    def __init__(
        self, prompt_encoder: nn.Module, mask_decoder: nn.Module, no_mem_embed: Tensor, image_size: int
    ) -> None:
        super().__init__()
        if getattr(mask_decoder, "dynamic_multimask_via_stability", False):
            raise ValueError(
                "SAM2 mask decoder has dynamic_multimask_via_stability on; build SAM2 with "
                "apply_postprocessing=False (sambridge.models.sam2_builder.build_sam2 does)"
            )
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.no_mem_embed = nn.Parameter(no_mem_embed.detach().clone())
        self.image_size = image_size

    @classmethod
    def from_sam2(cls, sam2: nn.Module) -> Sam2PromptDecoder:
        """Take the prompt encoder, mask decoder and no-memory embedding of a ``SAM2Base``."""
        if not (sam2.directly_add_no_mem_embed and sam2.use_high_res_features_in_sam):
            raise ValueError(
                "expected a SAM2.1 image model (directly_add_no_mem_embed and high-res features on)"
            )
        return cls(sam2.sam_prompt_encoder, sam2.sam_mask_decoder, sam2.no_mem_embed, sam2.image_size)

    def forward(
        self,
        features: list[Tensor],
        image_index: Tensor,
        points: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_inputs: Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Decode one mask (or three with ``multimask_output``) per prompt row.

        Args:
            features: SAM2-neck maps [(B, C, S/4, S/4), (B, C, S/8, S/8), (B, C, S/16, S/16)].
            image_index: (N,) image of each prompt row.
            points: (N, P, 2) normalised click coordinates.
            point_labels: (N, P) 1 = foreground, 0 = background, -1 = padding.
            boxes: (N, 4) normalised xyxy boxes.
            mask_inputs: (N, 1, S/4, S/4) mask logits from an earlier prediction.
            multimask_output: Three candidate masks per prompt instead of one.

        Returns:
            Mask logits (N, M, S/4, S/4), predicted IoUs (N, M), object-score logits (N, 1).
        """
        if points is None and boxes is None and mask_inputs is None:
            raise ValueError("give at least one prompt: points, boxes or mask_inputs")
        if (points is None) != (point_labels is None):
            raise ValueError("points and point_labels go together")
        if len(image_index) == 0:  # sam2's decoder cannot reshape an empty batch
            side = 4 * features[2].shape[-1]
            masks = features[2].new_zeros(0, 3 if multimask_output else 1, side, side)
            return masks, masks.new_zeros(masks.shape[:2]), masks.new_zeros(0, 1)
        coords, labels = None, None
        if boxes is not None:
            coords = boxes.reshape(-1, 2, 2) * self.image_size
            labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).expand(len(boxes), 2)
        if points is not None:
            coords = (
                points * self.image_size
                if coords is None
                else torch.cat([coords, points * self.image_size], 1)
            )
            point_labels = point_labels.int()
            labels = point_labels if labels is None else torch.cat([labels, point_labels], 1)
        sparse, dense = self.prompt_encoder(
            points=None if coords is None else (coords, labels), boxes=None, masks=mask_inputs
        )
        decoder = self.mask_decoder
        high_res = [decoder.conv_s0(features[0])[image_index], decoder.conv_s1(features[1])[image_index]]
        embedding = features[2] + self.no_mem_embed.view(1, -1, 1, 1)
        masks, iou, _, object_logits = decoder(
            image_embeddings=embedding[image_index],
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=False,
            high_res_features=high_res,
        )
        return masks, iou, object_logits
