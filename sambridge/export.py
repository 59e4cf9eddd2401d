"""``sambridge export``: a training checkpoint -> a standalone student file.

    sambridge export --checkpoint runs/distill/checkpoints/last.ckpt --out student.pt

Reads a Lightning checkpoint of a ``DistillModule`` or ``GroundingModule`` (``weights_only``: only
sambridge's own config dataclasses are allowed besides plain data; :mod:`sambridge.modules.checkpoint`),
rebuilds the trained model from its registered name and build arguments, merges LoRA adapters, and
writes weights + name + build arguments (:mod:`sambridge.models.standalone`). The file is then loaded
back and must predict exactly what the trained model predicts, or nothing is written. Load it with
``sambridge.models.load_student(path)``: no teacher, optimiser state or Lightning needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from sambridge.models import (
    CheckpointError,
    LoraSettings,
    apply_finetune_mode,
    create_model,
    load_student,
    merge_lora,
    save_adapters,
    save_student,
)
from sambridge.models.checkpoint_io import load_state_dict_strict
from sambridge.models.standalone import architecture_args
from sambridge.modules.checkpoint import MODEL_PREFIX, model_state, read_lightning_checkpoint, trained_model_spec
from sambridge.modules.grounding import apply_prediction_settings
from sambridge.parsers import export_parser

_PROBE_PHRASES = ("object", "red thing")


def _check_rebuildable(model_args: dict[str, Any], model: nn.Module) -> None:
    """Refuse weight sources that also change the architecture (a student file could not rebuild it)."""
    tag, text_model = model_args.get("text_pretrained"), getattr(model.text_encoder, "model_name", None)
    if (
        isinstance(tag, str)
        and text_model
        and open_clip.get_pretrained_cfg(text_model, tag).get("quick_gelu")
    ):
        raise CheckpointError(
            f"text_pretrained={tag!r} gives {text_model!r} QuickGELU activations, which a student file "
            "cannot record yet; train with the weight file path instead"
        )


def model_from_checkpoint(path: str | os.PathLike, merge: bool = True) -> tuple[nn.Module, str, dict[str, Any]]:
    """The trained model of a Lightning checkpoint (eval mode), its name and build arguments.

    Args:
        path: Checkpoint of a ``DistillModule`` or ``GroundingModule``.
        merge: merge LoRA adapters into the base weights (otherwise they stay peft layers).
    """
    checkpoint = read_lightning_checkpoint(path)
    name, model_args = trained_model_spec(checkpoint)
    model = create_model(name, **architecture_args(model_args))
    _check_rebuildable(model_args, model)
    hparams = checkpoint["hyper_parameters"]
    lora = hparams.get("finetune") == "lora"
    if lora:
        apply_finetune_mode(model, "lora", lora=hparams.get("lora") or LoraSettings())
    load_state_dict_strict(model, model_state(checkpoint), f"checkpoint {path} ({MODEL_PREFIX}* entries)")
    if lora and merge:
        merge_lora(model)
    if hasattr(model, "refine_masks"):  # the mask source, outputs and NMS the run validated with
        apply_prediction_settings(model, hparams.get("sam2_checkpoint"), hparams.get("prediction"))
    return model.eval(), name, model_args


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sambridge export``; returns the exit code."""
    args = export_parser().parse_args(argv)
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
