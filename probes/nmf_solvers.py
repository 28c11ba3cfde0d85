"""The NMF solvers behind :mod:`conceptlens.probes.nmf`: the numerical work, no estimator state.

``V ≈ S·P`` with ``V`` the (N, C) pixel matrix (clamped, ≥ 0), ``S`` the codes and ``P`` the
(k, C) components, both ≥ 0:

* :func:`fit_torch` — full-batch HALS (scikit-learn's coordinate descent, one sweep per factor
  and iteration, vectorised over pixels) or Lee & Seung multiplicative updates, in torch;
* :func:`fit_sklearn` — :class:`sklearn.decomposition.NMF` (``init='nndsvda'``), the reference;
* the online variant (Mairal et al. 2010): :func:`online_init` starts ``P`` from the first pixels
  of a stream, :func:`online_pass` codes each minibatch by NNLS, replaces that minibatch's part
  of the sufficient statistics :class:`OnlineStatistics` and updates ``P`` on them;
  :func:`streamed_error` measures the final error over a stream;
* the NNDSVD-a initialisation with scikit-learn's randomized SVD (same random probe).

Every function takes pixels that are already clamped and checked finite
(:mod:`conceptlens.probes.nmf_sources`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from conceptlens.concepts.progress import progress_bar

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.vectors.bank import nnls

__all__ = [
    "FitResult",
    "NMFError",
    "OnlineStatistics",
    "check_fittable",
    "fit_sklearn",
    "fit_torch",
    "normalise_rows",
    "online_init",
    "online_pass",
    "streamed_error",
]

CHECK_EVERY = 10  # iterations (full batch) between convergence checks, as scikit-learn's MU
ERROR_CHUNK = 16384  # pixel rows per block of the exact final error
ONLINE_SWEEPS = 3  # HALS sweeps (or MU steps) on P per minibatch
ONLINE_NNLS_TOLERANCE = 1e-5  # NNLS codes inside the online fit (1e-7 is below float32 resolution)
INIT_SAMPLE = 20000  # pixels from the start of the stream that initialise the online variant
INNER_SHRINK = 0.3  # repeated HALS sweeps stop once one moves the factor < this × the first's move
EPSILON = float(np.finfo(np.float32).eps)  # floor of multiplicative-update denominators


class NMFError(ConceptLensError, ValueError):
    """NMF cannot run on the given data or settings (negative input without clamp, bad shapes…)."""


def check_fittable(pixels: torch.Tensor, name: str) -> None:
    """Refuse a pixel matrix without a positive entry (``name`` is the culprit of the error)."""
    if not bool(pixels.amax() > 0):  # pixels ≥ 0 here (clamped, checked finite)
        raise NMFError(name, "all pixel vectors are zero (after clamping)", "choose a layer or images with positive activations")


# ------------------------------------------------------------------------------ torch solvers
@dataclass
class FitResult:
    """What a solver returns: components (k, C) of unit-norm rows and the fit's error figures."""

    components: torch.Tensor
    reconstruction_err: float
    relative_error: float
    error_curve: list[float] = field(default_factory=list)
    n_iter: int = 0
    n_pixels: int = 0
    clamped_fraction: float = 0.0


def fit_torch(pixels: torch.Tensor, k: int, solver: str, max_iter: int, tol: float, seed: int, show: bool) -> FitResult:
    """Full-batch HALS or MU on ``pixels`` (N, C) ≥ 0: ``pixels ≈ codesᵀ·components``."""
    codes, components = _initialize(pixels, k, seed)  # codes kept transposed (k, N): rows contiguous
    norm_squared = _squared_norm(pixels)
    relative = lambda squared: squared.clamp(min=0).sqrt() / math.sqrt(norm_squared)  # noqa: E731
    initial = previous = 0.0
    if tol > 0:  # the stopping rule is relative to the initial error
        with _serial(pixels):
            initial = previous = float(relative(_squared_error(norm_squared, components, codes @ pixels, codes @ codes.T)))
    errors: list[torch.Tensor] = []
    n_iter = 0
    for n_iter in progress_bar(range(1, max_iter + 1), desc=f"NMF ({solver})", unit="it", show=show):
        errors.append(relative(_iteration(pixels, codes, components, norm_squared, solver)))
        if tol > 0 and n_iter % CHECK_EVERY == 0:  # scikit-learn's MU criterion
            current = float(errors[-1])
            if previous - current < tol * initial:
                break
            previous = current
    scales = normalise_rows(components)
    codes *= scales[:, None]
    residual = _exact_squared_error(pixels, codes, components)
    return FitResult(components, math.sqrt(residual), math.sqrt(residual / norm_squared), [float(e) for e in errors], n_iter, pixels.shape[0])


