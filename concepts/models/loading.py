"""Model specs: load a model with its adapter, hash its weights, list its layers.

Spec strings
------------
``zoo:<name>``
    A model of the embedded zoo (:mod:`conceptlens.concepts.models.zoo`): shipped synthetic-world detectors and the
    real ImageNet pair.
``torchvision:<builder>``
    A torchvision builder (``resnet18``, ``fasterrcnn_resnet50_fpn`` …) with ``weights`` =
    ``none`` (random init, seeded: the same weights on every load), ``default`` (torchvision's default weights file, which must already
    be in torch's hub cache — nothing is downloaded) or a path to a state dict.
``<module>:<callable>`` / ``<file.py>:<callable>``
    A callable returning an ``nn.Module``, or ``(module, adapter)`` where the adapter is an
    :class:`~conceptlens.concepts.models.adapters.Adapter` or a dict of :class:`~conceptlens.concepts.models.adapters.ClassifierAdapter`
    arguments. ``weights`` may then be a path to a state dict to load into it.
``<file.onnx>`` / a TorchScript file
    Converted to a hookable ``nn.Module`` through onnx2torch (extra ``conceptlens[onnx]``).
    TorchScript runs compiled code that Python hooks cannot enter, so it is exported to ONNX in
    memory first; its layers are then named after the ONNX nodes.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import io
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from conceptlens.concepts.models.adapters import Adapter, ClassifierAdapter, default_adapter
from conceptlens.concepts.errors import ModelSpecError
from conceptlens.concepts.models.hooks import output_keys

__all__ = ["LoadedModel", "LayerInfo", "load_model", "model_hash", "list_layers", "load_state_dict_file"]


@dataclass
class LoadedModel:
    """A model in eval mode with its adapter and the spec it came from."""

    module: nn.Module
    adapter: Adapter
    spec: str
    weights: str = "none"
    _hash: str | None = field(default=None, repr=False)

    @property
    def hash(self) -> str:
        """sha256 of the architecture and weights (computed once)."""
        if self._hash is None:
            self._hash = model_hash(self.module)
        return self._hash

    def to(self, device: torch.device) -> LoadedModel:
        """Move the module to ``device`` (in place) and return self."""
        self.module.to(device)
        return self


def model_hash(module: nn.Module) -> str:
    """Hash a module's architecture (its repr) and every state-dict tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(repr(module).encode())
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def load_model(spec: str | nn.Module | LoadedModel, weights: str = "none", input_size: tuple[int, int] | None = None) -> LoadedModel:
    """Load the model a spec string names, in eval mode, with its adapter.

    Parameters
    ----------
    spec : str, nn.Module or LoadedModel
        A spec string (see the module docstring); or your own module, put in eval mode and given
        the default adapter (torchvision detectors: the detector adapter; anything else: a
        classifier adapter with ImageNet normalisation at ``input_size``); a loaded model is
        returned as it is.
    weights : str
        ``none``, ``default`` (torchvision only) or a path to a state dict (``.pth``/``.pt`` loaded
        with ``weights_only=True``, or ``.safetensors``).
    input_size : (int, int), optional
        Input size of the classifier adapter (default 224×224); ignored by detectors.

    Raises
    ------
    ModelSpecError
        When the spec cannot be resolved or the weights are missing; the message says what to
        install or where to put the file.
    """
    if isinstance(spec, LoadedModel):
        return spec
    if input_size is not None:
        _check_input_size(input_size)
    if isinstance(spec, nn.Module):
        module, adapter, spec = spec, default_adapter(spec, input_size), _module_spec(spec)
        if weights not in ("none", "default"):
            _load_weights_into(module, weights, spec)
    elif not isinstance(spec, str):
        raise ModelSpecError(f"model {spec!r}", f"is a {type(spec).__name__}", f"pass an nn.Module or a spec string ({SPEC_FORMS})")
    elif spec.startswith("torchvision:"):
        module = _torchvision_model(spec.split(":", 1)[1], weights)
        adapter = default_adapter(module, input_size)
    elif spec.startswith("zoo:"):
        from conceptlens.concepts.models.zoo import load_zoo_model

        module, adapter = load_zoo_model(spec.split(":", 1)[1])
        if weights not in ("none", "default"):  # e.g. detectors retrained by `conceptlens train-zoo --out DIR`
            _load_weights_into(module, weights, spec)
    elif Path(spec).suffix.lower() == ".onnx" or _is_torchscript(spec):
        if weights not in ("none", "default"):
            raise ModelSpecError(f"{weights} (for {spec})", "an ONNX or TorchScript file carries its own weights", "drop --weights (weights=none)")
        module = _converted_model(spec, input_size or (224, 224))
        adapter = ClassifierAdapter(input_size or (224, 224))
    elif ":" in spec:
        module, adapter = _callable_model(spec, input_size)
        if weights not in ("none", "default"):
            _load_weights_into(module, weights, spec)
    else:
        raise ModelSpecError(f"model {spec!r}", _not_a_spec(spec), f"{_spec_hint(spec)}use {SPEC_FORMS}")
    module.eval()
    return LoadedModel(module=module, adapter=adapter, spec=spec, weights=weights)


