"""Write validated samples into WebDataset shards atomically, with a manifest and resume.

Every converter (and the pseudo-labeller) feeds a :class:`ShardSink`::

    with ShardSink("shards/train", prefix="train", mode="new", command=sys.argv) as sink:
        for item in converter.items(start=sink.start_index):   # Sample or Skip
            sink.add(item)
    print(sink.summary())

Each shard is written as ``name.tar.tmp`` and renamed when complete, so a visible ``.tar`` is
always whole. After each shard ``progress.json`` records what is done (shard checksums and how
many source items were consumed); ``mode="resume"`` verifies those shards by checksum, keeps
them and continues from the next source item. On success ``manifest.json`` (counts per shard,
sha256, phrase histogram, skipped samples with reasons, the command line) and ``sizes.json``
(samples per shard, as open_clip reads it) are written and ``progress.json`` removed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tqdm.auto import tqdm

from data_pipelines.atomic import write_json_atomic
from data_pipelines.schema import (
    SCHEMA_VERSION,
    Sample,
    SampleError,
    checked_image_size,
    validate_key,
    validate_meta,
)

if TYPE_CHECKING:
    import webdataset as wds  # imported where a shard is written: it imports torch (seconds), --help needs neither

MANIFEST = "manifest.json"
SIZES = "sizes.json"
PROGRESS = "progress.json"
MAX_SKIP_EXAMPLES = 50
WriteMode = Literal["new", "overwrite", "resume"]


@dataclass
class Skip:
    """A source item that did not become a sample: counted by ``reason`` and reported."""

    key: str
    reason: str
    detail: str = ""

    @classmethod
    def from_error(cls, key: str, err: Exception) -> Skip:
        reason = f"invalid {err.field}" if isinstance(err, SampleError) and err.field else type(err).__name__
        # collapse per-index field paths ("queries[3].instances[0].bbox") into one reason
        reason = _strip_indices(reason)
        return cls(key=key, reason=reason, detail=str(err))


def _strip_indices(text: str) -> str:
    out, depth = [], 0
    for ch in text:
        depth += ch == "["
        if depth == 0:
            out.append(ch)
        depth -= ch == "]"
    return "".join(out)


@dataclass
class ShardCounts:
    """The counts a manifest records per shard (negatives: exhaustive queries without instances).

    The writer counts what it writes; ``sambridge data inspect`` counts what a shard holds and
    compares the two.
    """

    samples: int = 0
    queries: int = 0
    instances: int = 0
    negatives: int = 0

    def add(self, sample: Sample) -> None:
        self.samples += 1
        self.queries += len(sample.queries)
        self.instances += sum(len(q.instances) for q in sample.queries)
        # an empty non-exhaustive query says nothing about absence
        self.negatives += sum(not q.instances and q.exhaustive for q in sample.queries)


def sha256_of(path: str | os.PathLike, progress: Callable[[int], object] | None = None) -> str:
    """The file's sha256 (hex); ``progress`` is called with the size of each block read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


class ResumeMismatchError(ValueError):
    """``--resume`` of a shard set that was written with other arguments."""


RUN_FLAGS = ("out", "resume", "overwrite", "no_progress", "command_line", "command")
"""Arguments that say where and how a shard set is written, not what is in it (not in its settings)."""


