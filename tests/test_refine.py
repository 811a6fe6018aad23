"""Tests of globe.refine: the nonlinear refinement after the linear AM.

Tolerances: gradients are checked in float64 by finite differences (gradcheck's defaults, eps 1e-6,
atol 1e-5, rtol 1e-3); reconstructions compared in float64 to 1e-6 relative where the algorithm promises a
fixed point, to 1e-3 relative where it promises only a converged objective.
"""

from __future__ import annotations

import math

import pytest
import torch
from globe.refine import (
    _Adam,
    _adapter_solve,
    _bank_system,
    _block_inverse,
    _cg,
    auto_method,
    fit_frozen,
    linear_warm_start,
    objective,
    objective_grads,
    refine,
    refine_fit,
    sparse_simplex_projection,
)

from globe_kernels import ops, reference
from globe_kernels.reference import SparseCodes, apply_phi

PHIS = ("identity", "tanh", "silu")


def planted(N=10, p=7, r=3, d=11, m=4, k=2, noise=0.05, seed=0, phi="identity", dtype=torch.float64):
    """Experts W_i = A_i φ(Σ_j α_ij B_j) + noise with k-sparse simplex codes (odd sizes on purpose)."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(m, r, d, generator=g, dtype=dtype)
    alpha = torch.zeros(N, m, dtype=dtype)
    for i in range(N):
        idx = torch.randperm(m, generator=g)[:k]
        w = torch.rand(k, generator=g, dtype=dtype) + 0.2
        alpha[i, idx] = w / w.sum()
    A = torch.randn(N, p, r, generator=g, dtype=dtype)
    W = A @ apply_phi(ops.compose(bank, alpha), phi)
    W = W + noise * W.std() * torch.randn(W.shape, generator=g, dtype=dtype)
    return W, bank, alpha, A


def rel(W, A, bank, alpha, phi, mean=None):
    R = A @ ops.compose(bank, alpha, phi)
    if mean is not None:
        R = R + mean
    return float((W - R).norm() / W.norm())


@pytest.mark.parametrize("phi", PHIS)
def test_compose_autograd_gradcheck(phi):
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, a: ops.compose(b, a, phi), (bank, alpha))
    idx = torch.tensor([[0, 2], [1, -1], [2, 0], [1, 1]], dtype=torch.int32)  # padding and a duplicate
    vals = torch.rand(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, v: ops.compose(b, SparseCodes(idx, v), phi), (bank, vals))


@pytest.mark.parametrize("phi", PHIS)
def test_objective_gradcheck(phi):
    W, bank, alpha, A = planted(N=3, p=4, r=2, d=5, m=3, seed=2)
    args = tuple(t.clone().requires_grad_(True) for t in (A, bank * 0.5, alpha))
    assert torch.autograd.gradcheck(lambda a, b, c: objective(W, a, b, c, phi), args)


@pytest.mark.parametrize("phi", PHIS)
@pytest.mark.parametrize("mean_mode", ["none", "fixed", "fitted"])
def test_objective_grads_match_autograd(phi, mean_mode):
    """The Adam step's written-out gradients against autograd through objective (float64, 1e-10 relative), with
    the mean term absent, fixed, or refitted first (then the gradients are those at the refitted mean)."""
    W, bank, alpha, A = planted(N=6, p=5, r=3, d=7, m=4, seed=11)
    g = torch.Generator().manual_seed(12)
    mean = None if mean_mode == "none" else 0.3 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    bank = bank * 0.6
    gA, gB, ga, new_mean = objective_grads(W, A, bank, alpha, phi, mean=mean, fit_mean=mean_mode == "fitted",
                                           scale=0.37)
    if mean_mode == "fitted":
        torch.testing.assert_close(new_mean, (W - A @ ops.compose(bank, alpha, phi)).mean(0), rtol=1e-10,
                                   atol=1e-12)
        assert not torch.allclose(new_mean, mean)
    else:
        assert new_mean is mean
    args = [t.clone().requires_grad_(True) for t in (A, bank, alpha)]
    Z = W if new_mean is None else W - new_mean
    auto = torch.autograd.grad(0.37 * objective(Z, *args, phi), args)
    for got, want in zip((gA, gB, ga), auto):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("phi", PHIS)
def test_bank_gradient_and_gauss_newton_product(phi):
    """The hand-written gradient and JᵀJ product of the bank step against autograd (float64)."""
    W, bank, alpha, A = planted(N=5, p=4, r=3, d=6, m=3, seed=3)
    bank = bank * 0.7
    grad, gn, _, _ = _bank_system(W, A, bank, alpha, phi)
    b = bank.clone().requires_grad_(True)
    auto = torch.autograd.grad(objective(W, A, b, alpha, phi), b)[0]
    torch.testing.assert_close(grad, auto, rtol=1e-10, atol=1e-10)
    V = torch.randn(bank.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def residual(bb):  # the pure-torch compose: torch.func transforms do not see through custom ops
        return (A @ reference.compose(bb, alpha, phi)).reshape(-1)

    _, Jv = torch.func.jvp(residual, (bank,), (V,))
    _, vjp = torch.func.vjp(residual, bank)
    torch.testing.assert_close(gn(V), 2 * vjp(Jv)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("phi", PHIS)
def test_preconditioned_cg_solves_the_damped_variable_projection_system(phi):
    """The bank step's linear system (JᵀJ + λD) δ = -g with the Kaufman product: CG preconditioned with the
    atoms' blocks against a dense float64 solve of the same operator written out column by column; and the
    preconditioner is the inverse of the damped blocks (odd sizes)."""
    W, bank, alpha, A = planted(N=7, p=5, r=3, d=7, m=4, seed=21)
    grad, gn, H, D = _bank_system(W, A, bank * 0.6, alpha, phi, 1e-6)
    lam = 0.05
    n = bank.numel()
    cols = [gn(e.reshape(bank.shape)).reshape(-1) for e in torch.eye(n, dtype=torch.float64)]
    M = torch.stack(cols, 1) + torch.diag((lam * D)[:, None, None].expand(bank.shape).reshape(-1))
    torch.testing.assert_close(M, M.T, rtol=1e-9, atol=1e-12)  # JᵀJ is symmetric
    want = torch.linalg.solve(M, -grad.reshape(-1)).reshape(bank.shape)
    pre = _block_inverse(H, D, lam)
    got = _cg(lambda V: gn(V) + (lam * D)[:, None, None] * V, -grad, 200, 1e-13, pre)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    V = torch.randn(bank.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    blocks = H + ((lam + 1e-7) * D)[:, None, None] * eye
    torch.testing.assert_close(blocks @ pre(V), V, rtol=1e-9, atol=1e-9)


def test_varpro_gn_beats_first_order_per_step_on_ill_conditioned_adapters():
    """Adapters with a steep singular spectrum (what makes first-order bank steps slow): a few varpro_gn
    iterations go further than many more varpro steps from the same start (15 against 200; in CPU time too on
    the benchmark's shapes, see bench/bench_refine.py --compare), and return exact adapters."""
    g = torch.Generator().manual_seed(23)
    N, p, r, d, m = 12, 9, 5, 13, 4
    bank = torch.randn(m, r, d, generator=g, dtype=torch.float64)
    alpha = torch.rand(N, m, generator=g, dtype=torch.float64)
    alpha = alpha / alpha.sum(1, keepdim=True)
    A = torch.randn(N, p, r, generator=g, dtype=torch.float64) * torch.logspace(0, -2, r, dtype=torch.float64)
    W = A @ ops.compose(bank, alpha) + 1e-6 * torch.randn(N, p, d, generator=g, dtype=torch.float64)
    bank0 = bank + 0.3 * torch.randn(m, r, d, generator=g, dtype=torch.float64)
    A0 = _adapter_solve(W, ops.compose(bank0, alpha), 1e-6)
    gn = refine(W, bank0, alpha, A0, "identity", method="varpro_gn", steps=15, patience=100, kmax=m, cg_iters=20)
    fo = refine(W, bank0, alpha, A0, "identity", method="varpro", steps=200, eval_every=20, patience=100,
                kmax=m, lr=0.05)
    assert gn.rel_error < 0.5 * fo.rel_error < 0.5 * gn.rel_error_start
    # the default CG of 10 products solves each step less exactly (on this tiny bank of 260 numbers), and is
    # still ahead of 200 first-order steps
    short = refine(W, bank0, alpha, A0, "identity", method="varpro_gn", steps=15, patience=100, kmax=m)
    assert gn.rel_error <= short.rel_error < 0.8 * fo.rel_error
    errs = [h["rel_error"] for h in gn.history]
    assert errs[-1] < errs[0]
    exact = _adapter_solve(W, ops.compose(gn.bank, gn.alpha), 1e-6)
    torch.testing.assert_close(gn.A, exact, rtol=1e-8, atol=1e-10)
    # "auto" takes varpro_gn here (κ = 1e4 ... 1e5 from the spectrum above) and says so in the result and records
    au = refine(W, bank0, alpha, A0, "identity", method="auto", steps=3, patience=100, kmax=m)
    assert au.method == "varpro_gn" and {h["method"] for h in au.history} == {"varpro_gn"}


def test_written_out_adam_matches_torch_adam():
    """The refinement's in-place Adam against torch.optim.Adam: same iterates (float64) over 7 steps of random
    gradients, two tensors at different learning rates."""
    g = torch.Generator().manual_seed(41)
    xs = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    ref = [x.clone().requires_grad_(True) for x in xs]
    ours = _Adam([(xs[0], 0.03), (xs[1], 0.2)])
    theirs = torch.optim.Adam([{"params": [ref[0]], "lr": 0.03}, {"params": [ref[1]], "lr": 0.2}])
    for _ in range(7):
        grads = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs]
        ours.step(grads)
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        theirs.step()
    for x, r in zip(xs, ref):
        torch.testing.assert_close(x, r.detach(), rtol=1e-12, atol=1e-14)


