"""Hostile JSON files: every JSON file conceptlens reads is checked by type and shape.

Each case is a hand-built file that the readers used to crash on (``TypeError`` sorting mixed
ids, ``KeyError`` inside pycocotools, ``RecursionError``), read silently wrong (a key given twice
keeps its last value, a seed ``"3"`` became "unknown"), or served (a bank of NaN vectors). Each
now ends with one error line naming the file, the key path and the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_tensors

from conceptlens.cli import main
from conceptlens.concepts.data.coco import CocoDataset
from conceptlens.concepts.data.dataset import ArrayDataset
from conceptlens.concepts.data.folder import FolderDataset, write_folder_dataset
from conceptlens.concepts.errors import DataError, StoreError
from conceptlens.concepts.store.activations import ActivationStore, StoreEntry
from conceptlens.concepts.store.artifacts import read_json
from conceptlens.concepts.store.files import safetensors_extent
from conceptlens.concepts.store.schema import Ids, Int, ListOf, Number, Record, Str, check
from conceptlens.concepts.vectors.bank import BankError, ConceptBank
from conceptlens.report.loading import ReportError, load_results
from conceptlens.report.results import Block, ResultsError
from tests.test_hostile_data import write_coco
from tests.test_hostile_store import embed_two, make_fifo

DEEP = 100_000  # nested lists: far past the interpreter's recursion limit


def one_error(call, error_type: type[BaseException], *words: str) -> str:
    """``call`` raises ``error_type`` (not a RecursionError, not a TypeError); its one-line message holds every word."""
    with pytest.raises(error_type) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and " — fix: " in message, message
    for word in words:
        assert word in message, message
    return message


# --------------------------------------------------------------------------- 1. the strict reader


READER_CASES = {
    "duplicate-key-nested": (b'{"a": {"b": 1, "b": 2}}', ["x.json: a", "gives the key 'b' twice"]),
    "duplicate-key-in-list-item": (b'{"items": [{"id": 1}, {"id": 2, "id": 3}]}', ["x.json: items[1]", "'id' twice"]),
    "duplicate-key-top": (b'{"seed": 1, "seed": 2}', ["x.json", "'seed' twice"]),
    "deep-nesting-100000": (b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}", ["x.json", "64-level limit"]),
    "deep-nesting-70": (b'{"a": ' + b"[" * 69 + b"]" * 69 + b"}", ["x.json: a[0][0]", "64-level limit"]),
    "not-utf8": (b'{"name": "caf\xe9"}', ["x.json", "not UTF-8 text", "0xe9", "offset 13"]),
    "utf16": ('{"name": "x"}'.encode("utf-16"), ["x.json", "not UTF-8 text", "offset 0"]),
    "not-an-object": (b"[1, 2]", ["x.json", "is not a JSON object"]),
    "huge-integer": (b'{"n": ' + b"9" * 5000 + b"}", ["x.json", "not valid JSON"]),
}


@pytest.mark.parametrize("name", list(READER_CASES))
def test_strict_reader_refuses_with_one_line(tmp_path, name):
    raw, words = READER_CASES[name]
    (tmp_path / "x.json").write_bytes(raw)
    one_error(lambda: read_json(tmp_path / "x.json", StoreError, fix="write it again"), StoreError, *words, "write it again")


def test_strict_reader_keeps_what_conceptlens_writes(tmp_path):
    """NaN and infinity (undefined metrics in artifact metadata), a byte-order mark and 64 levels still read."""
    path = tmp_path / "x.json"
    path.write_bytes(b'\xef\xbb\xbf{"m": [NaN, Infinity, -Infinity, 0.5], "deep": ' + b"[" * 63 + b"]" * 63 + b"}")
    data = read_json(path)
    assert np.isnan(data["m"][0]) and data["m"][1:] == [float("inf"), float("-inf"), 0.5]
    depth, value = 1, data["deep"]
    while value:
        depth, value = depth + 1, value[0]
    assert depth == 63


# --------------------------------------------------------------------------- 2. the shape checker

SHAPE_CASES = [
    (Record({"n": Int(min=0)}), {"n": "12"}, "f.json: n", "expected an integer >= 0, got '12' (a string)"),
    (Record({"n": Int(min=0)}), {"n": -3}, "f.json: n", "expected an integer >= 0, got -3 (an integer)"),
    (Record({"n": Int()}), {"n": True}, "f.json: n", "got True (a boolean)"),
    (Record({"n": Int()}), {"n": 2.0}, "f.json: n", "got 2.0 (a number)"),
    (Record({"n": Int()}), {}, "f.json: n", "is missing (expected an integer)"),
    (Record({"xs": ListOf(Number())}), {"xs": 3}, "f.json: xs", "expected a list, got 3 (an integer)"),
    (Record({"xs": ListOf(Number())}), {"xs": [1, float("nan")]}, "f.json: xs[1]", "expected a finite number"),
    (Record({"xs": ListOf(Int(), min_len=2, max_len=2)}), {"xs": [1]}, "f.json: xs", "expected a list of 2 items, got a list of 1 items"),
    (Record({"ids": Ids()}), {"ids": [1, 2, "3"]}, "f.json: ids[2]", "mixes id types: '3' (a string) after 1 (an integer)"),
    (Record({"ids": Ids()}), {"ids": ["a", "b", "a"]}, "f.json: ids[2]", "repeats 'a' (a string) (first at [0])"),
    (Record({"ids": Ids()}), {"ids": [1.5]}, "f.json: ids[0]", "expected an integer or a string, got 1.5"),
    (Record({"a": Record({"b": Str(non_empty=True)})}), {"a": {"b": ""}}, "f.json: a.b", "expected a non-empty string"),
]


@pytest.mark.parametrize(("schema", "value", "culprit", "problem"), SHAPE_CASES)
def test_shape_checker_names_the_key_path(schema, value, culprit, problem):
    with pytest.raises(DataError) as caught:
        check(value, schema, "f.json", DataError, "fix it")
    assert caught.value.culprit == culprit
    assert problem in caught.value.problem, caught.value.problem
    assert caught.value.fix == "fix it"


# --------------------------------------------------------------------------- 3. dataset files


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
    masks = [np.zeros((2, 8, 8), bool) for _ in images]
    for m in masks:
        m[0, :4] = m[1, 4:] = True
    return write_folder_dataset(ArrayDataset(images, masks, ["sky", "wheel"], ids=[f"i{k}" for k in range(5)]), tmp_path / "data", seed=3)


def _edit(path: Path, change) -> None:
    """Apply ``change`` to the file's JSON in place, or write what it returns instead (when not None)."""
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))


