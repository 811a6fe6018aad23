"""Parity of the Triton adapter GEMM (globe_kernels/triton/adapter_gemm.py) with the float64 reference.

Runs the kernels in the Triton interpreter on CPU tensors. Tolerances: the maximum absolute error over every
element, divided by the largest reference magnitude of that output, must stay below

    fp32  2e-5   (fp32 accumulation; the inner product is rounded to fp32)
    fp16  2e-3   (the x-dtype rounding of B~, of the inner product and of the output: a few fp16 ulps)
    bf16  3e-2   (the same roundings at bf16's 8-bit mantissa)

Every buffer the launcher allocates is filled with NaN first, so an element no kernel writes fails the test.
"""

import os

import torch  # noqa: E402  (importing torch does not import triton)

# Before the first import of triton in this process. Not on a CUDA machine: there one pytest process also
# runs tests/test_gpu.py, whose kernels must be compiled, and these interpreter tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from triton.runtime import interpreter as _interp  # noqa: E402

import globe_kernels  # noqa: E402
from globe_kernels import ops, reference  # noqa: E402
from globe_kernels.reference import SparseCodes  # noqa: E402
from globe_kernels.triton import adapter_gemm as agm  # noqa: E402

pytestmark = pytest.mark.skipif(
    not isinstance(agm._adapter_inner_kernel, _interp.InterpretedFunction),
    reason="the Triton interpreter is not active (triton was imported before TRITON_INTERPRET=1 was set)",
)

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}

N, D, R, P, M = 5, 129, 37, 45, 7
COUNTS = [0, 3, 17, 1, 0]  # empty first and last experts, uneven groups, a one-token expert


@pytest.fixture(autouse=True)
def _poison_and_bf16_dot(monkeypatch):
    """NaN-fill every launcher buffer; make the interpreter's tl.dot read bf16 operands as numbers.

    The interpreter stores bf16 as raw uint16 and its dot multiplies those integers; the fix widens bf16
    operands to fp32 (exact), which is what the hardware's bf16 MMA computes with fp32 accumulation.
    """

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(agm, "_empty", nan_empty)
    builder = _interp.interpreter_builder
    orig = builder.create_dot

    def widen(h):
        if h.dtype.scalar == triton.language.bfloat16:
            wide = (h.data.astype(np.uint32) << 16).view(np.float32)
            return _interp.TensorHandle(wide, triton.language.float32)
        return h

    def create_dot(a, b, d, *args):
        return orig(widen(a), widen(b), d, *args)

    monkeypatch.setattr(builder, "create_dot", create_dot)


def _offsets(counts):
    return torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.int32)


def _codes(gen, n, m, k, pad=True, duplicate=False):
    idx = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)]).to(torch.int32)
    val = torch.rand(n, k, generator=gen) + 0.1
    if pad and k > 1:
        idx[1, -1] = -1  # padding slots, whose value must be ignored
        idx[3, 0] = -1
        val[3, 0] = 7.0
    if duplicate and k > 1:
        idx[2, 1] = idx[2, 0]  # duplicate atoms add up
    val = val / torch.where(idx >= 0, val, torch.zeros_like(val)).sum(1, keepdim=True)
    return SparseCodes(idx, val)


