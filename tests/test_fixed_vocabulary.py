"""The low-latency fixed-vocabulary path: same detections as forward + postprocess, no host reads
once compiled, and a compiled graph that equals eager (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from sambridge.models import create_model
from sambridge.models.fixed_vocabulary import FixedVocabularyGrounder, compile_grounder
from sambridge.models.grounded_sam2 import GroundedSAM2
from sambridge.profiling import HostSyncCounter

PHRASES = ["red circle", "blue square", "green thing"]


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("grounded_sam2_student_tiny").eval()


@pytest.fixture(scope="module")
def images(student) -> torch.Tensor:
    return torch.rand(2, 3, student.image_size, student.image_size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_equals_forward_and_postprocess(student, images):
    grounder = FixedVocabularyGrounder(student, PHRASES, top_k=5)
    fast = grounder(images)
    out = student(images, PHRASES * 2, torch.tensor([0, 0, 0, 1, 1, 1]))
    slow = student.postprocess(out, top_k=5, score_threshold=0.0, refine=False)
    assert fast.scores.shape == (2, 3, 5) and fast.mask_logits.shape[:3] == (2, 3, 5)
    torch.testing.assert_close(fast.scores, slow["scores"].view(2, 3, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.boxes_xyxy, slow["boxes_xyxy"].view(2, 3, 5, 4), rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.presence, slow["presence"].view(2, 3), rtol=0, atol=1e-6)
    chosen = out["pred_masks"][torch.arange(6)[:, None], slow["query_indices"]]
    torch.testing.assert_close(fast.mask_logits, chosen.view_as(fast.mask_logits), rtol=0, atol=1e-5)


@torch.no_grad()
def test_refined_masks_are_sam2_decoder_masks_of_the_top_k_boxes(student, images):
    """``refine=True``: SAM2's decoder on all B x P x K boxes in one call gives ``postprocess(refine=True)``'s
    masks (same detections, every one kept at threshold 0)."""
    fast = FixedVocabularyGrounder(student, PHRASES, top_k=5, refine=True)(images)
    out = student(images, PHRASES * 2, torch.tensor([0, 0, 0, 1, 1, 1]))
    side = fast.mask_logits.shape[-1]
    slow = student.postprocess(out, top_k=5, score_threshold=0.0, refine=True, out_hw=(side, side))
    assert side == student.image_size // 4
    torch.testing.assert_close(fast.scores, slow["scores"].view(2, 3, 5), rtol=0, atol=1e-6)
    assert torch.equal(fast.mask_logits > 0, slow["masks"].view_as(fast.mask_logits))
    with pytest.raises(ValueError, match="prompt decoder"):
        FixedVocabularyGrounder(GroundedSAM2(student.detector, student.image_size), PHRASES, refine=True)


def test_rejects_bad_vocabulary(student):
    with pytest.raises(ValueError, match="distinct"):
        FixedVocabularyGrounder(student, ["leaf", "leaf"])
    with pytest.raises(ValueError, match="non-empty"):
        FixedVocabularyGrounder(student, [])


@torch.no_grad()
def test_compiled_graph_equals_eager_without_host_reads(student, images):
    """One full graph (``fullgraph``: a host read would break it) that gives eager's outputs; run under
    the profiler, it reads nothing back, where forward + postprocess reads values per call."""
    grounder = FixedVocabularyGrounder(student, PHRASES, top_k=5, refine=True)  # the head and SAM2's decoder
    eager = grounder(images)
    compiled = compile_grounder(grounder, mode="default", backend="eager")  # dynamo capture, eager kernels
    with HostSyncCounter():  # compiles under the counter's torch-function mode, which dynamo guards on
        first = compiled(images)
    with HostSyncCounter() as fast:
        again = compiled(images)
    with HostSyncCounter() as slow:
        out = student(images, PHRASES * 2, torch.tensor([0, 0, 0, 1, 1, 1]))
        student.postprocess(out, top_k=5, score_threshold=0.0, refine=False)
    for got in (first, again):
        for name, expected in eager._asdict().items():
            torch.testing.assert_close(getattr(got, name), expected, rtol=1e-5, atol=1e-5)
    assert fast.total == 0, fast.syncs
    assert slow.total > 0


@pytest.mark.slow
@torch.no_grad()
def test_inductor_equals_eager(student, images):
    """The compiler a GPU run uses (inductor), here generating CPU code: fp32 outputs as eager's."""
    grounder = FixedVocabularyGrounder(student, PHRASES, top_k=5)
    eager, compiled = grounder(images), compile_grounder(grounder, mode="default")(images)
    for name, expected in eager._asdict().items():
        torch.testing.assert_close(getattr(compiled, name), expected, rtol=1e-4, atol=1e-4)
