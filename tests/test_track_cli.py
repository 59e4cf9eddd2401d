"""``sambridge track``: overlay videos (readable, every frame, colours fixed per track id), the count files,
and the command end to end on a tiny student: masklets.json, counts, plot and overlays; user errors in
one line with exit code 2."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from run_helpers import exit_code

from data_pipelines.frames import read_frames
from data_pipelines.overlay import colour
from data_pipelines.video_overlay import draw_tracks, outline, track_colour, write_video
from sambridge.cli import main
from sambridge.track import COUNTS_FILE, MASKLETS_FILE, PER_FRAME_FILE, PLOT_FILE, VIDEO_FILE, write_outputs
from sambridge.tracking import Masklet, TrackedObject, TrackResult

PHRASES = ("red circle", "star")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def square(height: int, width: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def tracked(track_id: int, mask: np.ndarray, phrase: str = "red circle") -> TrackedObject:
    ys, xs = np.nonzero(mask)
    return TrackedObject(track_id, phrase, mask, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), 0.9)


def count_frames(path: Path) -> tuple[int, int, int]:
    """Frames decoded from a video file, and its (height, width)."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), *frames[0].shape[:2]


# ----------------------------------------------------------------------------------------------
# overlays
# ----------------------------------------------------------------------------------------------
def test_the_overlay_writer_writes_every_frame_at_an_even_size(tmp_path: Path) -> None:
    frames = (np.full((45, 61, 3), 12 * i, dtype=np.uint8) for i in range(7))  # a generator: streamed
    path = tmp_path / "out" / "overlay.mp4"
    assert write_video(path, frames, fps=5.0) == 7
    assert count_frames(path) == (7, 46, 62)
    with av.open(str(path)) as container:
        assert float(container.streams.video[0].average_rate) == 5.0
    assert [p.name for p in path.parent.iterdir()] == ["overlay.mp4"]  # no temporary left


def test_the_overlay_writer_leaves_no_file_when_the_frames_fail(tmp_path: Path) -> None:
    def frames():
        yield np.zeros((16, 16, 3), dtype=np.uint8)
        raise RuntimeError("tracking failed")

    with pytest.raises(RuntimeError, match="tracking failed"):
        write_video(tmp_path / "overlay.mp4", frames())
    assert list(tmp_path.iterdir()) == []


def test_outline_is_the_boundary_of_a_mask() -> None:
    mask = square(9, 9, 2, 2, 5)
    edge = outline(mask)
    assert edge.sum() == 16 and not edge[3:6, 3:6].any() and (edge <= mask).all()


def test_a_track_keeps_its_colour_wherever_it_is_and_ids_differ() -> None:
    background = np.zeros((96, 128, 3), dtype=np.uint8)  # drawn 4x (draw_detections' minimum size 384)
    first = draw_tracks(background, [tracked(3, square(96, 128, 10, 10, 20)), tracked(4, square(96, 128, 60, 90, 20))])
    later = draw_tracks(background, [tracked(4, square(96, 128, 10, 60, 20)), tracked(3, square(96, 128, 50, 20, 20))])
    assert first.shape == later.shape == (384, 512, 3)
    # the bottom outline row of each square (away from its label, at the top), then its interior blend
    assert tuple(first[4 * 29 + 1, 4 * 20]) == tuple(later[4 * 69 + 1, 4 * 30]) == track_colour(3)
    assert tuple(first[4 * 79 + 1, 4 * 100]) == tuple(later[4 * 29 + 1, 4 * 70]) == track_colour(4)
    assert tuple(first[4 * 22, 4 * 20]) == tuple(later[4 * 62, 4 * 30]) != tuple(first[4 * 72, 4 * 100])
    assert track_colour(3) != track_colour(4) and track_colour(3) == colour(3)
    assert tuple(first[4 * 45, 4 * 60]) == (0, 0, 0)  # no object there: the frame as it was


