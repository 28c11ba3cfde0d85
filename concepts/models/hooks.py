"""Capture layer outputs with forward hooks, and stop the forward pass once all are captured.

Layers are named by dotted module path. A layer whose output is a tuple, list or dict (an FPN,
say) is selected with a suffix: ``backbone.fpn:0``, ``backbone.fpn:pool``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from conceptlens.concepts.errors import LayerError

__all__ = ["StopForward", "LayerRef", "closest_layers", "parse_layer", "resolve_layers", "select_output", "LayerCapture"]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once every requested layer has been captured."""


@dataclass(frozen=True)
class LayerRef:
    """A requested layer: the module path and an optional key into a tuple/dict output."""

    name: str
    module_path: str
    key: str | None


def parse_layer(name: str) -> LayerRef:
    """Split ``"module.path:key"`` into its parts."""
    module_path, _, key = name.partition(":")
    return LayerRef(name=name, module_path=module_path, key=key or None)


def resolve_layers(model: nn.Module, names: Sequence[str]) -> list[LayerRef]:
    """Check that every layer name refers to a submodule of ``model``.

    Raises
    ------
    LayerError
        For an unknown name, listing the closest module paths; for duplicate names.
    """
    if not names:
        raise LayerError("layers", "no layer was requested", "name at least one layer (see `conceptlens layers MODEL`)")
    modules = dict(model.named_modules())
    refs = []
    for name in names:
        ref = parse_layer(name)
        if ref.module_path not in modules or ref.module_path == "":
            close = closest_layers(ref.module_path, [m for m in modules if m])
            hint = f"closest names: {', '.join(close)}" if close else "run `conceptlens layers MODEL` to list them"
            raise LayerError(f"layer {name!r}", f"no such module in {type(model).__name__}", hint)
        refs.append(ref)
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise LayerError(f"layers {duplicates}", "requested more than once", "list each layer once")
    return refs


def closest_layers(name: str, modules: Sequence[str], n: int = 5) -> list[str]:
    """Module paths close to ``name``: the same path under another prefix first, then similar spellings.

    A name from another model (``backbone.body.layer3`` asked of a plain ResNet, or ``layer3`` of
    a Faster R-CNN) differs by a prefix, which edit similarity alone misses.
    """
    if not name:
        return []
    same_tail = [m for m in modules if m.endswith(f".{name}") or name.endswith(f".{m}")]
    last = name.rsplit(".", 1)[-1]
    same_last = [m for m in modules if m.rsplit(".", 1)[-1] == last and len(last) > 2]
    similar = difflib.get_close_matches(name, list(modules), n=n, cutoff=0.5)
    return list(dict.fromkeys([*sorted(same_tail, key=len), *similar, *sorted(same_last, key=len)]))[:n]


def select_output(ref: LayerRef, output: Any) -> torch.Tensor:
    """Pick the tensor a layer reference names from a module's raw output."""
    if ref.key is None:
        if isinstance(output, torch.Tensor):
            return output
        keys = output_keys(output)
        raise LayerError(
            f"layer {ref.name!r}",
            f"outputs a {type(output).__name__}, not a tensor",
            f"select one element: {', '.join(f'{ref.module_path}:{k}' for k in keys)}" if keys else "pick another layer",
        )
    keys = output_keys(output)
    if ref.key not in keys:
        raise LayerError(
            f"layer {ref.name!r}",
            f"output has no element {ref.key!r}",
            f"use one of {', '.join(f'{ref.module_path}:{k}' for k in keys)}" if keys else "drop the ':' suffix",
        )
    value = output[int(ref.key)] if isinstance(output, (tuple, list)) else output[ref.key]
    if not isinstance(value, torch.Tensor):
        raise LayerError(f"layer {ref.name!r}", f"element is a {type(value).__name__}, not a tensor", "pick another element")
    return value


def output_keys(output: Any) -> list[str]:
    """Keys of the tensor elements of a tuple/list/dict output (empty for anything else)."""
    if isinstance(output, dict):
        return [str(k) for k, v in output.items() if isinstance(v, torch.Tensor)]
    if isinstance(output, (tuple, list)):
        return [str(i) for i, v in enumerate(output) if isinstance(v, torch.Tensor)]
    return []


class LayerCapture:
    """Context manager that records the first output of each requested layer during a forward pass.

    Parameters
    ----------
    model : nn.Module
        The model.
    refs : sequence of LayerRef
        Layers to capture (see :func:`resolve_layers`).
    stop_early : bool
        Raise :class:`StopForward` as soon as every layer is captured, so nothing downstream runs.
    detach : bool
        Detach captured tensors (set False to keep the graph for gradients).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    >>> with LayerCapture(model, resolve_layers(model, ["1"])) as capture:
    ...     try:
    ...         model(torch.zeros(2, 3, 8, 8))
    ...     except StopForward:  # the last requested layer ran: the rest of the model is skipped
    ...         pass
    >>> tuple(capture.outputs["1"].shape)
    (2, 4, 8, 8)
    """

    def __init__(self, model: nn.Module, refs: Sequence[LayerRef], stop_early: bool = True, detach: bool = True) -> None:
        self.model = model
        self.refs = list(refs)
        self.stop_early = stop_early
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        modules = dict(self.model.named_modules())
        by_module: dict[str, list[LayerRef]] = {}
        for ref in self.refs:
            by_module.setdefault(ref.module_path, []).append(ref)
        for module_path, refs in by_module.items():
            self._handles.append(modules[module_path].register_forward_hook(self._hook(refs)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget captured outputs before the next batch."""
        self.outputs.clear()

    def _hook(self, refs: list[LayerRef]):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            for ref in refs:
                if ref.name in self.outputs:
                    continue  # a module called again (a shared head): keep its first call
                tensor = select_output(ref, output)
                self.outputs[ref.name] = tensor.detach() if self.detach else tensor
            if self.stop_early and len(self.outputs) == len(self.refs):
                raise StopForward

        return hook

    def check_complete(self) -> None:
        """Raise LayerError for any requested layer that the forward pass never reached."""
        missing = [ref.name for ref in self.refs if ref.name not in self.outputs]
        if missing:
            raise LayerError(
                f"layers {missing}",
                "were not called during the forward pass",
                "pick modules that run in forward (see `conceptlens layers MODEL`)",
            )
