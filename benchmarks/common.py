"""Shared pieces of the benchmark suite: the figure record, timing, peak memory, machine facts.

Every figure is a ratio against a baseline measured in the same run (machines here are noisy), or
a throughput/time/memory with its baseline beside it in ``details``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Figure:
    """One measured figure of a benchmark.

    Attributes
    ----------
    benchmark : str
        Short benchmark name (``embed``, ``tcav``, ``nmf``, ``net2vec``, ``similarity``, ``memory``).
    name : str
        What the figure is, e.g. ``"embed 4 layers / bare forward"``.
    value : float
        The figure.
    unit : str
        ``"×"`` for ratios, else ``"s"``, ``"MiB"``, ``"Mpix·ch/s"`` …
    target : str or None
        The target as text (``"≤ 1.15"``, ``"≥ 3"``), None when there is none.
    passed : bool or None
        Whether the target is met (None without a target).
    details : dict
        Raw measurements (times of both sides, sizes, settings) for ``results.json``.
    """

    benchmark: str
    name: str
    value: float
    unit: str
    target: str | None = None
    passed: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(value: float, target: str | None) -> bool | None:
    """Whether ``value`` meets a target written as ``"≤ x"`` or ``"≥ x"``."""
    if target is None:
        return None
    sign, bound = target.split()
    return value <= float(bound) if sign == "≤" else value >= float(bound)


def print_figures(figures: list[Figure], details: bool = True) -> None:
    """Print each figure on a line (value, target, met) and, with ``details``, its raw measurements."""
    for figure in figures:
        met = "—" if figure.passed is None else ("yes" if figure.passed else "NO")
        print(f"{figure.name}: {figure.value:.4g} {figure.unit} (target {figure.target or '—'}, met: {met})")
        if details:
            for key, value in figure.details.items():
                print(f"  {key}: {value}")


def standalone(run: Callable[..., list[Figure]], doc: str | None) -> None:
    """Command line of one benchmark file: ``python benchmarks/bench_<name>.py [--quick]``."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="small sizes: check that the benchmark runs")
    print_figures(run(quick=parser.parse_args().quick))


def best_time(work: Callable[[], Any], repeats: int = 3, warmup: int = 0) -> float:
    """Best wall time of ``repeats`` calls (after ``warmup`` untimed calls), in seconds."""
    for _ in range(warmup):
        work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_in_subprocess(module: str, function: str, arguments: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``module.function(**arguments)`` in a fresh Python process; return its JSON result.

    A fresh process gives an honest peak RSS and keeps thread pools and caches of one measurement
    out of the next.
    """
    code = (
        "import json, sys, importlib; "
        f"sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
        f"result = getattr(importlib.import_module({module!r}), {function!r})(**json.loads(sys.argv[1])); "
        "print('@@RESULT@@' + json.dumps(result))"
    )
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{module}.{function} failed:\n{done.stderr[-4000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("@@RESULT@@"))
    return json.loads(line[len("@@RESULT@@"):])


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare figures across machines."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