DATASET_CASES = {
    "splits-mixed-id-types": ("splits.json", lambda d: d["train"].__setitem__(1, 7), "train[1]", "mixes id types: 7 (an integer) after 'i"),
    "splits-not-a-list": ("splits.json", lambda d: d.__setitem__("val", "i1"), "val", "expected a list"),
    "splits-seed-string": ("splits.json", lambda d: d.__setitem__("seed", "3"), "seed", "expected an integer >= -1"),
    "splits-id-twice": ("splits.json", lambda d: d["test"].append(d["test"][0]), "test[1]", "repeats"),
    "splits-missing": ("splits.json", lambda d: d.__delitem__("test"), "test", "is missing"),
    "concepts-number": ("concepts.json", lambda d: d.__setitem__(1, 5), "[1]", "got 5 (an integer)"),
    "concepts-object": ("concepts.json", lambda d: {"sky": 0}, "", "expected a list"),
    "invalid-ids-a-string": ("invalid_masks.json", lambda d: {"sky": "i1"}, "sky", "expected a list"),
    "invalid-mixed-ids": ("invalid_masks.json", lambda d: {"sky": ["i1", 2]}, "sky[1]", "mixes id types"),
    "invalid-unknown-concept": ("invalid_masks.json", lambda d: {"skyy": ["i1"]}, "skyy", "not a concept folder"),
    "invalid-unknown-id": ("invalid_masks.json", lambda d: {"sky": ["i1", "i9"]}, "sky[1]", "'i9'"),
}


