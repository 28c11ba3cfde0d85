"""Batched layer gradients of a target scalar, for classifiers and detectors alike.

captum's layer attribution (``LayerGradientXActivation`` with ``multiply_by_inputs=False``, i.e.
plain layer gradients) does the forward/backward work; this module feeds it the right inputs:

* a plain ``nn.Module`` with a tensor batch — the model's output goes straight to the target;
* a :class:`conceptlens.concepts.models.loading.LoadedModel` with raw images (uint8 ``(H, W, 3)`` arrays) — its
  adapter prepares each batch. captum needs one tensor, but a torchvision detector takes a list of
  differently sized images, so the list is zero-padded into one tensor and cut back into the list
  inside the forward function; the gradient reaches every image through its own slice. The adapter
  reports where each image lies on the canvas (:class:`conceptlens.concepts.geometry.Geometry`), and gradients
  at feature cells outside the image (the detector's padding) are zeroed: pooled CAVs are trained
  on activations averaged over the image's cells only, so the matching directional derivative sums
  the gradient over those same cells.

Targets may return :class:`conceptlens.attribution.targets.TargetValues` (detector targets: an image without a
matching detection is marked invalid, and its zero value contributes a zero gradient) or a plain
``(B,)`` tensor; an int ``k`` means ``output[:, k]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerGradientXActivation
from torch import nn

from conceptlens.concepts.environment import resolve_device
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.geometry import Geometry, image_cells
from conceptlens.concepts.models.hooks import resolve_layers
from conceptlens.concepts.models.loading import LoadedModel

from conceptlens.attribution.targets import TargetValues, check_differentiable

__all__ = ["GradientBatch", "GradientError", "count_inputs", "iter_layer_gradients", "layer_modules_of", "model_device", "place_model", "target_values"]

TargetLike = Callable[[Any], Any] | int


class GradientError(ConceptLensError):
    """Bad input to a gradient computation: layers, targets, inputs or batch size."""


@dataclass
class GradientBatch:
    """Layer gradients of one batch.

    Attributes
    ----------
    rows : slice
        Positions of the batch in the inputs.
    gradients : dict of str to Tensor
        Per layer, ``∂h/∂A_L`` of shape ``(B, *layer_shape)`` (zero at padding cells).
    values : Tensor
        ``(B,)`` target values (detached, on the CPU).
    valid : Tensor
        ``(B,)`` bool: False where a detector target found no matching detection.
    geometries : list of Geometry or None
        Where each image lies on the model's canvas (None for plain tensor inputs).
    activations : dict of str to Tensor or None
        Per layer, the (detached) layer output ``A_L``, when asked for with ``keep_activations``.
    """

    rows: slice
    gradients: dict[str, torch.Tensor]
    values: torch.Tensor
    valid: torch.Tensor
    geometries: list[Geometry] | None = None
    activations: dict[str, torch.Tensor] | None = None


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def place_model(model: nn.Module | LoadedModel, device: str | torch.device | None) -> torch.device:
    """Move the model to ``device`` when one is given (``auto`` = CUDA when present); return where it is."""
    module = model.module if isinstance(model, LoadedModel) else model
    if device is not None:
        module.to(resolve_device(device))
    return model_device(module)


def layer_modules_of(model: nn.Module | LoadedModel, layers: Sequence[str] | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Layer name → module; names are checked with closest-match errors. Mappings pass through."""
    if isinstance(layers, Mapping):
        return dict(layers)
    module = model.module if isinstance(model, LoadedModel) else model
    refs = resolve_layers(module, list(layers))
    named = dict(module.named_modules())
    for ref in refs:
        if ref.key is not None:
            raise GradientError(
                f"layer {ref.name!r}", "gradients are taken at a module's whole output, not one element of it",
                f"name a module with a single tensor output (e.g. a submodule of {ref.module_path!r})",
            )
    return {ref.name: named[ref.module_path] for ref in refs}


def target_values(target: TargetLike, output: Any, batch: int) -> TargetValues:
    """Apply ``target`` to a model output: :class:`TargetValues` (all valid for a plain ``(B,)`` tensor or an int index)."""
    if not callable(target):
        index = int(target)
        target = lambda out: out[:, index]  # noqa: E731
    if output is None:
        raise GradientError("target", "the model produced no output", "compute gradients with the full forward pass")
    value = target(output)
    if not isinstance(value, TargetValues):
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] != batch:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise GradientError("target", f"returned {shape} for a batch of {batch}", "return one scalar per input, shape (B,)")
        value = TargetValues(value, torch.ones(batch, dtype=torch.bool, device=value.device))
    return value


class _Forward:
    """The scalar-valued forward function captum differentiates, remembering each call's side results."""

    def __init__(self, model: nn.Module | LoadedModel, target: TargetLike) -> None:
        self.model, self.target = model, target
        self.sizes: list[tuple[int, int]] | None = None  # original image sizes (LoadedModel)
        self.shapes: list[tuple[int, int]] | None = None  # prepared tensor sizes, when padded into one batch
        self.geometries: list[Geometry] | None = None
        self.values: TargetValues | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, LoadedModel):
            inputs: Any = x if self.shapes is None else [x[i, :, :h, :w] for i, (h, w) in enumerate(self.shapes)]
            output, self.geometries = self.model.adapter.forward(self.model.module, inputs, self.sizes)
        else:
            output = self.model(x)
        self.values = target_values(self.target, output, x.shape[0])
        check_differentiable(self.values, self.target)  # captum makes the layers require grad: a detached target is the model's doing
        return self.values.values


