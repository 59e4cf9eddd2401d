"""Video frames, one at a time: from a folder of images or a video file (decoded lazily with PyAV).

    source = read_frames("clip.mp4", every=2, max_frames=500)
    for frame in source:            # (H, W, 3) uint8 RGB, constant size
        ...

A folder's frames are its PNG and JPEG files (not its sub-folders), sorted by name; all must have the
same size. A video's frames are those of its first video stream. Iterating decodes frame by frame, so
memory stays bounded for long videos; a source can be iterated again (it re-reads from the start).
Unreadable input raises :class:`FrameError` (an ``InputError``: a CLI reports it in one line).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from data_pipelines.convert.common import InputError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
"""Image files a frame folder's frames are read from (case-insensitive)."""


class FrameError(InputError):
    """A frame source cannot be read; the message names the file."""


class FrameSource:
    """Frames of a video, yielded as (H, W, 3) uint8 RGB arrays by iteration.

    Attributes:
        name: the video's name (the folder's name, or the file's name without its suffix).
        fps: frames per second of the frames yielded (the stream's over ``every``); ``None`` for folders.
        file_names: a folder's file names of the frames yielded, in order; ``None`` for videos.
        num_frames: how many frames iteration yields, when known up front (else ``None``).
        height, width: the frame size.
    """

    name: str
    fps: float | None
    file_names: list[str] | None
    num_frames: int | None
    height: int
    width: int

    def __iter__(self) -> Iterator[np.ndarray]:
        raise NotImplementedError


class FolderFrames(FrameSource):
    """The image files of a folder as frames (see :func:`read_frames`)."""

    def __init__(self, folder: Path, every: int = 1, max_frames: int | None = None) -> None:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
        if not files:
            raise FrameError(f"{folder}: no frames ({', '.join(FRAME_SUFFIXES)} files) in it")
        self.paths = files[::every][:max_frames]
        self.name, self.fps, self.num_frames = folder.name, None, len(self.paths)
        self.file_names = [p.name for p in self.paths]
        self.width, self.height = _image_size(self.paths[0])
        for path in self.paths[1:]:
            size = _image_size(path)
            if size != (self.width, self.height):
                raise FrameError(f"{path} is {size[0]}x{size[1]} pixels, the first frame {self.paths[0].name} "
                                 f"{self.width}x{self.height}: every frame of a folder must have the same size")

    def __iter__(self) -> Iterator[np.ndarray]:
        for path in self.paths:
            try:
                with Image.open(path) as image:
                    yield np.array(image.convert("RGB"))  # writable, as torch.from_numpy wants
            except (OSError, SyntaxError) as err:
                raise FrameError(f"{path}: not a readable image ({err})") from err


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, from its header."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError) as err:
        raise FrameError(f"{path}: not a readable image ({err})") from err


class VideoFrames(FrameSource):
    """The frames of a video file's first video stream (see :func:`read_frames`)."""

    def __init__(self, path: Path, every: int = 1, max_frames: int | None = None) -> None:
        self.path, self.every, self.max_frames = path, every, max_frames
        self.name, self.file_names = path.stem, None
        with self._open() as container:
            stream = self._stream(container)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            self.fps = float(Fraction(rate) / every) if rate else None
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            total = math.ceil(stream.frames / every) if stream.frames else None
            self.num_frames = total if max_frames is None or total is None else min(total, max_frames)

    def _open(self) -> av.container.InputContainer:
        try:
            return av.open(str(self.path))
        except av.FFmpegError as err:
            raise FrameError(f"{self.path}: not a readable video ({err.strerror or err})") from err

    def _stream(self, container: av.container.InputContainer) -> av.VideoStream:
        if not container.streams.video:
            raise FrameError(f"{self.path}: holds no video stream")
        return container.streams.video[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        yielded = 0
        with self._open() as container:
            try:
                for index, frame in enumerate(container.decode(self._stream(container))):
                    if self.max_frames is not None and yielded >= self.max_frames:
                        return
                    if index % self.every == 0:
                        yielded += 1
                        yield frame.to_ndarray(format="rgb24")
            except av.FFmpegError as err:
                raise FrameError(f"{self.path}: decoding failed after {yielded} frame(s) "
                                 f"({err.strerror or err})") from err


def read_frames(source: str | Path, every: int = 1, max_frames: int | None = None) -> FrameSource:
    """The frames of ``source``, a folder of PNG/JPEG images or a video file: every ``every``-th frame,
    ``max_frames`` at most. Raises :class:`FrameError` naming the file when it cannot be read."""
    if every < 1:
        raise FrameError(f"every must be at least 1, got {every}")
    if max_frames is not None and max_frames < 1:
        raise FrameError(f"max_frames must be at least 1, got {max_frames}")
    path = Path(source)
    if path.is_dir():
        return FolderFrames(path, every, max_frames)
    if not path.is_file():
        raise FrameError(f"{path}: no such video file or frame folder")
    return VideoFrames(path, every, max_frames)
