"""Video converters: YouTube-VIS JSON and MOTS folders (instance PNGs and txt RLE) -> clip shards, read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from shard_helpers import box_mask, write_image

from data_pipelines.cli import main
from data_pipelines.schema import encode_mask
from data_pipelines.video import iter_clips
from data_pipelines.writer import load_manifest

H, W = 20, 24


def _masks(clip, object_id: int) -> list[np.ndarray | None]:
    masklet = next(m for m in clip.masklets if m.id == object_id)
    return [masklet.mask(t) for t in range(clip.num_frames)]


def _same(masks: list[np.ndarray | None], expected: list[np.ndarray | None]) -> bool:
    return all((a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
               for a, b in zip(masks, expected, strict=True))


# ----------------------------------------------------------------------------------------------
# YouTube-VIS
# ----------------------------------------------------------------------------------------------
def make_ytvis(root: Path) -> tuple[Path, Path, list[np.ndarray]]:
    frames = root / "JPEGImages"
    for video, count in (("v1", 3), ("v2", 2)):
        for t in range(count):
            write_image(frames / video / f"{t:05d}.png", H, W, seed=10 * len(video) + t)
    apple = [box_mask(H, W, 1, 1, 8, 9), box_mask(H, W, 3, 2, 10, 11), box_mask(H, W, 5, 3, 12, 12)]
    uncompressed = mask_utils.frPyObjects(  # the YouTube-VIS 2019 ground truth writes list counts
        {"size": [H, W], "counts": [W * 10, 5, H * W - W * 10 - 5]}, H, W)
    pear_2 = mask_utils.decode(uncompressed).astype(bool)
    data = {
        "videos": [{"id": 1, "width": W, "height": H, "length": 3, "file_names": [f"v1/{t:05d}.png" for t in range(3)]},
                   {"id": 2, "width": W, "height": H, "length": 2, "file_names": ["v2/00000.png", "v2/00001.png"]}],
        "categories": [{"id": 1, "name": "Apple"}, {"id": 2, "name": "green_pear"}, {"id": 3, "name": "plum"}],
        "annotations": [
            {"id": 11, "video_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentations": [encode_mask(m) for m in apple]},
            {"id": 12, "video_id": 1, "category_id": 2, "iscrowd": 0,  # polygon, null, list-counts RLE
             "segmentations": [[14, 2, 20, 2, 20, 8, 14, 8], None,
                               {"size": [H, W], "counts": [W * 10, 5, H * W - W * 10 - 5]}]},
            {"id": 13, "video_id": 1, "category_id": 3, "iscrowd": 0,  # wrong length: dropped
             "segmentations": [encode_mask(apple[0])]},
            {"id": 14, "video_id": 1, "category_id": 3, "iscrowd": 1, "segmentations": [None] * 3},
        ],
    }
    path = root / "train.json"
    path.write_text(json.dumps(data))
    return path, frames, [apple, pear_2]


def test_ytvis_videos_become_clips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    annotations, frames, (apple, pear_2) = make_ytvis(tmp_path)
    out = tmp_path / "shards"
    assert main(["ytvis", "--annotations", str(annotations), "--frames", str(frames), "--out", str(out),
                 "--fps", "6", "--no-progress"]) == 0
    clips = list(iter_clips(out))
    assert [c.key for c in clips] == ["ytvis_train_1"]  # video 2 has no annotation and is not exhaustive
    clip = clips[0]
    assert clip.phrases == ["apple", "green pear"] and clip.fps == 6.0 and clip.num_frames == 3
    assert clip.frames[2] == (frames / "v1" / "00002.png").read_bytes()
    assert clip.file_names == ["v1/00000.png", "v1/00001.png", "v1/00002.png"]
    assert [(m.id, m.phrases) for m in clip.masklets] == [(11, ["apple"]), (12, ["green pear"])]
    assert _same(_masks(clip, 11), apple)
    pear = _masks(clip, 12)
    assert pear[1] is None and np.array_equal(pear[2], pear_2) and pear[0][2:8, 14:20].all()
    manifest = load_manifest(out)
    assert manifest["skipped"]["by_reason"] == {"no annotations (and not --exhaustive)": 1}
    assert manifest["dropped_annotations"]["by_reason"] == {
        "crowd region": 1, "segmentations length differs from the video's": 1}
    printed = capsys.readouterr().out
    assert "1 samples in 1 shard(s), 1 skipped" in printed

    exhaustive = tmp_path / "exhaustive"
    assert main(["ytvis", "--annotations", str(annotations), "--frames", str(frames), "--out", str(exhaustive),
                 "--exhaustive", "--no-progress"]) == 0
    first, second = iter_clips(exhaustive)
    assert first.phrases == ["apple", "green pear"]  # plum: a crowd region there, never a negative
    assert second.phrases == ["apple", "green pear", "plum"] and second.masklets == []


def test_ytvis_bad_input_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    annotations, frames, _ = make_ytvis(tmp_path)
    data = json.loads(annotations.read_text())
    data["categories"][1].pop("name")
    annotations.write_text(json.dumps(data))
    assert main(["ytvis", "--annotations", str(annotations), "--frames", str(frames),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {annotations}: field categories[1]")


# ----------------------------------------------------------------------------------------------
# MOTS
# ----------------------------------------------------------------------------------------------
def make_mots(root: Path) -> dict[str, list[np.ndarray]]:
    """Sequence a: 16-bit instance PNGs (0-based frames); sequence b: gt/gt.txt (1-based frames)."""
    car = [box_mask(H, W, 1 + t, 1, 9 + t, 8) for t in range(3)]
    walker = [None, box_mask(H, W, 12, 10, 16, 19), box_mask(H, W, 13, 10, 17, 19)]
    for t in range(3):
        write_image(root / "a" / "img1" / f"{t:06d}.png", H, W, seed=t)
        ids = np.zeros((H, W), np.uint16)
        ids[car[t]] = 1001
        if walker[t] is not None:
            ids[walker[t]] = 2003
        ids[18:, :4] = 10000  # an ignore region
        (root / "a" / "instances").mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids).save(root / "a" / "instances" / f"{t:06d}.png")
    lines = []
    for t in range(4):
        write_image(root / "b" / "img1" / f"{t + 1:06d}.jpg", H, W, seed=20 + t)
    people = [box_mask(H, W, 2, 2 + t, 7, 12 + t) for t in range(4)]
    for t, mask in enumerate(people):
        lines.append(f"{t + 1} 2005 2 {H} {W} {encode_mask(mask)['counts']}")
    lines.append(f"2 3001 3 {H} {W} {encode_mask(car[0])['counts']}")  # a class not in --classes
    (root / "b" / "gt").mkdir(parents=True)
    (root / "b" / "gt" / "gt.txt").write_text("\n".join(lines) + "\n")
    return {"car": car, "walker": walker, "people": people}


def test_mots_png_and_txt_sequences_become_clips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    truth = make_mots(tmp_path / "mots")
    out = tmp_path / "shards"
    assert main(["mots", "--root", str(tmp_path / "mots"), "--classes", "1=car,2=pedestrian", "--out", str(out),
                 "--clip-length", "3", "--no-progress"]) == 0
    clips = {c.key: c for c in iter_clips(out)}
    assert sorted(clips) == ["mots_mots_a", "mots_mots_b_000000", "mots_mots_b_000003"]
    a = clips["mots_mots_a"]
    assert a.phrases == ["car", "pedestrian"] and [(m.id, m.phrases) for m in a.masklets] == [
        (1001, ["car"]), (2003, ["pedestrian"])]
    assert _same(_masks(a, 1001), truth["car"]) and _same(_masks(a, 2003), truth["walker"])
    assert a.frames[1] == (tmp_path / "mots" / "a" / "img1" / "000001.png").read_bytes()
    b0, b1 = clips["mots_mots_b_000000"], clips["mots_mots_b_000003"]
    assert (b0.num_frames, b1.num_frames) == (3, 1) and b1.file_names == ["b/img1/000004.jpg"]
    assert [m.id for m in b0.masklets] == [2005] and _same(_masks(b0, 2005), truth["people"][:3])
    assert _same(_masks(b1, 2005), truth["people"][3:])
    dropped = load_manifest(out)["dropped_annotations"]["by_reason"]
    assert dropped == {"ignore region": 1, "class 3 not in --classes": 1}
    assert load_manifest(out)["phrases"]["car"] == {"positive": 1, "instances": 1, "negative": 2}


def test_mots_bad_input_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_mots(tmp_path / "mots")
    args = ["mots", "--root", str(tmp_path / "mots"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main([*args, "--classes", "car"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --classes: 'car' is not CLASS_ID=phrase")
    txt = tmp_path / "mots" / "b" / "gt" / "gt.txt"
    txt.write_text(txt.read_text() + "5 2005 2 20\n")
    assert main([*args, "--classes", "2=pedestrian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {txt}: line 6: expected 'frame id class_id")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.tar"))
