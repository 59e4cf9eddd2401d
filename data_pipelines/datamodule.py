"""``ShardDataModule``: WebDataset shards -> :class:`~data_pipelines.batch.GroundingBatch` for Lightning.

In a LightningCLI config::

    data:
      class_path: data_pipelines.ShardDataModule
      init_args:
        train: shards/train            # or [shards/coco, shards/orchard] with train_weights + resampled
        val: shards/val
        image_size: 1024
        batch_size: 8
        num_workers: 8
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
import webdataset as wds
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from data_pipelines.augment import AugmentConfig
from data_pipelines.collate import QueryPolicy, SampleTransform, collate_samples
from data_pipelines.pipeline import (
    ErrorCounter,
    ShardSet,
    ShardStream,
    SharedEpoch,
    StreamMode,
    make_loader,
    resolve_shards,
    shutdown_workers,
)
from data_pipelines.tiling import CropConfig
from data_pipelines.verify import ShardVerification, verify_shards
from data_pipelines.vocab import Vocabulary, VocabularyError, load_vocabulary

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test", "predict"]
STAGE_SPLITS: dict[str, tuple[Split, ...]] = {"fit": ("train", "val"), "validate": ("val",),
                                               "test": ("test",), "predict": ("predict",)}


class MissingSplitError(RuntimeError):
    """A dataloader was requested for a split that has no source configured or was not set up."""


class ShardDataModule(LightningDataModule):
    """Batches of (image, noun phrase, instance masks) from WebDataset shards.

    Training follows open_clip's WebDataset loader (see ``data_pipelines.pipeline``): shard order
    seeded by (seed, epoch), split by rank then by worker, tolerant tar reading that counts and
    reports bad samples, sample shuffle, transform, and batches collated inside the workers.
    Every rank yields the same number of training batches per epoch, computed from the
    manifests, world size, batch size and workers (:meth:`describe` prints it). Validation, test
    and predict read every sample exactly once across ranks, so ranks may get different numbers
    of batches: reduce metrics at epoch end (torchmetrics does), not with per-step ``sync_dist``.

    Call :meth:`set_epoch` at the start of each training epoch (``sambridge`` task modules do):
    shard order, shuffling and augmentation are seeded by (seed, epoch, rank, worker), and the
    epoch lives in shared memory so persistent workers see it. :meth:`state_dict` records the
    epoch and seed in checkpoints and, in a checkpoint written during ``fit``, how many batches of
    the epoch were consumed: a run resumed from it regenerates the epoch and skips exactly those
    (see ``docs/cluster.md`` for the guarantee and its limits).

    Args:
        train: training shards: a shard directory (with manifest.json or sizes.json), a brace
            pattern such as ``shards/train-{000000..000031}.tar``, a ``pipe:``/``http(s)://``
            URL pattern, or a list of these (pooled, or mixed by ``train_weights``).
        val: validation shards (same forms; several are concatenated).
        test: test shards.
        predict: shards to predict on.
        train_weights: one sampling weight per ``train`` source to mix them (needs
            ``resampled=True``); without it sources are pooled.
        train_num_samples: samples per training epoch with ``resampled`` (default: the sources'
            total); needed when the sources state no sizes (remote shards without sizes.json).
        resampled: draw training shards with replacement, an endless stream cut into epochs of
            ``train_num_samples``; otherwise each epoch reads every shard once.
        batch_size: images per batch on each device.
        eval_batch_size: images per batch for val/test/predict (default: ``batch_size``).
        num_workers: DataLoader worker processes per device (0 loads in the main process, which
            is slow: for debugging). Exact training epochs need a shard per rank and worker.
        pin_memory: pin batches in page-locked memory (only when CUDA is available).
        persistent_workers: keep workers alive between epochs.
        seed: seed of shard order, shuffling, negative sampling and augmentation.
        shuffle_buffer: samples in each training worker's shuffle buffer (0 = no sample shuffle).
        image_size: side of the square canvas images are resized and padded to.
        max_queries_per_image: at most this many phrases per image (positives kept first),
            added negatives included.
        negatives_per_image: extra absent phrases per training image, drawn from the vocabulary;
            only for images whose queries are all exhaustive (such an image is taken to be
            labelled for the whole vocabulary), never a phrase already asked.
        hard_negatives_per_image: of those, at most this many are look-alikes of the image's
            positive phrases (``!`` in the vocabulary file: unripe vs ripe apple, weed vs crop);
            the rest are drawn from the vocabulary at random.
        vocabulary: vocabulary file(s) to draw negatives from (``data_pipelines.vocab`` format: a
            plain list with one phrase per line, or concepts with ``| synonyms``, ``< parents`` and
            ``! look-alikes``; several files are concatenated). Negatives are canonical phrases and
            never a parent, child or synonym of a phrase present in the image. Default: the
            phrases of the training manifests.
        hflip_prob: probability of a horizontal flip in training (skipped for images asked a
            phrase containing "left" or "right").
        scale_range: (min, max) random rescale in training; (1, 1) turns scale jitter off.
        color_jitter: brightness/contrast/saturation jitter strength in training (0 = off).
        min_instance_area: instances with fewer pixels on the canvas after augmentation are
            dropped; a positive left without instances becomes a negative if exhaustive.
        train_crop: cut training images larger than ``train_crop.size`` (height, width) to a
            random crop of that size at full resolution before augmentation (large field images:
            small objects stay large enough to learn); instances cut by the crop keep their
            visible part or make their query non-exhaustive (``data_pipelines.tiling.CropConfig``).
        shard_retries: times a remote shard (``pipe:``, ``http(s)://``) that fails while being
            read is read again, continuing after the samples it already gave; then it is counted
            as a bad shard and skipped.
        verify_shards: at ``setup``, once per split, read every local shard to check its sha256
            against its manifest.json and that no sample key repeats in the split (and warn when
            train and val share keys); a problem stops set-up with one line per shard or key
            (``data_pipelines.verify``). Costs one read of every byte; remote shards are not read.
    """

    def __init__(self, train: str | list[str] | None = None, val: str | list[str] | None = None,
                 test: str | list[str] | None = None, predict: str | list[str] | None = None,
                 train_weights: list[float] | None = None, train_num_samples: int | None = None,
                 resampled: bool = False, batch_size: int = 8, eval_batch_size: int | None = None,
                 num_workers: int = 2, pin_memory: bool = True, persistent_workers: bool = True,
                 seed: int = 0, shuffle_buffer: int = 1000, image_size: int = 1024,
                 max_queries_per_image: int = 16, negatives_per_image: int = 2, hard_negatives_per_image: int = 1,
                 vocabulary: str | list[str] | None = None, hflip_prob: float = 0.5,
                 scale_range: tuple[float, float] = (0.75, 1.25), color_jitter: float = 0.2,
                 min_instance_area: int = 16, train_crop: CropConfig | None = None, shard_retries: int = 2,
                 verify_shards: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        if train_weights is not None and not resampled:
            raise ValueError("train_weights mix sources by sampling: set resampled=True (exact epochs read "
                             "every shard once, so sources cannot be weighted)")
        self.sources: dict[Split, str | list[str] | None] = {"train": train, "val": val, "test": test,
                                                             "predict": predict}
        self.train_weights, self.train_num_samples = train_weights, train_num_samples
        self.resampled = resampled
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers
        self.seed, self.shuffle_buffer, self.image_size = seed, shuffle_buffer, image_size
        self.max_queries_per_image, self.negatives_per_image = max_queries_per_image, negatives_per_image
        self.hard_negatives_per_image = hard_negatives_per_image
        self.vocabulary_files = [vocabulary] if isinstance(vocabulary, str) else list(vocabulary or [])
        self.train_crop = CropConfig(**train_crop) if isinstance(train_crop, dict) else train_crop
        self.augment = AugmentConfig(image_size=image_size, hflip_prob=hflip_prob,
                                     scale_range=tuple(scale_range), color_jitter=color_jitter,
                                     min_instance_area=min_instance_area)
        self.shard_retries = shard_retries
        self.verify_shards = verify_shards
        self.verified: dict[Split, ShardVerification] = {}  # what setup verified, per split
        self._keys: dict[Split, frozenset[str]] = {}  # train/val sample keys, until compared for leakage
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches consumed) from a checkpoint
        self.streams: dict[Split, ShardStream] = {}
        self._loaders: list[wds.WebLoader] = []  # stopped in teardown
        self._shared_epoch: SharedEpoch | None = None  # created in setup: shared memory does not pickle

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str | None = None) -> None:
        """Resolve the sources of the stage's splits and plan their epochs for this rank."""
        rank, world_size = self._rank_and_world()
        if self._shared_epoch is None:
            self._shared_epoch = SharedEpoch(self.epoch)
        splits = STAGE_SPLITS.get(stage, ("train", "val", "test", "predict")) if stage else \
            ("train", "val", "test", "predict")
        for split in splits:
            if self.sources[split] is not None and split not in self.streams:
                self.streams[split] = self._build_stream(split, rank, world_size)
            if self.verify_shards and split in self.streams and split not in self.verified:
                self._verify(split, self.streams[split].shards, progress=rank == 0)
        if self.streams:
            rank_zero_info(self.describe())

    def _verify(self, split: Split, shards: ShardSet, progress: bool) -> None:
        """Verify a split's shards (every rank reads its own); warn when train and val share sample keys."""
        found = verify_shards(shards, name=split, progress=progress)
        rank_zero_info(found.describe())
        self.verified[split] = dataclasses.replace(found, keys=frozenset())
        other: Split | None = {"train": "val", "val": "train"}.get(split)
        if other is None or self.sources[other] is None:
            return
        if other not in self._keys:
            self._keys[split] = found.keys  # kept until the other split is verified
            return
        train, val = (found.keys, self._keys.pop(other)) if split == "train" else (self._keys.pop(other), found.keys)
        shared = train & val
        if shared:
            examples = ", ".join(repr(key) for key in sorted(shared)[:3])
            rank_zero_warn(f"train and val share {len(shared)} sample key(s), e.g. {examples}: validation then "
                           "measures samples the model trains on (leakage)")

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()  # RANK/WORLD_SIZE or torch.distributed
        return rank, world_size

    def _build_stream(self, split: Split, rank: int, world_size: int) -> ShardStream:
        train = split == "train"
        shards = resolve_shards(self.sources[split], self.train_weights if train else None)
        mode: StreamMode = ("resampled" if self.resampled else "exact") if train else "once"
        policy = QueryPolicy(max_queries=self.max_queries_per_image)
        if train and self.negatives_per_image:
            concepts = self._concepts(shards)
            policy = QueryPolicy(max_queries=self.max_queries_per_image, negatives_per_image=self.negatives_per_image,
                                 vocabulary=tuple(concepts.phrases) if concepts else shards.phrases,
                                 concepts=concepts, hard_negatives_per_image=self.hard_negatives_per_image)
        transform = SampleTransform(policy, self.augment, crop=self.train_crop if train else None)
        stream = ShardStream(shards, transform, collate_samples, mode=mode,
                             batch_size=self.batch_size if train else self.eval_batch_size, rank=rank,
                             world_size=world_size, num_workers=self.num_workers, seed=self.seed,
                             epoch=self._shared_epoch, errors=ErrorCounter(split),
                             shuffle_buffer=self.shuffle_buffer,
                             num_samples=self.train_num_samples if train else None, name=split,
                             retries=self.shard_retries)
        if train and self._resume is not None:
            stream.resume_at(*self._resume)
        return stream

    def _concepts(self, shards: ShardSet) -> Vocabulary | None:
        """The vocabulary files' concepts (None: negatives come from the training manifests' phrases)."""
        if self.vocabulary_files:
            for path in map(Path, self.vocabulary_files):
                if not path.is_file():
                    raise FileNotFoundError(f"vocabulary file {path} not found")
            concepts = load_vocabulary(self.vocabulary_files)
            if not len(concepts):
                raise VocabularyError(f"negatives_per_image={self.negatives_per_image} needs phrases to draw "
                                      f"from: the vocabulary file(s) {', '.join(self.vocabulary_files)} hold none")
            return concepts
        if not shards.phrases:
            fix = "give data.init_args.vocabulary FILE or set negatives_per_image 0"
            draw = f"phrases to draw negatives_per_image={self.negatives_per_image} from"
            if shards.without_manifest:  # manifest.json lists the phrases; sizes.json does not
                raise VocabularyError(f"{', '.join(shards.without_manifest)}: no manifest.json beside the shards, "
                                      f"so there are no {draw}: {fix}")
            raise VocabularyError(f"{', '.join(shards.sources)}: manifest.json lists no {draw}: {fix}")
        return None

    # ------------------------------------------------------------------ loaders
    def _dataloader(self, split: Split) -> wds.WebLoader:
        if split not in self.streams:
            if self.sources[split] is None:
                raise MissingSplitError(f"no {split} shards configured: set data.{split}")
            raise MissingSplitError(f"{split} was not set up: call setup() for its stage first")
        loader = make_loader(self.streams[split], pin_memory=self.pin_memory and torch.cuda.is_available(),
                             persistent_workers=self.persistent_workers)
        self._loaders.append(loader)
        return loader

    def teardown(self, stage: str) -> None:
        """Stop the worker processes of every loader made so far (``persistent_workers`` keeps them alive
        between epochs, and Lightning, which stops a plain ``DataLoader``'s, does not see inside a
        ``WebLoader``): the process then exits without waiting for them at interpreter shutdown."""
        for loader in self._loaders:
            shutdown_workers(loader)
        self._loaders.clear()

    def train_dataloader(self) -> wds.WebLoader:
        return self._dataloader("train")

    def val_dataloader(self) -> wds.WebLoader | list:
        """The validation loader, or no loader (validation skipped) when ``val`` is not configured."""
        return self._dataloader("val") if self.sources["val"] is not None else []

    def test_dataloader(self) -> wds.WebLoader:
        return self._dataloader("test")

    def predict_dataloader(self) -> wds.WebLoader:
        return self._dataloader("predict")

    # ------------------------------------------------------------------ epochs and state
    def set_epoch(self, epoch: int) -> None:
        """Set the training epoch; live DataLoader workers pick it up at their next epoch start."""
        self.epoch = epoch
        if self._shared_epoch is not None:
            self._shared_epoch.set(epoch)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records to continue the data order: epoch and seed and, while ``fit``
        runs, the training batches this rank consumed in the epoch and the layout that produced them."""
        state: dict[str, Any] = {"epoch": self.epoch, "seed": self.seed}
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and \
                trainer.state.status == TrainerStatus.RUNNING:
            per_epoch = trainer.num_training_batches
            state.update(batches=_batches_consumed(trainer),
                         batches_per_epoch=None if math.isinf(per_epoch) else int(per_epoch),
                         **self._layout())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the epoch and where in it training stopped; warns when the checkpoint's seed or
        data layout differs (the data order then differs from the uninterrupted run's)."""
        if state_dict.get("seed", self.seed) != self.seed:
            rank_zero_warn(f"the checkpoint's data seed {state_dict['seed']} differs from seed={self.seed}: "
                           "the resumed run sees a different data order")
        epoch, batches = int(state_dict.get("epoch", 0)), int(state_dict.get("batches", 0))
        per_epoch = state_dict.get("batches_per_epoch")
        if per_epoch is not None and batches >= per_epoch:  # saved at the end of the epoch
            epoch, batches = epoch + 1, 0
        saved = {key: state_dict[key] for key in self._layout() if key in state_dict}
        if batches and saved != self._layout():
            rank_zero_warn(f"resuming epoch {epoch} after {batches} batch(es) per rank with a different data "
                           f"layout (checkpoint {saved}, now {self._layout()}): the rest of this epoch is "
                           "drawn from the new layout, so some of its samples may repeat or be missed; "
                           "later epochs follow the new layout exactly")
        self.set_epoch(epoch)
        self._resume = (epoch, batches) if batches else None
        if "train" in self.streams:
            self.streams["train"].resume_at(epoch, batches)

    def _layout(self) -> dict[str, int]:
        """What decides each rank's share of an epoch, batch by batch."""
        _, world_size = self._rank_and_world()
        return {"world_size": world_size, "num_workers": self.num_workers, "batch_size": self.batch_size}

    def skipped(self) -> dict[str, int]:
        """Bad samples skipped so far per split (summed over workers)."""
        return {split: stream.errors.count for split, stream in self.streams.items()}

    def skipped_by_reason(self) -> dict[str, dict[str, int]]:
        """Bad samples and shards skipped so far per split and reason (summed over workers)."""
        return {split: stream.errors.by_reason for split, stream in self.streams.items()}

    def describe(self) -> str:
        """Shards, samples and batches per epoch of every split set up."""
        return "\n".join(stream.describe() for stream in self.streams.values())


def _batches_consumed(trainer) -> int:
    """Training batches of the current epoch a resumed run will not see again.

    Lightning resumes a checkpoint written in ``on_train_batch_end`` after that batch, and one
    written anywhere else after the last completed batch (its progress counters tell which).
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    if progress.ready == progress.started == progress.processed:
        return progress.processed
    return progress.completed
