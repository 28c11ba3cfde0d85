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
    arguments (``input_size``, ``mean``, ``std``, ``antialias``, ``channel_order``, ``value_range``,
    and ``decode``: how a detector's raw output becomes detections, see
    :mod:`conceptlens.concepts.models.decode`). ``weights`` may then be a path to a state dict to load into it.
``<file.onnx>`` / a TorchScript file
    Converted to a hookable ``nn.Module`` through onnx2torch (extra ``conceptlens[onnx]``).
    TorchScript runs compiled code that Python hooks cannot enter, so it is exported to ONNX in
    memory first; its layers are then named after the ONNX nodes.

Builder arguments
-----------------
``torchvision:`` and callable specs take keyword arguments after a ``?``:
``torchvision:resnet18?num_classes=10``, ``my_models.py:build?width=64&pretrained_head=false``
(values are integers, numbers, ``true``/``false`` or strings, parsed without ``eval``; see
:mod:`conceptlens.concepts.models.spec_arguments`). Weights are checked against the built model
before torch loads them (:mod:`conceptlens.concepts.models.state_dicts`).
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from conceptlens.concepts.errors import ModelSpecError, closest_names
from conceptlens.concepts.models.adapters import Adapter, ClassifierAdapter, DetectorAdapter, default_adapter
from conceptlens.concepts.models.decode import USER_FILE_PREFIX
from conceptlens.concepts.models.hooks import output_keys
from conceptlens.concepts.models.spec_arguments import SpecArguments, accepted_arguments, split_spec, spec_with_arguments
from conceptlens.concepts.models.state_dicts import load_state_dict_file, load_state_into
from conceptlens.concepts.models.state_dicts import one_line as _one_line

__all__ = ["LoadedModel", "LayerInfo", "load_model", "model_hash", "list_layers", "load_state_dict_file", "weights_used"]


@dataclass
class LoadedModel:
    """A model in eval mode with its adapter, the spec it came from and, when known, its class names."""

    module: nn.Module
    adapter: Adapter
    spec: str
    weights: str = "none"
    #: Class / label names by output index (ImageNet, COCO, the zoo detectors' objects), or None.
    categories: tuple[str, ...] | None = None
    #: True when the spec brings its own preprocessing (zoo models, torchvision detectors, a callable's adapter): no input size applies.
    own_preprocessing: bool = False
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


