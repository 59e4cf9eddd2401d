#!/usr/bin/env python
"""Streaming tracking: memory and speed over a long clip. Prints a table and JSON.

    python scripts/bench_video.py                        # 1,000 frames, tiny model, SAM2 memory (CPU)
    python scripts/bench_video.py --no-memory --json bench_video.json
    python scripts/bench_video.py --smoke                # seconds: 60 frames

A tiny Grounded SAM2 (random weights, 128 px) encodes and grounds every frame, as ``sambridge track``
does; its detections are replaced by the true masks of the clip's objects (an oracle detector), so
the same objects stay tracked for the whole clip and every track's SAM2 memory (random tiny SAM2.1
memory weights, the real modules) fills its window and keeps rolling (a
detection re-prompts it every ``--reprompt-every`` frames). The objects swing left and
right, each in its own band. The process's resident memory is sampled every ``--sample-every`` frames:
once the memory window is full (``MemoryPropagator.window`` frames) it should stay flat; what still
grows is the tracker's output (one RLE per object and frame), reported apart. Compare the growth
after the window against the whole resident size; frames/s is the steady rate after the first sample.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SIZE = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--objects", type=int, default=3, help="objects in every frame")
    parser.add_argument("--sample-every", type=int, default=50, help="frames between memory samples")
    parser.add_argument("--reprompt-every", type=int, default=25,
                        help="frames between re-prompts of a track's memory by its detection (1: every frame, so "
                             "the memory holds only the latest prompts)")
    parser.add_argument("--no-memory", action="store_true", help="track without SAM2's memory (velocity only)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="seconds: 60 frames, a sample every 10")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.frames, args.sample_every = 60, 10
    return args


def clip_frame(t: int, objects: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Frame ``t``: ``objects`` coloured squares swinging left and right, each in its own band, and their masks."""
    rng = np.random.default_rng(t)
    frame = (rng.random((SIZE, SIZE, 3)) * 60 + 60).astype(np.uint8)
    band = SIZE // objects
    masks = []
    for i in range(objects):
        cx = SIZE / 2 + 40 * math.sin(2 * math.pi * t / 100 + i)
        cy = band * i + band / 2
        mask = np.zeros((SIZE, SIZE), bool)
        mask[int(cy) - 8:int(cy) + 8, int(cx) - 8:int(cx) + 8] = True
        masks.append(mask)
        frame[mask] = (200, 40 + 60 * i, 40)
    return frame, masks


class OracleDetector(nn.Module):
    """The tiny Grounded SAM2 encodes and grounds each frame (the real cost); its detections are replaced by
    the true masks given in ``truth`` before each step, so the tracked objects are the clip's own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.truth = model, []
        self.image_size, self.prompt_decoder = model.image_size, model.prompt_decoder

    def encode_images(self, images):
        return self.model.encode_images(images)

    def ground(self, features, phrases, query_image):
        return self.model.ground(features, phrases, query_image)

    def postprocess(self, out, top_k, score_threshold, out_hw):
        masks = torch.stack([torch.from_numpy(m) for m in self.truth])[None]
        keep = masks.flatten(2).any(-1)
        return {"masks": masks, "keep": keep, "scores": keep.float() * 0.9}


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def output_mib(tracker) -> float:
    """The tracker's output so far (masklets' RLE, boxes, scores), as JSON text."""
    masklets = tracker.finished + [t.masklet for t in tracker.tracks if t.confirmed]
    return sum(len(json.dumps(m.to_json())) for m in masklets) / 2**20


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))
    from sambridge.models import create_model
    from sambridge.models.memory_propagation import memory_for
    from sambridge.models.sam2_builder import SAM2_TINY_OVERRIDES, build_sam2
    from sambridge.tracking import ConceptTracker, TrackerConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    detector = OracleDetector(create_model("grounded_sam2_tiny"))
    memory = None
    if not args.no_memory:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(tmp) / "sam2_tiny.pt"
            torch.save({"model": build_sam2("sam2.1_hiera_t", SIZE, overrides=SAM2_TINY_OVERRIDES).state_dict()},
                       checkpoint)
            memory = memory_for(detector, "sam2.1_hiera_t", checkpoint, SAM2_TINY_OVERRIDES)
    config = TrackerConfig(min_hits=1, reprompt_every=args.reprompt_every)
    tracker = ConceptTracker(detector, ["object"], config, propagator=memory)
    samples, start = [], time.perf_counter()
    for t in range(args.frames):
        frame, detector.truth = clip_frame(t, args.objects)
        tracker.step(frame)
        if (t + 1) % args.sample_every == 0 or t + 1 == args.frames:
            gc.collect()
            stored = max((memory.stored_frames(k) for k in memory.states), default=0) if memory else 0
            samples.append({"frame": t + 1, "seconds": round(time.perf_counter() - start, 2),
                            "rss_mib": round(rss_mib(), 1), "peak_mib": round(peak_mib(), 1),
                            "output_mib": round(output_mib(tracker), 3), "memory_frames_per_object": stored})
            print(f"frame {t + 1}/{args.frames}: rss {samples[-1]['rss_mib']} MiB", file=sys.stderr, flush=True)
    result = tracker.result()
    window = memory.window if memory else 0
    after = [s for s in samples if s["frame"] > window + args.sample_every] or samples[-1:]
    first, last = after[0], after[-1]
    growth = last["rss_mib"] - first["rss_mib"]
    span = max(1, last["frame"] - first["frame"])
    steady = (last["frame"] - samples[0]["frame"]) / max(1e-9, last["seconds"] - samples[0]["seconds"])
    return {
        "frames": args.frames, "objects": args.objects, "memory": memory is not None, "memory_window": window,
        "tracks": len(result.masklets), "samples": samples,
        "rss_after_window_mib": first["rss_mib"], "rss_end_mib": last["rss_mib"],
        "rss_growth_after_window_mib": round(growth, 1),
        "rss_growth_per_100_frames_mib": round(growth * 100 / span, 2),
        "output_growth_mib": round(last["output_mib"] - first["output_mib"], 3),
        "peak_mib": last["peak_mib"], "frames_per_s": round(steady, 2),
        "torch": torch.__version__, "threads": args.threads,
    }


def table(result: dict) -> str:
    lines = ["| frame | seconds | RSS MiB | peak MiB | output MiB | memory frames / object |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s['frame']} | {s['seconds']} | {s['rss_mib']} | {s['peak_mib']} | {s['output_mib']} | "
              f"{s['memory_frames_per_object']} |" for s in result["samples"]]
    lines.append("")
    lines.append(f"{result['frames']} frames, {result['objects']} objects, {result['tracks']} track(s), SAM2 memory "
                 f"{'on (window ' + str(result['memory_window']) + ' frames)' if result['memory'] else 'off'}: "
                 f"RSS {result['rss_after_window_mib']} -> {result['rss_end_mib']} MiB after the window "
                 f"({result['rss_growth_per_100_frames_mib']} MiB per 100 frames; output "
                 f"+{result['output_growth_mib']} MiB), {result['frames_per_s']} frames/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