@pytest.mark.parametrize("name", list(DATASET_CASES))
def test_folder_dataset_files_are_checked(folder, name):
    file, change, where, problem = DATASET_CASES[name]
    path = folder / file
    if not path.exists():
        path.write_text("{}")
    _edit(path, change)
    with pytest.raises(DataError) as caught:
        FolderDataset(folder)
    assert caught.value.culprit == (f"{path}: {where}" if where else str(path))
    assert problem in caught.value.problem, caught.value.problem
    assert "\n" not in str(caught.value) and caught.value.fix


@pytest.mark.parametrize("file", ["splits.json", "concepts.json", "invalid_masks.json"])
def test_folder_dataset_files_refuse_duplicate_keys_bytes_and_depth(folder, file):
    path = folder / file
    for raw, words in [(b'{"train": [], "train": []}' if file != "concepts.json" else b'[{"a": 1, "a": 2}]', ["twice"]),
                       (b'["\xff"]', ["not UTF-8"]), (b"[" * DEEP + b"]" * DEEP, ["64-level limit"])]:
        path.write_bytes(raw)
        one_error(lambda: FolderDataset(folder), DataError, str(path), *words)


def test_folder_dataset_stored_split_and_seed_still_read(folder):
    dataset = FolderDataset(folder)
    stored = json.loads((folder / "splits.json").read_text())
    assert dataset.split_seed == 3 and dataset.splits == {s: stored[s] for s in ("train", "val", "test")}


# --------------------------------------------------------------------------- 4. COCO


