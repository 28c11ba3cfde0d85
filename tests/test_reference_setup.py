"""The reference setup runs: detectors that pad each batch to its own size, end to end.

* The store's row reader on shards of different padded map sizes (as torchvision's Faster R-CNN
  and RetinaNet write them): every item read in a mixed request equals the item read alone, on
  its own cells, on the concept grid and in the concept maps.
* The whole pipeline (probe → compare → TCAV → report) on torchvision Faster R-CNN, RetinaNet and
  SSD(Lite) with random weights, on synthetic scenes of mixed sizes and aspect ratios, in the shape
  of ``configs/coco_detectors.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conceptlens.concepts.errors import StoreError
from conceptlens.concepts.geometry import Geometry, features_to_grid, image_cells
from conceptlens.concepts.store.activations import ActivationStore, EntryReader, padded_geometry
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.concepts.vectors.concept_maps import concept_map_entry

CHANNELS = 3
# (canvas, map size, resized size) per shard: strides 8 (exact), 8 (exact) and 352/6 (not an integer)
SHARDS = [((32, 48), (4, 6), (32, 40)), ((40, 40), (5, 5), (24, 40)), ((352, 352), (6, 6), (300, 352))]
ITEMS_PER_SHARD = 2


def _write_entry(store: ActivationStore, shards=SHARDS, reduce: str = "native"):
    """An activation entry of two items per shard, each shard with its own canvas and map size."""
    entry = store.entry({"test": "mixed map sizes", "shards": [list(map(list, s)) for s in shards], "reduce": reduce})
    generator = torch.Generator().manual_seed(0)
    for number, (canvas, size, resized) in enumerate(shards):
        start = number * ITEMS_PER_SHARD
        activations = torch.randn(ITEMS_PER_SHARD, CHANNELS, *size, generator=generator)
        geometry = torch.tensor([[50 + i, 60, *resized, 0, 0, *canvas] for i in range(ITEMS_PER_SHARD)])
        entry.write_shard(start, start + ITEMS_PER_SHARD, {"activations": activations, "geometry": geometry})
    n_items = ITEMS_PER_SHARD * len(shards)
    entry.finalize({"request": {"reduce": reduce}, "dataset": {"ids": [f"item{i}" for i in range(n_items)]}}, n_items)
    return entry


def _alone(reader: EntryReader, index: int) -> tuple[torch.Tensor, Geometry]:
    rows = reader.rows([index])
    return rows["activations"][0], Geometry.from_list(rows["geometry"][0].tolist())


def test_padded_geometry_hand_computed():
    # stride 32 divides the canvas: only the canvas grows, by two cells of 32 px
    assert padded_geometry([100, 150, 320, 480, 0, 0, 320, 480], (10, 15), (10, 17)) == [100, 150, 320, 480, 0, 0, 320, 544]
    # pitch 352/6 is not an integer: 7 cells need canvas 352·7/6, so everything on that axis is scaled by 3
    assert padded_geometry([100, 100, 352, 352, 0, 0, 352, 352], (6, 6), (7, 6)) == [100, 100, 1056, 352, 0, 0, 1232, 352]
    assert padded_geometry([9, 9, 30, 20, 1, 2, 32, 48], (4, 6), (4, 6)) == [9, 9, 30, 20, 1, 2, 32, 48]


def test_rows_across_shards_of_different_map_sizes_equal_each_item_read_alone(tmp_path):
    entry = _write_entry(ActivationStore(tmp_path))
    reader = EntryReader(entry)
    order = [5, 0, 3, 1, 4, 2]  # every shard, out of order
    rows = reader.rows(order)
    assert tuple(rows["activations"].shape) == (6, CHANNELS, 6, 6)
    for row, index in enumerate(order):
        alone, geometry = _alone(reader, index)
        height, width = alone.shape[-2:]
        padded = rows["activations"][row]
        padded_geometry_ = Geometry.from_list(rows["geometry"][row].tolist())
        assert torch.equal(padded[:, :height, :width], alone)  # the item's own cells, untouched
        assert padded[:, height:].abs().sum() == 0 and padded[:, :, width:].abs().sum() == 0  # zero padding
        assert padded_geometry_.image_size == geometry.image_size
        own = image_cells(geometry, (height, width))
        cells = image_cells(padded_geometry_, (6, 6))
        assert torch.equal(cells[:height, :width], own) and not cells[height:].any() and not cells[:, width:].any()
        for grid in [(7, 5), (16, 16)]:
            torch.testing.assert_close(
                features_to_grid(padded[None], [padded_geometry_], grid), features_to_grid(alone[None], [geometry], grid), atol=1e-5, rtol=1e-5
            )


def test_rows_of_one_map_size_are_returned_as_stored(tmp_path):
    entry = _write_entry(ActivationStore(tmp_path), shards=[SHARDS[0], SHARDS[0]])
    stored = torch.cat([tensors["activations"] for _, _, tensors in entry.iter_shards()])
    geometry = torch.cat([tensors["geometry"] for _, _, tensors in entry.iter_shards()])
    rows = EntryReader(entry).rows([3, 0, 2])
    assert torch.equal(rows["activations"], stored[[3, 0, 2]]) and torch.equal(rows["geometry"], geometry[[3, 0, 2]])


def test_rows_whose_channels_differ_between_shards_are_refused(tmp_path):
    entry = ActivationStore(tmp_path).entry({"test": "channels differ"})
    for start, channels in [(0, 3), (1, 4)]:
        entry.write_shard(start, start + 1, {"activations": torch.zeros(1, channels, 2, 2), "geometry": torch.tensor([[8, 8, 8, 8, 0, 0, 8, 8]])})
    entry.finalize({"dataset": {"ids": ["a", "b"]}}, 2)
    with pytest.raises(StoreError, match="differ in shape beyond the map size"):
        EntryReader(entry).rows([0, 1])


@pytest.mark.parametrize("method", ["net2vec", "nmf"])
def test_concept_maps_over_mixed_shards_equal_maps_of_each_item_alone(tmp_path, method):
    store = ActivationStore(tmp_path)
    entry = _write_entry(store)
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(2, CHANNELS, generator=generator)
    bank = ConceptBank(method, "layer", ["a", "b"], vectors.abs() if method == "nmf" else vectors, torch.tensor([0.0, 0.0] if method == "nmf" else [0.3, -0.2]))
    together = concept_map_entry(bank, entry, list(range(6)), (9, 7), store, batch_size=6).read_all("maps").float()
    for index in range(6):
        alone = concept_map_entry(bank, entry, [index], (9, 7), store).read_all("maps").float()
        torch.testing.assert_close(together[index : index + 1], alone, atol=2e-3, rtol=0)  # float16 storage


def test_concept_maps_of_grid_reduced_activations_ignore_the_canvas(tmp_path):
    # activations already on a 4×6 concept grid over the original image (reduce='grid'), stored with a
    # padded canvas geometry: the maps are the bank's maps of those cells, not a resampled corner
    store = ActivationStore(tmp_path)
    entry = _write_entry(store, shards=[((64, 96), (4, 6), (32, 40))], reduce="grid")
    bank = ConceptBank("net2vec", "layer", ["a"], torch.ones(1, CHANNELS), torch.zeros(1))
    activations = entry.read_all()
    same = concept_map_entry(bank, entry, [0, 1], (4, 6), store).read_all("maps").float()
    torch.testing.assert_close(same, torch.sigmoid(activations.sum(dim=1, keepdim=True)), atol=2e-3, rtol=0)
    finer = concept_map_entry(bank, entry, [0, 1], (8, 12), store).read_all("maps").float()
    expected = torch.sigmoid(torch.nn.functional.interpolate(activations.sum(dim=1, keepdim=True), size=(8, 12), mode="bilinear", align_corners=False))
    torch.testing.assert_close(finer, expected, atol=2e-3, rtol=0)


# ------------------------------------------------------------------------------ the whole pipeline
def _seeded(build, kaiming: bool = False, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(weights=None, weights_backbone=None, **kwargs)
        for module in model.modules() if kaiming else ():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_in")
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
        return model


# The reference config's detectors, built as torchvision builds them with random weights, at a small
# input scale so that a CPU runs them in seconds (the resize and the padding to multiples of 32 stay),
# and with every detection kept (score threshold 0) so that a random-weights model has a "car" box.
def faster_rcnn():
    from torchvision.models import detection

    return _seeded(detection.fasterrcnn_resnet50_fpn, min_size=96, max_size=192, box_score_thresh=0.0, box_detections_per_img=1000,
                   rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20)


def retinanet():
    from torchvision.models import detection

    return _seeded(detection.retinanet_resnet50_fpn, min_size=96, max_size=192, score_thresh=0.0, detections_per_img=1000, topk_candidates=200)


def ssd():
    # SSDLite: SSD300-VGG16 costs seconds per image on a CPU. Its own random init (normal, std 0.03)
    # makes activations vanish (|a| < 1e-6 at features.0.6, < 1e-12 at features.0.13: zero in
    # float16, so NMF finds no positive pixel), and so does MobileNetV3's fan-out kaiming init
    # (std 1e-6 at features.0.13); a fan-in kaiming init keeps every layer at std ≈ 1–9.
    from torchvision.models import detection

    return _seeded(detection.ssdlite320_mobilenet_v3_large, kaiming=True, score_thresh=0.0, detections_per_img=1000, topk_candidates=20)


REFERENCE = """
name: reference-setup
seed: 0
device: cpu
data:
  spec: {data}
  concepts: [car, wheel, window, sky]
