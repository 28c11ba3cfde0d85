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
controls: {n_permutations: 19, n_bootstrap: 20, control_epochs: 1}
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


@pytest.mark.slow
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


def _raw(out):
    """The raw numbers of a run: probe metrics without the controls' keys, the comparisons' raw matrices, TCAV means."""
    control_keys = {"controls", "selectivity", "selectivity_ci", "encoded", "verdict"}
    probe = json.loads((out / "probe_vgg_net2vec.json").read_text())["metrics"]
    probes = {layer: {c: {k: v for k, v in m.items() if k not in control_keys} for c, m in by.items()} for layer, by in probe.items()}
    compares = {}
    for method in ("net2vec", "nmf"):
        data = json.loads((out / f"compare_{method}" / "compare.json").read_text())
        compares[method] = (data["matrix"], data["cka"], [(b["similarity"], b["cka_pooled"], b["ridge"]["pairs"]) for b in data["blocks"]])
    records = json.loads((out / "tcav.json").read_text())["records"]
    tcav = [(r["concept"], r["layer"], r["target"], r["mean"], r["null_mean"], r["scores"]["sign_count"], r["null_scores"]["sign_count"]) for r in records]
    # gradient magnitudes: the same up to float32 rounding (runs in one process may pick other kernels; separate processes agree bit for bit)
    magnitudes = [pytest.approx(r["scores"][m], rel=1e-5) for r in records for m in ("magnitude", "mean_sensitivity")]
    return probes, compares, tcav, magnitudes


@pytest.mark.slow
def test_controls_sit_beside_unchanged_raw_values_and_switch_off(small_run, tmp_path, capsys):
    config_path, out, _ = small_run
    # controls on (the default): every result carries them
    probe = json.loads((out / "probe_vgg_net2vec.json").read_text())
    entry = probe["metrics"]["backbone.block4"]["sky"]
    assert set(entry["controls"]) == {"random_weights", "permuted_masks"} and isinstance(entry["encoded"], bool) and entry["verdict"]
    assert entry["selectivity"] == pytest.approx(entry["set_iou"] - max(c["set_iou"] for c in entry["controls"].values()))
    compare = json.loads((out / "compare_net2vec" / "compare.json").read_text())
    assert compare["null"] == {"kind": "image_permutation", "n_permutations": 19, "seed": 0} and compare["bootstrap"]["n"] == 20
    block = compare["blocks"][1]
    for key in ("null_mean", "corrected", "p_value", "ci_low", "ci_high", "significant", "cka_pooled_corrected", "cka_spatial_significant"):
        assert len(block[key]) == len(block["rows"]), key
    s, null, corrected = block["similarity"][0][0], block["null_mean"][0][0], block["corrected"][0][0]
    assert corrected == pytest.approx((s - null) / (1 - null), abs=1e-5)
    assert "similarity_corrected" in (out / "compare_net2vec" / "compare.csv").read_text().splitlines()[0]
    tcav = json.loads((out / "tcav.json").read_text())
    assert all(isinstance(r["robust"], bool) and set(r["variants"]) == {"pooled", "svm", "half_random_sets", "flattened"} for r in tcav["records"])
    size = json.loads((out / "run.json").read_text())["sample_size"]
    # 48 images, 20 % test; 6 concepts × 4 layers: far too few
    assert (size["n_test"], size["n_hypotheses"], size["adequate"]) == (9, 24, False) and size["needed"] > 9
    assert "Sample size." in (out / "report.html").read_text()
    # compare.json: its largest Holm family (the 2 × 2 cross-model block) over the 9 test images
    compare_size = compare["sample_size"]
    from conceptlens.concepts.data.sample_size import DEFAULT_SIGMA, sample_size_check
    assert (compare_size["n_test"], compare_size["n_hypotheses"], compare_size["alpha"]) == (9, 4, 0.05)
    assert compare_size["sigma"] != DEFAULT_SIGMA  # from the bootstrap CIs of the tested cells
    assert compare_size == sample_size_check(9, 4, 0.05, sigma=compare_size["sigma"]).to_json()
    # tcav.json: every hypothesis (2 concepts × 2 layers × 2 models) over the fewest scored inputs (≤ max_inputs 5)
    tcav_size = tcav["sample_size"]
    assert tcav_size["n_hypotheses"] == 8 == tcav["n_hypotheses"] and 1 <= tcav_size["n_test"] <= 5 and tcav_size["adequate"] is False
    # --no-controls: the same raw numbers, no control keys
    off = tmp_path / "off"
    assert main(["run", str(config_path), "--out", str(off), "--no-controls", "--quiet"]) == 0
    raw_off, raw_on = _raw(off), _raw(out)
    assert raw_off[:3] == raw_on[:3]
    assert [value.expected for value in raw_off[3]] == raw_on[3]
    assert "controls" not in json.loads((off / "probe_vgg_net2vec.json").read_text())["metrics"]["backbone.block4"]["sky"]
    plain = json.loads((off / "compare_net2vec" / "compare.json").read_text())
    assert "null" not in plain and "corrected" not in plain["blocks"][1] and "sample_size" not in plain
    assert "sample_size" not in json.loads((off / "tcav.json").read_text())
    assert "sample_size" not in json.loads((off / "run.json").read_text())
    assert json.loads((off / "run.json").read_text())["config"]["controls"]["enabled"] is False
    report = (off / "report.html").read_text()
    assert "Not distinguishable from control" not in report and "Sample size." not in report
    # NCAV matches: with controls on, each carries its permuted-masks control IoU (same maps, masks moved); off: no key
    meta_on = read_artifact(out / "prototypes" / "resnet", PROTOTYPES_KIND, 1, (), ConceptLensError)[0]
    meta_off = read_artifact(off / "prototypes" / "resnet", PROTOTYPES_KIND, 1, (), ConceptLensError)[0]
    assert meta_on["control_margin"] == 0.05 and "control_margin" not in meta_off
    matched = [n for ncavs in meta_on["ncavs"].values() for n in ncavs if n["label"] is not None]
    assert matched and all(0.0 <= n["control_iou"] <= 1.0 for n in matched)
    assert any(n["control_iou"] != n["set_iou"] for n in matched)
    assert all("control_iou" not in n for ncavs in meta_off["ncavs"].values() for n in ncavs)
    strip = lambda ncavs: {layer: [{k: v for k, v in n.items() if k != "control_iou"} for n in items] for layer, items in ncavs.items()}  # noqa: E731
    assert strip(meta_on["ncavs"]) == meta_off["ncavs"]
