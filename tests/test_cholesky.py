"""The compiled batched Cholesky solve (globe_kernels._C through globe_kernels._ext) against float64 maths.

The extension is loaded once per session (installed, or built just in time into the cache: about a minute
the first time on a 2-core machine). These tests skip only when it cannot be built here at all (no C++
compiler or ninja, or GLOBE_NO_JIT=1 without an installed extension).

Inputs are well conditioned by construction (cond(G + lam I) <= ~50), so the tolerances below are fixed
multiples of what the arithmetic gives; errors are measured per system relative to max |A_ref_i|:
    float32: 5e-6   (measured ~4e-7; torch's own float32 path ~7e-7)
    float64: 1e-12  (measured ~2e-15)
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from globe_kernels import _ext, ops, reference

TOL = {torch.float32: 5e-6, torch.float64: 1e-12}
DTYPES = (torch.float32, torch.float64)


@pytest.fixture(scope="module")
def ext():
    try:
        return _ext.load()
    except _ext.ExtensionUnavailable as exc:
        missing = _ext.missing_build_tools()
        if missing:
            pytest.skip(f"globe_kernels._C cannot be built here (no {', '.join(missing)}): {exc}")
        if not _ext.status(load_ext=False)["jit_allowed"]:
            pytest.skip(f"GLOBE_NO_JIT=1 and no installed globe_kernels._C: {exc}")
        raise


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    for name in ("GLOBE_BACKEND", "GLOBE_BACKEND_CHOLESKY_SOLVE_BATCHED"):
        monkeypatch.delenv(name, raising=False)
    ops.reset_counts()


def spd(n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """n SPD matrices B B^T / d with B [r, d], d = 2r + 3: eigenvalues in about [0.09, 2.9]."""
    d = 2 * r + 3
    B = torch.randn(n, r, d, generator=gen, dtype=torch.float64) / d**0.5
    return B @ B.mT


def with_spectrum(eigs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Symmetric matrices Q diag(eigs) Q^T with random orthogonal Q: eigs [n, r] -> [n, r, r]."""
    n, r = eigs.shape
    Q, _ = torch.linalg.qr(torch.randn(n, r, r, generator=gen, dtype=torch.float64))
    return (Q * eigs.unsqueeze(1)) @ Q.mT


def rel_err(A: torch.Tensor, ref: torch.Tensor) -> float:
    if A.numel() == 0:
        return 0.0
    scale = ref.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    return ((A.double() - ref).abs() / scale).max().item()


def check(A: torch.Tensor, n_bad: int, G: torch.Tensor, R: torch.Tensor, lam: float, dtype: torch.dtype) -> None:
    ref, ref_bad = reference.cholesky_solve_batched(G.double(), R.double(), lam)
    assert A.dtype == dtype and A.shape == R.shape
    assert not torch.isnan(A).any()
    assert n_bad == ref_bad
    err = rel_err(A, ref)
    assert err <= TOL[dtype], f"{dtype}: max relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "r", "p"), [(1, 1, 1), (97, 1, 5), (1, 37, 45), (97, 37, 45), (3, 64, 128), (2, 80, 3)])
@pytest.mark.parametrize("lam", [0.0, 0.25])
def test_spd_matches_float64(ext, dtype, n, r, p, lam):
    gen = torch.Generator().manual_seed(1000 * n + 10 * r + p)
    G = spd(n, r, gen).to(dtype)
    R = torch.randn(n, p, r, generator=gen, dtype=torch.float64).to(dtype)
    A, n_bad = _ext.cholesky_solve_batched(G, R, lam)
    assert n_bad == 0
    check(A, n_bad, G, R, lam, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "r", "p"), [(5, 3, 2), (7, 8, 16), (7, 9, 13), (4, 37, 45), (3, 80, 161), (2, 130, 7)])
