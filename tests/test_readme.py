"""The README's examples run as written, and every import in its Python examples resolves.

Quick starts are the README's code blocks fenced as ```` ```python quickstart ````. Each runs in a
fresh interpreter, in a temporary working folder that holds exactly the files the quick starts
name: ``my_concepts/`` (a 40-image synthetic world written in the folder layout, as ``conceptlens
synth`` writes it) and ``scene.png`` (one more scene). Their printed numbers are checked too.

Every ```` ```bash ```` block runs as written, in README order, in one empty folder (a block may use
what an earlier one wrote), with ``bash -euo pipefail``, the venv's scripts on ``PATH`` and an empty
torch hub cache (nothing may need a download). Commands that need the repository checkout
(``make``) or data from elsewhere (COCO) are prose with the command inline, not ```` ```bash ````
blocks. A cheap static check runs first: every ``conceptlens`` command of the README, in a block or
inline, names a subcommand and only flags that its ``--help`` lists.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

import conceptlens as cl
from conceptlens.cli import EXAMPLES, build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(python[^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
CONCEPTS = ["car", "wheel", "house", "roof", "tree", "sky", "ground", "water"]
PREPARED = {"my_concepts", "scene.png"}
MAX_LINES = 15


def python_blocks() -> list[tuple[str, str]]:
    """``(info string, code)`` of every Python code block of the README."""
    return [(info.strip(), code) for info, code in BLOCK.findall(README.read_text(encoding="utf-8"))]


def quick_starts() -> list[str]:
    return [code for info, code in python_blocks() if info.split()[1:] == ["quickstart"]]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("quickstart")
    world = cl.SyntheticWorld(n_images=40, seed=0).select_concepts(CONCEPTS)
    cl.write_folder_dataset(world, folder / "my_concepts", seed=0)
    Image.fromarray(cl.SyntheticWorld(n_images=1, seed=7).image(0)).save(folder / "scene.png")
    return folder


def run_block(code: str, folder: Path) -> list[str]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # idle OpenMP threads would spin on a shared machine
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.splitlines()


def test_there_are_two_short_quick_starts() -> None:
    blocks = quick_starts()
    assert len(blocks) == 2
    for code in blocks:
        lines = [line for line in code.splitlines() if line.strip()]
        assert len(lines) <= MAX_LINES, f"a quick start has {len(lines)} lines:\n{code}"
        assert "import conceptlens as cl" in code


def test_quick_starts_name_only_prepared_files() -> None:
    for code in quick_starts():
        strings = {node.value for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        named = {s for s in strings if s in PREPARED or Path(s).suffix.lower() in (".png", ".jpg", ".jpeg", ".pth", ".safetensors", ".yaml")}
        assert named <= PREPARED, f"prepare {named - PREPARED} in the workdir fixture"


@pytest.mark.slow
def test_quick_start_probe_maps_tcav(workdir: Path) -> None:
    code = next(code for code in quick_starts() if "tcav_scores" in code)
    metrics, scores, records = (ast.literal_eval(line) for line in run_block(code, workdir))
    assert list(metrics) == CONCEPTS
    assert metrics["sky"] > 0.5 and metrics["ground"] > 0.5  # large plain regions: found even by a random-weight ResNet
    assert list(scores) == CONCEPTS and all(0.0 <= value <= 1.0 for value in scores.values())
    assert [(concept, layer) for concept, layer, _, _ in records] == [("car", "layer3")]
    assert 0.0 <= records[0][2] <= 1.0 and isinstance(records[0][3], bool)


@pytest.mark.slow
def test_quick_start_compare(workdir: Path) -> None:
    code = next(code for code in quick_starts() if "compare_models" in code)
    lines = run_block(code, workdir)
    blocks = [line for line in lines if " vs " in line]
    assert [line.split(" [")[0] for line in blocks] == [
        "synthetic_vgg_centernet vs synthetic_vgg_centernet",
        "synthetic_vgg_centernet vs synthetic_resnet_fpn",
        "synthetic_resnet_fpn vs synthetic_resnet_fpn",
    ]
    for line in blocks:
        matrix = ast.literal_eval(line[line.index(" [") + 1:])
        assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
        if line.startswith("synthetic_vgg_centernet vs synthetic_vgg_centernet") or line.startswith("synthetic_resnet_fpn vs synthetic_resnet_fpn"):
            assert [matrix[i][i] for i in range(3)] == [1.0, 1.0, 1.0]  # a layer is identical to itself
    assert sum(line.strip().startswith("ridge:") for line in lines) == 3


def _imports(code: str) -> list[tuple[str, str | None]]:
    """``(module, name or None)`` of every import statement in a code block."""
    found = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.extend((node.module, alias.name) for alias in node.names)
    return found


def test_every_import_in_the_readme_examples_resolves() -> None:
    checked = 0
    for _, code in python_blocks():
        for module, name in _imports(code):
            if module.split(".")[0] != "conceptlens":
                continue
            imported = importlib.import_module(module)
            assert name is None or hasattr(imported, name), f"README: from {module} import {name} does not resolve"
            checked += 1
    assert checked >= 10


def test_readme_uses_only_the_public_api_through_cl() -> None:
    used = {match for _, code in python_blocks() for match in re.findall(r"\bcl\.([A-Za-z_]\w*)", code)}
    assert used and used <= set(cl.__all__), sorted(used - set(cl.__all__))


# ------------------------------------------------------------------ the command-line examples (```bash)

BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_COMMAND = re.compile(r"`(conceptlens [^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
REPO_PATH = re.compile(r"(?<![\w./$~-])((?:configs|docs|tests|concepts|conceptlens|probes|attribution|benchmarks)/[\w./*-]*[\w*])")
BLOCK_TIMEOUT_S = 900  # per block; the whole README takes a few minutes on 2 CPU cores


def bash_blocks() -> list[str]:
    """The README's ```` ```bash ```` blocks, in order."""
    return BASH_BLOCK.findall(README.read_text(encoding="utf-8"))


