"""TCAV you can trust (attribution/tcav.py): the exact permutation test, its false-positive rate,
run spread in the CI, degenerate layers, power and the robustness check (issue 14)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from conceptlens.attribution.tcav import (
    TCAVError,
    null_statistics,
    permutation_p,
    power,
    tcav_robustness,
    tcav_scores,
    tcav_variants,
)
from conceptlens.probes.image_cavs import fit_cav_variants, fit_image_cavs, restrict_random_sets
from conceptlens.probes.linear import CAVSet

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------
# hand-checked p-value on a toy null


class HalfSquare(nn.Module):
    """h = ½‖a‖² with a = layer(x): the layer gradient is the input itself."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.layer(x) ** 2).sum(1, keepdim=True)


def _toy_set(vectors: torch.Tensor, null: torch.Tensor, pairs: list[tuple[str, str]], accuracy: float = 1.0) -> CAVSet:
    r = vectors.shape[0]
    randoms = [f"random_{i}" for i in range(r)]
    return CAVSet(concepts=["c"], random_sets=randoms, vectors=vectors[None], biases=torch.zeros(1, r),
                  accuracies=torch.full((1, r), accuracy), random_pairs=pairs, random_vectors=null,
                  random_biases=torch.zeros(len(pairs)), random_accuracies=torch.ones(len(pairs)), layer="layer", feature_shape=[2])


def test_permutation_p_hand_computed_on_a_toy_null() -> None:
    # gradients (= inputs): (1,0), (0,1), (1,1), (-1,2). Sign counts (share of S > 0; S = 0 is not positive):
    #   e1 = (1,0): S = 1,0,1,-1 → 2/4;  -e1: 1/4.   e2 = (0,1): 3/4; -e2: 0.
    #   d = (1,1)/√2: 4/4; -d: 0.        m = (1,-1)/√2: S ∝ 1,-1,0,-3 → 1/4; -m: 2/4.
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]])
    e1, e2, d, m = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), _unit(torch.tensor([1.0, 1.0])), _unit(torch.tensor([1.0, -1.0]))
    r = ["random_0", "random_1", "random_2"]
    cav_set = _toy_set(torch.stack([d, d, e2]), torch.stack([e1, m, -e2]), [(r[0], r[1]), (r[1], r[2]), (r[2], r[0])])
    model = HalfSquare().eval()
    result = tcav_scores(model, inputs, {"layer": model.layer}, {"layer": cav_set}, {"h": 0}, n_bootstrap=0)
    record = result.get("c", "layer", "h")
    # T_c = (1 + 1 + 3/4)/3; T_0 = (s(-d) + s(e1) + s(e2))/3 = (0 + 1/2 + 3/4)/3; T_1 = (s(-d) + s(m) + s(-e1))/3
    # = (0 + 1/4 + 1/4)/3; T_2 = (s(-e2) + s(-e2) + s(-m))/3 = (0 + 0 + 1/2)/3
    assert record.mean == pytest.approx(11 / 12)
    assert record.null_statistics == pytest.approx([5 / 12, 1 / 6, 1 / 6])
    assert record.null_complete
    # |T − ½|: 5/12 for the concept; 1/12, 1/3, 1/3 for the random sets → none as far: p = 1/4
    assert record.p == pytest.approx(0.25) and record.test == "permutation"
    assert record.null_scores["sign_count"] == pytest.approx([0.5, 0.25, 0.0])

    # ties count against: the concept as far from ½ as a random set
    assert permutation_p(0.2, np.array([0.8, 0.5, 0.55]), 0.5) == pytest.approx(2 / 4)
    assert permutation_p(0.0, np.array([0.1, -0.1]), 0.0) == pytest.approx(1.0)
    # a ring of 4 lacks pairs (0, 2) and (1, 3): each T_j averages 3 scores, and the set says so
    ring = _toy_set(torch.stack([d, d, e2, e1]), torch.stack([e1, m, -e2, d]), [(f"random_{i}", f"random_{(i + 1) % 4}") for i in range(4)])
    ring_record = tcav_scores(model, inputs, {"layer": model.layer}, {"layer": ring}, {"h": 0}, n_bootstrap=0).records[0]
    assert not ring_record.null_complete
    # T_0 = (s(-d) + s(e1 → r1) + s(-(d) for pair (3, 0)))/3 = (0 + 1/2 + 0)/3
    assert ring_record.null_statistics[0] == pytest.approx(1 / 6)
    assert null_statistics(np.array([0.1]), np.zeros(0), np.zeros(0), np.zeros((0, 2)), 1) == pytest.approx([0.1])
    with pytest.raises(TCAVError, match="test"):
        tcav_scores(model, inputs, {"layer": model.layer}, {"layer": cav_set}, {"h": 0}, test="z")


def test_power_hand_computed() -> None:
    # Holm over H = 3 at α = 0.05: 1/(R+1) < 0.05/3 from R = 60 on
    strong = power(1.0, np.array([0.5, 0.52, 0.48]), 0.5, 0.05, 3)
    assert strong["min_for_correction"] == 60 and strong["random_sets_needed"] == 60 and strong["n_random_sets"] == 3
    # effect z = 0.2 / 0.1 = 2: q = 2(1 − Φ(2)) = 0.0455 ≥ 0.05/3: no number of random sets suffices
    weak = power(0.7, np.array([0.4, 0.6]), 0.5, 0.05, 3)
    assert weak["effect"] == pytest.approx(2.0) and weak["random_sets_needed"] is None
    # z = 3, H = 1: q = 0.0027; R > (1 − 0.05)/(0.05 − q) = 20.08 → 21 (one more than the bare minimum 20)
    middle = power(0.8, np.array([0.4, 0.6]), 0.5, 0.05, 1)
    q = 2 * stats.norm.sf(3.0)
    assert middle["random_sets_needed"] == math.floor(0.95 / (0.05 - q)) + 1 == 21 and middle["min_for_correction"] == 20


# ------------------------------------------------------------------------------------------------
# false-positive rate with a random "concept", pooled and flattened


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.Tanh()
        self.head = nn.Linear(4 * 36, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.act(self.conv(x)).flatten(1)))


