"""The same config and seed reproduce every number exactly on CPU, fresh or after a kill -9.

An in-process run and a separate ``conceptlens run`` process (another output folder, another
store, another string-hash seed) must agree on every result: probe metrics, comparison matrices,
TCAV scores and p-values, bank and report-input tensors bitwise, and the stored activations;
only timing and path fields may differ. A run killed after a step's JSON but before its tables
and figures must, rerun, end with the same results.
"""

from __future__ import annotations

import os

import pytest
import torch

from conceptlens.config import load_config
from conceptlens.pipeline import run_pipeline
from tests.reliability import TINY_CONFIG, assert_same_results, finish, kill9, result_files, run_hooked, store_contents, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """An uninterrupted in-process run into a fresh folder (its store inside it)."""
    torch.set_num_threads(1)
    return run_pipeline(load_config(config), tmp_path_factory.mktemp("first") / "out", source=str(config)).out


@pytest.mark.slow
def test_two_fresh_runs_agree_on_every_number(config, reference, tmp_path):
    out = tmp_path / "second"
    hash_seed = "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"  # another set/dict string order
    code, _, err = finish(run_hooked({}, ["run", str(config), "--out", str(out), "--quiet"], PYTHONHASHSEED=hash_seed))
    assert code == 0, err
    assert (reference / "store").is_dir() and (out / "store").is_dir()

    results = result_files(reference)
    for expected in ("probe_vgg_net2vec.json", "probe_vgg_nmf.json", "compare_net2vec/compare.json", "compare_nmf/compare.json",
                     "compare_net2vec/compare.csv", "tcav.json", "tcav.csv", "run.json", "examples/vgg.safetensors", "prototypes/vgg.safetensors",
                     "banks/vgg__backbone.block2.net2vec.safetensors", "banks/vgg__backbone.block3.nmf.safetensors"):
        assert expected in results
    # the comparison is not vacuous: real numbers in the places that matter
    assert isinstance(results["probe_vgg_net2vec.json"]["metrics"]["backbone.block3"]["sky"]["set_iou"], float)
    assert any(isinstance(v, float) for row in results["compare_net2vec/compare.json"]["matrix"] for v in row)
    assert isinstance(results["compare_nmf/compare.json"]["cka"]["pooled"][0][1], float)
    records = results["tcav.json"]["records"]
    assert records and all(isinstance(r["p"], float) and isinstance(r["p_holm"], float) for r in records)

    assert_same_results(reference, out)
    assert store_contents(reference / "store") == store_contents(out / "store")


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(config, reference, tmp_path):
    out = tmp_path / "killed"
    # killed after compare_net2vec/compare.json is written, before its heatmaps
    process = run_hooked({"marker_dir": str(tmp_path), "pause_heatmaps": True}, ["run", str(config), "--out", str(out), "--quiet"])
    wait_for(lambda: (tmp_path / "heatmaps").exists(), process, what="the comparison's heatmaps")
    kill9(process)
    assert (out / "compare_net2vec" / "compare.json").is_file() and not (out / "run.json").exists()
    assert not (out / "compare_net2vec" / "heatmaps").exists()
    result = run_pipeline(load_config(config), out, source=str(config))
    assert not any(step["skipped"] for step in result.steps if step["name"] == "compare net2vec")
    assert_same_results(out, reference)