def command_lines(block: str) -> list[list[str]]:
    """The words of every command of a shell block: continuation lines joined, comments dropped."""
    return [words for line in block.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]


def subcommand_flags() -> dict[str, set[str]]:
    """Every subcommand of ``conceptlens`` with the flags its ``--help`` lists."""
    parser = build_parser()
    (subparsers,) = [action for action in parser._actions if action.choices and action.dest == "command"]
    return {name: set(FLAG.findall(sub.format_help())) for name, sub in subparsers.choices.items()}


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(where, words)`` of every ``conceptlens`` command: the lines of ```bash blocks, then inline code in the prose."""
    text = README.read_text(encoding="utf-8")
    found = [(f"bash block {number}", words) for number, block in enumerate(bash_blocks(), 1)
             for words in command_lines(block) if words[0] == "conceptlens"]
    prose = FENCED.sub("", text)
    found += [(f"inline `{span}`", span.split()) for span in INLINE_COMMAND.findall(prose)]
    return found


def test_readme_has_runnable_command_examples() -> None:
    blocks = bash_blocks()
    assert len(blocks) >= 6
    text = README.read_text(encoding="utf-8")
    assert text.index("## Quick start: your model, your images") < text.index("## Set-up") < text.index("```python quickstart")
    quick_start = [words[1] for words in command_lines(blocks[0]) if words[0] == "conceptlens"]
    assert quick_start == ["synth", "init", "run", "run"]  # example images, a config for the model, its dry run, the run


def test_every_readme_command_names_a_subcommand_and_its_flags() -> None:
    known = subcommand_flags()
    problems = []
    commands = readme_commands()
    assert sum(where.startswith("bash") for where, _ in commands) >= 15
    for where, words in commands:
        if len(words) < 2 or words[1] not in known:
            problems.append(f"{where}: {' '.join(words)}: unknown subcommand (known: {', '.join(sorted(known))})")
            continue
        unknown = [flag for flag in FLAG.findall(" ".join(words[2:])) if flag.split("=")[0] not in known[words[1]]]
        if unknown:
            problems.append(f"{where}: conceptlens {words[1]} has no {', '.join(unknown)}")
    assert not problems, "\n".join(problems)


def test_readme_names_only_files_that_exist_in_the_repository() -> None:
    text = re.sub(r"<\w+>", "*", README.read_text(encoding="utf-8"))  # a placeholder (`bench_<name>.py`) matches any name
    named = set(REPO_PATH.findall(text))
    assert {"configs/demo.yaml", "docs/METHODS.md"} <= named
    missing = sorted(path for path in named if not any(ROOT.glob(path)))
    assert not missing, f"README names files the repository lacks: {missing}"


def _demo_time(text: str) -> str:
    match = re.search(r"about (\S+ (?:s|seconds|minutes?)) on 2 CPU cores", text)
    assert match, text
    return match.group(1)


def test_the_demo_time_is_stated_once_and_matches_demo_help(capsys) -> None:
    stated = _demo_time(EXAMPLES["demo"])
    paragraphs = README.read_text(encoding="utf-8").split("\n\n")
    demo_times = {_demo_time(p) for p in paragraphs if "conceptlens demo" in p and re.search(r"about \S+ (?:s|seconds|minutes?) on 2 CPU cores", p)}
    assert demo_times == {stated}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    assert f"about {stated} on 2 CPU cores" in capsys.readouterr().out


@pytest.mark.slow
def test_every_bash_example_runs_as_written_from_an_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    scripts = sysconfig.get_path("scripts")  # the venv's bin/, where `conceptlens` is installed
    env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_WAIT_POLICY": "PASSIVE",
           "TORCH_HOME": str(tmp_path / "torch-home")}
    timings = []
    for number, block in enumerate(bash_blocks(), 1):
        started = time.perf_counter()
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=folder, env=env, capture_output=True, text=True, check=False,
                              timeout=BLOCK_TIMEOUT_S)
        timings.append(f"block {number}: {time.perf_counter() - started:.0f} s")
        assert done.returncode == 0, (f"README bash block {number} exits {done.returncode}:\n{block}\n"
                                      f"--- stdout ---\n{done.stdout[-2000:]}\n--- stderr ---\n{done.stderr[-4000:]}")
    print("; ".join(timings))
    assert (folder / "conceptlens-resnet18" / "report.html").is_file()  # where the quick start says its report is
