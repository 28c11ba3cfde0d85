"""The pipeline configuration: a YAML file parsed into typed, frozen dataclasses.

One generic walker (:func:`_parse`) validates a YAML mapping against the dataclass fields and
type hints; range, uniqueness and path rules sit in each field's ``metadata``. Checks that span
several keys (unique model names, TCAV targets naming existing models …) run after the walk.
Every error is a :class:`ConfigError` whose culprit is ``"<file>: <key.path[0].sub>"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import reprlib
import types
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from conceptlens.attribution.target_specs import SPEC_FORMS, TargetError, check_target_spec
from conceptlens.concepts.errors import ConceptLensError, closest_names
from conceptlens.config_yaml import RefusedYAML, load_yaml
from conceptlens.limits import (
    MAX_BATCH,
    MAX_CLASS_ID,
    MAX_COMPONENTS,
    MAX_DECODE_WORKERS,
    MAX_EPOCHS,
    MAX_IMAGES,
    MAX_LR,
    MAX_RANDOM_SETS,
    MAX_RESAMPLES,
    MAX_SEED,
    MAX_SHOWN,
    MAX_SIDE,
    MAX_WORKERS,
)

__all__ = [
    "CompareConfig",
    "ConfigError",
    "ConfigErrors",
    "ControlsConfig",
    "DataConfig",
    "EmbedConfig",
    "ExecutionConfig",
    "ModelConfig",
    "NMFConfig",
    "Net2VecConfig",
    "PipelineConfig",
    "ProbesConfig",
    "ReportConfig",
    "RunFolders",
    "TcavConfig",
    "TcavTargetConfig",
    "check_paths",
    "config_hash",
    "config_to_dict",
    "load_config",
    "missing_paths",
    "parse_config",
    "run_folders",
    "with_execution",
    "without_controls",
]


class ConfigError(ConceptLensError):
    """A pipeline config file is missing, malformed or inconsistent."""


class ConfigErrors(ConfigError):
    """Every problem found in one config file (``errors``, each a :class:`ConfigError` on one line).

    Its message is the first problem followed by the count of the others; the command line prints
    one ``error:`` line per problem.
    """

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        first = errors[0]
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} in this file)" if len(errors) > 1 else ""
        super().__init__(first.culprit, first.problem + more, first.fix)


def _problems(error: ConfigError) -> list[ConfigError]:
    return list(getattr(error, "errors", None) or [error])


def _raise_all(problems: list[ConfigError]) -> None:
    """Raise the one problem, or all of them together; nothing when there is none."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigErrors(problems)


_NAME = (r"[A-Za-z0-9_-]{1,64}", "letters, digits, _ and - only, at most 64 characters")

MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB
_DEVICE = (r"auto|cpu|cuda(:\d+)?", "one of auto, cpu, cuda, cuda:N")
_ADDRESS = (r"auto|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?:(6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3})",
            "auto, or HOST:PORT of the Ray head node (e.g. 10.0.0.5:6379; `ray status` on the head prints it)")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """``data:`` — the concept dataset."""

    spec: str = field(metadata={"path": True})
    coco_images: str | None = field(default=None, metadata={"path": True})
    concepts: list[str] | None = field(default=None, metadata={"unique": True, "nonempty": True})
    area_range: tuple[float, float] = field(default=(0.025, 0.8), metadata={"ge": 0.0, "le": 1.0})
    image_sets: str | None = field(default=None, metadata={"path": True})


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One entry of ``models:`` — a model spec and the layers to embed, shallow → deep."""

    name: str = field(metadata={"pattern": _NAME})
    spec: str = field(metadata={"path": True})
    weights: str = field(default="none", metadata={"path": True})
    input_size: tuple[int, int] | None = field(default=None, metadata={"ge": 1, "le": MAX_SIDE})
    kwargs: dict[str, int | float | bool | str] = field(default_factory=dict)  # builder arguments (README, "Model specs")
    layers: list[str] = field(metadata={"unique": True, "nonempty": True})


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """``embed:`` — how activations are stored."""

    grid: tuple[int, int] = field(default=(100, 100), metadata={"ge": 1, "le": MAX_SIDE})
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = field(default=32, metadata={"ge": 1, "le": MAX_BATCH})
    # threads decoding the next batches during each forward pass (null: min(4, cores - 1)); how, not what: not in config_hash
    decode_workers: int | None = field(default=None, metadata={"ge": 0, "le": MAX_DECODE_WORKERS})


@dataclass(frozen=True, kw_only=True)
class Net2VecConfig:
    """``probes.net2vec:`` — Net2Vec pixel probes."""

    enabled: bool = True
    max_epochs: int = field(default=30, metadata={"ge": 1, "le": MAX_EPOCHS})
    lr: float = field(default=1e-3, metadata={"gt": 0.0, "le": MAX_LR})
    batch_size: int = field(default=64, metadata={"ge": 1, "le": MAX_BATCH})


@dataclass(frozen=True, kw_only=True)
class NMFConfig:
    """``probes.nmf:`` — NMF concept vectors (NCAVs)."""

    enabled: bool = True
    k: int = field(default=10, metadata={"ge": 1, "le": MAX_COMPONENTS})


@dataclass(frozen=True, kw_only=True)
class ProbesConfig:
    """``probes:`` — the concept learners."""

    net2vec: Net2VecConfig = field(default_factory=Net2VecConfig)
    nmf: NMFConfig = field(default_factory=NMFConfig)


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """``compare:`` — layer × layer concept similarity."""

    enabled: bool = True
    methods: list[Literal["net2vec", "nmf", "cka"]] = field(default_factory=lambda: ["net2vec", "nmf", "cka"], metadata={"unique": True})


@dataclass(frozen=True, kw_only=True)
class TcavTargetConfig:
    """One entry of ``tcav.targets:`` — an attribution target and its inputs."""

    spec: str
    inputs: str | None = None
    max_inputs: int = field(default=32, metadata={"ge": 1, "le": MAX_IMAGES})
    models: list[str] | None = field(default=None, metadata={"unique": True, "nonempty": True})


@dataclass(frozen=True, kw_only=True)
class TcavConfig:
    """``tcav:`` — TCAV scores with random-CAV significance tests."""

    enabled: bool = False
    concepts: list[str] | None = field(default=None, metadata={"unique": True, "nonempty": True})
    min_fraction: float = field(default=0.02, metadata={"gt": 0.0, "lt": 1.0})
    images_per_set: int = field(default=40, metadata={"ge": 2, "le": MAX_IMAGES})
    random_sets: int = field(default=10, metadata={"ge": 2, "le": MAX_RANDOM_SETS})
    layers: list[str] | None = field(default=None, metadata={"unique": True, "nonempty": True})
    targets: list[TcavTargetConfig] = field(default_factory=list)
    statistic: Literal["sign_count", "magnitude", "mean_sensitivity"] = "sign_count"
    correction: Literal["holm", "bonferroni"] = "holm"
    alpha: float = field(default=0.05, metadata={"gt": 0.0, "lt": 1.0})
    n_bootstrap: int = field(default=1000, metadata={"ge": 0, "le": MAX_RESAMPLES})


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """``report:`` — the HTML report."""

    enabled: bool = True
    examples: int = field(default=4, metadata={"ge": 0, "le": MAX_SHOWN})
    prototypes: int = field(default=5, metadata={"ge": 0, "le": MAX_SHOWN})


@dataclass(frozen=True, kw_only=True)
class ControlsConfig:
    """``controls:`` — controls, nulls and uncertainty for every measure (README, "Controls").

    ``enabled: false`` (or ``--no-controls``) turns all of them off: the raw numbers stay exactly
    what they are with controls on, only the extra keys are left out.
    """

    enabled: bool = True
    probe_controls: list[Literal["random_weights", "permuted_masks"]] = field(
        default_factory=lambda: ["random_weights", "permuted_masks"], metadata={"unique": True})
    control_epochs: int = field(default=3, metadata={"ge": 1, "le": MAX_EPOCHS})
    n_permutations: int = field(default=499, metadata={"ge": 1, "le": MAX_RESAMPLES})
    n_bootstrap: int = field(default=200, metadata={"ge": 0, "le": MAX_RESAMPLES})
    alpha: float = field(default=0.05, metadata={"gt": 0.0, "lt": 1.0})
    margin: float = field(default=0.05, metadata={"ge": 0.0, "le": 1.0})
    tcav_robustness: bool = True
    effect: float = field(default=0.1, metadata={"gt": 0.0, "le": 1.0})
    power: float = field(default=0.8, metadata={"gt": 0.0, "lt": 1.0})


@dataclass(frozen=True, kw_only=True)
class ExecutionConfig:
    """``execution:`` — where the steps run (README, "Scale-out on Ray").

    ``local`` (the default) runs everything in this process. ``ray`` embeds on ``workers`` Ray
    actors (each loads the model once, ``gpus_per_worker`` GPUs each) and fits every (model, layer,
    method) bank as its own Ray task, on the cluster at ``address``; the results are the same
    files as a local run's. It is how the run is executed, not what it computes, so it does not
    enter :func:`config_hash`.
    """

    backend: Literal["local", "ray"] = "local"
    address: str = field(default="auto", metadata={"pattern": _ADDRESS})
    workers: int = field(default=2, metadata={"ge": 1, "le": MAX_WORKERS})
    gpus_per_worker: float = field(default=0.0, metadata={"ge": 0.0, "le": 64.0})


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """A whole pipeline run: data, models, and the settings of each stage."""

    name: str = field(metadata={"pattern": _NAME})
    seed: int = field(default=0, metadata={"ge": 0, "le": MAX_SEED})
    device: str = field(default="auto", metadata={"pattern": _DEVICE})
    out: str | None = field(default=None, metadata={"path": True, "stays_below": "the working directory"})
    store: str | None = field(default=None, metadata={"path": True, "stays_below": "the output folder"})
    data: DataConfig
    models: list[ModelConfig] = field(metadata={"nonempty": True})
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    tcav: TcavConfig = field(default_factory=TcavConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    controls: ControlsConfig = field(default_factory=ControlsConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)


def load_config(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read a YAML config file (``yaml.safe_load`` only) and validate it.

    Parameters
    ----------
    path : str or PathLike
        The ``.yaml`` file.

    Returns
    -------
    PipelineConfig

    Raises
    ------
    ConfigError
        When the file is missing, a folder, not valid YAML, empty, or fails validation.
    """
    source = str(path)
    file = Path(path)
    if file.is_dir():
        inside = sorted(str(p) for p in file.glob("*.y*ml"))
        raise ConfigError(source, "is a folder, not a config file", f"give a .yaml file, e.g. {inside[0] if inside else 'configs/demo.yaml'}")
    if not file.is_file():
        raise ConfigError(source, "no such config file", "check the path; shipped configs are in configs/ (demo.yaml …)")
    data = _read_yaml(file, source)
    if data is None:
        raise ConfigError(source, "the file is empty", "start from configs/demo.yaml")
    if not isinstance(data, dict):
        raise ConfigError(source, f"the top level must be a mapping of keys, got {_describe(data)}", "write 'name: …', 'data: …', 'models: …' at the top level")
    return parse_config(data, source)


