"""Turn a data spec string from the command line or a config into a concept dataset.

Forms: ``synthetic[:N[:SEED]]`` (the synthetic concept world), ``real-textures[:N[:SEED]]``
(real textures and photo crops with exact masks, needs scikit-image), a folder in the folder layout
(``images/`` + ``masks/<concept>/``), or a COCO instances JSON file (with ``coco_images``).
"""

from __future__ import annotations

from pathlib import Path

from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.errors import DataError

__all__ = ["open_dataset"]


def open_dataset(
    spec: str, coco_images: str | None = None, seed: int = 0, progress: bool = False, area_range: tuple[float, float] | None = None
) -> ConceptDataset:
    """Open the dataset a spec names.

    Parameters
    ----------
    spec : str
        ``synthetic[:N[:SEED]]``, a folder path, or a COCO ``.json`` path.
    coco_images : str, optional
        Image folder of a COCO dataset.
    seed : int
        Split seed (and world seed for ``synthetic`` without one).
    progress : bool
        Show a progress bar while validating files.
    area_range : (float, float), optional
        COCO only: keep an (image, category) mask when it covers this fraction of the image.
    """
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from conceptlens.concepts.data.synthetic import SyntheticWorld

        n_images, world_seed = _generated_arguments(spec, seed)
        return SyntheticWorld(n_images=n_images, seed=world_seed)
    if spec == "real-textures" or spec.startswith("real-textures:"):
        from conceptlens.concepts.data.real_textures import RealTextureWorld

        n_images, world_seed = _generated_arguments(spec, seed)
        return RealTextureWorld(n_images=n_images, seed=world_seed)
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
    """``name[:N[:SEED]]`` → (N, SEED), default 200 images and the split seed."""
    parts = spec.split(":")[1:]
    try:
        n_images = int(parts[0]) if parts else 200
        world_seed = int(parts[1]) if len(parts) > 1 else seed
    except ValueError as error:
        raise DataError(spec, "N and SEED must be integers", f"write {spec.split(':')[0]}:200:0") from error
    return n_images, world_seed
