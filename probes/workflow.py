"""One call from a model and a concept dataset to a concept bank per layer: :func:`probe_model`.

It embeds the dataset at the layers (activations come from the store when already there), embeds
the masks on the concept grid, and fits one bank per layer with a pixel-level method (Net2Vec or
NMF), reusing a saved bank whose provenance matches the request. Nothing has to exist on disk
first: without a store the session's temporary store is used, and without a banks folder the
banks stay in memory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from conceptlens.concepts.compare.similarity import relative_depths
from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.embedding.embed import embed
from conceptlens.concepts.embedding.masks import embed_masks
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.models.loading import LoadedModel, list_layers, load_model
from conceptlens.concepts.progress import progress_scope
from conceptlens.concepts.store.activations import StoreEntry
from conceptlens.concepts.store.artifacts import read_json
from conceptlens.concepts.store.atomic import atomic_write_text
from conceptlens.concepts.store.schema import ListOf, Str
from conceptlens.concepts.store.temporary import StoreLike, open_store
from conceptlens.concepts.vectors.bank import BankError, ConceptBank
from conceptlens.concepts.vectors.probed import ProbedModel
from conceptlens.probes.registry import fit_bank, get_method, method_names

__all__ = ["ProbedModel", "bank_path", "check_bank_owner", "current_bank", "default_label", "layer_bank", "layer_order", "probe_model"]


def probe_model(
    model: LoadedModel | str | nn.Module,
    dataset: ConceptDataset | str | Path,
    layers: str | Sequence[str],
    method: str = "net2vec",
    store: StoreLike = None,
    *,
    banks_dir: str | Path | None = None,
    label: str | None = None,
    params: dict[str, Any] | None = None,
    grid: tuple[int, int] = (100, 100),
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
    input_size: tuple[int, int] | None = None,
    dtype: str = "float16",
    controls: bool | dict[str, Any] = False,
    decode_workers: int | None = None,
) -> ProbedModel:
    """Embed ``dataset`` at ``layers`` and fit one concept bank per layer.

    Parameters
    ----------
    model : LoadedModel, str or nn.Module
        A loaded model, a model spec (``"torchvision:resnet18"``, ``"zoo:mobilenet_v2"``, …) or a
        plain module (wrapped with the default adapter, see
        :func:`conceptlens.concepts.models.loading.load_model`).
    dataset : ConceptDataset, str or Path
        Images with concept masks, or the folder of a dataset in the folder layout
        (``images/`` + ``masks/<concept>/``).
    layers : str or sequence of str
        Layer names, shallow to deep (see :func:`~conceptlens.concepts.models.loading.list_layers`).
    method : str
        A pixel-level method of the registry (:mod:`conceptlens.probes.registry`): ``'net2vec'``
        (Net2Vec concept vectors), ``'nmf'`` (NCAVs labelled with the known concepts) or a
        registered one.
    store : ActivationStore, str, PathLike or None
        Activation store; None: the session's temporary store (deleted at exit).
    banks_dir : str or Path, optional
        Save banks there as ``<label>__<layer>.<method>`` and reuse saved ones whose provenance
        (store keys, parameters) matches; None: banks stay in memory.
    label : str, optional
        The model's name in comparisons and bank files; default: from its spec.
    params : dict, optional
        Estimator parameters (``max_epochs``, ``lr``, ``seed`` … for Net2Vec; ``n_components``,
        ``seed`` … for NMF).
    grid : (int, int)
        Concept grid the masks are embedded on.
    batch_size : int
        Images per forward pass.
    device : str
        ``auto``, ``cpu``, ``cuda`` …
    progress : bool
        Progress bars.
    input_size : (int, int), optional
        Input size of a model given as spec or module, and of the traced forward pass that orders
        its modules; default: the adapter's input size, else 224 × 224.
    dtype : {'float16', 'float32'}
        Storage dtype of the activations.
    controls : bool or dict
        Also fit the probe controls (Net2Vec only; :func:`conceptlens.probes.controls.probe_controls`:
        a random-weights copy of the model and masks permuted across images) and add
        ``controls``, ``selectivity``, ``selectivity_ci``, ``encoded`` and ``verdict`` to every
        concept's metrics. A dict is passed to ``probe_controls`` (``seed``, ``epochs``,
        ``kinds``, ``margin``, ``n_bootstrap``); False (default): no controls.
    decode_workers : int, optional
        Threads decoding images ahead of the forward pass (:func:`~conceptlens.concepts.embedding.embed.embed`).

    Returns
    -------
    ProbedModel
        With the banks' test metrics (set IoU etc. for Net2Vec; matched concept, IoU and fidelity
        for NMF), and the control records when ``controls`` is on.

    Examples
    --------
    >>> import conceptlens as cl
    >>> probed = cl.probe_model("zoo:synthetic_vgg_centernet", cl.SyntheticWorld(40), "backbone.block3",
    ...                         params={"max_epochs": 1}, grid=(16, 16))      # doctest: +SKIP
    >>> probed.banks["backbone.block3"].concepts[:3]                         # doctest: +SKIP
    ['car', 'house', 'tree']
    """
    entry = get_method(method)
    if entry.level != "pixel":
        raise ConceptLensError(f"method {method!r}", f"is not a pixel-level method ({entry.level}-level)", f"use one of {', '.join(method_names('pixel'))}")
    model = load_model(model, input_size=input_size)
    dataset = _concept_dataset(dataset)
    layers = [layers] if isinstance(layers, str) else list(layers)
    store, params = open_store(store), dict(params or {})
    label = label or default_label(model)
    with progress_scope(label):  # every bar says which model it counts for
        result = embed(model, dataset, layers, store, dtype=dtype, batch_size=batch_size, device=device, progress=progress,
                       decode_workers=decode_workers)
        masks = embed_masks(dataset, store, grid=grid, progress=progress)
        banks, metrics = {}, {}
        for layer in layers:
            with progress_scope(layer):
                bank = layer_bank(method, layer, label, result.entries[layer], masks, params, banks_dir, device, progress)
            banks[layer], metrics[layer] = bank, bank.metrics
    order = layer_order(model, input_size or _adapter_input_size(model), store)
    probed = ProbedModel(
        label, model, layers, result.entries, banks, relative_depths(layers), relative_depths(layers, order), metrics, tuple(grid), entry.comparison
    )
    if controls:
        from conceptlens.probes.controls import probe_controls  # imports this module

        options = {"batch_size": batch_size, "device": device, "progress": progress, "banks_dir": banks_dir, **(controls if isinstance(controls, dict) else {})}
        probed.metrics = probe_controls(probed, dataset, store, params=params, **options).merge_into(probed.metrics)
    return probed


def default_label(model: LoadedModel) -> str:
    """A model's default label: the last part of its spec (``zoo:mobilenet_v2`` → ``mobilenet_v2``).

    Builder arguments are left out: ``torchvision:resnet18?num_classes=10`` → ``resnet18``.
    """
    spec = model.spec.split("?", 1)[0]
    name = Path(spec.rsplit(":", 1)[-1]).stem if ":" in spec else Path(spec.split(" ")[0]).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def bank_path(banks_dir: str | Path, label: str, layer: str, method: str) -> Path:
    """File base name of a bank: ``<banks_dir>/<label>__<layer>.<method>``, one per (label, layer).

    A name made of letters, digits, ``_``, ``.`` and ``-`` only, whose label neither holds ``__``
    nor ends with ``_``, is used as it is (the names banks always had; the label ends at the first
    ``__``). Any other name, one with characters a file name
    cannot hold (``/``, ``:``, spaces …) or over 120 characters, has them replaced by ``_`` and
    gains ``+`` and the first 12 hex digits of the sha256 of the exact label and layer; ``+`` never
    occurs in an unchanged name, so two different layers never share a bank file.

    Parameters
    ----------
    banks_dir : str or Path
        The banks folder.
    label, layer, method : str
        The model's label, the layer and the method.

    Returns
    -------
    Path
        The base name; the bank is saved as ``<base>.json`` + ``<base>.safetensors``.

    Examples
    --------
    >>> bank_path("banks", "vgg", "features.7", "net2vec").as_posix()
    'banks/vgg__features.7.net2vec'
    >>> bank_path("banks", "m", "fpn:0", "nmf") != bank_path("banks", "m", "fpn/0", "nmf")
    True
    """
    name = f"{label}__{layer}"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    if safe != name or "__" in label or label.endswith("_") or len(name) > 120:
        exact = hashlib.sha256(json.dumps([label, layer]).encode()).hexdigest()[:12]
        safe = f"{safe[:120]}+{exact}"
    return Path(banks_dir) / f"{safe}.{method}"


def layer_order(model: LoadedModel, input_size: tuple[int, int], store: StoreLike = None) -> list[str]:
    """Every module of ``model`` in execution order (one traced forward pass, then cached in the store).

    Parameters
    ----------
    model : LoadedModel
        The model.
    input_size : (int, int)
        Height and width of the image of the traced forward pass.
    store : ActivationStore, str, PathLike or None
        Where the order is cached (``layer_orders/``); None: the session's temporary store.

    Returns
    -------
    list of str
        Module names, as :func:`~conceptlens.concepts.models.loading.list_layers` lists them.
    """
    store = open_store(store)
    path = Path(store.root) / "layer_orders" / f"{model.hash[:24]}_{input_size[0]}x{input_size[1]}.json"
    if path.is_file():
        try:
            return read_json(path, ConceptLensError, schema=ListOf(Str()))
        except ConceptLensError:
            pass  # unreadable or malformed cache: trace again and rewrite it
    order = [info.name for info in list_layers(model, input_size)]
    atomic_write_text(path, json.dumps(order))
    return order


def _concept_dataset(dataset: ConceptDataset | str | Path) -> ConceptDataset:
    if isinstance(dataset, ConceptDataset):
        return dataset
    if isinstance(dataset, (str, Path)):
        from conceptlens.concepts.data.folder import FolderDataset

        return FolderDataset(dataset)
    raise ConceptLensError(f"dataset {type(dataset).__name__}", "is not a concept dataset", "pass a ConceptDataset or the folder of one (images/ + masks/)")


def _adapter_input_size(model: LoadedModel) -> tuple[int, int]:
    size = getattr(model.adapter, "input_size", None)
    return tuple(size) if size else (224, 224)


def layer_bank(
    method: str, layer: str, label: str, activations: StoreEntry, masks: StoreEntry, params: dict[str, Any],
    banks_dir: str | Path | None, device: str, progress: bool,
) -> ConceptBank:
    """The saved bank ``<banks_dir>/<label>__<layer>.<method>`` when its provenance matches the request, else a new one.

    A new bank is saved when there is a banks folder (``banks_dir=None``: in memory only). A saved
    bank of the same model (other data or parameters) is replaced; one of another model is never
    overwritten: two models probed into one folder under one label is an error.

    Raises
    ------
    BankError
        When the file holds a bank of another model.
    """
    path = bank_path(banks_dir, label, layer, method) if banks_dir is not None else None
    saved = _saved_bank(path) if path is not None else None
    if saved is not None and _same_request(saved, activations, masks, params):
        return saved
    if saved is not None:
        check_bank_owner(saved, path, (activations.request or {}).get("model_hash"), label)
    bank = fit_bank(method, layer, activations, masks, params, device, progress)
    if path is not None:
        bank.save(path)
    return bank


def current_bank(
    banks_dir: str | Path, label: str, layer: str, method: str, activations: StoreEntry, masks: StoreEntry, params: dict[str, Any]
) -> ConceptBank | None:
    """The saved bank :func:`layer_bank` would reuse for this request, else None (it would fit one).

    Parameters
    ----------
    banks_dir, label, layer, method
        Where the bank is saved (:func:`bank_path`).
    activations, masks, params
        The request, as for :func:`layer_bank`.
    """
    saved = _saved_bank(bank_path(banks_dir, label, layer, method))
    return saved if saved is not None and _same_request(saved, activations, masks, params) else None


def _saved_bank(path: Path) -> ConceptBank | None:
    if not Path(f"{path}.json").is_file():
        return None
    try:
        return ConceptBank.load(path)
    except BankError:
        return None  # unreadable: fitted again and rewritten


def _same_request(bank: ConceptBank, activations: StoreEntry, masks: StoreEntry, params: dict[str, Any]) -> bool:
    provenance = bank.provenance
    same_data = provenance.get("activations_key") == activations.key and provenance.get("masks_key") == masks.key
    return same_data and all(provenance.get("params", {}).get(k) == v for k, v in params.items())


def check_bank_owner(bank: ConceptBank | str | Path, path: str | Path, model_hash: str | None, label: str) -> None:
    """Refuse to overwrite the bank at ``path`` when it was trained on another model than ``model_hash``.

    Parameters
    ----------
    bank : ConceptBank, str or Path
        The saved bank, or its base path (nothing to check when no readable bank is there).
    path : str or Path
        The bank's base path, for the message.
    model_hash : str or None
        The hash of the model about to be saved there (None: not known, nothing checked).
    label : str
        The model's name in bank files.

    Raises
    ------
    BankError
        When the saved bank records another model's hash.
    """
    if not isinstance(bank, ConceptBank):
        bank = _saved_bank(Path(bank))
        if bank is None:
            return
    saved_on = bank.provenance.get("model_hash")
    if saved_on and model_hash and saved_on != model_hash:
        raise BankError(
            f"{path}.json", f"holds the bank of another model (hash {str(saved_on)[:12]}, this one {str(model_hash)[:12]}) under the name {label!r}",
            "give this model its own name (--name, or the model's name in the config), write to another --out/--banks folder, or delete the file",
        )
