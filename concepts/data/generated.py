"""What every generated concept world shares: scenes rendered on demand from ``(seed, index)``.

A generated world (the synthetic world, the real-texture world) draws scene ``index`` of world
``seed`` from ``np.random.default_rng([seed, index])`` alone, so an item never depends on how many
items the dataset has. :class:`GeneratedDataset` holds what follows from that and is the same for
every world: the argument checks, the name ``"<kind>-s<seed>-n<n_images>"``, the ids ``"000000"``,
``"000001"``, …, the train/val/test split, the scene cache and the dataset protocol (images and
masks as writable copies of the cached scene, a fingerprint of the generator and its arguments).
A world adds only its renderer and the arguments that shape its scenes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from conceptlens.concepts.data.dataset import ConceptDataset, assign_splits
from conceptlens.concepts.errors import DataError

__all__ = ["GeneratedDataset", "RenderedScene", "check_integer", "scene_cache"]

_SCENE_CACHE_SIZE = 64  # scenes kept per renderer (shared by every dataset of that world)


class RenderedScene(Protocol):
    """What a generated world's renderer returns: at least an image and its concept masks."""

    image: np.ndarray  # uint8 (H, W, 3)
    masks: np.ndarray  # bool (K, H, W)


SceneT = TypeVar("SceneT")


def check_integer(name: str, value: object, low: int, high: int | None = None) -> int:
    """Return ``value`` as an ``int`` after checking it is an integer in ``[low, high]``.

    Parameters
    ----------
    name : str
        Argument name, used in the error's culprit (``"name=value"``) and fix.
    value : object
        The value to check; bools are refused, numpy integers accepted.
    low, high : int
        Inclusive bounds; ``high=None`` is unbounded.

    Raises
    ------
    DataError
        If ``value`` is not an integer within the bounds.

    Examples
    --------
    >>> check_integer("seed", 3, 0)
    3
    >>> check_integer("seed", -1, 0)
    Traceback (most recent call last):
    ...
    conceptlens.concepts.errors.DataError: seed=-1: must be an integer >= 0 — fix: pass seed as an int >= 0
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise DataError(f"{name}={value!r}", f"must be an integer {bounds}", f"pass {name} as an int {bounds}")
    return int(value)


def scene_cache(render: Callable[..., SceneT], maxsize: int = _SCENE_CACHE_SIZE) -> Callable[..., SceneT]:
    """Wrap a renderer in an LRU cache whose scenes are read-only (they are shared by every caller).

    Every ``numpy`` array field of a returned (dataclass) scene is made read-only; the wrapper has
    ``cache_clear()`` like :func:`functools.lru_cache`.
    """

    @functools.lru_cache(maxsize=maxsize)
    def cached(*args: Any) -> SceneT:
        scene = render(*args)
        for field in dataclasses.fields(scene):  # type: ignore[arg-type]
            value = getattr(scene, field.name)
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
        return scene

    return functools.update_wrapper(cached, render)  # type: ignore[return-value]


class GeneratedDataset(ConceptDataset):
    """A :class:`~conceptlens.concepts.data.dataset.ConceptDataset` of scenes rendered on demand.

    Subclasses set :attr:`kind`, implement :meth:`_scene` (the cached scene of a checked index),
    :meth:`_generator_version` and :meth:`_fingerprint_fields`, and may override
    :meth:`image_size` to answer without rendering.

    Parameters
    ----------
    concepts : sequence of str
        The world's concept names, in the order of its mask stack.
    n_images : int
        Number of scenes (>= 1); item ``i`` is scene ``i`` of world ``seed``, with id ``f"{i:06d}"``.
    seed : int
        World seed (>= 0).
    split_seed : int or None
        Seed of the train/val/test split; ``None`` uses ``seed``.

    Raises
    ------
    DataError
        If ``n_images``, ``seed`` or ``split_seed`` is out of range.

    Examples
    --------
    >>> from conceptlens.concepts.data.synthetic import SyntheticWorld
    >>> world = SyntheticWorld(n_images=10, seed=1)
    >>> world.name, world.ids[:2]
    ('synthetic-s1-n10', ['000000', '000001'])
    >>> {split: len(ids) for split, ids in world.splits.items()}
    {'train': 6, 'val': 2, 'test': 2}
    """

    #: The world's spec name (``synthetic``, ``real-textures``), also the prefix of :attr:`name`.
    kind: ClassVar[str]

    def __init__(self, concepts: Sequence[str], n_images: int, seed: int, split_seed: int | None = None) -> None:
        self.n_images = check_integer("n_images", n_images, 1)
        self.seed = check_integer("seed", seed, 0)
        self.split_seed = self.seed if split_seed is None else check_integer("split_seed", split_seed, 0)
        self.name = f"{self.kind}-s{self.seed}-n{self.n_images}"
        self.concepts = list(concepts)
        self.ids = [f"{index:06d}" for index in range(self.n_images)]
        self.splits = assign_splits(self.ids, self.split_seed)

    @abstractmethod
    def _scene(self, index: int) -> RenderedScene:
        """Return the cached, read-only scene of item ``index`` (checked with :meth:`check_index`)."""

    @abstractmethod
    def _generator_version(self) -> str:
        """Return the world's generator version (read at call time, so that bumping it shows)."""

    @abstractmethod
    def _fingerprint_fields(self) -> dict[str, Any]:
        """Return the JSON-able arguments, besides seed and size, that change the world's images."""

    def image(self, index: int) -> np.ndarray:
        """Return image ``index`` as a writable ``uint8`` array (H, W, 3)."""
        return self._scene(index).image.copy()

    def masks(self, index: int) -> np.ndarray:
        """Return the concept masks of image ``index``, a writable ``bool`` array (K, H, W)."""
        return self._scene(index).masks.copy()

    def image_fingerprint(self) -> str:
        """Return a sha256 hex digest of the generator version, seed, number of images and arguments.

        The arguments are the world's own (:meth:`_fingerprint_fields`); the split seed does not
        enter, as it changes no image.
        """
        key = {"generator": self._generator_version(), "seed": self.seed, "n_images": self.n_images, **self._fingerprint_fields()}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
