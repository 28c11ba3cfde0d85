"""A content-addressed on-disk store of layer activations.

Layout::

    <root>/<key>/shard-<start>-<end>-<sha256 prefix>.safetensors   one per batch of items
    <root>/<key>/manifest.json                                       written last: the entry is complete

The key is a hash of everything that determines the activations (model weights, layer,
preprocessing, reduction, dtype, dataset ids and image content). A shard's name carries its
checksum, and every shard is written atomically (temporary file, then rename), so an interrupted
run leaves only whole, verifiable shards behind and resumes from them. A shard whose bytes do not
match its checksum is deleted and recomputed, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from conceptlens.concepts.store.artifacts import file_sha256
from conceptlens.concepts.store.atomic import atomic_write_bytes, atomic_write_text
from conceptlens.concepts.errors import StoreError

__all__ = ["ActivationStore", "EntryReader", "StoreEntry", "Shard", "request_key", "FORMAT_VERSION"]

FORMAT_VERSION = 1
SHARD_PATTERN = re.compile(r"^shard-(\d{8})-(\d{8})-([0-9a-f]{16})\.safetensors\Z")  # \Z: no trailing newline
KEY_PATTERN = re.compile(r"^[0-9a-f]{32}\Z")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of shards verified in this process


def request_key(request: dict[str, Any]) -> str:
    """Hash a JSON-able request into a store key (32 hex digits)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Shard:
    """One shard file holding items ``start`` to ``end`` (exclusive)."""

    path: Path
    start: int
    end: int
    checksum: str

    @classmethod
    def from_path(cls, path: Path) -> Shard | None:
        match = SHARD_PATTERN.match(path.name)
        if not match:
            return None
        return cls(path, int(match.group(1)), int(match.group(2)), match.group(3))

    def verify(self) -> bool:
        """True when the file exists and its sha256 starts with the checksum in its name."""
        try:
            valid = file_sha256(self.path).startswith(self.checksum)
        except OSError:
            return False
        if valid:
            _VERIFIED.add(self._identity())
        return valid

    def _identity(self) -> tuple[str, int, int]:
        status = self.path.stat()
        return (str(self.path), status.st_size, status.st_mtime_ns)

    def _verified_before(self) -> bool:
        try:
            return self._identity() in _VERIFIED
        except OSError:
            return False

    def read(self, verify: bool = True) -> dict[str, torch.Tensor]:
        """Load the shard's tensors (memory-mapped); raise StoreError when it is corrupt.

        The checksum is verified on the first read in a process (and again if the file changes).
        """
        if verify and not self._verified_before() and not self.verify():
            problem = "shard is corrupt (checksum mismatch)" if self.path.is_file() else "shard is missing"
            raise StoreError(str(self.path), problem, "run the embedding again; it recomputes bad shards")
        try:
            with safe_open(str(self.path), framework="pt") as file:
                return {name: file.get_tensor(name) for name in file.keys()}
        except Exception as error:  # noqa: BLE001
            raise StoreError(str(self.path), f"cannot read shard ({error})", "run the embedding again; it recomputes bad shards") from error


