"""Shared fixtures: a tiny Grounded SAM2 factory, a seeded synthetic GroundingBatch, a tiny student file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from data_pipelines.batch import GroundingBatch

COLOURS = {"red": (0.9, 0.1, 0.1), "blue": (0.1, 0.2, 0.9), "green": (0.1, 0.8, 0.2)}

# (colour, x0, y0, x1, y1) on a 128-pixel reference canvas, per image
LAYOUT = (
    (("red", 10, 15, 50, 55), ("red", 75, 70, 115, 100), ("blue", 70, 10, 110, 45)),
    (("red", 30, 30, 90, 75), ("green", 15, 85, 60, 120)),
)

# (image, phrase, exhaustive): image 1 has no blue box -> an exhaustive negative
QUERIES = ((0, "red box", True), (0, "blue box", True), (1, "red box", True), (1, "blue box", True))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker takes its share of the cores (more threads than cores make OpenMP crawl)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """sambridge's caches (the training commands' rendered --help) go to a test folder, not the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SAMBRIDGE_CACHE_DIR", str(tmp_path_factory.mktemp("sambridge_cache")))
    yield
    mp.undo()


def make_grounding_batch(
    size: int = 128, seed: int = 0, queries: tuple[tuple[int, str, bool], ...] = QUERIES
) -> GroundingBatch:
    """Two noisy grey images with coloured rectangles; each query asks for "<colour> box"."""
    generator = torch.Generator().manual_seed(seed)
    scale = size / 128
    images, instances = [], []
    for objects in LAYOUT:
        image = 0.5 + 0.05 * torch.randn(3, size, size, generator=generator)
        found = []
        for colour, *xyxy in objects:
            x0, y0, x1, y1 = (round(v * scale) for v in xyxy)
            image[:, y0:y1, x0:x1] = torch.tensor(COLOURS[colour]).view(3, 1, 1)
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[y0:y1, x0:x1] = True
            box = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / size
            found.append((colour, box, mask))
        images.append(image.clamp(0, 1))
        instances.append(found)
    boxes, masks, owner, counts = [], [], [], []
    for q, (image_index, phrase, _) in enumerate(queries):
        hits = [(b, m) for colour, b, m in instances[image_index] if phrase.startswith(colour)]
        counts.append(len(hits))
        for b, m in hits:
            boxes.append(b)
            masks.append(m)
            owner.append(q)
    batch = GroundingBatch(
        images=torch.stack(images),
        valid_hw=torch.tensor([[size, size]] * len(images)),
        orig_hw=torch.tensor([[size, size]] * len(images)),
        keys=[f"synthetic-{i}" for i in range(len(images))],
        phrases=[phrase for _, phrase, _ in queries],
        query_image=torch.tensor([i for i, _, _ in queries]),
        exhaustive=torch.tensor([e for _, _, e in queries]),
        num_instances=torch.tensor(counts),
        boxes=torch.stack(boxes) if boxes else torch.zeros(0, 4),
        masks=torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool),
        instance_query=torch.tensor(owner, dtype=torch.long),
        image_ids=list(range(len(images))),
    )
    batch.validate()
    return batch


@pytest.fixture(scope="session")
def make_batch() -> Callable[..., GroundingBatch]:
    """``make_grounding_batch`` for tests that need other sizes, seeds or queries."""
    return make_grounding_batch


@pytest.fixture
def grounding_batch() -> GroundingBatch:
    """The default synthetic batch: 2 images, 4 queries (one exhaustive negative), 128 px."""
    return make_grounding_batch()


@pytest.fixture
def tiny_grounded_sam2() -> Callable[..., torch.nn.Module]:
    """Factory: ``tiny_grounded_sam2(seed=0, **overrides)`` -> a seeded ``grounded_sam2_tiny``."""
    from sambridge.models import create_model

    def build(seed: int = 0, **overrides) -> torch.nn.Module:
        torch.manual_seed(seed)
        return create_model("grounded_sam2_tiny", **overrides)

    return build


@pytest.fixture(scope="session")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny student file (96 px): random weights score every detection, enough to exercise a
    command."""
    from sambridge.models import create_model, save_student

    torch.manual_seed(0)
    model = create_model("grounded_sam2_student_tiny", image_size=96)
    path = tmp_path_factory.mktemp("student") / "student.pt"
    return save_student(model, "grounded_sam2_student_tiny", {"image_size": 96}, path)
