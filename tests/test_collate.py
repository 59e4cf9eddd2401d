"""Records -> GroundingBatch: query capping, negative sampling, vanished instances, teacher rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors
from shard_helpers import box_mask, random_image

from data_pipelines.augment import AugmentConfig
from data_pipelines.collate import QueryPolicy, SampleTransform, collate_samples
from data_pipelines.schema import TEACHER_FIELD, Query, Sample, SampleError, encode_image, instance_from_mask

H, W = 40, 60
VOCABULARY = ("Thing A", "thing b", "pear", "apple", "plum", "fig", "kiwi", "lime")


def sample(
    key: str,
    queries: list[tuple[str, list[tuple[int, int, int, int]], bool]],
    teacher: dict[str, torch.Tensor] | None = None,
) -> Sample:
    """Queries as (phrase, [boxes x0, y0, x1, y1], exhaustive); each box is one instance."""
    return Sample(
        key=key,
        image=encode_image(random_image(H, W, len(key))),
        image_format="png",
        width=W,
        height=H,
        queries=[
            Query(p, [instance_from_mask(box_mask(H, W, *b)) for b in boxes], exhaustive=e)
            for p, boxes, e in queries
        ],
        image_id=f"id-{key}",
        teacher=None if teacher is None else save_safetensors(teacher),
    )


def transform(max_queries: int = 4, negatives: int = 2, **augment) -> SampleTransform:
    return SampleTransform(
        QueryPolicy(max_queries, negatives, VOCABULARY), AugmentConfig(image_size=64, **augment)
    )


EXHAUSTIVE = sample(
    "exhaustive",
    [
        ("thing a", [(2, 2, 10, 10), (20, 5, 30, 25)], True),
        ("thing b", [(40, 20, 55, 35)], True),
        ("absent", [], True),
    ],
)
PARTIAL = sample("partial", [("thing a", [(5, 5, 15, 15)], False), ("thing b", [(30, 10, 50, 30)], True)])
UNLABELLED = sample("unlabelled", [])


def test_batch_matches_the_grounding_batch_contract():
    rng = np.random.default_rng(0)
    tf = transform(hflip_prob=0.5, scale_range=(0.8, 1.2))
    batch = collate_samples([tf(s.to_wds(), rng) for s in (EXHAUSTIVE, PARTIAL, UNLABELLED)])
    batch.validate()
    assert batch.keys == ["exhaustive", "partial", "unlabelled"]
    assert batch.image_ids == ["id-exhaustive", "id-partial", "id-unlabelled"]
    assert batch.images.shape == (3, 3, 64, 64) and batch.images.dtype == torch.float32
    assert 0 <= batch.images.min() and batch.images.max() <= 1
    assert batch.orig_hw.tolist() == [[H, W]] * 3
    assert batch.masks.dtype == torch.bool and batch.masks.shape[1:] == (64, 64)
    assert torch.equal(
        batch.instance_query, torch.repeat_interleave(torch.arange(batch.num_queries), batch.num_instances)
    )
    for q, rows in enumerate(batch.instance_slices()):
        assert (batch.instance_query[rows] == q).all()
    assert ((batch.boxes > 0) & (batch.boxes <= 1)).all()
    # every box is the tight box of its mask, normalised to the canvas
    for box, mask in zip(batch.boxes, batch.masks, strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        assert torch.allclose(box * 64, torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]).float())
    assert batch.query_image.tolist().count(2) == 0  # an image without queries contributes none
    assert batch.teacher is None


def test_negatives_only_for_exhaustive_images_and_never_an_asked_phrase():
    rng = np.random.default_rng(1)
    tf = transform(max_queries=6, negatives=2)
    for _ in range(20):
        exhaustive = tf(EXHAUSTIVE.to_wds(), rng)
        added = exhaustive.phrases[3:]
        assert exhaustive.phrases[:3] == ["thing a", "thing b", "absent"] and len(added) == 2
        assert not {p.lower() for p in added} & {"thing a", "thing b", "absent"}  # "Thing A" is asked already
        assert set(added) <= set(VOCABULARY) and exhaustive.num_instances[3:] == [0, 0]
        assert all(exhaustive.exhaustive)
        partial = tf(PARTIAL.to_wds(), rng)
        assert partial.phrases == ["thing a", "thing b"]  # one query is not exhaustive: no negatives
        assert tf(UNLABELLED.to_wds(), rng).phrases == []
    evaluation = tf(EXHAUSTIVE.to_wds(), None)  # no rng: validation, no sampled negatives
    assert evaluation.phrases == ["thing a", "thing b", "absent"]


def test_query_cap_prefers_positives():
    crowded = sample(
        "crowded",
        [(f"neg {i}", [], True) for i in range(3)]
        + [(f"pos {i}", [(i, i, i + 8, i + 8)], True) for i in range(5)],
    )
    rng = np.random.default_rng(2)
    capped = transform(max_queries=4, negatives=2)(crowded.to_wds(), rng)
    assert len(capped.phrases) == 4 and all(p.startswith("pos") for p in capped.phrases)
    roomy = transform(max_queries=7, negatives=2)(crowded.to_wds(), rng)
    assert sum(p.startswith("pos") for p in roomy.phrases) == 5 and len(roomy.phrases) == 7
    assert transform(max_queries=4)(crowded.to_wds(), None).phrases == ["pos 0", "pos 1", "pos 2", "pos 3"]


def test_positive_whose_instances_vanish_becomes_negative_only_if_exhaustive():
    tiny = sample(
        "tiny",
        [
            ("speck", [(10, 10, 12, 12)], True),
            ("dot", [(30, 30, 32, 32)], False),
            ("box", [(20, 5, 40, 25)], True),
        ],
    )
    out = transform(min_instance_area=10)(tiny.to_wds(), None)  # 2x2 px -> ~2x2 px on the canvas
    assert out.phrases == ["speck", "box"] and out.num_instances == [0, 1] and out.exhaustive == [True, True]
    assert out.masks.shape == (1, 64, 64)


def test_teacher_rows_follow_the_queries():
    scores = torch.arange(3 * 5, dtype=torch.float16).reshape(3, 5)
    boxes = torch.rand(3, 5, 4)
    teacher = sample(
        "teacher",
        [("thing a", [(2, 2, 10, 10)], True), ("thing b", [(40, 20, 55, 35)], True), ("absent", [], True)],
        teacher={"scores": scores, "boxes": boxes},
    )
    rng = np.random.default_rng(3)
    tf = transform(max_queries=5, negatives=2, hflip_prob=1.0, scale_range=(1.5, 2.0))
    prepared = tf(teacher.to_wds(), rng)
    assert prepared.valid_hw == (43, 64)  # teacher samples get no flip or scale jitter
    batch = collate_samples([tf(PARTIAL.to_wds(), None), prepared])
    batch.validate()
    assert set(batch.teacher) == {"scores", "boxes", "valid"}
    source_row = {"thing a": 0, "thing b": 1, "absent": 2}
    assert batch.num_queries == 2 + 5  # PARTIAL's two, then three own and two added negatives
    assert batch.teacher["scores"].dtype == torch.float16 and batch.teacher["scores"].shape == (7, 5)
    assert batch.teacher["valid"].tolist() == [False, False] + [p in source_row for p in batch.phrases[2:]]
    assert int(batch.teacher["valid"].sum()) == 3
    for q, phrase in enumerate(batch.phrases):
        if batch.teacher["valid"][q]:
            assert torch.equal(batch.teacher["scores"][q], scores[source_row[phrase]])
            assert torch.equal(batch.teacher["boxes"][q], boxes[source_row[phrase]])
        else:
            assert not batch.teacher["scores"][q].any() and not batch.teacher["boxes"][q].any()


def test_bad_teacher_files_and_images_name_the_field():
    wrong_rows = sample("rows", [("a", [], True)], teacher={"scores": torch.zeros(2, 3)})
    with pytest.raises(SampleError, match=f"{TEACHER_FIELD}.*first dimension"):
        transform()(wrong_rows.to_wds(), None)
    reserved = sample("reserved", [("a", [], True)], teacher={"valid": torch.zeros(1)})
    with pytest.raises(SampleError, match="reserved"):
        transform()(reserved.to_wds(), None)
    record = EXHAUSTIVE.to_wds()
    record["png"] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
    with pytest.raises(SampleError, match="png"):
        transform()(record, None)
    one = transform()(sample("one", [("a", [], True)], teacher={"scores": torch.zeros(1)}).to_wds(), None)
    other = transform()(sample("two", [("a", [], True)], teacher={"logits": torch.zeros(1)}).to_wds(), None)
    with pytest.raises(ValueError, match="different tensors"):
        collate_samples([one, other])


def test_no_flip_for_left_and_right_phrases():
    sided = sample("sided", [("left apple", [(2, 2, 10, 10)], True)])
    rng = np.random.default_rng(4)
    outs = [transform(negatives=0, hflip_prob=1.0)(sided.to_wds(), rng) for _ in range(5)]
    assert all(o.boxes[0, 0] < 0.25 for o in outs)  # still on the left
    plain = sample("plain", [("apple", [(2, 2, 10, 10)], True)])
    assert transform(negatives=0, hflip_prob=1.0)(plain.to_wds(), rng).boxes[0, 0] > 0.75
