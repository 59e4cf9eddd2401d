"""Shard streams: exact and resampled epochs, rank/worker splits, bad samples, epoch seeding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from shard_helpers import make_sample

from data_pipelines.pipeline import (
    ShardStream,
    SharedEpoch,
    assign_shards,
    balanced_budgets,
    make_loader,
    resolve_shards,
    shuffle_assignment,
)
from data_pipelines.schema import sample_from_wds
from data_pipelines.writer import MANIFEST, ShardSink, sha256_of


def write_shards(folder: Path, sizes: list[int], prefix: str = "part") -> list[str]:
    """One tar per entry of ``sizes`` (keys ``{prefix}{shard}-{i}``) and a sizes.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for shard, size in enumerate(sizes):
        name = f"{prefix}-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as tar:
            for i in range(size):
                tar.write(make_sample(i, key=f"{prefix}{shard}-{i:03d}").to_wds())
        names.append(name)
    (folder / "sizes.json").write_text(json.dumps(dict(zip(names, sizes, strict=True))))
    return names


def key_of(record, rng=None) -> str:
    return record["__key__"]


def validated_key(record, rng=None) -> str:
    return sample_from_wds(record).key


def as_list(items: list) -> list:
    return list(items)


def stream(folder: Path | str, mode: str = "exact", **kwargs) -> ShardStream:
    kwargs.setdefault("batch_size", 3)
    kwargs.setdefault("transform", key_of)
    return ShardStream(resolve_shards(str(folder)), kwargs.pop("transform"), as_list, mode=mode, **kwargs)


def run_epoch(data: ShardStream, **loader_kwargs) -> list[list[str]]:
    return list(make_loader(data, **loader_kwargs))


def all_keys(sizes: list[int], prefix: str = "part") -> list[str]:
    return sorted(f"{prefix}{s}-{i:03d}" for s, n in enumerate(sizes) for i in range(n))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sizes,batch_size", [([10, 10], 3), ([10, 10], 5), ([10, 7, 3], 4)])
def test_exact_epoch_reads_every_sample_once(tmp_path, sizes, batch_size):
    write_shards(tmp_path, sizes)
    data = stream(tmp_path, batch_size=batch_size, num_workers=2)
    batches = run_epoch(data)
    keys = [k for b in batches for k in b]
    assert sorted(keys) == all_keys(sizes)
    assert len(batches) == len(data) == len(make_loader(data))


@pytest.mark.timeout(60)
def test_resampled_epoch_has_the_computed_number_of_full_batches(tmp_path):
    write_shards(tmp_path, [10, 10])
    data = stream(tmp_path, mode="resampled", batch_size=4, num_workers=2, num_samples=50)
    batches = run_epoch(data)
    # open_clip's arithmetic: ceil(50 samples / (4 per batch x 1 rank x 2 workers)) = 7 per worker
    assert len(data) == 14 and len(batches) == 14
    assert all(len(b) == 4 for b in batches)
    assert set(k for b in batches for k in b) <= set(all_keys([10, 10]))


