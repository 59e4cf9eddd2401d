"""The synthetic concept dataset: determinism, exact masks, tight boxes, held-out combos, negatives."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.schema import decode_rle, validate_meta
from data_pipelines.synthetic import (
    Concept,
    SyntheticConfig,
    add_arguments,
    generate_synthetic,
    make_sample,
    render_scene,
    run,
    split_vocabulary,
)
from data_pipelines.writer import ResumeMismatchError

HELDOUT_PAIRS = {("green", "triangle"), ("blue", "star")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(
        root, image_size=(64, 80), num_train=60, num_val=20, num_heldout=30, max_count=25, seed=3
    )
    return root


def read_split(root: Path, split: str) -> list[dict]:
    manifest = json.loads((root / split / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        for record in wds.WebDataset(str(root / split / shard["name"]), shardshuffle=False):
            samples.append(
                {
                    "key": record["__key__"],
                    "meta": json.loads(record["json"]),
                    "image": np.asarray(Image.open(io.BytesIO(record["png"])).convert("RGB")),
                }
            )
    return samples


def parse_phrase(phrase: str) -> Concept:
    *attributes, kind = phrase.split()
    axis_of = {"small": "size", "large": "size", "plain": "texture", "striped": "texture"}
    named = {axis_of.get(word, "colour"): word for word in attributes}
    return Concept(kind=kind, **named)


def test_writes_three_splits_with_manifests(dataset):
    for split, count, shards in (("train", 60, 3), ("val", 20, 1), ("heldout", 30, 2)):
        manifest = json.loads((dataset / split / "manifest.json").read_text())
        assert (manifest["num_samples"], manifest["num_shards"]) == (count, shards)
        assert manifest["skipped"]["total"] == 0
        assert manifest["extra"]["heldout_combos"] == ["green triangle", "blue star"]
        assert manifest["extra"]["image_size"] == [64, 80]
        assert set(manifest["phrases"]) <= set(manifest["extra"]["vocabulary"])
    samples = read_split(dataset, "val")
    assert all(s["image"].shape == (64, 80, 3) for s in samples)
    for s in samples:
        validate_meta(s["meta"], key=s["key"], image_size=(80, 64))


def test_deterministic_by_seed():
    config = SyntheticConfig(height=48, width=48)
    first = [make_sample(config, "train", i, seed=7) for i in range(5)]
    again = [make_sample(config, "train", i, seed=7) for i in range(5)]
    other = [make_sample(config, "train", i, seed=8) for i in range(5)]
    assert [s.to_wds() for s in first] == [s.to_wds() for s in again]
    assert all(a.image != b.image for a, b in zip(first, other, strict=True))
    # an image depends on (seed, split, index) only, not on what was generated before it
    assert make_sample(config, "train", 3, seed=7).to_wds() == first[3].to_wds()


def test_masks_are_exactly_the_visible_object_pixels_and_boxes_tight(dataset):
    checked = 0
    for sample in read_split(dataset, "train")[:30]:
        image = sample["image"]
        seen: dict[bytes, np.ndarray] = {}
        for query in sample["meta"]["queries"]:
            for inst in query["instances"]:
                mask = decode_rle(inst["rle"])
                assert mask.any()
                colours, counts = np.unique(image[mask], axis=0, return_counts=True)
                # objects are painted in one flat colour, unique in the image (no texture here):
                # the mask is exactly the set of pixels of that colour
                assert len(colours) == 1, f"{sample['key']}: mask covers another object or background"
                assert np.array_equal(mask, (image == colours[0]).all(-1))
                ys, xs = np.nonzero(mask)
                assert inst["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                seen[inst["rle"]["counts"].encode()] = mask
                checked += 1
        masks = list(seen.values())
        for i in range(len(masks)):  # distinct objects never share a pixel (occlusion is subtracted)
            for j in range(i + 1, len(masks)):
                assert not (masks[i] & masks[j]).any()
    assert checked > 50


def test_query_instances_are_every_matching_object():
    config = SyntheticConfig(height=64, width=64, objects=(3, 6))
    for index in range(20):
        rng = np.random.default_rng([0, 0, index])
        scene = render_scene(config, "train", rng)
        sample = make_sample(config, "train", index, seed=0)
        for query in sample.queries:
            concept = parse_phrase(query.phrase)
            assert len(query.instances) == sum(concept.matches(o.concept) for o in scene.objects)
            assert query.exhaustive


def test_heldout_combinations_only_in_heldout(dataset):
    def names_heldout(phrase: str) -> bool:
        concept = parse_phrase(phrase)
        return (concept.colour, concept.kind) in HELDOUT_PAIRS

    config = SyntheticConfig()
    for split in ("train", "val"):
        manifest = json.loads((dataset / split / "manifest.json").read_text())
        assert not any(names_heldout(p) for p in manifest["phrases"])
        assert not any(names_heldout(p) for p in manifest["extra"]["vocabulary"])
        for index in range(40):  # no held-out object is ever drawn, asked or not
            scene = render_scene(config, split, np.random.default_rng([0, 0, index]))
            assert not any((o.concept.colour, o.concept.kind) in HELDOUT_PAIRS for o in scene.objects)
    heldout = read_split(dataset, "heldout")
    for sample in heldout:
        phrases = {q["phrase"]: q for q in sample["meta"]["queries"]}
        assert {"green triangle", "blue star"} <= set(phrases)  # always asked
        assert any(phrases[p]["instances"] for p in ("green triangle", "blue star"))  # one is present
    manifest = json.loads((dataset / "heldout" / "manifest.json").read_text())
    assert manifest["phrases"]["green triangle"]["positive"] > 0
    assert manifest["phrases"]["blue star"]["positive"] > 0


def test_negatives_are_absent_and_exhaustive():
    config = SyntheticConfig(height=64, width=64)
    hard = total = 0
    for index in range(20):
        scene = render_scene(config, "val", np.random.default_rng([0, 1, index]))
        sample = make_sample(config, "val", index, seed=0)
        negatives = [q for q in sample.queries if not q.instances]
        assert len(negatives) == config.negatives_per_image
        for query in negatives:
            concept = parse_phrase(query.phrase)
            assert query.exhaustive and not any(concept.matches(o.concept) for o in scene.objects)
            hard += any(concept.kind == o.concept.kind for o in scene.objects)
            total += 1
    assert hard >= total // 3  # hard negatives: a kind that is in the image, other attributes


def test_vocabulary_forms_and_textures():
    plain = {c.phrase() for c in split_vocabulary(SyntheticConfig(), "heldout")}
    assert {"circle", "red circle", "small circle", "small red circle"} <= plain
    assert len(plain) == 5 * (1 + 5 + 2 + 10)
    textured = {c.phrase() for c in split_vocabulary(SyntheticConfig(textures=True), "train")}
    assert "small striped red circle" in textured and "striped star" in textured
    assert not any(p.endswith("green triangle") for p in textured)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="held-out combination"):
        SyntheticConfig(heldout=("pink triangle",))
    with pytest.raises(ValueError, match="unknown"):
        SyntheticConfig(kinds=("hexagon",))


def test_command_line(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys_args = [
        "--out",
        str(tmp_path),
        "--image-size",
        "48",
        "64",
        "--num-train",
        "6",
        "--num-val",
        "2",
        "--num-heldout",
        "2",
        "--max-count",
        "4",
        "--no-progress",
        "--heldout",
        "red circle",
        "--format",
        "jpg",
    ]
    args = parser.parse_args(sys_args)
    assert run(args) == 0
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
    ]
    manifest = json.loads((tmp_path / "heldout" / "manifest.json").read_text())
    assert manifest["extra"]["heldout_combos"] == ["red circle"]
    assert manifest["extra"]["image_size"] == [48, 64]
    first = next(iter(wds.WebDataset(str(tmp_path / "val" / "val-000000.tar"), shardshuffle=False)))
    assert "jpg" in first and json.loads(first["json"])["image"]["width"] == 64
    # a finished set is left alone by --resume with the same arguments, refused without --resume,
    # and refused with other arguments (the manifest would claim settings its samples do not have)
    same = [a for a in sys_args if a != "--no-progress"]
    assert run(parser.parse_args([*same, "--resume"])) == 0
    with pytest.raises(FileExistsError):
        run(parser.parse_args(same))
    other = ["--out", str(tmp_path), "--image-size", "32", "--num-train", "3", "--seed", "7", "--resume"]
    with pytest.raises(ResumeMismatchError, match=r"image_size: \[48, 64\] -> \[32\].*num_train: 6 -> 3"):
        run(parser.parse_args(other))
