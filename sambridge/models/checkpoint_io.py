"""Reading weight files safely and loading them with strict, readable key checks."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A weight file is missing, unreadable, or does not match the model it is loaded into."""


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def read_weights(path: str | os.PathLike, what: str) -> dict:
    """Load a ``torch.save`` file (``weights_only=True``) or a ``.safetensors`` file onto the CPU.

    Args:
        path: The weight file.
        what: What the file should contain, for error messages (e.g. "SAM2 checkpoint").
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types
        raise CheckpointError(f"cannot read {what} {path}: {err}") from err


def check_state_dict(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], source: str) -> None:
    """Raise ``CheckpointError`` naming missing/unexpected keys and shape mismatches.

    Args:
        expected: The model's state dict (the keys and shapes that must be provided).
        found: The state dict read from ``source``.
        source: Where ``found`` comes from, for the error message.
    """
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    wrong_shape = [
        f"{k} (file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): {_listing(wrong_shape)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """``module.load_state_dict`` after ``check_state_dict`` (so errors name every bad key)."""
    check_state_dict(module.state_dict(), state_dict, source)
    module.load_state_dict(state_dict, strict=True)
