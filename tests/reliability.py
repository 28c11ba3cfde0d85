"""Helpers of the reliability tests: subprocesses to kill, and comparing results folders.

``run_hooked`` starts ``python -c HOOKED`` with the ``conceptlens`` CLI behind a few optional
hooks that make a kill land at a known point without changing any result: slow shard writes, a
marker file plus a long pause at a given step, a process that kills itself halfway through an
atomic write (after half the bytes reached the temporary file, before the rename), or a barrier
that starts several processes together.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

#: A pipeline config small enough to run a few times per test file (about 5 s of CPU).
TINY_CONFIG = """
name: tiny
seed: 0
data:
  spec: synthetic:32:0
  concepts: [car, house, sky, ground]
models:
  - name: vgg
    spec: zoo:synthetic_vgg_centernet
    layers: [backbone.block2, backbone.block3]
embed: {grid: [16, 16], batch_size: 8}
probes:
  net2vec: {max_epochs: 2}
  nmf: {k: 3}
tcav:
  enabled: true
  concepts: [house, sky]
  images_per_set: 5
  random_sets: 2
  targets:
    - {spec: "top:1", inputs: car, max_inputs: 4}
  n_bootstrap: 20
report: {examples: 1, prototypes: 1}
"""

#: Keys whose values are timings, clock times or machine paths: they may differ between runs.
VOLATILE_KEYS = frozenset({"seconds", "started", "total_seconds", "created", "out", "store", "path"})

HOOKED = r"""
import json, os, signal, sys, time
from pathlib import Path

hooks = json.loads(sys.argv[1])

def mark(name):
    Path(hooks["marker_dir"], name).touch()

if "slow_shards" in hooks:  # sleep after each shard write: the kill lands between shards
    from conceptlens.concepts.store.activations import StoreEntry
    write_shard = StoreEntry.write_shard
    def slow_write_shard(self, *args, **kwargs):
        shard = write_shard(self, *args, **kwargs)
        time.sleep(hooks["slow_shards"])
        return shard
    StoreEntry.write_shard = slow_write_shard

if "pause_fit" in hooks:  # the n-th probe fit marks and waits: the kill lands during training
    from conceptlens.probes.net2vec import Net2VecProbe
    fit, calls = Net2VecProbe.fit, []
    def paused_fit(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == hooks["pause_fit"]:
            mark("training")
            time.sleep(600)
        return fit(self, *args, **kwargs)
    Net2VecProbe.fit = paused_fit

if "pause_heatmaps" in hooks:  # compare.json is written, its heatmaps not yet
    import conceptlens.compare_output as compare_output
    heatmaps = compare_output._write_heatmaps
    def paused_heatmaps(*args, **kwargs):
        mark("heatmaps")
        time.sleep(600)
        return heatmaps(*args, **kwargs)
    compare_output._write_heatmaps = paused_heatmaps

if "die_in_write" in hooks:  # the n-th atomic write matching a suffix: half the bytes, then kill -9
    import conceptlens.concepts.store.atomic
    suffix, nth = hooks["die_in_write"]
    real_fsync, seen = os.fsync, []
    def dying_fsync(fd):
        target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if target.startswith(".") and suffix in target and target.endswith(".tmp"):
            seen.append(target)
            if len(seen) == nth:
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                mark("dying")
                os.kill(os.getpid(), signal.SIGKILL)
        return real_fsync(fd)
    conceptlens.concepts.store.atomic.os.fsync = dying_fsync

if "barrier" in hooks:  # start together: mark ready, wait until `count` processes are
    name, count = hooks["barrier"]
    mark(f"ready-{name}")
    while len(list(Path(hooks["marker_dir"]).glob("ready-*"))) < count:
        time.sleep(0.005)

from conceptlens.cli import main
sys.exit(main(sys.argv[2:]))
"""


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: one thread (bitwise-comparable numbers), repo on the path."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def run_hooked(hooks: dict[str, Any], argv: list[str], **env: str) -> subprocess.Popen:
    """Start the CLI with ``argv`` behind ``hooks`` (see module docstring); stdout/stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-c", HOOKED, json.dumps(hooks), *argv], cwd=REPO, env=subprocess_env(**env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0, what: str = "condition") -> None:
    """Poll ``condition()`` every 5 ms until true; fail if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"process exited ({process.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def kill9(process: subprocess.Popen) -> None:
    """SIGKILL the process (by its own pid) and reap it."""
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def finish(process: subprocess.Popen, timeout: float = 300.0) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


# ------------------------------------------------------------------------------------ comparing results


def _normalise(value: Any, folder: str) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, folder) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_normalise(v, folder) for v in value]
    if isinstance(value, str):
        return value.replace(folder, "<OUT>")
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return value


def result_files(folder: Path) -> dict[str, Any]:
    """Every result file under ``folder`` (store and report excluded) in comparable form.

    JSON: parsed, timing and path fields removed, the folder's own path replaced. CSV: text.
    Safetensors: the tensors. PNG: presence only (figures are checked by the report's tests).
    """
    folder = Path(folder)
    found: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if not path.is_file() or relative.startswith("store/") or relative == "report.html":
            continue
        if path.name.startswith("."):
            found[relative] = "temporary file left behind"
        elif path.suffix == ".json":
            found[relative] = _normalise(json.loads(path.read_text()), str(folder))
        elif path.suffix == ".csv":
            found[relative] = path.read_text().replace(str(folder), "<OUT>")
        elif path.suffix == ".safetensors":
            found[relative] = load_file(str(path))
        else:
            found[relative] = "present"
    return found


def assert_same_results(a: Path, b: Path) -> None:
    """Both folders hold the same result files with equal numbers (tensors bitwise)."""
    first, second = result_files(a), result_files(b)
    assert sorted(first) == sorted(second)
    for name in first:
        x, y = first[name], second[name]
        if isinstance(x, dict) and x and all(isinstance(t, torch.Tensor) for t in x.values()):
            assert sorted(x) == sorted(y), name
            for key in x:
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), f"{name}: tensor {key} differs"
        else:
            assert x == y, f"{name} differs"


def store_contents(store: Path) -> dict[str, Any]:
    """Per entry: the sorted shard names (they carry each shard's checksum) and the manifest without its creation time."""
    contents = {}
    for entry in sorted(p for p in Path(store).iterdir() if p.is_dir() and len(p.name) == 32):
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest.pop("created", None)
        contents[entry.name] = {"shards": sorted(p.name for p in entry.glob("shard-*.safetensors")), "manifest": manifest}
    return contents
