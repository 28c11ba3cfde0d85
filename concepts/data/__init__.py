"""Concept datasets: images with per-concept masks and a train/val/test split.

``FolderDataset`` (``images/`` + ``masks/<concept>/``), ``CocoDataset`` (COCO instances),
``ImageSets`` (folders of image-level concept sets for TCAV), the generated ``SyntheticWorld`` and
``RealTextureWorld``, ``ArrayDataset`` for arrays in memory; ``concept_image_sets`` draws image-level
concept sets from any dataset with masks. Names are imported on first use.
"""

from conceptlens.concepts._lazy import lazy_exports

_EXPORTS = {
    "ArrayDataset": "conceptlens.concepts.data.dataset",
    "ConceptDataset": "conceptlens.concepts.data.dataset",
    "ConceptSelection": "conceptlens.concepts.data.dataset",
    "SubsetDataset": "conceptlens.concepts.data.dataset",
    "FolderDataset": "conceptlens.concepts.data.folder",
    "write_folder_dataset": "conceptlens.concepts.data.folder",
    "CocoDataset": "conceptlens.concepts.data.coco",
    "ImageFolderDataset": "conceptlens.concepts.data.image_sets",
    "ImageSets": "conceptlens.concepts.data.image_sets",
    "SyntheticWorld": "conceptlens.concepts.data.synthetic",
    "RealTextureWorld": "conceptlens.concepts.data.real_textures",
    "list_image_files": "conceptlens.concepts.data.imageio",
    "read_image": "conceptlens.concepts.data.imageio",
    "read_mask": "conceptlens.concepts.data.imageio",
    "concept_image_sets": "conceptlens.concepts.data.concept_sets",
    "concept_set_indices": "conceptlens.concepts.data.concept_sets",
    "mask_coverage": "conceptlens.concepts.data.concept_sets",
    "split_indices": "conceptlens.concepts.data.splits",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