COCO_CASES = {
    "annotation-without-id": ({"annotations": [{"image_id": 1, "category_id": 1, "segmentation": [[1, 1, 6, 1, 6, 6]]}]},
                              "instances.json: annotations[0].id", "is missing"),
    "annotation-id-a-list": ({"annotations": [{"id": [7], "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 6, 1, 6, 6]]}]},
                             "instances.json: annotations[0].id", "expected an integer"),
    "category-name-a-list": ({"categories": [{"id": 1, "name": ["dog"]}]}, "instances.json: categories[0] (id 1).name", "expected a non-empty string"),
    "category-id-a-string": ({"categories": [{"id": "1", "name": "dog"}]}, "instances.json: categories[0] (id '1').id", "expected an integer"),
    "image-id-mixed": ({"images": [{"id": 1, "file_name": "one.png", "height": 10, "width": 12},
                                   {"id": "2", "file_name": "one.png", "height": 10, "width": 12}]},
                       "instances.json: images[1] (id '2').id", "expected an integer"),
    "annotations-an-object": ({"annotations": {"7": {}}}, "instances.json: annotations", "expected a list"),
}


@pytest.mark.parametrize("name", list(COCO_CASES))
def test_coco_entries_are_typed_before_pycocotools(tmp_path, name):
    sections, culprit, problem = COCO_CASES[name]
    path, images = write_coco(tmp_path, **sections)
    with pytest.raises(DataError) as caught:
        CocoDataset(path, images)
    assert caught.value.culprit == str(tmp_path / culprit), caught.value.culprit
    assert problem in caught.value.problem


@pytest.mark.parametrize(("raw", "words"), [
    (b'{"images": [], "annotations": [], "categories": [], "images": []}', ["'images' twice"]),
    (b'{"images": [{"id": 1, "file_name": "\xff.png"}], "annotations": [], "categories": []}', ["not UTF-8", "re-download"]),
    (b'{"images": ' + b"[" * DEEP + b"]" * DEEP + b', "annotations": [], "categories": []}', ["64-level limit"]),
])
def test_coco_file_is_read_strictly(tmp_path, raw, words):
    path, images = write_coco(tmp_path)
    path.write_bytes(raw)
    one_error(lambda: CocoDataset(path, images), DataError, str(path), *words)


def test_coco_duplicate_image_ids_are_refused(tmp_path):
    entry = {"id": 1, "file_name": "one.png", "height": 10, "width": 12}
    one_error(lambda: CocoDataset(*write_coco(tmp_path, images=[entry, dict(entry)])), DataError, "images: id 1", "twice", "unique id")


# --------------------------------------------------------------------------- 5. banks


@pytest.fixture
def bank_files(tmp_path) -> Path:
    bank = ConceptBank(method="net2vec", layer="conv", concepts=["sky", "wheel", "road"], vectors=torch.randn(3, 4), biases=torch.zeros(3))
    bank.save(tmp_path / "bank")
    return tmp_path / "bank"


def _replace_tensors(bank: Path, **tensors: torch.Tensor) -> None:
    """Rewrite the bank's tensor file and fix its checksum in the JSON (as a forger would)."""
    data = save_tensors({"vectors": torch.randn(3, 4), "biases": torch.zeros(3), **tensors})
    bank.with_suffix(".safetensors").write_bytes(data)
    _edit(bank.with_suffix(".json"), lambda meta: meta.__setitem__("tensors_sha256", hashlib.sha256(data).hexdigest()))


@pytest.mark.parametrize(("change", "culprit", "problem"), [
    (lambda m: m.__setitem__("n_channels", "4"), "bank.json: n_channels", "expected an integer >= 1"),
    (lambda m: m.__setitem__("concepts", ["sky", 2, "road"]), "bank.json: concepts[1]", "expected a string"),
    (lambda m: m.__setitem__("metrics", [1, 2]), "bank.json: metrics", "expected an object"),
    (lambda m: m.__setitem__("metrics", {"sky": 0.5}), "bank.json: metrics.sky", "expected an object"),
    (lambda m: m.__setitem__("standardized", "no"), "bank.json: standardized", "expected true or false"),
])
def test_bank_json_is_typed(bank_files, change, culprit, problem):
    _edit(bank_files.with_suffix(".json"), change)
    message = one_error(lambda: ConceptBank.load(bank_files), BankError, problem, "save the concept bank again")
    assert message.startswith(f"{bank_files.parent / culprit}: "), message


@pytest.mark.parametrize(("tensors", "concepts"), [
    ({"vectors": torch.tensor([[0.0, 1, 2, 3], [float("nan"), 0, 0, 0], [1.0, 1, 1, 1]])}, "['wheel']"),
    ({"vectors": torch.tensor([[float("inf"), 1, 2, 3], [0.0, 0, 0, 1], [1.0, 1, 1, float("-inf")]])}, "['sky', 'road']"),
    ({"biases": torch.tensor([0.0, 0.0, float("nan")])}, "['road']"),
])
def test_bank_with_nan_or_inf_vectors_is_refused_on_load(bank_files, tensors, concepts):
    _replace_tensors(bank_files, **tensors)
    one_error(lambda: ConceptBank.load(bank_files), BankError, "bank.safetensors", concepts, "not finite", "train the bank again")


def test_bank_with_a_zero_deviation_is_refused_on_load(bank_files):
    _replace_tensors(bank_files, channel_mean=torch.zeros(4), channel_std=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    one_error(lambda: ConceptBank.load(bank_files), BankError, "standardisation", "train the bank again")


def test_bank_with_nan_vectors_is_never_written(tmp_path):
    bank = ConceptBank(method="nmf", layer="conv", concepts=["ncav_0", "ncav_1"], vectors=torch.tensor([[1.0, 0], [float("nan"), 1]]), biases=torch.zeros(2))
    one_error(lambda: bank.save(tmp_path / "nan"), BankError, "['ncav_1']", "not finite")
    assert list(tmp_path.iterdir()) == []


def test_a_finite_bank_loads_as_saved(bank_files):
    bank = ConceptBank.load(bank_files)
    assert bank.concepts == ["sky", "wheel", "road"] and bank.n_channels == 4


@pytest.mark.parametrize(("change", "where", "problem"), [
    (lambda m: m.__setitem__("random_pairs", [["random_0", "random_1", "random_2"], ["random_1", "random_0"]]), "random_pairs[0]", "expected a list of 2 items"),
    (lambda m: m.__setitem__("n_features", 0), "n_features", "expected an integer >= 1"),
    (lambda m: m.__setitem__("random_sets", "random_0"), "random_sets", "expected a list"),
])
def test_cav_set_json_is_typed(tmp_path, change, where, problem):
    from conceptlens.probes.linear import CAVError, CAVSet, train_cavs

    rng = np.random.default_rng(0)
    sets = {name: torch.from_numpy(rng.normal(size=(8, 3))).float() for name in ("stripes", "random_0", "random_1")}
    json_path = train_cavs({"stripes": sets["stripes"]}, {k: v for k, v in sets.items() if k != "stripes"}, layer="conv").save(tmp_path / "cavs")
    CAVSet.load(tmp_path / "cavs")  # as written, it loads
    _edit(json_path, change)
    message = one_error(lambda: CAVSet.load(tmp_path / "cavs"), CAVError, problem)
    assert message.startswith(f"{json_path}: {where}: "), message


def test_safetensors_header_with_a_tensor_twice_is_unreadable():
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = f'{{"a": {entry}, "a": {entry.replace("[0, 4]", "[0, 400]")}}}'.encode()
    with pytest.raises(ValueError, match="'a' twice"):
        safetensors_extent(io.BytesIO(struct.pack("<Q", len(header)) + header + b"\0" * 400))
    bad = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]}}'
    with pytest.raises(ValueError, match=r"a\.data_offsets\[0\]: expected an integer >= 0"):
        safetensors_extent(io.BytesIO(struct.pack("<Q", len(bad)) + bad))


# --------------------------------------------------------------------------- 6. store manifests


@pytest.fixture
def entry(tmp_path) -> StoreEntry:
    return embed_two(ActivationStore(tmp_path / "store")).entries["2"]


MANIFEST_CASES = {
    "n-items-a-string": (lambda m: m.__setitem__("n_items", "6"), "n_items", "expected an integer >= 0"),
    "n-items-negative": (lambda m: m.__setitem__("n_items", -1), "n_items", "expected an integer >= 0"),
    "ids-mixed": (lambda m: m["dataset"]["ids"].__setitem__(3, 3), "dataset.ids[3]", "mixes id types"),
    "ids-fewer-than-items": (lambda m: m["dataset"]["ids"].__delitem__(-1), "dataset.ids", "lists 5 ids for n_items 6"),
    "item-shape-negative": (lambda m: m.__setitem__("item_shape", [2, -4, 4]), "item_shape[1]", "expected an integer >= 0"),
    "shard-past-n-items": (lambda m: m.update(n_items=4, dataset={**m["dataset"], "ids": m["dataset"]["ids"][:4]}), "shards[1]", "outside the entry's 4"),
    "shards-a-string": (lambda m: m.__setitem__("shards", "shard"), "shards", "expected a list"),
}


@pytest.mark.parametrize("name", list(MANIFEST_CASES))
def test_store_manifest_is_typed(entry, name):
    change, where, problem = MANIFEST_CASES[name]
    _edit(entry.manifest_path, change)
    fresh = StoreEntry(entry.path.parent, entry.key)
    message = one_error(fresh.manifest, StoreError, problem, "embed again")
    assert message.startswith(f"{entry.manifest_path}: {where}: "), message


def test_store_manifest_split_naming_an_unknown_id_is_refused(tmp_path):
    from conceptlens.concepts.embedding.masks import embed_masks

    masks = [np.zeros((1, 20, 20), bool) for _ in range(6)]
    for m in masks:
        m[0, :5] = True
    dataset = ArrayDataset([np.zeros((20, 20, 3), np.uint8)] * 6, masks, ["sky"])
    mask_entry = embed_masks(dataset, ActivationStore(tmp_path / "store"), grid=(4, 4))
    _edit(mask_entry.manifest_path, lambda m: m["dataset"]["splits"]["val"].append("nope"))
    message = one_error(StoreEntry(mask_entry.path.parent, mask_entry.key).manifest, StoreError, "'nope'", "dataset.ids")
    assert "dataset.splits.val[" in message


def test_store_manifest_with_a_key_twice_is_rebuilt_not_served(tmp_path):
    store = ActivationStore(tmp_path / "store")
    entry = embed_two(store).entries["2"]
    reference = entry.read_all()
    text = entry.manifest_path.read_text()
    entry.manifest_path.write_text(text.replace('"n_items": 6', '"n_items": 3, "n_items": 6'))
    one_error(StoreEntry(store.root, entry.key).manifest, StoreError, "manifest.json", "'n_items' twice")
    again = embed_two(store)
    assert again.forward_batches == 0 and torch.equal(again.entries["2"].read_all(), reference)


# --------------------------------------------------------------------------- 7. result files


def test_run_json_field_of_the_wrong_type_names_the_field(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"name": "r", "data": {"n_images": "12"}}))
    with pytest.raises(ReportError) as caught:
        load_results(tmp_path)
    assert caught.value.culprit == str(tmp_path / "run.json")
    assert caught.value.problem == "RunSummary.data.n_images is a string, not an integer"


