"""The bad-input suite: every kind of bad input ends with one line naming the culprit and the fix.

Each case builds its bad input in ``tmp_path`` and either runs the command line
(``conceptlens.cli.main``: exit code 2, one line on stderr, no traceback; with ``--debug`` the
error propagates with its traceback) or calls the API (a :class:`ConceptLensError` whose one-line
message names the culprit and says how to fix it). After every case nothing may be left
half-written: no temporary file, and no store entry that a later run would trust.
"""

from __future__ import annotations

import errno
import io
import json
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conceptlens.concepts.data.dataset import ArrayDataset
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.data.folder import write_folder_dataset
from conceptlens.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Broken(nn.Module):
        def forward(self, x):
            return x * float("inf") - x  # inf where x > 0, NaN where x == 0


    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.broken = Broken()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = self.relu(self.conv(x))
            self.broken(x)
            return self.fc(self.pool(x).flatten(1))


    def build():
        return Tiny(), {"input_size": (16, 16)}
    """
)


# --------------------------------------------------------------------------- building blocks


def _tiny(tmp: Path) -> str:
    path = tmp / "tiny.py"
    if not path.exists():
        path.write_text(TINY_MODEL)
    return f"{path}:build"


def _images(n: int, size: tuple[int, int] = (20, 24), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _folder(tmp: Path, n: int = 6) -> Path:
    """A valid folder dataset with one concept 'patch' (positive in every image)."""
    masks = [np.zeros((1, 20, 24), bool) for _ in range(n)]
    for m in masks:
        m[0, 4:12, 5:15] = True
    return write_folder_dataset(ArrayDataset(_images(n), masks, ["patch"]), tmp / "data")


def _png(array: np.ndarray, path: Path, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _config(tmp: Path, text: str) -> Path:
    path = tmp / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


BASE_CONFIG = """
name: bad
data: {spec: "synthetic:8"}
models:
  - {name: tiny, spec: "TINY", layers: [conv]}