def _read_yaml(file: Path, source: str) -> Any:
    """The file's YAML document (:func:`~conceptlens.config_yaml.load_yaml`: safe, strict, bounded); one ConfigError otherwise."""
    with file.open("rb") as handle:
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(source, f"is larger than {MAX_CONFIG_BYTES // 1024} kB; a config is a few kB", "give the YAML config file, not a data file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError(source, f"is not UTF-8 text (byte 0x{raw[error.start]:02x} at line {line}, column {column})",
                          "save the file as UTF-8") from None
    try:
        return load_yaml(text)
    except RefusedYAML as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{source}: {error.key_path}" if error.key_path else source, f"{where}{error.problem}", error.fix) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        tagged = isinstance(error, yaml.constructor.ConstructorError)
        fix = "remove the tag: configs are plain YAML, Python objects are never constructed" if tagged else "fix the YAML syntax there"
        raise ConfigError(source, f"not valid YAML ({where}{problem})", fix) from None


def parse_config(data: dict, source: str = "<config>") -> PipelineConfig:
    """Validate a mapping (as read from YAML) and build the :class:`PipelineConfig`.

    Parameters
    ----------
    data : dict
        The parsed YAML document.
    source : str
        Name of the file it came from, used in error messages.
    """
    config = _parse(data, PipelineConfig, "", {}, source)
    _check_consistency(config, source)
    return config


