"""Residual greedy: pick shared atoms from the experts' own top directions, greedily, for the lowest residual.

1. Candidate pool A [K, d]: the top ``candidates_per_expert`` directions of every expert's own row space (from
   the TS-PCA route, one range-finder step), plus the TS-PCA shared basis, K = N * c + q_ts.
2. Greedy selection (pivoted Gram-Schmidt in pool coordinates, in the spirit of K-SVD's atom-by-atom updates):
   starting from an empty shared span P, repeatedly add the candidate whose component orthogonal to P removes
   the most of sum_i ||Z_i - Z_i P||^2, until ``atoms`` (q) directions are chosen. The gains use the pool Gram
   A (sum_i Z_i^T Z_i) A^T estimated on a seeded sample of ``sample_fraction`` of every expert's rows (1.0
   makes them exact); each step then costs O(K^2), with no pass over the data.
3. Proxies: a per-expert randomized range finder whose test matrix is the selected span (as in TS-PCA, default
   ``refine=1``), or with ``refine=0`` each expert's top-r directions inside the selected span (eigh of the
   q x q projected Gram: all proxies then live in one q-dimensional space, which only holds every expert when
   the family's row spaces overlap that much); then aligned to the frame of the first r selected atoms,
   energy-weighted and normalised by :func:`globe.seeding.common.finish`.

Cost: the TS-PCA pool (see there), R d K + R K^2 for the sampled pool Gram (R = sampled rows), q steps of
O(K^2), N p d q + N p q^2 and N eigh of q x q for the proxies, and the finish.

Metrics: greedy_residual (exact sum_i ||Z_i - Z_i P||^2 / sum_i ||Z_i||^2 after all atoms),
greedy_residual_at_{t} (the sampled estimate after t atoms, t = 1, 2, 4, ..., and q), atoms, candidates.
"""

from __future__ import annotations

import math

import torch

from globe.seeding.common import (
    SeedResult,
    check_align,
    check_fraction,
    check_positive_int,
    finish,
    make_generator,
    orthonormalize_rows,
    sample_rows,
)
from globe.seeding.ts_pca import expert_subspaces, ts_pca_subspaces

__all__ = ["greedy_select", "seed_residual_greedy"]


def greedy_select(M: torch.Tensor, E: torch.Tensor, q: int) -> tuple[torch.Tensor, list[float]]:
    """Greedy subspace selection in pool coordinates.

    M = A G A^T and E = A A^T [K, K] for a pool A [K, d] and a PSD Gram G. Returns B [K, q] such that the rows
    of B^T A are orthonormal and span the greedily chosen candidates, and the energy captured after each step.
    """
    K = M.shape[0]
    perp = torch.eye(K, dtype=M.dtype, device=M.device)  # column c: candidate c minus its part in the span
    num = M.diagonal().clone()  # perp_c^T M perp_c
    den = E.diagonal().clone()  # perp_c^T E perp_c = squared norm of the orthogonal part
    tol = 1e-6 * float(den.max())
    cols = []
    captured = []
    acc = 0.0
    for _ in range(q):
        gain = torch.where(den > tol, num / den.clamp_min(tol), torch.full_like(num, -math.inf))
        c = int(gain.argmax())
        if not math.isfinite(float(gain[c])):
            break  # the pool spans fewer than q directions
        acc += max(float(gain[c]), 0.0)
        captured.append(acc)
        beta = perp[:, c] / den[c].sqrt()  # unit new direction s = beta^T A, orthogonal to the span
        gam = perp.transpose(0, 1) @ (E @ beta)  # <orthogonal part of candidate, s>
        dlt = perp.transpose(0, 1) @ (M @ beta)
        num = num - 2 * gam * dlt + gam.square() * (beta @ (M @ beta))
        den = den - gam.square()
        perp = perp - torch.outer(beta, gam)
        den[c] = 0.0
        cols.append(beta)
    return torch.stack(cols, dim=1), captured


def seed_residual_greedy(
    Z: torch.Tensor,
    r: int,
    *,
    generator: torch.Generator | None = None,
    atoms: int | None = None,
    candidates_per_expert: int | None = None,
    sample_fraction: float = 0.25,
    refine: int = 1,
    align: str = "procrustes",
    weight_floor: float = 1e-2,
) -> SeedResult:
    """Greedy shared-atom proxies. Options: atoms (q in [r, min(d, N r)], default min(d, N r, 2 r)),
    candidates_per_expert (in [1, r], default enough for a pool of 2 q), sample_fraction (rows for the gains,
    default 0.25), refine (default 1), align, weight_floor."""
    N, p, d = Z.shape
    q_max = min(d, N * r)
    q = min(q_max, 2 * r) if atoms is None else check_positive_int("atoms", atoms, r, q_max)
    c = (
        min(r, max(1, math.ceil(2 * q / N)))
        if candidates_per_expert is None
        else check_positive_int("candidates_per_expert", candidates_per_expert, 1, r)
    )
    c = max(c, math.ceil(q / N))  # the pool must hold at least q candidates
    check_fraction("sample_fraction", sample_fraction)
    check_positive_int("refine", refine, 0)
    check_align(align)
    check_fraction("weight_floor", weight_floor)
    g = make_generator(generator)

    Qown, _, V, _ = ts_pca_subspaces(Z, r, generator=g)
    # The shared TS-PCA basis (>= r orthonormal rows) joins the pool, so the selection can always reach r.
    A = torch.cat([Qown[:, :c].reshape(N * c, d), V])
    s = min(p, max(1, math.ceil(sample_fraction * p)))
    S = sample_rows(Z, s, g)
    P = S @ A.transpose(0, 1)  # [R, K]
    wdt = torch.float32 if Z.device.type == "mps" else torch.float64  # MPS has no float64
    M = (P.transpose(0, 1) @ P).to(wdt)
    E = (A @ A.transpose(0, 1)).to(wdt)
    B, captured = greedy_select(M, E, q)
    basis = orthonormalize_rows((B.transpose(0, 1) @ A.to(wdt)).to(Z.dtype))

    Q, energies, inside = expert_subspaces(Z, basis, r, refine)
    proxies, explained, _ = finish(Z, Q, ref=basis[:r], align=align, weight_floor=weight_floor, energies=energies)
    sample_total = float(torch.linalg.vector_norm(S).to("cpu", torch.float64).square())
    metrics = {
        "greedy_residual": 1.0 - inside,
        "atoms": float(basis.shape[0]),
        "candidates": float(A.shape[0]),
    }
    t = 1
    while t <= len(captured):
        metrics[f"greedy_residual_at_{t}"] = max(0.0, 1.0 - captured[t - 1] / sample_total)
        t *= 2
    if captured:
        metrics[f"greedy_residual_at_{len(captured)}"] = max(0.0, 1.0 - captured[-1] / sample_total)
    return SeedResult(proxies, explained, metrics, "residual_greedy")
