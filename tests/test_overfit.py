"""The grounding head can memorise a handful of images: a model that cannot, cannot learn anything bigger.

Eight synthetic demo images (colour-shape phrases, positives and exhaustive negatives) form one
fixed batch; the tiny real-architecture Grounded SAM2 trains on it with the demo's recipe and is
scored on the same images with SAM3's metrics. Counting, presence, box and mask quality and score
calibration must all be right for cgF1 to pass 90.
"""

from __future__ import annotations

import pytest
import torch
from run_helpers import one_thread  # noqa: F401  (fixture)

from data_pipelines import ShardDataModule
from data_pipelines.synthetic import generate_synthetic
from sambridge.demo import DEMO_SYNTHETIC
from sambridge.metrics import ConceptSegmentationMetrics
from sambridge.modules import GroundingModule
from sambridge.modules.grounding import GroundingLossWeights
from sambridge.optim import OptimizerConfig, build_optimizer

STEPS = 150
SIZE = 64


def _memorise(tmp_path, loss: GroundingLossWeights) -> dict[str, float]:
    generate_synthetic(tmp_path, image_size=SIZE, num_train=8, num_val=1, num_heldout=1, max_count=8, **DEMO_SYNTHETIC)
    data = ShardDataModule(train=str(tmp_path / "train"), batch_size=8, num_workers=0, pin_memory=False,
                           persistent_workers=False, image_size=SIZE, max_queries_per_image=6, negatives_per_image=2,
                           hflip_prob=0.0, scale_range=(1.0, 1.0), color_jitter=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.num_images == 8 and int((batch.num_instances == 0).sum()) >= 8  # positives and negatives
    torch.manual_seed(0)
    module = GroundingModule(model="grounded_sam2_tiny", image_size=SIZE, loss=loss,
                             optimizer=OptimizerConfig(lr=1e-3, lr_multipliers={}, weight_decay=0.0, warmup_steps=10))
    optimizer, schedule = build_optimizer(module.trainable_parameter_groups(), module.optimizer_config, STEPS)
    module.train()
    for _ in range(STEPS):
        with torch.jit.optimized_execution(False):
            outputs = module.model(batch.images, batch.phrases, batch.query_image, targets=batch)
            loss = module.loss_fn(outputs, batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    module.eval()
    metrics = ConceptSegmentationMetrics()
    with torch.no_grad():
        metrics.update_from_batch(module.postprocess(module(batch), batch), batch)
    return {k: float(v) for k, v in metrics.compute().items()}


@pytest.mark.usefixtures("one_thread")  # the same sums however the suite runs (a `make test` worker has one)
@pytest.mark.timeout(240)  # 46 s on one thread
def test_head_memorises_eight_images(tmp_path):
    no_refinement = {"refine_focal": 0.0, "refine_dice": 0.0, "refine_iou": 0.0, "refine_object_score": 0.0}
    scores = _memorise(tmp_path, GroundingLossWeights(mask_stride=1, score_target="binary", **no_refinement))
    assert scores["cgF1"] >= 90, scores
    assert scores["IL_MCC"] >= 0.95 and scores["count_mae"] <= 0.05 and scores["AP"] >= 0.85, scores
