"""What this process runs on: the compute device to use and the package versions to record."""

from __future__ import annotations

import platform
import re
from importlib.metadata import PackageNotFoundError, version

import torch

from conceptlens.concepts.errors import ConceptLensError

__all__ = ["SUPPORTED_DEVICES", "DeviceError", "package_versions", "resolve_device"]

RECORDED_PACKAGES = ("conceptlens", "torch", "torchvision", "numpy", "captum", "scikit-learn")


class DeviceError(ConceptLensError):
    """A requested device that does not exist on this machine."""


#: The device names accepted everywhere (``--device``, ``device=``); ``cuda:N`` needs N < the CUDA device count.
SUPPORTED_DEVICES = "auto, cpu, cuda, cuda:N"


def resolve_device(device: str | torch.device = "auto", culprit: str | None = None) -> torch.device:
    """The torch device for ``device``: ``auto`` is CUDA when available, else CPU.

    Only CPU and CUDA are supported: other device types torch knows (``mps``, ``meta``, ``xla``,
    ``xpu`` …) are refused rather than half-working (``meta`` tensors hold no data at all).

    Parameters
    ----------
    device : str or torch.device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N below the number of CUDA devices).
    culprit : str, optional
        How the error names the setting (default ``--device <device>``).

    Raises
    ------
    DeviceError
        A device type other than CPU and CUDA, a malformed name, CUDA on a machine without it, or
        a CUDA index this machine does not have.
    """
    name, choice = (culprit, "device='cpu' or 'auto'") if culprit else (f"--device {device}", "--device cpu or auto")
    text = str(device) if isinstance(device, (str, torch.device)) else None
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text or "")
    if match is None:
        raise DeviceError(name, f"{device!r} is not a supported device (conceptlens runs on CPU or CUDA)", f"use one of {SUPPORTED_DEVICES}")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise DeviceError(name, f"there is one CPU device, not {text}", "use cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(name, "CUDA is not available on this machine", f"use {choice}")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise DeviceError(name, f"this machine has {count} CUDA device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})", f"use cuda:0 … cuda:{count - 1}, or {choice}")
    return torch.device(text)


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages results depend on (provenance of every artifact)."""
    versions = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions
