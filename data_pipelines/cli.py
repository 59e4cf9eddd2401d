"""``sambridge data COMMAND ...`` (or ``python -m data_pipelines``): converters, synthetic data, inspection.

Each command is a module with ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their command runs, so one command's heavy or broken imports never affect another.
:func:`run_command` runs such a module as a program of its own (``sambridge pseudo-label``, which
runs a model and so lives in ``sambridge``, not here: docs/architecture.md).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Sequence
from types import ModuleType

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "coco": ("data_pipelines.convert.coco", "COCO or LVIS instance annotations + images -> shards"),
    "saco": ("data_pipelines.convert.saco", "SAM3 SA-Co image-phrase annotations + images -> shards"),
    "mask-folder": ("data_pipelines.convert.mask_folder",
                    "images + semantic or instance-id PNG masks -> shards"),
    "instance-folders": ("data_pipelines.convert.instance_folders",
                         "images + a folder of binary masks per image (one file per instance) -> shards"),
    "synthetic": ("data_pipelines.synthetic", "generate synthetic shards"),
    "synthetic-video": ("data_pipelines.synthetic_video",
                        "generate moving-shapes clips: clip shards, frame folders, YouTube-VIS ground truth"),
    "ytvis": ("data_pipelines.convert.ytvis", "YouTube-VIS-style video annotations + frame folders -> clip shards"),
    "mots": ("data_pipelines.convert.mots", "MOTS-style sequences (instance PNGs or txt RLE) -> clip shards"),
    "orchard": ("data_pipelines.orchard", "generate orchard-like field images (unlabelled folder or labelled shards)"),
    "inspect": ("data_pipelines.inspect",
                "validate shards against their manifest, print statistics, draw a grid"),
}


MOVED: dict[str, str] = {"pseudo-label": "sambridge.pseudo_label"}
"""Commands that moved to ``sambridge NAME``: name -> the module that runs them now (its ``main(argv)``).
``sambridge data NAME`` still forwards to it, with a deprecation line. The module is named by string and
imported only then, so this package imports no ``sambridge`` code (the layers contract in pyproject.toml)."""


PROG = "sambridge data"
"""How the commands are named in usage lines and recorded command lines (``python -m data_pipelines``
names itself)."""


def load_command(name: str) -> ModuleType:
    """Import the module of command ``name`` and check that it has ``add_arguments`` and ``run``."""
    if name not in COMMANDS:
        raise KeyError(f"unknown command {name!r}; known: {', '.join(COMMANDS)}")
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            raise ModuleNotFoundError(f"command {name!r} needs module {module_name}, which is not installed "
                                      "in this checkout") from err
        raise
    missing = [f for f in ("add_arguments", "run") if not callable(getattr(module, f, None))]
    if missing:
        raise TypeError(f"command module {module_name} lacks {' and '.join(missing)}")
    return module


def build_parser(command: str | None = None, prog: str = PROG) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s own options are added (its module is imported)."""
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Build, generate and check sambridge WebDataset shards.")
    parser.set_defaults(command_line=None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        if name != command:
            commands.add_parser(name, help=help_text, description=help_text)
            continue
        module = load_command(name)  # its docstring explains the command in full
        sub = commands.add_parser(name, help=help_text, description=module.__doc__ or help_text,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
    for name in MOVED:
        commands.add_parser(name, help=f"deprecated: moved to `sambridge {name}` (forwarded there)")
    return parser


def run_command(module: ModuleType, argv: Sequence[str] | None = None, prog: str | None = None,
                parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command module as a program of its own named ``prog``: its ``run(args)`` with the arguments
    ``parser`` parses (by default one from the module's docstring and ``add_arguments``); returns its exit
    code, 2 for bad input, as :func:`main` does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if parser is None:
        parser = argparse.ArgumentParser(prog=prog, description=module.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = shlex.join([*shlex.split(parser.prog), *argv])
    return _run(module, args)


def _run(module: ModuleType, args: argparse.Namespace) -> int:
    # lazy: `--help` and a usage error answer without these modules' imports (numpy, PIL, webdataset -> torch)
    from data_pipelines.convert.common import InputError
    from data_pipelines.schema import SampleError
    from data_pipelines.writer import ResumeMismatchError

    try:
        return int(module.run(args))
    except (InputError, SampleError, ResumeMismatchError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Run one command; returns its exit code (2 for bad input, with a message naming the file).

    ``prog`` is how the user called it (``sambridge data`` or ``python -m data_pipelines``): usage
    lines and the command line a manifest records say the same.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MOVED:
        print(f"warning: `{prog} {argv[0]}` is deprecated, use `sambridge {argv[0]}` (running it now)",
              file=sys.stderr)
        return int(importlib.import_module(MOVED[argv[0]]).main(argv[1:]))
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command, prog).parse_args(argv)
    args.command_line = shlex.join([*shlex.split(prog), *argv])
    return _run(load_command(args.command), args)
