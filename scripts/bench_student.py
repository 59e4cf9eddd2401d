#!/usr/bin/env python
"""Teacher vs student latency per batch and phrase count, on a CPU or a GPU; parameters; offline-target cost.

    python scripts/bench_student.py --device cuda --batch 1 8 32 --prompts 1 10 --dtype bf16 --json bench.json
    python scripts/bench_student.py --threads 1 --batch 1 --json bench_student.json     # CPU, real sizes
    python scripts/bench_student.py --smoke                                            # CPU, tiny, seconds

Three ways to segment B images with P phrases each, timed per call (median of ``--repeats`` after a
warm-up; on a GPU the device is synchronised around each call) and interleaved so that all see the
same machine load:

* **teacher**: SAM3 (``sam3_image``) at its native 1,008 px as SAM3 runs it (bf16 autocast on a GPU,
  no compilation: ``sam3.model_builder`` compiles nothing by default): ``forward`` + ``postprocess``
  (top 20 per phrase, the head's own masks). Batches above ``--teacher-max-batch`` are skipped.
* **student**: the default student at 384 px, the same ``forward`` + ``postprocess``.
* **student fast**: the student as ``FixedVocabularyGrounder`` (phrases encoded once, static shapes,
  no host reads, top 20 on the device), compiled with ``--compile`` (``reduce-overhead``, CUDA graphs,
  by default on a GPU; ``none`` by default on a CPU).

Reported per setting: ms per call, images/s and the speed-up over the teacher; host syncs and
top-level operators per call of each path at batch 1 and one phrase (``sambridge.profiling``); the
student's SAM2 box refinement per box; with ``--offline-targets`` the cost per sample of reading
stored teacher targets from a shard against the teacher forward they replace. Weights are random:
latency does not depend on them. On a shared machine compare ratios from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from data_pipelines.schema import TEACHER_FIELD, Query, Sample
from sambridge.models import create_model
from sambridge.models.fixed_vocabulary import COMPILE_MODES, FixedVocabularyGrounder, compile_grounder
from sambridge.models.teacher_targets import decode_teacher_file, encode_teacher_file, select_teacher_targets
from sambridge.profiling import HostSyncCounter

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
TARGETS = {"speedup": 15.0, "fast_images_per_s_batch_1": 200.0, "fast_images_per_s_batch_32": 1000.0,
           "param_fraction": 0.12}
"""Issue targets on one H100/H200-class GPU: the fast student >= 15x the teacher at batch 1 and 8 (1 and
10 phrases), >= 200 images/s at batch 1 and >= 1,000 at batch 32 (1 phrase); <= 12% of its parameters."""

PATHS = ("teacher", "student", "student_fast")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOP_K = 20


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Clock:
    """Seconds per call on ``device`` (synchronised on CUDA), under autocast to ``dtype`` where it is not fp32."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    @contextlib.contextmanager
    def precision(self) -> Iterator[None]:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype,
                                             enabled=self.dtype != torch.float32):
            yield

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds(self, call: Callable[[], object]) -> float:
        with self.precision():
            self.sync()
            start = time.perf_counter()
            call()
            self.sync()
            return time.perf_counter() - start


def eager_call(model: torch.nn.Module, images: torch.Tensor, phrases: list[str]) -> Callable[[], dict]:
    """``forward`` + ``postprocess`` (top 20 per phrase, the head's masks) of every image with every phrase."""
    batch = images.shape[0]
    query_image = torch.arange(batch, device=images.device).repeat_interleave(len(phrases))

    def call() -> dict:
        out = model(images, phrases * batch, query_image)
        return model.postprocess(out, top_k=TOP_K, score_threshold=0.0, refine=False)

    return call


class PathCalls:
    """One call per path for B random images and P phrases, built once per (B, P): a compiled fast path
    compiles on its first call only."""

    def __init__(self, models: dict[str, torch.nn.Module], device: torch.device, compile_mode: str) -> None:
        self.models, self.device, self.compile_mode = models, device, compile_mode
        self._built: dict[tuple[int, int], dict[str, Callable[[], object]]] = {}

    def __call__(self, batch: int, prompts: int, teacher: bool = True) -> dict[str, Callable[[], object]]:
        if (batch, prompts) not in self._built:
            self._built[batch, prompts] = self._build(batch, list(PHRASES[:prompts]))
        calls = self._built[batch, prompts]
        return calls if teacher else {k: c for k, c in calls.items() if k != "teacher"}

    def _build(self, batch: int, phrases: list[str]) -> dict[str, Callable[[], object]]:
        generator = torch.Generator().manual_seed(batch)
        calls = {}
        for name, model in self.models.items():
            images = torch.rand(batch, 3, model.image_size, model.image_size, generator=generator).to(self.device)
            if name == "student_fast":
                grounder = FixedVocabularyGrounder(model, phrases, top_k=TOP_K)
                fast = grounder if self.compile_mode == "none" else compile_grounder(grounder, self.compile_mode)
                calls[name] = lambda f=fast, i=images: f(i)
            else:
                calls[name] = eager_call(model, images, phrases)
        return calls


