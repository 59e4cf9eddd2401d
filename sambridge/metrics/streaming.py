"""ConceptSegmentationMetrics: SA-Co metrics, mask AP, IoU and counting error, streamed (torchmetrics).

Each query is reduced to a handful of numbers the moment it arrives (no mask outlives
``update``), and every state is a tensor torchmetrics gathers across DDP ranks, so each query
counts exactly once whatever the number of ranks:

=================  =============================================================================
state              per query / detection (concatenated over updates and ranks)
=================  =============================================================================
``query_stats``    TPs at the T IoU thresholds, #instances, #detections, union-mask intersection
                   and union pixels, #duplicates (:class:`~sambridge.metrics.queries.QueryTable`'s
                   columns)
``query_text``     the phrase and image id as UTF-8 bytes (``query_text_len`` holds the lengths)
``detections``     for the top ``max_dets`` predictions by score: the score and a bit field of the
                   IoU thresholds it matched an instance at (COCOeval's greedy rule; for mask AP)
``num_skipped``    queries that were not instance-exhaustive (summed; they are not evaluated)
=================  =============================================================================

All states are flat float64 (exact for counts, bytes and scores), so a rank that saw no data
syncs an empty tensor of the same kind. That is about 300 bytes per query plus 16 per kept
detection. A query fed twice (e.g. a sampler padding ranks with repeats) counts twice; sharded
loaders that split shards by node do not repeat. With the same queries, ``compute`` gives what
the file evaluator (:func:`sambridge.evaluate.evaluate_saco`) gives, at whatever resolution the
masks come in; the file evaluator works at the original image size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from data_pipelines.batch import GroundingBatch
from sambridge.metrics.ap import DEFAULT_MAX_DETS, average_precision
from sambridge.metrics.calibration import Calibration, calibration
from sambridge.metrics.cgf1 import DEFAULT_SCORE_THRESHOLD, IOU_THRESHOLDS
from sambridge.metrics.masks import mask_ious, union_overlap
from sambridge.metrics.queries import QueryTable, match_query

_T = len(IOU_THRESHOLDS)
_BITS = 1 << np.arange(_T)  # detection record: which thresholds it matched at, as a bit field


class ConceptSegmentationMetrics(Metric):
    """cgF1 / pmF1 / IL_MCC (as SAM3), mask AP, mean IoU, counting error and duplicate rate over an epoch.

    ``compute()`` returns a flat dict of float64 scalars (keys as
    :meth:`sambridge.metrics.queries.QueryTable.metrics` plus ``AP``, ``AP50``, ``AP75``,
    ``AR@{max_dets}``, ``ECE`` (score calibration error,
    :mod:`sambridge.metrics.calibration`) and ``num_skipped``), each prefixed with ``prefix``; ``query_table()`` and
    ``per_phrase()`` give the per-query and per-phrase breakdown (synced across ranks too).

    Args:
        score_threshold: predictions scoring at least this are detections (cgF1, IoU, counting);
            SAM3 uses 0.5.
        max_dets: predictions per query, by score, that count for AP (COCO: 100).
        prefix: prepended to every key ``compute()`` returns, e.g. ``"val_"``.
        **kwargs: ``torchmetrics.Metric`` options (``compute_on_cpu``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = None  # a mix: cgF1 up, counting error down
    full_state_update = False

    def __init__(self, score_threshold: float = DEFAULT_SCORE_THRESHOLD, max_dets: int = DEFAULT_MAX_DETS,
                 prefix: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.score_threshold, self.max_dets, self.prefix = score_threshold, max_dets, prefix
        self.set_dtype(torch.float64)  # torchmetrics' placeholder for a rank without data takes this dtype
        for name in ("query_stats", "query_text", "query_text_len", "detections"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("num_skipped", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    # ------------------------------------------------------------------ update
    def update(self, pred_masks: Sequence[Tensor], pred_scores: Sequence[Tensor], gt_masks: Sequence[Tensor],
               exhaustive: Sequence[bool] | Tensor, phrases: Sequence[str],
               image_ids: Sequence[str | int]) -> None:
        """Add Q queries (one entry per query in every argument).

        Args:
            pred_masks: per query, (K_q, h, w) bool predicted masks.
            pred_scores: per query, (K_q,) scores.
            gt_masks: per query, (N_q, h, w) bool ground-truth instance masks (same h, w).
            exhaustive: per query, whether every instance is annotated; others are only counted.
            phrases: per query, the noun phrase.
            image_ids: per query, the image's id (sample key), for per-query reports.
        """
        num = len(phrases)
        sizes = {"pred_masks": len(pred_masks), "pred_scores": len(pred_scores), "gt_masks": len(gt_masks),
                 "exhaustive": len(exhaustive), "image_ids": len(image_ids)}
        if any(n != num for n in sizes.values()):
            raise ValueError(f"one entry per query expected: {num} phrases but {sizes}")
        flags = exhaustive.tolist() if isinstance(exhaustive, Tensor) else list(exhaustive)
        stats, text, text_len, detections = [], [], [], []
        for q in range(num):
            _check_query(q, phrases[q], image_ids[q], pred_masks[q], pred_scores[q], gt_masks[q])
            if not flags[q]:
                self.num_skipped += 1
                continue
            pred, gt = pred_masks[q], gt_masks[q]
            scores = pred_scores[q].detach().to(torch.float64).cpu().numpy()
            match = match_query(mask_ious(pred, gt), scores, score_threshold=self.score_threshold,
                                max_dets=self.max_dets)
            inter, union = union_overlap(pred[torch.as_tensor(match.detections, device=pred.device)], gt)
            stats.append(np.concatenate([match.tp, [gt.shape[0], len(match.detections), inter, union,
                                                    match.duplicates]]))
            phrase, image = phrases[q].encode(), str(image_ids[q]).encode()
            text.append(np.frombuffer(phrase + image, dtype=np.uint8))
            text_len.append([len(phrase), len(image)])
            detections.append(np.stack([match.top_scores, match.top_matched @ _BITS], axis=1))
        if stats:
            for name, rows in (("query_stats", stats), ("query_text", text), ("query_text_len", text_len),
                               ("detections", detections)):
                flat = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in rows])
                getattr(self, name).append(torch.from_numpy(flat).to(self.device))

    def update_from_batch(self, predictions: Mapping[str, Sequence[Tensor]], batch: GroundingBatch) -> None:
        """Add every query of a batch.

        Args:
            predictions: per query, in batch order: ``masks`` (K_q, H, W) bool on the batch canvas,
                ``scores`` (K_q,) and optionally ``keep`` (K_q,) bool, the detections to evaluate
                (others are dropped). Lists or padded (Q, K, ...) tensors, as a model's
                ``postprocess`` returns them.
            batch: the batch; masks are compared inside each image's valid (unpadded) area, and
                sample keys name the images.
        """
        missing = {"masks", "scores"} - set(predictions)
        if missing:
            raise ValueError(f"predictions need per-query 'masks' and 'scores'; missing {sorted(missing)}")
        if len(predictions["masks"]) != batch.num_queries:
            raise ValueError(f"{len(predictions['masks'])} predicted mask sets for "
                             f"{batch.num_queries} queries")
        images, valid_hw, keep = batch.query_image.tolist(), batch.valid_hw.tolist(), predictions.get("keep")
        pred_masks, pred_scores, gt_masks = [], [], []
        for q, rows in enumerate(batch.instance_slices()):
            h, w = valid_hw[images[q]]
            masks, scores = predictions["masks"][q], predictions["scores"][q]
            if keep is not None:
                masks, scores = masks[keep[q]], scores[keep[q]]
            pred_masks.append(masks[:, :h, :w])
            pred_scores.append(scores)
            gt_masks.append(batch.masks[rows, :h, :w])
        self.update(pred_masks, pred_scores, gt_masks, batch.exhaustive, batch.phrases,
                    [batch.keys[i] for i in images])

    # ------------------------------------------------------------------ results
    def _state(self, name: str, width: int) -> np.ndarray:
        value = getattr(self, name)
        if isinstance(value, list):
            value = dim_zero_cat(value) if value else torch.zeros(0, dtype=torch.float64)
        return value.detach().cpu().numpy().reshape(-1, width)

    def _table(self) -> QueryTable:
        stats = self._state("query_stats", _T + 5).astype(np.int64)
        lengths = self._state("query_text_len", 2).astype(np.int64)
        text = self._state("query_text", 1).astype(np.uint8).tobytes()
        ends = np.cumsum(lengths.sum(axis=1))
        phrases, image_ids = [], []
        for end, (n_phrase, n_image) in zip(ends, lengths, strict=True):
            start = end - n_phrase - n_image
            phrases.append(text[start:start + n_phrase].decode())
            image_ids.append(text[start + n_phrase:end].decode())
        return QueryTable(phrases=phrases, image_ids=image_ids, tp=stats[:, :_T], num_gt=stats[:, _T],
                          num_pred=stats[:, _T + 1], inter=stats[:, _T + 2], union=stats[:, _T + 3],
                          num_dup=stats[:, _T + 4])

    def _detection_records(self) -> tuple[np.ndarray, np.ndarray]:
        """Scores (D,) and matched flags (D, T) of the top detections of every query."""
        records = self._state("detections", 2)
        return records[:, 0], (records[:, 1:].astype(np.int64) & _BITS) > 0

    def compute(self) -> dict[str, Tensor]:
        table = self._table()
        out = table.metrics()
        scores, matched = self._detection_records()
        out.update(average_precision(scores, matched, np.zeros_like(matched),
                                     num_gt=int(table.num_gt.sum()), max_dets=self.max_dets))
        out["ECE"] = calibration(scores, matched[:, 0]).ece
        out["num_skipped"] = float(self.num_skipped)
        return {f"{self.prefix}{k}": torch.tensor(v, dtype=torch.float64) for k, v in out.items()}

    def query_table(self) -> QueryTable:
        """Per-query statistics of every query seen (all ranks), in update order, rank by rank."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            return self._table()

    def calibration(self) -> Calibration:
        """Reliability of the kept detections' scores over all ranks (:mod:`sambridge.metrics.calibration`)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            scores, matched = self._detection_records()
        return calibration(scores, matched[:, 0])

    def per_phrase(self) -> list[dict[str, float | int | str | None]]:
        """Per-phrase rows (:meth:`sambridge.metrics.queries.QueryTable.per_phrase`) over all ranks."""
        return self.query_table().per_phrase()


def _check_query(q: int, phrase: str, image_id: str | int, pred: Tensor, scores: Tensor, gt: Tensor) -> None:
    def fail(message: str) -> None:
        raise ValueError(f"query {q} ({phrase!r}, image {image_id}): {message}")

    if pred.dtype != torch.bool or gt.dtype != torch.bool:
        fail(f"masks must be bool (threshold logits first), got predictions {pred.dtype}, "
             f"ground truth {gt.dtype}")
    if pred.ndim != 3 or gt.ndim != 3 or pred.shape[1:] != gt.shape[1:]:
        fail(f"expected predictions (K, h, w) and ground truth (N, h, w) of one size, "
             f"got {tuple(pred.shape)} and {tuple(gt.shape)}")
    if scores.ndim != 1 or scores.shape[0] != pred.shape[0]:
        fail(f"expected {pred.shape[0]} scores, got shape {tuple(scores.shape)}")