def config_to_dict(config: Any) -> Any:
    """The config as plain JSON-able data, for provenance records.

    Parameters
    ----------
    config : PipelineConfig
        Any config dataclass (sections recurse).

    Returns
    -------
    dict
        Nested dicts and lists (tuples become lists); ``parse_config`` reads it back to an equal config.
    """
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(item) for item in config]
    return config


def without_controls(config: PipelineConfig) -> PipelineConfig:
    """``config`` with ``controls.enabled`` false (the CLI's ``--no-controls``); the rest unchanged."""
    return dataclasses.replace(config, controls=dataclasses.replace(config.controls, enabled=False))


def with_execution(config: PipelineConfig, source: str = "command line", **settings: Any) -> PipelineConfig:
    """``config`` with some ``execution`` settings replaced (the CLI's ``--executor``, ``--ray-address``, ``--workers``).

    Parameters
    ----------
    config : PipelineConfig
    source : str
        Where the settings came from, the culprit of an error.
    **settings
        ``backend``, ``address``, ``workers``, ``gpus_per_worker``; None leaves the config's value.

    Raises
    ------
    ConfigError
        When a value breaks the rules of the ``execution:`` section (the same checks as in a file).
    """
    merged = {**config_to_dict(config.execution), **{key: value for key, value in settings.items() if value is not None}}
    return dataclasses.replace(config, execution=_parse(merged, ExecutionConfig, "execution", {}, source))


def config_hash(config: PipelineConfig) -> str:
    """A stable short hash of what the config computes.

    Returns
    -------
    str
        The first 16 hex digits of the sha256 of :func:`config_to_dict` as canonical JSON
        (sorted keys, no spaces); equal configs hash equal whatever the key order in the file.
        ``execution`` and ``embed.decode_workers`` are left out: they change how a run is executed,
        not its results.
    """
    settings = {key: value for key, value in config_to_dict(config).items() if key != "execution"}
    settings["embed"] = {key: value for key, value in settings["embed"].items() if key != "decode_workers"}
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class RunFolders:
    """The folders a run writes: results (``out``), concept banks (``out/banks``) and the activation store."""

    out: Path
    banks: Path
    store: Path


def run_folders(config: PipelineConfig, out: str | os.PathLike[str] | None = None, banks: str | os.PathLike[str] | None = None) -> RunFolders:
    """Where a run of ``config`` writes; ``conceptlens run`` and ``--dry-run`` both ask here.

    Parameters
    ----------
    config : PipelineConfig
    out : str or PathLike, optional
        The CLI's ``--out`` (the user's choice, anywhere); default ``config.out``, else
        ``./conceptlens-<name>`` (below the working directory: the name is plain).
    banks : str or PathLike, optional
        The CLI's ``--banks``: a banks folder shared across output folders (banks whose provenance
        matches are reused from it, new ones saved to it); default ``<out>/banks``.

    Returns
    -------
    RunFolders
        A relative ``store`` sits inside the output folder (default ``<out>/store``); an absolute one
        where it says. (The parser already refused ``..`` in a relative ``out`` or ``store``.)

    Examples
    --------
    >>> config = parse_config({"name": "t", "store": "cache", "data": {"spec": "synthetic"},
    ...                        "models": [{"name": "m", "spec": "zoo:x", "layers": ["a"]}]})
    >>> folders = run_folders(config)
    >>> str(folders.out), str(folders.store), str(run_folders(config, "/tmp/o").banks)
    ('conceptlens-t', 'conceptlens-t/cache', '/tmp/o/banks')
    """
    folder = Path(out or config.out or f"conceptlens-{config.name}")
    store = Path(config.store or "store")
    return RunFolders(out=folder, banks=Path(banks) if banks else folder / "banks", store=store if store.is_absolute() else folder / store)


def missing_paths(config: PipelineConfig) -> list[str]:
    """The local files and folders the config needs that do not exist.

    Returns
    -------
    list of str
        In config order: a data spec that is a path (not ``synthetic…``/``real-textures…``),
        ``coco_images``, ``image_sets``, model files (``.onnx``, TorchScript, ``file.py:callable``)
        and weight files (not ``none``/``default``).
    """
    return [path for _, path, _ in _needed_paths(config) if not Path(path).exists()]


