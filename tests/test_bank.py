"""Initial bank and code helpers: simplex projection, k-means, least-squares codes, sparsity, adapters."""

import torch
from globe.bank import fit_adapters, kmeans_bank, ls_codes, project_simplex, sparsify, subspace_bank
from hypothesis import given, settings
from hypothesis import strategies as st


def _project_reference(v: torch.Tensor) -> torch.Tensor:
    """Projection onto the simplex by bisection on the shift (independent of the sort-based algorithm)."""
    lo = (v.min(1, keepdim=True).values - 1).clone()
    hi = v.max(1, keepdim=True).values.clone()
    for _ in range(200):
        mid = (lo + hi) / 2
        s = (v - mid).clamp_min(0).sum(1, keepdim=True)
        lo = torch.where(s > 1, mid, lo)
        hi = torch.where(s > 1, hi, mid)
    return (v - (lo + hi) / 2).clamp_min(0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 9), m=st.integers(1, 17), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100))
def test_project_simplex_properties(n, m, seed, scale):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, m, generator=g, dtype=torch.float64) * scale
    x = project_simplex(v)
    assert (x >= 0).all()
    torch.testing.assert_close(x.sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(x, _project_reference(v), rtol=0, atol=1e-9)
    # optimality: <v - x, y - x> <= 0 for every vertex y of the simplex
    eye = torch.eye(m, dtype=torch.float64)
    inner = ((v - x)[:, None, :] * (eye[None] - x[:, None, :])).sum(-1)
    assert (inner <= 1e-9 * max(1.0, scale)).all()
    # points already on the simplex are fixed points
    torch.testing.assert_close(project_simplex(x), x, rtol=0, atol=1e-12)


def test_project_simplex_mask():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g) < 0.5
    mask[:, 0] = True
    x = project_simplex(v, mask)
    assert (x[~mask] == 0).all()
    torch.testing.assert_close(x.sum(1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
    for i in range(6):
        sub = v[i, mask[i]][None]
        torch.testing.assert_close(x[i, mask[i]], _project_reference(sub)[0], rtol=0, atol=1e-9)


def test_kmeans_bank_unit_norm_and_recovers_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    labels = torch.arange(30) % 3
    P = centres[labels] + 0.01 * torch.randn(30, 4, 7, generator=g, dtype=torch.float64)
    bank, got = kmeans_bank(P, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        bank.flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12
    )
    # same partition up to relabelling
    for c in range(3):
        assert got[labels == c].unique().numel() == 1
    assert got.unique().numel() == 3


def test_ls_codes_exact_for_mixtures():
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(5, 3, 11, generator=g, dtype=torch.float64)
    c = torch.randn(8, 5, generator=g, dtype=torch.float64)
    X = torch.einsum("nm,mrd->nrd", c, bank)
    torch.testing.assert_close(ls_codes(X, bank, ridge=0.0), c, rtol=0, atol=1e-9)


def test_sparsify_keeps_simplex_and_temperature_widens_support():
    g = torch.Generator().manual_seed(3)
    q = project_simplex(torch.randn(40, 12, generator=g, dtype=torch.float64) * 0.3)
    raw = torch.randn(40, 12, generator=g, dtype=torch.float64)
    sizes = []
    for T in (0.2, 1.0, 5.0):
        for kind in ("entmax15", "sparsemax", "entmax_bisect"):
            a, support, frac = sparsify(q, T, sparsity=kind, eps=1e-3, scores=raw)
            torch.testing.assert_close(a.sum(1), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-12)
            assert (a >= 0).all() and torch.equal(support, (a > 0).sum(1).int())
            assert 0 <= frac <= 1
        sizes.append(float(support.double().mean()))
    assert sizes[0] <= sizes[1] <= sizes[2] and sizes[0] < sizes[2]
    a, support, _ = sparsify(q, 1.0, sparsity="topk", top_k=2, eps=1e-3)
    assert int(support.max()) <= 2
    torch.testing.assert_close(a.sum(1), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-12)


def test_fit_adapters_matches_normal_equations():
    g = torch.Generator().manual_seed(4)
    Z = torch.randn(5, 9, 13, generator=g, dtype=torch.float64)
    Bt = torch.randn(5, 4, 13, generator=g, dtype=torch.float64)
    A, fallbacks, G = fit_adapters(Z, Bt, 0.0)
    assert fallbacks == 0
    ref = torch.linalg.lstsq(Bt.transpose(1, 2), Z.transpose(1, 2)).solution.transpose(1, 2)
    torch.testing.assert_close(A, ref, rtol=0, atol=1e-9)


def test_subspace_bank_recovers_row_spaces_in_any_frame():
    # three clusters of experts sharing a row space, each expert in its own random frame (GL(r) mix)
    g = torch.Generator().manual_seed(5)
    r, d = 3, 10
    bases = torch.linalg.qr(torch.randn(3, d, r, generator=g, dtype=torch.float64))[0].transpose(1, 2)
    labels = torch.arange(24) % 3
    mix = torch.randn(24, r, r, generator=g, dtype=torch.float64)
    X = mix @ bases[labels] + 1e-6 * torch.randn(24, r, d, generator=g, dtype=torch.float64)
    bank, got, sim = subspace_bank(X, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        bank.flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12
    )
    for c in range(3):
        assert got[labels == c].unique().numel() == 1
    assert got.unique().numel() == 3
    # each expert lies in its atom's row space: similarity r (up to the tiny perturbation)
    assert (sim.gather(1, got[:, None]) > r - 1e-6).all()