@pytest.mark.parametrize(("block", "problem"), [
    ({"rows": ["x"], "columns": ["u"], "similarity": [[0.5]], "ridge": {"pairs": [[0, 3]]}}, "Block.ridge.pairs[0] (0, 3) is outside the 1 × 1 block"),
    ({"rows": ["x"], "columns": ["u"], "similarity": [[0.5]], "ridge": {"pairs": [["0", 0]]}}, "RidgePair[0] is a string, not an integer"),
    ({"rows": ["x", "y"], "columns": ["u"], "similarity": [[0.5]]}, "Block.similarity is not 2 × 1 (rows × columns)"),
    ({"rows": ["x"], "columns": ["u"], "similarity": [[0.5]], "p_value": [[0.1, 0.2]]}, "Block.p_value is not 1 × 1 (rows × columns)"),
    ({"rows": ["x"], "columns": [1], "similarity": [[0.5]]}, "Block.columns[0] is an integer, not a string"),
])
def test_comparison_block_indices_and_shapes_are_checked(block, problem):
    with pytest.raises(ResultsError) as caught:
        Block.from_json({"a": "A", "b": "B", **block})
    assert f"{caught.value.culprit} {caught.value.problem}" == problem


def test_step_json_that_is_a_fifo_or_malformed_is_not_current(tmp_path):
    from conceptlens.pipeline import _current

    path = tmp_path / "tcav.json"
    path.write_text('{"step_key": "k", "step_key": "k"}')
    assert _current(path, "k") is False
    path.write_text('{"step_key": "k"}')
    assert _current(path, "k") is True
    assert _current(make_fifo(tmp_path / "pipe.json"), "k") is False


