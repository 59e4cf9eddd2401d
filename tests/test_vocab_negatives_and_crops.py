"""Vocabulary-aware negatives (hard look-alikes, nothing a positive implies) and full-resolution training crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shard_helpers import box_mask

from data_pipelines import ShardDataModule
from data_pipelines.augment import AugmentConfig
from data_pipelines.collate import QueryPolicy, SampleTransform
from data_pipelines.orchard import OrchardConfig, orchard_sample
from data_pipelines.schema import Query, Sample, encode_image, instance_from_mask
from data_pipelines.tiling import CropConfig
from data_pipelines.vocab import load_vocabulary, parse_vocabulary
from data_pipelines.writer import write_samples

REPO = Path(__file__).resolve().parents[1]
VOCABULARY = parse_vocabulary("""
apple
ripe apple | red apple < apple ! unripe apple, tomato, red autumn leaf
unripe apple | green apple < apple ! ripe apple, leaf
tomato
pear
plum
fig
""")


def added_negatives(policy: QueryPolicy, queries: list[Query], seed: int) -> list[str]:
    chosen = policy.select(queries, np.random.default_rng(seed))
    return [q.phrase for index, q in chosen if index is None]


def test_hard_negatives_come_first_and_never_contradict_a_positive():
    mask = instance_from_mask(box_mask(8, 8, 1, 1, 4, 4))
    queries = [Query("red apple", [mask]), Query("pear", [])]  # a synonym of "ripe apple" is present
    policy = QueryPolicy(max_queries=8, negatives_per_image=3, vocabulary=tuple(VOCABULARY.phrases),
                         concepts=VOCABULARY, hard_negatives_per_image=2)
    seen_first = set()
    for seed in range(40):
        added = added_negatives(policy, queries, seed)
        assert len(added) == len(set(added)) == 3
        # the look-alikes that are concepts; "red autumn leaf" is not one, so it is never asked
        assert set(added[:2]) == {"unripe apple", "tomato"}
        assert added[2] in {"plum", "fig"}  # never "apple", "ripe apple" (implied) or "pear" (asked)
        seen_first.add(added[0])
    assert seen_first == {"unripe apple", "tomato"}  # hard negatives are shuffled

    random_only = QueryPolicy(max_queries=8, negatives_per_image=3, vocabulary=tuple(VOCABULARY.phrases),
                              concepts=VOCABULARY, hard_negatives_per_image=0)
    drawn = {p for seed in range(40) for p in added_negatives(random_only, queries, seed)}
    assert drawn == {"unripe apple", "tomato", "plum", "fig"}
    partial = [Query("red apple", [mask], exhaustive=False)]
    assert added_negatives(policy, partial, 0) == []  # not labelled for the vocabulary: nothing added


@pytest.fixture(scope="module")
def orchard_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orchard") / "train"
    config = OrchardConfig(height=64, width=64, fruit_count=(4, 8))
    write_samples((orchard_sample(config, i) for i in range(8)), out, prefix="orchard", max_count=4)
    return out


def test_datamodule_asks_look_alikes_from_the_agriculture_vocabularies(orchard_shards):
    files = [str(REPO / "configs/agriculture/vocab/fruit.txt"), str(REPO / "configs/agriculture/vocab/crop_organs.txt")]
    dm = ShardDataModule(train=str(orchard_shards), image_size=64, batch_size=8, num_workers=0,
                         negatives_per_image=3, hard_negatives_per_image=2, max_queries_per_image=8,
                         vocabulary=files)
    dm.setup("fit")
    vocabulary = load_vocabulary(files)
    batch = next(iter(dm.train_dataloader()))
    hard_total = 0
    for image in range(batch.num_images):
        rows = [q for q in range(batch.num_queries) if batch.query_image[q] == image]
        asked = [batch.phrases[q] for q in rows]
        positives = [batch.phrases[q] for q in rows if batch.num_instances[q] > 0]
        added = asked[3:]  # the generator's three fruit phrases come first
        assert len(added) == 3 and not set(added) & vocabulary.implied(positives)
        assert all(p in vocabulary.phrases for p in added)
        candidates = set(vocabulary.hard_negative_candidates(positives)) - set(asked[:3])
        hard = [p for p in added[:2] if p in candidates]
        assert len(hard) == min(2, len(candidates & set(vocabulary.phrases)))
        hard_total += len(hard)
    assert hard_total >= batch.num_images  # e.g. "tomato" for ripe apples, "orange" for lemons


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Red = row, green = column: a crop's first pixel tells where it was cut."""
    ys, xs = np.mgrid[:height, :width]
    return np.stack([ys, xs, np.full_like(ys, 7)], -1).astype(np.uint8)


def test_training_crop_is_cut_at_full_resolution_with_exact_masks():
    height, width, side = 100, 120, 48
    boxes = [(5, 5, 20, 25), (40, 30, 75, 60), (90, 70, 118, 99), (0, 80, 12, 100)]  # x0, y0, x1, y1
    full = [box_mask(height, width, *b) for b in boxes]
    sample = Sample(key="field", image=encode_image(coordinate_image(height, width)), image_format="png",
                    width=width, height=height,
                    queries=[Query("apple", [instance_from_mask(m) for m in full]), Query("pear", [])])
    transform = SampleTransform(QueryPolicy(max_queries=4), AugmentConfig(image_size=side),
                                crop=CropConfig(size=(side, side), min_visible_fraction=0.5, focus_prob=0.5))
    for seed in range(20):
        prepared = transform(sample.to_wds(), np.random.default_rng(seed))
        image = np.rint(prepared.image.permute(1, 2, 0).numpy() * 255).astype(int)
        top, left = image[0, 0, :2]
        np.testing.assert_array_equal(image, coordinate_image(height, width)[top:top + side, left:left + side])
        assert prepared.orig_hw == (side, side) == prepared.valid_hw
        window = (slice(top, top + side), slice(left, left + side))
        visible = [m[window] for m in full if m[window].any()]
        kept = [v for v, m in zip(visible, [m for m in full if m[window].any()], strict=True)
                if v.sum() >= 0.5 * m.sum()]
        assert prepared.phrases == ["apple", "pear"]
        assert prepared.num_instances[0] == len(kept)
        assert sorted(m.tobytes() for m in prepared.masks.numpy()) == sorted(m.tobytes() for m in kept)
        cut_away = any(16 <= v.sum() < 0.5 * m.sum() for m in full for v in [m[window]])
        assert prepared.exhaustive == [not cut_away, True]
    whole = transform(sample.to_wds(), None)  # evaluation: never cropped, resized whole
    assert whole.orig_hw == (height, width)
