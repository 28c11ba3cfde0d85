"""Probe controls: random-weights models, permuted masks, selectivity with its bootstrap CI, and the
planted-structure check on the synthetic world (a trained detector's parts clear both controls, a
random-weights model's do not)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conceptlens.concepts.data.dataset import ArrayDataset
from conceptlens.concepts.data.permuted import (
    PermutedMasks,
    derangement,
)
from conceptlens.concepts.embedding.masks import embed_masks
from conceptlens.concepts.models.loading import load_model
from conceptlens.concepts.models.randomize import randomized
from conceptlens.concepts.store.activations import ActivationStore
from conceptlens.probes.controls import (
    ControlError,
    ImageCounts,
    bootstrap_selectivity,
    control_records,
    image_counts,
    pooled_iou,
    probe_controls,
)
from conceptlens.probes.workflow import probe_model
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- permuted masks
def planted_dataset(n: int = 40, size: int = 32, seed: int = 0, sizes: list[int] | None = None) -> ArrayDataset:
    """Grey noise images with a red square; the mask of concept 'square' is the square."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        side = sizes[i] if sizes else size
        image = rng.integers(90, 140, (side, side, 3), dtype=np.uint8)
        mask = np.zeros((1, side, side), dtype=bool)
        top, left = rng.integers(0, side // 2, 2)
        mask[0, top : top + side // 3, left : left + side // 3] = True
        image[mask[0]] = (230, 20, 20)
        images.append(image)
        masks.append(mask)
    return ArrayDataset(images, masks, ["square"], name="planted", seed=seed)


def test_derangement_has_no_fixed_point_and_is_a_permutation():
    for n in (2, 3, 7, 50):
        p = derangement(n, np.random.default_rng(n))
        assert sorted(p.tolist()) == list(range(n))
        assert (p != np.arange(n)).all()
    assert derangement(1, np.random.default_rng(0)).tolist() == [0]


def test_permuted_view_deranges_within_splits_deterministically():
    data = planted_dataset(40)
    view = PermutedMasks(data, seed=3)
    assert (view.source != np.arange(40)).all()
    for split in ("train", "val", "test"):
        members = data.split_indices(split)
        assert sorted(view.source[members].tolist()) == members.tolist()  # stays inside its split
    assert view.source.tolist() == PermutedMasks(data, seed=3).source.tolist()
    assert view.source.tolist() != PermutedMasks(data, seed=4).source.tolist()
    for i in (0, 5, 39):
        assert np.array_equal(view.masks(i), data.masks(int(view.source[i])))
        assert np.array_equal(view.image(i), data.image(i))
    assert view.image_fingerprint() == data.image_fingerprint()  # activations are reused
    assert view.mask_fingerprint() not in (data.mask_fingerprint(), PermutedMasks(data, seed=4).mask_fingerprint())
    assert view.name != data.name and view.splits == data.splits


def test_permuted_view_resizes_masks_nearest_neighbour():
    data = planted_dataset(10, sizes=[16, 32] * 5)
    view = PermutedMasks(data, seed=0)
    i = next(i for i in range(10) if data.image_size(i) != data.image_size(int(view.source[i])))
    moved, original = view.masks(i), data.masks(int(view.source[i]))
    assert moved.shape[1:] == data.image_size(i) and moved.dtype == bool
    if original.shape[-1] == 16:  # 16 → 32: every source cell becomes a 2×2 block
        assert np.array_equal(moved, original.repeat(2, axis=1).repeat(2, axis=2))
    else:  # 32 → 16: cell centres 2j+1
        assert np.array_equal(moved, original[:, 1::2, 1::2])


# -------------------------------------------------------------------------- random weights
class WithToken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.token = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.norm(self.conv(x)) + self.token[:, None, None]


def test_randomized_model_is_new_deterministic_and_leaves_original():
    module = WithToken()
    module.norm.running_mean.fill_(3.0)
    trained = load_model(module, input_size=(8, 8))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng_state = torch.random.get_rng_state()
    control = randomized(trained, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # caller's RNG untouched
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # original untouched
    state = control.module.state_dict()
    assert not torch.equal(state["conv.weight"], before["conv.weight"])
    assert torch.equal(state["norm.running_mean"], torch.zeros(4)) and torch.equal(state["norm.running_var"], torch.ones(4))
    assert not torch.equal(state["token"], torch.ones(4)) and float(state["token"].std()) < 0.1  # N(0, 0.02²) fallback
    assert control.hash != trained.hash and control.adapter is trained.adapter and not control.module.training
    again, other = randomized(trained, seed=0), randomized(trained, seed=1)
    assert again.hash == control.hash and other.hash != control.hash
    assert "random weights, seed 0" in control.spec and control.weights == "random:0"


# --------------------------------------------------------------------- selectivity arithmetic
def counts(intersection, union) -> ImageCounts:
    i, u = np.array(intersection), np.array(union)
    return ImageCounts(["c"], np.arange(len(i)), i, u)


def test_pooled_iou_and_paired_bootstrap_by_hand():
    true = counts([[2], [3]], [[4], [4]])  # IoU 5/8
    rw = counts([[1], [1]], [[4], [4]])  # 2/8
    pm = counts([[0], [3]], [[4], [4]])  # 3/8
    assert pooled_iou(true.intersection, true.union).tolist() == [5 / 8]
    # resamples of 2 images: {0,0}: .5 − max(.25, 0) = .25; {1,1}: .75 − max(.25, .75) = 0; {0,1}: 5/8 − 3/8 = .25
    low, high = bootstrap_selectivity(true, {"random_weights": rw, "permuted_masks": pm}, n_bootstrap=400, seed=0)
    assert low[0] == pytest.approx(0.0) and high[0] == pytest.approx(0.25)
    records = control_records(true, {"random_weights": rw, "permuted_masks": pm}, {"random_weights": {"c": {"set_iou": 0.25}}}, margin=0.05)
    record = records["c"]
    assert record["selectivity"] == pytest.approx(0.25)
    assert record["selectivity_ci"] == [pytest.approx(0.0), pytest.approx(0.25)]
    assert not record["encoded"] and record["verdict"] == "selectivity CI includes zero"  # CI low = 0 is not > 0
    assert record["controls"]["random_weights"]["set_iou"] == 0.25 and record["controls"]["permuted_masks"]["set_iou"] is None


def test_no_bootstrap_means_no_interval_and_no_encoded_call():
    strong, weak = counts([[8]] * 30, [[10]] * 30), counts([[2]] * 30, [[10]] * 30)
    low, high = bootstrap_selectivity(strong, {"random_weights": weak}, n_bootstrap=0, seed=0)
    assert np.isnan(low).all() and np.isnan(high).all()
    record = control_records(strong, {"random_weights": weak}, {}, n_bootstrap=0)["c"]
    assert record["selectivity"] == pytest.approx(0.6) and record["selectivity_ci"] == [None, None]
    assert not record["encoded"] and record["verdict"].startswith("selectivity CI undefined")


def test_verdicts():
    n = 30
    strong = counts([[8]] * n, [[10]] * n)  # 0.8 on every image
    weak = counts([[2]] * n, [[10]] * n)  # 0.2
    near = counts([[7]] * n, [[9]] * n)  # 0.777…, 0.022 below strong
    record = control_records(strong, {"random_weights": weak, "permuted_masks": weak}, {})["c"]
    assert record["encoded"] and record["verdict"] == "clears both controls"
    assert record["selectivity"] == pytest.approx(0.6) and record["selectivity_ci"] == [pytest.approx(0.6), pytest.approx(0.6)]
    record = control_records(strong, {"random_weights": near, "permuted_masks": weak}, {})["c"]
    assert not record["encoded"] and record["verdict"] == "above the random-weights control by less than the margin 0.05"
    record = control_records(weak, {"random_weights": weak, "permuted_masks": strong}, {})["c"]
    assert record["selectivity"] == pytest.approx(-0.6) and record["verdict"] == "not above the permuted-masks control"
    empty = counts([[0]] * n, [[0]] * n)
    record = control_records(empty, {"random_weights": weak}, {})["c"]
    assert record["selectivity"] is None and not record["encoded"] and record["verdict"].startswith("undefined")
    none = ImageCounts(["c"], np.zeros(0, np.int64), np.zeros((0, 1), np.int64), np.zeros((0, 1), np.int64))
    assert all(np.isnan(end[0]) for end in bootstrap_selectivity(none, {"random_weights": none}))  # no test image: undefined
    with pytest.raises(ControlError):
        bootstrap_selectivity(strong, {"random_weights": counts([[8]] * (n - 1), [[10]] * (n - 1))})


# ------------------------------------------------------------------------------ end to end
def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))


def test_probe_model_controls_add_schema_keys_and_keep_raw_metrics(tmp_path):
    data = planted_dataset(40)
    store = ActivationStore(tmp_path / "store")
    model = load_model(tiny_model(), input_size=(32, 32))
    kwargs = {"params": {"max_epochs": 2}, "grid": (16, 16), "device": "cpu"}
    plain = probe_model(model, data, ["2"], store=store, **kwargs)
    checked = probe_model(model, data, ["2"], store=store, controls={"n_bootstrap": 50}, **kwargs)
    raw, metrics = plain.metrics["2"]["square"], checked.metrics["2"]["square"]
    assert {k: metrics[k] for k in raw} == raw  # raw values untouched, keys only added
    assert set(metrics) - set(raw) == {"controls", "selectivity", "selectivity_ci", "encoded", "verdict"}
    assert set(metrics["controls"]) == {"random_weights", "permuted_masks"}
    floor = max(metrics["controls"][k]["set_iou"] for k in metrics["controls"])
    assert metrics["selectivity"] == pytest.approx(raw["set_iou"] - floor)
    low, high = metrics["selectivity_ci"]
    assert low <= metrics["selectivity"] + 1e-9 and metrics["selectivity"] - 1e-9 <= high
    assert isinstance(metrics["encoded"], bool) and isinstance(metrics["verdict"], str)
    # the streamed per-image counts give back the set IoU the probe's evaluation reported
    masks = embed_masks(data, store, grid=(16, 16))
    counted = image_counts(plain.banks["2"], plain.activations["2"], masks, device="cpu")
    assert counted.indices.tolist() == data.split_indices("test").tolist()
    assert pooled_iou(counted.intersection, counted.union)[0] == pytest.approx(raw["set_iou"], abs=1e-12)


def test_controls_refuse_unsupervised_probes(tmp_path):
    data = planted_dataset(40)
    probed = probe_model(load_model(tiny_model(), input_size=(32, 32)), data, ["2"], "nmf", ActivationStore(tmp_path), params={"n_components": 2}, grid=(8, 8), device="cpu")
    with pytest.raises(ControlError, match="Net2Vec"):
        probe_controls(probed, data, ActivationStore(tmp_path))


# ------------------------------------------------------------- planted structure on the zoo
PARTS = ["wheel", "window", "roof", "trunk", "crown"]


@pytest.mark.slow
def test_trained_detector_parts_clear_controls_random_model_parts_do_not(tmp_path):
    from conceptlens.concepts.data.synthetic import SyntheticWorld

    world = SyntheticWorld(n_images=120, seed=11).select_concepts([*PARTS, "sky"])
    store, settings = ActivationStore(tmp_path), {"params": {"max_epochs": 10}, "grid": (32, 32), "device": "cpu"}
    trained = load_model("zoo:synthetic_vgg_centernet")
    probed = probe_model(trained, world, ["backbone.block3"], store=store, controls=True, **settings)
    found = probed.metrics["backbone.block3"]
    for part in PARTS:  # the trained detector encodes its parts: above both controls by the margin, CI above 0
        assert found[part]["encoded"], (part, found[part])
        assert found[part]["set_iou"] > found[part]["controls"]["random_weights"]["set_iou"] + 0.1
    # sky is a large colour region that a random conv net segments almost as well: not encoded
    assert not found["sky"]["encoded"] and found["sky"]["controls"]["random_weights"]["set_iou"] > 0.8
    assert found["sky"]["set_iou"] > 0.9  # … although its raw IoU is the highest of all
    random_model = randomized(trained, seed=0)  # the random-weights model itself, checked against another random draw
    noise = probe_model(random_model, world, ["backbone.block3"], store=store, controls={"seed": 1}, **settings).metrics["backbone.block3"]
    for part in PARTS:  # its probes are no better than another random draw's (measured: −0.08 … +0.01)
        assert not noise[part]["encoded"] and noise[part]["selectivity"] < 0.05, (part, noise[part])
