"""The self-contained HTML concept report of a pipeline results directory.

:func:`write_report` reads what the pipeline wrote (``run.json``, ``probe_<model>_<method>.json``,
``compare_<method>/``, ``tcav.json``, ``examples/<model>.*``, ``prototypes/<model>.*``), draws every
figure itself with matplotlib (Agg, in memory), and writes ``<out>/report.html``: one file, inline
CSS, figures as ``data:image/png;base64`` URIs, no script and no external resource, so that it opens
offline and can be mailed or archived as it is. The bytes depend only on the results (no
timestamps, PNGs without a software tag), so rendering twice gives the same file.

Sections (``<section id=…>``): ``summary``, ``probe-quality``, ``segmentation``, ``ncavs``,
``similarity``, ``tcav``, ``findings``. An input that the run did not produce leaves its section
with a "not run in this configuration" note. :func:`findings` turns the numbers into sentences;
:func:`load_results` is the loader both use.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from conceptlens.concepts.store.artifacts import read_artifact
from conceptlens.concepts.store.atomic import atomic_write_bytes, atomic_write_text
from conceptlens.concepts.compare.similarity import BLIND_LAYER_IOU
from conceptlens.concepts.errors import ConceptLensError

__all__ = ["ReportError", "SECTIONS", "findings", "grouped_findings", "load_results", "render_report", "write_report"]

#: Section ids and headings, in report order.
SECTIONS = (
    ("summary", "Run summary"),
    ("probe-quality", "Probe quality"),
    ("segmentation", "Concept segmentation"),
    ("ncavs", "NCAVs (unsupervised concepts)"),
    ("similarity", "Layer similarity"),
    ("tcav", "TCAV"),
    ("findings", "Findings"),
)
#: A shallowest layer is "already well encoded" at set IoU ≥ this and ≥ 90 % of the concept's best.
WELL_ENCODED_IOU = 0.5
#: An NCAV "matches" a concept (in the findings) from this set IoU on.
NCAV_MATCH_IOU = 0.2
#: A ridge "lies near the diagonal" when the mean |d_A − d_B| of its pairs is at most this.
NEAR_DIAGONAL = 0.2
#: At most this many concepts are drawn per segmentation example (the largest ones).
MAX_EXAMPLE_CONCEPTS = 4
#: More concepts than this: the probe-quality figure is a concept × layer grid instead of lines.
MAX_PROBE_LINES = 12
#: At most this many significant TCAV hypotheses are listed one by one in the findings.
MAX_TCAV_FINDINGS = 8
#: Up to this many concepts get clearly distinct colours (see :func:`_concept_colors`).
DISTINCT_COLORS = 18

DPI = 110
METHOD_NAMES = {"net2vec": "supervised, Net2Vec", "nmf": "unsupervised, NMF"}
STATISTIC_NAMES = {"sign_count": "TCAV", "magnitude": "TCAV magnitude", "mean_sensitivity": "mean sensitivity"}
NOT_RUN = "Not run in this configuration"
_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
          "svg.hashsalt": "conceptlens", "axes.spines.top": False, "axes.spines.right": False}


class ReportError(ConceptLensError):
    """A results directory (or one of its files) cannot be read into a report."""


# ---------------------------------------------------------------------------------------------
# public API


def write_report(out: str | Path, *, title: str | None = None, figures: str | Path | None = None) -> Path:
    """Render the HTML report of the results directory ``out`` into ``out/report.html``.

    Parameters
    ----------
    out : path
        A results directory written by the pipeline.
    title : str, optional
        Page title; default "Concept report — <run name>".
    figures : path, optional
        Also save every figure drawn for the report as a PNG file in this folder (for inspection).

    Returns
    -------
    Path
        The report file (written atomically).
    """
    results = load_results(out)
    text = render_report(results, title=title, figures=figures)
    path = Path(out) / "report.html"
    atomic_write_text(path, text)
    return path


def load_results(out: str | Path) -> dict[str, Any]:
    """Read a results directory into one dict (JSON data as loaded, artifact tensors as numpy).

    Keys: ``root`` (Path), ``run`` (run.json or None), ``models`` (names), ``concepts`` (names),
    ``probes`` ({model: {method: probe JSON}}), ``compare`` ({method: compare.json}),
    ``heatmaps`` ({method: {file name: Path}}), ``tcav`` (tcav.json or None), ``examples`` and
    ``prototypes`` ({model: {"meta": JSON, "tensors": {name: ndarray}}}).
    """
    root = Path(out)
    if not root.is_dir():
        raise ReportError(str(root), "is not a directory", "give the results folder written by the pipeline")
    run = _read_json(root / "run.json") if (root / "run.json").is_file() else None
    models = [str(m["name"]) for m in (run or {}).get("models", []) if isinstance(m, dict) and "name" in m]
    probes: dict[str, dict[str, Any]] = {}
    for method in ("net2vec", "nmf"):
        suffix = f"_{method}.json"
        for path in sorted(root.glob(f"probe_*{suffix}")):
            model = path.name[len("probe_"):-len(suffix)]
            if model not in models:
                models.append(model)
            probes.setdefault(model, {})[method] = _read_json(path)
    compare: dict[str, Any] = {}
    heatmaps: dict[str, dict[str, Path]] = {}
    folders = sorted(root.glob("compare_*/compare.json"), key=lambda p: (_method_rank(p.parent.name[len("compare_"):]), p.parent.name))
    for path in folders:
        method = path.parent.name[len("compare_"):]
        compare[method] = _read_json(path)
        heatmaps[method] = {f.name: f for f in sorted((path.parent / "heatmaps").glob("*.png"))}
    tcav = _read_json(root / "tcav.json") if (root / "tcav.json").is_file() else None
    examples = _artifacts(root / "examples", models, "report-examples")
    prototypes = _artifacts(root / "prototypes", models, "report-prototypes")
    if run is None and not probes and not compare and tcav is None:
        raise ReportError(str(root), "holds no pipeline results (run.json, probe_*.json, compare_*/, tcav.json)", "run the pipeline into this folder first")
    return {
        "root": root, "run": run, "models": models, "concepts": _concepts(run, probes), "probes": probes,
        "compare": compare, "heatmaps": heatmaps, "tcav": tcav, "examples": examples, "prototypes": prototypes,
    }


def findings(results: dict[str, Any]) -> list[str]:
    """Sentences computed from the numbers of :func:`load_results` (only what the data supports).

    Covers: where each concept is best encoded (relative depth, layer, set IoU) per model; concepts
    already well encoded at a model's shallowest layer, or encoded by no layer; whether each
    cross-model ridge lies near the diagonal; whether adjacent layers are the most similar within
    each model; significant TCAV hypotheses; NCAVs that match known concepts.

    Every sentence starts with a plain word (never a model, layer or concept name), so that the
    report can capitalise its first letter without changing an identifier.
    """
    return [sentence for _, sentences in grouped_findings(results) for sentence in sentences]


def grouped_findings(results: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """:func:`findings` under their topics: (heading, sentences) for the non-empty ones of
    "Probes", "Similarity", "TCAV" and "NCAVs", in that order."""
    groups = [
        ("Probes", _probe_findings(results)),
        ("Similarity", _ridge_findings(results) + _adjacency_findings(results)),
        ("TCAV", _tcav_findings(results.get("tcav"))),
        ("NCAVs", _ncav_findings(results)),
    ]
    return [(heading, sentences) for heading, sentences in groups if sentences]


def render_report(results: dict[str, Any], *, title: str | None = None, figures: str | Path | None = None) -> str:
    """The report's HTML text for loaded results (see :func:`write_report`)."""
    run = results.get("run") or {}
    name = run.get("name") or Path(results.get("root", "results")).name
    title = title or f"Concept report — {name}"
    sink = _FigureSink(Path(figures) if figures is not None else None)
    colors = _palette(results)
    with matplotlib.rc_context(_STYLE):
        bodies = {
            "summary": _summary_section(results),
            "probe-quality": _probe_section(results, colors, sink),
            "segmentation": _segmentation_section(results, colors, sink),
            "ncavs": _ncav_section(results, sink),
            "similarity": _similarity_section(results, sink),
            "tcav": _tcav_section(results, colors, sink),
            "findings": _findings_section(results),
        }
    subtitle = [f"run <b>{_e(name)}</b>"]
    if run.get("started"):
        subtitle.append(f"started {_e(run['started'])}")
    if run.get("config_hash"):
        subtitle.append(f"config <code>{_e(str(run['config_hash'])[:12])}</code>")
    toc = "\n".join(f'<li><a href="#{sid}">{_e(heading)}</a></li>' for sid, heading in SECTIONS)
    sections = "\n".join(f'<section id="{sid}">\n<h2>{_e(heading)}</h2>\n{bodies[sid]}\n</section>' for sid, heading in SECTIONS)
    version = (run.get("versions") or {}).get("conceptlens")
    footer = f"Generated by conceptlens{' ' + _e(version) if version else ''} from the results folder <code>{_e(Path(results.get('root', '.')).name)}</code>."
    return _PAGE.format(title=_e(title), style=_CSS, heading=_e(title), subtitle=" · ".join(subtitle), toc=toc, sections=sections, footer=footer)


