"""Atomic file writes: the one way sambridge writes a file that readers or a resume may see.

The bytes go to a temporary file in the target's folder (same file system, so the rename is atomic),
are flushed to disk, and the temporary is renamed over the target; the folder entry is flushed too.
A reader therefore sees the old file or the new one, never half of one. The temporary is named
``.<name>.<host>.<pid>.tmp``: one left behind by a killed writer (its process is gone) is removed by
the next write of the same file on that host.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

Content = bytes | str | Callable[[BinaryIO], Any]
"""What to write: bytes, text (UTF-8), or a function that writes into the open binary file."""


def _temporary(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{pid}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of ``path`` that killed writers on this host left behind (their process
    is gone; a write in progress keeps its own). Returns what was removed."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.{socket.gethostname()}.") + r"(\d+)\.tmp")
    removed = []
    for candidate in path.parent.glob(f".{path.name}.*.tmp"):
        found = pattern.fullmatch(candidate.name)
        if found and not _pid_alive(int(found.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, content: Content) -> Path:
    """Write ``content`` to ``path`` atomically (see the module docstring); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(path):
        log.warning("removed %s, left by a write of %s that was killed", stale, path.name)
    temporary = _temporary(path, os.getpid())
    try:
        with open(temporary, "wb") as file:
            if callable(content):
                content(file)
            else:
                file.write(content.encode("utf-8") if isinstance(content, str) else content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """``json.dump`` of ``obj`` to ``path``, atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent))