def latencies(clock: Clock, calls: dict[str, Callable[[], object]], repeats: int, label: str) -> dict[str, float]:
    """Median seconds per call of each path, after two warm-up calls (compilation, caches), interleaved."""
    for call in calls.values():
        clock.seconds(call)
        clock.seconds(call)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in tqdm(range(repeats), desc=label, leave=False):
        for name, call in calls.items():
            times[name].append(clock.seconds(call))
    return {name: statistics.median(t) for name, t in times.items()}


def host_syncs(clock: Clock, calls: dict[str, Callable[[], object]]) -> dict[str, dict]:
    """Host syncs (by kind) and top-level operators of one call of each path (after one uncounted call)."""
    counts = {}
    for name, call in calls.items():
        with clock.precision(), HostSyncCounter():  # a compiled path recompiles under the counter's mode
            call()
        with clock.precision(), HostSyncCounter() as counter:
            call()
        counts[name] = {"syncs": counter.total, "by_kind": counter.syncs, "top_level_ops": counter.top_level_ops}
    return counts


def refine_seconds_per_box(clock: Clock, student: torch.nn.Module, repeats: int, boxes: int = 20) -> float:
    """SAM2 prompt-decoder refinement of ``boxes`` predicted boxes of one prompt, per box."""
    size = student.image_size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(clock.device)
    with clock.precision():
        out = student(image, [PHRASES[0]], torch.zeros(1, dtype=torch.long, device=clock.device))

    def median(refine: bool) -> float:
        call = lambda: student.postprocess(out, top_k=boxes, score_threshold=0.0, refine=refine)  # noqa: E731
        clock.seconds(call)
        return statistics.median(clock.seconds(call) for _ in range(repeats))

    return max(median(True) - median(False), 0.0) / boxes


