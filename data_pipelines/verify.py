"""Check a split's local shards before training reads them: sha256 and unique sample keys.

:func:`verify_shards` hashes every local shard that a manifest.json records a sha256 for (every
byte read once), lists the tar members of every local shard (headers only, nothing decoded) and
stops with one :class:`ShardVerificationError` naming every problem, one line each:

- a shard whose sha256 differs from the one its manifest.json recorded (the file changed after
  it was written: bit rot, a partial copy, another run writing over it);
- a sample key (the member name up to its first dot, as webdataset groups members) found in two
  shards of the split, or twice in one shard; a shard given twice;
- a shard missing, not a readable tar, or cut short (a member ends past the end of the file, or,
  without a sha256 to compare, fewer samples than its manifest.json or sizes.json lists).

Shards that no manifest.json lists (a sizes.json directory, a brace pattern without a
manifest.json beside it) are checked for keys and completeness only; remote shards (``pipe:``,
``http(s)://``) are not read, only counted. ``ShardDataModule`` runs this once per split at ``setup``.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from webdataset import tariterators

from data_pipelines.pipeline import ShardSet, is_remote
from data_pipelines.writer import MANIFEST, sha256_of

MAX_LISTED_PROBLEMS = 10
TURN_OFF = "set data.init_args.verify_shards false"
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # members webdataset's tar reading skips


class ShardVerificationError(ValueError):
    """Local shards differ from their manifest.json or repeat sample keys; one line per problem."""


@dataclass(frozen=True)
class ShardVerification:
    """What :func:`verify_shards` checked (any problem is raised instead).

    Attributes:
        name: the split, for messages.
        shards: local shards read.
        with_checksum: of those, the ones whose sha256 was compared with (and matches) a manifest.json.
        remote: shards not verifiable (``pipe:``/``http(s)://``), not read.
        samples: sample keys found, all unique.
        bytes: size of the local shards.
        seconds: time taken.
        keys: the sample keys (empty once the caller has dropped them).
    """

    name: str
    shards: int
    with_checksum: int
    remote: int
    samples: int
    bytes: int
    seconds: float
    keys: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def without_checksum(self) -> int:
        """Local shards no manifest.json records a sha256 for (checked for keys only)."""
        return self.shards - self.with_checksum

    def describe(self) -> str:
        """One line: what was verified, and how fast."""
        if not self.without_checksum:
            sha = f"sha256 of all {self.shards} match manifest.json"
        elif not self.with_checksum:
            sha = "no sha256 to compare (no manifest.json lists them)"
        else:
            sha = (f"sha256 of {self.with_checksum} match manifest.json, {self.without_checksum} have none to "
                   "compare")
        line = f"{self.name}: verified {self.shards} local shard(s), {self.samples} unique sample key(s), {sha}"
        if self.remote:
            line += f"; {self.remote} remote shard(s) not verifiable"
        speed = f", {self.bytes / 1e6 / self.seconds:.0f} MB/s" if self.seconds > 0 and self.bytes else ""
        return f"{line} ({self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s{speed})"


@dataclass(frozen=True)
class _Problem:
    line: str
    question: str  # the likely cause, as a question ("" when there is no guess)
    fix: str


class _Problems:
    """The first problems in full, and how many there were."""

    def __init__(self) -> None:
        self.listed: list[_Problem] = []
        self.count = 0

    def add(self, line: str, fix: str, question: str = "") -> None:
        self.count += 1
        if len(self.listed) < MAX_LISTED_PROBLEMS:
            self.listed.append(_Problem(line, question, fix))

    def error(self, name: str) -> ShardVerificationError:
        questions = list(dict.fromkeys(p.question for p in self.listed if p.question))
        fixes = list(dict.fromkeys(p.fix for p in self.listed))
        hint = " ".join([*questions, ", ".join(fixes) + f" or {TURN_OFF}"])
        if self.count == 1:
            return ShardVerificationError(f"{self.listed[0].line} ({hint})")
        lines = [f"{name} shards: {self.count} problems ({hint}):", *(f"  {p.line}" for p in self.listed)]
        if self.count > len(self.listed):
            lines.append(f"  ... and {self.count - len(self.listed)} more")
        return ShardVerificationError("\n".join(lines))


def _sample_keys(path: str, size: int) -> Iterator[str]:
    """The sample key of each tar member, in order, as webdataset groups them: headers only (the
    member data is skipped). Raises ``EOFError`` when a member ends past the end of the file."""
    try:
        tar = tarfile.open(path, "r:*")
    except tarfile.ReadError as err:  # its message lists every compression tried, one per line
        raise tarfile.ReadError("no tar header at its start (nor a gzip, bz2 or xz one)") from err
    with tar:
        plain = isinstance(tar.fileobj, io.BufferedReader)  # not compressed: offsets are the file's
        while (info := tar.next()) is not None:
            tar.members = []  # nothing kept: a shard may hold many thousand members
            if plain and info.offset_data + info.size > size:
                raise EOFError(f"cut short: member {info.name} ends at byte {info.offset_data + info.size} "
                               f"but the file has {size}")
            name = info.name
            if not info.isreg() or _SKIP_META.match(name) or ("/" not in name and
                                                              name.startswith(tariterators.meta_prefix) and
                                                              name.endswith(tariterators.meta_suffix)):
                continue
            key, _ = tariterators.base_plus_ext(name)
            if key is not None:
                yield key


def verify_shards(shards: ShardSet, *, name: str, progress: bool = True) -> ShardVerification:
    """Check every local shard of ``shards``: its sha256 against its manifest.json, and its sample
    keys unique across the split.

    Args:
        shards: the split's shards (:func:`~data_pipelines.pipeline.resolve_shards`).
        name: the split, for messages.
        progress: show a progress bar over the bytes checked.

    Raises:
        ShardVerificationError: one line per problem (the first :data:`MAX_LISTED_PROBLEMS`, then
            a count).
    """
    start = time.perf_counter()
    problems = _Problems()
    local = [(i, url) for i, url in enumerate(shards.urls) if not is_remote(url)]
    sizes = {url: os.path.getsize(url) for _, url in local if os.path.isfile(url)}
    owner: dict[str, str] = {}  # sample key -> the shard it was first found in
    read: set[Path] = set()
    with_checksum = 0
    with tqdm(total=sum(sizes.values()), desc=f"verifying {name} shards", unit="B", unit_scale=True,
              disable=not progress, dynamic_ncols=True) as bar:
        for index, url in local:
            if url not in sizes:
                problems.add(f"{url}: not found", "rewrite the shards")
                continue
            path = Path(url).resolve()
            if path in read:
                problems.add(f"{url}: given twice in the {name} sources", "give each shard once")
                continue
            read.add(path)
            expected = shards.checksum(index)
            if expected is not None:
                with_checksum += 1
                found = sha256_of(url, progress=bar.update)
                if found != expected:
                    problems.add(f"{url}: sha256 {found[:12]}... differs from {MANIFEST}'s {expected[:12]}...",
                                 "rewrite the shards", "file changed after writing?")
                    continue  # its keys would only add noise
            else:
                bar.update(sizes[url])
            previous, samples = None, 0
            try:
                for key in _sample_keys(url, sizes[url]):
                    if key == previous:  # the next member of the same sample
                        continue
                    previous, samples = key, samples + 1
                    first = owner.get(key)
                    if first is None:
                        owner[key] = url
                        continue
                    where = f"twice in {url}" if first == url else f"in {first} and {url}"
                    problems.add(f"key {key!r} appears {where}", "remove the duplicates",
                                 "the same sample written twice?")
            except EOFError as err:
                problems.add(f"{url}: {err}", "rewrite the shards", "cut short or rewritten?")
                continue
            except (tarfile.TarError, OSError) as err:
                detail = (str(err).splitlines() or [""])[0]
                problems.add(f"{url}: not a readable tar ({type(err).__name__}: {detail})", "rewrite the shards")
                continue
            listed = None if shards.sizes is None else shards.sizes[index]
            if expected is None and listed is not None and samples != listed:  # a checksum covers it
                problems.add(f"{url}: holds {samples} sample(s) but its source lists {listed}", "rewrite the shards",
                             "cut short or rewritten?")
    if problems.count:
        raise problems.error(name)
    return ShardVerification(name=name, shards=len(read), with_checksum=with_checksum,
                             remote=len(shards.urls) - len(local), samples=len(owner), bytes=sum(sizes.values()),
                             seconds=time.perf_counter() - start, keys=frozenset(owner))
