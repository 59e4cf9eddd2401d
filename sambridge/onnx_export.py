"""``sambridge export --format onnx``: a grounding model and a fixed vocabulary -> an ONNX graph + JSON sidecar.

    sambridge export --format onnx --checkpoint student.pt --vocabulary phrases.txt --out student.onnx
    sambridge export --format onnx --checkpoint last.ckpt --text "ripe apple" --text leaf --batch 1 --out apple.onnx

The graph is :class:`~sambridge.models.fixed_vocabulary.FixedVocabularyGrounder`: image encoder and grounding
head, with the vocabulary's text features baked in as constants (no text tower, no tokenizer). Input
``images`` (B, 3, S, S) float32 RGB in [0, 1]; outputs ``scores`` (B, P, K), ``boxes_xyxy`` (B, P, K, 4),
``mask_logits`` (B, P, K, h, w) at the head's stride (4; the real-size students' 8) and ``presence``
(B, P). The batch is dynamic unless ``--batch N``. ``OUT.json`` says what the tensors mean (:func:`describe`).

The graph holds standard ``ai.onnx`` operators only, none of the sequence operators TensorRT's parser
lacks. Before anything is written, onnxruntime (CPU) runs it on random images (batches of 1 and 3, or
``--batch``) and every output must match PyTorch fp32 within :data:`TOLERANCE` relative error
(:func:`relative_error`); otherwise the command stops with a user error and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from onnxscript import optimizer
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from data_pipelines.atomic import atomic_write, write_json_atomic
from data_pipelines.vocab import command_phrases
from data_pipelines.writer import sha256_of
from sambridge.models import CheckpointError
from sambridge.models.fixed_vocabulary import FixedVocabularyGrounder, VocabularyOutputs
from sambridge.modules.checkpoint import load_trained_model

DEFAULT_TOP_K = 20
"""``--top-k``: detections kept per (image, phrase)."""

DEFAULT_OPSET = 18
"""``--opset``: the lowest opset torch's exporter writes natively (TensorRT 10 parses it)."""

TOLERANCE = 1e-4
"""Largest relative error (:func:`relative_error`) of any output, onnxruntime against PyTorch fp32."""

TRACE_BATCH = 2
"""Batch of the example a dynamic-batch graph is traced with (torch.export specialises a batch of 1)."""

VERIFY_BATCHES = (1, 3)
"""Batch sizes a dynamic-batch graph is checked at: neither is the traced one."""

INPUT = "images"
OUTPUTS = VocabularyOutputs._fields
STANDARD_DOMAINS = ("", "ai.onnx")
"""Operator domains of the ONNX standard (what TensorRT's parser and every runtime implement)."""

NOISY_LOGGERS = ("torch._dynamo.variables.ctx_manager", "onnxscript.optimizer._constant_folding")
"""Loggers whose warnings during an export say nothing a user can act on (sam3's profiler ranges that
dynamo skips; ``Split`` nodes that constant folding leaves alone)."""

