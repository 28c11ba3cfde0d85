"""Tensor artifacts on disk: ``<name>.safetensors`` + ``<name>.json``, never pickle.

The JSON holds the metadata, a ``kind``, a ``format_version`` and the sha256 of the tensor file;
reading checks all of them (and a size limit on the JSON) before any tensor is used. Both files
must be regular files (links, FIFOs and devices are refused unopened) and the tensor file's length
must be the one its safetensors header describes, checked before it is read. Both files are
written atomically. Concept banks and CAV sets are stored this way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from conceptlens.concepts.store.atomic import atomic_write_bytes, atomic_write_text
from conceptlens.concepts.store.files import read_regular, read_safetensors_bytes
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.store.schema import Label, Schema, check
from conceptlens.concepts.store.strict_json import JSONProblem, parse_json

__all__ = ["artifact_paths", "write_artifact", "read_artifact", "file_sha256", "read_json", "write_json"]

MAX_JSON_BYTES = 32 * 1024 * 1024


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_paths(path: str | Path) -> tuple[Path, Path]:
    """The (JSON, safetensors) paths of an artifact named ``path``, ``path.json`` or ``path.safetensors``.

    Dots already in the name stay (``A__features.7.net2vec`` → ``A__features.7.net2vec.json``).
    """
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return base.parent / f"{base.name}.json", base.parent / f"{base.name}.safetensors"


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically; non-finite floats become ``null``.

    Parameters
    ----------
    path : str or Path
        The file to write (its folder is created).
    data : Any
        JSON-able data; numpy scalars and arrays are converted, dict keys become strings.

    Returns
    -------
    Path
        ``path``.
    """
    atomic_write_text(Path(path), json.dumps(_finite(data), indent=1))
    return Path(path)


def _finite(value: Any) -> Any:
    """``value`` with NaN/inf floats as None and numpy values as Python ones (strict JSON)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    return value


def write_artifact(path: str | Path, kind: str, format_version: int, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors and metadata atomically; return the JSON path."""
    json_path, tensor_path = artifact_paths(path)
    data = save_tensors({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()})
    header = {"format_version": format_version, "kind": kind, **metadata, "tensors_sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(tensor_path, data)
    atomic_write_text(json_path, json.dumps(header, indent=1, default=_json_default))
    return json_path


def read_artifact(
    path: str | Path,
    kind: str,
    format_version: int,
    required: tuple[str, ...],
    error: type[ConceptLensError],
    accept_missing_kind: bool = False,
    schema: Schema | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an artifact; raise ``error`` naming the file and the fix on any problem.

    Returns ``(metadata, tensors)``. ``accept_missing_kind`` admits files written before kinds
    were recorded; ``schema`` is the shape of the metadata (checked once kind, format version and
    ``required`` keys are).
    """
    json_path, tensor_path = artifact_paths(path)
    metadata = read_json(json_path, error)
    found_kind = metadata.get("kind")
    if found_kind != kind and not (accept_missing_kind and found_kind is None):
        raise error(str(json_path), f"holds a {found_kind or 'unknown artifact'}, not a {kind}", "load it with the class that saved it")
    if metadata.get("format_version") != format_version:
        raise error(str(json_path), f"format version {metadata.get('format_version')} is not {format_version}", f"create the {kind} again")
    missing = [key for key in (*required, "tensors_sha256") if key not in metadata]
    if missing:
        raise error(str(json_path), f"missing keys {missing}", f"save the {kind} again")
    if schema is not None:
        check(metadata, schema, json_path, error, f"save the {kind} again")
    data = read_safetensors_bytes(tensor_path, error, f"save the {kind} again")
    if hashlib.sha256(data).hexdigest() != metadata["tensors_sha256"]:
        raise error(str(tensor_path), "checksum does not match its JSON (corrupt or replaced)", f"save the {kind} again")
    try:
        tensors = load_tensors(data)
    except Exception as problem:  # noqa: BLE001 - any parse failure means the file is not safetensors
        raise error(str(tensor_path), f"not a safetensors file ({problem})", f"save the {kind} again") from problem
    return metadata, tensors


def read_json(
    path: str | Path,
    error: type[ConceptLensError] = ConceptLensError,
    *,
    fix: str = "save it again",
    schema: Schema | None = None,
    max_bytes: int = MAX_JSON_BYTES,
    label: Label | None = None,
) -> Any:
    """Read a JSON file strictly and check its shape; every JSON file conceptlens reads comes through here.

    The file must be a regular file of at most ``max_bytes`` (a symbolic link, FIFO or device is
    refused unopened, :mod:`conceptlens.concepts.store.files`), UTF-8 text with no key given twice
    and nesting at most 64 levels deep (:mod:`conceptlens.concepts.store.strict_json`), and of the
    shape ``schema`` (:mod:`conceptlens.concepts.store.schema`); without a schema, a JSON object.

    Parameters
    ----------
    path : str or Path
        The JSON file.
    error : type of ConceptLensError
        Raised, naming the file (and the key path), when it cannot be read, is too large, is not
        valid JSON or does not have the expected shape.
    fix : str
        What the user should do when the file's content is bad (write it again, run a step again).
    schema : Schema, optional
        The expected shape (default: any JSON object).
    max_bytes : int
        The largest file read (checked before reading).
    label : callable, optional
        Renders key paths in errors (see :func:`conceptlens.concepts.store.schema.check`).

    Returns
    -------
    Any
        The parsed value (a dict without ``schema``).
    """
    path = Path(path)
    raw = read_regular(path, error, fix, max_bytes, f"file is implausibly large for conceptlens JSON (over {max_bytes} bytes)")
    try:
        data = parse_json(raw)
    except JSONProblem as problem:
        raise error(f"{path}: {problem.where}" if problem.where else str(path), problem.problem, fix) from None
    if schema is None and not isinstance(data, dict):
        raise error(str(path), "is not a JSON object", fix)
    return check(data, schema, path, error, fix, label) if schema is not None else data


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in artifact JSON")
