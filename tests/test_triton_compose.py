"""Triton compose under the interpreter (TRITON_INTERPRET=1, CPU tensors) against the float64 reference.

Tolerances, relative to the float64 reference computed from the same (already rounded) inputs:
    fp32 output: atol 2e-6 * scale, rtol 1e-5 (fp32 accumulation of <= 12 terms, polynomial tanh)
    bf16 output: rtol 2**-7, atol 1e-5 * scale: one bf16 ulp, because the interpreter converts fp32 to
                 bf16 by truncation (the GPU rounds to nearest, half an ulp)
    fp16 output: rtol 2**-10, atol 1e-5 * scale
where scale = max |reference| (at least 1e-3).
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
from globe_kernels.reference import SparseCodes  # noqa: E402
from globe_kernels.triton import compose as tc  # noqa: E402

pytestmark = pytest.mark.skipif(
    type(tc._compose_kernel).__name__ != "InterpretedFunction",
    reason="needs TRITON_INTERPRET=1 set before triton was first imported (the kernels run on CPU tensors)",
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
ATOL = {torch.float32: 2e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-3)
    torch.testing.assert_close(
        out.double(), ref, rtol=RTOL[out.dtype], atol=ATOL[out.dtype] * scale, equal_nan=False
    )


def random_codes(gen, n: int, m: int, k: int, pad_frac: float = 0.3) -> SparseCodes:
    """k slots per expert, distinct atoms, positive weights, about pad_frac of the slots set to -1."""
    idx = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)]).to(torch.int32)
    vals = torch.rand(n, k, generator=gen) + 0.05
    pad = torch.rand(n, k, generator=gen) < pad_frac
    pad[:, 0] = False
    idx = idx.masked_fill(pad, -1)
    vals = vals / torch.where(pad, 0.0, vals).sum(1, keepdim=True)
    vals = vals.masked_fill(pad, 123.0)  # a padded slot's value must be ignored
    return SparseCodes(idx, vals)


def double_codes(codes: SparseCodes) -> SparseCodes:
    return SparseCodes(codes.indices, codes.values.double())


@pytest.mark.parametrize("phi", R.PHIS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_compose_matches_reference(dtype, phi, dense):
    gen = torch.Generator().manual_seed(1000 + DTYPES.index(dtype) * 10 + R.PHIS.index(phi))
    m, r, d, n, k = 7, 37, 129, 5, 3
    bank = (torch.randn(m, r, d, generator=gen) * 1.5).to(dtype)
    codes = random_codes(gen, n, m, k)
    alpha = R.to_dense_codes(codes, m) if dense else codes
    out = tc.compose(bank, alpha, phi=phi)
    assert out.dtype == dtype
    ref = R.compose(bank.double(), R.to_dense_codes(double_codes(codes), m), phi=phi)
    assert_matches(out, ref)


@pytest.mark.parametrize("phi", R.PHIS)
def test_many_groups_shared_atoms(phi):
    """n = 37 experts over m = 11 atoms: several groups, the last one partial, heavy atom sharing."""
    gen = torch.Generator().manual_seed(7)
    m, r, d, n, k = 11, 5, 67, 37, 4
    bank = torch.randn(m, r, d, generator=gen)
    codes = random_codes(gen, n, m, k, pad_frac=0.2)
    out = tc.compose(bank, codes, phi=phi)
    ref = R.compose(bank.double(), double_codes(codes), phi=phi)
    assert_matches(out, ref)


def test_k1_padding_duplicates_and_empty_experts():
    gen = torch.Generator().manual_seed(11)
    m, r, d = 6, 3, 41
    bank = torch.randn(m, r, d, generator=gen)
    idx = torch.tensor(
        [
            [2, -1, -1, -1],  # k = 1 support with padding after it
            [-1, 4, -1, 0],  # padding first and in the middle
            [1, 1, 3, -1],  # duplicate index: weights add up
            [-1, -1, -1, -1],  # no atom at all: phi(0) = 0
            [5, 0, 3, 2],
        ],
        dtype=torch.int64,
    )
    vals = torch.rand(5, 4, generator=gen)
    for phi in R.PHIS:
        out = tc.compose(bank, SparseCodes(idx, vals), phi=phi)
        ref = R.compose(bank.double(), SparseCodes(idx, vals.double()), phi=phi)
        assert_matches(out, ref)
        assert torch.equal(out[3], torch.zeros_like(out[3]))
    k1 = SparseCodes(torch.tensor([[4], [0], [4]], dtype=torch.int32), torch.tensor([[1.0], [0.5], [2.0]]))
    torch.testing.assert_close(tc.compose(bank, k1), torch.stack([bank[4], 0.5 * bank[0], 2 * bank[4]]))


@pytest.mark.parametrize(
    "bank_dtype,out_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
    ],
    ids=str,
)
def test_out_dtype(bank_dtype, out_dtype):
    gen = torch.Generator().manual_seed(23)
    m, r, d, n = 9, 4, 33, 6
    bank = torch.randn(m, r, d, generator=gen).to(bank_dtype)
    codes = random_codes(gen, n, m, 5)
    out = tc.compose(bank, codes, phi="silu", out_dtype=out_dtype)
    assert out.dtype == out_dtype
    assert_matches(out, R.compose(bank.double(), double_codes(codes), phi="silu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_output_element_written(dtype):
    """The launcher writes into a NaN-poisoned buffer; a missed element (mask bug) stays NaN."""
    gen = torch.Generator().manual_seed(5)
    m, r, d, n = 5, 7, 300, 13  # L = 2100: tiles of 1024 with a ragged tail; two groups, the last partial
    bank = torch.randn(m, r, d, generator=gen).to(dtype)
    codes = random_codes(gen, n, m, 3)
    out = torch.full((n, r, d), float("nan"), dtype=dtype)
    tc.launch_compose(bank, codes, out, "tanh")
    assert not out.isnan().any()
    assert_matches(out, R.compose(bank.double(), double_codes(codes), phi="tanh"))


def test_group_codes_reads_each_atom_once_per_group():
    """Each group lists every atom of its experts' supports exactly once, with each expert's weight."""
    gen = torch.Generator().manual_seed(3)
    n, m, k, gn = 21, 9, 4, tc.GROUP_N
    codes = random_codes(gen, n, m, k)
    dup = codes.indices.clone()
    dup[0, 1] = dup[0, 0]  # a duplicate index inside one expert
    codes = SparseCodes(dup, codes.values)
    atoms, weights, count, experts = tc.group_codes(codes, m)
    G = atoms.shape[0]
    assert G == -(-n // gn) and weights.shape == (G, atoms.shape[1], gn)
    assert sorted(experts[experts >= 0].tolist()) == list(range(n))
    dense = R.to_dense_codes(codes, m)
    rebuilt = torch.zeros(n, m)
    for g in range(G):
        union = atoms[g, : count[g]].tolist()
        assert len(set(union)) == len(union)  # each atom once
        members = [e for e in experts[g].tolist() if e >= 0]
        expected = set(torch.cat([codes.indices[e][codes.indices[e] >= 0] for e in members]).tolist())
        assert set(union) == expected  # exactly the union of the supports
        for slot, e in enumerate(experts[g].tolist()):
            if e >= 0:
                rebuilt[e, union] = weights[g, : count[g], slot]
            else:
                assert torch.all(weights[g, :, slot] == 0)
    torch.testing.assert_close(rebuilt, dense.float())


def test_dispatcher_forced_triton_on_cpu():
    gen = torch.Generator().manual_seed(17)
    m, r, d, n = 7, 6, 129, 5
    bank = torch.randn(m, r, d, generator=gen)
    codes = random_codes(gen, n, m, 3)
    ops.reset_counts()
    with ops.use_backend("triton", "compose"):
        out_sparse = ops.compose(bank, codes, phi="tanh")
        out_dense = ops.compose(bank, R.to_dense_codes(codes, m), phi="tanh")
    assert ops.backend_counts()["compose"] == {"triton": 2}
    ref = R.compose(bank.double(), double_codes(codes), phi="tanh")
    assert_matches(out_sparse, ref)
    assert_matches(out_dense, ref)


def test_rejects_what_it_does_not_serve():
    bank = torch.randn(3, 2, 4)
    with pytest.raises(TypeError):
        tc.compose(bank.double(), torch.rand(2, 3))
    with pytest.raises(ValueError):
        tc.compose(bank, torch.rand(2, 4))
    with pytest.raises(ValueError):
        tc.compose(bank, torch.rand(2, 3), phi="relu")
    with pytest.raises(ValueError):
        tc.compose(bank, SparseCodes(torch.zeros(2, 2, dtype=torch.int32), torch.zeros(2, 3)))
    assert tc.compose(bank, torch.rand(0, 3)).shape == (0, 2, 4)


def test_autotune_switch(monkeypatch):
    assert not tc.autotune_enabled()  # the interpreter always takes the fixed default config
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("GLOBE_TRITON_AUTOTUNE", "0")
    assert not tc.autotune_enabled()
    monkeypatch.setenv("GLOBE_TRITON_AUTOTUNE", "1")
    assert tc.autotune_enabled()


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 19),
    m=st.integers(1, 10),
    r=st.integers(1, 6),
    d=st.integers(1, 70),
    k=st.integers(0, 10),
    phi=st.sampled_from(R.PHIS),
    seed=st.integers(0, 2**16),
)
def test_shapes_property(n, m, r, d, k, phi, seed):
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(m, r, d, generator=gen)
    idx = torch.randint(-1, m, (n, k), generator=gen, dtype=torch.int32)  # duplicates and padding allowed
    vals = torch.randn(n, k, generator=gen)
    out = tc.compose(bank, SparseCodes(idx, vals), phi=phi)
    assert_matches(out, R.compose(bank.double(), SparseCodes(idx, vals.double()), phi=phi))
