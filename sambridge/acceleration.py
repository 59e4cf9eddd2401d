"""Speed and memory switches for the image encoder: activation checkpointing and ``torch.compile``.

The image encoder (SAM2's Hiera trunk, or a timm trunk in distillation students) holds most of the
activations and FLOPs at 1008-1024 px, so both switches act on it:

* activation checkpointing recomputes each Hiera block (torch's non-reentrant ``checkpoint_wrapper``)
  or each timm stage (timm's own ``set_grad_checkpointing``) in the backward pass instead of
  keeping its activations. The grounding head needs no switch: sam3's head always checkpoints its
  encoder and decoder layers in training.
* ``torch.compile`` compiles each Hiera block (regional compilation: a block compiles once per
  input shape and is reused, and the head's Python-heavy matching stays eager) or the whole timm
  trunk.

Checkpoint wrappers keep state-dict keys unchanged (torch strips the wrapper's prefix), so a
checkpoint written with a switch on loads with it off and vice versa. Under FSDP use these instead
of the strategy's ``activation_checkpointing_policy`` (Lightning then skips its own).
"""

from __future__ import annotations

from functools import partial

from sam2.modeling.backbones.hieradet import MultiScaleBlock
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from sambridge.models.timm_vision import TimmTrunk


def _trunks(model: nn.Module) -> list[TimmTrunk]:
    return [m for m in model.modules() if isinstance(m, TimmTrunk)]


def _wrapped(model: nn.Module) -> dict[int, nn.Module]:
    """Modules inside a checkpoint wrapper: id -> wrapper."""
    return {id(m._checkpoint_wrapped_module): m for m in model.modules() if isinstance(m, CheckpointWrapper)}


def _hiera_blocks(model: nn.Module) -> list[nn.Module]:
    """Hiera blocks, each as its checkpoint wrapper when it has one (the unit to compile)."""
    wrappers = _wrapped(model)
    return [wrappers.get(id(m), m) for m in model.modules() if isinstance(m, MultiScaleBlock)]


def _no_encoder(model: nn.Module, switch: str) -> ValueError:
    return ValueError(f"{switch}=True but {type(model).__name__} has no SAM2 Hiera block or timm trunk: "
                      "the switch acts on the image encoder only")


def checkpoint_image_encoder(model: nn.Module) -> int:
    """Turn on activation checkpointing in ``model``'s image encoder; returns the units it recomputes.

    Idempotent: blocks already wrapped stay as they are.

    Raises:
        ValueError: when ``model`` has no Hiera block and no timm trunk.
    """
    blocks = [m for m in model.modules() if isinstance(m, MultiScaleBlock)]
    trunks = _trunks(model)
    if not blocks and not trunks:
        raise _no_encoder(model, "activation_checkpointing")
    wrapped = _wrapped(model)
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, MultiScaleBlock) and id(m) not in wrapped)
    for trunk in trunks:
        trunk.body.set_grad_checkpointing(True)
    return len(blocks) + len(trunks)


def compile_image_encoder(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` each Hiera block (with its checkpoint wrapper, if any) or timm trunk, in place.

    Compilation happens lazily at the first forward. Returns the number of compiled modules.

    Args:
        model: the model whose image encoder to compile.
        **compile_kwargs: passed to ``nn.Module.compile`` (``mode``, ``dynamic``, ``backend``...).

    Raises:
        ValueError: when ``model`` has no Hiera block and no timm trunk.
    """
    units = _hiera_blocks(model) + [trunk.body for trunk in _trunks(model)]
    if not units:
        raise _no_encoder(model, "compile")
    for unit in units:
        unit.compile(**compile_kwargs)
    return len(units)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``nn.Module.compile`` was called on ``module``."""
    return getattr(module, "_compiled_call_impl", None) is not None
