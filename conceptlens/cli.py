"""The ``conceptlens`` command line.

Bad input ends with a one-line error and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin by default, which slows torch several-fold when another process
# shares the cores; this must be set before torch is imported (results do not change).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from conceptlens.concepts.errors import ConceptLensError  # noqa: E402

__all__ = ["main", "build_parser"]

EXAMPLES = {
    "layers": "example: conceptlens layers torchvision:resnet18 --input-size 224 224",
    "embed": "example: conceptlens embed torchvision:resnet18 synthetic:200 --layers layer2 layer3 --reduce grid",
    "synth": "example: conceptlens synth ./world --n 500 --seed 0",
    "probe": "examples:\n  conceptlens probe zoo:synthetic_vgg_centernet synthetic:300 --layers backbone.block3 --method net2vec\n"
    "  conceptlens probe zoo:mobilenet_v2 ./image_sets --layers features.7 --method linear",
    "compare": "example: conceptlens compare synthetic:300 --model zoo:synthetic_vgg_centernet --layers backbone.block2 backbone.block3 "
    "--model zoo:synthetic_resnet_fpn --layers backbone.block2 neck.p3 --method net2vec --out ./compare",
    "tcav": "example: conceptlens tcav zoo:mobilenet_v2 ./image_sets --layers features.7 features.14 --target logit:285 --inputs cat --runs 10",
    "demo": "example: conceptlens demo --out ./conceptlens-demo   (about 2 minutes on 2 CPU cores; a second run reuses everything)",
    "maps": "examples:\n  conceptlens maps zoo:synthetic_vgg_centernet scene.png --bank conceptlens-demo/banks/vgg__backbone.block3.net2vec\n"
    "  conceptlens maps zoo:synthetic_vgg_centernet scene.png --bank conceptlens-demo/banks/vgg__backbone.block3.net2vec --target top:1",
    "run": "example: conceptlens run configs/imagenet_backbones.yaml --out ./backbones",
    "report": "example: conceptlens report ./conceptlens-demo",
    "train-zoo": "example: conceptlens train-zoo --seed 0 --out ./zoo-weights   (about 8-13 minutes on 2 CPU cores)",
}


def _common(parser: argparse.ArgumentParser, device_default: str | None = "auto") -> None:
    where = "the config's device" if device_default is None else device_default
    parser.add_argument("--device", default=device_default, help=f"auto (CUDA when present), cpu or cuda (default: {where})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _no_controls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-controls", action="store_true",
                        help="skip controls, nulls and confidence intervals (overrides the config's controls.enabled; raw numbers unchanged)")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="torchvision:<builder>, <module>:<callable>, <file.py>:<callable>, .onnx or TorchScript file")
    parser.add_argument("--weights", default="none", help="none, default (torchvision, from the local hub cache) or a state-dict path")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="classifier input size (default 224 224)")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="conceptlens", description="Concept-based interpretability of vision models.")
    commands = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

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
    embed.add_argument("--grid", nargs=2, type=int, default=[100, 100], metavar=("H", "W"), help="concept grid (default 100 100)")
    embed.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--seed", type=int, default=0, help="split seed")
    _common(embed)

    synth = commands.add_parser("synth", help="write the synthetic concept world to the folder layout", epilog=EXAMPLES["synth"], formatter_class=raw)
    synth.add_argument("out", help="output folder")
    synth.add_argument("--n", type=int, default=500, help="number of scenes")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true")
    _common(synth)

    probe = commands.add_parser("probe", help="learn concept vectors for layers (net2vec, linear CAVs, nmf)", epilog=EXAMPLES["probe"], formatter_class=raw)
    _model_arguments(probe)
    probe.add_argument("data", help="pixel methods: a concept dataset (as for embed); linear: a folder of concept sets + random_* sets")
    probe.add_argument("--layers", nargs="+", required=True)
    probe.add_argument("--method", default="net2vec", choices=_RegisteredMethods(), help="a registered concept method (default net2vec)")
    _probe_options(probe)
    _common(probe)

    compare = commands.add_parser("compare", help="layer × layer concept similarity within and across models", epilog=EXAMPLES["compare"], formatter_class=raw)
    compare.add_argument("data", help="a concept dataset with masks (as for embed)")
    compare.add_argument("--model", action="append", required=True, help="model spec; repeat for each model (each followed by --layers)")
    compare.add_argument("--layers", action="append", nargs="+", required=True, help="layers of the preceding --model, shallow to deep")
    compare.add_argument("--weights", action="append", help="weights per model (default none for each)")
    compare.add_argument("--method", default="net2vec", choices=_RegisteredMethods("pixel"), help="a pixel-level concept method (default net2vec)")
    compare.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"))
    _probe_options(compare)
    _common(compare)

    tcav = commands.add_parser("tcav", help="TCAV scores with random-CAV significance tests", epilog=EXAMPLES["tcav"], formatter_class=raw)
    _model_arguments(tcav)
    tcav.add_argument("data", help="a folder of image sets: <concept>/ folders and random_0/, random_1/, ... folders")
    tcav.add_argument("--layers", nargs="+", required=True, help="layer names (see `conceptlens layers`)")
    tcav.add_argument("--target", action="append", required=True, help="target scalar; repeat for several: " + _target_forms())
    tcav.add_argument("--inputs", required=True, help="the scored images (of the target class): a set name in DATA or a folder")
    tcav.add_argument("--concepts", nargs="+", help="concept sets to test (default: every non-random set except --inputs)")
    tcav.add_argument("--runs", type=int, help="CAVs per concept, one per random set (default: every random set)")
    tcav.add_argument("--max-inputs", type=int, help="score at most this many input images")
    tcav.add_argument("--statistic", default="sign_count", choices=["sign_count", "magnitude", "mean_sensitivity"], help="score tested (default sign_count)")
    tcav.add_argument("--correction", default="holm", choices=["holm", "bonferroni"], help="multiple-testing correction (default holm)")
    tcav.add_argument("--alpha", type=float, default=0.05)
    tcav.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for confidence intervals (0: none)")
    tcav.add_argument("--store", default="conceptlens-store", help="activation store folder (default ./conceptlens-store)")
    tcav.add_argument("--out", default="conceptlens-out", help="output folder (default ./conceptlens-out)")
    tcav.add_argument("--batch-size", type=int, default=32)
    tcav.add_argument("--seed", type=int, default=0)
    _common(tcav)

    maps = commands.add_parser("maps", help="concept maps of one image (probabilities, NCAV maps, or gradient × CAV with --target)", epilog=EXAMPLES["maps"], formatter_class=raw)
    _model_arguments(maps)
    maps.add_argument("image", help="an image file")
    maps.add_argument("--bank", required=True, help="a concept bank written by probe/run (banks/<model>__<layer>.<method>)")
    maps.add_argument("--target", help="attribute this target instead (" + _target_forms() + "): per-cell ∂target/∂A · concept vector")
    maps.add_argument("--top", type=int, default=8, help="show the N concepts with the largest maps (default 8)")
    maps.add_argument("--out", default="concept_maps.png", help="output PNG (default ./concept_maps.png)")
    _common(maps)

    train = commands.add_parser("train-zoo", help="retrain the two synthetic-world detectors from a seed", epilog=EXAMPLES["train-zoo"], formatter_class=raw)
    train.add_argument("--out", help="folder for weights and model cards (default: the installed package's weights folder)")
    train.add_argument("--steps", type=int, help="training steps per model (default: the shipped recipe's)")
    train.add_argument("--seed", type=int, default=0)
    _common(train)

    run = commands.add_parser("run", help="run every step of a YAML config (reusing the store, skipping finished steps)", epilog=EXAMPLES["run"], formatter_class=raw)
    run.add_argument("config", help="a YAML config (see configs/)")
    run.add_argument("--out", help="output folder (default: the config's out, else ./conceptlens-<name>)")
    _no_controls(run)
    _common(run, device_default=None)

    report = commands.add_parser("report", help="write report.html again from a results folder (no model runs)", epilog=EXAMPLES["report"], formatter_class=raw)
    report.add_argument("results", help="a results folder written by `conceptlens run`")
    _common(report)

    demo = commands.add_parser("demo", help="run configs/demo.yaml: the synthetic concept world and the two shipped detectors", epilog=EXAMPLES["demo"], formatter_class=raw)
    demo.add_argument("--out", default="conceptlens-demo", help="output folder (default ./conceptlens-demo)")
    _no_controls(demo)
    _common(demo, device_default=None)
    return parser


def _target_forms() -> str:
    from conceptlens.attribution.targets import SPEC_FORMS

    return SPEC_FORMS


def _probe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coco-images", help="image folder of a COCO dataset")
    parser.add_argument("--concepts", nargs="+", help="only these concepts of the dataset (default: all)")
    parser.add_argument("--store", default="conceptlens-store", help="activation store folder (default ./conceptlens-store)")
    parser.add_argument("--out", default="conceptlens-out", help="output folder for banks and results (default ./conceptlens-out)")
    parser.add_argument("--grid", nargs=2, type=int, default=[100, 100], metavar=("H", "W"), help="concept grid (default 100 100)")
    parser.add_argument("--k", type=int, default=10, help="nmf: number of NCAVs per layer (default 10)")
    parser.add_argument("--epochs", type=int, default=30, help="net2vec: maximum epochs (default 30)")
    parser.add_argument("--runs", type=int, default=None, help="linear: CAVs per concept, one per random set (default: all random sets)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)


class _RegisteredMethods:
    """``--method`` choices: the registry's method names, looked up only when needed (it imports torch)."""

    def __init__(self, level: str | None = None) -> None:
        self.level = level

    def _names(self) -> tuple[str, ...]:
        from conceptlens.probes.registry import method_names

        return method_names(self.level)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


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
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        raise
    except ConceptLensError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the environment (a full disk, a read-only or missing folder), not a bug
        if args.debug:
            raise
        print(f"error: {_os_error(error)}", file=sys.stderr)
        return 2


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


