"""``sambridge segment``: a folder or shards -> COCO results that ``sambridge evaluate`` reads; resume after an
interruption without recomputing or duplicating images; refusal of other settings; unreadable images named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import exit_code
from shard_helpers import make_sample, random_image

from data_pipelines.schema import decode_rle
from data_pipelines.writer import ShardSink
from sambridge import segment as segment_module
from sambridge.cli import main
from sambridge.inference import Segmenter, load_model
from sambridge.metrics.saco import ground_truth_from_samples, saco_pair_id
from sambridge.segment import IMAGES_FILE, PROGRESS_FILE, RESULTS_FILE, SETTINGS_FILE

PHRASES = ("red circle", "star")


@pytest.fixture(scope="module")
def student_model(student) -> torch.nn.Module:
    return load_model(student)


@pytest.fixture
def loaded_once(student, student_model, monkeypatch) -> None:
    """Runs of the command reuse the student loaded once (the first test loads it for real)."""
    monkeypatch.setattr(segment_module, "load_model", lambda path, map_location: student_model)


def write_images(folder: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """Small random images of different sizes; name -> (height, width)."""
    sizes = {}
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        sizes[name] = (32 + 8 * i, 60 - 6 * i)
        Image.fromarray(random_image(*sizes[name], seed=i)).save(folder / name)
    return sizes


def segment(student: Path, source: Path | str, out: Path, *extra: str) -> int:
    """``sambridge segment`` in this process (top 2 per phrase at threshold 0); its exit code."""
    argv = ["segment", "--checkpoint", str(student), "--input", str(source), "--out", str(out), "--threshold", "0",
            "--top-k", "2", "--workers", "0", *[a for p in PHRASES for a in ("--text", p)], *extra]
    return exit_code(argv)


def read(out: Path, name: str):
    return json.loads((out / name).read_text())


@pytest.fixture
def model_calls(monkeypatch) -> list[int]:
    """Images per ``Segmenter.segment_batch`` call, recorded."""
    calls: list[int] = []
    original = Segmenter.segment_batch

    def counted(self, images, phrases):
        calls.append(len(images))
        return original(self, images, phrases)

    monkeypatch.setattr(Segmenter, "segment_batch", counted)
    return calls


def test_a_folder_gives_coco_results_that_evaluate_reads_and_overlays(student, tmp_path, model_calls):
    sizes = write_images(tmp_path / "photos", ["a.png", "sub/b.jpg", "c.png"])
    out = tmp_path / "out"
    assert segment(student, tmp_path / "photos", out, "--overlays", "--workers", "2", "--batch-size", "2") == 0
    assert model_calls == [2, 1]

    listing = read(out, IMAGES_FILE)
    assert listing["phrases"] == list(PHRASES) and listing["failed"] == []
    assert listing["categories"] == [{"id": 1, "name": "object"}]
    assert [(i["file_name"], i["text_input"]) for i in listing["images"]] == [
        (name, phrase) for name in sorted(sizes) for phrase in PHRASES]
    entries = {i["id"]: i for i in listing["images"]}
    assert all(i == saco_pair_id(e["file_name"], e["text_input"]) for i, e in entries.items())

    results = read(out, RESULTS_FILE)
    assert sorted(r["image_id"] for r in results) == sorted(2 * list(entries))  # top 2 of each (image, phrase)
    for record in results:
        entry = entries[record["image_id"]]
        assert decode_rle(record["segmentation"]).shape == sizes[entry["file_name"]]
        assert record["category_id"] == 1 and 0 <= record["score"] <= 1 and len(record["bbox"]) == 4
    for name, (height, width) in sizes.items():
        drawn = Image.open(out / "overlays" / f"{name}.png")
        assert drawn.width * height == drawn.height * width  # the image's aspect (small ones are upscaled)

    # `sambridge evaluate` reads the results against a ground truth of the same (image, phrase) pairs
    ground_truth = {"images": [{**e, "is_instance_exhaustive": 1} for e in listing["images"]], "annotations": [],
                    "categories": listing["categories"]}
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    main(["evaluate", "--gt", str(tmp_path / "gt.json"), "--pred", str(out / RESULTS_FILE)])


def test_an_interrupted_run_resumes_without_recomputing_or_duplicating(student, tmp_path, loaded_once, model_calls,
                                                                        monkeypatch):
    write_images(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    reference = tmp_path / "reference"
    assert segment(student, tmp_path / "photos", reference, "--batch-size", "1") == 0

    original = Segmenter.segment_batch  # the counting one

    def interrupted(self, images, phrases):
        if len(model_calls) == 1:  # the second image
            raise KeyboardInterrupt
        return original(self, images, phrases)

    out = tmp_path / "out"
    monkeypatch.setattr(Segmenter, "segment_batch", interrupted)
    model_calls.clear()
    with pytest.raises(KeyboardInterrupt):
        segment(student, tmp_path / "photos", out, "--batch-size", "1")
    assert [json.loads(line)["key"] for line in (out / PROGRESS_FILE).read_text().splitlines()] == ["a.png"]
    assert not (out / RESULTS_FILE).exists()
    with open(out / PROGRESS_FILE, "a") as progress:  # a line cut short by a kill
        progress.write('{"key": "b.png", "file_na')

    monkeypatch.setattr(Segmenter, "segment_batch", original)
    model_calls.clear()
    assert segment(student, tmp_path / "photos", out, "--batch-size", "1") == 0
    assert model_calls == [1, 1]  # b and c only
    keys = [json.loads(line)["key"] for line in (out / PROGRESS_FILE).read_text().splitlines()]
    assert keys == ["a.png", "b.png", "c.png"]
    assert read(out, RESULTS_FILE) == read(reference, RESULTS_FILE)
    assert read(out, IMAGES_FILE) == read(reference, IMAGES_FILE)

    model_calls.clear()
    assert segment(student, tmp_path / "photos", out) == 0  # all done: nothing to compute, same results
    assert model_calls == [] and read(out, RESULTS_FILE) == read(reference, RESULTS_FILE)


def test_a_rerun_with_other_settings_is_refused(student, tmp_path, capsys, loaded_once, model_calls):
    write_images(tmp_path / "photos", ["a.png"])
    out = tmp_path / "out"
    assert segment(student, tmp_path / "photos", out) == 0
    settings = read(out, SETTINGS_FILE)
    (tmp_path / "other.pt").write_bytes(student.read_bytes()[:-1])  # refused before it is read as a checkpoint
    capsys.readouterr()
    for extra, differs in ((["--text", "leaf"], "phrases"), (["--threshold", "0.3"], "threshold"),
                           (["--tile", "64", "--overlap", "16"], "tiling"),
                           (["--checkpoint", str(tmp_path / "other.pt")], "checkpoint_sha256")):
        assert segment(student, tmp_path / "photos", out, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and f"({differs} differ from " in err[0], err
        assert str(out / SETTINGS_FILE) in err[0]
    assert model_calls == [1] and read(out, SETTINGS_FILE) == settings  # refused before any model work


def test_unreadable_images_are_named_counted_and_tried_again(student, tmp_path, capsys, loaded_once):
    write_images(tmp_path / "photos", ["good.png"])
    (tmp_path / "photos" / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "photos" / "deep.png")
    out = tmp_path / "out"
    assert segment(student, tmp_path / "photos", out) == 1
    err = capsys.readouterr().err
    assert "warning: 2 image(s) could not be read" in err
    assert "notes.png: not an image PIL can identify" in err and "deep.png: PIL mode I;16" in err
    listing = read(out, IMAGES_FILE)
    assert [f["file_name"] for f in listing["failed"]] == ["deep.png", "notes.png"]
    assert {i["file_name"] for i in listing["images"]} == {"good.png"} and len(read(out, RESULTS_FILE)) == 4

    write_images(tmp_path / "photos", ["notes.png"])  # mended: the rerun segments it
    assert segment(student, tmp_path / "photos", out) == 1
    listing = read(out, IMAGES_FILE)
    assert [f["file_name"] for f in listing["failed"]] == ["deep.png"]
    assert {i["file_name"] for i in listing["images"]} == {"good.png", "notes.png"}


def test_shards_give_results_evaluate_scores_against_their_ground_truth(student, tmp_path, capsys, loaded_once,
                                                                       model_calls):
    samples = [make_sample(i) for i in range(3)]  # each asks "absent" (an exhaustive negative)
    with ShardSink(tmp_path / "shards", prefix="val", max_count=2, progress=False) as sink:
        for sample in samples:
            sink.add(sample)
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth_from_samples(samples)))
    out = tmp_path / "out"
    argv = ["segment", "--checkpoint", str(student), "--input", str(tmp_path / "shards"), "--out", str(out),
            "--text", "absent", "--threshold", "0.99", "--workers", "2"]
    main(argv)
    listing = read(out, IMAGES_FILE)
    assert [(i["sample_key"], i["file_name"]) for i in listing["images"]] == [(s.key, s.image_file) for s in samples]
    assert sum(model_calls) == 3
    main(argv)  # resumed: every sample is done, none decoded or segmented again
    assert sum(model_calls) == 3 and read(out, IMAGES_FILE) == listing
    main(["evaluate", "--gt", str(tmp_path / "gt.json"), "--pred", str(out / RESULTS_FILE)])
    assert "cgF1" in capsys.readouterr().out


def test_batched_segmentation_matches_one_image_at_a_time(student_model):
    segmenter = Segmenter(student_model, score_threshold=0.0, top_k=3)
    images = [random_image(40 + 8 * i, 56 + 5 * i, seed=i) for i in range(2)]
    batched = segmenter.segment_batch(images, list(PHRASES))
    for image, together in zip(images, batched, strict=True):
        alone = segmenter.segment(image, list(PHRASES))
        for a, b in zip(alone, together, strict=True):
            assert len(a) == len(b) == 3
            for x, y in zip(a, b, strict=True):
                assert np.array_equal(x.mask, y.mask)
                assert x.score == pytest.approx(y.score, abs=1e-6)
                assert x.box_xyxy == pytest.approx(y.box_xyxy, abs=1e-4)