class StoreEntry:
    """The activations of one (model, layer, preprocessing, reduction, dtype, dataset) request."""

    def __init__(self, root: Path, key: str) -> None:
        if not KEY_PATTERN.match(key):
            raise StoreError(f"store key {key!r}", "not a store key", "keys are 32 lowercase hex digits")
        self.key = key
        self.path = Path(root) / key

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def is_complete(self) -> bool:
        """True when the manifest exists (all shards were written)."""
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        """Read and check the manifest."""
        try:
            if self.manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
                raise StoreError(str(self.manifest_path), "manifest is implausibly large", "delete the entry folder and embed again")
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise StoreError(str(self.manifest_path), f"cannot read manifest ({error})", "delete the entry folder and embed again") from error
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                str(self.manifest_path),
                f"format version {manifest.get('format_version')} is not {FORMAT_VERSION}",
                "delete the entry folder and embed again",
            )
        for item in manifest.get("shards", []):
            if not isinstance(item, str) or not SHARD_PATTERN.match(item):
                raise StoreError(str(self.manifest_path), f"invalid shard name {item!r}", "delete the entry folder and embed again")
        return manifest

    def shards(self) -> list[Shard]:
        """Every shard file present, sorted by start (not verified)."""
        if not self.path.is_dir():
            return []
        found = (Shard.from_path(p) for p in self.path.iterdir())
        return sorted((s for s in found if s is not None), key=lambda s: (s.start, s.end))

    def valid_shards(self) -> list[Shard]:
        """Verify every shard; delete corrupt ones, and the manifest when it no longer holds.

        A manifest no longer holds when it cannot be read or checked, or when a shard it lists is
        missing or corrupt: the entry is then incomplete and the next embedding recomputes it.
        """
        valid = []
        for shard in self.shards():
            if shard.verify():
                valid.append(shard)
            else:
                shard.path.unlink(missing_ok=True)
                self.manifest_path.unlink(missing_ok=True)
        if self.is_complete and not self._manifest_holds(valid):
            self.manifest_path.unlink(missing_ok=True)
        return valid

    def _manifest_holds(self, valid: list[Shard]) -> bool:
        """True when the manifest reads, and its shards are among ``valid`` and tile its items."""
        try:
            manifest = self.manifest()
        except StoreError:
            return False
        n_items, names = manifest.get("n_items"), manifest.get("shards")
        if not isinstance(n_items, int) or not isinstance(names, list):
            return False
        present = {shard.path.name: shard for shard in valid}
        if not all(name in present for name in names):
            return False
        listed = [present[name] for name in names]
        return self.covering_shards(n_items, listed) == listed

    def write_shard(self, start: int, end: int, tensors: dict[str, torch.Tensor]) -> Shard:
        """Write items ``start:end`` atomically; the file name carries the checksum."""
        data = save({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
        checksum = hashlib.sha256(data).hexdigest()[:16]
        path = self.path / f"shard-{start:08d}-{end:08d}-{checksum}.safetensors"
        try:
            atomic_write_bytes(path, data)
        except OSError as error:
            raise StoreError(str(self.path), f"cannot write shard ({error.strerror or error})", "free disk space or choose a writable --store") from error
        return Shard(path, start, end, checksum)

    def finalize(self, metadata: dict[str, Any], n_items: int) -> None:
        """Write the manifest once shards tile items 0..n_items exactly."""
        shards = self.covering_shards(n_items)
        if shards is None:
            raise StoreError(str(self.path), "shards do not cover every item", "run the embedding again")
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": self.key,
            **metadata,
            "n_items": n_items,
            "shards": [s.path.name for s in shards],
        }
        try:
            atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1))
        except OSError as error:
            raise StoreError(str(self.path), f"cannot write manifest ({error.strerror or error})", "free disk space or choose a writable --store") from error

    def covering_shards(self, n_items: int, shards: list[Shard] | None = None) -> list[Shard] | None:
        """Pick shards that tile 0..n_items without gaps or overlaps, or None.

        Shards of different sizes may lie side by side (two runs with different batch sizes wrote
        the same entry at once): any tiling is found, preferring the shortest shard at each start.
        """
        candidates = sorted(shards if shards is not None else self.shards(), key=lambda s: (s.start, s.end))
        tiling_from: dict[int, Shard | None] = {n_items: None}  # start → first shard of a tiling up to n_items
        for shard in reversed(candidates):  # later starts first, so every shard's end is settled
            if 0 <= shard.start < shard.end <= n_items and shard.end in tiling_from:
                tiling_from[shard.start] = shard  # the reversed order leaves the shortest one
        if 0 not in tiling_from:
            return None
        chosen, position = [], 0
        while position < n_items:
            shard = tiling_from[position]
            chosen.append(shard)
            position = shard.end
        return chosen

    def iter_shards(self, verify: bool = True) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """Yield ``(start, end, tensors)`` for each shard of a complete entry, in item order."""
        manifest = self.manifest()
        for name in manifest["shards"]:
            shard = Shard.from_path(self.path / name)
            yield shard.start, shard.end, shard.read(verify=verify)

    def read_all(self, name: str = "activations") -> torch.Tensor:
        """Concatenate one tensor over all shards (for small entries only)."""
        parts = [tensors[name] for _, _, tensors in self.iter_shards()]
        if len({tuple(p.shape[1:]) for p in parts}) > 1:
            raise StoreError(
                str(self.path),
                "shards hold feature maps of different sizes (a detector pads each batch differently)",
                "iterate with iter_shards(), or embed with reduce='grid' for one size",
            )
        return torch.cat(parts)

    def delete(self) -> None:
        """Remove the entry from disk."""
        shutil.rmtree(self.path, ignore_errors=True)


class EntryReader:
    """Random access to the rows of a complete store entry, keeping the last few shards read."""

    def __init__(self, entry: StoreEntry, cached_shards: int = 4) -> None:
        self.entry = entry
        manifest = entry.manifest()
        self.names = manifest["shards"]
        shards = [Shard.from_path(entry.path / name) for name in self.names]
        self.bounds = [(shard.start, shard.end) for shard in shards]
        self.starts = np.array([start for start, _ in self.bounds])
        self.cached_shards = cached_shards
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def shard_of(self, index: int) -> int:
        return int(np.searchsorted(self.starts, index, side="right") - 1)

    def _shard(self, number: int) -> dict[str, torch.Tensor]:
        if number not in self._cache:
            if len(self._cache) >= self.cached_shards:
                self._cache.pop(next(iter(self._cache)))
            self._cache[number] = Shard.from_path(self.entry.path / self.names[number]).read()
        return self._cache[number]

    def rows(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Return every tensor of the entry at ``indices`` (in that order), reading each shard once."""
        indices = np.asarray(indices, dtype=np.int64)
        numbers = np.searchsorted(self.starts, indices, side="right") - 1
        out: dict[str, torch.Tensor] = {}
        for number in np.unique(numbers):
            positions = np.nonzero(numbers == number)[0]
            local = torch.from_numpy(indices[positions] - self.bounds[number][0])
            for name, tensor in self._shard(int(number)).items():
                if name not in out:
                    out[name] = tensor.new_empty((len(indices), *tensor.shape[1:]))
                elif out[name].shape[1:] != tensor.shape[1:]:
                    raise StoreError(str(self.entry.path), "rows come from shards with different map sizes", "read one shard at a time")
                out[name][torch.from_numpy(positions)] = tensor[local]
        return out


class ActivationStore:
    """A folder of :class:`StoreEntry` objects addressed by request hash.

    Parameters
    ----------
    root : path
        Store folder; created on first write.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(str(self.root), "exists and is not a folder", "choose another --store path")

    def entry(self, request: dict[str, Any]) -> StoreEntry:
        """The entry for a request (it may not exist yet)."""
        return StoreEntry(self.root, request_key(request))

    def entries(self) -> list[StoreEntry]:
        """Every complete entry."""
        if not self.root.is_dir():
            return []
        found = [StoreEntry(self.root, p.name) for p in sorted(self.root.iterdir()) if KEY_PATTERN.match(p.name)]
        return [entry for entry in found if entry.is_complete]
