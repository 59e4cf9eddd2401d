#!/usr/bin/env python
"""Agriculture recipe 2 end to end on a CPU, in minutes: no labels -> pseudo-labels -> a small student.

    python scripts/agriculture_recipe2.py                       # everything under runs/agriculture_recipe2
    python scripts/agriculture_recipe2.py --teacher runs/agriculture_recipe2/teacher/checkpoints/last.ckpt

The real recipe (``docs/agriculture.md``) pseudo-labels field photographs with SAM3 and distils a
Grounded SAM2 student; this runs the same commands at toy scale, with the tiny SAM3 teacher and
student (``configs/demo/teacher_tiny.yaml``, ``configs/demo/distill_tiny.yaml``) on generated
orchard-like images (``python -m data_pipelines orchard``):

1. data: unlabelled orchard images (train/val) to pseudo-label, labelled test shards (exact masks,
   for evaluation only) and one large field image (with its labels, to check counts);
2. teacher: without ``--teacher``, the tiny SAM3 teacher is trained on separate labelled orchard
   shards: it stands in for SAM3, which knows fruit without that step;
3. pseudo-label the unlabelled images over ``configs/agriculture/vocab/fruit.txt`` (every phrase of
   the vocabulary is asked; the teacher's outputs are cached in the shards);
4. distil the tiny student offline from those shards;
5. export the student (``sambridge export``);
6. evaluate teacher and student per phrase on the labelled test shards (``train.py test`` with the
   prediction writer, ``sambridge evaluate``, ``scripts/compare_per_phrase.py``);
7. segment the large field image in overlapping tiles with the student (``sambridge segment``) and
   compare its counts with the truth.

Each step prints the command it runs, so any step can be repeated by hand. With the default few
hundred steps the tiny teacher has not learnt the fruit yet (it finds little or nothing, and so do
the pseudo-labels and the student): the run shows every stage working, not what SAM3 and a real
student reach. Train the teacher longer (``--teacher-steps``) or reuse one (``--teacher``) for a
teacher that finds fruit.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import webdataset as wds

REPO = Path(__file__).resolve().parents[1]
VOCABULARY = "configs/agriculture/vocab/fruit.txt"
TEACHER_CONFIG = "configs/demo/teacher_tiny.yaml"
STUDENT_CONFIG = "configs/demo/distill_tiny.yaml"
FRUITS = ("ripe apple", "unripe apple", "lemon")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/agriculture_recipe2", help="where everything is written")
    parser.add_argument("--teacher", help="a tiny SAM3 teacher checkpoint (trained with "
                        f"{TEACHER_CONFIG}); default: train one on labelled orchard shards")
    parser.add_argument("--teacher-steps", type=int, default=200, help="teacher training steps")
    parser.add_argument("--student-steps", type=int, default=200, help="student distillation steps")
    parser.add_argument("--num-unlabelled", type=int, default=128, help="unlabelled training images")
    parser.add_argument("--num-test", type=int, default=32, help="labelled test images")
    parser.add_argument("--field-size", type=int, nargs=2, default=[512, 768], metavar=("H", "W"),
                        help="size of the large field image segmented in tiles")
    parser.add_argument("--tile", type=int, default=128, help="tile side for the field image (the canvas size)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate data that already exists")
    return parser


class Steps:
    """Runs commands in the repository root, prints them and records their wall time."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def run(self, step: str, *commands: Sequence[str]) -> None:
        start = time.perf_counter()
        for command in commands:
            print(f"\n[{step}] $ {shlex.join(command)}", flush=True)
            subprocess.run(list(command), cwd=REPO, check=True)
        self.times[step] = self.times.get(step, 0.0) + time.perf_counter() - start


def _orchard(out: Path, num: int, seed: int, *extra: str, shards: bool = False, overwrite: bool = False,
             max_count: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "data_pipelines", "orchard", "--out", str(out), "--num", str(num),
               "--seed", str(seed), "--no-progress", *extra]
    if shards:
        command.append("--shards")
    if max_count:
        command += ["--max-count", str(max_count)]
    return command + (["--overwrite"] if overwrite else [])


def _run_args(root: Path, *, checkpoints: bool = True) -> list[str]:
    """Put a run's logs (and checkpoints) under ``root`` instead of the config's ``runs/...``."""
    args = ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]
    return args + (["--trainer.callbacks.dirpath", str(root / "checkpoints")] if checkpoints else [])


def _student_args(teacher: str) -> list[str]:
    return ["--model.init_args.teacher_checkpoint", teacher, "--model.init_args.mode", "offline",
            "--model.init_args.distill.feature_mse", "0", "--model.init_args.distill.feature_cos", "0"]


def _test_args(config: str, checkpoint: Path | str, test: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "test", "--config", config, "--ckpt_path", str(checkpoint), *extra,
            "--data.init_args.test", str(test), *_run_args(out, checkpoints=False),
            "--trainer.callbacks+=sambridge.callbacks.PredictionWriter", f"--trainer.callbacks.output_dir={out}",
            "--trainer.callbacks.stages=[test]"]


