"""The ``conceptlens`` command line.

Bad input ends with a one-line error and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin by default, which slows torch several-fold when another process
# shares the cores; this must be set before torch is imported (results do not change).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NoReturn  # noqa: E402

from conceptlens.concepts.errors import ConceptLensError  # noqa: E402
from conceptlens import limits  # noqa: E402

__all__ = ["main", "build_parser"]

EXAMPLES = {
    "init": "example: conceptlens init torchvision:resnet18?num_classes=10 ./my_concepts --weights finetuned.pth --target logit:3 --out audit.yaml",
    "layers": "example: conceptlens layers torchvision:resnet18 --input-size 224 224",
    "embed": "example: conceptlens embed torchvision:resnet18 synthetic:200 --layers layer2 layer3 --reduce grid",
    "synth": "examples:\n  conceptlens synth ./world --n 500 --seed 0\n"
    "  conceptlens synth ./sets --n 200 --image-sets --concepts car sky ground   (TCAV image sets: sets/car/, …, sets/random_0/ …)",
    "probe": "examples:\n  conceptlens probe zoo:synthetic_vgg_centernet synthetic:300 --layers backbone.block3 --method net2vec\n"
    "  conceptlens probe zoo:mobilenet_v2 ./sets --layers features.7 --method linear   (image sets, e.g. from `conceptlens synth ./sets --image-sets`)",
    "compare": "example: conceptlens compare synthetic:300 --model zoo:synthetic_vgg_centernet --layers backbone.block2 backbone.block3 "
    "--model zoo:synthetic_resnet_fpn --layers backbone.block2 neck.p3 --method net2vec --out ./compare",
    "tcav": "examples (image sets, e.g. from `conceptlens synth ./sets --n 200 --image-sets --concepts car sky ground`):\n"
    "  conceptlens tcav zoo:synthetic_vgg_centernet ./sets --layers backbone.block3 --target top:car --inputs car\n"
    "  conceptlens tcav zoo:mobilenet_v2 ./sets --layers features.7 features.14 --target 'logit:\"sports car\"' --inputs car --runs 10",
    "demo": "example: conceptlens demo --out ./conceptlens-demo   (about 1.5 minutes on 2 CPU cores; a second run reuses everything)",
    "maps": "examples:\n  conceptlens maps zoo:synthetic_vgg_centernet scene.png --bank conceptlens-demo/banks/vgg__backbone.block3.net2vec\n"
    "  conceptlens maps zoo:synthetic_vgg_centernet scene.png --bank conceptlens-demo/banks/vgg__backbone.block3.net2vec --target top:1",
    "run": "example: conceptlens run configs/imagenet_backbones.yaml --out ./backbones",
    "report": "example: conceptlens report ./conceptlens-demo",
    "train-zoo": "example: conceptlens train-zoo --seed 0 --out ./zoo-weights   (about 8-13 minutes on 2 CPU cores)",
}


class _UsageError(ConceptLensError):
    """A bad command line, from its one-line text ``culprit: problem — fix: fix``."""

    def __init__(self, line: str) -> None:
        head, _, fix = line.partition(" — fix: ")
        culprit, _, problem = head.partition(": ")
        super().__init__(culprit, problem or "is not a valid command line", fix or None)


class _Parser(argparse.ArgumentParser):
    """argparse with the project's errors: one line, ``error: --grid 0: must be … — fix: …``, exit code 2.

    argparse's own messages (a missing argument, an unknown choice) get the subcommand's ``--help``
    as their fix; a flag's value checked by :func:`_integer` or :func:`_open_unit` carries its own.
    """

    def error(self, message: str) -> NoReturn:
        flag, separator, detail = message.removeprefix("argument ").partition(": ")
        if not message.startswith("argument ") or not separator:
            flag, detail = "", message
        if " — fix: " in detail:  # a value refused by one of the type functions below
            raise _UsageError(f"{flag} {detail}")
        raise _UsageError(f"{flag + ': ' if flag else ''}{detail} — fix: see `{self.prog} --help`")


def _integer(low: int, high: int, example: str, unit: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]``; otherwise one line with the value, the range and ``example``."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_cut(text)}: not an integer — fix: pass e.g. {example}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{_cut(text)}: must be between {low} and {high}{unit} — fix: pass e.g. {example}")
        return value

    return integer


def _open_unit(example: str) -> Callable[[str], float]:
    """An argparse ``type``: a number strictly between 0 and 1 (a significance level)."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_cut(text)}: not a number — fix: pass e.g. {example}") from None
        if not 0.0 < value < 1.0:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{_cut(text)}: must be between 0 and 1 (exclusive) — fix: pass e.g. {example}")
        return value

    return number


def _cut(text: str, limit: int = 24) -> str:
    """A flag's value as shown in an error: cut when long (a 5000-digit number)."""
    return text if len(text) <= limit else f"{text[:limit - 1]}… ({len(text)} characters)"


_SEED = _integer(0, limits.MAX_SEED, "--seed 0")


