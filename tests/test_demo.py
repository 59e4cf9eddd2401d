"""``make demo``'s driver: before/after evaluation, a checkpoint, overlays and a summary under ``--out``."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipelines.synthetic import generate_synthetic
from sambridge.demo import DEMO_SYNTHETIC, HEADLINE, main


@pytest.mark.timeout(300)
def test_demo_trains_evaluates_before_and_after_and_writes_its_outputs(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    generate_synthetic(data, image_size=64, num_train=16, num_val=8, num_heldout=8, max_count=4, **DEMO_SYNTHETIC)
    stale = out / "checkpoints" / "last.ckpt"  # a previous demo's: the docs' commands must read this run's
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"previous run")
    assert main(["--data", str(data), "--out", str(out), "--max-steps", "3", "--overlays", "2"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert set(summary["before"]) == set(summary["after"]) == {"val (new images)", "heldout (unseen combinations)"}
    for scores in (*summary["before"].values(), *summary["after"].values()):
        assert set(scores) == set(HEADLINE)
    printed = capsys.readouterr().out
    assert "Trained 3 steps" in printed and "| heldout (unseen combinations) | cgF1 |" in printed
    assert f"Checkpoint of this run: {stale}" in printed
    assert torch.load(stale, weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in stale.parent.glob("*.ckpt")) == ["last.ckpt"]
    assert len(list((out / "heldout_predictions" / "overlays").glob("*.png"))) == 2
    assert list(out.glob("lightning_logs/version_*/reports/test_*_per_phrase.csv"))  # logs under --out
