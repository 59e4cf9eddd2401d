"""ShardSink: caps, checksums, atomic shards, new/overwrite/resume, skip and drop accounting."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from shard_helpers import make_sample

from data_pipelines.inspect import iter_samples
from data_pipelines.schema import Query, SampleError
from data_pipelines.writer import PROGRESS, ShardSink, Skip, sha256_of, write_samples


class Interrupted(Exception):
    pass


def _write(out: Path, items, mode="new", fail_after: int | None = None, start_from_sink: bool = True, **kw):
    """Feed ``items`` (a list, indexed from the sink's start) into a sink; optionally raise after N adds."""
    with ShardSink(out, prefix="t", max_count=3, mode=mode, progress=False, **kw) as sink:
        start = sink.start_index if start_from_sink else 0
        for n, item in enumerate(items[start:]):
            if fail_after is not None and n == fail_after:
                raise Interrupted
            sink.add(item)
    return sink


def _tar_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def _contents(out: Path) -> list[tuple[str, bytes, dict]]:
    return [(s.key, s.image, s.meta()) for s in iter_samples(out)]


def test_count_cap_checksums_and_sizes(tmp_path: Path) -> None:
    items = [make_sample(i) for i in range(7)]
    sink = _write(tmp_path, items)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["num_samples"] == 7 and manifest["num_shards"] == 3
    assert manifest["num_queries"] == 14 and manifest["num_negatives"] == 7
    assert manifest["num_instances"] == sum(len(s.queries[0].instances) for s in items)
    for record in manifest["shards"]:
        path = tmp_path / record["name"]
        assert record["sha256"] == sha256_of(path) and record["bytes"] == path.stat().st_size
        with tarfile.open(path) as tar:
            assert len({m.name.split(".")[0] for m in tar.getmembers()}) == record["samples"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "t-000000.tar": 3,
        "t-000001.tar": 3,
        "t-000002.tar": 1,
    }
    assert _tar_names(tmp_path) == [
        "manifest.json",
        "sizes.json",
        "t-000000.tar",
        "t-000001.tar",
        "t-000002.tar",
    ]
    assert manifest["phrases"]["absent"] == {"negative": 7}
    assert [key for key, _, _ in _contents(tmp_path)] == [s.key for s in items]
    assert "7 samples in 3 shard(s), 0 skipped" in sink.summary()


def test_byte_cap_starts_new_shards(tmp_path: Path) -> None:
    items = [make_sample(i) for i in range(6)]
    payload = [len(s.image) + len(s.to_wds()["json"]) for s in items]
    # a shard closes once its payload reaches max_bytes: here after its second sample
    cap = min(payload[0] + payload[1], payload[2] + payload[3], payload[4] + payload[5])
    assert max(payload) < cap
    manifest = write_samples(
        items, tmp_path / "two", prefix="b", max_count=100, max_bytes=cap, progress=False
    )
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 2]
    manifest = write_samples(items, tmp_path / "one", prefix="b", max_count=100, max_bytes=1, progress=False)
    assert [s["samples"] for s in manifest["shards"]] == [1] * 6


def test_invalid_samples_and_skips_are_counted(tmp_path: Path) -> None:
    bad_bbox = make_sample(1, key="bad")
    bad_bbox.queries[0].instances[0].bbox = [0, 0, 1, 1]
    dup_phrase = make_sample(2, key="dup")
    dup_phrase.queries.append(Query(dup_phrase.queries[0].phrase, []))
    dotted = make_sample(3, key="has.dot")
    items = [
        make_sample(0),
        bad_bbox,
        dup_phrase,
        make_sample(0),
        dotted,
        Skip("gone", "missing image file", "x.jpg"),
    ]
    sink = _write(tmp_path, items)
    manifest = sink.written_manifest
    assert manifest["num_samples"] == 1
    assert manifest["skipped"]["by_reason"] == {
        "invalid queries.instances.bbox": 1,
        "invalid queries.phrase": 1,
        "invalid __key__": 2,
        "missing image file": 1,
    }
    examples = {e["key"]: e for e in manifest["skipped"]["examples"]}
    assert "sample 'bad', field queries[0].instances[0].bbox" in examples["bad"]["detail"]
    assert "not unique" in examples["s0000"]["detail"]
    assert "skipped      2 x invalid __key__" in sink.summary()


