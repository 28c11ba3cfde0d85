"""The public API: ``import conceptlens as cl`` is curated, documented, lazy; the one-call workflows work without a store.

* Every name of ``conceptlens.__all__`` resolves, has a docstring, is listed by ``dir()`` and is the
  very object its module defines; every public package has a docstring and an ``__all__`` whose
  names resolve.
* ``import conceptlens`` (and the CLI module) import no torch.
* ``load_model`` takes your own ``nn.Module``; ``probe_model``, ``compare_models``,
  ``set_activations`` and ``embed`` work with no store (a temporary one, deleted at exit) and no
  banks folder (banks in memory), and the persistent store stays one argument away.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import conceptlens as cl

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_PACKAGES = (
    "conceptlens", "conceptlens.concepts", "conceptlens.concepts.data", "conceptlens.concepts.models", "conceptlens.concepts.models.zoo",
    "conceptlens.concepts.store", "conceptlens.concepts.embedding", "conceptlens.concepts.vectors", "conceptlens.concepts.compare",
    "conceptlens.concepts.training", "conceptlens.probes", "conceptlens.attribution",
)
CONCEPTS = ["car", "house", "tree", "sky", "ground"]
GRID = (16, 16)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ the API itself


def test_every_public_name_resolves_is_documented_and_listed() -> None:
    listed = set(dir(cl))
    assert len(cl.__all__) == len(set(cl.__all__)) and len(cl.__all__) >= 50
    for name in cl.__all__:
        value = getattr(cl, name)
        assert (inspect.getdoc(value) or "").strip(), f"conceptlens.{name} has no docstring"
        assert name in listed, f"dir(conceptlens) does not list {name}"
        assert value.__name__ == name  # every export is a class or function of that name


@pytest.mark.parametrize(
    ("name", "module"),
    [("probe_model", "conceptlens.probes.workflow"), ("compare_models", "conceptlens.concepts.compare.workflow"),
     ("set_activations", "conceptlens.probes.image_cavs"), ("fit_image_cavs", "conceptlens.probes.image_cavs"),
     ("ProbedModel", "conceptlens.concepts.vectors.probed"), ("embed", "conceptlens.concepts.embedding.embed"),
     ("load_model", "conceptlens.concepts.models.loading"), ("ConceptBank", "conceptlens.concepts.vectors.bank"),
     ("tcav_scores", "conceptlens.attribution.tcav"), ("write_report", "conceptlens.report"), ("run_pipeline", "conceptlens.pipeline")],
)
def test_facade_names_are_the_objects_their_modules_define(name: str, module: str) -> None:
    assert getattr(cl, name) is getattr(importlib.import_module(module), name)


def test_the_api_covers_every_part_of_the_toolkit() -> None:
    wanted = {
        "load_model", "list_layers", "LoadedModel", "FolderDataset", "CocoDataset", "ImageSets", "SyntheticWorld", "RealTextureWorld",
        "ConceptDataset", "ArrayDataset", "embed", "embed_masks", "ActivationStore", "Net2VecProbe", "LinearCAV", "CAVSet", "train_cavs", "MiniBatchNMFConcepts",
        "NMFConcepts", "ConceptBank", "probe_model", "compare_models", "fit_image_cavs", "set_activations", "supervised_similarity",
        "unsupervised_similarity", "cka_matrix", "ridge", "tcav_scores", "TCAVResult", "holm", "bonferroni", "ClassLogit", "TopDetection",
        "concept_maps", "gradient_cav_maps", "ncav_importance", "run_pipeline", "load_config", "write_report", "ConceptLensError",
    }
    assert wanted <= set(cl.__all__), sorted(wanted - set(cl.__all__))


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'probe_modle'"):
        cl.probe_modle  # noqa: B018
    assert not hasattr(cl, "workflow")


@pytest.mark.parametrize("package", PUBLIC_PACKAGES)
def test_every_public_package_has_a_docstring_and_an_all_that_resolves(package: str) -> None:
    module = importlib.import_module(package)
    assert len((module.__doc__ or "").strip()) > 40, f"{package} has no real docstring"
    assert module.__all__, f"{package} exports nothing"
    for name in module.__all__:
        assert getattr(module, name) is not None
        assert name in dir(module)


def test_embedding_package_keeps_the_embed_function_after_its_module_is_imported() -> None:
    import conceptlens.concepts.embedding
    import conceptlens.concepts.embedding.embed  # noqa: F401  (would replace the attribute by the module if imported lazily)

    assert inspect.isfunction(conceptlens.concepts.embedding.embed)


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(result.stdout.split())


def test_import_conceptlens_loads_no_torch() -> None:
    loaded = _modules_after("import conceptlens as cl; dir(cl); cl.__all__; cl.ConceptLensError")
    assert "conceptlens" in loaded and "conceptlens.concepts.errors" in loaded
    assert not {"torch", "numpy", "torchvision", "sklearn", "matplotlib"} & loaded
    assert "torch" in _modules_after("import conceptlens as cl; cl.load_model")  # a name that needs torch loads it


def test_the_cli_module_loads_no_torch() -> None:
    assert "torch" not in _modules_after("import conceptlens.cli")


# ------------------------------------------------------------------------------ models as modules


def _tiny_classifier() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def test_load_model_takes_a_module_like_the_spec_that_builds_it() -> None:
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the seed a torchvision:<builder> spec with weights=none uses
        module = torchvision.models.resnet18(weights=None)
    from_module = cl.load_model(module, input_size=(96, 96))
    from_spec = cl.load_model("torchvision:resnet18", input_size=(96, 96))
    assert from_module.module is module and not module.training
    assert from_module.hash == from_spec.hash
    assert from_module.adapter.settings() == from_spec.adapter.settings()
    assert from_module.spec == "ResNet (torchvision.models.resnet)"
    assert cl.load_model(from_module) is from_module


def test_load_model_loads_weights_into_a_module(tmp_path) -> None:
    from safetensors.torch import save_file

    trained, fresh = _tiny_classifier(), _tiny_classifier()
    with torch.no_grad():
        trained[0].weight.add_(1.0)
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = cl.load_model(fresh, weights=str(tmp_path / "w.safetensors"), input_size=(32, 32))
    torch.testing.assert_close(loaded.module[0].weight, trained[0].weight)
    with pytest.raises(cl.ConceptLensError, match="is a int"):
        cl.load_model(42)


# ------------------------------------------------------------------------ workflows without a store


@pytest.fixture(scope="module")
def world():
    return cl.SyntheticWorld(n_images=40, seed=2).select_concepts(CONCEPTS)


@pytest.fixture(scope="module")
def probed_pair(world):
    from conceptlens.concepts.store.temporary import temporary_store

    model = cl.load_model(_tiny_classifier(), input_size=(64, 64))
    first = cl.probe_model(model, world, ["1", "3"], params={"max_epochs": 2}, grid=GRID, label="tiny")
    second = cl.probe_model(model, world, "3", params={"max_epochs": 2}, grid=GRID, label="again")
    return model, first, second, temporary_store()


def test_probe_model_without_store_or_banks_folder(probed_pair, world) -> None:
    model, first, second, store = probed_pair
    assert first.layers == ["1", "3"] and first.grid == GRID and first.method == "net2vec"
    assert all(entry.path.parent == store.root for entry in first.activations.values())  # the temporary store
    assert second.activations["3"].key == first.activations["3"].key  # the second call reused the embedding
    torch.testing.assert_close(second.banks["3"].vectors, first.banks["3"].vectors)  # same seed, same data: same bank
    assert first.banks["3"].concepts == CONCEPTS
    sky = first.metrics["3"]["sky"]["set_iou"]
    assert 0.3 < sky <= 1.0  # sky is large and plain: even a tiny random net finds it
    assert first.depths == [0.0, 1.0] and 0 < first.module_depths[0] < first.module_depths[1] <= 1


def test_probe_model_with_a_persistent_store_and_banks_folder_reuses_saved_banks(tmp_path, world) -> None:
    model = cl.load_model(_tiny_classifier(), input_size=(64, 64))
    first = cl.probe_model(model, world, "3", store=tmp_path / "store", banks_dir=tmp_path / "banks", params={"max_epochs": 1}, grid=GRID)
    saved = sorted(p.name for p in (tmp_path / "banks").iterdir())
    assert saved == ["Sequential__3.net2vec.json", "Sequential__3.net2vec.safetensors"]  # default label: the module's class
    assert first.activations["3"].path.parent == tmp_path / "store"
    stamp = (tmp_path / "banks" / saved[1]).stat().st_mtime_ns
    again = cl.probe_model(model, world, "3", store=cl.ActivationStore(tmp_path / "store"), banks_dir=tmp_path / "banks", params={"max_epochs": 1}, grid=GRID)
    assert (tmp_path / "banks" / saved[1]).stat().st_mtime_ns == stamp  # reused, not refitted
    torch.testing.assert_close(again.banks["3"].vectors, first.banks["3"].vectors)


def test_compare_models_without_store_uses_the_probes_grid_and_method(probed_pair, world) -> None:
    _, first, second, _ = probed_pair
    result = cl.compare_models([first, second], world)
    assert result["grid"] == list(GRID) and result["method"] == "net2vec"
    assert [layer["label"] for layer in result["layers"]] == ["tiny:1", "tiny:3", "again:3"]
    matrix = np.array(result["matrix"], dtype=float)
    assert matrix[1, 2] == pytest.approx(1.0)  # the same layer probed twice: identical maps
    assert matrix[0, 1] < 1.0 and np.allclose(matrix, matrix.T, equal_nan=True)
    assert len(result["blocks"]) == 3 and result["cka"]["pooled"][1][2] == pytest.approx(1.0, abs=1e-5)


def test_compare_models_refuses_repeated_labels(probed_pair, world) -> None:
    _, first, _, _ = probed_pair
    with pytest.raises(cl.ConceptLensError, match="labels tiny.*distinct label="):
        cl.compare_models([first, first], world)


def test_image_cavs_from_sets_drawn_from_masks(probed_pair, world) -> None:
    model = probed_pair[0]
    sets = cl.concept_image_sets(world, ["sky", "tree"], images_per_set=8, random_sets=3, seed=1)
    assert list(sets) == ["sky", "tree", "random_0", "random_1", "random_2"]
    coverage = {name: [world.masks(world.ids.index(i))[CONCEPTS.index("tree")].mean() for i in s.ids] for name, s in sets.items()}
    assert min(coverage["tree"]) >= 0.02  # every image of the tree set shows a tree
    pooled = cl.set_activations(model, sets, "3")
    assert set(pooled) == {"3"} and pooled["3"]["sky"].shape == (8, 16)
    cavs = cl.fit_image_cavs(pooled, seed=0)["3"]  # concepts and random sets told apart by name
    assert cavs.concepts == ["sky", "tree"] and cavs.random_sets == ["random_0", "random_1", "random_2"]
    assert cavs.vectors.shape == (2, 3, 16) and cavs.random_vectors.shape == (3, 16)
    with pytest.raises(cl.ConceptLensError, match="sets boat: have no activations"):
        cl.fit_image_cavs(pooled, ["boat"])


def test_embed_without_store(world) -> None:
    from conceptlens.concepts.store.temporary import temporary_store

    model = cl.load_model(_tiny_classifier(), input_size=(64, 64))
    result = cl.embed(model, world, ["1"], reduce="mean")
    assert result.entries["1"].path.parent == temporary_store().root
    assert result.entries["1"].read_all().shape == (len(world), 8)


def test_the_temporary_store_is_deleted_at_exit() -> None:
    code = (
        "from conceptlens.concepts.store.temporary import temporary_store\n"
        "store = temporary_store(); assert store is temporary_store()\n"
        "(store.root / 'x').write_text('1'); print(store.root)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    root = Path(result.stdout.strip())
    assert root.name.startswith("conceptlens-store-") and not root.exists()


def test_probe_model_takes_a_dataset_folder(tmp_path, world) -> None:
    folder = cl.write_folder_dataset(world, tmp_path / "my_concepts", seed=0)
    model = cl.load_model(_tiny_classifier(), input_size=(64, 64))
    probed = cl.probe_model(model, str(folder), "1", params={"max_epochs": 1}, grid=GRID, label="folder")
    assert probed.banks["1"].concepts == CONCEPTS  # in the order concepts.json records
    assert len(probed.activations["1"].manifest()["dataset"]["ids"]) == len(world)


def test_set_activations_takes_an_image_sets_folder(tmp_path, world) -> None:
    from PIL import Image

    for name, rows in (("sky", range(0, 6)), ("random_0", range(6, 12)), ("random_1", range(12, 18))):
        (tmp_path / "sets" / name).mkdir(parents=True)
        for i in rows:
            Image.fromarray(world.image(i)).save(tmp_path / "sets" / name / f"{i:03d}.png")
    model = cl.load_model(_tiny_classifier(), input_size=(64, 64))
    pooled = cl.set_activations(model, cl.ImageSets(tmp_path / "sets"), ["1", "3"])
    assert {layer: sorted(sets) for layer, sets in pooled.items()} == {"1": ["random_0", "random_1", "sky"], "3": ["random_0", "random_1", "sky"]}
    assert pooled["1"]["sky"].shape == (6, 8) and pooled["3"]["random_1"].shape == (6, 16)
    direct = cl.set_activations(model, {"sky": cl.ImageSets(tmp_path / "sets").dataset("sky")}, "3")
    torch.testing.assert_close(direct["3"]["sky"], pooled["3"]["sky"])