def _iteration(pixels: torch.Tensor, codes: torch.Tensor, components: torch.Tensor, norm_squared: float, solver: str) -> torch.Tensor:
    """Update codes (k, N) then components (k, C) in place; return ‖V − SP‖² after it (a tensor)."""
    cross = (pixels @ components.T).T.contiguous()  # (k, N) = (V Pᵀ)ᵀ; this order is faster with MKL
    with _serial(pixels):
        gram = components @ components.T
        if solver == "hals":
            _hals_update(codes, cross, gram, 1, in_place=True)
        else:
            _mu_step(codes, cross, gram)
        del cross
        cross = codes @ pixels  # (k, C) = Sᵀ V
        gram = codes @ codes.T  # (k, k) = Sᵀ S
        if solver == "hals":
            _hals_update(components, cross, gram, 1)
        else:
            _mu_step(components, cross, gram)
        return _squared_error(norm_squared, components, cross, gram)


@contextmanager
def _serial(reference: torch.Tensor) -> Iterator[None]:
    """Run the enclosed CPU work on one intra-op thread (no-op on CUDA).

    A HALS iteration is some forty element-wise operations and small products besides the one
    large ``V·Pᵀ`` product. On a CPU each is an OpenMP region whose threads must all be scheduled
    before it ends; on a busy machine that synchronisation costs milliseconds per operation
    (measured: a codes sweep of 200k pixels 2 ms on one thread, 300+ ms on two), and MKL's
    ``Sᵀ·V`` (k × N by N × C, a long reduction) was also faster on one thread than on two.
    """
    if reference.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _hals_update(factor: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, max_sweeps: int, in_place: bool = False) -> None:
    """Decrease ``½ tr(F G Fᵀ) − tr(F Xᵀ)`` over ``F ≥ 0`` by HALS sweeps, in place.

    ``factor`` F is (k, M), ``cross`` X (k, M), ``gram`` G (k, k). Up to ``max_sweeps`` sweeps,
    stopping once one moves F by less than ``INNER_SHRINK`` times the first sweep's move (as in
    Gillis & Glineur's accelerated HALS; the full-batch solver uses one sweep, like
    scikit-learn, the online one repeats sweeps on the cheap k×C statistics). ``in_place``: divide
    ``cross`` itself (a temporary of the caller) rather than a copy.
    """
    target, coupling = _sweep_terms(cross, gram, in_place)
    first = None
    for _ in range(max_sweeps):
        before = factor.clone() if max_sweeps > 1 else None
        _hals_sweep(factor, target, coupling)
        if before is None:
            break
        change = float(torch.dist(factor, before))
        if first is None:
            first = change
        elif change <= INNER_SHRINK * first:
            break


