"""``conceptlens run CONFIG --dry-run``: what a config would read, run as code, and write — running nothing.

A config is a program: a model spec ``module:callable`` or ``file.py:callable`` imports and runs
Python code, a TorchScript file runs TorchScript code. :func:`plan_run` lists, from the validated
config alone (no model is loaded, no data file is opened), every file or folder the run would read,
every piece of code it would import or run, and every folder it would write, so that a config from
elsewhere can be checked before it is run. The folders come from
:func:`~conceptlens.config.run_folders`, the function the run itself uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from conceptlens.config import PipelineConfig, _needed_paths, run_folders

__all__ = ["RunPlan", "plan_run"]


@dataclass
class RunPlan:
    """What a run would do, as ``(key, what)`` pairs per kind.

    Attributes
    ----------
    reads : list of (str, str, bool)
        Config key, file or folder, and whether it exists now.
    code : list of (str, str)
        Config key and the code it names: ``runs Python code: …``, ``runs TorchScript code: …`` or
        ``built in: …`` (``zoo:`` and ``torchvision:`` models ship with the packages).
    writes : list of (str, str)
        What is written (``out``, ``banks``, ``store``) and where.
    """

    reads: list[tuple[str, str, bool]] = field(default_factory=list)
    code: list[tuple[str, str]] = field(default_factory=list)
    writes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        """The files and folders to read that do not exist."""
        return [path for _, path, exists in self.reads if not exists]

    def lines(self) -> list[str]:
        """The plan as the CLI prints it: three headed lists."""
        width = max([len(key) for key, *_ in [*self.reads, *self.code, *self.writes]] + [4])
        out = ["reads:"] + [f"  {key:<{width}}  {path}{'' if exists else '  (missing)'}" for key, path, exists in self.reads]
        if not self.reads:
            out.append("  no files (generated data, built-in models)")
        out += ["code:"] + [f"  {key:<{width}}  {what}" for key, what in self.code]
        out += ["writes:"] + [f"  {key:<{width}}  {where}" for key, where in self.writes]
        return out


def plan_run(config: PipelineConfig, out: str | os.PathLike[str] | None = None, banks: str | os.PathLike[str] | None = None) -> RunPlan:
    """Everything a run of ``config`` would read, run as code and write, without running anything.

    Parameters
    ----------
    config : PipelineConfig
        A validated config.
    out : str or PathLike, optional
        The CLI's ``--out``, as for the run.
    banks : str or PathLike, optional
        The CLI's ``--banks``, as for the run.

    Returns
    -------
    RunPlan
    """
    plan = RunPlan(reads=[(key, path, Path(path).exists()) for key, path, _ in _needed_paths(config)])  # what check_paths checks
    for i, model in enumerate(config.models):
        plan.code.append((f"models[{i}].spec", _model_code(model.spec)))
        if model.weights == "default":
            plan.reads.append((f"models[{i}].weights", f"the default weights of {model.spec} in the local torch hub cache", True))
    folders = run_folders(config, out, banks)
    report = ", report.html" if config.report.enabled else ""
    plan.writes += [("out", f"{folders.out}{os.sep}  (results, run.json{report})"), ("banks", f"{folders.banks}{os.sep}"),
                    ("store", f"{folders.store}{os.sep}  (activation store)")]
    return plan


def _model_code(spec: str) -> str:
    """The code a model spec runs: built in, Python (a module or a file), TorchScript, or none (ONNX)."""
    if spec.startswith(("zoo:", "torchvision:")):
        return f"built in: {spec}"
    target, colon, attribute = spec.rpartition(":")
    if not colon:
        return f"none: {spec} is an ONNX graph, converted to PyTorch" if Path(spec).suffix.lower() == ".onnx" else f"runs TorchScript code: {spec}"
    if target.endswith(".py"):
        return f"runs Python code: {target} (then calls {attribute})"
    return f"runs Python code: imports the module {target} (then calls {attribute})"
