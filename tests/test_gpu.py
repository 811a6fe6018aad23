"""Every op on a real CUDA device, each compiled backend against the float64 torch reference.

Skipped without CUDA (and under the Triton interpreter, which the CPU suite covers). `bench/gpu.sh` runs this
file on a GPU machine together with the benchmarks.
"""

from __future__ import annotations

import os

import pytest
import torch

from globe_kernels import ops, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="interpreter run"),
]

# tolerance on max |err| / max |ref|: fp32 dots may run in TF32 on tensor cores (10-bit mantissa), half
# types round inputs to 8 (bf16) or 11 (fp16) bits
TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _codes(n: int, m: int, k: int, gen: torch.Generator) -> ops.SparseCodes:
    idx = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)]).to(torch.int32)
    val = torch.rand(n, k, generator=gen) + 0.05
    val = val / val.sum(1, keepdim=True)
    if k > 1:
        idx[0, -1] = -1  # a padded slot
        val[0, -1] = 0.0
    return ops.SparseCodes(idx, val)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("phi", ["identity", "silu"])
@pytest.mark.parametrize("n,m,k,r,d", [(5, 7, 1, 37, 129), (64, 32, 4, 96, 512)])
@pytest.mark.parametrize("path", ["kernel", "dense"])
def test_compose_cuda(dtype, phi, n, m, k, r, d, path, monkeypatch):
    monkeypatch.setenv("GLOBE_COMPOSE_DENSE", "1" if path == "dense" else "0")
    gen = torch.Generator().manual_seed(n * 1000 + r)
    bank = torch.randn(m, r, d, generator=gen)
    codes = _codes(n, m, k, gen)
    ref = reference.compose(bank.double(), ops.SparseCodes(codes.indices, codes.values.double()), phi=phi)
    with ops.use_backend("triton", "compose"):
        cuda_codes = ops.SparseCodes(codes.indices.cuda(), codes.values.cuda())
        out = ops.compose(bank.to("cuda", dtype), cuda_codes, phi=phi)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert _rel(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(1, 5), (97, 1031)])
def test_prune_renorm_cuda(dtype, n, m):
    gen = torch.Generator().manual_seed(m)
    alpha = torch.rand(n, m, generator=gen) ** 4
    alpha = alpha / alpha.sum(1, keepdim=True)
    eps = 0.5 / m
    alpha = alpha.to(dtype)  # the reference sees the rounded input, so both draw the eps line alike
    ref, ref_support = reference.prune_renorm(alpha.double(), eps)
    with ops.use_backend("triton", "prune_renorm"):
        out, support = ops.prune_renorm(alpha.cuda(), eps)
    assert torch.equal(support.cpu(), ref_support)
    assert _rel(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["precomposed", "bank"])
