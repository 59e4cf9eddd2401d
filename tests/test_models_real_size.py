"""Real-size builds (random weights): parameter counts and one CPU forward at 1024 px.

Slow (about a minute per phrase count on a 2-core CPU); run with ``pytest -m slow -s`` to see timings.
"""

import time

import pytest
import torch

from sambridge.models import create_model, list_models

PHRASES = [
    "ripe apple",
    "weed",
    "tractor",
    "person",
    "crop row",
    "dog",
    "fence post",
    "bird",
    "ladder",
    "bucket",
]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.slow
def test_hiera_t_parameter_counts_and_cpu_forward_time():
    torch.manual_seed(0)
    start = time.perf_counter()
    model = create_model("grounded_sam2_hiera_t").eval()
    built = time.perf_counter() - start
    parts = {
        "trunk": count(model.vision.trunk),
        "sam2 neck": count(model.vision.sam2_neck),
        "detector neck": count(model.vision.detector_neck),
        "text": count(model.text_encoder),
        "head": sum(
            count(getattr(model.detector, m))
            for m in ("transformer", "dot_prod_scoring", "segmentation_head", "geometry_encoder")
        ),
        "sam2 decoder": count(model.prompt_decoder),
    }
    total = count(model)
    assert total == sum(parts.values())
    assert parts["head"] == 32_745_270  # sam3.model_builder's head
    print(
        f"\ngrounded_sam2_hiera_t: {total / 1e6:.1f}M params (built in {built:.1f}s): "
        + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in parts.items())
    )
    images = torch.rand(1, 3, 1024, 1024)
    for n in (1, 10):
        with torch.no_grad():
            model(images, PHRASES[:1], torch.zeros(1, dtype=torch.long))  # warm-up
            start = time.perf_counter()
            out = model(images, PHRASES[:n], torch.zeros(n, dtype=torch.long))
            forward = time.perf_counter() - start
            start = time.perf_counter()
            post = model.postprocess(out, top_k=3, score_threshold=0.0)
            refine = time.perf_counter() - start
        assert out["pred_masks"].shape == (n, 200, 256, 256) and post["masks"].shape == (n, 3, 1024, 1024)
        print(
            f"1024 px, {n} phrase(s): forward {forward:.1f}s, postprocess with SAM2 refinement of the top 3 "
            f"per phrase {refine:.1f}s"
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models("grounded_sam2_hiera_*"))
def test_every_real_variant_builds(name):
    model = create_model(name, image_size=512)
    assert model.detector.transformer.d_model == model.vision.d_model == 256
    print(f"\n{name}: {count(model) / 1e6:.1f}M params")
