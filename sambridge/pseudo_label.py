"""Label images with a SAM3 teacher: instances, negatives and cached soft targets, written as shards.

::

    sambridge pseudo-label --teacher checkpoints/sam3.pt --images DIR \\
        --vocabulary configs/agriculture/vocab/fruit.txt --out shards/orchard-pseudo
    sambridge pseudo-label --teacher runs/teacher/last.ckpt --shards data/synthetic/val \\
        --out shards/val-pseudo --resume

``--teacher`` is an official ``sam3.pt`` (built as ``--model``, default ``sam3_image``) or a
sambridge training checkpoint of a SAM3 teacher (``sambridge.modules.load_teacher``). Input is a
folder of images (searched recursively) or existing shards. Each image is asked its own phrases
(shard input) and the canonical phrases of ``--vocabulary`` (``data_pipelines.vocab`` format; a
plain list with one phrase per line is one). Every phrase becomes one query, labelled from the
teacher's detections (score = sigmoid(logit) x sigmoid(presence), as SAM3 scores them):

* instances: detections scoring at least ``--score-threshold``; the head's mask logits are
  sampled from the canvas back onto the original image (bilinear, logit > 0), stored as RLE with
  the mask's box. A mask left empty at image size is dropped and counted.
* exhaustive: yes, unless a detection scores in ``[--uncertain-score, --score-threshold)``; then
  an instance may be missing and the query is non-exhaustive (training does not push the
  teacher's unsure detections to "background").
* a query without instances is an exhaustive negative when the presence probability is below
  ``--presence-threshold`` (and no detection is uncertain); otherwise the teacher cannot tell and
  the query is written non-exhaustive and empty: it teaches nothing by labels, only through its
  soft targets.
* ``--keep-labels`` (shard input): queries the input already annotates keep their own instances
  and exhaustive flag; the teacher labels only the added phrases.

Every query gets a row of ``teacher.safetensors`` (``sambridge.models.teacher_targets``:
``select_teacher_targets`` with ``--top-k`` and ``--mask-size``), rows in query order;
``--pooled-features`` adds each query's pooled fusion-encoder features (``pooled_features``, for
``DistillWeights.pooled_*`` in offline distillation). The teacher sees the canvas the training
pipeline builds (longest side resized to the canvas, padded at the bottom/right, no augmentation),
so the targets' normalised coordinates line up with the batches the DataModule collates. Images
are batched (``--batch-size``): each image is encoded once and the head runs on ``--query-chunk``
queries at a time (memory).

``--resume`` keeps verified finished shards and continues after them; the settings (teacher
sha256, thresholds, phrases, ...) must be those of the interrupted run, as recorded in
``pseudo_label.json`` beside the shards. The manifest's ``extra`` records them as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from data_pipelines import cli as data_cli
from data_pipelines.atomic import write_json_atomic
from data_pipelines.augment import AugmentConfig, Geometry, sample_geometry, warp_image
from data_pipelines.convert.common import Converter, InputError, read_image, sample_key
from data_pipelines.convert.mask_folder import IMAGE_SUFFIXES
from data_pipelines.pipeline import resolve_shards
from data_pipelines.schema import (
    Query,
    Sample,
    SampleError,
    instance_from_mask,
    normalize_phrase,
    sample_from_wds,
)
from data_pipelines.vocab import VocabularyError, load_vocabulary
from data_pipelines.writer import (
    ShardSink,
    Skip,
    sha256_of,
    sink_from_args,
)
from sambridge.models import CheckpointError, SAM3Teacher
from sambridge.models.teacher_targets import (
    POOLED_FEATURES,
    STORAGE_DTYPE,
    encode_teacher_file,
    pooled_query_features,
    select_teacher_targets,
)
from sambridge.modules.checkpoint import load_teacher
from sambridge.parsers import pseudo_label_parser

PROG = "sambridge pseudo-label"
"""The command's name in usage lines and in the command line a manifest records."""

