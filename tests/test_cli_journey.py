"""The road from "my model, my images" to results: init → run, names, shared banks, closing lines, progress, help."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file

from conceptlens.cli import main
from conceptlens.concepts.data.folder import write_folder_dataset
from conceptlens.concepts.data.synthetic import SyntheticWorld
from conceptlens.concepts.progress import finish_early, progress_bar, progress_scope

CONCEPTS = ["car", "house", "sky", "ground"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of images and masks as a user would bring it (24 synthetic scenes, 4 concepts)."""
    return write_folder_dataset(SyntheticWorld(24, seed=0).select_concepts(CONCEPTS), tmp_path_factory.mktemp("user") / "photos", seed=0)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A "fine-tuned" torchvision checkpoint: resnet18 with a 5-class head, saved as safetensors."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    path = tmp_path_factory.mktemp("ckpt") / "finetuned.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["probe", "--help"], ["tcav", "--help"], ["init", "--help"]])
def test_help_imports_neither_torch_nor_numpy(argv):
    code = ("import sys\nfrom conceptlens.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))") % (argv,)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_every_error_of_a_config_at_once(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("name: a/b\nseed: -1\ndata: {spec: x, concepts: [car, car]}\n"
                      "models: [{name: m, spec: 'torchvision:resnet18', layers: [], colour: red}]\nembed: {grid: [0, 10]}\n")
    assert main(["run", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ")[2] for line in lines] == ["name", "seed", "data.concepts[1]", "models[0].colour", "models[0].layers", "embed.grid[0]"]
    assert all(line.startswith(f"error: {config}: ") and " — fix: " in line for line in lines)


@pytest.mark.slow
def test_init_then_run_on_your_images_with_a_finetuned_checkpoint(photos, finetuned, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = "torchvision:resnet18?num_classes=5"
    assert main(["init", spec, str(photos), "--weights", str(finetuned), "--target", "logit:2", "--out", "audit.yaml", "--quiet"]) == 0
    assert "next: conceptlens run audit.yaml --dry-run" in capsys.readouterr().out
    text = (tmp_path / "audit.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["models"][0]["layers"] == ["layer1", "layer2", "layer3", "layer4"]
    assert config["data"]["concepts"] == CONCEPTS and config["models"][0]["weights"] == str(finetuned)
    # a short run: fewer epochs, a smaller grid and fewer resamples; everything else as init wrote it
    config["embed"] = {"grid": [16, 16], "batch_size": 8}
    config["probes"] = {"net2vec": {"max_epochs": 2}, "nmf": {"k": 3}}
    config["controls"].update({"n_permutations": 19, "n_bootstrap": 0, "control_epochs": 1})
    config["tcav"].update({"random_sets": 3, "n_bootstrap": 0})
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "audit.yaml", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"model resnet18 ({spec}): weights {finetuned}; device cpu" in out
    assert (tmp_path / "conceptlens-resnet18" / "report.html").is_file()
    assert sorted(p.name for p in (tmp_path / "conceptlens-resnet18" / "banks").glob("*.json"))[:2] == [
        "resnet18__layer1.net2vec.json", "resnet18__layer1.nmf.json"]


def _probe(data, out, *extra):
    return main(["probe", "zoo:synthetic_vgg_centernet", str(data), "--layers", "backbone.block2", "--epochs", "1", "--grid", "8", "8",
                 "--out", str(out), "--store", str(out.parent / "store"), "--quiet", *extra])


def test_probe_names_its_banks_and_closes_with_what_it_used(photos, tmp_path, capsys):
    assert _probe(photos, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert (tmp_path / "out" / "banks" / "synthetic_vgg_centernet__backbone.block2.net2vec.json").is_file()
    assert "model zoo:synthetic_vgg_centernet: weights shipped with zoo:synthetic_vgg_centernet; device cpu" in out
    assert "next: conceptlens maps zoo:synthetic_vgg_centernet IMAGE.png --bank " in out
    assert _probe(photos, tmp_path / "out", "--name", "detector") == 0
    assert (tmp_path / "out" / "banks" / "detector__backbone.block2.net2vec.json").is_file()


def test_banks_are_shared_across_output_folders(photos, tmp_path):
    shared = tmp_path / "shared-banks"
    assert _probe(photos, tmp_path / "first", "--banks", str(shared)) == 0
    bank = shared / "synthetic_vgg_centernet__backbone.block2.net2vec.safetensors"
    stamp = bank.stat().st_mtime_ns
    assert _probe(photos, tmp_path / "second", "--banks", str(shared)) == 0
    assert bank.stat().st_mtime_ns == stamp  # reused, not trained again
    assert not (tmp_path / "second" / "banks").exists()


def test_another_models_bank_is_never_overwritten(photos, tmp_path, capsys):
    assert _probe(photos, tmp_path / "out", "--name", "m") == 0
    bank = tmp_path / "out" / "banks" / "m__backbone.block2.net2vec.json"
    before = bank.read_bytes()
    argv = ["probe", "zoo:synthetic_resnet_fpn", str(photos), "--layers", "backbone.block2", "--epochs", "1", "--grid", "8", "8", "--name", "m",
            "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store"), "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bank}: holds the bank of another model") and "--name" in err
    assert bank.read_bytes() == before


def test_compare_takes_model_names(photos, tmp_path, capsys):
    argv = ["compare", str(photos), "--model", "zoo:synthetic_vgg_centernet", "--layers", "backbone.block2", "--name", "vgg",
            "--model", "zoo:synthetic_resnet_fpn", "--layers", "backbone.block2", "--name", "resnet", "--epochs", "1", "--grid", "8", "8",
            "--out", str(tmp_path / "cmp"), "--store", str(tmp_path / "store"), "--quiet"]
    assert main(argv) == 0
    assert {p.name for p in (tmp_path / "cmp" / "banks").glob("*.json")} == {"vgg__backbone.block2.net2vec.json", "resnet__backbone.block2.net2vec.json"}
    assert main([*argv, "--name", "x"]) == 2  # three names for two models
    assert "3 --name values" in capsys.readouterr().err


def test_progress_bars_say_what_they_count(capsys):
    with progress_scope("vgg"), progress_scope("backbone.block3"):
        bar = progress_bar(range(10), desc="net2vec", unit="epoch", show=True)
        for epoch in bar:
            if epoch == 3:
                finish_early(bar, epoch + 1, "stopped early at epoch 4")
                break
        bar.close()
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("vgg · backbone.block3 · net2vec: 100%") and "4/4" in final and "stopped early at epoch 4" in final


def test_train_zoo_never_writes_into_the_package(capsys):
    from conceptlens.concepts.models.zoo.detectors import WEIGHTS_DIR

    assert main(["train-zoo", "--out", str(WEIGHTS_DIR), "--steps", "1"]) == 2
    assert "inside the installed conceptlens package" in capsys.readouterr().err