def _load(args: argparse.Namespace):
    from conceptlens.concepts.models.loading import load_model

    return load_model(args.model, weights=args.weights, input_size=tuple(args.input_size) if args.input_size else None)


def cmd_layers(args: argparse.Namespace) -> int:
    from conceptlens.concepts.models.loading import list_layers

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
        batch_size=args.batch_size, device=args.device, progress=_progress(args),
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
    from conceptlens.probes.workflow import probe_model
    from conceptlens.report.results import ProbeResults

    model = _load(args)
    out = Path(args.out)
    from conceptlens.probes.registry import get_method

    if get_method(args.method).level == "image":  # fitted on image sets, not concept masks
        return _probe_linear(args, model, out)
    dataset = _concept_data(args)
    probed = probe_model(
        model, dataset, args.layers, args.method, ActivationStore(args.store), banks_dir=out / "banks", label="model", grid=tuple(args.grid),
        params=_method_params(args), batch_size=args.batch_size, device=args.device, progress=_progress(args),
        input_size=tuple(args.input_size) if args.input_size else (224, 224),
    )
    ProbeResults(model=args.model, dataset=dataset.name, method=args.method, metrics=probed.metrics).write(out / f"probe_{args.method}.json")
    for layer, bank in probed.banks.items():
        scores = [m.get("set_iou") for m in bank.metrics.values() if isinstance(m.get("set_iou"), float)]
        best = max(bank.metrics.items(), key=lambda kv: kv[1].get("set_iou") or -1)
        summary = f"mean set IoU {np.mean(scores):.3f}, best {best[0]} {best[1].get('set_iou') or 0:.3f}" if scores else ""
        print(f"{layer:<32} {bank.n_concepts:>3} vectors × {bank.n_channels} channels  {summary}")
    print(f"banks in {out / 'banks'}, metrics in {out / f'probe_{args.method}.json'}")
    return 0


