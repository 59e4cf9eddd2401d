"""``data_pipelines.frames``: a folder of images or a video file read frame by frame, in order, with its size,
frame rate and names; ``--every`` and ``--max-frames``; unreadable input named in one line."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from data_pipelines.frames import FrameError, read_frames


def frame(value: int, height: int = 24, width: int = 32) -> np.ndarray:
    """A frame of one grey ``value``: its order can be read back from its pixels (also after lossy coding)."""
    return np.full((height, width, 3), value, dtype=np.uint8)


def write_folder(folder: Path, values: list[int], names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for value, name in zip(values, names, strict=True):
        Image.fromarray(frame(value)).save(folder / name)
    return folder


def write_video(path: Path, values: list[int], fps: int = 12, height: int = 24, width: int = 32) -> Path:
    """An MP4 written with PyAV directly (independent of the code under test)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for value in values:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame(value, height, width), format="rgb24")))
        container.mux(stream.encode())
    return path


def greys(frames) -> list[int]:
    return [int(round(f.mean())) for f in frames]


def test_a_folder_is_read_in_name_order_with_its_file_names(tmp_path: Path) -> None:
    # written out of order, PNG and JPEG mixed; other files and sub-folders are not frames
    folder = write_folder(tmp_path / "clip", [30, 10, 20], ["00002.png", "00000.png", "00001.jpg"])
    (folder / "notes.txt").write_text("not a frame")
    write_folder(folder / "sub", [99], ["00003.png"])
    source = read_frames(folder)
    frames = list(source)
    assert [f.shape for f in frames] == [(24, 32, 3)] * 3 and all(f.dtype == np.uint8 for f in frames)
    assert [abs(g - v) <= 2 for g, v in zip(greys(frames), [10, 20, 30], strict=True)] == [True] * 3
    assert source.file_names == ["00000.png", "00001.jpg", "00002.png"]
    assert (source.num_frames, source.fps, source.name, source.height, source.width) == (3, None, "clip", 24, 32)
    assert greys(source) == greys(frames)  # a source can be iterated again


def test_every_and_max_frames_select_frames_of_a_folder(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "clip", [0, 10, 20, 30, 40, 50, 60], [f"{i:05d}.png" for i in range(7)])
    source = read_frames(folder, every=2, max_frames=3)
    assert greys(source) == [0, 20, 40]
    assert source.file_names == ["00000.png", "00002.png", "00004.png"] and source.num_frames == 3


def test_a_frame_of_another_size_is_named(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "clip", [0, 10], ["00000.png", "00001.png"])
    Image.fromarray(frame(20, height=30)).save(folder / "00002.png")
    with pytest.raises(FrameError, match=r"00002\.png is 32x30 pixels, the first frame 00000\.png 32x24") as info:
        read_frames(folder)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_a_video_file_is_read_frame_by_frame_with_its_rate(tmp_path: Path) -> None:
    values = [20 * i for i in range(9)]
    path = write_video(tmp_path / "walk.mp4", values, fps=12)
    source = read_frames(path)
    assert (source.num_frames, source.fps, source.name, source.file_names) == (9, 12.0, "walk", None)
    assert (source.height, source.width) == (24, 32)
    frames = iter(source)  # lazy: frames come one at a time
    first = next(frames)
    assert first.shape == (24, 32, 3) and first.dtype == np.uint8
    decoded = greys([first, *frames])
    assert len(decoded) == 9 and all(abs(g - v) <= 4 for g, v in zip(decoded, values, strict=True))

    strided = read_frames(path, every=2, max_frames=4)
    assert (strided.fps, strided.num_frames) == (6.0, 4)
    assert all(abs(g - v) <= 4 for g, v in zip(greys(strided), [0, 40, 80, 120], strict=True))
    assert len(list(strided)) == 4


@pytest.mark.parametrize("kind", ["missing", "not a video", "no frames"])
def test_an_unreadable_input_is_named_in_one_line(tmp_path: Path, kind: str) -> None:
    path = {"missing": tmp_path / "absent.mp4", "not a video": tmp_path / "broken.mp4",
            "no frames": tmp_path / "empty"}[kind]
    if kind == "not a video":
        path.write_bytes(b"definitely not an mp4 file" * 10)
    if kind == "no frames":
        path.mkdir()
    with pytest.raises(FrameError) as info:
        read_frames(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and isinstance(info.value, ValueError)


def test_impossible_strides_are_refused(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "clip", [0], ["00000.png"])
    with pytest.raises(FrameError, match="every"):
        read_frames(folder, every=0)
    with pytest.raises(FrameError, match="max_frames"):
        read_frames(folder, max_frames=0)