def _module_spec(module: nn.Module) -> str:
    """The spec recorded for a module passed in directly: its class, e.g. ``ResNet (torchvision.models.resnet)``."""
    return f"{type(module).__qualname__} ({type(module).__module__})"


def _check_input_size(input_size: Any) -> None:
    try:
        valid = len(input_size) == 2 and all(int(v) == v and v >= 1 for v in input_size)
    except TypeError:
        valid = False
    if not valid:
        raise ModelSpecError(f"input size {input_size!r}", "must be two positive integers (height, width)", "pass e.g. --input-size 224 224")


SPEC_FORMS = "torchvision:<builder>, zoo:<name>, <module>:<callable>, <file.py>:<callable>, a .onnx file or a TorchScript file"


def _not_a_spec(spec: str) -> str:
    path = Path(spec)
    if path.is_dir():
        return "is a folder, not a model spec or model file"
    if path.is_file():
        return "is a file but neither ONNX (.onnx) nor TorchScript"
    if path.suffix:
        return "no such model file, and not a model spec"
    return "not a model spec"


def _spec_hint(spec: str) -> str:
    """``did you mean torchvision:resnet18? `` for a bare builder or zoo name, else ''."""
    import torchvision

    from conceptlens.concepts.models.zoo import ZOO

    if spec in ZOO:
        return f"did you mean zoo:{spec}? "
    builders = torchvision.models.list_models()
    if spec in builders:
        return f"did you mean torchvision:{spec}? "
    close = difflib.get_close_matches(spec, builders, n=1)
    return f"did you mean torchvision:{close[0]}? " if close and not Path(spec).suffix else ""


def _torchvision_model(builder_name: str, weights: str) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if builder_name not in available:
        close = difflib.get_close_matches(builder_name, available, n=5)
        raise ModelSpecError(
            f"torchvision:{builder_name}",
            "no such torchvision builder",
            f"closest: {', '.join(close)}" if close else "see torchvision.models.list_models()",
        )
    builder = torchvision.models.get_model_builder(builder_name)
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    if weights == "none":
        with torch.random.fork_rng(devices=[]):  # the same random init on every load, caller's RNG untouched
            torch.manual_seed(0)
            return builder(**kwargs)
    if weights == "default":
        path = _torchvision_default_weights_path(builder_name)
        categories = torchvision.models.get_model_weights(builder_name).DEFAULT.meta.get("categories")
        if categories and "num_classes" in inspect.signature(builder).parameters:
            kwargs["num_classes"] = len(categories)
        module = builder(**kwargs)
        _load_weights_into(module, str(path), f"torchvision:{builder_name}")
        return module
    module = builder(**kwargs)
    _load_weights_into(module, weights, f"torchvision:{builder_name}")
    return module


