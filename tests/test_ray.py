"""The pipeline on a Ray cluster gives the local run's results (issue 17).

First, without Ray: the split embedding it rests on (several writers each embed a share of the
planned ranges, one final ``embed`` writes the manifests: the shards are a single run's, bitwise)
and the ``execution`` settings (checked like every config key, outside the config hash).

Then a module fixture starts a real two-node cluster on this machine (``ray start --head`` plus a second
``ray start --address`` node, one CPU each) and stops it afterwards. The tiny config then runs
locally and with ``--executor ray``: every result file, every activation shard (bitwise, by name
and content) and every bank are the same, the work ran in worker processes on both nodes, and the
driver ran no forward pass and fitted no bank of the probed model itself; the comparisons' sums and
TCAV's gradient passes ran on the workers too (their results to 1e-6, where the shards' float sums
were added in another order, else bitwise). A worker killed in the
middle of embedding is restarted by Ray and the results stay the same. ``backend: ray`` without Ray
or with an unreachable address is one line and exit code 2.

The kill comes from a ``sitecustomize`` module on the cluster nodes' ``PYTHONPATH`` (workers
inherit it): once armed by a file, the first worker process about to write its fourth shard (the
second layer of its second range: one range done, one half done) exits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conceptlens.cli import main
from conceptlens.concepts.embedding.embed import embed, embed_ranges, plan_embedding
from conceptlens.concepts.errors import StoreError
from conceptlens.concepts.store.activations import ActivationStore
from conceptlens.config import ConfigError, config_hash, parse_config, with_execution
from tests.reliability import TINY_CONFIG, result_files, store_contents
from tests.test_embed_store import dataset, tiny_model

HOOK = r'''
import importlib.abc, importlib.util, os, sys
from pathlib import Path

FOLDER = Path(os.environ["CONCEPTLENS_TEST_HOOKS"])
TARGET = "conceptlens.concepts.store.activations"

def _arm(module):
    write = module.StoreEntry.write_shard
    written = []
    def dying_write(self, start, end, tensors):
        written.append((start, end))
        if (FOLDER / "armed").exists() and len(written) == 4:
            try:
                fd = os.open(FOLDER / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return write(self, start, end, tensors)
            os.write(fd, f"{os.getpid()} {start} {end}".encode())
            os.close(fd)
            os._exit(1)
        return write(self, start, end, tensors)
    module.StoreEntry.write_shard = dying_write

class _Finder(importlib.abc.MetaPathFinder):
    """Patch the store module when (and only when) a worker imports it."""
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)
            def exec_module(self, module):
                loader.exec_module(module)
                _arm(module)
        spec.loader = Loader()
        return spec

sys.meta_path.insert(0, _Finder())
'''

RAY = str(Path(sys.executable).with_name("ray"))
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed: pip install 'conceptlens[ray]' (make installs it)")


# ---------------------------------------------------------------------------------------------- without Ray


def _shards(store: ActivationStore, result) -> dict[str, list[str]]:
    return {layer: sorted(s.path.name for s in entry.shards()) for layer, entry in result.entries.items()}


def test_writers_sharing_the_planned_ranges_give_the_single_run_bitwise(tmp_path: Path) -> None:
    single = embed(tiny_model(), dataset(), ["0", "2"], ActivationStore(tmp_path / "single"), batch_size=3)
    store = ActivationStore(tmp_path / "split")
    plan = plan_embedding(tiny_model(), dataset(), ["0", "2"], store, batch_size=3)
    assert plan.groups == {3: ["0", "2"]} and plan.ranges(3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    ranges = plan.ranges(3)
    assert embed_ranges(tiny_model(), dataset(), ["0", "2"], store, ranges[::2]) == 2  # one writer (its own model and dataset) …
    assert embed_ranges(tiny_model(), dataset(), ["0", "2"], store, ranges[1::2]) == 2  # … and another
    assert plan.ranges(3) == [] and not any(entry.is_complete for entry in plan.entries.values())  # shards only, no manifest yet
    final = embed(tiny_model(), dataset(), ["0", "2"], store, batch_size=3)
    assert final.forward_batches == 0 and final.computed == ["0", "2"]  # the manifests, from the shards present
    assert _shards(store, final) == _shards(ActivationStore(tmp_path / "single"), single)  # names carry the sha256: same bytes
    for layer in ("0", "2"):
        assert torch.equal(final.entries[layer].read_all(), single.entries[layer].read_all())


def test_embed_ranges_skips_what_a_layer_has_and_refuses_ranges_outside_the_data(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path)
    assert embed_ranges(tiny_model(), dataset(), ["2"], store, [(0, 4)]) == 1
    assert embed_ranges(tiny_model(), dataset(), ["2"], store, [(0, 4)]) == 0  # a retried writer: nothing twice
    assert embed_ranges(tiny_model(), dataset(), ["0", "2"], store, [(0, 4)]) == 1  # layer 0 lacks it: one pass, layer 2's shard kept
    plan = plan_embedding(tiny_model(), dataset(), ["0", "2"], store, batch_size=3)
    assert plan.groups == {4: ["0", "2"]} and plan.ranges(4) == [(4, 8), (8, 10)]  # the entries keep their shard size
    with pytest.raises(StoreError, match=r"item range \(8, 11\): is not within the dataset's 10 items"):
        embed_ranges(tiny_model(), dataset(), ["2"], store, [(8, 11)])


MINIMAL = {"name": "t", "data": {"spec": "synthetic"}, "models": [{"name": "m", "spec": "zoo:x", "layers": ["a"]}]}


def test_execution_settings_are_checked_and_stay_out_of_the_config_hash() -> None:
    plain = parse_config(MINIMAL, "c.yaml")
    assert plain.execution.backend == "local" and plain.execution.address == "auto" and plain.execution.workers == 2
    on_ray = parse_config({**MINIMAL, "execution": {"backend": "ray", "address": "10.0.0.5:6379", "workers": 8, "gpus_per_worker": 1}}, "c.yaml")
    assert on_ray.execution.gpus_per_worker == 1.0 and config_hash(on_ray) == config_hash(plain)  # how it runs, not what it computes
    assert config_hash(dataclasses.replace(plain, seed=1)) != config_hash(plain)
    bad = {"backend": "spark", "address": "10.0.0.5:99999", "workers": 0, "gpus_per_worker": -1}
    problems = {"backend": "'spark' is not an allowed value", "address": "is not allowed", "workers": "must be >= 1", "gpus_per_worker": "must be >= 0.0"}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=rf"c\.yaml: execution\.{key}: .*{re.escape(problems[key])}"):
            parse_config({**MINIMAL, "execution": {key: value}}, "c.yaml")
    assert with_execution(plain, backend="ray", address=None, workers=4).execution == dataclasses.replace(plain.execution, backend="ray", workers=4)
    with pytest.raises(ConfigError, match=r"command line: execution\.workers: must be <= 4096"):
        with_execution(plain, workers=5000)


# ---------------------------------------------------------------------------------------------- a real cluster


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _ray(*arguments: str, env: dict[str, str]) -> str:
    done = subprocess.run([RAY, *arguments], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node (one CPU each); yields the head's address and the hook folder."""
    hooks = Path(tempfile.mkdtemp(prefix="clh-"))
    (hooks / "sitecustomize.py").write_text(HOOK)
    temp = tempfile.mkdtemp(prefix="clr-")  # short: Ray's socket paths live below it
    # a home of its own: an earlier local ray.init (the Ray benchmark, say) leaves ~/.ray/auth_token, which a
    # joining node then presents to a head started without token authentication, and is refused
    home, previous_home = Path(temp) / "home", os.environ.get("HOME")
    home.mkdir()
    os.environ["HOME"] = str(home)  # the driver (this process) connects with the same empty home
    env = {**os.environ, "PYTHONPATH": str(hooks), "CONCEPTLENS_TEST_HOOKS": str(hooks), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        head = _ray("start", "--head", "--num-cpus", "1", "--num-gpus", "0", "--port", str(_free_port()), "--temp-dir", temp,
                    "--include-dashboard", "false", "--disable-usage-stats", env=env)
        address = re.search(r"ray start --address='([^']+)'", head).group(1)
        _ray("start", "--address", address, "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", env=env)
        yield address, hooks
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        if previous_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = previous_home
        shutil.rmtree(hooks, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray-config")
    (folder / "tiny.yaml").write_text(TINY_CONFIG)
    (folder / "probes.yaml").write_text(TINY_CONFIG.replace("tcav:\n  enabled: true", "compare: {enabled: false}\nreport: {enabled: false}\ntcav:\n  enabled: false")
                                        .replace("report: {examples: 1, prototypes: 1}\n", ""))
    return folder


@pytest.fixture(scope="module")
def local_run(tiny: Path) -> Path:
    out = tiny / "local"
    assert main(["run", str(tiny / "tiny.yaml"), "--out", str(out), "--quiet"]) == 0
    return out


class _DriverWork:
    """Forward passes and bank fits the driver process itself ran, per activations key."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import conceptlens.probes.workflow as workflow

        self.forward: dict[str, int] = {}
        self.fitted: list[tuple[str, str]] = []
        embed, fit_bank = workflow.embed, workflow.fit_bank

        def spy_embed(*args, **kwargs):
            result = embed(*args, **kwargs)
            for entry in result.entries.values():
                self.forward[entry.key] = self.forward.get(entry.key, 0) + result.forward_batches
            return result

        def spy_fit(method, layer, activations, masks, *args, **kwargs):
            self.fitted.append((activations.key, masks.key))
            return fit_bank(method, layer, activations, masks, *args, **kwargs)

        monkeypatch.setattr(workflow, "embed", spy_embed)
        monkeypatch.setattr(workflow, "fit_bank", spy_fit)


def _steps(out: Path) -> dict[str, dict]:
    return {step["name"]: step for step in json.loads((out / "run.json").read_text())["steps"]}


def _model_keys(store: Path, model_hash: str) -> set[str]:
    """Keys of the store's activation entries of the model with ``model_hash``."""
    manifests = [json.loads(p.read_text()) for p in store.glob("*/manifest.json")]
    return {m["key"] for m in manifests if m.get("request", {}).get("model_hash") == model_hash}


def _same_files(a: Path, b: Path, names: list[str] | None = None, close: tuple[str, ...] = ()) -> None:
    """The result files (all but run.json, or ``names``) are equal: JSON and CSV as data, tensors bitwise;
    the JSON files in ``close`` to 1e-6 (sums reduced in another order), with the same structure and every other value."""
    first, second = result_files(a), result_files(b)
    first.pop("run.json"), second.pop("run.json")
    if names is None:
        assert sorted(first) == sorted(second)
        names = sorted(first)
    for name in names:
        x, y = first[name], second[name]
        if isinstance(x, dict) and x and all(hasattr(t, "dtype") for t in x.values()):
            assert sorted(x) == sorted(y), name
            for key in x:
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), f"{name}: {key} differs"
        elif name in close:
            _close(x, y, name)
        else:
            assert x == y, f"{name} differs"


def _close(x, y, where: str) -> None:
    """Equal JSON data, floats to 1e-6."""
    if isinstance(x, float) and isinstance(y, float):
        assert y == pytest.approx(x, abs=1e-6), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and sorted(x) == sorted(y), where
        for key in x:
            _close(x[key], y[key], f"{where}/{key}")
    elif isinstance(x, list):
        assert isinstance(y, list) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _close(u, v, f"{where}[{i}]")
    else:
        assert x == y, where


@needs_ray
@pytest.mark.slow
def test_a_ray_run_gives_the_local_results_bitwise(cluster, tiny: Path, local_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    address, _ = cluster
    driver = _DriverWork(monkeypatch)
    out = tiny / "ray"
    assert main(["run", str(tiny / "tiny.yaml"), "--out", str(out), "--quiet", "--executor", "ray", "--ray-address", address, "--workers", "2"]) == 0

    # every result JSON, CSV and tensor file (banks, examples, prototypes …); the comparisons' float sums (CKA, soft IoU,
    # Pearson) were reduced over the workers' shards, so their last bits may differ; counts, nulls and TCAV are bitwise
    comparisons = ("compare_net2vec/compare.json", "compare_nmf/compare.json")
    _same_files(local_run, out, close=comparisons)
    assert store_contents(out / "store") == store_contents(local_run / "store")  # shard names carry their sha256: bitwise equal shards
    summary = json.loads((out / "run.json").read_text())
    local = json.loads((local_run / "run.json").read_text())
    assert summary["config"]["execution"] == {"backend": "ray", "address": address, "workers": 2, "gpus_per_worker": 0.0}
    assert summary["config_hash"] == local["config_hash"] and summary["models"] == local["models"]

    steps = _steps(out)
    embedded, probes = steps["ray embed vgg"]["workers"], steps["ray probes"]["workers"]
    assert sum(w["units"] for w in embedded) == 32 and sum(w["units"] for w in probes) == 4  # 32 images; 2 layers × 2 methods
    pids = {pid for worker in embedded + probes for pid in worker["pids"]}
    assert len({pid for w in embedded for pid in w["pids"]}) == 2 and os.getpid() not in pids
    assert len({w["node"] for w in embedded}) == 2  # one actor per node
    vgg = _model_keys(out / "store", summary["models"][0]["hash"])
    assert len(vgg) == 2 and all(driver.forward.get(key, 0) == 0 for key in vgg)  # the driver embedded nothing of vgg …
    masks = {json.loads((out / f"probe_vgg_{m}.json").read_text())["provenance"]["backbone.block2"]["masks_key"] for m in ("net2vec", "nmf")}
    assert len(masks) == 1 and not {(key, *masks) for key in vgg} & set(driver.fitted)  # … nor fitted its banks (the controls' are its own)
    for name in ("compare net2vec", "compare nmf"):  # the 7 test images: one shard per worker, in each pass (sums, null, CKA …)
        workers = steps[name]["workers"]
        assert len({pid for w in workers for pid in w["pids"]}) == 2 and os.getpid() not in {pid for w in workers for pid in w["pids"]}
        assert len(workers) == 2 and all(w["units"] >= 3 * 3 for w in workers), workers  # ≥ 3 images in ≥ 3 passes each
    tcav = steps["tcav"]["workers"]  # 4 inputs, one batch: the base pass and the variants' pass, on one worker each
    assert sum(w["units"] for w in tcav) == 8 and len({pid for w in tcav for pid in w["pids"]}) == 2 and os.getpid() not in tcav[0]["pids"]
    assert "workers" not in steps["probe vgg net2vec"] and "workers" not in steps["report"]  # steps of the driver alone


@needs_ray
@pytest.mark.slow
def test_a_worker_killed_while_embedding_is_restarted_and_the_results_stay_the_same(cluster, tiny: Path, local_run: Path) -> None:
    address, hooks = cluster
    (hooks / "armed").touch()
    out = tiny / "killed"
    try:
        code = main(["run", str(tiny / "probes.yaml"), "--out", str(out), "--quiet", "--executor", "ray", "--ray-address", address, "--workers", "2"])
    finally:
        (hooks / "armed").unlink()
    assert code == 0
    pid, start, end = (int(v) for v in (hooks / "killed").read_text().split())
    workers = _steps(out)["ray embed vgg"]["workers"]
    restarted = [w for w in workers if pid in w["pids"]]
    assert len(restarted) == 1 and len(restarted[0]["pids"]) == 2  # the killed actor came back as a new process …
    assert restarted[0]["units"] >= 16  # … and embedded the range it died in (one layer's shard was written, the other not)
    assert sum(w["units"] for w in workers) == 32
    killed, local = store_contents(out / "store"), store_contents(local_run / "store")  # (the local run compared too: more entries)
    vgg = _model_keys(out / "store", json.loads((out / "run.json").read_text())["models"][0]["hash"])
    assert len(vgg) == 2 and all(killed[key] == local[key] for key in killed)  # the killed range's shards too, bitwise
    probe_files = sorted(name for name in result_files(local_run) if name.startswith(("banks/", "probe_")))
    assert len(probe_files) >= 6
    _same_files(local_run, out, probe_files)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_ray_backend_without_ray_installed_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG + "execution: {backend: ray}\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["run", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: execution.backend: ray: Ray is not installed") and "pip install 'conceptlens[ray]'" in line
    assert not (tmp_path / "out" / "run.json").exists()


def test_an_unreachable_ray_address_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    assert main(["run", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out"), "--quiet", "--executor", "ray", "--ray-address", address]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: execution.address: {address}: no Ray head node answers there") and "ray start --head" in line


def test_a_malformed_ray_address_on_the_command_line_names_the_setting(tmp_path: Path, capsys) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    assert main(["run", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out"), "--executor", "ray", "--ray-address", "head-node"]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: command line: execution.address: 'head-node' is not allowed") and "HOST:PORT" in line


@needs_ray
@pytest.mark.slow
def test_more_workers_than_the_cluster_has_cpus_is_refused(cluster, tiny: Path, capsys) -> None:
    address, _ = cluster
    assert main(["run", str(tiny / "probes.yaml"), "--out", str(tiny / "too-many"), "--quiet", "--executor", "ray", "--ray-address", address, "--workers", "3"]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: execution.workers: 3: each worker takes one CPU and the Ray cluster has 2") and "--workers 2" in line