@pytest.mark.parametrize("tokens_per_expert", [[0, 1, 0, 17, 3], [40, 0, 130, 1, 64]])
def test_adapter_gemm_cuda(dtype, mode, tokens_per_expert):
    gen = torch.Generator().manual_seed(sum(tokens_per_expert))
    n, m, k, p, r, d = len(tokens_per_expert), 7, 3, 45, 37, 129
    counts = torch.tensor(tokens_per_expert)
    offsets = torch.zeros(n + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    T = int(counts.sum())
    x = torch.randn(T, d, generator=gen)
    A_g, A_u = torch.randn(n, p, r, generator=gen) / r**0.5, torch.randn(n, p, r, generator=gen) / r**0.5
    bank_g = torch.randn(m, r, d, generator=gen) / d**0.5
    bank_u = torch.randn(m, r, d, generator=gen) / d**0.5
    c_g, c_u = _codes(n, m, k, gen), _codes(n, m, k, gen)
    shift = torch.randn(T, p, generator=gen)
    if mode == "precomposed":
        kw = dict(composed_gate=reference.compose(bank_g, c_g), composed_up=reference.compose(bank_u, c_u))
    else:
        kw = dict(bank_gate=bank_g, codes_gate=c_g, bank_up=bank_u, codes_up=c_u)
    ref = reference.adapter_gemm(
        x.double(), offsets, A_g.double(), A_u.double(), shift_gate=shift.double(),
        **{k_: (v.double() if isinstance(v, torch.Tensor) else ops.SparseCodes(v.indices, v.values.double()))
           for k_, v in kw.items()},
    )

    def cuda(v):
        if isinstance(v, ops.SparseCodes):
            return ops.SparseCodes(v.indices.cuda(), v.values.cuda())
        return v.to("cuda", dtype)

    with ops.use_backend("triton", "adapter_gemm"):
        out = ops.adapter_gemm(
            cuda(x), offsets.cuda(), cuda(A_g), cuda(A_u), shift_gate=cuda(shift),
            **{k_: cuda(v) for k_, v in kw.items()},
        )
    torch.cuda.synchronize()
    assert out.shape == (T, p)
    if T:
        assert _rel(out.cpu(), ref) < TOL[dtype] * 3  # two chained products


@pytest.mark.parametrize("n,p,r", [(1, 3, 1), (97, 45, 37), (512, 128, 64)])
def test_cholesky_cuda(n, p, r):
    gen = torch.Generator().manual_seed(n + r)
    X = torch.randn(n, r, 2 * r + 3, generator=gen, dtype=torch.float64)
    G = X @ X.transpose(1, 2)
    R = torch.randn(n, p, r, generator=gen, dtype=torch.float64)
    ref, _ = reference.cholesky_solve_batched(G, R, 1e-3)
    A, n_fallback = ops.cholesky_solve_batched(G.float().cuda(), R.float().cuda(), 1e-3)
    assert n_fallback == 0
    err = (A.cpu().double() - ref).norm() / ref.norm()
    assert err < 1e-3


def test_weight_aware_solvers_agree_on_the_device():
    # the matrix-free weight-aware steps (candidate quadratics, CG bank solve, the device's composition) against
    # the dense ones, on CUDA tensors throughout; float64 so that the difference is the solvers', not TF32's
    from globe import GlobeConfig, fit_bank
    from test_am import planted

    r, m = 6, 16
    W = planted(N=48, p=17, d=40, r=r, m=m, support=2, noise=0.1, seed=5)[0].double()
    cfg = dict(r=r, m=m, target_support=2, weight_aware=True, center=False, steps=6, patience=100,
               val_fraction=0.0, dtype="float64", device="cuda")
    dense = fit_bank(W, GlobeConfig(**cfg, weight_aware_solver="dense"))
    free = fit_bank(W, GlobeConfig(**cfg, weight_aware_solver="cg"))
    assert free.bank.is_cuda and free.history[-1]["weight_aware_solver"] == "cg"
    e_dense, e_free = dense.metrics["rel_error_all"], free.metrics["rel_error_all"]
    assert abs(e_free - e_dense) <= 0.03 * e_dense, (e_free, e_dense)


@pytest.mark.parametrize("method", ["varpro_gn", "varpro"])
def test_chunked_refinement_on_the_device(method):
    # the refinement in chunks of experts against all at once, on CUDA tensors throughout (float64: the
    # difference is the chunking's, not TF32's), with a fitted mean and held-out experts in several chunks
    import math

    from globe.refine import linear_warm_start, refine
    from test_refine import planted

    W = planted(N=30, seed=4, noise=0.1)[0] + 0.5
    Wt, Wv = W[:23].cuda(), W[23:].cuda()
    M = Wt.mean(0)
    bank, alpha, A = linear_warm_start(Wt - M, 3, 4, 2, iters=0, generator=torch.Generator().manual_seed(1))
    kw = dict(method=method, steps=3 if method == "varpro_gn" else 12, mean=M, fit_mean=True, val_W=Wv,
              eval_every=1 if method == "varpro_gn" else 4, patience=10)
    full = refine(Wt, bank, alpha, A, "tanh", **kw)
    for cache in (True, False):
        part = refine(Wt, bank, alpha, A, "tanh", chunk_experts=5, cache_factors=cache, **kw)
        assert part.bank.is_cuda
        for a, b in zip(full.history, part.history):
            assert math.isclose(a["rel_error"], b["rel_error"], rel_tol=1e-6)
        torch.testing.assert_close(part.bank, full.bank, rtol=1e-5, atol=1e-5 * float(full.bank.abs().max()))