def test_baseline_isa_path(ext, monkeypatch, dtype, n, r, p):
    """The kernel is compiled for the baseline ISA and, on x86-64, for AVX2+FMA (chosen at run time);
    GLOBE_EXT_ISA=generic forces the baseline build, which must give the same answers."""
    gen = torch.Generator().manual_seed(100 * r + p)
    G = spd(n, r, gen).to(dtype)
    R = torch.randn(n, p, r, generator=gen, dtype=torch.float64).to(dtype)
    monkeypatch.setenv("GLOBE_EXT_ISA", "generic")
    A, n_bad = _ext.cholesky_solve_batched(G, R, 0.1)
    check(A, n_bad, G, R, 0.1, dtype)
    monkeypatch.delenv("GLOBE_EXT_ISA")
    A_auto, _ = _ext.cholesky_solve_batched(G, R, 0.1)
    assert rel_err(A, A_auto.double()) <= TOL[dtype]


def mixed_batch(n: int, r: int, p: int, lam: float, gen: torch.Generator):
    """SPD, indefinite and negative-definite systems mixed; returns (G, R, expected flags) in float64.

    Some systems are indefinite only before the shift (smallest eigenvalue -lam/2): lam I makes them SPD.
    Eigenvalue magnitudes stay in [0.5, 2] (or lam/2 .. 2 for the shifted ones), so every system is well
    conditioned and the flag is unambiguous.
    """
    mags = 0.5 + 1.5 * torch.rand(n, r, generator=gen, dtype=torch.float64)
    kind = torch.arange(n) % 4  # 0: SPD, 1: indefinite, 2: negative definite, 3: SPD only after the shift
    flip = torch.rand(n, r, generator=gen) < 0.5
    flip[:, 0] = True  # at least one negative eigenvalue
    negative = (flip & (kind == 1).unsqueeze(1)) | (kind == 2).unsqueeze(1)
    signs = 1.0 - 2.0 * negative.to(torch.float64)
    eigs = mags * signs
    if lam > 0:
        eigs[kind == 3, 0] = -lam / 2
    G = with_spectrum(eigs, gen)
    R = torch.randn(n, p, r, generator=gen, dtype=torch.float64)
    flagged = (kind == 1) | (kind == 2)
    return G, R, flagged


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "r", "p", "lam"), [(97, 37, 45, 0.1), (13, 1, 4, 0.3), (9, 16, 1, 0.0)])
def test_non_spd_flagged_and_solved(ext, dtype, n, r, p, lam):
    gen = torch.Generator().manual_seed(7 * n + r)
    G, R, flagged = mixed_batch(n, r, p, lam, gen)
    G, R = G.to(dtype), R.to(dtype)
    # the raw op flags exactly the non-SPD systems and leaves them NaN (not computed)
    A_raw, failed = torch.ops.globe_ext.cholesky_solve_batched(G, R, lam)
    assert failed.dtype == torch.bool and torch.equal(failed, flagged)
    assert torch.isnan(A_raw[failed]).all()
    assert not torch.isnan(A_raw[~failed]).any()
    # the wrapper solves them by the general path and counts them
    A, n_bad = _ext.cholesky_solve_batched(G, R, lam)
    assert n_bad == int(flagged.sum()) > 0
    check(A, n_bad, G, R, lam, dtype)
    exact = torch.linalg.solve(G.double() + lam * torch.eye(r, dtype=torch.float64), R.double().mT).mT
    assert rel_err(A, exact) <= TOL[dtype] * 10  # the least-squares path is a little less exact


# The CPU kernel has two paths: r <= 96 runs L systems in lockstep, one per lane of a vector of doubles (AVX2:
# L = 8 up to r = 24, else 4; 2 in the baseline build), factoring in blocks of up to 8 (L = 8: 4) columns; the
# solve is then a GEMM in tiles of 8, 6 or 3 rows and 8 or 16 columns (fp32 AVX2: 8 x 8 up to r = 8, else
# 6 x 16; fp64 AVX2: 8 x 4 up to r = 4, 6 x 8 up to r = 31, 3 x 16 from r = 32; half the columns in the baseline
# build). Larger r factor and solve one system at a time. The sizes below sit at and around each boundary;
# p = r + 3 mostly leaves a partial row tile.
LOCKSTEP_MAX_R = 96
BOUNDARY_R = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 25, 31, 32, 33, 63, 64, 65, 95, 96, 97)


