"""The README's quick starts run as written, and every import in its Python examples resolves.

Quick starts are the README's code blocks fenced as ```` ```python quickstart ````. Each runs in a
fresh interpreter, in a temporary working folder that holds exactly the files the quick starts
name: ``my_concepts/`` (a 40-image synthetic world written in the folder layout, as ``conceptlens
synth`` writes it) and ``scene.png`` (one more scene). Their printed numbers are checked too.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import conceptlens as cl

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
