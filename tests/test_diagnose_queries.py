"""scripts/diagnose_queries.py: per-instance and per-slot tallies of a model's detections."""

from __future__ import annotations

from collections import Counter

import torch
from script_loader import load_script

from data_pipelines.batch import GroundingBatch


class ThreeQueries(torch.nn.Module):
    """Query 0 masks the left square (0.9), query 1 the right one (0.3), query 2 nothing (0.6);
    the absent phrase's best query scores 0.7."""

    def forward(self, images, phrases, query_image):
        left, right = torch.zeros(8, 8), torch.zeros(8, 8)
        left[2:6, 0:3], right[2:6, 5:8] = 1, 1
        masks = torch.stack([left, right, torch.zeros(8, 8)]) * 40 - 20
        return {"pred_masks": masks.expand(2, -1, -1, -1), "presence_logit_dec": torch.tensor([[2.0], [-1.0]]),
                "scores": torch.tensor([[0.9, 0.3, 0.6], [0.7, 0.1, 0.1]])}

    def scores(self, out):
        return out["scores"]


def test_tallies_say_which_instances_are_reachable_found_and_which_slots_fire():
    left, right = torch.zeros(8, 8, dtype=torch.bool), torch.zeros(8, 8, dtype=torch.bool)
    left[2:6, 0:3], right[2:6, 5:8] = True, True
    batch = GroundingBatch(
        images=torch.zeros(1, 3, 8, 8), valid_hw=torch.tensor([[8, 8]]), orig_hw=torch.tensor([[8, 8]]), keys=["k"],
        phrases=["square", "red star"], query_image=torch.zeros(2, dtype=torch.long),
        exhaustive=torch.ones(2, dtype=torch.bool), num_instances=torch.tensor([2, 0]),
        boxes=torch.tensor([[0.19, 0.5, 0.375, 0.5], [0.81, 0.5, 0.375, 0.5]]), masks=torch.stack([left, right]),
        instance_query=torch.tensor([0, 0]),
    )
    script, counts = load_script("diagnose_queries"), Counter()
    script.instance_rows(ThreeQueries(), batch, 0.5, counts)
    summary = script.summarise(counts)
    assert summary["instances"] == 2 and summary["reachable"] == 1.0
    assert summary["found_of_reachable"] == 0.5 and summary["found_of_reachable_one_word"] == 0.5
    assert summary["detections"] == 2 and summary["detections_from_slot0"] == 0.5
    assert summary["right_slot0"] == 1.0 and summary["right_other_slots"] == 0.0 and summary["empty_masks"] == 1
    assert summary["absent_fired"] == 1.0 and summary["presence_absent"] < 0.5 < summary["presence_present"]
