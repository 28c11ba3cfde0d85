"""A concept dataset on real pixels: real textures and photo crops pasted onto real backgrounds.

Every scene is drawn from ``np.random.default_rng([seed, index])``:

* a background — a random square crop of one of scikit-learn's sample photos (``china.jpg``,
  ``flower.jpg``), rescaled to the scene size and maybe mirrored, or a plain colour, or a linear
  gradient between two colours;
* 1–3 texture regions — a crop of one of scikit-image's real textures ``brick``, ``grass``,
  ``gravel`` (grayscale, rescaled, turned into RGB with a mild random per-channel tint) in a
  rectangle, an ellipse or a random smooth blob;
* 0–2 photo crops, each at most once per scene — see :data:`PHOTO_CROPS` — rescaled, maybe
  mirrored, in a rectangle or an ellipse.

Regions are pasted in random order and a later paste hides what it covers. Each region is placed
so that every earlier region keeps at least :data:`MIN_VISIBLE` of its pixels (the best of a few
tries when no position does). A concept's mask is exactly the set of pixels whose visible
(top-most) paste belongs to that concept; backgrounds belong to no concept (the photo
backgrounds show trees, a temple and flowers, none of which is a concept here).

Only images that ship inside the scikit-image and scikit-learn wheels are used, so nothing is
downloaded. They are loaded once per process.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from conceptlens.concepts.data.generated import GeneratedDataset, check_integer, scene_cache
from conceptlens.concepts.errors import DataError

__all__ = ["GENERATOR_VERSION", "TEXTURE_CONCEPTS", "PHOTO_CONCEPTS", "CONCEPTS", "PHOTO_CROPS", "MIN_VISIBLE", "RealTextureWorld"]

#: Bump whenever the drawing changes, so that cached activations keyed on the fingerprint expire.
GENERATOR_VERSION = "real-textures-1"

#: Texture concepts: scikit-image's grayscale texture photos of the same names.
TEXTURE_CONCEPTS: tuple[str, ...] = ("brick", "grass", "gravel")
#: Photo-crop concepts, see :data:`PHOTO_CROPS`.
PHOTO_CONCEPTS: tuple[str, ...] = ("cat", "cup", "rocket", "face")
#: Every concept, in the order of the mask stack.
CONCEPTS: tuple[str, ...] = TEXTURE_CONCEPTS + PHOTO_CONCEPTS

#: concept -> (``skimage.data`` image, crop box ``(row0, row1, col0, col1)``, range of the pasted
#: crop's longer side as a fraction of the scene size). The boxes were checked by eye:
#: ``cat`` is the face of Chelsea the cat (nearly the whole photo), ``cup`` the espresso cup on
#: its saucer, ``rocket`` the launcher on its pad (with a little of the gantries' lights at the
#: bottom), ``face`` the astronaut's head with hair.
PHOTO_CROPS: dict[str, tuple[str, tuple[int, int, int, int], tuple[float, float]]] = {
    "cat": ("chelsea", (10, 295, 50, 410), (0.30, 0.55)),
    "cup": ("coffee", (8, 392, 70, 485), (0.30, 0.55)),
    "rocket": ("rocket", (122, 408, 292, 352), (0.45, 0.75)),
    "face": ("astronaut", (15, 172, 148, 305), (0.25, 0.45)),
}

#: Every earlier paste keeps at least this fraction of its pixels visible (when possible).
MIN_VISIBLE = 0.4
MIN_SIZE = 32
MAX_SIZE = 2048

_TEXTURE_SIDE = (0.22, 0.5)  # texture region height/width, fraction of the scene size
_TEXTURE_SCALE = (0.3, 0.8)  # scene pixels per texture pixel
_TINT = 0.15  # per-channel multiplier of the grayscale texture in 1 ± _TINT
_N_TEXTURES = (1, 2, 3)
_N_PHOTOS_P = (0.25, 0.45, 0.30)  # probability of 0, 1, 2 photo crops
_BACKGROUND_P = (0.5, 0.2, 0.3)  # photo, plain, gradient
_BACKGROUND_SIDE = (0.4, 1.0)  # photo-background crop side, fraction of the photo's shorter side
_PLACEMENT_TRIES = 12
_INSTALL = "pip install scikit-image (or pip install 'conceptlens[real]')"


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Sources:
    textures: dict[str, np.ndarray]  # concept -> uint8 (H, W) grayscale
    photos: dict[str, np.ndarray]  # concept -> uint8 (h, w, 3), already cropped
    backgrounds: tuple[np.ndarray, ...]  # uint8 (H, W, 3)
    digest: str  # sha256 of all of the above


@functools.lru_cache(maxsize=1)
def _sources() -> _Sources:
    """Load the scikit-image and scikit-learn source images once per process."""
    try:
        import skimage.data
    except ImportError as error:
        raise DataError("RealTextureWorld", f"needs scikit-image ({error})", _INSTALL) from error
    from sklearn.datasets import load_sample_images

    def load(name: str) -> np.ndarray:
        try:
            return np.ascontiguousarray(getattr(skimage.data, name)(), dtype=np.uint8)
        except Exception as error:  # noqa: BLE001 - a broken or partial install
            raise DataError(f"skimage.data.{name}", f"cannot be loaded ({type(error).__name__}: {error})", f"reinstall: {_INSTALL}") from error

    textures = {name: load(name) for name in TEXTURE_CONCEPTS}
    photos = {}
    for concept, (name, (r0, r1, c0, c1), _) in PHOTO_CROPS.items():
        photos[concept] = np.ascontiguousarray(load(name)[r0:r1, c0:c1, :3])
    backgrounds = tuple(np.ascontiguousarray(image, dtype=np.uint8) for image in load_sample_images().images)
    digest = hashlib.sha256()
    for array in (*textures.values(), *photos.values(), *backgrounds):
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    for array in (*textures.values(), *photos.values(), *backgrounds):
        array.setflags(write=False)
    return _Sources(textures, photos, backgrounds, digest.hexdigest())


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a uint8 (H, W) or (H, W, 3) array with PIL's antialiased bilinear filter."""
    from PIL import Image

    if array.shape[:2] == (height, width):
        return array.copy()
    return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR))


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Paste:
    """One pasted region: ``pixels[shape]`` was written at ``image[top:top+h, left:left+w][shape]``."""

    concept: str
    source: str  # e.g. "skimage.data.brick"
    top: int
    left: int
    shape: np.ndarray  # bool (h, w)
    pixels: np.ndarray  # uint8 (h, w, 3)


