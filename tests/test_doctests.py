"""The docstring examples of the installed package run and print what they show.

Every module of ``conceptlens`` is imported and its doctests are run (one test per module). The
walk starts at ``conceptlens`` and at each repository folder that installs as one of its
subpackages: an editable install maps those folders through an import hook that
``pkgutil.walk_packages`` does not see on ``conceptlens.__path__`` (a wheel has them inside it;
the walk drops the modules it finds twice). A module that fails to import only because an
optional extra (``onnx``, ``real``) is not installed is skipped; any other import error fails.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.metadata
import pkgutil
import re

import pytest

#: The installed top-level package and the subpackages that repository folders install as.
ROOTS = ("conceptlens", "conceptlens.concepts", "conceptlens.probes", "conceptlens.attribution")
#: Modules whose doctests the walk must find (a guard against a walk that silently finds nothing).
KNOWN_DOCTESTS = ("conceptlens.probes.params", "conceptlens.attribution.targets", "conceptlens.concepts.data.synthetic")
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
#: Modules whose examples are known not to run, with why; strict: a fixed one must leave this list.
KNOWN_BROKEN: dict[str, str] = {}


def _module_names() -> list[str]:
    """Every module and package below :data:`ROOTS`, sorted; a package that fails to import is
    listed too (its test shows the error), the walk just cannot look inside it."""
    names: set[str] = set(ROOTS)
    for root in ROOTS:
        package = importlib.import_module(root)
        names.update(info.name for info in pkgutil.walk_packages(package.__path__, f"{root}.", onerror=names.add))
    return sorted(names)


def _project(name: str) -> str:
    """A distribution's normalized name (PEP 503): ``scikit_image`` and ``Scikit-Image`` → ``scikit-image``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _optional_imports() -> set[str]:
    """Top-level import names that only the optional extras (not ``dev``) provide."""
    requirements = importlib.metadata.requires("conceptlens") or []
    optional = {_project(re.split(r"[\s;<>=!~\[]", line, maxsplit=1)[0]) for line in requirements if "extra ==" in line and '"dev"' not in line}
    provided = importlib.metadata.packages_distributions()
    imports = {module for module, dists in provided.items() if optional & {_project(d) for d in dists}}
    return imports | optional  # an extra that is not installed: its import name is usually its own


MODULES = _module_names()


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing and missing in _optional_imports():
            pytest.skip(f"{name} needs the optional package {missing!r}, which is not installed")
        raise


def test_the_walk_finds_every_subpackage_and_the_known_doctests():
    for root in ROOTS:  # each root and a module inside it
        assert root in MODULES and any(name.startswith(f"{root}.") for name in MODULES), root
    finder = doctest.DocTestFinder()
    for name in KNOWN_DOCTESTS:
        examples = sum(len(test.examples) for test in finder.find(importlib.import_module(name)))
        assert examples > 0, f"{name} has no doctest examples any more"


def _marks(name: str) -> list[pytest.MarkDecorator]:
    reason = KNOWN_BROKEN.get(name)
    return [pytest.mark.xfail(reason=reason, strict=True)] if reason else []


@pytest.mark.parametrize("name", [pytest.param(name, marks=_marks(name)) for name in MODULES])
def test_doctests(name):
    module = _import(name)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
