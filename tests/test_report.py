"""The HTML concept report: structure, self-containment, findings, determinism."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conceptlens.attribution.tcav import (
    METRICS,
    TCAVRecord,
    TCAVResult,
    bonferroni,
    holm,
)
from conceptlens.concepts.compare.workflow import _blocks
from conceptlens.concepts.store.artifacts import write_artifact, write_json
from matplotlib.figure import Figure
from PIL import Image

from conceptlens.report import (
    NOT_RUN,
    SECTIONS,
    ReportError,
    findings,
    grouped_findings,
    load_results,
    write_report,
)
from conceptlens.report.results import (
    BestLayer,
    Block,
    Comparison,
    NCAVLabel,
    ProbeResults,
    RunSummary,
    StepTime,
    TCAVResults,
)
from conceptlens.tcav_step import write_tcav

CONCEPTS = ["sky", "road", "car", "wheel"]
MODELS = {
    "vgg": ("zoo:synthetic_vgg_centernet", ["backbone.block1", "backbone.block2", "backbone.block3"]),
    "resnet": ("zoo:synthetic_resnet_fcos", ["layer1", "layer2", "layer3"]),
}
DEPTHS = [0.0, 0.5, 1.0]
#: Test set IoU per model, concept and layer (planted: sky well encoded early in vgg, wheel best at
#: vgg block2, road not encoded by resnet, one missing value).
SET_IOU = {
    "vgg": {"sky": [0.91, 0.88, 0.80], "road": [0.40, 0.55, 0.60], "car": [0.10, 0.35, 0.58], "wheel": [0.20, 0.62, 0.45]},
    "resnet": {"sky": [0.70, 0.85, 0.82], "road": [0.02, 0.05, 0.08], "car": [None, 0.30, 0.61], "wheel": [0.10, 0.30, 0.55]},
}
#: NCAV labels per model and layer: (matched concept, set IoU) of ncav_0..2.
NCAV_LABELS = {
    "vgg": [[("sky", 0.12), ("road", 0.08), (None, None)], [("wheel", 0.41), ("car", 0.18), ("sky", 0.72)], [("car", 0.33), ("road", 0.25), ("wheel", 0.05)]],
    "resnet": [[("sky", 0.30), (None, None), ("road", 0.02)], [("sky", 0.11), ("car", 0.15), ("wheel", 0.09)], [("wheel", 0.15), ("car", 0.55), (None, None)]],
}
#: Layer × layer similarity, models in MODELS order (vgg rows/columns 0-2, resnet 3-5).
MATRICES = {
    "net2vec": [
        [1.0, 0.7, 0.4, 0.6, 0.3, 0.2],
        [0.7, 1.0, 0.6, 0.2, 0.4, 0.5],
        [0.4, 0.6, 1.0, 0.1, 0.3, 0.55],
        [0.6, 0.2, 0.1, 1.0, 0.5, 0.6],
        [0.3, 0.4, 0.3, 0.5, 1.0, 0.7],
        [0.2, 0.5, 0.55, 0.6, 0.7, 1.0],
    ],
    "nmf": [
        [1.0, 0.5, 0.3, 0.1, 0.2, 0.3],
        [0.5, 1.0, 0.45, 0.1, 0.2, 0.3],
        [0.3, 0.45, 1.0, 0.3, 0.2, 0.1],
        [0.1, 0.1, 0.3, 1.0, 0.6, 0.2],
        [0.2, 0.2, 0.2, 0.6, 1.0, 0.5],
        [0.3, 0.3, 0.1, 0.2, 0.5, 1.0],
    ],
}
#: TCAV hypotheses: (target, layer, concept, p); wheel at vgg block3 is planted significant.
TCAV_P = [
    ("vgg:top:1", "backbone.block2", "wheel", 0.2), ("vgg:top:1", "backbone.block2", "sky", 0.5),
    ("vgg:top:1", "backbone.block3", "wheel", 0.000375), ("vgg:top:1", "backbone.block3", "sky", 0.3),
    ("resnet:top:1", "layer2", "wheel", 0.04), ("resnet:top:1", "layer2", "sky", 0.6),
    ("resnet:top:1", "layer3", "wheel", 0.7), ("resnet:top:1", "layer3", "sky", 0.9),
]


# ---------------------------------------------------------------------------------------------
# the fixture results directory


def build_results(out: Path, *, real_heatmaps: bool = False) -> Path:
    """A small results directory laid out exactly as the pipeline writes it (see conceptlens/report/results.py).

    2 models × 3 layers, 4 concepts, 2 segmentation examples per model, 3 NCAVs × 4 prototype
    patches per layer, 2 TCAV targets. ``real_heatmaps`` draws the heatmaps with the pipeline's own
    writer (slower); otherwise tiny PNGs with the same names.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    _write_run(out)
    for model, (_, layers) in MODELS.items():
        _write_probes(out, model, layers)
        _write_examples(out, model, layers, rng)
        _write_prototypes(out, model, layers, rng)
    for method, matrix in MATRICES.items():
        _write_compare(out, method, np.array(matrix), real_heatmaps)
    _write_tcav(out)
    return out


def _write_run(out: Path) -> None:
    write_json(out / "run.json", {
        "name": "fixture-run", "config": {"name": "fixture-run", "seed": 0}, "config_hash": "0123456789abcdef0123", "seed": 0, "device": "cpu",
        "versions": {"python": "3.12.3", "torch": "2.5.1", "torchvision": "0.20.1", "numpy": "2.1.0", "captum": "0.9.0", "conceptlens": "0.1.0"},
        "data": {"spec": "synthetic:300", "name": "synthetic-300", "n_images": 300, "concepts": CONCEPTS, "splits": {"train": 200, "val": 50, "test": 50}},
        "models": [{"name": name, "spec": spec, "weights": "shipped", "hash": f"{name}-hash-0123456789abcdef", "layers": layers,
                    "depths": DEPTHS, "module_depths": [0.2, 0.5, 0.8]} for name, (spec, layers) in MODELS.items()],
        "steps": [{"name": f"embed+probe {m} {method}", "seconds": 12.5 + i, "skipped": i == 1}
                  for i, (m, method) in enumerate((m, method) for m in MODELS for method in ("net2vec", "nmf"))]
        + [{"name": "compare net2vec", "seconds": 30.25, "skipped": False}, {"name": "tcav", "seconds": 95.0, "skipped": False}],
        "started": "2026-12-01T17:00:00Z", "total_seconds": 201.5,
    })


def _write_probes(out: Path, model: str, layers: list[str]) -> None:
    metrics = {layer: {c: {"set_iou": SET_IOU[model][c][i], "mean_iou": None if SET_IOU[model][c][i] is None else SET_IOU[model][c][i] - 0.05,
                           "auc_pr": 0.7} for c in CONCEPTS} for i, layer in enumerate(layers)}
    best = {}
    for c in CONCEPTS:
        values = [np.nan if v is None else v for v in SET_IOU[model][c]]
        i = int(np.nanargmax(values))
        best[c] = {"layer": layers[i], "depth": DEPTHS[i], "set_iou": values[i]}
    write_json(out / f"probe_{model}_net2vec.json", {"model": model, "method": "net2vec", "layers": layers, "depths": DEPTHS, "metrics": metrics, "best_layer": best})
    nmf = {layer: {f"ncav_{k}": {"matched_concept": c, "set_iou": iou, "fidelity": 0.3 + 0.05 * i, "relative_error": 0.25 + 0.05 * i}
                   for k, (c, iou) in enumerate(NCAV_LABELS[model][i])} for i, layer in enumerate(layers)}
    write_json(out / f"probe_{model}_nmf.json", {"model": model, "method": "nmf", "layers": layers, "depths": DEPTHS, "metrics": nmf})


