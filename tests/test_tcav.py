"""TCAV scores and significance (attribution/tcav.py): captum equality, planted direction, statistics."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conceptlens.attribution.tcav import (
    TCAVError,
    bonferroni,
    holm,
    layer_gradients,
    run_scores,
    sensitivities,
    tcav_scores,
)
from conceptlens.probes.linear import CAVSet, train_cavs

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.head(a.mean((2, 3)))


def _cav_set(layer: str, concepts: list[str], randoms: list[str], vectors: torch.Tensor, null: torch.Tensor, feature_shape: list[int]) -> CAVSet:
    k, r = len(concepts), len(randoms)
    return CAVSet(
        concepts=concepts, random_sets=randoms, vectors=vectors, biases=torch.zeros(k, r), accuracies=torch.ones(k, r),
        random_pairs=[(randoms[i], randoms[(i + 1) % r]) for i in range(r)], random_vectors=null,
        random_biases=torch.zeros(r), random_accuracies=torch.ones(r), layer=layer, feature_shape=feature_shape,
    )


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------
# 1. equality with captum


def test_scores_equal_captum_tcav(tmp_path) -> None:
    from captum.concept import TCAV, Concept
    from captum.concept._utils.classifier import Classifier

    torch.manual_seed(0)
    model = TinyCNN().eval()
    inputs = torch.randn(8, 3, 8, 8)
    layers = {"conv1": model.conv1, "conv2": model.conv2}
    shapes = {"conv1": [4, 8, 8], "conv2": [5, 8, 8]}
    concept_names, random_names = ["stripes", "dots"], ["random_0", "random_1", "random_2"]
    k, r = len(concept_names), len(random_names)
    generator = torch.Generator().manual_seed(1)
    cav_sets = {
        layer: _cav_set(layer, concept_names, random_names, _unit(torch.randn(k, r, math.prod(s), generator=generator)),
                        _unit(torch.randn(r, math.prod(s), generator=generator)), s)
        for layer, s in shapes.items()
    }

    # captum side: one Concept per name (ids 0..4), a classifier handing back our fixed vectors
    names = concept_names + random_names
    concepts = {name: Concept(i, name, [torch.randn(2, 3, 8, 8)]) for i, name in enumerate(names)}
    fixed: dict[tuple[int, int, int], torch.Tensor] = {}
    experimental_sets, runs = [], []
    for layer, cav_set in cav_sets.items():
        d = cav_set.n_features
        for ci, c in enumerate(concept_names):
            for ri, rn in enumerate(random_names):
                fixed[(concepts[c].id, concepts[rn].id, d)] = cav_set.vectors[ci, ri]
        for ri, (a, b) in enumerate(cav_set.random_pairs):
            fixed[(concepts[a].id, concepts[b].id, d)] = cav_set.random_vectors[ri]
    for c in concept_names:
        for rn in random_names:
            experimental_sets.append([concepts[c], concepts[rn]])
            runs.append((c, random_names.index(rn)))
    for ri, (a, b) in enumerate(cav_sets["conv1"].random_pairs):
        experimental_sets.append([concepts[a], concepts[b]])
        runs.append((None, ri))

    class FixedClassifier(Classifier):
        """Returns the fixed CAV of the (concept, random) pair in the data: rows [v, -v]."""

        def __init__(self) -> None:
            self._weights: torch.Tensor | None = None
            self._classes: list[int] = []

        def train_and_eval(self, dataloader, **kwargs):
            labels, width = [], None
            for x, y in dataloader:
                labels.extend(int(v) for v in y.unique())
                width = x.reshape(x.shape[0], -1).shape[1]
            first, second = sorted(set(labels))
            key = (first, second, width) if (first, second, width) in fixed else (second, first, width)
            v = fixed[key]
            self._classes = [key[0], key[1]]
            self._weights = torch.stack([v, -v])
            return {"accs": torch.tensor(1.0)}

        def weights(self) -> torch.Tensor:
            return self._weights

        def classes(self) -> list[int]:
            return self._classes

    tcav = TCAV(model, list(layers), model_id="tiny", classifier=FixedClassifier(), save_path=str(tmp_path))
    theirs = tcav.interpret(inputs, experimental_sets, target=2)

    result = tcav_scores(model, inputs, layers, cav_sets, {"class2": 2}, batch_size=3, n_bootstrap=0)
    for layer in layers:
        for exp_set, (concept, run) in zip(experimental_sets, runs):
            key = "-".join(str(c.id) for c in exp_set)
            expected = theirs[key][layer]
            record = result.get(concept or concept_names[0], layer, "class2")
            ours = record.scores if concept is not None else record.null_scores
            assert ours["sign_count"][run] == pytest.approx(float(expected["sign_count"][0]), abs=1e-6)
            # captum 0.9.0's "magnitude" is mean(S) (its docstring states Σ_{S>0}S/Σ|S|)
            assert ours["mean_sensitivity"][run] == pytest.approx(float(expected["magnitude"][0]), abs=1e-6)
    # docs/METHODS.md §6 magnitude from the same sensitivities
    sens = result.sensitivities[("conv2", "class2")].double()
    magnitude = sens.clamp(min=0).sum(0) / sens.abs().sum(0)
    assert np.allclose(result.get("dots", "conv2", "class2").scores["magnitude"], magnitude[r:2 * r].numpy())


# ------------------------------------------------------------------------------------------------
# pooled CAVs: the spatial sum of the gradient is ∂h/∂(mean_hw A)


def test_pooled_sensitivity_is_gradient_of_pooled_activation() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    w = torch.randn(6)
    model = nn.Sequential(conv, nn.Tanh())
    x = torch.randn(4, 3, 5, 7)
    cavs = _unit(torch.randn(3, 6))

    def head(out: torch.Tensor) -> torch.Tensor:
        a = out.mean((2, 3))
        return (a @ w) + (a ** 2).sum(1)

    class Full(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return self.body(inp)

    full = Full().eval()
    (_, grads), = list(layer_gradients(full, x, {"body": full.body}, head, batch_size=8))
    ours = sensitivities(grads["body"], cavs)
    a = full.body(x).mean((2, 3)).detach().requires_grad_(True)
    (grad_a,) = torch.autograd.grad(((a @ w) + (a ** 2).sum(1)).sum(), a)
    assert torch.allclose(ours, grad_a @ cavs.T, atol=1e-5)
    with pytest.raises(TCAVError):
        sensitivities(grads["body"], torch.randn(2, 7))


# ------------------------------------------------------------------------------------------------
# 2. planted direction


class PlantedModel(nn.Module):
    """logit = w*·a + 0.3 (u·a)² with a = mean_hw of the probed conv's output."""

    def __init__(self, w_star: torch.Tensor, u: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, w_star.numel(), 3, padding=1)
        self.register_buffer("w_star", w_star)
        self.register_buffer("u", u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x).mean((2, 3))
        return (a @ self.w_star + 0.3 * (a @ self.u) ** 2).unsqueeze(1)


