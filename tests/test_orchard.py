"""The orchard-like generator: determinism, exact masks (checked against pixel colours), sizes, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.cli import main
from data_pipelines.orchard import FRUITS, OrchardConfig, orchard_image, orchard_sample, render_orchard
from data_pipelines.schema import decode_rle, validate_meta
from data_pipelines.vocab import load_vocabulary

REPO = Path(__file__).resolve().parents[1]


def fruit_of_colour(image: np.ndarray) -> np.ndarray:
    """(H, W) index into FRUITS (+1; 0 = no fruit) read from pixel colours alone, by the documented ranges."""
    out = np.zeros(image.shape[:2], np.int64)
    for k, look in enumerate(FRUITS.values(), 1):
        low, high = np.array(look.colours.low), np.array(look.colours.high)
        out[((image >= low) & (image <= high)).all(-1)] = k
    return out


def fruit_of_masks(meta: dict, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The same map from the sample's instance masks, and how many pixels two instances claim."""
    out, claims = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    phrases = list(FRUITS)
    for query in meta["queries"]:
        for instance in query["instances"]:
            mask = decode_rle(instance["rle"])
            out[mask] = phrases.index(query["phrase"]) + 1
            claims += mask
    return out, int((claims > 1).sum())


def test_masks_are_exact_and_queries_cover_every_fruit_phrase():
    config = OrchardConfig(height=96, width=160, fruit_count=(10, 20), leaf_count=(6, 10))
    occluded = 0
    for index in range(6):
        sample = orchard_sample(config, index, seed=3)
        meta = json.loads(sample.to_wds()["json"])
        validate_meta(meta, key=sample.key, image_size=(160, 96))
        image = np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB"))
        assert image.shape == (96, 160, 3)
        assert [q["phrase"] for q in meta["queries"]] == list(FRUITS)
        assert all(q["exhaustive"] for q in meta["queries"])
        from_masks, overlap = fruit_of_masks(meta, image.shape[:2])
        assert overlap == 0
        np.testing.assert_array_equal(from_masks, fruit_of_colour(image))
        assert 10 * 0.5 <= sum(len(q["instances"]) for q in meta["queries"]) <= 20
        scene = render_orchard(config, np.random.default_rng([3, index]))
        for k, (kind, (top, left, h, w)) in enumerate(zip(scene.kinds, scene.boxes, strict=True)):
            if kind is not None:
                visible = int((scene.owner[top:top + h, left:left + w] == k).sum())
                occluded += visible < h * w
    assert occluded > 0  # leaves and fruit do hide parts of fruit


def test_every_fruit_phrase_is_a_concept_of_the_fruit_vocabulary():
    vocabulary = load_vocabulary(REPO / "configs/agriculture/vocab/fruit.txt")
    assert all(vocabulary.canonical(phrase) == phrase for phrase in FRUITS)
    assert "unripe apple" in vocabulary.hard_negatives("ripe apple")


def test_deterministic_in_seed_and_index():
    config = OrchardConfig(height=64, width=64)
    assert orchard_sample(config, 2, seed=5).to_wds() == orchard_sample(config, 2, seed=5).to_wds()
    assert not np.array_equal(orchard_image(config, 2, seed=5), orchard_image(config, 2, seed=6))
    assert not np.array_equal(orchard_image(config, 2, seed=5), orchard_image(config, 3, seed=5))


def test_large_image_holds_many_small_fruit():
    config = OrchardConfig(height=600, width=900, fruit_count=(150, 150), fruit_radius=(5, 8))
    sample = orchard_sample(config, 0)
    counts = [len(q.instances) for q in sample.queries]
    assert 120 <= sum(counts) <= 150 and min(counts) > 0
    areas = [decode_rle(i.rle).sum() for q in sample.queries for i in q.instances]
    assert max(areas) <= np.pi * (8 * 1.4) * 8 + 30  # the largest lemon's ellipse at most


def test_invalid_settings_name_the_problem():
    with pytest.raises(ValueError, match="fruits must be distinct phrases"):
        OrchardConfig(fruits=("banana",))
    with pytest.raises(ValueError, match="invalid orchard settings"):
        OrchardConfig(fruit_count=(5, 2))


def test_cli_writes_an_image_folder_and_a_shard_set(tmp_path, capsys):
    images = tmp_path / "images"
    args = ["orchard", "--out", str(images), "--num", "3", "--image-size", "48", "80", "--no-progress"]
    assert main(args) == 0
    files = sorted(images.iterdir())
    assert [f.name for f in files] == [f"orchard-{i:06d}.png" for i in range(3)]
    assert all(Image.open(f).size == (80, 48) for f in files)
    config = OrchardConfig(height=48, width=80)
    np.testing.assert_array_equal(np.asarray(Image.open(files[1])), orchard_image(config, 1))
    assert main(args) == 2  # existing images are not overwritten silently
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0

    shards = tmp_path / "shards"
    assert main(["orchard", "--out", str(shards), "--num", "5", "--image-size", "64", "--shards",
                 "--max-count", "2", "--fruits", "ripe apple", "lemon", "--no-progress"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert (manifest["num_samples"], manifest["num_shards"], manifest["skipped"]["total"]) == (5, 3, 0)
    assert manifest["extra"]["fruits"] == ["ripe apple", "lemon"]
    records = [r for shard in manifest["shards"]
               for r in wds.WebDataset(str(shards / shard["name"]), shardshuffle=False)]
    expected = [orchard_sample(OrchardConfig(height=64, width=64, fruits=("ripe apple", "lemon")), i).to_wds()
                for i in range(5)]
    assert [r["json"] for r in records] == [e["json"] for e in expected]
