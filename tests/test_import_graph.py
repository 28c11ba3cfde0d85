"""The layering shows in the imports: concepts < probes < attribution < the application.

Every module under concepts/, probes/, attribution/ and conceptlens/ is parsed (every import
statement, also inside functions, plus ``importlib.import_module("…")`` calls and the lazy
re-export tables of package ``__init__`` files). No module may import a layer above its own; the
facade ``conceptlens/__init__.py`` (which re-exports everything) is exempt. Nothing imports the
old top-level names ``concepts``, ``probes`` or ``attribution``, and the application layer holds no
library workflow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: repository folder → (installed package, layer rank)
FOLDERS = {"concepts": ("conceptlens.concepts", 0), "probes": ("conceptlens.probes", 1), "attribution": ("conceptlens.attribution", 2), "conceptlens": ("conceptlens", 3)}
LAYER_NAMES = {0: "concepts", 1: "probes", 2: "attribution", 3: "the application (conceptlens)"}
OLD_NAMES = ("concepts", "probes", "attribution")
FACADE = ROOT / "conceptlens" / "__init__.py"
LIBRARY_WORKFLOWS = ("probe_model", "compare_models", "set_activations", "fit_image_cavs", "layer_order", "bank_path")


def layer_of(module: str) -> int | None:
    """The layer rank of an absolute module name inside conceptlens (None: a third-party module)."""
    for package, rank in sorted(FOLDERS.values(), key=lambda item: -len(item[0])):
        if package != "conceptlens" and (module == package or module.startswith(package + ".")):
            return rank
    return 3 if module == "conceptlens" or module.startswith("conceptlens.") else None


def module_name(path: Path) -> str:
    """The installed module name of a source file (``probes/net2vec.py`` → ``conceptlens.probes.net2vec``)."""
    relative = path.relative_to(ROOT)
    package = FOLDERS[relative.parts[0]][0]
    parts = [*package.split("."), *relative.parts[1:-1]]
    return ".".join(parts if path.name == "__init__.py" else [*parts, path.stem])


def imported_modules(tree: ast.AST, name: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``tree``; relative imports resolved against ``name``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(node, name, is_package)
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names if layer_of(f"{base}.{alias.name}") is not None)
        elif isinstance(node, ast.Call) and _is_import_module(node) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets) and isinstance(node.value, ast.Dict):
            found.extend((v.lineno, v.value) for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return found


def _resolve_relative(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = name.split(".") if is_package else name.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def _is_import_module(node: ast.Call) -> bool:
    function = node.func
    return (isinstance(function, ast.Attribute) and function.attr == "import_module") or (isinstance(function, ast.Name) and function.id == "import_module")


def source_files() -> list[Path]:
    return sorted(path for folder in FOLDERS for path in (ROOT / folder).rglob("*.py") if "__pycache__" not in path.parts)


def violations(path: Path) -> list[str]:
    """Upward imports and imports of the old top-level names in one source file."""
    name = module_name(path)
    own = FOLDERS[path.relative_to(ROOT).parts[0]][1]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    problems = []
    for line, module in imported_modules(tree, name, path.name == "__init__.py"):
        top = module.split(".")[0]
        if top in OLD_NAMES:
            problems.append(f"{path.relative_to(ROOT)}:{line} imports the old top-level name {module!r} (use conceptlens.{module})")
        target = layer_of(module)
        if target is not None and target > own and path != FACADE:
            problems.append(f"{path.relative_to(ROOT)}:{line} ({LAYER_NAMES[own]}) imports {module} ({LAYER_NAMES[target]})")
    return problems


def test_the_scan_covers_every_package() -> None:
    files = source_files()
    by_folder = {folder: sum(1 for f in files if f.relative_to(ROOT).parts[0] == folder) for folder in FOLDERS}
    assert all(count >= 3 for count in by_folder.values()), by_folder
    total = sum(len(imported_modules(ast.parse(f.read_text(encoding="utf-8")), module_name(f), f.name == "__init__.py")) for f in files)
    assert total > 200  # every import statement is seen, not just the module-level ones


def test_no_upward_imports_and_no_old_top_level_names() -> None:
    problems = [problem for path in source_files() for problem in violations(path)]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_function_level_relative_and_dynamic_imports() -> None:
    code = (
        "import importlib\n"
        "from conceptlens.concepts.errors import ConceptLensError\n"
        "def late():\n"
        "    from conceptlens.attribution.tcav import tcav_scores\n"
        "    from .. import cli\n"
        "    return importlib.import_module('conceptlens.pipeline')\n"
        "import probes.net2vec\n"
        "_EXPORTS = {'x': 'conceptlens.report'}\n"
    )
    tree = ast.parse(code)
    found = {module for _, module in imported_modules(tree, "conceptlens.probes.fake", is_package=False)}
    assert {"conceptlens.concepts.errors", "conceptlens.attribution.tcav", "conceptlens.cli", "conceptlens.pipeline", "probes.net2vec", "conceptlens.report"} <= found
    upward = {m for m in found if (layer_of(m) or 0) > 1}
    # ``from .. import cli`` imports the package conceptlens (the facade) and its module cli
    assert upward == {"conceptlens", "conceptlens.attribution.tcav", "conceptlens.attribution.tcav.tcav_scores", "conceptlens.cli", "conceptlens.pipeline", "conceptlens.report"}


@pytest.mark.parametrize(
    ("module", "rank"),
    [("conceptlens.concepts.store.activations", 0), ("conceptlens.probes", 1), ("conceptlens.attribution.maps", 2), ("conceptlens.cli", 3),
     ("conceptlens", 3), ("conceptlens.conceptsx", 3), ("torch.nn", None)],
)
def test_layer_of(module: str, rank: int | None) -> None:
    assert layer_of(module) == rank


def test_the_application_layer_holds_no_library_workflow() -> None:
    """conceptlens/ keeps the CLI, config, pipeline, report and the facade; the workflows live below it."""
    defined = {}
    for path in (ROOT / "conceptlens").rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in (*LIBRARY_WORKFLOWS, "ProbedModel"):
                defined[node.name] = path.relative_to(ROOT)
    assert not defined, defined
    assert not (ROOT / "conceptlens" / "workflow.py").exists()