def _scene(rng: np.random.Generator, with_sky: bool) -> tuple[np.ndarray, np.ndarray]:
    """A 48×64 street scene and its (sky, road, car, wheel) masks."""
    h, w = 48, 64
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((4, h, w), dtype=np.uint8)
    image = np.full((h, w, 3), 150, dtype=np.uint8)
    if with_sky:
        masks[0, :16] = 1
    masks[1, 38:] = 1
    masks[2, 22:37, 14:46] = 1
    for cx in (21, 39):
        masks[3] |= ((yy - 37) ** 2 + (xx - cx) ** 2 <= 16).astype(np.uint8)
    masks[2] &= 1 - masks[3]
    for k, color in enumerate([(120, 170, 230), (90, 90, 95), (200, 40, 40), (20, 20, 20)]):
        image[masks[k] > 0] = color
    noise = rng.integers(-12, 13, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), masks


def _write_examples(out: Path, model: str, layers: list[str], rng: np.random.Generator) -> None:
    tensors = {}
    for i in range(2):
        image, truth = _scene(rng, with_sky=i == 0)
        pred = np.roll(truth.astype(np.float32), 1, axis=2) * 0.8 + rng.uniform(0, 0.3, truth.shape).astype(np.float32)
        tensors[f"image_{i}"] = torch.from_numpy(image)
        tensors[f"truth_{i}"] = torch.from_numpy(truth)
        tensors[f"pred_{i}"] = torch.from_numpy(np.clip(pred, 0, 1)).to(torch.float16)
    best = {c: layers[int(np.nanargmax([np.nan if v is None else v for v in SET_IOU[model][c]]))] for c in CONCEPTS}
    write_artifact(out / "examples" / model, "report-examples", 1, tensors,
                   {"model": model, "ids": ["img_0003", "img_0017"], "concepts": CONCEPTS, "best_layers": best, "n_examples": 2})


def _write_prototypes(out: Path, model: str, layers: list[str], rng: np.random.Generator) -> None:
    tensors = {}
    for index in range(len(layers)):
        patches = np.zeros((3, 4, 16, 16, 3), dtype=np.uint8)
        for k in range(3):
            base = np.array([(220, 90, 60), (60, 160, 90), (70, 90, 210)][k])
            stripes = (np.arange(16)[:, None] + np.arange(16)[None, :] * (k + 1)) % (4 + index) < 2
            for p in range(4):
                patches[k, p] = np.clip(base * (1.0 - 0.15 * p) + stripes[..., None] * 40 + rng.integers(0, 20, (16, 16, 3)), 0, 255)
        tensors[f"patches_{index}"] = torch.from_numpy(patches)
    ncavs = {layer: [{"name": f"ncav_{k}", "label": c, "set_iou": iou} for k, (c, iou) in enumerate(NCAV_LABELS[model][i])] for i, layer in enumerate(layers)}
    write_artifact(out / "prototypes" / model, "report-prototypes", 1, tensors,
                   {"model": model, "layers": layers, "ncavs": ncavs, "fidelity": {layer: 0.3 + 0.05 * i for i, layer in enumerate(layers)}})


def _write_compare(out: Path, method: str, matrix: np.ndarray, real_heatmaps: bool) -> None:
    probed = [SimpleNamespace(label=name, layers=layers) for name, (_, layers) in MODELS.items()]
    depths = DEPTHS * len(MODELS)
    n = len(depths)
    cka = {"pooled": np.clip(0.9 - 0.15 * np.abs(np.subtract.outer(range(n), range(n)) % 3), 0, 1), "spatial": np.full((n, n), 0.5)}
    for mode in cka:
        np.fill_diagonal(cka[mode], 1.0)
    result = {
        "method": method, "grid": [100, 100], "n_test_images": 50,
        "layers": [{"label": f"{name}:{layer}", "model": name, "layer": layer, "depth": d, "module_depth": d}
                   for name, (_, layers) in MODELS.items() for layer, d in zip(layers, DEPTHS)],
        "matrix": matrix.tolist(), "details": {"matrix": matrix.tolist()},
        "cka": {mode: values.tolist() for mode, values in cka.items()},
        "blocks": _blocks(probed, matrix, cka, depths),
        "provenance": {"dataset": "synthetic-300"},
    }
    folder = out / f"compare_{method}"
    write_json(folder / "compare.json", result)
    if real_heatmaps:
        from conceptlens.compare_output import _write_heatmaps
        from conceptlens.report.results import Comparison
        _write_heatmaps(Comparison.from_json(result), folder / "heatmaps", method, {name: spec for name, (spec, _) in MODELS.items()})
        return
    (folder / "heatmaps").mkdir(parents=True, exist_ok=True)
    for block in result["blocks"]:
        stem = f"{block['a']}_vs_{block['b']}"
        for prefix, values in ((method, block["similarity"]), ("cka_pooled", block["cka_pooled"]), ("cka_spatial", block["cka_spatial"])):
            figure = Figure(figsize=(1.2, 1.2), dpi=40)
            figure.add_subplot().imshow(np.array(values, dtype=float), vmin=0, vmax=1)
            figure.savefig(folder / "heatmaps" / f"{prefix}_{stem}.png", metadata={"Software": None})


def _write_tcav(out: Path) -> None:
    planted = (np.array([0.89, 0.91, 0.93, 0.90, 0.92]), np.array([0.50, 0.52, 0.54, 0.51, 0.53]))
    records = []
    for index, (target, layer, concept, p) in enumerate(TCAV_P):
        if p < 0.01:
            scores, null = planted
        else:
            scores, null = 0.45 + 0.02 * index + np.array([-0.04, 0.0, 0.04, -0.02, 0.02]), np.array([0.48, 0.50, 0.52, 0.49, 0.51])
        record = TCAVRecord(concept, layer, target, "sign_count", 40, {m: scores.copy() for m in METRICS}, {m: null.copy() for m in METRICS})
        record.t, record.p = 3.0, p
        record.ci_low, record.ci_high = float(scores.mean() - 0.04), float(scores.mean() + 0.04)
        records.append(record)
    p_values = np.array([r.p for r in records])
    for record, ph, pb in zip(records, holm(p_values), bonferroni(p_values)):
        record.p_holm, record.p_bonferroni = float(ph), float(pb)
        record.significant = bool(ph < 0.05)
    result = TCAVResult(records, "sign_count", "holm", 0.05, 200, 0, missing={"vgg:top:1": [], "resnet:top:1": ["img_0007", "img_0012"]})
    write_tcav(result, out, {"models": list(MODELS)})


