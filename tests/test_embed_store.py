"""Streaming embedding into the content-addressed store: hit, miss, invalidation, resume, corruption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conceptlens.concepts.models.adapters import ClassifierAdapter
from conceptlens.concepts.data.dataset import ArrayDataset
from conceptlens.concepts.embedding.embed import embed
from conceptlens.concepts.errors import LayerError, StoreError
from conceptlens.concepts.models.loading import LoadedModel
from conceptlens.concepts.store.activations import ActivationStore, StoreEntry


class Exploding(nn.Module):
    """Fails if the forward pass ever reaches it (proves the early stop)."""

    def forward(self, x):
        raise AssertionError("the forward pass went past the deepest requested layer")


def tiny_model(explode_after: bool = False, scale: float = 1.0) -> LoadedModel:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU(),
        Exploding() if explode_after else nn.Identity(),
    ).eval()
    with torch.no_grad():
        module[0].weight.mul_(scale)
    return LoadedModel(module, ClassifierAdapter((16, 16)), spec="test:tiny")


class FailingDataset(ArrayDataset):
    """Raises when image ``fail_at`` is loaded: an interrupted run."""

    fail_at: int | None = None

    def image(self, index):
        if index == self.fail_at:
            raise KeyboardInterrupt
        return super().image(index)


def dataset(n: int = 10, cls=ArrayDataset, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return cls([rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(n)])


def test_early_stop_after_deepest_layer(tmp_path):
    result = embed(tiny_model(explode_after=True), dataset(), ["0", "2"], ActivationStore(tmp_path), batch_size=4)
    assert result.computed == ["0", "2"]
    assert result.entries["2"].read_all().shape == (10, 5, 8, 8)


def test_store_hit_runs_no_forward(tmp_path):
    store, data = ActivationStore(tmp_path), dataset()
    first = embed(tiny_model(), data, ["2"], store, batch_size=4, dtype="float32")
    second = embed(tiny_model(), data, ["2"], store, batch_size=4, dtype="float32")
    assert first.forward_batches == 3 and second.forward_batches == 0 and second.reused == ["2"]
    stored = second.entries["2"].read_all()
    model = tiny_model()
    with torch.no_grad():
        expected = model.module[:3](model.adapter.prepare([data.image(i) for i in range(10)], torch.device("cpu")))
    torch.testing.assert_close(stored, expected)


@pytest.mark.parametrize(
    "change",
    ["weights", "layer", "preprocessing", "data", "dtype", "reduce"],
)
def test_any_change_makes_a_new_entry(tmp_path, change):
    store = ActivationStore(tmp_path)
    base = dict(model=tiny_model(), data=dataset(), layer="2", dtype="float16", reduce="native")
    key = embed(base["model"], base["data"], [base["layer"]], store).entries["2"].key
    changed = dict(base)
    if change == "weights":
        changed["model"] = tiny_model(scale=1.01)
    elif change == "layer":
        changed["layer"] = "3"
    elif change == "preprocessing":
        changed["model"] = LoadedModel(tiny_model().module, ClassifierAdapter((16, 16), mean=(0.5, 0.5, 0.5)), "test:tiny")
    elif change == "data":
        changed["data"] = dataset(seed=1)
    elif change == "dtype":
        changed["dtype"] = "float32"
    else:
        changed["reduce"] = "mean"
    result = embed(changed["model"], changed["data"], [changed["layer"]], store, dtype=changed["dtype"], reduce=changed["reduce"])
    assert result.forward_batches > 0
    assert result.entries[changed["layer"]].key != key


def test_interrupted_run_resumes_from_completed_shards(tmp_path):
    reference = embed(tiny_model(), dataset(), ["0", "2"], ActivationStore(tmp_path / "a"), batch_size=3)
    store = ActivationStore(tmp_path / "b")
    failing = dataset(cls=FailingDataset)
    failing.fail_at = 7
    with pytest.raises(KeyboardInterrupt):
        embed(tiny_model(), failing, ["0", "2"], store, batch_size=3)
    partial = store.entry(_request_of(reference, "2"))
    assert not partial.is_complete and len(partial.shards()) == 2  # items 0-5 done
    failing.fail_at = None
    resumed = embed(tiny_model(), failing, ["0", "2"], store, batch_size=5)  # another batch size
    assert resumed.forward_batches == 2  # shards 6-9 and 9-10 only, in the entry's shard size
    for layer in ("0", "2"):
        assert torch.equal(resumed.entries[layer].read_all(), reference.entries[layer].read_all())


def _request_of(result, layer):
    return json.loads(result.entries[layer].manifest_path.read_text())["request"]


def test_corrupted_shard_is_detected_and_recomputed(tmp_path):
    store, data = ActivationStore(tmp_path), dataset()
    entry = embed(tiny_model(), data, ["2"], store, batch_size=4).entries["2"]
    original = entry.read_all()
    victim = entry.shards()[1].path
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="corrupt"):
        entry.read_all()
    again = embed(tiny_model(), data, ["2"], store, batch_size=4)
    assert again.forward_batches == 1
    assert torch.equal(again.entries["2"].read_all(), original)


def test_manifest_with_path_traversal_is_rejected(tmp_path):
    store = ActivationStore(tmp_path)
    entry = embed(tiny_model(), dataset(), ["2"], store).entries["2"]
    manifest = json.loads(entry.manifest_path.read_text())
    manifest["shards"] = ["../../etc/passwd"]
    entry.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="invalid shard name"):
        entry.read_all()


def test_bad_store_key_and_store_path(tmp_path):
    with pytest.raises(StoreError, match="not a store key"):
        StoreEntry(tmp_path, "../escape")
    file_path = tmp_path / "file"
    file_path.write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        ActivationStore(file_path)


def test_reductions_shapes_and_pooling(tmp_path):
    store, data = ActivationStore(tmp_path), dataset()
    native = embed(tiny_model(), data, ["2"], store, dtype="float32").entries["2"].read_all()
    mean = embed(tiny_model(), data, ["2"], store, reduce="mean", dtype="float32").entries["2"].read_all()
    maximum = embed(tiny_model(), data, ["2"], store, reduce="max", dtype="float32").entries["2"].read_all()
    grid = embed(tiny_model(), data, ["2"], store, reduce="grid", grid=(5, 6), dtype="float32").entries["2"].read_all()
    torch.testing.assert_close(mean, native.mean(dim=(2, 3)))
    torch.testing.assert_close(maximum, native.amax(dim=(2, 3)))
    assert grid.shape == (10, 5, 5, 6)


def test_detector_pooling_excludes_padding(tmp_path, pooling_detector):
    from conceptlens.concepts.models.adapters import DetectorAdapter

    model = LoadedModel(pooling_detector, DetectorAdapter(pooling_detector.transform), "test:pooling")
    white = ArrayDataset([np.full((80, 44, 3), 255, np.uint8), np.full((40, 90, 3), 255, np.uint8)])
    pooled = embed(model, white, ["backbone"], ActivationStore(tmp_path), reduce="mean", dtype="float32").entries["backbone"].read_all()
    # cells on the image border half-cover padding; pure padding cells are excluded
    assert pooled.min() > 0.9


def test_nan_layer_is_reported_with_image_ids(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.module[2].bias[0] = float("nan")
    with pytest.raises(LayerError, match=r"layer '2'.*NaN.*000000"):
        embed(model, dataset(), ["2"], ActivationStore(tmp_path))


def test_activations_beyond_float16_are_refused_not_stored_as_inf(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.module[2].bias[0] = 1e6  # finite in float32, inf in float16
    with pytest.raises(LayerError, match=r"layer '2'.*beyond float16.*--dtype float32"):
        embed(model, dataset(), ["2"], ActivationStore(tmp_path / "half"))
    stored = embed(model, dataset(), ["2"], ActivationStore(tmp_path / "full"), dtype="float32").entries["2"].read_all()
    assert torch.isfinite(stored).all() and stored.max() >= 1e6


def test_bad_arguments(tmp_path):
    with pytest.raises(StoreError, match="reduce='avg'"):
        embed(tiny_model(), dataset(), ["2"], ActivationStore(tmp_path), reduce="avg")
    with pytest.raises(LayerError, match="no such module"):
        embed(tiny_model(), dataset(), ["9"], ActivationStore(tmp_path))
