"""Gradient clipping with the optimiser every run builds (fused AdamW) under a mixed-precision plugin.

Lightning's ``MixedPrecision.clip_gradients`` refuses optimisers that unscale gradients themselves
(fused AdamW), and every real-size config sets ``precision: bf16-mixed`` and ``gradient_clip_val``;
``BaseTask.configure_gradient_clipping`` clips itself. Torch's fused AdamW runs on CPUs too, so the
GPU path runs here as it does on a GPU.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from sambridge.modules.base import BaseTask
from sambridge.optim import OptimizerConfig, build_optimizer

CLIP = 0.5


def total_norm(parameters) -> float:
    grads = [p.grad for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


class FusedOptimizerTask(BaseTask):
    """A two-layer regression with the default (fused) optimiser; records gradient norms before
    clipping (``on_before_optimizer_step``) and those the optimiser stepped with (after clipping)."""

    def configure_models(self) -> None:
        self.model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        self.before_clip: list[float] = []
        self.at_step: list[float] = []

    def _shared_step(self, batch, stage: str) -> dict:
        return {"loss": 10 * (self.model(batch) - 5).pow(2).mean()}  # gradients well above the clip value

    def configure_optimizers(self) -> dict:
        config = super().configure_optimizers()
        optimizer = config["optimizer"]
        assert optimizer.defaults["fused"], "the default builds fused AdamW"
        optimizer.register_step_post_hook(self._stepped)
        return config

    def _stepped(self, optimizer, args, kwargs) -> None:
        self.at_step.append(total_norm(self.parameters()))
        if len(self.at_step) == 1:  # AdamW's first moment is (1 - beta1) x the gradient it stepped with
            beta1 = optimizer.param_groups[0]["betas"][0]
            self.first_moment_over_grad = [
                float(optimizer.state[p]["exp_avg"].norm() / ((1 - beta1) * p.grad.norm())) for p in self.parameters()]

    def on_before_optimizer_step(self, optimizer) -> None:
        self.before_clip.append(total_norm(self.parameters()))


def fit(precision: str, algorithm: str = "norm") -> FusedOptimizerTask:
    pl.seed_everything(0)
    task = FusedOptimizerTask(optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0, total_steps=10))
    before = [p.detach().clone() for p in task.parameters()]
    if precision == "16-mixed":  # Lightning picks bf16 on a CPU unless given the plugin with a scaler
        precision_args = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=8.0))]}
    else:
        precision_args = {"precision": precision}
    trainer = pl.Trainer(accelerator="cpu", devices=1, **precision_args, gradient_clip_val=CLIP,
                         gradient_clip_algorithm=algorithm, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, torch.utils.data.DataLoader(torch.randn(12, 8), batch_size=4))
    stepped = [not torch.equal(a, b) for a, b in zip(before, task.parameters(), strict=True)]
    assert all(stepped), "the optimiser did not step"
    return task


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_fused_adamw_with_gradient_clipping_trains(precision: str) -> None:
    task = fit(precision)
    assert len(task.at_step) == 3
    assert min(task.before_clip) > CLIP, "the test needs gradients above the clip value"
    for norm in task.at_step:
        assert norm == pytest.approx(CLIP, rel=1e-3), f"gradient norm {norm} after clipping to {CLIP}"
    # what the optimiser used is the clipped gradient: unscaled once (16-mixed's scaler), not twice
    assert task.first_moment_over_grad == pytest.approx([1.0] * 4, rel=1e-3)


def test_clipping_by_value_with_fused_adamw() -> None:
    task = fit("bf16-mixed", algorithm="value")
    for p in task.parameters():
        assert p.grad is None or p.grad.abs().max() <= CLIP


def test_fused_by_default_on_the_cpu_too_and_off_when_asked() -> None:
    groups = {"all": list(nn.Linear(2, 2).named_parameters())}
    assert build_optimizer(groups, OptimizerConfig(), 10)[0].defaults["fused"]
    assert not build_optimizer(groups, OptimizerConfig(fused=False), 10)[0].defaults["fused"]

