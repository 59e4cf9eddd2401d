"""Video clips: the shard format (round trip, validation), YouTube-VIS ground truth, the moving-shapes generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shard_helpers import box_mask, random_image

from data_pipelines.cli import main
from data_pipelines.schema import SampleError, decode_rle, encode_image
from data_pipelines.synthetic_video import VideoConfig, make_clip
from data_pipelines.video import (
    Clip,
    Masklet,
    clip_from_wds,
    clips_to_ytvis,
    iter_clips,
    validate_clip_meta,
    write_clips,
    write_frames,
)

H, W = 24, 32
SMALL = VideoConfig(frames=24)


def tiny_clip(key: str = "clip-a") -> Clip:
    """Three frames (png, jpg, png), two phrases asked plus a negative, one object matching two phrases."""
    frames = [encode_image(random_image(H, W, t), "jpg" if t == 1 else "png") for t in range(3)]
    car = [box_mask(H, W, 2 + t, 3, 10 + t, 12) for t in range(3)]
    person = [None, box_mask(H, W, 20, 5, 28, 20), box_mask(H, W, 22, 6, 30, 22)]
    return Clip(key=key, frames=frames, width=W, height=H, phrases=["car", "vehicle", "person", "dog"],
                masklets=[Masklet.from_masks(7, ["car", "vehicle"], car), Masklet.from_masks(9, ["person"], person)],
                fps=5.0, clip_id=3, source="test", file_names=["v/a.png", "v/b.jpg", "v/c.png"])


def test_clip_round_trips_through_a_shard_exactly(tmp_path: Path) -> None:
    clips = [tiny_clip("clip-a"), tiny_clip("clip-b")]
    manifest = write_clips(clips, tmp_path / "shards", prefix="clips", max_count=1, progress=False,
                           on_invalid="raise")
    assert manifest["num_shards"] == 2 and manifest["num_samples"] == 2
    # per clip: 4 phrases asked, 3 (object, phrase) pairs, 1 negative ("dog")
    assert (manifest["num_queries"], manifest["num_instances"], manifest["num_negatives"]) == (8, 6, 2)
    assert manifest["phrases"]["dog"] == {"negative": 2}
    back = list(iter_clips(tmp_path / "shards"))
    assert [c.key for c in back] == ["clip-a", "clip-b"]
    for original, read in zip(clips, back, strict=True):
        assert read.frames == original.frames and read.frame_names() == ["00000.png", "00001.jpg", "00002.png"]
        assert read.meta() == original.meta()
    masklet = back[0].masklets[1]
    assert masklet.segmentations[0] is None and masklet.visible_frames == [1, 2]
    assert np.array_equal(masklet.mask(2), box_mask(H, W, 22, 6, 30, 22))
    assert np.array_equal(back[0].frame(0), random_image(H, W, 0))


def _fails(meta: dict, field: str, **kwargs) -> SampleError:
    with pytest.raises(SampleError) as info:
        validate_clip_meta(meta, key="clip-a", source="clips-000000.tar", **kwargs)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(f"file clips-000000.tar, sample 'clip-a', field {field}: ")
    return info.value


def test_validation_names_the_file_sample_and_field() -> None:
    meta = tiny_clip().meta()
    validate_clip_meta(meta, num_frames=3, frame_size=(W, H))

    def edited(change) -> dict:
        copy = json.loads(json.dumps(meta))
        change(copy)
        return copy

    _fails(edited(lambda m: m["masklets"][1]["segmentations"][1].update(size=[H, W + 1])),
           "masklets[1].segmentations[1].size")
    _fails(edited(lambda m: m["masklets"][0]["segmentations"][0].update(counts="!!")),
           "masklets[0].segmentations[0].counts")
    _fails(edited(lambda m: m["masklets"][0]["phrases"].append("cat")), "masklets[0].phrases[2]")
    _fails(edited(lambda m: m["masklets"][1].update(id=7)), "masklets[1].id")
    _fails(edited(lambda m: m["masklets"][1]["segmentations"].pop()), "masklets[1].segmentations")
    _fails(edited(lambda m: m["masklets"][1].update(segmentations=[None] * 3)), "masklets[1].segmentations")
    _fails(edited(lambda m: m["phrases"].append("car")), "phrases[4]")
    _fails(edited(lambda m: m["clip"].update(fps=0)), "clip.fps")
    _fails(edited(lambda m: m.pop("clip")), "clip")
    _fails(meta, "clip.num_frames", num_frames=4)
    _fails(meta, "clip.width/height", frame_size=(W, H + 1))
    error = _fails(edited(lambda m: m["masklets"][0]["segmentations"].__setitem__(0, {"size": [H, W],
                                                                                      "counts": [H * W]})),
                   "masklets[0].segmentations[0]")
    assert "write null" in str(error)  # an empty mask must be null


def test_records_with_missing_frames_or_stray_fields_are_refused(tmp_path: Path) -> None:
    record = tiny_clip().to_wds()
    assert clip_from_wds(dict(record), source="a.tar", check_frames=True).num_frames == 3
    gap = {k: v for k, v in record.items() if k != "00001.jpg"}
    with pytest.raises(SampleError, match="field frames"):
        clip_from_wds(gap, source="a.tar")
    with pytest.raises(SampleError, match=r"file a\.tar, sample 'clip-a', field clip\.num_frames"):
        clip_from_wds({**gap, "00001.png": record["00002.png"], "00002.png": record["00002.png"],
                       "00003.png": record["00000.png"]}, source="a.tar")
    with pytest.raises(SampleError, match="field mask.png"):
        clip_from_wds({**record, "mask.png": b""}, source="a.tar")
    with pytest.raises(SampleError, match="field 00001.jpg: frame does not decode"):
        clip_from_wds({**record, "00001.jpg": record["00001.jpg"][:40]}, source="a.tar", check_frames=True)
    # the writer skips (and counts) an invalid clip, or stops at it with on_invalid="raise"
    bad = tiny_clip("clip-bad")
    bad.masklets[0].phrases = ["cat"]
    manifest = write_clips([tiny_clip(), bad], tmp_path / "skip", progress=False)
    assert manifest["num_samples"] == 1 and manifest["skipped"]["by_reason"] == {"invalid masklets.phrases": 1}
    with pytest.raises(SampleError, match="sample 'clip-bad', field masklets"):
        write_clips([bad], tmp_path / "raise", progress=False, on_invalid="raise")


def test_ytvis_ground_truth_has_one_annotation_per_object_and_phrase_and_the_np_pairs() -> None:
    clips = [tiny_clip("clip-a"), tiny_clip("clip-b")]
    clips[1].phrases, clips[1].masklets = ["person", "cat"], clips[1].masklets[1:]
    truth = clips_to_ytvis(clips)
    names = {c["id"]: c["name"] for c in truth["categories"]}
    assert sorted(names.values()) == ["car", "cat", "dog", "person", "vehicle"]
    assert truth["videos"][0] == {"id": 1, "name": "clip-a", "height": H, "width": W, "length": 3,
                                  "file_names": ["clip-a/00000.png", "clip-a/00001.jpg", "clip-a/00002.png"]}
    anns = truth["annotations"]
    assert [(a["video_id"], names[a["category_id"]], a["object_id"]) for a in anns] == [
        (1, "car", 7), (1, "vehicle", 7), (1, "person", 9), (2, "person", 9)]
    assert len({a["id"] for a in anns}) == 4
    person = anns[2]
    assert person["segmentations"][0] is None and person["bboxes"][0] is None and person["areas"][0] is None
    assert person["bboxes"][1] == [20.0, 5.0, 8.0, 15.0] and person["areas"][1] == 8 * 15
    assert np.array_equal(decode_rle(person["segmentations"][2]), box_mask(H, W, 22, 6, 30, 22))
    pairs = {(p["video_id"], names[p["category_id"]]): p["num_masklets"] for p in truth["video_np_pairs"]}
    assert pairs == {(1, "car"): 1, (1, "vehicle"): 1, (1, "person"): 1, (1, "dog"): 0,
                     (2, "person"): 1, (2, "cat"): 0}


# ----------------------------------------------------------------------------------------------
# the generator
# ----------------------------------------------------------------------------------------------
def _colour(clip: Clip, masklet: Masklet) -> tuple[int, ...]:
    t = masklet.visible_frames[0]
    return tuple(clip.frame(t)[masklet.mask(t)][0])


def test_generator_is_deterministic_in_the_seed() -> None:
    a, b, c = make_clip(SMALL, 1, seed=3), make_clip(SMALL, 1, seed=3), make_clip(SMALL, 1, seed=4)
    assert a.frames == b.frames and a.meta() == b.meta()
    assert a.frames != c.frames
    assert make_clip(SMALL, 2, seed=3).frames != a.frames


def test_masks_are_exactly_the_visible_pixels_of_each_object_and_null_when_hidden() -> None:
    nulls = 0
    for index in range(3):
        clip = make_clip(SMALL, index, seed=0)
        assert 3 <= len(clip.masklets) <= 6 and clip.height == clip.width == 128 and clip.num_frames == 24
        colours = [_colour(clip, m) for m in clip.masklets]
        assert len(set(colours)) == len(colours)  # every object its own RGB
        for t in range(clip.num_frames):
            frame = clip.frame(t)
            for masklet, rgb in zip(clip.masklets, colours, strict=True):
                of_colour = np.all(frame == rgb, axis=-1)
                mask = masklet.mask(t)
                nulls += mask is None
                assert np.array_equal(of_colour, mask if mask is not None else np.zeros_like(of_colour)), (index, t)
        for phrase in clip.phrases:  # "colour kind" of each object, then absent negatives
            assert len(phrase.split()) == 2
        positives = {m.phrases[0] for m in clip.masklets}
        assert 1 <= len(clip.phrases) - len(positives) <= 2 and positives <= set(clip.phrases)
        assert not {"green triangle", "blue star"} & set(clip.phrases)  # the demo model's held-out pairs
    assert nulls > 0


def test_objects_enter_and_leave_and_a_same_phrase_pair_crosses() -> None:
    for index in range(4):
        clip = make_clip(VideoConfig(), index, seed=0)
        last = clip.num_frames - 1
        assert any(m.visible_frames[0] > 0 and m.visible_frames[-1] < last for m in clip.masklets), index
        assert any(m.visible_frames[0] > 0 for m in clip.masklets) and any(
            m.visible_frames[-1] < last for m in clip.masklets)
    clip = make_clip(VideoConfig(), 0, seed=0)  # crossing_every=2: clip 0 has the crossing pair
    crossings = []
    for i, a in enumerate(clip.masklets):
        for b in clip.masklets[i + 1:]:
            if a.phrases != b.phrases:
                continue
            both = sorted(set(a.visible_frames) & set(b.visible_frames))
            x = {t: (a.mask(t).nonzero()[1].mean(), b.mask(t).nonzero()[1].mean()) for t in both}
            swapped = np.sign(x[both[0]][0] - x[both[0]][1]) != np.sign(x[both[-1]][0] - x[both[-1]][1])
            touching = min(abs(xa - xb) for xa, xb in x.values()) < 10  # they meet: centroids close
            crossings.append(swapped and touching)
    assert any(crossings)


def test_command_writes_shards_frames_and_ground_truth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "video"
    argv = ["synthetic-video", "--out", str(out), "--clips", "2", "--frames", "16", "--seed", "5", "--no-progress"]
    assert main(argv) == 0
    clips = list(iter_clips(out / "shards"))
    assert [c.key for c in clips] == ["clip-000000", "clip-000001"]
    assert clips[0].frames == make_clip(VideoConfig(frames=16), 0, seed=5).frames
    assert sorted(p.name for p in (out / "frames" / "clip-000001").iterdir()) == [f"{t:05d}.png" for t in range(16)]
    assert (out / "frames" / "clip-000001" / "00003.png").read_bytes() == clips[1].frames[3]
    assert json.loads((out / "ground_truth.json").read_text()) == clips_to_ytvis(clips)
    capsys.readouterr()
    assert main(argv) == 2  # an existing output needs --overwrite
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert main([*argv, "--overwrite", "--clips", "1"]) == 0
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["clip-000000"]


def test_write_frames_makes_a_folder_per_clip(tmp_path: Path) -> None:
    clip = tiny_clip()
    folder = write_frames(clip, tmp_path / "frames")
    assert folder == tmp_path / "frames" / "clip-a"
    assert [p.read_bytes() for p in sorted(folder.iterdir())] == clip.frames
