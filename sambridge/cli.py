"""``sambridge`` / ``train.py``: one LightningCLI for training, plus the tool commands.

    python train.py fit --config configs/demo/grounding_tiny.yaml
    sambridge fit|validate|test|predict --config ...   (the same CLI)
    sambridge data coco|saco|mask-folder|synthetic|inspect ...
    sambridge evaluate --gt GT.json --pred PRED.json
    sambridge demo
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from lightning.pytorch.cli import LightningCLI

# tool commands: name -> (module, one-line help); each module has main(argv) -> int | None
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data_pipelines.cli", "convert, generate and inspect shards"),
    "evaluate": ("sambridge.evaluate", "SA-Co / COCO metrics on GT and prediction files"),
    "demo": ("sambridge.demo", "train the tiny Grounded SAM2 on synthetic shards and report"),
}


class SambridgeCLI(LightningCLI):
    """LightningCLI over sambridge's task and data module base classes (configs name subclasses)."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size",
                              apply_on="parse")


def lightning_cli(args: list[str] | None = None, run: bool = True) -> SambridgeCLI:
    """Build (and by default run) the training CLI; ``args`` as on the command line."""
    from lightning.pytorch import LightningDataModule

    from sambridge.modules import BaseTask

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


def main(args: list[str] | None = None) -> None:
    """Entry point of ``train.py``, ``python -m sambridge`` and the ``sambridge`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOL_COMMANDS:
        code = _tool(argv[0])(argv[1:])
        if code:
            raise SystemExit(code)
        return
    if argv and argv[0] in ("-h", "--help"):
        tools = "\n".join(f"  {name:10s} {help_}" for name, (_, help_) in TOOL_COMMANDS.items())
        print(f"tool commands (sambridge COMMAND --help):\n{tools}\n\ntraining commands:")
    lightning_cli(argv)