# ---------------------------------------------------------------------------------------------
# HTML checks


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictParser(HTMLParser):
    """Records tags and checks that every opened non-void tag closes, in order.

    Tags inside inline ``<svg>`` count as ``svg:<tag>``; ``ids`` and ``links`` (``href="#…"``) are collected.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.images: list[str] = []
        self.urls: list[str] = []
        self.ids: list[str] = []
        self.links: list[str] = []
        self.section_ids: list[str] = []
        self.section_text: dict[str, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        key = f"svg:{tag}" if "svg" in self.stack else tag
        self.counts[key] = self.counts.get(key, 0) + 1
        attrs = dict(attrs)
        self.ids += [attrs["id"]] if attrs.get("id") else []
        self.links += [attrs["href"][1:]] if (attrs.get("href") or "").startswith("#") else []
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "action", "data", "poster") and v]
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "section":
            self.section_ids.append(attrs.get("id"))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag not in VOID:
            self.errors.append(f"self-closing non-void <{tag}/>")
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"end tag of void element </{tag}>")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if "section" in self.stack and self.section_ids and "script" not in self.stack:
            self.section_text.setdefault(self.section_ids[-1], []).append(data)


def parse(text: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(text)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return build_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def report_text(results_dir) -> str:
    return write_report(results_dir).read_text(encoding="utf-8")


def test_sections_present_in_order(report_text):
    parsed = parse(report_text)
    assert parsed.section_ids == [sid for sid, _ in SECTIONS]
    for sid, _ in SECTIONS:
        assert f'href="#{sid}"' in report_text  # table of contents


def test_html_is_well_formed(report_text):
    parsed = parse(report_text)
    assert parsed.errors == []
    assert parsed.stack == []
    assert report_text.startswith("<!DOCTYPE html>")
    for tag in ("html", "head", "body", "title", "style", "main", "nav"):
        assert parsed.counts.get(tag) == 1, tag


def test_every_image_is_an_inline_png(report_text):
    images = parse(report_text).images
    # 2 probe plots, 4 per-concept examples, 2 segmentation figures, 6 NCAV grids, 1 flow plot,
    # 3 blocks × (2 methods + CKA pooled + CKA spatial), 2 TCAV charts
    assert len(images) == 2 + 4 + 2 + 6 + 1 + 3 * 4 + 2
    for src in images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            image.verify()


def test_no_external_resources(report_text):
    parsed = parse(report_text)
    assert all(url.startswith(("#", "data:image/png;base64,")) for url in parsed.urls)
    assert not re.search(r"https?://", report_text)
    assert not re.search(r"url\(", report_text)
    assert re.findall(r"<script[^>]*>", report_text, flags=re.IGNORECASE) == ["<script>"]  # one inline script, no src
    assert not re.search(r"\b(fetch|XMLHttpRequest|import\(|eval)\b", report_text.split("<script>", 1)[1])
    assert "<link" not in report_text.lower()
    assert "@import" not in report_text


def test_summary_and_tables(report_text):
    text = " ".join(parse(report_text).section_text["summary"])
    for expected in ("fixture-run", "0123456789abcdef0123", "synthetic:300", "train 200 / val 50 / test 50", "vgg-hash-01", "2.5.1", "1 min 35 s"):
        assert expected in text, expected
    assert "vgg-hash-0123456789abcdef" not in text  # hash shown to 12 characters
    probe = " ".join(parse(report_text).section_text["probe-quality"])
    assert "backbone.block2" in probe and "0.62" in probe
    tcav = " ".join(parse(report_text).section_text["tcav"])
    assert "2 of 42 inputs have no valid target for resnet:top:1; left out: img_0007, img_0012" in tcav
    assert "&lt; 0.001" in report_text and "< 0.001" not in report_text  # p of the planted hypothesis, escaped
    assert not re.search(r"<(?![a-zA-Z/!])", report_text.split("<script>", 1)[0])  # no stray '<' outside tags (the script compares numbers)


def test_findings_from_planted_numbers(results_dir):
    sentences = findings(load_results(results_dir))
    expected = [
        "the concept wheel is best encoded at relative depth 0.50 in vgg (backbone.block2, set IoU 0.62) and 1.00 in resnet (layer3, set IoU 0.55)",
        "the concept sky is best encoded at relative depth 0.00 in vgg (backbone.block1, set IoU 0.91) and 0.50 in resnet (layer2, set IoU 0.85)",
        "the concept road is best encoded at relative depth 1.00 in vgg (backbone.block3, set IoU 0.60)",
        "no probed layer of resnet encodes road (best set IoU 0.08, below 0.10)",
        "the shallowest layer of vgg already encodes sky well (backbone.block1, set IoU 0.91)",
        "the cross-model ridge of vgg vs resnet (supervised, Net2Vec) lies near the diagonal (mean |d_A − d_B| = 0.17, depth correlation r = 0.87): "
        "the best-matching layers sit at similar relative depths",
        "the cross-model ridge of vgg vs resnet (unsupervised, NMF) lies off the diagonal (mean |d_A − d_B| = 0.83, depth correlation r = -0.87): "
        "the best-matching layers sit at different relative depths",
        "within vgg, adjacent layers are the most similar (supervised, Net2Vec: every layer's best match is a neighbouring layer; "
        "mean similarity 0.65 between neighbours vs 0.40 otherwise)",
        "within resnet, the most similar other layer is a neighbouring one for 2 of 3 layers (supervised, Net2Vec; "
        "mean similarity 0.60 between neighbours vs 0.60 otherwise)",
        "1 of 8 TCAV hypotheses are significant at α = 0.05 after holm correction",
        "for target vgg:top:1, wheel at backbone.block3 is significant and raises the target (TCAV 0.91 vs null 0.52, p_holm = 0.003)",
        "in resnet, layer3 has an NCAV matching car (IoU 0.55)",
        "in vgg, backbone.block2 has NCAVs matching sky (IoU 0.72) and wheel (IoU 0.41)",
    ]
    for sentence in expected:
        assert sentence in sentences, sentence
    # not supported by the data: resnet's shallowest sky IoU (0.70) is below 90 % of its best (0.85); weak NCAV labels
    assert not any("shallowest layer of resnet" in s for s in sentences)
    assert not any("matching wheel (IoU 0.15)" in s for s in sentences)
    assert not any("resnet, layer2 has" in s for s in sentences)
    # identifiers keep their case: no sentence starts with a model, layer or concept name
    identifiers = set(MODELS) | set(CONCEPTS) | {layer for _, layers in MODELS.values() for layer in layers}
    assert not any(s.split(" ")[0].rstrip(",") in identifiers for s in sentences)
    groups = grouped_findings(load_results(results_dir))
    assert [heading for heading, _ in groups] == ["Probes", "Similarity", "TCAV", "NCAVs"]
    assert [s for _, group in groups for s in group] == sentences


def test_findings_rendered_in_groups(report_text):
    from conceptlens.report.anchors import concept_anchor, ncav_anchor, pair_anchor

    section = report_text.split('<section id="findings">', 1)[1].split("</section>", 1)[0]
    assert re.findall(r"<h3>([^<]*)</h3>", section) == ["Probes", "Similarity", "TCAV", "NCAVs"]
    assert section.count('<ul class="findings">') == 4
    assert (f'<li>In vgg, backbone.block2 has NCAVs matching sky (IoU 0.72) and wheel (IoU 0.41). '
            f'<a class="ref" href="#{ncav_anchor("vgg", "backbone.block2")}">→ prototypes</a></li>') in section
    assert "<li>The concept wheel is best encoded at relative depth 0.50 in vgg" in section
    assert (f'<li>No probed layer of resnet encodes road (best set IoU 0.08, below 0.10). '
            f'<a class="ref" href="#{concept_anchor("road")}">→ per-concept view</a></li>') in section
    assert f'href="#{pair_anchor("vgg", "resnet")}">→ heatmaps</a>' in section
    for name in ("Vgg", "Resnet", "Wheel", "Sky", "Road", "Car"):
        assert f"<li>{name} " not in section, name


def test_concept_colors_distinct():
    from matplotlib.colors import rgb_to_hsv

    from conceptlens.report.figures import DISTINCT_COLORS, concept_palette
    names = [f"c{i}" for i in range(DISTINCT_COLORS)]
    colors = concept_palette(names)
    rgb = np.array([colors[n][:3] for n in names])
    hsv = rgb_to_hsv(rgb)
    assert (hsv[:, 1] > 0.15).all()  # no greys: the overlays are drawn on a grey image
    assert len({tuple(np.round(c, 3)) for c in rgb}) == DISTINCT_COLORS
    hue = hsv[:10, 0]
    gaps = np.abs(hue[1:] - hue[:-1])
    assert (np.minimum(gaps, 1 - gaps) > 0.04).all()  # neighbours among the first 10 differ in hue


def test_missing_optional_inputs(results_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(results_dir, partial)
    for path in ["tcav.json", "tcav.csv", "probe_vgg_nmf.json", "probe_resnet_nmf.json", "report.html"]:
        (partial / path).unlink(missing_ok=True)
    for folder in ("prototypes", "examples", "compare_nmf"):
        shutil.rmtree(partial / folder)
    parsed = parse(write_report(partial).read_text(encoding="utf-8"))
    assert parsed.errors == [] and parsed.section_ids == [sid for sid, _ in SECTIONS]
    for sid in ("tcav", "ncavs", "segmentation"):
        assert NOT_RUN in " ".join(parsed.section_text[sid]), sid
    assert "no tcav.json" in " ".join(parsed.section_text["tcav"])
    assert NOT_RUN not in " ".join(parsed.section_text["similarity"])
    sentences = findings(load_results(partial))
    assert not any("TCAV" in s or "NCAV" in s or "NMF" in s for s in sentences)
    assert any(s.startswith("the concept wheel is best encoded") for s in sentences)


def test_report_is_deterministic(results_dir, tmp_path):
    other = tmp_path / "again"
    shutil.copytree(results_dir, other)
    first = write_report(results_dir).read_bytes()
    second = write_report(results_dir).read_bytes()
    assert first == second
    assert write_report(other).read_bytes() == first.replace(results_dir.name.encode(), b"again")


def test_title_and_figure_folder(results_dir, tmp_path):
    path = write_report(results_dir, title="My <report>", figures=tmp_path / "figs")
    text = path.read_text(encoding="utf-8")
    assert "<title>My &lt;report&gt;</title>" in text
    saved = sorted((tmp_path / "figs").glob("*.png"))
    assert len(saved) == 2 + 4 + 2 + 6 + 1 + 2  # every figure the report draws itself


def test_unreadable_results(tmp_path):
    with pytest.raises(ReportError, match="not a directory"):
        load_results(tmp_path / "nothing")
    with pytest.raises(ReportError, match="holds no results"):
        load_results(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        write_report(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"name": "empty"}))
    parsed = parse(write_report(tmp_path).read_text(encoding="utf-8"))
    assert parsed.errors == [] and parsed.section_ids == [sid for sid, _ in SECTIONS]


def test_segmentation_title_sits_on_the_first_row(results_dir):
    from conceptlens.report.figures import concept_palette, segmentation_figure
    results = load_results(results_dir)
    example = results.examples["vgg"]
    figure = segmentation_figure(example.meta, example.tensors, "vgg", concept_palette(results.concepts))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(figure).get_renderer()
    title = figure._suptitle.get_window_extent(renderer)
    first_row = max(axes.title.get_window_extent(renderer).y1 for axes in figure.axes[:3])
    assert 0 <= title.y0 - first_row <= 0.4 * figure.dpi  # no blank band (it was over an inch)


def test_heatmap_title_wrapped_to_figure_width():
    from conceptlens.report.figures import _text_width, _wrap_title
    title = "mean concept set IoU, within vgg = zoo:synthetic_vgg_centernet_with_a_long_name"
    wrapped = _wrap_title(title, 300, 9.5)
    assert wrapped.split("\n")[0] == "mean concept set IoU,"
    assert all(_text_width(line, 9.5) <= 300 for line in wrapped.split("\n"))
    assert wrapped.replace("\n", " ") == title
    assert _wrap_title("short", 300, 9.5) == "short"


# ---------------------------------------------------------------------------------------------
# typed records shared by the writers and the report


WRITTEN_FILES = {"probe_vgg_net2vec.json": ProbeResults, "probe_resnet_nmf.json": ProbeResults, "compare_net2vec/compare.json": Comparison,
                 "compare_nmf/compare.json": Comparison, "tcav.json": TCAVResults}


@pytest.mark.parametrize("name", sorted(WRITTEN_FILES))
def test_records_read_back_exactly_what_was_written(results_dir, tmp_path, name):
    path = results_dir / name
    record = WRITTEN_FILES[name].read(path)
    assert list(record.to_json().items()) == list(json.loads(path.read_text()).items())  # same keys, same order, same values
    assert record.write(tmp_path / "again.json").read_bytes() == path.read_bytes()


def test_records_give_typed_access(results_dir):
    results = load_results(results_dir)
    assert isinstance(results.run, RunSummary) and results.run.data.splits == {"train": 200, "val": 50, "test": 50}
    assert [m.name for m in results.run.models] == ["vgg", "resnet"] and results.run.models[1].layers == ("layer1", "layer2", "layer3")
    assert [s.skipped for s in results.run.steps[:4]] == [False, True, False, False] and results.run.steps[-1] == StepTime("tcav", 95.0, False)
    assert results.probe("vgg", "net2vec").best_layer["wheel"] == BestLayer("backbone.block2", 0.5, 0.62)
    block = results.compare["net2vec"].blocks[1]  # vgg rows, resnet columns
    assert (block.a, block.b, block.rows) == ("vgg", "resnet", ("backbone.block1", "backbone.block2", "backbone.block3"))
    assert [(p.a, p.b) for p in block.ridge.pairs] == [(0, 0), (1, 2), (2, 2)]
    planted = results.tcav.records[2]
    assert (planted.concept, planted.layer, planted.significant) == ("wheel", "backbone.block3", True)
    assert planted.metric_means == pytest.approx({metric: 0.91 for metric in METRICS})
    assert planted.adjusted_p("holm") == pytest.approx(8 * 0.000375) and planted.adjusted_p("bonferroni") == pytest.approx(8 * 0.000375)
    assert results.tcav.missing_lines == ("2 of 42 inputs have no valid target for resnet:top:1; left out: img_0007, img_0012",)
    assert results.prototypes["vgg"].meta.ncavs["backbone.block2"][2] == NCAVLabel("ncav_2", "sky", 0.72)
    assert results.examples["resnet"].meta.best_layers["road"] == "layer3"


def test_best_layer_falls_back_to_the_curve(results_dir):
    data = json.loads((results_dir / "probe_resnet_net2vec.json").read_text())
    without = ProbeResults.from_json({k: v for k, v in data.items() if k != "best_layer"})
    assert without.best("sky") == BestLayer("layer2", 0.5, 0.85)
    assert without.best("car") == BestLayer("layer3", 1.0, 0.61)  # the missing value at layer1 is skipped
    assert without.curve("car")[2][0] != without.curve("car")[2][0]  # NaN where the file has null
    assert without.best("unknown") is None


def test_bare_ridge_pairs_take_depth_and_score_from_the_block():
    block = Block.from_json({"a": "A", "b": "B", "rows": ["x", "y"], "columns": ["u", "v"], "similarity": [[0.1, 0.9], [0.4, None]],
                             "ridge": {"pairs": [[0, 1], [1, 0]], "depth_correlation": None}})
    assert block.ridge_pairs({"A:x": 0.0, "A:y": 1.0, "B:u": 0.25, "B:v": 0.75}) == [(0, 1, 0.0, 0.75, 0.9), (1, 0, 1.0, 0.25, 0.4)]


def test_a_malformed_result_file_names_the_file_and_the_field(results_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(results_dir, broken)
    compare = broken / "compare_nmf" / "compare.json"
    data = json.loads(compare.read_text())
    data["blocks"][1]["ridge"] = "none"
    write_json(compare, data)
    with pytest.raises(ReportError) as error:
        load_results(broken)
    assert error.value.culprit == str(compare)
    assert error.value.problem == "Comparison.blocks[1].ridge is a string, not a JSON object"
    assert error.value.fix == "run the step that writes it again"
    (broken / "run.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="run.json: is not a JSON object"):
        load_results(broken)


# ---------------------------------------------------------------------------------------------
# controls, nulls and sample size (keys of the shared result schema)

#: Planted controls: the random-weights control of resnet's sky sits above the trained probe, vgg's road likewise.
CONTROL_IOU = {("resnet", "sky"): [0.72, 0.86, 0.83], ("vgg", "road"): [0.42, 0.57, 0.62]}


def add_controls(out: Path) -> Path:
    """Add the controls' keys to a :func:`build_results` folder (as a run with controls on writes them)."""
    for model, (_, layers) in MODELS.items():
        path = out / f"probe_{model}_net2vec.json"
        data = json.loads(path.read_text())
        for i, layer in enumerate(layers):
            for concept, entry in data["metrics"][layer].items():
                iou = entry["set_iou"]
                control = CONTROL_IOU.get((model, concept), [0.1, 0.1, 0.1])[i]
                selectivity = None if iou is None else iou - control
                entry["controls"] = {"random_weights": {"set_iou": control}, "permuted_masks": {"set_iou": 0.05}}
                entry["selectivity"] = selectivity
                entry["selectivity_ci"] = None if selectivity is None else [selectivity - 0.03, selectivity + 0.03]
                entry["encoded"] = selectivity is not None and selectivity >= 0.05
                entry["verdict"] = "encoded" if entry["encoded"] else "below random-weights control" if control > 0.1 else "within the margin of the controls"
        write_json(path, data)
    for method in MATRICES:
        path = out / f"compare_{method}" / "compare.json"
        data = json.loads(path.read_text())
        for block in data["blocks"]:
            s = np.array(block["similarity"], dtype=float)
            cross = block["a"] != block["b"]
            block["null_mean"] = np.full(s.shape, 0.3).tolist()
            block["corrected"] = ((s - 0.3) / 0.7).tolist()
            block["p_value"] = np.full(s.shape, 0.5 if cross else 0.001).tolist()
            block["ci_low"], block["ci_high"] = (s - 0.05).tolist(), (s + 0.05).tolist()
            block["significant"] = np.full(s.shape, not cross).tolist()  # nothing across the models clears its null
            block["ridge"]["depth_correlation_ci"] = [-0.2, 0.95]
            for mode in ("pooled", "spatial"):
                c = np.array(block[f"cka_{mode}"], dtype=float)
                block[f"cka_{mode}_corrected"] = ((c - 0.8) / 0.2).tolist()
                block[f"cka_{mode}_significant"] = (c > 0.85).tolist()
        data["null"] = {"kind": "image_permutation", "n_permutations": 199, "seed": 0}
        data["bootstrap"] = {"n": 200, "level": 0.95}
        write_json(path, data)
    path = out / "tcav.json"
    data = json.loads(path.read_text())
    for record in data["records"]:
        record["run_std"] = 0.02
        record["ci_naive_low"], record["ci_naive_high"] = record["ci_low"], record["ci_high"]
        record["degenerate_layer"] = False
        planted = record["significant"]
        record["robust"] = not planted  # the one significant hypothesis fails the flattened-CAV variant
        record["variants"] = {"pooled": {"significant": planted, "p_value": 0.001}, "flattened": {"significant": False, "p_value": 0.3}}
        record["power"] = {"random_sets_needed": 12, "effect": 0.4}
    write_json(path, data)
    run = json.loads((out / "run.json").read_text())
    run["sample_size"] = {"n_test": 50, "adequate": False, "needed": 116, "reason": "50 test images are too few for 24 hypotheses: needs 116"}
    write_json(out / "run.json", run)
    return out


