"""Per-family z-score: statistics and the exact fold-back into the adapters (float64, tol 1e-12)."""

import torch
from globe.normalize import fit_normalization


def _experts(seed: int, N=7, p=5, d=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(p, 1, generator=g, dtype=dtype) * 3 + 0.1  # rows of very different scales
    return torch.randn(N, p, d, generator=g, dtype=dtype) * rows + torch.randn(p, d, generator=g, dtype=dtype)


def test_statistics_match_definition():
    W = _experts(0)
    norm = fit_normalization(W, center=True)
    M = W.mean(0)
    s = (W - M).pow(2).mean(dim=(0, 2)).sqrt()
    torch.testing.assert_close(norm.mean, M, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.scale, s, rtol=0, atol=1e-12)
    Z = norm.apply(W)
    # z-scored: zero mean over experts, unit mean square per row
    assert Z.mean(0).abs().max() < 1e-12
    torch.testing.assert_close(
        Z.pow(2).mean(dim=(0, 2)), torch.ones(W.shape[1], dtype=W.dtype), rtol=0, atol=1e-12
    )


def test_round_trip_and_fold_back_exact():
    W = _experts(1)
    for center in (True, False):
        norm = fit_normalization(W, center=center)
        Z = norm.apply(W)
        torch.testing.assert_close(norm.invert(Z), W, rtol=0, atol=1e-12)
        # any factorisation Z ~= A B folds back: (diag(s) A) B + M == invert(A B)
        g = torch.Generator().manual_seed(2)
        A = torch.randn(W.shape[0], W.shape[1], 3, generator=g, dtype=W.dtype)
        B = torch.randn(W.shape[0], 3, W.shape[2], generator=g, dtype=W.dtype)
        folded = norm.fold_adapters(A) @ B + (norm.mean if center else 0)
        torch.testing.assert_close(folded, norm.invert(A @ B), rtol=0, atol=1e-12)
        if not center:
            assert norm.mean.abs().max() == 0


def test_constant_row_gets_unit_scale():
    W = _experts(3)
    W[:, 2, :] = 4.0  # identical in every expert and column
    norm = fit_normalization(W, center=True)
    assert norm.scale[2] == 1.0
    torch.testing.assert_close(norm.invert(norm.apply(W)), W, rtol=0, atol=1e-12)
