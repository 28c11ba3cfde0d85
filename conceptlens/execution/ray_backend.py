"""The ``ray`` backend: embedding and bank fitting on Ray actors, into the shared store.

:class:`RayExecutor` connects to the cluster (``ray.init(address=...)``), checks that every node
reaches the store and the banks folder (:mod:`conceptlens.execution.reach`), and, ahead of the
pipeline's probe step (:meth:`RayExecutor.prepare_probes`):

1. per model, plans the embedding (:func:`~conceptlens.concepts.embedding.embed.plan_embedding`:
   the item ranges no shard covers yet, one shard size per entry) and hands the ranges out to
   ``workers`` actors (:class:`~conceptlens.execution.tasks.ProbeWorker`; each opens the dataset
   once and loads each model once, from the config) as they come free. An actor writes its
   ranges' shards (:func:`~conceptlens.concepts.embedding.embed.embed_ranges`); a range is one
   forward pass of the same images as locally, so each shard is bitwise the local one (same
   content, same name). A killed actor is restarted and its calls run again (``max_restarts``,
   ``max_task_retries``); shards already written are kept. The driver then writes the manifests
   (:func:`~conceptlens.concepts.embedding.embed.embed`, which finds every shard present);
2. embeds the grid masks (driver);
3. fits every (model, layer, method) bank that is not saved yet as its own call
   (:func:`~conceptlens.probes.workflow.layer_bank`: same seeds, same thread count), on the same
   actors; the bank is saved in the banks folder, where the probe step finds and loads it.

The same actors then serve the comparison steps (:meth:`RayExecutor.shard_runner`): the test
images are split into one shard per worker, each actor sums its shard's statistics from the shared
store (:mod:`conceptlens.concepts.compare.shards`) and the driver reduces them. TCAV's gradient
passes (:meth:`RayExecutor.gradient_pass`) are split the same way into shards of whole batches of
the scored inputs; the driver puts the rows back in input order and fits the CAVs and runs the
tests itself, as locally.

Each step's time, and each worker's share (pids, node, seconds, images or banks), goes into
``run.json``; every pass over shards shows one progress bar, fed by all workers.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from conceptlens.concepts.compare.shards import row_shards
from conceptlens.concepts.embedding.embed import EmbedPlan, embed, plan_embedding
from conceptlens.concepts.embedding.masks import embed_masks
from conceptlens.concepts.store.activations import StoreEntry
from conceptlens.concepts.store.atomic import atomic_write_text
from conceptlens.config import config_to_dict
from conceptlens.execution import ExecutionError, ProbeWork
from conceptlens.execution.reach import SHARED, check_node
from conceptlens.execution.tasks import ProbeWorker, raise_recorded
from conceptlens.probes.workflow import current_bank
from conceptlens.report.results import StepTime, WorkerTime

__all__ = ["RayExecutor"]

INSTALL = "pip install 'conceptlens[ray]' (or run locally: execution.backend: local, --executor local)"
START = "start a cluster with `ray start --head` (then --ray-address auto), or give the head's address as `ray status` prints it"
RETRIES = 3  # restarts of a killed actor, and retries of its calls
REACH_TIMEOUT = 120.0  # seconds for every node to answer the folder check
REDUCE, GRID = "native", (100, 100)  # what the probe step embeds: full feature maps (the grid is then not part of the request)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ExecutionError("execution.backend: ray", f"Ray is not installed ({error})", INSTALL) from None
    return ray


class RayExecutor:
    """The ``ray`` backend, connected for one run (see the module docstring).

    Parameters
    ----------
    settings : ExecutionConfig
        ``address``, ``workers``, ``gpus_per_worker``.
    roots : list of Path
        Folders every worker writes (the store, the banks folder).

    Raises
    ------
    ExecutionError
        Ray missing, no cluster at the address, too few CPUs/GPUs for the workers, or a node that
        does not reach one of ``roots``.
    """

    backend = "ray"

    def __init__(self, settings: Any, roots: list[Path]) -> None:
        self.settings, self.roots = settings, [Path(os.path.abspath(root)) for root in roots]
        self.pool: _Pool | None = None
        self.shares: dict[int, dict[str, Any]] = {}  # per worker, its share of the step running now
        started = time.perf_counter()
        self.ray = _import_ray()
        self.owns_connection = _connect(self.ray, settings.address)
        try:
            _check_capacity(self.ray, settings)
            self.nodes = _check_roots(self.ray, self.roots)
        except BaseException:
            self.close()
            raise
        self.connect_seconds = time.perf_counter() - started

    def close(self) -> None:
        """Stop the actors and disconnect from the cluster (when this executor connected)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.owns_connection and self.ray.is_initialized():
            self.ray.shutdown()
        self.owns_connection = False

    def prepare_probes(self, work: ProbeWork) -> list[dict[str, Any]]:
        """Embed every model and fit every bank of ``work`` on the cluster; return the steps' times (``run.json``)."""
        config = work.config
        steps = [StepTime("ray connect", round(self.connect_seconds, 3), skipped=False).to_json()]
        started = time.perf_counter()
        plans = {spec.name: plan_embedding(work.models[spec.name], work.dataset, spec.layers, work.store, **_embed_arguments(config)) for spec in config.models}
        steps.append(StepTime("ray plan", round(time.perf_counter() - started, 3), skipped=False).to_json())
        pool = self.pool = _Pool(self.ray, self.settings, {
            "cwd": os.getcwd(), "threads": torch.get_num_threads(), "config": config_to_dict(config), "store": os.path.abspath(work.store.root),
            "embed": {"reduce": REDUCE, "grid": list(GRID), "dtype": config.embed.dtype, "device": config.device},
            "keys": {name: {layer: entry.key for layer, entry in plan.entries.items()} for name, plan in plans.items()},
        })
        try:
            for spec in config.models:
                steps.append(self._embed_model(work, spec, plans[spec.name], pool))
            started = time.perf_counter()
            masks = embed_masks(work.dataset, work.store, grid=tuple(config.embed.grid), progress=work.progress)
            steps.append(StepTime("masks", round(time.perf_counter() - started, 3), skipped=False).to_json())
            steps.append(self._fit_banks(work, plans, masks, pool))
        finally:
            self.shares.clear()  # the actors stay up for the comparison steps; close() stops them
        return steps

    def shard_runner(self, progress: bool) -> _ShardRunner:
        """A :class:`~conceptlens.concepts.compare.shards.ShardRunner` on this run's actors (after :meth:`prepare_probes`)."""
        if self.pool is None:
            raise ExecutionError("Ray backend", "has no workers yet: the probe step prepares them", "call prepare_probes before the comparison")
        return _ShardRunner(self, progress)

    def gradient_pass(self, model: str, target_specs: dict[str, str], progress: bool) -> _GradientPass:
        """TCAV's gradient pass (:func:`~conceptlens.attribution.tcav.target_sensitivities`) for config model ``model``
        on this run's actors: each sums whole batches of the inputs; ``target_specs``: target name -> spec."""
        if self.pool is None:
            raise ExecutionError("Ray backend", "has no workers yet: the probe step prepares them", "call prepare_probes before TCAV")
        return _GradientPass(self, model, target_specs, progress)

    def worker_times(self) -> tuple[WorkerTime, ...] | None:
        """Each worker's share of the shard passes since the last call (None when there was none), for the step's ``run.json`` record."""
        shares, self.shares = self.shares, {}
        return _worker_times(shares) if shares else None

    def _embed_model(self, work: ProbeWork, spec: Any, plan: EmbedPlan, pool: _Pool) -> dict[str, Any]:
        """Write the shards ``spec``'s layers lack on the actors, then the manifests; return the step's time."""
        started, config = time.perf_counter(), work.config
        model = work.models[spec.name]
        calls = [(spec.name, names, [[start, end]]) for size, names in plan.groups.items() for start, end in plan.ranges(size)]
        workers = None
        if calls:
            total = sum(end - start for _, _, ((start, end),) in calls)
            workers = pool.run("embed", calls, f"embedding {spec.name} on Ray", "img", total, work.progress)
            _check_embedded(plan_embedding(model, work.dataset, spec.layers, work.store, **_embed_arguments(config)), spec.name)
        embed(model, work.dataset, spec.layers, work.store, device=config.device, progress=False, **_embed_arguments(config))  # the manifests
        return StepTime(f"ray embed {spec.name}", round(time.perf_counter() - started, 3), skipped=not calls, workers=workers).to_json()

    def _fit_banks(self, work: ProbeWork, plans: dict[str, EmbedPlan], masks: StoreEntry, pool: _Pool) -> dict[str, Any]:
        """One call per (model, layer, method) bank not saved yet; return the step's time."""
        started, config = time.perf_counter(), work.config
        jobs = []
        for method, params in work.params.items():
            for spec in config.models:
                for layer in spec.layers:
                    activations = plans[spec.name].entries[layer]
                    if current_bank(work.banks, spec.name, layer, method, activations, masks, params) is None:
                        jobs.append(({"activations": activations.request, "masks": masks.request, "method": method, "layer": layer, "label": spec.name,
                                      "params": params, "banks": os.path.abspath(work.banks)},))
        workers = pool.run("fit", jobs, "fitting banks on Ray", "bank", len(jobs), work.progress) if jobs else None
        return StepTime("ray probes", round(time.perf_counter() - started, 3), skipped=not jobs, workers=workers).to_json()