SETTINGS_FILE = "pseudo_label.json"
EMPTY_MASK = "teacher mask empty at image size"
MASK_CHUNK = 8
"""Instance masks sampled onto the original image at a time (bounds memory on large images)."""


# ----------------------------------------------------------------------------------------------
# sources of unlabelled samples
# ----------------------------------------------------------------------------------------------
class ImageFolderSource(Converter):
    """Images under a folder (recursively, sorted) as samples without queries.

    Args:
        root: the image folder.
        source: dataset label written into every sample (default ``images:<folder name>``).
    """

    def __init__(self, root: str | os.PathLike, source: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        self.source = source or f"images:{self.root.resolve().name}"

    def __len__(self) -> int:
        return len(self.files)

    def _relative(self, index: int) -> str:
        return self.files[index].relative_to(self.root).with_suffix("").as_posix()

    def key(self, index: int) -> str:
        return sample_key(self.source, self._relative(index))

    def convert(self, index: int) -> Sample:
        data, image_format, width, height = read_image(self.files[index])
        return Sample(key=self.key(index), image=data, image_format=image_format, width=width, height=height,
                      queries=[], image_id=self._relative(index), source=self.source,
                      file_name=self.files[index].relative_to(self.root).as_posix(), origin=str(self.files[index]))


class ShardSource:
    """The samples of existing shards, in shard order (a directory, brace pattern or URL pattern).

    Args:
        spec: what ``data_pipelines.pipeline.resolve_shards`` accepts.
    """

    def __init__(self, spec: str) -> None:
        try:
            self.shards = resolve_shards(spec)
        except ValueError as err:
            raise InputError(f"shards {spec}: {err}") from err
        if self.shards.sizes is None:
            raise InputError(f"shards {spec} state no sizes (no manifest.json or sizes.json beside them): "
                             "resuming needs a known, fixed order and count of samples")
        self.spec = spec

    def __len__(self) -> int:
        return sum(self.shards.sizes)

    def items(self, start: int = 0) -> Iterator[Sample | Skip]:
        """Samples from index ``start`` on; earlier records are read past without decoding."""
        index = 0
        for url in self.shards.urls:
            for record in wds.WebDataset(url, shardshuffle=False, empty_check=False):
                index += 1
                if index <= start:
                    continue
                try:
                    yield sample_from_wds(record, source=url, check_image=True)
                except SampleError as err:
                    yield Skip.from_error(str(record.get("__key__")), err)


# ----------------------------------------------------------------------------------------------
# labelling
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelSettings:
    """How teacher detections become queries and soft targets (see the module docstring).

    Attributes:
        score_threshold: detections scoring at least this become instances.
        uncertain_score: a detection scoring in [uncertain_score, score_threshold) makes its query
            non-exhaustive.
        presence_threshold: a query without instances is an exhaustive negative below this presence.
        top_k: detections per query kept as soft targets.
        mask_size: side of the soft targets' mask logits.
        pooled_features: also cache each query's pooled fusion-encoder features.
    """

    score_threshold: float = 0.5
    uncertain_score: float = 0.3
    presence_threshold: float = 0.2
    top_k: int = 16
    mask_size: int = 64
    pooled_features: bool = False

    def __post_init__(self) -> None:
        ordered = 0 <= self.uncertain_score <= self.score_threshold <= 1
        if not ordered or not 0 <= self.presence_threshold <= 1:
            raise ValueError(f"need 0 <= uncertain_score <= score_threshold <= 1 and a presence threshold in "
                             f"[0, 1], got {self}")
        if self.top_k < 1 or self.mask_size < 1:
            raise ValueError(f"top_k and mask_size must be positive, got {self}")


@dataclass
class QueryLabel:
    """The teacher's verdict on one query.

    Attributes:
        instances: indices of the detections that become instances, best first.
        exhaustive: whether the query is exhaustive.
    """

    instances: list[int]
    exhaustive: bool


def label_query(scores: Tensor, presence: float, settings: LabelSettings) -> QueryLabel:
    """Instances and exhaustiveness of one query from its detection scores (K,) and presence probability."""
    order = scores.argsort(descending=True)
    instances = [int(i) for i in order if scores[i] >= settings.score_threshold]
    uncertain = bool(((scores >= settings.uncertain_score) & (scores < settings.score_threshold)).any())
    if instances:
        return QueryLabel(instances, exhaustive=not uncertain)
    return QueryLabel([], exhaustive=presence < settings.presence_threshold and not uncertain)


def canvas_logits_to_image(logits: Tensor, geometry: Geometry) -> Tensor:
    """(N, m, m) mask logits over the square canvas -> (N, H, W) bool masks on the original image.

    Each original pixel centre is mapped to its place on the canvas (resize without flip, crop or
    offset, as the pipeline builds canvases without augmentation) and sampled bilinearly.
    """
    (height, width), (scaled_h, scaled_w) = geometry.orig_hw, geometry.scaled_hw
    masks = torch.zeros((logits.shape[0], height, width), dtype=torch.bool)
    if logits.shape[0] == 0:
        return masks
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * (scaled_h / height)
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * (scaled_w / width)
    grid = (torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1) * (2 / geometry.canvas) - 1)[None]
    for start in range(0, logits.shape[0], MASK_CHUNK):
        chunk = logits[start:start + MASK_CHUNK].float()[None]
        sampled = F.grid_sample(chunk, grid, mode="bilinear", padding_mode="border", align_corners=False)
        masks[start:start + MASK_CHUNK] = sampled[0] > 0
    return masks


