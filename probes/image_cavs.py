"""Image-level CAVs from image sets: embed every set once per layer, then train every CAV in one solve.

:func:`set_activations` embeds concept and random image sets (the store reuses earlier runs) and
returns their image-level activations; :func:`fit_image_cavs` trains one CAV per (concept, random
set) plus the random-vs-random null CAVs of TCAV's significance test (by default one for every
pair of random sets, which makes the permutation test of :mod:`conceptlens.attribution.tcav`
exact), for every layer at once. :func:`fit_cav_variants` trains the variants of TCAV's
robustness check (pooled / flattened features, logistic / SVM, half the random sets).
Sets come from folders (:class:`~conceptlens.concepts.data.image_sets.ImageSets`) or are drawn from
a dataset with masks (:func:`~conceptlens.concepts.data.concept_sets.concept_image_sets`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.errors import closest_names
from conceptlens.concepts.data.image_sets import RANDOM_PREFIX, ImageSets
from conceptlens.concepts.embedding.embed import embed
from conceptlens.concepts.models.loading import LoadedModel, load_model
from conceptlens.concepts.store.temporary import StoreLike, open_store
from conceptlens.probes.linear import CAVError, CAVSet, pooled_activations, train_layer_cavs

__all__ = ["NULL_PAIRS", "VARIANTS", "fit_cav_variants", "fit_image_cavs", "restrict_random_sets", "set_activations"]

#: ``ring``: random set ``r`` vs ``r + 1`` (R null CAVs); ``all``: every pair (R(R − 1)/2).
NULL_PAIRS = ("ring", "all")
#: The variants of :func:`fit_cav_variants`.
VARIANTS = ("pooled", "flattened", "svm", "half_random_sets")


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
    null_pairs: str = "all",
    **params: Any,
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
    null_pairs : {'all', 'ring'}
        Random-vs-random CAVs: the ring ``r_i`` vs ``r_{i+1 mod R}`` first, then (``'all'``) every
        other pair ``r_i`` vs ``r_j`` (``i < j``; split seeds ``seed``, ``seed + 1`` … over the
        ``j`` of each ``i``), so that the
        permutation test is exact; ``'ring'``: the ring only (R CAVs instead of R(R − 1)/2).
    **params
        :class:`~conceptlens.probes.linear.LinearCAV` parameters (``classifier``, ``solver`` …).

    Returns
    -------
    dict of str to CAVSet
    """
    if null_pairs not in NULL_PAIRS:
        raise CAVError(f"null_pairs={null_pairs!r}", "is not a pairing", f"use one of {NULL_PAIRS}")
    if not pooled:
        raise CAVError("fit_image_cavs", "got no layer's activations", "pass the result of set_activations")
    names = list(next(iter(pooled.values())))
    concepts = list(concepts) if concepts is not None else [n for n in names if not n.startswith(RANDOM_PREFIX)]
    random_sets = list(random_sets) if random_sets is not None else [n for n in names if n.startswith(RANDOM_PREFIX)]
    unknown = [n for n in [*concepts, *random_sets] if n not in names]
    if unknown:
        raise CAVError(f"sets {', '.join(unknown)}", "have no activations", f"use sets of set_activations' result: {closest_names(unknown[0], names)}")
    if n_runs is not None:
        if not (isinstance(n_runs, int) and 1 <= n_runs <= len(random_sets)):
            raise CAVError(f"n_runs={n_runs!r}", f"must be between 1 and the {len(random_sets)} random sets given", "give more random sets or fewer runs")
        random_sets = random_sets[:n_runs]
    problems = {layer: ({c: by_set[c] for c in concepts}, {r: by_set[r] for r in random_sets}) for layer, by_set in pooled.items()}
    extra = _extra_null_problems(pooled, random_sets) if null_pairs == "all" else {}
    trained = train_layer_cavs({**problems, **extra}, None, provenance=provenance, seed=seed, **params)
    return {layer: _with_extra_pairs(trained[layer], trained, layer, random_sets) for layer in pooled}


_NULL_KEY = "\x00null"