def _json_safe(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths and other objects strings)."""
    return json.loads(json.dumps(value, default=str))


class ShardSink:
    """Validate samples and write them into count/size-capped shards with a manifest.

    Args:
        out_dir: directory of this shard set (one split per directory).
        prefix: shard file prefix: ``{prefix}-000000.tar``.
        max_count: at most this many samples per shard.
        max_bytes: start a new shard once a shard reaches this size (a shard may exceed it by
            one sample).
        mode: ``new`` refuses to touch a directory that already holds this shard set,
            ``overwrite`` deletes it first, ``resume`` keeps verified finished shards and continues.
        command: the command line that made the shards, recorded in the manifest.
        check_images: decode each image (every pixel) and check its size against the metadata.
        on_invalid: ``skip`` counts and reports invalid samples; ``raise`` stops at the first.
        progress: show a tqdm bar.
        total: number of source items, for the progress bar.
        extra: JSON-serialisable facts to record in the manifest (vocabulary, thresholds...).
        settings: what decides the samples (the command's arguments, :func:`sink_from_args`),
            recorded in progress.json and the manifest; ``resume`` refuses to continue a shard set
            written with other settings (:class:`ResumeMismatchError`).
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", *, max_count: int = 1000,
                 max_bytes: float = 1e9, mode: WriteMode = "new", command: Sequence[str] | str | None = None,
                 check_images: bool = True, on_invalid: Literal["skip", "raise"] = "skip",
                 progress: bool = True, total: int | None = None,
                 extra: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> None:
        if mode not in ("new", "overwrite", "resume"):
            raise ValueError(f"mode must be 'new', 'overwrite' or 'resume', got {mode!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.check_images, self.on_invalid = check_images, on_invalid
        self.command = command if isinstance(command, str) or command is None else shlex.join(command)
        self.extra = dict(extra or {})
        self.settings = _json_safe(settings) if settings is not None else None
        self.shards: list[dict[str, Any]] = []
        self.phrases: dict[str, Counter] = {}
        self.skip_counts: Counter = Counter()
        self.skip_examples: list[dict[str, str]] = []
        self.dropped_counts: Counter = Counter()  # annotations converters left out of written samples
        self.start_index = 0
        self.already_complete = False
        self._consumed = 0
        self._keys: set[str] = set()
        self._current = ShardCounts()
        self._writer: wds.ShardWriter | None = None
        self._shard_file: Any = None
        self._aborting = False
        self.written_manifest: dict[str, Any] | None = None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._prepare(mode)
        self._bar = tqdm(total=total, initial=self.start_index, desc=f"writing {self.out_dir}",
                         unit="img", disable=not progress or self.already_complete, dynamic_ncols=True)

    # ------------------------------------------------------------------ set-up / resume
    def _existing(self) -> list[Path]:
        names = [MANIFEST, SIZES, PROGRESS]
        return sorted(p for p in self.out_dir.iterdir()
                      if p.name in names or (p.name.startswith(f"{self.prefix}-") and ".tar" in p.name))

    def _prepare(self, mode: WriteMode) -> None:
        existing = self._existing()
        if mode == "new" and existing:
            raise FileExistsError(
                f"{self.out_dir} already holds shards ({', '.join(p.name for p in existing[:3])}"
                f"{', ...' if len(existing) > 3 else ''}): pass --overwrite to replace them "
                "or --resume to continue")
        if mode == "overwrite":
            for path in existing:
                path.unlink()
            return
        if mode == "resume":
            self._resume()

    def _resume(self) -> None:
        for tmp in self.out_dir.glob(f"{self.prefix}-*.tar.tmp"):
            tmp.unlink()  # an interrupted shard: rewritten from its first sample
        manifest_path, progress_path = self.out_dir / MANIFEST, self.out_dir / PROGRESS
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            self._check_settings(manifest.get("settings"), manifest_path)
            for record in manifest["shards"]:
                if not self._verified(record):
                    raise RuntimeError(f"{self.out_dir / record['name']} is missing or fails its manifest "
                                       "checksum; the shard set was complete: rewrite it with --overwrite")
            self.already_complete = True
            self.start_index = manifest["consumed"]  # a converter's items(start) then yields nothing
            return
        if not progress_path.exists():
            return
        progress = json.loads(progress_path.read_text())
        self._check_settings(progress.get("settings"), progress_path)
        kept = []
        for record in progress["shards"]:
            if not self._verified(record):
                break
            kept.append(record)
        # keep the verified prefix of finished shards, rewrite everything after it
        for stray in self.out_dir.glob(f"{self.prefix}-*.tar"):
            if stray.name not in {r["name"] for r in kept}:
                stray.unlink()
        self.shards = kept
        self.start_index = kept[-1]["consumed"] if kept else 0
        self._consumed = self.start_index
        if kept:
            self._load_counts(kept[-1]["state"])
        for record in kept:
            with tarfile.open(self.out_dir / record["name"]) as tar:
                self._keys.update(m.name.split(".", 1)[0] for m in tar.getmembers())

    def _check_settings(self, recorded: dict[str, Any] | None, where: Path) -> None:
        if recorded is None or self.settings is None or recorded == self.settings:
            return
        differ = sorted(set(recorded) | set(self.settings))
        changes = [f"{k}: {recorded.get(k)!r} -> {self.settings.get(k)!r}" for k in differ
                   if recorded.get(k) != self.settings.get(k)]
        raise ResumeMismatchError(f"{where} was written with other settings ({'; '.join(changes)}): resume "
                                  "with the original arguments, or pass --overwrite / another --out")

    def _verified(self, record: dict[str, Any]) -> bool:
        path = self.out_dir / record["name"]
        return path.exists() and sha256_of(path) == record["sha256"]

    def _load_counts(self, state: dict[str, Any]) -> None:
        self.phrases = {p: Counter(c) for p, c in state.get("phrases", {}).items()}
        self.skip_counts = Counter(state.get("skipped", {}).get("by_reason", {}))
        self.skip_examples = list(state.get("skipped", {}).get("examples", []))
        self.dropped_counts = Counter(state.get("dropped_annotations", {}).get("by_reason", {}))

    # ------------------------------------------------------------------ writing
    def _open(self) -> wds.ShardWriter:
        import webdataset as wds  # lazy: start-up time of the converters' --help (see the imports)

        pattern = str(self.out_dir / f"{self.prefix}-%06d.tar")
        return wds.ShardWriter(pattern, maxcount=self.max_count, maxsize=self.max_bytes, verbose=0,
                               start_shard=len(self.shards), opener=self._open_tmp, post=self._finish_shard)

    def _open_tmp(self, name: str) -> Any:
        self._shard_file = open(f"{name}.tmp", "wb")
        return self._shard_file

    def _finish_shard(self, name: str) -> None:
        tmp, stats = f"{name}.tmp", self._current
        self._current = ShardCounts()
        # TarWriter does not close a file object it was given: flush and close it before renaming
        self._shard_file.flush()
        os.fsync(self._shard_file.fileno())
        self._shard_file.close()
        if self._aborting or stats.samples == 0:
            os.unlink(tmp)
            return
        os.replace(tmp, name)
        self.shards.append({
            "name": os.path.basename(name), **vars(stats), "bytes": os.path.getsize(name),
            "sha256": sha256_of(name), "consumed": self._consumed, "state": self._counts(),
        })
        write_json_atomic(self.out_dir / PROGRESS, {"schema": SCHEMA_VERSION, "settings": self.settings,
                                                    "shards": self.shards}, indent=1)

    def add(self, item: Sample | Skip) -> bool:
        """Validate and write one sample, or count a skip. Returns True if the sample was written."""
        if self.already_complete:
            raise RuntimeError(f"{self.out_dir} is already complete (manifest.json verified); nothing to add")
        try:
            if isinstance(item, Skip):
                self._skip(item)
                return False
            problem = self._check(item)
            if problem is not None:
                self._skip(problem)
                return False
            if self._writer is None:
                self._writer = self._open()
            self._writer.write(item.to_wds())
            self._count(item)
            return True
        finally:
            self._consumed += 1
            self._bar.update(1)

    def _check(self, sample: Sample) -> Skip | None:
        try:
            validate_key(sample.key, source=sample.origin)
        except SampleError as err:
            return self._invalid(str(sample.key), err)
        if sample.key in self._keys:
            err = SampleError("key is not unique in this shard set", key=sample.key, field="__key__")
            return self._invalid(sample.key, err)
        try:
            size = checked_image_size(sample.image) if self.check_images else None
            validate_meta(sample.meta(), key=sample.key, source=sample.origin, image_size=size)
        except SampleError as err:
            return self._invalid(sample.key, err)
        except Exception as err:  # undecodable image bytes
            return self._invalid(sample.key, SampleError(f"image does not decode: {err}", key=sample.key,
                                                         source=sample.origin, field="image"))
        return None

    def _invalid(self, key: str, err: SampleError) -> Skip:
        if self.on_invalid == "raise":
            raise err
        return Skip.from_error(key, err)

    def _skip(self, skip: Skip) -> None:
        self.skip_counts[skip.reason] += 1
        if len(self.skip_examples) < MAX_SKIP_EXAMPLES:
            self.skip_examples.append({"key": skip.key, "reason": skip.reason, "detail": skip.detail})
        self._bar.set_postfix(written=self.num_samples, skipped=sum(self.skip_counts.values()), refresh=False)

    def _count(self, sample: Sample) -> None:
        self._keys.add(sample.key)
        self.dropped_counts.update(sample.dropped)
        self._current.add(sample)
        for query in sample.queries:
            counter = self.phrases.setdefault(query.phrase, Counter())
            if query.instances:
                counter["positive"] += 1
                counter["instances"] += len(query.instances)
            elif query.exhaustive:  # an empty non-exhaustive query says nothing about absence
                counter["negative"] += 1
            if not query.exhaustive:
                counter["non_exhaustive"] += 1

    def _counts(self) -> dict[str, Any]:
        return {"phrases": {p: dict(c) for p, c in sorted(self.phrases.items())},
                "skipped": {"total": sum(self.skip_counts.values()), "by_reason": dict(self.skip_counts),
                            "examples": self.skip_examples},
                "dropped_annotations": {"total": sum(self.dropped_counts.values()),
                                        "by_reason": dict(self.dropped_counts)}}

    # ------------------------------------------------------------------ finishing
    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.shards) + self._current.samples

    def manifest(self) -> dict[str, Any]:
        shards = [{k: v for k, v in s.items() if k != "state"} for s in self.shards]
        return {
            "schema": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": self.command,
            "prefix": self.prefix,
            "num_shards": len(shards),
            "num_samples": sum(s["samples"] for s in shards),
            "num_queries": sum(s["queries"] for s in shards),
            "num_instances": sum(s["instances"] for s in shards),
            "num_negatives": sum(s["negatives"] for s in shards),
            "consumed": self._consumed,
            "shards": shards,
            **self._counts(),
            "extra": self.extra,
            "settings": self.settings,
        }

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write manifest.json and sizes.json; returns the manifest."""
        if self.already_complete:
            self._bar.close()
            self.written_manifest = json.loads((self.out_dir / MANIFEST).read_text())
            return self.written_manifest
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        manifest = self.manifest()
        self.written_manifest = manifest
        write_json_atomic(self.out_dir / SIZES, {s["name"]: s["samples"] for s in manifest["shards"]}, indent=1)
        write_json_atomic(self.out_dir / MANIFEST, manifest, indent=1)
        (self.out_dir / PROGRESS).unlink(missing_ok=True)
        self._bar.close()
        return manifest

    def abort(self) -> None:
        """Drop the unfinished shard; finished shards and progress.json stay for ``resume``."""
        self._aborting = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._bar.close()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def summary(self) -> str:
        """Human-readable result: written / skipped with reasons."""
        if self.already_complete:
            manifest = self.written_manifest or load_manifest(self.out_dir)
            return (f"{self.out_dir}: already complete with {manifest['num_samples']} samples in "
                    f"{manifest['num_shards']} shard(s); nothing to do")
        skipped = sum(self.skip_counts.values())
        lines = [f"{self.out_dir}: {self.num_samples} samples in {len(self.shards)} shard(s), "
                 f"{skipped} skipped"]
        lines += [f"  skipped {n:6d} x {reason}" for reason, n in self.skip_counts.most_common()]
        if self.dropped_counts:
            lines.append(f"  {sum(self.dropped_counts.values())} annotation(s) left out of written samples")
            lines += [f"  dropped {n:6d} x {reason}" for reason, n in self.dropped_counts.most_common()]
        return "\n".join(lines)


def write_samples(items: Iterable[Sample | Skip], out_dir: str | os.PathLike,
                  **sink_kwargs: Any) -> dict[str, Any]:
    """Write an iterable of samples into a new shard set and return the manifest (no resume)."""
    with ShardSink(out_dir, **sink_kwargs) as sink:
        for item in items:
            sink.add(item)
    return sink.written_manifest


def load_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``manifest.json`` of a shard set, with a clear error if it is missing."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {out_dir} a finished shard directory?")
    return json.loads(path.read_text())


def add_sink_arguments(parser: Any, default_prefix: str = "shard") -> None:
    """Options every shard-writing command shares (``--out``, caps, ``--overwrite``/``--resume``)."""
    parser.add_argument("--out", required=True, help="output directory of the shard set")
    parser.add_argument("--prefix", default=default_prefix, help="shard file prefix: PREFIX-000000.tar")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard (approximate cap)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace an existing shard set")
    group.add_argument("--resume", action="store_true", help="keep verified finished shards and continue")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first invalid sample instead of skipping it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def sink_from_args(args: Any, *, out_dir: str | os.PathLike | None = None, total: int | None = None,
                   extra: dict[str, Any] | None = None,
                   command: Sequence[str] | str | None = None,
                   sink_class: type[ShardSink] | None = None) -> ShardSink:
    """A :class:`ShardSink` (or ``sink_class``, a subclass) configured from :func:`add_sink_arguments`
    options."""
    import sys

    mode: WriteMode = "overwrite" if args.overwrite else "resume" if args.resume else "new"
    if command is None:
        command = ["python", "-m", "data_pipelines", *sys.argv[1:]]
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in RUN_FLAGS and not callable(v)}
    return (sink_class or ShardSink)(out_dir or args.out, prefix=args.prefix, max_count=args.max_count,
                                     max_bytes=args.max_bytes, mode=mode, command=command,
                                     on_invalid="raise" if args.strict else "skip",
                                     progress=not args.no_progress, total=total, extra=extra, settings=settings)
