"""``sambridge track``: every instance of some noun phrases tracked through a video, counted once each.

    sambridge track --checkpoint student.pt --input row.mp4 --text "ripe apple" --out runs/row
    sambridge track --checkpoint student.pt --input frames/ --vocabulary phrases.txt --out runs/clip \\
        --every 2 --max-frames 500 --overlay-format png

--input is a video file (read with PyAV) or a folder of PNG/JPEG frames (sorted by name, one size).
Every frame is detected with the grounding model and associated to the tracks of the frames before
(sambridge.tracking.ConceptTracker); frames are read, tracked and drawn one at a time. With
--sam2-checkpoint (an official SAM2.1 checkpoint of the model's trunk, and --sam2-config naming it),
SAM2's memory encoder and memory attention carry each object from frame to frame and detections
re-prompt it, as SAM3 tracks.

Written into --out (atomically):

  masklets.json          per object: id (unique over the video), phrase, score, and per frame its mask
                         (COCO RLE), box [x, y, w, h], score and area ("sambridge.masklets/1", docs/video.md)
  counts.csv             phrase, unique objects (each object counted once over the video); also printed
  counts_per_frame.csv   frame, then per phrase the objects seen in that frame
  counts.png             the per-frame counts, one line per phrase
  overlay.mp4            the video with each object's mask, box and "<id> <phrase>" drawn, one colour per id
                         (--overlay-format png: overlays/00000.png ...; --no-overlays: none)

Frame indices count the frames tracked (with --every 2, frame 1 is the input's third). Exit code: 0
when the video was tracked, 2 on a user error (a missing or unreadable input, checkpoint or vocabulary).
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipelines.atomic import atomic_write, write_json_atomic
from data_pipelines.convert.common import InputError
from data_pipelines.frames import FrameSource, read_frames
from data_pipelines.video_overlay import draw_tracks, write_png, write_video
from data_pipelines.vocab import command_phrases
from sambridge.inference import load_model
from sambridge.models.memory_propagation import memory_for
from sambridge.parsers import track_parser
from sambridge.tracking import ConceptTracker, FrameTracks, TrackerConfig, TrackResult

MASKLETS_FILE, COUNTS_FILE, PER_FRAME_FILE, PLOT_FILE = ("masklets.json", "counts.csv", "counts_per_frame.csv",
                                                         "counts.png")
VIDEO_FILE, OVERLAYS = "overlay.mp4", "overlays"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is available, else ``cpu``; any other name as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def tracker_config(args: argparse.Namespace) -> TrackerConfig:
    """The ``TrackerConfig`` of :func:`~sambridge.parsers.add_tracker_arguments`' options (its defaults for
    those left out); ``InputError`` on an impossible setting."""
    given = {name: getattr(args, name) for name in ("score_threshold", "birth_threshold", "match_iou", "max_missed",
                                                    "min_hits")}
    try:
        return TrackerConfig(**{k: v for k, v in given.items() if v is not None},
                             exclusive_phrases=args.exclusive_phrases)
    except ValueError as err:
        raise InputError(f"tracker settings: {err}") from err


def _steps(tracker: ConceptTracker, frames: FrameSource, progress: bool) -> Iterator[tuple[np.ndarray, FrameTracks]]:
    """Each frame with the objects the tracker confirms in it, one frame at a time."""
    with tqdm(total=frames.num_frames, unit="frame", desc="track", disable=not progress) as bar:
        for frame in frames:
            yield frame, tracker.step(frame)
            bar.update()


def track_video(tracker: ConceptTracker, frames: FrameSource, out: str | Path, overlay_format: str | None = "mp4",
                progress: bool = True) -> TrackResult:
    """Track ``frames``; overlays (``mp4``: ``out/overlay.mp4``, ``png``: ``out/overlays/NNNNN.png``, ``None``:
    none) are drawn and written as the frames are tracked. Returns the tracker's result."""
    out = Path(out)
    steps = _steps(tracker, frames, progress)
    if overlay_format == "mp4":
        write_video(out / VIDEO_FILE, (draw_tracks(frame, step.objects) for frame, step in steps), frames.fps)
    elif overlay_format == "png":
        for index, (frame, step) in enumerate(steps):
            write_png(out / OVERLAYS / f"{index:05d}.png", draw_tracks(frame, step.objects))
    elif overlay_format is None:
        for _ in steps:
            pass
    else:
        raise ValueError(f"overlay_format must be mp4, png or None, got {overlay_format!r}")
    return tracker.result(video_name=frames.name, fps=frames.fps, file_names=frames.file_names)


def count_table(result: TrackResult) -> str:
    """The unique objects per phrase as an aligned text table."""
    counts = result.unique_counts()
    width = max(len("phrase"), *(len(p) for p in counts))
    return "\n".join([f"{'phrase':<{width}}  unique objects"] + [f"{p:<{width}}  {n}" for p, n in counts.items()])


def _csv(rows: Sequence[Sequence[object]]) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


def plot_counts(path: str | Path, result: TrackResult) -> Path:
    """``counts.png``: objects per frame, one line per phrase (its unique count in the legend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    unique, per_frame = result.unique_counts(), result.per_frame_counts()
    for phrase, counts in per_frame.items():
        ax.step(range(len(counts)), counts, where="mid", label=f"{phrase} ({unique[phrase]} unique)")
    ax.set(xlabel="frame", ylabel="objects in frame", title=f"{result.video_name}: objects per frame")
    ax.set_ylim(0, max([1, *(max(c, default=0) for c in per_frame.values())]) + 0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write(path, buffer.getvalue())


def write_outputs(out: str | Path, result: TrackResult) -> None:
    """``masklets.json``, ``counts.csv``, ``counts_per_frame.csv`` and ``counts.png`` into ``out``."""
    out = Path(out)
    write_json_atomic(out / MASKLETS_FILE, result.to_json())
    atomic_write(out / COUNTS_FILE, _csv([("phrase", "unique_objects"), *result.unique_counts().items()]))
    per_frame = result.per_frame_counts()
    rows = [(t, *(per_frame[p][t] for p in result.phrases)) for t in range(result.num_frames)]
    atomic_write(out / PER_FRAME_FILE, _csv([("frame", *result.phrases), *rows]))
    plot_counts(out / PLOT_FILE, result)


def run(args: argparse.Namespace) -> int:
    """Track ``--input`` into ``--out``; the exit code (see the module docstring)."""
    phrases = command_phrases(args.text, args.vocabulary, "track")
    frames = read_frames(args.input, every=args.every, max_frames=args.max_frames)
    device, out = resolve_device(args.device), Path(args.out)
    config = tracker_config(args)
    if (args.sam2_checkpoint is None) != (args.sam2_config is None):
        raise InputError("--sam2-checkpoint and --sam2-config go together")
    model = load_model(args.checkpoint, map_location=device)
    memory = None
    if args.sam2_checkpoint is not None:
        memory = memory_for(model, args.sam2_config, args.sam2_checkpoint)
    tracker = ConceptTracker(model, phrases, config, propagator=memory, device=device)
    overlay_format = None if args.no_overlays else args.overlay_format
    result = track_video(tracker, frames, out, overlay_format)
    write_outputs(out, result)
    print(count_table(result))
    overlay = {"mp4": f", overlay in {out / VIDEO_FILE}", "png": f", overlays in {out / OVERLAYS}", None: ""}
    print(f"{result.num_frames} frame(s) of {frames.name} tracked: masklets in {out / MASKLETS_FILE}, counts in "
          f"{out / COUNTS_FILE}{overlay[overlay_format]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sambridge track``; returns the exit code."""
    return run(track_parser().parse_args(argv))