models:
  - name: ssd
    spec: {here}:ssd
    layers: [backbone.features.0.6, backbone.features.0.13]
  - name: faster_rcnn
    spec: {here}:faster_rcnn
    layers: [backbone.body.layer1, backbone.body.layer2]
  - name: retinanet
    spec: {here}:retinanet
    layers: [backbone.body.layer1, backbone.body.layer2]
embed: {{grid: [12, 12], dtype: float16, batch_size: 4}}
probes:
  net2vec: {{max_epochs: 1}}
  nmf: {{k: 2}}
tcav:
  enabled: true
  concepts: [wheel, sky]
  images_per_set: 3
  random_sets: 2
  targets:
    - {{spec: "top:3", inputs: car, max_inputs: 2}}
  n_bootstrap: 20
report: {{examples: 1, prototypes: 1}}
controls: {{enabled: false}}
"""


@pytest.mark.slow
def test_pipeline_on_torchvision_detectors_with_mixed_image_sizes(tmp_path):
    from conceptlens.concepts.data.folder import write_folder_dataset
    from conceptlens.concepts.data.synthetic import SyntheticWorld
    from conceptlens.config import load_config
    from conceptlens.pipeline import run_pipeline

    world = SyntheticWorld(n_images=20, seed=0, size_range=(64, 200))  # aspect ratios from 1:3 to 3:1
    write_folder_dataset(world, tmp_path / "world", seed=0)
    config_path = tmp_path / "reference.yaml"
    config_path.write_text(REFERENCE.format(data=tmp_path / "world", here=Path(__file__).resolve()))
    torch.set_num_threads(2)
    result = run_pipeline(load_config(config_path), tmp_path / "out", source=str(config_path))
    out = tmp_path / "out"

    # the test images of the padded detectors lie in shards of different padded map sizes
    store = ActivationStore(out / "store")
    padded = [e for e in store.entries() if e.manifest().get("request", {}).get("layer") == "backbone.body.layer2"]
    assert padded and all(len({tuple(t["activations"].shape[-2:]) for _, _, t in e.iter_shards()}) > 1 for e in padded)

    summary = json.loads((out / "run.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["ssd", "faster_rcnn", "retinanet"]
    for method in ("net2vec", "nmf"):
        compare = json.loads((out / f"compare_{method}" / "compare.json").read_text())
        labels = [layer["label"] for layer in compare["layers"]]
        assert labels[:2] == ["ssd:backbone.features.0.6", "ssd:backbone.features.0.13"] and len(labels) == 6
        assert len(compare["blocks"]) == 6  # 3 within-model + 3 cross-model blocks
        for block in compare["blocks"]:
            values = [v for row in block["similarity"] for v in row]
            assert len(values) == 4 and all(v is None or 0.0 <= v <= 1.0 for v in values)
            if method == "net2vec":
                assert all(v is not None and -1e-6 <= v <= 1 + 1e-6 for row in block["cka_pooled"] for v in row)
    tcav = json.loads((out / "tcav.json").read_text())
    records = tcav["records"] if isinstance(tcav, dict) else tcav
    layers = {r["layer"] for r in records}
    for layer in ("backbone.features.0.6", "backbone.features.0.13", "backbone.body.layer1", "backbone.body.layer2"):
        assert any(found.endswith(layer) for found in layers), (layer, layers)
    assert {r["concept"] for r in records} == {"wheel", "sky"} and all(r["n_inputs"] >= 1 for r in records)
    assert result.report is not None and result.report.is_file()
