"""Video metrics of tracked masklets against YT-VIS ground truth: HOTA, SA-Co/VEval's video cgF1, identity
switches and counting error.

Ground truth is YT-VIS JSON with SA-Co/VEval's ``video_np_pairs`` (one category per phrase, one annotation per
object and phrase, per frame a compressed RLE or ``null``); predictions are masklets JSONs
(``sambridge.masklets/1``, what ``sambridge track`` writes), one per video, found by ``video.name``. Each
metric comes from a well-kept implementation:

- HOTA, DetA, AssA (mask IoU): sam3's ``VideoPhraseHotaEvaluator`` (its TrackEval copy), run
  single-process, on all phrases and on each phrase alone;
- cgF1, pmF1, IL_MCC: sam3's ``VideoCGF1Evaluator`` (SA-Co/VEval's protocol); cgF1 and pmF1 in percent,
  as ``sambridge evaluate`` and SAM3's tables report them;
- ID switches, IDF1, MOTA, precision, recall: py-motmetrics (CLEAR MOT and identity metrics), distance
  ``1 - mask IoU`` (pycocotools), pairs below IoU 0.5 never matched;
- counting: unique objects per phrase (GT annotations vs masklets) and per frame, computed here.

An empty mask counts as absent (``null``). Every record is checked first; a bad one raises
:class:`~sambridge.metrics.saco.RecordError` naming file, record and field.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import motmetrics as mm
import numpy as np
from pycocotools import mask as mask_utils

from sambridge.metrics.saco import RecordError

MASKLETS_FORMAT = "sambridge.masklets/1"
"""The ``format`` field of a masklets JSON."""
MAX_DISTANCE = 0.5
"""motmetrics: a ground-truth object and a masklet match in a frame only when ``1 - mask IoU`` is at most this."""
HOTA_KEYS = ("HOTA", "DetA", "AssA", "DetRe", "DetPr", "AssRe", "AssPr", "LocA")
"""What :class:`VideoEvaluation` keeps of sam3's HOTA results (fractions)."""
_CGF1_KEYS = {"cgF1": ("cgf1_micro_50_95", 100.0), "pmF1": ("positive_micro_f1_50_95", 100.0),
              "IL_MCC": ("ilmcc_50_95", 1.0), "cgF1@0.5": ("cgf1_micro_50", 100.0),
              "pmF1@0.5": ("positive_micro_f1_50", 100.0), "cgF1@0.75": ("cgf1_micro_75", 100.0),
              "pmF1@0.75": ("positive_micro_f1_75", 100.0)}  # ours -> sam3's key suffix, scale
_MOT_KEYS = {"num_switches": "IDSW", "idf1": "IDF1", "mota": "MOTA", "precision": "MOT_precision",
             "recall": "MOT_recall", "num_objects": "gt_object_frames", "num_predictions": "pred_object_frames"}
_TABLE_COLUMNS = ("HOTA", "AssA", "IDSW", "IDSW_per_100", "IDF1", "gt_count", "pred_count", "count_rel_error",
                  "frame_count_mae")


