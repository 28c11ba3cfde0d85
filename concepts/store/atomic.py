"""Atomic file writes: write to a temporary file in the same folder, then rename.

A write that fails (a full disk, a read-only folder) leaves no temporary file behind and the
old file, if any, untouched; it raises :class:`~conceptlens.concepts.errors.WriteError` naming the file and
saying how to fix it.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from conceptlens.concepts.errors import WriteError

__all__ = ["atomic_write_bytes", "atomic_write_text", "write_error"]

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def write_error(path: Path, error: OSError) -> WriteError:
    """The one-line error for an OSError raised while writing ``path``."""
    path = Path(path)
    reason = error.strerror or str(error)
    if error.errno in _NO_SPACE:
        return WriteError(str(path), f"cannot write: {reason} (nothing was half-written)", f"free space on the disk holding {path.parent} (or write elsewhere), then run again")
    if error.errno in _NOT_WRITABLE:
        folder = _existing_folder(path.parent)
        return WriteError(str(path), f"cannot write: {reason} (in {folder})", f"make {folder} writable, or choose a writable output folder (--out/--store)")
    return WriteError(str(path), f"cannot write: {reason}", "check that the folder exists, is writable and has free space")


def _existing_folder(folder: Path) -> Path:
    """The nearest folder at or above ``folder`` that exists: the one that refused the write."""
    for candidate in (folder, *folder.parents):
        if candidate.is_dir():
            return candidate
    return folder


def _temporary_file(path: Path) -> tuple[int, str]:
    """Create the parent folders and a temporary file next to ``path``; return (handle, name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def _write_and_sync(file: BinaryIO, data: bytes) -> None:
    file.write(data)
    file.flush()
    os.fsync(file.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    Raises
    ------
    WriteError
        When the disk is full, the folder read-only, or the write fails otherwise; no
        temporary file is left behind.
    """
    path = Path(path)
    try:
        handle, temporary = _temporary_file(path)
    except OSError as error:
        raise write_error(path, error) from error
    try:
        with os.fdopen(handle, "wb") as file:
            _write_and_sync(file, data)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise write_error(path, error) from error
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
