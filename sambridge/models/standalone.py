"""Standalone student files: a trained grounding model that loads without Lightning, the teacher or
the training code's optimiser state.

A student file holds the model's weights (plain tensors), the registered model name and the
``create_model`` overrides that rebuild its architecture (JSON). Two containers, chosen by suffix:

* ``.safetensors``: the tensors, with ``{"format", "model", "model_args"}`` in the header metadata;
* anything else (e.g. ``student.pt``): a ``torch.save`` dict ``{"format", "model", "model_args",
  "state_dict"}`` of tensors and strings only, so ``torch.load(..., weights_only=True)`` reads it.

``model_args`` never name weight files (they are applied already): ``load_student`` builds the
architecture from random weights and loads the file strictly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from data_pipelines.atomic import atomic_write
from sambridge.models.checkpoint_io import CheckpointError, load_state_dict_strict
from sambridge.models.grounded_sam2 import DETECTION_SCORES, INSTANCE_SOURCES
from sambridge.models.registry import create_model

STUDENT_FORMAT = "sambridge-student-v1"

WEIGHT_SOURCE_ARGS = ("sam2_checkpoint", "sam3_checkpoint", "text_pretrained", "timm_pretrained")
"""Builder arguments that only say where initial weights come from; a student file replaces them."""


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot store build argument of type {type(value).__name__} in a student file")


def architecture_args(model_args: dict[str, Any]) -> dict[str, Any]:
    """``model_args`` without the weight-source arguments, as JSON-compatible values."""
    kept = {k: v for k, v in model_args.items() if k not in WEIGHT_SOURCE_ARGS}
    return json.loads(json.dumps(kept, default=_jsonable))


#: Header field -> model attribute of the read-out a run validated with (``prediction.outputs``, the NMS).
READ_OUT_FIELDS = {"one_to_many": "one_to_many_outputs", "nms_iou": "nms_iou", "mask_nms": "mask_nms"}


def _valid_read_out(field: str, value: Any) -> bool:
    if field == "one_to_many":
        return isinstance(value, bool)
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1)


def save_student(model: nn.Module, name: str, model_args: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``model``'s weights with the registered ``name`` and architecture ``model_args`` (atomically).

    Args:
        model: The trained model (LoRA adapters merged already).
        name: Its registered name (``create_model(name, **model_args)`` rebuilds the architecture).
        model_args: Overrides of the registered defaults; weight-source arguments are dropped.
        path: Output file; ``.safetensors`` or a ``torch.save`` file (see the module docstring).
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": STUDENT_FORMAT, "model": name,
              "model_args": json.dumps(architecture_args(model_args), sort_keys=True),
              "refine_masks": json.dumps(bool(getattr(model, "refine_masks", True))),  # its validated mask source
              "instances": getattr(model, "instances", "queries"),  # detection source
              "detection_score": getattr(model, "detection_score", "match_x_presence"),  # and score
              **{field: json.dumps(getattr(model, attr)) for field, attr in READ_OUT_FIELDS.items()
                 if hasattr(model, attr)}}
    if path.suffix == ".safetensors":
        return atomic_write(path, safetensors_bytes(state, metadata=header))
    return atomic_write(path, lambda file: torch.save({**header, "state_dict": state}, file))


def read_student(path: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(registered name, architecture overrides, state dict) of a student file."""
    header, state = _read_student_file(path)
    return header["model"], json.loads(header["model_args"]), state


def _read_student_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"student file not found: {path}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    else:
        try:
            header = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types
            raise CheckpointError(f"cannot read student file {path}: {err}") from err
        state = header.get("state_dict") if isinstance(header, dict) else None
    if not isinstance(header, dict) or header.get("format") != STUDENT_FORMAT or not isinstance(state, dict):
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise CheckpointError(
            f"{path} is not a sambridge student file (format {found!r}, expected "
            f"{STUDENT_FORMAT!r}); write one with `sambridge export`"
        )
    return header, state


def load_student(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild and load a student file written by ``save_student`` / ``sambridge export``; eval mode.

    Args:
        path: The student file.
        device: Where the model goes.
    """
    header, state = _read_student_file(path)
    model = create_model(header["model"], **json.loads(header["model_args"]))
    load_state_dict_strict(model, state, f"student file {path}")
    if "refine_masks" in header and hasattr(model, "refine_masks"):  # files before it was recorded: the default
        model.refine_masks = json.loads(header["refine_masks"])
    for field, allowed in (("instances", INSTANCE_SOURCES), ("detection_score", DETECTION_SCORES)):
        if field in header and hasattr(model, field):
            if header[field] not in allowed:
                raise CheckpointError(f"student file {path}: header field {field!r} is {header[field]!r}, "
                                      f"expected one of {', '.join(allowed)}")
            setattr(model, field, header[field])
    for field, attr in READ_OUT_FIELDS.items():  # files from before they were recorded: the model's defaults
        if field in header and hasattr(model, attr):
            try:
                value = json.loads(header[field])
            except (TypeError, json.JSONDecodeError):
                value = header[field]
            if not _valid_read_out(field, value):
                raise CheckpointError(f"student file {path}: header field {field!r} is {header[field]!r}, expected "
                                      + ("true or false" if field == "one_to_many" else "null or a number in [0, 1]"))
            setattr(model, attr, value)
    return model.eval().to(device)
