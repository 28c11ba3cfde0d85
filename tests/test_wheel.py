"""The wheel installs one import name, ``conceptlens``, with the zoo weights and the demo config inside.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation``) from a copy of the
sources, so the build leaves nothing in the working tree; then unpacked into an empty folder (a
wheel is its installed layout) and imported from there in a fresh interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "concepts", "probes", "attribution", "conceptlens", "configs")
WEIGHTS = ROOT / "concepts" / "models" / "zoo" / "weights"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(source)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    wheels = sorted(out.glob("conceptlens-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_the_only_top_level_import_name_is_conceptlens(wheel: Path) -> None:
    names = _names(wheel)
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"conceptlens"}
    top_level = [name for name in names if name.endswith(".dist-info/top_level.txt")]
    if top_level:
        with zipfile.ZipFile(wheel) as archive:
            assert archive.read(top_level[0]).decode().split() == ["conceptlens"]
    for package in ("concepts", "probes", "attribution"):
        assert f"conceptlens/{package}/__init__.py" in names
        assert not any(name.startswith(f"{package}/") for name in names)


def test_every_source_module_is_in_the_wheel(wheel: Path) -> None:
    names = set(_names(wheel))
    for folder, package in (("concepts", "conceptlens/concepts"), ("probes", "conceptlens/probes"), ("attribution", "conceptlens/attribution"), ("conceptlens", "conceptlens")):
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                assert f"{package}/{path.relative_to(ROOT / folder).as_posix()}" in names, f"{path.relative_to(ROOT)} is not in the wheel (add its package to pyproject.toml)"


def test_the_zoo_weights_and_cards_are_inside(wheel: Path) -> None:
    shipped = sorted(p.name for p in WEIGHTS.iterdir() if p.suffix in (".safetensors", ".json"))
    assert any(name.endswith(".safetensors") for name in shipped)
    with zipfile.ZipFile(wheel) as archive:
        for name in shipped:
            assert archive.read(f"conceptlens/concepts/models/zoo/weights/{name}") == (WEIGHTS / name).read_bytes()


def test_the_installed_wheel_finds_the_demo_config_and_loads_a_zoo_model(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    code = (
        "import conceptlens, conceptlens.concepts.models.loading as loading\n"
        "from conceptlens.cli import demo_config_path\n"
        "from conceptlens.config import load_config\n"
        "print(conceptlens.__file__); print(demo_config_path()); print(load_config(demo_config_path()).name)\n"
        "print(loading.load_model('zoo:synthetic_vgg_centernet').hash[:12])\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=_env(site), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    package_file, config, name, model_hash = run.stdout.split()
    assert Path(package_file).is_relative_to(site)  # not the editable checkout
    assert Path(config) == site / "conceptlens" / "configs" / "demo.yaml"
    assert Path(config).read_bytes() == (ROOT / "configs" / "demo.yaml").read_bytes()
    assert name == "demo" and len(model_hash) == 12


def _env(site: Path) -> dict[str, str]:
    import os

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return env
