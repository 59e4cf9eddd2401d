"""The Hungarian matching: sam3's results, with one read of the device per call (or per several outputs)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from sam3.train.matcher import BinaryHungarianMatcherV2
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

from data_pipelines.batch import GroundingBatch
from sambridge.models.matching import FiniteCostMatcher, hungarian_matcher, mask_assignment, to_sam3_targets


class HostReads(TorchFunctionMode):
    """Counts the tensor methods that copy a device tensor to the host (on a CPU they dispatch no
    operator); ``numpy()`` only takes host tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("cpu", "tolist"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def scalar_reads(fn) -> tuple[int, object]:
    """Operators that read a device value to the host (``item``, data-dependent sizes) plus explicit
    copies, while ``fn`` runs; and its result. ``_assert_async`` reads on a CPU only."""
    with profile(activities=[ProfilerActivity.CPU]) as prof, HostReads() as copies:
        result = fn()
    syncing = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::masked_select"}
    return sum(e.name in syncing and not _under_assert_async(e) for e in prof.events()) + copies.count, result


def _under_assert_async(event) -> bool:
    while (event := event.cpu_parent) is not None:
        if event.name == "aten::_assert_async":
            return True
    return False


def random_case(seed: int, num_queries: int = 6, k: int = 5, max_targets: int = 7, nan: bool = False):
    """Predictions and sam3 targets: some queries without targets, some with more targets than K."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_targets + 1, (num_queries,), generator=g)
    counts[0] = 0
    width = max(int(counts.max()), 1)
    padded = torch.zeros(num_queries, width, 4)
    for q, n in enumerate(counts.tolist()):
        padded[q, :n, :2] = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        padded[q, :n, 2:] = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    logits = torch.randn(num_queries, k, 1, generator=g) * 3
    boxes = torch.cat([torch.rand(num_queries, k, 2, generator=g), torch.rand(num_queries, k, 2, generator=g) * 0.4
                       + 0.01], -1)
    if nan:
        logits[1, 0, 0], boxes[2, 1, 3] = float("nan"), float("inf")
    return {"pred_logits": logits, "pred_boxes": boxes}, {"num_boxes": counts, "boxes_padded": padded}


def same(a, b) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_targets", [3, 7])
def test_matching_equals_sams_and_reads_the_device_once(seed: int, max_targets: int) -> None:
    outputs, targets = random_case(seed, max_targets=max_targets, nan=seed % 2 == 1)
    matcher = hungarian_matcher()
    reads, got = scalar_reads(lambda: matcher(outputs, targets))
    expected = matcher.matcher(dict(zip(("pred_logits", "pred_boxes"), FiniteCostMatcher._clean(outputs)[:2],
                                        strict=True)), targets)
    assert same(got, expected), (got, expected)
    assert reads == 1
    assert matcher.num_sanitized == (seed % 2)


def test_matching_with_validity_masks_equals_sams() -> None:
    outputs, targets = random_case(3, max_targets=4)
    out_is_valid = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    target_is_valid = torch.ones_like(targets["boxes_padded"][..., 0], dtype=torch.bool)
    target_is_valid[-1, 0] = False
    kwargs = {"out_is_valid": out_is_valid, "target_is_valid_padded": target_is_valid}
    got = hungarian_matcher()(outputs, targets, **kwargs)
    expected = BinaryHungarianMatcherV2(focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)(
        outputs, targets, **kwargs)
    assert same(got, expected)


def test_match_many_is_one_read_for_every_decoder_layer() -> None:
    layers = [random_case(seed, max_targets=4)[0] for seed in range(4)]
    targets = random_case(0, max_targets=4)[1]
    matcher = hungarian_matcher()
    reads, together = scalar_reads(lambda: matcher.match_many(layers, targets))
    assert reads == 1
    for out, got in zip(layers, together, strict=True):
        assert same(got, matcher(out, targets))


def test_no_targets_at_all() -> None:
    outputs, targets = random_case(0, max_targets=0)
    rows, queries, tgt = hungarian_matcher()(outputs, targets)
    assert rows.numel() == queries.numel() == 0 and tgt is None


def test_sam3_targets_need_no_device_read_when_collated(grounding_batch) -> None:
    batch = replace(grounding_batch, max_instances=int(grounding_batch.num_instances.max()))
    reads, targets = scalar_reads(lambda: to_sam3_targets(batch))
    assert reads == 0
    assert torch.equal(targets["boxes_padded"], to_sam3_targets(replace(batch, max_instances=None))["boxes_padded"])
    shuffled = replace(batch, instance_query=batch.instance_query.flip(0))
    with pytest.raises(RuntimeError, match="packed in query order"):
        to_sam3_targets(shuffled)


def _masks_batch(masks: list[torch.Tensor], owners: list[int], num_queries: int) -> GroundingBatch:
    """A batch of one 8 x 8 image with the given instance masks (packed in query order)."""
    boxes = []
    for mask in masks:
        ys, xs = mask.nonzero(as_tuple=True)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        boxes.append(torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]).float() / 8)
    counts = torch.bincount(torch.tensor(owners), minlength=num_queries)
    return GroundingBatch(
        images=torch.zeros(1, 3, 8, 8), valid_hw=torch.tensor([[8, 8]]), orig_hw=torch.tensor([[8, 8]]),
        keys=["k"], phrases=[f"p{q}" for q in range(num_queries)],
        query_image=torch.zeros(num_queries, dtype=torch.long),
        exhaustive=torch.ones(num_queries, dtype=torch.bool), num_instances=counts, boxes=torch.stack(boxes),
        masks=torch.stack(masks), instance_query=torch.tensor(owners),
    )


def test_mask_assignment_gives_every_token_inside_an_instance_to_the_smallest_one() -> None:
    big = torch.zeros(8, 8, dtype=torch.bool)
    big[:, :6] = True                      # covers token columns 0-2 (centres at pixels 1, 3, 5)
    small = torch.zeros(8, 8, dtype=torch.bool)
    small[0:4, 0:4] = True                 # tokens (0,0) (0,1) (1,0) (1,1), also inside ``big``
    speck = torch.zeros(8, 8, dtype=torch.bool)
    speck[6, 6] = True                     # covers no token centre: gets the token at its box centre
    other = torch.zeros(8, 8, dtype=torch.bool)
    other[4:, 4:] = True                   # query 1's instance, overlapping ``big``: no competition
    batch = _masks_batch([big, small, speck, other], owners=[0, 0, 0, 1], num_queries=3)
    query, token, instance = mask_assignment((4, 4), batch)
    pairs = {(int(q), int(t), int(i)) for q, t, i in zip(query, token, instance, strict=True)}
    grid = torch.arange(16).view(4, 4)
    expected = {(0, int(t), 1) for t in grid[:2, :2].flatten()}
    expected |= {(0, int(t), 0) for t in grid[:, :3].flatten() if int(t) not in grid[:2, :2]}
    expected |= {(0, int(grid[3, 3]), 2)}
    expected |= {(1, int(t), 3) for t in grid[2:, 2:].flatten()}
    assert pairs == expected               # query 2 (no instances) gets nothing


def test_mask_assignment_of_no_instances_is_empty(grounding_batch) -> None:
    empty = replace(grounding_batch, num_instances=torch.zeros(4, dtype=torch.long), boxes=torch.zeros(0, 4),
                    masks=torch.zeros(0, 128, 128, dtype=torch.bool), instance_query=torch.zeros(0, dtype=torch.long))
    assert all(len(t) == 0 for t in mask_assignment((16, 16), empty))