def _probe_linear(args: argparse.Namespace, model, out: Path) -> int:
    from conceptlens.concepts.data.image_sets import ImageSets
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.probes.image_cavs import fit_image_cavs, set_activations
    from conceptlens.probes.workflow import bank_path
    from conceptlens.report.results import ProbeResults

    sets = ImageSets(args.data, concepts=args.concepts)
    datasets = {name: sets.dataset(name) for name in [*sets.concepts, *sets.random_sets]}
    pooled = set_activations(model, datasets, args.layers, ActivationStore(args.store), args.batch_size, args.device, _progress(args))
    cav_sets = fit_image_cavs(pooled, sets.concepts, sets.random_sets, args.runs, args.seed, {"model_hash": model.hash})
    summary = {}
    for layer, cavs in cav_sets.items():
        cavs.save(bank_path(out / "banks", "model", layer, "cavs"))
        bank = cavs.to_bank(layer, provenance={"model_hash": model.hash})
        bank.save(bank_path(out / "banks", "model", layer, "linear"))
        summary[layer] = bank.metrics
        accuracy = ", ".join(f"{c} {m['accuracy_mean']:.2f}" for c, m in bank.metrics.items())
        print(f"{layer:<32} CAV accuracy (held-out, mean over {cavs.vectors.shape[1]} runs): {accuracy}")
    ProbeResults(model=args.model, method="linear", metrics=summary).write(out / "probe_linear.json")
    return 0