def raw_op_check(G: torch.Tensor, R: torch.Tensor, lam: float, flagged: torch.Tensor, dtype: torch.dtype) -> None:
    """The raw op flags exactly `flagged`, fills those systems with NaN and solves the others to TOL[dtype]."""
    A, failed = torch.ops.globe_ext.cholesky_solve_batched(G.to(dtype), R.to(dtype), lam)
    assert A.dtype == dtype and A.shape == R.shape and failed.dtype == torch.bool
    assert torch.equal(failed, flagged)
    assert torch.isnan(A[failed]).all()
    ok = ~failed
    r = G.shape[1]
    Gd, Rd = G.to(dtype)[ok].double(), R.to(dtype)[ok].double()  # the rounded inputs, solved in float64
    exact = torch.linalg.solve(Gd + lam * torch.eye(r, dtype=torch.float64), Rd.mT).mT
    assert not torch.isnan(A[ok]).any()
    err = rel_err(A[ok], exact)
    assert err <= TOL[dtype], f"{dtype}: max relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("isa", ["auto", "generic"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", BOUNDARY_R)
def test_path_boundaries_with_mixed_lane_groups(ext, monkeypatch, isa, dtype, r):
    """An odd batch (11: full lane groups and a partial one for L = 8, 4 and 2), odd p (a partial row tile),
    SPD systems beside indefinite, negative definite and shifted-to-SPD ones in the same lane group."""
    if isa == "generic":
        monkeypatch.setenv("GLOBE_EXT_ISA", "generic")
    gen = torch.Generator().manual_seed(r)
    lam = 0.1
    n, p = 11, r + 3
    G, R, flagged = mixed_batch(n, r, p, lam, gen)  # systems 1, 2, 5, 6, 9, 10 are not positive definite
    raw_op_check(G, R, lam, flagged, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "r"), [(1, 5), (5, 8), (13, 16), (3, 33), (6, LOCKSTEP_MAX_R)])
