"""The Ray worker of a run: a plain class that Ray runs as an actor (nothing here imports Ray at module level).

Every job is JSON-able data: the config as :func:`~conceptlens.config.config_to_dict` writes it,
store requests, folder paths. A worker rebuilds the dataset and each model from the config (the
pipeline's own code), so no object of ours is ever pickled. It runs in the driver's working
directory (relative paths of the config mean what they mean for the driver) and with the driver's
torch thread count (CPU numbers are bitwise equal at equal thread counts only).

A :class:`~conceptlens.concepts.errors.ConceptLensError` in a worker comes back as a record
(:func:`~conceptlens.execution.reach.error_record`) that the driver raises again
(:func:`raise_recorded`), naming the node.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.store.activations import ActivationStore, request_key
from conceptlens.execution.reach import SHARED, enter_driver_folder, error_record, node_id

__all__ = ["ProbeWorker", "raise_recorded"]


def raise_recorded(result: dict[str, Any]) -> dict[str, Any]:
    """Raise the error a worker recorded in ``result`` (its node named), else return ``result``."""
    from conceptlens.execution import ExecutionError

    recorded = result.get("error")
    if recorded:
        node = recorded.get("node") or "?"
        raise ExecutionError(recorded["culprit"], f"{recorded['problem']} (on Ray node {node[:12]})", recorded.get("fix"))
    return result


class ProbeWorker:
    """One Ray actor of a run: opens the dataset once, loads each model once, embeds item ranges, fits banks, sums comparison shards.

    Parameters
    ----------
    job : dict
        ``config`` (config_to_dict), ``store`` (the store folder), ``cwd``, ``threads``,
        ``embed`` (``reduce``, ``grid``, ``dtype``, ``device``) and ``keys`` (per model name, the
        driver's store key per layer: a worker checks that it would write the same entries, i.e.
        that it sees the same data and model files).
    """

    def __init__(self, job: dict[str, Any]) -> None:
        self.job, self.failure, self.model = job, None, None
        try:
            self._open()
        except ConceptLensError as error:
            self.failure = error_record(error)

    def _open(self) -> None:
        from conceptlens.config import parse_config
        from conceptlens.pipeline import _open_data

        enter_driver_folder(self.job["cwd"])
        torch.set_num_threads(int(self.job["threads"]))
        self.config = parse_config(self.job["config"], "<Ray job config>")
        self.dataset = _open_data(self.config, progress=False)
        self.fingerprint = self.dataset.image_fingerprint()
        self.store, self.settings = ActivationStore(self.job["store"]), {**self.job["embed"], "grid": tuple(self.job["embed"]["grid"])}

    def _model(self, name: str) -> Any:
        """The config's model ``name``, loaded on first use (one model is kept at a time)."""
        from conceptlens.concepts.embedding.embed import embed_request
        from conceptlens.concepts.models.loading import load_model

        if self.model is not None and self.model[0] == name:
            return self.model[1]
        self.model = None
        spec = next(m for m in self.config.models if m.name == name)
        model = load_model(spec.spec, spec.weights, tuple(spec.input_size) if spec.input_size else None, spec.kwargs)
        for layer, key in self.job["keys"][name].items():
            request = embed_request(model, self.dataset, layer, self.settings["reduce"], self.settings["grid"], self.settings["dtype"], self.fingerprint)
            if request_key(request) != key:
                raise ConceptLensError(f"model {name!r}, layer {layer!r}", "this Ray node would embed other activations than the driver (its data or model files differ)",
                                       "give every node the same files at the same paths (a shared filesystem)")
        self.model = (name, model)
        return model

    def embed(self, name: str, layers: list[str], ranges: list[list[int]]) -> dict[str, Any]:
        """Write the shards of ``ranges`` for model ``name``'s ``layers``; return pid, node, seconds and images (or an error record)."""
        from conceptlens.concepts.embedding.embed import embed_ranges

        started = time.perf_counter()
        try:
            self._fail_as_recorded()
            embed_ranges(self._model(name), self.dataset, layers, self.store, [(int(a), int(b)) for a, b in ranges], reduce=self.settings["reduce"],
                         grid=self.settings["grid"], dtype=self.settings["dtype"], device=self.settings["device"], fingerprint=self.fingerprint)
        except ConceptLensError as error:
            return error_record(error)
        return self._timing(started, sum(int(b) - int(a) for a, b in ranges))

    def fit(self, job: dict[str, Any]) -> dict[str, Any]:
        """Fit (or reuse) one (model, layer, method) bank and save it in the banks folder; return pid, node, seconds, 1 (or an error record).

        ``job``: ``activations`` and ``masks`` (store requests), ``method``, ``layer``, ``label``,
        ``params``, ``banks``: what the probe step passes to :func:`~conceptlens.probes.workflow.layer_bank`.
        """
        from conceptlens.probes.workflow import layer_bank

        started = time.perf_counter()
        try:
            self._fail_as_recorded()
            activations, masks = self.store.entry(job["activations"]), self.store.entry(job["masks"])
            for entry in (activations, masks):
                if not entry.is_complete:
                    raise ConceptLensError(str(entry.path), "is not a complete store entry on this Ray node", SHARED)
            layer_bank(job["method"], job["layer"], job["label"], activations, masks, job["params"], job["banks"], self.settings["device"], False)
        except ConceptLensError as error:
            return error_record(error)
        return self._timing(started, 1)

    def shard(self, task: str, call: dict[str, Any]) -> dict[str, Any]:
        """One shard of a comparison pass (:func:`~conceptlens.concepts.compare.shards.run_task`): its ``result``
        (plain dicts, lists and arrays), pid, node, seconds and images (or an error record)."""
        from conceptlens.concepts.compare.shards import run_task

        started = time.perf_counter()
        try:
            self._fail_as_recorded()
            result = run_task(task, call)
        except ConceptLensError as error:
            return error_record(error)
        return {**self._timing(started, int(call.get("units", 1))), "result": result}

    def gradients(self, job: dict[str, Any]) -> dict[str, Any]:
        """TCAV sensitivities of a shard of whole input batches (:func:`~conceptlens.attribution.tcav.target_sensitivities`).

        ``job``: ``model`` (config name), ``target`` (spec) and ``target_name``, ``images`` (uint8
        arrays), ``layers``, ``cavs`` (``[variant, layer, (n_cavs, D) array]``), ``batch_size``,
        ``pooling``. Returns ``result`` (``sens`` per CAV group in ``cavs`` order, ``valid``,
        ``grad_max`` per layer: arrays), pid, node, seconds, images (or an error record).
        """
        from conceptlens.attribution.gradients import layer_modules_of, place_model
        from conceptlens.attribution.targets import target_from_spec
        from conceptlens.attribution.tcav import target_sensitivities

        started = time.perf_counter()
        try:
            self._fail_as_recorded()
            model = self._model(job["model"])
            place_model(model, self.settings["device"])
            groups = {(variant, layer): torch.from_numpy(vectors) for variant, layer, vectors in job["cavs"]}
            sens, valid, grad_max = target_sensitivities(model, job["images"], layer_modules_of(model, job["layers"]), groups,
                                                         target_from_spec(job["target"], categories=model.categories), job["target_name"],
                                                         int(job["batch_size"]), job["pooling"])
        except ConceptLensError as error:
            return error_record(error)
        result = {"sens": [sens[key].numpy() for key in groups], "valid": valid.numpy(), "grad_max": {layer: v.numpy() for layer, v in grad_max.items()}}
        return {**self._timing(started, len(job["images"])), "result": result}

    def _fail_as_recorded(self) -> None:
        if self.failure is not None:
            recorded = self.failure["error"]
            raise ConceptLensError(recorded["culprit"], recorded["problem"], recorded["fix"])

    @staticmethod
    def _timing(started: float, units: int) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": node_id(), "seconds": round(time.perf_counter() - started, 3), "units": units}
