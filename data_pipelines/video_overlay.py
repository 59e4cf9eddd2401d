"""Overlay videos of tracked objects: each object's mask filled translucent and outlined, its box and
``<id> <phrase>`` drawn, in a colour fixed by its track id for the whole video.

Frames are drawn with :mod:`data_pipelines.overlay` (small frames upscaled, the same factor for every
frame) and streamed into an MP4 (H.264 where the PyAV build has it, else MPEG-4 Part 2; yuv420p) or
written as PNG files, one at a time, atomically.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av
import numpy as np
from PIL import Image

from data_pipelines.atomic import atomic_write
from data_pipelines.overlay import Colour, Detection, colour, draw_detections

VIDEO_CODECS = ("libx264", "mpeg4")
"""Encoders of overlay videos, in order of preference: the first this PyAV build can encode with is used."""
DEFAULT_FPS = 10.0
"""Frame rate of an overlay video whose frames have none (a folder of images)."""


class TrackedLike(Protocol):
    """What is drawn of a tracked object (``sambridge.tracking.TrackedObject`` has these fields)."""

    track_id: int
    phrase: str
    mask: np.ndarray
    box_xyxy: Sequence[float]


def track_colour(track_id: int) -> Colour:
    """The colour of track ``track_id``: the same in every frame of the video."""
    return colour(track_id)


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a bool (H, W) mask: those with a 4-neighbour outside it (or the frame edge)."""
    inner = np.pad(mask, 1, constant_values=False)
    eroded = inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    return mask & ~eroded


def draw_tracks(frame: np.ndarray, objects: Sequence[TrackedLike], alpha: float = 0.4) -> np.ndarray:
    """An (H, W, 3) uint8 ``frame`` with ``objects`` drawn (see the module docstring); returns the overlay
    (upscaled when the frame is small, by a factor that depends on the frame size only)."""
    canvas = np.array(frame, dtype=np.uint8)
    for obj in objects:  # outlines first: the blend keeps their colour, which is the mask's
        canvas[outline(np.asarray(obj.mask, dtype=bool))] = track_colour(obj.track_id)
    detections = [Detection(mask=np.asarray(obj.mask, dtype=bool), label=f"{obj.track_id} {obj.phrase}",
                            box_xyxy=obj.box_xyxy, colour_index=obj.track_id) for obj in objects]
    return np.asarray(draw_detections(canvas, detections, alpha=alpha))


def video_codec() -> str:
    """The first of :data:`VIDEO_CODECS` this PyAV build can encode with."""
    for name in VIDEO_CODECS:
        try:
            av.codec.Codec(name, "w")
        except av.codec.codec.UnknownCodecError:
            continue
        return name
    raise RuntimeError(f"this PyAV build has none of the video encoders {', '.join(VIDEO_CODECS)}")


def _even(frame: np.ndarray) -> np.ndarray:
    """``frame`` padded (edge pixels repeated) to even height and width, as yuv420p needs."""
    height, width = frame.shape[:2]
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float | None = None) -> int:
    """Encode (H, W, 3) uint8 ``frames`` (all one size; consumed one at a time) into the MP4 ``path``,
    atomically, at ``fps`` (default :data:`DEFAULT_FPS`); returns how many frames were written."""
    codec, rate = video_codec(), Fraction(fps or DEFAULT_FPS).limit_denominator(1001)
    count = 0

    def encode(file) -> None:
        nonlocal count
        with av.open(file, mode="w", format="mp4") as container:
            stream = None
            for frame in frames:
                frame = _even(frame)
                if stream is None:
                    stream = container.add_stream(codec, rate=rate)
                    stream.height, stream.width, stream.pix_fmt = *frame.shape[:2], "yuv420p"
                elif frame.shape[:2] != (stream.height, stream.width):
                    raise ValueError(f"{path}: frame {count} is {frame.shape[1]}x{frame.shape[0]} pixels, the "
                                     f"first {stream.width}x{stream.height}: a video's frames must have one size")
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                count += 1
            if stream is None:
                raise ValueError(f"{path}: no frames to write")
            container.mux(stream.encode())

    atomic_write(path, encode)
    return count


def write_png(path: str | Path, frame: np.ndarray) -> Path:
    """An (H, W, 3) uint8 frame as a PNG file, atomically."""
    picture = Image.fromarray(frame)
    return atomic_write(path, lambda file: picture.save(file, format="PNG"))