# ---------------------------------------------------------------------------------------------
# loading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as problem:
        raise ReportError(str(path), f"cannot read ({problem.strerror})", "check the results folder") from problem
    except ValueError as problem:
        raise ReportError(str(path), f"not valid JSON ({problem})", "run the step that writes it again") from problem


def _artifacts(folder: Path, models: Sequence[str], kind: str) -> dict[str, dict[str, Any]]:
    found = {}
    for model in models:
        if (folder / f"{model}.json").is_file():
            meta, tensors = read_artifact(folder / model, kind=kind, format_version=1, required=(), error=ReportError)
            found[model] = {"meta": meta, "tensors": {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in tensors.items()}}
    return found


def _method_rank(method: str) -> int:
    return {"net2vec": 0, "nmf": 1}.get(method, 2)


def _concepts(run: dict[str, Any] | None, probes: dict[str, dict[str, Any]]) -> list[str]:
    concepts = [str(c) for c in ((run or {}).get("data") or {}).get("concepts") or []]
    for by_method in probes.values():
        for by_concept in (by_method.get("net2vec") or {}).get("metrics", {}).values():
            concepts += [c for c in by_concept if c not in concepts]
    return concepts


# ---------------------------------------------------------------------------------------------
# numbers and text


def _num(value: Any) -> float:
    """A float, NaN for None / non-numbers."""
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _f2(value: Any) -> str:
    value = _num(value)
    return "—" if math.isnan(value) else f"{value:.2f}"


def _f3g(value: Any) -> str:
    value = _num(value)
    return "—" if math.isnan(value) else f"{value:.3g}"


def _p(value: Any) -> str:
    value = _num(value)
    if math.isnan(value):
        return "—"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _p_phrase(name: str, value: Any) -> str:
    text = _p(value)
    return f"{name} {text}" if text.startswith("<") else f"{name} = {text}"