# --------------------------------------------------------------------------- 8. the CLI: one line, exit 2


def _cli_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_cli_report_names_the_result_field(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"name": "r", "seed": 1, "seed": 2}')
    err = _cli_error(["report", str(tmp_path)], capsys)
    assert f"{tmp_path / 'run.json'}" in err and "'seed' twice" in err and "fix: " in err


def test_cli_embed_names_the_coco_entry(tmp_path, capsys):
    from tests.test_bad_input import _tiny

    path, images = write_coco(tmp_path, categories=[{"id": 1, "name": "dog"}, {"id": 2, "name": {"en": "cat"}}])
    err = _cli_error(["embed", _tiny(tmp_path), str(path), "--coco-images", str(images), "--layers", "conv",
                      "--store", str(tmp_path / "store"), "--quiet"], capsys)
    assert "instances.json: categories[1] (id 2).name: expected a non-empty string" in err and "fix: " in err


def test_cli_embed_names_the_splits_file(folder, tmp_path, capsys):
    from tests.test_bad_input import _tiny

    _edit(folder / "splits.json", lambda d: d["train"].__setitem__(1, 1))
    err = _cli_error(["embed", _tiny(tmp_path), str(folder), "--layers", "conv", "--store", str(tmp_path / "store"), "--quiet"], capsys)
    assert "splits.json: train[1]: mixes id types: 1 (an integer) after 'i" in err and "delete it to recompute the split" in err