def cmd_tcav(args: argparse.Namespace) -> int:
    from conceptlens.attribution.targets import target_from_spec
    from conceptlens.attribution.tcav import tcav_scores
    from conceptlens.concepts.data.image_sets import ImageFolderDataset, ImageSets
    from conceptlens.concepts.data.imageio import list_image_files
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.probes.image_cavs import fit_image_cavs, set_activations
    from conceptlens.tcav_step import tcav_table, write_tcav

    model = _load(args)
    targets = {spec: target_from_spec(spec) for spec in args.target}
    in_data = (Path(args.data) / args.inputs).is_dir()
    folder = Path(args.data) / args.inputs if in_data else Path(args.inputs)
    if not folder.is_dir():
        raise ConceptLensError(f"--inputs {args.inputs}", f"is neither a set folder in {args.data} nor a folder", "name a set of DATA or a folder of images of the target class")
    inputs = ImageFolderDataset(list_image_files(folder, f"--inputs {folder}"), name=folder.name)
    concepts = args.concepts or [c for c in ImageSets(args.data).concepts if not (in_data and c == args.inputs)]
    sets = ImageSets(args.data, concepts=concepts)
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
    paths = write_tcav(result, Path(args.out), provenance)
    print(tcav_table(result))
    for line in result.missing_lines():
        print(line)
    print(f"results: {paths['json']}  table: {paths['csv']}")
    return 0


def _concept_data(args: argparse.Namespace):
    from conceptlens.data_spec import open_dataset

    dataset = open_dataset(args.data, coco_images=args.coco_images, seed=args.seed, progress=_progress(args))
    return dataset.select_concepts(args.concepts) if args.concepts else dataset


def cmd_compare(args: argparse.Namespace) -> int:
    from conceptlens.concepts.models.loading import load_model
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.probes.workflow import probe_model

    if len(args.model) != len(args.layers):
        raise ConceptLensError("--model/--layers", f"{len(args.model)} models but {len(args.layers)} layer lists", "follow each --model with its --layers")
    weights = args.weights or ["none"] * len(args.model)
    dataset = _concept_data(args)
    store, out = ActivationStore(args.store), Path(args.out)
    input_size = tuple(args.input_size) if args.input_size else None
    probed = []
    for index, (spec, layers, weight) in enumerate(zip(args.model, args.layers, weights)):
        model = load_model(spec, weights=weight, input_size=input_size)
        label = f"{chr(ord('A') + index)}"
        probed.append(probe_model(model, dataset, layers, args.method, store, banks_dir=out / "banks", label=label, grid=tuple(args.grid),
                                  params=_method_params(args), batch_size=args.batch_size, device=args.device, progress=_progress(args),
                                  input_size=input_size or (224, 224)))
    from conceptlens.compare_output import write_comparison

    paths = write_comparison(probed, dataset, store, args.method, tuple(args.grid), out, _progress(args))
    print(f"results: {paths['json']}  tables: {paths['csv']}  heatmaps: {paths['heatmaps']}")
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
        maps = gradient_cav_maps(model, image, bank.layer, bank, target_from_spec(args.target), device=args.device)
        title = f"{args.target}: gradient × concept vector at {bank.layer}"
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

    out = _synth_target(args)
    world = SyntheticWorld(n_images=args.n, seed=args.seed)
    with atomic_folder(out, parts=SYNTH_PARTS) as partial:
        write_folder_dataset(world, partial, seed=args.seed, progress=_progress(args))
    print(f"wrote {len(world)} scenes with {len(world.concepts)} concepts to {out}")
    return 0


def _synth_target(args: argparse.Namespace) -> Path:
    """Check ``synth``'s flags and output folder, naming the flag at fault; return the folder."""
    if not 1 <= args.n <= MAX_SYNTH_SCENES:
        raise ConceptLensError(f"--n {args.n}", f"must be between 1 and {MAX_SYNTH_SCENES} scenes", "pass e.g. --n 500")
    if args.seed < 0:
        raise ConceptLensError(f"--seed {args.seed}", "must be 0 or more", "pass e.g. --seed 0")
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


def cmd_run(args: argparse.Namespace) -> int:
    from conceptlens.config import load_config

    config = load_config(args.config)
    return _run_config(config, args.config, args.out, args)


def _run_config(config, source: str, out: str | None, args: argparse.Namespace) -> int:
    import dataclasses

    from conceptlens.pipeline import run_pipeline

    from conceptlens.config import without_controls

    if args.device is not None:
        config = dataclasses.replace(config, device=args.device)
    if getattr(args, "no_controls", False):
        config = without_controls(config)
    started = time.perf_counter()
    result = run_pipeline(config, out, progress=_progress(args), verbose=not args.quiet, source=str(source))
    skipped = sum(step["skipped"] for step in result.steps)
    print(f"{config.name}: {len(result.steps)} steps ({skipped} up to date, skipped) in {time.perf_counter() - started:.1f} s")
    print(f"results in {result.out}/")
    if result.report is not None:
        print(f"report: {result.report}")
    return 0


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
