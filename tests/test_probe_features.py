"""scripts/probe_features.py: a linear probe of mask-pooled image features."""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import make_shards
from script_loader import load_script
from test_export import fit_one_step

from sambridge.modules import GroundingModule

probe = load_script("probe_features")


def test_labels_are_the_phrase_or_one_of_its_words() -> None:
    assert probe.label_of("green triangle", None) == "green triangle"
    assert probe.label_of("green triangle", -1) == "triangle"
    assert probe.label_of("green triangle", 0) == "green"
    assert probe.label_of("triangle", -1) is None  # one word: it would label the same object twice
    assert probe.label_of("big red star", 3) is None


def test_probe_separates_informative_features_and_not_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = ["a", "b", "c"] * 200
    centres = {"a": 0.0, "b": 6.0, "c": -6.0}
    informative = torch.randn(600, 8, generator=generator)
    informative[:, 0] += torch.tensor([centres[c] for c in labels])
    train_acc, val_acc = probe.probe_accuracy(informative[:300], labels[:300], informative[300:], labels[300:])
    assert train_acc > 0.97 and val_acc > 0.97
    noise = torch.randn(600, 8, generator=generator)
    _, val_acc = probe.probe_accuracy(noise[:300], labels[:300], noise[300:], labels[300:])
    assert val_acc < 0.45  # chance is 1/3
    _, unseen = probe.probe_accuracy(informative[:300], labels[:300], informative[300:303], ["d", "d", "d"])
    assert unseen == 0.0


def test_main_probes_every_level_of_a_checkpoint_and_its_random_twin(tmp_path, grounding_batch) -> None:
    shards = make_shards(tmp_path / "shards")
    torch.manual_seed(0)
    checkpoint = fit_one_step(GroundingModule(model="grounded_sam2_tiny", image_size=64), grounding_batch,
                              tmp_path / "last.ckpt")
    result = probe.main(["--checkpoint", str(checkpoint), "--train", str(shards / "train"), "--val",
                         str(shards / "val"), "--word", "-1", "--batches", "2", "--batch-size", "4",
                         "--untrained", "--json", str(tmp_path / "probe.json")])
    rows = result["rows"]
    assert [(r["weights"], r["stride"]) for r in rows] == [
        ("trained", 4), ("trained", 8), ("trained", 16), ("untrained", 4), ("untrained", 8), ("untrained", 16)]
    assert all(0 <= r["val_accuracy"] <= 1 and r["train_samples"] > 0 and r["classes"] > 1 for r in rows)
    assert json.loads((tmp_path / "probe.json").read_text()) == result


def test_a_missing_checkpoint_is_one_clear_line_and_exit_2(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        probe.main(["--checkpoint", str(tmp_path / "nope.ckpt"), "--train", "x", "--val", "y"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("probe_features: error:") and "nope.ckpt" in err