def _common(parser: argparse.ArgumentParser, device_default: str | None = "auto") -> None:
    where = "the config's device" if device_default is None else device_default
    parser.add_argument("--device", default=device_default, help=f"auto (CUDA when present), cpu or cuda (default: {where})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _executor_options(parser: argparse.ArgumentParser) -> None:
    """``--executor``, ``--ray-address``, ``--workers``: override the config's ``execution`` section (README, "Scale-out on Ray")."""
    parser.add_argument("--executor", choices=["local", "ray"], help="where the steps run: this process, or a Ray cluster (default: the config's execution.backend, else local)")
    parser.add_argument("--ray-address", help="the Ray head node, HOST:PORT, or auto (a cluster started on this machine); default: the config's execution.address")
    parser.add_argument("--workers", type=_integer(1, limits.MAX_WORKERS, "--workers 4"), help="Ray workers (actors; one CPU each) for the embedding (default: the config's execution.workers)")


def _no_controls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-controls", action="store_true",
                        help="skip controls, nulls and confidence intervals (overrides the config's controls.enabled; raw numbers unchanged)")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="torchvision:<builder>, <module>:<callable>, <file.py>:<callable>, .onnx or TorchScript file")
    parser.add_argument("--weights", default="none", help="none, default (torchvision, from the local hub cache) or a state-dict path")
    parser.add_argument("--input-size", nargs=2, type=_integer(1, limits.MAX_SIDE, "--input-size 224 224"), metavar=("H", "W"),
                        help="classifier input size (default 224 224)")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = _Parser(prog="conceptlens", description="Concept-based interpretability of vision models.")
    commands = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    init = commands.add_parser("init", help="write a commented config for your model and data, ready for `run`", epilog=EXAMPLES["init"], formatter_class=raw)
    _model_arguments(init)
    init.add_argument("data", help="your concept data: a folder (images/ + masks/<concept>/), a COCO .json (with --coco-images) or synthetic:N")
    init.add_argument("--out", default="conceptlens.yaml", help="the config file to write (default ./conceptlens.yaml)")
    init.add_argument("--coco-images", help="image folder of a COCO dataset")
    init.add_argument("--target", help="switch TCAV on with this target (" + _target_forms() + ")")
    init.add_argument("--name", help="the run's name (default: from the model spec)")
    init.add_argument("--n-layers", type=_integer(1, 64, "--n-layers 4"), default=4, help="layers to propose, at evenly spread relative depths (default 4)")
    init.add_argument("--overwrite", action="store_true", help="replace an existing config file")
    _common(init)

    layers = commands.add_parser("layers", help="list hookable layers with output shapes", epilog=EXAMPLES["layers"], formatter_class=raw)
    _model_arguments(layers)
    _common(layers)

    embed = commands.add_parser("embed", help="embed a concept dataset at chosen layers into the store", epilog=EXAMPLES["embed"], formatter_class=raw)
    _model_arguments(embed)
    embed.add_argument("data", help="synthetic[:N[:SEED]], a folder (images/ + masks/<concept>/), or a COCO .json")
    embed.add_argument("--layers", nargs="+", required=True, help="layer names (see `conceptlens layers`)")
    embed.add_argument("--coco-images", help="image folder of a COCO dataset")
    embed.add_argument("--store", default="conceptlens-store", help="activation store folder (default ./conceptlens-store)")
    embed.add_argument("--reduce", default="native", choices=["native", "grid", "mean", "max"], help="keep maps, sample on the concept grid, or pool")
    embed.add_argument("--grid", nargs=2, type=_integer(1, limits.MAX_SIDE, "--grid 100 100"), default=[100, 100], metavar=("H", "W"),
                       help="concept grid (default 100 100)")
    embed.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    embed.add_argument("--batch-size", type=_integer(1, limits.MAX_BATCH, "--batch-size 32"), default=32)
    embed.add_argument("--seed", type=_SEED, default=0, help="split seed")
    embed.add_argument("--decode-workers", type=_integer(0, limits.MAX_DECODE_WORKERS, "--decode-workers 2"), metavar="N",
                       help="threads decoding the next batches during each forward pass (0: none; default: min(4, cores - 1))")
    _common(embed)

    synth = commands.add_parser("synth", help="write the synthetic concept world to the folder layout", epilog=EXAMPLES["synth"], formatter_class=raw)
    synth.add_argument("out", help="output folder")
    synth.add_argument("--n", type=_integer(1, MAX_SYNTH_SCENES, "--n 500", " scenes"), default=500, help="number of scenes")
    synth.add_argument("--seed", type=_SEED, default=0)
    synth.add_argument("--overwrite", action="store_true")
    synth.add_argument("--concepts", nargs="+", help="only these concepts (default: all; with --image-sets: all that two or more images show)")
    synth.add_argument("--image-sets", action="store_true",
                       help="write image sets for `conceptlens tcav` instead: <concept>/ and random_*/ folders of PNGs (drawn from the train/val scenes)")
    synth.add_argument("--random-sets", type=_integer(2, limits.MAX_RANDOM_SETS, "--random-sets 10"), help="with --image-sets: random sets to write (default 10)")
    synth.add_argument("--images-per-set", type=_integer(2, limits.MAX_IMAGES, "--images-per-set 40"), help="with --image-sets: at most this many images per set (default 40)")
    _common(synth)

    probe = commands.add_parser("probe", help="learn concept vectors for layers (net2vec, linear CAVs, nmf)", epilog=EXAMPLES["probe"], formatter_class=raw)
    _model_arguments(probe)
    probe.add_argument("data", help="pixel methods: a concept dataset (as for embed); linear: a folder of concept sets + random_* sets")
    probe.add_argument("--layers", nargs="+", required=True)
    probe.add_argument("--method", default="net2vec", metavar="METHOD",
                       help="a registered concept method: net2vec or nmf (pixel level, on masks), linear (image-level CAVs) (default net2vec)")
    probe.add_argument("--name", help="the model's name in bank files and results (default: from the model spec)")
    _probe_options(probe)
    _common(probe)

    compare = commands.add_parser("compare", help="layer × layer concept similarity within and across models", epilog=EXAMPLES["compare"], formatter_class=raw)
    compare.add_argument("data", help="a concept dataset with masks (as for embed)")
    compare.add_argument("--model", action="append", required=True, help="model spec; repeat for each model (each followed by --layers)")
    compare.add_argument("--layers", action="append", nargs="+", required=True, help="layers of the preceding --model, shallow to deep")
    compare.add_argument("--weights", action="append", help="weights per model (default none for each)")
    compare.add_argument("--name", action="append", help="name of each --model in bank files and results (default A, B, …)")
    compare.add_argument("--method", default="net2vec", metavar="METHOD", help="a pixel-level concept method: net2vec or nmf (default net2vec)")
    compare.add_argument("--input-size", nargs=2, type=_integer(1, limits.MAX_SIDE, "--input-size 224 224"), metavar=("H", "W"))
    _probe_options(compare)
    _common(compare)

    tcav = commands.add_parser("tcav", help="TCAV scores with random-CAV significance tests", epilog=EXAMPLES["tcav"], formatter_class=raw)
    _model_arguments(tcav)
    tcav.add_argument("data", help="a folder of image sets: <concept>/ folders and random_0/, random_1/, ... folders")
    tcav.add_argument("--layers", nargs="+", required=True, help="layer names (see `conceptlens layers`)")
    tcav.add_argument("--target", action="append", required=True, help="target scalar; repeat for several: " + _target_forms())
    tcav.add_argument("--inputs", required=True, help="the scored images (of the target class): a set name in DATA or a folder")
    tcav.add_argument("--concepts", nargs="+", help="concept sets to test (default: every non-random set except --inputs)")
    tcav.add_argument("--runs", type=_integer(1, limits.MAX_RANDOM_SETS, "--runs 10"), help="CAVs per concept, one per random set (default: every random set)")
    tcav.add_argument("--max-inputs", type=_integer(1, limits.MAX_IMAGES, "--max-inputs 32"), help="score at most this many input images (default: all)")
    tcav.add_argument("--statistic", default="sign_count", choices=["sign_count", "magnitude", "mean_sensitivity"], help="score tested (default sign_count)")
    tcav.add_argument("--correction", default="holm", choices=["holm", "bonferroni"], help="multiple-testing correction (default holm)")
    tcav.add_argument("--alpha", type=_open_unit("--alpha 0.05"), default=0.05, help="significance level, 0 < alpha < 1 (default 0.05)")
    tcav.add_argument("--bootstrap", type=_integer(0, limits.MAX_RESAMPLES, "--bootstrap 1000"), default=1000,
                      help="bootstrap resamples for confidence intervals (0: none)")
    tcav.add_argument("--store", default="conceptlens-store", help="activation store folder (default ./conceptlens-store)")
    tcav.add_argument("--out", default="conceptlens-out", help="output folder (default ./conceptlens-out)")
    tcav.add_argument("--batch-size", type=_integer(1, limits.MAX_BATCH, "--batch-size 32"), default=32)
    tcav.add_argument("--seed", type=_SEED, default=0)
    _common(tcav)

    maps = commands.add_parser("maps", help="concept maps of one image (probabilities, NCAV maps, or gradient × CAV with --target)", epilog=EXAMPLES["maps"], formatter_class=raw)
    _model_arguments(maps)
    maps.add_argument("image", help="an image file")
    maps.add_argument("--bank", required=True, help="a concept bank written by probe/run (banks/<model>__<layer>.<method>)")
    maps.add_argument("--target", help="attribute this target instead (" + _target_forms() + "): per-cell ∂target/∂A · concept vector")
    maps.add_argument("--top", type=_integer(1, limits.MAX_SHOWN, "--top 8"), default=8, help="show the N concepts with the largest maps (default 8)")
    maps.add_argument("--out", default="concept_maps.png", help="output PNG (default ./concept_maps.png)")
    _common(maps)

    train = commands.add_parser("train-zoo", help="retrain the two synthetic-world detectors from a seed", epilog=EXAMPLES["train-zoo"], formatter_class=raw)
    train.add_argument("--out", default="zoo-weights", help="folder for weights and model cards (default ./zoo-weights; never the installed package)")
    train.add_argument("--steps", type=_integer(1, limits.MAX_TRAIN_STEPS, "--steps 1000"), help="training steps per model (default: the shipped recipe's)")
    train.add_argument("--seed", type=_SEED, default=0)
    _common(train)

    run = commands.add_parser("run", help="run every step of a YAML config (reusing the store, skipping finished steps)", epilog=EXAMPLES["run"], formatter_class=raw)
    run.add_argument("config", help="a YAML config (see configs/)")
    run.add_argument("--out", help="output folder (default: the config's out, else ./conceptlens-<name>)")
    _banks_option(run)
    run.add_argument("--dry-run", action="store_true",
                     help="validate the config and list the files it would read, the code it would run and the folders it would write; run nothing")
    _no_controls(run)
    _executor_options(run)
    _common(run, device_default=None)

    report = commands.add_parser("report", help="write report.html again from a results folder (no model runs)", epilog=EXAMPLES["report"], formatter_class=raw)
    report.add_argument("results", help="a results folder written by `conceptlens run`")
    _common(report)

    demo = commands.add_parser("demo", help="run configs/demo.yaml: the synthetic concept world and the two shipped detectors", epilog=EXAMPLES["demo"], formatter_class=raw)
    demo.add_argument("--out", default="conceptlens-demo", help="output folder (default ./conceptlens-demo)")
    _banks_option(demo)
    _no_controls(demo)
    _executor_options(demo)
    _common(demo, device_default=None)
    return parser


