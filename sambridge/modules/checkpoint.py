"""A sambridge module's Lightning checkpoint read back: what it may hold, the model it trained, a teacher.

``sambridge.checkpointing`` writes checkpoints and picks the one to resume from; plain weight files
(official SAM2/SAM3 releases, student files) are read by :mod:`sambridge.models.checkpoint_io`. A
training checkpoint's ``hyper_parameters`` hold sambridge's config dataclasses (Lightning pickles the
module's arguments), so it is read with ``weights_only=True`` and :data:`CONFIG_CLASSES` allowed: plain
data and those dataclasses, nothing that runs code. Every reader of training checkpoints (export,
inference, a teacher for distillation or pseudo-labelling) uses this one list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from sambridge.losses import GroundingLossWeights
from sambridge.losses.distill import DistillWeights
from sambridge.models import (
    CheckpointError,
    HeadConfig,
    LoraSettings,
    SAM3Teacher,
    apply_finetune_mode,
    create_model,
    load_student,
    merge_lora,
)
from sambridge.models.checkpoint_io import load_state_dict_strict, read_weights
from sambridge.models.sam3_teacher import check_teacher_name, official_teacher
from sambridge.models.standalone import architecture_args
from sambridge.modules.grounding import PredictSettings, apply_prediction_settings
from sambridge.optim import OptimizerConfig

CONFIG_CLASSES: tuple[type | tuple[type, str], ...] = (
    OptimizerConfig, LoraSettings, GroundingLossWeights, PredictSettings, DistillWeights, HeadConfig,
    (GroundingLossWeights, "sambridge.modules.grounding.GroundingLossWeights"),
)
"""sambridge's config dataclasses that Lightning pickles into ``hyper_parameters``: the only classes a
training checkpoint may hold besides plain data (``torch.serialization.safe_globals`` entries; a
``(class, name)`` pair reads checkpoints written while the class lived at ``name``)."""

STUDENT_SPEC_KEY = "sambridge_student"
"""Checkpoint entry ``{"model": name, "model_args": {...}}`` naming the trained model (``DistillModule``
writes it); without it the ``GroundingModule`` hyper-parameters are read (``image_size`` is the model's)."""

MODEL_PREFIX = "model."
"""Prefix of the trained model's entries in a module's ``state_dict``."""


def read_checkpoint(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """``read_weights`` (``weights_only=True``) allowing :data:`CONFIG_CLASSES`: any weight file or
    training checkpoint; ``what`` names it in error messages."""
    with torch.serialization.safe_globals(list(CONFIG_CLASSES)):
        return read_weights(path, what)


def is_lightning_checkpoint(blob: object) -> bool:
    """Whether what a file held is a Lightning checkpoint of a module (state dict and hyper-parameters)."""
    return isinstance(blob, dict) and "state_dict" in blob and "hyper_parameters" in blob


def read_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint of a sambridge module (read as :func:`read_checkpoint`)."""
    blob = read_checkpoint(path, "Lightning checkpoint")
    if not is_lightning_checkpoint(blob):
        keys = sorted(blob)[:5] if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint of a sambridge module (top level: {keys})"
        )
    return blob


def trained_model_spec(checkpoint: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(registered name, ``create_model`` overrides) of the model a checkpoint trained."""
    if STUDENT_SPEC_KEY in checkpoint:
        spec = checkpoint[STUDENT_SPEC_KEY]
        return spec["model"], dict(spec["model_args"])
    hparams = checkpoint["hyper_parameters"]
    if "model" not in hparams:
        raise CheckpointError(f"checkpoint hyper-parameters name no model (keys: {sorted(hparams)})")
    args = dict(hparams.get("model_args") or {})
    if hparams.get("image_size") is not None:
        args["image_size"] = hparams["image_size"]
    return hparams["model"], args


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trained model's weights of a module's checkpoint (its ``model.*`` entries, prefix removed)."""
    return {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}


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
    if hasattr(model, "refine_masks"):  # the mask source, outputs, NMS and score the run validated with
        apply_prediction_settings(model, hparams.get("sam2_checkpoint"), hparams.get("prediction"),
                                  score_absent=_trains_absent_scores(hparams.get("loss")))
    return model.eval(), name, model_args


def _trains_absent_scores(loss: Any) -> bool:
    """Whether a run's recorded loss settings (a dict or a dataclass, of any task) set ``score_absent``."""
    return bool(loss.get("score_absent", False) if isinstance(loss, dict) else getattr(loss, "score_absent", False))


def load_trained_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The grounding model of a sambridge Lightning checkpoint (``.ckpt``) or an exported student, in eval mode.

    A Lightning checkpoint (``GroundingModule``, ``DistillModule``) is rebuilt from the registered
    model name and build arguments it records, LoRA adapters merged (:func:`model_from_checkpoint`):
    only the trained model, so a distillation checkpoint needs neither its teacher nor the weight
    files it started from. Everything loads with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = None
    if path.suffix != ".safetensors":
        with torch.serialization.safe_globals(list(CONFIG_CLASSES)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if is_lightning_checkpoint(checkpoint):
        model, _, _ = model_from_checkpoint(path)
        return model.to(map_location).eval()
    return load_student(path, device=map_location).eval()


def load_teacher(
    path: str | os.PathLike, model: str | None = None, device: torch.device | str = "cpu", **overrides
) -> SAM3Teacher:
    """A frozen SAM3 teacher from an official ``sam3.pt`` or a sambridge Lightning checkpoint.

    Args:
        path: An official SAM3 checkpoint (``detector.*``/``tracker.*`` keys), or a checkpoint
            written by training a ``GroundingModule`` whose model is a SAM3 teacher (its
            ``hyper_parameters`` name the registered model, its ``model_args`` and ``image_size``).
        model: Registered teacher to build for an official checkpoint (default ``sam3_image``);
            must agree with the model named in a Lightning checkpoint.
        device: Where the teacher goes.
        overrides: Further ``create_model`` overrides (e.g. ``bf16=False``).
    """
    blob = read_checkpoint(path, "teacher checkpoint")
    if is_lightning_checkpoint(blob):
        name, kwargs = trained_model_spec(blob)
        if model is not None and model != name:
            raise ValueError(f"{path} holds a {name!r} model, not {model!r}")
        check_teacher_name(name, path)
        teacher = create_model(name, **{**kwargs, **overrides})
        load_state_dict_strict(teacher, model_state(blob), f"GroundingModule checkpoint {path} (model.* entries)")
    else:
        teacher = official_teacher(blob, path, model=model, **overrides)
    return teacher.freeze().to(device)