# ----------------------------------------------------------------------------------------------
# count files
# ----------------------------------------------------------------------------------------------
def test_the_count_files_hold_unique_and_per_frame_counts(tmp_path: Path) -> None:
    masklets = [Masklet(1, "red circle", 4), Masklet(2, "red circle", 4), Masklet(3, "star", 4)]
    for masklet, frames in zip(masklets, ([0, 1, 2], [2, 3], [1]), strict=True):
        for t in frames:
            masklet.add(t, square(20, 30, 2, 2 + t, 5), 0.8)
    result = TrackResult(list(PHRASES) + ["leaf"], 20, 30, 4, masklets, video_name="clip")
    write_outputs(tmp_path, result)
    assert list(csv.reader((tmp_path / COUNTS_FILE).open())) == [
        ["phrase", "unique_objects"], ["red circle", "2"], ["star", "1"], ["leaf", "0"]]
    assert list(csv.reader((tmp_path / PER_FRAME_FILE).open())) == [
        ["frame", "red circle", "star", "leaf"], ["0", "1", "0", "0"], ["1", "1", "1", "0"], ["2", "2", "0", "0"],
        ["3", "1", "0", "0"]]
    back = TrackResult.from_json(json.loads((tmp_path / MASKLETS_FILE).read_text()))
    assert back.unique_counts() == {"red circle": 2, "star": 1, "leaf": 0}
    assert (tmp_path / PLOT_FILE).read_bytes().startswith(PNG_MAGIC)


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
def write_clip(folder: Path, count: int, height: int = 45, width: int = 61) -> Path:
    """Frames of a red square moving right on a textured background."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    background = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    for t in range(count):
        image = background.copy()
        image[10:26, 4 + 3 * t:20 + 3 * t] = (220, 30, 30)
        Image.fromarray(image).save(folder / f"{t:05d}.png")
    return folder


def track(student: Path, source: Path, out: Path, *extra: str) -> int:
    """``sambridge track`` in this process (every detection tracked); its exit code."""
    argv = ["track", "--checkpoint", str(student), "--input", str(source), "--out", str(out), "--device", "cpu",
            "--score-threshold", "0", "--min-hits", "1", *[a for p in PHRASES for a in ("--text", p)], *extra]
    return exit_code(argv)


def test_track_writes_masklets_counts_plot_and_overlay_video(student: Path, tmp_path: Path, capsys) -> None:
    clip = write_clip(tmp_path / "clip", 5)
    assert track(student, clip, tmp_path / "out") == 0
    out = tmp_path / "out"
    data = json.loads((out / MASKLETS_FILE).read_text())
    assert data["format"] == "sambridge.masklets/1" and data["phrases"] == list(PHRASES)
    assert data["video"] == {"name": "clip", "height": 45, "width": 61, "num_frames": 5, "fps": None,
                             "file_names": [f"{t:05d}.png" for t in range(5)]}
    assert data["masklets"], "an untrained model at threshold 0 detects something"
    ids = [m["id"] for m in data["masklets"]]
    assert len(set(ids)) == len(ids) and all(len(m["segmentations"]) == 5 for m in data["masklets"])
    unique = {p: sum(m["phrase"] == p for m in data["masklets"]) for p in PHRASES}
    rows = list(csv.reader((out / COUNTS_FILE).open()))
    assert rows == [["phrase", "unique_objects"], *[[p, str(n)] for p, n in unique.items()]]
    per_frame = list(csv.reader((out / PER_FRAME_FILE).open()))
    assert len(per_frame) == 6 and per_frame[0] == ["frame", *PHRASES]
    assert (out / PLOT_FILE).read_bytes().startswith(PNG_MAGIC)
    frames, height, width = count_frames(out / VIDEO_FILE)
    assert frames == 5 and height % 2 == 0 and width % 2 == 0
    printed = capsys.readouterr().out
    assert all(re.search(rf"^{p} +{n}$", printed, re.MULTILINE) for p, n in unique.items()), printed


def test_track_reads_a_video_with_a_stride_and_writes_png_overlays(student: Path, tmp_path: Path) -> None:
    video = tmp_path / "row.mp4"
    write_video(video, read_frames(write_clip(tmp_path / "clip", 8)), fps=8.0)
    out = tmp_path / "out"
    assert track(student, video, out, "--every", "2", "--max-frames", "3", "--overlay-format", "png") == 0
    data = json.loads((out / MASKLETS_FILE).read_text())
    assert data["video"]["num_frames"] == 3 and data["video"]["fps"] == 4.0 and data["video"]["name"] == "row"
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert not (out / VIDEO_FILE).exists()


@pytest.mark.parametrize("problem", ["missing input", "missing checkpoint", "bad setting"])
def test_a_user_error_is_one_line_and_exit_code_2(student: Path, tmp_path: Path, capsys, problem: str) -> None:
    clip = write_clip(tmp_path / "clip", 2)
    source, checkpoint, extra = clip, student, ()
    if problem == "missing input":
        source = tmp_path / "absent.mp4"
    elif problem == "missing checkpoint":
        checkpoint = tmp_path / "absent.pt"
    else:
        extra = ("--match-iou", "0")
    assert track(checkpoint, source, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert {"missing input": "absent.mp4", "missing checkpoint": "absent.pt", "bad setting": "match_iou"}[problem] \
        in err[0]
    assert not (tmp_path / "out" / MASKLETS_FILE).exists()


# ----------------------------------------------------------------------------------------------
# the video demo
# ----------------------------------------------------------------------------------------------
def test_demo_video_tracks_generated_clips_and_writes_overlays_counts_and_metrics(student: Path, tmp_path: Path,
                                                                                  capsys) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    main(["demo-video", "--checkpoint", str(student), "--data", str(data), "--out", str(out), "--clips", "2",
          "--frames", "16"])
    truth = json.loads((data / "ground_truth.json").read_text())
    assert [v["name"] for v in truth["videos"]] == ["clip-000000", "clip-000001"]
    for clip in ("clip-000000", "clip-000001"):
        assert count_frames(out / clip / VIDEO_FILE)[0] == 16
        assert json.loads((out / clip / MASKLETS_FILE).read_text())["video"]["name"] == clip
    summary = (out / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| clip-")]
    assert len(rows) == len(truth["video_np_pairs"])  # one row per phrase asked of each clip
    objects = sum(len({a["object_id"] for a in truth["annotations"] if a["video_id"] == v["id"]})
                  for v in truth["videos"])
    assert f"| **all** | | **{objects}** |" in summary
    assert "| HOTA |" in summary and "perfect detector" in summary
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["summary"]["gt_count"] == objects and "HOTA" in evaluation["summary"]
    assert evaluation["perfect_detector"]["summary"]["gt_count"] == objects
    assert "objects in the clips" in capsys.readouterr().out


def test_demo_video_without_a_trained_model_says_to_run_make_demo(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["demo-video", "--checkpoint", str(tmp_path / "last.ckpt"), "--data", str(tmp_path / "data")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make demo" in err[0] and "last.ckpt" in err[0]
    assert not (tmp_path / "data").exists()


def test_track_help_states_the_tracker_defaults() -> None:
    from sambridge.parsers import track_parser
    from sambridge.tracking import TrackerConfig

    config, helps = TrackerConfig(), {action.dest: action.help for action in track_parser()._actions}
    for name in ("score_threshold", "match_iou", "max_missed", "min_hits"):
        assert f"(default {getattr(config, name)})" in helps[name], name
    assert config.birth_threshold is None and "(default: the score threshold)" in helps["birth_threshold"]
