"""State-dict files: read them without running code, and load them into a module or fail in one line.

:func:`load_state_dict_file` reads ``.safetensors`` or a torch file (``weights_only=True``).
:func:`load_state_into` checks a state dict against a module before torch sees it — values that
are not tensors, a ``module.`` prefix on every key (a ``DataParallel`` checkpoint: stripped, with a
warning), the first tensor whose shape differs (named with both shapes), then missing and
unexpected keys — so that a wrong checkpoint is one :class:`ModelSpecError` line, never torch's
page-long ``RuntimeError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conceptlens.concepts.errors import ModelSpecError

__all__ = ["DATA_PARALLEL_PREFIX", "load_state_dict_file", "load_state_into", "one_line"]

#: The prefix ``nn.DataParallel`` / ``DistributedDataParallel`` puts on every key of a saved state dict.
DATA_PARALLEL_PREFIX = "module."


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (``weights_only=True``, never pickle code).

    Parameters
    ----------
    path : str or Path
        The weights file; a torch file holding ``{"state_dict": {...}}`` is unwrapped.

    Returns
    -------
    dict of str to Tensor

    Raises
    ------
    ModelSpecError
        When the file is missing, a folder, unreadable, or holds something other than a dict.
    """
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


def load_state_into(module: nn.Module, state: Mapping[str, Any], culprit: str, fix: str) -> None:
    """Load ``state`` into ``module`` after checking that it fits; every key must match.

    Parameters
    ----------
    module : nn.Module
        The module to load into.
    state : mapping of str to Tensor
        The state dict, as read from a file.
    culprit : str
        How errors name the weights (``"w.pth (for torchvision:resnet18)"``).
    fix : str
        How to fix a checkpoint that does not fit (missing or unexpected keys, wrong shapes).

    Raises
    ------
    ModelSpecError
        Naming the first value that is not a tensor, the first tensor whose shape differs (with
        both shapes), or the first missing and unexpected keys.

    Warns
    -----
    UserWarning
        When every key carried the ``module.`` prefix of a ``DataParallel`` checkpoint (stripped).
    """
    expected = module.state_dict()
    state = _without_data_parallel_prefix(dict(state), expected, culprit)
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ModelSpecError(culprit, f"entry {name!r} is a {type(value).__name__}, not a tensor", "save model.state_dict() (tensors only)")
    for name in expected:  # in the model's order: the first mismatch is the shallowest
        value = state.get(name)
        if value is not None and tuple(value.shape) != tuple(expected[name].shape):
            raise ModelSpecError(
                culprit,
                f"tensor {name} has shape {_shape(value)} in the file but {_shape(expected[name])} in the model",
                fix,
            )
    try:
        result = module.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, ValueError) as error:  # e.g. a tensor torch cannot copy (complex into float)
        raise ModelSpecError(culprit, f"torch cannot load it ({one_line(error)})", fix) from error
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ModelSpecError(culprit, f"does not match the model: missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})", fix)


def _without_data_parallel_prefix(state: dict[str, Any], expected: Mapping[str, Any], culprit: str) -> dict[str, Any]:
    """``state`` with the ``module.`` prefix removed when every key has it and the model's keys do not."""
    prefix = DATA_PARALLEL_PREFIX
    if not state or not all(key.startswith(prefix) for key in state) or any(key.startswith(prefix) for key in expected):
        return state
    warnings.warn(f"{culprit}: every key starts with {prefix!r} (a DataParallel checkpoint); loaded with the prefix stripped", UserWarning, stacklevel=3)
    return {key[len(prefix):]: value for key, value in state.items()}


def _shape(tensor: torch.Tensor) -> str:
    """``(10, 512)``, ``(5,)``; a scalar as ``()``."""
    return str(tuple(tensor.shape))


def _weights_reason(error: Exception) -> str:
    """One line for a failed weights load; torch's weights_only refusal is a page of advice."""
    if any(cls.__name__ == "UnpicklingError" for cls in type(error).__mro__):  # by name: this package never imports pickle
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((after for before, after in zip(lines, lines[1:]) if before.startswith("Please file an issue") or before.endswith("WeightsUnpickler error:")), "")
        return f"UnpicklingError: torch.load(weights_only=True) refused it, it is not a plain tensor state dict ({detail or 'unsupported content'}); nothing in it was executed"
    return one_line(error)


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (a SyntaxError with its file and line)."""
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg} at {Path(error.filename or '?').name} line {error.lineno}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
