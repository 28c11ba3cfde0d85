"""Concept vectors of one (model, layer, method): the :class:`ConceptBank`.

A bank holds K concept vectors over the C channels of a layer, their biases, an optional
per-channel standardisation, per-concept metrics, the provenance of everything, and the name of
its *projection* (:mod:`conceptlens.concepts.vectors.projections`): how activations become
concept maps. ``sigmoid_affine`` banks (Net2Vec pixel probes, image-level CAVs) give
probabilities ``σ(w·a + b)``; ``nnls_codes`` banks (NMF, NCAVs) give the non-negative
least-squares codes of each pixel vector. ``method`` only records which learner produced the bank.

Saved as ``<name>.safetensors`` (tensors) + ``<name>.json`` (metadata and the tensor file's
sha256); loading never unpickles and checks format version, checksum and shapes. Bank files
written before banks recorded their projection load with the projection their method always had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.geometry import Geometry, features_to_grid
from conceptlens.concepts.store.artifacts import (
    artifact_paths,
    read_artifact,
    write_artifact,
)
from conceptlens.concepts.store.schema import Anything, Bool, Int, ListOf, MapOf, Record, Str
from conceptlens.concepts.vectors.projections import (
    ProjectionError,
    get_projection,
    projection_names,
)

__all__ = ["BANK_FORMAT_VERSION", "LEGACY_PROJECTIONS", "BankError", "ConceptBank", "nnls"]

BANK_FORMAT_VERSION = 1
BANK_KIND = "concept bank"
# The projection of each method from before banks recorded one: what a bank file without a
# ``projection`` key (or a bank built without one) of these methods has always meant.
LEGACY_PROJECTIONS = {"net2vec": "sigmoid_affine", "linear": "sigmoid_affine", "nmf": "nnls_codes"}
# The shape of a bank's JSON (keys of other versions are allowed); the tensors are checked on load.
BANK_SCHEMA = Record(
    {"method": Str(non_empty=True), "layer": Str(), "concepts": ListOf(Str()), "n_channels": Int(min=1), "tensors_sha256": Str()},
    optional={"projection": Str(non_empty=True), "standardized": Bool(), "metrics": MapOf(MapOf(Anything())), "provenance": MapOf(Anything())},
)
_RETRAIN = "train the bank again (check the activations it was trained on for NaN or infinity)"


class BankError(ConceptLensError):
    """A concept bank is malformed, corrupt, or does not fit the activations it is given."""


@dataclass
class ConceptBank:
    """Concept vectors of one layer.

    Attributes
    ----------
    method : str
        The learner that produced the vectors (a name of the probe registry,
        :mod:`conceptlens.probes.registry`: ``'net2vec'``, ``'linear'``, ``'nmf'`` or a registered one).
    layer : str
        Layer name the vectors live in.
    concepts : list of str
        Concept names (for NMF: ``ncav_0`` …; the matched known concept is in ``metrics``).
    vectors : Tensor
        ``(K, C)`` float32.
    biases : Tensor
        ``(K,)`` float32 (zeros for NMF).
    channel_mean, channel_std : Tensor or None
        ``(C,)`` standardisation applied to activations before the vectors, when used.
    metrics : dict
        Per concept name: metric name -> value.
    provenance : dict
        Store key, model hash, method hyper-parameters, seed, data split, package versions.
    projection : str
        How :meth:`concept_maps` turns activations into maps: a name registered in
        :mod:`conceptlens.concepts.vectors.projections` (``'sigmoid_affine'``, ``'nnls_codes'``).
        Default: the method's projection in ``LEGACY_PROJECTIONS`` (required for other methods).
    """

    method: str
    layer: str
    concepts: list[str]
    vectors: torch.Tensor
    biases: torch.Tensor
    channel_mean: torch.Tensor | None = None
    channel_std: torch.Tensor | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    projection: str | None = None

    def __post_init__(self) -> None:
        self.vectors = torch.as_tensor(self.vectors, dtype=torch.float32).detach().cpu()
        self.biases = torch.as_tensor(self.biases, dtype=torch.float32).detach().cpu()
        self.concepts = list(self.concepts)
        self.projection = self._resolved_projection()
        self._check()

    def _resolved_projection(self) -> str:
        name = f"concept bank ({self.method}, layer {self.layer!r})"
        if not isinstance(self.method, str) or not self.method:
            raise BankError(name, f"has method {self.method!r}", "name the learner that produced the bank, e.g. 'net2vec'")
        if self.projection is None and self.method not in LEGACY_PROJECTIONS:
            raise BankError(
                name, f"unknown method {self.method!r} with no projection",
                f"pass projection= (one of {', '.join(projection_names())}), or use a method of {', '.join(LEGACY_PROJECTIONS)}",
            )
        projection = LEGACY_PROJECTIONS[self.method] if self.projection is None else self.projection
        try:
            get_projection(projection)
        except ProjectionError as error:
            raise BankError(name, f"has projection {projection!r}, which is not registered", error.fix) from None
        return projection

    def _check(self) -> None:
        name = f"concept bank ({self.method}, layer {self.layer!r})"
        if self.vectors.dim() != 2 or self.vectors.shape[0] != len(self.concepts):
            raise BankError(name, f"vectors have shape {tuple(self.vectors.shape)} for {len(self.concepts)} concepts", "give a (K, C) tensor")
        if self.biases.shape != (len(self.concepts),):
            raise BankError(name, f"biases have shape {tuple(self.biases.shape)}", f"give {len(self.concepts)} biases")
        duplicates = sorted({c for c in self.concepts if self.concepts.count(c) > 1})
        if duplicates:
            raise BankError(name, f"duplicate concept names {duplicates}", "give every concept a unique name")
        for stat in (self.channel_mean, self.channel_std):
            if stat is not None and tuple(stat.shape) != (self.n_channels,):
                raise BankError(name, f"standardisation has shape {tuple(stat.shape)}", f"give ({self.n_channels},) statistics")

    def check_finite(self, culprit: str) -> None:
        """Raise :class:`BankError` naming ``culprit`` and the concepts whose numbers are not all finite.

        A concept's vector and bias must be finite; the standardisation (when there is one) must be
        finite with positive deviations, else every concept's maps are undefined.
        """
        rows = ~torch.isfinite(self.vectors).all(dim=1) | ~torch.isfinite(self.biases)
        bad = [concept for concept, wrong in zip(self.concepts, rows.tolist()) if wrong]
        if bad:
            raise BankError(culprit, f"concepts {bad} have vectors or biases that are not finite (NaN or infinity)", _RETRAIN)
        if self.channel_mean is not None and not (torch.isfinite(self.channel_mean).all() and torch.isfinite(self.channel_std).all() and (self.channel_std > 0).all()):
            raise BankError(culprit, f"standardisation of concepts {self.concepts} is not finite and positive (NaN, infinity or a zero deviation)", _RETRAIN)

    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    @property
    def n_channels(self) -> int:
        return int(self.vectors.shape[1])

    def check_activations(self, activations: torch.Tensor) -> None:
        """Raise BankError unless ``activations`` (B, C, ...) have this bank's channel count."""
        if activations.dim() < 2 or activations.shape[1] != self.n_channels:
            raise BankError(
                f"concept bank for layer {self.layer!r}",
                f"expects {self.n_channels} channels, activations have shape {tuple(activations.shape)}",
                "use the bank trained on this layer (and model)",
            )

    def standardize(self, activations: torch.Tensor) -> torch.Tensor:
        """Apply the stored per-channel standardisation (identity when there is none)."""
        if self.channel_mean is None:
            return activations
        shape = (1, -1) + (1,) * (activations.dim() - 2)
        mean = self.channel_mean.to(activations).view(shape)
        std = self.channel_std.to(activations).view(shape)
        return (activations - mean) / std

    def logits(self, activations: torch.Tensor) -> torch.Tensor:
        """Linear concept scores ``w·a + b`` per position: (B, C, ...) -> (B, K, ...)."""
        self.check_activations(activations)
        inputs = self.standardize(activations.float())
        scores = torch.einsum("kc,bc...->bk...", self.vectors.to(inputs.device), inputs)
        return scores + self.biases.to(inputs.device).view((1, -1) + (1,) * (inputs.dim() - 2))

    def concept_maps(
        self,
        activations: torch.Tensor,
        geometries: Sequence[Geometry] | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Project activations (B, C, h, w) to concept maps (B, K, h, w), or on the concept grid.

        The bank's projection decides the maps: ``sigmoid_affine`` gives probabilities
        ``σ(w·a + b)`` (on a grid the logits are upsampled first: bilinear resampling commutes with
        the affine map, so this equals probing upsampled activations); ``nnls_codes`` gives the
        non-negative least-squares codes of each pixel vector.
        """
        projection = get_projection(self.projection)
        maps = projection.scores(self, activations)
        if grid is not None:
            if geometries is None:
                raise BankError("concept_maps", "a grid needs the images' geometries", "pass geometries from the store")
            maps = features_to_grid(maps, geometries, grid)
        return projection.finish(maps)

    @property
    def map_kind(self) -> str:
        """What a value of :meth:`concept_maps` is: ``'probability'``, ``'ncav'`` (non-negative codes), …"""
        return get_projection(self.projection).map_kind

    def nmf_maps(self, activations: torch.Tensor) -> torch.Tensor:
        """Non-negative coefficients ``S(x) = argmin_{S≥0} ‖A(x) − S·P‖`` per pixel: (B, K, h, w)."""
        self.check_activations(activations)
        batch, channels = activations.shape[:2]
        pixels = activations.float().clamp(min=0).movedim(1, -1).reshape(-1, channels)
        coefficients = nnls(pixels, self.vectors.to(pixels.device))
        return coefficients.reshape(batch, *activations.shape[2:], -1).movedim(-1, 1)

    # ----------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json`` atomically; return the JSON path.

        A bank whose vectors, biases or standardisation hold NaN or infinity is refused
        (:class:`BankError` naming the concepts), never written.
        """
        self.check_finite(f"concept bank ({self.method}, layer {self.layer!r})")
        tensors = {"vectors": self.vectors, "biases": self.biases}
        if self.channel_mean is not None:
            tensors["channel_mean"] = self.channel_mean.float()
            tensors["channel_std"] = self.channel_std.float()
        metadata = {
            "method": self.method,
            "projection": self.projection,
            "layer": self.layer,
            "concepts": self.concepts,
            "n_channels": self.n_channels,
            "standardized": self.channel_mean is not None,
            "metrics": self.metrics,
            "provenance": self.provenance,
        }
        return write_artifact(path, BANK_KIND, BANK_FORMAT_VERSION, tensors, metadata)

    @classmethod
    def load(cls, path: str | Path, expected_channels: int | None = None, model_hash: str | None = None) -> ConceptBank:
        """Load a bank saved by :meth:`save`, checking format, checksum and shapes.

        Parameters
        ----------
        path : path
            ``<name>``, ``<name>.json`` or ``<name>.safetensors``.
        expected_channels : int, optional
            Fail unless the bank has this many channels (the layer's width).
        model_hash : str, optional
            Fail unless the bank was trained on the model with this hash.
        """
        metadata, tensors = read_artifact(
            path, BANK_KIND, BANK_FORMAT_VERSION, ("method", "layer", "concepts", "n_channels"), BankError, accept_missing_kind=True,
            schema=BANK_SCHEMA,
        )
        json_path, tensor_path = artifact_paths(path)
        if "vectors" not in tensors or "biases" not in tensors:
            raise BankError(str(tensor_path), "missing the vectors or biases tensor", "save the bank again")
        bank = cls(
            method=metadata["method"],
            layer=metadata["layer"],
            concepts=metadata["concepts"],
            vectors=tensors["vectors"],
            biases=tensors["biases"],
            channel_mean=tensors.get("channel_mean"),
            channel_std=tensors.get("channel_std"),
            metrics=metadata.get("metrics", {}),
            provenance=metadata.get("provenance", {}),
            projection=metadata.get("projection"),  # absent from files written before banks recorded it
        )
        bank.check_finite(str(tensor_path))
        if bank.n_channels != metadata["n_channels"]:
            raise BankError(str(tensor_path), f"holds {bank.n_channels} channels, its JSON says {metadata['n_channels']}", "save the bank again")
        if expected_channels is not None and bank.n_channels != expected_channels:
            raise BankError(
                str(json_path),
                f"was trained on a layer with {bank.n_channels} channels, this layer has {expected_channels}",
                f"use a bank trained on this layer (it was trained on {bank.layer!r})",
            )
        trained_on = bank.provenance.get("model_hash")
        if model_hash is not None and trained_on != model_hash:
            raise BankError(
                str(json_path),
                f"was trained on model {str(trained_on)[:12]}, not {model_hash[:12]}",
                "train the bank on this model, or load the model it was trained on",
            )
        return bank


def nnls(targets: torch.Tensor, basis: torch.Tensor, iterations: int = 200, tolerance: float | None = None) -> torch.Tensor:
    """Solve ``min_{S≥0} ‖targets − S·basis‖_F`` row by row (HALS coordinate descent, batched).

    Parameters
    ----------
    targets : Tensor
        ``(N, C)`` rows to explain.
    basis : Tensor
        ``(K, C)`` non-negative basis (NCAVs).
    iterations : int
        Maximum sweeps over the K coordinates.
    tolerance : float, optional
        Stop when no coefficient changes by more than this (relative to the largest); default
        100 machine epsilons of the dtype (≈1e-5 in float32, where smaller changes are noise).

    Returns
    -------
    Tensor
        ``(N, K)`` non-negative coefficients.
    """
    if tolerance is None:
        tolerance = 100 * torch.finfo(targets.dtype).eps
    gram = basis @ basis.T
    cross = targets @ basis.T
    diagonal = gram.diagonal().clamp(min=1e-12)
    coefficients = (cross / diagonal).clamp(min=0)
    for _ in range(iterations):
        largest_change = torch.zeros((), device=targets.device)
        for j in range(basis.shape[0]):
            update = (cross[:, j] - coefficients @ gram[:, j]) / diagonal[j]
            new = (coefficients[:, j] + update).clamp(min=0)
            largest_change = torch.maximum(largest_change, (new - coefficients[:, j]).abs().max())
            coefficients[:, j] = new
        if largest_change <= tolerance * coefficients.abs().max().clamp(min=1e-12):
            break
    return coefficients
