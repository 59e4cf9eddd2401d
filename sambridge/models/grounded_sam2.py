"""Grounded SAM2: SAM2's image encoder + SAM3's text-grounding head + SAM2's own mask decoder.

::

    images [0,1] --resize+normalise--> VisionAdapter (SAM2 Hiera trunk, detector neck, SAM2 neck)
                                           |                        |
    phrases --> OpenClipTextEncoder ---> sam3 Sam3Image head        SAM2 prompt encoder + mask decoder
                (once per unique phrase)  (fusion encoder, DETR      (boxes from the head -> refined
                                           decoder + presence,        masks; clicks/boxes/masks from
                                           scoring, seg head)         the user -> SAM2 as usual)

One output row per (image, phrase) query: the image encoder runs once per image, the text tower
once per unique phrase, the head once per query.

Training notes:
    * Call ``model(images, phrases, query_image, targets=batch)`` for a loss: matching (sam3's
      Hungarian matcher) and the SAM2 refinement of the matched boxes happen in the forward,
      ``sambridge.losses.GroundingLoss`` reads them from the outputs.
    * sam3 asserts activation checkpointing of its fusion encoder and decoder in training mode; the
      segmentation head checkpoints as ``HeadConfig.activation_checkpointing`` says.
    * Some parameters never get a gradient: the pixel decoder's third stage and the semantic-seg
      head (no semantic loss in the recipe), and the SAM2 prompt-encoder embeddings of prompt
      types not used in a step. Under DDP use ``find_unused_parameters=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from sam3.model.data_misc import FindStage
from torch import Tensor, nn
from torchvision.ops import batched_nms

from data_pipelines.batch import GroundingBatch
from sambridge.models.components import semantic_components
from sambridge.models.grounding_head import HEAD_MODULES
from sambridge.models.matching import FiniteCostMatcher, hungarian_matcher, mask_assignment, to_sam3_targets
from sambridge.models.sam2_builder import check_image_size
from sambridge.models.sam2_decoder import Sam2PromptDecoder

PARAMETER_GROUPS = ("backbone", "text", "head", "sam2_decoder", "adapters")
"""Keys of ``GroundedSAM2.parameter_groups()``."""

INSTANCE_SOURCES = ("queries", "components")
"""Where ``GroundedSAM2.postprocess`` takes its detections from."""

DETECTION_SCORES = ("match_x_presence", "match")
"""How ``GroundedSAM2.scores`` forms a query's detection score."""

ADAPTER_MARKER = "lora_"
"""Substring of every LoRA adapter parameter name (peft's naming)."""


def _unique(phrases: list[str], device: torch.device) -> tuple[list[str], Tensor]:
    """Unique phrases in first-seen order and each phrase's index into them."""
    unique = list(dict.fromkeys(phrases))
    position = {p: i for i, p in enumerate(unique)}
    return unique, torch.tensor([position[p] for p in phrases], dtype=torch.long, device=device)


def _pooled(text: dict[str, Tensor]) -> Tensor:
    """(P, D) mean of each phrase's token features over its real tokens."""
    real = (~text["language_mask"]).T[..., None].to(text["language_features"].dtype)  # (L, P, 1)
    return (text["language_features"] * real).sum(0) / real.sum(0).clamp(min=1.0)


class GroundedSAM2(nn.Module):
    """Noun phrase in, every matching instance out (boxes, scores, masks, presence).

    Build it with ``sambridge.models.create_model`` (e.g. ``"grounded_sam2_hiera_t"``).

    Args:
        detector: sam3 ``Sam3Image`` (``GroundingDetector``) whose ``backbone`` is a
            ``SAM3VLBackbone`` around a ``VisionAdapter`` and an ``OpenClipTextEncoder``.
        image_size: Square model input size (a multiple of 32); inputs are resized to it.
        prompt_decoder: SAM2's prompt encoder + mask decoder (box refinement, geometric prompts);
            ``None`` for a backbone without SAM2 features.
        matcher: One-to-one matcher used when targets are given (default: SAM3's, NaN-guarded).
        refine_multimask_output: In training, let SAM2's decoder return 3 masks per matched box
            (the loss then supervises the best one); SAM2 itself uses one mask for box prompts.
        refine_masks: What ``postprocess`` does when not told: instance masks from SAM2's decoder
            prompted with the predicted boxes (True), or the head's own masks (False). SAM2's decoder
            refines well once trained (official weights); from random weights the head's masks learn
            several times faster (``docs/training.md``), so ``GroundingModule`` sets this from
            whether the run started from a SAM2 checkpoint.
        nms_iou: What ``postprocess`` suppresses when not told (``None``: nothing).
        mask_nms: ``postprocess``'s mask containment suppression when not told (``None``: none).
        instances: Where ``postprocess``'s detections come from when not told: ``"queries"`` (the
            DETR decoder's, as SAM3) or ``"components"`` (connected components of the phrase's
            semantic mask, scored by mean probability x presence; see ``models.components``).
        detection_score: How a query's detection score is formed: ``"match_x_presence"`` (SAM3:
            the match probability, trained on phrases with instances only, times the phrase's
            presence) or ``"match"`` (the match probability alone, for a model whose query scores
            were also trained on absent phrases, ``loss.score_absent``: it already is the
            probability of a detection, and multiplying by presence would count presence twice).
        check_size: Raises ``ValueError`` for an image size the backbone cannot take (default:
            SAM2's multiples of 32).
        pixel_mean: Input normalisation mean (default: the vision backbone's ``pixel_mean``).
        pixel_std: Input normalisation std (default: the vision backbone's ``pixel_std``).

    Attributes:
        train_refinement: Whether a forward with targets runs SAM2's decoder on the matched boxes
            (``GroundingModule`` turns it off when every ``refine_*`` loss weight is 0).
    """

    def __init__(
        self,
        detector: nn.Module,
        image_size: int,
        prompt_decoder: Sam2PromptDecoder | None = None,
        matcher: FiniteCostMatcher | None = None,
        refine_multimask_output: bool = False,
        refine_masks: bool = True,
        nms_iou: float | None = None,
        mask_nms: float | None = None,
        instances: str = "queries",
        detection_score: str = "match_x_presence",
        check_size: Callable[[int], None] = check_image_size,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_size(image_size)
        if instances not in INSTANCE_SOURCES:
            raise ValueError(f"instances must be one of {INSTANCE_SOURCES}, got {instances!r}")
        if detection_score not in DETECTION_SCORES:
            raise ValueError(f"detection_score must be one of {DETECTION_SCORES}, got {detection_score!r}")
        self.instances = instances
        self.detection_score = detection_score
        self.refine_masks = refine_masks
        self.nms_iou = nms_iou
        self.mask_nms = mask_nms
        self.detector = detector
        self.prompt_decoder = prompt_decoder
        self.matcher = matcher if matcher is not None else hungarian_matcher()
        self.image_size = image_size
        self.refine_multimask_output = refine_multimask_output
        self.train_refinement = True
        vision = detector.backbone.vision_backbone
        mean = vision.pixel_mean if pixel_mean is None else pixel_mean
        std = vision.pixel_std if pixel_std is None else pixel_std
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def vision(self) -> nn.Module:
        """The ``VisionAdapter`` (SAM2 trunk + necks)."""
        return self.detector.backbone.vision_backbone

    @property
    def text_encoder(self) -> nn.Module:
        """The ``OpenClipTextEncoder``."""
        return self.detector.backbone.language_backbone

    @property
    def one_to_many_outputs(self) -> bool:
        """Inference returns the one-to-many (DAC) queries' predictions, which need NMS (``nms_iou``)."""
        return self.detector.one_to_many_outputs

    @one_to_many_outputs.setter
    def one_to_many_outputs(self, value: bool) -> None:
        self.detector.one_to_many_outputs = value

    @property
    def num_queries(self) -> int:
        """Object queries (detections) per (image, phrase) query."""
        return self.detector.transformer.decoder.num_queries

    # ------------------------------------------------------------------ inputs
    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> resized to ``image_size`` and normalised for the backbone."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"images must be float (B, 3, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}"
            )
        size = (self.image_size, self.image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (images - self.pixel_mean) / self.pixel_std

    @staticmethod
    def _check_queries(images: Tensor, phrases: list[str], query_image: Tensor) -> None:
        if len(phrases) != len(query_image) or query_image.ndim != 1:
            raise ValueError(
                f"need one image index per phrase: {len(phrases)} phrases, "
                f"query_image of shape {tuple(query_image.shape)}"
            )
        if len(phrases) == 0:
            raise ValueError("no phrases given")
        in_range = (query_image >= 0).all() & (query_image < images.shape[0]).all()
        message = f"query_image values must index the {images.shape[0]} images"
        try:  # on a GPU checked on the device: no wait for the host in every step; on a CPU it raises here
            torch._assert_async(in_range, message)
        except RuntimeError:
            raise ValueError(f"{message}, got {query_image.tolist()}") from None

    # ------------------------------------------------------------------ forward
    def encode_images(self, images: Tensor) -> dict:
        """Backbone features of (B, 3, H, W) images in [0, 1] (sam3 ``forward_image`` dict)."""
        return self.detector.backbone.forward_image(self.preprocess(images))

    def ground(self, features: dict, phrases: list[str], query_image: Tensor) -> dict:
        """Run the text tower (once per unique phrase) and the head (once per query) on image features."""
        text, text_ids = self._encode_unique(phrases, features["vision_features"].device)
        return self.ground_encoded(features, text, text_ids, query_image)

    def _encode_unique(self, phrases: list[str], device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
        """The text tower's outputs for each distinct phrase once, and each phrase's index into them."""
        unique, text_ids = _unique(list(phrases), device)
        return self.encode_phrases(unique), text_ids

    def encode_phrases(self, phrases: list[str]) -> dict[str, Tensor]:
        """The text tower's ``language_features`` (L, P, D), ``language_mask`` (P, L) and
        ``language_embeds`` of P phrases (sam3 ``forward_text`` dict)."""
        return self.detector.backbone.forward_text(phrases, device=self.pixel_mean.device)

    def ground_encoded(self, features: dict, text: dict[str, Tensor], text_ids: Tensor, query_image: Tensor) -> dict:
        """The head on image ``features`` and encoded phrases ``text``: query q grounds phrase
        ``text_ids[q]`` in image ``query_image[q]``. Reads nothing back to the host."""
        device = features["vision_features"].device
        query_image = query_image.to(device=device, dtype=torch.long)
        features = {**features, **text}
        find = FindStage(
            img_ids=query_image,
            text_ids=text_ids.to(device=device, dtype=torch.long),
            input_boxes=None,
            input_boxes_mask=None,
            input_boxes_label=None,
            input_points=None,
            input_points_mask=None,
        )
        out = self.detector.forward_grounding(
            backbone_out=features,
            find_input=find,
            find_target=None,
            geometric_prompt=self.detector._get_dummy_prompt(num_prompts=len(query_image)),
        )
        out.pop("prev_encoder_out", None)  # references to everything above; not needed downstream
        out["backbone_fpn"] = features["backbone_fpn"]
        sam2_out = features.get("sam2_backbone_out")
        out["sam2_backbone_fpn"] = sam2_out["backbone_fpn"] if sam2_out is not None else None
        out["query_image"] = query_image
        return out

    def forward(
        self, images: Tensor, phrases: list[str], query_image: Tensor, targets: GroundingBatch | None = None
    ) -> dict:
        """Ground every (image, phrase) query.

        Args:
            images: (B, 3, H, W) float RGB in [0, 1] (any canvas; resized to ``image_size``).
            phrases: Q noun phrases.
            query_image: (Q,) long, the image of each phrase.
            targets: The batch's ground truth; when given, the outputs also carry the matching
                (``indices``, also in each ``aux_outputs``) and the SAM2 refinement of the matched
                boxes (``refine``, unless ``train_refinement`` is off), which ``GroundingLoss`` needs.

        Returns:
            sam3's output dict: ``pred_logits`` (Q, K, 1), ``pred_boxes`` (Q, K, 4) normalised
            cxcywh, ``pred_boxes_xyxy``, ``pred_masks`` (Q, K, S/4, S/4) logits,
            ``presence_logit_dec`` (Q, 1), ``semantic_seg`` (Q, 1, S/4, S/4), ``queries``; in
            training also ``aux_outputs`` and the one-to-many ``*_o2m`` outputs, and with ``targets``
            and a head built with ``region_alignment`` its scores (``region_alignment``). Plus
            ``backbone_fpn``/``sam2_backbone_fpn`` (feature lists), ``query_image`` and ``input_hw``.
        """
        self._check_queries(images, phrases, query_image)
        features = self.encode_images(images)
        text, text_ids = self._encode_unique(phrases, features["vision_features"].device)
        out = self.ground_encoded(features, text, text_ids, query_image)
        out["input_hw"] = tuple(images.shape[-2:])
        if targets is not None:
            self.match(out, targets)
            alignment = getattr(self.detector.transformer, "region_alignment", None)
            if alignment is not None:
                out["region_alignment"] = alignment(features["vision_features"], _pooled(text)[text_ids], targets)
            if self.prompt_decoder is not None and self.train_refinement:
                out["refine"] = self._refine_matched(out)
        return out

    def match(self, out: dict, targets: GroundingBatch) -> None:
        """Hungarian-match predictions to ``targets``; sets ``indices`` in ``out`` and its aux outputs."""
        if targets.num_queries != out["pred_logits"].shape[0]:
            raise ValueError(
                f"targets have {targets.num_queries} queries, outputs {out['pred_logits'].shape[0]}"
            )
        device = out["pred_logits"].device
        sam3_targets = to_sam3_targets(targets, device=device)
        outputs = [out, *out.get("aux_outputs", [])]
        by_location = [o for o in outputs if o.get("proposal_assignment") == "mask"]
        hungarian = [o for o in outputs if o.get("proposal_assignment") != "mask"]
        for output, indices in zip(hungarian, self.matcher.match_many(hungarian, sam3_targets), strict=True):
            output["indices"] = indices  # every layer matched with one device read
        for output in by_location:
            output["indices"] = mask_assignment(output["proposal_grid"], targets, device)

    def _refine_matched(self, out: dict) -> dict[str, Tensor]:
        """SAM2 mask decoder prompted with the matched queries' (detached) predicted boxes."""
        rows, queries, target_index = out["indices"]
        if target_index is None:  # matcher returns targets in packed order when all are matched
            target_index = torch.arange(len(rows), device=rows.device)
        boxes = out["pred_boxes_xyxy"][rows, queries].detach().clamp(0, 1)
        masks, iou, object_logits = self.prompt_decoder(
            out["sam2_backbone_fpn"],
            image_index=out["query_image"][rows],
            boxes=boxes,
            multimask_output=self.refine_multimask_output,
        )
        return {
            "mask_logits": masks,
            "iou_predictions": iou,
            "object_score_logits": object_logits,
            "target_index": target_index,
        }

    # ------------------------------------------------------------------ inference
    def scores(self, out: dict) -> Tensor:
        """(Q, K) detection scores: sigmoid(logit) * sigmoid(presence) as SAM3, or sigmoid(logit)
        alone (``detection_score``)."""
        match = out["pred_logits"][..., 0].sigmoid()
        return match if self.detection_score == "match" else match * out["presence_logit_dec"].sigmoid()

    def _upsample_logits(self, logits: Tensor, out_hw: tuple[int, int]) -> Tensor:
        if logits.numel() == 0:
            return logits.new_zeros(*logits.shape[:-2], *out_hw)
        return F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def postprocess(
        self,
        out: dict,
        top_k: int = 20,
        score_threshold: float = 0.5,
        refine: bool | None = None,
        out_hw: tuple[int, int] | None = None,
        nms_iou: float | None = None,
        instances: str | None = None,
        mask_nms: float | None = None,
    ) -> dict[str, Tensor]:
        """Top-k detections per query with masks at ``out_hw``.

        Args:
            out: ``forward`` outputs.
            top_k: Detections kept per query (K' = min(top_k, num_queries)).
            score_threshold: Detections scoring below it get ``keep=False`` and empty masks.
            refine: Instance masks from SAM2's mask decoder prompted with the predicted boxes
                (otherwise the head's own stride-4 masks); ``None``: ``self.refine_masks``.
            out_hw: Output mask size; defaults to the input canvas size.
            nms_iou: Also drop (``keep=False``) a detection whose box overlaps a higher-scoring kept
                one of the same query by IoU above this (torchvision's NMS); ``None``:
                ``self.nms_iou``.
            instances: ``"queries"`` (the decoder's detections) or ``"components"`` (connected
                components of the semantic mask; ``refine`` and ``nms_iou`` do not apply);
                ``None``: ``self.instances``.
            mask_nms: Also drop a detection whose head mask lies inside a higher-scoring kept one of
                the same query by more than this fraction of the smaller mask's area (a part of an
                object; objects that only touch overlap little, unlike their boxes); ``None``:
                ``self.mask_nms``.

        Returns:
            ``scores`` (Q, K'), ``boxes_xyxy`` (Q, K', 4) normalised, ``keep`` (Q, K') bool,
            ``masks`` (Q, K', H, W) bool, ``presence`` (Q,) probability, ``semantic_masks``
            (Q, H, W) bool (union of kept instances), ``query_indices`` (Q, K'; -1 for components).
        """
        out_hw = tuple(out_hw or out["input_hw"])
        if (self.instances if instances is None else instances) == "components":
            return self._components(out, top_k, score_threshold, out_hw)
        nms_iou = self.nms_iou if nms_iou is None else nms_iou
        scores = self.scores(out)
        top = scores.topk(min(top_k, scores.shape[1]), dim=1)
        rows = torch.arange(scores.shape[0], device=scores.device)[:, None]
        boxes = out["pred_boxes_xyxy"][rows, top.indices].clamp(0, 1)
        keep = top.values >= score_threshold
        if nms_iou is not None:
            q, k = keep.nonzero(as_tuple=True)
            if len(q):
                survivors = batched_nms(boxes[q, k].float(), top.values[q, k].float(), q, nms_iou)
                suppressed = torch.ones_like(q, dtype=torch.bool)
                suppressed[survivors] = False
                keep[q[suppressed], k[suppressed]] = False
        mask_nms = self.mask_nms if mask_nms is None else mask_nms
        if mask_nms is not None:
            keep = suppress_contained(out["pred_masks"][rows, top.indices] > 0, keep, mask_nms)
        q, k = keep.nonzero(as_tuple=True)  # the kept detections, read once
        refine = self.refine_masks if refine is None else refine
        if refine and self.prompt_decoder is not None:
            logits = self.prompt_decoder(
                out["sam2_backbone_fpn"], image_index=out["query_image"][q], boxes=boxes[q, k]
            )[0]
        else:
            logits = out["pred_masks"][q, top.indices[q, k]][:, None]
        masks = torch.zeros(*keep.shape, *out_hw, dtype=torch.bool, device=scores.device)
        masks[q, k] = self._upsample_logits(logits, out_hw)[:, 0] > 0
        return {
            "scores": top.values,
            "boxes_xyxy": boxes,
            "keep": keep,
            "masks": masks,
            "presence": out["presence_logit_dec"][:, 0].sigmoid(),
            "semantic_masks": masks.any(1),
            "query_indices": top.indices,
        }

    def _components(self, out: dict, top_k: int, score_threshold: float, out_hw: tuple[int, int]) -> dict:
        presence = out["presence_logit_dec"][:, 0].sigmoid()
        found = semantic_components(out["semantic_seg"], presence, top_k, out_hw)
        keep = found["scores"] >= score_threshold
        masks = found["masks"] & keep[..., None, None]
        return {**found, "keep": keep, "masks": masks, "presence": presence, "semantic_masks": masks.any(1),
                "query_indices": torch.full_like(keep, -1, dtype=torch.long)}

    @torch.no_grad()
    def segment_with_prompts(
        self,
        images: Tensor,
        points: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_inputs: Tensor | None = None,
        phrases: list[str] | None = None,
        prompt_image: Tensor | None = None,
        multimask_output: bool = False,
        out_hw: tuple[int, int] | None = None,
    ) -> dict[str, Tensor]:
        """SAM2's geometric prompting on this model, optionally seeded by a phrase.

        One prompt row per object (N rows); coordinates normalised to [0, 1] on the input canvas.
        With ``phrases`` (one per row) the head grounds the phrase and its best detection's box
        becomes the row's box prompt; with clicks too, the best detection whose box contains
        the row's first foreground click is used (so a click picks and refines one instance).

        Args:
            images: (B, 3, H, W) float RGB in [0, 1].
            points: (N, P, 2) normalised (x, y) clicks.
            point_labels: (N, P) 1 = foreground, 0 = background.
            boxes: (N, 4) normalised xyxy boxes (not together with ``phrases``).
            mask_inputs: (N, 1, S/4, S/4) mask logits from an earlier call (``mask_logits``).
            phrases: N noun phrases whose best detection becomes the box prompt.
            prompt_image: (N,) image of each row (default: row i -> image i).
            multimask_output: Three candidate masks per row (SAM2's choice for a single click).
            out_hw: Output mask size (default: the input canvas size).

        Returns:
            ``masks`` (N, M, H, W) bool, ``mask_logits`` (N, M, S/4, S/4), ``iou_predictions``
            (N, M), ``object_score_logits`` (N, 1); with phrases also ``grounding_scores`` (N,)
            and ``grounding_boxes_xyxy`` (N, 4).
        """
        if self.prompt_decoder is None:
            raise RuntimeError("this model has no SAM2 prompt decoder (its backbone gives no SAM2 features)")
        if boxes is not None and phrases is not None:
            raise ValueError("give either boxes or phrases as the box prompt, not both")
        given = [t for t in (points, boxes, mask_inputs) if t is not None]
        rows = len(phrases) if phrases is not None else (len(given[0]) if given else 0)
        if rows == 0:
            raise ValueError("give at least one prompt: points, boxes, mask_inputs or phrases")
        if prompt_image is None:
            prompt_image = torch.arange(rows, device=images.device)
        if len(prompt_image) != rows or any(len(t) != rows for t in given):
            raise ValueError(
                f"every prompt needs one row per object ({rows}); prompt_image has {len(prompt_image)}"
            )
        features = self.encode_images(images)
        result = {}
        if phrases is not None:
            grounded = self.ground(features, phrases, prompt_image)
            boxes, result["grounding_scores"] = self._pick_detection(grounded, points, point_labels)
            result["grounding_boxes_xyxy"] = boxes
        logits, iou, object_logits = self.prompt_decoder(
            features["sam2_backbone_out"]["backbone_fpn"],
            image_index=prompt_image.to(images.device),
            points=points,
            point_labels=point_labels,
            boxes=boxes,
            mask_inputs=mask_inputs,
            multimask_output=multimask_output,
        )
        out_hw = tuple(out_hw or images.shape[-2:])
        result.update(
            masks=self._upsample_logits(logits, out_hw) > 0,
            mask_logits=logits,
            iou_predictions=iou,
            object_score_logits=object_logits,
        )
        return result

    def _pick_detection(
        self, out: dict, points: Tensor | None, point_labels: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Per row, the best-scoring box; among boxes containing the first foreground click if any does."""
        scores, boxes = self.scores(out), out["pred_boxes_xyxy"].clamp(0, 1)
        candidates = scores
        if points is not None:
            foreground = point_labels == 1
            click = points[torch.arange(len(points)), foreground.int().argmax(1)][:, None]  # (N, 1, 2)
            inside = ((boxes[..., :2] <= click) & (click <= boxes[..., 2:])).all(-1) & foreground.any(
                1, keepdim=True
            )
            candidates = torch.where(inside | ~inside.any(1, keepdim=True), scores, -1.0)
        best = candidates.argmax(1)
        rows = torch.arange(len(best), device=best.device)
        return boxes[rows, best], scores[rows, best]

    # ------------------------------------------------------------------ training helpers
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: backbone (SAM2 trunk + necks), text, head (grounding head),
        sam2_decoder (prompt encoder + mask decoder), adapters (LoRA); each in exactly one group."""
        owners = {
            "backbone": self.vision,
            "text": self.text_encoder,
            "head": nn.ModuleList(getattr(self.detector, name) for name in HEAD_MODULES),
            "sam2_decoder": self.prompt_decoder,
        }
        adapter_ids = {id(p) for n, p in self.named_parameters() if ADAPTER_MARKER in n}
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in PARAMETER_GROUPS}
        seen: set[int] = set()
        for name, module in owners.items():
            for p in module.parameters() if module is not None else ():
                if p.requires_grad and id(p) not in seen:
                    groups["adapters" if id(p) in adapter_ids else name].append(p)
                    seen.add(id(p))
        orphans = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in seen]
        if orphans:
            raise RuntimeError(f"trainable parameters outside every group: {orphans[:10]}")
        return groups


def suppress_contained(masks: Tensor, keep: Tensor, threshold: float) -> Tensor:
    """``keep`` without the detections whose mask lies inside a higher-scoring kept one of the same
    row by more than ``threshold`` of the smaller mask's area (intersection over the smaller area).

    Args:
        masks: (Q, K, h, w) bool, each row's detections in descending score order.
        keep: (Q, K) bool, the detections kept so far.
        threshold: Containment above which the lower-scoring detection goes.
    """
    flat = masks.flatten(2).float()
    inter = torch.einsum("qin,qjn->qij", flat, flat)
    area = flat.sum(-1)
    contained = inter / torch.minimum(area[:, :, None], area[:, None, :]).clamp(min=1) > threshold
    keep = keep.clone()
    for j in range(1, keep.shape[1]):  # greedy, best first: a dropped detection drops nothing
        keep[:, j] &= ~(contained[:, :j, j] & keep[:, :j]).any(1)
    return keep
