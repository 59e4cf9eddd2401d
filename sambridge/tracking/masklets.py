"""Masklets: per object an id, a phrase and per frame a mask (RLE), box and score; the tracker's output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_pipelines.schema import encode_mask, rle_bbox

FORMAT = "sambridge.masklets/1"
"""The ``format`` field of a masklets JSON (``docs/video.md``)."""
FRAME_FIELDS = ("segmentations", "bboxes", "scores", "areas")
"""A masklet's per-frame lists (``None`` where the object is not seen)."""


@dataclass
class Masklet:
    """One tracked object: its frames' masks (COCO RLE at the frame size), boxes (x, y, w, h) and scores."""

    id: int
    phrase: str
    num_frames: int
    segmentations: list[dict | None] = field(default_factory=list)
    bboxes: list[list[float] | None] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    areas: list[int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.resize(self.num_frames)

    def resize(self, num_frames: int) -> None:
        """Cover ``num_frames`` frames: unseen frames added as ``None``, later ones dropped."""
        for name in FRAME_FIELDS:
            values = getattr(self, name)
            del values[num_frames:]
            values.extend([None] * (num_frames - len(values)))
        self.num_frames = num_frames

    def add(self, frame: int, mask: np.ndarray, score: float) -> None:
        """Record the object's (H, W) bool mask and score in ``frame`` (growing the masklet if needed)."""
        if frame >= self.num_frames:
            self.resize(frame + 1)
        rle = encode_mask(mask)
        self.segmentations[frame] = rle
        self.bboxes[frame] = rle_bbox(rle)
        self.scores[frame] = float(score)
        self.areas[frame] = int(mask.sum())

    @property
    def frames(self) -> list[int]:
        return [t for t, s in enumerate(self.segmentations) if s is not None]

    @property
    def score(self) -> float:
        """Mean score over the frames the object was seen in."""
        seen = [s for s in self.scores if s is not None]
        return float(np.mean(seen)) if seen else 0.0

    def to_json(self) -> dict[str, Any]:
        frames = self.frames
        return {"id": self.id, "phrase": self.phrase, "score": round(self.score, 6),
                "first_frame": frames[0] if frames else None, "last_frame": frames[-1] if frames else None,
                "segmentations": self.segmentations, "bboxes": self.bboxes, "scores": self.scores,
                "areas": self.areas}


@dataclass
class TrackResult:
    """Every confirmed object of a video, with the video's size, frame count and phrases."""

    phrases: list[str]
    height: int
    width: int
    num_frames: int
    masklets: list[Masklet]
    video_name: str = "video"
    fps: float | None = None
    file_names: list[str] | None = None

    def unique_counts(self) -> dict[str, int]:
        """Phrase -> how many distinct objects of it the video holds (each counted once)."""
        return {p: sum(m.phrase == p and bool(m.frames) for m in self.masklets) for p in self.phrases}

    def per_frame_counts(self) -> dict[str, list[int]]:
        """Phrase -> objects of it visible in each frame."""
        counts = {p: [0] * self.num_frames for p in self.phrases}
        for masklet in self.masklets:
            for t in masklet.frames:
                counts[masklet.phrase][t] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        per_frame = self.per_frame_counts()
        return {
            "format": FORMAT,
            "video": {"name": self.video_name, "height": self.height, "width": self.width,
                      "num_frames": self.num_frames, "fps": self.fps, "file_names": self.file_names},
            "phrases": list(self.phrases),
            "masklets": [m.to_json() for m in self.masklets],
            "counts": {p: {"unique": n, "per_frame": per_frame[p]} for p, n in self.unique_counts().items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrackResult:
        """Read back :meth:`to_json`'s dict (``ValueError`` naming the field on a malformed one)."""
        if data.get("format") != FORMAT:
            raise ValueError(f"format: expected {FORMAT!r}, got {data.get('format')!r}")
        try:
            video = data["video"]
            num_frames = int(video["num_frames"])
            masklets = [Masklet(id=int(m["id"]), phrase=str(m["phrase"]), num_frames=num_frames,
                                **{name: list(m[name]) for name in FRAME_FIELDS}) for m in data["masklets"]]
            for masklet, raw in zip(masklets, data["masklets"], strict=True):
                if any(len(raw[name]) != num_frames for name in FRAME_FIELDS):
                    raise ValueError(f"masklet {masklet.id}: every per-frame list needs {num_frames} entries")
            return cls(phrases=list(data["phrases"]), height=int(video["height"]), width=int(video["width"]),
                       num_frames=num_frames, masklets=masklets, video_name=str(video["name"]),
                       fps=video.get("fps"), file_names=video.get("file_names"))
        except KeyError as err:
            raise ValueError(f"missing field {err.args[0]!r}") from err
