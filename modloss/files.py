"""Checks of the files and folders ``modloss`` reads and writes, before any compute.

Each check raises :class:`PathError` (a ``ValueError``) whose message is one line: the
path, what is wrong with it and what to do. :func:`load_checkpoint` is ``torch.load`` of a
checkpoint that turns a truncated or corrupt file into such an error instead of a
``PytorchStreamReader`` traceback that names no file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["PathError", "check_readable_file", "check_writable_dir", "load_checkpoint"]


class PathError(ValueError):
    """A file or folder that cannot be used; the message names it and says what to do."""


def _existing_ancestor(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path("/")


def check_writable_dir(path: str | os.PathLike[str], *, what: str = "output folder") -> Path:
    """``path`` as a folder this process can create files in (it may not exist yet: then its
    nearest existing parent must be a writable folder). Leaves nothing behind."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise PathError(f"{what} {path} is a file, not a folder: pass a folder path")
    base = _existing_ancestor(path.absolute())
    if not base.is_dir():
        raise PathError(f"{what} {path}: {base} is a file, not a folder: pass another path")
    try:  # os.access says yes to root on a read-only mount; creating a file does not
        fd, probe = tempfile.mkstemp(prefix=".modloss-write-check-", dir=base)
    except OSError as err:
        where = "it" if base == path.absolute() else f"its parent {base}"
        raise PathError(
            f"{what} {path} is not writable ({where}: {err.strerror}): "
            "pass a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_readable_file(path: str | os.PathLike[str], *, what: str = "file") -> Path:
    """``path`` as an existing, readable, non-empty file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PathError(f"{what} {path} does not exist")
    if not path.is_file():
        raise PathError(f"{what} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise PathError(f"{what} {path} is not readable by this user: fix its permissions")
    if path.stat().st_size == 0:
        raise PathError(f"{what} {path} is empty: delete it (or restore it from a copy)")
    return path


def load_checkpoint(path: str | os.PathLike[str], *, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a file that is missing,
    unreadable, truncated or not a torch checkpoint raises :class:`PathError`."""
    path = check_readable_file(path, what=what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises RuntimeError, EOFError, UnpicklingError ... by damage
        raise PathError(
            f"{what} {path} is corrupt or truncated (not a readable torch checkpoint): "
            "delete it to start that run over, or restore it from a copy"
        ) from None