def _target_forms() -> str:
    from conceptlens.attribution.target_specs import SPEC_FORMS

    return SPEC_FORMS


def _probe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coco-images", help="image folder of a COCO dataset")
    parser.add_argument("--concepts", nargs="+", help="only these concepts of the dataset (default: all)")
    parser.add_argument("--store", default="conceptlens-store", help="activation store folder (default ./conceptlens-store)")
    parser.add_argument("--out", default="conceptlens-out", help="output folder for banks and results (default ./conceptlens-out)")
    _banks_option(parser)
    parser.add_argument("--grid", nargs=2, type=_integer(1, limits.MAX_SIDE, "--grid 100 100"), default=[100, 100], metavar=("H", "W"),
                        help="concept grid (default 100 100)")
    parser.add_argument("--k", type=_integer(1, limits.MAX_COMPONENTS, "--k 10"), default=10, help="nmf: number of NCAVs per layer (default 10)")
    parser.add_argument("--epochs", type=_integer(1, limits.MAX_EPOCHS, "--epochs 30"), default=30, help="net2vec: maximum epochs (default 30)")
    parser.add_argument("--runs", type=_integer(1, limits.MAX_RANDOM_SETS, "--runs 10"), default=None,
                        help="linear: CAVs per concept, one per random set (default: all random sets)")
    parser.add_argument("--batch-size", type=_integer(1, limits.MAX_BATCH, "--batch-size 32"), default=32)
    parser.add_argument("--seed", type=_SEED, default=0)