def _torchvision_default_weights_path(builder_name: str) -> Path:
    """Where torchvision would cache the default weights; error when the file is not there."""
    import torchvision

    url = torchvision.models.get_model_weights(builder_name).DEFAULT.url
    file_name = url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not path.is_file():
        raise ModelSpecError(
            f"torchvision:{builder_name} weights=default",
            f"the weights file {file_name} is not on this machine (conceptlens never downloads)",
            f"copy {file_name} to {path.parent}/ or pass weights=<path to a state dict>",
        )
    expected = file_name.rsplit("-", 1)[-1].split(".")[0]
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if len(expected) >= 8 and not actual.startswith(expected):
        raise ModelSpecError(str(path), f"sha256 starts with {actual[:8]}, expected {expected}", "replace the file with an intact copy")
    return path


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (``weights_only=True``, never pickle code)."""
    path = Path(path)
    if path.is_dir():
        raise ModelSpecError(str(path), "is a folder, not a weights file", "give the path of a state dict file (.pt, .pth or .safetensors), or use weights=none")
    if not path.is_file():
        raise ModelSpecError(str(path), "weights file not found", "check the path, or use weights=none")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the file is unusable
        raise ModelSpecError(str(path), f"cannot read weights ({_weights_reason(error)})", "give a state dict saved with torch.save or safetensors") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelSpecError(str(path), f"holds a {type(state).__name__}, not a state dict", "save model.state_dict()")
    return state


def _weights_reason(error: Exception) -> str:
    """One line for a failed weights load; torch's weights_only refusal is a page of advice."""
    if any(cls.__name__ == "UnpicklingError" for cls in type(error).__mro__):  # by name: this package never imports pickle
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((after for before, after in zip(lines, lines[1:]) if before.startswith("Please file an issue") or before.endswith("WeightsUnpickler error:")), "")
        return f"UnpicklingError: torch.load(weights_only=True) refused it, it is not a plain tensor state dict ({detail or 'unsupported content'}); nothing in it was executed"
    return _one_line(error)


def _load_weights_into(module: nn.Module, weights: str, spec: str) -> None:
    state = load_state_dict_file(weights)
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelSpecError(
            f"{weights} (for {spec})",
            f"does not match the model: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}",
            "use the weights this architecture was trained with",
        )


