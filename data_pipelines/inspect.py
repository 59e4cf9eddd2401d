"""Check a shard set against its manifest, print statistics, and render a grid of samples.

``python -m data_pipelines inspect SHARD_DIR [--grid grid.png]`` checks that every shard listed in
``manifest.json`` exists with its sha256 and counts, that ``sizes.json`` agrees, that no unlisted
shard lies beside them, and that every sample decodes and validates (image header, every mask,
every box); keys must be unique across the set. Problems name the shard, the sample and the field;
the exit code is 1 if there is any.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from data_pipelines.atomic import atomic_write
from data_pipelines.schema import Sample, SampleError, decode_rle, sample_from_wds
from data_pipelines.writer import MANIFEST, SIZES, ShardCounts, sha256_of

MAX_PRINTED_PROBLEMS = 20


@dataclass
class Problem:
    """One way the shard set breaks its manifest or the schema."""

    shard: str
    message: str
    key: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = ", ".join([self.shard] + ([f"sample {self.key!r}"] if self.key else [])
                          + ([f"field {self.field}"] if self.field else []))
        return f"{where}: {self.message}"


@dataclass
class InspectionReport:
    """What :func:`inspect_shards` found: problems and statistics of the valid samples."""

    shard_dir: Path
    problems: list[Problem] = field(default_factory=list)
    shards: int = 0
    bytes: int = 0
    totals: ShardCounts = field(default_factory=ShardCounts)
    non_exhaustive: int = 0
    phrase_positive: Counter = field(default_factory=Counter)
    phrase_negative: Counter = field(default_factory=Counter)
    phrase_instances: Counter = field(default_factory=Counter)
    instances_per_query: Counter = field(default_factory=Counter)  # positive queries only
    image_sizes: Counter = field(default_factory=Counter)
    image_formats: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, sample: Sample) -> None:
        self.totals.add(sample)
        self.image_sizes[(sample.width, sample.height)] += 1
        self.image_formats[sample.image_format] += 1
        for query in sample.queries:
            self.non_exhaustive += not query.exhaustive
            if query.instances:
                self.phrase_positive[query.phrase] += 1
                self.phrase_instances[query.phrase] += len(query.instances)
                self.instances_per_query[len(query.instances)] += 1
            elif query.exhaustive:
                self.phrase_negative[query.phrase] += 1

    def format(self, top: int = 15) -> str:
        """Statistics and problems as printable text."""
        t = self.totals
        lines = [f"{self.shard_dir}: {self.shards} shard(s), {self.bytes / 1e6:.1f} MB",
                 f"  images {t.samples}  queries {t.queries}  instances {t.instances}  "
                 f"negatives {t.negatives}  non-exhaustive queries {self.non_exhaustive}  "
                 f"phrases {len(self.phrase_positive.keys() | self.phrase_negative.keys())}"]
        if self.instances_per_query:
            counts = sorted(self.instances_per_query.elements())
            buckets = Counter(_bucket(n) for n in counts)
            lines.append(f"  instances per positive query: mean {statistics.fmean(counts):.2f}, "
                         f"median {statistics.median(counts):g}, max {counts[-1]}; "
                         + ", ".join(f"{b}: {n}" for b in BUCKETS if (n := buckets[b])))
        if self.image_sizes:
            widths = sorted(w for (w, _), n in self.image_sizes.items() for _ in range(n))
            heights = sorted(h for (_, h), n in self.image_sizes.items() for _ in range(n))
            (mw, mh), mn = self.image_sizes.most_common(1)[0]
            lines.append(f"  image sizes: width {_spread(widths)}, height {_spread(heights)}; "
                         f"{len(self.image_sizes)} distinct, most common {mw}x{mh} ({mn})")
            lines.append("  formats: " + ", ".join(f"{k} {v}" for k, v in self.image_formats.most_common()))
        phrases = (self.phrase_positive + self.phrase_negative).most_common(top)
        if phrases:
            lines.append("  top phrases (queries with instances / negatives / instances):")
            width = max(len(p) for p, _ in phrases)
            lines += [f"    {p:<{width}}  {self.phrase_positive[p]:6d} / {self.phrase_negative[p]:6d} / "
                      f"{self.phrase_instances[p]:7d}" for p, _ in phrases]
        if self.problems:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            lines += [f"  {p}" for p in self.problems[:MAX_PRINTED_PROBLEMS]]
            if len(self.problems) > MAX_PRINTED_PROBLEMS:
                lines.append(f"  ... and {len(self.problems) - MAX_PRINTED_PROBLEMS} more")
        else:
            lines.append("OK: shards match the manifest and every sample validates")
        return "\n".join(lines)


BUCKETS = ("1", "2-5", "6-20", "21-100", ">100")


def _spread(values: list[int]) -> str:
    return f"{values[0]}..{values[-1]} (median {statistics.median(values):g})"


def _bucket(n: int) -> str:
    return "1" if n == 1 else "2-5" if n <= 5 else "6-20" if n <= 20 else "21-100" if n <= 100 else ">100"


def inspect_shards(shard_dir: str | os.PathLike, *, grid_samples: int = 0, seed: int = 0,
                   progress: bool = True) -> tuple[InspectionReport, list[Sample]]:
    """Validate a shard set against its manifest and collect statistics.

    Args:
        shard_dir: directory holding ``manifest.json`` and the shards.
        grid_samples: also return this many valid samples, drawn uniformly (reservoir) with ``seed``.
        seed: seed for drawing the grid samples.
        progress: show a progress bar over samples.

    Returns:
        The report and the drawn samples.
    """
    shard_dir = Path(shard_dir)
    report = InspectionReport(shard_dir)
    try:
        manifest = json.loads((shard_dir / MANIFEST).read_text())
        records = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        report.problems.append(Problem(MANIFEST, f"missing or unreadable in {shard_dir}: {err}"))
        return report, []
    _check_files(shard_dir, manifest, report)
    keys: dict[str, str] = {}
    drawn: list[Sample] = []
    rng = random.Random(seed)
    with tqdm(total=manifest.get("num_samples"), desc=f"inspecting {shard_dir}", unit="img",
              disable=not progress, dynamic_ncols=True) as bar:
        for record in records:
            path = shard_dir / record["name"]
            if not path.is_file():
                continue
            report.shards += 1
            report.bytes += path.stat().st_size
            counts = ShardCounts()
            for sample in _read_shard(path, report):
                bar.update(1)
                if sample.key in keys:
                    report.problems.append(Problem(record["name"], f"key also in {keys[sample.key]}",
                                                   key=sample.key, field="__key__"))
                keys[sample.key] = record["name"]
                report.add(sample)
                counts.add(sample)
                if grid_samples:
                    _reservoir(drawn, sample, report.totals.samples, grid_samples, rng)
            for name, value in vars(counts).items():
                if record.get(name) != value:
                    message = f"manifest says {record.get(name)}, shard holds {value} valid"
                    report.problems.append(Problem(record["name"], message, field=name))
    return report, drawn


def _check_files(shard_dir: Path, manifest: dict[str, Any], report: InspectionReport) -> None:
    listed = {r["name"] for r in manifest["shards"]}
    for record in manifest["shards"]:
        path = shard_dir / record["name"]
        if not path.is_file():
            report.problems.append(Problem(record["name"], "listed in the manifest but missing"))
        elif sha256_of(path) != record.get("sha256"):
            report.problems.append(Problem(record["name"], "sha256 differs from the manifest (file changed)",
                                           field="sha256"))
    prefix = manifest.get("prefix", "")
    for path in sorted(shard_dir.glob(f"{prefix}-*.tar*")):
        if path.name not in listed:
            report.problems.append(Problem(path.name, "not listed in the manifest (left over or foreign)"))
    total = sum(r.get("samples", 0) for r in manifest["shards"])
    if manifest.get("num_samples") != total:
        report.problems.append(Problem(MANIFEST, f"num_samples {manifest.get('num_samples')} but shards sum "
                                       f"to {total}", field="num_samples"))
    try:
        sizes = json.loads((shard_dir / SIZES).read_text())
    except (OSError, ValueError) as err:
        report.problems.append(Problem(SIZES, f"missing or unreadable: {err}"))
        return
    expected = {r["name"]: r.get("samples") for r in manifest["shards"]}
    if sizes != expected:
        report.problems.append(Problem(SIZES, f"disagrees with the manifest: {sizes} vs {expected}"))


def _read_shard(path: Path, report: InspectionReport):
    """Valid samples of one shard, raw (webdataset must not decode masks as RGB); problems recorded."""
    import webdataset as wds  # lazy: it imports torch (seconds), which `sambridge data inspect --help` needs not

    dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    try:
        for record in dataset:
            try:
                yield sample_from_wds(record, source=path.name, check_image=True)
            except SampleError as err:
                report.problems.append(Problem(path.name, err.reason, key=err.key, field=err.field))
    except Exception as err:  # tarfile/webdataset errors on truncated or corrupted archives
        report.problems.append(Problem(path.name, f"unreadable tar: {type(err).__name__}: {err}"))


def iter_samples(shard_dir: str | os.PathLike) -> Iterator[Sample]:
    """Every sample of a finished shard set, in manifest order, validated (raises :class:`SampleError`)."""
    import webdataset as wds  # lazy: see _read_shard

    shard_dir = Path(shard_dir)
    for record in json.loads((shard_dir / MANIFEST).read_text())["shards"]:
        path = shard_dir / record["name"]
        for raw in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            yield sample_from_wds(raw, source=path.name, check_image=True)


def _reservoir(drawn: list[Sample], sample: Sample, seen: int, size: int, rng: random.Random) -> None:
    if len(drawn) < size:
        drawn.append(sample)
    else:
        slot = rng.randrange(seen)
        if slot < size:
            drawn[slot] = sample


# ----------------------------------------------------------------------------------------------
# grid rendering
# ----------------------------------------------------------------------------------------------
def render_grid(samples: list[Sample], out_path: str | os.PathLike, *, columns: int | None = None,
                panel_size: int = 320) -> Path:
    """Save a PNG grid: each sample with coloured instance masks, boxes and phrase labels.

    Negative phrases are listed as "absent"; ``*`` marks a non-exhaustive query ("no masks*": a
    non-exhaustive query without instances, e.g. a crowd region only).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from data_pipelines.overlay import Detection, draw_detections  # lazy: torchvision, which `--help` needs not

    if not samples:
        raise ValueError("no samples to render")
    columns = columns or math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / columns)
    inches = panel_size / 100
    fig = Figure(figsize=(columns * inches, rows * inches * 1.15), dpi=100)
    FigureCanvasAgg(fig)
    for i, sample in enumerate(samples):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.set_axis_off()
        scale = min(1.0, panel_size / max(sample.width, sample.height))
        size = (max(1, round(sample.width * scale)), max(1, round(sample.height * scale)))
        with Image.open(io.BytesIO(sample.image)) as img:
            image = np.asarray(img.convert("RGB").resize(size, Image.BILINEAR))
        empty: dict[bool, list[str]] = {True: [], False: []}  # exhaustive -> phrases without instances
        detections = []
        for qi, query in enumerate(sample.queries):
            if not query.instances:
                empty[query.exhaustive].append(query.phrase)
                continue
            label = f"{query.phrase}{'' if query.exhaustive else '*'} ({len(query.instances)})"
            for n, inst in enumerate(query.instances):  # the query's first instance carries its label
                mask = np.asarray(Image.fromarray(decode_rle(inst.rle)).resize(size, Image.NEAREST))
                x, y, w, h = (v * scale for v in inst.bbox)
                detections.append(Detection(mask=mask, label=None if n else label, box_xyxy=(x, y, x + w, y + h),
                                            colour_index=qi))
        canvas = draw_detections(image, detections, min_size=0, box_width=1)
        ax.imshow(canvas)
        ax.set_title(f"{sample.key[-40:]}  {sample.width}x{sample.height}", fontsize=6)
        notes = [f"{title}: {', '.join(phrases)}" for title, phrases in
                 (("absent", empty[True]), ("no masks*", empty[False])) if phrases]
        if notes:
            text = "; ".join(notes)
            ax.text(0, 1.0, text[:90] + ("..." if len(text) > 90 else ""), transform=ax.transAxes, fontsize=5,
                    va="top", bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0})
    fig.tight_layout()
    return atomic_write(out_path, lambda file: fig.savefig(file, format="png"))


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shard_dir", help="directory holding manifest.json and the shards")
    parser.add_argument("--grid", help="write a PNG grid of samples with their masks, boxes and phrases here")
    parser.add_argument("--num", type=int, default=16, help="samples in the grid")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the grid samples")
    parser.add_argument("--top", type=int, default=15, help="phrases listed in the statistics")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    report, drawn = inspect_shards(args.shard_dir, grid_samples=args.num if args.grid else 0, seed=args.seed,
                                   progress=not args.no_progress)
    print(report.format(top=args.top))
    if args.grid and drawn:
        print(f"grid of {len(drawn)} samples: {render_grid(drawn, args.grid)}")
    return 0 if report.ok else 1