class _ShardRunner:
    """Sends one call per shard to the actors; keeps the calls' results in call order and the workers' shares."""

    def __init__(self, executor: RayExecutor, progress: bool) -> None:
        self.executor, self.progress, self.parts = executor, progress, executor.settings.workers

    def __call__(self, task: str, calls: list[dict[str, Any]], label: str) -> list[Any]:
        units = sum(int(call.get("units", 1)) for call in calls)
        results = self.executor.pool.map("shard", [(task, call) for call in calls], f"{label} on Ray", "img", units, self.progress, self.executor.shares)
        return [result["result"] for result in results]


class _GradientPass:
    """Splits a target's inputs into one shard of whole batches per worker; the actors load the model once and
    return their rows' sensitivities, valid flags and gradient maxima, which are put back in input order."""

    def __init__(self, executor: RayExecutor, model: str, target_specs: dict[str, str], progress: bool) -> None:
        self.executor, self.model, self.target_specs, self.progress = executor, model, target_specs, progress

    def __call__(self, model: Any, x: Any, modules: dict[str, Any], groups: dict[tuple[str, str], torch.Tensor], target: Any, target_name: str,
                 batch_size: int, pooling: str) -> tuple[dict[tuple[str, str], torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        n = len(x)
        batches = -(-n // batch_size)
        shards = [(a * batch_size, min(b * batch_size, n)) for a, b in row_shards(batches, self.executor.settings.workers)]
        cavs = [[variant, layer, vectors.detach().cpu().numpy()] for (variant, layer), vectors in groups.items()]
        calls = [({"model": self.model, "target": self.target_specs[target_name], "target_name": target_name, "images": [np.asarray(x[i]) for i in range(a, b)],
                   "layers": list(modules), "cavs": cavs, "batch_size": batch_size, "pooling": pooling},) for a, b in shards]
        parts = [r["result"] for r in self.executor.pool.map("gradients", calls, f"TCAV gradients {target_name} on Ray", "img", n, self.progress,
                                                              self.executor.shares)]
        sens = {key: torch.cat([torch.from_numpy(part["sens"][i]) for part in parts]) for i, key in enumerate(groups)}
        valid = torch.cat([torch.from_numpy(part["valid"]) for part in parts])
        grad_max = {layer: torch.cat([torch.from_numpy(part["grad_max"][layer]) for part in parts]) for layer in modules}
        return sens, valid, grad_max


def _embed_arguments(config: Any) -> dict[str, Any]:
    """What the probe step's embedding is called with (the same store entries, the same shard size)."""
    return {"reduce": REDUCE, "grid": GRID, "dtype": config.embed.dtype, "batch_size": config.embed.batch_size}


class _Pool:
    """``workers`` :class:`ProbeWorker` actors, started on first use; each call goes to the next free one."""

    def __init__(self, ray: Any, settings: Any, job: dict[str, Any]) -> None:
        self.ray, self.settings, self.job, self.actors = ray, settings, job, []
        self.turn = 0  # the actor the next pass starts with: passes of a single call take turns

    def run(self, method: str, calls: list[tuple], label: str, unit: str, total: int, progress: bool) -> tuple[WorkerTime, ...]:
        """Run ``actor.<method>(*call)`` for every call, one at a time per actor; return each actor's share."""
        shares: dict[int, dict[str, Any]] = {}
        self.map(method, calls, label, unit, total, progress, shares)
        return _worker_times(shares)

    def map(self, method: str, calls: list[tuple], label: str, unit: str, total: int, progress: bool, shares: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Run ``actor.<method>(*call)`` for every call, one at a time per actor, under one progress bar.

        Returns the calls' results in call order; adds each actor's pids, node, seconds and units to ``shares``.
        """
        if not self.actors:
            options = {"num_cpus": 1, "num_gpus": self.settings.gpus_per_worker, "max_restarts": RETRIES, "max_task_retries": RETRIES}
            self.actors = [self.ray.remote(ProbeWorker).options(**options).remote(self.job) for _ in range(self.settings.workers)]
        first, self.turn = self.turn % len(self.actors), self.turn + len(calls)
        waiting, free, pending = list(enumerate(calls)), [(first + i) % len(self.actors) for i in range(len(self.actors))], {}
        results: list[dict[str, Any] | None] = [None] * len(calls)
        with tqdm(total=total, desc=label, unit=unit, disable=not progress) as bar:
            while waiting or pending:
                while waiting and free:
                    number, (index, call) = free.pop(0), waiting.pop(0)
                    pending[getattr(self.actors[number], method).remote(*call)] = (number, index)
                finished, _ = self.ray.wait(list(pending), num_returns=1)
                number, index = pending.pop(finished[0])
                result = results[index] = raise_recorded(_get(self.ray, finished[0]))
                free.append(number)
                bar.update(result["units"])
                share = shares.setdefault(number, {"pids": set(), "node": None, "seconds": 0.0, "units": 0})
                share["pids"].add(result["pid"])
                share["node"], share["seconds"], share["units"] = result["node"][:12], share["seconds"] + result["seconds"], share["units"] + result["units"]
        return results

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


# ---------------------------------------------------------------------------------------------- helpers


def _worker_times(shares: dict[int, dict[str, Any]]) -> tuple[WorkerTime, ...]:
    """The ``run.json`` records of the actors' shares (by worker number)."""
    return tuple(WorkerTime(worker=n, pids=tuple(sorted(s["pids"])), node=s["node"], seconds=round(s["seconds"], 3), units=s["units"])
                 for n, s in sorted(shares.items()))


def _get(ray: Any, ref: Any) -> dict[str, Any]:
    """``ray.get(ref)``; a worker that died more often than the retries allow becomes one ExecutionError."""
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    try:
        return ray.get(ref)
    except (RayActorError, WorkerCrashedError) as error:
        raise ExecutionError("Ray worker", f"died and stayed dead after {RETRIES} restarts ({_first_line(error)})",
                             "check the worker logs (`ray logs`, or /tmp/ray/session_latest/logs on its node): out of memory, a missing GPU …") from None
    except RayTaskError as error:
        raise ExecutionError("Ray worker", f"failed: {_first_line(error)}", "run with --executor local to see the error with its traceback") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1][:300] if text else type(error).__name__


def _connect(ray: Any, address: str) -> bool:
    """Connect to the cluster at ``address``; True when this call made the connection (and closes it later)."""
    if ray.is_initialized():
        return False  # an existing connection (a notebook's) is used as it is
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ExecutionError(f"execution.address: {address}", f"no Ray cluster to connect to ({_first_line(error)})", START) from None
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once an address where nothing listens (``ray.init`` would retry for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ExecutionError(f"execution.address: {address}", f"no Ray head node answers there ({error.strerror or error})", START) from None


def _check_capacity(ray: Any, settings: Any) -> None:
    """The cluster must hold every worker at once (actors that do not fit would wait for ever)."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cpus < settings.workers:
        raise ExecutionError(f"execution.workers: {settings.workers}", f"each worker takes one CPU and the Ray cluster has {cpus:g}",
                             f"use --workers {max(1, int(cpus))} or fewer, or add nodes (ray start --address HEAD:PORT)")
    if gpus < settings.workers * settings.gpus_per_worker:
        raise ExecutionError(f"execution.gpus_per_worker: {settings.gpus_per_worker:g}",
                             f"{settings.workers} workers need {settings.workers * settings.gpus_per_worker:g} GPUs and the Ray cluster has {gpus:g}",
                             "lower execution.gpus_per_worker or execution.workers, or add GPU nodes")


def _check_roots(ray: Any, roots: list[Path]) -> list[str]:
    """A task on every alive node reads a token the driver wrote in each root and writes a marker beside it.

    Returns the node ids; raises ExecutionError naming the first folder a node does not share.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    nodes = [node["NodeID"] for node in ray.nodes() if node.get("Alive")]
    try:
        for root in roots:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / f".reach-{token}", token)
        task = ray.remote(check_node)
        job = {"cwd": os.getcwd(), "token": token, "roots": [str(root) for root in roots]}
        refs = [task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(job) for node in nodes]
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=REACH_TIMEOUT)
        if late:
            raise ExecutionError("Ray cluster", f"{len(late)} of {len(refs)} nodes did not answer the folder check within {REACH_TIMEOUT:g} s",
                                 "check `ray status`: every node must be alive and able to start workers")
        for ref in refs:
            raise_recorded(_get(ray, ref))
        for root in roots:
            for node in nodes:
                marker = root / f".reach-{token}-{node}"
                if not marker.is_file() or marker.read_text() != node:
                    raise ExecutionError(str(root), f"node {node[:12]} wrote its marker into another folder of that name: the folder is not shared", SHARED)
    finally:
        for root in roots:
            for path in root.glob(f".reach-{token}*"):
                path.unlink(missing_ok=True)
    return nodes


def _check_embedded(plan: EmbedPlan, name: str) -> None:
    """After the actors: no range may be missing (else the driver would embed it locally, unnoticed)."""
    missing = [r for size in plan.groups for r in plan.ranges(size)]
    if missing:
        raise ExecutionError(f"model {name!r}", f"the Ray workers left {len(missing)} item ranges without shards (first {missing[0]})",
                             "run again: the written shards are kept, the rest is embedded")
