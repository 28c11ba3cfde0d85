"""Atomic file writes: write to a temporary file in the same folder, then rename.

A write that fails (a full disk, a read-only folder) leaves no temporary file behind and the
old file, if any, untouched; :func:`atomic_folder` does the same for a whole folder (built under a
temporary name, renamed into place when complete). A failed write raises
:class:`~conceptlens.concepts.errors.WriteError` naming the file and saying how to fix it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from conceptlens.concepts.errors import WriteError

__all__ = ["atomic_folder", "atomic_write_bytes", "atomic_write_text", "write_error"]

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def _current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


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
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    if hasattr(os, "fchmod"):
        os.fchmod(handle, 0o666 & ~_UMASK)  # the permissions of a plainly created file, not mkstemp's 0600
    return handle, name


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


@contextmanager
def atomic_folder(path: str | Path, parts: Sequence[str] = ()) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``path``; move it into place only when complete.

    The ``with`` body writes into the yielded temporary folder (``.<name>.<random>.partial``).
    When the body ends normally, a missing or empty ``path`` is replaced by it in one rename;
    a non-empty ``path`` has its entries named in ``parts`` removed, then receives the temporary
    folder's entries, those of ``parts`` last and in their order (so a reader that needs the last
    one never sees a half-replaced folder). When the body raises (an error, Ctrl-C), the temporary
    folder is deleted and ``path`` is left as it was.

    Parameters
    ----------
    path : str or Path
        The folder to create or update.
    parts : sequence of str
        The entries of ``path`` that the new folder replaces, in the order they are moved in.

    Yields
    ------
    Path
        The temporary folder to write into.

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "data"
    >>> with atomic_folder(out) as partial:
    ...     _ = (partial / "a.txt").write_text("a")
    >>> sorted(p.name for p in out.iterdir())
    ['a.txt']
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
        temporary.chmod(0o777 & ~_UMASK)  # a plainly created folder's permissions, not mkdtemp's 0700
    except OSError as error:
        raise write_error(path, error) from error
    try:
        yield temporary
        _move_into_place(temporary, path, parts)
    except OSError as error:
        raise write_error(Path(error.filename or path), error) from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _move_into_place(temporary: Path, path: Path, parts: Sequence[str]) -> None:
    """Rename ``temporary`` to ``path`` (missing or empty), or move its entries into ``path`` (``parts`` last)."""
    if not (path.is_dir() and (path.is_symlink() or any(path.iterdir()))):
        if path.is_dir():
            path.rmdir()
        os.replace(temporary, path)
        return
    for name in parts:
        old = path / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif os.path.lexists(old):
            old.unlink()
    order = sorted(temporary.iterdir(), key=lambda entry: (entry.name in parts, list(parts).index(entry.name) if entry.name in parts else 0, entry.name))
    for entry in order:
        os.replace(entry, path / entry.name)
