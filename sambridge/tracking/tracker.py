"""A phrase in, tracked objects out: detect every frame, carry objects forward, associate, count.

Per frame (SAM3's detect-and-track loop on a Grounded SAM2):

1. The grounding model encodes the frame once and detects every instance of each phrase.
2. Each live track predicts where its object is now: its last full-size mask moved at the object's
   recent velocity, and with a :class:`~sambridge.models.memory_propagation.MemoryPropagator` (SAM2
   weights) the mask SAM2's memory propagates from the frames before.
3. Detections are assigned to the predictions of the same phrase (of any phrase with exclusive
   phrases) by mask IoU, centre proximity or containment (Hungarian), then what is left by a looser
   gate on the centres (ByteTrack's second stage). A matched track takes the detection's mask and,
   with memory, is re-prompted with it (SAM3's periodic re-prompting keeps the memory from
   drifting). A detection that matches nothing and does not overlap a tracked object is a new,
   tentative track; it is confirmed (gets its id, counts, is output from its first frame on) after
   ``min_hits`` detections in a row. A track unseen by the detector for more than ``max_missed``
   frames ends; with memory, its propagated mask fills the gap while SAM2 still sees the object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipelines.augment import AugmentConfig, sample_geometry, warp_image
from data_pipelines.schema import decode_rle, encode_mask
from sambridge.models.memory_propagation import MemoryPropagator
from sambridge.tracking.association import assign, centre_proximity, centroid, dilate, mask_iou, shift_mask
from sambridge.tracking.masklets import Masklet, TrackResult

AREA_CHANGE = 1.25
"""A matched detection whose area differs from the track's last by more than this factor (an object
entering, leaving, hidden or emerging, or two objects seen as one) does not update the track's velocity."""
CONTAINED_WEIGHT = 0.5
"""Association score of a detection lying wholly inside a track's predicted mask (the visible part of a
half-hidden object) or wholly covering it (an object growing into view), per unit of the fraction
inside: under any good IoU match, over ``match_iou``."""
RECOVER_GATE = 2.0
"""The second association stage's gate, in units of the two objects' radii (``_recover``)."""
SEARCH_RADIUS = 2
"""Pixels a track's predicted mask is grown by for that containment, per frame since it was last seen."""


@dataclass(frozen=True)
class TrackerConfig:
    """How detections become tracks.

    Attributes:
        score_threshold: Detections scoring at least this keep existing tracks going.
        birth_threshold: Detections scoring at least this can start a new track (ByteTrack's two
            thresholds: a weak detection continues an object but does not invent one); ``None``: the
            ``score_threshold``.
        match_iou: Least mask IoU between a track's predicted and a detection's mask to associate them.
        max_missed: Frames a track may go undetected before it ends.
        min_hits: Detections in a row that confirm a new track (1: every detection starts one).
        duplicate_iou: An unmatched detection overlapping a tracked object of its phrase by this much
            is a duplicate of it, not a new object.
        top_k: Detections per phrase and frame at most.
        exclusive_phrases: Each object answers one phrase at most ("ripe apple" / "unripe apple"): of
            detections of different phrases on the same object (mask IoU >= ``duplicate_iou``) only the
            best-scoring one is kept, tracks are associated across phrases, and a track's phrase is the
            one with the highest summed detection score over its life (a detector that wavers between two
            phrases for one object counts it once, under the phrase it gives most). Off for phrases that
            nest ("apple" / "red apple").
        velocity_momentum: Weight of the old velocity in the running estimate (0: last step only).
        reprompt_every: With memory: a matched detection re-prompts the track's memory when this many
            frames have passed since its last prompt.
    """

    score_threshold: float = 0.5
    birth_threshold: float | None = None
    match_iou: float = 0.3
    max_missed: int = 5
    min_hits: int = 3
    duplicate_iou: float = 0.5
    top_k: int = 20
    exclusive_phrases: bool = False
    velocity_momentum: float = 0.5
    reprompt_every: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.score_threshold <= 1 or not 0 < self.match_iou <= 1 or not 0 < self.duplicate_iou <= 1:
            raise ValueError("score_threshold must be in [0, 1], match_iou and duplicate_iou in (0, 1]")
        if self.birth_threshold is not None and not self.score_threshold <= self.birth_threshold <= 1:
            raise ValueError(f"birth_threshold must be in [score_threshold, 1], got {self.birth_threshold}")
        if self.max_missed < 0 or self.min_hits < 1 or self.top_k < 1 or self.reprompt_every < 1:
            raise ValueError("max_missed must be >= 0; min_hits, top_k and reprompt_every >= 1")
        if not 0 <= self.velocity_momentum < 1:
            raise ValueError(f"velocity_momentum must be in [0, 1), got {self.velocity_momentum}")


