"""The training commands: ``sambridge fit|validate|test|predict`` (``train.py``), one LightningCLI.

Imported by :mod:`sambridge.cli` only when a training command runs (or prints its help): Lightning and
the models take seconds to import, which the tool commands and ``sambridge --help`` do not need.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from data_pipelines.datamodule import ShardDataModule
from sambridge.callbacks.data_health import DataHealth
from sambridge.callbacks.timeline import Timeline
from sambridge.checkpointing import (
    AUTO,
    check_checkpoint,
    checkpoint_step,
    resolve_resume_checkpoint,
    use_atomic_checkpoint_io,
)
from sambridge.modules import BaseTask
from sambridge.parsers import RESUME_HELP, TRAINING_COMMANDS

IMPORTED_AT = time.time()
"""When this module (and with it torch, Lightning and sambridge's training code) finished importing: the
``imports`` mark of :class:`sambridge.callbacks.timeline.Timeline`."""

MID_EPOCH_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"
"""Lightning's warning on resuming mid-epoch; ``ShardDataModule`` resumes its stream there (its ``state_dict``),
so ``fit`` on one does not print it."""

LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")
"""``ckpt_path`` values Lightning resolves itself."""


class SambridgeCLI(LightningCLI):
    """LightningCLI over sambridge's task and data module base classes (configs name subclasses).

    On top of Lightning's: checkpoints are written atomically (``AtomicCheckpointIO``, unless the
    trainer was given another writer); ``--ckpt_path auto`` resumes from the newest complete
    checkpoint of the run (under ``trainer.default_root_dir`` or a checkpoint callback's
    ``dirpath``), skipping truncated ones with a warning, and ``fit`` under SLURM does so by
    default; an explicit ``--ckpt_path`` is checked before Lightning unpickles it. Given a checkpoint,
    Lightning rebuilds the task from the arguments it recorded, whatever the command says; the
    inference settings the command sets by flag (``--model.init_args.prediction[.FIELD]``) still apply.
    """

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size",
                              apply_on="parse")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        # Lightning's hook that adds the subcommand's own arguments (``ckpt_path``): say what ``auto`` does
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for action in parser._actions:
            if action.dest == "ckpt_path" and action.help:
                action.help = f"A checkpoint file, ``{AUTO}`` or one of Lightning's keywords. {RESUME_HELP} " \
                              f"Lightning: {action.help}"
        return parser

    def parse_arguments(self, parser, args) -> None:  # noqa: D102
        self._argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        self._loggers_follow_the_run_directory((self.config[subcommand] if subcommand else self.config).trainer)
        requested = self.config[subcommand].get("ckpt_path") if subcommand else None
        if requested is not None and str(requested) not in (AUTO, *LIGHTNING_CKPT_ALIASES) and \
                "://" not in str(requested):
            check_checkpoint(requested)  # before Lightning unpickles it for its hyper-parameters

    def _loggers_follow_the_run_directory(self, trainer) -> None:
        """``--trainer.default_root_dir`` alone moves a whole run (one run per directory): a logger's ``save_dir``
        follows it unless a flag sets the logger too (the checkpoints follow through ``RunCheckpoint``)."""
        if not flagged_fields(self._argv, ("--trainer.default_root_dir",)) or \
                flagged_fields(self._argv, ("--trainer.logger",)):
            return
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "save_dir" in init_args:
                init_args.save_dir = trainer.default_root_dir

    def _parse_ckpt_path(self) -> None:
        # Lightning's hook that replaces the model's arguments with the checkpoint's
        subcommand = self.config.get("subcommand")
        fields = flagged_fields(self._argv, PREDICTION_FLAGS)
        if not subcommand or not fields:
            return super()._parse_ckpt_path()
        asked = self.config[subcommand].model.init_args.prediction
        super()._parse_ckpt_path()
        model = self.config[subcommand].model.init_args
        if model.get("prediction") is None or ALL_FIELDS in fields:  # the command's whole setting
            model.prediction = asked
            return
        for name in fields:
            model.prediction[name] = asked[name]

    def instantiate_trainer(self, **kwargs) -> Trainer:  # noqa: D102
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
        if isinstance(self.datamodule, ShardDataModule):  # it resumes mid-epoch (docs/cluster.md)
            warnings.filterwarnings("ignore", message=MID_EPOCH_WARNING, category=PossibleUserWarning,
                                    module=r"lightning\.pytorch\.loops\.training_epoch_loop")

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
        for callback in self.trainer.callbacks:
            if isinstance(callback, Timeline):
                callback.mark("imports_done", IMPORTED_AT)
                callback.mark("built", self._built_at)

    def _resolve_ckpt_path(self) -> None:
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


PREDICTION_FLAGS = ("--model.init_args.prediction", "--model.prediction")
"""Flags of the task's inference settings, which a command may change on a trained checkpoint."""

ALL_FIELDS = "*"


def flagged_fields(argv: Sequence[str], prefixes: Sequence[str]) -> set[str]:
    """Fields of a dataclass argument set by flags: ``--PREFIX.FIELD[=V]`` gives FIELD, ``--PREFIX[=V]``
    ``ALL_FIELDS``."""
    fields = set()
    for arg in argv:
        name = str(arg).split("=", 1)[0]
        for prefix in prefixes:
            if name == prefix:
                fields.add(ALL_FIELDS)
            elif name.startswith(prefix + "."):
                fields.add(name[len(prefix) + 1:])
    return fields


def run_directories(trainer: Trainer) -> list[Path]:
    """Where a run's checkpoints live: its root directory and its checkpoint callbacks' directories."""
    roots = [trainer.default_root_dir]
    roots += [cb.dirpath for cb in trainer.checkpoint_callbacks
              if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    return list(dict.fromkeys(Path(r).resolve() for r in roots))


def lightning_cli(args: list[str] | None = None, run: bool = True, prog: str | None = None) -> SambridgeCLI:
    """Build (and by default run) the training CLI; ``args`` as on the command line, ``prog`` the program's
    name in usage lines (default: the script's file name)."""
    main_parser = {} if prog is None else {"prog": prog}
    return SambridgeCLI(
        BaseTask,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={**main_parser, **{name: {"description": f"{help_[0].upper()}{help_[1:]}. {RESUME_HELP}"}
                                         for name, help_ in TRAINING_COMMANDS.items()}},
        args=args,
        run=run,
    )