# ----------------------------------------------------------------------------------------------
# reading and checking the files
# ----------------------------------------------------------------------------------------------
class _Invalid(Exception):
    """A check failed; the caller turns it into a :class:`RecordError` naming the record."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class _Video:
    id: int
    name: str
    height: int
    width: int
    file_names: tuple[str, ...]

    @property
    def num_frames(self) -> int:
        return len(self.file_names)


@dataclass
class _Track:
    """One ground-truth object or one masklet: per frame a compressed RLE or ``None`` (absent or empty)."""

    id: int
    score: float
    segmentations: list[dict[str, Any] | None]
    bboxes: list[list[float] | None] = field(init=False)
    areas: list[int | None] = field(init=False)

    def __post_init__(self) -> None:
        present = [t for t, s in enumerate(self.segmentations) if s is not None]
        rles = [self.segmentations[t] for t in present]
        # pycocotools 2.0.11's area() overflows on more than 255 RLEs at once: a frame at a time
        areas = [mask_utils.area(rle) for rle in rles]
        boxes = mask_utils.toBbox(rles) if rles else []
        self.bboxes, self.areas = [None] * len(self.segmentations), [None] * len(self.segmentations)
        for t, area, box in zip(present, areas, boxes, strict=True):
            if area > 0:
                self.areas[t], self.bboxes[t] = int(area), [float(v) for v in box]
            else:
                self.segmentations[t] = None

    @property
    def seen(self) -> bool:
        return any(s is not None for s in self.segmentations)

    def ytvis(self, video_id: int, category_id: int) -> dict[str, Any]:
        """The YT-VIS fields of the track (a ground-truth annotation adds its id, a prediction its score)."""
        return {"video_id": video_id, "category_id": category_id, "segmentations": self.segmentations,
                "bboxes": self.bboxes, "areas": self.areas}


def _is_int(value: Any) -> bool:
    return type(value) is int


def _positive_int(record: dict[str, Any], key: str) -> int:
    value = record.get(key)
    if not (_is_int(value) and value > 0):
        raise _Invalid(f"must be a positive integer, got {value!r}", key)
    return value


def _rle(value: Any, height: int, width: int) -> dict[str, Any] | None:
    """A frame's segmentation: ``None``, or a compressed RLE (str counts) of size ``[height, width]``."""
    if value is None:
        return None
    if not isinstance(value, dict) or "counts" not in value:
        raise _Invalid(f"must be an RLE object {{'size': [H, W], 'counts': ...}} or null, got {type(value).__name__}")
    if value.get("size") != [height, width]:
        raise _Invalid(f"RLE size {value.get('size')!r} is not the video's [height, width] = {[height, width]}")
    counts = value["counts"]
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts}
    if isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts) and sum(counts) == height * width:
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    raise _Invalid("counts must be a compressed RLE string or run lengths covering the frame")


def _segmentations(record: dict[str, Any], video: _Video) -> list[dict[str, Any] | None]:
    segs = record.get("segmentations")
    if not isinstance(segs, list) or len(segs) != video.num_frames:
        got = f"{len(segs)} entries" if isinstance(segs, list) else repr(type(segs).__name__)
        raise _Invalid(f"must be a list of one RLE or null per frame of video {video.name!r} "
                       f"({video.num_frames}), got {got}", "segmentations")
    out = []
    for t, seg in enumerate(segs):
        try:
            out.append(_rle(seg, video.height, video.width))
        except _Invalid as err:
            raise _Invalid(err.message, f"segmentations[{t}]") from None
    return out


