"""Optimiser with per-group learning rates, layer decay, weight-decay exclusions; warmup + cosine."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    """AdamW settings with parameter groups.

    Args:
        lr: base learning rate (the grounding head's).
        lr_multipliers: learning-rate factor per model parameter group (``backbone``, ``text``,
            ``head``, ``sam2_decoder``, ``adapters``, ...); groups not listed use 1.0.
        weight_decay: AdamW weight decay, not applied to biases, norms, embeddings and
            positional encodings.
        layer_decay: factor per transformer block from the top of the image encoder down
            (``lr * layer_decay ** (depth - block)``); 1.0 disables it.
        betas: AdamW betas.
        warmup_steps: linear warm-up steps from ``warmup_start_factor * lr``.
        warmup_start_factor: learning-rate factor at step 0.
        min_lr_ratio: the cosine schedule ends at ``min_lr_ratio * lr``.
        total_steps: schedule length; ``None`` takes the trainer's estimated stepping batches.
        fused: torch's fused AdamW (one kernel for all parameters, no host synchronisation);
            ``null``: fused when every trainable parameter is a float tensor on a GPU or the CPU
            (a CPU step of the demo model's optimiser: 9.5 ms fused, 34 ms unfused; docs/benchmarks.md).
            Gradient clipping works with either (``BaseTask.configure_gradient_clipping``).
    """

    lr: float = 1e-4
    lr_multipliers: dict[str, float] = field(default_factory=lambda: {"backbone": 0.1, "text": 0.1})
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    warmup_start_factor: float = 0.01
    min_lr_ratio: float = 0.01
    total_steps: int | None = None
    fused: bool | None = None


_FUSED_DEVICES = ("cuda", "cpu")  # where torch has a fused AdamW kernel and sambridge trains
_NO_DECAY = re.compile(r"pos_embed|position|embedding|token|no_mem|norm|\.ln_")
_BLOCK = re.compile(r"\.blocks\.(\d+)\.")


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or bool(_NO_DECAY.search(name))


def build_param_groups(named_groups: dict[str, list[tuple[str, nn.Parameter]]],
                       config: OptimizerConfig) -> list[dict]:
    """Torch optimiser param groups: one per (model group, block depth, decay/no-decay)."""
    buckets: dict[tuple[str, int, bool], dict] = {}
    for group, named in named_groups.items():
        trainable = [(n, p) for n, p in named if p.requires_grad]
        blocks = [int(m.group(1)) for n, _ in trainable if (m := _BLOCK.search(n))]
        depth = max(blocks) + 1 if blocks else 0
        for name, param in trainable:
            block = _BLOCK.search(name)
            level = depth - int(block.group(1)) if (block and group == "backbone") else 0
            decay = not _no_weight_decay(name, param)
            key = (group, level, decay)
            if key not in buckets:
                scale = config.lr_multipliers.get(group, 1.0) * config.layer_decay ** level
                buckets[key] = {"params": [], "names": [], "group": group, "lr": config.lr * scale,
                                "weight_decay": config.weight_decay if decay else 0.0}
            buckets[key]["params"].append(param)
            buckets[key]["names"].append(name)
    return [b for b in buckets.values() if b["params"]]


def warmup_cosine(optimizer: torch.optim.Optimizer, config: OptimizerConfig,
                  total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_lr_ratio``, applied to every group's own lr."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return config.warmup_start_factor + (1 - config.warmup_start_factor) * step / max(warmup, 1)
        progress = min(1.0, (step - warmup) / max(total_steps - warmup, 1))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(named_groups: dict[str, list[tuple[str, nn.Parameter]]], config: OptimizerConfig,
                    total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`build_param_groups` and its :func:`warmup_cosine` schedule."""
    groups = build_param_groups(named_groups, config)
    if not groups:
        raise ValueError("no trainable parameters: check the fine-tuning mode")
    fused = config.fused
    if fused is None:
        fused = all(p.device.type in _FUSED_DEVICES and p.is_floating_point()
                    for g in groups for p in g["params"]) or None
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused)
    return optimizer, warmup_cosine(optimizer, config, total_steps)
