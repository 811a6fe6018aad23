"""Nonlinear refinement: optimise the true objective through φ after the linear AM.

    F(A, B, α) = Σ_i ||Z_i - A_i φ(Σ_j α_ij B_j)||²        φ ∈ {identity, tanh, silu}

over the adapters A [N, p, r], the bank B [m, r, d] and the codes α [N, m] (rows on the simplex with at most
``kmax`` non-zeros), warm-started from the closed-form AM (which fits φ = identity).

What Z is: the targets exactly as passed. With ``mean=None`` they are used as they are (pass the z-scored
experts of the trainer, or raw weights); with ``mean`` [p, d] the objective is
Σ_i ||W_i - M - A_i B~_i||², i.e. the raw weights with the stored mean term, and ``fit_mean=True`` also
updates M in closed form (M = mean_i (W_i - A_i B~_i)). :func:`refine_fit` does this for a trainer's
FitResult: it refines in the original scale (adapters with the normalisation scale folded, the mean as the
extra term), the error the artifact reproduces.

Methods (``method``):

* ``"gn"``: block-coordinate second order. Each iteration (a) codes: per expert a Gauss-Newton model of F_i in
  α_i restricted to a candidate set (the support plus the atoms with the most negative gradient when
  ``support_reselect``), a Levenberg-Marquardt-damped simplex-constrained QP solved by accelerated projected
  gradient, top-``kmax`` sparse projection, the QP again on the kept support; accepted per expert only if
  F_i decreases (else its damping grows); (b) bank: Levenberg-Marquardt on B with the Gauss-Newton normal
  equations (JᵀJ + λ D) δ = -Jᵀr solved by conjugate gradient from hand-written JVP/VJP products (one
  ``ops.compose`` per product); accepted only if F decreases, else λ grows and the step is retried;
  (c) adapters: the exact ridge least-squares solve given B~ (``ops.cholesky_solve_batched``), accepted per
  expert only if F_i does not increase; (d) the mean, when fitted. F never increases. For φ = identity the
  bank step is Newton's step on a quadratic, so (b) and (c) are the exact block minimisers.
* ``"adam"``: Adam on (A, B, α) jointly with the gradients of :func:`objective_grads` (written out: one fused
  residual and two batched products per step; they equal autograd's through :func:`objective`, whose compose
  has the formula registered by :func:`register_compose_autograd`; with ``fit_mean`` M is refitted exactly
  before each step), learning rates relative to each tensor's RMS, α projected
  back onto the ``kmax``-sparse simplex after every step (top-k then Euclidean simplex projection; atoms
  re-enter when their gradient pushes them into the top k, unless ``support_reselect=False`` freezes the
  support).
* ``"varpro"``: variable projection, the adapters eliminated. Each step A_i is the exact ridge least-squares
  solve given φ(Σ_j α_ij B_j) (``ops.cholesky_solve_batched``), then one Adam step on (B, α) with the gradient
  at that A, which is the gradient of the reduced objective min_A F (the partial gradient in A vanishes
  there); α projected as for "adam". A step costs a little more than a joint Adam step (a Gram product and a
  batched small Cholesky instead of the adapters' gradient) and gets further per step: the lowest error after
  20 CPU seconds on every suite of ``python bench/bench_refine.py --compare`` (0.2-2 % below joint Adam).
* ``"varpro_gn"``: variable projection with second-order steps on the bank. Each iteration (a) one
  Levenberg-Marquardt step on the bank, the adapters eliminated: the Gauss-Newton equations of the Kaufman
  Jacobian, (JᵀJ + λD) δ = -g, solved by at most ``cg_iters`` (10) products of conjugate gradient (20 cost almost
  twice as much for about the same progress per iteration: bench/RESULTS.md, time to error) preconditioned with
  each atom's r x r block 2 Σ_i α_ij² A_iᵀA_i (it undoes the spread of the adapters' singular values, which is
  what makes first-order steps on the bank slow), the step accepted only if F decreases with the adapters
  re-solved, else λ grows and it is retried; (b) one Adam step on the codes at ``lr / kmax`` (projected as for
  "adam"; the default lr of this method is 0.01: the codes move slowly while the bank is re-optimised under them);
  (c) the mean, when fitted, and the exact adapters. An iteration costs about 10-20 "varpro" steps and needs far
  fewer of them where the adapters are badly conditioned: on clustered at budget 0.5 (r = 95) it is at 0.0597
  after 10 CPU seconds of refinement where "varpro" is at 0.0632 after 20 (``python bench/bench_refine.py
  --compare --compare-budget 0.5 --compare-no-mean``). It moves the codes slowly, so over long runs varpro can end
  lower.
* ``"auto"`` (the trainer's default): "varpro_gn" where the AM's adapters are badly conditioned
  (:func:`auto_method`), "varpro" elsewhere.

For φ ≠ identity the scale of the atoms matters (unit-norm atoms make φ nearly linear). Before the first
iteration the bank is rescaled by the gain (the unscaled bank with its adapters as given, or a few gains that
set the RMS of the mixture Σ_j α_ij B_j to 0.05 ... 2) whose exact adapter refit gives the lowest training
objective; codes stay on the simplex.

Validation and early stopping: with ``val_W`` [Nv, p, d] (experts held out of the fit), every ``eval_every``
iterations their codes and adapters are fitted with the bank frozen (warm-started from the previous
evaluation: a few code / adapter steps of the "gn" kind, which only lower their own objective), and the
relative error of those held-out experts is the validation error. Without ``val_W`` the training error plays
that role. The best state by validation error is kept (the starting state included), so the validation error
returned is never above the one the refinement starts from; the loop stops after ``patience`` evaluations
without a relative improvement of ``min_improvement``, or after ``steps`` iterations, or ``time_limit``
seconds.

Everything runs on the device of W (CUDA included); the bank step and the products with codes go through
``ops.compose``; the codes step materialises at most ``chunk`` x (candidates) atoms of r x d at a time, never
experts x m x r x d. With ``chunk_experts`` every step is summed over chunks of experts, so that the global scope
of a real model fits (:func:`plan_refine_chunks` picks the chunk for a memory limit).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from globe.bank import project_simplex
from globe.config import GlobeConfig
from globe_kernels import ops
from globe_kernels.reference import SparseCodes, apply_phi, check_phi, to_dense_codes

__all__ = [
    "RefineResult",
    "refine",
    "refine_fit",
    "apply_refinement",
    "linear_warm_start",
    "fit_frozen",
    "phi_grad",
    "objective",
    "objective_grads",
    "sparse_simplex_projection",
    "register_compose_autograd",
    "METHODS",
    "DEFAULT_LR",
    "SECOND_ORDER_METHODS",
    "auto_method",
    "refine_memory_bytes",
    "plan_refine_chunks",
]

METHODS = ("gn", "adam", "varpro", "varpro_gn", "auto")
# methods whose iteration is a Gauss-Newton step: one record per iteration by default, not one per 25
SECOND_ORDER_METHODS = ("gn", "varpro_gn")
# each method's relative learning rate when none is given ("gn" has none)
DEFAULT_LR = {"gn": 0.01, "adam": 0.1, "varpro": 0.1, "varpro_gn": 0.01}
# "auto" takes varpro_gn above this median condition number of A_iᵀA_i, varpro below (see auto_method)
AUTO_KAPPA = 1e4
# peak working memory of refine() beyond its inputs: (multiples of W [N, p, d], of one [N, r, d] tensor), the
# least-squares fits of bench/bench_refine_memory.py (CPU, N 256 and 512, p=96, d=384, r 32-95) rounded up:
# varpro_gn 0.45 / 6.33, varpro 0.12 / 3.26, adam 1.06 / 2.74, gn 0.88 / 2.31 (gn's fit is noisy: its code step
# also holds fixed-size chunks), each with a fixed 50-340 MB (REFINE_FIXED)
REFINE_MEMORY = {"varpro_gn": (1.0, 6.5), "gn": (1.5, 3.0), "varpro": (0.5, 3.5), "adam": (1.5, 3.0)}
# in chunks of experts (chunk_experts): adapter-sized tensors [N, p, r] held across chunks (the state, the step's
# new adapters, the best state so far, one spare) and the cached Gauss-Newton factors as [N, r, d] tensors (the
# projection's two, φ' for a nonlinear φ). Both ways: bank-sized tensors [m, r, d] (state, best, gradient, Adam's
# moments; the Gauss-Newton step's CG vectors and trial bank), measured with --chunked-sizes 32:32:8:1024 (a bank
# of 50 MB, 4 MB of experts): up to 15 for varpro_gn (gn's bank step is the same), 7 for varpro and adam
REFINE_PERSISTENT = 4
REFINE_CACHE = 3
REFINE_BANK_COPIES = {"varpro_gn": 16, "gn": 16, "varpro": 9, "adam": 9}
REFINE_FIXED = 256 * 2**20  # bytes: buffers of a fixed size (chunks of the error sums) and the allocator's slack
# initial bank rescale for a nonlinear φ: None keeps the bank; a number is the target RMS of the mixture
_GAINS = (None, 0.05, 0.25, 0.5, 1.0, 2.0)


# --- φ and the differentiable compose ----------------------------------------------------------------------


def phi_grad(u: torch.Tensor, phi: str) -> torch.Tensor:
    """φ'(u) elementwise."""
    phi = check_phi(phi)
    if phi == "tanh":
        return 1 - torch.tanh(u).pow(2)
    if phi == "silu":
        s = torch.sigmoid(u)
        return s * (1 + u * (1 - s))
    return torch.ones_like(u)


