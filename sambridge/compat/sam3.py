"""CPU, ``torch.compile`` and host-sync compatibility shim for sam3 0.1.4.

sam3 0.1.4 assumes a CUDA device in four places. Each patch 1-4 changes behaviour only where that
assumption fails (no CUDA device, or CPU tensors), except 3's empty-box shortcut, which gives the
same result everywhere; 5 and 6 give the same values without host reads. Upstream fixed the first three
after 0.1.4; drop those when the pin moves past it.

1. ``PositionEmbeddingSine(precompute_resolution=...)`` fills its cache with tensors created on
   ``device="cuda"``. Without CUDA the precomputation is skipped (the cache fills lazily).
2. ``TransformerDecoder(resolution=..., stride=...)`` precomputes box-RPB coordinates on
   ``device="cuda"``. Without CUDA they are computed lazily per feature size instead.
3. ``SequenceGeometryEncoder._encode_boxes`` calls ``Tensor.pin_memory()``, which needs a CUDA
   driver and which ``torch.compile`` cannot trace. Without boxes (every text-only query) it returns
   the empty embedding directly; with boxes and without CUDA pinning is a no-op for that call.
4. ``sam3.train.loss.loss_fns.sigmoid_focal_loss`` defaults to a Triton kernel (used by the
   ``Masks`` loss); on CPU tensors it falls back to sam3's own PyTorch implementation.
5. sam3's score loss logs a ``ce_f1`` metric through ``torchmetrics.functional.f1_score`` on every
   call, whose argument checks read the device 8 times a training step. The loss module sees a
   binary F1 of the same value (threshold 0.5, 0 when undefined) computed on the device instead.
6. sam3's box loss takes GIoU from ``box_ops.fast_diag_generalized_box_iou`` (TorchScript), whose
   areas are ``torch.prod`` over (w, h): prod's backward checks its input for zeros on the host,
   15 device reads a training step. The same function with ``w * h`` gives the same values and
   gradients without them.

Patches 1-2 only matter for ``sam3.model_builder``'s factories (sambridge's own head builder
never passes those arguments). ``apply_sam3_compat()`` is idempotent and cheap; builders that
need it call it, nothing is patched on import.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator

import torch

_MARK = "_sambridge_compat"


def _mark(fn: Callable) -> Callable:
    setattr(fn, _MARK, True)
    return fn


def _is_patched(fn: Callable) -> bool:
    return getattr(fn, _MARK, False)


def _drop_cuda_precompute(cls: type, **cpu_values: object) -> None:
    """Wrap ``cls.__init__`` so that, without CUDA, ``cpu_values`` override the caller's kwargs."""
    original = cls.__init__
    if _is_patched(original):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if not torch.cuda.is_available():
            kwargs.update(cpu_values)
        original(self, *args, **kwargs)

    cls.__init__ = _mark(__init__)


@contextlib.contextmanager
def _pin_memory_disabled() -> Iterator[None]:
    original = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.pin_memory = original


def _skip_pin_memory_without_cuda(cls: type, method_name: str) -> None:
    original = getattr(cls, method_name)
    if _is_patched(original):
        return

    @functools.wraps(original)
    def method(self, boxes, boxes_mask, *args, **kwargs):
        if boxes.shape[0] == 0:  # (0, B, d) whatever the branches: the label embedding's dtype
            return self.label_embed.weight.new_zeros(0, boxes.shape[1], self.d_model), boxes_mask
        args = (boxes, boxes_mask, *args)
        if torch.cuda.is_available():
            return original(self, *args, **kwargs)
        with _pin_memory_disabled():
            return original(self, *args, **kwargs)

    setattr(cls, method_name, _mark(method))


def _focal_loss_triton_on_cuda_only(module) -> None:
    original = module.sigmoid_focal_loss
    if _is_patched(original):
        return

    @functools.wraps(original)
    def sigmoid_focal_loss(inputs, targets, *args, triton: bool = True, **kwargs):
        return original(inputs, targets, *args, triton=triton and inputs.is_cuda, **kwargs)

    module.sigmoid_focal_loss = _mark(sigmoid_focal_loss)


def binary_f1(preds: torch.Tensor, target: torch.Tensor, task: str = "binary", threshold: float = 0.5) -> torch.Tensor:
    """``torchmetrics.functional.f1_score(preds, target, task="binary")`` of probabilities ``preds``, without
    host reads: 2 TP / (2 TP + FP + FN), 0 where nothing is predicted or true."""
    if task != "binary":
        raise ValueError(f"only task='binary' is replaced, got {task!r}")
    predicted, true = preds > threshold, target.bool()
    tp = (predicted & true).sum()
    wrong = (predicted ^ true).sum()
    return (2 * tp / (2 * tp + wrong).clamp(min=1)).float()


def _sync_free_f1(module) -> None:
    if _is_patched(module.torchmetrics):
        return
    module.torchmetrics = _mark(types.SimpleNamespace(functional=types.SimpleNamespace(f1_score=binary_f1)))


def _area(sides: torch.Tensor) -> torch.Tensor:
    return sides[..., 0] * sides[..., 1]


def diag_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """sam3's ``fast_diag_generalized_box_iou`` (GIoU of matching rows of two (N, 4) xyxy box sets) with
    areas as ``w * h`` instead of ``prod``, whose backward reads the device."""
    if len(boxes1) != len(boxes2):
        raise ValueError(f"need as many boxes in both sets, got {len(boxes1)} and {len(boxes2)}")
    lo1, hi1, lo2, hi2 = boxes1[:, :2], boxes1[:, 2:], boxes2[:, :2], boxes2[:, 2:]
    inter = _area((torch.min(hi1, hi2) - torch.max(lo1, lo2)).clamp(min=0))
    hull = _area((torch.max(hi1, hi2) - torch.min(lo1, lo2)).clamp(min=0))
    union = _area(hi1 - lo1) + _area(hi2 - lo2) - inter
    return inter / union - (hull - union) / hull


def _sync_free_giou(box_ops) -> None:
    if _is_patched(box_ops.fast_diag_generalized_box_iou):
        return
    box_ops.fast_diag_generalized_box_iou = _mark(diag_generalized_box_iou)


def apply_sam3_compat() -> None:
    """Install the six patches described in the module docstring (idempotent)."""
    import sam3.model.box_ops as box_ops
    import sam3.model.decoder as decoder
    import sam3.model.geometry_encoders as geometry_encoders
    import sam3.model.position_encoding as position_encoding
    import sam3.train.loss.loss_fns as loss_fns

    _drop_cuda_precompute(position_encoding.PositionEmbeddingSine, precompute_resolution=None)
    _drop_cuda_precompute(decoder.TransformerDecoder, resolution=None, stride=None)
    _skip_pin_memory_without_cuda(geometry_encoders.SequenceGeometryEncoder, "_encode_boxes")
    _focal_loss_triton_on_cuda_only(loss_fns)
    _sync_free_f1(loss_fns)
    _sync_free_giou(box_ops)
