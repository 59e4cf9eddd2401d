"""Host synchronisations and operator counts of a piece of PyTorch code, measured on any device.

A CUDA device waits for the host whenever Python reads a value off it: ``aten::_local_scalar_dense``
(``.item()``, ``int()``/``float()``/``bool()`` of a tensor), operators whose output size depends on
the data (``nonzero``, boolean indexing, ``masked_select``, ``unique``), ``torch.equal``, and copies
to the host (``.cpu()``, ``.tolist()``). :class:`HostSyncCounter` counts them under the torch
profiler, so they can be counted on a CPU: there every tensor is on the host, so the count is an
upper bound of what a GPU waits for (a ``.cpu()`` of a tensor already on the host counts too).
``repeat_interleave`` without ``output_size`` counts once (a CUDA device syncs once; the CPU kernel
reads two scalars). Top-level operators are the ``aten::`` calls made from Python (not from inside
another operator): a measure of launch overhead.
"""

from __future__ import annotations

from types import TracebackType

from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

SYNC_OPS = {
    "aten::_local_scalar_dense": "item",  # .item(), int()/float()/bool() of a tensor, C++ reads of a scalar
    "aten::nonzero": "nonzero",  # also boolean-mask indexing and torch.where(cond)
    "aten::masked_select": "masked_select",
    "aten::_unique2": "unique",
    "aten::unique_dim": "unique",
    "aten::unique_consecutive": "unique",
    "aten::equal": "equal",
}
"""Profiler events that make a CUDA device wait for the host, and the kind they are counted under."""

HOST_COPIES = ("cpu", "tolist")
"""Tensor methods that copy to the host (seen through a torch-function mode: on a CPU they dispatch nothing;
``numpy()`` takes host tensors only)."""


HOST_ONLY_PARENTS = ("aten::_fused_adamw_", "aten::_fused_adam_", "aten::_assert_async")
"""Operators whose scalar reads happen on a CPU only: the fused optimisers' CPU kernels read each
parameter's step count, ``_assert_async`` checks on the host; on a GPU both stay on the device."""


def _aten_ancestor(event):
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    return parent


def count_syncs_and_ops(events, host_copies: dict[str, int]) -> tuple[dict[str, int], int]:
    """Host syncs by kind, and the number of top-level ``aten::`` operators, in profiler ``events``."""
    syncs: dict[str, int] = {}
    top_level = 0
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        ancestor = _aten_ancestor(event)
        if ancestor is None:
            top_level += 1
        kind = SYNC_OPS.get(event.name)
        if event.name == "aten::repeat_interleave" and ancestor is None:
            kind = "repeat_interleave"  # counted once here; its inner scalar reads are skipped below
        elif kind == "item" and ancestor is not None and ancestor.name == "aten::repeat_interleave":
            kind = None
        elif kind == "nonzero" and ancestor is not None and ancestor.name in SYNC_OPS:
            kind = None
        if kind and any(a.name in HOST_ONLY_PARENTS for a in _ancestors(event)):
            kind = None
        if kind == "repeat_interleave" and not any(c.name == "aten::_local_scalar_dense"
                                                  for c in _descendants(event)):
            kind = None  # given output_size: no sync
        if kind:
            syncs[kind] = syncs.get(kind, 0) + 1
    for name, count in host_copies.items():
        if count:
            syncs[name] = syncs.get(name, 0) + count
    return syncs, top_level


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


class HostCopies(TorchFunctionMode):
    """Counts ``.cpu()`` and ``.tolist()`` calls (on a CPU they dispatch no operator the profiler sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = dict.fromkeys(HOST_COPIES, 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.counts:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """``with HostSyncCounter() as counter: ...`` then ``counter.syncs`` (host syncs by kind) and
    ``counter.top_level_ops`` (``aten::`` operators called from Python) of the code in the block."""

    def __init__(self) -> None:
        self.syncs: dict[str, int] = {}
        self.top_level_ops = 0
        self._profiler = profile(activities=[ProfilerActivity.CPU])
        self._copies = HostCopies()

    @property
    def total(self) -> int:
        """Host syncs of every kind."""
        return sum(self.syncs.values())

    def __enter__(self) -> HostSyncCounter:
        self._profiler.__enter__()
        self._copies.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._copies.__exit__(kind, error, trace)
        self._profiler.__exit__(kind, error, trace)
        self.syncs, self.top_level_ops = count_syncs_and_ops(self._profiler.events(), self._copies.counts)