_REGISTERED = False


def _compose_setup(ctx, inputs, output):
    bank, alpha, indices, values, phi, out_dtype = inputs
    ctx.phi = phi
    ctx.sparse = alpha is None
    ctx.save_for_backward(bank, values if alpha is None else alpha, indices)


def _compose_backward(ctx, grad):
    bank, codes, indices = ctx.saved_tensors
    m, r, d = bank.shape
    acc = torch.float64 if bank.dtype == torch.float64 else torch.float32
    dense = to_dense_codes(SparseCodes(indices, codes), m) if ctx.sparse else codes
    Bf = bank.reshape(m, r * d).to(acc)
    dense = dense.to(acc)
    U = dense @ Bf
    gU = grad.reshape(U.shape).to(acc) * phi_grad(U, ctx.phi)
    g_bank = (dense.T @ gU).reshape(m, r, d).to(bank.dtype) if ctx.needs_input_grad[0] else None
    g_alpha = g_values = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
        g_dense = gU @ Bf.T
        if ctx.sparse:
            idx = indices.long()
            g_values = g_dense.gather(1, idx.clamp_min(0)).masked_fill(idx < 0, 0).to(codes.dtype)
        else:
            g_alpha = g_dense.to(codes.dtype)
    return g_bank, g_alpha, None, g_values, None, None


def register_compose_autograd() -> None:
    """Give the ``globe::compose`` custom op an autograd formula (idempotent; runs on import of this module).

    out = φ(α B) with U = α B recomputed in the backward: dL/dB = αᵀ (g ⊙ φ'(U)), dL/dα = (g ⊙ φ'(U)) Bᵀ, and
    for sparse codes dL/dvalues[i, s] = <g_i ⊙ φ'(U_i), B_indices[i, s]> (0 on padding slots). Gradients are
    accumulated like the forward (float32, float64 stays float64) and returned in each input's dtype.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    torch.library.register_autograd("globe::compose", _compose_backward, setup_context=_compose_setup)
    _REGISTERED = True


register_compose_autograd()


# --- objective pieces --------------------------------------------------------------------------------------


def _mix(bank: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """U = Σ_j α_ij B_j [N, r, d] in the bank's dtype, through ops.compose."""
    return ops.compose(bank, alpha, "identity", bank.dtype)


_ERROR_CHUNK = 256  # experts per chunk of the per-expert errors: no [N, p, d] temporaries


