"""The command lines of ``sambridge``'s tool commands, and the names of its training commands.

Only argparse here: no torch, Lightning or model import, so ``sambridge COMMAND --help`` (and a usage
error) answers in well under a second instead of the seven it takes to import them. :mod:`sambridge.cli`
parses a tool command's arguments with its parser here before importing the command's module; the
module's ``main(argv)`` parses with the same parser, setting the defaults it owns (``set_defaults``)
where they are constants of heavy modules, then runs.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from collections.abc import Callable
from pathlib import Path

from data_pipelines.writer import add_sink_arguments

TRAINING_COMMANDS = {
    "fit": "train a model (--config FILE, then --trainer.*, --model.*, --data.* overrides)",
    "validate": "one evaluation epoch over the validation set",
    "test": "one evaluation epoch over the test set",
    "predict": "predict over the predict set (PredictionWriter writes COCO results and overlays)",
}
"""``sambridge``'s LightningCLI subcommands and their one-line help."""

RESUME_HELP = ("--ckpt_path auto resumes from the furthest complete checkpoint of the run (under "
               "--trainer.default_root_dir and the checkpoint callbacks' dirpath), or starts afresh when there is "
               "none; fit under SLURM does so by default (docs/cluster.md).")
"""What the training commands' help says about ``--ckpt_path auto`` (:mod:`sambridge.checkpointing`)."""


def module_doc(module: str) -> str:
    """The docstring of ``module``, read from its source without importing it (which would import torch)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no module {module}")
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""


def evaluate_parser() -> argparse.ArgumentParser:
    """``sambridge evaluate`` (:mod:`sambridge.evaluate`); it sets the defaults of ``--score-threshold`` and
    ``--max-dets`` (SAM3's and COCO's, constants of :mod:`sambridge.metrics`)."""
    parser = argparse.ArgumentParser(
        prog="sambridge evaluate",
        description="SA-Co metrics (cgF1, pmF1, IL_MCC as SAM3 computes them), mask AP, IoU, counting "
                    "error and duplicate rate of COCO-format predictions against SA-Co ground truth.")
    parser.add_argument("--gt", nargs="+", required=True, metavar="GT.json",
                        help="SA-Co ground truth; several files = versions of it (SAM3's oracle evaluation)")
    parser.add_argument("--pred", required=True, metavar="PRED.json", help="COCO results list")
    parser.add_argument("--baseline", metavar="REF.json",
                        help="a second COCO results list on the same queries (a simple heuristic, the untrained or "
                             "pretrained model) scored alongside: metrics and per-phrase table side by side")
    parser.add_argument("--baseline-name", default="baseline", help="column name of --baseline (default baseline)")
    parser.add_argument("--calibration", metavar="calibration.png",
                        help="write a reliability diagram of the detection scores (and of --baseline's)")
    parser.add_argument("--out", metavar="metrics.json", help="write all metrics and settings as JSON")
    parser.add_argument("--per-phrase", metavar="per_phrase.csv",
                        help="write the per-phrase table as CSV, and as Markdown next to it (.md)")
    parser.add_argument("--grid", metavar="queries.png", help="write a PNG of the best and worst queries")
    parser.add_argument("--image-root", metavar="DIR",
                        help="folder the ground truth's file_name paths are in (needed by --grid)")
    parser.add_argument("--grid-queries", type=int, default=4, metavar="K",
                        help="best and worst queries to show in --grid (default 4 each)")
    parser.add_argument("--score-threshold", type=float,
                        help="predictions scoring at least this are detections (default 0.5, as SAM3)")
    parser.add_argument("--max-dets", type=int,
                        help="detections per query that count for AP (default 100, as COCO)")
    return parser


def evaluate_video_parser() -> argparse.ArgumentParser:
    """``sambridge evaluate-video`` (:mod:`sambridge.evaluate_video`)."""
    parser = argparse.ArgumentParser(
        prog="sambridge evaluate-video",
        description="Tracking metrics of masklets JSONs (sambridge track) against YT-VIS ground truth: HOTA "
                    "(sam3's TrackEval), SA-Co/VEval video cgF1 / pmF1 / IL_MCC (sam3), ID switches, IDF1, MOTA "
                    "(py-motmetrics) and counting error, overall and per phrase.")
    parser.add_argument("--gt", required=True, metavar="ground_truth.json",
                        help="YT-VIS ground truth with SA-Co/VEval's video_np_pairs (one category per phrase)")
    parser.add_argument("--pred", nargs="+", required=True, metavar="masklets.json",
                        help="masklets JSONs written by sambridge track, each naming its video by video.name")
    parser.add_argument("--out", metavar="evaluation.json", help="write every metric, overall and per phrase, as JSON")
    parser.add_argument("--score-threshold", type=float, default=0.0,
                        help="leave out masklets whose score is below this (default 0: every masklet, as the "
                             "tracker counts them; SA-Co/VEval uses 0.5 on SAM3's scores)")
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def export_parser() -> argparse.ArgumentParser:
    """``sambridge export`` (:mod:`sambridge.export`; ``--format onnx``: :mod:`sambridge.onnx_export`, which
    sets the defaults of ``--top-k`` and ``--opset``)."""
    parser = argparse.ArgumentParser(prog="sambridge export",
                                     description=module_doc("sambridge.export").split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="Lightning checkpoint (.ckpt) of a training run; --format onnx: also a student file")
    parser.add_argument(
        "--out", required=True, help="student file: .safetensors, or a torch.save file such as student.pt; "
                                     "--format onnx: the .onnx file (its description goes to OUT.json)"
    )
    parser.add_argument("--format", choices=("student", "onnx"), default="student",
                        help="student: a standalone student file (default); onnx: the image encoder and head "
                             "with a fixed vocabulary baked in, for onnxruntime or TensorRT")
    parser.add_argument("--adapters-only", action="store_true",
                        help="LoRA runs: write only the adapters + head (.safetensors) for load_adapters")
    onnx = parser.add_argument_group("--format onnx")
    onnx.add_argument("--text", action="append", default=[], help="noun phrase of the vocabulary (repeatable)")
    onnx.add_argument("--vocabulary", metavar="FILE",
                      help="phrases, one a line ('#' comments; data_pipelines.vocab format), after any --text")
    onnx.add_argument("--top-k", type=positive_int, help="detections per (image, phrase) (default 20)")
    onnx.add_argument("--opset", type=positive_int, help="ONNX opset (default 18)")
    onnx.add_argument("--batch", type=positive_int, metavar="N",
                      help="fixed batch size (default: dynamic batch)")
    onnx.add_argument("--masks", choices=("head", "sam2"),
                      help="mask logits of the grounding head (default) or of SAM2's mask decoder prompted with "
                           "every top-K box (stride 4; in the graph)")
    return parser


def segment_parser() -> argparse.ArgumentParser:
    """``sambridge segment`` (:mod:`sambridge.segment`, whose docstring is the description); it sets the
    default of ``--device``."""
    parser = argparse.ArgumentParser(prog="sambridge segment", description=module_doc("sambridge.segment"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt or student file (sambridge export)")
    parser.add_argument("--input", required=True,
                        help="an image file, a folder of images (searched recursively), or shards: a .tar, "
                             "a brace pattern or a folder of .tar files")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (a rerun resumes it)")
    parser.add_argument("--text", action="append", default=[], help="noun phrase (repeat for several)")
    parser.add_argument("--vocabulary", metavar="FILE",
                        help="phrases, one a line ('#' comments; data_pipelines.vocab format)")
    parser.add_argument("--overlays", action="store_true", help="also draw overlays/<image>.png")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score (match x presence)")
    parser.add_argument("--top-k", type=int, default=100, help="instances per phrase at most (per tile)")
    parser.add_argument("--masks", choices=("auto", "sam2", "head"), default="auto",
                        help="instance masks from SAM2's decoder given the boxes, or the grounding head's own "
                             "(auto: what the checkpoint's run validated with)")
    parser.add_argument("--nms-iou", type=float, default=None,
                        help="drop detections overlapping a higher-scoring one by box IoU above this")
    parser.add_argument("--tile", type=int, default=0, help="tile size for large images (0: whole image)")
    parser.add_argument("--overlap", type=int, default=256, help="tile overlap in pixels")
    parser.add_argument("--batch-size", type=int, default=4, help="whole images per forward (not tiles)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    return parser


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def add_tracker_arguments(parser: argparse.ArgumentParser) -> None:
    """The tracker's settings (``sambridge track``, ``sambridge demo-video``); left out, the defaults of
    ``sambridge.tracking.TrackerConfig`` apply."""
    parser.add_argument("--score-threshold", type=unit_float,
                        help="detections scoring at least this keep objects going (default 0.5)")
    parser.add_argument("--birth-threshold", type=unit_float,
                        help="detections scoring at least this can start a new object; weaker ones only continue "
                             "one (default: the score threshold)")
    parser.add_argument("--exclusive-phrases", action="store_true",
                        help="each object answers one phrase at most: one track per object whichever phrase detects "
                             "it, its phrase the one detected most (not for nested phrases: apple / red apple)")
    parser.add_argument("--match-iou", type=unit_float,
                        help="least association score (mask IoU, centre proximity, containment) of a detection and "
                             "a track (default 0.3)")
    parser.add_argument("--max-missed", type=non_negative_int,
                        help="frames a track may go undetected before it ends (default 5)")
    parser.add_argument("--min-hits", type=positive_int,
                        help="detections in a row that confirm a new object (default 3)")


def track_parser() -> argparse.ArgumentParser:
    """``sambridge track`` (:mod:`sambridge.track`, whose docstring is the description)."""
    parser = argparse.ArgumentParser(prog="sambridge track", description=module_doc("sambridge.track"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt or student file (sambridge export)")
    parser.add_argument("--input", required=True, metavar="VIDEO_OR_FRAME_DIR",
                        help="a video file, or a folder of PNG/JPEG frames (sorted by name, one size)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--text", action="append", default=[], help="noun phrase (repeat for several)")
    parser.add_argument("--vocabulary", metavar="FILE",
                        help="phrases, one a line ('#' comments; data_pipelines.vocab format)")
    add_tracker_arguments(parser)
    parser.add_argument("--sam2-checkpoint", metavar="FILE",
                        help="official SAM2 checkpoint whose memory carries objects between detections "
                             "(default: none; tracks move at their velocity between detections)")
    parser.add_argument("--sam2-config", choices=("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+",
                                                  "sam2.1_hiera_l"),
                        help="the SAM2 architecture of --sam2-checkpoint (the model's own trunk)")
    parser.add_argument("--every", type=positive_int, default=1, metavar="N",
                        help="track every N-th frame of the input (default 1: all)")
    parser.add_argument("--max-frames", type=positive_int, metavar="N", help="track N frames at most")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-overlays", action="store_true", help="write no overlay video or frames")
    parser.add_argument("--overlay-format", choices=("mp4", "png"), default="mp4",
                        help="overlay.mp4 (default) or overlays/00000.png ...")
    return parser


def demo_parser() -> argparse.ArgumentParser:
    """``sambridge demo`` (:mod:`sambridge.demo`); it sets the default of ``--config``."""
    parser = argparse.ArgumentParser(prog="sambridge demo", description=module_doc("sambridge.demo"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training config (default configs/demo/grounding_tiny.yaml)")
    parser.add_argument("--data", default="data/synthetic_demo", help="synthetic shard directory")
    parser.add_argument("--out", default="runs/demo", help="run directory")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's trainer.max_steps")
    parser.add_argument("--num-train", type=int, default=2000, help="synthetic training images (if generated)")
    parser.add_argument("--overlays", type=int, default=12, help="held-out overlay PNGs to write")
    parser.add_argument("--overlay-threshold", type=float, default=0.5,
                        help="draw detections scoring at least this (SAM3's threshold, the one cgF1 uses)")
    return parser


def demo_video_parser() -> argparse.ArgumentParser:
    """``sambridge demo-video`` (:mod:`sambridge.demo_video`)."""
    parser = argparse.ArgumentParser(prog="sambridge demo-video", description=module_doc("sambridge.demo_video"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo/checkpoints/last.ckpt",
                        help="the grounding model to track with (default: what `make demo` trained)")
    parser.add_argument("--data", default="data/video_demo", help="generated clips (made if missing)")
    parser.add_argument("--out", default="runs/demo_video", help="output folder")
    parser.add_argument("--clips", type=positive_int, default=4, help="clips to generate (if generated)")
    parser.add_argument("--frames", type=positive_int, default=48, help="frames per clip (if generated)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated clips (if generated)")
    add_tracker_arguments(parser)
    return parser


def pseudo_label_parser() -> argparse.ArgumentParser:
    """``sambridge pseudo-label`` (:mod:`sambridge.pseudo_label`, whose docstring is the description); it
    sets the defaults of the labelling thresholds (``LabelSettings``) and of ``--device``."""
    parser = argparse.ArgumentParser(prog="sambridge pseudo-label", description=module_doc("sambridge.pseudo_label"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True,
                        help="official sam3.pt, or a sambridge training checkpoint of a SAM3 teacher")
    parser.add_argument("--model", default=None,
                        help="registered teacher to build for an official checkpoint (default: sam3_image)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images, searched recursively")
    source.add_argument("--shards", help="existing shards: a directory, brace pattern or URL pattern")
    parser.add_argument("--vocabulary", nargs="+", default=[],
                        help="vocabulary file(s) whose canonical phrases every image is asked")
    parser.add_argument("--keep-labels", action="store_true",
                        help="shard input: queries the input annotates keep their own instances")
    parser.add_argument("--source", help="image folders: dataset label (default: images:<folder name>)")
    parser.add_argument("--score-threshold", type=float,
                        help="detections scoring at least this become instances (SAM3's own: 0.5)")
    parser.add_argument("--uncertain-score", type=float,
                        help="a detection scoring between this and --score-threshold makes its query "
                             "non-exhaustive")
    parser.add_argument("--presence-threshold", type=float,
                        help="a query without instances is an exhaustive negative below this presence")
    parser.add_argument("--top-k", type=int, help="soft-target detections per query")
    parser.add_argument("--mask-size", type=int, help="side of the soft targets' mask logits")
    parser.add_argument("--pooled-features", action="store_true",
                        help="also cache each query's pooled fusion-encoder features (offline distill.pooled_*)")
    parser.add_argument("--canvas-size", type=int,
                        help="square canvas side (default: the teacher's input size)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per teacher forward")
    parser.add_argument("--query-chunk", type=int, default=16, help="queries per head call (memory)")
    parser.add_argument("--device", help="device of the teacher (default: cuda if available)")
    add_sink_arguments(parser, default_prefix="pseudo")
    return parser


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "evaluate": evaluate_parser,
    "evaluate-video": evaluate_video_parser,
    "export": export_parser,
    "demo": demo_parser,
    "demo-video": demo_video_parser,
    "pseudo-label": pseudo_label_parser,
    "segment": segment_parser,
    "track": track_parser,
}
"""Tool command -> its parser (``sambridge data`` has its own light dispatcher, :mod:`data_pipelines.cli`)."""
