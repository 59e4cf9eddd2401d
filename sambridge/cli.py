"""``sambridge`` / ``train.py``: one LightningCLI for training, plus the tool commands.

    python train.py fit --config configs/demo/grounding_tiny.yaml
    sambridge fit|validate|test|predict --config ...   (the same CLI)
    python train.py fit --config ... --ckpt_path auto  (resume from the furthest complete checkpoint)
    sambridge data coco|saco|mask-folder|instance-folders|synthetic|orchard|inspect ...
    sambridge pseudo-label --teacher checkpoints/sam3.pt --images DIR --vocabulary FILE --out DIR
    sambridge evaluate --gt GT.json --pred PRED.json
    sambridge export --checkpoint last.ckpt --out student.pt
    sambridge demo

A user error (a missing file, a bad checkpoint, shard or annotation) ends any of them with one line,
``error: ...``, and exit code 2; ``--debug`` (or ``SAMBRIDGE_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

# The sambridge and data imports inside functions below are lazy for start-up time, not for cycles:
# training code pulls in the models (sam2, sam3, open_clip: seconds), which the tool commands and
# `--help` do not need. Tool commands are imported by name when they run (TOOL_COMMANDS).

IMPORTED_AT = time.time()
"""When this module (and with it torch and Lightning) finished importing: the ``imports`` mark of
:class:`sambridge.callbacks.timeline.Timeline`."""

# tool commands: name -> (module, one-line help); each module has main(argv) -> int | None
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data_pipelines.cli", "convert, generate and inspect shards"),
    "pseudo-label": ("sambridge.pseudo_label", "label images or shards with a SAM3 teacher -> shards"),
    "evaluate": ("sambridge.evaluate", "SA-Co / COCO metrics on GT and prediction files"),
    "demo": ("sambridge.demo", "train the tiny Grounded SAM2 on synthetic shards and report"),
    "export": ("sambridge.export", "write a standalone student file from a training checkpoint"),
}


DEBUG_FLAG = "--debug"
"""Command-line flag (any command) that shows tracebacks of user errors instead of one line."""

USER_ERROR_EXIT = 2
"""Exit code of a command stopped by a user error (:func:`user_error`)."""

LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")
"""``ckpt_path`` values Lightning resolves itself."""


class SambridgeCLI(LightningCLI):
    """LightningCLI over sambridge's task and data module base classes (configs name subclasses).

    On top of Lightning's: checkpoints are written atomically (``AtomicCheckpointIO``, unless the
    trainer was given another writer); ``--ckpt_path auto`` resumes from the newest complete
    checkpoint of the run (under ``trainer.default_root_dir`` or a checkpoint callback's
    ``dirpath``), skipping truncated ones with a warning, and ``fit`` under SLURM does so by
    default; an explicit ``--ckpt_path`` is checked before Lightning unpickles it.
    """

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size",
                              apply_on="parse")

    def parse_arguments(self, parser, args) -> None:  # noqa: D102
        from sambridge.checkpointing import AUTO, check_checkpoint  # lazy: start-up time (see top)

        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        requested = self.config[subcommand].get("ckpt_path") if subcommand else None
        if requested is not None and str(requested) not in (AUTO, *LIGHTNING_CKPT_ALIASES) and \
                "://" not in str(requested):
            check_checkpoint(requested)  # before Lightning unpickles it for its hyper-parameters

    def instantiate_trainer(self, **kwargs) -> Trainer:  # noqa: D102
        from sambridge.callbacks.data_health import DataHealth  # lazy: start-up time (see top)
        from sambridge.checkpointing import use_atomic_checkpoint_io

        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer)
        if not any(isinstance(cb, DataHealth) for cb in trainer.callbacks):
            trainer.callbacks.append(DataHealth())
        return trainer

    def instantiate_classes(self) -> None:  # noqa: D102
        super().instantiate_classes()
        self._built_at = time.time()  # the Timeline's "built" mark

    def before_fit(self) -> None:  # noqa: D102
        self._resolve_ckpt_path()
        self._mark_timeline()

    def before_validate(self) -> None:  # noqa: D102
        self._resolve_ckpt_path()
        self._mark_timeline()

    def before_test(self) -> None:  # noqa: D102
        self._resolve_ckpt_path()
        self._mark_timeline()

    def before_predict(self) -> None:  # noqa: D102
        self._resolve_ckpt_path()
        self._mark_timeline()

    def _mark_timeline(self) -> None:
        """Give ``Timeline`` callbacks the start-up marks only the CLI sees: imports done, classes built."""
        from sambridge.callbacks.timeline import Timeline  # lazy: start-up time (see top)

        for callback in self.trainer.callbacks:
            if isinstance(callback, Timeline):
                callback.mark("imports_done", IMPORTED_AT)
                callback.mark("built", self._built_at)

    def _resolve_ckpt_path(self) -> None:
        from sambridge.checkpointing import AUTO, checkpoint_step, resolve_resume_checkpoint  # lazy: start-up

        config = self.config_init[self.subcommand]
        requested = config.get("ckpt_path")
        configured_root = config["trainer"].get("default_root_dir") is not None
        if requested is None and self.subcommand == "fit" and SLURMEnvironment.detect() and configured_root:
            requested = AUTO  # a requeued SLURM job continues its run
        if requested == AUTO:
            if not configured_root:
                raise ValueError(f"--ckpt_path {AUTO} resumes the run in --trainer.default_root_dir: set it")
            found = resolve_resume_checkpoint(run_directories(self.trainer))
            rank_zero_info(f"--ckpt_path {AUTO}: " + (
                f"resuming from {found} (step {checkpoint_step(found)}, the furthest complete one)" if found
                else "no checkpoint in the run directory, starting afresh"))
            config["ckpt_path"] = None if found is None else str(found)


def run_directories(trainer: Trainer) -> list[Path]:
    """Where a run's checkpoints live: its root directory and its checkpoint callbacks' directories."""
    roots = [trainer.default_root_dir]
    roots += [cb.dirpath for cb in trainer.checkpoint_callbacks
              if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    return list(dict.fromkeys(Path(r).resolve() for r in roots))


def lightning_cli(args: list[str] | None = None, run: bool = True) -> SambridgeCLI:
    """Build (and by default run) the training CLI; ``args`` as on the command line."""
    from lightning.pytorch import LightningDataModule

    from sambridge.modules import BaseTask  # lazy: start-up time (see top)

    return SambridgeCLI(
        BaseTask,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def _tool(name: str) -> Callable[[list[str]], int | None]:
    return importlib.import_module(TOOL_COMMANDS[name][0]).main


def user_error(error: BaseException) -> BaseException | None:
    """The user error behind ``error`` (itself or one it was raised from, e.g. through jsonargparse's
    wrapping of a failed instantiation): a missing file, an output that exists, or a bad checkpoint,
    shard, sample, annotation or vocabulary. ``None`` for anything else: a bug, which keeps its
    traceback."""
    # lazy: start-up time (see top); only needed once something failed
    from data_pipelines.convert.common import InputError
    from data_pipelines.datamodule import MissingSplitError
    from data_pipelines.pipeline import ShardReadError
    from data_pipelines.schema import SampleError
    from data_pipelines.verify import ShardVerificationError
    from data_pipelines.vocab import VocabularyError
    from sambridge.metrics.saco import RecordError
    from sambridge.models.checkpoint_io import CheckpointError

    kinds = (CheckpointError, SampleError, InputError, VocabularyError, RecordError, ShardReadError,
             ShardVerificationError, MissingSplitError, FileNotFoundError, FileExistsError)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of ``train.py``, ``python -m sambridge`` and the ``sambridge`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in argv or os.environ.get("SAMBRIDGE_DEBUG") == "1"
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        code = _run(argv, called=args is not None)
    except Exception as err:
        cause = None if debug else user_error(err)
        if cause is None:
            raise
        print(f"error: {cause} (run with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        code = USER_ERROR_EXIT
    if args is None:  # run as a program (train.py, python -m sambridge, the console script), not called
        exit_process(code)
    if code:
        raise SystemExit(code)


def _run(argv: list[str], called: bool) -> int:
    if argv and argv[0] in TOOL_COMMANDS:
        return _tool(argv[0])(argv[1:]) or 0
    if argv and argv[0] in ("-h", "--help"):
        tools = "\n".join(f"  {name:12s} {help_}" for name, (_, help_) in TOOL_COMMANDS.items())
        print(f"tool commands (sambridge COMMAND --help):\n{tools}\n\ntraining commands:")
    if not called:
        sys.argv[1:] = argv  # without --debug, which Lightning's parser does not know
    lightning_cli(argv if called else None)
    return 0


def exit_process(code: int = 0) -> NoReturn:
    """End the process once a training command has finished, without the interpreter's teardown.

    Everything that finishes work still runs: non-daemon threads are joined, then the exit handlers
    (wandb's run finish, multiprocessing's stop of DataLoader workers, logging's flush) and the standard
    streams are flushed. What is skipped is Python freeing every object of every imported module one by
    one, which with torch, Lightning, sam2 and sam3 loaded takes about 2 s on a CPU after the last
    handler (docs/benchmarks.md) and, with CUDA, NCCL and a large model, longer.
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
