"""ShardDataModule on synthetic shards: setup, loaders, epochs, ranks, negatives, state, config."""

from __future__ import annotations

import inspect
import json
import math
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

from data_pipelines import ShardDataModule
from data_pipelines.datamodule import MissingSplitError
from data_pipelines.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    generate_synthetic(root, image_size=64, num_train=48, num_val=18, num_heldout=6, max_count=12, seed=1)
    return root


def module(shards: Path, **kwargs) -> ShardDataModule:
    kwargs = {
        "train": str(shards / "train"),
        "val": str(shards / "val"),
        "image_size": 64,
        "batch_size": 5,
        "num_workers": 0,
        "negatives_per_image": 0,
        **kwargs,
    }
    return ShardDataModule(**kwargs)


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch.keys]


@pytest.mark.timeout(60)
def test_setup_then_train_and_val_loaders(shards):
    dm = module(shards, num_workers=2, persistent_workers=False)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    batches = list(train)
    for batch in batches:
        batch.validate()
        assert batch.images.shape[1:] == (3, 64, 64) and batch.num_images <= 5
        assert torch.equal(
            batch.instance_query,
            torch.repeat_interleave(torch.arange(batch.num_queries), batch.num_instances),
        )
    train_keys = [k for b in batches for k in b.keys]
    assert len(batches) == len(train) == 2 * math.ceil(24 / 5)  # 4 shards of 12 over 2 workers
    assert sorted(train_keys) == [f"synthetic-train-{i:07d}" for i in range(48)]  # exact epoch
    val_keys = keys_of(val)
    assert sorted(val_keys) == [f"synthetic-val-{i:07d}" for i in range(18)]
    description = dm.describe()
    assert "train: 4 shard(s), 48 samples, exact -> 10 batches per epoch" in description
    assert "val: 2 shard(s), 18 samples, once" in description
    assert dm.skipped() == {"train": 0, "val": 0}