@pytest.fixture(scope="module")
def controlled_dir(results_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("controlled") / "results"
    shutil.copytree(results_dir, out)
    (out / "report.html").unlink(missing_ok=True)
    return add_controls(out)


def test_findings_are_stated_only_when_they_clear_their_controls(controlled_dir):
    from conceptlens.report.findings import not_distinguishable

    results = load_results(controlled_dir)
    sentences = findings(results)
    # resnet's sky is below its random-weights control everywhere: only vgg's half of the sentence survives
    assert "the concept sky is best encoded at relative depth 0.00 in vgg (backbone.block1, set IoU 0.91)" in sentences
    # wheel clears the controls at every layer: unchanged
    assert ("the concept wheel is best encoded at relative depth 0.50 in vgg (backbone.block2, set IoU 0.62) and 1.00 in resnet "
            "(layer3, set IoU 0.55)") in sentences
    assert not any("road is best encoded" in s or "ridge of vgg vs resnet" in s for s in sentences)
    assert "1 of 8 TCAV hypotheses are significant at α = 0.05 after holm correction; 0 of them also robust to every variant and on a non-degenerate layer" in sentences
    assert not any(s.startswith("for target") for s in sentences)
    # within-model similarity is judged on the chance-corrected scale: (0.7 + 0.6)/2 → (0.65 − 0.3)/0.7 = 0.5, 0.4 → 0.14
    assert any("mean chance-corrected similarity 0.50 between neighbours vs 0.14 otherwise" in s for s in sentences)
    rejected = dict(not_distinguishable(results))
    assert rejected["the concept sky is encoded in resnet (best raw set IoU 0.85 at layer2)"] == "below random-weights control"
    assert rejected["the concept road is encoded in vgg (best raw set IoU 0.60 at backbone.block3)"] == "below random-weights control"
    assert rejected["the concept road is encoded in resnet (best raw set IoU 0.08 at layer3)"] == "within the margin of the controls"
    assert rejected["the cross-model ridge of vgg vs resnet (supervised, Net2Vec)"] == "no best-match cell is above its permutation null after Holm correction"
    assert rejected["for target vgg:top:1, wheel at backbone.block3 is significant"] == "not significant in every robustness variant (fails: flattened)"
    assert len(rejected) == 6  # + the NMF cross-model ridge


def test_without_controls_nothing_is_rejected(results_dir):
    from conceptlens.report.findings import not_distinguishable, sample_size_notices

    results = load_results(results_dir)
    assert not_distinguishable(results) == [] and sample_size_notices(results) == []


@pytest.mark.slow
def test_report_with_controls(controlled_dir, report_text):
    from conceptlens.compare_output import _write_heatmaps

    for method in MATRICES:  # real heatmaps: corrected units, non-significant cells hatched
        folder = controlled_dir / f"compare_{method}"
        _write_heatmaps(Comparison.read(folder / "compare.json"), folder / "heatmaps", method, {name: spec for name, (spec, _) in MODELS.items()})
    text = write_report(controlled_dir).read_text(encoding="utf-8")
    parsed = parse(text)
    assert parsed.errors == [] and parsed.section_ids == [sid for sid, _ in SECTIONS]
    findings_text = " ".join(parsed.section_text["findings"])
    assert "Not distinguishable from control" in findings_text and "Resnet" not in findings_text
    assert ("<li>The concept sky is encoded in resnet (best raw set IoU 0.85 at layer2): below random-weights control. "
            '<a class="ref" href="#concept-sky">→ per-concept view</a></li>') in text
    # the sample-size notice heads the key findings, above everything it qualifies
    assert "test split too small for the run: 50 test images are too few for 24 hypotheses: needs 116" in findings_text.lower()
    assert "Probe vs controls across depth" in " ".join(parsed.section_text["probe-quality"])
    assert "chance-corrected" in " ".join(parsed.section_text["similarity"])
    assert "run sd" in " ".join(parsed.section_text["tcav"])
    assert write_report(controlled_dir).read_text(encoding="utf-8") == text  # deterministic
    for absent in ("Not distinguishable from control", "Probe vs controls", "Sample size."):  # controls off: as before
        assert absent not in report_text


def test_controls_keys_read_back_and_reach_the_csv(controlled_dir, tmp_path):
    from conceptlens.compare_output import _write_tables

    path = controlled_dir / "compare_net2vec" / "compare.json"
    record = Comparison.read(path)
    assert list(record.to_json().items()) == list(json.loads(path.read_text()).items())
    block = record.blocks[1]
    assert block.controlled("")["significant"][0][0] is False and block.ridge.depth_correlation_ci == (-0.2, 0.95)
    assert block.controlled("cka_spatial_")["corrected"] is not None and block.controlled("cka_pooled_")["p_value"] is None
    tcav = TCAVResults.read(controlled_dir / "tcav.json")
    assert tcav.records[2].robust is False and tcav.records[2].variants["flattened"]["significant"] is False and tcav.records[0].run_std == 0.02
    _write_tables(record, tmp_path / "pairs.csv", tmp_path / "concepts.csv")
    rows = list(__import__("csv").DictReader((tmp_path / "pairs.csv").open()))
    assert {"similarity_corrected", "similarity_p_value", "similarity_significant", "cka_pooled_corrected", "cka_spatial_significant"} <= set(rows[0])
    cell = next(r for r in rows if r["a"] == "vgg:backbone.block2" and r["b"] == "resnet:layer1")
    assert float(cell["similarity_corrected"]) == pytest.approx((0.2 - 0.3) / 0.7) and cell["similarity_significant"] == "False"
    mirrored = next(r for r in rows if r["a"] == "resnet:layer1" and r["b"] == "vgg:backbone.block2")
    assert mirrored["similarity_corrected"] == cell["similarity_corrected"]
    plain = tmp_path / "plain"
    _write_tables(Comparison.from_json({**json.loads(path.read_text()), "blocks": []}), plain.with_suffix(".csv"), tmp_path / "c2.csv")
    assert plain.with_suffix(".csv").read_text().splitlines()[0] == "a,b,depth_a,depth_b,similarity,cka_pooled,cka_spatial"


def test_tcav_power_notice(controlled_dir):
    import dataclasses

    from conceptlens.report.findings import sample_size_notices

    results = load_results(controlled_dir)
    power = {"random_sets_needed": None, "effect": 0.8, "min_for_correction": 840, "n_random_sets": 6, "alpha_per_test": 0.05 / 42}
    short = dataclasses.replace(results.tcav, records=tuple(dataclasses.replace(r, power=power) for r in results.tcav.records))
    notices = sample_size_notices(dataclasses.replace(results, tcav=short))
    assert ("too few TCAV random sets: with 6 the permutation test cannot reach the corrected level (α per test 0.0012) for any of 8 "
            "hypotheses; at least 840 are needed") in notices
    enough = dataclasses.replace(results.tcav, records=tuple(dataclasses.replace(r, power={**power, "n_random_sets": 900}) for r in results.tcav.records))
    assert not any("TCAV" in n for n in sample_size_notices(dataclasses.replace(results, tcav=enough)))


def test_adjacency_is_stated_only_over_significant_best_matches(controlled_dir, tmp_path):
    from conceptlens.report.findings import not_distinguishable

    out = tmp_path / "results"
    shutil.copytree(controlled_dir, out)
    path = out / "compare_net2vec" / "compare.json"
    data = json.loads(path.read_text())
    blocks = {(b["a"], b["b"]): b for b in data["blocks"]}
    vgg = blocks[("vgg", "vgg")]
    vgg["significant"] = [[None if i == j else False for j in range(len(row))] for i, row in enumerate(vgg["significant"])]
    resnet = blocks[("resnet", "resnet")]
    first, match = resnet["ridge"]["pairs"][0]["a"], resnet["ridge"]["pairs"][0]["b"]
    resnet["significant"][first][match] = resnet["significant"][match][first] = False  # one best match no longer clears its null
    write_json(path, data)
    results = load_results(out)
    sentences = findings(results)
    assert not any(s.startswith("within vgg") and "Net2Vec" in s for s in sentences)
    rejected = dict(not_distinguishable(results))
    assert rejected["within vgg, adjacent layers are the most similar (supervised, Net2Vec)"] == (
        "none of the 3 best-match cells is above its permutation null after Holm correction")
    resnet_sentences = [s for s in sentences if s.startswith("within resnet") and "Net2Vec" in s]
    assert len(resnet_sentences) == 1 and "2 of 3 best matches significant" in resnet_sentences[0]
    claims = [claim for claim in rejected if claim.startswith("within resnet, the best match of 1 of 3 layers (supervised, Net2Vec")]
    assert len(claims) == 1 and rejected[claims[0]] == "its cell is not above its permutation null after Holm correction"
    assert "the within-model ridge of vgg vs vgg (supervised, Net2Vec)" not in rejected  # judged once, as adjacency
    # the untouched NMF blocks keep their adjacency findings
    assert [s for s in sentences if s.startswith("within") and "NMF" in s] == [s for s in findings(load_results(controlled_dir)) if s.startswith("within") and "NMF" in s]


def test_ncav_matches_need_to_clear_their_permuted_masks_control(results_dir, tmp_path):
    from conceptlens.concepts.errors import ConceptLensError
    from conceptlens.concepts.store.artifacts import read_artifact

    from conceptlens.report.findings import not_distinguishable

    out = tmp_path / "ncav_controls"
    shutil.copytree(results_dir, out)
    (out / "report.html").unlink(missing_ok=True)
    meta, tensors = read_artifact(out / "prototypes" / "vgg", "report-prototypes", 1, (), ConceptLensError)
    # backbone.block2: wheel 0.41 vs control 0.38 (within the margin 0.05), sky 0.72 vs 0.10, car 0.18 (below NCAV_MATCH_IOU)
    controls = {"backbone.block1": [0.02, 0.01, None], "backbone.block2": [0.38, 0.17, 0.10], "backbone.block3": [0.05, 0.04, 0.01]}
    for layer, ncavs in meta["ncavs"].items():
        for ncav, control in zip(ncavs, controls[layer]):
            if control is not None:
                ncav["control_iou"] = control
    meta["control_margin"] = 0.05
    write_artifact(out / "prototypes" / "vgg", "report-prototypes", 1, dict(tensors), meta)
    results = load_results(out)
    assert results.prototypes["vgg"].meta.ncavs["backbone.block2"][0] == NCAVLabel("ncav_0", "wheel", 0.41, 0.38)
    sentences = findings(results)
    assert "in vgg, backbone.block2 has an NCAV matching sky (IoU 0.72)" in sentences
    assert not any("matching wheel (IoU 0.41)" in s for s in sentences)
    assert "in vgg, backbone.block3 has NCAVs matching car (IoU 0.33) and road (IoU 0.25)" in sentences
    assert "in resnet, layer3 has an NCAV matching car (IoU 0.55)" in sentences  # resnet has no NCAV controls: unchanged
    rejected = dict(not_distinguishable(results))
    assert rejected == {"in vgg, backbone.block2 has an NCAV matching wheel (IoU 0.41)":
                        "the IoU does not exceed its permuted-masks control (wheel 0.38) by the margin 0.05"}
    section = write_report(out).read_text(encoding="utf-8")
    rejected_list = section.split('<ul class="rejected">', 1)[1].split("</ul>", 1)[0]
    assert ("<li>In vgg, backbone.block2 has an NCAV matching wheel (IoU 0.41): the IoU does not exceed its permuted-masks control "
            "(wheel 0.38) by the margin 0.05. <a class=\"ref\" href=\"#ncavs-vgg-backbone-block2-") in rejected_list


def test_ncav_findings_without_control_margin_are_unchanged(results_dir, tmp_path):
    from conceptlens.concepts.errors import ConceptLensError
    from conceptlens.concepts.store.artifacts import read_artifact

    from conceptlens.report.results import PrototypesMeta

    out = tmp_path / "no_margin"
    shutil.copytree(results_dir, out)
    meta, _ = read_artifact(out / "prototypes" / "vgg", "report-prototypes", 1, (), ConceptLensError)
    assert "control_margin" not in meta and all("control_iou" not in n for ncavs in meta["ncavs"].values() for n in ncavs)
    record = {k: meta[k] for k in ("model", "layers", "ncavs", "fidelity")}
    assert PrototypesMeta.from_json(record).to_json() == record  # the record adds no key with controls off
    assert findings(load_results(out)) == findings(load_results(results_dir))


# ---------------------------------------------------------------------------------------------
# a report people explore: layout, links, per-concept view, tables, NCAVs, command folders


def _section(text: str, sid: str) -> str:
    return text.split(f'<section id="{sid}">', 1)[1].split("</section>", 1)[0]


def test_key_findings_first_and_run_summary_last(report_text):
    ids = parse(report_text).section_ids
    assert ids[0] == "findings" and ids[-1] == "summary" and ids.index("concepts") == 2
    assert "<h2>Key findings</h2>" in report_text and "<h2>Run summary (versions, hashes)</h2>" in report_text


def test_every_internal_link_has_its_target(results_dir, report_text):
    parsed = parse(report_text)
    assert len(parsed.ids) == len(set(parsed.ids))  # ids are unique
    assert sorted(set(parsed.links) - set(parsed.ids)) == []
    items = re.findall(r"<li>.*?</li>", _section(report_text, "findings"))
    assert len(items) == len(findings(load_results(results_dir)))
    assert all('class="ref" href="#' in item for item in items)  # each finding links to what it rests on


def test_anchors_are_unique_ids():
    from conceptlens.report.anchors import (
        concept_anchor,
        ncav_anchor,
        pair_anchor,
        slug,
    )

    assert concept_anchor("sky") == "concept-sky" and pair_anchor("vgg", "resnet") == "similarity-vgg-vs-resnet"
    assert concept_anchor("traffic light") != concept_anchor("traffic-light")  # replaced characters add a hash of the name
    assert re.fullmatch(r"ncavs-vgg-backbone-block2-[0-9a-f]{6}", ncav_anchor("vgg", "backbone.block2"))
    assert re.fullmatch(r"[A-Za-z0-9_-]+", slug("a b", "c:d/é"))


def test_concept_view_holds_every_concept_without_script(report_text):
    from conceptlens.report.anchors import concept_anchor

    view = report_text.split('<div id="concept-view">', 1)[1].split("</section>", 1)[0]
    assert re.findall(r'<option value="([^"]*)">', view) == [concept_anchor(c) for c in CONCEPTS]
    blocks = {c: view.split(f'<div class="concept-block" id="{concept_anchor(c)}">', 1)[1].split('<div class="concept-block"', 1)[0] for c in CONCEPTS}
    tips = re.findall(r"<title>([^<]*)</title>", blocks["wheel"])
    assert len(tips) == 6  # 2 models × 3 layers, one point each (no controls in this fixture)
    assert "vgg · backbone.block2 (relative depth 0.50): set IoU 0.62" in tips
    assert len(re.findall(r"<title>", blocks["car"])) == 5  # resnet's car has no set IoU at layer1: a gap, not a point
    assert blocks["wheel"].count('<tr class="sig">') == 1  # its TCAV rows: the planted hypothesis is significant
    # NCAVs whose best overlap is wheel: vgg block2 (0.41) matches; vgg block3 (0.05), resnet layer2 (0.09), layer3 (0.15) do not
    assert blocks["wheel"].count("<td>matches</td>") == 1 and blocks["wheel"].count('<span class="unmatched">unmatched</span>') == 3
    assert "No TCAV hypothesis tests this concept" in blocks["car"] and "No TCAV" not in blocks["sky"]
    assert all(f'alt="segmentation of {c}"' in blocks[c] for c in CONCEPTS)


def test_tables_carry_sort_keys_and_exact_values(report_text):
    tcav = _section(report_text, "tcav")
    assert '<table class="sortable filterable">' in tcav
    assert '<td class="num" data-sort="0.000375">&lt; 0.001</td>' in tcav  # the planted raw p: shown rounded, sorted by its value
    assert re.search(r'<td class="num" data-sort="0\.(91|90999)\d*" title="mean over runs = 0\.91">0\.91</td>', tcav)
    probe = _section(report_text, "probe-quality")
    assert '<table class="sortable filterable">' in probe
    assert '<td class="num" data-sort="0.62" title="test set IoU = 0.62">0.62</td>' in probe  # vgg's wheel at block2


def test_ncavs_read_unmatched_and_name_the_relative_error(report_text):
    from conceptlens.report.anchors import ncav_anchor

    ncavs = _section(report_text, "ncavs")
    assert "rel. error" not in ncavs and "fidelity" not in ncavs
    assert "relative reconstruction error (held-out)" in ncavs and "relative reconstruction error (training)" in ncavs
    unmatched = '<span class="unmatched">unmatched</span> <span class="dim">'
    assert f"<td><code>backbone.block1</code></td><td>ncav_2</td><td>{unmatched}(overlaps no concept)</span></td>" in ncavs
    assert f"<td><code>backbone.block1</code></td><td>ncav_0</td><td>{unmatched}(its best overlap, sky, has set IoU 0.12, below 0.2)</span></td>" in ncavs
    assert "<td><code>backbone.block2</code></td><td>ncav_0</td><td>wheel</td>" in ncavs
    # the per-layer summary lists the matches that count only: car (0.18) is below the match level
    block2 = ncavs.split(f'href="#{ncav_anchor("vgg", "backbone.block2")}"', 1)[1].split("</tr>", 1)[0]
    assert "wheel (0.41), sky (0.72)" in block2 and "car" not in block2
    assert f'<figure id="{ncav_anchor("vgg", "backbone.block2")}">' in ncavs


def test_ncav_figure_dims_the_patch_where_the_ncav_is_weak():
    from conceptlens.report.figures import ncav_figure

    patches = np.full((1, 2, 8, 8, 3), 200, dtype=np.uint8)
    heat = np.zeros((1, 2, 8, 8), dtype=np.uint8)
    heat[:, :, :, :4] = 255  # fires on the left half
    drawn = ncav_figure(patches, [NCAVLabel("ncav_0", "sky", 0.1)], "m", "l", matched=[False], heat=heat)
    shown = np.asarray(drawn.axes[0].images[0].get_array())
    assert (shown[:, :4] == 200).all() and (shown[:, 4:] == 60).all()  # 200 × (0.3 + 0.7 × weight)
    texts = [t.get_text() for t in drawn.axes[0].texts]
    assert texts[0] == "ncav_0 · unmatched" and texts[1] == "best overlap sky 0.10"
    plain = ncav_figure(patches, [NCAVLabel("ncav_0", "sky", 0.5)], "m", "l", matched=[True])
    assert (np.asarray(plain.axes[0].images[0].get_array()) == 200).all()
    assert plain.axes[0].texts[0].get_text() == "ncav_0 → sky\nset IoU 0.50"


def test_prototype_heat_reaches_the_report(results_dir, tmp_path):
    from conceptlens.concepts.errors import ConceptLensError
    from conceptlens.concepts.store.artifacts import read_artifact

    out = tmp_path / "heat"
    shutil.copytree(results_dir, out)
    meta, tensors = read_artifact(out / "prototypes" / "vgg", "report-prototypes", 1, (), ConceptLensError)
    tensors = dict(tensors)
    for index in range(3):
        tensors[f"heat_{index}"] = torch.full(tuple(tensors[f"patches_{index}"].shape[:4]), 128, dtype=torch.uint8)
    write_artifact(out / "prototypes" / "vgg", "report-prototypes", 1, tensors, meta)
    ncavs = _section(write_report(out).read_text(encoding="utf-8"), "ncavs")
    assert ncavs.count("no activation maps in these results") == 3  # resnet's layers only


def test_patch_heat_scales_the_map_by_the_ncav_peak():
    from conceptlens.concepts.geometry import Geometry

    from conceptlens.pipeline import PATCH_SIZE, _patch_heat

    geometry = Geometry((64, 64), (64, 64), (0, 0), (64, 64))
    peaks = {"geometry": [geometry], "cell": [[(3, 3)]], "shape": (8, 8)}
    flat = torch.full((1, 1, 8, 8), 2.0)
    assert (_patch_heat(flat, (64, 64), peaks, 0, 0, 4.0) == 128).all()  # half the NCAV's peak
    assert (_patch_heat(flat, (64, 64), peaks, 0, 0, 2.0) == 255).all()
    left = torch.zeros((1, 1, 8, 8))
    left[..., :4] = 2.0  # fires left of x = 32; the patch around cell (3, 3) spans x 20–35
    heat = _patch_heat(left, (64, 64), peaks, 0, 0, 2.0)
    assert heat.shape == (PATCH_SIZE, PATCH_SIZE) and heat.dtype == np.uint8
    assert (heat[:, 0] == 255).all() and (heat[:, -1] < 128).all() and (np.diff(heat.astype(int), axis=1) <= 0).all()


def test_report_renders_the_folders_of_single_commands(results_dir, tmp_path):
    probe = tmp_path / "probe"  # conceptlens probe: probe_<method>.json named by its model key
    probe.mkdir()
    data = json.loads((results_dir / "probe_vgg_net2vec.json").read_text())
    write_json(probe / "probe_net2vec.json", {**data, "model": "zoo:synthetic_vgg_centernet"})
    parsed = parse(write_report(probe).read_text(encoding="utf-8"))
    assert parsed.errors == [] and parsed.section_ids == [sid for sid, _ in SECTIONS]
    text = " ".join(parsed.section_text["probe-quality"])
    assert "zoo:synthetic_vgg_centernet" in text and "backbone.block2" in text and "0.62" in text
    for sid in ("segmentation", "ncavs", "similarity", "tcav", "summary"):
        assert NOT_RUN in " ".join(parsed.section_text[sid]), sid
    compare = tmp_path / "compare"  # conceptlens compare: compare.json with heatmaps/ beside it
    shutil.copytree(results_dir / "compare_net2vec", compare)
    text = write_report(compare).read_text(encoding="utf-8")
    parsed = parse(text)
    assert NOT_RUN not in " ".join(parsed.section_text["similarity"]) and NOT_RUN in " ".join(parsed.section_text["probe-quality"])
    assert len(parsed.images) == 1 + 3 * 3  # the flow plot, then per block the Net2Vec heatmap and both CKA ones
    tcav = tmp_path / "tcav"  # conceptlens tcav: tcav.json and tcav.csv
    tcav.mkdir()
    for name in ("tcav.json", "tcav.csv"):
        shutil.copy(results_dir / name, tcav / name)
    parsed = parse(write_report(tcav).read_text(encoding="utf-8"))
    assert len(parsed.images) == 2 and NOT_RUN in " ".join(parsed.section_text["similarity"])
    assert "wheel" in " ".join(parsed.section_text["concepts"])  # TCAV's concepts get their blocks


@pytest.mark.slow
def test_demo_report_is_light_offline_and_complete(tmp_path):
    from conceptlens.cli import demo_config_path
    from conceptlens.config import load_config
    from conceptlens.pipeline import run_pipeline
    from conceptlens.report.anchors import concept_anchor

    config = load_config(demo_config_path())
    result = run_pipeline(config, tmp_path / "demo", verbose=False)
    text = result.report.read_text(encoding="utf-8")
    assert result.report.stat().st_size < 5_000_000
    parsed = parse(text)
    assert parsed.errors == [] and all(url.startswith(("#", "data:image/png;base64,")) for url in parsed.urls)
    assert not re.search(r"https?://", text)
    for concept in config.data.concepts or load_results(tmp_path / "demo").concepts:
        assert f'<div class="concept-block" id="{concept_anchor(concept)}">' in text
    assert "no activation maps" not in text  # the pipeline writes where each NCAV fires


def test_tcav_bars_start_at_the_null_and_fade_when_not_significant():
    from conceptlens.report.figures import tcav_figure
    from conceptlens.report.results import TCAVRow

    rows = [TCAVRow(concept="wheel", layer="l", target="t", mean=0.9, null_mean=0.55, significant=True, ci_low=0.8, ci_high=0.95),
            TCAVRow(concept="sky", layer="l", target="t", mean=0.6, null_mean=0.55, significant=False, ci_low=0.3, ci_high=0.8),
            TCAVRow(concept="sail", layer="l", target="t", mean=0.4, significant=False)]  # no null: the bar starts at chance, 0.5
    bars = [p for p in tcav_figure(rows, "t", "sign_count", {}).axes[0].patches if p.get_height() == pytest.approx(0.7)]
    assert [(round(b.get_x(), 6), round(b.get_width(), 6)) for b in bars] == [(0.55, 0.35), (0.55, 0.05), (0.5, -0.1)]
    assert [b.get_alpha() for b in bars] == [0.85, 0.25, 0.25]
