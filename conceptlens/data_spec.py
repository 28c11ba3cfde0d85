"""Turn a data spec string from the command line or a config into a concept dataset.

Forms: ``synthetic[:N[:SEED]]`` (the synthetic concept world), ``real-textures[:N[:SEED]]``
(real textures and photo crops with exact masks, needs scikit-image), a folder in the folder layout
(``images/`` + ``masks/<concept>/``), or a COCO instances JSON file (with ``coco_images``).
"""

from __future__ import annotations

from pathlib import Path

from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.data.generated import GeneratedDataset
from conceptlens.concepts.data.real_textures import RealTextureWorld
from conceptlens.concepts.data.synthetic import SyntheticWorld
from conceptlens.concepts.errors import DataError

__all__ = ["GENERATED_WORLDS", "open_dataset"]

#: The generated worlds a spec ``NAME[:N[:SEED]]`` can name, by name.
GENERATED_WORLDS: dict[str, type[GeneratedDataset]] = {world.kind: world for world in (SyntheticWorld, RealTextureWorld)}
_DEFAULT_N_IMAGES = 200


def open_dataset(
    spec: str, coco_images: str | None = None, seed: int = 0, progress: bool = False, area_range: tuple[float, float] | None = None
) -> ConceptDataset:
    """Open the dataset a spec names.

    Parameters
    ----------
    spec : str
        ``synthetic[:N[:SEED]]``, ``real-textures[:N[:SEED]]``, a folder path, or a COCO ``.json``
        path. ``N`` defaults to 200 images, ``SEED`` to ``seed``.
    coco_images : str, optional
        Image folder of a COCO dataset.
    seed : int
        Split seed (and world seed for ``synthetic`` without one).
    progress : bool
        Show a progress bar while validating files.
    area_range : (float, float), optional
        COCO only: keep an (image, category) mask when it covers this fraction of the image.

    Returns
    -------
    ConceptDataset

    Raises
    ------
    DataError
        If the spec names no dataset, or a generated world's ``N`` or ``SEED`` is not an integer.

    Examples
    --------
    >>> world = open_dataset("synthetic:20:3")
    >>> type(world).__name__, world.name, len(world)
    ('SyntheticWorld', 'synthetic-s3-n20', 20)
    >>> open_dataset("synthetic", seed=7).name
    'synthetic-s7-n200'
    """
    world = GENERATED_WORLDS.get(spec.split(":")[0])
    if world is not None:
        n_images, world_seed = _generated_arguments(spec, seed)
        return world(n_images=n_images, seed=world_seed)
    path = Path(spec)
    if path.suffix.lower() == ".json":
        if coco_images is None:
            raise DataError(spec, "a COCO annotation file needs its image folder", "pass --coco-images DIR")
        from conceptlens.concepts.data.coco import CocoDataset

        return CocoDataset(path, coco_images, area_range=area_range, seed=seed)
    if path.is_dir():
        from conceptlens.concepts.data.folder import FolderDataset

        return FolderDataset(path, seed=seed, progress=progress)
    if path.is_file():
        raise DataError(spec, "is a file but not a COCO annotation .json", "give the dataset's folder (images/ and masks/), or a COCO .json with --coco-images")
    raise DataError(spec, "no such folder or file", "give a folder with images/ and masks/, a COCO .json, synthetic:N or real-textures:N")


def _generated_arguments(spec: str, seed: int) -> tuple[int, int]:
    """``NAME[:N[:SEED]]`` → (N, SEED), default 200 images and the split seed."""
    name, *parts = spec.split(":")
    fix = f"write {name}:N:SEED, e.g. {name}:{_DEFAULT_N_IMAGES}:0"
    if len(parts) > 2:
        raise DataError(spec, "a generated world takes at most N and SEED", fix)
    try:
        n_images = int(parts[0]) if parts else _DEFAULT_N_IMAGES
        world_seed = int(parts[1]) if len(parts) > 1 else seed
    except ValueError as error:
        raise DataError(spec, "N and SEED must be integers", fix) from error
    return n_images, world_seed