def _make(dtype, *, counts=COUNTS, bank=False, k=3, shifts=(True, True), shift_dtype=None, r_up=R, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = sum(counts)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    args = dict(
        x=rnd(T, D, scale=D**-0.5),
        adapter_gate=rnd(N, P, R, scale=R**-0.5),
        adapter_up=rnd(N, P, r_up, scale=r_up**-0.5),
    )
    if bank:
        # atoms of unit-order entries, so tanh and silu are far from linear
        args.update(bank_gate=rnd(M, R, D), bank_up=rnd(M, r_up, D))
        codes = dict(codes_gate=_codes(gen, N, M, k, duplicate=True), codes_up=_codes(gen, N, M, k))
    else:
        args.update(composed_gate=rnd(N, R, D), composed_up=rnd(N, r_up, D))
        codes = {}
    for name, on in zip(("shift_gate", "shift_up"), shifts):
        if on:
            args[name] = rnd(T, P)
    sd = shift_dtype or dtype
    args = {k_: v.to(sd if k_.startswith("shift") else dtype) for k_, v in args.items()}
    return _offsets(counts), args, codes


def _reference64(offsets, args, codes, **kw):
    a64 = {k: v.double() for k, v in args.items()}
    c64 = {k: SparseCodes(c.indices, c.values.double()) for k, c in codes.items()}
    x, ag, au = a64.pop("x"), a64.pop("adapter_gate"), a64.pop("adapter_up")
    return reference.adapter_gemm(x, offsets, ag, au, **a64, **c64, **kw)


def _check(out, ref, dtype, out_dtype=None):
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.dtype == (out_dtype or dtype) and o.shape == r.shape
        scale = r.abs().max().item()
        err = (o.double() - r).abs().max().item()  # NaN anywhere fails this comparison
        assert err <= TOL[dtype] * scale, f"max error {err:.3g} > {TOL[dtype]:.0e} x output scale {scale:.3g}"


def _run(offsets, args, codes, config=None, **kw):
    a = dict(args)
    x = a.pop("x")
    kw.setdefault("act", "silu")
    kw.setdefault("out_dtype", None)
    kw.setdefault("phi", None)
    full = dict(composed_gate=None, composed_up=None, bank_gate=None, codes_gate=None, bank_up=None,
                codes_up=None, shift_gate=None, shift_up=None)
    full.update(a)
    full.update(codes)
    ag, au = full.pop("adapter_gate"), full.pop("adapter_up")
    return agm._launch(x, offsets, ag, au, **full, **kw, config=config)


@pytest.mark.parametrize(
    "dtype,act,shifts,config",
    [
        (torch.float32, "silu", (True, True), "decode"),
        (torch.float32, None, (False, False), "prefill"),
        (torch.bfloat16, "silu", (False, False), None),
        (torch.bfloat16, None, (True, False), "prefill"),
        (torch.float16, "silu", (True, True), None),
        (torch.float16, None, (False, True), None),
    ],
)
def test_precomposed(dtype, act, shifts, config):
    offsets, args, codes = _make(dtype, shifts=shifts, seed=1)
    out = _run(offsets, args, codes, act=act, config=config)
    _check(out, _reference64(offsets, args, codes, act=act), dtype)


@pytest.mark.parametrize(
    "dtype,phi,act,k,config",
    [
        (torch.float32, "identity", "silu", 3, "decode"),
        (torch.float32, "tanh", None, 3, "prefill"),
        (torch.float32, "silu", "silu", 1, None),
        (torch.bfloat16, "tanh", "silu", 3, None),
        (torch.float16, "silu", None, 3, None),
        (torch.bfloat16, "identity", None, 1, "prefill"),
    ],
)
def test_bank_mode(dtype, phi, act, k, config):
    offsets, args, codes = _make(dtype, bank=True, k=k, shifts=(act == "silu", act == "silu"), seed=2)
    out = _run(offsets, args, codes, act=act, phi=phi, config=config)
    _check(out, _reference64(offsets, args, codes, act=act, phi=phi), dtype)


@pytest.mark.parametrize("bank", [False, True])
def test_single_token(bank):
    offsets, args, codes = _make(torch.float32, counts=[0, 0, 1, 0, 0], bank=bank, seed=3)
    out = _run(offsets, args, codes, phi="tanh" if bank else None)
    _check(out, _reference64(offsets, args, codes, phi="tanh" if bank else None), torch.float32)


def test_gate_and_up_ranks_differ():
    offsets, args, codes = _make(torch.float32, bank=True, r_up=20, seed=4)
    out = _run(offsets, args, codes, act=None)
    _check(out, _reference64(offsets, args, codes, act=None), torch.float32)


@pytest.mark.parametrize(
    "out_dtype,shift_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16)]
)
def test_out_and_shift_dtypes(out_dtype, shift_dtype):
    """bf16 compute with an fp32 output / fp32 shifts, and an output dtype the kernel casts to afterwards."""
    offsets, args, codes = _make(torch.bfloat16, shift_dtype=shift_dtype, seed=5)
    out = _run(offsets, args, codes, out_dtype=out_dtype)
    _check(out, _reference64(offsets, args, codes), torch.bfloat16, out_dtype=out_dtype)


def test_through_dispatcher():
    offsets, args, codes = _make(torch.float16, bank=True, seed=6)
    a = dict(args)
    x, ag, au = a.pop("x"), a.pop("adapter_gate"), a.pop("adapter_up")
    ops.reset_counts()
    with globe_kernels.use_backend("triton", "adapter_gemm"):
        out = ops.adapter_gemm(x, offsets, ag, au, **a, **codes, phi="silu")
    assert ops.backend_counts()["adapter_gemm"] == {"triton": 1}
    _check(out, _reference64(offsets, args, codes, phi="silu"), torch.float16)


def test_no_tokens():
    offsets, args, codes = _make(torch.float32, counts=[0] * N, seed=7)
    g, u = _run(offsets, args, codes, act=None)
    assert g.shape == u.shape == (0, P)


@pytest.mark.parametrize("block_t", [16, 64])
def test_tile_map(block_t):
    counts = [0, 5, 0, 70, 16, 17, 0, 1, 0]
    offsets = _offsets(counts)
    T = sum(counts)
    expert, row, n_tiles = agm._tile_map(offsets, T, block_t)
    starts = offsets.tolist()
    want = [(e, starts[e] + s) for e, c in enumerate(counts) for s in range(0, c, block_t)]
    assert n_tiles == expert.numel() == row.numel() >= len(want)
    assert list(zip(expert.tolist(), row.tolist()))[: len(want)] == want
    assert (expert[len(want):] == -1).all()


def test_rejects_bad_inputs():
    offsets, args, codes = _make(torch.float32, counts=[1, 0, 0, 0, 1])
    a = dict(args)
    x, ag, au = a.pop("x"), a.pop("adapter_gate"), a.pop("adapter_up")
    with pytest.raises(ValueError):
        agm.adapter_gemm(x, offsets, ag, au, **a, bank_gate=a["composed_gate"], codes_gate=None)
    with pytest.raises(TypeError):
        agm.adapter_gemm(x.double(), offsets, ag, au, **a)
    with pytest.raises(ValueError):
        agm.adapter_gemm(x, offsets, ag, au, **a, act="gelu")


def test_aot_specs_cover_the_kernels():
    specs = agm.aot_specs()
    names = [s["name"] for s in specs]
    assert len(names) == len(set(names))
    for s in specs:
        assert set(s) >= {"name", "kernel", "signature", "constexprs", "num_warps", "num_stages"}
        assert list(s["signature"]) == s["kernel"].arg_names
        assert {k for k, v in s["signature"].items() if v == "constexpr"} == set(s["constexprs"])
    # every launchable variant: 3 dtypes x 2 configurations x (precomposed + 3 phis) inner kernels
    assert sum(s["kernel"] is agm._adapter_inner_kernel for s in specs) == 3 * 2 * 4
    for dtype in ("fp32", "bf16", "fp16"):
        for phi in ("identity", "tanh", "silu"):
            assert f"adapter_inner_decode_{dtype}_bank_{phi}" in names
