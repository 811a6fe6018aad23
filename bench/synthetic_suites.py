"""Synthetic expert families for the quality benchmarks: structure shared across experts and layers, decaying
singular spectra, as trained MoE weights have.

Every suite returns one family's weights as a float32 tensor [L, n, p, d] at RMS 0.02 (the usual initialiser
scale), deterministic from the seed:

* ``planted``: :func:`globe.synthetic.planted_experts` (a linear bank of atoms shared by all layers, sparse
  simplex codes, decaying adapters, a rank-2 expert term, noise and a shared mean).
* ``planted_silu``: the same recipe with the nonlinearity MoBE assumes, W_i = A_i silu(g Σ_j α_ij B_j) + ...
  (the model class of a nonlinear bank; g sets the mixture's RMS to 1).
* ``lowrank_noise``: a global row basis R (q x d) with spectrum (1+k)^-0.8, each layer a small rotation of it,
  each expert W_i = G_i S R_l (G_i Gaussian p x q) plus 20 % noise: everything shares one decaying row space.
* ``clustered``: 4 cluster centres (low-rank with decaying spectra, shared by all layers), each expert its
  centre plus a rank-8 decaying expert term at half the centre's size plus 10 % noise.
"""

from __future__ import annotations

import math

import torch
from globe.synthetic import planted_experts

__all__ = ["SUITES", "make_suite"]

TARGET_STD = 0.02


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-12)


def _decay(k: int, power: float, dtype=torch.float64) -> torch.Tensor:
    return (1 + torch.arange(k, dtype=dtype)).pow(-power)


def planted(L: int, n: int, p: int, d: int, seed: int = 0) -> torch.Tensor:
    return planted_experts(L, n, p, d, seed=seed, families=("gate",)).weights["gate"]


def planted_silu(L: int, n: int, p: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r, K = max(2, min(p, d) // 4), max(4, n // 2)
    bank = torch.randn(K, r, d, generator=g, dtype=torch.float64) * _decay(r, 0.5)[None, :, None]
    codes = torch.zeros(L, n, K, dtype=torch.float64)
    for i in range(L):
        for e in range(n):
            s = int(torch.randint(2, min(4, K) + 1, (1,), generator=g))
            idx = torch.randperm(K, generator=g)[:s]
            w = torch.rand(s, generator=g, dtype=torch.float64) + 0.1
            codes[i, e, idx] = w / w.sum()
    mix = torch.einsum("lnk,krd->lnrd", codes, bank)
    mix = mix / mix.pow(2).mean().sqrt()
    A = torch.randn(L, n, p, r, generator=g, dtype=torch.float64) * _decay(r, 1.0)
    signal = A @ torch.nn.functional.silu(mix)
    noise = torch.randn(L, n, p, d, generator=g, dtype=torch.float64)
    w = _unit(signal) + 0.1 * _unit(noise)
    return (TARGET_STD * _unit(w)).float()


def lowrank_noise(L: int, n: int, p: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = min(d, 2 * p)
    R = torch.linalg.qr(torch.randn(d, q, generator=g, dtype=torch.float64)).Q.T  # [q, d]
    S = _decay(q, 0.8)
    out = []
    for _ in range(L):
        rot = torch.linalg.matrix_exp(0.05 * (lambda X: X - X.T)(torch.randn(q, q, generator=g, dtype=torch.float64)))
        Rl = rot @ R
        G = torch.randn(n, p, q, generator=g, dtype=torch.float64)
        Wl = (G * S) @ Rl
        Wl = _unit(Wl) + 0.2 * _unit(torch.randn(n, p, d, generator=g, dtype=torch.float64))
        out.append(Wl)
    return (TARGET_STD * _unit(torch.stack(out))).float()


def clustered(L: int, n: int, p: int, d: int, seed: int = 0, clusters: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = min(p, d) // 2
    centres = []
    for _ in range(clusters):
        U = torch.randn(p, q, generator=g, dtype=torch.float64)
        V = torch.randn(q, d, generator=g, dtype=torch.float64)
        centres.append(_unit((U * _decay(q, 1.0)) @ V))
    out = torch.empty(L, n, p, d, dtype=torch.float64)
    for i in range(L):
        for e in range(n):
            c = int(torch.randint(clusters, (1,), generator=g))
            U = torch.randn(p, 8, generator=g, dtype=torch.float64) * _decay(8, 1.0)
            V = torch.randn(8, d, generator=g, dtype=torch.float64)
            out[i, e] = centres[c] + 0.5 * _unit(U @ V) + 0.1 * _unit(torch.randn(p, d, generator=g,
                                                                                 dtype=torch.float64))
    return (TARGET_STD * _unit(out)).float()


SUITES = {
    "planted": planted,
    "planted_silu": planted_silu,
    "lowrank_noise": lowrank_noise,
    "clustered": clustered,
}


def make_suite(name: str, L: int = 6, n: int = 8, p: int = 96, d: int = 384, seed: int = 0) -> torch.Tensor:
    """Weights [L, n, p, d] of the named suite."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; suites: {sorted(SUITES)}")
    W = SUITES[name](L, n, p, d, seed)
    assert math.isfinite(float(W.sum()))
    return W