def check_paths(config: PipelineConfig, source: str = "<config>") -> None:
    """Check that every file and folder the config needs exists.

    Parameters
    ----------
    config : PipelineConfig
    source : str
        The config file's name, the culprit of the error.

    Raises
    ------
    ConfigError
        One error listing every missing path with the key it came from and how to get it.
    """
    missing = [(key, path, advice) for key, path, advice in _needed_paths(config) if not Path(path).exists()]
    if not missing:
        return
    problem = "; ".join(f"{key} = {path} does not exist" for key, path, _ in missing)
    fixes = list(dict.fromkeys(advice for _, _, advice in missing))
    raise ConfigError(source, f"missing files or folders: {problem}", "; ".join(fixes))


# --- the walker -------------------------------------------------------------------------------


def _error(source: str, path: str, problem: str, fix: str | None = None) -> ConfigError:
    return ConfigError(f"{source}: {path or '<top level>'}", problem, fix)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong, _SHORT.maxlevel = 60, 60, 40, 2


def _describe(value: Any) -> str:
    """``value``'s repr and type, shortened (``reprlib``) so that a huge value keeps the error one short line."""
    return f"{_SHORT.repr(value)} ({type(value).__name__})"


def _closest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _parse(value: Any, hint: Any, path: str, rules: dict, source: str) -> Any:
    """Check ``value`` against the type ``hint`` and the field ``rules``; return the typed value."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        return _parse(value, next(a for a in args if a is not type(None)), path, rules, source)
    if dataclasses.is_dataclass(hint):
        # an empty section (``tcav:`` with every key commented out) reads as null: use its defaults
        return _parse_dataclass({} if value is None else value, hint, path, source)
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            allowed = ", ".join(args)
            raise _error(source, path, f"{value!r} is not an allowed value", f"{_closest(str(value), list(args))}use one of: {allowed}")
        return value
    if origin in (list, tuple):
        return _parse_sequence(value, hint, path, rules, source)
    if origin is dict:
        return _parse_mapping(value, args[1], path, rules, source)
    return _parse_scalar(value, hint, path, rules, source)


def _parse_mapping(value: Any, value_hint: Any, path: str, rules: dict, source: str) -> dict[str, Any]:
    """A mapping of names to scalars; a union of scalar types accepts a value of any of them."""
    if not isinstance(value, dict):
        raise _error(source, path, f"expected a mapping of names to values, got {_describe(value)}", "write 'name: value' lines indented below it")
    kinds = get_args(value_hint) or (value_hint,)
    parsed = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise _error(source, _join(path, str(key)), f"key {key!r} is not a name", "use a name (letters, digits, _)")
        kind = next((k for k in kinds if _is_scalar(item, k)), None)  # int before float: 10 stays an integer
        if kind is None:
            raise _error(source, _join(path, key), f"expected {' or '.join(_TYPE_WORDS[k] for k in kinds)}, got {_describe(item)}", "write a plain value")
        parsed[key] = _parse_scalar(item, kind, _join(path, key), rules, source)
    return parsed


def _is_scalar(value: Any, kind: type) -> bool:
    return {str: isinstance(value, str), bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]


def _parse_dataclass(value: Any, cls: type, path: str, source: str) -> Any:
    if not isinstance(value, dict):
        raise _error(source, path, f"expected a mapping of keys, got {_describe(value)}", f"write the keys of {path or 'the config'} indented below it")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = [_error(source, _join(path, str(key)), f"unknown key {key!r}", f"{_closest(str(key), list(fields))}allowed keys: {', '.join(fields)}")
                for key in value if key not in fields]
    hints = get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in value:
            try:
                values[name] = _parse(value[name], hints[name], _join(path, name), dict(f.metadata), source)
            except ConfigError as error:
                problems += _problems(error)
        elif f.default is MISSING and f.default_factory is MISSING:
            problems.append(_error(source, _join(path, name), f"required key {name!r} is missing", f"add '{name}:' to {path or 'the top level'}"))
    _raise_all(problems)
    return cls(**values)


def _parse_sequence(value: Any, hint: Any, path: str, rules: dict, source: str) -> Any:
    args = get_args(hint)
    is_tuple = get_origin(hint) is tuple
    if not isinstance(value, list) or (is_tuple and len(value) != len(args)):
        expected = f"a list of {len(args)} numbers" if is_tuple else "a list"
        raise _error(source, path, f"expected {expected}, got {_describe(value)}", f"write [{', '.join('…' for _ in args)}]" if is_tuple else "write [a, b, …] or one '- item' per line")
    if rules.get("nonempty") and not value:
        raise _error(source, path, "the list is empty", "list at least one item, or remove the key to use the default")
    items, problems = [], []
    for i, item in enumerate(value):
        try:
            items.append(_parse(item, args[i] if is_tuple else args[0], f"{path}[{i}]", rules, source))
        except ConfigError as error:
            problems += _problems(error)
    _raise_all(problems)
    if rules.get("unique"):
        for i, item in enumerate(items):
            if item in items[:i]:
                raise _error(source, f"{path}[{i}]", f"{item!r} appears twice (also at index {items.index(item)})", "remove the duplicate")
    return tuple(items) if is_tuple else items


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _parse_scalar(value: Any, hint: type, path: str, rules: dict, source: str) -> Any:
    ok = {
        str: isinstance(value, str),
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
    }[hint]
    if not ok or (hint is float and not _is_finite(value)):
        raise _error(source, path, f"expected {_TYPE_WORDS[hint]}, got {_describe(value)}", f"write {_TYPE_WORDS[hint]}")
    if hint is float:
        value = float(value)
    if hint in (int, float):
        _check_range(value, path, rules, source)
    if hint is str and "\x00" in value:
        raise _error(source, path, f"{_SHORT.repr(value)} holds a NUL character", "remove the \\0 from the string")
    if hint is str and "pattern" in rules and not re.fullmatch(rules["pattern"][0], value):
        raise _error(source, path, f"{_SHORT.repr(value)} is not allowed", f"use {rules['pattern'][1]}")
    if hint is str and rules.get("path"):
        value = _expand(value, path, source)
        _check_path(value, path, rules, source)
    return value


def _is_finite(value: int | float) -> bool:
    """Whether a number is finite as a float (an integer too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_path(value: str, path: str, rules: dict, source: str) -> None:
    """A path must not be empty; one that must stay below a folder (``out``, ``store``) may not climb out with ``..``."""
    if not value.strip():
        raise _error(source, path, "the path is empty", "give a path, or remove the key to use the default")
    below = rules.get("stays_below")
    if below and not Path(value).is_absolute() and ".." in Path(value).parts:
        raise _error(source, path, f"{value!r} climbs out of {below} with '..'",
                     f"give a path inside {below}, or an absolute path if you mean a folder outside it")


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b), "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _check_range(value: float, path: str, rules: dict, source: str) -> None:
    for rule, (sign, holds) in _BOUNDS.items():
        if rule in rules and not holds(value, rules[rule]):
            raise _error(source, path, f"must be {sign} {rules[rule]}, got {value}", f"use a value {sign} {rules[rule]}")


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: str, path: str, source: str) -> str:
    """Expand ``${VAR}`` and a leading ``~``; an unset variable is an error."""
    for name in _ENV_VAR.findall(value):
        if name not in os.environ:
            raise _error(source, path, f"environment variable {name} is not set (in {value!r})", f"export {name}=... or edit the file")
    return os.path.expanduser(_ENV_VAR.sub(lambda m: os.environ[m.group(1)], value))