@dataclass(frozen=True, eq=False)
class _Scene:
    """A rendered scene; ``labels[y, x]`` is the index of the paste visible there (-1: background)."""

    image: np.ndarray  # uint8 (S, S, 3)
    masks: np.ndarray  # bool (K, S, S)
    background: np.ndarray  # uint8 (S, S, 3), the scene before any paste
    labels: np.ndarray  # int16 (S, S)
    pastes: tuple[_Paste, ...]  # in paste order (back to front)


def _background(rng: np.random.Generator, sources: _Sources, size: int) -> np.ndarray:
    kind = rng.choice(3, p=_BACKGROUND_P)
    if kind == 0:
        photo = sources.backgrounds[int(rng.integers(len(sources.backgrounds)))]
        height, width = photo.shape[:2]
        side = int(round(rng.uniform(*_BACKGROUND_SIDE) * min(height, width)))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return _resize(np.ascontiguousarray(crop), size, size)
    first = rng.integers(30, 226, 3)
    if kind == 1:
        return np.broadcast_to(first.astype(np.uint8), (size, size, 3)).copy()
    second = rng.integers(30, 226, 3)
    angle = rng.uniform(0, 2 * np.pi)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    projection = rows * np.sin(angle) + cols * np.cos(angle)
    t = (projection - projection.min()) / max(projection.max() - projection.min(), 1e-9)
    return np.rint(first * (1 - t[..., None]) + second * t[..., None]).astype(np.uint8)


