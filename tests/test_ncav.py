"""NCAV importance (attribution/ncav.py): hand-computed gradients, ICE's finite differences, explanations."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from conceptlens.attribution.ncav import (
    NCAVError,
    NCAVImportance,
    ncav_importance,
    ncav_importance_finite_difference,
)
from conceptlens.attribution.targets import ClassProbability, TopDetection
from conceptlens.concepts.models.adapters import DetectorAdapter
from conceptlens.concepts.models.loading import LoadedModel, load_model
from conceptlens.concepts.data.synthetic import SyntheticWorld
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.probes.nmf import NMFConcepts

pytestmark = pytest.mark.usefixtures("one_thread")

ZOO = "zoo:synthetic_vgg_centernet"
ZOO_LAYER = "backbone.block3"


class MeanHead(nn.Module):
    """``y = w · mean_hw(conv(x)) + b``: ``∂y/∂A_hw = w / (h·w)`` at every cell."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu2(self.conv2(self.relu1(self.conv1(x)))).mean((2, 3)))


def _nmf_bank(layer: str, vectors: torch.Tensor, metrics: dict | None = None) -> ConceptBank:
    names = [f"ncav_{i}" for i in range(vectors.shape[0])]
    return ConceptBank("nmf", layer, names, vectors, torch.zeros(len(names)), metrics=metrics or {})


def _pixels(activations: torch.Tensor) -> torch.Tensor:
    return activations.movedim(1, -1).reshape(-1, activations.shape[1])


@pytest.fixture(scope="module")
def zoo() -> dict:
    """The zoo detector, four scenes, and an NMF bank (k=4) fitted on their block3 activations."""
    model = load_model(ZOO)
    world = SyntheticWorld(n_images=4, seed=0)
    images = [world.image(i) for i in range(4)]
    captured = {}
    handle = dict(model.module.named_modules())[ZOO_LAYER].register_forward_hook(lambda _m, _a, out: captured.setdefault("a", out.detach()))
    with torch.no_grad():
        model.adapter.forward(model.module, model.adapter.prepare(images, torch.device("cpu")), [im.shape[:2] for im in images])
    handle.remove()
    bank = NMFConcepts(n_components=4, device="cpu", progress=False).fit(_pixels(captured["a"])).to_bank(ZOO_LAYER)
    return {"model": model, "images": images, "bank": bank}


# ------------------------------------------------------------------------------------------------
# 1. hand-computed


@pytest.mark.parametrize("batch_size", [1, 4])
def test_importance_of_mean_pooled_head_is_w_dot_ncav(batch_size: int) -> None:
    model = MeanHead().eval()
    x = torch.randn(5, 3, 6, 7)
    vectors = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    bank = _nmf_bank("conv", vectors)

    result = ncav_importance(model, x, "conv", bank, 0, batch_size=batch_size)

    w = model.head.weight[0].detach().double()
    expected = (vectors.double() @ w).numpy()  # Σ_hw (w / hw) · P_j = w · P_j
    assert result.importance.shape == (5, 3) and result.importance.dtype == np.float64
    np.testing.assert_allclose(result.importance, np.broadcast_to(expected, (5, 3)), rtol=0, atol=1e-6)
    with torch.no_grad():
        activations = model.conv(x)
        np.testing.assert_allclose(result.target_values, model(x)[:, 0].double().numpy(), atol=1e-6)
    # NNLS stops on a batch-wide float32 criterion (~1e-5 relative), so codes depend slightly on the batch
    np.testing.assert_allclose(result.scores, bank.nmf_maps(activations).mean((2, 3)).double().numpy(), rtol=1e-4)
    assert result.valid.all() and result.input_ids == [0, 1, 2, 3, 4]


