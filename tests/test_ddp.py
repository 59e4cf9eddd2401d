"""Two-process DDP through the CLI on CPU (gloo), with the shipped configs/trainer/ddp.yaml."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import webdataset as wds
from run_helpers import REPO, fit_args, make_shards, run_cli

from data_pipelines.collate import QueryPolicy
from data_pipelines.pipeline import resolve_shards
from data_pipelines.schema import sample_from_wds
from data_pipelines.synthetic import generate_synthetic
from sambridge.callbacks.sample_log import read_sample_log

MAX_QUERIES = 6  # the demo config's max_queries_per_image


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("ddp-shards"))


def exhaustive_val_queries(split: Path) -> int:
    """Queries the validation metrics must count: each image's asked queries that are exhaustive."""
    policy = QueryPolicy(max_queries=MAX_QUERIES)
    total = 0
    urls = list(resolve_shards(str(split)).urls)
    for record in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sample = sample_from_wds(record)
        total += sum(query.exhaustive for _, query in policy.select(sample.queries, None))
    return total


def logged(root: Path, column: str) -> list[float]:
    rows = csv.DictReader(next(root.rglob("metrics.csv")).open())
    return [float(row[column]) for row in rows if row.get(column)]


@pytest.mark.slow  # 30 s; DDP metric sync stays in the default suite (test_metrics_streaming)
@pytest.mark.timeout(300)
def test_two_rank_ddp_fit_reads_disjoint_data_and_counts_each_val_query_once(shards, tmp_path):
    # 16 images over 2 ranks x 1 worker, batch 2: 4 steps are one epoch, each rank reading 8 images;
    # validation is one shard, so rank 1 has none (as with the demo's data): it evaluates nothing
    one_val_shard = tmp_path / "one-val-shard"
    generate_synthetic(one_val_shard, image_size=64, num_train=2, num_val=8, num_heldout=0, max_count=8)
    assert len(list((one_val_shard / "val").glob("*.tar"))) == 1
    run_cli(fit_args(shards, tmp_path, "--data.init_args.val", str(one_val_shard / "val"),
                     "--config", str(REPO / "configs/trainer/ddp.yaml"),
                     "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                     "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
                     "--trainer.callbacks+=sambridge.callbacks.sample_log.SampleLog",
                     "--trainer.callbacks+=sambridge.callbacks.throughput.Throughput",
                     "--trainer.callbacks.window=1", workers=1))

    ranks = [read_sample_log(tmp_path / "samples" / f"samples-rank{r}.jsonl") for r in (0, 1)]
    assert [sorted(log) for log in ranks] == [[(0, b) for b in range(4)]] * 2
    seen = [[key for keys in log.values() for key in keys] for log in ranks]
    assert not set(seen[0]) & set(seen[1])  # disjoint shards per rank
    assert sorted(seen[0] + seen[1]) == [f"synthetic-train-{i:07d}" for i in range(16)]  # each image once

    expected = exhaustive_val_queries(one_val_shard / "val")
    assert expected > 8
    assert logged(tmp_path, "val_num_queries") == [expected]  # reduced over ranks once, not twice or halved

    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint["ShardDataModule"]["world_size"] == 2
    rates = logged(tmp_path, "train_images_per_s")
    assert len(rates) == 3 and all(rate > 0 for rate in rates)  # every step but the first (no wait known)