def _duration(seconds: Any) -> str:
    seconds = _num(seconds)
    if math.isnan(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


# ---------------------------------------------------------------------------------------------
# probe data helpers


def _probe_curve(probe: dict[str, Any], concept: str) -> tuple[list[str], list[float], list[float]]:
    """Layers in depth order, their depths and the concept's test set IoU (NaN where missing)."""
    layers, depths = list(probe.get("layers") or probe.get("metrics", {}).keys()), list(probe.get("depths") or [])
    if len(depths) != len(layers):
        depths = [i / max(1, len(layers) - 1) for i in range(len(layers))]
    order = sorted(range(len(layers)), key=lambda i: (_num(depths[i]), i))
    metrics = probe.get("metrics", {})
    ious = [_num((metrics.get(layers[i], {}).get(concept) or {}).get("set_iou")) for i in order]
    return [layers[i] for i in order], [_num(depths[i]) for i in order], ious


def _best_layer(probe: dict[str, Any], concept: str) -> dict[str, Any] | None:
    best = (probe.get("best_layer") or {}).get(concept)
    if best and best.get("layer") is not None:
        return {"layer": best["layer"], "depth": _num(best.get("depth")), "set_iou": _num(best.get("set_iou"))}
    layers, depths, ious = _probe_curve(probe, concept)
    if not any(math.isfinite(v) for v in ious):
        return None
    i = int(np.nanargmax(ious))
    return {"layer": layers[i], "depth": depths[i], "set_iou": ious[i]}


def _net2vec(results: dict[str, Any], model: str) -> dict[str, Any] | None:
    return (results.get("probes", {}).get(model) or {}).get("net2vec")


def _ridge_pairs(block: dict[str, Any], depth_of: dict[str, float]) -> list[tuple[int, int, float, float, float]]:
    """Ridge pairs as (row, column, depth_a, depth_b, score); accepts dicts or [i, j] lists."""
    pairs = []
    for pair in (block.get("ridge") or {}).get("pairs", []):
        if isinstance(pair, dict):
            i, j = int(pair["a"]), int(pair["b"])
            da, db, score = _num(pair.get("depth_a")), _num(pair.get("depth_b")), _num(pair.get("score"))
        else:
            i, j = int(pair[0]), int(pair[1])
            da, db, score = math.nan, math.nan, math.nan
        if math.isnan(da):
            da = depth_of.get(f"{block['a']}:{block['rows'][i]}", math.nan)
        if math.isnan(db):
            db = depth_of.get(f"{block['b']}:{block['columns'][j]}", math.nan)
        if math.isnan(score):
            score = _num(block["similarity"][i][j])
        pairs.append((i, j, da, db, score))
    return pairs


def _depth_of(compare: dict[str, Any]) -> dict[str, float]:
    return {layer["label"]: _num(layer.get("depth")) for layer in compare.get("layers", [])}


def _depth_ranks(block: dict[str, Any], depth_of: dict[str, float], side: str = "rows") -> list[int]:
    """Rank of each row (or column) of a block by relative depth."""
    model = block["a"] if side == "rows" else block["b"]
    names = block[side]
    depths = [depth_of.get(f"{model}:{name}", float(i)) for i, name in enumerate(names)]
    order = sorted(range(len(names)), key=lambda i: (depths[i], i))
    ranks = [0] * len(names)
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks


# ---------------------------------------------------------------------------------------------
# findings


def _probe_findings(results: dict[str, Any]) -> list[str]:
    out = []
    models = [m for m in results.get("models", []) if _net2vec(results, m)]
    for concept in results.get("concepts", []):
        encoded, blind = [], []
        for model in models:
            best = _best_layer(_net2vec(results, model), concept)
            if best is None or math.isnan(best["set_iou"]):
                continue
            (blind if best["set_iou"] < BLIND_LAYER_IOU else encoded).append((model, best))
        if encoded:
            parts = [f"{b['depth']:.2f} in {m} ({b['layer']}, set IoU {b['set_iou']:.2f})" for m, b in encoded]
            out.append(f"the concept {concept} is best encoded at relative depth {_join(parts)}")
        for model, best in blind:
            out.append(f"no probed layer of {model} encodes {concept} (best set IoU {best['set_iou']:.2f}, below {BLIND_LAYER_IOU:.2f})")
    for model in models:
        probe = _net2vec(results, model)
        for concept in results.get("concepts", []):
            layers, _, ious = _probe_curve(probe, concept)
            best = _best_layer(probe, concept)
            if not layers or best is None or math.isnan(ious[0]) or len(layers) < 2:
                continue
            if ious[0] >= WELL_ENCODED_IOU and ious[0] >= 0.9 * best["set_iou"]:
                out.append(f"the shallowest layer of {model} already encodes {concept} well ({layers[0]}, set IoU {ious[0]:.2f})")
    return out


def _ridge_findings(results: dict[str, Any]) -> list[str]:
    out = []
    for method, compare in results.get("compare", {}).items():
        depth_of = _depth_of(compare)
        for block in compare.get("blocks", []):
            if block["a"] == block["b"]:
                continue
            pairs = [p for p in _ridge_pairs(block, depth_of) if math.isfinite(p[2]) and math.isfinite(p[3])]
            if not pairs:
                continue
            gap = float(np.mean([abs(p[2] - p[3]) for p in pairs]))
            r = _num((block.get("ridge") or {}).get("depth_correlation"))
            extra = f", depth correlation r = {r:.2f}" if math.isfinite(r) else ""
            where = f"the cross-model ridge of {block['a']} vs {block['b']} ({METHOD_NAMES.get(method, method)})"
            if gap <= NEAR_DIAGONAL:
                out.append(f"{where} lies near the diagonal (mean |d_A − d_B| = {gap:.2f}{extra}): the best-matching layers sit at similar relative depths")
            else:
                out.append(f"{where} lies off the diagonal (mean |d_A − d_B| = {gap:.2f}{extra}): the best-matching layers sit at different relative depths")
    return out


def _adjacency_findings(results: dict[str, Any]) -> list[str]:
    out = []
    for method, compare in results.get("compare", {}).items():
        depth_of = _depth_of(compare)
        for block in compare.get("blocks", []):
            n = len(block.get("rows", []))
            if block["a"] != block["b"] or n < 3:
                continue
            ranks = _depth_ranks(block, depth_of)
            pairs = _ridge_pairs(block, depth_of)
            if not pairs:
                continue
            adjacent = sum(abs(ranks[i] - ranks[j]) == 1 for i, j, *_ in pairs)
            matrix = np.array([[_num(v) for v in row] for row in block["similarity"]])
            near = [matrix[i, j] for i in range(n) for j in range(n) if abs(ranks[i] - ranks[j]) == 1]
            far = [matrix[i, j] for i in range(n) for j in range(n) if abs(ranks[i] - ranks[j]) > 1]
            means = ""
            if np.isfinite(near).any() and np.isfinite(far).any():
                means = f"; mean similarity {np.nanmean(near):.2f} between neighbours vs {np.nanmean(far):.2f} otherwise"
            name = METHOD_NAMES.get(method, method)
            if adjacent == len(pairs):
                out.append(f"within {block['a']}, adjacent layers are the most similar ({name}: every layer's best match is a neighbouring layer{means})")
            else:
                out.append(f"within {block['a']}, the most similar other layer is a neighbouring one for {adjacent} of {len(pairs)} layers ({name}{means})")
    return out


def _tcav_findings(tcav: dict[str, Any] | None) -> list[str]:
    if not tcav or not tcav.get("records"):
        return []
    records = tcav["records"]
    correction = tcav.get("correction", "holm")
    alpha = _num(tcav.get("alpha", 0.05))
    statistic = tcav.get("statistic", "sign_count")
    significant = [r for r in records if r.get("significant")]
    out = [f"{len(significant)} of {len(records)} TCAV hypotheses are significant at α = {alpha:g} after {correction} correction"]
    value = _f3g if statistic == "mean_sensitivity" else _f2
    for r in significant[:MAX_TCAV_FINDINGS]:
        p = r.get(f"p_{correction}", r.get("p"))
        direction = "raises" if _num(r.get("mean")) > _num(r.get("null_mean")) else "lowers"
        out.append(f"for target {r['target']}, {r['concept']} at {r['layer']} is significant and {direction} the target "
                   f"({STATISTIC_NAMES.get(statistic, statistic)} {value(r.get('mean'))} vs null {value(r.get('null_mean'))}, {_p_phrase(f'p_{correction}', p)})")
    if len(significant) > MAX_TCAV_FINDINGS:
        out.append(f"… and {len(significant) - MAX_TCAV_FINDINGS} more significant TCAV hypotheses (see the TCAV table)")
    return out


def _ncav_findings(results: dict[str, Any]) -> list[str]:
    out = []
    for model in results.get("models", []):
        for layer, ncavs in _ncav_labels(results, model).items():
            best: dict[str, float] = {}
            for ncav in ncavs:
                concept, iou = ncav.get("label"), _num(ncav.get("set_iou"))
                if concept is not None and iou >= NCAV_MATCH_IOU:
                    best[concept] = max(best.get(concept, 0.0), iou)
            if not best:
                continue
            matches = [f"{c} (IoU {v:.2f})" for c, v in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))]
            noun = "an NCAV" if len(matches) == 1 else "NCAVs"
            out.append(f"in {model}, {layer} has {noun} matching {_join(matches)}")
    return out


def _ncav_labels(results: dict[str, Any], model: str) -> dict[str, list[dict[str, Any]]]:
    """Per layer, the NCAVs with their matched concept and set IoU (nmf probe, else prototypes)."""
    probe = (results.get("probes", {}).get(model) or {}).get("nmf")
    if probe:
        return {layer: [{"name": name, "label": m.get("matched_concept"), "set_iou": m.get("set_iou")} for name, m in by_ncav.items()]
                for layer, by_ncav in probe.get("metrics", {}).items()}
    meta = (results.get("prototypes", {}).get(model) or {}).get("meta") or {}
    return {layer: list(ncavs) for layer, ncavs in (meta.get("ncavs") or {}).items()}


# ---------------------------------------------------------------------------------------------
# figures