def test_importance_sums_over_image_cells_only(pooling_detector) -> None:
    # y = Σ of the whole padded canvas, so ∂y/∂A_hw = 1 at every cell, padding included; shifting
    # the concept only at the image's cells gives I_j = (number of image cells) · Σ_c P_jc.
    model = LoadedModel(pooling_detector, DetectorAdapter(pooling_detector.transform), "test:pooling")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(64, 120, 3), (64, 64, 3), (100, 64, 3)]]
    vectors = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3]])
    bank = _nmf_bank("backbone", vectors)

    def canvas_sum(output: torch.Tensor) -> torch.Tensor:
        return output.sum((1, 2, 3))

    result = ncav_importance(model, images, "backbone", bank, canvas_sum, batch_size=3)
    # the target is linear in A, so the central difference is exact for any step
    differences = ncav_importance_finite_difference(model, images, "backbone", bank, canvas_sum, epsilon=1.0, batch_size=3)

    # padded canvas 128×128 → 16×16 cells (256); images stay 64×120 (8×15 cells), 64×64 (8×8), 100×64 (12×8:
    # the 13th row's centre, at 100, lies on the padding)
    cells = np.array([120, 64, 96], dtype=np.float64)
    expected = cells[:, None] * vectors.sum(1).double().numpy()[None, :]
    np.testing.assert_allclose(result.importance, expected, rtol=1e-6)
    np.testing.assert_allclose(differences, expected, rtol=1e-4)
    # scores average the codes over the image's cells (top-left rows × cols), not the padding
    captured = {}
    handle = pooling_detector.backbone.register_forward_hook(lambda _m, _a, out: captured.setdefault("a", out))
    with torch.no_grad():
        model.adapter.forward(pooling_detector, model.adapter.prepare(images, torch.device("cpu")), [im.shape[:2] for im in images])
    handle.remove()
    maps = bank.nmf_maps(captured["a"]).double()
    expected_scores = [maps[i, :, :rows, :cols].mean((1, 2)).numpy() for i, (rows, cols) in enumerate([(8, 15), (8, 8), (12, 8)])]
    np.testing.assert_allclose(result.scores, np.stack(expected_scores), rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# 2. autograd = ICE's finite differences


def test_autograd_matches_finite_difference_small_net() -> None:
    # float64 model: the central difference of float32 outputs has rounding error ~1e-7·|y|/ε, too
    # coarse for a 1e-3 comparison; in float64 it is ~1e-12 and the truncation error O(ε²) dominates
    model = SmallNet().double().eval()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        activations = model.relu1(model.conv1(x)).float()
    bank = NMFConcepts(n_components=3, device="cpu", progress=False).fit(_pixels(activations)).to_bank("relu1")
    target = ClassProbability(1)

    result = ncav_importance(model, x, "relu1", bank, target, batch_size=4)
    differences = ncav_importance_finite_difference(model, x, "relu1", bank, target, epsilon=1e-4, batch_size=4)

    assert np.abs(result.importance).min() > 1e-4  # no near-zero entries: a relative comparison is meaningful
    np.testing.assert_allclose(result.importance, differences, rtol=1e-3)


def test_autograd_matches_finite_difference_zoo_detector(zoo) -> None:
    # Autograd on the shipped float32 detector; finite differences on a float64 copy of it (float32
    # outputs near 0.7 are resolved to ~6e-8, i.e. ~3e-4 in a difference quotient with ε = 1e-4,
    # several percent of importances ~1e-2). A pre-hook casts the adapter's float32 input.
    double = load_model(ZOO)
    double.module.double()
    double.module.register_forward_pre_hook(lambda _m, args: tuple(a.double() for a in args))
    target = TopDetection(1)

    result = ncav_importance(zoo["model"], zoo["images"], ZOO_LAYER, zoo["bank"], target, batch_size=2)
    differences = ncav_importance_finite_difference(double, zoo["images"], ZOO_LAYER, zoo["bank"], target, epsilon=1e-4, batch_size=4)

    assert result.valid.all() and differences.shape == (4, 4)
    # entries below 1 % of the largest are left out of the relative check (checked absolutely)
    large = np.abs(result.importance) > 1e-2 * np.abs(result.importance).max()
    assert large.sum() >= 12
    np.testing.assert_allclose(result.importance[large], differences[large], rtol=1e-3)
    np.testing.assert_allclose(result.importance, differences, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 3. local explanations, summary, files


def _result() -> NCAVImportance:
    model = MeanHead().eval()
    x = torch.randn(4, 3, 5, 5)
    vectors = torch.rand(4, 4, generator=torch.Generator().manual_seed(2))
    return ncav_importance(model, x, "conv", _nmf_bank("conv", vectors), 0, input_ids=["a", "b", "c", "d"])


def test_local_explanation_ranks_by_contribution() -> None:
    result = _result()
    explanation = result.local_explanation(2, top=3)

    assert len(explanation) == 3
    magnitudes = [abs(e["contribution"]) for e in explanation]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert abs(explanation[0]["contribution"]) == pytest.approx(np.abs(result.importance[2] * result.scores[2]).max())
    for entry in explanation:
        j = result.concepts.index(entry["concept"])
        assert entry["contribution"] == pytest.approx(result.importance[2, j] * result.scores[2, j], rel=1e-12)
        assert entry["importance"] == result.importance[2, j] and entry["score"] == result.scores[2, j]
    assert len(result.local_explanation(2, top=None)) == 4
    with pytest.raises(NCAVError, match="out of range"):
        result.local_explanation(9)


def test_local_explanation_hand_built() -> None:
    result = NCAVImportance(
        layer="conv", concepts=["a", "b", "c", "d"], labels=["sky", None, None, None],
        importance=np.array([[0.5, -2.0, 1.0, 0.1]]), scores=np.array([[1.0, 1.0, 0.25, 2.0]]),
        target_values=np.array([3.0]), valid=np.array([True]), input_ids=["x"],
    )
    explanation = result.local_explanation(0, top=3)
    # contributions 0.5, -2, 0.25, 0.2: ranked by magnitude, a negative one first
    assert [(e["concept"], e["contribution"]) for e in explanation] == [("b", -2.0), ("a", 0.5), ("c", 0.25)]
    assert explanation[1] == {"concept": "a", "label": "sky", "score": 1.0, "importance": 0.5, "contribution": 0.5}


def test_summary_json_and_csv(tmp_path) -> None:
    result = _result()
    summary = result.summary()

    assert [row["concept"] for row in summary] == result.concepts
    for j, row in enumerate(summary):
        assert row["mean_importance"] == pytest.approx(result.importance[:, j].mean())
        assert row["std_importance"] == pytest.approx(result.importance[:, j].std())
        assert row["fraction_positive"] == pytest.approx((result.importance[:, j] > 0).mean())
        assert row["mean_score"] == pytest.approx(result.scores[:, j].mean())
        assert row["mean_contribution"] == pytest.approx((result.importance[:, j] * result.scores[:, j]).mean())
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["input_ids"] == ["a", "b", "c", "d"] and len(data["importance"]) == 4

    path = result.write_csv(tmp_path / "ncav.csv")
    with path.open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 16 and rows[5]["input_id"] == "b" and rows[5]["concept"] == "ncav_1"
    assert float(rows[5]["contribution"]) == pytest.approx(result.importance[1, 1] * result.scores[1, 1])


def test_labels_come_from_the_bank_metrics() -> None:
    model = MeanHead().eval()
    pixels = torch.rand(200, 4)
    fitted = NMFConcepts(n_components=2, device="cpu", progress=False).fit(pixels)
    bank = fitted.to_bank("conv", labels={1: {"concept": "stripes", "set_iou": 0.4, "all": {"stripes": 0.4}}})

    result = ncav_importance(model, torch.randn(2, 3, 4, 4), "conv", bank, 0)

    assert result.labels == [None, "stripes"] and result.label_ious == [None, 0.4]
    assert result.summary()[1]["label"] == "stripes"


# ------------------------------------------------------------------------------------------------
# 4. errors


def test_linear_bank_is_rejected() -> None:
    bank = ConceptBank("linear", "conv", ["dots"], torch.rand(1, 4), torch.zeros(1))
    for compute in (ncav_importance, ncav_importance_finite_difference):
        with pytest.raises(NCAVError, match="not NCAVs"):
            compute(MeanHead().eval(), torch.randn(2, 3, 4, 4), "conv", bank, 0)


def test_bank_with_wrong_channel_count_names_the_layer() -> None:
    bank = _nmf_bank("other.layer", torch.rand(2, 7))
    for compute in (ncav_importance, ncav_importance_finite_difference):
        with pytest.raises(NCAVError, match=r"7 channels, layer 'conv' outputs shape \(4, 4, 4\).*'other.layer'|'other.layer'.*7 channels, layer 'conv'"):
            compute(MeanHead().eval(), torch.randn(2, 3, 4, 4), "conv", bank, 0)


def test_input_ids_must_match_inputs() -> None:
    with pytest.raises(NCAVError, match="2 ids for 3 inputs"):
        ncav_importance(MeanHead().eval(), torch.randn(3, 3, 4, 4), "conv", _nmf_bank("conv", torch.rand(2, 4)), 0, input_ids=["a", "b"])


# ------------------------------------------------------------------------------------------------
# 5. detector inputs without a detection


def test_inputs_without_detection_are_kept_and_flagged(zoo) -> None:
    nothing = ncav_importance(zoo["model"], zoo["images"], ZOO_LAYER, zoo["bank"], TopDetection(1, min_score=0.999999), batch_size=3)

    assert nothing.importance.shape == (4, 4) and not nothing.valid.any()
    assert np.isnan(nothing.importance).all() and np.isnan(nothing.target_values).all()
    assert np.isfinite(nothing.scores).all() and (nothing.scores > 0).any()  # scores do not need a target
    assert nothing.summary()[0]["mean_importance"] is None
    assert json.loads(json.dumps(nothing.to_dict(), allow_nan=False))["importance"][0] == [None] * 4
    with pytest.raises(NCAVError, match="no valid target"):
        nothing.local_explanation(0)

    # a threshold between the top scores: only the images below it are flagged, the others unchanged
    everything = ncav_importance(zoo["model"], zoo["images"], ZOO_LAYER, zoo["bank"], TopDetection(1), batch_size=3)
    threshold = float(np.sort(everything.target_values)[1]) + 1e-6
    some = ncav_importance(zoo["model"], zoo["images"], ZOO_LAYER, zoo["bank"], TopDetection(1, min_score=threshold), batch_size=3)
    assert some.valid.tolist() == (everything.target_values >= threshold).tolist() and some.valid.sum() == 2
    np.testing.assert_allclose(some.importance[some.valid], everything.importance[some.valid], rtol=1e-6)
    np.testing.assert_array_equal(some.scores, everything.scores)