def test_strict_mode_raises_naming_the_sample(tmp_path: Path) -> None:
    bad = make_sample(1, key="bad")
    bad.origin = "src/img1.jpg"
    bad.queries[0].phrase = ""
    with pytest.raises(SampleError) as info:
        _write(tmp_path, [make_sample(0), bad], on_invalid="raise")
    assert info.value.key == "bad" and info.value.field == "queries[0].phrase"
    assert "file src/img1.jpg" in str(info.value)


def test_dropped_annotations_are_counted_across_resume(tmp_path: Path) -> None:
    items = [make_sample(i) for i in range(7)]
    for i, sample in enumerate(items):
        sample.dropped = {"zero-area mask": 1} if i % 2 else {"polygon with fewer than 3 points": 2}
    with pytest.raises(Interrupted):
        _write(tmp_path, items, fail_after=5)
    sink = _write(tmp_path, items, mode="resume")
    assert sink.written_manifest["dropped_annotations"] == {
        "total": 11,
        "by_reason": {"polygon with fewer than 3 points": 8, "zero-area mask": 3},
    }
    assert "dropped      8 x polygon with fewer than 3 points" in sink.summary()


def test_new_refuses_and_overwrite_replaces(tmp_path: Path) -> None:
    _write(tmp_path, [make_sample(i) for i in range(7)])
    with pytest.raises(FileExistsError, match="--overwrite"):
        _write(tmp_path, [make_sample(i) for i in range(2)])
    _write(tmp_path, [make_sample(i + 10) for i in range(2)], mode="overwrite")
    assert _tar_names(tmp_path) == ["manifest.json", "sizes.json", "t-000000.tar"]
    assert [k for k, _, _ in _contents(tmp_path)] == ["s0010", "s0011"]


def test_failure_mid_write_leaves_finished_shards_and_progress(tmp_path: Path) -> None:
    items = [make_sample(i) for i in range(8)]
    with pytest.raises(Interrupted):
        _write(tmp_path, items, fail_after=7)
    assert _tar_names(tmp_path) == [PROGRESS, "t-000000.tar", "t-000001.tar"]
    progress = json.loads((tmp_path / PROGRESS).read_text())
    assert [(s["name"], s["consumed"]) for s in progress["shards"]] == [
        ("t-000000.tar", 3),
        ("t-000001.tar", 6),
    ]
    assert all(s["sha256"] == sha256_of(tmp_path / s["name"]) for s in progress["shards"])


def test_resume_keeps_finished_shards_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    items = [make_sample(i) for i in range(8)] + [Skip("k-skip", "missing image file")] + [make_sample(9)]
    reference = tmp_path / "reference"
    _write(reference, items)

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        _write(resumed, items, fail_after=7)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in resumed.glob("*.tar")}
    sink = _write(resumed, items, mode="resume")
    assert sink.start_index == 6
    for name, (data, mtime) in before.items():
        assert (resumed / name).read_bytes() == data and (resumed / name).stat().st_mtime_ns == mtime
    assert _contents(resumed) == _contents(reference)
    ref_manifest = json.loads((reference / "manifest.json").read_text())
    manifest = sink.written_manifest
    for field in ("num_samples", "num_queries", "num_instances", "num_negatives", "phrases", "skipped"):
        assert manifest[field] == ref_manifest[field], field
    assert not (resumed / PROGRESS).exists()
    # resuming a finished set is a no-op
    sink = _write(resumed, items, mode="resume")
    assert sink.already_complete and "already complete with 9 samples" in sink.summary()


def test_resume_detects_and_rewrites_a_corrupted_shard(tmp_path: Path) -> None:
    items = [make_sample(i) for i in range(11)]
    with pytest.raises(Interrupted):
        _write(tmp_path, items, fail_after=10)
    first = (tmp_path / "t-000000.tar").read_bytes()
    corrupted = tmp_path / "t-000001.tar"
    data = bytearray(corrupted.read_bytes())
    data[700] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    sink = _write(tmp_path, items, mode="resume")
    assert sink.start_index == 3  # the verified prefix is shard 0 only
    assert (tmp_path / "t-000000.tar").read_bytes() == first
    assert [k for k, _, _ in _contents(tmp_path)] == [s.key for s in items]
    manifest = sink.written_manifest
    assert all(s["sha256"] == sha256_of(tmp_path / s["name"]) for s in manifest["shards"])


def test_resume_refuses_a_complete_set_with_a_changed_shard(tmp_path: Path) -> None:
    _write(tmp_path, [make_sample(i) for i in range(4)])
    (tmp_path / "t-000001.tar").write_bytes(b"changed")
    with pytest.raises(RuntimeError, match="t-000001.tar is missing or fails its manifest checksum"):
        _write(tmp_path, [], mode="resume")
