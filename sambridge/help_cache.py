"""The training commands' ``--help``, kept once rendered.

LightningCLI builds ``sambridge fit --help`` from the signatures of the Trainer, the modules and the
data modules, so it needs Lightning and the models imported: about 7 s. The text changes only with the
code, the installed packages or the terminal width, so the first ``COMMAND --help`` stores it under
``$SAMBRIDGE_CACHE_DIR/help`` (default ``$XDG_CACHE_HOME/sambridge``, ``~/.cache/sambridge``), keyed by a
hash of all three, and later ones print it from there without importing torch.
``SAMBRIDGE_NO_HELP_CACHE=1`` turns the cache off; a cache folder that cannot be written only costs
the speed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from data_pipelines.atomic import atomic_write

HELP_FLAGS = ("-h", "--help")
PACKAGES = ("lightning", "jsonargparse", "torch", "sam2", "sam3", "open_clip_torch", "timm", "webdataset")
"""Installed packages whose signatures and docstrings end up in the help text."""

SOURCES = ("sambridge", "data_pipelines")
"""Packages whose code the help text is built from (hashed by content)."""

DISABLE_VARIABLE = "SAMBRIDGE_NO_HELP_CACHE"


def cache_dir() -> Path:
    """Where rendered help texts are kept."""
    if os.environ.get("SAMBRIDGE_CACHE_DIR"):
        return Path(os.environ["SAMBRIDGE_CACHE_DIR"]) / "help"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sambridge" / "help"


def help_key(argv: Sequence[str], prog: str) -> str:
    """Hash of the command line, the terminal width, the installed packages and the code."""
    digest = hashlib.sha256(repr((list(argv), prog, shutil.get_terminal_size().columns)).encode())
    for package in PACKAGES:
        try:
            digest.update(f"{package}=={metadata.version(package)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{package} missing".encode())
    root = Path(__file__).resolve().parents[1]
    for source in SOURCES:
        for path in sorted((root / source).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def print_help(argv: Sequence[str], prog: str, render: Callable[[], object]) -> None:
    """Print the help of ``argv`` (``COMMAND --help``): from the cache, or by ``render()`` (which prints it
    and raises ``SystemExit(0)``, as LightningCLI does), storing what it printed."""
    path = cache_dir() / f"{help_key(argv, prog)}.txt"
    use_cache = os.environ.get(DISABLE_VARIABLE) != "1"
    if use_cache and path.is_file():
        print(path.read_text(encoding="utf-8"), end="")
        return
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            render()
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise
    print(text.getvalue(), end="")
    if use_cache:
        with contextlib.suppress(OSError):
            atomic_write(path, text.getvalue())


def is_plain_help(argv: Sequence[str], commands: Sequence[str]) -> bool:
    """``COMMAND --help`` with nothing else (a ``--config`` changes the defaults the help shows)."""
    return len(argv) == 2 and argv[0] in commands and argv[1] in HELP_FLAGS
