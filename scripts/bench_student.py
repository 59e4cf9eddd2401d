"""Teacher vs student: parameters, CPU latency per image (1 and 10 prompts), and the cost of offline targets.

    python scripts/bench_student.py --json runs/bench_student.json
    python scripts/bench_student.py --teacher sam3_image_tiny --student grounded_sam2_student_tiny  # quick

Each model gets one random image at its own input size (SAM3: 1008, the default student: 384) and
P prompts (phrases) on it; a timed call is ``forward`` + ``postprocess`` (top 20 detections per
prompt with the head's own masks, as the teacher has no other). The student's optional SAM2 box
refinement is timed apart, per refined box (only detections above the score threshold get it).
Weights are random: latency does not depend on them. Reported: the median of ``--repeats`` timed
calls after one warm-up call, teacher and student calls interleaved so that both see the same
load. Offline targets: ``--shard-samples`` samples with the teacher's
real targets for P prompts in ``teacher.safetensors`` are written to a temporary shard; the cost per
sample is reading the shard (webdataset, raw records) plus decoding the teacher file, against the
teacher forward it replaces. Timings on a shared machine are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from data_pipelines.schema import TEACHER_FIELD, Query, Sample
from sambridge.models import create_model
from sambridge.models.teacher_targets import decode_teacher_file, encode_teacher_file, select_teacher_targets

PHRASES = (
    "a yellow school bus",
    "person",
    "red car",
    "dog",
    "traffic light",
    "bicycle",
    "the tree on the left",
    "window",
    "stop sign",
    "bird",
)
TARGET_SPEEDUP = 15.0
TARGET_PARAM_FRACTION = 0.12


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up (allocations, lazily built caches)
    return statistics.median(timed(call) for _ in range(repeats))


@torch.inference_mode()
def predict(model: torch.nn.Module, image: torch.Tensor, phrases: list[str], refine: bool = False) -> dict:
    out = model(image, phrases, torch.zeros(len(phrases), dtype=torch.long))
    model.postprocess(out, top_k=20, score_threshold=0.0, refine=refine)
    return out


@torch.inference_mode()
def refine_seconds_per_box(student: torch.nn.Module, repeats: int, boxes: int = 20) -> float:
    """SAM2 prompt-decoder refinement of ``boxes`` predicted boxes of one prompt, per box."""
    size = student.image_size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = student(image, [PHRASES[0]], torch.zeros(1, dtype=torch.long))
    plain = median_seconds(
        lambda: student.postprocess(out, top_k=boxes, score_threshold=0.0, refine=False), repeats
    )
    refined = median_seconds(
        lambda: student.postprocess(out, top_k=boxes, score_threshold=0.0, refine=True), repeats
    )
    return max(refined - plain, 0.0) / boxes


def paired_latency(
    teacher: torch.nn.Module, student: torch.nn.Module, prompts: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of teacher and student, interleaved so both see the same machine load."""
    generator = torch.Generator().manual_seed(0)
    calls = {}
    for name, model in (("teacher", teacher), ("student", student)):
        image = torch.rand(1, 3, model.image_size, model.image_size, generator=generator)
        calls[name] = lambda m=model, i=image: predict(m, i, list(PHRASES[:prompts]))
        calls[name]()  # warm-up
    times: dict[str, list[float]] = {"teacher": [], "student": []}
    for _ in tqdm(range(repeats), desc=f"latency, {prompts} prompt(s)", leave=False):
        for name, call in calls.items():
            times[name].append(timed(call))
    return times