@pytest.mark.timeout(60)
def test_two_ranks_get_equal_training_batch_counts(tmp_path):
    sizes = [10, 10, 7, 2]
    write_shards(tmp_path, sizes)
    ranks = [stream(tmp_path, batch_size=3, num_workers=2, rank=r, world_size=2) for r in range(2)]
    epochs = [run_epoch(r) for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(epochs[0]) == len(epochs[1])
    keys = [[k for b in e for k in b] for e in epochs]
    assert len(set(keys[0])) == len(keys[0]) and len(set(keys[1])) == len(keys[1])
    assert not set(keys[0]) & set(keys[1])  # ranks read different shards
    assert "left out" in ranks[0].describe()  # the balancing is reported


@pytest.mark.timeout(60)
def test_two_ranks_split_validation_disjointly_and_completely(tmp_path):
    sizes = [10, 10, 7]
    write_shards(tmp_path, sizes)
    ranks = [stream(tmp_path, mode="once", num_workers=2, rank=r, world_size=2) for r in range(2)]
    epochs = [run_epoch(r) for r in ranks]
    keys = [[k for b in e for k in b] for e in epochs]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == all_keys(sizes)
    assert [len(e) for e in epochs] == [len(r) for r in ranks]  # uneven lengths are allowed here


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sizes", [[9], [5, 4]])
def test_fewer_evaluation_shards_than_ranks_and_workers_still_feed_every_one(tmp_path, sizes):
    """One validation shard for 2 ranks x 2 workers: each slot keeps every 4th sample of all shards."""
    write_shards(tmp_path, sizes)
    ranks = [stream(tmp_path, mode="once", num_workers=2, rank=r, world_size=2, batch_size=2) for r in range(2)]
    epochs = [run_epoch(r) for r in ranks]
    keys = [[k for b in e for k in b] for e in epochs]
    assert all(keys) and not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == all_keys(sizes)  # each sample once across ranks
    assert [len(e) for e in epochs] == [len(r) for r in ranks]
    assert "each reads every shard" in ranks[0].describe()


@pytest.mark.timeout(60)
def test_rank_and_world_from_environment(tmp_path, monkeypatch):
    write_shards(tmp_path, [4, 4])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    keys = [k for b in run_epoch(stream(tmp_path, mode="once", rank=rank, world_size=world)) for k in b]
    assert keys and all(k.startswith("part1-") for k in keys)


@pytest.mark.timeout(60)
def test_a_worker_without_shards_does_not_hang(tmp_path):
    write_shards(tmp_path, [5])
    batches = run_epoch(stream(tmp_path, mode="once", num_workers=2))
    assert sorted(k for b in batches for k in b) == all_keys([5])
    resampled = stream(tmp_path, mode="resampled", num_workers=2, num_samples=12, batch_size=2)
    assert len(run_epoch(resampled)) == 6


def test_exact_epoch_needs_a_shard_per_rank_and_worker(tmp_path):
    write_shards(tmp_path, [5, 5, 5])
    with pytest.raises(ValueError, match="resampled=True"):
        stream(tmp_path, num_workers=2, world_size=2)


def corrupt_json(path: Path, key: str) -> None:
    """Rewrite a shard with the json of sample ``key`` broken.

    A manifest.json beside it records the new sha256, as if the shard had been written with the bad
    sample: training then meets the sample (and skips it) rather than set-up refusing a changed shard.
    """
    records = list(wds.WebDataset(str(path), shardshuffle=False))
    with wds.TarWriter(str(path)) as tar:
        for record in records:
            record = {k: v for k, v in record.items() if k != "__url__" and k != "__local_path__"}
            if record["__key__"] == key:
                record["json"] = b'{"schema": 1, "image": '
            tar.write(record)
    manifest_path = path.parent / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        for shard in manifest["shards"]:
            if shard["name"] == path.name:
                shard.update(sha256=sha256_of(path), bytes=path.stat().st_size)
        manifest_path.write_text(json.dumps(manifest))


@pytest.mark.timeout(60)
def test_a_corrupt_sample_is_counted_not_silently_dropped(tmp_path, caplog):
    names = write_shards(tmp_path, [7, 6])
    corrupt_json(tmp_path / names[1], "part1-002")
    once = stream(tmp_path, mode="once", transform=validated_key, num_workers=2)
    keys = [k for b in run_epoch(once) for k in b]
    assert sorted(keys) == [k for k in all_keys([7, 6]) if k != "part1-002"]
    assert once.errors.count == 1
    # exact epochs keep their batch count (13 samples: 5 batches of 3, but 12 good ones fill only 4):
    # the worker re-reads its shards to fill the gap
    exact = stream(tmp_path, transform=validated_key, batch_size=3)
    with caplog.at_level("WARNING"):
        batches = run_epoch(exact)
    assert len(batches) == len(exact) == 5 and exact.errors.count >= 1
    assert "part1-002" in caplog.text and "json" in caplog.text and "re-reads its shards" in caplog.text


def test_a_bug_in_the_transform_is_raised_not_counted(tmp_path):
    write_shards(tmp_path, [3])

    data = stream(tmp_path, mode="once", transform=broken_transform)
    with pytest.raises(TypeError, match="a bug"):
        run_epoch(data)
    assert data.errors.count == 0


def broken_transform(record, rng=None):
    raise TypeError("a bug")


def test_epoch_seeds_the_shard_order(tmp_path):
    write_shards(tmp_path, [4] * 6)

    def order(epoch: int, shuffle_buffer: int = 0) -> list[str]:
        data = stream(tmp_path, epoch=SharedEpoch(epoch), shuffle_buffer=shuffle_buffer, seed=5)
        return [k for b in run_epoch(data) for k in b]

    assert order(0) == order(0) and order(0, 50) == order(0, 50)  # deterministic
    shard_orders = {tuple(dict.fromkeys(k.split("-")[0] for k in order(e))) for e in range(4)}
    assert len(shard_orders) > 1  # the epoch changes the shard order
    assert sorted(order(3, 50)) == sorted(order(0))


@pytest.mark.timeout(60)
def test_persistent_workers_see_the_shared_epoch(tmp_path):
    write_shards(tmp_path, [4] * 4)
    epoch = SharedEpoch(0)
    data = stream(tmp_path, epoch=epoch, num_workers=2, seed=1)
    loader = make_loader(data, persistent_workers=True)
    first = [k for b in loader for k in b]
    epoch.set(1)
    second = [k for b in loader for k in b]
    fresh = [k for b in run_epoch(stream(tmp_path, epoch=SharedEpoch(1), num_workers=2, seed=1)) for k in b]
    assert second == fresh != first


def test_assignment_and_budget_arithmetic():
    assert assign_shards([10, 10, 7, 2], 2) == [[0, 2], [1, 3]]
    assert assign_shards([5, 5, 5, 5], 3) == [[0, 3], [1], [2]]  # equal sizes go round-robin
    sizes = [8, 8, 8, 8, 3]
    slots = assign_shards(sizes, 2)
    epochs = [shuffle_assignment(slots, sizes, 0, e) for e in range(8)]
    totals = {tuple(sum(sizes[s] for s in slot) for slot in epoch) for epoch in epochs}
    assert totals == {(19, 16)}  # slot sizes never change, so neither does the epoch length
    homes = {next(i for i, slot in enumerate(epoch) if 0 in slot) for epoch in epochs}
    assert homes == {0, 1}  # but shards move between ranks/workers
    assert balanced_budgets([[4, 3], [4, 1]]) == [[3, 2], [4, 1]]
    assert balanced_budgets([[2, 2], [2, 2]]) == [[2, 2], [2, 2]]


def test_resolve_directory_pattern_and_remote_sources(tmp_path):
    with ShardSink(tmp_path / "set", prefix="train", max_count=4, progress=False) as sink:
        for i in range(10):
            sink.add(make_sample(i))
    resolved = resolve_shards(str(tmp_path / "set"))
    assert [Path(u).name for u in resolved.urls] == [f"train-00000{i}.tar" for i in range(3)]
    assert resolved.sizes == (4, 4, 2) and resolved.num_samples == 10
    assert set(resolved.phrases) == {"thing 0", "thing 1", "thing 2", "absent"}

    write_shards(tmp_path / "raw", [3, 5])
    pattern = resolve_shards(str(tmp_path / "raw" / "part-{000000..000001}.tar"))
    assert pattern.sizes == (3, 5) and pattern.phrases == ()
    both = resolve_shards([str(tmp_path / "set"), str(tmp_path / "raw")])
    assert both.num_samples == 18 and len(both.urls) == 5

    remote = resolve_shards("pipe:curl -s https://example.org/shard-{000..003}.tar")
    assert remote.sizes is None and len(remote.urls) == 4
    with pytest.raises(ValueError, match="num_samples"):
        ShardStream(remote, key_of, as_list, mode="exact", batch_size=2)
    assert len(ShardStream(remote, key_of, as_list, mode="exact", batch_size=2, num_samples=10)) == 5

    with pytest.raises(FileNotFoundError, match="manifest.json"):
        resolve_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        resolve_shards(str(tmp_path / "raw" / "part-{000000..000004}.tar"))
    with pytest.raises(ValueError, match="one non-negative weight per source"):
        resolve_shards([str(tmp_path / "set")], weights=[1.0, 2.0])


@pytest.mark.timeout(60)
def test_weighted_sources_are_mixed_by_weight(tmp_path):
    write_shards(tmp_path / "a", [10], prefix="a")
    write_shards(tmp_path / "b", [10, 10], prefix="b")
    sources = [str(tmp_path / "a"), str(tmp_path / "b")]

    def share_of_a(weights: list[float]) -> float:
        data = ShardStream(
            resolve_shards(sources, weights),
            key_of,
            as_list,
            mode="resampled",
            batch_size=8,
            num_samples=1600,
            shuffle_buffer=0,
        )
        counts = Counter(k[0] for b in run_epoch(data) for k in b)
        return counts["a"] / sum(counts.values())

    assert share_of_a([1.0, 0.0]) == 1.0
    assert share_of_a([3.0, 1.0]) == pytest.approx(0.75, abs=0.08)
    # pooled (no weights): every sample equally likely, so a third of them come from "a"
    pooled = ShardStream(
        resolve_shards(sources), key_of, as_list, mode="resampled", batch_size=8, num_samples=1600
    )
    counts = Counter(k[0] for b in run_epoch(pooled) for k in b)
    assert counts["a"] / sum(counts.values()) == pytest.approx(1 / 3, abs=0.08)


def test_stream_rejects_bad_layout(tmp_path):
    write_shards(tmp_path, [2])
    shards = resolve_shards(str(tmp_path))
    with pytest.raises(ValueError, match="rank"):
        ShardStream(shards, key_of, as_list, mode="once", batch_size=2, rank=2, world_size=2)
    data = stream(tmp_path, mode="once", num_workers=2)
    with pytest.raises(RuntimeError, match="num_workers=2"):
        list(iter(data))  # iterated in the main process, not by 2 workers


@pytest.mark.timeout(120)
def test_spawned_workers_share_the_epoch_and_error_count(tmp_path):
    names = write_shards(tmp_path, [4, 4])
    corrupt_json(tmp_path / names[0], "part0-001")
    epoch = SharedEpoch(3)
    data = stream(tmp_path, mode="exact", transform=validated_key, num_workers=2, epoch=epoch, seed=2)
    spawned = wds.WebLoader(data, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    keys = [k for b in spawned for k in b]
    forked = [
        k
        for b in run_epoch(
            stream(tmp_path, transform=validated_key, num_workers=2, epoch=SharedEpoch(3), seed=2)
        )
        for k in b
    ]
    assert keys == forked and data.errors.count >= 1  # same epoch-3 order; errors counted across processes