def _pad_into_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    shapes = [(int(t.shape[-2]), int(t.shape[-1])) for t in images]
    height, width = max(s[0] for s in shapes), max(s[1] for s in shapes)
    batch = torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2])) for t in images])
    return batch, shapes


def _prepare(model: nn.Module | LoadedModel, inputs: Any, rows: slice, device: torch.device, forward: _Forward) -> torch.Tensor:
    if not isinstance(model, LoadedModel):
        return inputs[rows].to(device)
    images = [np.asarray(image) for image in inputs[rows]]
    forward.sizes = [(int(image.shape[0]), int(image.shape[1])) for image in images]
    prepared = model.adapter.prepare(images, device)
    if isinstance(prepared, torch.Tensor):
        forward.shapes = None
        return prepared
    batch, forward.shapes = _pad_into_batch(list(prepared))
    return batch


def count_inputs(model: nn.Module | LoadedModel, inputs: Any) -> int:
    """Number of inputs, checking their kind: raw images for a loaded model, a tensor batch for a plain module."""
    if isinstance(model, LoadedModel):
        if isinstance(inputs, torch.Tensor):
            raise GradientError("inputs", "a LoadedModel takes raw images", "pass uint8 (H, W, 3) arrays; its adapter prepares them")
        return len(inputs)
    if not isinstance(inputs, torch.Tensor):
        raise GradientError("inputs", f"is a {type(inputs).__name__}", "pass a tensor batch to a plain nn.Module, or load the model with load_model")
    return int(inputs.shape[0])


def _mask_padding(gradient: torch.Tensor, geometries: list[Geometry] | None) -> torch.Tensor:
    if geometries is None or gradient.dim() != 4:
        return gradient
    feature_size = (int(gradient.shape[-2]), int(gradient.shape[-1]))
    cells = torch.stack([image_cells(g, feature_size) for g in geometries]).to(gradient.device)
    return gradient * cells[:, None].to(gradient.dtype)


def _single_tensor(name: str, gradient: Any) -> torch.Tensor:
    if isinstance(gradient, tuple):
        if len(gradient) != 1:
            raise GradientError(f"layer {name!r}", f"returns {len(gradient)} tensors", "name a module with a single tensor output")
        gradient = gradient[0]
    return gradient.detach()


def iter_layer_gradients(
    model: nn.Module | LoadedModel,
    inputs: torch.Tensor | Sequence[np.ndarray],
    layers: Sequence[str] | Mapping[str, nn.Module],
    target: TargetLike,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    keep_activations: bool = False,
) -> Iterator[GradientBatch]:
    """Stream the gradients of a target scalar w.r.t. layer outputs, one batch at a time.

    One forward and one backward pass per batch serve every layer; memory is bounded by one
    batch's gradients.

    Parameters
    ----------
    model : nn.Module or LoadedModel
        Taken as is (put a plain module in ``eval()`` mode yourself; loaded models already are).
    inputs : Tensor or sequence of uint8 arrays
        A prepared ``(N, ...)`` batch for a plain module; raw ``(H, W, 3)`` images for a loaded
        model (its adapter resizes, normalises and, for detectors, pads them).
    layers : sequence of str or mapping of str to nn.Module
        Layer names (dotted module paths) or name → module.
    target : callable or int
        ``target(output)`` → :class:`TargetValues` or a ``(B,)`` tensor; an int ``k`` picks
        ``output[:, k]``.
    batch_size : int
    device : str or torch.device, optional
        Move the model there first (``auto`` = CUDA when present); default: where the model is.
    keep_activations : bool
        Also return each layer's output (``GradientBatch.activations``).

    Yields
    ------
    GradientBatch
    """
    if batch_size < 1:
        raise GradientError("batch_size", f"is {batch_size}", "use a positive batch size")
    modules = layer_modules_of(model, layers)
    if not modules:
        raise GradientError("layers", "is empty", "name at least one layer")
    where = place_model(model, device)
    n_inputs = count_inputs(model, inputs)
    names = list(modules)
    forward = _Forward(model, target)
    method = LayerGradientXActivation(forward, [modules[name] for name in names], multiply_by_inputs=False)
    for start in range(0, n_inputs, batch_size):
        rows = slice(start, min(start + batch_size, n_inputs))
        batch = _prepare(model, inputs, rows, where, forward)
        with torch.enable_grad(), _ActivationRecorder(modules if keep_activations else {}) as recorder:
            grads = method.attribute(batch, target=None)
        if len(names) == 1 and not isinstance(grads, list):
            grads = [grads]
        values = forward.values
        gradients = {name: _mask_padding(_single_tensor(name, grad), forward.geometries) for name, grad in zip(names, grads)}
        activations = {name: _single_tensor(name, recorder.outputs[name]) for name in names} if keep_activations else None
        yield GradientBatch(rows, gradients, values.values.detach().cpu(), values.valid.detach().cpu(), forward.geometries, activations)


class _ActivationRecorder:
    """Forward hooks that keep each module's last output (detached) while the context is open."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self.outputs: dict[str, Any] = {}
        self.handles: list[Any] = []

    def _hook(self, name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _args: Any, output: Any) -> None:
            self.outputs[name] = tuple(o.detach() for o in output) if isinstance(output, tuple) else output.detach()

        return record

    def __enter__(self) -> _ActivationRecorder:
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
