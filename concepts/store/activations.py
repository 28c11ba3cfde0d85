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
import math
import os
import re
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from conceptlens.concepts.store.atomic import atomic_write_bytes, atomic_write_text
from conceptlens.concepts.store.artifacts import read_json
from conceptlens.concepts.store.files import regular_sha256, safetensors_problem, special_kind
from conceptlens.concepts.store.schema import Anything, Ids, Int, ListOf, MapOf, Record, Str, check, culprit
from conceptlens.concepts.errors import StoreError

__all__ = ["ActivationStore", "EntryReader", "StoreEntry", "Shard", "padded_geometry", "request_key", "FORMAT_VERSION"]

FORMAT_VERSION = 1
SHARD_PATTERN = re.compile(r"^shard-(\d{8})-(\d{8})-([0-9a-f]{16})\.safetensors\Z")  # \Z: no trailing newline
KEY_PATTERN = re.compile(r"^[0-9a-f]{32}\Z")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of shards verified in this process
_REBUILD = "delete the entry folder and embed again"
# The shape of a manifest (keys of other versions are allowed); ``_check_counts`` ties its numbers together.
MANIFEST_SCHEMA = Record(
    {"format_version": Int(), "key": Str(), "n_items": Int(min=0),
     "shards": ListOf(Str(), unique=True)},  # each name is matched against SHARD_PATTERN first
    optional={
        "request": MapOf(Anything()), "key_request": MapOf(Anything()), "item_shape": ListOf(Int(min=0)),
        "dataset": Record({"ids": Ids()}, optional={"name": Str(), "concepts": ListOf(Str()), "splits": MapOf(Ids())}),
    },
)


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
        try:  # the length the header describes first: a padded file is never hashed
            valid = safetensors_problem(self.path, StoreError, _REBUILD, require_header=False) is None
            valid = valid and regular_sha256(self.path, StoreError, _REBUILD).startswith(self.checksum)
        except (OSError, StoreError):  # missing, unreadable, a link or a special file
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
        fix = "run the embedding again; it recomputes bad shards"
        if os.path.lexists(self.path):  # a link, FIFO or device is refused unopened; the length is checked before reading
            problem = safetensors_problem(self.path, StoreError, fix, require_header=False)
            if problem:
                raise StoreError(str(self.path), f"cannot read shard ({problem})", fix)
        if verify and not self._verified_before() and not self.verify():
            problem = "shard is corrupt (checksum mismatch)" if self.path.is_file() else "shard is missing"
            raise StoreError(str(self.path), problem, fix)
        try:
            with safe_open(str(self.path), framework="pt") as file:
                return {name: file.get_tensor(name) for name in file.keys()}
        except Exception as error:  # noqa: BLE001
            raise StoreError(str(self.path), f"cannot read shard ({error})", "run the embedding again; it recomputes bad shards") from error


