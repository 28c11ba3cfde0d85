"""Image-level CAVs from image sets: embed every set once per layer, then train every CAV in one solve.

:func:`set_activations` embeds concept and random image sets (the store reuses earlier runs) and
returns their image-level activations; :func:`fit_image_cavs` trains one CAV per (concept, random
set) plus the random-vs-random null CAVs of TCAV's significance test, for every layer at once.
Sets come from folders (:class:`~conceptlens.concepts.data.image_sets.ImageSets`) or are drawn from
a dataset with masks (:func:`~conceptlens.concepts.data.concept_sets.concept_image_sets`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.data.image_sets import RANDOM_PREFIX, ImageSets
from conceptlens.concepts.embedding.embed import embed
from conceptlens.concepts.models.loading import LoadedModel, load_model
from conceptlens.concepts.store.temporary import StoreLike, open_store
from conceptlens.probes.linear import CAVError, CAVSet, pooled_activations, train_layer_cavs

__all__ = ["fit_image_cavs", "set_activations"]


def set_activations(
    model: LoadedModel | str | nn.Module,
    sets: Mapping[str, ConceptDataset] | ImageSets,
    layers: str | Sequence[str],
    store: StoreLike = None,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
    *,
    flatten: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """Image-level activations of every image set at every layer: ``{layer: {set: tensor}}``.

    Parameters
    ----------
    model : LoadedModel, str or nn.Module
        A loaded model, a spec string or a plain module (see :func:`~conceptlens.concepts.models.loading.load_model`).
    sets : mapping of str to ConceptDataset, or ImageSets
        The concept and random sets by name (an ``ImageSets`` folder gives all of its sets).
    layers : str or sequence of str
        Layer names.
    store : ActivationStore, str, PathLike or None
        Activation store; None: the session's temporary store.
    batch_size, device, progress
        As for :func:`~conceptlens.concepts.embedding.embed.embed`.
    flatten : bool
        Pooled ``(n, C)`` by default (embedded with ``reduce='mean'``); with ``flatten``, the
        native maps flattened to ``(n, C·h·w)`` (embedded with ``reduce='native'``), the features
        TCAV and captum train their CAVs on (pooled for speed, flattened for fidelity).

    Returns
    -------
    dict of str to dict of str to Tensor
    """
    model = load_model(model)
    layers = [layers] if isinstance(layers, str) else list(layers)
    if isinstance(sets, ImageSets):
        sets = {name: sets.dataset(name) for name in [*sets.concepts, *sets.random_sets]}
    store = open_store(store)
    pooled: dict[str, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    reduce = "native" if flatten else "mean"
    for name, dataset in sets.items():
        result = embed(model, dataset, layers, store, reduce=reduce, batch_size=batch_size, device=device, progress=progress)
        for layer in layers:
            pooled[layer][name] = pooled_activations(result.entries[layer], flatten=flatten)
    return pooled


def fit_image_cavs(
    pooled: Mapping[str, Mapping[str, torch.Tensor]],
    concepts: Sequence[str] | None = None,
    random_sets: Sequence[str] | None = None,
    n_runs: int | None = None,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
) -> dict[str, CAVSet]:
    """One :class:`~conceptlens.probes.linear.CAVSet` per layer: each concept against each random set, plus the null CAVs.

    Parameters
    ----------
    pooled : mapping of str to mapping of str to Tensor
        :func:`set_activations`' result: per layer, per set name, the set's activations.
    concepts : sequence of str, optional
        Concept sets; default: every set whose name does not start with ``random``.
    random_sets : sequence of str, optional
        Random sets; default: every set whose name starts with ``random``.
    n_runs : int, optional
        CAVs per concept (one per random set); default: every random set.
    seed : int
        Seed of the train/test splits of the CAV fits.
    provenance : dict, optional
        Recorded in every set (model hash, store keys …).

    Returns
    -------
    dict of str to CAVSet
    """
    if not pooled:
        raise CAVError("fit_image_cavs", "got no layer's activations", "pass the result of set_activations")
    names = list(next(iter(pooled.values())))
    concepts = list(concepts) if concepts is not None else [n for n in names if not n.startswith(RANDOM_PREFIX)]
    random_sets = list(random_sets) if random_sets is not None else [n for n in names if n.startswith(RANDOM_PREFIX)]
    unknown = [n for n in [*concepts, *random_sets] if n not in names]
    if unknown:
        raise CAVError(f"sets {', '.join(unknown)}", "have no activations", f"use sets of set_activations' result: {', '.join(names)}")
    problems = {layer: ({c: by_set[c] for c in concepts}, {r: by_set[r] for r in random_sets}) for layer, by_set in pooled.items()}
    return train_layer_cavs(problems, n_runs, provenance=provenance, seed=seed)
