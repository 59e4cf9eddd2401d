"""``make demo-video`` / ``sambridge demo-video``: track and count the image demo's concepts in generated clips.

1. generates moving-shapes clips (``data/video_demo``: the image demo's shapes and colours entering,
   leaving and crossing; ``python -m data_pipelines synthetic-video``) if they are missing;
2. tracks every phrase asked of each clip with the grounding model ``make demo`` trained
   (``runs/demo/checkpoints/last.ckpt``), writing per clip ``overlay.mp4``, ``masklets.json``,
   ``counts.csv``, ``counts_per_frame.csv`` and ``counts.png`` (``sambridge track``'s outputs);
3. scores the masklets against the clips' ground truth (``sambridge evaluate-video``: HOTA, ID
   switches, counting error) and writes ``evaluation.json`` and ``summary.md`` (a count table: per
   clip and phrase, the objects in the clip against the objects tracked);
4. does the same with a perfect detector (the clips' own masks, ``sambridge.tracking.ClipDetector``)
   in place of the model: the tracker's own share of the errors, side by side in ``summary.md``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from data_pipelines.atomic import atomic_write, write_json_atomic
from data_pipelines.convert.common import InputError
from sambridge.parsers import demo_video_parser

SUMMARY_METRICS = ("HOTA", "DetA", "AssA", "IDSW", "IDSW_per_100", "IDF1", "MOTA", "gt_count", "pred_count",
                   "count_rel_error", "frame_count_mae")


def ensure_clips(data_dir: Path, clips: int, frames: int, seed: int) -> None:
    """Generate the clips unless ``data_dir`` holds a complete set (its ground truth is written last)."""
    from data_pipelines.synthetic_video import VideoConfig, generate_clips

    if (data_dir / "ground_truth.json").exists():
        print(f"using video clips in {data_dir}")
        return
    try:
        config = VideoConfig(frames=frames)
    except ValueError as err:
        raise InputError(f"--frames: {err}") from err
    print(f"generating {clips} clips of {frames} frames in {data_dir} ...")
    generate_clips(data_dir, config, clips=clips, seed=seed, overwrite=True, progress=True)


def count_rows(truth: dict, results: dict, perfect: dict) -> list[tuple[str, str, int, int, int]]:
    """(clip, phrase, objects in the clip, objects tracked, objects tracked from perfect detections) for every
    phrase asked of every clip."""
    categories = {c["id"]: c["name"] for c in truth["categories"]}
    videos = {v["id"]: v["name"] for v in truth["videos"]}
    objects: dict[tuple[str, str], set] = {}
    for ann in truth["annotations"]:
        if any(s is not None for s in ann["segmentations"]):
            objects.setdefault((videos[ann["video_id"]], categories[ann["category_id"]]), set()).add(ann["object_id"])
    rows = []
    for pair in truth["video_np_pairs"]:
        clip, phrase = videos[pair["video_id"]], categories[pair["category_id"]]
        rows.append((clip, phrase, len(objects.get((clip, phrase), ())), results[clip].unique_counts()[phrase],
                     perfect[clip].unique_counts()[phrase]))
    return sorted(rows)


def summary_markdown(rows: list[tuple[str, str, int, int, int]], model: dict[str, float], perfect: dict[str, float],
                     seconds: float, frames: int) -> str:
    lines = ["# sambridge video demo", "", "## Unique objects per clip and phrase", "",
             "| clip | phrase | in the clip | tracked | tracked, perfect detector |", "|---|---|---|---|---|"]
    lines += [f"| {clip} | {phrase} | {gt} | {pred} | {ideal} |" for clip, phrase, gt, pred, ideal in rows]
    totals = [sum(r[i] for r in rows) for i in (2, 3, 4)]
    lines += ["| **all** | | " + " | ".join(f"**{n}**" for n in totals) + " |", "", "## Tracking metrics", "",
              "| metric | model | perfect detector (the tracker alone) |", "|---|---|---|"]
    lines += [f"| {k} | {model[k]:.3f} | {perfect[k]:.3f} |" for k in SUMMARY_METRICS if k in model and k in perfect]
    lines += ["", f"{frames} frames tracked in {seconds:.0f} s ({frames / max(seconds, 1e-9):.1f} frames/s)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the video demo; returns the exit code."""
    args = demo_video_parser().parse_args(argv)
    checkpoint, data_dir, out = Path(args.checkpoint), Path(args.data), Path(args.out)
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: no such checkpoint; run `make demo` first (it trains the grounding model "
                         "this demo tracks with), or pass --checkpoint")
    # lazy: parse (and answer --help) before loading the models
    from data_pipelines.frames import read_frames
    from data_pipelines.video import iter_clips
    from sambridge.evaluate_video import evaluate_video_files, read_json
    from sambridge.inference import load_model
    from sambridge.metrics.video import evaluate_video
    from sambridge.track import MASKLETS_FILE, count_table, track_video, tracker_config, write_outputs
    from sambridge.tracking import ClipDetector, ConceptTracker

    config = tracker_config(args)
    ensure_clips(data_dir, args.clips, args.frames, args.seed)
    truth = read_json(data_dir / "ground_truth.json")
    categories = {c["id"]: c["name"] for c in truth["categories"]}
    phrases = {v["id"]: [] for v in truth["videos"]}
    for pair in truth["video_np_pairs"]:
        phrases[pair["video_id"]].append(categories[pair["category_id"]])
    model = load_model(str(checkpoint), map_location="cpu")
    results, start, frames = {}, time.time(), 0
    for video in truth["videos"]:
        clip = video["name"]
        tracker = ConceptTracker(model, phrases[video["id"]], config)
        result = track_video(tracker, read_frames(data_dir / "frames" / clip), out / clip, overlay_format="mp4")
        write_outputs(out / clip, result)
        results[clip], frames = result, frames + result.num_frames
        print(f"{clip}:\n{count_table(result)}")
    seconds = time.time() - start
    evaluation = evaluate_video_files(data_dir / "ground_truth.json", [out / c / MASKLETS_FILE for c in results])
    perfect = {}
    for clip in iter_clips(data_dir / "shards"):
        tracker = ConceptTracker(ClipDetector(clip), clip.phrases, config)
        for t in range(clip.num_frames):
            tracker.step(clip.frame(t))
        perfect[clip.key] = tracker.result(video_name=clip.key)
    ceiling = evaluate_video(truth, [r.to_json() for r in perfect.values()])
    write_json_atomic(out / "evaluation.json", {**evaluation.to_json(), "tracker": vars(config),
                                                "perfect_detector": ceiling.to_json()}, indent=2)
    rows = count_rows(truth, results, perfect)
    atomic_write(out / "summary.md", summary_markdown(rows, evaluation.summary, ceiling.summary, seconds, frames))
    print(f"\n{evaluation.table()}\n")
    total_gt, total_pred, total_ideal = (sum(r[i] for r in rows) for i in (2, 3, 4))
    print(f"{len(results)} clips, {frames} frames tracked in {seconds:.0f} s: {total_gt} objects in the clips, "
          f"{total_pred} tracked ({total_ideal} from perfect detections: HOTA {ceiling.summary.get('HOTA', 0):.3f}, "
          f"ID switches per 100 object-frames {ceiling.summary['IDSW_per_100']:.2f}). Overlays: "
          f"{out}/<clip>/overlay.mp4; count table: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