def _crops(photo: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n 6×6 crops of one photo: inputs that share nearly everything, as in the issue."""
    offsets = torch.randint(0, photo.shape[-1] - 6, (n, 2), generator=generator)
    return torch.stack([photo[:, i:i + 6, j:j + 6] for i, j in offsets.tolist()])


def _random_world(seed: int, n_random: int, per_set: int = 12):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallNet().eval()
    with torch.no_grad():
        maps = {name: model.act(model.conv(torch.randn(per_set, 3, 6, 6, generator=generator)))
                for name in ["concept", *(f"random_{i}" for i in range(n_random))]}
    inputs = _crops(torch.randn(3, 10, 10, generator=generator), 16, generator)
    return model, maps, inputs


N_SEEDS, N_RANDOM = 20, 20


@pytest.mark.slow
def test_false_positive_rate_with_a_random_concept_pooled_and_flattened() -> None:
    """Over 20 seeds the random "concept" is significant at α = 0.05 at most as often as the
    binomial 95% bound allows (Holm over the seed's single hypothesis: p < 0.05 needs the top rank
    of 21); the p-values are spread like a uniform rank, unlike the t-test's on the same runs."""
    bound = stats.binom.ppf(0.95, N_SEEDS, 0.05)  # 3 of 20: 0.05 + its binomial margin
    for form in ("pooled", "flattened"):
        significant, t_significant, p_values = 0, 0, []
        for seed in range(N_SEEDS):
            model, maps, inputs = _random_world(seed, N_RANDOM)
            acts = {name: a.mean((2, 3)) if form == "pooled" else a for name, a in maps.items()}
            cavs = fit_image_cavs({"conv": acts}, ["concept"], [f"random_{i}" for i in range(N_RANDOM)], seed=seed, device="cpu")
            assert len(cavs["conv"].random_pairs) == N_RANDOM * (N_RANDOM - 1) // 2
            modules = {"conv": model.act}
            record = tcav_scores(model, inputs, modules, cavs, {"logit": 0}, n_bootstrap=0, seed=seed).records[0]
            assert record.null_complete and record.power["min_for_correction"] == 20
            significant += record.significant
            p_values.append(record.p)
            t_record = tcav_scores(model, inputs, modules, cavs, {"logit": 0}, n_bootstrap=0, test="ttest").records[0]
            t_significant += t_record.significant
        assert significant <= bound, (form, significant)
        assert 0.3 < float(np.mean(p_values)) < 0.75, (form, p_values)  # uniform ranks: mean ≈ 0.52
        assert t_significant > bound  # the t-test on the same runs: 10 of 20 (runs share the concept set)
        print(form, "permutation", significant, "t-test", t_significant, "of", N_SEEDS)


# ------------------------------------------------------------------------------------------------
# a planted direction stays significant; CI with run spread; robustness; degenerate layers


class PlantedModel(nn.Module):
    """logit = w*·a + (u·a)² with a = mean_hw of the probed conv's output (the quadratic term makes
    the gradient vary over the inputs, so random directions score near ½, not 0 or 1)."""

    def __init__(self, w_star: torch.Tensor, u: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, w_star.numel(), 3, padding=1)
        self.register_buffer("w_star", w_star)
        self.register_buffer("u", u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x).mean((2, 3))
        return (a @ self.w_star + (a @ self.u) ** 2).unsqueeze(1)


def _planted_world(n_random: int = 20):
    torch.manual_seed(0)
    c = 8
    w_star, u = _unit(torch.randn(c)), _unit(torch.randn(c))
    model = PlantedModel(w_star, u).eval()
    inputs = 3 * torch.randn(40, 3, 6, 6)
    gen = torch.Generator().manual_seed(3)
    maps = {f"random_{i}": torch.randn(30, c, 6, 6, generator=gen) for i in range(n_random)}
    maps["planted"] = torch.randn(30, c, 6, 6, generator=gen) + 2.0 * w_star[:, None, None]
    maps["noise"] = torch.randn(30, c, 6, 6, generator=gen)
    return model, inputs, maps


def test_planted_direction_significant_under_the_permutation_test_with_power_and_run_spread() -> None:
    model, inputs, maps = _planted_world()
    pooled = {"conv": {name: m.mean((2, 3)) for name, m in maps.items()}}
    randoms = [f"random_{i}" for i in range(20)]
    results = {}
    for concept in ("planted", "noise"):
        cavs = fit_image_cavs(pooled, [concept], randoms, device="cpu")
        results[concept] = tcav_scores(model, inputs, {"conv": model.conv}, cavs, {"logit": 0}, n_bootstrap=300).records[0]
    planted, noise = results["planted"], results["noise"]
    assert planted.mean > 0.95 and planted.p == pytest.approx(1 / 21) and planted.significant
    # power: at the observed effect z (null spread ≈ 0.25), more random sets than the bare 20
    z = planted.power["effect"]
    assert z == pytest.approx(0.5 / np.sqrt(np.mean((planted.null_statistics - 0.5) ** 2)))
    assert planted.power["random_sets_needed"] == math.floor(0.95 / (0.05 - 2 * stats.norm.sf(z)) + 1e-9) + 1 > 20
    assert not noise.significant and noise.p > 0.2
    assert not planted.degenerate_layer and planted.degenerate_reason == ""
    # the corrected CI accounts for run spread: wider than the inputs-only one where runs disagree
    assert noise.run_std > 0.05
    assert noise.ci_high - noise.ci_low > 1.2 * (noise.ci_naive_high - noise.ci_naive_low)
    assert noise.ci_low <= noise.mean <= noise.ci_high and planted.ci_low <= planted.mean <= planted.ci_high
    row = planted.to_dict()
    assert row["run_std"] == pytest.approx(planted.run_std) and row["ci_naive_low"] == planted.ci_naive_low
    assert row["power"]["random_sets_needed"] == planted.power["random_sets_needed"] and row["degenerate_layer"] is False and row["robust"] is None
    assert len(row["null_statistics"]) == 20 and row["null_complete"] is True


def test_robustness_marks_findings_that_survive_every_variant_in_one_gradient_pass() -> None:
    model, inputs, maps = _planted_world()
    pooled = {"conv": {name: m.mean((2, 3)) for name, m in maps.items()}}
    flat = {"conv": dict(maps)}
    randoms = [f"random_{i}" for i in range(20)]
    variants = fit_cav_variants(pooled, flat, ["planted"], randoms, device="cpu")
    assert list(variants) == ["pooled", "flattened", "svm", "half_random_sets"]
    assert variants["flattened"]["conv"].feature_shape == [8, 6, 6] and variants["svm"]["conv"].settings["classifier"] == "svm"
    half = variants["half_random_sets"]["conv"]
    assert half.n_runs == 10 and len(half.random_pairs) == 45
    assert torch.equal(half.vectors, variants["pooled"]["conv"].vectors[:, :10])

    calls = []
    model.conv.register_forward_hook(lambda *args: calls.append(1))
    result = tcav_robustness(model, inputs, {"conv": model.conv}, variants, {"logit": 0}, batch_size=20, n_bootstrap=0)
    assert len(calls) == 2  # 40 inputs in batches of 20: one pass serves all four variants
    record = result.records[0]
    assert record.significant
    assert {name: v["significant"] for name, v in record.variants.items()} == {
        "pooled": True, "flattened": True, "svm": True, "half_random_sets": False}  # 1/11 > 0.05: too few sets
    assert record.variants["half_random_sets"]["p_value"] == pytest.approx(1 / 11)
    assert record.robust is False
    strong = tcav_robustness(model, inputs, {"conv": model.conv}, {k: v for k, v in variants.items() if k != "half_random_sets"}, {"logit": 0}, n_bootstrap=0)
    assert strong.records[0].robust is True
    # pooled scores are the same whether scored alone or among variants
    alone = tcav_scores(model, inputs, {"conv": model.conv}, variants["pooled"], {"logit": 0}, n_bootstrap=0)
    assert np.array_equal(alone.records[0].scores["sign_count"], record.scores["sign_count"])
    with pytest.raises(TCAVError, match="not TCAV settings"):
        tcav_variants(model, inputs, {"conv": model.conv}, variants, {"logit": 0}, alpha_level=0.1)
    with pytest.raises(Exception, match="between 1"):
        restrict_random_sets(half, 11)


def test_degenerate_layers_are_flagged() -> None:
    inputs = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    d, e1 = _unit(torch.tensor([1.0, 1.0])), torch.tensor([1.0, 0.0])
    pairs = [("random_0", "random_1"), ("random_1", "random_0")]
    cavs = _toy_set(torch.stack([d, e1]), torch.stack([e1, -d]), pairs)

    class Linear(nn.Module):  # constant gradient: every score is 0 or 1
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.layer, self.scale = nn.Identity(), scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale * self.layer(x) @ torch.tensor([[1.0], [0.5]])

    for scale, reason in ((1.0, "0 or 1"), (0.0, "gradient is zero")):
        model = Linear(scale)
        record = tcav_scores(model, inputs, {"layer": model.layer}, {"layer": cavs}, {"h": 0}, n_bootstrap=0).records[0]
        assert record.degenerate_layer and reason in record.degenerate_reason
    chance = _toy_set(torch.stack([d, e1]), torch.stack([e1, -d]), pairs, accuracy=0.52)
    model = HalfSquare()
    record = tcav_scores(model, inputs, {"layer": model.layer}, {"layer": chance}, {"h": 0}, n_bootstrap=0).records[0]
    assert record.degenerate_layer and record.degenerate_reason.startswith("the CAVs' held-out accuracy is at chance")
    fine = tcav_scores(model, inputs, {"layer": model.layer}, {"layer": cavs}, {"h": 0}, n_bootstrap=0).records[0]
    assert not fine.degenerate_layer


def test_all_pairs_null_keeps_the_concept_cavs() -> None:
    gen = torch.Generator().manual_seed(0)
    acts = {"conv": {"c": torch.randn(20, 5, generator=gen) + 1, **{f"random_{i}": torch.randn(20, 5, generator=gen) for i in range(5)}}}
    ring = fit_image_cavs(acts, null_pairs="ring", device="cpu")["conv"]
    full = fit_image_cavs(acts, device="cpu")["conv"]
    assert torch.allclose(ring.vectors, full.vectors, atol=1e-6) and len(ring.random_pairs) == 5 and len(full.random_pairs) == 10
    assert torch.allclose(full.random_vectors[:5], ring.random_vectors, atol=1e-6) and full.random_pairs[:5] == ring.random_pairs
    assert {frozenset(p) for p in full.random_pairs} == {frozenset((f"random_{i}", f"random_{j}")) for i in range(5) for j in range(i + 1, 5)}
    three = fit_image_cavs(acts, n_runs=3, device="cpu")["conv"]
    assert three.random_sets == ["random_0", "random_1", "random_2"] and len(three.random_pairs) == 3