class _FigureSink:
    """Turns figures into PNG bytes (deterministic), optionally also saving them to a folder."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.count = 0

    def png(self, figure: Figure, name: str) -> bytes:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.12, facecolor="white", metadata={"Software": None})
        data = buffer.getvalue()
        if self.folder is not None:
            self.count += 1
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
            atomic_write_bytes(self.folder / f"{self.count:02d}_{safe}.png", data)
        return data


def _img(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{_e(alt)}">'


def _figure(data: bytes, alt: str, caption: str = "") -> str:
    caption_html = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure>{_img(data, alt)}{caption_html}</figure>"


def _palette(results: dict[str, Any]) -> dict[str, tuple[float, ...]]:
    names = list(results.get("concepts", []))
    for record in (results.get("tcav") or {}).get("records", []):
        if record.get("concept") not in names:
            names.append(record.get("concept"))
    table = _concept_colors()
    return {name: table[i] if i < len(table) else matplotlib.colormaps["hsv"]((i * 0.618034) % 1.0) for i, name in enumerate(names)}


def _concept_colors() -> list[tuple[float, ...]]:
    """Concept colours in order: tab10's hues first, then tab20's light variants, then tab20b / tab20c.

    Greys are left out (the segmentation overlays are drawn on a grey image), so the first
    :data:`DISTINCT_COLORS` concepts get clearly different colours, neighbours in the list included.
    """
    tab10, tab20 = matplotlib.colormaps["tab10"], matplotlib.colormaps["tab20"]
    table = [tab10(i) for i in range(10) if i != 7]
    table += [tab20(2 * i + 1) for i in range(10) if i != 7]
    table += [matplotlib.colormaps["tab20b"](i) for i in range(20)]
    table += [matplotlib.colormaps["tab20c"](i) for i in range(16)]
    return table


def _color(colors: dict[str, Any], concept: str) -> Any:
    return colors.get(concept, (0.45, 0.45, 0.45, 1.0))


def _probe_figure(probe: dict[str, Any], model: str, concepts: Sequence[str], colors: dict[str, Any]) -> Figure | None:
    curves = {c: _probe_curve(probe, c) for c in concepts}
    curves = {c: v for c, v in curves.items() if any(math.isfinite(x) for x in v[2])}
    if not curves:
        return None
    layers, depths, _ = next(iter(curves.values()))
    if len(curves) > MAX_PROBE_LINES:
        return _probe_heatmap(curves, model, layers, depths)
    figure = Figure(figsize=(max(5.0, 1.2 + 1.1 * len(layers)), 3.4))
    axes = figure.add_subplot()
    for concept, (_, x, y) in curves.items():
        axes.plot(x, y, marker="o", markersize=4, linewidth=1.6, color=_color(colors, concept), label=concept)
        i = int(np.nanargmax(y))
        axes.plot([x[i]], [y[i]], marker="*", markersize=13, color=_color(colors, concept), markeredgecolor="black", markeredgewidth=0.7, linestyle="none", zorder=4)
    axes.set_xticks(depths, [f"{name}\n{d:.2f}" for name, d in zip(layers, depths)], rotation=30, ha="right", rotation_mode="anchor")
    axes.set_xlabel("layer (relative depth)")
    axes.set_ylabel("test set IoU")
    axes.set_ylim(0, 1.02)
    span = (max(depths) - min(depths)) or 1.0
    axes.set_xlim(min(depths) - 0.05 * span, max(depths) + 0.05 * span)
    axes.grid(axis="y", color="#e4e4e4", linewidth=0.7)
    handles, labels = axes.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="*", markersize=11, color="#888", markeredgecolor="black", linestyle="none"))
    labels.append("best layer")
    axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title="concept")
    axes.set_title(f"{model}: Net2Vec probe quality per layer")
    return figure


def _probe_heatmap(curves: dict[str, tuple[list[str], list[float], list[float]]], model: str, layers: Sequence[str], depths: Sequence[float]) -> Figure:
    """Many concepts: a concept × layer grid of set IoU instead of one line per concept."""
    concepts = list(curves)
    values = np.array([curves[c][2] for c in concepts], dtype=float)
    # constrained layout makes room for the rotated layer names below and the legend above
    figure = Figure(figsize=(max(4.8, 2.8 + 0.9 * len(layers)), 2.3 + 0.22 * len(concepts)), layout="constrained")
    axes = figure.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    best = [int(np.nanargmax(row)) if np.isfinite(row).any() else -1 for row in values]
    rows = [i for i, j in enumerate(best) if j >= 0]
    axes.scatter([best[i] for i in rows], rows, marker="*", s=60, color="white", edgecolors="black", linewidths=0.5, label="best layer")
    axes.set_xticks(range(len(layers)), [f"{name}\n{d:.2f}" for name, d in zip(layers, depths)], rotation=30, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(len(concepts)), concepts, fontsize=8)
    axes.set_xlabel("layer (relative depth)")
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.colorbar(image, ax=axes, fraction=0.05, pad=0.03, label="test set IoU")
    axes.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False, fontsize=8)
    axes.set_title(f"{model}: Net2Vec probe quality per layer", pad=18)
    return figure


def _overlay(axes: Any, image: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[Any], alpha: float, grey: bool = False) -> None:
    """Filled masks (largest first, so small ones stay on top) with a solid outline each.

    ``grey`` shows the image as lightened greyscale, so that the mask colours stand out.
    """
    height, width = image.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    if grey:
        luminance = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        axes.imshow(90 + 0.6 * luminance, cmap="gray", vmin=0, vmax=255, extent=extent, interpolation="nearest")
    else:
        axes.imshow(image, extent=extent, interpolation="nearest")
    for mask, color in sorted(zip(masks, colors), key=lambda mc: -float(mc[0].sum())):
        layer = np.zeros((*mask.shape, 4))
        layer[mask] = (*color[:3], alpha)
        axes.imshow(layer, extent=extent, interpolation="nearest")
        if mask.any() and not mask.all():
            axes.contour(np.linspace(0, width - 1, mask.shape[1]), np.linspace(0, height - 1, mask.shape[0]), mask.astype(float), levels=[0.5], colors=[color], linewidths=1.3)
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_xticks([])
    axes.set_yticks([])


def _segmentation_figure(example: dict[str, Any], model: str, colors: dict[str, Any]) -> Figure | None:
    meta, tensors = example["meta"], example["tensors"]
    concepts = list(meta.get("concepts", []))
    rows = [i for i in range(int(meta.get("n_examples", len(meta.get("ids", []))))) if f"image_{i}" in tensors]
    if not rows:
        return None
    first = tensors[f"image_{rows[0]}"]
    aspect = first.shape[0] / max(1, first.shape[1])
    # laid out in inches, so the margins do not grow with the number of rows
    panel, gap, legend = 2.6, 0.12, 2.3  # panel width, gap between panels, legend column
    suptitle, title, row_gap = 0.4, 0.3, 0.12  # figure title, panel titles, space between rows
    panel_height = panel * min(aspect, 1.5)
    width = 3 * panel + 2 * gap + legend
    height = suptitle + len(rows) * (title + panel_height) + (len(rows) - 1) * row_gap + 0.05
    figure = Figure(figsize=(width, height))
    grid = figure.add_gridspec(len(rows), 3, left=0.0, right=(3 * panel + 2 * gap) / width, top=1 - (suptitle + title) / height,
                               bottom=0.05 / height, wspace=gap / panel, hspace=(title + row_gap) / panel_height)
    ids = meta.get("ids", [])
    for row, i in enumerate(rows):
        image = np.asarray(tensors[f"image_{i}"], dtype=np.uint8)
        truth = np.asarray(tensors.get(f"truth_{i}", np.zeros((len(concepts), *image.shape[:2])))) > 0
        pred = np.asarray(tensors.get(f"pred_{i}", np.zeros(truth.shape, dtype=np.float32)), dtype=np.float32)
        areas = truth.reshape(truth.shape[0], -1).sum(1)
        shown = [k for k in np.argsort(-areas, kind="stable") if areas[k] > 0][:MAX_EXAMPLE_CONCEPTS]
        if len(colors) <= DISTINCT_COLORS:
            shown_colors = [_color(colors, concepts[k]) for k in shown]
        else:  # too many concepts for distinct global colours: distinct colours within the image
            shown_colors = [matplotlib.colormaps["tab10"](j) for j in range(len(shown))]
        panels = [figure.add_subplot(grid[row, c]) for c in range(3)]
        _overlay(panels[0], image, [], [], 0.0)
        _overlay(panels[1], image, [truth[k] for k in shown], shown_colors, 0.55, grey=True)
        _overlay(panels[2], image, [pred[k] > 0.5 for k in shown], shown_colors, 0.55, grey=True)
        label = ids[i] if i < len(ids) else f"example {i}"
        for axes, text in zip(panels, (f"image · {label}", "ground truth", "predicted (p > 0.5)")):
            axes.set_title(text, fontsize=9)
        handles = []
        for k, color in zip(shown, shown_colors):
            union = np.logical_or(truth[k], pred[k] > 0.5).sum()
            iou = np.logical_and(truth[k], pred[k] > 0.5).sum() / union if union else math.nan
            layer = (meta.get("best_layers") or {}).get(concepts[k], "")
            handles.append(Patch(facecolor=color, edgecolor=color, label=f"{concepts[k]}  IoU {_f2(iou)}\n  at {layer}" if layer else f"{concepts[k]}  IoU {_f2(iou)}"))
        if handles:
            panels[2].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.03, 1.0), frameon=False, fontsize=8, handlelength=1.2, labelspacing=0.7)
        else:
            panels[2].text(1.05, 0.5, "no concept\nin this image", transform=panels[2].transAxes, va="center", fontsize=8, color="#666")
    figure.suptitle(f"{model}: concept segmentation at each concept's best layer", y=1 - 0.06 / height, va="top", fontsize=10)
    return figure


def _ncav_figure(patches: np.ndarray, ncavs: Sequence[dict[str, Any]], model: str, layer: str) -> Figure:
    k, p = patches.shape[0], patches.shape[1]
    cell, label_width, title_height = 0.85, 2.4, 0.45
    width, height = label_width + p * cell, title_height + k * cell
    figure = Figure(figsize=(width, height))
    grid = figure.add_gridspec(k, p, left=label_width / width, right=1.0, bottom=0.0, top=1 - title_height / height, wspace=0.08, hspace=0.08)
    for row in range(k):
        info = ncavs[row] if row < len(ncavs) else {}
        name = info.get("name", f"ncav_{row}")
        label = f"{name} → {info['label']} (IoU {_f2(info.get('set_iou'))})" if info.get("label") else f"{name} (no match)"
        for column in range(p):
            axes = figure.add_subplot(grid[row, column])
            axes.imshow(np.asarray(patches[row, column], dtype=np.uint8), interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_visible(True)
                spine.set_color("#bbbbbb")
            if column == 0:
                axes.text(-0.12, 0.5, label, transform=axes.transAxes, ha="right", va="center", fontsize=9)
    figure.suptitle(f"{model} · {layer}: top {p} patches per NCAV", fontsize=10, y=1 - 0.12 / height, va="top")
    return figure


def _flow_figure(results: dict[str, Any]) -> Figure | None:
    models = [m for m in results.get("models", []) if _flow_series(results, m)]
    if not models:
        return None
    widths = [max(2.0, 0.9 * max(len(next(iter(_flow_series(results, m).values()))[0]), 2)) for m in models]
    figure = Figure(figsize=(sum(widths) + 2.2, 3.2))
    grid = figure.add_gridspec(1, len(models), width_ratios=widths, wspace=0.25)
    styles = {"net2vec": ("#1f77b4", "-", "o"), "nmf": ("#d62728", "-", "s"), "cka": ("#7f7f7f", "--", "^")}
    for index, model in enumerate(models):
        axes = figure.add_subplot(grid[0, index], sharey=figure.axes[0] if index else None)
        series = _flow_series(results, model)
        for key, (labels, values) in series.items():
            color, style, marker = styles.get(key, ("#2ca02c", "-", "D"))
            name = "linear CKA (pooled)" if key == "cka" else METHOD_NAMES.get(key, key)
            axes.plot(range(len(values)), values, color=color, linestyle=style, marker=marker, markersize=5, linewidth=1.6, label=name)
        labels = next(iter(series.values()))[0]
        axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", rotation_mode="anchor", fontsize=7.5)
        axes.set_xlim(-0.4, len(labels) - 0.6)
        axes.set_ylim(0, 1.03)
        axes.grid(axis="y", color="#e4e4e4", linewidth=0.7)
        axes.set_title(model)
        if index == 0:
            axes.set_ylabel("similarity to the next layer")
        else:
            axes.tick_params(labelleft=False)
    figure.axes[-1].legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), frameon=False)
    return figure


def _flow_series(results: dict[str, Any], model: str) -> dict[str, tuple[list[str], list[float]]]:
    """Per method (and CKA), the similarity of each layer to the next deeper one within ``model``."""
    series: dict[str, tuple[list[str], list[float]]] = {}
    for method, compare in results.get("compare", {}).items():
        depth_of = _depth_of(compare)
        for block in compare.get("blocks", []):
            if block["a"] != model or block["b"] != model or len(block.get("rows", [])) < 2:
                continue
            ranks = _depth_ranks(block, depth_of)
            order = sorted(range(len(ranks)), key=lambda i: ranks[i])
            labels = [f"{block['rows'][i]} → {block['rows'][j]}" for i, j in zip(order, order[1:])]
            series[method] = (labels, [_num(block["similarity"][i][j]) for i, j in zip(order, order[1:])])
            if "cka" not in series and block.get("cka_pooled"):
                series["cka"] = (labels, [_num(block["cka_pooled"][i][j]) for i, j in zip(order, order[1:])])
    if "cka" in series:
        series["cka"] = series.pop("cka")
    return series


def _tcav_figure(records: Sequence[dict[str, Any]], target: str, statistic: str, colors: dict[str, Any], test: str = "") -> Figure:
    layers = list(dict.fromkeys(r["layer"] for r in records))
    rows: list[tuple[str, dict[str, Any] | None]] = []
    for layer in layers:
        rows.append((layer, None))
        rows += [(r["concept"], r) for r in records if r["layer"] == layer]
    bounded = statistic in ("sign_count", "magnitude")
    figure = Figure(figsize=(6.0, 0.8 + 0.3 * len(rows)))
    axes = figure.add_subplot()
    ys = np.arange(len(rows))[::-1]
    top = 0.0
    for y, (label, record) in zip(ys, rows):
        if record is None:
            continue
        mean, null = _num(record.get("mean")), _num(record.get("null_mean"))
        low, high = _num(record.get("ci_low")), _num(record.get("ci_high"))
        axes.barh(y, mean, height=0.7, color=_color(colors, record["concept"]), alpha=0.8)
        if math.isfinite(low) and math.isfinite(high):
            axes.errorbar(mean, y, xerr=[[max(0.0, mean - low)], [max(0.0, high - mean)]], fmt="none", ecolor="#222", elinewidth=1.1, capsize=3)
        if math.isfinite(null):
            axes.vlines(null, y - 0.42, y + 0.42, colors="black", linewidth=2.2)
        edge = np.nanmax([mean, high, null, 0.0])
        top = max(top, edge)
        if record.get("significant"):
            axes.text(edge + (0.015 if bounded else 0.02 * max(abs(edge), 1e-12)), y, "*", va="center", ha="left", fontsize=14, fontweight="bold")
    axes.set_yticks(ys, [label for label, _ in rows])
    for tick, (_, record) in zip(axes.get_yticklabels(), rows):
        if record is None:
            tick.set_fontweight("bold")
    if bounded:
        axes.set_xlim(0, 1.08)
    axes.axvline(0.5 if statistic == "sign_count" else 0.0, color="#cccccc", linewidth=0.8, zorder=0)
    axes.set_ylim(-0.6, len(rows) - 0.4)
    axes.set_xlabel(f"{STATISTIC_NAMES.get(statistic, statistic)} score (mean over runs)")
    axes.grid(axis="x", color="#eeeeee", linewidth=0.7)
    axes.set_axisbelow(True)
    handles = [
        Line2D([], [], color="black", marker="|", markersize=12, markeredgewidth=2.2, linestyle="none", label="null mean (random CAVs)"),
        Line2D([], [], color="#222", marker="|", markersize=6, linewidth=1.1, label="bootstrap CI"),
        Line2D([], [], color="none", marker="$*$", markersize=9, markerfacecolor="black", markeredgecolor="black", label=f"significant{test}"),
    ]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    axes.set_title(f"target {target}")
    return figure


# ---------------------------------------------------------------------------------------------
# sections


def _missing(what: str) -> str:
    return f'<p class="missing">{NOT_RUN} ({_e(what)}).</p>'


def _caption(text: str) -> str:
    return f'<p class="caption">{text}</p>'


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (), row_class: Callable[[int], str] | None = None,
           head_html: str | None = None) -> str:
    head = head_html or "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"
    body = []
    for index, row in enumerate(rows):
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        css = row_class(index) if row_class else ""
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return f'<div class="table-wrap"><table>\n<thead>{head}</thead>\n<tbody>\n' + "\n".join(body) + "\n</tbody></table></div>"


def _key_values(title: str, pairs: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<div class="kv"><h3>{_e(title)}</h3><table>{rows}</table></div>'


def _summary_section(results: dict[str, Any]) -> str:
    run = results.get("run")
    if not run:
        return _missing("no run.json in the results folder; the sections below use the files that are there")
    data = run.get("data") or {}
    splits = data.get("splits") or {}
    run_pairs = [("name", _e(run.get("name", "—"))), ("started", _e(run.get("started", "—"))), ("seed", _e(run.get("seed", "—"))),
                 ("device", _e(run.get("device", "—"))), ("config hash", f"<code>{_e(run.get('config_hash', '—'))}</code>"),
                 ("total time", _e(_duration(run.get("total_seconds"))))]
    data_pairs = [("spec", f"<code>{_e(data.get('spec', '—'))}</code>"), ("name", _e(data.get("name", "—"))), ("images", _e(data.get("n_images", "—"))),
                  ("splits", _e(" / ".join(f"{k} {v}" for k, v in splits.items()) or "—")),
                  ("concepts", _e(", ".join(data.get("concepts") or []) or "—"))]
    version_pairs = [(k, _e(v)) for k, v in (run.get("versions") or {}).items()]
    parts = ['<div class="kv-row">', _key_values("Run", run_pairs), _key_values("Data", data_pairs)]
    if version_pairs:
        parts.append(_key_values("Versions", version_pairs))
    parts.append("</div>")
    models = run.get("models") or []
    if models:
        parts.append("<h3>Models</h3>")
        rows = []
        for m in models:
            depths = m.get("depths") or []
            layers = [f"{_e(layer)} <span class=\"dim\">{_f2(depths[i]) if i < len(depths) else ''}</span>" for i, layer in enumerate(m.get("layers") or [])]
            rows.append([f"<b>{_e(m.get('name', ''))}</b>", f"<code>{_e(m.get('spec', ''))}</code>", _e(m.get("weights", "")),
                         f"<code>{_e(str(m.get('hash') or '')[:12])}</code>", "<br>".join(layers)])
        parts.append(_table(["name", "spec", "weights", "hash", "probed layers (relative depth)"], rows))
    steps = run.get("steps") or []
    if steps:
        parts.append("<h3>Time per step</h3>")
        rows = [[_e(s.get("name", "")), _e(_duration(s.get("seconds"))), "reused" if s.get("skipped") else ""] for s in steps]
        total = sum(_num(s.get("seconds")) for s in steps if math.isfinite(_num(s.get("seconds"))))
        rows.append(["<b>total (sum of steps)</b>", f"<b>{_e(_duration(total))}</b>", ""])
        parts.append(_table(["step", "time", "skipped"], rows, numeric=(1,)))
    return "\n".join(parts)


def _probe_section(results: dict[str, Any], colors: dict[str, Any], sink: _FigureSink) -> str:
    models = [m for m in results.get("models", []) if _net2vec(results, m)]
    if not models:
        return _missing("no Net2Vec probe results, probe_<model>_net2vec.json")
    concepts = results.get("concepts", [])
    shape = "line" if len(concepts) <= MAX_PROBE_LINES else "row"
    parts = [_caption(f"Each {shape} is one concept: its set IoU on the held-out test images (pixels pooled over the whole set) when a linear "
                      "Net2Vec probe reads it from the layer on the x axis. Higher is better; the star marks the concept's best layer. "
                      "Relative depth 0 is the model's shallowest probed layer, 1 its deepest.")]
    parts.append('<div class="grid">')
    for model in models:
        figure = _probe_figure(_net2vec(results, model), model, concepts, colors)
        parts.append(_figure(sink.png(figure, f"probe_{model}"), f"probe quality of {model}") if figure else _missing(f"no set IoU in probe_{model}_net2vec.json"))
    parts.append("</div>")
    head = ("<tr><th rowspan=\"2\">concept</th>" + "".join(f'<th colspan="3">{_e(m)}</th>' for m in models) + "</tr><tr>"
            + "".join("<th>best layer</th><th>depth</th><th>set IoU</th>" for _ in models) + "</tr>")
    rows = []
    for concept in concepts:
        row = [f'<span class="swatch" style="background:{to_hex(_color(colors, concept))}"></span>{_e(concept)}']
        for model in models:
            best = _best_layer(_net2vec(results, model), concept)
            row += [f"<code>{_e(best['layer'])}</code>", _f2(best["depth"]), _f2(best["set_iou"])] if best else ["—", "—", "—"]
        rows.append(row)
    numeric = [i for m in range(len(models)) for i in (2 + 3 * m, 3 + 3 * m)]
    parts.append("<h3>Best layer per concept</h3>")
    parts.append(_table([], rows, numeric=numeric, head_html=head))
    return "\n".join(parts)


def _segmentation_section(results: dict[str, Any], colors: dict[str, Any], sink: _FigureSink) -> str:
    examples = results.get("examples") or {}
    if not examples:
        return _missing("no segmentation examples, examples/<model>.json")
    parts = [_caption(f"Test images with the ground-truth concept masks (middle) and the Net2Vec prediction, probability above 0.5 (right), in the same "
                      f"colours. Each concept is read from its own best layer (named in the legend, with the IoU on this image); at most "
                      f"{MAX_EXAMPLE_CONCEPTS} concepts present in the image are drawn, the largest first.")]
    for model, example in examples.items():
        figure = _segmentation_figure(example, model, colors)
        parts.append(f"<h3>{_e(model)}</h3>")
        parts.append(_figure(sink.png(figure, f"segmentation_{model}"), f"segmentation examples of {model}") if figure else _missing("no example images"))
    return "\n".join(parts)


def _ncav_section(results: dict[str, Any], sink: _FigureSink) -> str:
    prototypes = results.get("prototypes") or {}
    nmf_models = [m for m in results.get("models", []) if (results.get("probes", {}).get(m) or {}).get("nmf")]
    if not prototypes and not nmf_models:
        return _missing("no NMF probe, probe_<model>_nmf.json, and no prototypes/<model>.json")
    parts = [_caption("NMF splits a layer's activations into k non-negative concept directions (NCAVs) without labels. Each row shows the image "
                      "patches where one NCAV is most active; the label is the known concept its map overlaps best (set IoU on the test "
                      "images). Fidelity is the relative reconstruction error ‖V − SP‖/‖V‖ on held-out images: lower means the NCAVs "
                      "explain more of the layer.")]
    for model in results.get("models", []):
        proto = prototypes.get(model)
        probe = (results.get("probes", {}).get(model) or {}).get("nmf")
        if not proto and not probe:
            continue
        parts.append(f"<h3>{_e(model)}</h3>")
        labels = _ncav_labels(results, model)
        meta = (proto or {}).get("meta") or {}
        layers = list(meta.get("layers") or (probe or {}).get("layers") or labels.keys())
        rows = []
        for layer in layers:
            fidelity = (meta.get("fidelity") or {}).get(layer)
            first = next(iter(((probe or {}).get("metrics", {}).get(layer) or {}).values()), {})
            if fidelity is None:
                fidelity = first.get("fidelity")
            matched = [f"{_e(n.get('label'))} ({_f2(n.get('set_iou'))})" for n in labels.get(layer, []) if n.get("label")]
            rows.append([f"<code>{_e(layer)}</code>", str(len(labels.get(layer, []))), _f2(fidelity), _f2(first.get("relative_error")), ", ".join(matched) or "—"])
        parts.append(_table(["layer", "NCAVs", "fidelity (held-out rel. error)", "training rel. error", "matched concepts (set IoU)"], rows, numeric=(1, 2, 3)))
        if not proto:
            parts.append(_missing("no prototype patches, prototypes/<model>.json"))
            continue
        parts.append('<div class="grid">')
        for index, layer in enumerate(meta.get("layers") or []):
            patches = proto["tensors"].get(f"patches_{index}")
            if patches is None or patches.ndim != 5 or patches.shape[0] == 0:
                continue
            ncavs = (meta.get("ncavs") or {}).get(layer) or labels.get(layer, [])
            figure = _ncav_figure(patches, ncavs, model, layer)
            fidelity = (meta.get("fidelity") or {}).get(layer)
            parts.append(_figure(sink.png(figure, f"ncavs_{model}_{layer}"), f"NCAV prototypes of {model} {layer}",
                                 f"<code>{_e(layer)}</code> · fidelity (relative error) {_f2(fidelity)}"))
        parts.append("</div>")
    return "\n".join(parts)


def _similarity_section(results: dict[str, Any], sink: _FigureSink) -> str:
    compare = results.get("compare") or {}
    if not compare:
        return _missing("no layer comparison, compare_<method>/compare.json")
    parts = []
    flow = _flow_figure(results)
    if flow is not None:
        parts.append("<h3>Semantic flow within each model</h3>")
        parts.append(_caption("Similarity of each probed layer to the next deeper one. High values mean the concepts a layer encodes "
                              "carry over to the next; a dip marks where the representation changes most."))
        parts.append(_figure(sink.png(flow, "semantic_flow"), "semantic flow"))
    parts.append("<h3>Layer × layer similarity</h3>")
    parts.append(_caption("Both axes are ordered by relative depth; a cell is the similarity of a row layer and a column layer on the same test "
                          "images (supervised: mean concept set IoU of the Net2Vec maps; unsupervised: NCAV best-match set IoU; linear CKA as "
                          "a representation baseline). Red dots mark each row's best match (the ridge): a ridge along the dashed diagonal "
                          "means the models learn the same concepts at similar relative depths."))
    heatmaps = results.get("heatmaps") or {}
    blocks = list(dict.fromkeys((b["a"], b["b"]) for c in compare.values() for b in c.get("blocks", [])))
    for a, b in blocks:
        stem = f"{a}_vs_{b}"
        parts.append(f"<h4>{_e(f'within {a}' if a == b else f'{a} (rows) vs {b} (columns)')}</h4>")
        figures = []
        for method in compare:
            data = _heatmap(heatmaps.get(method, {}), f"{method}_{stem}.png")
            figures.append(_figure(data, f"{method} {stem}", _e(METHOD_NAMES.get(method, method))) if data else _missing(f"no {method}_{stem}.png"))
        cka = {mode: next((d for d in (_heatmap(heatmaps.get(m, {}), f"cka_{mode}_{stem}.png") for m in compare) if d), None) for mode in ("pooled", "spatial")}
        if cka["pooled"]:
            figures.append(_figure(cka["pooled"], f"CKA pooled {stem}", "linear CKA (pooled)"))
        parts.append('<div class="grid">' + "".join(figures) + "</div>")
        if cka["spatial"]:
            parts.append(f"<details><summary>linear CKA (spatial)</summary>{_figure(cka['spatial'], f'CKA spatial {stem}')}</details>")
    parts.append("<h3>Ridges</h3>")
    rows = []
    for method, result in compare.items():
        depth_of = _depth_of(result)
        for block in result.get("blocks", []):
            pairs = _ridge_pairs(block, depth_of)
            if not pairs:
                continue
            gap = np.mean([abs(p[2] - p[3]) for p in pairs])
            matches = "<br>".join(f"{_e(block['rows'][i])} → {_e(block['columns'][j])} <span class=\"dim\">{_f2(score)}</span>" for i, j, _, _, score in pairs)
            kind = "within" if block["a"] == block["b"] else "cross"
            rows.append([_e(METHOD_NAMES.get(method, method)), _e(f"{block['a']} vs {block['b']}"), kind, matches, _f2(gap),
                         _f2((block.get("ridge") or {}).get("depth_correlation"))])
    parts.append(_caption("Per model pair, each row layer's best-matching column layer (within a model: the best other layer), the mean "
                          "relative-depth gap |d_A − d_B| of these matches and the correlation of their depths."))
    parts.append(_table(["method", "pair", "", "best match per row (similarity)", "mean |d_A − d_B|", "depth r"], rows, numeric=(4, 5)))
    return "\n".join(parts)


def _heatmap(files: dict[str, Path], name: str) -> bytes | None:
    path = files.get(name)
    if path is None:
        return None
    data = path.read_bytes()
    return data if data.startswith(b"\x89PNG\r\n\x1a\n") else None


def _tcav_section(results: dict[str, Any], colors: dict[str, Any], sink: _FigureSink) -> str:
    tcav = results.get("tcav")
    if not tcav:
        return _missing("no tcav.json: TCAV was not part of this run")
    records = tcav.get("records") or []
    statistic = tcav.get("statistic", "sign_count")
    correction = tcav.get("correction", "holm")
    alpha = _num(tcav.get("alpha", 0.05))
    parts = [_caption(f"TCAV score = fraction of the target's inputs whose output grows when the activation moves towards the concept "
                      f"(statistic <code>{_e(statistic)}</code>). Bars are means over CAVs trained against different random sets, whiskers the "
                      f"bootstrap confidence interval, the black tick the mean score of random-vs-random CAVs (the null). A star marks a "
                      f"significant difference from the null: two-sided t-test, {_e(correction)} correction over "
                      f"{_e(tcav.get('n_hypotheses', len(records)))} hypotheses, α = {alpha:g}.")]
    if not records:
        parts.append(_missing("tcav.json has no records"))
    for target in dict.fromkeys(r["target"] for r in records):
        figure = _tcav_figure([r for r in records if r["target"] == target], target, statistic, colors, f" (p_{correction} < {alpha:g})")
        parts.append(_figure(sink.png(figure, f"tcav_{target}"), f"TCAV scores for {target}"))
    if records:
        value = _f3g if statistic == "mean_sensitivity" else _f2
        rows = [[_e(r["concept"]), f"<code>{_e(r['layer'])}</code>", _e(r["target"]), value(r.get("mean")), value(r.get("null_mean")),
                 f"{value(r.get('ci_low'))} – {value(r.get('ci_high'))}", _e(_p(r.get("p"))), _e(_p(r.get(f"p_{correction}"))), "✔" if r.get("significant") else ""]
                for r in records]
        parts.append(_table(["concept", "layer", "target", "mean", "null mean", "CI", "p", f"p ({correction})", "significant"], rows,
                            numeric=(3, 4, 5, 6, 7), row_class=lambda i: "sig" if records[i].get("significant") else ""))
    lines = tcav.get("missing_lines") or []
    if lines:
        parts.append("<h3>Inputs left out</h3><ul class=\"notes\">" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>")
    return "\n".join(parts)


def _findings_section(results: dict[str, Any]) -> str:
    groups = grouped_findings(results)
    if not groups:
        return _missing("no results to summarise")
    parts = [_caption(f"Sentences computed from the numbers in the sections above. Thresholds: a concept counts as encoded from set IoU "
                      f"{BLIND_LAYER_IOU:g}, as well encoded from {WELL_ENCODED_IOU:g}; an NCAV matches a concept from set IoU {NCAV_MATCH_IOU:g}; "
                      f"a ridge is near the diagonal when its mean |d_A − d_B| is at most {NEAR_DIAGONAL:g}.")]
    for heading, sentences in groups:  # sentences start with a plain word (see findings): capitalising it keeps identifiers intact
        parts.append(f"<h3>{_e(heading)}</h3>")
        parts.append("<ul class=\"findings\">" + "".join(f"<li>{_e(s[0].upper() + s[1:])}.</li>" for s in sentences) + "</ul>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# page

_CSS = """
:root { --fg:#1d232a; --dim:#66707a; --line:#d5d9de; --accent:#2b6cb0; --bg-soft:#f5f7f9; }
* { box-sizing: border-box; }
body { margin:0; font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; font-size:15px;
       line-height:1.5; color:var(--fg); background:#fff; }
header { padding:1.4rem 2rem 1rem; border-bottom:1px solid var(--line); background:var(--bg-soft); }
header h1 { margin:0 0 .3rem; font-size:1.6rem; font-weight:600; }
header p { margin:0; color:var(--dim); }
.layout { display:grid; grid-template-columns:210px minmax(0,1fr); gap:2rem; max-width:1400px; margin:0 auto; padding:0 2rem 3rem; }
nav.toc { position:sticky; top:0; align-self:start; padding:1.2rem 0; font-size:.9rem; }
nav.toc h2 { font-size:.8rem; text-transform:uppercase; letter-spacing:.06em; color:var(--dim); margin:0 0 .4rem; }
nav.toc ol { margin:0; padding-left:1.2rem; }
nav.toc li { margin:.2rem 0; }
a { color:var(--accent); text-decoration:none; }
a:hover { text-decoration:underline; }
main { min-width:0; }
section { padding-top:1.2rem; border-bottom:1px solid var(--line); padding-bottom:1.2rem; scroll-margin-top:.5rem; }
section h2 { font-size:1.35rem; margin:.2rem 0 .6rem; }
h3 { font-size:1.08rem; margin:1.2rem 0 .4rem; }
h4 { font-size:.98rem; margin:1rem 0 .3rem; color:#333; }
.caption { color:#444; background:var(--bg-soft); border-left:3px solid var(--accent); padding:.4rem .7rem; margin:.5rem 0 .9rem; max-width:70rem; }
.missing { color:var(--dim); font-style:italic; }
.dim { color:var(--dim); font-size:.85em; }
code { font-family: "SFMono-Regular", Consolas, "Liberation Mono", monospace; font-size:.88em; }
figure { margin:.4rem 0 1rem; }
figure img { max-width:100%; height:auto; display:block; border:1px solid #eceff2; }
figcaption { color:var(--dim); font-size:.88rem; margin-top:.25rem; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(440px, 1fr)); gap:1rem 1.5rem; align-items:start; }
.table-wrap { overflow-x:auto; margin:.4rem 0 1rem; }
table { border-collapse:collapse; font-size:.88rem; }
th, td { border:1px solid var(--line); padding:.25rem .55rem; text-align:left; vertical-align:top; }
thead th { background:var(--bg-soft); font-weight:600; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr.sig td { background:#eef8ee; }
.kv-row { display:flex; flex-wrap:wrap; gap:1rem 2rem; align-items:flex-start; }
.kv h3 { margin-top:.4rem; }
.kv th { background:var(--bg-soft); font-weight:600; white-space:nowrap; }
.swatch { display:inline-block; width:.8em; height:.8em; border-radius:2px; margin-right:.4em; vertical-align:baseline; }
ul.findings { margin:.2rem 0 .8rem; }
ul.findings li, ul.notes li { margin:.3rem 0; }
details { margin:.2rem 0 1rem; }
summary { cursor:pointer; color:var(--accent); }
footer { color:var(--dim); font-size:.85rem; text-align:center; padding:1rem; }
@media (max-width: 900px) {
  .layout { display:block; padding:0 1rem 2rem; }
  nav.toc { background:#fff; border-bottom:1px solid var(--line); padding:.5rem 0; z-index:1; }
  nav.toc ol { display:flex; flex-wrap:wrap; gap:.2rem 1rem; list-style:none; padding:0; }
  .grid { grid-template-columns:1fr; }
}
@media print { nav.toc { display:none; } .layout { display:block; } }
""".strip()

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{style}
</style>
</head>
<body>
<header>
<h1>{heading}</h1>
<p>{subtitle}</p>
</header>
<div class="layout">
<nav class="toc">
<h2>Contents</h2>
<ol>
{toc}
</ol>
</nav>
<main>
{sections}
</main>
</div>
<footer>{footer}</footer>
</body>
</html>
"""
