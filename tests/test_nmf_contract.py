"""The NMF estimators keep scikit-learn's estimator contract.

scikit-learn's own checks (``parametrize_with_checks``) run on :class:`NMFConcepts` and
:class:`MiniBatchNMFConcepts`, with ``clamp=False`` (``positive_only`` tag: the checks feed
non-negative data and expect "Negative values in data" otherwise) and with the default
``clamp=True`` (negative input is clamped, so the checks feed signed data). Every check of
scikit-learn 1.9 that applies passes, so ``expected_failed_checks`` lists none; the pickling
checks are not run (see ``NOT_RUN``).

Then: clone / get_params / set_params, ``NotFittedError`` before fit, arrays in → arrays out,
``(N, C, h, w)`` activations, and the online estimator: planted factors recovered, the numbers
of the former ``NMFConcepts(batch_size=…)`` flag path, and ``partial_fit``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import get_tags
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_is_fitted

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.probes.nmf import MiniBatchNMFConcepts, NMFConcepts, NMFError
from tests.test_nmf import matched_cosines, planted_factors

NOT_RUN = {
    "check_estimators_pickle": "conceptlens never pickles: fitted NCAVs are saved with to_bank() as a ConceptBank "
                               "(safetensors + JSON), so the pickle round trip is not part of the contract",
}

CHECKED = [
    NMFConcepts(n_components=2, device="cpu", progress=False),
    NMFConcepts(n_components=2, solver="mu", clamp=False, device="cpu", progress=False),
    NMFConcepts(n_components=2, solver="sklearn", device="cpu", progress=False),
    # small minibatches so that the checks' 20-100 samples make several of them
    MiniBatchNMFConcepts(n_components=2, batch_size=16, max_iter=30, device="cpu", progress=False),
    MiniBatchNMFConcepts(n_components=2, batch_size=16, max_iter=30, solver="mu", clamp=False, device="cpu", progress=False),
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: thread synchronisation would dominate
    yield
    torch.set_num_threads(threads)


def _check_name(check) -> str:
    return check.func.__name__ if isinstance(check, functools.partial) else check.__name__


@parametrize_with_checks(CHECKED)
def test_scikit_learn_checks(estimator, check):
    if _check_name(check) in NOT_RUN:
        pytest.skip(NOT_RUN[_check_name(check)])
    check(estimator)


def test_tags_follow_clamp():
    assert get_tags(NMFConcepts(clamp=False)).input_tags.positive_only
    assert not get_tags(NMFConcepts()).input_tags.positive_only  # negatives are clamped, not refused
    assert get_tags(MiniBatchNMFConcepts()).transformer_tags.preserves_dtype == ["float32"]
    with pytest.raises(NMFError, match="Negative values in data.*fix: set clamp=True"):
        NMFConcepts(n_components=1, clamp=False, device="cpu").fit(-np.ones((4, 3)))


# --------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("estimator", [NMFConcepts(n_components=3, solver="mu", tol=0.0, seed=4),
                                       MiniBatchNMFConcepts(n_components=3, batch_size=64, max_iter=5, clamp=False)])
def test_clone_round_trip(estimator):
    copy = clone(estimator)
    assert type(copy) is type(estimator) and copy is not estimator
    assert copy.get_params() == estimator.get_params()
    assert copy.set_params(n_components=5, seed=9) is copy and copy.n_components == 5 and copy.seed == 9
    assert estimator.n_components == 3 and estimator.seed != 9
    fitted = clone(estimator).set_params(device="cpu").fit(torch.rand(200, 6, generator=torch.Generator().manual_seed(0)))
    unfitted = clone(fitted)
    assert unfitted.get_params() == fitted.get_params() and not hasattr(unfitted, "components_")
    assert repr(estimator).startswith(type(estimator).__name__ + "(") and "n_components=3" in repr(estimator)


def test_online_is_its_own_estimator():
    assert "batch_size" not in NMFConcepts().get_params()
    assert set(MiniBatchNMFConcepts().get_params()) == set(NMFConcepts().get_params()) | {"batch_size"}
    with pytest.raises(TypeError, match="batch_size"):
        NMFConcepts(batch_size=100)  # the former flag: use MiniBatchNMFConcepts


@pytest.mark.parametrize("kind", [NMFConcepts, MiniBatchNMFConcepts])
def test_not_fitted_error_before_fit(kind):
    model = kind(n_components=2, device="cpu")
    pixels = torch.rand(20, 4)
    for call in (lambda: model.transform(pixels), lambda: model.inverse_transform(torch.rand(20, 2)),
                 lambda: model.concept_maps(torch.rand(2, 4, 3, 3)), lambda: model.to_bank("layer")):
        with pytest.raises(NotFittedError, match=rf"{kind.__name__}: is not fitted yet — fix: call {kind.__name__}\.fit\(\) first") as caught:
            call()
        assert isinstance(caught.value, NMFError) and isinstance(caught.value, ConceptLensError)
    with pytest.raises(NotFittedError):
        check_is_fitted(model)
    check_is_fitted(model.fit(pixels))


@pytest.mark.parametrize("kind", [NMFConcepts, MiniBatchNMFConcepts])
def test_arrays_in_arrays_out(kind):
    pixels = torch.rand(300, 6, generator=torch.Generator().manual_seed(1))
    on_tensor = kind(n_components=3, device="cpu").fit(pixels)
    on_array = kind(n_components=3, device="cpu").fit(pixels.double().numpy())
    assert torch.equal(on_tensor.components_, on_array.components_)
    codes = on_array.transform(pixels.numpy())
    assert isinstance(codes, np.ndarray) and codes.dtype == np.float32 and codes.shape == (300, 3)
    np.testing.assert_array_equal(codes, on_tensor.transform(pixels).numpy())
    assert isinstance(on_tensor.transform(pixels), torch.Tensor)
    np.testing.assert_array_equal(kind(n_components=3, device="cpu").fit_transform(pixels.tolist()), codes)
    rebuilt = on_array.inverse_transform(codes)
    np.testing.assert_allclose(rebuilt, codes @ on_array.components_.numpy(), rtol=1e-6)
    assert on_array.relative_error_ == pytest.approx(np.linalg.norm(pixels.numpy() - rebuilt) / np.linalg.norm(pixels.numpy()), rel=1e-4)
    assert list(on_array.get_feature_names_out()) == [f"{kind.__name__.lower()}{i}" for i in range(3)]


def test_activations_fit_and_transform_as_maps():
    activations = torch.relu(torch.randn(5, 6, 4, 3, generator=torch.Generator().manual_seed(2)))
    pixels = activations.movedim(1, -1).reshape(-1, 6)
    model = NMFConcepts(n_components=3, device="cpu").fit(activations)
    assert torch.equal(model.components_, NMFConcepts(n_components=3, device="cpu").fit(pixels).components_)
    assert model.n_pixels_ == 60 and model.data_ == {"source": "tensor", "shape": [5, 6, 4, 3]}
    maps = model.transform(activations)
    assert maps.shape == (5, 3, 4, 3) and torch.equal(maps, model.concept_maps(activations))
    assert torch.equal(maps.movedim(1, -1).reshape(-1, 3), model.transform(pixels))
    torch.testing.assert_close(model.inverse_transform(maps), model.reconstruct(activations))
    with pytest.raises(NMFError, match=r"X has 4 features, but NMFConcepts is expecting 6 features as input.*\(N, 6, h, w\)"):
        model.transform(torch.rand(2, 4, 3, 3))
    with pytest.raises(NMFError, match=r"shape \(2, 6, 3\).*Reshape your data"):
        model.transform(torch.rand(2, 6, 3))


# ------------------------------------------------------------------------------------ online
@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_minibatch_recovers_planted_factors(solver):
    pixels, components = planted_factors()
    model = MiniBatchNMFConcepts(n_components=5, batch_size=400, solver=solver, device="cpu").fit(pixels)
    assert matched_cosines(model.components_, components).min() >= 0.95
    assert model.relative_error_ < 0.02 and model.n_steps_ == model.n_iter_ * 8  # ⌈3000 / 400⌉ minibatches a pass
    torch.testing.assert_close(model.components_.norm(dim=1), torch.ones(5))


# NMFConcepts(n_components=5, solver=…, batch_size=500, device="cpu").fit(planted_factors()) before
# the online variant became its own estimator (one thread): passes, errors, component row sums.
FLAG_PATH = {
    "hals": (53, 0.007933006898429424, 0.7773324267781333, [0.22128252745010454, 0.1360092169080774], 0.007941747532954853,
             [3.3194527914747596, 3.0304802601458505, 2.889464834937826, 3.2077614436566364, 3.393902792595327],
             [0.002404772210866213, 0.05505093187093735, 0.2938169538974762, 0.5251686573028564]),
    "mu": (29, 0.008672986730199287, 0.8498409126223121, [0.23317774024817975, 0.14414737482705758], 0.008684591645222369,
           [3.427085307946165, 2.9901134278654213, 2.866687830459682, 3.2881753934387947, 3.1882762824969277],
           [0.1649060845375061, 0.36959022283554077, 0.3960898816585541, 0.4035971462726593]),
}


@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_minibatch_equals_the_former_flag_path(solver):
    n_iter, relative, absolute, curve_start, curve_end, row_sums, first_row = FLAG_PATH[solver]
    model = MiniBatchNMFConcepts(n_components=5, batch_size=500, solver=solver, device="cpu").fit(planted_factors()[0])
    assert model.n_iter_ == n_iter and model.n_pixels_ == 3000 and model.n_steps_ == 6 * n_iter
    assert model.relative_error_ == pytest.approx(relative, rel=1e-5) and model.reconstruction_err_ == pytest.approx(absolute, rel=1e-5)
    assert model.error_curve_[:2] == pytest.approx(curve_start, rel=1e-5) and model.error_curve_[-1] == pytest.approx(curve_end, rel=1e-5)
    np.testing.assert_allclose(model.components_.double().sum(dim=1).numpy(), row_sums, rtol=1e-5)
    np.testing.assert_allclose(model.components_[0, :4].numpy(), first_row, rtol=1e-4, atol=1e-7)
    provenance = model.to_bank("layer").provenance["nmf"]
    assert provenance["online"] is True and provenance["batch_size"] == 500 and provenance["n_iter"] == n_iter


def test_partial_fit_streams_chunks_to_the_planted_factors():
    pixels, components = planted_factors()
    model = MiniBatchNMFConcepts(n_components=5, batch_size=500, device="cpu")
    order = torch.randperm(3000, generator=torch.Generator().manual_seed(0))
    for epoch in range(15):
        for chunk in pixels[order].split(1000):
            model = model.partial_fit(chunk.numpy())
    assert model.n_steps_ == 15 * 3 * 2 and model.n_pixels_ == 15 * 3000 and model.n_iter_ == 0
    assert len(model.error_curve_) == 45 and model.error_curve_[-1] < 0.5 * model.error_curve_[0]
    assert matched_cosines(model.components_, components).min() >= 0.95
    torch.testing.assert_close(model.components_.norm(dim=1), torch.ones(5))
    codes = model.transform(pixels)
    assert float((pixels - model.inverse_transform(codes)).norm() / pixels.norm()) < 0.03
    assert model.data_ == {"source": "partial_fit", "fit": None}


def test_partial_fit_continues_a_fit():
    pixels, _ = planted_factors()
    fitted = MiniBatchNMFConcepts(n_components=5, batch_size=500, device="cpu").fit(pixels)
    before, data, n_iter = fitted.components_.clone(), fitted.data_, fitted.n_iter_
    fitted.partial_fit(pixels[:1000])
    assert matched_cosines(fitted.components_, before).min() > 0.999  # the statistics of the fit carry over
    assert fitted.n_iter_ == n_iter and fitted.n_pixels_ == 4000 and fitted.n_steps_ == 6 * n_iter + 2
    assert fitted.data_ == {"source": "partial_fit", "fit": data} and fitted.relative_error_ < 0.02
    fitted.partial_fit(pixels[1000:2000])
    assert fitted.data_["fit"] == data and fitted.n_pixels_ == 5000
    with pytest.raises(NMFError, match="X has 7 features, but MiniBatchNMFConcepts is expecting 24 features as input"):
        fitted.partial_fit(torch.rand(10, 7))
    with pytest.raises(NMFError, match="NaN"):
        fitted.partial_fit(torch.full((10, 24), float("nan")))
    assert fitted.n_pixels_ == 5000  # failed calls change nothing


def test_partial_fit_pools_the_clamped_fraction():
    pixels = torch.randn(400, 5, generator=torch.Generator().manual_seed(3)) + 0.5
    model = MiniBatchNMFConcepts(n_components=2, batch_size=100, device="cpu")
    model.partial_fit(pixels[:100]).partial_fit(pixels[100:])
    assert model.clamped_fraction_ == pytest.approx(float((pixels < 0).float().mean()))
