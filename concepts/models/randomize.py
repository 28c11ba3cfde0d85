"""The random-weights control model: the same architecture and adapter, weights re-initialised.

A probe that segments a concept as well on a random-weights copy of a model as on the trained
model measures what the architecture and the input statistics give for free, not what training
taught (docs/METHODS.md §2, probe controls). :func:`randomized` builds that copy.
"""

from __future__ import annotations

import copy
import hashlib

import torch
from conceptlens.concepts.errors import ModelSpecError
from conceptlens.concepts.models.loading import LoadedModel, load_model
from torch import nn

__all__ = ["randomized", "reinitialize", "weight_seed"]

FALLBACK_STD = 0.02  # parameters no module knows how to reset: N(0, 0.02²) (ViT tokens, say)


def randomized(model: LoadedModel | str | nn.Module, seed: int = 0) -> LoadedModel:
    """A copy of ``model`` with every weight re-initialised from ``seed``: the random-weights control.

    The module is deep-copied (the original is untouched) and every submodule with a
    ``reset_parameters()`` (convolutions, linear layers, norms — BatchNorm's running statistics
    too) is reset in ``modules()`` order, the generator seeded from ``seed`` through a hash
    (:func:`weight_seed`, so that seed 0 does not reproduce the default initialisation of a
    model built under ``torch.manual_seed(0)``); a parameter no such module owns is drawn from
    N(0, 0.02²). The caller's random state is left as it was.

    Parameters
    ----------
    model : LoadedModel, str or nn.Module
        The trained model (or a spec / module, loaded with :func:`load_model`).
    seed : int
        Seed of the new weights: the same seed gives the same weights.

    Returns
    -------
    LoadedModel
        Same adapter, spec ``"<spec> [random weights, seed <seed>]"``, weights ``"random:<seed>"``
        and a new hash (so its store entries never collide with the trained model's).

    Raises
    ------
    ModelSpecError
        When the model has no parameter to re-initialise.

    Examples
    --------
    >>> from torch import nn
    >>> trained = load_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), input_size=(8, 8))
    >>> control = randomized(trained, seed=1)
    >>> control.hash != trained.hash, control.hash == randomized(trained, seed=1).hash
    (True, True)
    """
    model = load_model(model)
    module = copy.deepcopy(model.module)
    reinitialize(module, seed)
    module.eval()
    return LoadedModel(module=module, adapter=model.adapter, spec=f"{model.spec} [random weights, seed {seed}]", weights=f"random:{seed}")


def reinitialize(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialise ``module``'s weights in place from ``seed`` (see :func:`randomized`); return it."""
    parameters = dict(module.named_parameters())
    if not parameters:
        raise ModelSpecError(f"model {type(module).__name__}", "has no parameter to re-initialise", "probe a model with weights")
    covered: set[int] = set()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(weight_seed(seed))
        for submodule in module.modules():
            reset = getattr(submodule, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in submodule.parameters(recurse=False))
                covered.update(id(b) for b in submodule.buffers(recurse=False))
        for parameter in parameters.values():
            if id(parameter) not in covered:
                parameter.normal_(0.0, FALLBACK_STD)
    return module


def weight_seed(seed: int) -> int:
    """The torch seed of the random weights of ``seed``: 63 bits of sha256 of ``random-weights:<seed>``."""
    digest = hashlib.sha256(f"random-weights:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