OUTPUT_MEANINGS = {
    "scores": "detection score in [0, 1] of the top-K decoder queries per (image, phrase), sorted descending: "
              "sigmoid(match logit) x presence (SAM3's); keep scores >= 0.5 (SAM3's threshold)",
    "boxes_xyxy": "box (x0, y0, x1, y1) of each detection, normalised to [0, 1] by the S x S canvas",
    "mask_logits": "mask logits of each detection at stride {stride} of the S x S canvas ({source}): "
                   "mask = logit > 0 (sigmoid >= 0.5) after resizing to the canvas",
    "presence": "probability in [0, 1] that the phrase is in the image at all",
}


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote (the graph, its sidecar and the sidecar's content) and how long the
    export took."""

    path: Path
    sidecar: Path
    description: dict[str, Any]
    seconds: float


def sidecar_path(out: str | os.PathLike) -> Path:
    """The JSON description next to an ONNX file: ``model.onnx`` -> ``model.onnx.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")




def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / max |expected| (the denominator at least 1e-12)."""
    return float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-12))


def tie_order(expected: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> np.ndarray:
    """(B, P, K) indices putting ``got``'s detections in ``expected``'s order.

    Detections whose expected scores differ by at most :data:`TOLERANCE` relative (a near tie: a
    rounding difference may rank them the other way round) are matched by their boxes, one to one;
    the others keep their rank.
    """
    scores, boxes, found = expected[0], expected[1], got[1]
    tie = TOLERANCE * max(float(np.abs(scores).max()), 1e-12)
    order = np.broadcast_to(np.arange(scores.shape[-1]), scores.shape).copy()
    for b, p in np.ndindex(*scores.shape[:2]):
        for group in np.split(np.arange(scores.shape[-1]), np.flatnonzero(-np.diff(scores[b, p]) > tie) + 1):
            if len(group) > 1:
                cost = np.abs(boxes[b, p, group][:, None] - found[b, p, group][None]).max(-1)
                rows, cols = linear_sum_assignment(cost)
                order[b, p, group[rows]] = group[cols]
    return order


def output_errors(expected: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict[str, float]:
    """:func:`relative_error` of each output (:data:`OUTPUTS` order), detections aligned by :func:`tie_order`."""
    order = tie_order(expected, got)
    errors = {}
    for name, want, found in zip(OUTPUTS, expected, got, strict=True):
        if name != "presence":  # per (image, phrase), not per detection
            found = np.take_along_axis(found, order.reshape(order.shape + (1,) * (found.ndim - 3)), axis=2)
        errors[name] = relative_error(found, want)
    return errors


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence :data:`NOISY_LOGGERS` and dynamo's note on sam3's device caches (side effects it replays)."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="While compiling, we found certain side effects",
                                category=UserWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


@contextlib.contextmanager
def _no_activation_checkpointing(module: nn.Module) -> Iterator[None]:
    """Switch off sam3's segmentation-head checkpointing (``act_ckpt``, on in the real-size heads), which it
    applies in eval mode too: the same values, but a higher-order op the ONNX exporter cannot translate."""
    checkpointed = [m for m in module.modules() if getattr(m, "act_ckpt", None) is True]
    for m in checkpointed:
        m.act_ckpt = False
    try:
        yield
    finally:
        for m in checkpointed:
            m.act_ckpt = True


def to_onnx(grounder: FixedVocabularyGrounder, opset: int, batch: int | None) -> onnx.ModelProto:
    """Trace ``grounder`` (``torch.export``, strict) and translate it with torch's dynamo ONNX exporter.

    Strict tracing: sam3's decoder skips its data-dependent shape asserts only under dynamo. The math
    attention kernel: the CPU flash kernel's output strides make the exporter's decomposition fail.
    ``optimize=False`` then constant folding: onnxscript's reshape rewrites emit a ``Reshape`` that ONNX
    rejects (0 with -1) for sam3's empty point prompts under a dynamic batch, while folding alone turns
    ``SplitToSequence`` (which TensorRT cannot parse) into ``Split``.
    """
    size = grounder.image_size
    example = torch.zeros(batch or TRACE_BATCH, 3, size, size)
    dynamic = None if batch else {INPUT: {0: torch.export.Dim("batch", min=1)}}
    with _quiet_exporters(), sdpa_kernel(SDPBackend.MATH), _no_activation_checkpointing(grounder):
        program = torch.export.export(grounder, (example,), dynamic_shapes=dynamic, strict=True)
        model = torch.onnx.export(program, (example,), dynamo=True, optimize=False, opset_version=opset,
                                  input_names=[INPUT], output_names=list(OUTPUTS), verbose=False).model_proto
        optimizer.fold_constants(model)
    optimizer.remove_unused_nodes(model)
    for node in model.graph.node:
        del node.metadata_props[:]  # the exporting machine's stack traces: 40% of the file, and its paths
    return model


def check_standard_ops(model: onnx.ModelProto) -> None:
    """Refuse a graph with operators outside the ONNX standard, local functions or sequence operators."""
    custom = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
    sequences = sorted({n.op_type for n in model.graph.node if "Sequence" in n.op_type})
    functions = sorted(f"{f.domain}.{f.name}" for f in model.functions)
    if custom or sequences or functions:
        raise CheckpointError(
            f"the ONNX graph is not plain ai.onnx (custom operators {custom}, sequence operators {sequences}, "
            f"functions {functions}); nothing was written"
        )


@torch.no_grad()
def verify(session: onnxruntime.InferenceSession, grounder: FixedVocabularyGrounder,
           batches: Sequence[int]) -> dict[str, float]:
    """The largest relative error of each output (:func:`output_errors`), ``session`` against ``grounder``
    on random images.

    Raises:
        CheckpointError: an output differs by more than :data:`TOLERANCE`.
    """
    size, generator = grounder.image_size, torch.Generator().manual_seed(0)
    errors = dict.fromkeys(OUTPUTS, 0.0)
    for batch in batches:
        images = torch.rand(batch, 3, size, size, generator=generator)
        got = session.run(list(OUTPUTS), {INPUT: images.numpy()})
        for name, error in output_errors([x.numpy() for x in grounder(images)], got).items():
            errors[name] = max(errors[name], error)
    worse = {name: error for name, error in errors.items() if not error <= TOLERANCE}
    if worse:
        raise CheckpointError(
            f"the ONNX graph does not reproduce the model: relative error {_format(worse)} above {TOLERANCE:g} "
            f"(onnxruntime CPU against PyTorch fp32, batches {list(batches)}); nothing was written"
        )
    return errors


def _shapes(values: Sequence[onnx.ValueInfoProto]) -> dict[str, list[int | str]]:
    """Name -> shape of graph inputs or outputs; a dynamic dimension (the batch) is ``"batch"``."""
    return {value.name: [d.dim_value if d.HasField("dim_value") else "batch" for d in value.type.tensor_type.shape.dim]
            for value in values}


def describe(grounder: FixedVocabularyGrounder, graph: onnx.GraphProto, opset: int, checkpoint: str | os.PathLike,
             errors: dict[str, float], batches: Sequence[int]) -> dict[str, Any]:
    """The sidecar: the vocabulary and what the graph's input and outputs mean."""
    size, model = grounder.image_size, grounder.model
    shapes, input_shape = _shapes(graph.output), _shapes(graph.input)[INPUT]
    meanings = {**OUTPUT_MEANINGS,
                "mask_logits": OUTPUT_MEANINGS["mask_logits"].format(
                    stride=size // shapes["mask_logits"][-1],
                    source="SAM2's mask decoder on the box" if grounder.refine else "the grounding head's own")}
    return {
        "format": "sambridge-onnx-grounder/1",
        "phrases": grounder.phrases,
        "image_size": size,
        "top_k": grounder.top_k,
        "masks": "sam2" if grounder.refine else "head",
        "batch": None if input_shape[0] == "batch" else input_shape[0],
        "opset": opset,
        "input": {
            "name": INPUT, "shape": input_shape, "dtype": "float32",
            "meaning": "RGB in [0, 1], NCHW, on an S x S canvas: resize the longer side to S (antialiased), "
                       "place the image top-left, pad with zeros (sambridge.inference.Segmenter); the graph "
                       "normalises with pixel_mean and pixel_std itself",
            "pixel_mean": model.pixel_mean.flatten().tolist(), "pixel_std": model.pixel_std.flatten().tolist(),
        },
        "outputs": {name: {"shape": shapes[name], "dtype": "float32", "meaning": meanings[name]}
                    for name in OUTPUTS},
        "source": {"checkpoint": Path(checkpoint).name, "sha256": sha256_of(checkpoint)},
        "parity": {"max_relative_error": errors, "tolerance": TOLERANCE, "batches": list(batches),
                   "against": f"torch {torch.__version__} fp32 eager",
                   "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"},
    }


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, phrases: Sequence[str],
                top_k: int = DEFAULT_TOP_K, opset: int = DEFAULT_OPSET, batch: int | None = None,
                masks: str = "head") -> OnnxExport:
    """Export the model of ``checkpoint`` (Lightning ``.ckpt`` or student file) with ``phrases`` to ONNX.

    Writes ``out`` and :func:`sidecar_path` (atomically) once onnxruntime reproduces the model.

    Args:
        checkpoint: Lightning checkpoint or student file.
        out: The ``.onnx`` file.
        phrases: The fixed vocabulary, in output order.
        top_k: Detections per (image, phrase).
        opset: ONNX opset of the graph.
        batch: Fixed batch size; ``None``: dynamic.
        masks: ``head`` (the grounding head's mask logits) or ``sam2`` (SAM2's mask decoder on every
            top-K box, ``FixedVocabularyGrounder(refine=True)``).

    Raises:
        FileExistsError: ``out`` or its sidecar exists.
        CheckpointError: an unreadable checkpoint, or a graph that is not standard ONNX or does not
            reproduce the model (then nothing is written).
    """
    out, sidecar = Path(out), sidecar_path(out)
    for path in (out, sidecar):
        if path.exists():
            raise FileExistsError(f"{path} exists; choose another --out or remove it first")
    grounder = FixedVocabularyGrounder(load_trained_model(checkpoint), phrases, top_k, refine=masks == "sam2")
    start = time.perf_counter()
    model = to_onnx(grounder, opset, batch)
    seconds = time.perf_counter() - start
    check_standard_ops(model)
    blob = model.SerializeToString()
    batches = VERIFY_BATCHES if batch is None else (batch,)
    errors = verify(onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"]), grounder, batches)
    description = describe(grounder, model.graph, opset, checkpoint, errors, batches)
    atomic_write(out, blob)
    write_json_atomic(sidecar, description, indent=1)
    return OnnxExport(out, sidecar, description, seconds)


def _format(errors: dict[str, float]) -> str:
    return ", ".join(f"{name} {error:.1e}" for name, error in errors.items())


def run(args: argparse.Namespace) -> int:
    """``sambridge export --format onnx`` with parsed arguments; returns the exit code."""
    phrases = command_phrases(args.text, args.vocabulary, "export")
    top_k = DEFAULT_TOP_K if args.top_k is None else args.top_k
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    done = export_onnx(args.checkpoint, args.out, phrases, top_k=top_k, opset=opset, batch=args.batch,
                       masks=args.masks or "head")
    about, parity = done.description, done.description["parity"]
    print(f"ONNX graph written to {done.path} ({done.path.stat().st_size / 2**20:.1f} MiB, opset {about['opset']}, "
          f"batch {about['batch'] or 'dynamic'}, {len(about['phrases'])} phrase(s), top {about['top_k']}) in "
          f"{done.seconds:.0f} s; what its tensors mean: {done.sidecar}\nonnxruntime CPU against PyTorch fp32 "
          f"(batches {parity['batches']}), max relative error: {_format(parity['max_relative_error'])}")
    return 0
