"""Flushing a file or a folder to stable storage by its path, for the providers that keep files."""

from __future__ import annotations

import os

READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def fsync_path(path: str, flags: int = READ_FLAGS, *, data_only: bool = False) -> None:
    """``fsync`` (``fdatasync`` with ``data_only``) the file or folder at ``path`` (a folder: open
    it with :data:`DIR_FLAGS`, to make the names in it durable)."""
    fd = os.open(path, flags)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)
