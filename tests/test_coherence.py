"""Tests of globe.coherence: the atom coherence metric and the coherence-penalised MOD solve.

Tolerances: float64 throughout; the metric to 1e-12 on atoms whose cosines are known in closed form, the
unpenalised solve to 1e-10 relative against a direct solve of the normal equations.
"""

from __future__ import annotations

import math

import pytest
import torch
from globe.coherence import atom_coherence, coherence_penalty, mod_solve_with_coherence


def test_coherence_of_constructed_atoms():
    r, d = 3, 5
    e = torch.eye(r * d, dtype=torch.float64)
    atoms = torch.stack([e[0], (e[0] + e[1]) / math.sqrt(2), -e[2] * 3.0, e[3]]).reshape(4, r, d)
    c = atom_coherence(atoms)
    # pairs: (0,1) 1/sqrt2, all others 0 (the sign and the norm do not matter)
    assert c["max_coherence"] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert c["mean_coherence"] == pytest.approx(1 / math.sqrt(2) / 6, abs=1e-12)
    dup = torch.stack([atoms[0], -2 * atoms[0], atoms[3]])
    assert atom_coherence(dup)["max_coherence"] == pytest.approx(1.0, abs=1e-12)
    assert atom_coherence(atoms[:1]) == {"max_coherence": 0.0, "mean_coherence": 0.0}
    ortho = e[:4].reshape(4, r, d)
    assert atom_coherence(ortho)["max_coherence"] == 0.0
    # the penalty: sum over ordered pairs j != k of <B_j, B_k>^2
    Bf = atoms.reshape(4, -1)
    K = Bf @ Bf.T
    expect = sum(float(K[j, k]) ** 2 for j in range(4) for k in range(4) if j != k)
    assert float(coherence_penalty(atoms)) == pytest.approx(expect, rel=1e-12)


def _problem(seed=0, N=40, m=5, r=3, d=7, dup_noise=0.05):
    """Targets mixed from atoms of which two are near duplicates (the case the penalty is for)."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, d, generator=g, dtype=torch.float64)
    B[1] = B[0] + dup_noise * torch.randn(r, d, generator=g, dtype=torch.float64)
    C = torch.rand(N, m, generator=g, dtype=torch.float64)
    C = C / C.sum(1, keepdim=True)
    X = torch.einsum("nm,mrd->nrd", C, B) + 0.05 * torch.randn(N, r, d, generator=g, dtype=torch.float64)
    return C, X


def test_unpenalised_solve_is_the_ridge_solution():
    C, X = _problem(1)
    B, info = mod_solve_with_coherence(C, X, 1e-3, 0.0)
    H = C.T @ C
    H = H + 1e-3 * H.diagonal().mean() * torch.eye(C.shape[1], dtype=H.dtype)
    ref = torch.linalg.solve(H, C.T @ X.reshape(X.shape[0], -1)).reshape(B.shape)
    torch.testing.assert_close(B, ref, rtol=1e-10, atol=1e-10)
    assert info["iterations"] == 0 and info["objective"] == pytest.approx(info["objective_start"])


@pytest.mark.parametrize("seed", [2, 3])
def test_penalty_lowers_coherence_at_small_cost(seed):
    C, X = _problem(seed, dup_noise=0.0)

    def fit(B):
        return float((X - torch.einsum("nm,mrd->nrd", C, B)).norm() / X.norm())

    B0, _ = mod_solve_with_coherence(C, X, 1e-2, 0.0)
    c0 = atom_coherence(B0)
    assert c0["max_coherence"] > 0.98  # the duplicated pair
    # a small penalty: the duplicate pair moves apart, the data residual goes up by less than 10 %
    B1, info = mod_solve_with_coherence(C, X, 1e-2, 0.01, iters=50)
    assert atom_coherence(B1)["max_coherence"] < c0["max_coherence"]
    assert fit(B0) - 1e-12 <= fit(B1) < 1.1 * fit(B0)
    assert info["objective"] <= info["objective_start"]
    assert info["max_coherence_start"] == pytest.approx(c0["max_coherence"])
    # a strong penalty decorrelates the bank (at a price in the data term)
    B2, _ = mod_solve_with_coherence(C, X, 1e-2, 0.5, iters=50)
    c2 = atom_coherence(B2)
    assert c2["max_coherence"] < 0.5 and c2["mean_coherence"] < c0["mean_coherence"]
    assert fit(B2) > fit(B1)


def test_shapes_and_errors():
    C, X = _problem(4)
    B, _ = mod_solve_with_coherence(C, X.reshape(X.shape[0], -1), 1e-4, 0.1, iters=3)
    assert B.shape == (C.shape[1], X.shape[1] * X.shape[2])
    with pytest.raises(ValueError):
        mod_solve_with_coherence(C[:-1], X, 1e-4, 0.1)
