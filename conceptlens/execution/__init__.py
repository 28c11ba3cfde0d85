"""Where a pipeline run's steps execute: in this process (``local``) or on a Ray cluster (``ray``).

The config's ``execution`` section (:class:`~conceptlens.config.ExecutionConfig`) picks the
backend. :func:`open_executor` returns a context manager whose :meth:`prepare_probes` computes,
before the pipeline's probe step, what that step would compute itself: a local executor does
nothing; the Ray executor (:mod:`conceptlens.execution.ray_backend`) writes the activations into
the shared store on Ray actors and fits every (model, layer, method) bank as a Ray task. The
pipeline then runs exactly as locally and finds every entry complete and every bank saved, so the
result files are the local run's (the same shards, bitwise; the same banks and numbers).
:meth:`shard_runner` gives the comparison steps their workers and :meth:`gradient_pass` TCAV's
(None locally: everything in this process), :meth:`worker_times` each worker's share of the step
that just ran (``run.json``).

Ray is imported only when the Ray backend is chosen: ``local`` needs no Ray installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conceptlens.concepts.errors import ConceptLensError

if TYPE_CHECKING:  # a Ray worker imports this package to check folders: no torch for that
    from conceptlens.concepts.data.dataset import ConceptDataset
    from conceptlens.concepts.models.loading import LoadedModel
    from conceptlens.concepts.store.activations import ActivationStore

__all__ = ["ExecutionError", "LocalExecutor", "ProbeWork", "open_executor"]


class ExecutionError(ConceptLensError):
    """The execution backend cannot run: Ray missing, no cluster at the address, a folder the workers cannot reach."""


@dataclass(frozen=True)
class ProbeWork:
    """What the pipeline's probe step computes, for an executor to compute ahead of it.

    Attributes
    ----------
    config : PipelineConfig
        The run's config (its models, embedding settings, device, seed).
    dataset : ConceptDataset
        The opened concept dataset.
    models : dict
        Loaded models by config name.
    store : ActivationStore
        The run's activation store.
    banks : Path
        The run's banks folder.
    params : dict
        Estimator parameters per enabled pixel-level method (as the probe step passes them).
    progress : bool
        Show progress bars.
    """

    config: Any
    dataset: ConceptDataset
    models: dict[str, LoadedModel]
    store: ActivationStore
    banks: Path
    params: dict[str, dict[str, Any]]
    progress: bool = False


class LocalExecutor:
    """The ``local`` backend: everything runs in the pipeline's own process, as it always did."""

    backend = "local"

    def prepare_probes(self, work: ProbeWork) -> list[dict[str, Any]]:
        """Nothing to do ahead of the probe step; no extra step times."""
        return []

    def shard_runner(self, progress: bool) -> None:
        """No runner: the comparison sums every test image in this process."""
        return None

    def gradient_pass(self, model: str, target_specs: dict[str, str], progress: bool) -> None:
        """No gradient pass of its own: TCAV's runs in this process."""
        return None

    def worker_times(self) -> None:
        """No worker shares to record."""
        return None


@contextmanager
def open_executor(settings: Any, roots: list[Path]) -> Iterator[Any]:
    """The executor of ``settings`` (an :class:`~conceptlens.config.ExecutionConfig`), open for one run.

    Parameters
    ----------
    settings : ExecutionConfig
        The config's ``execution`` section.
    roots : list of Path
        Folders every worker writes to (the store, the banks folder); the Ray backend checks that
        each node reaches them.

    Yields
    ------
    LocalExecutor or RayExecutor

    Raises
    ------
    ExecutionError
        With ``backend: ray``: Ray is not installed, no cluster answers at ``address``, the cluster
        is too small for ``workers``, or a node cannot reach one of ``roots``.
    """
    if settings.backend == "local":
        yield LocalExecutor()
        return
    from conceptlens.execution.ray_backend import RayExecutor

    executor = RayExecutor(settings, roots)
    try:
        yield executor
    finally:
        executor.close()