def _records(data: dict[str, Any], section: str, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(label, record)`` of each object of list ``section``; a non-object is an error."""
    values = data.get(section)
    if not isinstance(values, list):
        raise RecordError("missing or not a list", source=source, record="top level", field=section)
    for index, record in enumerate(values):
        label = f"{section}[{index}]"
        if not isinstance(record, dict):
            raise RecordError("must be an object", source=source, record=label)
        ids = ", ".join(f"{k} {record[k]!r}" for k in ("id", "name", "phrase") if k in record)
        yield (f"{label} ({ids})" if ids else label), record


@dataclass
class _GroundTruth:
    videos: dict[str, _Video]  # by name
    categories: dict[str, int]  # phrase -> category id
    tracks: dict[tuple[int, int], list[_Track]]  # (video id, category id) -> objects
    np_pairs: list[dict[str, int]] | None  # SA-Co/VEval's video_np_pairs


def _parse_ground_truth(data: Any, source: str) -> _GroundTruth:
    if not isinstance(data, dict):
        raise RecordError(f"expected a YT-VIS JSON object, got {type(data).__name__}", source=source,
                          record="top level")
    videos: dict[int, _Video] = {}
    for label, record in _records(data, "videos", source):
        try:
            vid, name = record.get("id"), record.get("name")
            if not _is_int(vid) or vid in videos:
                raise _Invalid("must be a unique integer", "id")
            if not isinstance(name, str) or not name or name in {v.name for v in videos.values()}:
                raise _Invalid("must be a unique non-empty string", "name")
            height, width = _positive_int(record, "height"), _positive_int(record, "width")
            files = record.get("file_names")
            if files is None:
                files = [f"{name}/{t:05d}.jpg" for t in range(_positive_int(record, "length"))]
            elif not (isinstance(files, list) and files and all(isinstance(f, str) for f in files)):
                raise _Invalid("must be a non-empty list of strings, one per frame", "file_names")
            if "length" in record and record["length"] != len(files):
                raise _Invalid(f"{record['length']!r} but file_names has {len(files)} frames", "length")
            videos[vid] = _Video(vid, name, height, width, tuple(files))
        except _Invalid as err:
            raise RecordError(err.message, source=source, record=label, field=err.field) from None
    categories: dict[str, int] = {}
    for label, record in _records(data, "categories", source):
        cid, name = record.get("id"), record.get("name")
        if not _is_int(cid) or cid in categories.values():
            raise RecordError("must be a unique integer", source=source, record=label, field="id")
        if not isinstance(name, str) or name in categories:
            raise RecordError("must be a unique string (the phrase)", source=source, record=label, field="name")
        categories[name] = cid
    tracks: dict[tuple[int, int], list[_Track]] = defaultdict(list)
    seen_ids: set[int] = set()
    for label, record in _records(data, "annotations", source):
        try:
            aid, vid, cid = record.get("id"), record.get("video_id"), record.get("category_id")
            if not _is_int(aid) or aid in seen_ids:
                raise _Invalid("must be a unique integer", "id")
            if vid not in videos:
                raise _Invalid(f"{vid!r} is not a video id", "video_id")
            if cid not in categories.values():
                raise _Invalid(f"{cid!r} is not a category id", "category_id")
            if record.get("iscrowd", 0):
                raise _Invalid("crowd annotations are not supported in video evaluation", "iscrowd")
            seen_ids.add(aid)
            tracks[vid, cid].append(_Track(aid, 1.0, _segmentations(record, videos[vid])))
        except _Invalid as err:
            raise RecordError(err.message, source=source, record=label, field=err.field) from None
    np_pairs = None
    if "video_np_pairs" in data:
        np_pairs = []
        for label, record in _records(data, "video_np_pairs", source):
            if record.get("video_id") not in videos:
                raise RecordError(f"{record.get('video_id')!r} is not a video id", source=source, record=label,
                                  field="video_id")
            if record.get("category_id") not in categories.values():
                raise RecordError(f"{record.get('category_id')!r} is not a category id", source=source,
                                  record=label, field="category_id")
            np_pairs.append({"video_id": record["video_id"], "category_id": record["category_id"]})
    return _GroundTruth({v.name: v for v in videos.values()}, categories, dict(tracks), np_pairs)


def _parse_masklets(data: Any, gt: _GroundTruth, source: str, score_threshold: float
                    ) -> tuple[_Video, dict[int, list[_Track]], set[int]]:
    """A masklets JSON -> its GT video, category id -> its masklets scoring at least ``score_threshold``,
    and the category ids of the phrases it was asked."""
    if not isinstance(data, dict) or data.get("format") != MASKLETS_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise RecordError(f"expected {MASKLETS_FORMAT!r} (a masklets JSON from sambridge track), got {got!r}",
                          source=source, record="top level", field="format")
    meta = data.get("video")
    if not isinstance(meta, dict) or meta.get("name") not in gt.videos:
        name = meta.get("name") if isinstance(meta, dict) else None
        raise RecordError(f"{name!r} is not the name of a ground-truth video (known: {sorted(gt.videos)[:5]})",
                          source=source, record="video", field="name")
    video = gt.videos[meta["name"]]
    for key, expected in (("height", video.height), ("width", video.width), ("num_frames", video.num_frames)):
        if meta.get(key) != expected:
            raise RecordError(f"{meta.get(key)!r} but ground-truth video {video.name!r} has {expected}",
                              source=source, record="video", field=key)

    def category(phrase: Any, record: str, field: str) -> int:
        if phrase not in gt.categories:
            raise RecordError(f"phrase {phrase!r} is not a ground-truth category (known: "
                              f"{sorted(gt.categories)[:8]})", source=source, record=record, field=field)
        return gt.categories[phrase]

    phrases = data.get("phrases")
    if not isinstance(phrases, list):
        raise RecordError("missing or not a list", source=source, record="top level", field="phrases")
    asked = {category(p, f"phrases[{i}]", "phrases") for i, p in enumerate(phrases)}
    masklets: dict[int, list[_Track]] = defaultdict(list)
    ids: set[int] = set()
    for label, record in _records(data, "masklets", source):
        mid, score = record.get("id"), record.get("score")
        if not _is_int(mid) or mid in ids:
            raise RecordError("must be a unique integer", source=source, record=label, field="id")
        ids.add(mid)
        if record.get("phrase") not in phrases:
            raise RecordError(f"{record.get('phrase')!r} is not in the file's phrases", source=source,
                              record=label, field="phrase")
        if type(score) not in (int, float) or not math.isfinite(score):
            raise RecordError(f"must be a finite number, got {score!r}", source=source, record=label, field="score")
        try:
            segs = _segmentations(record, video)
        except _Invalid as err:
            raise RecordError(err.message, source=source, record=label, field=err.field) from None
        if score >= score_threshold:
            masklets[gt.categories[record["phrase"]]].append(_Track(mid, float(score), segs))
    return video, dict(masklets), asked


# ----------------------------------------------------------------------------------------------
# the metrics
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """sam3's evaluators print their progress and tables, and warn on 0/0: silenced."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def _sam3_evaluators() -> Any:
    with _quiet():  # sam3.eval prints a warning about an optional package on import
        from sam3.eval import saco_veval_evaluators
    return saco_veval_evaluators


def _in_process(run_ytvis_eval: Any, error_log: Path) -> Any:
    """sam3's HOTA evaluator asks TrackEval for a pool of 8 processes, and for an error log named ``None`` in the
    working folder (the string: TrackEval's command line has no None); this runs it in this process, logging
    errors to ``error_log``."""
    def run(args: list[str], gt_json: dict[str, Any], dt_json: list[dict[str, Any]]) -> Any:
        args = list(args)
        args[args.index("--USE_PARALLEL") + 1] = "False"
        args[args.index("--LOG_ON_ERROR") + 1] = str(error_log)
        return run_ytvis_eval(args=args, gt_json=gt_json, dt_json=dt_json)
    return run


def _sam3_hota(gt_json: dict[str, Any], predictions: list[dict[str, Any]], folder: Path) -> dict[str, float]:
    evaluators = _sam3_evaluators()
    (folder / "gt.json").write_text(json.dumps(gt_json))
    (folder / "pred.json").write_text(json.dumps(predictions))
    evaluator = evaluators.VideoPhraseHotaEvaluator(str(folder / "gt.json"), prob_thresh=-math.inf,
                                                    iou_types=["segm"])
    in_process = _in_process(evaluators.run_ytvis_eval, folder / "trackeval_errors.txt")
    with _quiet(), mock.patch.object(evaluators, "run_ytvis_eval", in_process):
        results, _ = evaluator.evaluate(str(folder / "pred.json"))
    return {k: float(results[f"video_mask_all_phrase_{k}"]) for k in HOTA_KEYS}


def _sam3_cgf1(gt_json: dict[str, Any], predictions: list[dict[str, Any]], folder: Path,
               score_threshold: float) -> dict[str, float]:
    evaluators = _sam3_evaluators()
    (folder / "gt.json").write_text(json.dumps(gt_json))
    (folder / "pred.json").write_text(json.dumps(predictions))
    evaluator = evaluators.VideoCGF1Evaluator(str(folder / "gt.json"), prob_thresh=score_threshold,
                                              iou_types=["segm"])
    with _quiet():
        results, _ = evaluator.evaluate(str(folder / "pred.json"))
    return {ours: float(results[f"video_mask_demo_{theirs}"]) * scale for ours, (theirs, scale) in _CGF1_KEYS.items()}


def _accumulator(gts: Sequence[_Track], preds: Sequence[_Track], num_frames: int) -> mm.MOTAccumulator:
    """motmetrics' frame-by-frame events of one video and phrase."""
    acc = mm.MOTAccumulator(auto_id=True)
    for t in range(num_frames):
        g = [track for track in gts if track.segmentations[t] is not None]
        p = [track for track in preds if track.segmentations[t] is not None]
        distances = np.full((len(g), len(p)), np.nan)
        if g and p:
            ious = mask_utils.iou([d.segmentations[t] for d in p], [o.segmentations[t] for o in g], [0] * len(g))
            distances = 1.0 - np.asarray(ious, dtype=np.float64).reshape(len(p), len(g)).T
            distances[distances > MAX_DISTANCE] = np.nan
        acc.update([o.id for o in g], [d.id for d in p], distances)
    return acc


def _identity(accumulators: Sequence[mm.MOTAccumulator]) -> dict[str, float]:
    frame = mm.metrics.create().compute_many(list(accumulators), metrics=list(_MOT_KEYS),
                                             names=[str(i) for i in range(len(accumulators))], generate_overall=True)
    row = frame.loc["OVERALL"]
    out = {ours: float(row[theirs]) for theirs, ours in _MOT_KEYS.items()}
    switches, objects = out.pop("IDSW"), out["gt_object_frames"]
    return {"IDSW": switches, "IDSW_per_100": switches * 100.0 / objects if objects else math.nan, **out}


def _counts(gts: Sequence[_Track], preds: Sequence[_Track], num_frames: int) -> tuple[int, int, np.ndarray]:
    """Unique objects seen (ground truth, masklets) and the per-frame count differences of one video and phrase."""
    def per_frame(tracks: Sequence[_Track]) -> np.ndarray:
        return np.array([sum(tr.segmentations[t] is not None for tr in tracks) for t in range(num_frames)])

    return (sum(tr.seen for tr in gts), sum(tr.seen for tr in preds),
            np.abs(per_frame(preds) - per_frame(gts)))


def _count_metrics(rows: Sequence[tuple[int, int, np.ndarray]]) -> dict[str, float]:
    gt_count, pred_count = sum(r[0] for r in rows), sum(r[1] for r in rows)
    abs_error = sum(abs(r[1] - r[0]) for r in rows)
    return {"gt_count": float(gt_count), "pred_count": float(pred_count), "count_abs_error": float(abs_error),
            "count_rel_error": abs_error / gt_count if gt_count else (0.0 if abs_error == 0 else math.nan),
            "frame_count_mae": float(np.concatenate([r[2] for r in rows]).mean()) if rows else math.nan}


# ----------------------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------------------
def _defined(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def _json_value(value: float) -> float | None:
    return None if math.isnan(value) else value


def _format(value: float | None, key: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if key.startswith(("num_", "gt_", "pred_", "IDSW", "count_abs")) and key != "IDSW_per_100":
        return str(int(value))
    return f"{value:.4f}"


@dataclass
class VideoEvaluation:
    """Everything :func:`evaluate_video` measured.

    Attributes:
        summary: metric -> value over every video and phrase (undefined metrics left out, e.g. HOTA without
            objects or predictions, cgF1 without ``video_np_pairs`` or without any prediction).
        per_phrase: phrase -> metric -> value (``nan`` where undefined); the same keys, minus cgF1.
        score_threshold: masklets scoring below it were left out of every metric.
        unpredicted_videos: ground-truth videos no masklets file named (their objects all count as missed).
        notes: why a metric is missing.
    """

    summary: dict[str, float]
    per_phrase: dict[str, dict[str, float]]
    score_threshold: float
    unpredicted_videos: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (undefined values as ``null``)."""
        return {"summary": self.summary,
                "per_phrase": {p: {k: _json_value(v) for k, v in m.items()} for p, m in self.per_phrase.items()},
                "score_threshold": self.score_threshold, "max_distance": MAX_DISTANCE,
                "unpredicted_videos": self.unpredicted_videos, "notes": self.notes}

    def table(self) -> str:
        """The summary (metric, value) and a per-phrase table, as text."""
        width = max((len(k) for k in self.summary), default=6)
        lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
        lines += [f"{k:<{width}}  {_format(v, k)}" for k, v in self.summary.items()]
        lines.append("(HOTA/DetA/AssA and IL_MCC are fractions, cgF1 and pmF1 in percent as SAM3 reports them; "
                     "IDSW_per_100 = ID switches per 100 ground-truth object-frames)")
        if self.per_phrase:
            name = max(6, *(len(p) for p in self.per_phrase))
            cells = [max(len(c), 8) for c in _TABLE_COLUMNS]
            lines += ["", "  ".join([f"{'phrase':<{name}}", *(f"{c:>{w}}" for c, w in zip(_TABLE_COLUMNS, cells,
                                                                                               strict=True))])]
            for phrase, metrics in self.per_phrase.items():
                lines.append("  ".join([f"{phrase:<{name}}", *(f"{_format(metrics.get(c), c):>{w}}"
                                                                for c, w in zip(_TABLE_COLUMNS, cells, strict=True))]))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def evaluate_video(gt: dict[str, Any], pred: dict[str, Any] | Sequence[dict[str, Any]], *,
                   score_threshold: float = 0.0, gt_source: str = "<ground truth>",
                   pred_sources: Sequence[str] | None = None) -> VideoEvaluation:
    """Score masklets JSONs against YT-VIS ground truth (see the module docstring for the metrics).

    Args:
        gt: YT-VIS ground truth with ``video_np_pairs`` (SA-Co/VEval); without them there is no cgF1/IL_MCC.
        pred: one masklets JSON or several (each names its video by ``video.name``; two files may cover one
            video only with different phrases).
        score_threshold: masklets whose ``score`` is below this are left out (0 keeps every masklet, as the
            tracker's own counts do; SA-Co/VEval uses 0.5 on SAM3's scores).
        gt_source: the ground truth's name in error messages (its path).
        pred_sources: each prediction's name in error messages (default ``<predictions N>``).

    Raises:
        RecordError: a malformed record, naming file, record and field (also: an unknown video name or phrase).
    """
    preds = [pred] if isinstance(pred, dict) else list(pred)
    sources = list(pred_sources) if pred_sources is not None else [f"<predictions {i}>" for i in range(len(preds))]
    if len(sources) != len(preds):
        raise ValueError(f"{len(preds)} predictions but {len(sources)} pred_sources")
    truth = _parse_ground_truth(gt, gt_source)
    predicted: dict[tuple[int, int], list[_Track]] = {}
    pairs = set(truth.tracks) | {(p["video_id"], p["category_id"]) for p in truth.np_pairs or []}
    covered: dict[tuple[int, int], str] = {}
    for data, source in zip(preds, sources, strict=True):
        video, masklets, asked = _parse_masklets(data, truth, source, score_threshold)
        for cid in asked | set(masklets):
            if (video.id, cid) in covered:
                phrase = next(p for p, c in truth.categories.items() if c == cid)
                raise RecordError(f"video {video.name!r} phrase {phrase!r} is also predicted by "
                                  f"{covered[video.id, cid]}", source=source, record="phrases")
            covered[video.id, cid] = source
            predicted[video.id, cid] = masklets.get(cid, [])
            pairs.add((video.id, cid))
    if not pairs:
        raise RecordError("nothing to evaluate: no annotations, video_np_pairs or masklets", source=gt_source,
                          record="top level")
    videos = {v.id: v for v in truth.videos.values()}
    names = {cid: phrase for phrase, cid in truth.categories.items()}
    unpredicted = sorted(videos[v].name for v in {v for v, _ in pairs} - {v for v, _ in covered})

    def gt_json(cids: set[int]) -> dict[str, Any]:
        return {"videos": [{"id": v.id, "name": v.name, "height": v.height, "width": v.width,
                            "length": v.num_frames, "file_names": list(v.file_names)} for v in videos.values()],
                "categories": [{"id": cid, "name": names[cid]} for cid in sorted(cids)],
                "annotations": [{**track.ytvis(vid, cid), "id": track.id, "iscrowd": 0,
                                 "height": videos[vid].height, "width": videos[vid].width}
                                for (vid, cid), tracks in sorted(truth.tracks.items()) if cid in cids
                                for track in tracks],
                **({"video_np_pairs": [p for p in truth.np_pairs if p["category_id"] in cids]}
                   if truth.np_pairs is not None else {})}

    def ytvis_predictions(cids: set[int]) -> list[dict[str, Any]]:
        return [{**track.ytvis(vid, cid), "score": track.score} for (vid, cid), tracks in sorted(predicted.items())
                if cid in cids for track in tracks]

    def hota(cids: set[int], folder: Path) -> dict[str, float]:
        if not any(truth.tracks.get(p) for p in pairs if p[1] in cids):
            if not any(predicted.get(p) for p in pairs if p[1] in cids):
                return dict.fromkeys(HOTA_KEYS, math.nan)  # nothing to detect and nothing detected
            # only false positives: what TrackEval scores such a sequence (sam3's copy raises on a ground
            # truth without annotations: it then looks for its "challenging" tag on every one of none)
            return {**dict.fromkeys(HOTA_KEYS, 0.0), "LocA": 1.0}
        return _sam3_hota(gt_json(cids), ytvis_predictions(cids), folder)

    all_cids = {cid for _, cid in pairs}
    per_pair = {p: (truth.tracks.get(p, []), predicted.get(p, [])) for p in sorted(pairs)}
    accumulators = {p: _accumulator(g, d, videos[p[0]].num_frames) for p, (g, d) in per_pair.items()}
    counts = {p: _counts(g, d, videos[p[0]].num_frames) for p, (g, d) in per_pair.items()}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sambridge-veval-") as tmp:
        folder = Path(tmp)
        summary = hota(all_cids, folder)
        if truth.np_pairs is None:
            notes.append("no cgF1/pmF1/IL_MCC: the ground truth has no video_np_pairs")
        elif not any(predicted.values()):
            notes.append("no cgF1/pmF1/IL_MCC: no masklets to score (sam3's evaluator needs at least one)")
        else:
            summary.update(_sam3_cgf1(gt_json(all_cids), ytvis_predictions(all_cids), folder, score_threshold))
        summary.update(_identity(list(accumulators.values())))
        summary.update(_count_metrics(list(counts.values())))
        summary["count_mae"] = float(np.mean([abs(c[1] - c[0]) for c in counts.values()])) if counts else math.nan
        summary.update(num_videos=float(len({v for v, _ in pairs})), num_phrases=float(len(all_cids)),
                       num_masklets=float(sum(len(d) for d in predicted.values())))
        per_phrase = {}
        for cid in sorted(all_cids, key=lambda c: names[c]):
            mine = [p for p in per_pair if p[1] == cid]
            per_phrase[names[cid]] = {**hota({cid}, folder), **_identity([accumulators[p] for p in mine]),
                                      **_count_metrics([counts[p] for p in mine]), "num_videos": float(len(mine))}
    return VideoEvaluation(summary=_defined(summary), per_phrase=per_phrase, score_threshold=score_threshold,
                           unpredicted_videos=unpredicted, notes=notes)
