"""Microbenchmarks of every GloBE op against its torch baseline, with a summary table at the end.

    cd /work/main && PYTHONPATH=python:. python -m pytest bench/bench_ops.py --benchmark-enable \\
        -o python_files='bench_*.py' -q [--bench-size small|full] [--bench-table out.md]

Shapes come from the real models in bench/model_shapes.py (Qwen3-30B-A3B, DeepSeek-V3, Mixtral-8x7B,
OLMoE-1B-7B): one MoE layer of each, one family (gate or up) per op where it matters, with the trainer's
defaults r = min(p, d) / 2, a layer bank of m = n / 4 atoms and support k = 4. ``--bench-size small`` (the
default on CPU, so a CPU run takes a couple of minutes) keeps each model's proportions but divides d and p by
8, keeps at most 32 experts and routes fewer tokens; ``full`` (the default on CUDA) uses the real sizes.

Per op, the GloBE side goes through ``globe_kernels.ops`` (on CUDA the Triton backends, forced with
``use_backend``; on CPU whatever the dispatcher picks, recorded in the table) and the baseline is plain torch
on the same device, timed in the same session right after it:
  compose        dense ``alpha @ bank.view(m, -1)``; on CUDA also a device-to-device copy of the bytes
                 compose moves (the memory-bound ceiling, in GB/s)
  prune_renorm   globe_kernels.reference.prune_renorm
  adapter_gemm   precomposed and bank mode, prefill and decode token counts, against a dense grouped expert
                 GEMM of the uncompressed weights, silu(x W_g^T) * (x W_u^T) per expert, at the same routing:
                 torch's grouped GEMM (torch.nn.functional.grouped_mm / torch._grouped_mm) where it runs,
                 else a loop of one GEMM per expert; the loop is also timed as its own row
  cholesky       torch.linalg.cholesky_ex + torch.cholesky_solve (the reference) on the adapter-refit
                 systems of one layer (G [n, r, r], R [n, p, r])
FLOPs and bytes are counted from the shapes (see each benchmark) and turned into GFLOP/s and GB/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from model_shapes import MODEL_SHAPES

from globe_kernels import ops, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# half precision on CUDA as a served model runs; fp32 on CPU (the reference path)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SUPPORT = 4
ROUNDS = 7 if DEVICE == "cuda" else 5


@dataclass(frozen=True)
class OpShapes:
    """One MoE layer's sizes as the ops see them."""

    model: str
    n: int  # experts in the layer
    d: int  # hidden size
    p: int  # expert width
    r: int  # inner dimension
    m: int  # atoms in the (layer) bank
    k: int  # support per expert
    top_k: int
    prefill: int  # tokens of a prefill batch
    decode: int  # tokens of a decode step


