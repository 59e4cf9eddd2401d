"""DistillModule: online == offline on the same batch, what trains, the frozen teacher, head init."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipelines.augment import AugmentConfig
from data_pipelines.batch import GroundingBatch
from data_pipelines.collate import QueryPolicy, SampleTransform, collate_samples
from data_pipelines.schema import Query, Sample, encode_image, instance_from_mask
from sambridge.losses.distill import DistillWeights
from sambridge.models.checkpoint_io import CheckpointError
from sambridge.models.teacher_targets import encode_teacher_file, pooled_query_features, select_teacher_targets
from sambridge.modules import DistillModule
from sambridge.optim import build_optimizer

SIZE = 128
WITH_POOLED = DistillWeights(feature_mse=0.0, feature_cos=0.0, pooled_mse=1.0, pooled_cos=1.0)


def build(seed: int = 0, **kwargs) -> DistillModule:
    torch.manual_seed(seed)
    return DistillModule(**kwargs)


@pytest.fixture(scope="module")
def online() -> DistillModule:
    return build()


def shapes_sample(index: int, teacher: bytes | None = None) -> Sample:
    """A 96x128 image with two coloured boxes, asked for one of them and for an absent phrase."""
    rng = np.random.default_rng(index)
    image = rng.integers(90, 160, (96, 128, 3), dtype=np.uint8)
    masks = []
    for colour, (x0, y0, x1, y1) in (((220, 30, 30), (10, 12, 50, 60)), ((30, 40, 220), (70, 30, 120, 90))):
        image[y0:y1, x0:x1] = colour
        mask = np.zeros((96, 128), bool)
        mask[y0:y1, x0:x1] = True
        masks.append(mask)
    queries = [Query("red box", [instance_from_mask(masks[0])]), Query("green box", [], exhaustive=True)]
    if index % 2:
        queries.insert(1, Query("blue box", [instance_from_mask(masks[1])]))
    return Sample(
        key=f"shapes{index}",
        image=encode_image(image),
        image_format="png",
        width=128,
        height=96,
        source="test",
        queries=queries,
        teacher=teacher,
    )


def collate(samples: list[Sample]) -> GroundingBatch:
    transform = SampleTransform(QueryPolicy(max_queries=4), AugmentConfig(image_size=SIZE))
    return collate_samples([transform(s.to_wds()) for s in samples])


@pytest.fixture(scope="module")
def batches(online) -> tuple[GroundingBatch, GroundingBatch]:
    """The same two images without and with ``teacher.safetensors`` (what the pseudo-labeller writes)."""
    plain = collate([shapes_sample(i) for i in range(2)])
    with torch.no_grad():
        out = online.teacher(plain.images, plain.phrases, plain.query_image)
    targets = select_teacher_targets(
        out, top_k=online.hparams.teacher_top_k, mask_size=online.hparams.teacher_mask_size
    )
    targets["pooled_features"] = pooled_query_features(out)
    files = [
        encode_teacher_file({k: v[plain.query_image == i] for k, v in targets.items()}) for i in range(2)
    ]
    cached = collate([shapes_sample(i, teacher=files[i]) for i in range(2)])
    return plain, cached


def test_online_and_offline_give_the_same_loss_on_the_same_batch(batches):
    plain, cached = batches
    assert torch.equal(plain.images, cached.images) and plain.phrases == cached.phrases
    assert cached.teacher["valid"].all()
    losses = {}
    for mode, batch in (("online", plain), ("offline", cached)):
        module = build(mode=mode, distill=WITH_POOLED).eval()
        outputs = module.model(batch.images, batch.phrases, batch.query_image, targets=batch)
        losses[mode] = module.objective(outputs, batch)
        assert torch.equal(module._shared_step(batch, "train")["loss"], losses[mode]["loss"])
    online, offline = losses["online"], losses["offline"]
    assert (
        set(online)
        == set(offline)
        >= {"loss", "kd_score", "kd_mask_bce", "pooled_mse", "text_mse", "gt_loss"}
    )
    for name in online:
        assert torch.equal(online[name], offline[name]), name
    assert online["loss"] > online["gt_loss"] > 0


def test_offline_ignores_queries_without_teacher_rows(batches):
    _, cached = batches
    module = build(mode="offline", distill=WITH_POOLED).eval()
    outputs = module.model(cached.images, cached.phrases, cached.query_image)
    before = module.distill_terms(outputs, cached)
    cached.teacher["valid"][1] = False
    cached.teacher["logits"][1] += 5  # a row that is not valid must not matter
    try:
        after = module.distill_terms(outputs, cached)
    finally:
        cached.teacher["valid"][1] = True
        cached.teacher["logits"][1] -= 5
    assert after["kd_presence"] != before["kd_presence"]
    outputs_changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in outputs.items()}
    outputs_changed["presence_logit_dec"][1] += 3  # the student's row 1 no longer matters either
    cached.teacher["valid"][1] = False
    try:
        assert torch.equal(module.distill_terms(outputs_changed, cached)["kd_presence"], after["kd_presence"])
    finally:
        cached.teacher["valid"][1] = True


def test_training_step_trains_student_and_adapters_never_the_teacher(online, batches):
    plain, _ = batches
    online.train()
    assert not online.teacher.training
    loss = online._shared_step(plain, "train")["loss"]
    loss.backward()
    groups = online.trainable_parameter_groups()
    assert set(groups) >= {"backbone", "text", "head", "distill_adapters"}
    adapter = dict(groups["distill_adapters"])["distill_loss.feature.adapter.weight"]
    assert adapter.grad is not None and adapter.grad.abs().sum() > 0
    trunk = next(p for n, p in groups["backbone"])
    assert trunk.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in online.teacher.parameters())
    assert not any(k.startswith("teacher") for k in online.state_dict())
    assert all(p is not q for p in online.parameters() for q in list(online.teacher.parameters())[:3])
    online.zero_grad()


def test_validation_reports_the_grounding_metrics(online, batches):
    plain, _ = batches
    online.eval()
    with torch.no_grad():
        result = online._shared_step(plain, "val")
    top_k = min(online.predict_settings.top_k, online.model.num_queries)
    assert result["predictions"]["masks"].shape[:2] == (plain.num_queries, top_k)
    metrics = online.val_metrics.compute()
    assert "val_cgF1" in metrics and int(metrics["val_num_skipped"]) == 0
    online.val_metrics.reset()


def test_offline_without_teacher_targets_trains_on_nothing_but_evaluates(batches):
    plain, _ = batches
    module = build(
        mode="offline", distill=DistillWeights(feature_mse=0, feature_cos=0, text_mse=0, text_cos=0)
    )
    assert module.teacher is None and module.teacher_dim == 256
    with pytest.raises(ValueError, match="offline distillation needs teacher targets"):
        module.train()._shared_step(plain, "train")
    assert module.eval()._shared_step(plain, "val")["loss"] > 0  # ground truth only


def test_offline_refuses_feature_map_distillation():
    with pytest.raises(ValueError, match="feature-map distillation .* needs the teacher's image features"):
        build(mode="offline")


def test_student_head_initialised_from_a_teacher_with_the_same_head():
    from sambridge.models.grounding_head import QUERY_SELECTION_PREFIX, head_state_dict

    module = build(model="grounded_sam2_tiny", init_head_from_teacher=True)
    student, teacher = head_state_dict(module.model.detector), head_state_dict(module.teacher.detector)
    own = {k for k in student if k.startswith(QUERY_SELECTION_PREFIX)}
    assert own, "grounded_sam2_tiny uses two-stage query selection, which SAM3's head lacks"
    assert student.keys() - own == teacher.keys()
    assert all(torch.equal(student[k], teacher[k]) for k in teacher)


def test_head_init_from_a_different_head_names_the_mismatch():
    with pytest.raises(
        CheckpointError, match="init_head_from_teacher needs the same head dims.*unexpected keys"
    ):
        build(init_head_from_teacher=True)  # the student's decoder has one layer, the teacher's two


# ---------------------------------------------------------------------- teacher and teacher_checkpoint
def test_a_checkpoint_path_as_teacher_is_refused_pointing_to_teacher_checkpoint():
    with pytest.raises(ValueError, match="got 'checkpoints/sam3.pt'; a checkpoint .* goes in teacher_checkpoint"):
        build(teacher="checkpoints/sam3.pt")


def test_teacher_checkpoint_loads_strictly_and_a_missing_one_names_its_path(online, tmp_path):
    path = tmp_path / "sam3_tiny.pt"
    torch.save({"model": online.teacher.state_dict()}, path)  # official layout: detector.* keys
    module = build(seed=5, teacher_checkpoint=str(path))
    loaded, original = module.teacher.state_dict(), online.teacher.state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)
    assert module.teacher.frozen and module.hparams.teacher_checkpoint == str(path)
    missing = tmp_path / "nowhere" / "sam3.pt"
    with pytest.raises(CheckpointError, match=f"teacher checkpoint not found: {missing}"):
        build(teacher_checkpoint=str(missing))


def test_teacher_parameters_are_in_neither_optimiser_nor_checkpoint(online):
    optimizer, _ = build_optimizer(online.trainable_parameter_groups(), online.optimizer_config, 10)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    teacher = {id(p) for p in online.teacher.parameters()}
    assert optimised and teacher and not optimised & teacher
    assert not teacher & {id(p) for p in online.parameters()}
    assert not any(m is online.teacher for m in online.modules())
    state = online.state_dict()
    assert not any("teacher" in k for k in state)
    teacher_tensors = {t.data_ptr() for t in online.teacher.state_dict().values()}
    assert not teacher_tensors & {t.data_ptr() for t in state.values()}