"""


def _coco(tmp: Path, annotations: list[dict] | None = None, images: list[dict] | None = None) -> tuple[Path, Path]:
    folder = tmp / "coco_images"
    folder.mkdir(exist_ok=True)
    entries = [{"id": 1, "file_name": "one.png", "height": 10, "width": 12}] if images is None else images
    for entry in entries:
        _png(_images(1, (entry["height"], entry["width"]))[0], folder / entry["file_name"])
    if annotations is None:
        annotations = [{"id": 7, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]], "iscrowd": 0, "area": 25.0, "bbox": [1, 1, 5, 5]}]
    data = {"images": entries, "annotations": annotations, "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "person"}]}
    path = tmp / "instances.json"
    path.write_text(json.dumps(data))
    return path, folder


def _image_sets(tmp: Path, concept_images: int = 4) -> Path:
    root = tmp / "sets"
    for name, count in {"stripes": concept_images, "cats": 3, "random_0": 4, "random_1": 4}.items():
        for i, image in enumerate(_images(count, (20, 20), seed=len(name))):
            _png(image, root / name / f"{name}{i}.png")
    return root


def _bank(tmp: Path, model_hash: str = "a" * 64):
    from conceptlens.concepts.vectors.bank import ConceptBank

    bank = ConceptBank("net2vec", "conv", ["patch", "edge"], torch.randn(2, 4), torch.zeros(2), provenance={"model_hash": model_hash})
    return bank.save(tmp / "banks" / "tiny__conv.net2vec")


def _fail_writes(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Make every atomic write fail with ``code`` after half of its bytes reached the temporary file."""
    import conceptlens.concepts.store.atomic

    def half_then_fail(file, data: bytes) -> None:
        file.write(data[: len(data) // 2])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(conceptlens.concepts.store.atomic, "_write_and_sync", half_then_fail)


def _read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only folder: chmod 0o555, or (as root, where chmod does not bind) simulated EROFS."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root: the mode is not enforced
        folder.chmod(0o755)
        import conceptlens.concepts.store.atomic

        create = conceptlens.concepts.store.atomic._temporary_file

        def read_only(path: Path):
            if folder in Path(path).parents:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
            return create(path)

        monkeypatch.setattr(conceptlens.concepts.store.atomic, "_temporary_file", read_only)


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    """One bad input: ``setup(tmp, monkeypatch)`` returns the names used in ``argv``/``culprit``.

    ``argv`` (a list, formatted with those names) runs the CLI; a callable ``call(names)`` runs
    the API instead. ``culprit`` and ``fix`` must both appear in the error line.
    """

    id: str
    setup: Callable[[Path, pytest.MonkeyPatch], dict[str, str]]
    culprit: str
    fix: str
    argv: list[str] | None = None
    call: Callable[[dict[str, Any]], Any] | None = None
    store: str | None = None  # a store folder that must hold no complete entry afterwards
    marks: tuple = ()


def _with(tmp: Path, **names: Any) -> dict[str, Any]:
    return {"tmp": str(tmp), "model": _tiny(tmp), **{k: str(v) if isinstance(v, Path) else v for k, v in names.items()}}


def setup_corrupt_jpeg(tmp, mp):
    data = _folder(tmp)
    good = _jpeg_bytes(_images(1)[0])
    rng = np.random.default_rng(1)
    body = rng.integers(0, 256, len(good) - 200, dtype=np.uint8).tobytes()
    (data / "images" / "000002.png").unlink()  # same id, so the stored split still holds
    (data / "images" / "000002.jpg").write_bytes(good[:200] + body)
    return _with(tmp, data=data, bad=data / "images" / "000002.jpg")


def setup_truncated_png(tmp, mp):
    data = _folder(tmp)
    png = data / "images" / "000002.png"
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    return _with(tmp, data=data, bad=png)


def setup_mask_other_size(tmp, mp):
    data = _folder(tmp)
    mask = _png(np.full((10, 10), 255, np.uint8), data / "masks" / "patch" / "000001.png")
    return _with(tmp, data=data, bad=mask)


def setup_mask_16bit(tmp, mp):
    data = _folder(tmp)
    mask = data / "masks" / "patch" / "000001.png"
    Image.fromarray(np.full((20, 24), 65535, np.uint16)).save(mask)
    assert Image.open(mask).mode.startswith("I")
    return _with(tmp, data=data, bad=mask)


def setup_mask_rgb(tmp, mp):
    data = _folder(tmp)
    mask = _png(np.full((20, 24, 3), 255, np.uint8), data / "masks" / "patch" / "000001.png")
    return _with(tmp, data=data, bad=mask)


def setup_non_image_extension(tmp, mp):
    data = _folder(tmp)
    bad = data / "images" / "holiday.dat"
    bad.write_bytes((data / "images" / "000000.png").read_bytes())
    return _with(tmp, data=data, bad=bad)


def setup_empty_image_folder(tmp, mp):
    data = tmp / "empty"
    (data / "images").mkdir(parents=True)
    (data / "masks" / "patch").mkdir(parents=True)
    return _with(tmp, data=data)


def setup_duplicate_concepts_folder(tmp, mp):
    data = _folder(tmp)
    _png(np.full((20, 24), 255, np.uint8), data / "masks" / "Patch" / "000000.png")
    return _with(tmp, data=data)


def setup_concepts_json_twice(tmp, mp):
    data = _folder(tmp)
    (data / "concepts.json").write_text(json.dumps(["patch", "patch"]))
    return _with(tmp, data=data)


def setup_folder(tmp, mp):
    return _with(tmp, data=_folder(tmp))


def setup_nan_layer(tmp, mp):
    return _with(tmp, data=_folder(tmp), store=tmp / "store")


def setup_coco_missing_segmentation(tmp, mp):
    annotation = {"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 25.0, "bbox": [1, 1, 5, 5]}
    coco, images = _coco(tmp, [annotation])
    return _with(tmp, coco=coco, images=images)


def setup_coco_not_json(tmp, mp):
    coco, images = _coco(tmp)
    coco.write_text("images:\n  - one.png\n")  # YAML, say
    return _with(tmp, coco=coco, images=images)


def setup_coco(tmp, mp):
    coco, images = _coco(tmp)
    return _with(tmp, coco=coco, images=images)


def setup_coco_zero_images(tmp, mp):
    coco, images = _coco(tmp, annotations=[], images=[])
    return _with(tmp, coco=coco, images=images)


def setup_config_typo(tmp, mp):
    return _with(tmp, config=_config(tmp, BASE_CONFIG.replace("TINY", _tiny(tmp)) + "embed: {bach_size: 4}\n"))


def setup_config_wrong_type(tmp, mp):
    return _with(tmp, config=_config(tmp, BASE_CONFIG.replace("TINY", _tiny(tmp)) + "embed: {batch_size: four}\n"))


def setup_config_directory(tmp, mp):
    (tmp / "configs").mkdir()
    return _with(tmp, config=tmp / "configs")


def setup_model_file_directory(tmp, mp):
    (tmp / "net.py").mkdir()
    return _with(tmp, spec=f"{tmp / 'net.py'}:build", bad=tmp / "net.py")


def setup_onnx_directory(tmp, mp):
    (tmp / "net.onnx").mkdir()
    return _with(tmp, bad=tmp / "net.onnx")


def setup_weights_directory(tmp, mp):
    (tmp / "weights.pt").mkdir()
    return _with(tmp, bad=tmp / "weights.pt")


def setup_weights_missing(tmp, mp):
    return _with(tmp, bad=tmp / "missing.pt")


def setup_weights_wrong_keys(tmp, mp):
    path = tmp / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    return _with(tmp, bad=path)


def setup_not_onnx(tmp, mp):
    path = tmp / "model.onnx"
    path.write_bytes(b"this is not a protobuf\x00\xff" * 10)
    return _with(tmp, bad=path)


def setup_read_only_store(tmp, mp):
    data = _folder(tmp)
    _read_only(tmp / "readonly", mp)
    return _with(tmp, data=data, store=tmp / "readonly" / "store")


def setup_full_disk(tmp, mp):
    data = _folder(tmp)
    _fail_writes(mp, errno.ENOSPC)
    return _with(tmp, data=data, store=tmp / "store")


def setup_full_disk_bank(tmp, mp):
    _fail_writes(mp, errno.ENOSPC)
    return _with(tmp, bank=tmp / "banks" / "tiny__conv.net2vec")


def setup_sets(tmp, mp):
    return _with(tmp, sets=_image_sets(tmp))


def setup_sets_one_image(tmp, mp):
    return _with(tmp, sets=_image_sets(tmp, concept_images=1))


def setup_bank(tmp, mp):
    return _with(tmp, bank=_bank(tmp))


def setup_bank_corrupt_json(tmp, mp):
    path = _bank(tmp)
    path.write_text(path.read_text()[:40])
    return _with(tmp, bank=path)


def setup_syntax_error(tmp, mp):
    path = tmp / "broken_model.py"
    path.write_text("from torch import nn\n\ndef build(:\n    return nn.Identity()\n")
    return _with(tmp, bad=path)


def setup_text_file(tmp, mp):
    path = tmp / "notes.txt"
    path.write_text("not a dataset, not weights\n")
    return _with(tmp, bad=path)


def setup_store_file(tmp, mp):
    (tmp / "store.txt").write_text("a file where the store folder should go\n")
    return _with(tmp, data=_folder(tmp), bad=tmp / "store.txt")


def setup_json_folder(tmp, mp):
    (tmp / "annotations.json").mkdir()
    (tmp / "coco_images").mkdir()
    return _with(tmp, bad=tmp / "annotations.json", images=tmp / "coco_images")


def setup_nothing(tmp, mp):
    return _with(tmp)


def setup_no_cuda(tmp, mp):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    return _with(tmp, data=_folder(tmp), store=tmp / "store")


# API calls --------------------------------------------------------------------------------------


def open_folder(names):
    from conceptlens.concepts.data.folder import FolderDataset

    return FolderDataset(names["data"])


def open_coco(names, categories=None):
    from conceptlens.concepts.data.coco import CocoDataset

    return CocoDataset(names["coco"], names["images"], categories=categories)


def duplicate_bank_concepts(names):
    from conceptlens.concepts.vectors.bank import ConceptBank

    return ConceptBank("net2vec", "conv", ["car", "wheel", "car"], torch.zeros(3, 4), torch.zeros(3))


def nmf_on_signed(names):
    """The tiny model's conv layer comes before its ReLU: signed activations."""
    from conceptlens.concepts.embedding.embed import embed
    from conceptlens.concepts.models.loading import load_model
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.probes.nmf import NMFConcepts

    dataset = ArrayDataset(_images(6), name="signed")
    entry = embed(load_model(names["model"]), dataset, ["conv"], ActivationStore(Path(names["tmp"]) / "store"), batch_size=8, device="cpu", progress=False).entries["conv"]
    return NMFConcepts(n_components=2, clamp=False, device="cpu").fit(entry)


def coco_with_images(names, images):
    from conceptlens.concepts.data.coco import CocoDataset

    data = json.loads(Path(names["coco"]).read_text())
    data["images"] = images
    Path(names["coco"]).write_text(json.dumps(data))
    return CocoDataset(names["coco"], names["images"])


def coco_annotation_without_image_id(names):
    from conceptlens.concepts.data.coco import CocoDataset

    data = json.loads(Path(names["coco"]).read_text())
    del data["annotations"][0]["image_id"]
    Path(names["coco"]).write_text(json.dumps(data))
    return CocoDataset(names["coco"], names["images"])


def net2vec_without_train_positive(names):
    from conceptlens.concepts.embedding.embed import embed
    from conceptlens.concepts.embedding.masks import embed_masks
    from conceptlens.concepts.models.loading import load_model
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.probes.net2vec import Net2VecProbe

    images = _images(10)
    probe = ArrayDataset(images, [np.zeros((2, 20, 24), bool) for _ in images], ["wheel", "sky"])
    test = set(probe.splits["test"]) | set(probe.splits["val"])
    masks = []
    for item_id in probe.ids:
        m = np.zeros((2, 20, 24), bool)
        m[1, :10] = True  # sky everywhere
        if item_id in test:
            m[0, 5:15, 5:15] = True  # wheels only outside the train split
        masks.append(m)
    dataset = ArrayDataset(images, masks, ["wheel", "sky"], name="no-train-wheels")
    store = ActivationStore(Path(names["tmp"]) / "store")
    model = load_model(names["model"])
    activations = embed(model, dataset, ["conv"], store, batch_size=4, device="cpu", progress=False).entries["conv"]
    grid_masks = embed_masks(dataset, store, grid=(8, 8), progress=False)
    return Net2VecProbe(max_epochs=1, device="cpu", progress=False).fit(activations, grid_masks)


def bank_of_other_model(names):
    from conceptlens.concepts.vectors.bank import ConceptBank

    return ConceptBank.load(names["bank"], model_hash="b" * 64)


def bank_wrong_channels(names):
    from conceptlens.concepts.vectors.bank import ConceptBank

    return ConceptBank.load(names["bank"], expected_channels=16)


def load_bank(names):
    from conceptlens.concepts.vectors.bank import ConceptBank

    return ConceptBank.load(names["bank"])


def save_bank(names):
    from conceptlens.concepts.vectors.bank import ConceptBank

    ConceptBank("net2vec", "conv", ["patch"], torch.ones(1, 4), torch.zeros(1)).save(names["bank"])


def embed_zero_images(names):
    from conceptlens.concepts.embedding.embed import embed
    from conceptlens.concepts.models.loading import load_model
    from conceptlens.concepts.store.activations import ActivationStore

    return embed(load_model(names["model"]), ArrayDataset([], name="nothing"), ["conv"], ActivationStore(Path(names["tmp"]) / "store"), device="cpu")


def bad_box(names):
    from conceptlens.attribution.targets import target_from_spec

    return target_from_spec("box:1:0,0,10")


def select_unknown_concept(names):
    from conceptlens.concepts.data.synthetic import SyntheticWorld

    return SyntheticWorld(n_images=2).select_concepts(["whele"])


EMBED = ["embed", "{model}", "{data}", "--layers", "conv", "--store", "{tmp}/store", "--batch-size", "4", "--quiet"]
COCO_EMBED = ["embed", "{model}", "{coco}", "--coco-images", "{images}", "--layers", "conv", "--store", "{tmp}/store", "--quiet"]
TCAV = ["tcav", "{model}", "{sets}", "--layers", "conv", "--inputs", "cats", "--store", "{tmp}/store", "--out", "{tmp}/out", "--bootstrap", "0", "--quiet"]

CASES = [
    # loaders: images and masks
    Case("corrupt-jpeg", setup_corrupt_jpeg, "{bad}", "re-export", argv=EMBED),
    Case("truncated-png", setup_truncated_png, "{bad}", "re-export", argv=EMBED, store="{tmp}/store"),
    Case("mask-other-size", setup_mask_other_size, "{bad}", "at the image's resolution", call=open_folder),
    Case("mask-16-bit", setup_mask_16bit, "{bad}", "8-bit grayscale", call=open_folder),
    Case("mask-rgb", setup_mask_rgb, "{bad}", "8-bit grayscale", call=open_folder),
    Case("non-image-extension", setup_non_image_extension, "{bad}", "convert it", argv=EMBED),
    Case("empty-image-folder", setup_empty_image_folder, "{data}/images", "layout", argv=EMBED),
    Case("duplicate-concepts-folder", setup_duplicate_concepts_folder, "Patch", "rename one", call=open_folder),
    Case("concept-listed-twice", setup_concepts_json_twice, "concepts.json", "list each concept once", call=open_folder),
    Case("unknown-concept", setup_nothing, "whele", "wheel", call=select_unknown_concept),
    # COCO
    Case("coco-missing-segmentation", setup_coco_missing_segmentation, "annotation 7", "fix the annotation", call=open_coco),
    Case("coco-not-json", setup_coco_not_json, "{coco}", "re-download", argv=COCO_EMBED),
    Case("coco-unknown-category", setup_coco, "category 'dgo'", "use 'dog'", call=lambda names: open_coco(names, ["dgo"])),
    Case("coco-zero-images", setup_coco_zero_images, "{coco}", "with images", argv=COCO_EMBED),
    Case("coco-images-not-a-list", setup_coco, "instances.json: images", "instances_*.json", call=lambda names: coco_with_images(names, {"1": "one.png"})),
    Case("coco-annotation-without-image-id", setup_coco, "annotations[0] (id 7)", "fix the entry", call=coco_annotation_without_image_id),
    Case("coco-json-is-folder", setup_json_folder, "{bad}", "instances_*.json", argv=[arg.replace("{coco}", "{bad}") for arg in COCO_EMBED]),
    Case("data-spec-is-a-file", setup_text_file, "{bad}", "give the dataset's folder", argv=["embed", "{model}", "{bad}", "--layers", "conv", "--store", "{tmp}/store", "--quiet"]),
    Case("dataset-zero-images", setup_nothing, "dataset 'nothing'", "check the dataset", call=embed_zero_images),
    # models and weights
    Case("unknown-model-spec", setup_nothing, "resnet18", "torchvision:resnet18", argv=["layers", "resnet18"]),
    Case("unknown-torchvision-builder", setup_nothing, "torchvision:resnet81", "resnet18", argv=["layers", "torchvision:resnet81"]),
    Case("model-file-is-folder", setup_model_file_directory, "{bad}", "file", argv=["layers", "{spec}"]),
    Case("onnx-file-is-folder", setup_onnx_directory, "{bad}", "file", argv=["layers", "{bad}"]),
    Case("not-onnx", setup_not_onnx, "{bad}", "export", argv=["layers", "{bad}"]),
    Case("model-file-syntax-error", setup_syntax_error, "{bad}", "fix {bad}", argv=["layers", "{bad}:build"]),
    Case("input-size-zero", setup_nothing, "--input-size 0", "--input-size 224 224", argv=["layers", "{model}", "--input-size", "0", "0"]),
    Case("weights-not-a-state-dict", setup_text_file, "{bad}", "state dict", argv=["layers", "{model}", "--weights", "{bad}"]),
    Case("weights-is-folder", setup_weights_directory, "{bad}", "state dict", argv=["layers", "{model}", "--weights", "{bad}"]),
    Case("weights-missing", setup_weights_missing, "{bad}", "check the path", argv=["layers", "{model}", "--weights", "{bad}"]),
    Case("weights-wrong-keys", setup_weights_wrong_keys, "{bad}", "use the weights this architecture", argv=["layers", "{model}", "--weights", "{bad}"]),
    # layers
    Case("layer-of-another-model", setup_nothing, "backbone.body.layer3", "layer3",
         argv=["embed", "torchvision:resnet18", "synthetic:2", "--layers", "backbone.body.layer3", "--store", "{tmp}/store", "--quiet"]),
    Case("nan-layer", setup_nan_layer, "layer 'broken'", "check the model", argv=[*EMBED[:3], "--layers", "broken", *EMBED[5:]], store="{tmp}/store"),
    # probes
    Case("nmf-signed-without-clamp", setup_nothing, "layer 'conv'", "clamp=True", call=nmf_on_signed),
    Case("net2vec-no-train-positive", setup_nothing, "concept 'wheel'", "add training images", call=net2vec_without_train_positive),
    # configs
    Case("config-key-typo", setup_config_typo, "embed.bach_size", "did you mean 'batch_size'", argv=["run", "{config}", "--out", "{tmp}/out", "--quiet"]),
    Case("config-wrong-type", setup_config_wrong_type, "embed.batch_size", "write an integer", argv=["run", "{config}", "--out", "{tmp}/out", "--quiet"]),
    Case("config-is-folder", setup_config_directory, "{config}", "give a .yaml file", argv=["run", "{config}", "--out", "{tmp}/out", "--quiet"]),
    # stores and disks
    Case("read-only-store", setup_read_only_store, "{store}", "writable", argv=[*EMBED[:5], "--store", "{store}", *EMBED[7:]], store="{store}"),
    Case("full-disk", setup_full_disk, "{store}", "free", argv=[*EMBED[:5], "--store", "{store}", *EMBED[7:]], store="{store}"),
    Case("full-disk-bank", setup_full_disk_bank, "{bank}", "free", call=save_bank),
    Case("store-is-a-file", setup_store_file, "{bad}", "choose another --store", argv=[*EMBED[:5], "--store", "{bad}", *EMBED[7:]]),
    Case("device-unknown", setup_folder, "--device gpu", "cpu", argv=[*EMBED, "--device", "gpu"]),
    Case("device-cuda-without-cuda", setup_no_cuda, "--device cuda", "--device cpu", argv=[*EMBED, "--device", "cuda"], store="{store}"),
    # concept banks
    Case("duplicate-concepts-bank", setup_nothing, "duplicate concept names ['car']", "unique name", call=duplicate_bank_concepts),
    Case("bank-of-another-model", setup_bank, "{bank}", "train the bank on this model", call=bank_of_other_model),
    Case("bank-wrong-channels", setup_bank, "{bank}", "trained on this layer", call=bank_wrong_channels),
    Case("bank-json-corrupt", setup_bank_corrupt_json, "{bank}", "save it again", call=load_bank),
    # attribution
    Case("unknown-target", setup_sets, "logit3", "logit:K", argv=[*TCAV, "--target", "logit3"]),
    Case("box-target-malformed", setup_sets, "box:1:0,0,10", "x0,y0,x1,y1", argv=[*TCAV, "--target", "box:1:0,0,10"]),
    Case("box-target-malformed-api", setup_nothing, "box:1:0,0,10", "x0,y0,x1,y1", call=bad_box),
    Case("tcav-concept-set-of-one", setup_sets_one_image, "stripes", "add images", argv=[*TCAV, "--target", "logit:1"]),
]


def _fmt(text: str, names: dict[str, Any]) -> str:
    return text.format(**names)


def _assert_nothing_half_written(tmp: Path, store: str | None) -> None:
    leftovers = [p for p in tmp.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    if store is not None and Path(store).is_dir():
        trusted = list(Path(store).glob("*/manifest.json"))
        assert not trusted, f"a failed run left a complete-looking store entry: {trusted}"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_gives_one_line_naming_culprit_and_fix(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    names = case.setup(tmp_path, monkeypatch)
    culprit, fix = _fmt(case.culprit, names), _fmt(case.fix, names)
    capsys.readouterr()
    if case.argv is not None:
        argv = [_fmt(arg, names) for arg in case.argv]
        assert main(argv) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and culprit in err and "fix: " in err and fix in err.split("fix: ", 1)[1], err
        with pytest.raises(ConceptLensError):  # --debug: the error propagates with its traceback
            main([*argv, "--debug"])
    else:
        with pytest.raises(ConceptLensError) as caught:
            case.call(names)
        message = str(caught.value)
        assert "\n" not in message and culprit in message and caught.value.fix and fix in caught.value.fix, message
    _assert_nothing_half_written(tmp_path, _fmt(case.store, names) if case.store else None)


# --------------------------------------------------------------------------- inputs that must work


def test_fewer_images_than_the_batch_size_works(tmp_path, capsys):
    data = _folder(tmp_path, n=3)
    argv = ["embed", _tiny(tmp_path), str(data), "--layers", "conv", "--store", str(tmp_path / "store"), "--batch-size", "32", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "computed" in out and "1 forward batches" in out
    assert len(list((tmp_path / "store").glob("*/manifest.json"))) == 1


def test_full_disk_then_a_later_run_recomputes(tmp_path, monkeypatch, capsys):
    """After ENOSPC nothing is trusted: the next run (with space) completes the entry from scratch."""
    data = _folder(tmp_path)
    argv = ["embed", _tiny(tmp_path), str(data), "--layers", "conv", "--store", str(tmp_path / "store"), "--batch-size", "4", "--quiet"]
    with monkeypatch.context() as patch:
        _fail_writes(patch, errno.ENOSPC)
        assert main(argv) == 2
    assert "free space" in capsys.readouterr().err
    assert not list((tmp_path / "store").glob("*/manifest.json"))
    assert main(argv) == 0
    assert "computed" in capsys.readouterr().out


def test_other_os_errors_exit_2_naming_the_path(tmp_path, monkeypatch, capsys):
    """An OSError outside the atomic writes (a results folder that cannot be created) is one line too."""
    import conceptlens.cli as cli

    def refuse(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "locked"))

    monkeypatch.setitem(cli.COMMANDS, "report", refuse)
    assert main(["report", str(tmp_path / "locked")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "locked") in err and "fix:" in err
    with pytest.raises(OSError):
        main(["report", str(tmp_path / "locked"), "--debug"])
