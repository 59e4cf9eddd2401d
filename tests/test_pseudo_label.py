"""Pseudo-labelling with a SAM3 teacher: labels, mask geometry, shard round trip, resume, shard input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load as load_safetensors

from data_pipelines.augment import AugmentConfig, sample_geometry, warp_image, warp_masks
from data_pipelines.collate import QueryPolicy, SampleTransform
from data_pipelines.inspect import inspect_shards, iter_samples
from data_pipelines.schema import decode_rle
from sambridge.models import create_model
from sambridge.models.teacher_targets import pooled_query_features, select_teacher_targets
from sambridge.modules import load_teacher
from sambridge.pseudo_label import (
    SETTINGS_FILE,
    ImageFolderSource,
    LabelSettings,
    PseudoLabeler,
    canvas_logits_to_image,
    label_query,
    main,
)

# (height, width) of the test images: portrait, landscape, square, odd sizes
SIZES = ((90, 60), (60, 90), (128, 128), (101, 47), (70, 70), (64, 100))
VOCABULARY = "# test vocabulary\nred box | red square\nblue box ! red box\ngreen box\n"
PHRASES = ["red box", "blue box", "green box"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A tiny teacher saved as an official sam3.pt (``detector.*`` keys under ``model``)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "sam3_tiny.pt"
    torch.save({"model": create_model("sam3_image_tiny").state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def teacher(teacher_file):
    return load_teacher(teacher_file, model="sam3_image_tiny")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """An image folder (coloured boxes on noise, one unreadable file) and a vocabulary file."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
    for i, (h, w) in enumerate(SIZES):
        image = rng.integers(90, 140, (h, w, 3), dtype=np.uint8)
        for j, colour in enumerate(colours.values()):
            if (i + j) % 3:
                y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
                image[y:y + h // 3, x:x + w // 3] = colour
        folder = root / "images" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{i}.png")
    (root / "images" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "vocab.txt").write_text(VOCABULARY)
    return root / "images", root / "vocab.txt"


def _canvases(paths: list[Path], size: int) -> torch.Tensor:
    config = AugmentConfig(image_size=size)
    canvases = []
    for path in paths:
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        canvases.append(warp_image(image, sample_geometry(tuple(image.shape[-2:]), config)))
    return torch.stack(canvases)


@pytest.fixture(scope="module")
def thresholds(teacher, inputs) -> LabelSettings:
    """Thresholds between the random teacher's actual scores, so positives, negatives and unsure
    queries all occur (each threshold halfway in a gap of the observed values, never on one)."""
    images = sorted(inputs[0].rglob("*.png"))
    canvases = _canvases(images, teacher.image_size)
    queries = [(i, p) for i in range(len(images)) for p in PHRASES]
    with torch.no_grad():
        out = teacher(canvases, [p for _, p in queries], torch.tensor([i for i, _ in queries]))
    best = teacher.scores(out).max(1).values.sort().values
    presence = out["presence_logit_dec"][:, 0].sigmoid().sort().values

    def between(values: torch.Tensor, quantile: float) -> float:
        i = int(quantile * (len(values) - 1))
        return float(values[i] + values[i + 1]) / 2

    score, uncertain = between(best, 0.75), between(best, 0.35)
    return LabelSettings(score_threshold=score, uncertain_score=uncertain,
                         presence_threshold=between(presence, 0.4), top_k=16, mask_size=32)


def _label_args(teacher_file: Path, images: Path, vocab: Path, out: Path, settings: LabelSettings,
                *extra: str) -> list[str]:
    return ["--teacher", str(teacher_file), "--model", "sam3_image_tiny",
            "--images", str(images), "--vocabulary", str(vocab), "--out", str(out),
            "--max-count", "2", "--batch-size", "2",
            "--score-threshold", repr(settings.score_threshold),
            "--uncertain-score", repr(settings.uncertain_score),
            "--presence-threshold", repr(settings.presence_threshold),
            "--top-k", str(settings.top_k), "--mask-size", str(settings.mask_size), "--no-progress", *extra]


def _contents(out: Path) -> list[tuple[str, dict, bytes]]:
    return [(s.key, s.meta(), s.teacher) for s in iter_samples(out)]


# ---------------------------------------------------------------------- units
def test_label_query_decides_instances_and_exhaustiveness():
    settings = LabelSettings(score_threshold=0.5, uncertain_score=0.3, presence_threshold=0.2)
    confident = label_query(torch.tensor([0.1, 0.9, 0.6, 0.05]), 0.95, settings)
    assert confident.instances == [1, 2] and confident.exhaustive
    unsure = label_query(torch.tensor([0.9, 0.4, 0.1]), 0.95, settings)
    assert unsure.instances == [0] and not unsure.exhaustive  # 0.4 may be an instance: not exhaustive
    absent = label_query(torch.tensor([0.05, 0.1]), 0.15, settings)
    assert absent.instances == [] and absent.exhaustive  # an exhaustive negative
    unknown = label_query(torch.tensor([0.1, 0.2]), 0.6, settings)
    assert unknown.instances == [] and not unknown.exhaustive  # present but nothing found: unknown
    assert not label_query(torch.tensor([0.35]), 0.1, LabelSettings(0.5, 0.3, 0.5)).exhaustive
    with pytest.raises(ValueError, match="uncertain_score <= score_threshold"):
        LabelSettings(score_threshold=0.3, uncertain_score=0.5)


@pytest.mark.parametrize("hw", [(60, 90), (101, 47), (300, 200)])
def test_canvas_masks_land_back_on_the_original_image(hw):
    h, w = hw
    truth = np.zeros(hw, bool)
    truth[h // 5: h // 2, w // 3: w - w // 6] = True
    truth[h - h // 4:, : w // 4] = True
    geometry = sample_geometry(hw, AugmentConfig(image_size=128))
    canvas = warp_masks(torch.from_numpy(truth)[None], geometry).float()
    logits = F.interpolate(canvas[None], size=(64, 64), mode="bilinear", antialias=True)[0] * 2 - 1
    back = canvas_logits_to_image(logits, geometry)[0].numpy()
    assert back.shape == hw
    assert (back & truth).sum() / (back | truth).sum() > 0.9


# ---------------------------------------------------------------------- image folders
@pytest.fixture(scope="module")
def labelled(teacher_file, inputs, thresholds, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("labelled") / "shards"
    images, vocab = inputs
    assert main(_label_args(teacher_file, images, vocab, out, thresholds)) == 0
    return out


def test_shards_round_trip_with_labels_that_follow_the_teacher(labelled, inputs, teacher, thresholds):
    report, _ = inspect_shards(labelled, progress=False)
    assert report.ok, report.format()
    manifest = json.loads((labelled / "manifest.json").read_text())
    assert manifest["num_samples"] == len(SIZES)
    assert manifest["skipped"]["by_reason"] == {"unreadable image": 1}
    extra = manifest["extra"]
    assert extra["teacher"]["model"] == "sam3_image_tiny" and extra["teacher"]["precision"] == "fp32"
    assert len(extra["teacher"]["sha256"]) == 64 and extra["canvas_size"] == 128
    assert extra["vocabulary"]["phrases"] == PHRASES
    assert extra["labels"]["score_threshold"] == thresholds.score_threshold
    kinds = {"positive": 0, "negative": 0, "unknown": 0, "non-exhaustive positive": 0}
    transform = SampleTransform(QueryPolicy(max_queries=16), AugmentConfig(image_size=teacher.image_size))
    dropped = 0
    for sample in iter_samples(labelled):
        assert [q.phrase for q in sample.queries] == PHRASES
        prepared = transform({"__key__": sample.key, "png": sample.image, "json": json.dumps(sample.meta()),
                              "teacher.safetensors": sample.teacher})
        with torch.no_grad():  # the teacher again, on the canvas the training pipeline builds
            out = teacher(prepared.image[None], PHRASES, torch.zeros(3, dtype=torch.long))
        fresh = select_teacher_targets(out, top_k=thresholds.top_k, mask_size=thresholds.mask_size)
        stored = load_safetensors(sample.teacher)
        assert set(stored) == {"logits", "boxes", "presence_logit", "mask_logits"}
        for name, value in stored.items():
            assert value.shape[0] == len(sample.queries) and value.dtype == torch.float16
            assert torch.allclose(value.float(), fresh[name].float(), atol=2e-3), name
        assert torch.equal(prepared.teacher["valid"], torch.ones(3, dtype=torch.bool))
        scores, presence = teacher.scores(out), out["presence_logit_dec"][:, 0].sigmoid()
        geometry = sample_geometry((sample.height, sample.width), transform.augment)
        for q, query in enumerate(sample.queries):
            label = label_query(scores[q], float(presence[q]), thresholds)
            assert query.exhaustive == label.exhaustive
            masks = canvas_logits_to_image(out["pred_masks"][q, label.instances], geometry)
            expected = [m for m in masks.numpy() if m.any()]
            dropped += len(label.instances) - len(expected)
            assert len(query.instances) == len(expected)
            for instance, mask in zip(query.instances, expected, strict=True):
                decoded = decode_rle(instance.rle)
                assert decoded.shape == (sample.height, sample.width) and np.array_equal(decoded, mask)
            kind = ("positive" if query.exhaustive else "non-exhaustive positive") if query.instances else \
                ("negative" if query.exhaustive else "unknown")
            kinds[kind] += 1
    assert manifest["dropped_annotations"]["total"] == dropped
    assert kinds["positive"] + kinds["non-exhaustive positive"] > 0 and kinds["negative"] > 0, kinds
    assert manifest["num_negatives"] == kinds["negative"]


def test_the_command_is_sambridge_pseudo_label_and_the_data_cli_forwards(labelled, capsys):
    from data_pipelines.cli import main as data_main
    from sambridge.cli import main as sambridge_main

    manifest = json.loads((labelled / "manifest.json").read_text())
    assert manifest["command"].startswith("sambridge pseudo-label --teacher ")  # how to run it again
    with pytest.raises(SystemExit) as info:
        sambridge_main(["pseudo-label", "--help"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("usage: sambridge pseudo-label ")
    with pytest.raises(SystemExit) as info:  # the old spelling still works, saying where it moved
        data_main(["pseudo-label", "--help"], prog="python -m data_pipelines")
    captured = capsys.readouterr()
    assert info.value.code == 0 and captured.out.startswith("usage: sambridge pseudo-label ")
    assert captured.err.startswith(
        "warning: `python -m data_pipelines pseudo-label` is deprecated, use `sambridge pseudo-label`")


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_gives_the_same_shards(labelled, teacher_file, inputs, thresholds,
                                                            tmp_path, monkeypatch):
    images, vocab = inputs
    out = tmp_path / "resumed"
    original, calls = PseudoLabeler.label, []

    def failing(self, samples):
        calls.append(len(samples))
        if len(calls) == 3:
            raise Interrupted
        return original(self, samples)

    with monkeypatch.context() as patch:
        patch.setattr(PseudoLabeler, "label", failing)
        with pytest.raises(Interrupted):
            main(_label_args(teacher_file, images, vocab, out, thresholds))
    finished = sorted(p.name for p in out.glob("*.tar"))  # the second shard was still open
    assert finished == ["pseudo-000000.tar"] and (out / SETTINGS_FILE).exists()
    kept = {name: (out / name).read_bytes() for name in finished}
    changed = LabelSettings(**{**vars(thresholds), "top_k": 8})
    assert main(_label_args(teacher_file, images, vocab, out, changed, "--resume")) == 2  # other settings
    assert main(_label_args(teacher_file, images, vocab, out, thresholds, "--resume")) == 0
    assert all((out / name).read_bytes() == data for name, data in kept.items())
    assert _contents(out) == _contents(labelled)
    assert inspect_shards(out, progress=False)[0].ok


def test_bad_inputs_are_clear_errors(teacher_file, inputs, thresholds, tmp_path, capsys):
    images, vocab = inputs
    args = _label_args(teacher_file, images, vocab, tmp_path / "out", thresholds)
    missing = tmp_path / "missing.pt"
    assert main([a if a != str(teacher_file) else str(missing) for a in args]) == 2
    assert f"teacher checkpoint not found: {missing}" in capsys.readouterr().err
    no_vocabulary = args[:args.index("--vocabulary")] + args[args.index("--vocabulary") + 2:]
    assert main(no_vocabulary) == 2
    assert "give --vocabulary" in capsys.readouterr().err


# ---------------------------------------------------------------------- shard input
def test_shard_input_keeps_its_labels_and_gains_soft_targets(teacher_file, tmp_path):
    from data_pipelines.synthetic import generate_synthetic

    generate_synthetic(tmp_path / "synthetic", num_train=0, num_val=5, num_heldout=0, max_count=3)
    source = tmp_path / "synthetic" / "val"
    out = tmp_path / "val-pseudo"
    assert main(["--teacher", str(teacher_file), "--model", "sam3_image_tiny", "--shards",
                 str(source), "--keep-labels", "--out", str(out), "--batch-size", "3", "--no-progress"]) == 0
    before, after = list(iter_samples(source)), list(iter_samples(out))
    assert [s.key for s in after] == [s.key for s in before]
    for old, new in zip(before, after, strict=True):
        assert new.meta() == old.meta() and new.image == old.image
        rows = load_safetensors(new.teacher)
        assert {k: v.shape for k, v in rows.items()} == {
            "logits": (len(old.queries), 16), "boxes": (len(old.queries), 16, 4),
            "presence_logit": (len(old.queries),), "mask_logits": (len(old.queries), 16, 64, 64)}
    assert inspect_shards(out, progress=False)[0].ok


def test_pooled_features_are_cached_for_offline_pooled_distillation(teacher_file, teacher, tmp_path):
    from data_pipelines.synthetic import generate_synthetic

    generate_synthetic(tmp_path / "synthetic", num_train=0, num_val=3, num_heldout=0, max_count=3)
    out = tmp_path / "pooled"
    assert main(["--teacher", str(teacher_file), "--model", "sam3_image_tiny", "--shards",
                 str(tmp_path / "synthetic" / "val"), "--keep-labels", "--pooled-features", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads((out / SETTINGS_FILE).read_text())["labels"]["pooled_features"] is True
    transform = SampleTransform(QueryPolicy(max_queries=16), AugmentConfig(image_size=teacher.image_size))
    for sample in iter_samples(out):
        prepared = transform({"__key__": sample.key, "png": sample.image, "json": json.dumps(sample.meta()),
                              "teacher.safetensors": sample.teacher})
        phrases = [q.phrase for q in sample.queries]
        with torch.no_grad():
            fresh = pooled_query_features(teacher(prepared.image[None], phrases, torch.zeros(len(phrases),
                                                                                              dtype=torch.long)))
        stored = load_safetensors(sample.teacher)["pooled_features"]
        assert stored.dtype == torch.float16 and stored.shape == (len(phrases), 64)  # tiny teacher's d_model
        assert torch.allclose(stored.float(), fresh, atol=2e-3)
        assert torch.allclose(prepared.teacher["pooled_features"].float(), fresh, atol=2e-3)


def test_images_are_encoded_once_per_batch(teacher, inputs, thresholds):
    labeler = PseudoLabeler(teacher, thresholds, PHRASES, query_chunk=4)
    calls = []
    hook = teacher.vision.trunk.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        samples = list(ImageFolderSource(inputs[0]).items())[:3]
        labelled = labeler.label(samples)
    finally:
        hook.remove()
    assert calls == [3] and [len(s.queries) for s in labelled] == [3, 3, 3]