# --- checks across keys and paths ----------------------------------------------------------------


def _check_consistency(config: PipelineConfig, source: str) -> None:
    """Every check across keys, each problem collected (one raise for all of them)."""
    problems = []
    checks = [_check_ranges_and_names, _check_tcav_concepts]
    checks += [lambda c, s, i=i, target=target: _check_target(target, f"tcav.targets[{i}]", [m.name for m in c.models], s)
               for i, target in enumerate(config.tcav.targets)]
    for check in checks:
        try:
            check(config, source)
        except ConfigError as error:
            problems += _problems(error)
    _raise_all(problems)


def _check_ranges_and_names(config: PipelineConfig, source: str) -> None:
    low, high = config.data.area_range
    if not low < high:
        raise _error(source, "data.area_range", f"lower bound {low} is not below upper bound {high}", "write [lo, hi] with 0 <= lo < hi <= 1")
    names = [model.name for model in config.models]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise _error(source, f"models[{i}].name", f"model name {name!r} is used twice", "give every model its own name")
    all_layers = list(dict.fromkeys(layer for model in config.models for layer in model.layers))
    for i, layer in enumerate(config.tcav.layers or []):
        if layer not in all_layers:
            raise _error(source, f"tcav.layers[{i}]", f"{layer!r} is not a layer of any model", closest_names(layer, all_layers))
    if config.compare.enabled and "cka" in config.compare.methods and not {"net2vec", "nmf"} & set(config.compare.methods):
        raise _error(source, "compare.methods", "cka alone compares nothing: the CKA baseline is drawn beside a concept comparison",
                     "add net2vec and/or nmf to compare.methods")


