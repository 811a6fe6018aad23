"""Triton prune_renorm under the interpreter (TRITON_INTERPRET=1, CPU tensors) against the float64 reference.

The support (which entries survive) must match exactly. Values, relative to the float64 reference computed
from the same (already rounded) inputs, with per-dtype tolerances:
    fp32: atol 1e-6, rtol 1e-5 (one fp32 division and a sum of <= 1100 terms)
    bf16: rtol 2**-7, atol 1e-6: one bf16 ulp, because the interpreter converts fp32 to bf16 by truncation
          (the GPU rounds to nearest)
    fp16: rtol 2**-10, atol 1e-6
"""

from __future__ import annotations

import os

import torch  # noqa: E402  (importing torch does not import triton)

# Before the first import of triton in this process. Not on a CUDA machine: there one pytest process also
# runs tests/test_gpu.py, whose kernels must be compiled, and these interpreter tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from globe_kernels import ops  # noqa: E402
from globe_kernels import reference as R  # noqa: E402
from globe_kernels.triton import prune_renorm as tp  # noqa: E402

pytestmark = pytest.mark.skipif(
    type(tp._prune_renorm_kernel).__name__ != "InterpretedFunction",
    reason="needs TRITON_INTERPRET=1 set before triton was first imported (the kernels run on CPU tensors)",
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
ATOL = 1e-6
EPS = 1.0 / 64  # exact in every dtype, so the float64 reference draws the same line


def special_rows(gen, n: int, m: int, eps: float) -> torch.Tensor:
    """Random simplex rows with the edge cases in the first rows (needs n >= 7, m >= 3)."""
    a = torch.rand(n, m, generator=gen) ** 3
    a = a * (torch.rand(n, m, generator=gen) < 0.5)  # about half the entries are zero
    a[:, 0] += 0.05
    a = a / a.sum(1, keepdim=True)
    a[0] = 0.0  # all zero: keeps column 0 (the first maximum) with weight 1
    a[1] = eps * 0.5 * torch.rand(m, generator=gen)  # all below eps: keeps its maximum
    a[1, m // 2] = eps * 0.9
    a[2] = eps * 0.25  # all below eps and tied: the first maximum wins
    a[3] = eps * 0.1  # pruned to one entry: the only one at or above eps
    a[3, m - 1] = 0.9
    a[4] = -0.01  # negative entries are never kept, even the rescued row keeps its maximum
    a[4, 1] = -0.001
    a[5, :] = 0.0  # an entry exactly eps survives
    a[5, 0], a[5, m - 1] = eps, 2 * eps
    a[6] = torch.rand(m, generator=gen) * 1e-3  # all tiny and positive
    return a


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n,m",
    [(7, 7), (9, 64), (8, 65), (11, 300), (7, 1100)],
    ids=["m7", "m64-short-edge", "m65-long", "m300-two-blocks", "m1100-five-blocks"],
)
def test_prune_renorm_matches_reference(dtype, n, m):
    gen = torch.Generator().manual_seed(31 * m + DTYPES.index(dtype))
    eps = EPS if m < 300 else 2.0**-12  # long rows: a lower (still exact) threshold keeps several entries
    alpha = special_rows(gen, n, m, eps).to(dtype)
    out, support = tp.prune_renorm(alpha, eps)
    ref, ref_support = R.prune_renorm(alpha.double(), eps)
    assert out.dtype == dtype and support.dtype == torch.int32
    assert torch.equal(support, ref_support)
    assert torch.equal(out != 0, ref != 0)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[dtype], atol=ATOL)
    # the edge rows, spelled out
    assert out[0, 0] == 1 and support[0] == 1
    assert out[1, m // 2] == 1 and support[1] == 1
    assert out[2, 0] == 1 and support[2] == 1
    assert out[3, m - 1] == 1 and support[3] == 1
    assert out[4, 1] == 1 and support[4] == 1
    assert support[5] == 2


def test_every_output_element_written():
    gen = torch.Generator().manual_seed(2)
    n, m = 19, 300  # rows not a multiple of ROWS, columns not a multiple of BLOCK_M
    alpha = special_rows(gen, n, m, EPS)
    out = torch.full((n, m), float("nan"))
    support = torch.full((n,), -7, dtype=torch.int32)
    tp.launch_prune_renorm(alpha, EPS, out, support)
    assert not out.isnan().any() and (support >= 1).all()
    ref, ref_support = R.prune_renorm(alpha.double(), EPS)
    assert torch.equal(support, ref_support)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[torch.float32], atol=ATOL)


def test_strided_input():
    gen = torch.Generator().manual_seed(4)
    base = special_rows(gen, 10, 90, EPS)
    alpha = base[:, 5:75]  # row stride 90, not the row length
    out, support = tp.prune_renorm(alpha, EPS)
    ref, ref_support = R.prune_renorm(alpha.double(), EPS)
    assert torch.equal(support, ref_support)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[torch.float32], atol=ATOL)
    out_t, support_t = tp.prune_renorm(base.t().contiguous().t(), EPS)  # column stride != 1
    ref_t, ref_support_t = R.prune_renorm(base.double(), EPS)
    assert torch.equal(support_t, ref_support_t)
    torch.testing.assert_close(out_t.double(), ref_t, rtol=RTOL[torch.float32], atol=ATOL)


def test_dispatcher_forced_triton_on_cpu():
    gen = torch.Generator().manual_seed(8)
    alpha = special_rows(gen, 9, 13, EPS)
    ops.reset_counts()
    with ops.use_backend("triton", "prune_renorm"):
        out, support = ops.prune_renorm(alpha, EPS)
    assert ops.backend_counts()["prune_renorm"] == {"triton": 1}
    ref, ref_support = R.prune_renorm(alpha.double(), EPS)
    assert torch.equal(support, ref_support)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[torch.float32], atol=ATOL)


def test_rejects_and_empty():
    with pytest.raises(TypeError):
        tp.prune_renorm(torch.rand(3, 4, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError):
        tp.prune_renorm(torch.rand(3), 0.1)
    out, support = tp.prune_renorm(torch.rand(0, 5), 0.1)
    assert out.shape == (0, 5) and support.shape == (0,)


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 130),
    eps=st.sampled_from([0.0, 1e-3, 0.05, 0.3, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_rows_on_simplex(n, m, eps, seed):
    """For any shape and threshold: rows sum to 1, support = nonzeros >= 1, and the reference agrees."""
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.rand(n, m, generator=gen) * (torch.rand(n, m, generator=gen) < 0.6)
    out, support = tp.prune_renorm(alpha, eps)
    torch.testing.assert_close(out.double().sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-5)
    assert torch.equal(support, (out != 0).sum(1).to(torch.int32)) and (support >= 1).all()
    ref, ref_support = R.prune_renorm(alpha.double(), eps)
    assert torch.equal(support, ref_support)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[torch.float32], atol=ATOL)