def _sweep_terms(cross: torch.Tensor, gram: torch.Tensor, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``X_j / G_jj`` and ``G_ji / G_jj`` with a zero diagonal: the terms of a HALS row update.

    A dead component (zero row of the other factor) has zero rows in ``G`` and ``X``; flooring
    its diagonal keeps it at zero without a device sync.
    """
    diagonal = gram.diagonal().clamp(min=torch.finfo(gram.dtype).tiny)[:, None]
    coupling = gram / diagonal
    coupling.fill_diagonal_(0)
    return (cross.div_(diagonal) if in_place else cross / diagonal), coupling


def _hals_sweep(factor: torch.Tensor, target: torch.Tensor, coupling: torch.Tensor) -> None:
    """One exact coordinate-descent pass over the rows of ``factor`` (k, M), in place:
    ``F_j ← max(0, X_j/G_jj − Σ_{i≠j} (G_ji/G_jj) F_i)``.

    The columns of F are independent problems, so a sweep equals scikit-learn's element-wise
    ``_update_cdnmf_fast`` (three tensor operations per row, whatever M).
    """
    row = torch.empty_like(factor[0])
    for j in range(factor.shape[0]):
        torch.addmv(target[j], factor.T, coupling[j], alpha=-1, out=row)
        torch.clamp(row, min=0, out=factor[j])


def _mu_step(factor: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor) -> None:
    """One multiplicative update ``F ← F ∘ X / (G F)`` (Lee & Seung, Frobenius loss), in place."""
    denominator = gram @ factor
    denominator.clamp_(min=EPSILON)
    factor.mul_(cross).div_(denominator)


def _squared_error(norm_squared: float, components: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``‖V − SP‖² = ‖V‖² − 2⟨P, SᵀV⟩ + ⟨SᵀS, PPᵀ⟩`` from k×C and k×k quantities (float64 sums)."""
    linear = (components.double() * cross.double()).sum()
    quadratic = (gram.double() * (components.double() @ components.double().T)).sum()
    return norm_squared - 2 * linear + quadratic


def _squared_norm(pixels: torch.Tensor) -> float:
    """``‖V‖²``: float32 row norms (C terms each), their squares summed in float64 (no copy of V)."""
    if pixels.dim() != 2:
        return float(pixels.double().square().sum())
    return float(torch.linalg.vector_norm(pixels, dim=1).double().square().sum())


def _exact_squared_error(pixels: torch.Tensor, codes: torch.Tensor, components: torch.Tensor) -> float:
    """``‖V − SᵀP‖²`` computed blockwise (codes transposed, (k, N)), summed as :func:`_squared_norm`."""
    total = 0.0
    with _serial(pixels):
        for start in range(0, pixels.shape[0], ERROR_CHUNK):
            rows = slice(start, start + ERROR_CHUNK)
            total += _squared_norm(torch.addmm(pixels[rows], codes[:, rows].T, components.to(pixels.dtype), alpha=-1))
    return total


def normalise_rows(components: torch.Tensor) -> torch.Tensor:
    """Scale each row of ``components`` to unit L2 norm in place (zero rows stay); return the norms."""
    norms = components.norm(dim=1)
    components /= torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    return norms


# ------------------------------------------------------------------------------ initialisation
def _initialize(pixels: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD-a (Boutsidis & Gallopoulos 2008), following scikit-learn's ``init='nndsvda'``.

    Returns codes transposed (k, N) and components (k, C). The randomized SVD draws its probe
    from ``numpy.random.RandomState(seed)`` exactly as scikit-learn does, so the start is the
    same on every device and close to scikit-learn's. When ``k > min(N, C)`` falls back to
    scikit-learn's random init ``|N(0,1)|·sqrt(mean(V)/k)``.
    """
    n, c = pixels.shape
    average = float(pixels.mean())
    if k > min(n, c):
        rng = np.random.RandomState(seed)
        scale = math.sqrt(average / k)
        components = np.abs(rng.standard_normal((k, c))) * scale
        codes = np.abs(rng.standard_normal((n, k))) * scale
        return (torch.from_numpy(codes.T.copy()).to(pixels), torch.from_numpy(components).to(pixels))
    left, singular, right = _randomized_svd(pixels, k, seed)
    codes, components = _nndsvd_factors(left.T, singular, right)
    # scikit-learn: entries < 1e-6 → 0, then zeros → mean(V)
    codes, components = (torch.where(factor < 1e-6, average, factor) for factor in (codes, components))
    return codes.contiguous(), components.contiguous()


def _randomized_svd(matrix: torch.Tensor, k: int, seed: int, oversamples: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD by a randomized range finder (Halko et al. 2011) as scikit-learn's ``randomized_svd``.

    Same probe, power-iteration count and transposition rule; power steps are normalised by QR
    (scikit-learn: LU), which spans the same subspace. When the short side of the matrix is small
    next to the work of the power steps (``min(N, C) ≤ (2q + 2)(k + oversamples)``, e.g. a few
    hundred channels), the power steps run on the Gram matrix ``TᵀT`` of the tall side ``T``
    (min(N, C)² entries, one pass over the data): ``T(TᵀT)^q Ω`` spans the same subspace as
    scikit-learn's alternating steps, at one large product instead of 2q + 1.
    """
    transpose = matrix.shape[0] < matrix.shape[1]
    target = matrix.T if transpose else matrix
    power_iterations = 7 if k < 0.1 * min(matrix.shape) else 4
    probe = np.random.RandomState(seed).normal(size=(target.shape[1], k + oversamples))
    basis = torch.from_numpy(probe).to(target)
    if target.shape[1] <= (2 * power_iterations + 2) * (k + oversamples):
        gram = (target.T @ target).double()
        small = basis.double()
        for _ in range(power_iterations):
            small = torch.linalg.qr(gram @ small).Q
        with _serial(target):
            basis = torch.linalg.qr(target @ small.to(target.dtype)).Q
            small_left, singular, right = torch.linalg.svd(basis.T @ target, full_matrices=False)
    else:
        with _serial(target):
            for _ in range(power_iterations):
                basis = torch.linalg.qr(target @ basis).Q
                basis = torch.linalg.qr((basis.T @ target).T).Q  # Tᵀ·Q; (Qᵀ·T)ᵀ is several times faster with MKL
            basis = torch.linalg.qr(target @ basis).Q
            small_left, singular, right = torch.linalg.svd(basis.T @ target, full_matrices=False)
    left = basis @ small_left
    if transpose:
        return right[:k].T, singular[:k], left[:, :k].T
    return left[:, :k], singular[:k], right[:k]


def _nndsvd_factors(left: torch.Tensor, singular: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD: each singular pair → its dominant non-negative part (left (k, N), right (k, C))."""
    left_pos, left_neg = left.clamp(min=0), (-left).clamp(min=0)
    right_pos, right_neg = right.clamp(min=0), (-right).clamp(min=0)
    norms = [t.norm(dim=1) for t in (left_pos, left_neg, right_pos, right_neg)]
    mass_pos, mass_neg = norms[0] * norms[2], norms[1] * norms[3]
    positive = (mass_pos > mass_neg)[:, None]
    tiny = torch.finfo(left.dtype).tiny
    u = torch.where(positive, left_pos / norms[0].clamp(min=tiny)[:, None], left_neg / norms[1].clamp(min=tiny)[:, None])
    v = torch.where(positive, right_pos / norms[2].clamp(min=tiny)[:, None], right_neg / norms[3].clamp(min=tiny)[:, None])
    weight = (singular * torch.where(positive[:, 0], mass_pos, mass_neg)).sqrt()[:, None]
    u[0], v[0] = left[0].abs(), right[0].abs()  # the leading pair is non-negative up to sign
    weight[0] = singular[0].sqrt()
    return weight * u, weight * v


# ----------------------------------------------------------------------------- online variant
def online_init(chunks: Iterator[torch.Tensor], k: int, seed: int, name: str) -> torch.Tensor:
    """NNDSVD-a components from the first pixels of the stream (at least INIT_SAMPLE or all)."""
    sample, held = [], 0
    for chunk in chunks:
        sample.append(chunk)
        held += chunk.shape[0]
        if held >= INIT_SAMPLE:
            break
    if not sample:
        raise NMFError(name, "holds no pixel vectors", "give non-empty data")
    pixels = torch.cat(sample)
    check_fittable(pixels, name)
    return _initialize(pixels, k, seed)[1]


class OnlineStatistics:
    """Sufficient statistics ``A = Σ_b S_bᵀS_b``, ``B = Σ_b S_bᵀV_b`` with each minibatch's latest part.

    Keeping every minibatch's part (k·(k + C) numbers each) lets a later pass *replace* it
    rather than add to it — Mairal et al.'s variant for finite data sets — so the statistics
    always describe each pixel once, and the fixed point is that of full-batch alternating NNLS.
    """

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None

    def replace(self, index: int, gram: torch.Tensor, cross: torch.Tensor) -> None:
        """Set part ``index`` (appended when new) to ``gram`` = SᵀS and ``cross`` = SᵀV of its minibatch."""
        gram, cross = gram.double(), cross.double()
        if self.gram is None:
            self.gram, self.cross = torch.zeros_like(gram), torch.zeros_like(cross)
        if index < len(self.parts):
            old_gram, old_cross = self.parts[index]
            self.gram -= old_gram
            self.cross -= old_cross
            self.parts[index] = (gram, cross)
        else:
            self.parts.append((gram, cross))
        self.gram += gram
        self.cross += cross

    def refresh(self) -> None:
        """Re-add the parts, dropping rounding drift of repeated replacements."""
        self.gram = torch.stack([g for g, _ in self.parts]).sum(dim=0)
        self.cross = torch.stack([c for _, c in self.parts]).sum(dim=0)

    def copy(self) -> OnlineStatistics:
        """An independent copy (the parts' tensors are shared: they are never changed in place)."""
        twin = OnlineStatistics()
        twin.parts = list(self.parts)
        twin.gram = None if self.gram is None else self.gram.clone()
        twin.cross = None if self.cross is None else self.cross.clone()
        return twin

    def merge(self) -> None:
        """Fold every part into one (the data is done with: later minibatches only add to it)."""
        if self.parts:
            self.refresh()
            self.parts = [(self.gram.clone(), self.cross.clone())]

    def rescale(self, norms: torch.Tensor) -> None:
        """Follow ``P → D⁻¹·P`` (``D = diag(norms)``, zero norms kept as 1): codes ``S → S·D``.

        Then ``SᵀS → D·SᵀS·D`` and ``SᵀV → D·SᵀV``, so that statistics and components stay
        consistent after :func:`normalise_rows`.
        """
        scale = torch.where(norms > 0, norms, torch.ones_like(norms)).double()
        self.parts = [(gram * scale[:, None] * scale[None, :], cross * scale[:, None]) for gram, cross in self.parts]
        if self.gram is not None:
            self.gram = self.gram * scale[:, None] * scale[None, :]
            self.cross = self.cross * scale[:, None]


def online_pass(chunks: Iterable[torch.Tensor], components: torch.Tensor, statistics: OnlineStatistics, solver: str, first: int = 0) -> float:
    """One pass over the minibatches: code each by NNLS, update its statistics, then P (in place).

    Minibatch ``i`` of the pass replaces part ``first + i`` of ``statistics`` (a new part when
    there is none yet). Returns the pass's relative error, each minibatch measured against the
    P it was coded with.
    """
    squared_error, norm_squared = 0.0, 0.0
    for index, pixels in enumerate(chunks, start=first):
        codes = nnls(pixels, components, tolerance=ONLINE_NNLS_TOLERANCE)
        gram, cross = codes.T @ codes, codes.T @ pixels
        block_norm = _squared_norm(pixels)
        squared_error += float(_squared_error(block_norm, components, cross, gram))
        norm_squared += block_norm
        statistics.replace(index, gram, cross)
        total_gram, total_cross = statistics.gram.float(), statistics.cross.float()
        if solver == "hals":
            _hals_update(components, total_cross, total_gram, ONLINE_SWEEPS)
        else:
            for _ in range(ONLINE_SWEEPS):
                _mu_step(components, total_cross, total_gram)
    if norm_squared == 0:
        raise NMFError("NMF online pass", "all pixel vectors are zero", "choose a layer or images with positive activations")
    statistics.refresh()
    return math.sqrt(max(squared_error, 0.0) / norm_squared)


def streamed_error(blocks: Iterable[torch.Tensor], components: torch.Tensor) -> tuple[float, float, int]:
    """Pool ``‖V − S·P‖²`` (NNLS codes), ``‖V‖²`` and the pixel count over a stream of (clamped) blocks."""
    residual, total, count = 0.0, 0.0, 0
    for pixels in blocks:
        codes = nnls(pixels, components)
        residual += float((pixels - codes @ components).double().square().sum())
        total += _squared_norm(pixels)
        count += pixels.shape[0]
    return residual, total, count




# ----------------------------------------------------------------------------------- sklearn
def fit_sklearn(pixels: torch.Tensor, k: int, tol: float, max_iter: int, seed: int) -> FitResult:
    """Fit :class:`sklearn.decomposition.NMF` (``init='nndsvda'``) on the CPU pixel matrix, in float32."""
    import warnings

    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    model = NMF(n_components=k, init="nndsvda", tol=tol, max_iter=max_iter, random_state=seed)

    matrix = pixels.cpu().numpy().astype(np.float32, copy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        codes = torch.from_numpy(model.fit_transform(matrix)).float()
    components = torch.from_numpy(model.components_).float()
    scales = normalise_rows(components)
    codes *= scales[None, :]
    residual = _exact_squared_error(pixels.float(), codes.T.contiguous(), components)
    norm_squared = _squared_norm(pixels)
    return FitResult(components, math.sqrt(residual), math.sqrt(residual / norm_squared), [], int(model.n_iter_), pixels.shape[0])

