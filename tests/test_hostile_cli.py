"""Hostile command lines: every numeric flag is checked, warnings come out as one line, TCAV with one random set.

A bad value ends the command before any work with one line, ``error: --flag VALUE: problem — fix: …``,
and exit code 2, like every other bad input.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conceptlens import cli
from conceptlens.cli import main

MODEL = ["torchvision:resnet18", "--input-size", "64", "64"]
TCAV = ["tcav", *MODEL, "sets", "--layers", "layer1", "--target", "logit:3", "--inputs", "stripes"]
PROBE = ["probe", *MODEL, "synthetic:4", "--layers", "layer1"]


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and "usage:" not in captured.err
    return captured.err.strip()


# ------------------------------------------------------------------------------------ numeric flags


@pytest.mark.parametrize(("argv", "expected"), [
    (["embed", *MODEL, "synthetic:4", "--layers", "layer1", "--grid", "0", "10"], "--grid 0: must be between 1 and 4096 — fix: pass e.g. --grid 100 100"),
    (["embed", *MODEL, "synthetic:4", "--layers", "layer1", "--grid", "10", "-1"], "--grid -1: must be between 1 and 4096"),
    (["embed", *MODEL, "synthetic:4", "--layers", "layer1", "--grid", "abc", "10"], "--grid abc: not an integer — fix: pass e.g. --grid 100 100"),
    (["embed", *MODEL, "synthetic:4", "--layers", "layer1", "--batch-size", "0"], "--batch-size 0: must be between 1 and 65536"),
    (["embed", *MODEL, "synthetic:4", "--layers", "layer1", "--seed", "-1"], "--seed -1: must be between 0 and 4294967295 — fix: pass e.g. --seed 0"),
    (["embed", *MODEL, "synthetic:4", "--layers", "layer1", "--seed", str(2 ** 32)], "--seed 4294967296: must be between 0 and 4294967295"),
    ([*PROBE, "--k", "0"], "--k 0: must be between 1 and 4096"),
    ([*PROBE, "--epochs", "0"], "--epochs 0: must be between 1 and 10000"),
    ([*PROBE, "--runs", "0"], "--runs 0: must be between 1 and 1000"),
    ([*PROBE, "--grid", "5000", "5"], "--grid 5000: must be between 1 and 4096"),
    ([*TCAV, "--max-inputs", "0"], "--max-inputs 0: must be between 1 and 1000000 — fix: pass e.g. --max-inputs 32"),
    ([*TCAV, "--runs", "-2"], "--runs -2: must be between 1 and 1000"),
    ([*TCAV, "--alpha", "1.5"], "--alpha 1.5: must be between 0 and 1 (exclusive) — fix: pass e.g. --alpha 0.05"),
    ([*TCAV, "--alpha", "nan"], "--alpha nan: must be between 0 and 1 (exclusive)"),
    ([*TCAV, "--alpha", "0"], "--alpha 0: must be between 0 and 1 (exclusive)"),
    ([*TCAV, "--alpha", "five"], "--alpha five: not a number"),
    ([*TCAV, "--bootstrap", "-5"], "--bootstrap -5: must be between 0 and 1000000"),
    (["layers", "torchvision:resnet18", "--input-size", "0", "224"], "--input-size 0: must be between 1 and 4096"),
    (["compare", "synthetic:4", "--model", "zoo:x", "--layers", "a", "--input-size", "224", "99999"], "--input-size 99999: must be between 1 and 4096"),
    (["maps", *MODEL, "scene.png", "--bank", "b", "--top", "0"], "--top 0: must be between 1 and 1000"),
    (["train-zoo", "--steps", "0"], "--steps 0: must be between 1 and 1000000"),
    (["synth", "world", "--n", "9" * 5000], "--n 99999999999999999999999… (5000 characters): not an integer"),
])
def test_bad_numbers_name_the_flag(tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: {expected}") and " — fix: pass e.g. " in err, err
    assert list(tmp_path.iterdir()) == []  # nothing ran: no store, no output


@pytest.mark.parametrize(("argv", "expected"), [
    (["embed", "torchvision:resnet18"], "error: the following arguments are required: data, --layers — fix: see `conceptlens embed --help`"),
    (["probe", *MODEL, "synthetic:4", "--layers", "layer1", "--method", "svm"], "error: concept method 'svm': is not registered"),
    (["embed", *MODEL, "synthetic:4", "--layers", "layer1", "--grid", "10"], "error: --grid: expected 2 arguments — fix: see `conceptlens embed --help`"),
    (["nonsense"], "error: command: invalid choice: 'nonsense'"),
    (["layers", "torchvision:resnet18", "--bogus"], "error: unrecognized arguments: --bogus — fix: see `conceptlens --help`"),
])
def test_argparse_errors_are_one_line_too(capsys, argv, expected):
    assert main(argv) == 2
    assert one_line_error(capsys).startswith(expected)


def test_good_values_at_the_bounds_parse():
    parser = cli.build_parser()
    args = parser.parse_args([*TCAV, "--max-inputs", "1", "--alpha", "0.999", "--bootstrap", "0", "--seed", str(2 ** 32 - 1), "--runs", "1000"])
    assert (args.max_inputs, args.alpha, args.bootstrap, args.seed, args.runs) == (1, 0.999, 0, 2 ** 32 - 1, 1000)


# ------------------------------------------------------------------------------------------ warnings


def _warning_command(args) -> int:
    warnings.warn("weights are\n  deprecated", UserWarning)
    warnings.warn("weights are deprecated", UserWarning)  # the same message: shown once
    warnings.warn("lbfgs failed to converge", RuntimeWarning)
    print("done")
    return 0


def test_warnings_are_one_line_each_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "report", _warning_command)
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "done\n"
    assert captured.err.splitlines() == ["warning: weights are deprecated", "warning: lbfgs failed to converge"]


def test_debug_shows_warnings_raw(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "report", _warning_command)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["report", str(tmp_path), "--debug"]) == 0
    assert [str(w.message) for w in caught][-1] == "lbfgs failed to converge" and caught[-1].filename == __file__
    assert "warning: " not in capsys.readouterr().err


def test_warning_routing_ends_with_the_command(tmp_path, monkeypatch, capsys):
    before = warnings.showwarning
    monkeypatch.setitem(cli.COMMANDS, "report", _warning_command)
    main(["report", str(tmp_path)])
    assert warnings.showwarning is before


# ---------------------------------------------------------------------------------- one random set


def _image_sets(root, names):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(6):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            if name == "stripes":
                image[::4] = 255
            Image.fromarray(image).save(root / name / f"{name}{i}.png")
    return root


def test_tcav_with_one_random_set_says_why_there_are_no_p_values(tmp_path, capsys):
    sets = _image_sets(tmp_path / "sets", ["stripes", "zebra", "random_0"])
    argv = ["tcav", *MODEL, str(sets), "--layers", "layer1", "--target", "logit:3", "--inputs", "zebra", "--quiet",
            "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: {sets}: random_0: only 1 random set: no p-values — a significance test needs at least 2")
    assert "smallest p-value is 1/(R + 1): 0.5 here" in err and "fix: add random_1/, random_2/ … beside random_0/" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_tcav_runs_1_names_the_flag(tmp_path, capsys):
    sets = _image_sets(tmp_path / "sets", ["stripes", "zebra", "random_0", "random_1", "random_2"])
    argv = ["tcav", *MODEL, str(sets), "--layers", "layer1", "--target", "logit:3", "--inputs", "zebra", "--runs", "1", "--quiet",
            "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert err.startswith("error: --runs 1: only 1 random set: no p-values") and "fix: pass --runs 3 (or leave it out" in err


def test_pipeline_image_sets_with_one_random_set(tmp_path):
    from conceptlens.concepts.errors import ConceptLensError
    from conceptlens.config import parse_config
    from conceptlens.pipeline import _FolderSets

    sets = _image_sets(tmp_path / "sets", ["stripes", "random_0"])
    config = parse_config({"name": "t", "data": {"spec": "synthetic:8", "image_sets": str(sets)}, "tcav": {"enabled": True},
                           "models": [{"name": "m", "spec": "zoo:synthetic_vgg_centernet", "layers": ["backbone.block2"]}]}, "t.yaml")
    with pytest.raises(ConceptLensError) as info:
        _FolderSets(config, dataset=None)
    assert info.value.culprit == f"data.image_sets: {sets}" and "at least 2" in info.value.problem