def offline_target_cost(
    teacher: torch.nn.Module, num_prompts: int, samples: int, repeats: int, workdir: Path
) -> dict[str, float]:
    """Seconds per sample: shard read (raw records) and teacher-file decode, for ``num_prompts`` queries."""
    image = np.random.default_rng(0).integers(0, 256, (teacher.image_size, teacher.image_size, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    phrases = list(PHRASES[:num_prompts])
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    out = predict(teacher, pixels, phrases)
    teacher_file = encode_teacher_file(select_teacher_targets(out))
    shard = workdir / "offline-000000.tar"
    with wds.TarWriter(str(shard)) as writer:
        for i in range(samples):
            sample = Sample(
                key=f"bench{i:05d}",
                image=buffer.getvalue(),
                image_format="jpg",
                width=image.shape[1],
                height=image.shape[0],
                queries=[Query(p, [], exhaustive=False) for p in phrases],
                teacher=teacher_file,
            )
            writer.write(sample.to_wds())

    def read() -> list[dict]:
        return list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))

    records = read()
    read_s = median_seconds(read, repeats) / samples
    decode_s = (
        median_seconds(lambda: [decode_teacher_file(r[TEACHER_FIELD]) for r in records], repeats) / samples
    )
    return {
        "teacher_file_bytes": len(teacher_file),
        "shard_read_s": read_s,
        "teacher_decode_s": decode_s,
        "offline_total_s": read_s + decode_s,
    }


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def measure(
    teacher_name: str, student_name: str, prompts: list[int], repeats: int, shard_samples: int
) -> dict:
    """Parameters, paired latencies and offline-target costs (see the module docstring)."""
    torch.manual_seed(0)
    start = time.perf_counter()
    teacher = create_model(teacher_name).eval()
    teacher_build_s = time.perf_counter() - start
    student = create_model(student_name).eval()
    result = {
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu"},
        "teacher": {
            "model": teacher_name,
            "image_size": teacher.image_size,
            "params": parameters(teacher),
            "build_s": teacher_build_s,
            "latency_s": {},
            "latency_runs_s": {},
        },
        "student": {
            "model": student_name,
            "image_size": student.image_size,
            "params": parameters(student),
            "latency_s": {},
            "latency_runs_s": {},
        },
    }
    for p in prompts:
        times = paired_latency(teacher, student, p, repeats)
        for name in ("teacher", "student"):
            result[name]["latency_s"][p] = statistics.median(times[name])
            result[name]["latency_runs_s"][p] = times[name]
    if student.prompt_decoder is not None:
        result["student"]["refine_s_per_box"] = refine_seconds_per_box(student, repeats)
    with tempfile.TemporaryDirectory() as workdir:
        result["offline_targets"] = {
            p: offline_target_cost(teacher, p, shard_samples, repeats, Path(workdir)) for p in prompts
        }
    t, s, offline = result["teacher"], result["student"], result["offline_targets"]
    fraction = s["params"] / t["params"]
    speedups = {p: t["latency_s"][p] / s["latency_s"][p] for p in prompts}
    result["summary"] = {
        "param_fraction": fraction,
        "speedup": speedups,
        "meets_targets": fraction <= TARGET_PARAM_FRACTION and min(speedups.values()) >= TARGET_SPEEDUP,
        "offline_vs_teacher_forward": {p: t["latency_s"][p] / offline[p]["offline_total_s"] for p in prompts},
    }
    return result


def report(result: dict) -> str:
    """The results as a text table plus the verdict on the targets."""
    t, s, summary = result["teacher"], result["student"], result["summary"]
    rows = [
        ("", f"teacher {t['model']} @{t['image_size']}", f"student {s['model']} @{s['image_size']}", "ratio"),
        (
            "parameters",
            f"{t['params'] / 1e6:.1f}M",
            f"{s['params'] / 1e6:.1f}M",
            f"{summary['param_fraction']:.1%}",
        ),
    ]
    for p, seconds in t["latency_s"].items():
        rows.append(
            (
                f"latency, {p} prompt(s)",
                f"{seconds:.2f} s",
                f"{s['latency_s'][p]:.3f} s",
                f"{summary['speedup'][p]:.1f}x faster",
            )
        )
    if "refine_s_per_box" in s:
        rows.append(("SAM2 box refinement, per box", "-", f"{s['refine_s_per_box'] * 1e3:.1f} ms", ""))
    for p, o in result["offline_targets"].items():
        rows.append(
            (
                f"offline targets, {p} prompt(s)",
                f"forward {t['latency_s'][p]:.2f} s",
                f"read {o['shard_read_s'] * 1e3:.2f} ms + decode {o['teacher_decode_s'] * 1e3:.2f} ms "
                f"({o['teacher_file_bytes'] / 2**20:.2f} MiB)",
                f"{summary['offline_vs_teacher_forward'][p]:.0f}x cheaper",
            )
        )
    verdict = "met" if summary["meets_targets"] else "NOT met"
    return (
        f"{table(rows)}\ntargets (>= {TARGET_SPEEDUP:.0f}x faster, <= {TARGET_PARAM_FRACTION:.0%} of the "
        f"parameters): {verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="sam3_image", help="registered teacher model")
    parser.add_argument("--student", default="grounded_sam2_student", help="registered student model")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 10], help="prompts per image")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (after a warm-up)")
    parser.add_argument("--shard-samples", type=int, default=32, help="samples in the offline-targets shard")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if any(p < 1 or p > len(PHRASES) for p in args.prompts):
        parser.error(f"--prompts must be between 1 and {len(PHRASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.teacher, args.student, args.prompts, args.repeats, args.shard_samples)
    print(report(result))
    print(json.dumps(result, indent=1))
    if args.json:
        from data_pipelines.atomic import write_json_atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
