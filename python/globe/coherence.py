"""Atom coherence of a bank, and a coherence-penalised dictionary (MOD) step.

Coherence of a bank B [m, r, d]: with the atoms normalised to unit Frobenius norm, b_j = B_j / ||B_j||,

    max_coherence  = max_{j<k} |<b_j, b_k>|        mean_coherence = mean_{j<k} |<b_j, b_k>|

(0 for a single atom; a zero atom counts as orthogonal to everything). Two near-duplicate atoms give a
maximum near 1: the bank spends two atoms' parameters on one direction.

The penalised MOD step (the design document's "coherence penalties to discourage atom duplication") minimises

    f(B) = ||X - C B||² + λ ||B||² + μ Σ_{j≠k} <B_j, B_k>²

over B [m, D] (D = r d), C [N, m] the codes, X [N, D] the targets. λ and μ are relative, so their values do
not depend on the data's scale: λ = lambda_B · mean diag(CᵀC) (as the trainer's MOD step) and
μ = mu · mean diag(CᵀC) / mean_j ||B0_j||², B0 the unpenalised solution: at mu = 1 a pair of atoms at
cosine 1 pays about what moving one of them by its own norm costs in the data term. The penalty acts on the
unnormalised atoms (angles and norms together); this is the exact penalty, not a convex surrogate.

f is a quartic (non-convex) in B. The solve starts from the unpenalised solution B0 = (CᵀC + λI)⁻¹ CᵀX and
takes preconditioned gradient steps B ← B - η (CᵀC + λI)⁻¹ ∇f / 2 with the quadratic part's Hessian as the
preconditioner (at μ = 0 one step with η = 1 is the exact solve), η halved until f decreases (at most 12
halvings; no decrease: stop). So f never ends above f(B0), and the coherence term can only have been
traded against a smaller total. Cost per iteration: a few [m, m] x [m, D] products and one m x m Cholesky
solve; nothing of size N x D beyond the one CᵀX product.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["atom_coherence", "mod_solve_with_coherence", "coherence_penalty"]


def atom_coherence(bank: torch.Tensor) -> dict[str, float]:
    """{"max_coherence", "mean_coherence"} of the atoms of bank [m, ...] (see the module docstring)."""
    m = bank.shape[0]
    if m < 2:
        return {"max_coherence": 0.0, "mean_coherence": 0.0}
    Bf = bank.reshape(m, -1).double()
    n = Bf.norm(dim=1)
    Bu = Bf / torch.where(n > 0, n, torch.ones_like(n))[:, None]
    G = (Bu @ Bu.T).abs()
    iu = torch.triu_indices(m, m, 1, device=bank.device)
    off = G[iu[0], iu[1]]
    return {"max_coherence": float(off.max()), "mean_coherence": float(off.mean())}


def coherence_penalty(bank: torch.Tensor) -> torch.Tensor:
    """Σ_{j≠k} <B_j, B_k>² of bank [m, ...] (unnormalised atoms), differentiable."""
    Bf = bank.reshape(bank.shape[0], -1)
    K = Bf @ Bf.T
    return K.pow(2).sum() - K.diagonal().pow(2).sum()


def mod_solve_with_coherence(
    C: torch.Tensor,
    X: torch.Tensor,
    lambda_B: float,
    mu: float,
    iters: int = 20,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Coherence-penalised MOD: argmin_B ||X - C B||² + λ||B||² + μ Σ_{j≠k} <B_j, B_k>² (module docstring).

    C [N, m] codes; X [N, ...] targets (e.g. [N, r, d] proxies). lambda_B and mu are relative. Returns (bank
    [m, ...] in X's trailing shape, info) with info = {"objective", "objective_unpenalised_start",
    "iterations", "max_coherence_start", "max_coherence", "mean_coherence_start", "mean_coherence",
    "mu_abs", "fallback"} (fallback: the Cholesky factor failed and a least-squares solve was used).
    Atoms are not normalised here (the trainer normalises after its MOD step).
    """
    if C.dim() != 2 or X.shape[0] != C.shape[0]:
        raise ValueError(f"C must be [N, m] and X [N, ...] with the same N, got {tuple(C.shape)} and "
                         f"{tuple(X.shape)}")
    N, m = C.shape
    trailing = X.shape[1:]
    Xf = X.reshape(N, -1)
    H = C.T @ C
    dmean = float(H.diagonal().mean().clamp_min(torch.finfo(H.dtype).tiny))
    H = H + lambda_B * dmean * torch.eye(m, dtype=H.dtype, device=H.device)
    R = C.T @ Xf  # [m, D]
    L, info = torch.linalg.cholesky_ex(H)
    fallback = int(info) != 0

    def solve(rhs: torch.Tensor) -> torch.Tensor:
        if not fallback:
            return torch.cholesky_solve(rhs, L)
        return torch.linalg.lstsq(H, rhs).solution

    B = solve(R)
    norms2 = B.pow(2).sum(1)
    mu_abs = float(mu) * dmean / max(float(norms2.mean()), torch.finfo(B.dtype).tiny)

    def f(B: torch.Tensor) -> float:
        # data part without the constant ||X||², plus the penalty
        data = -2 * (B * R).sum() + (B * (H @ B)).sum()
        return float(data.double()) + mu_abs * float(coherence_penalty(B).double())

    coh0 = atom_coherence(B)
    f_cur = f(B)
    f_start = f_cur
    done = 0
    if mu_abs > 0:
        for _ in range(iters):
            K = B @ B.T
            K_off = K - torch.diag_embed(K.diagonal())
            half_grad = (H @ B - R) + 2 * mu_abs * (K_off @ B)
            step = solve(half_grad)
            eta, accepted = 1.0, False
            for _ in range(13):
                B_try = B - eta * step
                f_try = f(B_try)
                if f_try < f_cur:
                    accepted = True
                    break
                eta *= 0.5
            if not accepted:
                break
            rel = (f_cur - f_try) / max(abs(f_cur), 1e-300)
            B, f_cur = B_try, f_try
            done += 1
            if rel < 1e-7:
                break
    coh = atom_coherence(B)
    out = {
        "objective": f_cur + float(Xf.double().pow(2).sum()),
        "objective_start": f_start + float(Xf.double().pow(2).sum()),
        "iterations": done,
        "max_coherence_start": coh0["max_coherence"],
        "mean_coherence_start": coh0["mean_coherence"],
        "max_coherence": coh["max_coherence"],
        "mean_coherence": coh["mean_coherence"],
        "mu_abs": mu_abs,
        "fallback": fallback,
    }
    return B.reshape(m, *trailing), out