def _callable_model(spec: str, input_size: tuple[int, int] | None) -> tuple[nn.Module, Adapter]:
    target, _, attribute = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if path.is_dir():
            raise ModelSpecError(f"model {spec!r}", f"{target} is a folder, not a Python file", "name the .py file that defines the callable")
        if not path.is_file():
            raise ModelSpecError(f"model {spec!r}", f"file {target} not found", "check the path")
        module_name = f"conceptlens_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        python_module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = python_module
        try:
            loader_spec.loader.exec_module(python_module)
        except Exception as error:  # noqa: BLE001 - any failure in the user's file is reported as such
            sys.modules.pop(module_name, None)
            raise ModelSpecError(f"model {spec!r}", f"running {target} failed ({_one_line(error)})", f"fix {target} (--debug shows the traceback)") from error
    else:
        try:
            python_module = importlib.import_module(target)
        except ImportError as error:
            raise ModelSpecError(f"model {spec!r}", f"cannot import {target} ({error})", "install the package or fix the module path") from error
        except Exception as error:  # noqa: BLE001 - the module itself fails while importing
            raise ModelSpecError(f"model {spec!r}", f"importing {target} failed ({_one_line(error)})", f"fix {target} (--debug shows the traceback)") from error
    factory = getattr(python_module, attribute, None)
    if not callable(factory):
        names = [n for n in dir(python_module) if not n.startswith("_")]
        close = difflib.get_close_matches(attribute, names, n=5)
        raise ModelSpecError(f"model {spec!r}", f"{target} has no callable {attribute!r}", f"closest: {', '.join(close)}" if close else "check the name")
    try:
        built = factory()
    except Exception as error:  # noqa: BLE001 - the user's callable fails
        raise ModelSpecError(f"model {spec!r}", f"{attribute}() failed ({_one_line(error)})", f"fix {attribute} in {target} (--debug shows the traceback)") from error
    module, adapter_spec = built if isinstance(built, tuple) else (built, None)
    if not isinstance(module, nn.Module):
        raise ModelSpecError(f"model {spec!r}", f"returned a {type(module).__name__}, not an nn.Module", "return an nn.Module (or module, adapter)")
    if isinstance(adapter_spec, Adapter):
        return module, adapter_spec
    if isinstance(adapter_spec, dict):
        return module, ClassifierAdapter(**adapter_spec)
    return module, default_adapter(module, input_size)


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (a SyntaxError with its file and line)."""
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg} at {Path(error.filename or '?').name} line {error.lineno}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _is_torchscript(spec: str) -> bool:
    path = Path(spec)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def _converted_model(spec: str, input_size: tuple[int, int]) -> nn.Module:
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as error:
        raise ModelSpecError(f"model {spec!r}", "ONNX and TorchScript models need onnx and onnx2torch", "pip install 'conceptlens[onnx]'") from error
    path = Path(spec)
    if path.is_dir():
        raise ModelSpecError(str(path), "is a folder, not a model file", "give the path of the .onnx or TorchScript file")
    if not path.is_file():
        raise ModelSpecError(str(path), "model file not found", "check the path")
    if path.suffix.lower() == ".onnx":
        try:
            graph = onnx.load(str(path))
        except Exception as error:  # noqa: BLE001 - protobuf decode errors mean "not an ONNX file"
            raise ModelSpecError(str(path), f"not a valid ONNX model ({_one_line(error)})", "export the model again (torch.onnx.export) or give the right file") from error
    else:
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # noqa: BLE001 - a damaged archive fails in many ways
            raise ModelSpecError(str(path), f"not a loadable TorchScript file ({_one_line(error)})", "save the model again with torch.jit.save") from error
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(scripted, (torch.zeros(1, 3, *input_size),), buffer, dynamo=False)
        graph = onnx.load_from_string(buffer.getvalue())
    try:
        return convert(graph)
    except Exception as error:  # noqa: BLE001 - onnx2torch raises bare errors for unsupported graphs
        fix = "export with a supported opset (opset_version=17) or load the model from Python (module:callable)"
        raise ModelSpecError(str(path), f"onnx2torch cannot convert it ({_one_line(error)})", fix) from error


@dataclass(frozen=True)
class LayerInfo:
    """One hookable layer: name, module type, output shape of one image, call count."""

    name: str
    module_type: str
    shape: tuple[int, ...] | None
    calls: int

    @property
    def channels(self) -> int | None:
        """Channel count (dimension 1 of the output) when the output is a tensor of rank ≥ 2."""
        return self.shape[1] if self.shape and len(self.shape) >= 2 else None


def list_layers(model: LoadedModel, input_size: tuple[int, int] = (224, 224)) -> list[LayerInfo]:
    """List every submodule in execution order with its output shape, from one dry run.

    Tuple/list/dict outputs (FPN levels, say) are listed once per tensor element with a
    ``:key`` suffix, the name to use when requesting that element.
    """
    order: list[str] = []
    shapes: dict[str, Any] = {}
    calls: dict[str, int] = {}
    types: dict[str, str] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, _args: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name not in shapes:
                order.append(name)
                types[name] = type(module).__name__
                shapes[name] = _describe_output(output)

        return hook

    for name, module in model.module.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name)))
    try:
        device = next(model.module.parameters(), torch.empty(0)).device
        image = np.random.default_rng(0).integers(0, 256, (*input_size, 3), dtype=np.uint8)
        inputs = model.adapter.prepare([image], device)
        with torch.no_grad():
            model.adapter.forward(model.module, inputs, [tuple(input_size)])
    except (RuntimeError, ValueError, IndexError) as error:
        raise ModelSpecError(
            f"model {model.spec!r}",
            f"the forward pass on one {input_size[0]}x{input_size[1]} image failed ({_one_line(error)})",
            "pass the input size the model expects (--input-size H W); --debug shows the traceback",
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    layers = []
    for name in order:
        described = shapes[name]
        if isinstance(described, dict):
            layers.append(LayerInfo(name, types[name], None, calls[name]))
            layers.extend(LayerInfo(f"{name}:{key}", types[name], shape, calls[name]) for key, shape in described.items())
        else:
            layers.append(LayerInfo(name, types[name], described, calls[name]))
    return layers


def _describe_output(output: Any) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    keys = output_keys(output)
    if not keys:
        return None
    if isinstance(output, dict):
        return {key: tuple(output[key].shape) for key in keys}
    return {key: tuple(output[int(key)].shape) for key in keys}
