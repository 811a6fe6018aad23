"""The alternating-minimisation trainer (design document steps 5-10): :func:`fit_bank`.

One family's experts W [N, p, d] in one bank scope are z-scored (:mod:`globe.normalize`), warm-started
(:mod:`globe.seeding`: proxies P_i, r x d), given an initial bank, codes and adapters (:mod:`globe.bank`),
then refined step by step. Each step, in the default (proxy) mode:

1. Coding. The codes are re-estimated from scratch each step: least squares of the unit-norm proxies against
   the bank, Euclidean projection onto the simplex, then the tempered entmax alpha = entmax(log q / T) on the
   logs of these probabilities, then the epsilon-prune of ``ops.prune_renorm``. (Applying entmax(log alpha/T)
   to the previous alpha alone could only shrink supports, log 0 being -inf, so no atom could ever come back.)
   Zeros of q get a graded log floor ordered by their least-squares score, so raising T lets atoms back in one
   by one. Codes are probabilities throughout; there is no logit state to drift.
2. Dictionary (MOD), on the training experts only: (CᵀC + lam_B I) B = Cᵀ X by Cholesky, C [N, m] the codes,
   X [N, r*d] the proxies; unused atoms are re-seeded with the proxy of the worst-fitted expert.
3. Atoms are normalised to unit Frobenius norm, codes rescaled by the norms (reconstruction unchanged), and
   then each row's sum s_i is folded into the adapter (alpha_i /= s_i, A_i *= s_i), exact for phi = identity,
   so rows stay on the simplex.
4. Adapter refit for every expert: A_i = Z_i B~_iᵀ (B~_i B~_iᵀ + lam_A I)^-1 via
   ``ops.cholesky_solve_batched``.
5. Temperature control toward the target median support:
       T <- clamp(T * exp(-eta * (median_support / target - 1)), T_min, T_max).
   The sign is the opposite of the design document's formula: a larger T flattens entmax(log q / T) and
   widens the support, so a support above target must lower T (the formula as written would raise it and
   run away from the target).

Weight-aware mode (``config.weight_aware``) replaces steps 1-2 by exact block-coordinate steps on the true
objective F = sum_i ||Z_i - A_i sum_j alpha_ij B_j||^2 (a monotone descent):

* codes: per expert a simplex-constrained QP in alpha_i (Q_i [m, m] from the bank row Gram), solved by
  projected gradient with step 1/L started at the current codes (no iteration can increase F_i), then
  sparsified (tempered entmax +
  prune), then projected gradient restricted to the chosen support; the new codes are accepted per expert
  only if F_i did not increase, otherwise the old codes stay;
* bank: the normal equations of F in B, [m r, m r] = sum_i (alpha_i alpha_iᵀ) ⊗ (A_iᵀ A_i) with right-hand
  side sum_i alpha_i ⊗ (A_iᵀ Z_i) [m r, d], assembled from each expert's support pairs only and solved by
  Cholesky with lam_B; accepted only if F did not increase. Memory is (m r)^2 numbers: 0.6 GB in fp32 at
  m = 32, r = 384, terabytes at the global scope of a real model;
* adapters: as in step 4, accepted per expert only if F_i did not increase (the ridge could otherwise raise it
  by a hair).

Where those dense systems would not fit in memory (``config.weight_aware_solver``: "auto" decides by the
estimate of :func:`_weight_aware_solver`, "cg" always), the same steps run matrix-free (:class:`_WeightAwareFree`):
each expert's quadratic is formed over a few candidate atoms only (its support, then the atoms of most negative
gradient), and the bank's normal equations are solved by conjugate gradient warm-started at the current bank,
preconditioned by each atom's r x r block; the largest tensors are then A_iᵀ Z_i [N, r, d] and chunks of the
candidate atoms. On the synthetic suites both solvers give the same errors to three or four digits
(``python bench/bench_trainer_options.py --sections solver``).

Two further moves of the weight-aware mode (off by default: costly, and they pay off only on data with a sharply
planted sparse structure; see GlobeConfig), each kept only where it lowers the objective (so F stays
non-increasing), for the local minima the coordinate steps above cannot leave (measured on planted data):

* spectral bank (``config.spectral_bank``, before the bank step): with A fixed the bank step cannot make the
  atoms' frames consistent (an atom whose rows are reflected in one direction relative to the others' is a
  local minimum, even with the true codes). :func:`_spectral_bank` re-estimates the whole bank from the codes
  and each expert's dominant row space (the rows of A_iᵀ Z_i) as the r lowest eigenvectors of one quadratic
  form, which puts every atom in the same frame; kept with refitted adapters if the training objective drops.
  After a rejection the next try waits twice as long (1, 2, 4, ... steps);
* support search (``config.support_search`` rounds, after the adapter refit): with A fixed, no code step can
  move an expert from one pair of atoms to another, since A_i is fitted to the current composition.
  :func:`_support_search` tries, per expert, swapping one support atom for one of ``support_candidates``
  outside atoms (and, below the target support, adding one), with weights re-optimised on the simplex for
  the objective with the adapter eliminated, min_A ||Z_i - A B~_i||^2 (variable projection, r x r algebra),
  and keeps the best candidate with its least-squares adapter if that expert's error drops.

On the planted set of tests/test_am.py (no shared mean, so center=False; 20 steps) the weight-aware AM ends
at 4.7x the noise floor without them, 3.0x with the support search alone, 4.7x with the spectral bank alone
and at the floor (0.94x) with both; on ten such sets both together reach the floor on six (within 1.3x), the
others stop in another local minimum of the bank (2.1x to 5.6x). ``config.restarts`` runs whole fits from
several seeds and keeps the best: with 4, nine of the ten reach the floor.

Validation: ``val_fraction`` of the experts (at least one when N >= 4, none below) are held out of the
dictionary step. Every step their codes and adapters are fitted like the others' with the bank frozen, i.e.
the bank is judged on experts it was not fitted on. The loop stops when the held-out relative error has not
improved by ``min_improvement`` (relative) for ``patience`` steps while the supports are stable (the share of
experts whose support changed is at most ``support_tol``); the state of the best step is restored. Then the
final pass: ``final_steps`` more steps in which the held-out experts join the dictionary step, so the bank is
fitted to every expert of the artifact; the step with the lowest error over all experts is kept (the validated
state included), and the records of these steps carry ``"stage": "final"`` and no validation error. Without
held-out experts the training error plays the validation's role and there is no final pass.

Coherence penalty (``config.coherence`` > 0, proxy mode): the dictionary step becomes
:func:`globe.coherence.mod_solve_with_coherence`, min ||X - C B||² + lam_B ||B||² + mu Σ_{j≠k} <B_j, B_k>²
(mu relative, see there). Every step record carries the bank's atom coherence (``max_coherence``,
``mean_coherence``: max and mean |cos| over atom pairs; above ``_COHERENCE_ATOMS`` atoms, measured on that many
evenly spaced atoms, ``coherence_atoms`` says how many).

Nonlinear φ and refinement (``config.phi``, ``config.refine_steps``): the AM always fits φ = identity; it is
the warm start of :func:`globe.refine.apply_refinement`, which then optimises the true objective through φ
in the original scale (held-out experts as validation, early stopping) when ``refine_steps`` is set. φ other
than the identity without ``refine_steps`` raises ConfigError (the linear AM alone would not be a fit of the
nonlinear model). The FitResult records φ and applies it in ``composed()`` / ``reconstruct()``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from globe import metrics as M
from globe.bank import (
    fit_adapters,
    kmeans_bank,
    project_simplex,
    row_bases,
    simplex_codes,
    sparsify,
    subspace_bank,
    subspace_similarity,
)
from globe.coherence import mod_solve_with_coherence
from globe.config import GlobeConfig
from globe.errors import ConfigError
from globe.normalize import Normalization, fit_normalization
from globe_kernels import ops
from globe_kernels.ops import SparseCodes

__all__ = ["FitResult", "fit_bank"]

_CHUNK = 256  # experts per chunk for the [N, p, d]-sized products
_COHERENCE_ATOMS = 512  # atoms at most in the per-step coherence metric (evenly spaced above that)
_SUPPORT_MM_ROUNDS = 3  # majorise-minimise rounds on each candidate support of the support search
_SUPPORT_PG_ITERS = 10  # projected-gradient steps per round (on the candidate's support only)
_SPECTRAL_ITERS = 8  # block inverse iterations of the spectral bank


@dataclass
class FitResult:
    """The fitted factors of one family in one scope, in the original scale.

    bank [m, r, d] unit-norm atoms; alpha [N, m] dense codes (rows on the simplex); A [N, p, r] adapters with
    the normalisation scale folded in; normalization (mean [p, d] and row scale [p]); history: one metric
    dict per AM step (step 0 is the initial state), then the refinement's records (``"stage": "refine"``);
    metrics: summary of the final state. phi: the nonlinearity applied after the mixture (the atoms are not
    unit-norm after a refinement: their scale is part of the model for φ ≠ identity).
    """

    bank: torch.Tensor
    alpha: torch.Tensor
    A: torch.Tensor
    normalization: Normalization
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    r: int = 0
    m: int = 0
    val_index: list[int] = field(default_factory=list)
    phi: str = "identity"

    @property
    def codes(self) -> SparseCodes:
        return ops.to_sparse_codes(self.alpha)

    @property
    def mean(self) -> torch.Tensor:
        return self.normalization.mean

    def composed(self) -> torch.Tensor:
        return ops.compose(self.bank, self.alpha, self.phi)

    def reconstruct(self, index: slice | torch.Tensor | None = None) -> torch.Tensor:
        """W_i ~= A_i phi(sum_j alpha_ij B_j) + M, [N, p, d] (or the experts selected by index)."""
        alpha, A = (self.alpha, self.A) if index is None else (self.alpha[index], self.A[index])
        W = A @ ops.compose(self.bank, alpha, self.phi)
        return W + self.normalization.mean.to(W) if self.normalization.center else W


# --- helpers ------------------------------------------------------------------------------------------------


def _coherence_metrics(bank: torch.Tensor) -> dict[str, Any]:
    """max / mean |cos| over atom pairs, as :func:`globe.coherence.atom_coherence` defines them.

    The Gram matrix is formed in the bank's dtype (no float64 copy of the bank: m x r x d can be gigabytes),
    the m x m cosines in float64; above _COHERENCE_ATOMS atoms, on that many evenly spaced atoms."""
    m = bank.shape[0]
    if m > _COHERENCE_ATOMS:
        idx = torch.linspace(0, m - 1, _COHERENCE_ATOMS, device=bank.device).round().long()
        bank = bank[idx]
    k = bank.shape[0]
    if k < 2:
        return {"max_coherence": 0.0, "mean_coherence": 0.0, "coherence_atoms": k}
    Bf = bank.reshape(k, -1)
    G = (Bf @ Bf.T).double()
    n = G.diagonal().clamp_min(0).sqrt()
    n = torch.where(n > 0, n, torch.ones_like(n))
    C = (G / n[:, None] / n[None, :]).abs()
    iu = torch.triu_indices(k, k, 1, device=C.device)
    off = C[iu[0], iu[1]]
    return {"max_coherence": float(off.max()), "mean_coherence": float(off.mean()), "coherence_atoms": k}


def _frob2(x: torch.Tensor) -> torch.Tensor:
    """Per-expert squared Frobenius norms of [N, a, b], in float64."""
    return x.double().pow(2).sum(dim=(1, 2))


def _inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-expert Frobenius inner products of [N, a, b] pairs, in float64."""
    return (x.double() * y.double()).sum(dim=(1, 2))


