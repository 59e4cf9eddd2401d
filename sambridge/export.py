"""``sambridge export``: a training checkpoint -> a standalone student file, or a model -> ONNX.

    sambridge export --checkpoint runs/distill/checkpoints/last.ckpt --out student.pt
    sambridge export --format onnx --checkpoint student.pt --vocabulary phrases.txt --out student.onnx

Reads a Lightning checkpoint of a ``DistillModule`` or ``GroundingModule`` (``weights_only``: only
sambridge's own config dataclasses are allowed besides plain data; :mod:`sambridge.modules.checkpoint`),
rebuilds the trained model from its registered name and build arguments, merges LoRA adapters, and
writes weights + name + build arguments (:mod:`sambridge.models.standalone`). The file is then loaded
back and must predict exactly what the trained model predicts, or nothing is written. Load it with
``sambridge.models.load_student(path)``: no teacher, optimiser state or Lightning needed.

``--format onnx`` exports a Lightning checkpoint or a student file with a fixed vocabulary for
deployment (:mod:`sambridge.onnx_export`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sambridge.models import CheckpointError, load_student, save_adapters, save_student
from sambridge.modules.checkpoint import model_from_checkpoint
from sambridge.parsers import export_parser

_PROBE_PHRASES = ("object", "red thing")


@torch.no_grad()
def _probe(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, model.image_size, model.image_size, generator=generator)
    out = model(images, list(_PROBE_PHRASES), torch.zeros(len(_PROBE_PHRASES), dtype=torch.long))
    return {k: out[k] for k in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec")}


def export_student(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the trained model of ``checkpoint`` as a student file and check that it reloads exactly.

    Returns:
        The written path.

    Raises:
        CheckpointError: unreadable checkpoint, or a file that would not reproduce the model
            (then nothing is left at ``out``).
    """
    model, name, model_args = model_from_checkpoint(checkpoint)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out or remove it first")
    save_student(model, name, model_args, out)
    expected, reloaded = _probe(model), _probe(load_student(out))
    differ = [k for k in expected if not torch.equal(expected[k], reloaded[k])]
    if differ:
        out.unlink()
        raise CheckpointError(
            f"the exported {name!r} does not reproduce the trained model ({differ} differ); "
            "nothing was written"
        )
    return out


def export_adapters(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write only the LoRA adapters (and the trained head) of a ``finetune: lora`` checkpoint.

    The file (``sambridge.models.save_adapters`` format, a few MiB) goes back onto the base model the
    run started from (the same official checkpoint) with ``sambridge.models.load_adapters``.
    """
    model, _, _ = model_from_checkpoint(checkpoint, merge=False)
    if getattr(model, "lora_settings", None) is None:
        raise CheckpointError(f"{checkpoint} was not trained with finetune: lora; it has no adapters to export")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out or remove it first")
    return save_adapters(model, out)


def _onnx_options(args: argparse.Namespace) -> list[str]:
    """The ``--format onnx`` options given."""
    given = {"--text": args.text, "--vocabulary": args.vocabulary, "--top-k": args.top_k is not None,
             "--opset": args.opset is not None, "--batch": args.batch is not None, "--masks": args.masks is not None}
    return [flag for flag, value in given.items() if value]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sambridge export``; returns the exit code."""
    parser = export_parser()
    args = parser.parse_args(argv)
    if args.format == "onnx":
        if args.adapters_only:
            parser.error("--adapters-only writes LoRA adapters, not an ONNX graph")
        from sambridge.onnx_export import run  # lazy: onnx, onnxruntime and onnxscript load for --format onnx only

        return run(args)
    if _onnx_options(args):
        parser.error(f"{', '.join(_onnx_options(args))} only go with --format onnx")
    if args.adapters_only:
        path = export_adapters(args.checkpoint, args.out)
        print(f"adapters written to {path} ({path.stat().st_size / 2**20:.1f} MiB); load them onto the base "
              f"model with sambridge.models.load_adapters(model, {str(path)!r})")
        return 0
    path = export_student(args.checkpoint, args.out)
    print(
        f"student written to {path} ({path.stat().st_size / 2**20:.1f} MiB); "
        f"load it with sambridge.models.load_student({str(path)!r})"
    )
    return 0
