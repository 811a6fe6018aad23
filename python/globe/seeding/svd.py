"""SVD baseline: per-expert truncated SVD.

B_i^(0) spans the top-r right singular vectors of Z_i = U_i S_i V_i^T (the best rank-r row space, so the
highest explained variance any method can reach), with rows weighted by the singular values: after the shared
frame fix of :func:`globe.seeding.common.finish` the proxy is diag(w_i) O_i V_i[:r]^T / ||w_i||, w_ik the
energy of Z_i along aligned row k, i.e. S_i V_i^T up to the rotation O_i and the unit-norm scaling. The
reference frame for the Procrustes alignment is the top-r basis of a seeded row sample of all experts (as in
TS-PCA).

Cost: one batched torch.linalg.svd of [N, p, d] (O(N p d min(p, d)), the most expensive method), plus the
finish's N r^2 d product and N small r x r SVDs.

Metrics: energy_captured (same as the explained variance: the rank-r optimum), sigma_ratio (median over
experts of s_r / s_1, how far down the spectrum the proxies reach).
"""

from __future__ import annotations

import torch

from globe.seeding.common import (
    SeedResult,
    check_align,
    check_fraction,
    finish,
    make_generator,
    on_cpu_if_mps,
)
from globe.seeding.ts_pca import shared_basis

__all__ = ["seed_svd"]


def seed_svd(
    Z: torch.Tensor,
    r: int,
    *,
    generator: torch.Generator | None = None,
    align: str = "procrustes",
    weight_floor: float = 1e-2,
) -> SeedResult:
    """Per-expert truncated SVD proxies. Options: align, weight_floor."""
    check_align(align)
    check_fraction("weight_floor", weight_floor)
    g = make_generator(generator)
    _, S, Vh = on_cpu_if_mps(torch.linalg.svd, Z, full_matrices=False)
    Q = Vh[:, :r]
    energies = S[:, :r].square()
    ref = shared_basis(Z, r, generator=g)[0] if align == "procrustes" else None
    proxies, explained, _ = finish(Z, Q, ref=ref, align=align, weight_floor=weight_floor, energies=energies)
    ratio = (S[:, r - 1] / S[:, 0].clamp_min(torch.finfo(S.dtype).tiny)).median()
    metrics = {"energy_captured": explained, "sigma_ratio": float(ratio)}
    return SeedResult(proxies, explained, metrics, "svd")
