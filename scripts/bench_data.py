#!/usr/bin/env python
"""Training data loading speed: ``ShardDataModule``'s training loader against a tight loop doing the
same work, and images/s per DataLoader worker count. Prints a table and JSON.

    python scripts/bench_data.py                                  # 1,024 px, workers 0 1 2 (CPU)
    python scripts/bench_data.py --workers 0 4 8 14 --json bench_data.json   # a many-core machine
    python scripts/bench_data.py --smoke                          # seconds, 256 px

The tight loop reads the same shards' tar members in order, decodes and augments each sample with
the data module's own transform (queries, negatives, augmentation, resize to the canvas) and
collates batches, in the main process with no WebDataset stages, no DataLoader and no shuffle
buffer: ``loader / tight loop`` at 0 workers is what the pipeline around that work costs (target
>= 0.9). With workers the loader decodes in parallel and ships batches through shared memory;
images/s per worker count shows how far that scales on this machine. Speeds are steady-state: from
the first batch to the end of the pass (the start-up, worker spawn included, is reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=64, help="training images in the shards (one pass each)")
    parser.add_argument("--workers", type=int, nargs="+", help="DataLoader worker counts (default: 0 1 2 4 8 "
                                                                   "up to the CPU count)")
    parser.add_argument("--repeats", type=int, default=2, help="passes of each measurement; the best is kept")
    parser.add_argument("--data", help="existing synthetic shards (a folder with train/) to reuse")
    parser.add_argument("--smoke", action="store_true", help="seconds: 256 px, 16 images, workers 0 1")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.image_size, args.images, args.repeats = 256, 16, 1
        args.workers = args.workers or [0, 1]
    if args.workers is None:
        args.workers = [w for w in (0, 1, 2, 4, 8, 14) if w <= (os.cpu_count() or 1)]
    return args


def make_shards(out: Path, args: argparse.Namespace) -> None:
    """Synthetic JPEG shards at the benchmark size, at least one shard per worker."""
    per_shard = max(1, args.images // max(max(args.workers), 2))
    subprocess.run([sys.executable, "-m", "data_pipelines", "synthetic", "--out", str(out), "--image-size",
                    str(args.image_size), "--num-train", str(args.images), "--num-val", "0", "--num-heldout", "0",
                    "--max-count", str(per_shard), "--format", "jpg", "--overwrite", "--no-progress"],
                   cwd=REPO, check=True, capture_output=True, text=True)


def datamodule(shards: Path, args: argparse.Namespace, workers: int):
    """The training data module as the shipped 1,024 px configs set it up (queries, negatives)."""
    from data_pipelines import ShardDataModule

    dm = ShardDataModule(train=str(shards / "train"), image_size=args.image_size, batch_size=args.batch_size,
                         num_workers=workers, persistent_workers=False, pin_memory=False,
                         max_queries_per_image=16, negatives_per_image=4)
    dm.setup("fit")
    return dm


def timed(batches) -> tuple[float, float, int]:
    """(seconds to the first batch, steady images/s after it, images) of an iterable of batches."""
    start = time.perf_counter()
    first = steady_start = None
    images = 0
    for batch in batches:
        if first is None:
            first = steady_start = time.perf_counter()
            continue
        images += batch.num_images
    end = time.perf_counter()
    return (first or end) - start, images / max(end - (steady_start or end), 1e-9), images


def loader_pass(shards: Path, args: argparse.Namespace, workers: int) -> tuple[float, float, int]:
    dm = datamodule(shards, args, workers)
    return timed(dm.train_dataloader())


def tight_batches(shards: Path, args: argparse.Namespace):
    """The same samples, decoded and augmented by the data module's transform, collated in batches."""
    from data_pipelines.pipeline import _read_tar

    stream = datamodule(shards, args, 0).streams["train"]
    rng = np.random.default_rng(0)
    pending = []
    for url in stream.shards.urls:
        for sample in _read_tar(url):
            pending.append(stream.transform(sample, rng=rng))
            if len(pending) == args.batch_size:
                yield stream.collate(pending)
                pending = []
    if pending:
        yield stream.collate(pending)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker: decoding is per sample, one core each
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(args.data or tmp)
        if not (shards / "train" / "manifest.json").exists():
            make_shards(shards, args)
        tight, loaders = [], {w: [] for w in args.workers}
        for _ in range(args.repeats):  # interleaved, so machine noise falls on all alike
            tight.append(timed(tight_batches(shards, args)))
            for w in args.workers:
                loaders[w].append(loader_pass(shards, args, w))
    tight_ips = max(t[1] for t in tight)
    per_worker = {w: {"images_per_s": max(r[1] for r in runs), "startup_s": min(r[0] for r in runs),
                      "images": runs[0][2]} for w, runs in loaders.items()}
    result = {
        "image_size": args.image_size, "batch_size": args.batch_size, "images": args.images,
        "cpu_count": os.cpu_count(), "smoke": args.smoke,
        "tight_loop_images_per_s": tight_ips,
        "loader_images_per_s": per_worker[min(args.workers)]["images_per_s"],
        "loader_over_tight_loop": per_worker[min(args.workers)]["images_per_s"] / tight_ips,
        "loader_workers_compared": min(args.workers),
        "per_worker_count": per_worker,
    }
    print(f"{args.image_size} px, batch {args.batch_size}, {args.images} images, {os.cpu_count()} CPU cores")
    print(f"{'loader':<22}{'images/s':>10}{'start-up s':>12}{'vs tight loop':>15}")
    print(f"{'tight loop':<22}{tight_ips:>10.1f}{'':>12}{1.0:>15.2f}")
    for w, r in per_worker.items():
        print(f"{f'{w} worker(s)':<22}{r['images_per_s']:>10.1f}{r['startup_s']:>12.2f}"
              f"{r['images_per_s'] / tight_ips:>15.2f}")
    print(f"loader / tight loop ({result['loader_workers_compared']} workers): "
          f"{result['loader_over_tight_loop']:.3f} (target >= 0.9)")
    print(json.dumps(result))
    if args.json:
        from data_pipelines.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
