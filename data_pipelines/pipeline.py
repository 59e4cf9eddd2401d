"""WebDataset streams of collated batches: shard sources, epoch arithmetic, rank/worker splits.

The stage order is open_clip's (``get_wds_dataset``), which holds up under DDP:

1. shard order from a seeded RNG over (seed, epoch), identical on every rank and worker, with
   the epoch in shared memory so live DataLoader workers see :meth:`SharedEpoch.set`;
2. split by rank, then by DataLoader worker (size-balanced: :func:`assign_shards`);
3. tar -> samples with a counting, rate-limited error handler (a bad sample or shard is counted
   and logged with its file and key, never dropped silently);
4. sample shuffle (training), then decode + transform;
5. ``batched`` (collate) inside the worker; the loader is a ``WebLoader(batch_size=None)``.

Three modes:

``exact`` (training epochs over the data): every rank yields the same number of batches, so DDP
    never waits on a rank that ran out. Shards are split over ranks x workers by size (see
    :func:`assign_shards`): the split is fixed, and each epoch permutes shards of equal size
    between the slots, so slot sizes (and the epoch length) stay constant while shards still
    move between ranks and workers. With one rank every sample is seen exactly once per epoch;
    with several, ranks holding more batches than the smallest stop early (reported by
    :meth:`ShardStream.describe`). A worker that loses samples to corrupt data re-reads its shards
    to fill its share. Needs at least one shard per rank and worker.
``resampled`` (infinite stream, open_clip's ``--dataset-resampled``): every worker draws shards
    with replacement, weighted by source, and stops after its share of ``num_samples``
    (what webdataset's ``with_epoch`` does); full batches only.
``once`` (validation, test, predict): every sample exactly once across all ranks, in shard
    order; ranks may get different numbers of batches, and a worker without shards yields nothing.

All randomness comes from (seed, epoch, rank, worker), so a run can be resumed exactly: a stream
told to resume an epoch after N batches (:meth:`ShardStream.resume_at`) regenerates the epoch and
drops what the interrupted run consumed. The DataLoader takes one batch from each worker in turn
(workers that ran out drop out of the turn), so the first N batches came from known workers
(:func:`resume_order`); on resume each worker drops its share and the workers swap roles so that
the turn continues with the worker that was next.

Shards that fail while being read (a ``pipe:`` command exiting non-zero, a dropped connection, a
truncated tar) are read again up to ``retries`` times when remote, continuing after the samples
already delivered; a shard that still fails, or a local one, is counted and logged by the error
handler with the samples it gave, and the rest of it is skipped (``exact`` epochs then re-read the
worker's shards to fill its share, so an epoch is never cut short silently).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import multiprocessing
import random
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from numpy.random import Generator
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from data_pipelines.schema import SampleError
from data_pipelines.writer import MANIFEST, SIZES

log = logging.getLogger(__name__)

StreamMode = Literal["exact", "resampled", "once"]
MAX_EMPTY_PASSES = 3
# shared counters are made in a spawn context: they then reach DataLoader workers whether those
# are forked (inherited) or spawned (pickled at start); fork-context locks cannot be pickled
_SHARED = multiprocessing.get_context("spawn")
SKIPPABLE_ERRORS = (SampleError, tarfile.TarError, OSError, EOFError, ValueError)


class ShardReadError(OSError):
    """A shard could not be read to its end (after its retries); the message names it."""


SKIP_REASONS = ("sample breaks the schema", "shard unreadable", "corrupt tar", "file or image unreadable",
                "bad value")
"""Why a sample or shard was skipped, as counted by :class:`ErrorCounter` (one per error class)."""


def skip_reason(error: Exception) -> str:
    """The :data:`SKIP_REASONS` entry of a skippable error."""
    if isinstance(error, SampleError):
        return SKIP_REASONS[0]
    if isinstance(error, ShardReadError):
        return SKIP_REASONS[1]
    if isinstance(error, tarfile.TarError):
        return SKIP_REASONS[2]
    if isinstance(error, OSError | EOFError):
        return SKIP_REASONS[3]
    return SKIP_REASONS[4]


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSet:
    """Shard URLs of one split, with what is known about them.

    Attributes:
        urls: shard paths or URLs (``pipe:``/``http(s):`` allowed).
        sizes: samples per shard, when every source has a manifest.json or sizes.json.
        weights: relative sampling weight per shard (used when resampling).
        phrases: the phrases of the sources' manifest histograms (empty without manifests).
        sources: the source specs, for messages.
        checksums: the sha256 manifest.json records per shard (None for a shard it does not
            list, or all None when not known: sizes.json, remote shards).
        without_manifest: the sources that have no manifest.json (beside their shards).
    """

    urls: tuple[str, ...]
    sizes: tuple[int, ...] | None
    weights: tuple[float, ...]
    phrases: tuple[str, ...]
    sources: tuple[str, ...]
    checksums: tuple[str | None, ...] | None = None
    without_manifest: tuple[str, ...] = ()

    def checksum(self, index: int) -> str | None:
        """The recorded sha256 of shard ``index``, if any."""
        return None if self.checksums is None else self.checksums[index]

    @property
    def num_samples(self) -> int | None:
        return None if self.sizes is None else sum(self.sizes)


def is_remote(url: str) -> bool:
    """Whether a shard source is streamed (``pipe:`` command or a ``scheme://`` URL), not a local file."""
    return url.startswith("pipe:") or "://" in url


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


@dataclass(frozen=True)
class _Source:
    """What one source spec resolves to (see :func:`resolve_shards`)."""

    urls: list[str]
    sizes: list[int] | None
    phrases: list[str]
    checksums: list[str | None]
    has_manifest: bool


def _resolve_directory(path: Path) -> _Source:
    if (path / MANIFEST).exists():
        manifest = _read_json(path / MANIFEST)
        shards = manifest.get("shards", [])
        return _Source([str(path / s["name"]) for s in shards], [int(s["samples"]) for s in shards],
                       sorted(manifest.get("phrases", {})), [s.get("sha256") for s in shards], True)
    if (path / SIZES).exists():
        sizes = _read_json(path / SIZES)
        names = sorted(sizes)
        return _Source([str(path / n) for n in names], [int(sizes[n]) for n in names], [], [None] * len(names),
                       False)
    raise FileNotFoundError(f"{path} has neither {MANIFEST} nor {SIZES}: is it a finished shard directory? "
                            "(or give a brace pattern such as DIR/shard-{000000..000009}.tar)")


def _resolve_pattern(spec: str) -> _Source:
    urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise ValueError(f"shard pattern {spec!r} expands to no shards")
    if any(is_remote(u) for u in urls):
        return _Source(urls, None, [], [None] * len(urls), False)  # sizes come from num_samples
    missing = [u for u in urls if not Path(u).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[:3]}")
    folder = Path(urls[0]).parent
    sizes, phrases, checksums = None, [], [None] * len(urls)
    if (folder / SIZES).exists():
        table = _read_json(folder / SIZES)
        if all(Path(u).name in table for u in urls):
            sizes = [int(table[Path(u).name]) for u in urls]
    has_manifest = (folder / MANIFEST).exists()
    if has_manifest:
        manifest = _read_json(folder / MANIFEST)
        phrases = sorted(manifest.get("phrases", {}))
        recorded = {s.get("name"): s.get("sha256") for s in manifest.get("shards", [])}
        checksums = [recorded.get(Path(u).name) if Path(u).parent == folder else None for u in urls]
    return _Source(urls, sizes, phrases, checksums, has_manifest)


def _shard_weights(source_weight: float | None, sizes: list[int] | None, count: int) -> list[float]:
    """Resampling weight per shard: its size when pooled; the source's weight split by size when mixed."""
    shares = [float(n) for n in sizes] if sizes and sum(sizes) > 0 else [1.0] * count
    if source_weight is None:  # pooled: every sample equally likely
        return shares
    return [source_weight * share / sum(shares) for share in shares]


def resolve_shards(sources: str | Sequence[str], weights: Sequence[float] | None = None) -> ShardSet:
    """Resolve shard sources into one :class:`ShardSet`.

    Args:
        sources: each a shard directory (its manifest.json lists the shards with their sizes and
            sha256, or a sizes.json with their sizes), a brace pattern
            ``DIR/train-{000000..000031}.tar`` (sizes from a sizes.json next to the shards, sha256
            and phrases from a manifest.json, if any), or a ``pipe:``/``http(s)://`` URL pattern.
        weights: one sampling weight per source (resampling only): a source is drawn in
            proportion to its weight, whatever its size.
    """
    specs = [sources] if isinstance(sources, str) else list(sources)
    if not specs:
        raise ValueError("no shard sources given")
    if weights is not None and (len(weights) != len(specs) or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"need one non-negative weight per source ({len(specs)} sources: {specs}), "
                         f"not all zero; got {list(weights)}")
    urls: list[str] = []
    sizes: list[int] | None = []
    shard_weights: list[float] = []
    phrases: set[str] = set()
    checksums: list[str | None] = []
    without_manifest: list[str] = []
    for i, spec in enumerate(specs):
        path = Path(spec)
        found = _resolve_directory(path) if not is_remote(spec) and path.is_dir() else _resolve_pattern(spec)
        if not found.urls:
            raise ValueError(f"source {spec!r} holds no shards")
        weight = None if weights is None else float(weights[i])
        shard_weights += _shard_weights(weight, found.sizes, len(found.urls))
        urls += found.urls
        sizes = None if sizes is None or found.sizes is None else sizes + found.sizes
        phrases.update(found.phrases)
        checksums += found.checksums
        if not found.has_manifest:
            without_manifest.append(spec)
    return ShardSet(urls=tuple(urls), sizes=None if sizes is None else tuple(sizes),
                    weights=tuple(shard_weights), phrases=tuple(sorted(phrases)), sources=tuple(specs),
                    checksums=tuple(checksums), without_manifest=tuple(without_manifest))


# ----------------------------------------------------------------------------------------------
# shared state between the main process and DataLoader workers
# ----------------------------------------------------------------------------------------------
class SharedEpoch:
    """The current epoch in shared memory, so persistent DataLoader workers see updates."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = _SHARED.Value("i", epoch)

    @property
    def value(self) -> int:
        return self._value.value

    def set(self, epoch: int) -> None:
        self._value.value = epoch


class ErrorCounter:
    """webdataset error handler: counts skipped samples/shards and logs them, rate-limited.

    Data errors (a corrupt tar member, a sample breaking the schema, an undecodable image) are
    counted, logged with the shard and sample named (the first ``log_first``, then every
    ``log_every``-th) and skipped; any other exception is a bug and is raised.

    Args:
        name: the split, for messages.
        log_first: log this many errors in full.
        log_every: then log every n-th error.
    """

    def __init__(self, name: str, log_first: int = 5, log_every: int = 100) -> None:
        self.name, self.log_first, self.log_every = name, log_first, log_every
        self._count = _SHARED.Value("q", 0)
        self._by_reason = {reason: _SHARED.Value("q", 0, lock=False) for reason in SKIP_REASONS}

    @property
    def count(self) -> int:
        """Errors so far, over all workers."""
        return self._count.value

    @property
    def by_reason(self) -> dict[str, int]:
        """Errors so far by reason (:data:`SKIP_REASONS`), over all workers."""
        return {reason: value.value for reason, value in self._by_reason.items()}

    def __call__(self, exn: Exception) -> bool:
        if not isinstance(exn, SKIPPABLE_ERRORS):
            raise exn
        with self._count.get_lock():  # one lock guards the total and the reasons
            self._count.value += 1
            self._by_reason[skip_reason(exn)].value += 1
            count = self._count.value
        if count <= self.log_first or count % self.log_every == 0:
            log.warning("%s: skipped a bad sample or shard (%d so far): %s", self.name, count, exn)
        return True


# ----------------------------------------------------------------------------------------------
# epoch arithmetic
# ----------------------------------------------------------------------------------------------
def assign_shards(sizes: Sequence[int], num_slots: int) -> list[list[int]]:
    """Split shards over ``num_slots`` (rank-major: slot = rank * workers + worker), balanced by size.

    Greedy: largest shard first, each to the slot with the fewest samples so far. Shards of equal
    size therefore go round-robin, as webdataset's ``split_by_node`` + ``split_by_worker`` would.
    """
    slots: list[list[int]] = [[] for _ in range(num_slots)]
    load = [0] * num_slots
    for shard in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(num_slots), key=lambda k: (load[k], len(slots[k]), k))
        slots[target].append(shard)
        load[target] += sizes[shard]
    return slots


def shuffle_assignment(slots: Sequence[Sequence[int]], sizes: Sequence[int], seed: int,
                       epoch: int) -> list[list[int]]:
    """This epoch's shards per slot: shards of equal size swap slots, then each slot's order is shuffled.

    The same on every rank and worker (seeded by seed and epoch only); every slot keeps its
    number of samples, so epoch lengths do not change between epochs.
    """
    rng = np.random.default_rng([seed, epoch])
    by_size: dict[int, list[int]] = {}
    for slot in slots:
        for shard in slot:
            by_size.setdefault(sizes[shard], []).append(shard)
    moved: dict[int, int] = {}
    for size in sorted(by_size):
        group = by_size[size]
        moved.update(zip(group, [group[j] for j in rng.permutation(len(group))], strict=True))
    shuffled = [[moved[s] for s in slot] for slot in slots]
    return [[slot[j] for j in rng.permutation(len(slot))] for slot in shuffled]


def balanced_budgets(batches: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per rank and worker, how many batches to yield so that every rank yields the same total.

    ``batches[rank][worker]`` is what each worker's shards give; ranks above the smallest total
    take batches off their fullest workers.
    """
    target = min(sum(rank) for rank in batches)
    budgets = [list(rank) for rank in batches]
    for rank in budgets:
        for _ in range(sum(rank) - target):
            fullest = max(range(len(rank)), key=lambda w: (rank[w], w))
            rank[fullest] -= 1
    return budgets


def resampled_worker_batches(num_samples: int, batch_size: int, world_size: int, num_workers: int) -> int:
    """Batches each worker yields per resampled epoch: ``ceil(num_samples / global batch / workers)``."""
    return math.ceil(num_samples / (batch_size * world_size * max(1, num_workers)))


def resume_order(budgets: Sequence[int], consumed: int) -> tuple[int, list[int]]:
    """Where a rank's loader stood after ``consumed`` batches of an epoch.

    The DataLoader takes one batch from each worker in turn (``budgets[w]`` batches from worker
    ``w``; a worker that ran out drops out of the turn). Returns the worker whose batch comes next
    and how many batches each worker had delivered.
    """
    total = sum(budgets)
    if not 0 <= consumed <= total:
        raise ValueError(f"cannot resume after {consumed} batches: the epoch has {total} ({list(budgets)})")
    delivered = [0] * len(budgets)
    rounds = itertools.chain.from_iterable(
        (w for w in range(len(budgets)) if r < budgets[w]) for r in range(max(budgets, default=0)))
    for worker in itertools.islice(rounds, consumed):
        delivered[worker] += 1
    following = next(rounds, 0)
    return following, delivered


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# ----------------------------------------------------------------------------------------------
# the stream
# ----------------------------------------------------------------------------------------------
class ShardStream(torch.utils.data.IterableDataset):
    """Batches from shards for one rank: an IterableDataset for ``WebLoader(batch_size=None)``.

    Args:
        shards: the split's shards.
        transform: ``transform(record, rng) -> sample`` for one raw webdataset record; ``rng`` is a
            numpy Generator seeded from (seed, epoch, rank, worker), or None in ``once`` mode.
        collate: turns a list of transformed samples into a batch.
        mode: ``exact``, ``resampled`` or ``once`` (see the module docstring).
        batch_size: samples per batch (per rank).
        rank: this process's rank.
        world_size: number of ranks.
        num_workers: DataLoader workers per rank (0 = load in the main process).
        seed: seed of every random choice.
        epoch: the shared epoch (a new one at 0 if not given).
        errors: counts skipped samples (a new one if not given).
        shuffle_buffer: sample shuffle buffer per worker (exact/resampled modes; 0 = no shuffle).
        num_samples: samples per epoch in ``resampled`` mode (default: the shards' total); in
            ``exact`` mode only used to estimate shard sizes the sources do not state.
        name: the split, for messages.
        retries: times a remote shard that fails while being read is read again.
        retry_delay: seconds before the first retry (doubling with each further one).
    """

    def __init__(self, shards: ShardSet, transform: Callable[[dict[str, Any], Generator | None], Any],
                 collate: Callable[[list[Any]], Any], *, mode: StreamMode, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, epoch: SharedEpoch | None = None,
                 errors: ErrorCounter | None = None, shuffle_buffer: int = 1000,
                 num_samples: int | None = None, name: str = "train", retries: int = 2,
                 retry_delay: float = 1.0) -> None:
        super().__init__()
        if mode not in ("exact", "resampled", "once"):
            raise ValueError(f"mode must be 'exact', 'resampled' or 'once', got {mode!r}")
        if retries < 0 or retry_delay < 0:
            raise ValueError(f"need retries >= 0 and retry_delay >= 0, got {retries} and {retry_delay}")
        if batch_size < 1 or num_workers < 0 or seed < 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, num_workers >= 0, seed >= 0 and 0 <= rank < world_size; "
                             f"got {batch_size}, {num_workers}, {seed}, rank {rank} of {world_size}")
        self.shards, self.transform, self.collate, self.mode = shards, transform, collate, mode
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.name = num_workers, seed, name
        self.epoch = epoch if epoch is not None else SharedEpoch()
        self.errors = errors if errors is not None else ErrorCounter(name)
        self.shuffle_buffer = shuffle_buffer if mode != "once" else 0
        self.workers_per_rank = max(1, num_workers)
        self.sizes = self._shard_sizes(num_samples)
        self.num_samples = shards.num_samples
        self.retries, self.retry_delay = retries, retry_delay
        self.dropped_per_epoch = 0
        self.slots: list[list[int]] = []
        self.sample_sliced = False  # "once" with fewer shards than slots: every slot reads every shard
        self.worker_budgets = self._plan(num_samples)
        self.resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches: int) -> None:
        """Make ``epoch`` continue after its first ``batches`` batches on this rank (0: from its start).

        Set before the loader starts its workers; other epochs are not affected.
        """
        if batches and self.worker_budgets is None:
            raise ValueError(f"{self.name}: cannot resume inside an epoch whose length is unknown")
        if batches:
            resume_order(self._rank_budgets(), batches)  # validates the count
        self.resume = (epoch, batches) if batches else None

    def _rank_budgets(self) -> list[int]:
        start = self.rank * self.workers_per_rank
        return list(self.worker_budgets[start:start + self.workers_per_rank])

    def _shard_sizes(self, num_samples: int | None) -> list[int] | None:
        if self.shards.sizes is not None:
            if num_samples is not None and self.mode == "exact":
                log.warning("%s: num_samples=%d ignored: exact epochs use the shard sizes from the manifests",
                            self.name, num_samples)
            return list(self.shards.sizes)
        if self.mode == "exact":
            if num_samples is None:
                raise ValueError(f"{self.name}: shard sizes are unknown (no manifest.json/sizes.json for "
                                 f"{list(self.shards.sources)}): give num_samples to plan exact epochs")
            # an estimate: exactness needs the real sizes
            base, extra = divmod(num_samples, len(self.shards.urls))
            return [base + (i < extra) for i in range(len(self.shards.urls))]
        return None

    def _plan(self, num_samples: int | None) -> list[int] | None:
        """Batches per epoch of each (rank, worker) slot, rank-major; None when sizes are unknown."""
        num_slots = self.world_size * self.workers_per_rank
        if self.mode == "resampled":
            self.num_samples = num_samples if num_samples is not None else self.shards.num_samples
            if self.num_samples is None:
                raise ValueError(f"{self.name}: the number of samples per epoch is unknown (no manifest.json/"
                                 f"sizes.json for {list(self.shards.sources)}): give num_samples")
            per_worker = resampled_worker_batches(self.num_samples, self.batch_size, self.world_size,
                                                  self.num_workers)
            return [per_worker] * num_slots
        if self.mode == "exact" and len(self.shards.urls) < num_slots:
            raise ValueError(
                f"{self.name}: {len(self.shards.urls)} shard(s) but an exact epoch needs at least one per "
                f"rank and DataLoader worker ({self.world_size} rank(s) x {self.workers_per_rank} "
                "worker(s)): "
                "use resampled=True, fewer workers, or write more, smaller shards (--max-count)")
        if self.mode == "once" and len(self.shards.urls) < num_slots:
            # too few shards to give each (rank, worker) one: slot k keeps every num_slots-th sample
            # from k of all shards read in order, so no rank is left without evaluation data
            self.sample_sliced = True
            self.slots = [list(range(len(self.shards.urls)))] * num_slots
            if self.sizes is None:
                return None
            total = sum(self.sizes)
            return [math.ceil(len(range(k, total, num_slots)) / self.batch_size) for k in range(num_slots)]
        self.slots = assign_shards(self.sizes or [1] * len(self.shards.urls), num_slots)
        if self.sizes is None:
            return None
        batches = [[math.ceil(sum(self.sizes[s] for s in self.slots[r * self.workers_per_rank + w])
                              / self.batch_size) for w in range(self.workers_per_rank)]
                   for r in range(self.world_size)]
        if self.mode == "exact":
            budgets = balanced_budgets(batches)
            self.dropped_per_epoch = sum(map(sum, batches)) - sum(map(sum, budgets))
            batches = budgets
        return [b for rank in batches for b in rank]

    # ------------------------------------------------------------------ lengths
    def __len__(self) -> int:
        """Batches this rank yields per epoch (raises TypeError when shard sizes are unknown)."""
        if self.worker_budgets is None:
            raise TypeError(f"{self.name}: number of batches unknown (shard sizes unknown)")
        start = self.rank * self.workers_per_rank
        return sum(self.worker_budgets[start:start + self.workers_per_rank])

    def describe(self) -> str:
        """One line: shards, samples, mode and batches per epoch for this rank."""
        samples = "? samples" if self.num_samples is None else f"{self.num_samples} samples"
        layout = f"batch {self.batch_size} x {self.world_size} rank(s) x {self.workers_per_rank} worker(s)"
        try:
            batches = f"{len(self)} batches per epoch on rank {self.rank}"
        except TypeError:
            batches = "batches per epoch unknown"
        shards = f"{len(self.shards.urls)} shard(s)"
        line = f"{self.name}: {shards}, {samples}, {self.mode} -> {batches} ({layout})"
        if self.dropped_per_epoch:
            line += (f"; {self.dropped_per_epoch} batch(es) per epoch left out to give every rank the same "
                     "count")
        if self.mode == "once":
            line += "; each sample once across ranks"
        if self.sample_sliced:
            line += " (fewer shards than ranks x workers: each reads every shard, keeping its share)"
        return line

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = _worker()
        if num_workers != self.workers_per_rank:
            raise RuntimeError(f"{self.name}: stream planned for {self.num_workers} DataLoader worker(s) but "
                               f"runs under {num_workers}: build the DataLoader with "
                               f"num_workers={self.num_workers}")
        epoch = self.epoch.value
        role, skip = self._role(epoch, worker)
        slot = self.rank * self.workers_per_rank + role
        budget = None if self.worker_budgets is None else self.worker_budgets[slot]
        if self.mode == "resampled":
            urls = self._resampled_urls(epoch, role)
        else:
            slots = shuffle_assignment(self.slots, self.sizes, self.seed, epoch) if self.mode == "exact" \
                else self.slots
            shards = slots[slot]
            urls = partial(_fixed, [self.shards.urls[s] for s in shards])
        if skip:
            log.info("%s: rank %d worker %d skips %d batch(es) to resume epoch %d", self.name, self.rank,
                     worker, skip, epoch)
        keep = (slot, self.world_size * self.workers_per_rank) if self.sample_sliced else None
        return itertools.islice(self._batches(urls, budget, epoch, role, keep), skip, None)

    def _role(self, epoch: int, worker: int) -> tuple[int, int]:
        """The worker whose stream this worker produces, and how many of its batches to drop (resuming)."""
        if self.resume is None or self.resume[0] != epoch:
            return worker, 0
        following, delivered = resume_order(self._rank_budgets(), self.resume[1])
        role = (following + worker) % self.workers_per_rank
        return role, delivered[role]

    def _resampled_urls(self, epoch: int, worker: int) -> Callable[[int], list[str]]:
        probs = np.asarray(self.shards.weights, float) / sum(self.shards.weights)

        def draw(pass_index: int) -> list[str]:
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker, pass_index, 0])
            return [self.shards.urls[i] for i in rng.choice(len(probs), size=len(probs), p=probs)]
        return draw

    def _batches(self, urls: Callable[[int], list[str]], budget: int | None, epoch: int,
                 worker: int, keep: tuple[int, int] | None = None) -> Iterator[Any]:
        """Read the worker's shards in passes until it yielded its budget (one pass without a budget);
        ``keep=(k, n)`` keeps every n-th sample from the k-th."""
        produced, empty_passes = 0, 0
        for pass_index in itertools.count():
            if budget is not None and produced >= budget:
                return
            pass_urls = urls(pass_index)
            count = 0
            for batch in self._pass(pass_urls, [self.seed, epoch, self.rank, worker, pass_index], keep):
                yield batch
                produced, count = produced + 1, count + 1
                if budget is not None and produced >= budget:
                    return
            if budget is None:
                return
            empty_passes = 0 if count else empty_passes + 1
            if empty_passes >= MAX_EMPTY_PASSES:
                raise RuntimeError(f"{self.name}: rank {self.rank} worker {worker} got no valid sample from "
                                   f"its shards {pass_urls[:3]}... ({self.errors.count} bad samples so far; "
                                   "see the warnings)")
            if self.mode == "exact":
                log.warning("%s: rank %d worker %d re-reads its shards for %d more batch(es) (bad samples "
                            "skipped)", self.name, self.rank, worker, budget - produced)

    def _samples(self, urls: Iterable[str], keep: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
        samples = (sample for url in urls for sample in self._shard_samples(url))
        return samples if keep is None else itertools.islice(samples, keep[0], None, keep[1])

    def _shard_samples(self, url: str) -> Iterator[dict[str, Any]]:
        """The raw samples of one shard; a remote shard failing midway is re-read after what it gave."""
        delivered = 0
        for attempt in itertools.count():
            try:
                for index, sample in enumerate(_read_tar(url)):
                    if index >= delivered:
                        delivered += 1
                        yield sample
                return
            except SKIPPABLE_ERRORS as exn:
                if attempt < self.retries and is_remote(url):
                    log.warning("%s: shard %s failed after %d sample(s) (%s); reading it again "
                                "(retry %d of %d)", self.name, url, delivered, _brief(exn), attempt + 1,
                                self.retries)
                    time.sleep(self.retry_delay * 2 ** attempt)
                    continue
                tries = f" after {attempt + 1} attempts" if attempt else ""
                self.errors(ShardReadError(f"shard {url} failed{tries}: {_brief(exn)}; {delivered} sample(s) "
                                           "read, the rest of the shard skipped"))
                return

    def _pass(self, urls: Iterable[str], seeds: list[int], keep: tuple[int, int] | None = None) -> Iterator[Any]:
        stages: list[Any] = [partial(self._samples, list(urls), keep=keep)]
        if self.shuffle_buffer > 1:
            shuffle_rng = random.Random(int(np.random.default_rng([*seeds, 1]).integers(1 << 62)))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                                      rng=shuffle_rng))
        rng = None if self.mode == "once" else np.random.default_rng([*seeds, 2])
        stages.append(wds.map(partial(self.transform, rng=rng), handler=self.errors))
        stages.append(wds.batched(self.batch_size, collation_fn=self.collate,
                                  partial=self.mode != "resampled"))
        return iter(wds.DataPipeline(*stages))