def offline_target_cost(
    clock: Clock, teacher: torch.nn.Module, num_prompts: int, samples: int, repeats: int, workdir: Path
) -> dict[str, float]:
    """Seconds per sample: shard read (raw records) and teacher-file decode, for ``num_prompts`` queries."""
    image = np.random.default_rng(0).integers(0, 256, (teacher.image_size, teacher.image_size, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    phrases = list(PHRASES[:num_prompts])
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(clock.device) / 255
    with clock.precision():
        out = teacher(pixels, phrases, torch.zeros(len(phrases), dtype=torch.long, device=clock.device))
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
    read_s = statistics.median(clock.seconds(read) for _ in range(repeats)) / samples
    decode = lambda: [decode_teacher_file(r[TEACHER_FIELD]) for r in records]  # noqa: E731
    decode_s = statistics.median(clock.seconds(decode) for _ in range(repeats)) / samples
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


def measure(args: argparse.Namespace) -> dict:
    """Every number of the module docstring for the settings in ``args``."""
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    clock = Clock(device, dtype)
    start = time.perf_counter()
    teacher = create_model(args.teacher).eval().to(device)
    teacher_build_s = time.perf_counter() - start
    student = create_model(args.student).eval().to(device)
    models = {"teacher": teacher, "student": student, "student_fast": student}
    result = {
        "machine": {"device": _device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {"dtype": args.dtype, "compile": args.compile, "top_k": TOP_K, "repeats": args.repeats,
                     "batches": args.batch, "prompts": args.prompts, "teacher_max_batch": args.teacher_max_batch},
        "teacher": {"model": args.teacher, "image_size": teacher.image_size, "params": parameters(teacher),
                    "build_s": teacher_build_s},
        "student": {"model": args.student, "image_size": student.image_size, "params": parameters(student)},
        "latency_s": {name: {} for name in PATHS},
    }
    calls = PathCalls(models, device, args.compile)
    for batch in args.batch:
        for prompts in args.prompts:
            seconds = latencies(clock, calls(batch, prompts, teacher=batch <= args.teacher_max_batch),
                                args.repeats, f"batch {batch}, {prompts} phrase(s)")
            for name, value in seconds.items():
                result["latency_s"][name][f"{batch}x{prompts}"] = value
    result["host_syncs"] = host_syncs(clock, calls(1, 1, teacher=args.teacher_max_batch >= 1))
    if student.prompt_decoder is not None:
        result["student"]["refine_s_per_box"] = refine_seconds_per_box(clock, student, args.repeats)
    if args.offline_targets:
        with tempfile.TemporaryDirectory() as workdir:
            result["offline_targets"] = {
                p: offline_target_cost(clock, teacher, p, args.shard_samples, args.repeats, Path(workdir))
                for p in args.prompts
            }
    result["summary"] = summarise(result)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def summarise(result: dict) -> dict:
    """Images/s and speed-ups per setting, and the verdict on ``TARGETS``."""
    latency = result["latency_s"]
    images_per_s = {name: {key: int(key.split("x")[0]) / s for key, s in runs.items()}
                    for name, runs in latency.items()}
    speedup = {name: {key: latency["teacher"][key] / s for key, s in latency[name].items() if key in latency["teacher"]}
               for name in ("student", "student_fast")}
    fraction = result["student"]["params"] / result["teacher"]["params"]
    fast, fast_speedup = images_per_s["student_fast"], speedup["student_fast"]
    checks = {
        "param_fraction": fraction <= TARGETS["param_fraction"],
        "speedup": [fast_speedup[k] >= TARGETS["speedup"] for k in fast_speedup if k.split("x")[0] in ("1", "8")],
        "fast_images_per_s_batch_1": fast.get("1x1", 0.0) >= TARGETS["fast_images_per_s_batch_1"],
        "fast_images_per_s_batch_32": fast.get("32x1", 0.0) >= TARGETS["fast_images_per_s_batch_32"],
    }
    checks["speedup"] = bool(checks["speedup"]) and all(checks["speedup"])
    summary = {"param_fraction": fraction, "images_per_s": images_per_s, "speedup": speedup, "targets": checks,
               "meets_targets": all(checks.values())}
    if "offline_targets" in result:
        summary["offline_vs_teacher_forward"] = {
            p: latency["teacher"][f"1x{p}"] / o["offline_total_s"]
            for p, o in result["offline_targets"].items() if f"1x{p}" in latency["teacher"]}
    return summary


def report(result: dict) -> str:
    """The results as text tables plus the verdict on the targets."""
    t, s, summary, latency = result["teacher"], result["student"], result["summary"], result["latency_s"]
    settings = result["settings"]
    lines = [f"{result['machine']['device']}, {settings['dtype']}, student fast path compile: "
             f"{settings['compile']}; teacher {t['model']} @{t['image_size']} ({t['params'] / 1e6:.1f}M), "
             f"student {s['model']} @{s['image_size']} ({s['params'] / 1e6:.1f}M, {summary['param_fraction']:.1%})"]
    rows = [("batch x phrases", "teacher", "student", "student fast", "student / teacher", "fast / teacher")]
    for key in latency["student"]:
        teacher_s = latency["teacher"].get(key)
        rows.append((key, *(_cell(result, name, key) for name in PATHS),
                     f"{summary['speedup']['student'][key]:.1f}x" if teacher_s else "-",
                     f"{summary['speedup']['student_fast'][key]:.1f}x" if teacher_s else "-"))
    lines.append(table(rows))
    syncs = [("per call, batch 1, 1 phrase", "host syncs", "top-level ops")]
    for name, count in result["host_syncs"].items():
        syncs.append((name, f"{count['syncs']} {count['by_kind'] or ''}".strip(), str(count["top_level_ops"])))
    lines.append(table(syncs))
    if "refine_s_per_box" in s:
        lines.append(f"student SAM2 box refinement: {s['refine_s_per_box'] * 1e3:.1f} ms per box")
    for p, o in result.get("offline_targets", {}).items():
        ratio = summary.get("offline_vs_teacher_forward", {}).get(p)
        lines.append(f"offline targets, {p} phrase(s): read {o['shard_read_s'] * 1e3:.2f} ms + decode "
                     f"{o['teacher_decode_s'] * 1e3:.2f} ms per sample ({o['teacher_file_bytes'] / 2**20:.2f} MiB)"
                     + (f", {ratio:,.0f}x cheaper than the teacher forward" if ratio else ""))
    failed = [name for name, ok in summary["targets"].items() if not ok]
    lines.append("targets (one H100/H200-class GPU): " + ("met" if not failed else f"NOT met: {', '.join(failed)}"))
    return "\n".join(lines)


def _cell(result: dict, name: str, key: str) -> str:
    value = result["latency_s"][name].get(key)
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms ({result['summary']['images_per_s'][name][key]:.1f} img/s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="images per call")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 10], help="phrases per image")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="bf16 autocast or fp32 (default: bf16 on a GPU)")
    parser.add_argument("--compile", choices=("none", *COMPILE_MODES),
                        help="torch.compile mode of the student's fast path (default: reduce-overhead on a GPU, "
                             "none on a CPU)")
    parser.add_argument("--teacher", default="sam3_image", help="registered teacher model")
    parser.add_argument("--student", default="grounded_sam2_student", help="registered student model")
    parser.add_argument("--teacher-max-batch", type=int, default=8,
                        help="largest batch the teacher runs (0: student paths only)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per setting (after warm-up)")
    parser.add_argument("--offline-targets", action="store_true",
                        help="also time reading stored teacher targets from a shard")
    parser.add_argument("--shard-samples", type=int, default=32, help="samples in the offline-targets shard")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny teacher and student on the CPU, batches 1 2, phrases 1 3: seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.teacher, args.student = "cpu", "sam3_image_tiny", "grounded_sam2_student_tiny"
        args.batch, args.prompts, args.repeats, args.shard_samples = [1, 2], [1, 3], 2, 4
    on_gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.compile = args.compile or ("reduce-overhead" if on_gpu else "none")
    if any(p < 1 or p > len(PHRASES) for p in args.prompts):
        parser.error(f"--prompts must be between 1 and {len(PHRASES)}")
    if on_gpu and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compiled fast path per (batch, phrases) setting
    result = measure(args)
    print(report(result))
    print(json.dumps(result, indent=1))
    if args.json:
        from data_pipelines.atomic import write_json_atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