@dataclass
class _ImageInput:
    sample: Sample
    geometry: Geometry
    canvas: Tensor
    phrases: list[str]


@dataclass
class _Detections:
    """What one query keeps of the teacher's outputs once its chunk is done (CPU tensors)."""

    targets: dict[str, Tensor]
    label: QueryLabel
    mask_logits: Tensor


class PseudoLabeler:
    """Runs a SAM3 teacher over batches of samples and returns them labelled (see the module docstring).

    Args:
        teacher: a ``sambridge.models.SAM3Teacher`` (frozen).
        settings: thresholds and soft-target sizes.
        vocabulary: phrases asked of every image, after the image's own.
        keep_labels: queries the input annotates keep their own instances and exhaustive flag.
        canvas_size: side of the square canvas (default: the teacher's input size).
        query_chunk: queries per head call.
    """

    def __init__(self, teacher: SAM3Teacher, settings: LabelSettings, vocabulary: Sequence[str] = (),
                 keep_labels: bool = False, canvas_size: int | None = None, query_chunk: int = 16) -> None:
        if query_chunk < 1:
            raise ValueError(f"query_chunk must be positive, got {query_chunk}")
        self.teacher, self.settings = teacher, settings
        self.vocabulary = list(vocabulary)
        self.keep_labels = keep_labels
        self.augment = AugmentConfig(image_size=canvas_size or teacher.image_size)
        self.query_chunk = query_chunk

    @property
    def device(self) -> torch.device:
        return self.teacher.pixel_mean.device

    def phrases_of(self, sample: Sample) -> list[str]:
        """The sample's own phrases, then the vocabulary's not already asked (compared normalised)."""
        phrases, asked = [], set()
        for phrase in [q.phrase for q in sample.queries] + self.vocabulary:
            if normalize_phrase(phrase) not in asked:
                asked.add(normalize_phrase(phrase))
                phrases.append(phrase)
        return phrases

    def label(self, samples: Sequence[Sample]) -> list[Sample | Skip]:
        """Label a batch; an image that does not decode becomes a :class:`Skip`, in place."""
        prepared: list[_ImageInput | Skip] = [self._prepare(s) for s in samples]
        inputs = [p for p in prepared if isinstance(p, _ImageInput)]
        detections = self._detect(inputs) if inputs else []
        results, position = [], 0
        for item in prepared:
            if isinstance(item, Skip):
                results.append(item)
                continue
            count = len(item.phrases)
            results.append(self._labelled(item, detections[position:position + count]))
            position += count
        return results

    def _prepare(self, sample: Sample) -> _ImageInput | Skip:
        try:
            data = torch.frombuffer(bytearray(sample.image), dtype=torch.uint8)
            image = decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError as err:
            return Skip(sample.key, "unreadable image", f"{sample.origin or sample.key}: {err}")
        if tuple(image.shape[-2:]) != (sample.height, sample.width):
            return Skip(sample.key, "image size differs from metadata",
                        f"{sample.origin or sample.key}: {image.shape[-1]}x{image.shape[-2]} vs "
                        f"{sample.width}x{sample.height}")
        phrases = self.phrases_of(sample)
        if not phrases:
            return Skip(sample.key, "no phrases to ask", "no queries in the sample and no vocabulary")
        geometry = sample_geometry((sample.height, sample.width), self.augment)
        return _ImageInput(sample, geometry, warp_image(image, geometry), phrases)

    @torch.no_grad()
    def _detect(self, inputs: list[_ImageInput]) -> list[_Detections]:
        features = self.teacher.encode_images(torch.stack([i.canvas for i in inputs]).to(self.device))
        queries = [(n, phrase) for n, item in enumerate(inputs) for phrase in item.phrases]
        found = []
        for start in range(0, len(queries), self.query_chunk):
            chunk = queries[start:start + self.query_chunk]
            image_index = torch.tensor([n for n, _ in chunk], device=self.device)
            out = self.teacher.ground(features, [p for _, p in chunk], image_index)
            found += self._keep(out)
        return found

    def _keep(self, out: dict[str, Tensor]) -> list[_Detections]:
        targets = select_teacher_targets(out, top_k=self.settings.top_k, mask_size=self.settings.mask_size)
        if self.settings.pooled_features:
            targets[POOLED_FEATURES] = pooled_query_features(out).to(STORAGE_DTYPE)
        targets = {k: v.cpu() for k, v in targets.items()}
        presence = out["presence_logit_dec"][:, 0].float().sigmoid().cpu()
        scores = out["pred_logits"][..., 0].float().sigmoid().cpu() * presence[:, None]
        kept = []
        for q in range(scores.shape[0]):
            label = label_query(scores[q], float(presence[q]), self.settings)
            masks = out["pred_masks"][q, label.instances].float().cpu()
            kept.append(_Detections({k: v[q] for k, v in targets.items()}, label, masks))
        return kept

    def _labelled(self, item: _ImageInput, detections: list[_Detections]) -> Sample:
        sample = item.sample
        own = {normalize_phrase(q.phrase): q for q in sample.queries}
        queries, dropped = [], Counter(sample.dropped)
        for phrase, found in zip(item.phrases, detections, strict=True):
            kept_query = own.get(normalize_phrase(phrase)) if self.keep_labels else None
            if kept_query is not None:
                queries.append(kept_query)
                continue
            instances = []
            for mask in canvas_logits_to_image(found.mask_logits, item.geometry).numpy():
                if mask.any():
                    instances.append(instance_from_mask(np.asfortranarray(mask)))
                else:
                    dropped[EMPTY_MASK] += 1
            queries.append(Query(phrase=phrase, instances=instances, exhaustive=found.label.exhaustive))
        rows = {name: torch.stack([d.targets[name] for d in detections]) for name in detections[0].targets}
        return Sample(key=sample.key, image=sample.image, image_format=sample.image_format,
                      width=sample.width, height=sample.height, queries=queries, image_id=sample.image_id,
                      source=sample.source, teacher=encode_teacher_file(rows), file_name=sample.file_name,
                      origin=sample.origin,
                      dropped=dict(dropped))