def load_model(
    spec: str | nn.Module | LoadedModel,
    weights: str = "none",
    input_size: tuple[int, int] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load the model a spec string names, in eval mode, with its adapter.

    Parameters
    ----------
    spec : str, nn.Module or LoadedModel
        A spec string (see the module docstring), with builder arguments after a ``?``; or your
        own module, put in eval mode and given the default adapter (torchvision detectors: the
        detector adapter; anything else: a classifier adapter with ImageNet normalisation at
        ``input_size``); a loaded model is returned as it is.
    weights : str
        ``none``, ``default`` (torchvision only) or a path to a state dict (``.pth``/``.pt`` loaded
        with ``weights_only=True``, or ``.safetensors``). A ``module.`` prefix on every key
        (``DataParallel``) is stripped with a warning.
    input_size : (int, int), optional
        Input size of the classifier adapter (default 224×224). Refused for a model that brings
        its own preprocessing (zoo models, torchvision detectors, a callable returning an adapter).
    kwargs : mapping, optional
        Builder arguments (a config's ``kwargs:``), added to those of the spec string.

    Returns
    -------
    LoadedModel
        Its ``spec`` is the spec string with every builder argument; ``categories`` the class
        names when known (torchvision's weights metadata, the zoo).

    Raises
    ------
    ModelSpecError
        When the spec cannot be resolved, a builder argument is unknown, the weights are missing
        or do not fit (the first tensor whose shape differs, with both shapes), or an input size
        is given for a model with its own preprocessing; the message says how to fix it.
    """
    if isinstance(spec, LoadedModel):
        return spec
    if input_size is not None:
        _check_input_size(input_size)
    if isinstance(spec, nn.Module):
        built = _given_module(spec, weights, input_size, kwargs)
    elif not isinstance(spec, str):
        raise ModelSpecError(f"model {spec!r}", f"is a {type(spec).__name__}", f"pass an nn.Module or a spec string ({SPEC_FORMS})")
    else:
        base, arguments = split_spec(spec, kwargs)
        built = _built_from_spec(base, arguments, weights, input_size)
        built.spec = spec_with_arguments(spec, kwargs)
    if input_size is not None and built.own_adapter:
        raise _own_preprocessing_error(built.spec, built.adapter, input_size)
    built.module.eval()
    return LoadedModel(module=built.module, adapter=built.adapter, spec=built.spec, weights=weights, categories=built.categories,
                       own_preprocessing=built.own_adapter)


@dataclass
class _Built:
    """A model as built from its spec, before eval mode; ``own_adapter``: its adapter does not use ``input_size``."""

    module: nn.Module
    adapter: Adapter
    spec: str
    own_adapter: bool
    categories: tuple[str, ...] | None = None


def _given_module(module: nn.Module, weights: str, input_size: tuple[int, int] | None, kwargs: Mapping[str, Any] | None) -> _Built:
    spec = _module_spec(module)
    _refuse_arguments(SpecArguments(dict(kwargs or {}), frozenset(kwargs or {})), spec, "a module passed in is already built")
    adapter = default_adapter(module, input_size)
    if weights not in ("none", "default"):
        _load_weights_into(module, weights, spec)
    return _Built(module, adapter, spec, isinstance(adapter, DetectorAdapter))


def _built_from_spec(spec: str, arguments: SpecArguments, weights: str, input_size: tuple[int, int] | None) -> _Built:
    """Build the model of a spec string without its ``?`` arguments (``spec``), given those ``arguments``."""
    shown = spec_with_arguments(spec, arguments.values)  # how errors about the weights name the model
    if spec.startswith("torchvision:"):
        builder = spec.split(":", 1)[1]
        module = _torchvision_model(builder, weights, arguments, shown)
        adapter = default_adapter(module, input_size)
        return _Built(module, adapter, spec, isinstance(adapter, DetectorAdapter), _torchvision_categories(builder, arguments))
    if spec.startswith("zoo:"):
        from conceptlens.concepts.models.zoo import load_zoo_model, zoo_categories

        _refuse_arguments(arguments, spec, "zoo models are built as shipped")
        module, adapter = load_zoo_model(spec.split(":", 1)[1])
        if weights not in ("none", "default"):  # e.g. detectors retrained by `conceptlens train-zoo --out DIR`
            _load_weights_into(module, weights, spec)
        return _Built(module, adapter, spec, True, zoo_categories(spec.split(":", 1)[1]))
    if Path(spec).suffix.lower() == ".onnx" or _is_torchscript(spec):
        _refuse_arguments(arguments, spec, "an ONNX or TorchScript file is already built")
        if weights not in ("none", "default"):
            raise ModelSpecError(f"{weights} (for {spec})", "an ONNX or TorchScript file carries its own weights", "drop --weights (weights=none)")
        module = _converted_model(spec, input_size or (224, 224))
        return _Built(module, ClassifierAdapter(input_size or (224, 224)), spec, False)
    if ":" in spec:
        module, adapter, own = _callable_model(spec, input_size, arguments)
        if weights not in ("none", "default"):
            _load_weights_into(module, weights, shown)
        return _Built(module, adapter, spec, own)
    raise ModelSpecError(f"model {spec!r}", _not_a_spec(spec), f"{_spec_hint(spec)}use {SPEC_FORMS}")


def _refuse_arguments(arguments: SpecArguments, spec: str, why: str) -> None:
    if arguments.values:
        first = next(iter(arguments.values))
        raise ModelSpecError(f"model {spec!r}", f"takes no builder arguments ({why}), got {first}={arguments.values[first]!r} from {arguments.source(first)}",
                             f"drop {first}= (builder arguments are for torchvision: and module:callable specs)")


def _own_preprocessing_error(spec: str, adapter: Adapter, input_size: tuple[int, int]) -> ModelSpecError:
    settings = adapter.settings()
    summary = f"{settings.get('adapter', type(adapter).__name__)} adapter: " + ", ".join(
        f"{key} {_setting_text(value)}" for key, value in settings.items() if key != "adapter")
    return ModelSpecError(
        f"model {spec!r} with input size {input_size[0]}x{input_size[1]}",
        f"the input size would be ignored: {spec} brings its own preprocessing ({summary})",
        f"drop --input-size (input_size: in a config): {spec} brings its own preprocessing",
    )


def _setting_text(value: Any) -> str:
    """``128x128`` for a size pair, ``0.485/0.456/0.406`` for a channel triple, else the value."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, (list, tuple)):
        return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


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


def _torchvision_model(builder_name: str, weights: str, arguments: SpecArguments, shown: str) -> nn.Module:
    """Build torchvision's ``builder_name`` with ``arguments`` and load ``weights``; ``shown`` names it in errors."""
    import torchvision

    available = torchvision.models.list_models()
    if builder_name not in available:
        raise ModelSpecError(f"torchvision:{builder_name}", "no such torchvision builder", closest_names(builder_name, available))
    builder = torchvision.models.get_model_builder(builder_name)
    fixed: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        fixed["weights_backbone"] = None
    _check_builder_arguments(builder_name, builder, arguments, reserved=(*fixed, "progress"))
    if weights == "none":
        with torch.random.fork_rng(devices=[]):  # the same random init on every load, caller's RNG untouched
            torch.manual_seed(0)
            return _call_builder(builder_name, builder, {**fixed, **arguments.values}, arguments)
    if weights == "default":
        path = _torchvision_default_weights_path(builder_name)
        categories = torchvision.models.get_model_weights(builder_name).DEFAULT.meta.get("categories")
        if categories and "num_classes" in inspect.signature(builder).parameters:
            fixed["num_classes"] = len(categories)
        module = _call_builder(builder_name, builder, {**fixed, **arguments.values}, arguments)
        _load_weights_into(module, str(path), shown)
        return module
    module = _call_builder(builder_name, builder, {**fixed, **arguments.values}, arguments)
    _load_weights_into(module, weights, shown)
    return module


def _check_builder_arguments(builder_name: str, builder: Any, arguments: SpecArguments, reserved: tuple[str, ...]) -> None:
    """Refuse the arguments conceptlens sets itself and, for a builder without ``**kwargs``, unknown names."""
    for name in arguments.values:
        if name in reserved:
            raise ModelSpecError(f"torchvision:{builder_name} ({name}= from {arguments.source(name)})", f"{name} is set by conceptlens (weights come from --weights / weights:, nothing is downloaded)",
                                 f"drop {name}=")
    accepted = accepted_arguments(builder)
    if accepted is not None:
        _refuse_unknown(f"torchvision:{builder_name}", builder_name, arguments, [a for a in accepted if a not in reserved])


def _refuse_unknown(spec: str, callable_name: str, arguments: SpecArguments, accepted: list[str]) -> None:
    for name in arguments.values:
        if name not in accepted:
            raise ModelSpecError(f"model {spec!r}", f"{callable_name}() has no argument {name!r} (from {arguments.source(name)})",
                                 closest_names(name, accepted) if accepted else f"drop {name}=: {callable_name}() takes no arguments")


def _call_builder(builder_name: str, builder: Any, kwargs: dict[str, Any], arguments: SpecArguments) -> nn.Module:
    """``builder(**kwargs)``; an unknown or bad builder argument is one line naming the accepted ones."""
    try:
        return builder(**kwargs)
    except TypeError as error:
        if arguments.values and "unexpected keyword argument" in str(error):
            _refuse_unknown(f"torchvision:{builder_name}", builder_name, arguments, _torchvision_arguments(builder_name, builder))
        raise _builder_failed(builder_name, arguments, error) from error
    except Exception as error:  # noqa: BLE001 - a bad argument value fails anywhere inside the builder
        raise _builder_failed(builder_name, arguments, error) from error


def _builder_failed(builder_name: str, arguments: SpecArguments, error: Exception) -> ModelSpecError:
    given = "&".join(f"{key}={value}" for key, value in arguments.values.items())
    return ModelSpecError(f"torchvision:{builder_name}" + (f"?{given}" if given else ""), f"building the model failed ({_one_line(error)})",
                          "check the builder arguments (torchvision's documentation of the builder lists them)")


def _torchvision_arguments(builder_name: str, builder: Any) -> list[str]:
    """Every keyword a torchvision builder accepts: its own and its model class's (found by building it once)."""
    own = [name for name in accepted_arguments(builder, keep_var_keyword=True) or [] if name not in ("weights", "progress", "weights_backbone")]
    kwargs = {"weights": None, **({"weights_backbone": None} if "weights_backbone" in own else {})}
    with torch.random.fork_rng(devices=[]):
        model_class = type(builder(**kwargs))
    return list(dict.fromkeys(own + (accepted_arguments(model_class.__init__, keep_var_keyword=True, optional_only=True) or [])))


def _torchvision_categories(builder_name: str, arguments: SpecArguments) -> tuple[str, ...] | None:
    """The class names of torchvision's weights metadata (offline), when the model keeps their number of classes."""
    import torchvision

    try:
        categories = torchvision.models.get_model_weights(builder_name).DEFAULT.meta.get("categories")
    except (ValueError, KeyError, AttributeError):
        return None
    if not categories or arguments.values.get("num_classes", len(categories)) != len(categories):
        return None
    return tuple(str(name) for name in categories)


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


def _load_weights_into(module: nn.Module, weights: str, spec: str) -> None:
    fix = "use the weights this architecture was trained with"
    base = spec.split("?", 1)[0]
    if base.startswith("torchvision:") or (":" in base and not base.startswith("zoo:") and " (" not in base):  # specs that take builder arguments
        example = f"{base}?num_classes=N" if base.startswith("torchvision:") else f"{base}?name=value"
        fix += f", or build the model as the checkpoint was (builder arguments: {example})"
    load_state_into(module, load_state_dict_file(weights), f"{weights} (for {spec})", fix)


def _callable_model(spec: str, input_size: tuple[int, int] | None, arguments: SpecArguments) -> tuple[nn.Module, Adapter, bool]:
    """The module and adapter a ``module:callable`` / ``file.py:callable`` spec builds; True when the callable chose the adapter."""
    target, _, attribute = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if path.is_dir():
            raise ModelSpecError(f"model {spec!r}", f"{target} is a folder, not a Python file", "name the .py file that defines the callable")
        if not path.is_file():
            raise ModelSpecError(f"model {spec!r}", f"file {target} not found", "check the path")
        module_name = f"{USER_FILE_PREFIX}{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
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
        raise ModelSpecError(f"model {spec!r}", f"{target} has no callable {attribute!r}", closest_names(attribute, names, whole=0))
    accepted = accepted_arguments(factory)
    if accepted is not None:
        _refuse_unknown(spec, attribute, arguments, accepted)
    try:
        built = factory(**arguments.values)
    except Exception as error:  # noqa: BLE001 - the user's callable fails
        raise ModelSpecError(f"model {spec!r}", f"{attribute}() failed ({_one_line(error)})", f"fix {attribute} in {target} (--debug shows the traceback)") from error
    module, adapter_spec = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
    if not isinstance(module, nn.Module):
        raise ModelSpecError(f"model {spec!r}", f"returned a {type(module).__name__}, not an nn.Module", "return an nn.Module (or module, adapter)")
    if isinstance(adapter_spec, Adapter):
        return module, adapter_spec, True
    if isinstance(adapter_spec, dict):
        return module, _adapter_from_dict(adapter_spec, f"model {spec!r}: the adapter dict {attribute}() returned"), True
    if adapter_spec is not None:
        raise ModelSpecError(f"model {spec!r}", f"{attribute}() returned (module, {type(adapter_spec).__name__}): the second item is no adapter",
                             "return (module, Adapter) or (module, dict of ClassifierAdapter arguments)")
    adapter = default_adapter(module, input_size)
    return module, adapter, isinstance(adapter, DetectorAdapter)


def _adapter_from_dict(settings: dict[str, Any], culprit: str) -> ClassifierAdapter:
    """``ClassifierAdapter(**settings)``, its errors naming where the dict came from."""
    from conceptlens.concepts.models.adapters import AdapterError

    try:
        return ClassifierAdapter(**settings)
    except TypeError as error:  # a key that is not an argument of ClassifierAdapter
        accepted = accepted_arguments(ClassifierAdapter.__init__) or []
        unknown = next((key for key in settings if key not in accepted), None)
        if unknown is None:
            raise ModelSpecError(culprit, _one_line(error), f"pass only {', '.join(accepted)} (by name)") from None
        raise ModelSpecError(f"{culprit}, key {unknown!r}", "is not a ClassifierAdapter argument", closest_names(str(unknown), accepted)) from None
    except AdapterError as error:
        raise ModelSpecError(f"{culprit}, key {error.key!r}", error.problem, error.fix) from None


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


def weights_used(spec: str, weights: str = "none") -> str:
    """What the weights of a loaded model actually are, in words (for the console and the report).

    ``weights`` is what was asked for: ``none`` means the spec's own weights, which are real for the
    zoo (shipped or from an installed package) and for ONNX/TorchScript files, and a random
    initialisation for ``torchvision:`` builders.

    Examples
    --------
    >>> weights_used("zoo:synthetic_vgg_centernet")
    'shipped with zoo:synthetic_vgg_centernet'
    >>> weights_used("torchvision:resnet18")
    'none (random initialisation)'
    >>> weights_used("torchvision:resnet18?num_classes=10", "finetuned.pth")
    'finetuned.pth'
    """
    if weights == "default":
        return "torchvision's default weights (local torch hub cache)"
    if weights != "none":
        return weights
    if spec.startswith("zoo:"):
        return f"shipped with {spec}"
    if spec.startswith("torchvision:"):
        return "none (random initialisation)"
    if Path(spec.split("?", 1)[0]).suffix.lower() in (".onnx", ".pt", ".pth", ".ts", ".torchscript"):
        return f"stored in {spec}"
    return f"as built by {spec}"
