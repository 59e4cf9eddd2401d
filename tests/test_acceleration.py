"""Image-encoder switches (activation checkpointing, torch.compile) and per-step seeding in BaseTask."""

from __future__ import annotations

import pytest
import torch
from run_helpers import one_thread  # noqa: F401  (fixture)
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from sambridge.acceleration import checkpoint_image_encoder, compile_image_encoder, is_compiled
from sambridge.models.timm_vision import TimmVisionAdapter
from sambridge.modules import BaseTask
from sambridge.modules.base import step_seed


class TinyTask(BaseTask):
    """BaseTask around the tiny Grounded SAM2, passing the switches on as subclasses do."""

    def __init__(self, compile: bool = False, activation_checkpointing: bool = False) -> None:
        super().__init__(compile=compile, activation_checkpointing=activation_checkpointing)

    def configure_models(self) -> None:
        from sambridge.models import create_model

        torch.manual_seed(0)
        self.model = create_model("grounded_sam2_tiny", image_size=64)


def gradients(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    from sambridge.losses import GroundingLoss

    torch.manual_seed(3)
    out = model(batch.images, batch.phrases, batch.query_image, targets=batch)
    GroundingLoss()(out, batch)["loss"].backward()
    grads = {name.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
             for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.usefixtures("one_thread")
def test_activation_checkpointing_recomputes_hiera_blocks_with_identical_gradients(make_batch):
    plain, checkpointed = TinyTask(), TinyTask(activation_checkpointing=True)
    keys = set(plain.model.state_dict())
    checkpointed.configure_model()
    checkpointed.configure_model()  # Lightning calls the hook at every fit/validate/test: idempotent
    wrappers = [m for m in checkpointed.model.modules() if isinstance(m, CheckpointWrapper)]
    assert len(wrappers) == 5  # the tiny Hiera's blocks, once each
    assert set(checkpointed.model.state_dict()) == keys  # checkpoints stay interchangeable
    batch = make_batch(64)
    plain.model.train(), checkpointed.model.train()
    expected, got = gradients(plain.model, batch), gradients(checkpointed.model, batch)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_timm_trunks_use_timms_own_checkpointing():
    adapter = TimmVisionAdapter("convnext_atto", d_model=32)
    assert checkpoint_image_encoder(adapter) == 1
    assert adapter.trunk.body.grad_checkpointing
    assert compile_image_encoder(adapter, backend="eager") == 1 and is_compiled(adapter.trunk.body)


def test_compile_compiles_each_block_once():
    task = TinyTask(compile=True, activation_checkpointing=True)
    task.configure_model()
    task.configure_model()
    units = [m for m in task.model.modules() if is_compiled(m)]
    assert len(units) == 5 and all(isinstance(m, CheckpointWrapper) for m in units)


def test_switches_on_a_model_without_an_image_encoder_fail_clearly():
    with pytest.raises(ValueError, match="activation_checkpointing=True but Linear has no SAM2 Hiera block"):
        checkpoint_image_encoder(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="compile=True"):
        compile_image_encoder(nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_compiled_encoder_trains_like_the_eager_one(make_batch):
    eager, compiled = TinyTask(), TinyTask()
    compile_image_encoder(compiled.model, backend="aot_eager")
    batch = make_batch(64)
    eager.model.train(), compiled.model.train()
    expected, got = gradients(eager.model, batch), gradients(compiled.model, batch)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


def test_each_training_step_draws_from_its_own_seed(monkeypatch):
    task = TinyTask()
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    task.on_train_batch_start(None, 5)
    first = torch.rand(4)
    torch.rand(1000)  # whatever ran in between (validation, a loader starting) ...
    task.on_train_batch_start(None, 5)
    assert torch.equal(torch.rand(4), first)  # ... does not change the step's random draws
    task.on_train_batch_start(None, 6)
    assert not torch.equal(torch.rand(4), first)
    assert step_seed(7, 0, 5, 0) != step_seed(7, 0, 5, 1)  # ranks draw different dropout masks