def _shape(rng: np.random.Generator, height: int, width: int, kinds: tuple[str, ...]) -> np.ndarray:
    """A bool (height, width) region: a full rectangle, an inscribed ellipse or a smooth blob."""
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "rectangle":
        return np.ones((height, width), dtype=bool)
    v = (np.arange(height) + 0.5) / height * 2 - 1
    u = (np.arange(width) + 0.5) / width * 2 - 1
    vv, uu = np.meshgrid(v, u, indexing="ij")
    radius = np.hypot(vv, uu)
    if kind == "ellipse":
        shape = radius <= 1
    else:  # blob: a star-shaped region with a smooth random boundary inside the ellipse
        theta = np.arctan2(vv, uu)
        amplitudes = rng.uniform(0, 0.22, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        boundary = np.ones_like(theta)
        for k, (a, phi) in enumerate(zip(amplitudes, phases), start=2):
            boundary += a * np.cos(k * theta + phi)
        shape = radius <= boundary / (1 + amplitudes.sum())
    if not shape.any():  # a tiny region: keep its centre pixel
        shape[height // 2, width // 2] = True
    return shape


def _texture_paste(rng: np.random.Generator, sources: _Sources, concept: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    texture = sources.textures[concept]
    height = max(1, int(round(rng.uniform(*_TEXTURE_SIDE) * size)))
    width = max(1, int(round(rng.uniform(*_TEXTURE_SIDE) * size)))
    scale = rng.uniform(*_TEXTURE_SCALE)
    scale = max(scale, height / texture.shape[0], width / texture.shape[1])  # the window must fit
    window_h = min(texture.shape[0], max(1, int(round(height / scale))))
    window_w = min(texture.shape[1], max(1, int(round(width / scale))))
    top = int(rng.integers(0, texture.shape[0] - window_h + 1))
    left = int(rng.integers(0, texture.shape[1] - window_w + 1))
    gray = _resize(np.ascontiguousarray(texture[top : top + window_h, left : left + window_w]), height, width)
    tint = rng.uniform(1 - _TINT, 1 + _TINT, 3)
    pixels = np.clip(np.rint(gray[..., None].astype(np.float64) * tint), 0, 255).astype(np.uint8)
    return pixels, _shape(rng, height, width, ("rectangle", "ellipse", "blob"))


def _photo_paste(rng: np.random.Generator, sources: _Sources, concept: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    crop = sources.photos[concept]
    long_side = rng.uniform(*PHOTO_CROPS[concept][2]) * size
    factor = long_side / max(crop.shape[:2])
    height = max(1, min(size, int(round(crop.shape[0] * factor))))
    width = max(1, min(size, int(round(crop.shape[1] * factor))))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    pixels = _resize(np.ascontiguousarray(crop), height, width)
    return pixels, _shape(rng, height, width, ("rectangle", "ellipse"))


def _place(rng: np.random.Generator, labels: np.ndarray, areas: list[int], shape: np.ndarray) -> tuple[int, int]:
    """Pick a top-left corner for ``shape`` that leaves every earlier paste ``MIN_VISIBLE`` visible."""
    size = labels.shape[0]
    height, width = shape.shape
    visible = np.bincount(labels[labels >= 0], minlength=len(areas)) if areas else np.zeros(0, dtype=np.int64)
    best, best_score = (0, 0), -1.0
    for _ in range(_PLACEMENT_TRIES):
        top = int(rng.integers(0, size - height + 1))
        left = int(rng.integers(0, size - width + 1))
        if not areas:
            return top, left
        covered = labels[top : top + height, left : left + width][shape]
        hidden = np.bincount(covered[covered >= 0], minlength=len(areas))
        score = float(np.min((visible - hidden) / np.asarray(areas)))
        if score >= MIN_VISIBLE:
            return top, left
        if score > best_score:
            best, best_score = (top, left), score
    return best


def _render(seed: int, index: int, size: int) -> _Scene:
    """Render scene ``index`` of world ``seed`` at ``size``×``size`` (uncached, writable arrays)."""
    sources = _sources()
    rng = np.random.default_rng([seed, index])
    background = _background(rng, sources, size)
    n_textures = int(rng.choice(_N_TEXTURES))
    n_photos = int(rng.choice(len(_N_PHOTOS_P), p=_N_PHOTOS_P))
    concepts = [TEXTURE_CONCEPTS[int(k)] for k in rng.integers(0, len(TEXTURE_CONCEPTS), n_textures)]
    concepts += [PHOTO_CONCEPTS[int(k)] for k in rng.choice(len(PHOTO_CONCEPTS), n_photos, replace=False)]
    concepts = [concepts[int(k)] for k in rng.permutation(len(concepts))]

    image = background.copy()
    labels = np.full((size, size), -1, dtype=np.int16)
    pastes: list[_Paste] = []
    areas: list[int] = []
    for concept in concepts:
        if concept in TEXTURE_CONCEPTS:
            pixels, shape = _texture_paste(rng, sources, concept, size)
            source = f"skimage.data.{concept}"
        else:
            pixels, shape = _photo_paste(rng, sources, concept, size)
            source = f"skimage.data.{PHOTO_CROPS[concept][0]}"
        top, left = _place(rng, labels, areas, shape)
        height, width = shape.shape
        image[top : top + height, left : left + width][shape] = pixels[shape]
        labels[top : top + height, left : left + width][shape] = len(pastes)
        pastes.append(_Paste(concept, source, top, left, shape, pixels))
        areas.append(int(shape.sum()))

    paste_concept = np.array([CONCEPTS.index(p.concept) for p in pastes] + [-1], dtype=np.int64)
    visible_concept = paste_concept[labels]  # labels == -1 picks the trailing -1
    masks = visible_concept[None] == np.arange(len(CONCEPTS))[:, None, None]
    return _Scene(image, masks, background, labels, tuple(pastes))


_cached_scene = scene_cache(_render)


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------


class RealTextureWorld(GeneratedDataset):
    """Scenes of real textures and real photo crops on real backgrounds, with exact concept masks.

    Concepts: :data:`CONCEPTS` (``brick``, ``grass``, ``gravel``, ``cat``, ``cup``, ``rocket``,
    ``face``). Images are ``size``×``size`` RGB; item ``i`` has id ``f"{i:06d}"``.

    Parameters
    ----------
    n_images : int
        Number of scenes (>= 1).
    seed : int
        World seed (>= 0); it also seeds the train/val/test split unless ``split_seed`` is given.
    size : int
        Image side in pixels (32 … 2048).
    split_seed : int or None, optional
        Seed of the train/val/test split; ``None`` uses ``seed``.

    Raises
    ------
    DataError
        If an argument is out of range, or scikit-image is not installed.
    """

    kind = "real-textures"

    def __init__(self, n_images: int = 200, seed: int = 0, size: int = 224, split_seed: int | None = None) -> None:
        super().__init__(CONCEPTS, n_images, seed, split_seed)
        self.size = check_integer("size", size, MIN_SIZE, MAX_SIZE)
        _sources()  # fail now, with the install command, when scikit-image is missing

    def _scene(self, index: int) -> _Scene:
        return _cached_scene(self.seed, self.check_index(index), self.size)

    def _generator_version(self) -> str:
        return GENERATOR_VERSION

    def _fingerprint_fields(self) -> dict[str, Any]:
        return {"size": self.size, "sources": _sources().digest}

    def image_size(self, index: int) -> tuple[int, int]:
        """Return (size, size) without rendering."""
        self.check_index(index)
        return self.size, self.size