@pytest.mark.parametrize("p", [0, 1, 5])
def test_one_bad_system_per_batch(ext, dtype, n, r, p):
    """One indefinite system (the second) among SPD ones: only it is flagged, its lane-mates are solved; with
    p = 0 only the flags come back."""
    gen = torch.Generator().manual_seed(10 * n + r + p)
    eigs = 0.5 + 1.5 * torch.rand(n, r, generator=gen, dtype=torch.float64)
    bad = min(1, n - 1)
    eigs[bad, r // 2] = -1.0
    G = with_spectrum(eigs, gen)
    R = torch.randn(n, p, r, generator=gen, dtype=torch.float64)
    flagged = torch.zeros(n, dtype=torch.bool)
    flagged[bad] = True
    raw_op_check(G, R, 0.0, flagged, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_lane_groups_failing(ext, dtype):
    """Every system of the first lane groups fails (nothing left to solve there), the last ones are SPD."""
    gen = torch.Generator().manual_seed(5)
    n, r, p = 11, 12, 9
    G = spd(n, r, gen)
    G[:8] = -G[:8]
    R = torch.randn(n, p, r, generator=gen, dtype=torch.float64)
    raw_op_check(G, R, 0.05, torch.arange(n) < 8, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [6, 40, 120])
def test_non_finite_entries(ext, dtype, r):
    """NaN or inf in a system's lower triangle flags that system only; in its strict upper triangle (never
    read) it changes nothing."""
    gen = torch.Generator().manual_seed(r)
    n, p = 6, 4
    G = spd(n, r, gen)
    R = torch.randn(n, p, r, generator=gen, dtype=torch.float64)
    G[1, r - 1, r // 2] = float("nan")
    G[2, r // 2, r // 2] = float("inf")
    G[4, r - 1, 0] = float("-inf")
    G[3, 0, r - 1] = float("nan")  # upper triangle: ignored
    flagged = torch.tensor([False, True, True, False, True, False])
    A, failed = torch.ops.globe_ext.cholesky_solve_batched(G.to(dtype), R.to(dtype), 0.1)
    assert torch.equal(failed, flagged)
    assert torch.isnan(A[failed]).all() and not torch.isnan(A[~failed]).any()
    Gl = G.tril() + G.tril(-1).mT  # the symmetric matrix the lower triangle describes
    ok = ~flagged
    Gd, Rd = Gl[ok].to(dtype).double(), R[ok].to(dtype).double()
    exact = torch.linalg.solve(Gd + 0.1 * torch.eye(r, dtype=torch.float64), Rd.mT).mT
    assert rel_err(A[ok], exact) <= TOL[dtype]


def test_non_contiguous_inputs(ext):
    gen = torch.Generator().manual_seed(3)
    G = spd(6, 11, gen).to(torch.float32).mT  # a transposed view: same values (symmetric), other strides
    R = torch.randn(6, 20, 11, generator=gen).to(torch.float32)[:, ::2]
    assert not G.is_contiguous() and not R.is_contiguous()
    A, n_bad = _ext.cholesky_solve_batched(G, R, 0.1)
    check(A, n_bad, G, R, 0.1, torch.float32)


def test_lower_triangle_only(ext):
    """Like the reference (torch.linalg.cholesky), only G's lower triangle is read."""
    gen = torch.Generator().manual_seed(4)
    G = spd(5, 9, gen)
    R = torch.randn(5, 7, 9, generator=gen, dtype=torch.float64)
    junk = G.tril() + torch.randn(5, 9, 9, generator=gen, dtype=torch.float64).triu(1)
    A, _ = _ext.cholesky_solve_batched(junk, R, 0.0)
    A_ref, _ = reference.cholesky_solve_batched(junk, R, 0.0)
    assert rel_err(A, A_ref) <= TOL[torch.float64]


def test_empty_batches(ext):
    for n, r, p in [(0, 5, 3), (4, 5, 0), (3, 0, 2)]:
        G = spd(n, r, torch.Generator().manual_seed(0)) if r else torch.zeros(n, 0, 0, dtype=torch.float64)
        R = torch.randn(n, p, r, dtype=torch.float64)
        A, n_bad = _ext.cholesky_solve_batched(G, R, 0.1)
        assert A.shape == (n, p, r) and n_bad == 0


def test_rejects_what_it_cannot_run(ext):
    G = spd(2, 3, torch.Generator().manual_seed(0))
    R = torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(TypeError):
        _ext.cholesky_solve_batched(G.float(), R, 0.1)
    with pytest.raises(TypeError):
        _ext.cholesky_solve_batched(G.bfloat16(), R.bfloat16(), 0.1)
    with pytest.raises(ValueError, match="R must be"):
        _ext.cholesky_solve_batched(G, R[:, :, :2], 0.1)
    with pytest.raises(ValueError, match="G must be"):
        _ext.cholesky_solve_batched(G[:, :, :2], R, 0.1)
    with pytest.raises(RuntimeError, match="share a dtype"):  # the C++ checks, reached directly
        torch.ops.globe_ext.cholesky_solve_batched(G.float(), R, 0.1)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 7),
    r=st.integers(1, 24),
    p=st.integers(0, 19),
    lam=st.sampled_from([0.0, 0.01, 1.0]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_for_any_shape(ext, n, r, p, lam, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    G = spd(n, r, gen).to(dtype)
    R = torch.randn(n, p, r, generator=gen, dtype=torch.float64).to(dtype)
    A, n_bad = _ext.cholesky_solve_batched(G, R, lam)
    check(A, n_bad, G, R, lam, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_through_the_dispatcher(ext, dtype):
    gen = torch.Generator().manual_seed(11)
    G, R, flagged = mixed_batch(97, 37, 45, 0.1, gen)
    G, R = G.to(dtype), R.to(dtype)
    with ops.use_backend("ext", "cholesky_solve_batched"):
        A, n_bad = ops.cholesky_solve_batched(G, R, 0.1)
    assert n_bad == int(flagged.sum())
    check(A, n_bad, G, R, 0.1, dtype)
    # chosen automatically on CPU too: ext has priority over torch
    A2, n_bad2 = ops.cholesky_solve_batched(G, R, 0.1)
    assert n_bad2 == n_bad and torch.equal(A2[~flagged], A[~flagged])
    assert rel_err(A2, A.double()) <= TOL[dtype]  # LAPACK's least squares need not repeat bit for bit
    assert ops.backend_counts() == {"cholesky_solve_batched": {"ext": 2}}
    row = next(x for x in ops.describe("cpu") if x["op"] == "cholesky_solve_batched" and x["backend"] == "ext")
    assert row["status"] == "ACTIVE"


def test_status(ext):
    st_ = _ext.status()
    assert st_["available"] is True and st_["path"] in ("installed", "jit")
    assert st_["cuda"] == bool(ext.with_cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "r", "p"), [(1, 1, 1), (97, 37, 45), (5, 64, 300), (3, 128, 129)])
def test_cuda_kernel(ext, dtype, n, r, p):
    if not ext.with_cuda:
        pytest.skip("globe_kernels._C was built without its CUDA kernel")
    gen = torch.Generator().manual_seed(r)
    G, R, flagged = mixed_batch(n, r, p, 0.1, gen)
    G, R = G.to(dtype).cuda(), R.to(dtype).cuda()
    if r > _ext.cuda_max_r(dtype):  # too large for this device's shared memory in this dtype: torch's turn
        with pytest.raises(NotImplementedError, match="shared"):
            _ext.cholesky_solve_batched(G, R, 0.1)
        return
    A_raw, failed = torch.ops.globe_ext.cholesky_solve_batched(G, R, 0.1)
    assert torch.equal(failed.cpu(), flagged)
    assert torch.isnan(A_raw[failed]).all() and not torch.isnan(A_raw[~failed]).any()
    A, n_bad = _ext.cholesky_solve_batched(G, R, 0.1)
    check(A.cpu(), n_bad, G.cpu(), R.cpu(), 0.1, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_oversize_raises_in_python_process(ext):
    """The compiled check for a block too large for shared memory raises a RuntimeError naming it.

    Run in a child process: this is the one path where an exception leaves the CUDA binding, and a broken
    exception ABI between the extension and torch would take the whole test run down with it.
    """
    if not ext.with_cuda:
        pytest.skip("globe_kernels._C was built without its CUDA kernel")
    r = ext.cuda_max_r
    if r <= _ext.cuda_max_r(torch.float64):
        pytest.skip(f"r={r} fits this device in float64: nothing to refuse")
    code = (
        "import torch; from globe_kernels import _ext; m = _ext.load()\n"
        "try:\n    torch.ops.globe_ext.cholesky_solve_batched(torch.eye(3)[None], torch.ones(1, 2, 4), 0.1)\n"
        "except RuntimeError:\n    print('CPU-REFUSED', flush=True)\n"
        f"G = torch.eye({r}, dtype=torch.float64, device='cuda').expand(2, {r}, {r}).contiguous()\n"
        f"R = torch.ones(2, 3, {r}, dtype=torch.float64, device='cuda')\n"
        "try:\n    torch.ops.globe_ext.cholesky_solve_batched(G, R, 0.1)\n"
        "except RuntimeError as exc:\n    print('REFUSED', 'shared memory' in str(exc))\n"
    )
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "REFUSED True" in done.stdout, (done.returncode, done.stdout, done.stderr[-2000:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_large_r_falls_back(ext):
    if not ext.with_cuda:
        pytest.skip("globe_kernels._C was built without its CUDA kernel")
    r = ext.cuda_max_r + 1
    G = spd(2, r, torch.Generator().manual_seed(0)).cuda()
    R = torch.randn(2, 3, r, dtype=torch.float64, device="cuda")
    with pytest.raises(NotImplementedError):
        _ext.cholesky_solve_batched(G, R, 0.1)
    A, n_bad = ops.cholesky_solve_batched(G, R, 0.1)  # the dispatcher falls back to torch and counts it
    assert ops.backend_counts()["cholesky_solve_batched"] == {"torch": 1, "ext->fallback": 1}
    check(A.cpu(), n_bad, G.cpu(), R.cpu(), 0.1, torch.float64)