def _extra_null_problems(pooled: Mapping[str, Mapping[str, torch.Tensor]], random_sets: Sequence[str]) -> dict[str, tuple[dict, dict]]:
    """Per layer and random set ``i``: ``r_i`` against every ``r_j`` (``j > i``) not in the ring."""
    r, problems = len(random_sets), {}
    for layer, by_set in pooled.items():
        for i, name in enumerate(random_sets):
            others = [random_sets[j] for j in range(i + 2, r) if not (i == 0 and j == r - 1)]
            if others:
                problems[f"{layer}{_NULL_KEY}{i}"] = ({f"{_NULL_KEY}{name}": by_set[name]}, {o: by_set[o] for o in others})
    return problems


def _with_extra_pairs(cav_set: CAVSet, trained: Mapping[str, CAVSet], layer: str, random_sets: Sequence[str]) -> CAVSet:
    """``cav_set`` with the extra pairs' CAVs appended to its null CAVs."""
    extra = [trained[key] for key in (f"{layer}{_NULL_KEY}{i}" for i in range(len(random_sets))) if key in trained]
    if not extra:
        return cav_set
    pairs = [(e.concepts[0][len(_NULL_KEY):], b) for e in extra for b in e.random_sets]
    return dataclasses.replace(
        cav_set,
        random_pairs=[*cav_set.random_pairs, *pairs],
        random_vectors=torch.cat([cav_set.random_vectors, *(e.vectors[0] for e in extra)]),
        random_biases=torch.cat([cav_set.random_biases, *(e.biases[0] for e in extra)]),
        random_accuracies=torch.cat([cav_set.random_accuracies, *(e.accuracies[0] for e in extra)]),
    )


def restrict_random_sets(cav_set: CAVSet, n: int) -> CAVSet:
    """The CAV set with its first ``n`` random sets only: their concept runs and the null CAVs
    between them (no retraining). Every pair stays present if it was."""
    if not 1 <= n <= cav_set.n_runs:
        raise CAVError(f"n={n}", f"must be between 1 and the set's {cav_set.n_runs} random sets", "keep fewer random sets")
    kept = set(cav_set.random_sets[:n])
    rows = [i for i, (a, b) in enumerate(cav_set.random_pairs) if a in kept and b in kept and (n > 1)]
    index = torch.tensor(rows, dtype=torch.long)
    return dataclasses.replace(
        cav_set, random_sets=cav_set.random_sets[:n], vectors=cav_set.vectors[:, :n], biases=cav_set.biases[:, :n],
        accuracies=cav_set.accuracies[:, :n], random_pairs=[cav_set.random_pairs[i] for i in rows],
        random_vectors=cav_set.random_vectors[index], random_biases=cav_set.random_biases[index],
        random_accuracies=cav_set.random_accuracies[index],
    )


def fit_cav_variants(
    pooled: Mapping[str, Mapping[str, torch.Tensor]],
    flattened: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    concepts: Sequence[str] | None = None,
    random_sets: Sequence[str] | None = None,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
    variants: Sequence[str] = VARIANTS,
    **params: Any,
) -> dict[str, dict[str, CAVSet]]:
    """The CAV sets of TCAV's robustness check, from already-embedded set activations.

    Variants: ``pooled`` (the base: logistic CAVs on pooled features), ``flattened`` (the same on
    flattened maps; needs ``flattened``, skipped without it), ``svm`` (pooled, linear SVM),
    ``half_random_sets`` (the pooled CAVs restricted to the first ⌈R/2⌉ random sets, no
    retraining). Every variant has all null pairs. Score them with
    :func:`conceptlens.attribution.tcav.tcav_robustness` (one gradient pass for all).

    Returns
    -------
    dict of str to dict of str to CAVSet
        Variant → layer → CAVs, in the order of ``variants``.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise CAVError(f"variants {', '.join(unknown)}", "are not CAV variants", f"use {', '.join(VARIANTS)}")
    params = {k: v for k, v in params.items() if k != "classifier"}
    common = {"concepts": concepts, "random_sets": random_sets, "seed": seed, "provenance": provenance}
    out: dict[str, dict[str, CAVSet]] = {}
    base = fit_image_cavs(pooled, **common, **params) if {"pooled", "half_random_sets"} & set(variants) else {}
    for variant in variants:
        if variant == "pooled":
            out[variant] = base
        elif variant == "flattened" and flattened is not None:
            out[variant] = fit_image_cavs(flattened, **common, **params)
        elif variant == "svm":
            out[variant] = fit_image_cavs(pooled, **common, classifier="svm", **params)
        elif variant == "half_random_sets":
            out[variant] = {layer: restrict_random_sets(s, math.ceil(s.n_runs / 2)) for layer, s in base.items()}
    return out
