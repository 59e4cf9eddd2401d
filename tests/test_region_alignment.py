"""Region-phrase alignment: which (instance, phrase) pairs get which target, and that its loss trains the trunk."""

from __future__ import annotations

import torch

from sambridge.losses import GroundingLoss
from sambridge.models.region_alignment import RegionPhraseAlignment

# image 0: two red boxes and a blue one; image 1: a red and a green one ("red" names the red boxes too)
QUERIES = ((0, "red box", True), (0, "blue box", True), (0, "red", False), (1, "blue box", True),
           (1, "green box", False))


def test_targets_name_every_phrase_of_an_instance_and_only_known_pairs_count(make_batch) -> None:
    batch = make_batch(queries=QUERIES)
    assert batch.instance_query.tolist() == [0, 0, 1, 2, 2, 4]  # instances 3, 4 are instances 0, 1 again
    out = RegionPhraseAlignment(8)(torch.randn(2, 8, 16, 16), torch.randn(len(QUERIES), 8), batch)
    assert out["logits"].shape == (6, 5)
    red = [1, 0, 1, 0, 0]
    assert out["target"].tolist() == [red, red, [0, 1, 0, 0, 0], red, red, [0, 0, 0, 0, 1]]
    # a phrase of another image is unknown; of its own image known if it names the instance or is exhaustive
    red_known = [1, 1, 1, 0, 0]
    assert out["known"].tolist() == [red_known, red_known, [1, 1, 0, 0, 0], red_known, red_known, [0, 0, 0, 1, 1]]


def test_a_speck_is_still_named_by_its_own_phrase(make_batch) -> None:
    batch = make_batch(queries=((0, "blue box", True),))
    batch.masks[:] = False
    batch.masks[0, 20, 90] = True  # one pixel: empty on the 32 x 32 identity grid
    out = RegionPhraseAlignment(8)(torch.randn(2, 8, 16, 16), torch.randn(1, 8), batch)
    assert out["target"].tolist() == [[1.0]] and out["known"].tolist() == [[1.0]]


def test_pooled_feature_is_the_mean_inside_the_instance_mask(make_batch) -> None:
    batch = make_batch(queries=((0, "blue box", True),))
    features = torch.zeros(2, 4, 16, 16)
    features[0, :, 1:6, 8:14] = 3.0  # covers the blue box (70-110 x 10-45 px at 128) on the 16 x 16 grid
    alignment = RegionPhraseAlignment(4)
    with torch.no_grad():
        for layer in (alignment.region, alignment.phrase):
            layer.weight.copy_(torch.eye(4))
            layer.bias.zero_()
    out = alignment(features, torch.ones(1, 4), batch)
    assert torch.allclose(out["logits"], torch.tensor([[3.0 * 4 / 2]]))  # <(3, 3, 3, 3), (1, 1, 1, 1)> / sqrt(4)


def test_alignment_loss_reaches_the_trunk_and_is_absent_without_the_option(tiny_grounded_sam2,
                                                                          grounding_batch) -> None:
    b = grounding_batch
    model = tiny_grounded_sam2(head={"region_alignment": True}).train()
    terms = GroundingLoss()(model(b.images, b.phrases, b.query_image, targets=b), b)
    assert terms["loss_region_phrase"] > 0
    terms["loss_region_phrase"].backward()
    trunk = [p.grad for p in model.vision.trunk.parameters() if p.grad is not None]
    assert trunk and any(g.abs().sum() > 0 for g in trunk)
    plain = tiny_grounded_sam2()
    assert "loss_region_phrase" not in GroundingLoss()(plain(b.images, b.phrases, b.query_image, targets=b), b)
