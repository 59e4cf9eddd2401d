"""Test-stage files over several batches (PredictionWriter) and per-phrase AP / counting error of several models."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from script_loader import load_script

from data_pipelines.augment import AugmentConfig
from data_pipelines.collate import QueryPolicy, SampleTransform, collate_samples
from data_pipelines.orchard import OrchardConfig, orchard_sample
from sambridge.callbacks import PredictionWriter
from sambridge.evaluate import evaluate_files

SIDE = 64


def perfect_predictions(batch) -> dict[str, torch.Tensor]:
    """Every ground-truth instance predicted with score 1 (padded to the most instances of a query)."""
    slices = batch.instance_slices()
    k = max(1, max(s.stop - s.start for s in slices))
    q = batch.num_queries
    masks = torch.zeros((q, k, SIDE, SIDE), dtype=torch.bool)
    scores, keep = torch.zeros((q, k)), torch.zeros((q, k), dtype=torch.bool)
    for query, rows in enumerate(slices):
        n = rows.stop - rows.start
        masks[query, :n], scores[query, :n], keep[query, :n] = batch.masks[rows], 1.0, True
    return {"masks": masks, "scores": scores, "keep": keep}


@pytest.fixture(scope="module")
def perfect_run(tmp_path_factory) -> Path:
    """ground_truth.json and predictions.json of a model predicting every instance, over three batches."""
    out = tmp_path_factory.mktemp("test_run")
    transform = SampleTransform(QueryPolicy(max_queries=8), AugmentConfig(image_size=SIDE))
    config = OrchardConfig(height=SIDE, width=SIDE, fruit_count=(4, 8))
    samples = [transform(orchard_sample(config, i).to_wds()) for i in range(6)]
    writer = PredictionWriter(output_dir=str(out), overlays=0, stages=("test",))
    trainer = SimpleNamespace(global_rank=0, world_size=1, is_global_zero=True, default_root_dir=str(out),
                              strategy=SimpleNamespace(barrier=lambda name: None))
    for i in range(0, 6, 2):
        batch = collate_samples(samples[i:i + 2])
        writer.on_test_batch_end(trainer, None, {"predictions": perfect_predictions(batch)}, batch, 0)
    writer.on_test_epoch_end(trainer, None)
    return out


def test_ground_truth_of_several_batches_has_unique_annotation_ids(perfect_run):
    metrics = evaluate_files(perfect_run / "ground_truth.json", perfect_run / "predictions.json")
    assert metrics["num_queries"] == 6 * 3  # every image asks the three fruit phrases
    assert metrics["AP"] == pytest.approx(1.0) and metrics["count_mae"] == 0.0
    assert metrics["cgF1"] == pytest.approx(100.0, abs=0.01)  # SAM3's formulas add a small epsilon


def test_per_phrase_comparison_of_two_models(perfect_run, tmp_path):
    compare = load_script("compare_per_phrase")
    ground_truth = json.loads((perfect_run / "ground_truth.json").read_text())
    lemon_ids = {img["id"] for img in ground_truth["images"] if img["text_input"] == "lemon"}
    predictions = json.loads((perfect_run / "predictions.json").read_text())
    no_lemons = tmp_path / "no_lemons.json"
    no_lemons.write_text(json.dumps([p for p in predictions if p["image_id"] not in lemon_ids]))
    out = tmp_path / "table.md"
    assert compare.main(["--gt", str(perfect_run / "ground_truth.json"), "--pred",
                         f"perfect={perfect_run / 'predictions.json'}", "--pred", f"blind={no_lemons}",
                         "--out", str(out)]) == 0
    gt = compare.load_ground_truth(perfect_run / "ground_truth.json")
    blind = compare.phrase_metrics(gt, compare.load_predictions(no_lemons, gt), 0.5)
    perfect = compare.phrase_metrics(gt, compare.load_predictions(perfect_run / "predictions.json", gt), 0.5)
    lemons = sum(len(gt.instances[i]) for i in lemon_ids)
    assert blind["lemon"]["instances"] == lemons > 0
    assert blind["lemon"]["AP"] == 0.0 and blind["lemon"]["count_err%"] == -100.0
    assert blind["lemon"]["count_mae"] == pytest.approx(lemons / 6)
    for phrase in ("ripe apple", "unripe apple"):
        assert blind[phrase]["AP"] == perfect[phrase]["AP"] == pytest.approx(1.0)
        assert blind[phrase]["count_err%"] == perfect[phrase]["count_err%"] == 0.0
    total = perfect["all"]["instances"]
    assert blind["all"]["count_err%"] == pytest.approx(-100.0 * lemons / total)
    assert 0.0 < blind["all"]["AP"] < 1.0 == pytest.approx(perfect["all"]["AP"])
    assert blind["all"]["AP"] == evaluate_files(perfect_run / "ground_truth.json", no_lemons)["AP"]
    table = out.read_text()
    assert "| perfect AP | perfect AP50 | perfect AP75 | perfect count_mae | perfect count_err% | blind AP |" in table
    assert (f"| lemon | 6 | {lemons} | 1.000 | 1.000 | 1.000 | 0.000 | +0.0 | 0.000 | 0.000 | 0.000 | "
            f"{lemons / 6:.3f} | -100.0 |") in table
