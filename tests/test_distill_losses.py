"""Distillation loss terms: zero exactly when the student reproduces the teacher, positive otherwise."""

from __future__ import annotations

import pytest
import torch

from sambridge.losses.distill import (
    TERM_WEIGHTS,
    DistillLoss,
    DistillWeights,
    bernoulli_kl,
    soft_dice_loss,
)
from sambridge.models.teacher_targets import pooled_query_features, select_teacher_targets

Q, K, M = 5, 8, 16
KD_TERMS = ("kd_presence", "kd_score", "kd_box_l1", "kd_box_giou", "kd_mask_bce", "kd_mask_dice")


def teacher_outputs(seed: int = 0, num_queries: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 0.2 + 0.6 * torch.rand(Q, num_queries, 2, generator=g)
    sides = 0.05 + 0.3 * torch.rand(Q, num_queries, 2, generator=g)
    return {
        "pred_logits": 4 * torch.randn(Q, num_queries, 1, generator=g),
        "pred_boxes": torch.cat([centres, sides], -1),
        "pred_masks": 5 * torch.randn(Q, num_queries, 2 * M, 2 * M, generator=g),
        "presence_logit_dec": 3 * torch.randn(Q, 1, generator=g),
    }


@pytest.fixture
def targets() -> dict[str, torch.Tensor]:
    return select_teacher_targets(teacher_outputs(), top_k=K, mask_size=M)


def student_copy(targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Student outputs that reproduce the teacher targets exactly (K queries, masks at M)."""
    return {
        "pred_logits": targets["logits"].float()[..., None].clone().requires_grad_(),
        "pred_boxes": targets["boxes"].float().clone().requires_grad_(),
        "pred_masks": targets["mask_logits"].float().clone().requires_grad_(),
        "presence_logit_dec": targets["presence_logit"].float()[:, None].clone().requires_grad_(),
    }


@pytest.fixture
def loss() -> DistillLoss:
    return DistillLoss(DistillWeights(), student_dim=32, teacher_dim=32)


def test_every_kd_term_is_exactly_zero_when_the_student_reproduces_the_teacher(loss, targets):
    terms = loss.output_terms(student_copy(targets), targets)
    assert set(terms) == set(KD_TERMS)
    for name, value in terms.items():
        assert value.item() == 0.0, name


def test_matching_undoes_a_permutation_of_the_student_queries(loss, targets):
    student = student_copy(targets)
    order = torch.randperm(K, generator=torch.Generator().manual_seed(3))
    shuffled = {k: v[:, order] if k != "presence_logit_dec" else v for k, v in student.items()}
    assert all(v.item() == 0.0 for v in loss.output_terms(shuffled, targets).values())


@pytest.mark.parametrize(
    ("output", "expected_positive"),
    [
        ("presence_logit_dec", {"kd_presence"}),
        ("pred_logits", {"kd_score"}),
        ("pred_boxes", {"kd_box_l1", "kd_box_giou"}),
        ("pred_masks", {"kd_mask_bce", "kd_mask_dice"}),
    ],
)
def test_each_kd_term_is_positive_when_its_output_differs(loss, targets, output, expected_positive):
    student = student_copy(targets)
    with torch.no_grad():
        student[output] += 0.02 * torch.randn(
            student[output].shape, generator=torch.Generator().manual_seed(1)
        )
    terms = loss.output_terms(student, targets)
    for name in KD_TERMS:
        if name in expected_positive:
            assert terms[name].item() > 0, name
            terms[name].backward(retain_graph=True)
            assert student[output].grad.abs().sum() > 0
        else:
            assert terms[name].item() == 0.0, name


def test_extra_student_queries_are_pushed_towards_background(loss, targets):
    student = student_copy(targets)
    extra = {
        "pred_logits": torch.full((Q, 4, 1), -30.0),
        "pred_boxes": torch.full((Q, 4, 4), 0.5),
        "pred_masks": torch.zeros(Q, 4, M, M),
    }
    quiet = {
        k: torch.cat([v.detach(), extra[k]], 1) if k in extra else v.detach() for k, v in student.items()
    }
    assert loss.output_terms(quiet, targets)["kd_score"].item() < 1e-10  # matched exactly, extras at p ~ 0
    loud = dict(quiet, pred_logits=torch.cat([student["pred_logits"].detach(), -extra["pred_logits"]], 1))
    assert loss.output_terms(loud, targets)["kd_score"].item() > 1.0


def test_rows_without_teacher_targets_are_ignored(loss, targets):
    student = student_copy(targets)
    valid = torch.tensor([True, False, True, True, False])
    with torch.no_grad():
        for name in student:
            student[name][~valid] += 1.0
    assert all(v.item() == 0.0 for v in loss.output_terms(student, targets, valid).values())
    assert loss.output_terms(student, targets)["kd_presence"].item() > 0


def test_non_finite_student_outputs_do_not_break_matching(loss, targets):
    student = {k: v.detach().clone() for k, v in student_copy(targets).items()}
    student["pred_logits"][0, 0] = float("nan")
    student["pred_boxes"][1, 2] = float("inf")
    terms = loss.output_terms(student, targets)
    assert set(terms) == set(KD_TERMS)
    assert loss.matcher.num_sanitized == 1


def test_student_masks_are_resized_to_the_teacher_resolution(loss, targets):
    student = student_copy(targets)
    coarse = torch.nn.functional.avg_pool2d(student["pred_masks"].detach(), 2)  # M/2 x M/2
    terms = loss.output_terms(dict(student, pred_masks=coarse), targets)
    assert 0 < terms["kd_mask_bce"].item() < 1 and 0 < terms["kd_mask_dice"].item() < 1


def test_kl_and_dice_helpers_are_zero_only_at_equality():
    t = torch.linspace(-6, 6, 13)
    assert torch.equal(bernoulli_kl(t, t), torch.zeros_like(t))
    assert (bernoulli_kl(t, t + 0.1) > 0).all()
    p = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(soft_dice_loss(p, p), torch.zeros(3), atol=1e-7)
    assert (soft_dice_loss(p, p.flip(-1)) > 0).all()


def test_feature_terms_zero_for_identical_maps_through_an_identity_adapter():
    loss = DistillLoss(DistillWeights(), student_dim=16, teacher_dim=16)
    with torch.no_grad():
        loss.feature.adapter.weight.copy_(torch.eye(16)[:, :, None, None])
        loss.feature.adapter.bias.zero_()
    teacher = torch.randn(2, 16, 9, 9)
    same = loss.feature_terms(teacher, teacher)
    assert same["feat_mse"].item() == 0.0 and abs(same["feat_cos"].item()) < 1e-6
    other = loss.feature_terms(teacher + 0.1 * torch.randn_like(teacher), teacher)
    assert other["feat_mse"].item() > 0 and other["feat_cos"].item() > 0


def test_feature_adapter_maps_width_and_grid_and_learns():
    loss = DistillLoss(DistillWeights(), student_dim=8, teacher_dim=24)
    student = torch.randn(2, 8, 8, 8, requires_grad=True)
    terms = loss.feature_terms(student, torch.randn(2, 24, 14, 14))  # teacher grid 14 (stride 14 vs 16)
    sum(terms.values()).backward()
    assert student.grad is not None and loss.feature.adapter.weight.grad.abs().sum() > 0


def test_text_terms_compare_only_tokens_valid_in_both_models():
    loss = DistillLoss(DistillWeights(), student_dim=16, teacher_dim=16)
    tokens = torch.randn(6, 3, 16)  # (L, U, d)
    pad = torch.tensor([[False] * 3 + [True] * 3, [False] * 5 + [True], [False] * 2 + [True] * 4])
    same = loss.text_terms(tokens, pad, tokens, pad)
    assert same["text_mse"].item() == 0.0 and abs(same["text_cos"].item()) < 1e-6
    noisy_padding = tokens.clone()
    noisy_padding[5, 0] += 10  # a padded position of phrase 0 in both models
    assert loss.text_terms(noisy_padding, pad, tokens, pad)["text_mse"].item() == 0.0
    noisy_token = tokens.clone()
    noisy_token[1, 2] += 1
    assert loss.text_terms(noisy_token, pad, tokens, pad)["text_mse"].item() > 0


def test_text_terms_use_a_linear_adapter_when_widths_differ():
    loss = DistillLoss(DistillWeights(), student_dim=8, teacher_dim=16)
    assert isinstance(loss.text.adapter, torch.nn.Linear)
    assert isinstance(DistillLoss(DistillWeights(), 16, 16).text.adapter, torch.nn.Identity)
    student = torch.randn(5, 2, 8, requires_grad=True)
    terms = loss.text_terms(
        student,
        torch.zeros(2, 5, dtype=torch.bool),
        torch.randn(7, 2, 16),
        torch.zeros(2, 7, dtype=torch.bool),
    )  # teacher context 7 > student 5
    sum(terms.values()).backward()
    assert student.grad.abs().sum() > 0


def test_pooled_terms_on_valid_rows():
    loss = DistillLoss(DistillWeights(pooled_mse=1.0, pooled_cos=1.0), student_dim=8, teacher_dim=8)
    states = torch.randn(10, 4, 8)  # (HW, Q, d)
    pooled = pooled_query_features({"encoder_hidden_states": states})
    assert torch.allclose(pooled, states.mean(0))
    shifted = pooled.clone()
    shifted[1] += 1
    valid = torch.tensor([True, False, True, True])
    assert loss.pooled_terms(shifted, pooled, valid)["pooled_mse"].item() == 0.0
    assert loss.pooled_terms(shifted, pooled)["pooled_mse"].item() > 0


def test_adapters_exist_only_for_weighted_terms_and_total_weights_by_name():
    weights = DistillWeights(feature_mse=0.0, feature_cos=0.0, text_mse=0.0, text_cos=0.0, score=3.0)
    loss = DistillLoss(weights, student_dim=8, teacher_dim=16)
    assert loss.feature is None and loss.text is None and loss.pooled is None
    assert sum(p.numel() for p in loss.parameters()) == 0
    with pytest.raises(RuntimeError, match="feature terms have weight 0"):
        loss.feature_terms(torch.zeros(1, 8, 2, 2), torch.zeros(1, 16, 2, 2))
    terms = {"kd_score": torch.tensor(2.0), "kd_presence": torch.tensor(1.0), "gt_loss": torch.tensor(99.0)}
    assert loss.total(terms).item() == pytest.approx(3.0 * 2.0 + weights.presence * 1.0)
    assert set(TERM_WEIGHTS.values()) <= set(vars(weights))