@pytest.mark.parametrize("shuffle_buffer", [0, 100])
def test_set_epoch_changes_the_order_deterministically(shards, shuffle_buffer):
    dm = module(shards, shuffle_buffer=shuffle_buffer)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = keys_of(loader)
    dm.set_epoch(1)
    second = keys_of(loader)
    dm.set_epoch(0)
    again = keys_of(loader)
    assert first == again and first != second and sorted(first) == sorted(second)
    if shuffle_buffer == 0:  # samples in shard order: the shard order itself changed
        shard_orders = [list(dict.fromkeys(int(k[-7:]) // 12 for k in keys)) for keys in (first, second)]
        assert sorted(shard_orders[0]) == sorted(shard_orders[1]) == [0, 1, 2, 3]
        assert shard_orders[0] != shard_orders[1]


def test_negatives_are_drawn_from_the_manifest_vocabulary(shards):
    dm = module(
        shards, negatives_per_image=2, max_queries_per_image=12, hflip_prob=0.0, scale_range=(1.0, 1.0)
    )
    dm.setup("fit")
    vocabulary = set(json.loads((shards / "train" / "manifest.json").read_text())["phrases"])
    batch = next(iter(dm.train_dataloader()))
    per_image = Counter(batch.query_image.tolist())
    assert set(per_image.values()) == {7 + 2}  # the generator asks 7 phrases; two negatives added
    for image in range(batch.num_images):
        phrases = [p for p, i in zip(batch.phrases, batch.query_image.tolist(), strict=True) if i == image]
        assert len(set(phrases)) == len(phrases) and set(phrases) <= vocabulary
    val = next(iter(dm.val_dataloader()))
    assert set(Counter(val.query_image.tolist()).values()) == {7}  # none added outside training


def test_vocabulary_file(shards, tmp_path):
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("# phrases that never occur\nzebra\nokapi\n\n")
    dm = module(shards, negatives_per_image=2, max_queries_per_image=12, vocabulary=str(vocabulary))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    added = [p for p in batch.phrases if p in ("zebra", "okapi")]
    assert len(added) == 2 * batch.num_images
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        module(shards, negatives_per_image=1, vocabulary=str(tmp_path / "missing.txt")).setup("fit")


@pytest.mark.timeout(60)
def test_simulated_ranks_from_the_environment(shards, monkeypatch):
    lengths, val_keys = [], []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = module(shards, num_workers=2, persistent_workers=False)
        dm.setup("fit")
        train = dm.train_dataloader()
        lengths.append((len(train), len(list(train))))
        val_keys.append(keys_of(dm.val_dataloader()))
    assert lengths[0] == lengths[1] and lengths[0][0] == lengths[0][1]
    assert not set(val_keys[0]) & set(val_keys[1])
    assert sorted(val_keys[0] + val_keys[1]) == [f"synthetic-val-{i:07d}" for i in range(18)]


def test_resampled_mixture(shards):
    dm = module(
        shards,
        train=[str(shards / "train"), str(shards / "heldout")],
        train_weights=[1.0, 1.0],
        resampled=True,
        train_num_samples=40,
        batch_size=4,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    keys = keys_of(loader)
    assert len(loader) == 10 and len(keys) == 40
    assert {k.split("-")[1] for k in keys} == {"train", "heldout"}


def test_state_dict_records_epoch_and_seed(shards):
    dm = module(shards, seed=4)
    dm.set_epoch(3)
    assert dm.state_dict() == {"epoch": 3, "seed": 4}
    restored = module(shards, seed=4)
    restored.load_state_dict(dm.state_dict())
    assert restored.epoch == 3
    with pytest.warns(UserWarning, match="seed"):
        module(shards, seed=5).load_state_dict(dm.state_dict())


def test_configuration_errors(shards, tmp_path):
    with pytest.raises(ValueError, match="resampled=True"):
        module(shards, train=[str(shards / "train"), str(shards / "val")], train_weights=[1.0, 2.0])
    dm = module(shards, val=None)
    dm.setup("fit")
    assert dm.val_dataloader() == []  # Lightning skips validation
    with pytest.raises(MissingSplitError, match="no predict shards"):
        dm.predict_dataloader()
    with pytest.raises(MissingSplitError, match="not set up"):
        module(shards, test=str(shards / "heldout")).test_dataloader()
    with pytest.raises(ValueError, match="resampled=True"):
        module(shards, val=None, num_workers=5).setup("fit")  # 4 shards for 5 workers
    raw = tmp_path / "raw"
    raw.mkdir()
    for tar in (shards / "train").glob("*.tar"):
        (raw / tar.name).write_bytes(tar.read_bytes())
    (raw / "sizes.json").write_text((shards / "train" / "sizes.json").read_text())
    with pytest.raises(ValueError, match="no manifest.json beside the shards.*data.init_args.vocabulary FILE"):
        module(shards, train=str(raw), val=None, negatives_per_image=1).setup("fit")


def test_every_argument_is_typed_and_documented():
    from jsonargparse import ArgumentParser

    parameters = list(inspect.signature(ShardDataModule.__init__).parameters.values())[1:]
    assert all(p.annotation is not inspect.Parameter.empty for p in parameters)
    parser = ArgumentParser()
    parser.add_class_arguments(ShardDataModule, "data")
    help_text = parser.format_help()
    for p in parameters:
        assert f"--data.{p.name}" in help_text
        assert f"{p.name}:" in ShardDataModule.__doc__
    config = parser.parse_args(
        ["--data.train=shards/train", "--data.scale_range=[0.5, 1.5]", "--data.image_size=128"]
    )
    assert config.data.scale_range == (0.5, 1.5) and config.data.image_size == 128


class EpochProbe(L.LightningModule):
    """A minimal module that records the keys of every batch and sets the data epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_keys: dict[int, list[str]] = {}
        self.val_keys: list[str] = []

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx):
        batch.validate()
        self.train_keys.setdefault(self.current_epoch, []).extend(batch.keys)
        return (self.weight * batch.images.mean()).sum() + self.weight.pow(2).sum()

    def validation_step(self, batch, batch_idx) -> None:
        self.val_keys.extend(batch.keys)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.timeout(120)
def test_lightning_trainer_runs_exact_epochs(shards):
    dm = module(shards, num_workers=2)
    probe = EpochProbe()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(probe, datamodule=dm)
    assert trainer.num_training_batches == 10
    every_key = [f"synthetic-train-{i:07d}" for i in range(48)]
    assert sorted(probe.train_keys[0]) == sorted(probe.train_keys[1]) == every_key
    assert probe.train_keys[0] != probe.train_keys[1]  # set_epoch from the module reshuffled
    assert sorted(probe.val_keys) == sorted(2 * [f"synthetic-val-{i:07d}" for i in range(18)])
    assert dm.state_dict() == {"epoch": 1, "seed": 0}