def test_planted_direction_is_significant_random_concept_is_not() -> None:
    torch.manual_seed(0)
    c = 8
    w_star = _unit(torch.randn(c))
    u = _unit(torch.randn(c))
    model = PlantedModel(w_star, u).eval()
    inputs = torch.randn(40, 3, 6, 6)
    gen = torch.Generator().manual_seed(3)
    n_runs = 10
    randoms = {f"random_{i}": torch.randn(30, c, generator=gen) for i in range(n_runs)}
    concepts = {
        "planted": torch.randn(30, c, generator=gen) + 2.0 * w_star,
        "noise": torch.randn(30, c, generator=gen),
    }
    cav_set = train_cavs(concepts, randoms, layer="conv")
    assert (cav_set.vectors[0] @ w_star).min() > 0.5  # the planted CAVs ≈ w*

    # the reference t-test (the default permutation test's smallest p with 10 random sets is 1/11)
    result = tcav_scores(model, inputs, {"conv": model.conv}, {"conv": cav_set}, {"logit": 0}, batch_size=16, n_bootstrap=200, test="ttest")
    planted, noise = result.get("planted", "conv", "logit"), result.get("noise", "conv", "logit")
    assert planted.mean > 0.95
    assert planted.p_holm < 0.01 and planted.significant
    assert not noise.significant and noise.p_holm > 0.05
    assert planted.ci_low <= planted.mean <= planted.ci_high

    # magnitude statistic and Bonferroni agree on the verdicts here
    result_m = tcav_scores(model, inputs, {"conv": model.conv}, {"conv": cav_set}, {"logit": 0}, statistic="magnitude", correction="bonferroni", n_bootstrap=0, test="ttest")
    assert result_m.get("planted", "conv", "logit").significant
    assert not result_m.get("noise", "conv", "logit").significant


# ------------------------------------------------------------------------------------------------
# 3. statistics


def test_holm_and_bonferroni_hand_computed() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.06
    assert np.allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(bonferroni(p), [0.04, 0.16, 0.12, 0.02])
    adjusted = holm([math.nan, 0.01, 0.02])
    assert math.isnan(adjusted[0]) and np.allclose(adjusted[1:], [0.02, 0.02])
    assert np.allclose(holm([0.5, 0.6]), [1.0, 1.0])
    assert np.allclose(bonferroni([0.3, math.nan, 0.2])[[0, 2]], [0.6, 0.4])
    assert holm([]).shape == (0,)