class StoreEntry:
    """The activations of one (model, layer, preprocessing, reduction, dtype, dataset) request."""

    def __init__(self, root: Path, key: str, request: dict[str, Any] | None = None) -> None:
        if not KEY_PATTERN.match(key):
            raise StoreError(f"store key {key!r}", "not a store key", "keys are 32 lowercase hex digits")
        self.key = key
        self.path = Path(root) / key
        self.request = request  # the request the entry was opened for, when known

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def is_complete(self) -> bool:
        """True when the manifest exists as a regular file in a real entry folder (all shards were written)."""
        return _is_real(self.path, stat.S_ISDIR) and _is_real(self.manifest_path, stat.S_ISREG)

    def manifest(self) -> dict[str, Any]:
        """Read and check the manifest: a regular file in a real folder, naming this entry's key and request."""
        manifest = self._read_manifest()
        problem = self._identity_problem(manifest)
        if problem:
            raise StoreError(str(self.manifest_path), problem, "delete the entry folder; the next embedding rebuilds it")
        return manifest

    def _identity_problem(self, manifest: dict[str, Any]) -> str | None:
        """Why ``manifest`` does not describe this entry (its key, its request), or None."""
        if manifest.get("key") != self.key:
            return f"manifest names key {str(manifest.get('key'))[:40]!r}, not its folder's {self.key} (moved or copied entry)"
        request = manifest.get("key_request", manifest.get("request"))
        if not isinstance(request, dict) or request_key(request) != self.key:
            return f"manifest's request does not hash to its key {self.key} (edited or forged)"
        if self.request is not None and _canonical(request) != _canonical(self.request):
            return f"manifest's request is not the one asked for key {self.key}"
        return None

    def _read_manifest(self) -> dict[str, Any]:
        """The manifest's JSON with its format and shard names checked (not its identity)."""
        self._check_folder()
        manifest = read_json(self.manifest_path, StoreError, fix=_REBUILD, max_bytes=MAX_MANIFEST_BYTES)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                str(self.manifest_path),
                f"format version {manifest.get('format_version')} is not {FORMAT_VERSION}",
                "delete the entry folder and embed again",
            )
        for item in manifest.get("shards", []) if isinstance(manifest.get("shards"), list) else []:
            if not isinstance(item, str) or not SHARD_PATTERN.match(item):
                raise StoreError(str(self.manifest_path), f"invalid shard name {item!r}", "delete the entry folder and embed again")
        check(manifest, MANIFEST_SCHEMA, self.manifest_path, StoreError, _REBUILD)
        _check_counts(manifest, self.manifest_path)
        return manifest

    def _check_folder(self) -> None:
        """Raise StoreError when the entry's path is a link or special file (never read or written through)."""
        try:
            kind = special_kind(os.lstat(self.path).st_mode)
        except OSError:
            return
        if kind not in (None, "a folder"):
            raise StoreError(str(self.path), f"store entry is {kind}, not a folder (never followed)", "delete it; the next embedding rebuilds the entry")
        if kind is None:
            raise StoreError(str(self.path), "store entry is a file, not a folder", "delete it; the next embedding rebuilds the entry")

    def shards(self) -> list[Shard]:
        """Every shard file present, sorted by start (not verified)."""
        if not _is_real(self.path, stat.S_ISDIR):
            return []
        found = (Shard.from_path(p) for p in self.path.iterdir())
        return sorted((s for s in found if s is not None), key=lambda s: (s.start, s.end))

    def valid_shards(self) -> list[Shard]:
        """Verify every shard; delete corrupt ones, and the manifest when it no longer holds.

        A manifest no longer holds when it cannot be read or checked, or when a shard it lists is
        missing or corrupt: the entry is then incomplete and the next embedding recomputes it.
        An entry whose manifest names another key or request (a moved, copied or forged entry) is
        deleted whole, shards included: it is rebuilt, never served. A link or special file in
        place of the entry folder, a shard or the manifest is removed (the link itself, never what
        it points to) and rebuilt.
        """
        self._replace_foreign()
        valid = []
        for shard in self.shards():
            if shard.verify():
                valid.append(shard)
            else:
                _remove(shard.path)
                _remove(self.manifest_path)
        if self.is_complete and not self._manifest_holds(valid):
            _remove(self.manifest_path)
        return valid

    def _replace_foreign(self) -> None:
        """Remove what cannot be this entry: a link or file at its folder, a link at its manifest, a lying manifest."""
        if os.path.lexists(self.path) and not _is_real(self.path, stat.S_ISDIR):
            _remove(self.path)
            return
        if os.path.lexists(self.manifest_path) and not _is_real(self.manifest_path, stat.S_ISREG):
            _remove(self.manifest_path)
            return
        try:
            lying = self.is_complete and self._identity_problem(self._read_manifest()) is not None
        except StoreError:
            return  # unreadable: _manifest_holds drops the manifest, the shards stay
        if lying:
            self.delete()

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
        self._check_folder()
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
        self._check_folder()
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
        if self.request is not None and _canonical(metadata.get("request")) != _canonical(self.request):
            manifest["key_request"] = self.request  # the request the key hashes, when the recorded one differs
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
        """Return every tensor of the entry at ``indices`` (in that order), reading each shard once.

        A detector pads each batch to its own canvas, so native maps of different shards can
        differ in size. Rows from such shards are zero-padded at the bottom and right to the
        largest map of the request, and their ``geometry`` rows are rescaled to describe the
        padded map (:func:`padded_geometry`): the cells on the image (``image_cells``) and every
        value sampled on the concept grid (``features_to_grid``) equal those of the item read
        alone. Rows of one map size are returned as stored.
        """
        indices = np.asarray(indices, dtype=np.int64)
        numbers = np.searchsorted(self.starts, indices, side="right") - 1
        parts = []
        for number in np.unique(numbers):
            positions = np.nonzero(numbers == number)[0]
            local = torch.from_numpy(indices[positions] - self.bounds[number][0])
            parts.append((torch.from_numpy(positions), {name: tensor[local] for name, tensor in self._shard(int(number)).items()}))
        if _mixed_sizes(parts):
            parts = self._padded(parts)
        out: dict[str, torch.Tensor] = {}
        for positions, tensors in parts:
            for name, tensor in tensors.items():
                if name not in out:
                    out[name] = tensor.new_empty((len(indices), *tensor.shape[1:]))
                out[name][positions] = tensor
        return out

    def _padded(self, parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Pad every part's ``activations`` maps to the largest (h, w) and rescale its geometries."""
        shapes = {name: {tuple(tensors[name].shape[1:]) for _, tensors in parts} for name in parts[0][1]}
        differing = sorted(name for name, found in shapes.items() if len(found) > 1)
        maps = shapes.get("activations", set())
        if differing != ["activations"] or "geometry" not in shapes or len({(len(s), s[:-2]) for s in maps}) > 1 or min(map(len, maps)) < 3:
            raise StoreError(
                str(self.entry.path), f"rows come from shards whose tensors {differing} differ in shape beyond the map size ({sorted(maps)})",
                "read one shard at a time (EntryReader.shard_of)",
            )
        size = (max(s[-2] for s in maps), max(s[-1] for s in maps))
        padded = []
        for positions, tensors in parts:
            activations = tensors["activations"]
            own = (int(activations.shape[-2]), int(activations.shape[-1]))
            geometry = torch.tensor([padded_geometry(row.tolist(), own, size) for row in tensors["geometry"]], dtype=tensors["geometry"].dtype)
            grown = torch.nn.functional.pad(activations, (0, size[1] - own[1], 0, size[0] - own[0]))
            padded.append((positions, {**tensors, "activations": grown, "geometry": geometry}))
        return padded


def _mixed_sizes(parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> bool:
    """True when some tensor's per-item shape differs between the parts (shards) of a request."""
    return any(
        tuple(tensors[name].shape[1:]) != tuple(tensor.shape[1:])
        for _, tensors in parts[1:] for name, tensor in parts[0][1].items()
    )


def padded_geometry(geometry: Sequence[int], map_size: tuple[int, int], padded_size: tuple[int, int]) -> list[int]:
    """The stored geometry row of an item whose ``map_size`` feature map is zero-padded to ``padded_size``.

    A geometry row is ``[image h, image w, resized h, resized w, top, left, canvas h, canvas w]``
    (:meth:`conceptlens.concepts.geometry.Geometry.to_list`). Padding ``h`` cells to ``H`` extends
    the canvas by the same cell pitch, ``canvas · H / h``. The canvas, resized size and offset
    are then scaled along that axis by the smallest integer ``m`` that keeps the new canvas an
    integer (``m = h / gcd(canvas · H, h)``, 1 whenever the layer's stride divides the canvas);
    every mapping between feature cells and the image depends only on their ratios, so it is
    unchanged, and the padding cells lie beyond the image.

    Examples
    --------
    >>> padded_geometry([100, 150, 320, 480, 0, 0, 320, 480], (10, 15), (10, 17))
    [100, 150, 320, 480, 0, 0, 320, 544]
    >>> padded_geometry([100, 100, 352, 352, 0, 0, 352, 352], (6, 6), (7, 6))
    [100, 100, 1056, 352, 0, 0, 1232, 352]
    """
    values = [int(v) for v in geometry]
    for axis in (0, 1):
        cells, target, canvas = map_size[axis], padded_size[axis], values[6 + axis]
        scale = cells // math.gcd(canvas * target, cells)
        values[2 + axis] *= scale
        values[4 + axis] *= scale
        values[6 + axis] = canvas * target * scale // cells
    return values


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
        """The entry for a request (it may not exist yet); its manifest must record this request."""
        return StoreEntry(self.root, request_key(request), request)

    def entries(self) -> list[StoreEntry]:
        """Every complete entry."""
        if not self.root.is_dir():
            return []
        found = [StoreEntry(self.root, p.name) for p in sorted(self.root.iterdir()) if KEY_PATTERN.match(p.name) and _is_real(p, stat.S_ISDIR)]
        return [entry for entry in found if entry.is_complete]


def _check_counts(manifest: dict[str, Any], path: Path) -> None:
    """Raise StoreError when the manifest's shards, ids and splits disagree with its ``n_items``."""
    n_items = manifest["n_items"]
    for index, name in enumerate(manifest["shards"]):
        shard = Shard.from_path(path.parent / name)
        if not shard.start < shard.end <= n_items:
            raise StoreError(culprit(path, ("shards", index)), f"covers items {shard.start} to {shard.end}, outside the entry's {n_items}", _REBUILD)
    dataset = manifest.get("dataset")
    if dataset is None:
        return
    if len(dataset["ids"]) != n_items:
        raise StoreError(culprit(path, ("dataset", "ids")), f"lists {len(dataset['ids'])} ids for n_items {n_items}", _REBUILD)
    known = set(dataset["ids"])
    for split, ids in dataset.get("splits", {}).items():
        unknown = next((i for i, item in enumerate(ids) if item not in known), None)
        if unknown is not None:
            raise StoreError(culprit(path, ("dataset", "splits", split, unknown)), f"id {ids[unknown]!r} is not among dataset.ids", _REBUILD)


def _canonical(request: Any) -> str:
    """The canonical JSON of a request, as hashed by :func:`request_key`."""
    return json.dumps(request, sort_keys=True, separators=(",", ":"))


def _is_real(path: Path, test) -> bool:
    """True when ``path`` exists, is not a link, and its mode passes ``test`` (``stat.S_ISDIR``, ``stat.S_ISREG``)."""
    try:
        return bool(test(os.lstat(path).st_mode))
    except OSError:
        return False


def _remove(path: Path) -> None:
    """Remove a store file, link or special file (a link itself, never its target); a real folder with its contents."""
    if _is_real(path, stat.S_ISDIR):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