def test_sparse_simplex_projection():
    v = torch.tensor([[0.5, 0.4, -0.1, 0.3], [2.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.25]], dtype=torch.float64)
    out = sparse_simplex_projection(v, 2)
    torch.testing.assert_close(out.sum(1), torch.ones(3, dtype=torch.float64))
    assert int((out > 0).sum(1).max()) <= 2 and bool((out >= 0).all())
    torch.testing.assert_close(out[0], torch.tensor([0.55, 0.45, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(out[1], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize(("phi", "method"), [(phi, "gn") for phi in PHIS] + [("silu", "adam"), ("identity", "varpro"),
                                                                             ("tanh", "varpro"),
                                                                             ("identity", "varpro_gn"),
                                                                             ("silu", "varpro_gn")])
def test_refine_never_increases_validation_error(phi, method):
    W, _, _, _ = planted(N=14, seed=5, phi=phi, noise=0.1)
    Wt, Wv = W[:11], W[11:]
    bank, alpha, A = linear_warm_start(Wt, 3, 4, 2, iters=0, generator=torch.Generator().manual_seed(0))
    second_order = method in ("gn", "varpro_gn")
    res = refine(Wt, bank, alpha, A, phi, method=method, steps=3 if second_order else 40, val_W=Wv,
                 eval_every=1 if second_order else 20, patience=3, qp_iters=30)
    assert res.rel_error_val <= res.rel_error_val_start
    # the reported validation error is that of the returned held-out factors with the returned bank
    assert math.isclose(rel(Wv, res.val_A, res.bank, res.val_alpha, phi), res.rel_error_val, rel_tol=1e-9)
    for a in (res.alpha, res.val_alpha):
        torch.testing.assert_close(a.sum(1), torch.ones(a.shape[0], dtype=a.dtype))
        assert bool((a >= 0).all()) and int((a > 0).sum(1).max()) <= 2
    # with no validation set the training error is the criterion and cannot go up either
    res2 = refine(Wt, bank, alpha, A, phi, method=method, steps=2 if second_order else 20, qp_iters=30)
    assert res2.rel_error <= res2.rel_error_start + 1e-12


@pytest.mark.parametrize("phi", ["tanh", "silu"])
def test_gauss_newton_training_objective_monotone(phi):
    W, _, _, _ = planted(N=10, seed=6, phi=phi, noise=0.1)
    bank, alpha, A = linear_warm_start(W, 3, 4, 2, iters=0, generator=torch.Generator().manual_seed(1))
    res = refine(W, bank, alpha, A, phi, steps=5, patience=100, qp_iters=30)
    errs = [h["rel_error"] for h in res.history]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < errs[0]


def test_identity_fixed_point_at_exact_solution():
    """Noise-free planted data started at the truth: nothing may move (within float64 round-off)."""
    W, bank, alpha, A = planted(N=9, seed=7, noise=0.0)
    res = refine(W, bank, alpha, A, "identity", steps=5, patience=10)
    ref = A @ ops.compose(bank, alpha)
    out = res.A @ ops.compose(res.bank, res.alpha)
    assert float((out - ref).norm() / ref.norm()) < 1e-6
    assert res.rel_error < 1e-6


def test_identity_leaves_converged_am_solution_unchanged():
    """Converge the identity fit (fixed supports, exact block steps), then refine again: nothing moves."""
    W, bank, alpha, A = planted(N=8, seed=8, noise=0.1)
    conv = refine(W, bank, alpha, A, "identity", steps=40, patience=3, support_reselect=False,
                  min_improvement=1e-9, qp_iters=30)
    first = conv.A @ ops.compose(conv.bank, conv.alpha)
    res = refine(W, conv.bank, conv.alpha, conv.A, "identity", steps=4, patience=10, qp_iters=30)
    second = res.A @ ops.compose(res.bank, res.alpha)
    assert float((second - first).norm() / first.norm()) < 1e-3
    assert res.rel_error <= res.rel_error_start + 1e-12
    assert res.rel_error_start - res.rel_error < 1e-4


@pytest.mark.parametrize("center", [False, True])
def test_varpro_returns_exact_adapters_and_descends(center):
    """Variable projection: the adapters returned are the exact ridge solve for the returned bank and codes,
    the reported error is that of the returned factors (mean included), and on noise-free planted data from
    a rough warm start the error falls well below the start (odd sizes, float64)."""
    W, _, _, _ = planted(N=12, p=7, r=3, d=11, m=4, k=2, seed=13, noise=0.0)
    M = None
    if center:
        W = W + 0.5
        M = W.mean(0)
    bank, alpha, A = linear_warm_start(W if M is None else W - M, 3, 4, 2, iters=0,
                                       generator=torch.Generator().manual_seed(5))
    res = refine(W, bank, alpha, A, "identity", method="varpro", steps=200, eval_every=20, patience=100,
                 lr=0.05, mean=M, fit_mean=center)
    assert res.rel_error < 0.5 * res.rel_error_start
    assert math.isclose(rel(W, res.A, res.bank, res.alpha, "identity", res.mean), res.rel_error, rel_tol=1e-9)
    Z = W if res.mean is None else W - res.mean
    exact = _adapter_solve(Z, ops.compose(res.bank, res.alpha), 1e-6)
    torch.testing.assert_close(res.A, exact, rtol=1e-8, atol=1e-10)
    assert int((res.alpha > 0).sum(1).max()) <= 2
    torch.testing.assert_close(res.alpha.sum(1), torch.ones(12, dtype=torch.float64))


def test_support_reselection_lets_atoms_enter():
    """Codes started on the wrong atoms: with re-selection other atoms enter (and the error drops); without,
    every support stays inside the one it started from. (Here the frozen supports do even better: with one
    atom per expert a rolled code is a relabelled bank, which the bank step undoes.)"""
    W, bank, alpha, A = planted(N=8, m=5, k=1, seed=9, noise=0.0)
    wrong = torch.roll(alpha, 1, dims=1)
    A0 = torch.linalg.lstsq(ops.compose(bank, wrong).transpose(1, 2), W.transpose(1, 2)).solution.transpose(1, 2)
    res = refine(W, bank, wrong, A0, "identity", steps=3, kmax=1, patience=10, qp_iters=30)
    frozen = refine(W, bank, wrong, A0, "identity", steps=3, kmax=1, support_reselect=False, qp_iters=30)
    assert bool(((frozen.alpha > 0) <= (wrong > 0)).all())
    assert bool(((res.alpha > 0) != (wrong > 0)).any())
    assert res.rel_error < 0.5 * res.rel_error_start
    assert frozen.rel_error < frozen.rel_error_start


def test_mean_term_and_refine_fit():
    W, _, _, _ = planted(N=10, seed=10, noise=0.1)
    W = W + 3.0  # a shared offset the mean term must carry
    M = W.mean(0)
    bank, alpha, A = linear_warm_start(W - M, 3, 4, 2, iters=2, generator=torch.Generator().manual_seed(3))
    res = refine(W, bank, alpha, A, "tanh", steps=4, mean=M, fit_mean=True)
    assert res.rel_error <= res.rel_error_start
    assert math.isclose(rel(W, res.A, res.bank, res.alpha, "tanh", res.mean), res.rel_error, rel_tol=1e-9)

    class Norm:
        mean, center = M, True

    class Fit:
        pass

    fit = Fit()
    fit.bank, fit.alpha, fit.A, fit.normalization, fit.val_index = bank, alpha, A, Norm(), [2, 7]
    out = refine_fit(fit, W, "silu", steps=3)
    assert out.alpha.shape == alpha.shape and out.A.shape == A.shape
    torch.testing.assert_close(out.alpha[[2, 7]], out.val_alpha)
    assert out.rel_error_val <= out.rel_error_val_start


def test_fit_frozen_sparsifies_from_uniform():
    W, bank, alpha, _ = planted(N=6, m=5, k=2, seed=11, noise=0.0)
    a, A, F = fit_frozen(W, bank, "identity", 2, iters=10, qp_iters=30)
    assert int((a > 0).sum(1).max()) <= 2
    torch.testing.assert_close(a.sum(1), torch.ones(6, dtype=a.dtype))
    assert float(F.sum().sqrt() / W.norm()) < 0.05


def test_apply_refinement_on_a_trainer_fit():
    from types import SimpleNamespace

    from globe.am import fit_bank
    from globe.config import GlobeConfig
    from globe.refine import apply_refinement

    W = planted(N=12, p=8, r=3, d=20, m=4, seed=12, noise=0.1, dtype=torch.float32)[0] + 0.5
    fit = fit_bank(W, GlobeConfig(r=3, m=3, steps=3, target_support=2, val_fraction=0.2))

    def err(f, phi):
        R = f.A @ ops.compose(f.bank, f.alpha, phi) + f.normalization.mean
        return float((R - W).norm() / W.norm())

    before = err(fit, "identity")
    n_hist = len(fit.history)
    method, kappa = auto_method(fit.A)  # what "auto" (no refine_method given) decides by, from the AM's adapters
    apply_refinement(fit, W, SimpleNamespace(phi="tanh", refine_steps=2, center=True))
    assert fit.phi == "tanh" and len(fit.history) > n_hist and fit.history[-1]["stage"] == "refine"
    assert err(fit, "tanh") <= before + 1e-6
    assert "refine.rel_error" in fit.metrics
    assert fit.metrics["refine.auto_kappa"] == pytest.approx(kappa)
    assert fit.metrics["refine.method"] == method


def test_auto_method_follows_the_adapters_conditioning():
    """Orthonormal adapters (κ = 1) take varpro; adapters with singular values 1 ... 1e-3 (κ = 1e6) take
    varpro_gn; the κ reported is the median over the sampled experts (odd N, more than the sample)."""
    g = torch.Generator().manual_seed(31)
    Q = torch.linalg.qr(torch.randn(67, 9, 5, generator=g, dtype=torch.float64)).Q
    method, kappa = auto_method(Q, sample=16)
    assert method == "varpro" and kappa == pytest.approx(1.0, rel=1e-9)
    steep = Q * torch.logspace(0, -3, 5, dtype=torch.float64)
    method, kappa = auto_method(steep.float(), sample=16)
    assert method == "varpro_gn" and kappa == pytest.approx(1e6, rel=1e-3)


@pytest.mark.parametrize(("phi", "method", "cache"), [("identity", "varpro_gn", True), ("tanh", "varpro_gn", False),
                                                       ("silu", "varpro", True), ("identity", "adam", True),
                                                       ("tanh", "gn", False), ("identity", "gn", True)])
def test_chunked_refinement_matches_all_at_once(phi, method, cache):
    """chunk_experts only changes how the sums over experts are formed: the same iterates (float64, 1e-6 relative on
    the errors and 1e-5 on the factors), here with a fitted mean, held-out experts, chunks of 4 of 13 training
    experts (the last chunk short) and of 5 held-out ones. "gn" takes its code and adapter steps' relative
    ridges over the experts of a chunk (at the default lambda_A its errors then differ by about 1e-4 relative
    after three steps here), so it is compared without the ridge; so do the held-out experts' fits, whose
    errors are compared at 1e-5 (they differ by about 1e-6 here) and their adapters not at all."""
    W, _, _, _ = planted(N=18, seed=21, phi=phi, noise=0.1)
    W = W + 0.5
    Wt, Wv = W[:13], W[13:]
    M = Wt.mean(0)
    bank, alpha, A = linear_warm_start(Wt - M, 3, 4, 2, iters=0, generator=torch.Generator().manual_seed(2))
    second_order = method in ("gn", "varpro_gn")
    kw = dict(method=method, steps=3 if second_order else 12, mean=M, fit_mean=True, val_W=Wv,
              eval_every=1 if second_order else 4, patience=10, qp_iters=30, lambda_A=0.0 if method == "gn" else 1e-6)
    full = refine(Wt, bank, alpha, A, phi, **kw)
    part = refine(Wt, bank, alpha, A, phi, chunk_experts=4, cache_factors=cache, **kw)
    for a, b in zip(full.history, part.history):
        assert math.isclose(a["rel_error"], b["rel_error"], rel_tol=1e-6)
        assert math.isclose(a["rel_error_val"], b["rel_error_val"], rel_tol=1e-5)
    assert len(full.history) == len(part.history) and full.best_step == part.best_step
    assert full.history[-1]["rel_error"] < full.history[0]["rel_error"]  # it moved: the comparison means something
    for x, y in ((full.bank, part.bank), (full.A, part.A), (full.alpha, part.alpha), (full.mean, part.mean)):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    # the returned error is that of the returned factors
    assert math.isclose(rel(Wt, part.A, part.bank, part.alpha, phi, part.mean), part.rel_error, rel_tol=1e-9)


@pytest.mark.parametrize("method", ["varpro_gn", "gn", "varpro", "adam"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_refine_takes_factors_in_any_memory_layout(method, chunk):
    """The AM returns its bank and adapters as transposed views; refining from them directly (as a user of
    fit_bank's result does) takes the same steps as from contiguous copies (it once failed in the bank step's
    in-place sums)."""
    W, _, _, _ = planted(N=9, seed=31, noise=0.1)
    bank, alpha, A = linear_warm_start(W, 3, 4, 2, iters=0, generator=torch.Generator().manual_seed(4))
    bank_t = bank.transpose(1, 2).contiguous().transpose(1, 2)
    A_t = A.transpose(1, 2).contiguous().transpose(1, 2)
    assert not bank_t.is_contiguous() and not A_t.is_contiguous()
    kw = dict(method=method, steps=3, eval_every=1, patience=10, chunk_experts=chunk)
    ref = refine(W, bank, alpha, A, "identity", **kw)
    got = refine(W, bank_t, alpha, A_t, "identity", **kw)
    assert got.history[-1]["rel_error"] < got.history[0]["rel_error"]
    for a, b in zip(ref.history, got.history):
        assert math.isclose(a["rel_error"], b["rel_error"], rel_tol=1e-9)


def test_bank_step_rejects_a_non_finite_step(monkeypatch):
    """A CG solve that overflows (a near-singular Gauss-Newton system) counts as a rejected step: the damping
    grows and the next try is taken, instead of handing a non-finite bank to the adapter solve."""
    import globe.refine as R

    W, _, _, _ = planted(N=9, seed=33, noise=0.1)
    bank, alpha, A = linear_warm_start(W, 3, 4, 2, iters=0, generator=torch.Generator().manual_seed(6))
    real_cg, calls = R._cg, []

    def overflowing_once(*args, **kwargs):
        out = real_cg(*args, **kwargs)
        calls.append(1)
        return torch.full_like(out, float("inf")) if len(calls) == 1 else out

    monkeypatch.setattr(R, "_cg", overflowing_once)
    res = refine(W, bank, alpha, A, "identity", method="varpro_gn", steps=2, eval_every=1, patience=10)
    assert len(calls) >= 3  # the overflowing try, its retry, the second step
    assert all(math.isfinite(h["rel_error"]) for h in res.history)
    assert res.rel_error < res.rel_error_start
    assert bool(torch.isfinite(res.bank).all())