def op_shapes(name: str, size: str) -> OpShapes:
    s = MODEL_SHAPES[name]
    n, d, p = s.num_experts, s.hidden_size, s.expert_dim
    prefill, decode = 2048, 64
    if size == "small":
        n, d, p = min(n, 32), d // 8, p // 8
        prefill, decode = 128, 4
    r = min(p, d) // 2
    m = max(n // 4, 2)
    return OpShapes(name, n, d, p, r, m, min(SUPPORT, m), min(s.top_k, n), prefill, decode)


MODELS = tuple(MODEL_SHAPES)


@pytest.fixture(params=MODELS)
def shapes(request, bench_size) -> OpShapes:
    return op_shapes(request.param, bench_size)


def _gen(seed: int) -> torch.Generator:
    # inputs are drawn on the device itself: at DeepSeek-V3's sizes the dense baseline's weights alone are
    # 7.5 G elements, which take minutes to draw on the host and copy over
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape: int, gen: torch.Generator, scale: float = 1.0, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    out = torch.randn(*shape, generator=gen, device=DEVICE, dtype=dtype)
    return out.mul_(scale) if scale != 1.0 else out


def random_codes(n: int, m: int, k: int, gen: torch.Generator) -> ops.SparseCodes:
    """k distinct atoms per expert (the first k of a random permutation of each row), weights on the simplex."""
    idx = torch.rand(n, m, generator=gen, device=DEVICE).argsort(dim=1)[:, :k].to(torch.int32)
    val = torch.rand(n, k, generator=gen, device=DEVICE) + 0.1
    return ops.SparseCodes(idx, val / val.sum(1, keepdim=True))


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run(benchmark, fn):
    """Time fn (synchronised on CUDA), return the backends the dispatcher used."""

    def timed():
        out = fn()
        sync()
        return out

    ops.reset_counts()
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    return ",".join(sorted({name for per_op in ops.backend_counts().values() for name in per_op}))


def forced(op: str):
    """Force the Triton backend on CUDA; let the dispatcher choose elsewhere."""
    return ops.use_backend("triton", op) if DEVICE == "cuda" else _nothing()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def elt(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


# --- compose ---------------------------------------------------------------------------------------------


def compose_case(s: OpShapes):
    gen = _gen(1)
    bank = randn(s.m, s.r, s.d, gen=gen, scale=1 / math.sqrt(s.d))
    codes = random_codes(s.n, s.m, s.k, gen)
    used = int(torch.unique(codes.indices).numel())
    e = elt(DTYPE)
    moved = (used * s.r * s.d + s.n * s.r * s.d) * e + codes.indices.numel() * 8
    return bank, codes, used, moved


@pytest.mark.parametrize("impl", ["globe", "torch", "copy"])
def test_compose(benchmark, bench_record, shapes, impl):
    s = shapes
    if impl == "copy" and DEVICE != "cuda":
        pytest.skip("the copy ceiling is measured on CUDA only")
    bank, codes, used, moved = compose_case(s)
    case = f"compose {s.model} (n={s.n} m={s.m} k={s.k} r={s.r} d={s.d})"
    flops = 2.0 * s.n * s.k * s.r * s.d
    if impl == "globe":
        with forced("compose"):
            backend = run(benchmark, lambda: ops.compose(bank, codes))
        bench_record(case, "globe", flops=flops, nbytes=moved, backend=backend)
    elif impl == "torch":
        dense = reference.to_dense_codes(codes, s.m).to(DTYPE)
        flat = bank.view(s.m, -1)
        run(benchmark, lambda: (dense @ flat).view(s.n, s.r, s.d))
        nbytes = (s.m * s.r * s.d + s.n * s.m + s.n * s.r * s.d) * elt(DTYPE)
        bench_record(case, "torch", flops=2.0 * s.n * s.m * s.r * s.d, nbytes=nbytes)
    else:
        src = torch.empty(moved // 2 // elt(DTYPE), dtype=DTYPE, device=DEVICE)
        dst = torch.empty_like(src)
        run(benchmark, lambda: dst.copy_(src))
        bench_record(case, "d2d copy", nbytes=2 * src.numel() * elt(DTYPE))


# --- prune_renorm ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["globe", "torch"])
def test_prune_renorm(benchmark, bench_record, shapes, impl):
    s = shapes
    # the trainer prunes the codes of every expert of a family over all layers against the global bank
    s_model = MODEL_SHAPES[s.model]
    layers = s_model.moe_layers if DEVICE == "cuda" else min(s_model.moe_layers, 4)
    n = s.n * layers
    m = max(n // 4, 2)
    gen = _gen(2)
    alpha = torch.softmax(randn(n, m, gen=gen, scale=3.0, dtype=torch.float32), dim=1)
    eps = 1.0 / m
    case = f"prune_renorm {s.model} (n={n} m={m})"
    nbytes = 2 * n * m * 4 + n * 4
    if impl == "globe":
        with forced("prune_renorm"):
            backend = run(benchmark, lambda: ops.prune_renorm(alpha, eps))
        bench_record(case, "globe", nbytes=nbytes, backend=backend)
    else:
        run(benchmark, lambda: reference.prune_renorm(alpha, eps))
        bench_record(case, "torch", nbytes=nbytes)


# --- adapter_gemm ----------------------------------------------------------------------------------------


def routing(s: OpShapes, tokens: int, gen: torch.Generator):
    """x sorted by expert [T * top_k, d] and offsets [n + 1] for `tokens` tokens routed to top_k experts."""
    scores = torch.rand(tokens, s.n, generator=gen, device=DEVICE)
    expert_ids = scores.topk(s.top_k, dim=1).indices.flatten()
    perm, offsets = ops.group_by_expert(expert_ids, s.n)
    x = randn(tokens, s.d, gen=gen)
    x_sorted = x[perm // s.top_k]
    active = int((offsets[1:] > offsets[:-1]).sum())
    return x_sorted, offsets, active


def dense_expert_gemm(x, offsets, W_gate, W_up):
    """The uncompressed baseline: silu(x W_g^T) * (x W_u^T) per expert, tokens grouped by expert."""
    out = torch.empty(x.shape[0], W_gate.shape[1], dtype=x.dtype, device=x.device)
    bounds = offsets.tolist()
    for e in range(W_gate.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            xe = x[lo:hi]
            out[lo:hi] = F.silu(xe @ W_gate[e].T) * (xe @ W_up[e].T)
    return out


def _grouped_mm():
    """torch's grouped GEMM (what transformers' "grouped_mm" experts implementation calls), or None."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def dense_grouped_gemm(x, offsets, W_gate, W_up):
    """The same product through one grouped GEMM per projection: the strongest dense baseline torch offers."""
    gmm = _grouped_mm()
    ends = offsets[1:].to(torch.int32)
    g = gmm(x, W_gate.transpose(1, 2), offs=ends)
    u = gmm(x, W_up.transpose(1, 2), offs=ends)
    return F.silu(g) * u


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("impl", ["precomposed", "bank", "torch", "torch-loop"])
def test_adapter_gemm(benchmark, bench_record, shapes, impl, phase):
    s = shapes
    gen = _gen(3)
    tokens = s.prefill if phase == "prefill" else s.decode
    x, offsets, active = routing(s, tokens, gen)
    T = x.shape[0]
    e = elt(DTYPE)
    case = f"adapter_gemm {phase} {s.model} (T={T} n={s.n} d={s.d} p={s.p} r={s.r})"
    io_bytes = T * s.d * e + T * s.p * e
    if impl.startswith("torch"):
        # "torch": the grouped GEMM where this torch has one for this device and dtype (the baseline of the
        # table), else the per-expert loop; "torch-loop": the loop always (one GEMM launch per active expert)
        scale = 1.0 / math.sqrt(s.d)
        W_gate = randn(s.n, s.p, s.d, gen=gen, scale=scale)
        W_up = randn(s.n, s.p, s.d, gen=gen, scale=scale)
        fn = dense_expert_gemm
        if impl == "torch" and _grouped_mm() is not None:
            try:
                want = dense_expert_gemm(x, offsets, W_gate, W_up).float()
                got = dense_grouped_gemm(x, offsets, W_gate, W_up).float()
                if (got - want).norm() <= 2e-2 * want.norm():
                    fn = dense_grouped_gemm
            except (RuntimeError, NotImplementedError):  # no kernel for this device / dtype / alignment
                pass
        elif impl == "torch-loop" and _grouped_mm() is None:
            pytest.skip("no grouped GEMM in this torch: the baseline is the loop already")
        run(benchmark, lambda: fn(x, offsets, W_gate, W_up))
        label = "torch" if impl == "torch" else "per-expert loop"
        bench_record(case, label, flops=4.0 * T * s.d * s.p, nbytes=2 * active * s.p * s.d * e + io_bytes,
                     backend="" if impl == "torch" else "torch")
        return
    A_gate = randn(s.n, s.p, s.r, gen=gen, scale=1 / math.sqrt(s.r))
    A_up = randn(s.n, s.p, s.r, gen=gen, scale=1 / math.sqrt(s.r))
    bank_g = randn(s.m, s.r, s.d, gen=gen, scale=1 / math.sqrt(s.d))
    bank_u = randn(s.m, s.r, s.d, gen=gen, scale=1 / math.sqrt(s.d))
    codes_g = random_codes(s.n, s.m, s.k, gen)
    codes_u = random_codes(s.n, s.m, s.k, gen)
    flops = 4.0 * T * s.r * (s.d + s.p)
    adapters = 2 * active * s.p * s.r * e
    if impl == "precomposed":
        comp_g = ops.compose(bank_g, codes_g)
        comp_u = ops.compose(bank_u, codes_u)
        with forced("adapter_gemm"):
            backend = run(
                benchmark,
                lambda: ops.adapter_gemm(x, offsets, A_gate, A_up, composed_gate=comp_g, composed_up=comp_u),
            )
        nbytes = 2 * active * s.r * s.d * e + adapters + io_bytes
    else:
        with forced("adapter_gemm"):
            backend = run(
                benchmark,
                lambda: ops.adapter_gemm(
                    x, offsets, A_gate, A_up, bank_gate=bank_g, codes_gate=codes_g, bank_up=bank_u, codes_up=codes_u
                ),
            )
        atoms = int(torch.unique(codes_g.indices).numel()) + int(torch.unique(codes_u.indices).numel())
        nbytes = atoms * s.r * s.d * e + adapters + io_bytes
    bench_record(case, impl, flops=flops, nbytes=nbytes, backend=backend)


# --- cholesky_solve_batched ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["globe", "torch"])
def test_cholesky(benchmark, bench_record, shapes, impl):
    """The adapter refit of one layer: n systems G = B~ B~^T (r x r), R = W B~^T (p x r), fp32."""
    s = shapes
    if DEVICE == "cpu" and s.r > 256:
        pytest.skip("r > 256 takes too long for a CPU run; see bench/bench_cholesky.py")
    gen = _gen(4)
    Bt = randn(s.n, s.r, s.d, gen=gen, scale=1 / math.sqrt(s.d), dtype=torch.float32)
    G = Bt @ Bt.mT
    del Bt
    R = randn(s.n, s.p, s.r, gen=gen, dtype=torch.float32)
    lam = 1e-3
    case = f"cholesky {s.model} (n={s.n} r={s.r} p={s.p}, fp32)"
    flops = s.n * (s.r**3 / 3 + 2.0 * s.p * s.r * s.r)
    nbytes = 4 * s.n * (s.r * s.r + 2 * s.p * s.r)
    if impl == "globe":
        try:
            with ops.use_backend("ext", "cholesky_solve_batched"):
                ops.cholesky_solve_batched(G[:1], R[:1], lam)
        except Exception as exc:  # no extension here, or r beyond the CUDA kernel's limit
            pytest.skip(f"the extension cannot run this case: {exc}")
        with ops.use_backend("ext", "cholesky_solve_batched"):
            backend = run(benchmark, lambda: ops.cholesky_solve_batched(G, R, lam))
        bench_record(case, "globe", flops=flops, nbytes=nbytes, backend=backend)
    else:
        run(benchmark, lambda: reference.cholesky_solve_batched(G, R, lam))
        bench_record(case, "torch", flops=flops, nbytes=nbytes)
