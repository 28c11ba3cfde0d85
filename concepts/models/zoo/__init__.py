"""The embedded model zoo: models that load with no download, named ``zoo:<name>`` in model specs.

* ``zoo:mobilenet_v2``, ``zoo:efficientnet_lite0`` — real ImageNet classifiers from installed
  weight packages (extra ``conceptlens[real]``).
* ``zoo:synthetic_vgg_centernet``, ``zoo:synthetic_resnet_fpn`` — small detectors trained on the
  synthetic concept world, weights shipped in this package.
"""

from __future__ import annotations

import importlib

from torch import nn

from conceptlens.concepts.models.adapters import Adapter
from conceptlens.concepts.errors import ModelSpecError, closest_names

__all__ = ["ZOO", "load_zoo_model", "zoo_categories"]

ZOO: dict[str, str] = {
    "mobilenet_v2": "conceptlens.concepts.models.zoo.real:mobilenet_v2",
    "efficientnet_lite0": "conceptlens.concepts.models.zoo.real:efficientnet_lite0",
    "synthetic_vgg_centernet": "conceptlens.concepts.models.zoo.detectors:synthetic_vgg_centernet",
    "synthetic_resnet_fpn": "conceptlens.concepts.models.zoo.detectors:synthetic_resnet_fpn",
}


def load_zoo_model(name: str) -> tuple[nn.Module, Adapter]:
    """Build the zoo model ``name`` with its weights and adapter."""
    if name not in ZOO:
        raise ModelSpecError(f"zoo:{name}", "no such zoo model", closest_names(name, ZOO))
    module_path, _, attribute = ZOO[name].partition(":")
    return getattr(importlib.import_module(module_path), attribute)()


def zoo_categories(name: str) -> tuple[str, ...]:
    """The class names of zoo model ``name`` by output index.

    The real classifiers give the 1000 ImageNet-1k names in logit order; the synthetic detectors
    ``("__background__", "car", "house", "tree", "boat")``, by detection label (0 is background).
    """
    if ZOO[name].startswith("conceptlens.concepts.models.zoo.real:"):
        from conceptlens.concepts.models.zoo.real import IMAGENET_CATEGORIES

        return IMAGENET_CATEGORIES
    from conceptlens.concepts.data.synthetic import OBJECT_CLASSES

    return ("__background__", *OBJECT_CLASSES)
