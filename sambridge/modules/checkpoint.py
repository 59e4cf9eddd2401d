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
from typing import Any

import torch

from sambridge.losses.distill import DistillWeights
from sambridge.models import CheckpointError, HeadConfig, LoraSettings, SAM3Teacher, create_model
from sambridge.models.checkpoint_io import load_state_dict_strict, read_weights
from sambridge.models.sam3_teacher import check_teacher_name, official_teacher
from sambridge.modules.grounding import GroundingLossWeights, PredictSettings
from sambridge.optim import OptimizerConfig

CONFIG_CLASSES: tuple[type, ...] = (
    OptimizerConfig, LoraSettings, GroundingLossWeights, PredictSettings, DistillWeights, HeadConfig
)
"""sambridge's config dataclasses that Lightning pickles into ``hyper_parameters``: the only classes a
training checkpoint may hold besides plain data."""

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
