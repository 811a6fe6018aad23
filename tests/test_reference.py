"""The pure-torch composition (the CPU/MPS fallback and the kernels' reference) against an explicit float64 sum:
both of its paths, the dense product over all atoms and the gather of a few atoms out of many."""

import pytest
import torch

from globe_kernels import reference as R
from globe_kernels.reference import SparseCodes


def explicit(bank: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, phi: str) -> torch.Tensor:
    out = torch.zeros(idx.shape[0], *bank.shape[1:], dtype=torch.float64)
    for i in range(idx.shape[0]):
        for s in range(idx.shape[1]):
            if int(idx[i, s]) >= 0:
                out[i] += float(vals[i, s]) * bank[int(idx[i, s])].double()
    return R.apply_phi(out, phi)


@pytest.mark.parametrize("phi", R.PHIS)
@pytest.mark.parametrize("m,k", [(7, 3), (150, 3), (97, 2), (9, 1), (48, 1)])  # 48k <= m: the gather path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_compose_matches_the_explicit_sum(m, k, phi, dtype):
    gen = torch.Generator().manual_seed(m * 100 + k)
    n, r, d = 11, 5, 13
    bank = torch.randn(m, r, d, generator=gen, dtype=dtype)
    idx = torch.randint(m, (n, k), generator=gen)
    idx[torch.rand(n, k, generator=gen) < 0.3] = -1  # padding slots: their value must be ignored
    idx[3] = -1  # an expert with no atom: phi(0)
    if k > 1:
        idx[5, 1] = idx[5, 0] = 2  # a duplicate index: the weights add up
    vals = torch.rand(n, k, generator=gen, dtype=dtype)
    vals[idx < 0] = 123.0
    out = R.compose(bank, SparseCodes(idx.to(torch.int32), vals), phi)
    assert out.dtype == dtype and out.shape == (n, r, d)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double(), explicit(bank, idx, vals, phi), rtol=tol, atol=tol)
    dense = R.to_dense_codes(SparseCodes(idx, vals), m)
    torch.testing.assert_close(R.compose(bank, dense, phi).double(), explicit(bank, idx, vals, phi), rtol=tol,
                               atol=tol)


def test_compose_rejects_out_of_range_codes():
    bank = torch.randn(100, 2, 3)
    with pytest.raises(ValueError, match=r"code indices must lie in \[0, 100\)"):
        R.compose(bank, SparseCodes(torch.tensor([[100, 1]]), torch.ones(1, 2)))
