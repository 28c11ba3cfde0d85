"""What this process runs on: the compute device to use and the package versions to record."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch

from conceptlens.concepts.errors import ConceptLensError

__all__ = ["DeviceError", "package_versions", "resolve_device"]

RECORDED_PACKAGES = ("conceptlens", "torch", "torchvision", "numpy", "captum", "scikit-learn")


class DeviceError(ConceptLensError):
    """A requested device that does not exist on this machine."""


def resolve_device(device: str | torch.device = "auto", culprit: str | None = None) -> torch.device:
    """The torch device for ``device``: ``auto`` is CUDA when available, else CPU.

    Parameters
    ----------
    device : str or torch.device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    culprit : str, optional
        How the error names the setting (default ``--device <device>``).

    Raises
    ------
    DeviceError
        CUDA asked for on a machine without it, or a string that is no device.
    """
    name, choice = (culprit, "device='cpu' or 'auto'") if culprit else (f"--device {device}", "--device cpu or auto")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(name, "CUDA is not available on this machine", f"use {choice}")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise DeviceError(name, "not a device", "use auto, cpu, cuda or cuda:N") from error


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages results depend on (provenance of every artifact)."""
    versions = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions
