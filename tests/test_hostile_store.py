"""Hostile artifacts (issue 15): store entries that lie, links and special files, bank-name collisions,
interrupted ``synth``, Ctrl-C and a closed stdout pipe.

Every fixture is built by hand: a tiny classifier's two-layer store, a bank, FIFOs and symbolic
links. Nothing here may hang: every read that could block on a FIFO runs in a thread with a
deadline.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conceptlens.cli import main
from conceptlens.concepts.data.dataset import ArrayDataset
from conceptlens.concepts.embedding.embed import embed
from conceptlens.concepts.errors import ConceptLensError, DataError, StoreError
from conceptlens.concepts.models.adapters import ClassifierAdapter
from conceptlens.concepts.models.loading import LoadedModel
from conceptlens.concepts.store.activations import ActivationStore, StoreEntry
from conceptlens.concepts.store.artifacts import read_json
from conceptlens.concepts.vectors.bank import BankError, ConceptBank
from conceptlens.probes.workflow import bank_path

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 10.0


def tiny_model() -> LoadedModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    return LoadedModel(net, ClassifierAdapter((16, 16)), spec="test:tiny")


def six_images() -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset([rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(6)], name="six")


def embed_two(store: ActivationStore):
    return embed(tiny_model(), six_images(), ["0", "2"], store, batch_size=3, device="cpu")


def within_deadline(call):
    """Run ``call`` in a thread; return ("ok", value) or ("raised", error); fail if it blocks (a FIFO)."""
    outcome: list = []

    def target():
        try:
            outcome.append(("ok", call()))
        except BaseException as error:  # noqa: BLE001 - reported to the test
            outcome.append(("raised", error))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert outcome, f"blocked for {DEADLINE} s (opened a FIFO?)"
    return outcome[0]


def refused(call, error_type, *words):
    """``call`` raises ``error_type`` within the deadline; its one-line message holds every word."""
    kind, value = within_deadline(call)
    assert kind == "raised" and isinstance(value, error_type), value
    message = str(value)
    assert "\n" not in message and " — fix: " in message, message
    for word in words:
        assert word in message, message
    return message


@pytest.fixture
def two_entries(tmp_path):
    store = ActivationStore(tmp_path / "store")
    result = embed_two(store)
    reference = {layer: entry.read_all() for layer, entry in result.entries.items()}
    return store, result.entries, reference


@pytest.fixture
def bank_files(tmp_path) -> Path:
    bank = ConceptBank(method="net2vec", layer="layer", concepts=["a", "b"], vectors=torch.randn(2, 4), biases=torch.zeros(2),
                       provenance={"model_hash": "0" * 64})
    bank.save(tmp_path / "banks" / "bank")
    return tmp_path / "banks" / "bank"


def run_main(argv: list[str]) -> int:
    """``main(argv)``; a KeyboardInterrupt escaping it fails the test instead of stopping the run."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")


def make_fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


# ------------------------------------------------------- 1. an entry must be what its key says


def test_entry_copied_under_another_key_is_rebuilt_not_served(two_entries):
    store, entries, reference = two_entries
    a, b = entries["0"], entries["2"]
    shutil.rmtree(a.path)
    shutil.copytree(b.path, a.path)  # layer 2's activations under layer 0's key
    refused(lambda: StoreEntry(store.root, a.key).manifest(), StoreError, a.key, "moved or copied", "rebuilds")
    again = embed_two(store)
    assert again.computed == ["0"] and torch.equal(again.entries["0"].read_all(), reference["0"])


def test_entry_whose_manifest_request_was_edited_is_rebuilt(two_entries):
    store, entries, reference = two_entries
    manifest = json.loads(entries["0"].manifest_path.read_text())
    manifest["request"]["layer"] = "2"
    entries["0"].manifest_path.write_text(json.dumps(manifest))
    refused(lambda: StoreEntry(store.root, entries["0"].key).manifest(), StoreError, "does not hash to its key")
    again = embed_two(store)
    assert again.computed == ["0"] and torch.equal(again.entries["0"].read_all(), reference["0"])


def test_entry_whose_manifest_names_another_key_is_rebuilt(two_entries):
    store, entries, reference = two_entries
    manifest = json.loads(entries["0"].manifest_path.read_text())
    manifest["key"] = entries["2"].key
    entries["0"].manifest_path.write_text(json.dumps(manifest))
    refused(lambda: entries["0"].manifest(), StoreError, entries["2"].key, "not its folder's")
    again = embed_two(store)
    assert again.computed == ["0"] and torch.equal(again.entries["0"].read_all(), reference["0"])


def test_entry_opened_for_one_request_refuses_a_manifest_of_another(two_entries):
    store, entries, _ = two_entries
    request = json.loads(entries["0"].manifest_path.read_text())["request"]
    foreign = StoreEntry(store.root, entries["0"].key, {**request, "layer": "elsewhere"})
    refused(foreign.manifest, StoreError, "not the one asked for")


# ------------------------------------------------ 2. bank files of different layers never collide


@pytest.mark.parametrize("layers", [
    ("fpn:0", "fpn/0", "fpn 0", "fpn_0"),
    ("backbone.fpn:pool", "backbone.fpn/pool"),
    ("head.cls[0]", "head.cls(0)", "head.cls_0_"),
])
def test_bank_files_of_layers_differing_in_replaced_characters_differ(tmp_path, layers):
    paths = {bank_path(tmp_path, "model", layer, "net2vec") for layer in layers}
    assert len(paths) == len(layers)
    assert all(path.parent == tmp_path and "/" not in path.name for path in paths)


@pytest.mark.parametrize("a, b", [(("a_", "b"), ("a", "_b")), (("a__b", "c"), ("a", "b__c"))])
def test_bank_files_of_label_and_layer_splits_differ(tmp_path, a, b):
    assert bank_path(tmp_path, *a, "nmf") != bank_path(tmp_path, *b, "nmf")


def test_bank_names_that_need_no_replacing_are_unchanged(tmp_path):
    assert bank_path(tmp_path, "vgg", "backbone.block3", "net2vec") == tmp_path / "vgg__backbone.block3.net2vec"
    long = bank_path(tmp_path, "m", "x" * 400, "net2vec")
    assert len(long.name) < 200 and long != bank_path(tmp_path, "m", "x" * 401, "net2vec")


# ---------------------------------------------- 3. an interrupted synth leaves no complete dataset


def _interrupt_after(monkeypatch, items: int, error: type[BaseException] = KeyboardInterrupt) -> None:
    import conceptlens.concepts.data.folder as folder

    original, written = folder._write_item, []

    def write_item(*args, **kwargs):
        if len(written) == items:
            raise error()
        written.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(folder, "_write_item", write_item)


def test_interrupted_synth_leaves_nothing_that_loads(tmp_path, monkeypatch, capsys):
    from conceptlens.concepts.data.folder import FolderDataset

    _interrupt_after(monkeypatch, 3)
    assert run_main(["synth", str(tmp_path / "world"), "--n", "8", "--quiet"]) == 130
    assert capsys.readouterr().err == "interrupted; rerun to resume\n"
    assert sorted(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin
    with pytest.raises(DataError):
        FolderDataset(tmp_path / "world")


def test_interrupted_synth_overwrite_keeps_the_old_dataset(tmp_path, monkeypatch, capsys):
    from conceptlens.concepts.data.folder import FolderDataset

    out = tmp_path / "world"
    assert main(["synth", str(out), "--n", "4", "--quiet"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _interrupt_after(monkeypatch, 2, error=lambda: OSError(errno.ENOSPC, "No space left on device"))
    assert main(["synth", str(out), "--n", "6", "--seed", "1", "--overwrite", "--quiet"]) == 2
    assert "No space left" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert FolderDataset(out, concepts=["car"]).ids == sorted(p.stem for p in (out / "images").iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["world"]


@pytest.mark.parametrize("argv, flag", [
    (["--n", "0"], "--n 0"), (["--n", "-5"], "--n -5"), (["--seed", "-1"], "--seed -1"),
])
def test_synth_errors_name_the_flag(tmp_path, capsys, argv, flag):
    assert main(["synth", str(tmp_path / "w"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}:") and "n_images" not in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_synth_into_a_non_empty_folder_names_overwrite(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["synth", str(tmp_path), "--n", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --------------------------------------------------------- 4. links and special files are refused


def test_bank_tensors_through_a_symlink_are_refused(tmp_path, bank_files):
    elsewhere = tmp_path / "elsewhere.safetensors"
    tensors = bank_files.with_name("bank.safetensors")
    shutil.move(tensors, elsewhere)
    tensors.symlink_to(elsewhere)  # the same bytes: only the link is wrong
    refused(lambda: ConceptBank.load(bank_files), BankError, "bank.safetensors", "symbolic link")


@pytest.mark.parametrize("name", ["bank.json", "bank.safetensors"])
def test_bank_file_that_is_a_fifo_is_refused_without_hanging(bank_files, name):
    make_fifo(bank_files.with_name(name))
    refused(lambda: ConceptBank.load(bank_files), BankError, name, "FIFO")


def test_bank_larger_than_its_header_is_refused_unread(bank_files):
    import hashlib

    tensors = bank_files.with_name("bank.safetensors")
    data = tensors.read_bytes() + b"\0" * 4096
    tensors.write_bytes(data)
    metadata = json.loads(bank_files.with_name("bank.json").read_text())
    metadata["tensors_sha256"] = hashlib.sha256(data).hexdigest()  # the attacker fixes the checksum too
    bank_files.with_name("bank.json").write_text(json.dumps(metadata))
    refused(lambda: ConceptBank.load(bank_files), BankError, "bank.safetensors", "header describes", "padded")


def test_result_json_through_a_symlink_or_fifo_is_refused(tmp_path):
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    refused(lambda: read_json(tmp_path / "link.json"), ConceptLensError, "link.json", "symbolic link")
    refused(lambda: read_json(make_fifo(tmp_path / "pipe.json")), ConceptLensError, "pipe.json", "FIFO")


def test_store_entry_folder_linked_outside_is_never_read_or_written(tmp_path, two_entries):
    store, entries, reference = two_entries
    entry = entries["0"]
    outside = tmp_path / "outside"
    shutil.move(entry.path, outside)  # a valid copy of the entry, but outside the store
    entry.path.symlink_to(outside, target_is_directory=True)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in outside.iterdir())
    refused(lambda: StoreEntry(store.root, entry.key).manifest(), StoreError, entry.key, "symbolic link")
    again = embed_two(store)
    assert again.computed == ["0"] and not entry.path.is_symlink() and entry.path.is_dir()
    assert torch.equal(again.entries["0"].read_all(), reference["0"])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in outside.iterdir()) == before


def test_store_shard_linked_outside_is_never_read(tmp_path, two_entries):
    store, entries, reference = two_entries
    shard = entries["0"].shards()[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard.path, outside)
    shard.path.symlink_to(outside)
    refused(lambda: StoreEntry(store.root, entries["0"].key).read_all(), StoreError, shard.path.name, "symbolic link")
    again = embed_two(store)
    assert again.forward_batches == 1 and not shard.path.is_symlink() and outside.is_file()
    assert torch.equal(again.entries["0"].read_all(), reference["0"])


@pytest.mark.parametrize("what", ["manifest", "shard"])
def test_store_fifo_in_place_of_a_file_does_not_hang(two_entries, what):
    store, entries, reference = two_entries
    entry = StoreEntry(store.root, entries["0"].key)
    path = make_fifo(entry.manifest_path if what == "manifest" else entry.shards()[0].path)
    refused(entry.read_all, StoreError, path.name, "FIFO")
    kind, again = within_deadline(lambda: embed_two(store))
    assert kind == "ok", again
    assert torch.equal(again.entries["0"].read_all(), reference["0"]) and path.is_file()


def test_store_shard_larger_than_its_header_is_refused(two_entries):
    import hashlib

    store, entries, _ = two_entries
    entry = entries["0"]
    shard = entry.shards()[0]
    data = shard.path.read_bytes() + b"\0" * 1024
    name = f"shard-{shard.start:08d}-{shard.end:08d}-{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
    shard.path.unlink()
    (entry.path / name).write_bytes(data)  # a checksum-forged name, listed in the manifest
    manifest = json.loads(entry.manifest_path.read_text())
    manifest["shards"][0] = name
    entry.manifest_path.write_text(json.dumps(manifest))
    refused(lambda: StoreEntry(store.root, entry.key).read_all(), StoreError, name, "header describes")


# ------------------------------------------------------------- 5. Ctrl-C and a closed stdout pipe


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import conceptlens.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "report", interrupted)
    assert run_main(["report", "somewhere"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted; rerun to resume\n" and captured.out == ""


def _cli(argv: list[str], **options) -> subprocess.Popen:
    code = "import sys; from conceptlens.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *argv], stderr=subprocess.PIPE, text=True, **options)


def test_closed_stdout_pipe_exits_silently(tmp_path):
    process = _cli(["synth", str(tmp_path / "w"), "--n", "2", "--quiet"], stdout=subprocess.PIPE)
    process.stdout.close()  # `| head` that already left
    _, err = process.communicate(timeout=120)
    assert err == "" and process.returncode == 1
    assert (tmp_path / "w" / "images").is_dir()  # the work itself was done


@pytest.mark.slow
def test_sigint_during_synth_is_one_line_exit_130_and_leaves_nothing(tmp_path):
    process = _cli(["synth", str(tmp_path / "w"), "--n", "100000", "--quiet"], stdout=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        while not any(tmp_path.rglob("images/*.png")):  # some scenes are written
            assert time.monotonic() - started < 60 and process.poll() is None, process.communicate()[1]
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130 and err == "interrupted; rerun to resume\n"
    assert list(tmp_path.iterdir()) == []
