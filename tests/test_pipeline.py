"""``conceptlens run``: a reduced demo config end to end, the second run without a forward pass, the report."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from conceptlens.concepts.store.artifacts import read_artifact
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.cli import main
from conceptlens.config import load_config
from conceptlens.pipeline import EXAMPLES_KIND, PROTOTYPES_KIND, run_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_DEMO = """
name: small-demo
seed: 0
data:
  spec: synthetic:48:0
  concepts: [car, house, wheel, window, sky, water]
models:
  - name: vgg
    spec: zoo:synthetic_vgg_centernet
    layers: [backbone.block2, backbone.block4]
  - name: resnet
    spec: zoo:synthetic_resnet_fpn
    layers: [backbone.block1, neck.p3]
embed: {grid: [16, 16], batch_size: 16}
probes:
  net2vec: {max_epochs: 2}
  nmf: {k: 3}
tcav:
  enabled: true
  concepts: [wheel, sky]
  images_per_set: 6
  random_sets: 3
  targets:
    - {spec: "top:1", inputs: car, max_inputs: 5}
  n_bootstrap: 40
report: {examples: 2, prototypes: 2}
"""

SECTIONS = ("summary", "probe-quality", "segmentation", "ncavs", "similarity", "tcav", "findings")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    config_path = folder / "small.yaml"
    config_path.write_text(SMALL_DEMO)
    result = run_pipeline(load_config(config_path), folder / "out", source=str(config_path))
    return config_path, folder / "out", result


def test_every_step_writes_its_results(small_run):
    _, out, result = small_run
    summary = json.loads((out / "run.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["vgg", "resnet"]
    assert summary["data"]["n_images"] == 48 and summary["data"]["concepts"] == ["car", "house", "wheel", "window", "sky", "water"]
    names = [step["name"] for step in summary["steps"]]
    for expected in ("probe vgg net2vec", "probe resnet nmf", "compare net2vec", "compare nmf", "tcav", "examples vgg", "prototypes resnet"):
        assert expected in names
    assert not any(step["skipped"] for step in summary["steps"])

    probe = json.loads((out / "probe_vgg_net2vec.json").read_text())
    assert probe["layers"] == ["backbone.block2", "backbone.block4"] and probe["depths"] == [0.0, 1.0]
    best = probe["best_layer"]["sky"]
    assert best["set_iou"] == max(probe["metrics"][layer]["sky"]["set_iou"] for layer in probe["layers"])
    compare = json.loads((out / "compare_net2vec" / "compare.json").read_text())
    assert [layer["label"] for layer in compare["layers"]][:2] == ["vgg:backbone.block2", "vgg:backbone.block4"]
    assert (out / "compare_nmf" / "heatmaps" / "nmf_vgg_vs_resnet.png").is_file()

    tcav = json.loads((out / "tcav.json").read_text())
    assert {r["target"] for r in tcav["records"]} == {"vgg:top:1", "resnet:top:1"}
    assert tcav["n_hypotheses"] == 2 * 2 * 2  # concepts × layers × models (one target each)
    p = sorted(r["p"] for r in tcav["records"])
    assert min(r["p_bonferroni"] for r in tcav["records"]) == pytest.approx(min(1.0, p[0] * 8))  # corrected over both models

    examples = read_artifact(out / "examples" / "vgg", EXAMPLES_KIND, 1, (), ConceptLensError)
    metadata, tensors = examples
    assert metadata["n_examples"] == 2
    image, truth, predicted = tensors["image_0"], tensors["truth_0"], tensors["pred_0"]
    assert truth.shape == predicted.shape == (len(metadata["concepts"]), *image.shape[:2])
    assert 0 <= float(predicted.float().min()) and float(predicted.float().max()) <= 1
    prototypes_meta, prototypes = read_artifact(out / "prototypes" / "resnet", PROTOTYPES_KIND, 1, (), ConceptLensError)
    assert prototypes["patches_0"].shape[:2] == (3, 2) and prototypes_meta["layers"] == ["backbone.block1", "neck.p3"]


def test_second_run_does_no_forward_pass(small_run, monkeypatch):
    config_path, out, _ = small_run
    calls = []
    original = torch.nn.Module.__call__

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", counting)
    result = run_pipeline(load_config(config_path), out, source=str(config_path))
    assert calls == []
    heavy = [s for s in result.steps if s["name"].startswith(("compare", "tcav", "examples", "prototypes", "report"))]
    assert heavy and all(s["skipped"] for s in heavy)


class _StrictHTML(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.counts: dict[str, int] = {}
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes.get("src", ""))
        self.links.extend(v for k, v in attrs if k in ("href", "src") and v)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_report_has_every_section_and_is_self_contained(small_run):
    _, out, result = small_run
    html = (out / "report.html").read_text()
    assert result.report == out / "report.html"
    parser = _StrictHTML()
    parser.feed(html)
    parser.close()
    assert parser.stack == [] and parser.counts["html"] == parser.counts["head"] == parser.counts["body"] == 1
    for section in SECTIONS:
        assert re.search(rf'<section[^>]*id="{section}"', html), section
    assert len(parser.images) >= 6
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert all(link.startswith(("data:", "#")) for link in parser.links)
    assert "http://" not in html and "https://" not in html and "<script src" not in html


def test_cli_run_and_report(small_run, tmp_path, capsys):
    config_path, out, _ = small_run
    assert main(["run", str(config_path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "up to date, skipped" in printed and f"report: {out / 'report.html'}" in printed
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()


def test_missing_files_of_a_config_are_named(tmp_path, capsys):
    config = tmp_path / "coco.yaml"
    config.write_text(SMALL_DEMO.replace("spec: synthetic:48:0", f"spec: {tmp_path}/annotations.json\n  coco_images: {tmp_path}/val2017"))
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "annotations.json" in error and "val2017" in error
    assert not (tmp_path / "out").exists()


def test_tcav_sets_from_an_image_sets_folder(tmp_path):
    from conceptlens.concepts.data.synthetic import SyntheticWorld

    world = SyntheticWorld(24, seed=9)
    sky = world.concepts.index("sky")
    root = tmp_path / "sets"
    for name, indices in {"skyish": [i for i in range(24) if world.masks(i)[sky].mean() > 0.3][:6],
                          "random_0": range(0, 6), "random_1": range(6, 12), "random_2": range(12, 18)}.items():
        (root / name).mkdir(parents=True)
        for i in indices:
            Image.fromarray(world.image(i)).save(root / name / f"{name}_{i}.png")
    config = tmp_path / "sets.yaml"
    config.write_text(SMALL_DEMO.replace("  spec: synthetic:48:0", f"  spec: synthetic:48:0\n  image_sets: {root}")
                      .replace("  concepts: [wheel, sky]\n", "").replace("report: {examples: 2, prototypes: 2}", "report: {enabled: false}"))
    run_pipeline(load_config(config), tmp_path / "out", source=str(config))
    tcav = json.loads((tmp_path / "out" / "tcav.json").read_text())
    assert {r["concept"] for r in tcav["records"]} == {"skyish"}
    assert tcav["provenance"]["sets"]["random_2"] == [f"random_2_{i}" for i in range(12, 18)]
    assert tcav["n_hypotheses"] == 1 * 2 * 2 and all(len(r["null_scores"]["sign_count"]) == 3 for r in tcav["records"])


def test_comparison_without_cka(tmp_path):
    config = tmp_path / "nocka.yaml"
    config.write_text(SMALL_DEMO.replace("  nmf: {k: 3}", "  nmf: {enabled: false}").replace("tcav:\n  enabled: true", "compare: {methods: [net2vec]}\ntcav:\n  enabled: false"))
    run_pipeline(load_config(config), tmp_path / "out", source=str(config))
    compare = json.loads((tmp_path / "out" / "compare_net2vec" / "compare.json").read_text())
    assert compare["cka"] is None and all(block["cka_pooled"] is None for block in compare["blocks"])
    heatmaps = sorted(p.name for p in (tmp_path / "out" / "compare_net2vec" / "heatmaps").iterdir())
    assert heatmaps and not any(name.startswith("cka") for name in heatmaps)
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="similarity"' in html and "linear CKA (pooled)" not in html
