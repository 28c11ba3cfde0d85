"""Hostile config files: strict YAML, absurd values, output folders that stay put, and ``run --dry-run``.

Every refusal is one :class:`ConfigError` naming the file and the key path (or line) and saying how
to fix it; the CLI prints it as one line and exits 2. Fixtures are hand-written YAML.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from conceptlens.cli import main
from conceptlens.config import ConfigError, load_config, parse_config, run_folders
from conceptlens.config_yaml import MAX_ALIASES, MAX_DEPTH

MODEL = "{name: vgg, spec: 'zoo:synthetic_vgg_centernet', layers: [backbone.block2]}"
HEAD = f"name: t\ndata: {{spec: 'synthetic:20:0'}}\nmodels: [{MODEL}]\n"


def write(folder: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and " — fix: " in message, message
    return info.value


def minimal(**top: Any) -> dict[str, Any]:
    data = {"name": "t", "data": {"spec": "synthetic:20:0"},
            "models": [{"name": "vgg", "spec": "zoo:synthetic_vgg_centernet", "layers": ["backbone.block2"]}]}
    data.update(top)
    return data


def parse_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "t.yaml")
    assert "\n" not in str(info.value) and info.value.fix
    return info.value


# --------------------------------------------------------------------------------------- strict YAML


def test_duplicate_top_level_key_names_the_key_and_both_lines(tmp_path):
    error = load_error(write(tmp_path, HEAD + "seed: 1\nseed: 2\n"))
    assert error.culprit == f"{tmp_path / 'c.yaml'}: seed"
    assert "duplicate key 'seed' (first on line 4, again on line 5)" in error.problem
    assert "keep one" in error.fix


def test_duplicate_nested_key_names_its_key_path(tmp_path):
    error = load_error(write(tmp_path, HEAD + "embed:\n  batch_size: 8\n  grid: [10, 10]\n  batch_size: 16\n"))
    assert error.culprit == f"{tmp_path / 'c.yaml'}: embed.batch_size"
    assert "first on line 5, again on line 7" in error.problem


def test_keys_equal_as_values_are_duplicates(tmp_path):
    # yes and true are the same YAML 1.1 boolean: a dict would keep only the last
    error = load_error(write(tmp_path, HEAD + "report: {yes: 1, true: 2}\n"))
    assert "duplicate key True" in error.problem


def test_merge_keys_may_still_be_overridden(tmp_path):
    # the mapping's own key wins over the merged one, as YAML intends: not a duplicate
    text = HEAD + "embed: {batch_size: 8}\nreport: {examples: 2, <<: {examples: 3, prototypes: 1}}\n"
    config = load_config(write(tmp_path, text))
    assert (config.report.examples, config.report.prototypes, config.embed.batch_size) == (2, 1, 8)


def test_billion_laughs_fails_fast_without_expanding(tmp_path):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9 ** 10 ≈ 3.5e9 strings expanded
    path = write(tmp_path, HEAD + "\n".join(lines) + "\n")
    started = time.perf_counter()
    error = load_error(path)
    assert time.perf_counter() - started < 1.0
    assert "with its aliases expanded" in error.problem and "alias bomb" in error.problem
    assert "write the values out" in error.fix


def test_too_many_aliases(tmp_path):
    items = ", ".join(["*x"] * (MAX_ALIASES + 1))
    error = load_error(write(tmp_path, HEAD + f"defs: &x 1\nlots: [{items}]\n"))
    assert f"more than {MAX_ALIASES} aliases" in error.problem


def test_an_alias_inside_what_it_names_is_a_cycle(tmp_path):
    error = load_error(write(tmp_path, HEAD + "loop: &l [1, *l]\n"))
    assert "(a cycle)" in error.problem and error.culprit.endswith(": loop[1]")


def test_ten_thousand_deep_nesting_is_refused_at_the_limit(tmp_path):
    error = load_error(write(tmp_path, HEAD + "deep: " + "[" * 10_000 + "]" * 10_000 + "\n"))
    assert f"nested more than {MAX_DEPTH} levels deep" in error.problem and "line 4" in error.problem


def test_nesting_just_within_the_limit_reaches_the_schema(tmp_path):
    # 31 list levels below a top-level key: read, then refused as an unknown key (not as too deep)
    error = load_error(write(tmp_path, HEAD + "deep: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"))
    assert "unknown key 'deep'" in error.problem


def test_non_utf8_bytes_name_the_line_and_column(tmp_path):
    error = load_error(write(tmp_path, HEAD.encode() + b"# caf\xe9\n"))
    assert error.culprit == str(tmp_path / "c.yaml")
    assert "is not UTF-8 text (byte 0xe9 at line 4, column 6)" in error.problem and error.fix == "save the file as UTF-8"


def test_an_integer_python_cannot_hold_is_one_line(tmp_path):
    error = load_error(write(tmp_path, HEAD + "seed: " + "9" * 5000 + "\n"))
    assert "line 4, column 7" in error.problem and "cannot be read" in error.problem


def test_an_impossible_date_is_one_line(tmp_path):
    error = load_error(write(tmp_path, HEAD + "name2: 2001-02-30\n"))
    assert "day is out of range" in error.problem


def test_a_huge_file_is_refused_before_parsing(tmp_path):
    error = load_error(write(tmp_path, HEAD + "# " + "x" * (1 << 20) + "\n"))
    assert "larger than 1024 kB" in error.problem


def test_cli_prints_one_line_for_a_refused_file(tmp_path, capsys):
    path = write(tmp_path, HEAD + "seed: 1\nseed: 2\n")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: seed: line 5") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- absurd values


@pytest.mark.parametrize(("data", "culprit", "fragment"), [
    (minimal(probes={"net2vec": {"lr": 1e300}}), "probes.net2vec.lr", "must be <= 10.0, got 1e+300"),
    (minimal(probes={"net2vec": {"lr": 10 ** 400}}), "probes.net2vec.lr", "expected a number, got 1000"),
    (minimal(embed={"grid": [0, 10]}), "embed.grid[0]", "must be >= 1, got 0"),
    (minimal(embed={"grid": [-1, 5]}), "embed.grid[0]", "must be >= 1, got -1"),
    (minimal(embed={"grid": [40, 5000]}), "embed.grid[1]", "must be <= 4096, got 5000"),
    (minimal(embed={"batch_size": 10 ** 6}), "embed.batch_size", "must be <= 65536"),
    (minimal(seed=-1), "seed", "must be >= 0, got -1"),
    (minimal(seed=2 ** 32), "seed", "must be <= 4294967295"),
    (minimal(tcav={"n_bootstrap": -5}), "tcav.n_bootstrap", "must be >= 0, got -5"),
    (minimal(controls={"n_permutations": 10 ** 9}), "controls.n_permutations", "must be <= 1000000"),
    (minimal(tcav={"random_sets": 5000}), "tcav.random_sets", "must be <= 1000"),
    (minimal(probes={"nmf": {"k": 100_000}}), "probes.nmf.k", "must be <= 4096"),
    (minimal(embed={"batch_size": "32"}), "embed.batch_size", "expected an integer, got '32' (str)"),
    (minimal(models=5), "models", "expected a list, got 5 (int)"),
    (minimal(embed={"grid": "100x100"}), "embed.grid", "expected a list of 2 numbers"),
    (minimal(tcav={"targets": [{"spec": "logit:-1"}]}), "tcav.targets[0].spec", "class id -1 in 'logit:-1' is out of range"),
    (minimal(tcav={"targets": [{"spec": "top:2000000"}]}), "tcav.targets[0].spec", "class id 2000000"),
    (minimal(data={"spec": "a\x00b"}), "data.spec", "holds a NUL character"),
    (minimal(data={"spec": "synthetic", "concepts": ["x" * 10_000, 3]}), "data.concepts[1]", "expected a string, got 3"),
])
def test_absurd_values_name_the_key_path(data, culprit, fragment):
    error = parse_error(data)
    assert error.culprit == f"t.yaml: {culprit}"
    assert fragment in str(error), str(error)


def test_a_huge_wrong_value_keeps_the_message_short():
    error = parse_error(minimal(embed={"grid": ["x" * 100_000, 1]}))
    assert len(str(error)) < 300 and "expected an integer" in str(error)


def test_every_bound_is_inclusive_at_its_limit():
    config = parse_config(minimal(seed=2 ** 32 - 1, embed={"grid": [4096, 1], "batch_size": 65536}, probes={"net2vec": {"lr": 10}},
                                  tcav={"targets": [{"spec": "logit:0"}]}), "t.yaml")
    assert (config.seed, config.embed.grid, config.probes.net2vec.lr) == (2 ** 32 - 1, (4096, 1), 10.0)


# ------------------------------------------------------------------------------ names and folders


@pytest.mark.parametrize("name", ["a/b", "..", "", "my run", "x" * 65, "../../etc", "a\\b"])
def test_name_is_plain(name):
    error = parse_error(minimal(name=name))
    assert error.culprit == "t.yaml: name" and "letters, digits, _ and - only" in error.fix


@pytest.mark.parametrize(("key", "value", "fix"), [
    ("store", "../elsewhere", "or an absolute path if you mean a folder outside it"),
    ("store", "cache/../../x", "inside the output folder"),
    ("out", "../results", "inside the working directory"),
    ("out", "", "give a path"),
])
def test_out_and_store_stay_below_their_folder(key, value, fix):
    error = parse_error(minimal(**{key: value}))
    assert error.culprit == f"t.yaml: {key}" and fix in error.fix


def test_default_folders_stay_below_the_working_directory():
    folders = run_folders(parse_config(minimal(name="demo-1"), "t.yaml"))
    assert (folders.out, folders.banks, folders.store) == (Path("conceptlens-demo-1"), Path("conceptlens-demo-1/banks"), Path("conceptlens-demo-1/store"))


def test_relative_store_is_inside_the_output_folder_absolute_where_it_says(tmp_path):
    config = parse_config(minimal(out="runs/a", store="cache"), "t.yaml")
    assert (run_folders(config).out, run_folders(config).store) == (Path("runs/a"), Path("runs/a/cache"))
    assert run_folders(config, tmp_path / "cli").store == tmp_path / "cli" / "cache"  # --out moves a relative store with it
    elsewhere = parse_config(minimal(store=str(tmp_path / "shared")), "t.yaml")
    assert run_folders(elsewhere, "o").store == tmp_path / "shared"
    assert run_folders(parse_config(minimal(out=str(tmp_path / "abs")), "t.yaml")).out == tmp_path / "abs"


def test_the_run_uses_the_same_folders(tmp_path):
    from conceptlens.pipeline import _Run

    config = parse_config(minimal(store="cache"), "t.yaml")
    run = _Run(config, run_folders(config, tmp_path / "o"), progress=False, verbose=False)
    assert (run.out, Path(run.store.root)) == (tmp_path / "o", tmp_path / "o" / "cache")


def test_shipped_configs_still_load(coco_env):
    for path in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")):
        assert load_config(path).name.replace("-", "_") == path.stem  # plain names: the folder conceptlens-<name> stays put


@pytest.fixture
def coco_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "coco"))
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "weights"))


# ------------------------------------------------------------------------------------------ dry run


def test_dry_run_lists_code_without_running_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "imported"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef build():\n    raise SystemExit('ran')\n")
    (tmp_path / "w.pth").write_bytes(b"")
    path = write(tmp_path, "name: t\ndata: {spec: 'synthetic:20:0'}\nstore: /var/shared-store\nmodels:\n"
                           "  - {name: a, spec: 'evil.py:build', weights: w.pth, layers: [l]}\n"
                           "  - {name: b, spec: 'some.module:make', layers: [l]}\n"
                           "  - {name: c, spec: 'zoo:synthetic_vgg_centernet', layers: [l]}\n")
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not marker.exists() and not (tmp_path / "conceptlens-t").exists()
    reads, code, writes = out.index("reads:"), out.index("code:"), out.index("writes:")
    assert [line.split() for line in out[reads + 1:code]] == [["models[0].spec", "evil.py"], ["models[0].weights", "w.pth"]]
    assert out[code + 1:writes] == ["  models[0].spec     runs Python code: evil.py (then calls build)",
                                    "  models[1].spec     runs Python code: imports the module some.module (then calls make)",
                                    "  models[2].spec     built in: zoo:synthetic_vgg_centernet"]
    assert [line.split()[:2] for line in out[writes + 1:]] == [["out", "conceptlens-t/"], ["banks", "conceptlens-t/banks/"],
                                                               ["store", "/var/shared-store/"]]


def test_dry_run_marks_missing_files_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, f"name: t\ndata: {{spec: {tmp_path / 'nope'}}}\nmodels: [{MODEL}]\n")
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert f"  data.spec       {tmp_path / 'nope'}  (missing)" in captured.out.splitlines()
    assert f"out             {tmp_path / 'o'}/" in captured.out
    assert captured.err.startswith(f"error: {path}: missing files or folders: data.spec") and captured.err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_dry_run_of_an_invalid_config_is_the_usual_error(tmp_path, capsys):
    path = write(tmp_path, HEAD.replace("name: t", "name: ../up"))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: name: '../up' is not allowed")
