"""Banks, stores, configs and weights files from elsewhere load without running code or leaving their folder.

Every hostile file here would create a marker file if it were ever unpickled or constructed; the
tests check that loading fails with a clear one-line error naming the file, and that the marker
never appears. A control test proves the payload is live (plain ``pickle.loads`` does run it).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conceptlens.concepts.models.adapters import ClassifierAdapter
from conceptlens.concepts.data.dataset import ArrayDataset
from conceptlens.concepts.embedding.embed import embed
from conceptlens.concepts.errors import ConceptLensError, ModelSpecError, StoreError
from conceptlens.concepts.models.loading import LoadedModel, load_model, load_state_dict_file
from conceptlens.concepts.store.activations import ActivationStore, StoreEntry
from conceptlens.concepts.vectors.bank import BankError, ConceptBank
from conceptlens.cli import main
from conceptlens.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("concepts", "probes", "attribution", "conceptlens")

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's note on the refused payloads


class Payload:
    """Unpickling this creates ``marker`` (via ``os.mkdir``): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"weight": Payload(marker)})


def torch_payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": Payload(marker)}, buffer)
    return buffer.getvalue()


def huge_header_safetensors(length: int = 1 << 40) -> bytes:
    """A safetensors file whose 8-byte header length claims ``length`` bytes."""
    return struct.pack("<Q", length) + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}' + b"\0" * 4


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message
    return message


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def bank_dir(tmp_path) -> Path:
    """A real bank ``bank.{json,safetensors}`` in its own folder."""
    folder = tmp_path / "banks"
    bank = ConceptBank(method="net2vec", layer="layer", concepts=["a", "b"], vectors=torch.randn(2, 4), biases=torch.zeros(2),
                       provenance={"model_hash": "0" * 64})
    bank.save(folder / "bank")
    ConceptBank.load(folder / "bank")
    return folder


@pytest.fixture
def stored(tmp_path) -> tuple[ActivationStore, StoreEntry, LoadedModel, ArrayDataset]:
    """A complete two-shard store entry of a tiny classifier."""
    rng = np.random.default_rng(0)
    dataset = ArrayDataset([rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(6)], name="six")
    model = LoadedModel(tiny_net().eval(), ClassifierAdapter((16, 16)), spec="test:tiny")
    store = ActivationStore(tmp_path / "store")
    entry = embed(model, dataset, ["2"], store, batch_size=3, device="cpu").entries["2"]
    assert entry.is_complete and len(entry.shards()) == 2
    return store, entry, model, dataset


def test_the_payload_is_live(tmp_path):
    """Control: the payload does run code when unpickled without restrictions."""
    marker = tmp_path / "marker"
    pickle.loads(pickle_payload(marker))
    assert marker.exists()


# ------------------------------------------------------------------------------------------ banks


@pytest.mark.parametrize("fix_checksum", [False, True], ids=["as-is", "checksum-forged"])
@pytest.mark.parametrize("payload", [pickle_payload, torch_payload], ids=["pickle", "torch.save"])
def test_pickle_as_bank_tensors_is_rejected(tmp_path, bank_dir, payload, fix_checksum):
    marker = tmp_path / "marker"
    data = payload(marker)
    (bank_dir / "bank.safetensors").write_bytes(data)
    if fix_checksum:  # the attacker also rewrites the JSON to match
        metadata = json.loads((bank_dir / "bank.json").read_text())
        metadata["tensors_sha256"] = hashlib.sha256(data).hexdigest()
        (bank_dir / "bank.json").write_text(json.dumps(metadata))
    with pytest.raises(BankError, match="not a safetensors file" if fix_checksum else "checksum") as caught:
        ConceptBank.load(bank_dir / "bank")
    assert "bank.safetensors" in one_line(caught.value)
    assert not marker.exists()


def test_bank_json_cannot_point_at_tensors_elsewhere(tmp_path, bank_dir):
    """The tensor file is always the JSON's sibling; keys naming other files are ignored, never followed."""
    other = tmp_path / "other"
    other.mkdir()
    metadata = json.loads((bank_dir / "bank.json").read_text())
    for key in ("tensors", "tensor_file", "path", "file"):
        metadata[key] = "../banks/bank.safetensors"
    metadata["safetensors"] = str(bank_dir / "bank.safetensors")
    (other / "bank.json").write_text(json.dumps(metadata))
    with pytest.raises(BankError, match="cannot read") as caught:
        ConceptBank.load(other / "bank.json")
    assert str(other / "bank.safetensors") in str(caught.value)


def test_bank_with_huge_safetensors_header_is_rejected_quickly(bank_dir):
    data = huge_header_safetensors()
    (bank_dir / "bank.safetensors").write_bytes(data)
    metadata = json.loads((bank_dir / "bank.json").read_text())
    metadata["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    (bank_dir / "bank.json").write_text(json.dumps(metadata))
    started = time.perf_counter()
    with pytest.raises(BankError, match="not a safetensors file"):
        ConceptBank.load(bank_dir / "bank")
    assert time.perf_counter() - started < 2


def test_bank_with_huge_json_is_rejected_unread(bank_dir):
    with open(bank_dir / "bank.json", "r+b") as file:
        file.truncate(64 * 1024 * 1024)  # sparse: nothing is allocated on disk or in memory
    with pytest.raises(BankError, match="implausibly large"):
        ConceptBank.load(bank_dir / "bank")


# ------------------------------------------------------------------------------------------ stores


def _replace_shard(entry: StoreEntry, data: bytes, forge_name: bool) -> Path:
    """Put ``data`` in place of the first shard; with ``forge_name`` under a name carrying its real checksum, listed in the manifest."""
    shard = entry.shards()[0]
    if not forge_name:
        shard.path.write_bytes(data)
        return shard.path
    name = f"shard-{shard.start:08d}-{shard.end:08d}-{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
    shard.path.unlink()
    (entry.path / name).write_bytes(data)
    manifest = json.loads(entry.manifest_path.read_text())
    manifest["shards"][0] = name
    entry.manifest_path.write_text(json.dumps(manifest))
    return entry.path / name


@pytest.mark.parametrize("forge_name", [False, True], ids=["as-is", "checksum-forged"])
@pytest.mark.parametrize("payload", [pickle_payload, torch_payload], ids=["pickle", "torch.save"])
def test_pickle_as_store_shard_is_rejected(tmp_path, stored, payload, forge_name):
    store, entry, model, dataset = stored
    reference = entry.read_all()
    marker = tmp_path / "marker"
    path = _replace_shard(entry, payload(marker), forge_name)
    with pytest.raises(StoreError, match="cannot read shard" if forge_name else "corrupt") as caught:
        StoreEntry(store.root, entry.key).read_all()
    assert path.name in one_line(caught.value)
    assert not marker.exists()
    if not forge_name:  # a checksum mismatch: the next embedding deletes the file and recomputes it
        result = embed(model, dataset, ["2"], store, batch_size=3, device="cpu")
        assert result.forward_batches == 1 and torch.equal(result.entries["2"].read_all(), reference)
    assert not marker.exists()


def test_store_shard_with_huge_header_is_rejected_quickly(stored):
    store, entry, _, _ = stored
    path = _replace_shard(entry, huge_header_safetensors(), forge_name=True)
    started = time.perf_counter()
    with pytest.raises(StoreError, match="cannot read shard") as caught:
        StoreEntry(store.root, entry.key).read_all()
    assert path.name in one_line(caught.value) and time.perf_counter() - started < 2


@pytest.mark.parametrize("name", [
    "../../evil.safetensors",
    "../shard-00000000-00000003-0123456789abcdef.safetensors",
    "/tmp/shard-00000000-00000003-0123456789abcdef.safetensors",
    "shard-00000000-00000003-0123456789abcdef.safetensors/../../../evil.safetensors",
    "shard-00000000-00000003-0123456789abcdef.safetensors\n",
    "sub/shard-00000000-00000003-0123456789abcdef.safetensors",
])
def test_store_manifest_cannot_leave_the_entry(tmp_path, stored, name):
    store, entry, model, dataset = stored
    reference = entry.read_all()
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(entry.shards()[0].path, outside / "evil.safetensors")  # a valid shard, but not the entry's
    before = sorted(p.name for p in tmp_path.rglob("*") if "store" not in p.parts)
    manifest = json.loads(entry.manifest_path.read_text())
    manifest["shards"][0] = name.replace("/tmp/", f"{outside}/").replace("../../evil", "../../outside/evil")
    entry.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="invalid shard name") as caught:
        StoreEntry(store.root, entry.key).read_all()
    one_line(caught.value)
    # the next embedding drops the bad manifest and rebuilds it from the entry's own shards, touching nothing outside
    result = embed(model, dataset, ["2"], store, batch_size=3, device="cpu")
    assert result.forward_batches == 0 and torch.equal(result.entries["2"].read_all(), reference)
    assert sorted(p.name for p in tmp_path.rglob("*") if "store" not in p.parts) == before


@pytest.mark.parametrize("key", ["../outside", "/etc", "0" * 31 + "/", "..", "A" * 32, "0" * 32 + "\n"])
def test_store_keys_are_hex_only(tmp_path, key):
    with pytest.raises(StoreError, match="not a store key"):
        StoreEntry(tmp_path, key)


def test_store_manifest_too_large_is_rejected(stored):
    store, entry, _, _ = stored
    with open(entry.manifest_path, "r+b") as file:
        file.truncate(65 * 1024 * 1024)
    with pytest.raises(StoreError, match="implausibly large"):
        entry.manifest()


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['mkdir {marker}']",
    "!!python/object/apply:os.mkdir ['{marker}']",
    "!!python/object/new:os.mkdir ['{marker}']",
    "!!python/name:os.system",
])
def test_config_with_python_tags_is_refused(tmp_path, tag, capsys):
    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: x\ndata:\n  spec: {tag.format(marker=marker)}\nmodels:\n  - {{name: a, spec: zoo:synthetic_vgg_centernet, layers: [backbone.block2]}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert str(config) in one_line(caught.value) and "tag" in str(caught.value)
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
@pytest.mark.parametrize("payload", [pickle_payload, torch_payload], ids=["pickle", "torch.save"])
def test_pickle_weights_are_rejected_without_running(tmp_path, payload, suffix, capsys):
    marker = tmp_path / "marker"
    weights = tmp_path / f"evil{suffix}"
    weights.write_bytes(payload(marker))
    with pytest.raises(ModelSpecError) as caught:
        load_state_dict_file(weights)
    assert str(weights) in one_line(caught.value)
    with pytest.raises(ConceptLensError):
        load_model("tests.test_untrusted:tiny_net", weights=str(weights))
    assert main(["layers", "tests.test_untrusted:tiny_net", "--weights", str(weights), "--input-size", "16", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(weights) in err and err.count("\n") == 1
    assert not marker.exists()


def test_zoo_model_weights_path_is_loaded_safely_not_ignored(tmp_path):
    marker = tmp_path / "marker"
    weights = tmp_path / "evil.pt"
    weights.write_bytes(torch_payload(marker))
    with pytest.raises(ModelSpecError, match="weights_only") as caught:
        load_model("zoo:synthetic_vgg_centernet", weights=str(weights))
    assert str(weights) in one_line(caught.value) and not marker.exists()
    honest = load_model("zoo:synthetic_vgg_centernet")
    state = {k: v + 1 if v.is_floating_point() else v for k, v in honest.module.state_dict().items()}
    torch.save(state, tmp_path / "retrained.pt")
    retrained = load_model("zoo:synthetic_vgg_centernet", weights=str(tmp_path / "retrained.pt"))
    assert retrained.hash != honest.hash and all(torch.equal(retrained.module.state_dict()[k], v) for k, v in state.items())


def test_weights_with_huge_safetensors_header_are_rejected(tmp_path):
    weights = tmp_path / "huge.safetensors"
    weights.write_bytes(huge_header_safetensors())
    with pytest.raises(ModelSpecError, match="cannot read weights") as caught:
        load_state_dict_file(weights)
    assert str(weights) in one_line(caught.value)


def test_plain_state_dict_weights_still_load(tmp_path):
    """Control: the safe loaders do accept an honest state dict."""
    state = {k: v + 1 for k, v in tiny_net().state_dict().items()}
    torch.save(state, tmp_path / "ok.pt")
    model = load_model("tests.test_untrusted:tiny_net", weights=str(tmp_path / "ok.pt"))
    assert all(torch.equal(model.module.state_dict()[k], v) for k, v in state.items())


# ------------------------------------------------------------------------------------------ source


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def test_every_torch_load_passes_weights_only_true():
    calls = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id == "torch":
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
                    calls.append((f"{path.relative_to(REPO)}:{node.lineno}", safe))
    assert calls, "expected the weights loaders to call torch.load"
    assert [where for where, safe in calls if not safe] == []
    # no aliasing that would dodge the check above
    for path in _sources():
        text = path.read_text()
        assert "from torch import load" not in text and "torch.serialization.load" not in text, path


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def test_no_pickle_or_unsafe_loaders_in_the_packages():
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                found += [(where, a.name) for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append((where, node.module))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "yaml" and node.attr in ("load", "load_all", "unsafe_load", "full_load", "Loader", "UnsafeLoader", "FullLoader"):
                    found.append((where, f"yaml.{node.attr}"))
                if node.value.id == "pd" and node.attr == "read_pickle":
                    found.append((where, "pandas.read_pickle"))
            elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    found.append((where, "allow_pickle"))
    assert found == []