def _check_tcav_concepts(config: PipelineConfig, source: str) -> None:
    """TCAV concepts and target inputs must be among ``data.concepts`` when that list is given.

    With ``data.image_sets`` they name set folders there instead (checked when the folder is read).
    """
    known = config.data.concepts
    if known is None or config.data.image_sets:
        return
    named = [(f"tcav.concepts[{i}]", concept) for i, concept in enumerate(config.tcav.concepts or [])]
    named += [(f"tcav.targets[{i}].inputs", target.inputs) for i, target in enumerate(config.tcav.targets) if target.inputs]
    for key, concept in named:
        if concept not in known:
            raise _error(source, key, f"concept {concept!r} is not in data.concepts", f"add it to data.concepts, or {closest_names(concept, known)}")


def _check_target(target: TcavTargetConfig, path: str, model_names: list[str], source: str) -> None:
    try:
        parsed = check_target_spec(target.spec)  # a class name is looked up once the model is loaded
    except TargetError as error:
        raise _error(source, f"{path}.spec", error.problem, error.fix or f"use {SPEC_FORMS}") from None
    for value in (parsed.cls,):  # the class id of a class target or a detection target
        if isinstance(value, int) and not 0 <= value <= MAX_CLASS_ID:
            raise _error(source, f"{path}.spec", f"class id {value} in {target.spec!r} is out of range",
                         f"class ids count from 0 (detector labels from 1) up to at most {MAX_CLASS_ID}")
    for j, name in enumerate(target.models or []):
        if name not in model_names:
            raise _error(source, f"{path}.models[{j}]", f"no model is named {name!r}", f"{_closest(name, model_names)}use one of: {', '.join(model_names)}")


_GENERATED = ("synthetic", "real-textures")


def _model_file(spec: str) -> str | None:
    """The local file a model spec refers to, or None for zoo:, torchvision: and module:callable specs."""
    if spec.startswith(("zoo:", "torchvision:")):
        return None
    target, colon, _ = spec.rpartition(":")
    if not colon:
        return spec
    return target if target.endswith(".py") else None


def _needed_paths(config: PipelineConfig) -> list[tuple[str, str, str]]:
    """(key, path, advice) for every local file or folder the config refers to."""
    coco = "download COCO 2017 val (annotations/instances_val2017.json and val2017/) from cocodataset.org and set COCO_ROOT"
    needed = []
    data = config.data
    if data.spec.split(":")[0] not in _GENERATED:
        advice = coco if data.spec.lower().endswith(".json") else "give a folder with images/ and masks/<concept>/ as data.spec"
        needed.append(("data.spec", data.spec, advice))
    if data.coco_images:
        needed.append(("data.coco_images", data.coco_images, coco))
    if data.image_sets:
        needed.append(("data.image_sets", data.image_sets, "create the folder of image-level concept sets or remove data.image_sets"))
    for i, model in enumerate(config.models):
        file = _model_file(model.spec)
        if file is not None:
            needed.append((f"models[{i}].spec", file, "put the model file there or fix the spec"))
        if model.weights not in ("none", "default"):
            name = Path(model.weights).name
            advice = f"download https://download.pytorch.org/models/{name} into WEIGHTS_DIR" if model.spec.startswith("torchvision:") else "put the state dict there"
            needed.append((f"models[{i}].weights", model.weights, f"{advice} (or set weights: none)"))
    return needed
