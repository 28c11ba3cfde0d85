"""The command line: listing, embedding with reuse, and one-line errors with exit code 2."""

from __future__ import annotations

import numpy as np
import pytest

from conceptlens.concepts.data.dataset import ArrayDataset
from conceptlens.concepts.data.folder import write_folder_dataset
from conceptlens.cli import main


@pytest.fixture
def folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(6)]
    masks = [np.zeros((1, 30, 40), bool) for _ in range(6)]
    masks[0][0, 5:15, 5:25] = True
    return write_folder_dataset(ArrayDataset(images, masks, ["patch"]), tmp_path / "data")


def test_layers_lists_in_order(capsys):
    assert main(["layers", "torchvision:resnet18", "--input-size", "64", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[1] for line in lines[1:]]
    assert names.index("conv1") < names.index("layer3") < names.index("fc")
    assert any(line.split()[1] == "layer2" and "128×8×8" in line for line in lines)


def test_embed_then_reuse(folder_dataset, tmp_path, capsys):
    argv = ["embed", "torchvision:resnet18", str(folder_dataset), "--layers", "layer1", "--store", str(tmp_path / "store"),
            "--input-size", "32", "32", "--batch-size", "4", "--quiet"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "computed" in first and "2 forward batches" in first
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "reused" in second and "0 forward batches" in second


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [
        (["layers", "torchvision:resnet81"], "torchvision:resnet81"),
        (["layers", "nonsense"], "nonsense"),
        (["embed", "torchvision:resnet18", "/no/such/folder", "--layers", "layer1"], "/no/such/folder"),
        (["embed", "torchvision:resnet18", "synthetic:4", "--layers", "layer9"], "layer9"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, culprit, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and culprit in err and "fix:" in err
    assert "\n" not in err and "Traceback" not in err


def test_debug_shows_traceback():
    from conceptlens.concepts.errors import ModelSpecError

    with pytest.raises(ModelSpecError):
        main(["layers", "nonsense", "--debug"])


def test_synth_writes_folder_layout_that_loads_back_exactly(tmp_path, capsys):
    from conceptlens.concepts.data.folder import FolderDataset
    from conceptlens.concepts.data.synthetic import SyntheticWorld

    assert main(["synth", str(tmp_path / "world"), "--n", "6", "--seed", "3", "--quiet"]) == 0
    loaded, world = FolderDataset(tmp_path / "world"), SyntheticWorld(n_images=6, seed=3)
    assert loaded.concepts == world.concepts and loaded.ids == world.ids
    assert loaded.splits == world.splits
    for index in range(6):
        assert np.array_equal(loaded.image(index), world.image(index))
        assert np.array_equal(loaded.masks(index), world.masks(index))


@pytest.mark.slow
def test_demo_runs_and_tells_depth_apart(tmp_path, capsys, one_thread):
    import json

    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'demo' / 'report.html'}" in out
    table = json.loads((tmp_path / "demo" / "probe_vgg_net2vec.json").read_text())["metrics"]
    assert table["backbone.block2"]["sky"]["set_iou"] > 0.8  # background: already at the shallowest layer
    assert table["backbone.block4"]["car"]["set_iou"] > table["backbone.block2"]["car"]["set_iou"] + 0.2  # objects: deeper


def _image_sets(root, rng):
    from PIL import Image

    for name in ("stripes", "random_0", "random_1", "random_2"):
        (root / name).mkdir(parents=True)
        for i in range(8):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            if name == "stripes":
                image[::4] = 255
            Image.fromarray(image).save(root / name / f"{name}{i}.png")
    return root


@pytest.mark.parametrize("method", ["net2vec", "nmf", "linear"])
def test_probe_writes_banks_and_metrics(tmp_path, capsys, method):
    from conceptlens.concepts.vectors.bank import ConceptBank

    data = str(_image_sets(tmp_path / "sets", np.random.default_rng(0))) if method == "linear" else "synthetic:40"
    argv = ["probe", "torchvision:resnet18", data, "--layers", "layer1", "--method", method, "--store", str(tmp_path / "store"),
            "--out", str(tmp_path / "out"), "--input-size", "64", "64", "--grid", "16", "16", "--epochs", "2", "--k", "3", "--quiet"]
    if method != "linear":
        argv += ["--concepts", "car", "house", "sky"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "layer1" in out
    bank = ConceptBank.load(tmp_path / "out" / "banks" / f"resnet18__layer1.{method}", expected_channels=64)  # named after the spec
    assert bank.method == method
    assert (tmp_path / "out" / f"probe_{method}.json").is_file()
    if method == "linear":
        assert bank.concepts == ["stripes"] and bank.metrics["stripes"]["accuracy_mean"] > 0.8
    elif method == "net2vec":
        assert bank.concepts == ["car", "house", "sky"]
    else:
        assert bank.n_concepts == 3 and "matched_concept" in bank.metrics["ncav_0"]


def test_tcav_writes_json_csv_and_marks_significance(tmp_path, capsys, one_thread):
    import csv
    import json

    from PIL import Image

    sets = _image_sets(tmp_path / "sets", np.random.default_rng(0))
    (sets / "zebra").mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(sets / "zebra" / f"z{i}.png")
    argv = ["tcav", "torchvision:resnet18", str(sets), "--layers", "layer1", "layer2", "--target", "logit:3", "--target", "prob:7",
            "--inputs", "zebra", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"), "--input-size", "64", "64",
            "--bootstrap", "50", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "tcav.json").read_text())
    assert result["n_hypotheses"] == 1 * 2 * 2  # concepts (zebra is the inputs, not a concept) × layers × targets
    assert {r["concept"] for r in result["records"]} == {"stripes"}
    record = result["records"][0]
    assert record["n_inputs"] == 6 and len(record["scores"]["sign_count"]) == 3 and len(record["null_scores"]["sign_count"]) == 3
    assert result["provenance"]["random_sets"] == ["random_0", "random_1", "random_2"]
    with (tmp_path / "out" / "tcav.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {row["target"] for row in rows} == {"logit:3", "prob:7"}
    assert "stripes" in out and "p_holm" in out

    # a second run reuses the store: the same numbers
    assert main(argv) == 0
    again = json.loads((tmp_path / "out" / "tcav.json").read_text())
    assert [r["scores"] for r in again["records"]] == [r["scores"] for r in result["records"]]


def test_tcav_bad_inputs_exit_2(tmp_path, capsys):
    sets = _image_sets(tmp_path / "sets", np.random.default_rng(0))
    code = main(["tcav", "torchvision:resnet18", str(sets), "--layers", "layer1", "--target", "logit:3", "--inputs", "nowhere", "--quiet"])
    assert code == 2
    assert "--inputs nowhere" in capsys.readouterr().err
    code = main(["tcav", "torchvision:resnet18", str(sets), "--layers", "layer1", "--target", "top3", "--inputs", "stripes", "--quiet"])
    assert code == 2
    assert "top3" in capsys.readouterr().err


def test_maps_writes_overlays_for_probabilities_and_attributions(tmp_path, capsys, one_thread):
    import torch
    from PIL import Image

    from conceptlens.concepts.models.loading import load_model
    from conceptlens.concepts.vectors.bank import ConceptBank

    model = load_model("torchvision:resnet18", input_size=(64, 64))
    bank = ConceptBank("net2vec", "layer1", ["stripes", "dots"], torch.randn(2, 64), torch.zeros(2), provenance={"model_hash": model.hash})
    bank.save(tmp_path / "bank")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    base = ["maps", "torchvision:resnet18", str(tmp_path / "image.png"), "--bank", str(tmp_path / "bank"), "--input-size", "64", "64", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "p.png")]) == 0
    assert main([*base, "--target", "logit:3", "--out", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "stripes" in out and "dots" in out
    for name in ("p.png", "g.png"):
        assert Image.open(tmp_path / name).size[0] > 200
    other = ConceptBank("net2vec", "layer1", ["x"], torch.randn(1, 64), torch.zeros(1), provenance={"model_hash": "0" * 64})
    other.save(tmp_path / "other")
    assert main([*base[:3], "--bank", str(tmp_path / "other"), "--input-size", "64", "64", "--quiet"]) == 2
    assert "trained on model" in capsys.readouterr().err