def true_counts(shard_dir: Path) -> Counter:
    """Instances per phrase over a shard set."""
    counts: Counter = Counter()
    for tar in sorted(shard_dir.glob("*.tar")):
        for record in wds.WebDataset(str(tar), shardshuffle=False):
            for query in json.loads(record["json"])["queries"]:
                counts[query["phrase"]] += len(query["instances"])
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out).resolve()
    data = out / "data"
    py = sys.executable
    steps = Steps()
    started = time.perf_counter()
    fresh = args.overwrite or not (data / "test" / "manifest.json").exists()
    height, width = args.field_size
    area = height * width  # fruit and leaves as dense as in the 128 px training images
    field = ["--image-size", str(height), str(width), "--fruit-count", str(area // 3600), str(area // 2400),
             "--leaf-count", str(area // 8000), str(area // 3000)]
    if fresh:
        steps.run("1 data",
                  _orchard(data / "images" / "train", args.num_unlabelled, 1, overwrite=True),
                  _orchard(data / "images" / "val", 16, 2, overwrite=True),
                  _orchard(data / "test", args.num_test, 3, shards=True, overwrite=True),
                  _orchard(data / "field", 1, 4, *field, overwrite=True),
                  _orchard(data / "field_labels", 1, 4, *field, shards=True, overwrite=True))
    teacher = args.teacher
    if teacher is None:
        teacher_dir = out / "teacher"
        steps.run("2 teacher",
                  _orchard(data / "teacher_train", 256, 5, shards=True, overwrite=True, max_count=64),
                  _orchard(data / "teacher_val", 16, 6, shards=True, overwrite=True),
                  [py, "train.py", "fit", "--config", TEACHER_CONFIG,
                   "--data.init_args.train", str(data / "teacher_train"),
                   "--data.init_args.val", str(data / "teacher_val"), "--data.init_args.vocabulary", VOCABULARY,
                   "--trainer.max_steps", str(args.teacher_steps),
                   "--trainer.val_check_interval", str(max(1, args.teacher_steps // 3)), *_run_args(teacher_dir)])
        teacher = str(teacher_dir / "checkpoints" / "last.ckpt")

    pseudo = data / "pseudo"
    label = [py, "-m", "sambridge", "pseudo-label", "--teacher", teacher, "--vocabulary", VOCABULARY,
             "--device", "cpu", "--no-progress", "--overwrite", "--max-count", "32"]
    steps.run("3 pseudo-label",
              [*label, "--images", str(data / "images" / "train"), "--out", str(pseudo / "train")],
              [*label, "--images", str(data / "images" / "val"), "--out", str(pseudo / "val")])

    student_dir = out / "student"
    steps.run("4 distil",
              [py, "train.py", "fit", "--config", STUDENT_CONFIG, *_student_args(teacher),
               "--data.init_args.train", str(pseudo / "train"), "--data.init_args.val", str(pseudo / "val"),
               "--data.init_args.vocabulary", VOCABULARY, "--trainer.max_steps", str(args.student_steps),
               "--trainer.val_check_interval", str(max(1, args.student_steps // 3)), *_run_args(student_dir)])
    student_ckpt = student_dir / "checkpoints" / "last.ckpt"
    student = out / "student.pt"
    steps.run("5 export", [py, "-m", "sambridge", "export", "--checkpoint", str(student_ckpt), "--out", str(student)])

    evaluation = out / "eval"
    steps.run("6 evaluate",
              _test_args(TEACHER_CONFIG, teacher, data / "test", evaluation / "teacher"),
              _test_args(STUDENT_CONFIG, student_ckpt, data / "test", evaluation / "student", *_student_args(teacher)),
              *[[py, "-m", "sambridge", "evaluate", "--gt", str(evaluation / name / "ground_truth.json"),
                 "--pred", str(evaluation / name / "predictions.json"),
                 "--out", str(evaluation / name / "metrics.json"),
                 "--per-phrase", str(evaluation / name / "per_phrase.csv")] for name in ("teacher", "student")],
              [py, "scripts/compare_per_phrase.py", "--gt", str(evaluation / "student" / "ground_truth.json"),
               "--pred", f"teacher={evaluation / 'teacher' / 'predictions.json'}",
               "--pred", f"student={evaluation / 'student' / 'predictions.json'}",
               "--out", str(evaluation / "per_phrase.md")])

    field_image = data / "field" / "orchard-000000.png"
    segmented = out / "field"
    shutil.rmtree(segmented, ignore_errors=True)  # a new student: segment afresh (a rerun would resume)
    steps.run("7 tiled segmentation",
              [py, "-m", "sambridge", "segment", "--checkpoint", str(student), "--input", str(field_image),
               *[a for phrase in FRUITS for a in ("--text", phrase)], "--tile", str(args.tile),
               "--overlap", str(args.tile // 4), "--out", str(segmented), "--overlays"])

    truth = true_counts(data / "field_labels")
    phrase_of = {image["id"]: image["text_input"]
                 for image in json.loads((segmented / "images.json").read_text())["images"]}
    found = Counter(phrase_of[record["image_id"]] for record in json.loads((segmented / "results.json").read_text()))
    counts = "\n".join(f"| {phrase} | {truth[phrase]} | {found[phrase]} |" for phrase in FRUITS)
    timing = "\n".join(f"| {step} | {seconds:.0f} |" for step, seconds in steps.times.items())
    total = time.perf_counter() - started
    summary = (f"# Agriculture recipe 2 (tiny models, CPU)\n\nTotal wall time: {total / 60:.1f} min\n\n"
               f"| step | seconds |\n|---|---|\n{timing}\n\n"
               f"## Per phrase on {args.num_test} labelled test images\n\n"
               f"{(evaluation / 'per_phrase.md').read_text()}\n"
               f"## Tiled segmentation of the {height}x{width} field image ({args.tile} px tiles)\n\n"
               f"| phrase | true count | student count |\n|---|---|---|\n{counts}\n\n"
               "## Where things are\n\n"
               f"- teacher: {teacher}\n- pseudo-labelled shards: {pseudo}\n"
               f"- student checkpoint: {student_ckpt}\n- exported student: {student}\n"
               f"- evaluation (predictions, metrics.json, per_phrase.csv): {evaluation}/{{teacher,student}}\n"
               f"- field overlay and instances (COCO results): {segmented}\n")
    (out / "summary.md").write_text(summary)
    print("\n" + summary + f"\nsummary written to {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
