"""``sambridge`` / ``train.py`` / ``python -m sambridge``: the training commands and the tool commands.

    python train.py fit --config configs/demo/grounding_tiny.yaml
    sambridge fit|validate|test|predict --config ...   (the same CLI)
    python train.py fit --config ... --ckpt_path auto  (resume from the furthest complete checkpoint)
    sambridge data coco|saco|mask-folder|instance-folders|synthetic|orchard|inspect ...
    sambridge pseudo-label --teacher checkpoints/sam3.pt --images DIR --vocabulary FILE --out DIR
    sambridge evaluate --gt GT.json --pred PRED.json
    sambridge evaluate-video --gt ground_truth.json --pred masklets.json
    sambridge export --checkpoint last.ckpt --out student.pt
    sambridge export --format onnx --checkpoint student.pt --text "ripe apple" --out student.onnx
    sambridge segment --checkpoint student.pt --input DIR --text "ripe apple" --out DIR
    sambridge track --checkpoint student.pt --input VIDEO --text "ripe apple" --out DIR
    sambridge demo
    sambridge demo-video

A user error (a missing file, a bad checkpoint, shard or annotation) ends any of them with one line,
``error: ...``, and exit code 2; ``--debug`` (or ``SAMBRIDGE_DEBUG=1``) shows the traceback instead.

This module imports nothing heavy: ``sambridge --help`` and a tool command's ``--help`` (parsed with
:mod:`sambridge.parsers` before the command's module is imported) answer without torch. The training
commands live in :mod:`sambridge.training_cli` (Lightning and the models), imported when one runs;
``SambridgeCLI``, ``lightning_cli`` and ``run_directories`` are importable from here as well.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from sambridge.help_cache import is_plain_help, print_help
from sambridge.parsers import PARSERS, RESUME_HELP, TRAINING_COMMANDS

if TYPE_CHECKING:
    from sambridge.training_cli import SambridgeCLI, lightning_cli, run_directories

__all__ = ["SambridgeCLI", "lightning_cli", "main", "run_directories", "user_error"]

# tool commands: name -> (module, one-line help); each module has main(argv) -> int | None
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data_pipelines.cli", "convert, generate and inspect shards"),
    "pseudo-label": ("sambridge.pseudo_label", "label images or shards with a SAM3 teacher -> shards"),
    "evaluate": ("sambridge.evaluate", "SA-Co / COCO metrics on GT and prediction files"),
    "demo": ("sambridge.demo", "train the tiny Grounded SAM2 on synthetic shards and report"),
    "demo-video": ("sambridge.demo_video", "track and count the demo's concepts in generated clips (after demo)"),
    "export": ("sambridge.export", "write a standalone student file, or an ONNX graph for a fixed vocabulary"),
    "segment": ("sambridge.segment", "segment an image, a folder or shards from noun phrases -> COCO results"),
    "track": ("sambridge.track", "track noun phrases through a video or frame folder -> masklets, counts"),
    "evaluate-video": ("sambridge.evaluate_video", "HOTA, video cgF1, ID switches and counting error of masklets"),
}

DEBUG_FLAG = "--debug"
"""Command-line flag (any command) that shows tracebacks of user errors instead of one line."""

USER_ERROR_EXIT = 2
"""Exit code of a command stopped by a user error (:func:`user_error`)."""

LIGHTNING_TIP = "💡 Tip:"
"""How Lightning's adverts start (``litlogger``, ``litmodels``): dropped by :func:`quiet_known_noise`."""

_TRAINING_NAMES = ("SambridgeCLI", "lightning_cli", "run_directories", "IMPORTED_AT", "LIGHTNING_CKPT_ALIASES")


def __getattr__(name: str) -> Any:
    # the training CLI, imported on first use: Lightning and the models take seconds (see the module docstring)
    if name in _TRAINING_NAMES:
        from sambridge import training_cli

        return getattr(training_cli, name)
    raise AttributeError(f"module 'sambridge.cli' has no attribute {name!r}")


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(LIGHTNING_TIP)


def quiet_known_noise() -> None:
    """Drop what every command would print that a sambridge user cannot act on.

    Called once at CLI start-up, so it applies to the commands only, not to sambridge used as a library
    (sam2's and sam3's import-time warnings are dropped for both, in ``sambridge/__init__.py``). Narrow:
    Lightning's adverts (``💡 Tip: ... litlogger / litmodels``, info log records of its ``rank_zero``
    loggers) and the FutureWarning Lightning's own ``_pytree`` helper triggers in torch
    (``isinstance(treespec, LeafSpec)``). Other warnings still show; ``sambridge fit`` on a ``ShardDataModule``
    also drops Lightning's mid-epoch resume warning, which does not apply to it (``training_cli.MID_EPOCH_WARNING``).
    """
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_a_tip)  # the loggers Lightning's rank_zero_info logs to


def top_parser(prog: str = "sambridge") -> argparse.ArgumentParser:
    """``sambridge --help``: the commands, each with its own ``--help``."""
    training = "\n".join(f"  {name:16s}{help_}" for name, help_ in TRAINING_COMMANDS.items())
    tools = "\n".join(f"  {name:16s}{help_}" for name, (_, help_) in TOOL_COMMANDS.items())
    resume = textwrap.fill(RESUME_HELP, width=100, initial_indent="  ", subsequent_indent="  ")
    parser = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [-h] COMMAND [ARGS ...] [--debug]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Teach SAM2 noun phrases and distil SAM3 into a student. `{prog} COMMAND --help` shows a "
                    f"command's options.\n\ntraining commands (LightningCLI):\n{training}\n{resume}\n\n"
                    f"tool commands:\n{tools}")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="any command: show the traceback of a user error instead of one line "
                             "(or SAMBRIDGE_DEBUG=1)")
    return parser


def _prog() -> str:
    name = os.path.basename(sys.argv[0])
    return "python -m sambridge" if name == "__main__.py" else name


def _tool(name: str) -> Callable[[list[str]], int | None]:
    """What runs tool command ``name``: its parser here answers ``--help`` and usage errors, then its module's
    ``main(argv)`` (imported only then) parses again and runs."""
    def run(argv: list[str]) -> int | None:
        if name in PARSERS:
            PARSERS[name]().parse_args(argv)
        return importlib.import_module(TOOL_COMMANDS[name][0]).main(argv)

    return run


def user_error(error: BaseException) -> BaseException | None:
    """The user error behind ``error`` (itself or one it was raised from, e.g. through jsonargparse's
    wrapping of a failed instantiation): a missing file, an output that exists, or a bad checkpoint,
    shard, sample, annotation or vocabulary. ``None`` for anything else: a bug, which keeps its
    traceback."""
    # lazy: start-up time (see the module docstring); only needed once something failed
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
    quiet_known_noise()
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
    if not argv or argv[0] in ("-h", "--help"):
        parser = top_parser("sambridge" if called else _prog())
        if not argv:
            parser.error("give a command")
        parser.parse_args(argv)
        return 0
    if not called:
        sys.argv[1:] = argv  # without --debug, which Lightning's parser does not know
    prog = "sambridge" if called else _prog()

    def run() -> None:
        from sambridge.training_cli import lightning_cli  # lazy: start-up time (see the module docstring)

        lightning_cli(argv, prog=prog) if called else lightning_cli(prog=prog)

    if is_plain_help(argv, tuple(TRAINING_COMMANDS)):
        print_help(argv, prog, run)  # from the cache when it was rendered before (sambridge.help_cache)
        raise SystemExit(0)
    run()
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