def _residuals(
    Z: torch.Tensor, A: torch.Tensor, composed: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert ||Z_i - A_i B~_i||^2 (normalised) and ||diag(s)(Z_i - A_i B~_i)||^2 (original)."""
    N = Z.shape[0]
    res_z = torch.empty(N, dtype=torch.float64, device=Z.device)
    res_w = torch.empty(N, dtype=torch.float64, device=Z.device)
    s = scale.to(Z)[:, None]
    for lo in range(0, N, _CHUNK):
        E = Z[lo : lo + _CHUNK] - A[lo : lo + _CHUNK] @ composed[lo : lo + _CHUNK]
        res_z[lo : lo + _CHUNK] = _frob2(E)
        res_w[lo : lo + _CHUNK] = _frob2(E * s)
    return res_z, res_w


def _solve_spd(H: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """Solve H x = rhs by Cholesky; (x, fell back to a general solve, diag of the factor or eigenvalues)."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, L), False, L.diagonal()
    return torch.linalg.lstsq(H, rhs).solution, True, torch.zeros(0, dtype=H.dtype, device=H.device)


def _normalise_atoms(
    bank: torch.Tensor, alpha: torch.Tensor, A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-norm atoms; codes rescaled by the norms, each row's sum folded into its adapter (exact for
    identity
    phi): A_i sum_j alpha_ij B_j is unchanged and rows of alpha stay on the simplex."""
    norms = bank.reshape(bank.shape[0], -1).norm(dim=1)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    bank = bank / norms[:, None, None]
    alpha = alpha * norms[None, :]
    sums = alpha.sum(1)
    sums = torch.where(sums > 0, sums, torch.ones_like(sums))
    return bank, alpha / sums[:, None], A * sums[:, None, None]


def _mean_step(
    Z: torch.Tensor, A: torch.Tensor, composed: torch.Tensor, train: torch.Tensor, norm: Normalization
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Refit the shared mean term: the exact minimiser of sum_i ||Z_i - mu - A_i B~_i||^2 over the training
    experts is mu = mean_i (Z_i - A_i B~_i). Z is shifted by mu (every expert) and diag(s) mu is added to
    norm.mean in place, so diag(s) Z_i + mean = W_i still holds. Returns (Z, per-expert normalised residuals
    after the shift, RMS of mu)."""
    N = Z.shape[0]
    idx = train.nonzero().flatten()
    mu = torch.zeros(Z.shape[1], Z.shape[2], dtype=torch.float64, device=Z.device)
    for lo in range(0, idx.numel(), _CHUNK):
        sel = idx[lo : lo + _CHUNK]
        mu += (Z[sel] - A[sel] @ composed[sel]).double().sum(0)
    mu = (mu / max(1, idx.numel())).to(Z.dtype)
    Z = Z - mu
    norm.mean += mu * norm.scale.to(mu)[:, None]
    res = torch.empty(N, dtype=torch.float64, device=Z.device)
    for lo in range(0, N, _CHUNK):
        res[lo : lo + _CHUNK] = _frob2(Z[lo : lo + _CHUNK] - A[lo : lo + _CHUNK] @ composed[lo : lo + _CHUNK])
    return Z, res, float(mu.double().pow(2).mean().sqrt())


def _ls_targets(Z: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Each expert's least-squares right factor: (A_iᵀA_i + ridge)^-1 A_iᵀ Z_i, normalised."""
    G = A.transpose(1, 2) @ A
    r = G.shape[1]
    ridge = 1e-6 * float(G.diagonal(dim1=1, dim2=2).mean().clamp_min(torch.finfo(G.dtype).tiny))
    G = G + ridge * torch.eye(r, dtype=G.dtype, device=G.device)
    X = torch.empty(Z.shape[0], r, Z.shape[2], dtype=Z.dtype, device=Z.device)
    for lo in range(0, Z.shape[0], _CHUNK):
        Y = A[lo : lo + _CHUNK].transpose(1, 2) @ Z[lo : lo + _CHUNK]
        L, info = torch.linalg.cholesky_ex(G[lo : lo + _CHUNK])
        X[lo : lo + _CHUNK] = (
            torch.cholesky_solve(Y, L)
            if int(info.abs().sum()) == 0
            else torch.linalg.lstsq(G[lo : lo + _CHUNK], Y).solution
        )
    return X / X.flatten(1).norm(dim=1).clamp_min(torch.finfo(X.dtype).tiny)[:, None, None]


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


# --- weight-aware blocks ------------------------------------------------------------------------------------


class _WeightAware:
    """Quantities of the true objective for fixed adapters: GA_i = A_iᵀ A_i, Y_i = A_iᵀ Z_i, ||Z_i||^2.

    F_i(alpha_i, B) = ||Z_i||^2 - 2 <Y_i, B~_i> + <GA_i B~_i, B~_i>, a quadratic in alpha_i (see quadratic).
    """

    def __init__(self, Z: torch.Tensor, A: torch.Tensor, zn: torch.Tensor):
        self.GA = A.transpose(1, 2) @ A
        self.Y = torch.empty(A.shape[0], A.shape[2], Z.shape[2], dtype=Z.dtype, device=Z.device)
        for lo in range(0, Z.shape[0], _CHUNK):
            self.Y[lo : lo + _CHUNK] = A[lo : lo + _CHUNK].transpose(1, 2) @ Z[lo : lo + _CHUNK]
        self.zn = zn

    def quadratic(self, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F_i(alpha) = ||Z_i||^2 - 2 c_iᵀ alpha + alphaᵀ Q_i alpha: Q [N, m, m], c [N, m].

        Q_i[j, k] = <B_j, GA_i B_k> = sum_ab GA_i[a, b] <B_j[a], B_k[b]>: one product with the bank's row
        Gram [(m r)^2] instead of N m r^2 d work."""
        m, r, d = bank.shape
        N = self.GA.shape[0]
        rows = bank.reshape(m * r, d)
        P = (rows @ rows.T).reshape(m, r, m, r).permute(1, 3, 0, 2).reshape(r * r, m * m)
        Q = (self.GA.reshape(N, r * r) @ P).reshape(N, m, m)
        Q = (Q + Q.transpose(1, 2)) / 2
        c = self.Y.reshape(N, -1) @ bank.reshape(m, -1).T
        return Q, c

    def objective(self, Q: torch.Tensor, c: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """F_i for every expert, float64."""
        a = alpha.double()
        quad = (a[:, None, :] @ Q.double() @ a[:, :, None]).flatten()
        return self.zn - 2 * (c.double() * a).sum(1) + quad

    @staticmethod
    def qp(
        Q: torch.Tensor, c: torch.Tensor, alpha: torch.Tensor, iters: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Projected gradient with step 1/L (L = 2 lambda_max(Q_i)) on min alphaᵀQ_i alpha - 2 c_iᵀ alpha
        over the simplex (restricted to mask): every iteration is a descent step, F_i never increases."""
        lip = 2 * torch.linalg.eigvalsh(Q.double())[:, -1].clamp_min(1e-300).to(Q.dtype)
        for _ in range(iters):
            grad = 2 * ((Q @ alpha[:, :, None]).squeeze(2) - c)
            alpha = project_simplex(alpha - grad / lip[:, None], mask)
        return alpha

    def bank_system(
        self, alpha: torch.Tensor, sel: torch.Tensor, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """H [m r, m r] = sum_i (alpha_i alpha_iᵀ) ⊗ GA_i + ridge, rhs [m r, d] = sum_i alpha_i ⊗ Y_i over the
        experts sel (indices); the sum runs over each expert's support pairs only."""
        alpha = alpha[sel]
        GA, Y = self.GA[sel], self.Y[sel]
        N, m = alpha.shape
        r, d = Y.shape[1], Y.shape[2]
        codes = ops.to_sparse_codes(alpha)
        idx, val = codes.indices.long(), codes.values
        k = idx.shape[1]
        H4 = torch.zeros(m * m, r, r, dtype=alpha.dtype, device=alpha.device)
        chunk = max(1, (1 << 24) // max(1, k * k * r * r))
        for lo in range(0, N, chunk):
            ii, vv = idx[lo : lo + chunk], val[lo : lo + chunk]
            valid = (ii[:, :, None] >= 0) & (ii[:, None, :] >= 0)
            w = torch.where(valid, vv[:, :, None] * vv[:, None, :], torch.zeros((), dtype=vv.dtype))
            pair = ii.clamp_min(0)[:, :, None] * m + ii.clamp_min(0)[:, None, :]
            src = w[..., None, None] * GA[lo : lo + chunk, None, None]
            H4.index_add_(0, pair.reshape(-1), src.reshape(-1, r, r))
        H = H4.reshape(m, m, r, r).permute(0, 2, 1, 3).reshape(m * r, m * r)
        rhs = (alpha.T @ Y.reshape(N, -1)).reshape(m * r, d)
        ridge = lam * float(H.diagonal().mean().clamp_min(torch.finfo(H.dtype).tiny))
        H = H + ridge * torch.eye(m * r, dtype=H.dtype, device=H.device)
        return H, rhs


_WA_CG_ITERS = 60  # conjugate-gradient iterations at most of the matrix-free bank step
_WA_CG_TOL = 1e-5  # ... stopping at this relative residual (in the preconditioner's norm)
_WA_CANDIDATE_ELEMS = 1 << 25  # numbers per chunk of the candidate atoms' [n, c, r, d] block


class _WeightAwareFree(_WeightAware):
    """The weight-aware steps without the dense systems (``weight_aware_solver="cg"``).

    The dense steps hold the bank's row Gram and normal equations, (m r)^2 numbers, and an m x m quadratic per
    expert: at the global scope of a real model (m in the thousands, r in the hundreds) that is terabytes. Here
    the largest tensors are A_iᵀZ_i [N, r, d] and chunks of the candidate atoms [n, c, r, d]: the code step
    restricts each expert's quadratic to c candidate atoms (its support, then the atoms of most negative
    gradient, which the dense QP would move first), and the bank step solves the same normal equations by
    conjugate gradient, every product one composition and one batched r x r product per expert, preconditioned
    by each atom's diagonal block Σ_i α_ij² A_iᵀA_i (the spread of the adapters' singular values is what makes
    the system ill-conditioned)."""

    def _chunks(self, n: int):
        for lo in range(0, n, _CHUNK):
            yield slice(lo, min(n, lo + _CHUNK))

    def objective_of(self, bank: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """F_i = ||Z_i||^2 - 2 <Y_i, B~_i> + <GA_i B~_i, B~_i> for every expert, float64, chunked."""
        F = torch.empty(alpha.shape[0], dtype=torch.float64, device=alpha.device)
        for sl in self._chunks(alpha.shape[0]):
            U = ops.compose(bank, ops.to_sparse_codes(alpha[sl]))
            F[sl] = self.zn[sl] + ((self.GA[sl] @ U - 2 * self.Y[sl]) * U).sum((1, 2), dtype=torch.float64)
        return F

    def gradient(self, bank: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """dF_i / dalpha_ij = 2 <B_j, GA_i B~_i - Y_i> [N, m], chunked over experts."""
        m = bank.shape[0]
        Bf = bank.reshape(m, -1)
        g = torch.empty(alpha.shape[0], m, dtype=alpha.dtype, device=alpha.device)
        for sl in self._chunks(alpha.shape[0]):
            T = self.GA[sl] @ ops.compose(bank, ops.to_sparse_codes(alpha[sl])) - self.Y[sl]
            g[sl] = 2 * (T.reshape(T.shape[0], -1) @ Bf.T)
        return g

    def candidate_quadratic(self, bank: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F_i restricted to the candidate atoms cand [N, c]: Q [N, c, c] with Q_i[a, b] = <B_a, GA_i B_b> and
        c [N, c] with c_i[a] = <Y_i, B_a> (see :meth:`quadratic`), in chunks of experts."""
        N, c = cand.shape
        _, r, d = bank.shape
        Q = torch.empty(N, c, c, dtype=bank.dtype, device=bank.device)
        lin = torch.empty(N, c, dtype=bank.dtype, device=bank.device)
        step = max(1, _WA_CANDIDATE_ELEMS // max(1, c * r * d))
        for lo in range(0, N, step):
            sl = slice(lo, min(N, lo + step))
            Bc = bank[cand[sl]]  # [n, c, r, d]
            n = Bc.shape[0]
            GB = (self.GA[sl, None] @ Bc).reshape(n, c, -1)
            Bc = Bc.reshape(n, c, -1)
            Q[sl] = Bc @ GB.transpose(1, 2)
            lin[sl] = (Bc @ self.Y[sl].reshape(n, -1, 1)).squeeze(2)
        return (Q + Q.transpose(1, 2)) / 2, lin

    def bank_solve(self, alpha: torch.Tensor, sel: torch.Tensor, lam: float,
                   bank0: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The bank step's normal equations (see :meth:`_WeightAware.bank_system`, same ridge) over the experts
        sel, solved by block-Jacobi preconditioned conjugate gradient from bank0. Returns (bank, info)."""
        a, GA, Y = alpha[sel], self.GA[sel], self.Y[sel]
        n = a.shape[0]
        m, r, d = bank0.shape
        rhs = torch.zeros(m, r * d, dtype=bank0.dtype, device=bank0.device)
        for sl in self._chunks(n):
            rhs += a[sl].T @ Y[sl].reshape(Y[sl].shape[0], -1)
        rhs = rhs.reshape(m, r, d)
        diag = float((a.double().pow(2).sum(1) * GA.diagonal(dim1=1, dim2=2).double().sum(1)).sum()) / (m * r)
        ridge = lam * max(diag, float(torch.finfo(bank0.dtype).tiny))
        eye = torch.eye(r, dtype=torch.float64, device=bank0.device)
        # summed in the working precision (no float64 copy of GA [N, r, r]), factored in float64
        blocks = torch.einsum("ij,iab->jab", a.pow(2), GA).double() + ridge * eye
        pre = torch.cholesky_inverse(torch.linalg.cholesky(blocks)).to(bank0.dtype)
        chunks = [(sl, ops.to_sparse_codes(a[sl])) for sl in self._chunks(n)]  # supports only: a gather each

        def apply(V: torch.Tensor) -> torch.Tensor:
            out = (ridge * V).contiguous()  # accumulated through a view
            for sl, codes in chunks:
                X = GA[sl] @ ops.compose(V, codes)
                out.view(m, -1).addmm_(a[sl].T, X.reshape(X.shape[0], -1))
            return out

        from globe.refine import _cg  # the refinement's bank step solves its system by the same CG

        info: dict[str, float] = {}
        x = _cg(apply, rhs, _WA_CG_ITERS, _WA_CG_TOL, lambda v: pre @ v, x0=bank0, info=info)
        return x, {"bank_cg_iters": info["iters"], "bank_cg_residual": info["residual"]}


# --- weight-aware moves: support search and the spectral bank ------------------------------------------------


def _sym_inverse(G: torch.Tensor, lam: float) -> torch.Tensor:
    """(G + lam I)^-1 for a batch of symmetric positive semi-definite [..., r, r] (Cholesky; pseudo-inverse
    where the factorisation fails)."""
    r = G.shape[-1]
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    Gl = G + lam * eye
    L, info = torch.linalg.cholesky_ex(Gl)
    X = torch.cholesky_solve(eye.expand_as(Gl), L)
    bad = info != 0
    if bool(bad.any()):
        X[bad] = torch.linalg.pinv(Gl[bad], hermitian=True)
    return X


def _pair_sum(w: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """sum_ab w[n, c, a] w[n, c, b] T[n, a, b] for w [n, C, u], T [n, u, u, r, r] -> [n, C, r, r].

    One batched product of the outer products w wᵀ [n, C, u*u] with T [n, u*u, r*r]: no [n, C, u, r, r]
    intermediate (contracting one index at a time made one, and was most of the support search's time)."""
    n, C, u = w.shape
    r = T.shape[-1]
    ww = (w[:, :, :, None] * w[:, :, None, :]).reshape(n, C, u * u)
    return (ww @ T.reshape(n, u * u, r * r)).reshape(n, C, r, r)


def _pair_dot(X: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """<X[n, c], T[n, a, b]> for X [n, C, r, r], T [n, u, u, r, r] -> [n, C, u, u], as one batched product."""
    n, C, r, _ = X.shape
    u = T.shape[1]
    return (X.reshape(n, C, r * r) @ T.reshape(n, u * u, r * r).transpose(1, 2)).reshape(n, C, u, u)


def _vp_state(
    w: torch.Tensor, PU: torch.Tensor, KU: torch.Tensor, zn: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adapter-eliminated objective of candidate codes w [n, C, u] over the atoms U_i, in float64.

    With B~ = sum_a w_a B_a: G = B~ B~ᵀ and S = Mᵀ M, M = Z_i B~ᵀ, are quadratic in w through the pair Grams
    PU[a, b] = B_a B_bᵀ and KU[a, b] = B_a Z_iᵀ Z_i B_bᵀ. The ridge least-squares adapter is A* = M X with
    X = (G + lam I)^-1, and ||Z_i - A* B~||^2 = ||Z_i||^2 - 2 <X, S> + <X S X, G>. Returns (G, X, H = X S X =
    A*ᵀA*, F [n, C])."""
    G = _pair_sum(w, PU).double()
    S = _pair_sum(w, KU).double()
    G = (G + G.transpose(-1, -2)) / 2
    S = (S + S.transpose(-1, -2)) / 2
    X = _sym_inverse(G, lam)
    H = X @ S @ X
    F = zn[:, None] - 2 * (X * S).sum((-1, -2)) + (H * G).sum((-1, -2))
    return G, X, H, F


def _support_candidates(
    alpha: torch.Tensor, gain: torch.Tensor, candidates: int, max_support: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The atoms U [N, u] each expert's candidates use (its support by decreasing weight, then its
    ``candidates`` outside atoms of largest gain) and the candidates' starting codes W0 [N, C, u] with their
    validity ok [N, C]: the current support; every swap (support slot l out, outside atom o in with slot l's
    weight); below max_support, every addition (outside atom o in with weight 1/(|S_i| + 1), the others scaled
    down)."""
    N, m = alpha.shape
    size = (alpha > 0).sum(1)
    s_max = int(size.max())
    c_out = min(candidates, m - s_max)
    vals, order = torch.sort(alpha, dim=1, descending=True, stable=True)
    sup_w = vals[:, :s_max]
    out_idx = torch.sort(gain.masked_fill(alpha > 0, float("-inf")), dim=1, descending=True, stable=True).indices
    U = torch.cat([order[:, :s_max], out_idx[:, :c_out]], 1)
    base = torch.cat([sup_w, torch.zeros(N, c_out, dtype=alpha.dtype, device=alpha.device)], 1)
    cands, ok = [base], [torch.ones(N, dtype=torch.bool, device=alpha.device)]
    for slot in range(s_max):
        for o in range(c_out):
            w = base.clone()
            w[:, s_max + o] = w[:, slot]
            w[:, slot] = 0
            cands.append(w)
            ok.append(sup_w[:, slot] > 0)
    grow = size < max_support
    if bool(grow.any()):
        share = 1.0 / (size + 1).to(alpha.dtype)
        for o in range(c_out):
            w = base * (1 - share)[:, None]
            w[:, s_max + o] = share
            cands.append(w)
            ok.append(grow)
    return U, torch.stack(cands, 1), torch.stack(ok, 1)


def _support_search(
    Z: torch.Tensor,
    bank: torch.Tensor,
    alpha: torch.Tensor,
    A: torch.Tensor,
    zn: torch.Tensor,
    res: torch.Tensor,
    lam: float,
    candidates: int,
    max_support: int,
    eps: float,
    budget: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """One round of support moves for every expert, scored by the true objective with the adapter eliminated.

    Coordinate steps on alpha with A fixed cannot take an expert from one set of atoms to another: A_i is
    fitted to the current composition, and in its frame the right atoms look no better. So each candidate
    support is scored by

        f_i(alpha) = min_A ||Z_i - A B~(alpha)||^2,   B~(alpha) = sum_j alpha_j B_j      (variable projection)

    (A the ridge least-squares adapter, absolute ridge lam). Candidates (:func:`_support_candidates`): the
    current support, every swap of one support atom for one of the ``candidates`` outside atoms, and, for an
    expert below ``max_support`` atoms, every addition of one. Outside atoms are ranked by the line-search gain
    of moving alpha_i toward the vertex e_k with the current adapter, the first-order change of f_i (at the
    optimal adapter the gradient of f_i is that of the A-fixed quadratic). The simplex weights on each
    candidate support are optimised by _SUPPORT_MM_ROUNDS majorise-minimise rounds: at the current weights the
    adapter is the optimum A*, the QP in alpha with A* fixed is solved on the candidate's support by projected
    gradient (_SUPPORT_PG_ITERS steps of 1/L), then A* is refitted; each round lowers f_i. The weights are then
    epsilon-pruned (``ops.prune_renorm``).

    Everything runs on r x r blocks, batched over experts and candidates: per expert the pair Grams B_a B_bᵀ
    and B_a Z_iᵀ Z_i B_bᵀ over the atoms U_i its candidates use (|U_i| products Z_i B_aᵀ, the only work of
    size p d), then O(|U_i|^2 r^2 + r^3) per candidate and round. Experts are chunked so that the [chunk, C,
    |U|, r, r] intermediates stay under ``budget`` numbers.

    The best candidate replaces expert i's codes and adapter (A_i = Z_i B~ᵀ (B~ B~ᵀ + lam I)^-1 through
    ``ops.cholesky_solve_batched``) only if ||Z_i - A_i B~_i||^2, recomputed on the full matrices, is below
    ``res`` [N] (the current residuals): no expert's error increases.

    Returns (alpha [N, m], A [N, p, r], stats: support_swaps, the share of experts whose support changed,
    and support_search_gain, the drop of the summed residual).
    """
    N, m = alpha.shape
    _, r, d = bank.shape
    p = Z.shape[1]
    dtype, device = Z.dtype, Z.device
    stats: dict[str, Any] = {"support_swaps": 0.0, "support_search_gain": 0.0}
    s_max = int((alpha > 0).sum(1).max())
    if s_max == 0 or s_max >= m:
        return alpha, A, stats

    # gain of each atom: best decrease of F_i along alpha_i -> e_k with A fixed (exact line search on [0, 1])
    wa = _WeightAware(Z, A, zn)
    Q, c = wa.quadratic(bank)
    del wa
    Qa = (Q @ alpha[:, :, None]).squeeze(2)
    g = Qa - c
    gd = g - (g * alpha).sum(1, keepdim=True)
    dQd = Q.diagonal(dim1=1, dim2=2) - 2 * Qa + (Qa * alpha).sum(1, keepdim=True)
    t = torch.where(dQd > 0, -gd / dQd.clamp_min(torch.finfo(dtype).tiny), torch.ones_like(gd)).clamp(0, 1)
    gain = -(2 * t * gd + t * t * dQd)
    del Q, c, Qa, g, gd, dQd, t

    U, W0, ok = _support_candidates(alpha, gain, candidates, max_support)
    u, n_c = U.shape[1], W0.shape[1]
    rows = bank.reshape(m * r, d)
    P = (rows @ rows.T).reshape(m, r, m, r).permute(0, 2, 1, 3)  # P[j, k] = B_j B_kᵀ
    per_expert = n_c * u * r * r + u * u * r * r + u * p * r + u * r * d
    chunk = max(1, budget // max(1, per_expert))
    best_F = torch.empty(N, dtype=torch.float64, device=device)
    best_w = torch.empty(N, u, dtype=dtype, device=device)
    best_A = torch.empty(N, p, r, dtype=dtype, device=device)
    fallbacks = 0
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        n = hi - lo
        Uc, w, zc = U[lo:hi], W0[lo:hi], zn[lo:hi]
        PU = P[Uc[:, :, None], Uc[:, None, :]]  # [n, u, u, r, r]
        Mz = Z[lo:hi, None] @ bank[Uc].transpose(-1, -2)  # [n, u, p, r]: Z_i B_aᵀ
        KU = Mz.transpose(-1, -2)[:, :, None] @ Mz[:, None]  # [n, u, u, r, r]
        mask = (w > 0).reshape(-1, u)
        for _ in range(_SUPPORT_MM_ROUNDS):
            _, X, H, _ = _vp_state(w, PU, KU, zc, lam)
            # the A*-fixed quadratic: Q_ab = <B_a, A*ᵀA* B_b> = <H, PU[a, b]>, c_a = <A*ᵀ Z_i, B_a>
            Qc = _pair_dot(H.to(dtype), PU).reshape(-1, u, u)
            Qc = (Qc + Qc.transpose(1, 2)) / 2
            cc = (_pair_dot(X.to(dtype), KU) @ w[..., None]).reshape(-1, u)
            lip = 2 * torch.linalg.eigvalsh(Qc.double())[:, -1:].clamp_min(1e-300).to(dtype)
            wf = w.reshape(-1, u)
            for _ in range(_SUPPORT_PG_ITERS):
                wf = project_simplex(wf - 2 * ((Qc @ wf[:, :, None]).squeeze(2) - cc) / lip, mask)
            w = wf.reshape(n, n_c, u)
        w = ops.prune_renorm(w.reshape(-1, u), eps)[0].reshape(n, n_c, u)
        G, _, _, F = _vp_state(w, PU, KU, zc, lam)
        k = F.masked_fill(~ok[lo:hi], float("inf")).argmin(1)
        ar = torch.arange(n, device=device)
        best_F[lo:hi] = F[ar, k]
        best_w[lo:hi] = w[ar, k]
        M_best = torch.einsum("na,napr->npr", w[ar, k], Mz)
        best_A[lo:hi], nf = ops.cholesky_solve_batched(G[ar, k].to(dtype), M_best, lam)
        fallbacks += nf

    new_alpha = torch.zeros_like(alpha).scatter_add_(1, U, best_w)
    res_new, _ = _residuals(Z, best_A, ops.compose(bank, new_alpha), torch.ones(p, dtype=dtype, device=device))
    accept = (best_F < res) & (res_new < res)
    changed = accept & ((new_alpha > 0) != (alpha > 0)).any(1)
    stats["support_swaps"] = float(changed.double().mean())
    stats["support_search_gain"] = float(torch.where(accept, res - res_new, torch.zeros_like(res)).sum())
    stats["support_search_fallbacks"] = fallbacks
    alpha = torch.where(accept[:, None], new_alpha, alpha)
    A = torch.where(accept[:, None, None], best_A, A)
    return alpha, A, stats


def _spectral_bank(
    alpha: torch.Tensor,
    V: torch.Tensor,
    r: int,
    max_dim: int,
    start: torch.Tensor | None = None,
    chunk: int = _CHUNK,
) -> torch.Tensor | None:
    """The bank whose compositions lie closest to the experts' dominant row spaces, all atoms in one frame.

    min_B sum_i ||(sum_j alpha_ij B_j)(I - V_iᵀ V_i)||^2 over banks whose r stacked rows (each in R^{m d},
    one per row index of the atoms) are orthonormal, V_i [r, d] an orthonormal basis of expert i's dominant
    row space. The objective is the same quadratic form Q = sum_i (alpha_i alpha_iᵀ) ⊗ (I - V_iᵀ V_i) for each
    of the r rows, so they are Q's r eigenvectors of smallest eigenvalue. Noise-free
    and with the right codes, Q's null space is exactly the true bank's rows up to one r x r matrix shared by
    all atoms: every atom gets the same frame. The alternating steps cannot always reach that: an atom whose
    frame is reflected in one direction relative to the others' is a local minimum for them (measured on
    planted data: row spaces right, mixtures wrong). Only atoms some expert uses take part (the others are
    returned as zeros); None when (used atoms) x d exceeds max_dim or is below r.

    Q is formed densely in float64. Its r lowest eigenvectors come from a dense eigh when ``start`` is None,
    else from _SPECTRAL_ITERS block inverse iterations (one Cholesky factor of Q + tiny shift) started at
    ``start`` [m, r, d] (the current bank) and a Rayleigh-Ritz step: a third of eigh's factorisation cost and
    cheap iterations; the gap that matters (r eigenvalues near 0, the next ones well above when the codes are
    right) makes them converge in a few steps, and where there is no such gap the candidate is rejected by
    the objective anyway.
    """
    m = alpha.shape[1]
    d = V.shape[2]
    idx = (alpha != 0).any(0).nonzero().flatten()
    mu = idx.numel()
    if mu * d > max_dim or mu * d < r:
        return None
    a = alpha[:, idx].double()
    C = a.T @ a
    Qm = (C[:, None, :, None] * torch.eye(d, dtype=torch.float64, device=V.device)[None, :, None, :]).reshape(
        mu * d, mu * d
    )
    for lo in range(0, a.shape[0], chunk):
        # E [mu d, n r]: column (i, c) is alpha_i ⊗ (row c of V_i); Q -= E Eᵀ
        ac, Vc = a[lo : lo + chunk], V[lo : lo + chunk].double()
        E = (ac[:, :, None, None] * Vc.transpose(1, 2)[:, None]).permute(1, 2, 0, 3).reshape(mu * d, -1)
        Qm -= E @ E.T
    Qm = (Qm + Qm.T) / 2
    vecs = None
    if start is not None:
        shift = 1e-10 * float(Qm.diagonal().mean().clamp_min(1e-300))
        L, info = torch.linalg.cholesky_ex(Qm + shift * torch.eye(mu * d, dtype=Qm.dtype, device=Qm.device))
        X = start[idx].double().permute(1, 0, 2).reshape(r, mu * d).T
        if int(info) == 0 and int(torch.linalg.matrix_rank(X)) == r:
            for _ in range(_SPECTRAL_ITERS):
                X = torch.linalg.qr(torch.cholesky_solve(X, L)).Q
            _, R = torch.linalg.eigh(X.T @ Qm @ X)
            vecs = X @ R
    if vecs is None:
        vecs = torch.linalg.eigh(Qm).eigenvectors[:, :r]
    bank = torch.zeros(m, r, d, dtype=V.dtype, device=V.device)
    bank[idx] = vecs.T.reshape(r, mu, d).permute(1, 0, 2).to(V.dtype)
    return bank

def _initial_state(
    Z: torch.Tensor, X: torch.Tensor, train: torch.Tensor, m: int, cfg: GlobeConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The initial bank, codes and adapters (see ``GlobeConfig.init``); the best of ``init_restarts`` draws by
    the training objective. Returns (bank, alpha, A, metrics)."""
    best: tuple[float, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    objectives = []
    for _ in range(max(1, cfg.init_restarts)):
        if cfg.init == "kmeans":
            # k-means over the flattened proxies, least-squares codes projected onto the simplex, adapters
            # by OLS against the proxies
            bank, _ = kmeans_bank(X[train], m, generator=gen, iters=cfg.kmeans_iters)
            probs, _ = simplex_codes(X, bank)
            alpha, _ = ops.prune_renorm(probs, cfg.eps)
            A, _, _ = fit_adapters(Z, X, cfg.lambda_A)  # A_i = Z_i pinv(P_i), in the proxies' frames
        else:
            # k-subspaces over the proxies' row spaces: one-hot codes by cluster, atoms the clusters' shared
            # row spaces (frame-free); experts outside the fit take their most similar atom
            bank, _, _ = subspace_bank(X[train], m, generator=gen, iters=cfg.kmeans_iters)
            sim = subspace_similarity(row_bases(X), bank * bank.shape[1] ** 0.5)
            alpha = torch.zeros(X.shape[0], m, dtype=X.dtype, device=X.device)
            alpha.scatter_(1, sim.argmax(1, keepdim=True), 1.0)
            A, _, _ = fit_adapters(Z, ops.compose(bank, alpha), cfg.lambda_A)
        res, _ = _residuals(Z, A, ops.compose(bank, alpha), torch.ones(Z.shape[1], dtype=Z.dtype))
        obj = float(res[train].sum())
        objectives.append(obj)
        if best is None or obj < best[0]:
            best = (obj, bank, alpha, A)
    assert best is not None
    zn = float(_frob2(Z[train]).sum())
    metrics = {
        "init_method": cfg.init,
        "init_restarts": len(objectives),
        "init_rel_error_z": math.sqrt(best[0] / max(zn, 1e-300)),
        "init_rel_error_z_worst": math.sqrt(max(objectives) / max(zn, 1e-300)),
    }
    return best[1], best[2], best[3], metrics


# --- the trainer --------------------------------------------------------------------------------------------


WEIGHT_AWARE_MAX_GB_ENV = "GLOBE_WEIGHT_AWARE_MAX_GB"
REFINE_MAX_GB_ENV = "GLOBE_REFINE_MAX_GB"


def _device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the device (host RAM for CPU), None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def _memory_limit(env_name: str, device: torch.device, divisor: int) -> tuple[int, str] | None:
    """(bytes, where the figure comes from): the environment variable env_name in GiB when set, else the
    device's memory divided by divisor; None when neither is known."""
    env = os.environ.get(env_name)
    if env:
        try:
            return int(float(env) * 2**30), f"{env_name}={env}"
        except ValueError:
            raise ConfigError(f"{env_name}={env!r}: expected a number of GiB") from None
    total = _device_memory_bytes(device)
    if total is None:
        return None
    share = "" if divisor == 1 else "half of " if divisor == 2 else f"1/{divisor} of "
    return total // divisor, f"{share}the {device.type} memory, {total / 2**30:.0f} GiB"


def refine_plan(cfg: GlobeConfig, N: int, p: int, d: int, r: int, m: int, device: torch.device,
                dtype: torch.dtype) -> tuple[int | None, bool]:
    """(chunk_experts, cache_factors) for the refinement of N experts, decided before any work so that a
    refinement that cannot fit is refused before the AM (it runs after the whole AM; running out of memory there
    would throw the AM away). The limit is the device's memory or GLOBE_REFINE_MAX_GB; the experts are held
    twice during the refinement (original scale and normalised) and a third time when some are held out, the
    rest is :func:`globe.refine.plan_refine_chunks` (all experts at once where that fits, else chunks of
    experts; estimates measured by bench/bench_refine_memory.py). Raises ConfigError when even one expert at a
    time does not fit."""
    from globe.refine import plan_refine_chunks

    item = torch.empty((), dtype=dtype).element_size()
    reserved = (3 if cfg.val_fraction > 0 else 2) * N * p * d * item
    known = _memory_limit(REFINE_MAX_GB_ENV, device, 1)
    if known is None:
        return None, True
    try:
        chunk, cache, _ = plan_refine_chunks(N, p, d, r, cfg.refine_method, known[0] - reserved, dtype=dtype, m=m)
    except ValueError as e:
        raise ConfigError(
            f"GlobeConfig.refine_steps: {e} once the experts are held ({reserved / 2**30:.3g} GiB), of the "
            f"{known[0] / 2**30:.3g} GiB of {known[1]}; use scope='layer', a smaller r or m, or refine_steps=0 "
            "(no refinement)"
        ) from None
    return chunk, cache


def dense_weight_aware_bytes(N: int, m: int, r: int, dtype: torch.dtype = torch.float32) -> int:
    """Memory the dense weight-aware steps plan for: a few copies of the (m r) x (m r) bank system and an m x m
    code quadratic per expert."""
    return (3 * (m * r) ** 2 + 2 * N * m * m) * torch.empty((), dtype=dtype).element_size()


def _weight_aware_solver(cfg: GlobeConfig, N: int, m: int, r: int, device: torch.device,
                         dtype: torch.dtype) -> str:
    """"dense" or "cg": the solver of the weight-aware steps (``cfg.weight_aware_solver``), decided before any
    work. The dense steps assemble and factor the (m r) x (m r) normal equations (a few copies of it at once)
    and hold an m x m quadratic per expert; at global scope on a real model (m in the thousands, r in the
    hundreds) that is terabytes. Their limit is half the device's memory, or GLOBE_WEIGHT_AWARE_MAX_GB: "auto"
    takes "cg" beyond it, "dense" refuses the fit."""
    if cfg.weight_aware_solver == "cg":
        return "cg"
    need = dense_weight_aware_bytes(N, m, r, dtype)
    known = _memory_limit(WEIGHT_AWARE_MAX_GB_ENV, device, 2)
    if known is None:
        return "dense"
    limit, source = known
    if need <= limit:
        return "dense"
    if cfg.weight_aware_solver == "auto":
        return "cg"
    raise ConfigError(
        f"GlobeConfig.weight_aware_solver: the dense weight-aware steps need about {need / 2**30:.1f} GiB for "
        f"m={m} atoms of r={r} rows over N={N} experts (a dense system of side m*r={m * r}), more than the "
        f"{limit / 2**30:.1f} GiB allowed ({source}); use weight_aware_solver='cg' or 'auto' (matrix-free), "
        "scope='layer', a smaller m or r, or the proxy mode (weight_aware=False)"
    )


def _fit_restarts(
    W: torch.Tensor,
    cfg: GlobeConfig,
    callback: Callable[[dict[str, Any]], Any] | None,
    generator: torch.Generator | None,
) -> FitResult:
    """cfg.restarts whole AM fits, the best kept (see GlobeConfig.restarts); the refinement, if any, runs once
    on the winner. Seeds: cfg.seed + i, or drawn from ``generator`` when one is given."""
    if generator is not None:
        seeds = [int(x) for x in torch.randint(0, 2**31 - 1, (cfg.restarts,), generator=generator)]
    else:
        seeds = [cfg.seed + i for i in range(cfg.restarts)]
    if cfg.refine_steps and W.dim() == 3:  # before the restarts, not after them
        refine_plan(cfg, *W.shape, cfg.resolve_r(*W.shape[1:]), cfg.resolve_m(W.shape[0]), torch.device(cfg.device),
                    cfg.torch_dtype)
    best: FitResult | None = None
    scores = []
    t0 = time.perf_counter()
    for i, seed in enumerate(seeds):
        sub = cfg.replace(restarts=1, seed=seed, refine_steps=None, phi="identity")

        def tagged(rec: dict[str, Any], i: int = i) -> Any:
            return callback({**rec, "restart": i})

        fit = fit_bank(W, sub, callback=tagged if callback is not None else None)
        # the error over all experts of the state kept (each seed holds out different experts, so their
        # validation errors are not comparable); without held-out experts, the training objective
        score = (fit.metrics["rel_error_all"] if fit.metrics["n_val"]
                 else fit.history[fit.metrics["best_step"]]["objective"])
        scores.append(float(score))
        if best is None or score < min(scores[:-1]):
            best = fit
    assert best is not None
    best.metrics["restarts"] = len(seeds)
    best.metrics["restart_best"] = int(min(range(len(scores)), key=scores.__getitem__))
    best.metrics["restart_scores"] = scores
    best.metrics["restart_seeds"] = seeds
    if cfg.refine_steps:
        from globe.refine import apply_refinement

        t1 = time.perf_counter()
        best = apply_refinement(best, W.to(device=torch.device(cfg.device), dtype=cfg.torch_dtype), cfg,
                                callback=callback)
        best.metrics["refine_time_s"] = time.perf_counter() - t1
    best.metrics["fit_time_s"] = time.perf_counter() - t0
    return best


def fit_bank(
    W: torch.Tensor,
    config: GlobeConfig | None = None,
    *,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    generator: torch.Generator | None = None,
) -> FitResult:
    """Fit a bank, codes and adapters to one family's experts W [N, p, d] in one scope.

    callback(record) is called with every step's metric record (step 0 is the initial state) and then with
    the refinement's records (``"stage": "refine"``) when config.refine_steps is set. generator drives every
    random choice (k-means++ seeding, held-out experts, the warm start); by default one seeded from
    config.seed, so the same inputs and config give bit-identical factors on CPU.
    """
    cfg = config or GlobeConfig()
    cfg.validate()
    if cfg.restarts > 1:
        return _fit_restarts(W, cfg, callback, generator)
    if cfg.phi != "identity" and not cfg.refine_steps:
        raise ConfigError(
            f"GlobeConfig.phi: phi={cfg.phi!r} is fitted by the refinement stage after the linear AM; set "
            "refine_steps (e.g. 200 for refine_method='adam', 20 for 'gn') to run it"
        )
    if W.dim() != 3:
        raise ConfigError(f"fit_bank expects experts as [N, p, d], got shape {tuple(W.shape)}")
    device, dtype = torch.device(cfg.device), cfg.torch_dtype
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    W = W.to(device=device, dtype=dtype)
    W_orig = W if cfg.refine_steps else None  # the refinement works in the original scale
    N, p, d = W.shape
    r, m = cfg.resolve_r(p, d), cfg.resolve_m(N)
    solver = _weight_aware_solver(cfg, N, m, r, device, dtype) if cfg.weight_aware else None
    if cfg.refine_steps:
        refine_plan(cfg, N, p, d, r, m, device, dtype)
    if solver == "cg" and cfg.support_search > 0:
        raise ConfigError(
            f"GlobeConfig.support_search: the support search scores its candidates with the bank's dense row "
            f"Gram ((m r)^2 numbers, m*r={m * r}), which the matrix-free weight-aware solver does not form; set "
            "support_search=0 or weight_aware_solver='dense'"
        )
    target = min(cfg.target_support, m)
    sweep = cfg.sweep_key(r, m)
    t_start = time.perf_counter()

    # held-out experts for validation (never so many that fewer than m remain for the dictionary step)
    n_val = 0 if N < 4 or cfg.val_fraction <= 0 else max(1, round(cfg.val_fraction * N))
    n_val = max(0, min(n_val, N - m))
    perm = torch.randperm(N, generator=gen)
    val_index = sorted(perm[:n_val].tolist())
    is_val = torch.zeros(N, dtype=torch.bool, device=device)
    is_val[val_index] = True
    train = ~is_val

    # 1. normalisation
    norm = fit_normalization(W, cfg.center)
    Z = norm.apply(W)
    del W
    zn = _frob2(Z)
    s2 = norm.scale.double().pow(2)
    wn = torch.empty(N, dtype=torch.float64, device=device)  # ||diag(s) Z_i||^2: the original-scale energy
    for lo in range(0, N, _CHUNK):
        wn[lo : lo + _CHUNK] = (Z[lo : lo + _CHUNK].double().pow(2).sum(2) * s2).sum(1)
    wn_total = float(wn.sum()) + float(norm.mean.double().pow(2).sum()) * N if cfg.center else float(wn.sum())
    # weight-aware and centred: the mean is a fitted term of the objective, updated every step (_mean_step);
    # wn stays the energy about the initial mean, so rel_error keeps one denominator and follows the objective
    fit_mean = cfg.weight_aware and cfg.center and cfg.fit_mean

    # 2. warm start
    from globe.seeding import seed_proxies

    t0 = time.perf_counter()
    seed = seed_proxies(Z, r, method=cfg.seeding, generator=gen, **cfg.seeding_options)
    seed_time = time.perf_counter() - t0
    X = seed.proxies.to(device=device, dtype=dtype)
    X = X / X.flatten(1).norm(dim=1).clamp_min(torch.finfo(dtype).tiny)[:, None, None]

    A_seed, _, _ = fit_adapters(Z, X, cfg.lambda_A)
    res_seed, _ = _residuals(Z, A_seed, X, norm.scale)
    del A_seed
    t0 = time.perf_counter()
    bank, alpha, A, init_metrics = _initial_state(Z, X, train, m, cfg, gen)
    if cfg.sparsity == "topk":
        # top_k caps every code, the initial ones too: the weight-aware code steps are accepted only where they
        # lower the objective, so a wider initial code would keep its atoms, and any mode may return step 0
        alpha, _, _ = sparsify(alpha, float(cfg.T0), sparsity="topk", eps=cfg.eps, top_k=cfg.top_k)
    init_metrics["init_time_s"] = time.perf_counter() - t0
    T = float(cfg.T0)

    seed_metrics: dict[str, Any] = {
        "seed_method": seed.method,
        "seed_explained_variance": float(seed.explained_variance),
        "seed_rel_error": math.sqrt(float(res_seed.sum()) / float(zn.sum())),
        "seed_energy_captured": 1.0 - float(res_seed.sum()) / float(zn.sum()),
        "seed_time_s": seed_time,
        **init_metrics,
    }
    for key, value in (seed.metrics or {}).items():
        if isinstance(value, (int, float, bool)):
            seed_metrics[f"seed.{key}"] = value

    history: list[dict[str, Any]] = []
    prev_support: torch.Tensor | None = None
    lam_B = cfg.lambda_B

    def record(step: int, extra: dict[str, Any]) -> dict[str, Any]:
        nonlocal prev_support
        comp = ops.compose(bank, alpha)
        res_z, res_w = _residuals(Z, A, comp, norm.scale)
        tr, va = train, is_val
        rec: dict[str, Any] = {"step": step, **sweep}
        rec["rel_error"] = math.sqrt(float(res_w[tr].sum()) / max(float(wn[tr].sum()), 1e-300))
        rec["rel_error_z"] = math.sqrt(float(res_z[tr].sum()) / max(float(zn[tr].sum()), 1e-300))
        rec["rel_error_val"] = (
            math.sqrt(float(res_w[va].sum()) / max(float(wn[va].sum()), 1e-300)) if n_val else float("nan")
        )
        # against the full weights, mean included (what the artifact reproduces)
        rec["rel_error_all"] = math.sqrt(float(res_w.sum()) / max(wn_total, 1e-300))
        rec["objective"] = float(res_z[tr].sum())
        rec["objective_all"] = float(res_z.sum())
        rec["temperature"] = T
        rec["T_min"], rec["T_max"] = cfg.T_min, cfg.T_max
        rec.update(M.support_stats(alpha[tr], target))
        rec.update(M.entropy_stats(alpha))
        rec.update(M.atom_popularity(alpha))
        rec["support_overlap"] = M.support_overlap(alpha)
        support = alpha != 0
        rec["support_change"] = (
            float((support != prev_support).any(1).double().mean()) if prev_support is not None else 1.0
        )
        prev_support = support
        norms = bank.reshape(m, -1).norm(dim=1)
        rec["atom_norm_dev"] = float((norms - 1).abs().max())
        rec.update(_coherence_metrics(bank))
        rec.update(M.nonfinite_counts(bank=bank, alpha=alpha, A=A))
        rec["peak_memory_bytes"] = M.peak_memory_bytes(device)
        rec.update(M.backend_metrics())
        rec.update(extra)
        return rec

    rec0 = record(0, {**seed_metrics, "step_time_s": time.perf_counter() - t_start})
    rec0["rel_error_init"] = rec0["rel_error"]
    history.append(rec0)
    if callback is not None:
        callback(rec0)

    state = {"bank": bank, "alpha": alpha, "A": A, "T": T, "step": 0, "mean": norm.mean}
    use_val = n_val > 0
    best_err = rec0["rel_error_val" if use_val else "rel_error"]
    best = _snapshot(state)
    stale = 0
    stopped_early = False
    spectral_next, spectral_wait = 1, 1  # the step of the next spectral-bank try, the wait after it
    # the final pass: after the validated phase, final_steps more steps with the held-out experts in the fit
    n_held, val_best_step = n_val, 0
    final_pass = n_val > 0 and cfg.final_steps > 0
    in_final, best_all = False, float("inf")
    step, last_step = 0, cfg.steps

    while True:
        step += 1
        if step > last_step:
            if in_final or not final_pass:
                break
            # restore the validated best state, then let every expert into the dictionary step
            val_best_step = best["step"]
            if best["step"] != state["step"]:  # copies: the steps below may write into the live tensors
                bank, alpha, A, T = best["bank"].clone(), best["alpha"].clone(), best["A"].clone(), best["T"]
                if fit_mean:  # Z = (W - mean) / s follows the restored mean
                    Z = Z + ((norm.mean - best["mean"]) / norm.scale[:, None]).to(Z)
                    zn = _frob2(Z)
                norm.mean.copy_(best["mean"])
            train = torch.ones_like(train)
            is_val = torch.zeros_like(is_val)
            n_val, use_val, in_final = 0, False, True
            best_all = history[best["step"]]["rel_error_all"]
            last_step = step - 1 + cfg.final_steps
        t_step = time.perf_counter()
        extra: dict[str, Any] = {}
        reseeded = 0
        if not cfg.weight_aware:
            # 1. coding: least squares against the targets, simplex projection, tempered entmax, prune
            if cfg.refresh_targets and step > 1:
                X = _ls_targets(Z, A)
            probs, raw = simplex_codes(X, bank)
            alpha, _, pruned = sparsify(
                probs,
                T,
                sparsity=cfg.sparsity,
                eps=cfg.eps,
                entmax_alpha=cfg.entmax_alpha,
                top_k=cfg.top_k,
                scores=raw,
            )
            # 2. MOD on the training experts
            C = alpha[train]
            H = C.T @ C
            ridge = lam_B * float(H.diagonal().mean().clamp_min(torch.finfo(H.dtype).tiny))
            H = H + ridge * torch.eye(m, dtype=dtype, device=device)
            if cfg.coherence > 0:
                Bf, coh = mod_solve_with_coherence(C, X[train], lam_B, cfg.coherence, cfg.coherence_iters)
                mod_fallback = bool(coh["fallback"])
                extra["coherence_iterations"] = coh["iterations"]
                extra["max_coherence_unpenalised"] = coh["max_coherence_start"]
            else:
                rhs = C.T @ X[train].reshape(C.shape[0], -1)
                Bf, mod_fallback, _ = _solve_spd(H, rhs)
            ev = torch.linalg.eigvalsh(H.double())
            extra["cond_mod"] = float(ev[-1] / ev[0].clamp_min(1e-300))
            new_bank = Bf.reshape(m, r, d)
            unused = (C != 0).sum(0) == 0
            if bool(unused.any()):
                comp = ops.compose(new_bank, C)
                err = _frob2(X[train] - comp)
                worst = torch.argsort(err, descending=True, stable=True)
                slots = unused.nonzero().flatten().tolist()
                for slot, j in enumerate(slots):
                    new_bank[j] = X[train][worst[slot % worst.numel()]]
                reseeded = len(slots)
            bank = new_bank
        else:
            dense = solver == "dense"
            wa = _WeightAware(Z, A, zn) if dense else _WeightAwareFree(Z, A, zn)
            if dense:
                Q, c = wa.quadratic(bank)
                cand, a_cur = None, alpha
            else:
                # the quadratic over candidate atoms only: each expert's support, then the atoms of most
                # negative gradient (those the QP over all atoms would move first)
                grad_all = wa.gradient(bank, alpha)
                support = alpha != 0
                n_cand = min(m, max(int(support.sum(1).max()) + max(target, 4), cfg.top_k or 0))
                prio = torch.where(support, torch.full_like(grad_all, float("-inf")), grad_all)
                cand = (-prio).topk(n_cand, dim=1).indices
                del grad_all, prio
                Q, c = wa.candidate_quadratic(bank, cand)
                a_cur = alpha.gather(1, cand)
            F_old = wa.objective(Q, c, a_cur)
            # 1. codes: the per-expert simplex QP from the current codes; the tempered entmax picks the
            # support; the QP again on that support; accepted per expert only if F_i did not increase
            a_qp = wa.qp(Q, c, a_cur, cfg.pg_iters, None)
            grad = 2 * ((Q @ a_qp[:, :, None]).squeeze(2) - c)
            a_sp, _, pruned = sparsify(
                a_qp,
                T,
                sparsity=cfg.sparsity,
                eps=cfg.eps,
                entmax_alpha=cfg.entmax_alpha,
                top_k=cfg.top_k,
                scores=-grad,
            )
            on = a_sp > 0
            a_sp = wa.qp(Q, c, project_simplex(a_qp, on), cfg.pg_iters, on)
            a_sp, _ = ops.prune_renorm(a_sp, cfg.eps)
            F_new = wa.objective(Q, c, a_sp)
            accept = F_new <= F_old
            if cand is not None:
                a_sp = torch.zeros_like(alpha).scatter_(1, cand, a_sp)
                extra["code_candidates"] = n_cand
            alpha = torch.where(accept[:, None], a_sp, alpha)
            extra["codes_accepted"] = float(accept.double().mean())
            extra["weight_aware_solver"] = solver
            # 2a. the spectral bank: every atom in one frame; kept only if the training objective drops. After
            # a rejection the next try waits twice as long as the last wait (1, 2, 4, ... steps), so a bank it
            # cannot improve costs O(log steps) tries; an acceptance resets the wait.
            if cfg.spectral_bank and step >= spectral_next:
                cand = _spectral_bank(alpha[train], row_bases(wa.Y[train]), r, cfg.spectral_max_dim, bank)
                extra["spectral_tried"], extra["spectral_skipped"] = float(cand is not None), float(cand is None)
                extra["spectral_accepted"] = 0.0
                spectral_wait *= 2
                if cand is not None:
                    used = (alpha[train] != 0).any(0)
                    cand[~used] = bank[~used]
                    s_bank, s_alpha, _ = _normalise_atoms(cand, alpha, A)
                    s_comp = ops.compose(s_bank, s_alpha)
                    s_A, _, _ = fit_adapters(Z, s_comp, cfg.lambda_A)
                    res_s, _ = _residuals(Z, s_A, s_comp, norm.scale)
                    res_c, _ = _residuals(Z, A, ops.compose(bank, alpha), norm.scale)
                    if float(res_s[train].sum()) < float(res_c[train].sum()):
                        bank, alpha, A = s_bank, s_alpha, s_A
                        wa = _WeightAware(Z, A, zn) if dense else _WeightAwareFree(Z, A, zn)
                        if dense:
                            Q, c = wa.quadratic(bank)
                        extra["spectral_accepted"] = 1.0
                        spectral_wait = 1
                spectral_next = step + spectral_wait
            elif cfg.spectral_bank:
                extra["spectral_tried"], extra["spectral_skipped"], extra["spectral_accepted"] = 0.0, 0.0, 0.0
            # 2. bank: normal equations of the true objective over the training experts
            if dense:
                F_before = wa.objective(Q, c, alpha)
                H, rhs = wa.bank_system(alpha, train.nonzero().flatten(), lam_B)
                Bf, mod_fallback, Ldiag = _solve_spd(H, rhs)
                extra["cond_mod"] = (
                    float((Ldiag.max() / Ldiag.min().clamp_min(1e-300)) ** 2) if Ldiag.numel() else float("inf")
                )
                new_bank = Bf.reshape(m, r, d)
                del H, rhs
            else:
                F_before = wa.objective_of(bank, alpha)
                new_bank, cg_info = wa.bank_solve(alpha, train.nonzero().flatten(), lam_B, bank)
                extra.update(cg_info)
                mod_fallback = False
            unused = (alpha[train] != 0).sum(0) == 0
            new_bank[unused] = bank[unused]
            F_after = wa.objective(*wa.quadratic(new_bank), alpha) if dense else wa.objective_of(new_bank, alpha)
            bank_ok = float(F_after[train].sum()) <= float(F_before[train].sum())
            extra["bank_accepted"] = float(bank_ok)
            if bank_ok:
                bank = new_bank
            if bool(unused.any()):
                worst = torch.argsort(
                    torch.where(train, F_after if bank_ok else F_before, torch.full_like(F_before, -1.0)),
                    descending=True,
                    stable=True,
                )
                slots = unused.nonzero().flatten().tolist()
                for slot, j in enumerate(slots):
                    i = int(worst[slot % worst.numel()])
                    target_i = torch.linalg.solve(
                        wa.GA[i]
                        + 1e-6 * wa.GA[i].diagonal().mean() * torch.eye(r, dtype=dtype, device=device),
                        wa.Y[i],
                    )
                    bank[j] = target_i
                reseeded = len(slots)
            del wa
        extra["mod_fallback"] = int(mod_fallback)
        extra["atoms_reseeded"] = reseeded
        extra["prune_fraction"] = pruned

        # 3. unit-norm atoms, codes rescaled, row sums folded into the adapters
        bank, alpha, A = _normalise_atoms(bank, alpha, A)

        # 4. adapter refit
        comp = ops.compose(bank, alpha)
        A_new, fallbacks, G = fit_adapters(Z, comp, cfg.lambda_A)
        if cfg.weight_aware:
            res_old, _ = _residuals(Z, A, comp, norm.scale)
            res_new, _ = _residuals(Z, A_new, comp, norm.scale)
            keep = res_new <= res_old
            A = torch.where(keep[:, None, None], A_new, A)
            extra["adapters_accepted"] = float(keep.double().mean())
        else:
            A = A_new
        extra["cholesky_fallbacks"] = fallbacks
        lam_abs = cfg.lambda_A * float(G.diagonal(dim1=1, dim2=2).sum(1).mean()) / r
        if cfg.weight_aware:
            res_cur = torch.where(keep, res_new, res_old)
        # 4a. the shared mean term (weight-aware, centred): its exact minimiser given A and B~
        if fit_mean:
            Z, res_cur, extra["mean_shift_rms"] = _mean_step(Z, A, comp, train, norm)
            zn = _frob2(Z)
        extra.update(M.condition_numbers(G, lam_abs))
        # 4b. support search (weight-aware): swap / add atoms against the adapter-eliminated objective
        if cfg.weight_aware and cfg.support_search > 0:
            t_ss = time.perf_counter()
            max_support = min(cfg.top_k, m) if cfg.sparsity == "topk" else target
            swaps, gain = 0.0, 0.0
            for _ in range(cfg.support_search):
                alpha, A, ss = _support_search(
                    Z, bank, alpha, A, zn, res_cur, max(lam_abs, torch.finfo(dtype).tiny),
                    cfg.support_candidates, max_support, cfg.eps,
                )
                swaps, gain = swaps + ss["support_swaps"], gain + ss["support_search_gain"]
                if ss["support_search_gain"] <= 0:
                    break
                res_cur, _ = _residuals(Z, A, ops.compose(bank, alpha), norm.scale)
            extra["support_swaps"] = swaps
            extra["support_search_gain"] = gain
            extra["support_search_time_s"] = time.perf_counter() - t_ss
        # 5. temperature control (lowers T when the support is above target; see the module docstring)
        med = float((alpha[train] != 0).sum(1).double().median())
        if cfg.sparsity != "topk":
            T = min(max(T * math.exp(-cfg.eta * (med / target - 1.0)), cfg.T_min), cfg.T_max)
        extra["step_time_s"] = time.perf_counter() - t_step
        if in_final:
            extra["stage"] = "final"
        rec = record(step, extra)
        rec["temperature"] = T
        history.append(rec)
        if callback is not None:
            callback(rec)

        state = {"bank": bank, "alpha": alpha, "A": A, "T": T, "step": step, "mean": norm.mean}
        if in_final:  # keep the final-pass step with the lowest error over all experts (or the validated one)
            if rec["rel_error_all"] < best_all:
                best_all, best = rec["rel_error_all"], _snapshot(state)
            continue
        # early stop on the validation error plateau with stable supports
        err = rec["rel_error_val" if use_val else "rel_error"]
        if err < best_err * (1 - cfg.min_improvement):
            best_err, best, stale = err, _snapshot(state), 0
        else:
            stale += 1
        if stale >= cfg.patience and rec["support_change"] <= cfg.support_tol:
            stopped_early = True
            last_step = step  # the final pass, if any, starts at the next step

    if not in_final:
        val_best_step = best["step"]
    if best["step"] != state["step"]:
        bank, alpha, A, T = best["bank"], best["alpha"], best["A"], best["T"]
        norm.mean.copy_(best["mean"])
    final = history[best["step"]]
    A_out = norm.fold_adapters(A)
    summary: dict[str, Any] = {
        **sweep,
        "N": N,
        "p": p,
        "d": d,
        "steps_run": len(history) - 1,
        "best_step": best["step"],
        "stopped_early": stopped_early,
        "n_val": n_held,
        "final_steps_run": sum(1 for h in history if h.get("stage") == "final"),
        "validated_step": val_best_step,
        "temperature": T,
        "rel_error": final["rel_error"],
        "rel_error_val": history[val_best_step]["rel_error_val"],  # at the validated step
        "rel_error_all": final["rel_error_all"],
        "rel_error_init": rec0["rel_error"],
        "support_median": final.get("support_median"),
        "support_mean": final.get("support_mean"),
        "support_p95": final.get("support_p95"),
        "support_overlap": final.get("support_overlap"),
        "fit_time_s": time.perf_counter() - t_start,
        **seed_metrics,
        **M.atom_popularity(alpha, keep_vector=True),
    }
    fit = FitResult(
        bank=bank.float(),
        alpha=alpha.float(),
        A=A_out.float(),
        normalization=norm.to(torch.float32),
        history=history,
        metrics=summary,
        r=r,
        m=m,
        val_index=val_index,
    )
    if W_orig is not None:
        from globe.refine import apply_refinement

        t0 = time.perf_counter()
        fit = apply_refinement(fit, W_orig, cfg, callback=callback)
        fit.metrics["refine_time_s"] = time.perf_counter() - t0
        fit.metrics["fit_time_s"] = time.perf_counter() - t_start
        fit.metrics.update({f"final.{k}": v for k, v in _coherence_metrics(fit.bank).items()})
    return fit