@dataclass
class TrackedObject:
    """A confirmed object in one frame: its id, phrase, (H, W) bool mask, pixel box (x0, y0, x1, y1), score."""

    track_id: int
    phrase: str
    mask: np.ndarray
    box_xyxy: tuple[float, float, float, float]
    score: float


@dataclass
class FrameTracks:
    """The confirmed objects seen in frame ``frame``."""

    frame: int
    objects: list[TrackedObject]


@dataclass
class _Detection:
    mask: Tensor  # (S, S) bool on the model canvas
    score: float
    phrase: str
    votes: dict[str, float]  # phrase -> score of this object's detections (several when phrases are exclusive)


@dataclass
class _Track:
    key: int  # internal; the public id is given on confirmation
    phrase: str
    votes: dict[str, float]  # phrase -> summed detection scores (the phrase is the largest)
    mask: Tensor  # last mask on the canvas
    last_seen: int
    hits: int = 1
    missed: int = 0
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))
    last_prompt: int = -1
    masklet: Masklet | None = None
    pending: list[tuple[int, dict, float]] = field(default_factory=list)  # (frame, RLE, score) until confirmed

    @property
    def confirmed(self) -> bool:
        return self.masklet is not None


class ConceptTracker:
    """Track every instance of some noun phrases through a video, frame by frame.

    Args:
        model: A grounding model (``GroundedSAM2``, a student or the SAM3 teacher): ``encode_images``,
            ``ground`` and ``postprocess``.
        phrases: The noun phrases to track.
        config: Association settings.
        propagator: SAM2's memory for the tracks (needs SAM2 weights to help); ``None``: tracks move
            at their velocity between detections.
        device: Where the model runs.
    """

    def __init__(self, model: nn.Module, phrases: Iterable[str], config: TrackerConfig | None = None,
                 propagator: MemoryPropagator | None = None, device: str | torch.device = "cpu") -> None:
        self.phrases = list(dict.fromkeys(phrases))
        if not self.phrases:
            raise ValueError("give at least one phrase to track")
        self.model = model.eval().to(device)
        self.config = config or TrackerConfig()
        self.propagator = propagator.to(device) if propagator is not None else None
        if propagator is not None and propagator.image_size != model.image_size:
            raise ValueError(f"the memory's SAM2 takes {propagator.image_size} px, the model {model.image_size} px")
        self.device = torch.device(device)
        birth = self.config.birth_threshold
        self.births_from = self.config.score_threshold if birth is None else birth
        self.canvas = AugmentConfig(image_size=model.image_size)
        self.frame_index = 0
        self.tracks: list[_Track] = []
        self.finished: list[Masklet] = []
        self._geometry = None
        self._next_key = 0
        self._next_id = 1

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def step(self, frame: np.ndarray) -> FrameTracks:
        """Track one (H, W, 3) uint8 frame (every frame of a video has the same size)."""
        t = self.frame_index
        canvas = self._to_canvas(frame)
        features = self.model.encode_images(canvas[None])
        detections = self._detect(features)
        memory = None
        if self.propagator is not None:
            memory = self.propagator.frame_features(features["sam2_backbone_out"])
        predicted = {id(track): self._predict(track, t, memory) for track in self.tracks}
        visible: list[tuple[_Track, Tensor, float]] = []
        if self.config.exclusive_phrases:  # one object, one track, whichever phrase detects it
            visible = self._associate(self.tracks, [d for p in self.phrases for d in detections[p]], t, predicted,
                                      memory)
        else:
            for phrase in self.phrases:
                tracks = [track for track in self.tracks if track.phrase == phrase]
                visible += self._associate(tracks, detections[phrase], t, predicted, memory)
        self._end_lost_tracks()
        self.frame_index += 1
        recorded = [self._record(track, t, mask, score) for track, mask, score in visible]
        return FrameTracks(frame=t, objects=[obj for obj in recorded if obj is not None])

    def track(self, frames: Iterable[np.ndarray], progress: Callable[[FrameTracks], object] | None = None
              ) -> TrackResult:
        """Run :meth:`step` on every frame and return :meth:`result`."""
        for frame in frames:
            step = self.step(frame)
            if progress is not None:
                progress(step)
        return self.result()

    def result(self, video_name: str = "video", fps: float | None = None,
               file_names: list[str] | None = None) -> TrackResult:
        """Every confirmed object so far (finished and live), ids in order of confirmation."""
        if self._geometry is None:
            raise ValueError("no frame has been tracked")
        masklets = self.finished + [t.masklet for t in self.tracks if t.confirmed]
        for masklet in masklets:
            masklet.resize(self.frame_index)
        h, w = self._geometry.orig_hw
        return TrackResult(phrases=self.phrases, height=h, width=w, num_frames=self.frame_index,
                           masklets=sorted(masklets, key=lambda m: m.id), video_name=video_name, fps=fps,
                           file_names=file_names)

    # ------------------------------------------------------------------ one frame
    def _to_canvas(self, frame: np.ndarray) -> Tensor:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame {self.frame_index}: expected an (H, W, 3) uint8 array, got "
                             f"{frame.dtype} {frame.shape}")
        if self._geometry is None:
            self._geometry = sample_geometry(frame.shape[:2], self.canvas)
        elif tuple(frame.shape[:2]) != self._geometry.orig_hw:
            raise ValueError(f"frame {self.frame_index} is {frame.shape[1]}x{frame.shape[0]}, the video's first "
                             f"{self._geometry.orig_hw[1]}x{self._geometry.orig_hw[0]}")
        return warp_image(torch.tensor(frame).permute(2, 0, 1),
                          self._geometry).to(self.device)

    def _detect(self, features: dict) -> dict[str, list[_Detection]]:
        """Per phrase, this frame's detections (masks on the canvas), duplicates removed."""
        size = self.model.image_size
        out = self.model.ground(features, self.phrases, torch.zeros(len(self.phrases), dtype=torch.long))
        out["input_hw"] = (size, size)
        pred = self.model.postprocess(out, top_k=self.config.top_k, score_threshold=self.config.score_threshold,
                                      out_hw=(size, size))
        candidates = sorted(((float(pred["scores"][q, k]), q, k) for q, k in pred["keep"].nonzero().tolist()
                             if pred["masks"][q, k].any()), reverse=True)
        found: dict[str, list[_Detection]] = {phrase: [] for phrase in self.phrases}
        chosen: list[_Detection] = []
        for score, q, k in candidates:  # greedy mask NMS, within a phrase or across phrases if exclusive
            mask, phrase = pred["masks"][q, k].cpu(), self.phrases[q]
            rivals = [d for d in chosen if d.phrase == phrase or self.config.exclusive_phrases]
            if rivals:
                overlap = mask_iou(mask[None], torch.stack([d.mask for d in rivals]))[0]
                best = int(overlap.argmax())
                if overlap[best] >= self.config.duplicate_iou:  # a duplicate: its phrase's score still votes
                    votes = rivals[best].votes
                    votes[phrase] = max(votes.get(phrase, 0.0), score)
                    continue
            detection = _Detection(mask=mask, score=score, phrase=phrase, votes={phrase: score})
            chosen.append(detection)
            found[phrase].append(detection)
        return found

    def _predict(self, track: _Track, t: int, memory) -> tuple[Tensor, Tensor | None, float | None]:
        """Where ``track``'s object should be at frame ``t`` on the canvas: its last mask moved at its velocity,
        and with memory SAM2's propagated mask and object-score logit."""
        dy, dx = track.velocity * (t - track.last_seen)
        moved = shift_mask(track.mask, dy, dx)
        if memory is None:
            return moved, None, None
        logits, visible = self.propagator.propagate(track.key, t, memory)
        return moved, (logits > 0).cpu(), visible

    def _associate(self, tracks: list[_Track], detections: list[_Detection], t: int, predicted: dict, memory
                   ) -> list[tuple[_Track, Tensor, float]]:
        """Match ``detections`` to ``tracks``; update, keep or start tracks. Returns (track, mask, score) of
        every object seen in frame ``t``."""
        dets = torch.stack([d.mask for d in detections]) if detections else torch.zeros(0)
        reach = [SEARCH_RADIUS * (1 + track.missed) for track in tracks]
        similarity = self._similarity([predicted[id(track)][0] for track in tracks], dets, reach)
        if memory is not None and tracks:  # either prediction may find the object
            similarity = torch.maximum(similarity, self._similarity([predicted[id(track)][1] for track in tracks],
                                                                    dets, reach))
        pairs = assign(similarity, self.config.match_iou)
        pairs += self._recover(tracks, detections, pairs, predicted, reach)
        visible = []
        matched_tracks, matched_dets = set(), set()
        for r, c in pairs:
            track, det = tracks[r], detections[c]
            matched_tracks.add(r)
            matched_dets.add(c)
            others = [predicted[id(other)][0] for other in tracks if other is not track]
            self._update(track, t, det, predicted[id(track)][0], others, memory)
            visible.append((track, det.mask, det.score))
        for r, track in enumerate(tracks):
            if r in matched_tracks:
                continue
            moved, remembered, object_score = predicted[id(track)]
            merged = self._inside_detection(moved, [detections[c] for c in matched_dets])
            if merged is not None:  # seen as part of another object's detection (crossing): alive, not lost
                visible.append((track, moved & merged.mask, merged.score))
                continue
            track.missed += 1
            if track.confirmed and remembered is not None and object_score > 0 and remembered.any():
                visible.append((track, remembered, track.masklet.score))  # SAM2's memory still sees it
        occupied = [mask for _, mask, _ in visible]
        expected = [predicted[id(track)][0] for track in tracks]
        for c, det in enumerate(detections):
            if c in matched_dets:
                continue
            if det.score < self.births_from:
                continue
            if occupied and mask_iou(det.mask[None], torch.stack(occupied)).max() >= self.config.duplicate_iou:
                continue
            if any(self._covers(mask, det.mask) for mask in expected):  # a fragment of a tracked object
                continue
            track = self._start(t, det, memory)
            occupied.append(det.mask)
            visible.append((track, det.mask, det.score))
        return visible

    @staticmethod
    def _similarity(predicted: list[Tensor], detections: Tensor, reach: list[int]) -> Tensor:
        """(tracks, detections) association score: the largest of mask IoU, centre proximity and
        ``CONTAINED_WEIGHT`` times the larger of the fraction of the detection inside the predicted mask grown
        by ``reach`` pixels (per track: the longer unseen, the less sure where it is) and the fraction of the
        predicted mask inside the detection (an object growing into view)."""
        if not predicted or len(detections) == 0:
            return torch.zeros(len(predicted), len(detections))
        masks = torch.stack(predicted)
        grown = torch.stack([dilate(mask, r) for mask, r in zip(predicted, reach, strict=True)])
        flat = detections.flatten(1).float()
        contained = (grown.flatten(1).float() @ flat.T) / flat.sum(1).clamp(min=1)[None]
        covering = (masks.flatten(1).float() @ flat.T) / masks.flatten(1).sum(1).clamp(min=1)[:, None]
        return torch.stack([mask_iou(masks, detections), centre_proximity(masks, detections),
                            CONTAINED_WEIGHT * torch.maximum(contained, covering)]).amax(0)

    @staticmethod
    def _recover(tracks: list[_Track], detections: list[_Detection], pairs: list[tuple[int, int]], predicted: dict,
                 reach: list[int]) -> list[tuple[int, int]]:
        """Second, looser association (as ByteTrack's second stage) of the confirmed tracks and detections the
        first left over: centres within ``RECOVER_GATE`` times the two objects' radii, plus the track's reach.
        It keeps an object whose visible part jumped (hidden behind another, emerging elsewhere) from becoming
        a new one."""
        rows = [r for r in range(len(tracks)) if r not in {r for r, _ in pairs}]
        cols = [c for c in range(len(detections)) if c not in {c for _, c in pairs}]
        if not rows or not cols:
            return []
        masks = torch.stack([predicted[id(tracks[r])][0] for r in rows])
        dets = torch.stack([detections[c].mask for c in cols])
        loose = centre_proximity(masks, dets, scale=RECOVER_GATE, margin=torch.tensor([float(reach[r]) for r in rows]))
        return [(rows[i], cols[j]) for i, j in assign(loose, 1e-6)]

    @staticmethod
    def _covers(outer: Tensor, inner: Tensor) -> bool:
        """Whether at least half of the non-empty mask ``inner`` lies inside ``outer``."""
        area = int(inner.sum())
        return area > 0 and int((outer & inner).sum()) >= area / 2

    def _inside_detection(self, mask: Tensor, detections: list[_Detection]) -> _Detection | None:
        """The detection covering at least half of ``mask``, if one does."""
        return next((det for det in detections if self._covers(det.mask, mask)), None)

    def _update(self, track: _Track, t: int, det: _Detection, predicted: Tensor, others: list[Tensor],
                memory) -> None:
        """A detection matched ``track``: the track takes its mask, and its velocity from the step unless the
        area jumped (entering, emerging). A much smaller detection (the object half hidden or leaving) or a
        grown one that also covers another track's predicted mask (two objects seen as one as they cross)
        keeps the track's full shape on its predicted course."""
        area, last_area = int(det.mask.sum()), int(track.mask.sum())
        steady = bool(last_area) and 1 / AREA_CHANGE <= area / last_area <= AREA_CHANGE
        shrunk = area * AREA_CHANGE < last_area
        merged = area > last_area and any(self._covers(det.mask, other) for other in others)
        if shrunk or (merged and not steady):
            track.mask = predicted if predicted.any() else track.mask
        else:
            if steady:
                step = (centroid(det.mask) - centroid(track.mask)) / max(1, t - track.last_seen)
                momentum = self.config.velocity_momentum if track.hits > 1 else 0.0
                track.velocity = momentum * track.velocity + (1 - momentum) * step
            track.mask = det.mask
        track.last_seen, track.missed = t, 0
        track.hits += 1
        for phrase, score in det.votes.items():
            track.votes[phrase] = track.votes.get(phrase, 0.0) + score
        track.phrase = max(track.votes, key=track.votes.get)
        if memory is not None and t - track.last_prompt >= self.config.reprompt_every:
            self.propagator.prompt(track.key, t, memory, det.mask.to(self.device))
            track.last_prompt = t

    def _start(self, t: int, det: _Detection, memory) -> _Track:
        track = _Track(key=self._next_key, phrase=det.phrase, votes=dict(det.votes), mask=det.mask, last_seen=t)
        self._next_key += 1
        if memory is not None:
            self.propagator.prompt(track.key, t, memory, det.mask.to(self.device))
            track.last_prompt = t
        self.tracks.append(track)
        return track

    def _end_lost_tracks(self) -> None:
        """End tracks unseen too long, and tentative ones missed before confirmation."""
        live = []
        for track in self.tracks:
            lost = track.missed > self.config.max_missed or (not track.confirmed and track.missed > 0)
            if not lost:
                live.append(track)
                continue
            if track.confirmed:
                self.finished.append(track.masklet)
            if self.propagator is not None:
                self.propagator.forget(track.key)
        self.tracks = live

    # ------------------------------------------------------------------ output
    def _record(self, track: _Track, t: int, mask: Tensor, score: float) -> TrackedObject | None:
        """Store the object's mask at frame ``t`` (frame size); confirm the track when it has enough hits."""
        frame_mask = self._to_frame(mask)
        rle = encode_mask(frame_mask)
        if not track.confirmed:
            track.pending.append((t, rle, score))
            if track.hits < self.config.min_hits:
                return None
            track.masklet = Masklet(id=self._next_id, phrase=track.phrase, num_frames=t + 1)
            self._next_id += 1
            for frame, pending_rle, pending_score in track.pending:
                track.masklet.add(frame, decode_rle(pending_rle), pending_score)
            track.pending.clear()
        else:
            track.masklet.add(t, frame_mask, score)
        track.masklet.phrase = track.phrase  # the vote may change it (exclusive phrases)
        x, y, w, h = track.masklet.bboxes[t]
        return TrackedObject(track_id=track.masklet.id, phrase=track.phrase, mask=frame_mask,
                             box_xyxy=(x, y, x + w, y + h), score=score)

    def _to_frame(self, mask: Tensor) -> np.ndarray:
        """A canvas mask -> the frame's (H, W) bool mask (the letterbox undone)."""
        (h, w), (vh, vw) = self._geometry.orig_hw, self._geometry.valid_hw
        crop = mask[:vh, :vw][None, None].float()
        return (F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0, 0] >= 0.5).numpy()
