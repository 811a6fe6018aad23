"""TS-PCA: row-sampled tall-skinny PCA, the default warm start (no per-expert SVD).

1. Sample ``rows_per_expert`` rows of every expert (default ``sample_fraction`` of p, seeded) and stack them
   into a tall-skinny S [N*s, d]. Its top-q right singular subspace V [q, d] (q = r + ``oversample``) comes
   from one eigh of the min(N*s, d)-wide Gram: a shared basis of the family's dominant input directions.
2. Per expert, V is the test matrix of a one-pass randomized range finder: Y_i = Z_i V^T [p, q],
   U_i = orth(Y_i), T_i = U_i^T Z_i [q, d]; the proxy's row space is the top-r right singular subspace of T_i
   (q x q Gram and a batched eigh). Each further ``refine`` step is one power iteration (Y_i = Z_i T_i^T).
   With ``refine=0`` the experts' top-r directions are picked inside the shared span(V) instead (cheapest,
   but every proxy then lies in the same q-dimensional space; distinct only when q > r).
3. :func:`globe.seeding.common.finish` aligns each basis to the shared frame V[:r] (Procrustes), weights rows
   by the expert's energy and normalises.

Cost: the sample Gram, then per refine step ~2 N p d q + N p q^2 multiply-adds plus N eigh of q x q; the
finish adds N p d r + N r^2 d and N small r x r SVDs. On noise-free rank-r experts one refine step recovers
the row space exactly (range(Z_i V^T) is Z_i's column space when V is not orthogonal to its rows).

Metrics: energy_captured (fraction of the energy inside the shared span(V)), sampled_rows, shared_rank.
"""

from __future__ import annotations

import math

import torch

from globe.seeding.common import (
    SeedResult,
    check_align,
    check_fraction,
    check_positive_int,
    eigh_desc,
    energy_fraction,
    finish,
    make_generator,
    orthonormalize_rows,
    sample_rows,
    shared_row_basis,
    top_right_singular,
    total_energy,
)

__all__ = ["expert_subspaces", "seed_ts_pca", "shared_basis", "ts_pca_subspaces"]


def default_oversample(r: int) -> int:
    return max(8, r // 8)


def shared_basis(
    Z: torch.Tensor,
    q: int,
    *,
    generator: torch.Generator,
    rows_per_expert: int | None = None,
    sample_fraction: float = 1 / 16,
) -> tuple[torch.Tensor, int]:
    """Shared top-q row basis V [q, d] of the family from a seeded row sample; returns (V, rows sampled)."""
    N, p, d = Z.shape
    if rows_per_expert is None:
        rows_per_expert = math.ceil(sample_fraction * p)
    # At least 2q sampled rows (or all of them) so the sample can carry q directions.
    s = min(p, max(rows_per_expert, math.ceil(2 * q / N), 1))
    S = sample_rows(Z, s, generator)
    V, _ = shared_row_basis(S, q)
    return V, N * s


def expert_subspaces(
    Z: torch.Tensor, V: torch.Tensor, r: int, refine: int
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Each expert's top-r row basis Q [N, r, d] (rows by decreasing energy) seeded by a shared basis V [q,
    d].

    refine = 0: inside span(V) (energies returned exactly); refine >= 1: randomized range finder with test
    matrix V^T and refine - 1 power steps (energies None). Also returns the fraction of the family's energy
    inside span(V)."""
    p = Z.shape[1]
    Y = Z @ V.transpose(0, 1)  # [N, p, q]
    captured = energy_fraction(Y, total_energy(Z))
    if refine == 0:
        mu, C = eigh_desc(Y.transpose(1, 2) @ Y, r)
        return C.transpose(1, 2) @ V, mu, captured
    T = None
    for _ in range(refine):
        if T is not None:
            Y = Z @ T.transpose(1, 2)
        k = min(Y.shape[-1], p)  # U_i [p, k]: at most p independent columns
        U = orthonormalize_rows(Y.transpose(1, 2)[:, :k])  # rows of U_i^T
        T = U @ Z  # [N, k, d]
    Q, _ = top_right_singular(T, r)  # k = min(q, p) >= r since r <= p
    return Q, None, captured


def ts_pca_subspaces(
    Z: torch.Tensor,
    r: int,
    *,
    generator: torch.Generator,
    rows_per_expert: int | None = None,
    sample_fraction: float = 1 / 16,
    oversample: int | None = None,
    refine: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """Per-expert orthonormal bases Q [N, r, d] with rows in decreasing energy, their energies (or None when
    not
    known exactly), the shared basis V [q, d], and metrics. See the module docstring."""
    N, p, d = Z.shape
    q = min(d, p * N, r + (default_oversample(r) if oversample is None else oversample))
    V, n_rows = shared_basis(
        Z, q, generator=generator, rows_per_expert=rows_per_expert, sample_fraction=sample_fraction
    )
    Q, energies, captured = expert_subspaces(Z, V, r, refine)
    metrics = {"energy_captured": captured, "sampled_rows": float(n_rows), "shared_rank": float(V.shape[0])}
    return Q, energies, V, metrics


def seed_ts_pca(
    Z: torch.Tensor,
    r: int,
    *,
    generator: torch.Generator | None = None,
    rows_per_expert: int | None = None,
    sample_fraction: float = 1 / 16,
    oversample: int | None = None,
    refine: int = 1,
    align: str = "procrustes",
    weight_floor: float = 1e-2,
) -> SeedResult:
    """Row-sampled tall-skinny PCA proxies. Options: rows_per_expert (default ceil(sample_fraction * p)),
    sample_fraction, oversample (q = r + oversample, default max(8, r // 8)), refine (range-finder / power
    steps per expert, default 1; 0 keeps proxies inside the shared span), align, weight_floor."""
    N, p, d = Z.shape
    if rows_per_expert is not None:
        check_positive_int("rows_per_expert", rows_per_expert, 1, p)
    check_fraction("sample_fraction", sample_fraction)
    if oversample is not None:
        check_positive_int("oversample", oversample, 0)
    check_positive_int("refine", refine, 0)
    check_align(align)
    check_fraction("weight_floor", weight_floor)
    g = make_generator(generator)
    Q, energies, V, metrics = ts_pca_subspaces(
        Z,
        r,
        generator=g,
        rows_per_expert=rows_per_expert,
        sample_fraction=sample_fraction,
        oversample=oversample,
        refine=refine,
    )
    proxies, explained, _ = finish(Z, Q, ref=V[:r], align=align, weight_floor=weight_floor, energies=energies)
    return SeedResult(proxies, explained, metrics, "ts_pca")