def _per_expert(Z: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """F_i = ||Z_i - A_i B~_i||² [N] in float64, in chunks of experts (the residual is as large as the experts)."""
    F = torch.empty(Z.shape[0], dtype=torch.float64, device=Z.device)
    for lo in range(0, Z.shape[0], _ERROR_CHUNK):
        hi = lo + _ERROR_CHUNK
        F[lo:hi] = torch.baddbmm(Z[lo:hi], A[lo:hi], Bt[lo:hi], alpha=-1.0).pow_(2).sum(dim=(1, 2),
                                                                                        dtype=torch.float64)
    return F


class _Targets:
    """The targets Z_i = W_i - M of the experts, formed slice by slice (no full-size copy of W - M)."""

    def __init__(self, W: torch.Tensor, mean: torch.Tensor | None) -> None:
        self.W, self.mean = W, mean
        self.shape, self.dtype, self.device = W.shape, W.dtype, W.device

    def __getitem__(self, s: slice) -> torch.Tensor:
        Wc = self.W[s]
        return Wc if self.mean is None else Wc - self.mean


def _slices(N: int, chunk: int | None) -> list[slice]:
    """Consecutive ranges of at most ``chunk`` experts (one range of all N when chunk is None)."""
    step = N if not chunk else max(1, min(N, int(chunk)))
    return [slice(lo, min(N, lo + step)) for lo in range(0, N, max(step, 1))]


def _ridge(bank: torch.Tensor, alpha: torch.Tensor, phi: str, lam: float, sl: list[slice]) -> float:
    """lam * mean_i tr(B~_i B~_iᵀ) / r over all experts (the adapter solve's relative ridge), one chunk at a time."""
    tot = 0.0
    for s in sl:
        tot += float(apply_phi(_mix(bank, alpha[s]), phi).pow(2).sum(dtype=torch.float64))
    ridge = float(lam) * tot / max(1, alpha.shape[0]) / bank.shape[1]
    return max(ridge, float(torch.finfo(bank.dtype).tiny))


def _train_F(Z, A: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor, phi: str,
             chunk: int | None = None) -> torch.Tensor:
    """F_i = ||Z_i - A_i φ(Σ_j α_ij B_j)||² [N] in float64, the mixture composed one chunk of experts at a time."""
    F = torch.empty(alpha.shape[0], dtype=torch.float64, device=alpha.device)
    for s in _slices(alpha.shape[0], chunk):
        F[s] = _per_expert(Z[s], A[s], apply_phi(_mix(bank, alpha[s]), phi))
    return F


def objective(Z: torch.Tensor, A: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor,
              phi: str) -> torch.Tensor:
    """Σ_i ||Z_i - A_i φ(Σ_j α_ij B_j)||², differentiable in A, bank and alpha (through ``ops.compose``)."""
    return (Z - A @ ops.compose(bank, alpha, phi)).pow(2).sum()


def objective_grads(Z: torch.Tensor, A: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor, phi: str, *,
                    mean: torch.Tensor | None = None, fit_mean: bool = False, scale: float = 1.0,
                    grad_A: bool = True, U: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of scale * Σ_i ||Z_i - M - A_i φ(U_i)||², U_i = Σ_j α_ij B_j, in (A, bank, alpha), written out.

    With R_i = Z_i - M - A_i φ(U_i): dA_i = -2 R_i φ(U_i)ᵀ, dU_i = -2 (A_iᵀ R_i) ⊙ φ'(U_i), dB_j = Σ_i α_ij dU_i,
    dα_ij = <dU_i, B_j> (times scale). The same values as autograd through :func:`objective`, in one fused
    residual (baddbmm) and two batched products, without a graph, the squared residual or its backward (a joint
    Adam step on CPU takes 1.2-1.4x less time: ``python bench/bench_refine.py --step-time``). mean: M [p, d]
    (zero when None); with ``fit_mean`` M is first replaced by its exact minimiser given the rest, M + mean_i
    R_i, and the gradients are those at the new M (the gradient of the objective with M eliminated). Returns (dA,
    dbank, dalpha, M); dA is None with ``grad_A=False``. U: the mixture Σ_j α_ij B_j when the caller has it
    already.
    """
    U = _mix(bank, alpha) if U is None else U
    Bt = U if phi == "identity" else apply_phi(U, phi)
    R = torch.baddbmm(Z, A, Bt, alpha=-1.0)
    if mean is not None:
        R.sub_(mean)
        if fit_mean:
            shift = R.mean(0)
            R.sub_(shift)
            mean = mean + shift
    c = -2.0 * scale
    gA = torch.bmm(R, Bt.transpose(1, 2)).mul_(c) if grad_A else None
    gU = torch.bmm(A.transpose(1, 2), R).mul_(c)
    if phi != "identity":
        gU.mul_(phi_grad(U, phi))
    m, r, d = bank.shape
    gU = gU.reshape(-1, r * d)
    g_bank = (alpha.to(gU.dtype).T @ gU).reshape(m, r, d).to(bank.dtype)
    g_alpha = (gU @ bank.reshape(m, r * d).to(gU.dtype).T).to(alpha.dtype)
    return gA, g_bank, g_alpha, mean


def _grads(W: torch.Tensor, A: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor, phi: str, *,
           mean: torch.Tensor | None, fit_mean: bool, scale: float, grad_A: bool, chunk: int | None,
           U: torch.Tensor | None = None
           ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`objective_grads` over chunks of experts: the bank's gradient summed, the adapters' and codes'
    gathered; with ``fit_mean`` the exact mean M = mean_i (W_i - A_i φ(U_i)) is found by a first pass."""
    N = alpha.shape[0]
    sl = _slices(N, chunk)
    if len(sl) <= 1:
        return objective_grads(W, A, bank, alpha, phi, mean=mean, fit_mean=fit_mean, scale=scale,
                               grad_A=grad_A, U=U)
    if mean is not None and fit_mean:
        mean = _exact_mean(W, A, bank, alpha, phi, chunk)
    gA = torch.empty_like(A) if grad_A else None
    g_bank = torch.zeros_like(bank)
    g_alpha = torch.empty_like(alpha)
    for s in sl:
        a, b, c, _ = objective_grads(W[s], A[s], bank, alpha[s], phi, mean=mean, scale=scale, grad_A=grad_A)
        g_bank += b
        g_alpha[s] = c
        if grad_A:
            gA[s] = a
    return gA, g_bank, g_alpha, mean


def sparse_simplex_projection(v: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest point of {x >= 0, Σ x = 1, at most k non-zeros} to each row of v (restricted to mask).

    The exact projection onto the k-sparse simplex: keep the k largest entries, project them onto the simplex.
    """
    if mask is not None:
        v = v.masked_fill(~mask, float("-inf"))
    k = min(k, v.shape[1])
    idx = v.topk(k, dim=1).indices
    keep = torch.zeros_like(v, dtype=torch.bool).scatter_(1, idx, True)
    if mask is not None:
        keep &= mask
    return project_simplex(torch.where(keep, v, torch.zeros_like(v)), keep)


def _adapter_solve(Z: torch.Tensor, Bt: torch.Tensor, lam: float, ridge: float | None = None) -> torch.Tensor:
    """A_i = Z_i B~_iᵀ (B~_i B~_iᵀ + ridge I)^-1, ridge = lam * mean trace(G_i) / r over these experts unless
    given (the chunked callers pass the mean over all experts, :func:`_ridge`)."""
    G = Bt @ Bt.transpose(1, 2)
    r = G.shape[1]
    if ridge is None:
        ridge = float(lam) * float(G.diagonal(dim1=1, dim2=2).sum(1).mean()) / r
        ridge = max(ridge, float(torch.finfo(G.dtype).tiny))
    A, _ = ops.cholesky_solve_batched(G, Z @ Bt.transpose(1, 2), ridge)
    return A


def _perp(Bt: torch.Tensor, lam: float, ridge: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """X -> X (I - P_i), P_i the (ridge-regularised) projection onto the row space of B~_i: the Kaufman
    variable-projection factor of the Jacobian once the adapters are eliminated. X [N, r, d] or [N, c, r, d].
    ridge: as in :func:`_adapter_solve`."""
    G = Bt @ Bt.transpose(1, 2)
    r = G.shape[1]
    if ridge is None:
        ridge = max(float(lam) * float(G.diagonal(dim1=1, dim2=2).sum(1).mean()) / r,
                    float(torch.finfo(G.dtype).tiny))
    G = G + ridge * torch.eye(r, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G)
    # the explicit r x r inverse then one batched product: several times faster on CPU than a triangular solve
    # with d right-hand sides, and as accurate at these ridges
    GiB = torch.cholesky_inverse(L) @ Bt if not bool(info.any()) else torch.linalg.lstsq(G, Bt).solution
    BtT = Bt.transpose(1, 2)

    def perp(X: torch.Tensor) -> torch.Tensor:
        if X.dim() == 4:
            return X - (X @ BtT[:, None]) @ GiB[:, None]
        return X - (X @ BtT) @ GiB

    return perp


def refine_memory_bytes(N: int, p: int, d: int, r: int, method: str, dtype: torch.dtype = torch.float32, *,
                        m: int = 0, chunk: int | None = None, cache: bool = True) -> int:
    """Estimated peak working memory of :func:`refine` over N experts of p x d at inner dimension r and m atoms,
    beyond its inputs ("auto" counts the larger of its two methods).

    All at once (chunk None or >= N): :data:`REFINE_MEMORY`'s multiples of W and of one [N, r, d] tensor. In
    chunks of ``chunk`` experts: those multiples for one chunk, plus :data:`REFINE_PERSISTENT` adapter-sized
    tensors [N, p, r] (two more for "adam"'s moments) and, for the Gauss-Newton bank step with ``cache``, its
    :data:`REFINE_CACHE` [N, r, d] factors. Both add :data:`REFINE_BANK_COPIES` bank-sized tensors [m, r, d]
    (the multiples of W and [N, r, d] were measured at m = 12, where the bank is negligible), and
    :data:`REFINE_FIXED`."""
    if method not in METHODS:
        raise ValueError(f"unknown refinement method {method!r}; methods: {METHODS}")
    item = torch.empty((), dtype=dtype).element_size()
    names = ("varpro_gn", "varpro") if method == "auto" else (method,)
    bank = max(REFINE_BANK_COPIES[n] for n in names) * m * r * d
    if chunk is None or chunk >= N:
        work = max(a * N * p * d + b * N * r * d for a, b in (REFINE_MEMORY[n] for n in names))
        return int((work + bank) * item) + REFINE_FIXED
    C = max(1, int(chunk))
    work = max(a * C * p * d + b * C * r * d for a, b in (REFINE_MEMORY[n] for n in names))
    persistent = (REFINE_PERSISTENT + (2 if method == "adam" else 0)) * N * p * r
    cached = REFINE_CACHE * N * r * d if cache and any(n in SECOND_ORDER_METHODS for n in names) else 0
    return int((work + persistent + cached + bank) * item) + REFINE_FIXED


def plan_refine_chunks(N: int, p: int, d: int, r: int, method: str, limit_bytes: int, *,
                       dtype: torch.dtype = torch.float32, m: int = 0) -> tuple[int | None, bool, int]:
    """How :func:`refine` fits in ``limit_bytes``: (chunk_experts, cache_factors, estimated bytes).

    All experts at once where that fits (chunk None); else the largest chunk with the Gauss-Newton factors
    cached; else the largest without them. Raises ValueError when even one expert at a time does not fit.
    Estimates from :func:`refine_memory_bytes`."""
    full = refine_memory_bytes(N, p, d, r, method, dtype, m=m)
    if full <= limit_bytes:
        return None, True, full
    for cache in (True, False):
        if refine_memory_bytes(N, p, d, r, method, dtype, m=m, chunk=1, cache=cache) > limit_bytes:
            continue
        lo, hi = 1, max(1, N - 1)
        while lo < hi:  # the largest chunk within the limit
            mid = (lo + hi + 1) // 2
            if refine_memory_bytes(N, p, d, r, method, dtype, m=m, chunk=mid, cache=cache) <= limit_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo, cache, refine_memory_bytes(N, p, d, r, method, dtype, m=m, chunk=lo, cache=cache)
    raise ValueError(
        f"the refinement ({method}) of N={N} experts of {p} x {d} at r={r}, m={m} needs about "
        f"{refine_memory_bytes(N, p, d, r, method, dtype, m=m, chunk=1, cache=False) / 2**30:.3g} GiB even one "
        f"expert at a time, more than {max(limit_bytes, 0) / 2**30:.3g} GiB"
    )


def auto_method(A: torch.Tensor, sample: int = 64) -> tuple[str, float]:
    """("varpro_gn" or "varpro", κ): the refinement method "auto" resolves to for adapters A [N, p, r].

    κ is the median over (at most ``sample`` evenly spaced) experts of the condition number of A_iᵀA_i. The
    Gauss-Newton bank step pays off where the adapters are badly conditioned, which is what slows first-order
    steps on the bank: on the synthetic suites of ``python bench/bench_refine.py --compare`` κ after the AM is
    4e2 to 7e3 at budget 0.25 (r = 43 of p = 96; varpro ahead at 20 s on three suites of four) and 4e4 to 1e7 at
    budget 0.5 (r = 95; varpro_gn ahead on all four), hence the threshold :data:`AUTO_KAPPA` = 1e4.
    """
    N = A.shape[0]
    idx = torch.linspace(0, N - 1, min(N, sample)).round().long().unique().to(A.device)
    Ad = A[idx].double()
    ev = torch.linalg.eigvalsh(Ad.transpose(1, 2) @ Ad)
    kappa = float((ev[:, -1] / ev[:, 0].clamp_min(torch.finfo(torch.float64).tiny)).median())
    return ("varpro_gn" if kappa > AUTO_KAPPA else "varpro"), kappa


def _exact(Z, bank: torch.Tensor, alpha: torch.Tensor, phi: str, lam: float,
           chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A*, F_i) with the adapters solved exactly for the given bank and codes (Z: a tensor or _Targets)."""
    N = alpha.shape[0]
    sl = _slices(N, chunk)
    if len(sl) <= 1:
        Zc = Z[0:N]
        Bt = apply_phi(_mix(bank, alpha), phi)
        A = _adapter_solve(Zc, Bt, lam)
        return A, _per_expert(Zc, A, Bt)
    ridge = _ridge(bank, alpha, phi, lam, sl)
    A = torch.empty(N, Z.shape[1], bank.shape[1], dtype=bank.dtype, device=bank.device)
    F = torch.empty(N, dtype=torch.float64, device=bank.device)
    for s in sl:
        Zc, Bt = Z[s], apply_phi(_mix(bank, alpha[s]), phi)
        A[s] = _adapter_solve(Zc, Bt, lam, ridge)
        F[s] = _per_expert(Zc, A[s], Bt)
    return A, F


class _Adam:
    """Adam (torch.optim.Adam's update at its defaults) on tensors updated in place, one learning rate each.

    Written out because building a torch optimiser imports torch._dynamo, about 3 CPU seconds the first time
    in a process: most of a short refinement."""

    def __init__(self, tensors_lrs: list[tuple[torch.Tensor, float]], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.items = [(x, float(lr), torch.zeros_like(x), torch.zeros_like(x)) for x, lr in tensors_lrs]
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0

    def step(self, grads: list[torch.Tensor]) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for (x, lr, m1, m2), g in zip(self.items, grads):
            m1.mul_(self.b1).add_(g, alpha=1 - self.b1)
            m2.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            x.addcdiv_(m1, m2.sqrt().div_(math.sqrt(c2)).add_(self.eps), value=-lr / c1)


@dataclass
class _State:
    A: torch.Tensor
    bank: torch.Tensor
    alpha: torch.Tensor
    mean: torch.Tensor | None

    def clone(self) -> _State:
        return _State(self.A.clone(), self.bank.clone(), self.alpha.clone(),
                      None if self.mean is None else self.mean.clone())


# --- Gauss-Newton blocks -----------------------------------------------------------------------------------


def _adapter_step(Z, st: _State, phi: str, lam_A: float, F_old: torch.Tensor) -> torch.Tensor:
    Bt = apply_phi(_mix(st.bank, st.alpha), phi)
    A_new = _adapter_solve(Z, Bt, lam_A)
    F_new = _per_expert(Z, A_new, Bt)
    keep = F_new <= F_old
    st.A = torch.where(keep[:, None, None], A_new, st.A)
    return torch.where(keep, F_new, F_old)


def _qp_simplex(g: torch.Tensor, H: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor,
                iters: int) -> torch.Tensor:
    """min_x gᵀ(x - x0) + ½ (x - x0)ᵀ H (x - x0) on the simplex of the masked coordinates, per row (FISTA)."""
    L = torch.linalg.eigvalsh(H.double())[:, -1].clamp_min(1e-30).to(H.dtype)
    x = project_simplex(x0, mask)
    y, t = x, 1.0
    for _ in range(iters):
        grad = g + (H @ (y - x0).unsqueeze(-1)).squeeze(-1)
        x_new = project_simplex(y - grad / L[:, None], mask)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


def _codes_step(Z, st: _State, phi: str, kmax: int, extra: int, damp: torch.Tensor, F_old: torch.Tensor,
                chunk_elems: int, qp_iters: int, lam_A: float, force: torch.Tensor | None = None) -> torch.Tensor:
    """One damped Gauss-Newton step on the codes of every expert, the adapters eliminated (variable
    projection: the Gauss-Newton matrix uses the Jacobian times (I - P_i), the step is judged with the adapters
    re-solved exactly); updates st.alpha, st.A and damp in place, returns the new F_i."""
    N, m = st.alpha.shape
    _, r, d = st.bank.shape
    U = _mix(st.bank, st.alpha)
    Bt, dphi = apply_phi(U, phi), phi_grad(U, phi)
    GA = st.A.transpose(1, 2) @ st.A
    G = 2 * (GA @ Bt - st.A.transpose(1, 2) @ Z)  # dF/dB~
    gU = dphi * G
    del G
    Bf = st.bank.reshape(m, r * d)
    grad = gU.reshape(N, -1) @ Bf.T  # [N, m]
    support = st.alpha > 0
    c = min(m, max(kmax + extra, int(support.sum(1).max())))
    prio = torch.where(support, torch.full_like(grad, float("-inf")), grad)
    cand = (-prio).topk(c, dim=1).indices  # the support first, then the most negative gradients
    cmask = torch.ones_like(cand, dtype=torch.bool)
    if extra == 0:
        cmask = support.gather(1, cand)
    a_c = st.alpha.gather(1, cand)
    g_c = grad.gather(1, cand)
    H = torch.empty(N, c, c, dtype=Z.dtype, device=Z.device)
    step = max(1, chunk_elems // max(1, c * r * d))
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        perp = _perp(Bt[lo:hi], lam_A)
        D = dphi[lo:hi, None] * st.bank[cand[lo:hi]]  # [n, c, r, d]
        GD = perp(GA[lo:hi, None] @ D)
        H[lo:hi] = 2 * D.reshape(hi - lo, c, -1) @ GD.reshape(hi - lo, c, -1).transpose(1, 2)
        del D, GD
    diag = H.diagonal(dim1=1, dim2=2)
    Hd = H + torch.diag_embed(damp[:, None] * diag.clamp_min(0) + 1e-12 * diag.abs().mean(1, keepdim=True))
    x = _qp_simplex(g_c, Hd, a_c, cmask, qp_iters)
    k = min(kmax, c)
    keep = torch.zeros_like(cmask).scatter_(1, x.topk(k, dim=1).indices, True) & cmask & (x > 0)
    keep |= torch.zeros_like(cmask).scatter_(1, x.argmax(1, keepdim=True), True)  # never empty
    x = _qp_simplex(g_c, Hd, torch.where(keep, x, torch.zeros_like(x)), keep, qp_iters // 2 + 1)
    new_alpha = torch.zeros_like(st.alpha).scatter_(1, cand, x)
    A_new, F_new = _exact(Z, st.bank, new_alpha, phi, lam_A)
    ok = F_new < F_old
    if force is not None:
        ok |= force
    st.alpha = torch.where(ok[:, None], new_alpha, st.alpha)
    st.A = torch.where(ok[:, None, None], A_new, st.A)
    damp.copy_(torch.where(ok, (damp / 3).clamp_min(1e-6), (damp * 10).clamp_max(1e6)))
    return torch.where(ok, F_new, F_old)


_DOT_BLOCK = 1 << 22  # elements per block of _dot's products


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """<x, y> accumulated in float64, without float64 copies of x and y and in blocks of rows (x and y may be
    bank-sized: no temporary of their size)."""
    rows = max(1, _DOT_BLOCK // max(1, x[0].numel())) if x.dim() > 0 and x.shape[0] else 1
    if x.dim() == 0 or x.shape[0] <= rows:
        return (x * y).sum(dtype=torch.float64)
    return sum((x[i:i + rows] * y[i:i + rows]).sum(dtype=torch.float64) for i in range(0, x.shape[0], rows))


def _cg(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int,
        tol: float, precond: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
        x0: torch.Tensor | None = None, info: dict[str, float] | None = None) -> torch.Tensor:
    """Solve matvec(x) = b by (preconditioned) conjugate gradient from x0 (zero when None); stops when the
    preconditioned residual norm falls below tol times that of b, or on non-positive curvature. The vectors
    are updated in place: five of b's size at once besides what matvec and precond allocate (the bank steps'
    are bank-sized). info, when given, receives "iters" and "residual" (the final relative residual)."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    res = b.clone() if x0 is None else b - matvec(x)
    z = res if precond is None else precond(res)
    p = z.clone()
    rz = float(_dot(res, z))
    rz0 = rz if x0 is None else float(_dot(b, b if precond is None else precond(b)))
    stop = tol * tol * rz0
    it = 0
    for _ in range(iters):
        if rz <= stop or rz <= 0:
            break
        Ap = matvec(p)
        pAp = float(_dot(p, Ap))
        if not pAp > 0:
            break
        a = rz / pAp
        x.add_(p, alpha=a)
        res.sub_(Ap, alpha=a)
        del Ap
        z = None  # the previous preconditioned residual is not needed any more
        z = res if precond is None else precond(res)
        rz_new = float(_dot(res, z))
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
        it += 1
    if info is not None:
        info["iters"] = float(it)
        info["residual"] = math.sqrt(max(rz, 0.0) / max(rz0, 1e-300))
    return x


def _bank_system(Z, A: torch.Tensor, bank: torch.Tensor, w: torch.Tensor, phi: str, lam_A: float | None = None,
                 chunk: int | None = None, cache: bool = True):
    """Gradient of F in the bank, the Gauss-Newton product V -> JᵀJ V, the atoms' Gauss-Newton blocks H [m, r, r]
    and a diagonal scale D [m].

    With U_i = Σ_j w_ij B_j, B~_i = φ(U_i), GA_i = A_iᵀ A_i: dF/dB_j = Σ_i w_ij φ'(U_i) ⊙ 2(GA_i B~_i - A_iᵀ
    Z_i); JᵀJ V = 2 Σ_i w_ij φ'(U_i) ⊙ GA_i (φ'(U_i) ⊙ Σ_k w_ik V_k) (the JVP is one ``ops.compose``). With
    lam_A the product is that of the variable-projection (Kaufman) Jacobian, GA_i (...) (I - P_i) (adapters
    eliminated). H_j = 2 Σ_i w_ij² mean(φ'(U_i)²) GA_i is JᵀJ's block of atom j without the projection and the
    other atoms: acting on the r side, it undoes the spread of the adapters' singular values, which is what
    makes first-order steps on the bank slow; the CG uses it as a block-Jacobi preconditioner. D_j = tr(H_j)/r
    scales the damping.

    Everything is summed over chunks of ``chunk`` experts (all at once when None). The product needs each
    expert's GA_i, φ'(U_i) and projection (two [r, d] factors): with ``cache`` they are kept from the first
    pass (two [N, r, d] tensors, three for a nonlinear φ), otherwise recomputed chunk by chunk in every product
    (no [N, r, d] tensor at all; a varpro_gn iteration then takes 1.3-1.9x as long, bench/RESULTS.md).
    """
    N = w.shape[0]
    sl = _slices(N, chunk)
    ridge = _ridge(bank, w, phi, lam_A, sl) if lam_A is not None and len(sl) > 1 else None

    def factors(s: slice, with_grad: bool):
        U = _mix(bank, w[s])
        Bt = apply_phi(U, phi)
        dphi = phi_grad(U, phi) if phi != "identity" else None
        del U
        As = A[s]
        GA = As.transpose(1, 2) @ As
        gU = None
        if with_grad:
            gU = 2 * (GA @ Bt - As.transpose(1, 2) @ Z[s])
            if dphi is not None:
                gU = dphi * gU
        perp = _perp(Bt, lam_A, ridge) if lam_A is not None else (lambda X: X)
        return gU, dphi, GA, perp

    grad = torch.zeros(bank.shape, dtype=bank.dtype, device=bank.device)  # contiguous: accumulated through a view
    H = torch.zeros(bank.shape[0], bank.shape[1], bank.shape[1], dtype=bank.dtype, device=bank.device)
    kept = []
    for s in sl:
        gU, dphi, GA, perp = factors(s, True)
        ws = w[s]
        grad.view(grad.shape[0], -1).addmm_(ws.T, gU.reshape(ws.shape[0], -1))
        del gU
        c = dphi.pow(2).mean(dim=(1, 2)) if dphi is not None else torch.ones_like(ws[:, 0])
        H += 2 * torch.einsum("ij,iab->jab", ws.pow(2) * c[:, None], GA)
        if cache or len(sl) == 1:
            kept.append((dphi, GA, perp))
    D = (H.diagonal(dim1=1, dim2=2).sum(1) / H.shape[1]).clamp_min(1e-30)

    def gn(V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(V.shape, dtype=V.dtype, device=V.device)
        for i, s in enumerate(sl):
            dphi, GA, perp = kept[i] if kept else factors(s, False)[1:]
            ws = w[s]
            dB = _mix(V, ws)
            if dphi is not None:
                dB = dphi * dB
            X = perp(GA @ dB)
            if dphi is not None:
                X = dphi * X
            out.view(out.shape[0], -1).addmm_(ws.T, X.reshape(ws.shape[0], -1), alpha=2)
        return out

    return grad, gn, H, D


def _block_inverse(H: torch.Tensor, D: torch.Tensor, lam: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """V -> (H_j + lam D_j I)^-1 V_j per atom (the damped block-Jacobi preconditioner)."""
    r = H.shape[1]
    # a floor of 1e-7 D_j on the diagonal: H_j is singular for an atom no expert uses
    Hd = H + ((lam + 1e-7) * D)[:, None, None] * torch.eye(r, dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(Hd.double())
    if bool(info.any()):
        return lambda V: V / (D * (1 + lam))[:, None, None]
    Hi = torch.cholesky_inverse(L).to(H.dtype)
    return lambda V: Hi @ V


def _bank_step(Z, st: _State, phi: str, lam: list[float], F_old: torch.Tensor, cg_iters: int, lam_A: float,
               tries: int = 4, chunk: int | None = None, cache: bool = True) -> torch.Tensor:
    """Levenberg-Marquardt step on the bank, adapters eliminated (variable projection: Gauss-Newton normal
    equations with the Kaufman Jacobian, by conjugate gradient preconditioned with the atoms' blocks; the step
    is judged with the adapters re-solved exactly); lam[0] is the damping."""
    grad, gn, H, D = _bank_system(Z, st.A, st.bank, st.alpha, phi, lam_A, chunk, cache)
    rhs = grad.neg_()  # in place: the gradient itself is not needed again
    F_tot = float(F_old.sum())
    for _ in range(tries):
        damp = lam[0] * D[:, None, None]
        delta = _cg(lambda V, damp=damp: gn(V).addcmul_(damp, V), rhs, cg_iters, 1e-4,
                    _block_inverse(H, D, lam[0]))
        if not bool(torch.isfinite(delta).all()):  # overflow in a near-singular system: a rejected step
            lam[0] = min(lam[0] * 8, 1e8)
            continue
        bank_new = st.bank + delta
        A_new, F_new = _exact(Z, bank_new, st.alpha, phi, lam_A, chunk)
        if float(F_new.sum()) < F_tot:
            st.bank, st.A = bank_new, A_new
            lam[0] = max(lam[0] / 3, 1e-8)
            return F_new
        lam[0] = min(lam[0] * 8, 1e8)
    return F_old


def _exact_mean(W: torch.Tensor, A: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor, phi: str,
                chunk: int | None = None) -> torch.Tensor:
    """M = mean_i (W_i - A_i B~_i), the exact minimiser of F in M (summed one chunk of experts at a time)."""
    tot = torch.zeros(W.shape[1:], dtype=torch.float64, device=W.device)
    for s in _slices(W.shape[0], chunk):
        Bt = apply_phi(_mix(bank, alpha[s]), phi)
        tot += torch.baddbmm(W[s], A[s], Bt, alpha=-1.0).sum(0, dtype=torch.float64)
    return (tot / W.shape[0]).to(W.dtype)


def _mean_step(W, st: _State, phi: str, chunk: int | None = None) -> None:
    st.mean = _exact_mean(W, st.A, st.bank, st.alpha, phi, chunk)


def _chunked_steps(step: Callable[..., torch.Tensor], Z, st: _State, chunk: int | None,
                   *per_expert) -> torch.Tensor:
    """Run a step that treats every expert independently given the bank (``_codes_step``, ``_adapter_step``)
    one chunk of experts at a time; per_expert: tensors with a leading expert axis (sliced; damping updated in
    place through the view); returns the new F_i."""
    N = st.alpha.shape[0]
    sl = _slices(N, chunk)
    if len(sl) <= 1:
        return step(Z[0:N], st, *per_expert)
    F = torch.empty(N, dtype=torch.float64, device=st.alpha.device)
    for s in sl:
        sub = _State(st.A[s], st.bank, st.alpha[s], None)
        F[s] = step(Z[s], sub, *[None if t is None else t[s] for t in per_expert])
        st.A[s], st.alpha[s] = sub.A, sub.alpha
    return F


# --- validation: held-out experts fitted with the bank frozen -----------------------------------------------


def fit_frozen(Z: torch.Tensor, bank: torch.Tensor, phi: str, kmax: int, *, iters: int = 3,
               alpha: torch.Tensor | None = None, A: torch.Tensor | None = None, lambda_A: float = 1e-6,
               qp_iters: int = 60,
               chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes and adapters of experts Z [N, p, d] for a frozen bank: (alpha, A, F_i [N] float64).

    Without a warm start the codes start uniform over all m atoms; the first code step then sparsifies every
    row to kmax atoms (forced) and later steps are accepted only where they lower F_i. Each iteration: adapter
    solve, code step.
    """
    N, m = Z.shape[0], bank.shape[0]
    if alpha is None:
        alpha = torch.full((N, m), 1.0 / m, dtype=Z.dtype, device=Z.device)
    if A is None:
        A0 = torch.zeros(N, Z.shape[1], bank.shape[1], dtype=Z.dtype, device=Z.device)
    st = _State(A0 if A is None else A, bank, alpha.clone(), None)
    Fi = _per_expert(Z, st.A, apply_phi(_mix(bank, st.alpha), phi))
    damp = torch.full((N,), 1e-3, dtype=Z.dtype, device=Z.device)
    for _ in range(max(1, iters)):
        Fi = _adapter_step(Z, st, phi, lambda_A, Fi if A is not None else torch.full_like(Fi, float("inf")))
        A = st.A
        force = (st.alpha > 0).sum(1) > kmax
        Fi = _codes_step(Z, st, phi, kmax, kmax, damp, Fi, chunk_elems, qp_iters, lambda_A, force=force)
    Fi = _adapter_step(Z, st, phi, lambda_A, Fi)
    return st.alpha, st.A, Fi


# --- the refinement ----------------------------------------------------------------------------------------


@dataclass
class RefineResult:
    """The refined factors (best state by validation error) and how the run went.

    bank [m, r, d] (not unit-norm: for φ ≠ identity the atoms' scale is part of the model); alpha [N, m] rows
    on the simplex with at most kmax non-zeros; A [N, p, r]; mean [p, d] or None (as passed, or refitted);
    val_alpha / val_A: the held-out experts' codes and adapters for the returned bank. history: one record per
    evaluation {step, time_s, rel_error (training), rel_error_val}. rel errors are relative to the data passed
    (W, mean included when a mean is given).
    """

    bank: torch.Tensor
    alpha: torch.Tensor
    A: torch.Tensor
    phi: str
    method: str
    mean: torch.Tensor | None = None
    gain: float = 1.0
    val_alpha: torch.Tensor | None = None
    val_A: torch.Tensor | None = None
    rel_error_start: float = float("nan")
    rel_error: float = float("nan")
    rel_error_val_start: float = float("nan")
    rel_error_val: float = float("nan")
    best_step: int = 0
    steps_run: int = 0
    stopped_early: bool = False
    time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def codes(self) -> SparseCodes:
        return ops.to_sparse_codes(self.alpha)

    def reconstruct(self) -> torch.Tensor:
        W = self.A @ ops.compose(self.bank, self.alpha, self.phi)
        return W if self.mean is None else W + self.mean

    def summary(self) -> dict[str, Any]:
        keys = ("phi", "method", "gain", "rel_error_start", "rel_error", "rel_error_val_start",
                "rel_error_val", "best_step", "steps_run", "stopped_early", "time_s")
        return {k: getattr(self, k) for k in keys}


def refine(
    W: torch.Tensor,
    bank: torch.Tensor,
    alpha: torch.Tensor | SparseCodes,
    A: torch.Tensor,
    phi: str = "identity",
    *,
    steps: int = 50,
    method: str = "gn",
    mean: torch.Tensor | None = None,
    fit_mean: bool = False,
    val_W: torch.Tensor | None = None,
    val_alpha: torch.Tensor | None = None,
    val_A: torch.Tensor | None = None,
    kmax: int | None = None,
    support_reselect: bool = True,
    rescale: bool = True,
    lambda_A: float = 1e-6,
    lr: float | None = None,
    cg_iters: int = 10,
    qp_iters: int = 60,
    eval_every: int | None = None,
    val_iters: int = 2,
    patience: int = 5,
    min_improvement: float = 1e-4,
    time_limit: float | None = None,
    chunk_elems: int = 1 << 24,
    chunk_experts: int | None = None,
    cache_factors: bool = True,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> RefineResult:
    """Refine (bank, alpha, A) on Σ_i ||W_i - M - A_i φ(Σ_j α_ij B_j)||² (see the module docstring).

    W [N, p, d] the experts fitted (z-scored or raw; M = mean, zero when None); bank [m, r, d]; alpha [N, m]
    dense or SparseCodes (rows on the simplex); A [N, p, r]. kmax: most atoms per expert (default: the
    largest support of alpha). eval_every: iterations between validation checks (default 1 for "gn" and
    "varpro_gn", 25 for "adam" and "varpro"); patience counts checks. lr: Adam's relative learning rate
    ("adam", "varpro"; the codes' for "varpro_gn"; None: :data:`DEFAULT_LR` of the method run). method "auto":
    "varpro_gn" where :func:`auto_method` finds the adapters badly conditioned, "varpro" elsewhere; the result's
    ``method`` and every record's say which ran. generator is unused (every method is deterministic) and kept
    for API symmetry.

    chunk_experts: work on at most this many experts at a time (None: all at once). Every step is the same
    computation, summed over chunks: nothing of size [N, p, d] beyond W itself and nothing of size [N, r, d]
    is formed, so the working memory is that of one chunk plus the adapters (:func:`refine_memory_bytes`,
    :func:`plan_refine_chunks`). The relative ridges are then taken over all experts, as unchunked; only the
    "gn" codes and adapter steps and the held-out experts' fits take them over the experts of a chunk (a
    difference of about 1e-6 relative in the errors at the default lambda_A). cache_factors (with chunk_experts):
    keep each expert's Gauss-Newton factors (about two [N, r, d] tensors) for the bank step's products instead
    of recomputing them in every product ("gn", "varpro_gn").
    """
    phi = check_phi(phi)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if W.dim() != 3 or bank.dim() != 3 or A.dim() != 3:
        raise ValueError("W [N, p, d], bank [m, r, d] and A [N, p, r] must be 3-d")
    if method == "auto":
        method, _ = auto_method(A)
    lr = DEFAULT_LR[method] if lr is None else float(lr)
    t_start = time.perf_counter()
    dtype, device = W.dtype, W.device
    m = bank.shape[0]
    N = W.shape[0]
    chunk = None if chunk_experts is None or int(chunk_experts) >= N else max(1, int(chunk_experts))
    if isinstance(alpha, SparseCodes):
        alpha = to_dense_codes(alpha, m)
    alpha = alpha.to(device=device, dtype=dtype)
    if kmax is None:
        kmax = max(1, int((alpha > 0).sum(1).max()))
    kmax = min(kmax, m)
    alpha = sparse_simplex_projection(alpha, kmax)
    dense = torch.contiguous_format  # a transposed bank or adapters (as the AM returns them) are laid out afresh
    st = _State(A.to(device=device, dtype=dtype).clone(memory_format=dense),
                bank.to(device=device, dtype=dtype).clone(memory_format=dense), alpha,
                None if mean is None else mean.to(device=device, dtype=dtype).clone())
    eval_every = eval_every or (1 if method in SECOND_ORDER_METHODS else 25)

    def energy(X: torch.Tensor) -> float:  # in chunks: no float64 copy of the experts
        return sum(float(X[s].pow(2).sum(dtype=torch.float64)) for s in _slices(X.shape[0], chunk or _ERROR_CHUNK))

    w_energy = energy(W)
    v_energy = energy(val_W) if val_W is not None else 0.0

    def rel(Fsum: float, energy: float) -> float:
        return math.sqrt(max(Fsum, 0.0) / max(energy, 1e-300))

    def target(s: _State | None = None) -> _Targets:
        return _Targets(W, (st if s is None else s).mean)

    def train_F(s: _State | None = None) -> torch.Tensor:
        s = st if s is None else s
        return _train_F(target(s), s.A, s.bank, s.alpha, phi, chunk)

    # initial gain of the bank for a nonlinear φ (the unscaled bank is a candidate, so F cannot go up)
    gain = 1.0
    if rescale and phi != "identity":
        u_rms = math.sqrt(sum(float(_mix(st.bank, st.alpha[s]).pow(2).sum(dtype=torch.float64))
                              for s in _slices(N, chunk)) / max(1, N * st.bank.shape[1] * W.shape[2]))
        best_F, best_A = float(train_F().sum()), st.A
        for g in _GAINS:
            c = 1.0 if g is None else g / max(u_rms, 1e-30)
            A_c, F_c = _exact(target(), st.bank * c, st.alpha, phi, lambda_A, chunk)
            Fc = float(F_c.sum())
            if Fc < best_F:
                best_F, best_A, gain = Fc, A_c, c
        st.bank = st.bank * gain
        st.A = best_A

    vstate: dict[str, torch.Tensor | None] = {
        "alpha": None if val_alpha is None else sparse_simplex_projection(val_alpha.to(W), kmax),
        "A": None if val_A is None else val_A.to(W),
    }
    if vstate["alpha"] is not None and gain != 1.0 and vstate["A"] is not None:
        vstate["A"] = None  # adapters of the unscaled bank; refit

    def validate(s: _State | None = None) -> float:
        s = st if s is None else s
        if val_W is None:
            return float("nan")
        Zv = _Targets(val_W, s.mean)
        parts = []
        for sv in _slices(val_W.shape[0], chunk):  # the held-out experts are independent given the bank
            a0, A0 = vstate["alpha"], vstate["A"]
            parts.append(fit_frozen(Zv[sv], s.bank, phi, kmax, iters=val_iters,
                                    alpha=None if a0 is None else a0[sv], A=None if A0 is None else A0[sv],
                                    lambda_A=lambda_A, qp_iters=qp_iters, chunk_elems=chunk_elems))
        vstate["alpha"], vstate["A"] = (torch.cat([x[i] for x in parts]) for i in range(2))
        return rel(float(sum(float(x[2].sum()) for x in parts)), v_energy)

    Fi = train_F()
    history: list[dict[str, Any]] = []
    err0 = rel(float(Fi.sum()), w_energy)
    val0 = validate()
    crit = (lambda rec: rec["rel_error_val"]) if val_W is not None else (lambda rec: rec["rel_error"])
    rec0 = {"step": 0, "time_s": time.perf_counter() - t_start, "rel_error": err0, "rel_error_val": val0,
            "method": method}
    history.append(rec0)
    if callback is not None:
        callback(rec0)
    best = (crit(rec0), 0, st.clone(), dict(vstate))
    stale = 0
    stopped = False

    # method state
    damp_c = torch.full((W.shape[0],), 1e-3, dtype=dtype, device=device)
    lam_b = [1e-3]
    opt = None
    if method in ("adam", "varpro"):
        rms = [math.sqrt(float(t.pow(2).sum(dtype=torch.float64)) / max(1, t.numel())) or 1.0 for t in (st.A, st.bank)]
        groups = [(st.bank, lr * rms[1]), (st.alpha, lr / kmax)]
        if method == "adam":
            groups.insert(0, (st.A, lr * rms[0]))
        opt = _Adam(groups)
        supp_mask = (st.alpha > 0) if not support_reselect else None
    if method == "varpro_gn":
        # only the codes take Adam steps here; the bank moves by Levenberg-Marquardt steps
        opt = _Adam([(st.alpha, lr / kmax)])
        supp_mask = (st.alpha > 0) if not support_reselect else None
        st.A, Fi = _exact(target(), st.bank, st.alpha, phi, lambda_A, chunk)

    extra = kmax if support_reselect else 0  # "gn": candidate atoms beyond the support
    step = 0
    for step in range(1, steps + 1):
        if method == "varpro_gn":
            Fi = _bank_step(target(), st, phi, lam_b, Fi, cg_iters, lambda_A, chunk=chunk, cache=cache_factors)
            with torch.no_grad():
                _, _, ga, _ = _grads(W, st.A, st.bank, st.alpha, phi, mean=st.mean, fit_mean=False,
                                     scale=1.0 / w_energy, grad_A=False, chunk=chunk)
                opt.step([ga])
                st.alpha.copy_(sparse_simplex_projection(st.alpha, kmax, supp_mask))
                if fit_mean and st.mean is not None:
                    _mean_step(W, st, phi, chunk)
                st.A, Fi = _exact(target(), st.bank, st.alpha, phi, lambda_A, chunk)
        elif method == "gn":
            Fi = _chunked_steps(lambda Zc, sub, dc, Fc: _codes_step(Zc, sub, phi, kmax, extra, dc, Fc, chunk_elems,
                                                                    qp_iters, lambda_A),
                                target(), st, chunk, damp_c, Fi)
            Fi = _bank_step(target(), st, phi, lam_b, Fi, cg_iters, lambda_A, chunk=chunk, cache=cache_factors)
            Fi = _chunked_steps(lambda Zc, sub, Fc: _adapter_step(Zc, sub, phi, lambda_A, Fc), target(), st, chunk,
                                Fi)
            if fit_mean and st.mean is not None:
                _mean_step(W, st, phi, chunk)
                Fi = train_F()
        else:
            with torch.no_grad():
                U = _mix(st.bank, st.alpha) if chunk is None else None
                if method == "varpro":
                    if chunk is None:
                        st.A = _adapter_solve(target()[0:N], apply_phi(U, phi), lambda_A)
                    else:
                        st.A = _exact(target(), st.bank, st.alpha, phi, lambda_A, chunk)[0]
                gA, gB, ga, new_mean = _grads(W, st.A, st.bank, st.alpha, phi, mean=st.mean,
                                              fit_mean=fit_mean, scale=1.0 / w_energy,
                                              grad_A=method == "adam", chunk=chunk, U=U)
                st.mean = new_mean
                opt.step([gA, gB, ga] if method == "adam" else [gB, ga])
                st.alpha.copy_(sparse_simplex_projection(st.alpha, kmax, supp_mask))
        if step % eval_every and step != steps:
            if time_limit is None or time.perf_counter() - t_start < time_limit:
                continue
        with torch.no_grad():
            if method in ("adam", "varpro"):  # the step refitted M (and for varpro solved A) before moving the bank
                if fit_mean and st.mean is not None:
                    _mean_step(W, st, phi, chunk)
                if method == "varpro":  # the adapters returned are the exact solve for what is returned
                    st.A, Fi = _exact(target(), st.bank, st.alpha, phi, lambda_A, chunk)
            snap = _State(st.A.detach(), st.bank.detach(), st.alpha.detach(), st.mean)
            if method == "adam":  # the other methods' Fi is that of the current state already
                Fi = train_F(snap)
            rec = {"step": step, "time_s": time.perf_counter() - t_start,
                   "rel_error": rel(float(Fi.sum()), w_energy), "rel_error_val": validate(snap), "method": method}
        history.append(rec)
        if callback is not None:
            callback(rec)
        if not math.isfinite(rec["rel_error"]):
            break
        if crit(rec) < best[0] * (1 - min_improvement):
            best = (crit(rec), step, snap.clone(), dict(vstate))
            stale = 0
        else:
            stale += 1
            if crit(rec) < best[0]:  # small gains still update the best state
                best = (crit(rec), step, snap.clone(), dict(vstate))
        if stale >= patience:
            stopped = True
            break
        if time_limit is not None and time.perf_counter() - t_start >= time_limit:
            break

    _, best_step, bst, bv = best
    with torch.no_grad():
        bst = bst.clone()
        Fb = train_F(bst)
    rec_best = history[[h["step"] for h in history].index(best_step)]
    return RefineResult(
        bank=bst.bank, alpha=bst.alpha, A=bst.A, phi=phi, method=method, mean=bst.mean, gain=gain,
        val_alpha=bv["alpha"], val_A=bv["A"],
        rel_error_start=err0, rel_error=rel(float(Fb.sum()), w_energy),
        rel_error_val_start=val0, rel_error_val=rec_best["rel_error_val"],
        best_step=best_step, steps_run=step, stopped_early=stopped, time_s=time.perf_counter() - t_start,
        history=history,
    )


def refine_fit(fit: Any, W: torch.Tensor, phi: str = "identity", *, val_index: list[int] | None = None,
               **kwargs: Any) -> RefineResult:
    """Refine a trainer FitResult on its experts W [N, p, d] (original scale) in the artifact's terms.

    The objective is Σ_i ||W_i - M - A_i φ(Σ_j α_ij B_j)||² with the FitResult's adapters (normalisation scale
    folded in) and its mean M (zero when the fit was not centred). The FitResult's held-out experts
    (``fit.val_index``, or ``val_index``) are the validation experts: the bank and the training experts'
    factors are refined, the held-out ones are refitted with each bank frozen. Returns the RefineResult with
    alpha / A over all N experts in their original order (held-out rows from val_alpha / val_A). kwargs go to
    :func:`refine`.
    """
    val_index = list(fit.val_index if val_index is None else val_index)
    N = W.shape[0]
    dev, dt = fit.A.device, fit.A.dtype
    W = W.to(device=dev, dtype=dt)
    mean = fit.normalization.mean.to(W) if fit.normalization.center else None
    is_val = torch.zeros(N, dtype=torch.bool, device=dev)
    is_val[val_index] = True
    tr, va = (~is_val).nonzero().flatten(), is_val.nonzero().flatten()
    has_val = va.numel() > 0
    res = refine(
        W[tr] if has_val else W, fit.bank, fit.alpha[tr], fit.A[tr], phi, mean=mean,
        val_W=W[va] if has_val else None, val_alpha=fit.alpha[va] if has_val else None,
        val_A=fit.A[va] if has_val else None, **kwargs,
    )
    alpha = torch.zeros(N, res.alpha.shape[1], dtype=res.alpha.dtype, device=dev)
    A = torch.zeros(N, *res.A.shape[1:], dtype=res.A.dtype, device=dev)
    alpha[tr], A[tr] = res.alpha, res.A
    if has_val:
        alpha[va], A[va] = res.val_alpha, res.val_A
    res.alpha, res.A = alpha, A
    return res




def linear_warm_start(
    W: torch.Tensor,
    r: int,
    m: int,
    kmax: int,
    *,
    iters: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A self-contained linear fit (φ = identity) of W [N, p, d]: (bank [m, r, d], alpha [N, m], A [N, p, r]).

    Proxies P_i = Σ_r V_rᵀ (the top-r right singular directions of W_i, scaled by their singular values),
    k-means over the unit-norm proxies for the initial bank (:func:`globe.bank.kmeans_bank`), least-squares
    codes projected onto the kmax-sparse simplex, exact adapters, then ``iters`` Gauss-Newton iterations of
    :func:`refine` with φ = identity (exact block steps on the true objective). Used where the trainer's
    :func:`globe.am.fit_bank` is not wanted (quick budget searches, tests of this module).
    """
    from globe.bank import kmeans_bank, ls_codes

    _, S, Vh = torch.linalg.svd(W, full_matrices=False)
    P = S[:, :r, None] * Vh[:, :r]
    bank, _ = kmeans_bank(P, m, generator=generator)
    alpha = sparse_simplex_projection(ls_codes(P / P.flatten(1).norm(dim=1)[:, None, None], bank), kmax)
    A = _adapter_solve(W, apply_phi(_mix(bank, alpha), "identity"), 1e-6)
    if iters <= 0:
        return bank, alpha, A
    res = refine(W, bank, alpha, A, "identity", steps=iters, kmax=kmax, patience=iters + 1)
    return res.bank, res.alpha, res.A


def apply_refinement(fit: Any, W: torch.Tensor, config: Any, *,
                     callback: Callable[[dict[str, Any]], Any] | None = None) -> Any:
    """The trainer's hook: refine a FitResult in place after the AM loop when the config asks for it.

    Reads ``config.phi`` and, when present, ``config.refine_steps`` (default: 0 for identity; otherwise 2000 for
    "adam" and "varpro", 300 for "varpro_gn", 30 for "gn"), ``config.refine_method`` (default "auto", resolved here
    by :func:`auto_method`; ``refine.auto_kappa`` records the κ it decided by, ``refine.method`` what ran),
    ``config.refine_lr`` (None: the method's :data:`DEFAULT_LR`), ``config.refine_time_limit`` (None),
    ``config.center``. Runs :func:`refine_fit` on W [N, p, d] (original scale) with the mean refitted when centred,
    then updates fit.bank / alpha / A / normalization.mean, sets ``fit.phi``, appends the refinement records to
    fit.history (``{"stage": "refine", ...}``) and adds ``refine.*`` entries to fit.metrics. With held-out experts
    and ``config.final_steps`` > 0, a final refinement over all experts follows with the steps the validated
    stage left of ``refine_steps`` (at least ``final_steps`` iterations for "gn" and "varpro_gn", a tenth of
    ``refine_steps`` and at least 10 otherwise), within what is left of ``refine_time_limit``, early-stopped on
    the error over all experts (records ``"stage": "refine_final"``), kept only where it lowers that error.
    fit.metrics' rel_error_all and support statistics then describe the refined factors (the AM's under "am.*").
    For a GlobeConfig the refinement works on chunks of experts where all of them at once would not fit in
    memory (:func:`globe.am.refine_plan`; ``refine.chunk_experts``, None for all at once, and
    ``refine.cache_factors`` in fit.metrics). Returns fit.
    Nothing happens (but ``fit.phi`` is set) when φ is the identity and refine_steps is 0.
    """
    phi = check_phi(getattr(config, "phi", "identity"))
    method = getattr(config, "refine_method", None) or "auto"
    kappa = None
    if method == "auto":
        method, kappa = auto_method(fit.A)
    lr = getattr(config, "refine_lr", None)  # None: refine's per-method default
    steps = getattr(config, "refine_steps", None)
    if steps is None:
        steps = 0 if phi == "identity" else {"gn": 30, "varpro_gn": 300}.get(method, 2000)
    steps = int(steps)
    fit.phi = phi
    if steps <= 0:
        return fit
    center = bool(getattr(config, "center", True))

    def recorder(stage: str) -> Callable[[dict[str, Any]], None]:
        def on_record(rec: dict[str, Any]) -> None:
            rec = {"stage": stage, **rec}
            fit.history.append(rec)
            if callback is not None:
                callback(rec)

        return on_record

    time_limit = getattr(config, "refine_time_limit", None)
    chunk, cache = None, True
    if isinstance(config, GlobeConfig):  # chunks of experts where all at once would not fit (globe.am.refine_plan)
        from globe.am import refine_plan

        chunk, cache = refine_plan(config, *W.shape, fit.A.shape[2], fit.bank.shape[0], fit.A.device, fit.A.dtype)
    fit.metrics["refine.chunk_experts"] = chunk
    fit.metrics["refine.cache_factors"] = cache
    t0 = time.perf_counter()
    res = refine_fit(fit, W, phi, steps=steps, method=method, lr=lr, fit_mean=center, time_limit=time_limit,
                     chunk_experts=chunk, cache_factors=cache, callback=recorder("refine"))
    fit.bank, fit.alpha, fit.A = res.bank, res.alpha, res.A
    if center and res.mean is not None:
        fit.normalization.mean = res.mean.to(fit.normalization.mean)
    fit.metrics.update({f"refine.{k}": v for k, v in res.summary().items()})
    if kappa is not None:
        fit.metrics["refine.auto_kappa"] = kappa

    # the final pass, as in the AM (GlobeConfig.final_steps): the held-out experts were refitted with each bank
    # frozen; a refinement over all experts lets the bank fit them too. It continues with the steps the
    # validated stage left: that stage stops as soon as the held-out error stops falling, which on the
    # synthetic suites is at once (a bank refined on the training experts alone fits the held-out ones worse:
    # clustered 0.21 -> 0.36 in five varpro_gn steps), so a short final pass threw the refinement away (clustered 0.165
    # against 0.100 without held-out experts at equal steps; bench/bench_trainer_options.py, section refine_val).
    # Every expert of the artifact is fitted by the bank, so this pass stops on the error over all of them;
    # refine keeps its best state by that error, the starting one included, so it never makes the artifact worse.
    final_steps = int(getattr(config, "final_steps", 0) or 0)
    if fit.val_index and final_steps > 0:
        second_order = method in SECOND_ORDER_METHODS
        n_final = max(final_steps if second_order else max(10, steps // 10), steps - res.steps_run)
        Wd = W.to(device=fit.A.device, dtype=fit.A.dtype)
        mean = fit.normalization.mean.to(Wd) if center and fit.normalization.center else None
        # what is left of refine_time_limit (the final pass is part of the refinement's time)
        left = None if time_limit is None else max(0.0, float(time_limit) - (time.perf_counter() - t0))
        fin = refine(Wd, fit.bank, fit.alpha, fit.A, phi, steps=n_final, method=method, mean=mean,
                     fit_mean=mean is not None, rescale=False, lr=lr, time_limit=left,
                     chunk_experts=chunk, cache_factors=cache,
                     eval_every=1 if second_order else max(1, min(25, n_final // 5)),
                     callback=recorder("refine_final"))
        fit.bank, fit.alpha, fit.A = fin.bank, fin.alpha, fin.A
        if mean is not None and fin.mean is not None:
            fit.normalization.mean = fin.mean.to(fit.normalization.mean)
        fit.metrics["refine.final_steps_run"] = fin.steps_run
        fit.metrics["refine.final_stopped_early"] = fin.stopped_early
        fit.metrics["refine.final_rel_error_start"] = fin.rel_error_start
        fit.metrics["refine.final_rel_error"] = fin.rel_error
    _refresh_summary(fit, W)
    return fit


_SUMMARY_CHUNK = 256  # experts per chunk of the refined error's sum


def _refresh_summary(fit: Any, W: torch.Tensor) -> None:
    """Make fit.metrics' rel_error_all (against W [N, p, d], mean included) and support statistics describe the
    refined factors; the AM's values move to "am.*". rel_error and rel_error_val keep describing the AM's
    validated phase (the refinement's own are refine.rel_error, refine.rel_error_val, refine.final_rel_error).
    The error is summed in chunks of experts, without a full-size float64 copy."""
    from globe import metrics as M

    res = energy = 0.0
    with torch.no_grad():
        for lo in range(0, W.shape[0], _SUMMARY_CHUNK):
            Wc = W[lo : lo + _SUMMARY_CHUNK].to(device=fit.A.device, dtype=fit.A.dtype)
            rec = fit.reconstruct(slice(lo, lo + _SUMMARY_CHUNK)).to(Wc)
            res += float((Wc - rec).pow(2).sum(dtype=torch.float64))
            energy += float(Wc.pow(2).sum(dtype=torch.float64))
    for key in ("rel_error_all", "support_median", "support_mean", "support_p95", "support_overlap"):
        fit.metrics[f"am.{key}"] = fit.metrics.get(key)
    fit.metrics["rel_error_all"] = math.sqrt(res / max(energy, 1e-300))
    support = M.support_stats(fit.alpha)
    for key in ("support_median", "support_mean", "support_p95"):
        fit.metrics[key] = support[key]
    fit.metrics["support_overlap"] = M.support_overlap(fit.alpha)
