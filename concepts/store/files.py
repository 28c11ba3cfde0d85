"""Opening files that may come from elsewhere: regular files only, never through a link, sizes first.

Every reader of a store entry or an artifact (bank, CAV set, manifest, result JSON) goes through
this module. A path is checked with :func:`os.lstat` before it is opened, so a symbolic link is
refused instead of followed (no read outside the folder it lies in) and a FIFO or a device is
refused instead of opened (no hang, no endless read). Files are opened with ``O_NOFOLLOW`` and
``O_NONBLOCK`` and checked again on the open handle, so a file swapped for a link or a FIFO in
between is refused too. Sizes are known before anything is read: a JSON file over its limit, or a
safetensors file whose length differs from the one its header describes, is refused unread.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path
from typing import BinaryIO

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.store.schema import Int, ListOf, MapOf, Record, Str, find_problem
from conceptlens.concepts.store.strict_json import JSONProblem, parse_json, render_path

__all__ = ["special_kind", "open_regular", "read_regular", "regular_sha256", "read_safetensors_bytes", "safetensors_extent", "safetensors_problem"]

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
# A safetensors header: per tensor its dtype, shape and [start, end) byte offsets; "__metadata__" maps strings to strings.
_TENSOR = Record({"dtype": Str(), "shape": ListOf(Int(min=0)), "data_offsets": ListOf(Int(min=0), min_len=2, max_len=2)})
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def special_kind(mode: int) -> str | None:
    """What a file mode is when it is not a regular file (``"a symbolic link"``, ``"a FIFO"`` …), else None.

    Examples
    --------
    >>> special_kind(stat.S_IFREG | 0o644) is None
    True
    >>> special_kind(stat.S_IFIFO | 0o644)
    'a FIFO (named pipe)'
    """
    kinds = (
        (stat.S_ISREG, None), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
    )
    return next((kind for test, kind in kinds if test(mode)), "a special file")


def open_regular(path: str | Path, error: type[ConceptLensError], fix: str) -> BinaryIO:
    """Open a regular file for reading, refusing links, FIFOs, devices and folders.

    Parameters
    ----------
    path : str or Path
        The file; its last component must not be a symbolic link.
    error : type of ConceptLensError
        Raised, naming ``path``, when it is missing, unreadable or not a regular file.
    fix : str
        The fix named in the error when the path is not a regular file.

    Returns
    -------
    BinaryIO
        The open file (blocking reads), positioned at its start.
    """
    path = Path(path)
    try:
        kind = special_kind(os.lstat(path).st_mode)
        if kind is not None:
            raise error(str(path), f"is {kind}, not a regular file (never followed or opened)", fix)
        handle = os.open(path, _OPEN_FLAGS)
    except OSError as problem:
        raise error(str(path), f"cannot read ({problem.strerror or problem})", "check the path") from problem
    kind = special_kind(os.fstat(handle).st_mode)
    if kind is not None:  # swapped after the check
        os.close(handle)
        raise error(str(path), f"is {kind}, not a regular file (never followed or opened)", fix)
    if hasattr(os, "set_blocking"):
        os.set_blocking(handle, True)
    return os.fdopen(handle, "rb")


def read_regular(path: str | Path, error: type[ConceptLensError], fix: str, max_bytes: int, too_large: str) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (checked before reading).

    ``too_large`` is the problem named when the file is larger (``"manifest is implausibly large"``).
    """
    with open_regular(path, error, fix) as file:
        if os.fstat(file.fileno()).st_size > max_bytes:
            raise error(str(path), too_large, fix)
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise error(str(path), too_large, fix)
    return data


def regular_sha256(path: str | Path, error: type[ConceptLensError], fix: str) -> str:
    """sha256 hex digest of a regular file (links and special files refused), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open_regular(path, error, fix) as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_extent(file: BinaryIO) -> int:
    """The length in bytes that a safetensors file's header describes (header included).

    Reads only the 8-byte length and the JSON header from the start of ``file``; raises
    :class:`ValueError` when they are not a plausible safetensors header.

    Examples
    --------
    >>> import io, torch
    >>> from safetensors.torch import save
    >>> data = save({"a": torch.zeros(3)})
    >>> safetensors_extent(io.BytesIO(data)) == len(data)
    True
    """
    start = file.read(8)
    if len(start) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", start)
    if length > MAX_SAFETENSORS_HEADER:
        raise ValueError(f"header length {length} is over the {MAX_SAFETENSORS_HEADER}-byte limit")
    raw = file.read(length)
    if len(raw) < length:
        raise ValueError("header is cut short")
    try:
        header = parse_json(raw)
    except JSONProblem as problem:
        raise ValueError(f"unreadable header ({problem})") from None
    tensors = {name: info for name, info in header.items() if name != "__metadata__"} if isinstance(header, dict) else header
    found = find_problem(tensors, MapOf(_TENSOR)) or find_problem(header.get("__metadata__", {}), MapOf(Str()))
    if found is not None:
        where, problem = found
        raise ValueError(f"unreadable header ({render_path(where) or 'header'}: {problem})")
    return 8 + length + max((info["data_offsets"][1] for info in tensors.values()), default=0)


def _too_long(size: int, extent: int) -> str:
    return f"is {size} bytes, longer than the {extent} its safetensors header describes (padded or replaced)"


def safetensors_problem(path: str | Path, error: type[ConceptLensError], fix: str, require_header: bool = True) -> str | None:
    """Why a regular file is not a whole safetensors file (its header, its length), or None; reads only the header.

    Raises ``error`` naming the file when it is missing, unreadable, a link or a special file.
    With ``require_header=False`` a file without a plausible header passes (its checksum, checked
    next by the caller, names the problem), and so does a file shorter than its header describes
    (cut short: reading it is bounded by its own size, and its checksum fails); a file longer than
    its header describes never passes.
    """
    with open_regular(path, error, fix) as file:
        size = os.fstat(file.fileno()).st_size
        try:
            extent = safetensors_extent(file)
        except ValueError as problem:
            return f"not a safetensors file: {problem}" if require_header else None
    if size > extent:
        return _too_long(size, extent)
    return None


def read_safetensors_bytes(path: str | Path, error: type[ConceptLensError], fix: str, max_headerless: int = 64 * 1024 * 1024) -> bytes:
    """The bytes of a regular safetensors file whose length is the one its header describes.

    Raises ``error`` naming the file, before reading past its header, when it is a link or special
    file, or when it is longer than its plausible header describes (padded or replaced); a file cut
    short is returned for the caller's checksum to refuse.
    A file without a plausible header is returned unparsed when it is at most ``max_headerless``
    bytes (the caller's checksum then names the problem) and refused unread (``not a safetensors
    file``) when it is larger.
    """
    with open_regular(path, error, fix) as file:
        size = os.fstat(file.fileno()).st_size
        try:
            extent = safetensors_extent(file)
        except ValueError as problem:
            if size > max_headerless:
                raise error(str(path), f"not a safetensors file ({problem})", fix) from problem
            extent = size
        if size > extent:
            raise error(str(path), _too_long(size, extent), fix)
        file.seek(0)
        data = file.read(size + 1)
    if len(data) != size:
        raise error(str(path), "changed while being read", fix)
    return data