def _banks_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--banks", metavar="DIR",
                        help="banks folder shared across output folders: banks trained for the same model, data and settings are reused (default <out>/banks)")


def _method_params(args: argparse.Namespace) -> dict:
    """The options the method's estimator takes: ``--epochs`` → max_epochs, ``--k`` → n_components, ``--seed``."""
    import inspect

    from conceptlens.probes.registry import get_method

    offered = {"max_epochs": args.epochs, "n_components": args.k, "seed": args.seed}
    accepted = inspect.signature(get_method(args.method).estimator).parameters
    return {name: value for name, value in offered.items() if name in accepted}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``conceptlens`` console command.

    Ctrl-C ends it with one line, ``interrupted; rerun to resume``, and exit code 130 (every step
    resumes from what it finished). A closed standard output (``conceptlens layers … | head``)
    ends it silently, the standard way: the rest of the output goes to the null device, exit 1.
    """
    try:
        code = _run_command(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's own flush at exit
        return code
    except KeyboardInterrupt:
        print("interrupted; rerun to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _stdout_to_null()
        return 1


def _stdout_to_null() -> None:
    """Point standard output at the null device, so that flushing it at exit raises nothing more."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stream)
        pass


def _run_command(argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its command; bad input becomes one line on stderr and exit code 2."""
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as error:
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        with _warnings_as_lines(raw=args.debug):
            return COMMANDS[args.command](args)
    except BrokenPipeError:
        raise
    except ConceptLensError as error:
        if args.debug:
            raise
        for problem in getattr(error, "errors", None) or [error]:  # a config's problems, all at once
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except OSError as error:  # the environment (a full disk, a read-only or missing folder), not a bug
        if args.debug:
            raise
        print(f"error: {_os_error(error)}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _warnings_as_lines(raw: bool) -> Iterator[None]:
    """Show each distinct Python warning once, as one line ``warning: <message>`` on stderr.

    Torch, Pillow or scikit-learn warnings otherwise print their source file and line; the filters
    (which warnings show at all) stay as they are. With ``raw`` (``--debug``) warnings show as Python prints them.
    """
    with warnings.catch_warnings():
        if not raw:
            shown: set[str] = set()

            def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings.showwarning's signature
                text = " ".join(str(message).split())
                if text not in shown:
                    shown.add(text)
                    print(f"warning: {text}", file=sys.stderr)

            warnings.showwarning = show
        yield


def _os_error(error: OSError) -> ConceptLensError:
    """The one-line error for an OSError that escaped a command, naming its file and a fix."""
    import errno

    from conceptlens.concepts.store.atomic import write_error

    path = error.filename or "a file"
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EACCES, errno.EPERM):
        return write_error(Path(path), error)
    if error.errno == errno.ENOENT:
        return ConceptLensError(str(path), "no such file or folder", "check the path")
    if error.errno == errno.EISDIR:
        return ConceptLensError(str(path), "is a folder where a file is expected", "give the path of the file")
    reason = " ".join((error.strerror or str(error)).split())
    return ConceptLensError(str(path), f"operating-system error ({reason})", "check the path, its permissions and free disk space; --debug shows where it happened")


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _report(out: Path) -> Path:
    """Render the report of whatever results ``out`` holds (probe, compare, tcav or a whole run): figures included."""
    from conceptlens.report import write_report

    return write_report(out)


def _banks_dir(args: argparse.Namespace) -> Path:
    """``--banks DIR``, else ``<--out>/banks``."""
    return Path(args.banks) if args.banks else Path(args.out) / "banks"


def _finish(args: argparse.Namespace, models, outputs: dict[str, Path | str], next_command: str | None) -> None:
    """The closing lines of a command: the model(s), weights and device actually used, what was written where, what to run next."""
    from conceptlens.concepts.environment import resolve_device
    from conceptlens.concepts.models.loading import weights_used

    device = resolve_device(args.device).type
    for model in models if isinstance(models, (list, tuple)) else [models]:
        print(f"model {model.spec}: weights {weights_used(model.spec, model.weights)}; device {device}")
    width = max(len(name) for name in outputs)
    for name, path in outputs.items():
        print(f"  {name:<{width}}  {path}")
    if next_command:
        print(f"next: {next_command}")


def _load(args: argparse.Namespace):
    from conceptlens.concepts.models.loading import load_model

    return load_model(args.model, weights=args.weights, input_size=tuple(args.input_size) if args.input_size else None)


def cmd_layers(args: argparse.Namespace) -> int:
    from conceptlens.concepts.models.loading import list_layers

    from conceptlens.concepts.models.loading import load_model

    # --input-size is the dry-run image's size; it is also the input size of a classifier without its own preprocessing
    model = load_model(args.model, weights=args.weights)
    if args.input_size and not model.own_preprocessing:
        model = _load(args)
    input_size = tuple(args.input_size) if args.input_size else (224, 224)
    print(f"{'#':>4}  {'layer':<48} {'type':<24} {'channels':>8}  output shape (one image)  calls")
    for index, layer in enumerate(list_layers(model, input_size)):
        shape = "—" if layer.shape is None else "×".join(str(s) for s in layer.shape[1:])
        channels = "" if layer.channels is None else str(layer.channels)
        print(f"{index:>4}  {layer.name:<48} {layer.module_type:<24} {channels:>8}  {shape:<24}  {layer.calls}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from conceptlens.concepts.embedding.embed import embed
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.data_spec import open_dataset

    model = _load(args)
    dataset = open_dataset(args.data, coco_images=args.coco_images, seed=args.seed, progress=_progress(args))
    store = ActivationStore(args.store)
    started = time.perf_counter()
    result = embed(
        model, dataset, args.layers, store, reduce=args.reduce, grid=tuple(args.grid), dtype=args.dtype,
        batch_size=args.batch_size, device=args.device, progress=_progress(args), decode_workers=args.decode_workers,
    )
    _print_entries(result, time.perf_counter() - started)
    return 0


def _print_entries(result, seconds: float) -> None:
    for layer, entry in result.entries.items():
        manifest = entry.manifest()
        size = sum((entry.path / name).stat().st_size for name in manifest["shards"]) / 1e6  # not other writers' temp files
        status = "reused" if layer in result.reused else "computed"
        shape = "×".join(str(s) for s in manifest["item_shape"])
        print(f"{layer:<32} {status:<9} {manifest['n_items']:>6} items × {shape:<16} {size:8.1f} MB  {entry.path}")
    print(f"{result.forward_batches} forward batches in {seconds:.1f} s")


def cmd_probe(args: argparse.Namespace) -> int:
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.probes.workflow import bank_path, default_label, probe_model
    from conceptlens.report.results import ProbeResults

    from conceptlens.probes.registry import get_method

    method = get_method(args.method)  # an unknown method fails before the model loads
    model = _load(args)
    out = Path(args.out)
    if method.level == "image":  # fitted on image sets, not concept masks
        return _probe_linear(args, model, out)
    dataset = _concept_data(args)
    label = args.name or default_label(model)
    probed = probe_model(
        model, dataset, args.layers, args.method, ActivationStore(args.store), banks_dir=_banks_dir(args), label=label, grid=tuple(args.grid),
        params=_method_params(args), batch_size=args.batch_size, device=args.device, progress=_progress(args),
        input_size=tuple(args.input_size) if args.input_size else (224, 224),
    )
    ProbeResults(model=args.model, dataset=dataset.name, method=args.method, metrics=probed.metrics).write(out / f"probe_{args.method}.json")
    for layer, bank in probed.banks.items():
        scores = [m.get("set_iou") for m in bank.metrics.values() if isinstance(m.get("set_iou"), float)]
        best = max(bank.metrics.items(), key=lambda kv: kv[1].get("set_iou") or -1)
        summary = f"mean set IoU {sum(scores) / len(scores):.3f}, best {best[0]} {best[1].get('set_iou') or 0:.3f}" if scores else ""
        print(f"{layer:<32} {bank.n_concepts:>3} vectors × {bank.n_channels} channels  {summary}")
    first = bank_path(_banks_dir(args), label, args.layers[-1], args.method)
    _finish(args, model, {"banks": _banks_dir(args), "metrics": out / f"probe_{args.method}.json", "report": _report(out)},
            f"conceptlens maps {args.model} IMAGE.png --bank {first}   (concept maps of one image)")
    return 0


def _probe_linear(args: argparse.Namespace, model, out: Path) -> int:
    from conceptlens.concepts.data.image_sets import ImageSets
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.probes.image_cavs import fit_image_cavs, set_activations
    from conceptlens.probes.workflow import bank_path, check_bank_owner, default_label
    from conceptlens.report.results import ProbeResults

    sets = ImageSets(args.data, concepts=args.concepts)
    datasets = {name: sets.dataset(name) for name in [*sets.concepts, *sets.random_sets]}
    pooled = set_activations(model, datasets, args.layers, ActivationStore(args.store), args.batch_size, args.device, _progress(args))
    cav_sets = fit_image_cavs(pooled, sets.concepts, sets.random_sets, args.runs, args.seed, {"model_hash": model.hash})
    summary, label, banks = {}, args.name or default_label(model), _banks_dir(args)
    for layer in cav_sets:
        check_bank_owner(bank_path(banks, label, layer, "linear"), bank_path(banks, label, layer, "linear"), model.hash, label)
    for layer, cavs in cav_sets.items():
        cavs.save(bank_path(banks, label, layer, "cavs"))
        bank = cavs.to_bank(layer, provenance={"model_hash": model.hash})
        bank.save(bank_path(banks, label, layer, "linear"))
        summary[layer] = bank.metrics
        accuracy = ", ".join(f"{c} {m['accuracy_mean']:.2f}" for c, m in bank.metrics.items())
        print(f"{layer:<32} CAV accuracy (held-out, mean over {cavs.vectors.shape[1]} runs): {accuracy}")
    ProbeResults(model=args.model, method="linear", metrics=summary).write(out / "probe_linear.json")
    _finish(args, model, {"banks": banks, "metrics": out / "probe_linear.json", "report": _report(out)},
            f"conceptlens tcav {args.model} {args.data} --layers {' '.join(args.layers)} --target logit:K --inputs SET   (TCAV scores)")
    return 0


def cmd_tcav(args: argparse.Namespace) -> int:
    from conceptlens.attribution.targets import target_from_spec
    from conceptlens.attribution.tcav import tcav_scores
    from conceptlens.concepts.data.image_sets import ImageFolderDataset, ImageSets
    from conceptlens.concepts.data.imageio import list_image_files
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.probes.image_cavs import fit_image_cavs, set_activations
    from conceptlens.tcav_step import target_labels, tcav_table, write_tcav

    model = _load(args)
    targets = {spec: target_from_spec(spec, categories=model.categories) for spec in args.target}
    in_data = (Path(args.data) / args.inputs).is_dir()
    folder = Path(args.data) / args.inputs if in_data else Path(args.inputs)
    if not folder.is_dir():
        raise ConceptLensError(f"--inputs {args.inputs}", f"is neither a set folder in {args.data} nor a folder", "name a set of DATA or a folder of images of the target class")
    inputs = ImageFolderDataset(list_image_files(folder, f"--inputs {folder}"), name=folder.name)
    concepts = args.concepts or [c for c in ImageSets(args.data).concepts if not (in_data and c == args.inputs)]
    sets = ImageSets(args.data, concepts=concepts)
    _check_random_sets(sets.random_sets, args)
    count = min(len(inputs), args.max_inputs) if args.max_inputs else len(inputs)
    images = [inputs.image(i) for i in range(count)]

    datasets = {name: sets.dataset(name) for name in [*sets.concepts, *sets.random_sets]}
    pooled = set_activations(model, datasets, args.layers, ActivationStore(args.store), args.batch_size, args.device, _progress(args))
    cav_sets = fit_image_cavs(pooled, sets.concepts, sets.random_sets, args.runs, args.seed, {"model_hash": model.hash})
    result = tcav_scores(
        model, images, None, cav_sets, targets, batch_size=args.batch_size, statistic=args.statistic, correction=args.correction,
        alpha=args.alpha, n_bootstrap=args.bootstrap, seed=args.seed, input_ids=inputs.ids[:count],
    )
    provenance = {
        "model": args.model, "weights": args.weights, "model_hash": model.hash, "data": str(args.data), "inputs": args.inputs,
        "n_inputs": count, "concepts": sets.concepts, "random_sets": sets.random_sets[: args.runs] if args.runs else sets.random_sets,
        "layers": list(args.layers), "targets": list(args.target), "seed": args.seed,
    }
    labels = target_labels(targets)
    paths = write_tcav(result, Path(args.out), provenance, labels=labels)
    print(tcav_table(result, labels))
    for line in result.missing_lines():
        print(line)
    _finish(args, model, {"results": paths["json"], "table": paths["csv"], "report": _report(Path(args.out))},
            f"open {Path(args.out) / 'report.html'} in a browser")
    return 0


def _check_random_sets(random_sets: list[str], args: argparse.Namespace) -> None:
    """``tcav`` needs 2 random sets or more among those it uses (``--runs`` of them): else no p-values, and why."""
    from conceptlens.attribution.tcav import random_sets_problem

    used = random_sets[: args.runs] if args.runs else random_sets
    problem = random_sets_problem(len(used))
    if problem is None:
        return
    if len(random_sets) > len(used):
        raise ConceptLensError(f"--runs {args.runs}", problem, f"pass --runs {len(random_sets)} (or leave it out: every random set)")
    raise ConceptLensError(f"{args.data}: {', '.join(used)}", problem,
                           f"add random_1/, random_2/ … beside {used[0]}/, each with random images (10 or more sets for several hypotheses)")


def _concept_data(args: argparse.Namespace):
    from conceptlens.data_spec import open_dataset

    dataset = open_dataset(args.data, coco_images=args.coco_images, seed=args.seed, progress=_progress(args))
    return dataset.select_concepts(args.concepts) if args.concepts else dataset


def cmd_compare(args: argparse.Namespace) -> int:
    from conceptlens.concepts.models.loading import load_model
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.probes.workflow import probe_model

    from conceptlens.probes.registry import get_method, method_names

    if get_method(args.method).level != "pixel":
        raise ConceptLensError(f"--method {args.method}", "compares pixel-level concept vectors only", f"use one of {', '.join(method_names('pixel'))}")
    n_models = len(args.model)
    for flag, given in (("--layers", args.layers), ("--weights", args.weights), ("--name", args.name)):
        if given is not None and len(given) != n_models:
            raise ConceptLensError(f"--model/{flag}", f"{n_models} models but {len(given)} {flag} values", f"give {flag} once per --model, after it")
    weights = args.weights or ["none"] * n_models
    names = args.name or [chr(ord("A") + index) for index in range(n_models)]
    if len(set(names)) != n_models:
        raise ConceptLensError(f"--name {' '.join(names)}", "two models have the same name", "give every --model its own --name")
    dataset = _concept_data(args)
    store, out = ActivationStore(args.store), Path(args.out)
    input_size = tuple(args.input_size) if args.input_size else None
    probed, models = [], []
    for spec, layers, weight, label in zip(args.model, args.layers, weights, names):
        model = load_model(spec, weights=weight, input_size=input_size)
        models.append(model)
        probed.append(probe_model(model, dataset, layers, args.method, store, banks_dir=_banks_dir(args), label=label, grid=tuple(args.grid),
                                  params=_method_params(args), batch_size=args.batch_size, device=args.device, progress=_progress(args),
                                  input_size=input_size or (224, 224)))
    from conceptlens.compare_output import write_comparison

    paths = write_comparison(probed, dataset, store, args.method, tuple(args.grid), out, _progress(args))
    _finish(args, models, {"results": paths["json"], "tables": paths["csv"], "heatmaps": paths["heatmaps"], "banks": _banks_dir(args),
                           "report": _report(out)}, f"open {out / 'report.html'} in a browser")
    return 0


def cmd_maps(args: argparse.Namespace) -> int:
    from conceptlens.attribution.maps import concept_maps, gradient_cav_maps
    from conceptlens.attribution.targets import target_from_spec
    from conceptlens.concepts.data.imageio import read_image
    from conceptlens.concepts.vectors.bank import ConceptBank
    from conceptlens.report.figures import overlay_concept_maps

    model = _load(args)
    bank = ConceptBank.load(args.bank, model_hash=model.hash)
    image = read_image(Path(args.image))
    if args.target:
        target = target_from_spec(args.target, categories=model.categories)
        maps = gradient_cav_maps(model, image, bank.layer, bank, target, device=args.device)
        title = f"{target.display}: gradient × concept vector at {bank.layer}"
    else:
        maps = concept_maps(model, image, bank, device=args.device)
        title = f"{bank.method} concept maps at {bank.layer}"
    path = overlay_concept_maps(image, maps, args.out, top=args.top, title=title)
    ranked = sorted(zip(maps.concepts, maps.scores.tolist()), key=lambda item: -abs(item[1]))[: args.top]
    print("  ".join(f"{name} {score:.3g}" for name, score in ranked))
    print(f"maps: {path}")
    return 0


MAX_SYNTH_SCENES = 1_000_000
SYNTH_PARTS = ("masks", "concepts.json", "invalid_masks.json", "splits.json", "images")  # images/ last: no images, no dataset


def cmd_synth(args: argparse.Namespace) -> int:
    """Write the world into a temporary folder beside ``out`` and move it into place only when complete."""
    from conceptlens.concepts.data.folder import write_folder_dataset
    from conceptlens.concepts.data.synthetic import SyntheticWorld
    from conceptlens.concepts.store.atomic import atomic_folder

    for flag, value in (("--random-sets", args.random_sets), ("--images-per-set", args.images_per_set)):
        if value is not None and not args.image_sets:
            raise ConceptLensError(f"{flag} {value}", "applies to image sets only", "add --image-sets, or leave the flag out")
    out = _synth_target(args)
    world = SyntheticWorld(n_images=args.n, seed=args.seed)
    if args.image_sets:
        return _synth_image_sets(args, world, out)
    world = world.select_concepts(args.concepts) if args.concepts else world
    with atomic_folder(out, parts=SYNTH_PARTS) as partial:
        write_folder_dataset(world, partial, seed=args.seed, progress=_progress(args))
    print(f"wrote {len(world)} scenes with {len(world.concepts)} concepts to {out}")
    return 0


def _synth_image_sets(args: argparse.Namespace, world, out: Path) -> int:
    """``synth --image-sets``: concept and random set folders, written beside ``out`` and moved into place when complete.

    With ``--overwrite`` the sets written replace folders of the same name, and every older ``random*`` folder goes.
    """
    from conceptlens.concepts.data.image_set_writer import draw_image_sets, write_image_sets
    from conceptlens.concepts.store.atomic import atomic_folder

    sets = draw_image_sets(world, args.concepts, random_sets=args.random_sets or 10, images_per_set=args.images_per_set or 40, seed=args.seed)
    stale = sorted(entry.name for entry in out.iterdir() if entry.name.startswith("random") and entry.name not in sets) if out.is_dir() else []
    with atomic_folder(out, parts=[*stale, *sets]) as partial:
        written = write_image_sets(world, sets, partial, progress=_progress(args))
    concepts = [f"{name} ({count})" for name, count in written.items() if not name.startswith("random_")]
    print(f"wrote image sets of {len(world)} scenes to {out}: {', '.join(concepts)} and {len(written) - len(concepts)} random sets")
    print(f"next: conceptlens tcav MODEL {out} --layers LAYER --target TARGET --inputs SET   (TCAV scores; see conceptlens tcav --help)")
    return 0


def _synth_target(args: argparse.Namespace) -> Path:
    """Check ``synth``'s output folder (its numbers were checked by the parser); return the folder."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConceptLensError(str(out), "exists and is not a folder", "choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ConceptLensError(str(out), "output folder is not empty", "choose a new folder, or pass --overwrite to replace its dataset")
    return out


def cmd_train_zoo(args: argparse.Namespace) -> int:
    from conceptlens.concepts.training.zoo import train_zoo

    cards = train_zoo(args.out, steps=args.steps, seed=args.seed, progress=_progress(args))
    for name, card in cards.items():
        print(f"{name}: held-out mAP@0.5 {card['evaluation']['map50']:.4f}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented config for the user's model and data; validate it before writing."""
    from conceptlens.scaffold import init_config, write_scaffold

    text = init_config(
        args.model, args.data, weights=args.weights, coco_images=args.coco_images, name=args.name, target=args.target,
        input_size=tuple(args.input_size) if args.input_size else None, n_layers=args.n_layers, config_path=args.out,
    )
    path = write_scaffold(text, args.out, overwrite=args.overwrite)
    print(f"wrote {path}: edit the layers and concepts to taste, then")
    print(f"next: conceptlens run {path} --dry-run   (check what it reads, runs and writes), then conceptlens run {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from conceptlens.config import load_config

    config = load_config(args.config)
    if args.dry_run:
        return _dry_run(config, args.config, args.out, args.banks)
    return _run_config(config, args.config, args.out, args)


def _dry_run(config, source: str, out: str | None, banks: str | None = None) -> int:
    """Print what a run would read, run as code and write; exit 2 (after the list) when a file it needs is missing."""
    from conceptlens.config import check_paths
    from conceptlens.dry_run import plan_run

    plan = plan_run(config, out, banks)
    print(f"dry run of {source} (name {config.name}): the config is valid; nothing was run")
    for line in plan.lines():
        print(line)
    check_paths(config, source)
    return 0


def _run_config(config, source: str, out: str | None, args: argparse.Namespace) -> int:
    import dataclasses

    from conceptlens.pipeline import run_pipeline

    from conceptlens.config import with_execution, without_controls

    if args.device is not None:
        config = dataclasses.replace(config, device=args.device)
    if getattr(args, "no_controls", False):
        config = without_controls(config)
    config = with_execution(config, "command line", backend=args.executor, address=args.ray_address, workers=args.workers)
    started = time.perf_counter()
    result = run_pipeline(config, out, progress=_progress(args), verbose=not args.quiet, source=str(source), banks=getattr(args, "banks", None))
    skipped = sum(step["skipped"] for step in result.steps)
    print(f"{config.name}: {len(result.steps)} steps ({skipped} up to date, skipped) in {time.perf_counter() - started:.1f} s")
    _print_run_models(config)
    print(f"results in {result.out}/")
    if result.report is not None:
        print(f"report: {result.report}")
        print(f"next: open {result.report} in a browser; after editing the config, rerun: finished steps are reused")
    return 0


def _print_run_models(config) -> None:
    """The weights and the device a run actually used, one line per model."""
    from conceptlens.concepts.environment import resolve_device
    from conceptlens.concepts.models.loading import weights_used

    device = resolve_device(config.device, culprit=f"device {config.device}").type
    for model in config.models:
        print(f"model {model.name} ({model.spec}): weights {weights_used(model.spec, model.weights)}; device {device}")


def cmd_report(args: argparse.Namespace) -> int:
    from conceptlens.report import write_report

    path = write_report(Path(args.results))
    print(f"report: {path}")
    return 0


def demo_config_path() -> Path:
    """The shipped demo config: ``conceptlens/configs/demo.yaml`` in an installed wheel, ``configs/demo.yaml`` in a source checkout."""
    package = Path(__file__).resolve().parent
    candidates = (package / "configs" / "demo.yaml", package.parent / "configs" / "demo.yaml")
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise ConceptLensError(str(candidates[0]), "the demo config is missing", "reinstall conceptlens (pip install conceptlens, or pip install -e . in a checkout)")
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    from conceptlens.config import load_config

    path = demo_config_path()
    return _run_config(load_config(path), str(path), args.out, args)


COMMANDS = {
    "init": cmd_init,
    "layers": cmd_layers,
    "embed": cmd_embed,
    "probe": cmd_probe,
    "compare": cmd_compare,
    "synth": cmd_synth,
    "tcav": cmd_tcav,
    "maps": cmd_maps,
    "train-zoo": cmd_train_zoo,
    "run": cmd_run,
    "report": cmd_report,
    "demo": cmd_demo,
}
