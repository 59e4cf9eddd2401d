"""Latency of an exported ONNX grounder on onnxruntime (CPU) against PyTorch eager, same model, same images.

    sambridge export --format onnx --checkpoint student.pt --text "red circle" --text star --text leaf \\
        --top-k 5 --out student.onnx
    python scripts/bench_onnx.py --onnx student.onnx --checkpoint student.pt [--batch 1] [--repeats 30]
    python scripts/bench_onnx.py --smoke        # exports a random tiny student first: the whole path in ~1 min

Reads the vocabulary and top K from the graph's sidecar (``student.onnx.json``), rebuilds the
``FixedVocabularyGrounder`` from ``--checkpoint`` and times one call of each at ``--batch`` (the
graph's own for a fixed-batch graph): the median of ``--repeats`` calls after 3 warm-up calls,
interleaved so both see the same load, each with its default threads (``--threads`` sets both).
Prints one line and the JSON (``--json`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import torch

from sambridge.models.fixed_vocabulary import FixedVocabularyGrounder
from sambridge.modules.checkpoint import load_trained_model
from sambridge.onnx_export import INPUT, sidecar_path

WARM_UP = 3


def median_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, the calls interleaved."""
    for call in calls.values():
        for _ in range(WARM_UP):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def smoke_export(folder: Path) -> tuple[Path, Path]:
    """A random ``grounded_sam2_student_tiny`` as a student file and its ONNX graph (3 phrases, top 5)."""
    from sambridge.models import create_model, save_student
    from sambridge.onnx_export import export_onnx

    torch.manual_seed(0)
    student = folder / "student.pt"
    save_student(create_model("grounded_sam2_student_tiny"), "grounded_sam2_student_tiny", {}, student)
    graph = folder / "student.onnx"
    export_onnx(student, graph, ["red circle", "blue square", "leaf"], top_k=5)
    return graph, student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", help="the .onnx file (its OUT.json sidecar next to it)")
    parser.add_argument("--checkpoint", help="the checkpoint or student file it was exported from")
    parser.add_argument("--batch", type=int, default=1, help="images per call (dynamic-batch graphs)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads of both (0: their defaults)")
    parser.add_argument("--smoke", action="store_true", help="export a random tiny student first and time it")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.smoke:
            args.onnx, args.checkpoint = smoke_export(Path(folder))
            args.repeats = min(args.repeats, 10)
        elif not (args.onnx and args.checkpoint):
            parser.error("give --onnx and --checkpoint, or --smoke")
        result = measure(args)
    print(f"batch {result['batch']}, {result['phrases']} phrase(s), top {result['top_k']}, {result['image_size']} "
          f"px, threads {args.threads or 'default'} (torch {result['torch_threads']}): onnxruntime "
          f"{onnxruntime.__version__} CPU {result['onnxruntime_ms']:.1f} ms, PyTorch {torch.__version__} eager "
          f"{result['pytorch_ms']:.1f} ms ({result['pytorch_ms'] / result['onnxruntime_ms']:.1f}x)")
    print(json.dumps(result, indent=1))
    if args.json:
        from data_pipelines.atomic import write_json_atomic

        write_json_atomic(args.json, result)


def measure(args: argparse.Namespace) -> dict:
    """Median ms per call of the graph on onnxruntime and of the grounder on PyTorch, and the settings."""
    sidecar = json.loads(sidecar_path(args.onnx).read_text())
    batch = sidecar["batch"] or args.batch
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    if args.threads:
        torch.set_num_threads(args.threads)
    session = onnxruntime.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    grounder = FixedVocabularyGrounder(load_trained_model(args.checkpoint), sidecar["phrases"], sidecar["top_k"])
    size = sidecar["image_size"]
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    feed = {INPUT: images.numpy()}
    with torch.no_grad():
        ms = median_ms({"onnxruntime": lambda: session.run(None, feed), "pytorch": lambda: grounder(images)},
                       args.repeats)
    return {"batch": batch, "phrases": len(sidecar["phrases"]), "top_k": sidecar["top_k"], "image_size": size,
            "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "onnxruntime_ms": ms["onnxruntime"],
            "pytorch_ms": ms["pytorch"]}


if __name__ == "__main__":
    main()