def pseudo_label(items: Iterator[Sample | Skip], labeler: PseudoLabeler, sink: ShardSink,
                 batch_size: int) -> int:
    """Label ``items`` (source items from ``sink.start_index`` on) in batches, add them to ``sink``.

    Batches start at multiples of ``batch_size`` counted from the first source item, so a resumed
    run groups images as the uninterrupted run did after its first (partial) batch. Returns the
    number of source items consumed.
    """
    index, batch, order = sink.start_index, [], []

    def flush() -> None:
        labelled = iter(labeler.label(batch)) if batch else iter(())
        for entry in order:
            sink.add(next(labelled) if entry is None else entry)
        batch.clear()
        order.clear()

    for item in items:
        if isinstance(item, Skip):
            order.append(item)
        else:
            batch.append(item)
            order.append(None)
        index += 1
        if index % batch_size == 0:
            flush()
    flush()
    return index - sink.start_index


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _vocabulary(paths: Sequence[str]) -> list[str]:
    if not paths:
        return []
    try:
        return load_vocabulary(paths).phrases
    except VocabularyError as err:
        raise InputError(str(err)) from err


def _check_settings(out_dir: Path, settings: dict[str, Any], resume: bool) -> None:
    """Refuse to resume a run made with other settings; record the settings of this one."""
    path = out_dir / SETTINGS_FILE
    if resume and path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise InputError(f"{out_dir} was labelled with other settings ({', '.join(changed)} differ; see "
                             f"{path}): resume with the same ones or start over with --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings, indent=1)


def run(args: argparse.Namespace) -> int:
    settings = LabelSettings(score_threshold=args.score_threshold, uncertain_score=args.uncertain_score,
                             presence_threshold=args.presence_threshold, top_k=args.top_k,
                             mask_size=args.mask_size, pooled_features=args.pooled_features)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    vocabulary = _vocabulary(args.vocabulary)
    if args.images and not vocabulary:
        raise InputError("an image folder has no phrases of its own: give --vocabulary")
    source = ImageFolderSource(args.images, source=args.source) if args.images else ShardSource(args.shards)
    teacher_path = Path(args.teacher)
    try:
        teacher = load_teacher(teacher_path, model=args.model, device=args.device)
    except CheckpointError as err:
        raise InputError(str(err)) from err
    labeler = PseudoLabeler(teacher, settings, vocabulary, keep_labels=args.keep_labels,
                            canvas_size=args.canvas_size, query_chunk=args.query_chunk)
    bf16 = teacher.bf16 and labeler.device.type == "cuda" and torch.cuda.is_bf16_supported()
    labelling = {  # what decides the labels; a resumed run must use the same
        "teacher": {"model": teacher.model_name, "sha256": sha256_of(teacher_path),
                    "image_size": teacher.image_size, "precision": "bf16" if bf16 else "fp32"},
        "labels": asdict(settings),
        "canvas_size": labeler.augment.image_size,
        "vocabulary": {"files": list(args.vocabulary), "phrases": vocabulary},
        "keep_labels": args.keep_labels,
    }
    _check_settings(Path(args.out), labelling, args.resume)
    extra = {**labelling, "teacher": {"checkpoint": str(teacher_path), **labelling["teacher"]},
             "input": {"images": args.images} if args.images else {"shards": args.shards}}
    started = time.perf_counter()
    with sink_from_args(args, total=len(source), extra=extra, command=args.command_line) as sink:
        consumed = pseudo_label(source.items(start=sink.start_index), labeler, sink, args.batch_size)
    elapsed = time.perf_counter() - started
    print(sink.summary())
    if consumed:
        print(f"labelled {consumed} image(s) in {elapsed:.1f} s ({consumed / elapsed:.2f} images/s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sambridge pseudo-label``; returns the exit code (2 for bad input, with a message naming it)."""
    parser = pseudo_label_parser()  # sambridge.parsers: --help without torch; the defaults are set here
    parser.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu",
                        **{f.name: f.default for f in fields(LabelSettings)})
    return data_cli.run_command(sys.modules[__name__], argv, prog=PROG, parser=parser)