def test_run_scores_formulas() -> None:
    s = torch.tensor([[1.0, -1.0], [-3.0, -2.0], [2.0, 0.0]])
    out = run_scores(s)
    assert np.allclose(out["sign_count"].numpy(), [2 / 3, 0.0])
    assert np.allclose(out["magnitude"].numpy(), [3 / 6, 0.0])
    assert np.allclose(out["mean_sensitivity"].numpy(), [0.0, -1.0])


def _small_result(seed: int = 0, statistic: str = "mean_sensitivity"):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    inputs = torch.randn(12, 3, 8, 8)
    gen = torch.Generator().manual_seed(5)
    cav_set = _cav_set("conv2", ["a", "b"], ["r0", "r1", "r2", "r3"], _unit(torch.randn(2, 4, 5, generator=gen)), _unit(torch.randn(4, 5, generator=gen)), [5])
    return tcav_scores(model, inputs, {"conv2": model.conv2}, {"conv2": cav_set}, {"t0": 0, "t1": lambda out: out[:, 1] - out[:, 0]}, batch_size=5, n_bootstrap=300, seed=seed, statistic=statistic)


def test_bootstrap_ci_contains_mean_and_is_seeded(tmp_path) -> None:
    # mean_sensitivity: a continuous score, so a different seed moves the interval's ends
    first, again, other = _small_result(0), _small_result(0), _small_result(1)
    assert len(first.records) == 4  # 2 concepts × 1 layer × 2 targets
    for a, b, c in zip(first.records, again.records, other.records):
        assert a.ci_low <= a.mean <= a.ci_high
        assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
        assert a.p == b.p and a.mean == c.mean
    assert any((a.ci_low, a.ci_high) != (c.ci_low, c.ci_high) for a, c in zip(first.records, other.records))
    # adjusted p-values span all four hypotheses
    p = np.array([r.p for r in first.records])
    assert np.allclose([r.p_holm for r in first.records], holm(p))

    discrete = _small_result(0, "sign_count")
    for record in discrete.records:
        assert record.ci_low <= record.mean <= record.ci_high

    data = json.loads(json.dumps(first.to_dict()))
    assert data["n_hypotheses"] == 4 and len(data["records"][0]["scores"]["sign_count"]) == 4
    path = first.write_csv(tmp_path / "tcav.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 4 and rows[0]["concept"] == "a" and float(rows[0]["mean"]) == pytest.approx(first.records[0].mean)


def test_degenerate_t_tests() -> None:
    from conceptlens.attribution.tcav import _t_test

    assert _t_test(np.ones(3), np.zeros(3)) == (math.inf, 0.0)
    assert _t_test(np.ones(3), np.ones(3)) == (0.0, 1.0)
    t, p = _t_test(np.ones(4), np.array([0.2, 0.5, 0.4, 0.9]))
    assert t > 0 and 0 < p < 0.05


def test_merge_results_corrects_over_all_hypotheses() -> None:
    from conceptlens.attribution.tcav import merge_results

    torch.manual_seed(0)
    model = TinyCNN().eval()
    inputs = torch.randn(12, 3, 8, 8)
    gen = torch.Generator().manual_seed(5)
    cav_set = _cav_set("conv2", ["a", "b"], ["r0", "r1", "r2", "r3"], _unit(torch.randn(2, 4, 5, generator=gen)), _unit(torch.randn(4, 5, generator=gen)), [5])
    args = (model, inputs, {"conv2": model.conv2}, {"conv2": cav_set})
    together = tcav_scores(*args, {"t0": 0, "t1": 1}, n_bootstrap=0, statistic="mean_sensitivity", test="ttest")
    apart = [tcav_scores(*args, {name: k}, n_bootstrap=0, statistic="mean_sensitivity", test="ttest") for name, k in (("t0", 0), ("t1", 1))]
    merged = merge_results(apart)
    for key in ("p_holm", "p_bonferroni", "significant"):
        assert [getattr(r, key) for r in merged.records] == pytest.approx([getattr(r, key) for r in together.records])
    # apart, each call corrected over its own two hypotheses only
    assert [2 * r.p for r in apart[0].records] == pytest.approx([r.p_bonferroni for r in apart[0].records])
    assert [min(1.0, 4 * r.p) for r in merged.records] == pytest.approx([r.p_bonferroni for r in merged.records])
    with pytest.raises(TCAVError, match="share target names"):
        merge_results([apart[0], apart[0]])