def _fixed(urls: list[str], pass_index: int) -> list[str]:
    return urls


def _read_tar(url: str) -> Iterator[dict[str, Any]]:
    """Complete samples of one shard in tar order; any read error is raised (the caller retries).

    A ``pipe:`` command's exit status is checked once the shard has been read (webdataset checks it
    only while reading, so a command failing at its very end could otherwise pass unnoticed).
    """
    from webdataset import tariterators

    stream = wds.gopen(url)
    complete = False
    try:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
        yield from tariterators.group_by_keys(files, handler=_raise)
        complete = True
    finally:
        if complete:
            stream.close()
        else:  # failed, or abandoned by the reader: the error that stopped it (if any) is the one to report
            with contextlib.suppress(Exception):
                stream.close()


def _raise(exn: Exception) -> bool:
    raise exn


def _brief(exn: Exception, limit: int = 300) -> str:
    """An exception's own message (webdataset appends the stream and url to ``args``)."""
    text = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
    return text if len(text) <= limit else text[:limit] + "..."


def make_loader(stream: ShardStream, *, pin_memory: bool = False, persistent_workers: bool = False,
                prefetch_factor: int | None = None) -> wds.WebLoader:
    """The loader for a stream: batches come collated from the workers (``batch_size=None``).

    It has a ``len`` (batches per epoch on this rank) whenever the stream knows it.
    """
    workers = stream.num_workers
    loader = wds.WebLoader(stream, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                           persistent_workers=persistent_workers and workers > 0,
                           prefetch_factor=prefetch_factor if workers > 0 else None)
    try:
        return loader.with_length(len(stream), silent=True)
    except TypeError:  # shard sizes unknown
        return loader


def shutdown_workers(loader: wds.WebLoader | DataLoader) -> None:
    """Stop the worker processes of a loader's live iterator (persistent or not) and drop the iterator;
    a loader without workers, or not iterated, is left as it is."""
    inner = loader.pipeline[0] if isinstance(loader, wds.WebLoader) else loader
    iterator = getattr(inner, "_iterator", None)
    if isinstance(iterator, _MultiProcessingDataLoaderIter):
        iterator._shutdown_workers()
        inner._iterator = None
