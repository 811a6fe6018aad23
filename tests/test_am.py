"""The AM trainer on planted data: quality against the noise floor and per-expert SVD, temperature control,
weight-aware monotonicity, determinism, configuration errors."""

import functools
import math

import pytest
import torch

pytest.importorskip("globe.seeding")

from globe import GlobeConfig, fit_bank  # noqa: E402
from globe.errors import ConfigError  # noqa: E402


def planted(N=32, p=24, d=40, r=6, m=6, support=2, noise=0.05, seed=0):
    """A true bank of m unit atoms, sparse simplex codes, per-expert adapters and Gaussian noise.

    Returns (W noisy, W clean); the noise floor is ||W_clean - W|| / ||W||: the error of the truth itself."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(m, r, d, generator=g, dtype=torch.float64)
    bank /= bank.flatten(1).norm(dim=1)[:, None, None]
    codes = torch.zeros(N, m, dtype=torch.float64)
    for i in range(N):
        idx = torch.randperm(m, generator=g)[:support]
        w = torch.rand(support, generator=g, dtype=torch.float64) + 0.2
        codes[i, idx] = w / w.sum()
    A = torch.randn(N, p, r, generator=g, dtype=torch.float64)
    clean = A @ torch.einsum("nm,mrd->nrd", codes, bank)
    rms = clean.pow(2).mean().sqrt()
    W = clean + noise * rms * torch.randn(N, p, d, generator=g, dtype=torch.float64)
    return W.float(), clean.float()


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def svd_error(W, k):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return rel((U[:, :, :k] * S[:, None, :k]) @ Vh[:, :k], W)


# The planted model has no shared mean: W_i = A_i sum_j alpha_ij B_j + noise. Centring would subtract the mean
# over experts and make every target full rank (from the true factors the centred fit sits at 3.1x the noise
# floor, uncentred at 0.9x), so the fit these tests share is uncentred. The weight-aware mode with its
# moves (support_search=1, spectral_bank=True) is what reaches the floor (0.94x): without them it ends at 4.7x
# the floor on this set, with the support search alone at 3.0x, with the spectral bank alone at 4.7x.
PLANTED_CONFIG = dict(
    r=6, m=6, target_support=2, weight_aware=True, center=False, steps=20, patience=20, val_fraction=0.0,
    support_search=1, spectral_bank=True,
)


@functools.lru_cache(maxsize=1)
def _planted_fit():
    W, clean = planted()
    return W, clean, fit_bank(W, GlobeConfig(**PLANTED_CONFIG))


def test_planted_beats_per_expert_svd_at_equal_parameters():
    W, clean, fit = _planted_fit()
    err = rel(fit.reconstruct(), W)
    # the recorded metrics agree with the reconstruction (mean included)
    assert math.isclose(fit.metrics["rel_error_all"], err, rel_tol=1e-3)
    assert err < 0.7 * fit.history[0]["rel_error_all"]
    # equal parameters: bank + adapters + codes (value and index per nonzero) + mean vs k (p + d) per expert
    N, p, d = W.shape
    params = fit.bank.numel() + fit.A.numel() + 2 * int((fit.alpha != 0).sum()) + p * d
    k = params // (N * (p + d))
    assert k >= 1
    assert err < svd_error(W, k)


def test_planted_reaches_noise_floor():
    # config: PLANTED_CONFIG above, i.e. GlobeConfig(weight_aware=True, center=False) with the support
    # search and spectral bank. On ten planted sets (seeds 0-9) it ends within 1.3x of the floor on six, at
    # 1.75x on one and at 5.1x to 5.6x on three: local minima of the bank that neither move escapes (without
    # the moves all ten end at 3.7x to 7.1x); restarts=4 takes nine of the ten to the floor (test below).
    W, clean, fit = _planted_fit()
    floor = rel(clean, W)  # the error of the noiseless truth against the noisy data
    assert rel(fit.reconstruct(), W) <= 1.3 * floor
    am = fit.history[1:]
    assert sum(h["support_swaps"] for h in am) > 0
    assert sum(h["spectral_accepted"] for h in am) >= 1
    # the codes keep their invariants: rows on the simplex, epsilon-pruned, median support at the target
    assert torch.allclose(fit.alpha.sum(1), torch.ones(W.shape[0]), atol=1e-5)
    assert ((fit.alpha == 0) | (fit.alpha >= 1e-3 * 0.5)).all()
    assert fit.metrics["support_median"] == 2


def test_restarts_keep_the_best_fit_and_reach_the_floor_where_one_fit_does_not():
    # planted set 1: the single fit (seed 0) stops in a local minimum at about 5.6x the floor; the best of
    # four whole fits (seeds 0-3) reaches it. Over the ten sets 0-9, 6 of 10 single fits and 9 of 10 best-of-4
    # fits end within 1.3x of the floor.
    W, clean = planted(seed=1)
    floor = rel(clean, W)
    single = fit_bank(W, GlobeConfig(**PLANTED_CONFIG))
    assert rel(single.reconstruct(), W) > 1.3 * floor
    records = []
    fit = fit_bank(W, GlobeConfig(**PLANTED_CONFIG, restarts=4), callback=records.append)
    assert rel(fit.reconstruct(), W) <= 1.3 * floor
    scores = fit.metrics["restart_scores"]
    assert len(scores) == 4 and fit.metrics["restart_seeds"] == [0, 1, 2, 3]
    k = fit.metrics["restart_best"]
    assert scores[k] == min(scores) and scores[0] == single.history[single.metrics["best_step"]]["objective"]
    assert sorted({r["restart"] for r in records}) == [0, 1, 2, 3]
    # the winner is exactly the single fit of its seed
    alone = fit_bank(W, GlobeConfig(**PLANTED_CONFIG, seed=k))
    assert torch.equal(alone.bank, fit.bank) and torch.equal(alone.alpha, fit.alpha) and torch.equal(alone.A, fit.A)


def test_restarts_with_held_out_experts_compare_the_error_over_all_experts():
    W, _ = planted(N=24, seed=3)
    base = dict(r=6, m=6, target_support=2, weight_aware=True, steps=4, patience=10, val_fraction=0.25)
    fit = fit_bank(W, GlobeConfig(restarts=3, **base))
    singles = [fit_bank(W, GlobeConfig(seed=s, **base)) for s in range(3)]
    assert fit.metrics["restart_scores"] == [f.metrics["rel_error_all"] for f in singles]
    k = fit.metrics["restart_best"]
    assert torch.equal(fit.bank, singles[k].bank)
    assert fit.metrics["rel_error_all"] == min(f.metrics["rel_error_all"] for f in singles)


def test_proxy_mode_improves_on_initial_state():
    W, clean = planted(seed=1)
    cfg = GlobeConfig(r=6, m=6, target_support=2, steps=15, patience=15)
    fit = fit_bank(W, cfg)
    assert fit.metrics["rel_error"] < fit.history[0]["rel_error"]
    assert torch.allclose(fit.alpha.sum(1), torch.ones(W.shape[0]), atol=1e-5)
    assert ((fit.alpha == 0) | (fit.alpha >= cfg.eps * 0.5)).all()
    norms = fit.bank.flatten(1).norm(dim=1)
    assert (norms - 1).abs().max() < 1e-5
    assert len(fit.val_index) >= 1


@pytest.mark.parametrize("start", ["above", "below"])
def test_temperature_controller_converges_to_target(start):
    W, _ = planted(N=40, m=12, support=3, seed=2, noise=0.05)
    target = 4
    T0 = 20.0 if start == "above" else 0.05
    cfg = GlobeConfig(
        r=6,
        m=12,
        target_support=target,
        T0=T0,
        T_min=0.05,
        T_max=20.0,
        eta=0.5,
        steps=25,
        patience=100,
        val_fraction=0.0,
    )
    fit = fit_bank(W, cfg)
    sup = [h["support_median"] for h in fit.history[1:]]
    temps = [h["temperature"] for h in fit.history[1:]]
    first = sup[0]
    if start == "above":
        assert first > target and temps[1] < temps[0]  # support above target lowers T
    else:
        assert first < target and temps[1] > temps[0]  # support below target raises T
    assert abs(sup[-1] - target) <= 1
    assert abs(sup[-1] - target) < abs(first - target)


def test_weight_aware_objective_non_increasing():
    W, _ = planted(N=20, m=5, support=2, seed=3, noise=0.1)
    cfg = GlobeConfig(
        r=6,
        m=5,
        target_support=2,
        weight_aware=True,
        steps=12,
        patience=100,
        val_fraction=0.0,
        dtype="float64",
        support_search=1,
        spectral_bank=True,
    )
    fit = fit_bank(W.double(), cfg)
    obj = [h["objective"] for h in fit.history]
    assert len(obj) == 13
    for a, b in zip(obj, obj[1:]):
        assert b <= a * (1 + 1e-6), (a, b)
    assert obj[-1] < obj[0]
    # the steps include the support search and the spectral bank (both on here), and they did move
    am = fit.history[1:]
    assert all(h["support_search_gain"] >= 0 for h in am)
    assert sum(h["support_swaps"] for h in am) > 0
    assert all(h["spectral_skipped"] == 0 for h in am)


def test_fit_mean_refits_the_shared_term_and_keeps_the_objective_non_increasing():
    # planted experts plus a shared term that is not their average: the fitted mean must move toward it
    W, _ = planted(N=24, m=5, support=2, seed=5, noise=0.1)
    g = torch.Generator().manual_seed(11)
    W = W + 2.0 * W.std() * torch.randn(W.shape[1:], generator=g)
    base = dict(r=6, m=5, target_support=2, weight_aware=True, steps=10, patience=100, val_fraction=0.0,
                dtype="float64", support_search=0, spectral_bank=False)
    plain = fit_bank(W.double(), GlobeConfig(**base))
    fit = fit_bank(W.double(), GlobeConfig(fit_mean=True, **base))
    obj = [h["objective"] for h in fit.history]
    for a, b in zip(obj, obj[1:]):
        assert b <= a * (1 + 1e-9), (a, b)
    assert all(h["mean_shift_rms"] >= 0 for h in fit.history[1:])
    # the artifact's mean is the fitted one: the reconstruction reproduces the recorded error
    err = rel(fit.reconstruct(), W)
    assert math.isclose(fit.metrics["rel_error_all"], err, rel_tol=1e-6)
    assert not torch.allclose(fit.normalization.mean.double(), W.double().mean(0))
    assert err < rel(plain.reconstruct(), W)


def test_support_search_never_raises_an_experts_error_and_recovers_planted_supports():
    from globe.am import _residuals, _support_search
    from globe.bank import fit_adapters

    from globe_kernels import ops

    # noise-free experts on a known bank (float64); codes start on random wrong supports, some of size 1
    g = torch.Generator().manual_seed(31)
    N, p, d, r, m = 23, 9, 17, 3, 7
    bank = torch.randn(m, r, d, generator=g, dtype=torch.float64)
    bank /= bank.flatten(1).norm(dim=1)[:, None, None]
    true = torch.zeros(N, m, dtype=torch.float64)
    start = torch.zeros(N, m, dtype=torch.float64)
    for i in range(N):
        idx = torch.randperm(m, generator=g)
        true[i, idx[:2]] = torch.tensor([0.35, 0.65], dtype=torch.float64)
        k = 1 + i % 2
        start[i, idx[2 : 2 + k]] = 1.0 / k
    Z = torch.randn(N, p, r, generator=g, dtype=torch.float64) @ torch.einsum("nm,mrd->nrd", true, bank)
    zn = Z.pow(2).sum((1, 2))
    alpha = start
    A, _, G = fit_adapters(Z, ops.compose(bank, alpha), 1e-10)
    lam = 1e-10 * float(G.diagonal(dim1=1, dim2=2).sum(1).mean()) / r
    ones = torch.ones(p, dtype=torch.float64)
    res, _ = _residuals(Z, A, ops.compose(bank, alpha), ones)
    for _ in range(4):
        alpha, A, stats = _support_search(Z, bank, alpha, A, zn, res, lam, 3, 2, 1e-3, budget=12000)
        new, _ = _residuals(Z, A, ops.compose(bank, alpha), ones)
        assert (new <= res).all()  # per expert, not only in total
        # the returned adapters are the ridge least-squares ones for the returned codes (float64 reference)
        comp = ops.compose(bank, alpha)
        ref = Z @ comp.transpose(1, 2) @ torch.linalg.inv(comp @ comp.transpose(1, 2) + lam * torch.eye(r))
        moved = (alpha != start).any(1)
        torch.testing.assert_close(A[moved], ref[moved], rtol=1e-7, atol=1e-7 * float(ref.abs().max()))
        assert torch.allclose(alpha.sum(1), torch.ones(N, dtype=torch.float64), atol=1e-12)
        assert int((alpha != 0).sum(1).max()) <= 2  # additions stop at max_support
        res = new
    # every support found, the weights to 1e-4, the error to the noise-free floor (1e-8 of the energy)
    assert ((alpha != 0) == (true != 0)).all()
    torch.testing.assert_close(alpha, true, rtol=0, atol=1e-4)
    assert float(res.sum()) < 1e-8 * float(zn.sum())


def test_vp_objective_matches_the_explicit_ridge_fit():
    from globe.am import _vp_state

    # F = ||Z - A* B~||^2 with A* = Z B~ᵀ (B~ B~ᵀ + lam I)^-1, from the r x r pair Grams; float64 reference on
    # the full matrices. Inputs in float32 (the trainer's dtype): relative tolerance 1e-5 of ||Z||^2.
    g = torch.Generator().manual_seed(32)
    n, C, u, p, r, d = 3, 5, 4, 7, 3, 11
    atoms = torch.randn(n, u, r, d, generator=g)
    Z = torch.randn(n, p, d, generator=g)
    w = torch.rand(n, C, u, generator=g) * (torch.rand(n, C, u, generator=g) > 0.3)
    w[..., 0] += 0.1
    PU = torch.einsum("naxd,nbyd->nabxy", atoms, atoms)
    M = Z[:, None] @ atoms.transpose(-1, -2)
    KU = M.transpose(-1, -2)[:, :, None] @ M[:, None]
    zn = Z.double().pow(2).sum((1, 2))
    lam = 0.05
    G, X, H, F = _vp_state(w, PU, KU, zn, lam)
    Bt = torch.einsum("nca,naxd->ncxd", w.double(), atoms.double())
    Gref = Bt @ Bt.transpose(-1, -2)
    Aref = Z.double()[:, None] @ Bt.transpose(-1, -2) @ torch.linalg.inv(Gref + lam * torch.eye(r))
    Fref = (Z.double()[:, None] - Aref @ Bt).pow(2).sum((-1, -2))
    torch.testing.assert_close(F, Fref, rtol=0, atol=1e-5 * float(zn.max()))
    torch.testing.assert_close(H, Aref.transpose(-1, -2) @ Aref, rtol=1e-4, atol=1e-5 * float(H.abs().max()))
    torch.testing.assert_close(G, Gref, rtol=1e-5, atol=1e-5 * float(Gref.abs().max()))


def test_spectral_bank_recovers_a_planted_bank_in_one_common_frame():
    from globe.am import _spectral_bank
    from globe.bank import row_bases

    # noise-free experts and their true codes: the spectral bank is the true bank up to ONE r x r matrix T for
    # every atom (float64, tolerance 1e-8 relative); an unused atom comes back as zeros
    g = torch.Generator().manual_seed(33)
    N, p, d, r, m = 29, 8, 13, 3, 6
    bank = torch.randn(m, r, d, generator=g, dtype=torch.float64)
    codes = torch.zeros(N, m, dtype=torch.float64)
    for i in range(N):
        idx = torch.randperm(m - 1, generator=g)[:2]  # atom m-1 unused
        codes[i, idx] = torch.rand(2, generator=g, dtype=torch.float64) + 0.2
    codes /= codes.sum(1, keepdim=True)
    Z = torch.randn(N, p, r, generator=g, dtype=torch.float64) @ torch.einsum("nm,mrd->nrd", codes, bank)
    out = _spectral_bank(codes, row_bases(Z), r, max_dim=10_000)
    assert out is not None and out.dtype == torch.float64
    assert (out[m - 1] == 0).all()
    # stacked rows orthonormal
    rows = out[: m - 1].permute(1, 0, 2).reshape(r, -1)
    torch.testing.assert_close(rows @ rows.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-10)
    # one T for all atoms: least squares over the stacked atoms, then every atom agrees
    Bs = bank[: m - 1].permute(1, 0, 2).reshape(r, -1)
    T = rows @ Bs.T @ torch.linalg.inv(Bs @ Bs.T)
    torch.testing.assert_close(torch.einsum("xy,jyd->jxd", T, bank[: m - 1]), out[: m - 1], rtol=0, atol=1e-8)
    assert abs(float(torch.linalg.det(T))) > 1e-3
    assert _spectral_bank(codes, row_bases(Z), r, max_dim=(m - 1) * d - 1) is None


@pytest.mark.parametrize("weight_aware,solver", [(False, "auto"), (True, "dense"), (True, "cg")])
def test_topk_caps_support(weight_aware, solver):
    # the initial codes too: the weight-aware code steps are accepted only where they lower the objective (before
    # the initial codes were capped, this weight-aware fit kept codes of up to 7 atoms), and step 0 may be the
    # state returned
    W, _ = planted(N=24, m=8, support=3, seed=4)
    fit = fit_bank(W, GlobeConfig(r=6, m=8, sparsity="topk", top_k=2, steps=5, weight_aware=weight_aware,
                                  weight_aware_solver=solver))
    assert all(h["support_max"] <= 2 for h in fit.history)
    assert int((fit.alpha != 0).sum(1).max()) <= 2


def test_final_pass_fits_the_held_out_experts_into_the_bank():
    # a quarter of the experts held out: after the validated phase, final_steps more steps with them in the
    # dictionary step; their error must drop and the error over all experts must not rise
    W, _ = planted(N=32, seed=4, noise=0.1)
    base = dict(r=6, m=6, target_support=2, weight_aware=True, steps=8, patience=100, val_fraction=0.25,
                support_search=0, spectral_bank=False, center=False)
    held = fit_bank(W, GlobeConfig(final_steps=0, **base))
    records = []
    fit = fit_bank(W, GlobeConfig(final_steps=3, **base), callback=records.append)
    assert fit.val_index == held.val_index and len(fit.val_index) == 8
    vi = fit.val_index

    def err(f, idx):
        return rel(f.reconstruct()[idx], W[idx])

    assert err(fit, vi) < 0.8 * err(held, vi)
    assert fit.metrics["rel_error_all"] <= held.metrics["rel_error_all"] * (1 + 1e-9)
    # records: the validated phase is unchanged, then three final-pass steps without a validation error
    finals = [r for r in records if r.get("stage") == "final"]
    assert len(finals) == 3 == fit.metrics["final_steps_run"]
    assert all(math.isnan(r["rel_error_val"]) for r in finals)
    assert [r["rel_error_all"] for r in records[:9]] == [h["rel_error_all"] for h in held.history]
    assert fit.metrics["validated_step"] == held.metrics["best_step"]
    assert fit.metrics["rel_error_val"] == held.metrics["rel_error_val"]
    assert fit.metrics["n_val"] == 8
    with pytest.raises(ConfigError, match=r"GlobeConfig\.final_steps"):
        GlobeConfig(final_steps=-1)


def test_weight_aware_fit_too_large_for_memory_goes_matrix_free_or_is_refused_before_any_work(monkeypatch):
    from globe.am import _weight_aware_solver

    def solver(kind, *shape):
        return _weight_aware_solver(GlobeConfig(weight_aware=True, weight_aware_solver=kind), *shape,
                                    torch.device("cpu"), torch.float32)

    # Qwen3-30B-A3B at global scope: 48 x 128 experts, m = n/4 = 1536 atoms of r = 384 rows: terabytes dense
    qwen_global, qwen_layer = (6144, 1536, 384), (128, 32, 384)
    with pytest.raises(ConfigError, match=r"GlobeConfig\.weight_aware_solver: .* m=1536 .* r=384 .*'cg'"):
        solver("dense", *qwen_global)
    assert solver("auto", *qwen_global) == "cg" == solver("cg", *qwen_layer)
    assert solver("auto", *qwen_layer) == "dense" == solver("dense", *qwen_layer)  # one layer: 1.8 GB
    W, _ = planted(N=16, seed=2)
    monkeypatch.setenv("GLOBE_WEIGHT_AWARE_MAX_GB", "1e-6")
    with pytest.raises(ConfigError, match="GLOBE_WEIGHT_AWARE_MAX_GB=1e-6"):
        fit_bank(W, GlobeConfig(r=6, m=4, steps=1, weight_aware=True, weight_aware_solver="dense"))
    fit = fit_bank(W, GlobeConfig(r=6, m=4, steps=1, weight_aware=True))  # auto: matrix-free
    assert fit.history[1]["weight_aware_solver"] == "cg"
    with pytest.raises(ConfigError, match=r"GlobeConfig\.support_search: .*weight_aware_solver='dense'"):
        fit_bank(W, GlobeConfig(r=6, m=4, steps=1, weight_aware=True, support_search=1))
    fit_bank(W, GlobeConfig(r=6, m=4, steps=1))  # the proxy mode is not limited
    monkeypatch.setenv("GLOBE_WEIGHT_AWARE_MAX_GB", "lots")
    with pytest.raises(ConfigError, match="expected a number of GiB"):
        fit_bank(W, GlobeConfig(r=6, m=4, steps=1, weight_aware=True))
    with pytest.raises(ConfigError, match=r"GlobeConfig\.weight_aware_solver: must be one of"):
        GlobeConfig(weight_aware_solver="lu")


def test_refinement_is_chunked_where_it_must_and_refused_where_it_cannot_fit(monkeypatch):
    from globe.am import refine_plan
    from globe.refine import plan_refine_chunks, refine_memory_bytes

    cfg = GlobeConfig(refine_steps=10)
    cpu, f32 = torch.device("cpu"), torch.float32
    # Qwen3-30B-A3B at global scope (48 x 128 experts of 768 x 2048, r = 384, m = 1536): about 225 GiB all at
    # once besides the experts (three fp32 copies, 108 GiB); in chunks of experts it needs about 99 GiB more
    monkeypatch.setenv("GLOBE_REFINE_MAX_GB", "141")  # an H200
    with pytest.raises(ConfigError, match=r"GlobeConfig\.refine_steps: .*N=6144 .*r=384.*one expert at a time"
                                          r".*GLOBE_REFINE_MAX_GB=141.*scope='layer'"):
        refine_plan(cfg, 6144, 768, 2048, 384, 1536, cpu, f32)
    assert refine_plan(cfg, 128, 768, 2048, 384, 32, cpu, f32) == (None, True)  # one layer: all at once
    monkeypatch.setenv("GLOBE_REFINE_MAX_GB", "260")
    chunk, cache = refine_plan(cfg, 6144, 768, 2048, 384, 1536, cpu, f32)
    assert 1 <= chunk < 6144 and not cache  # the factors' cache (54 GiB) does not fit beside the chunks
    left = 260 * 2**30 - 3 * 6144 * 768 * 2048 * 4
    assert refine_memory_bytes(6144, 768, 2048, 384, "auto", m=1536, chunk=chunk, cache=False) <= left
    assert refine_memory_bytes(6144, 768, 2048, 384, "auto", m=1536, chunk=chunk + 1, cache=False) > left
    monkeypatch.setenv("GLOBE_REFINE_MAX_GB", "300")
    chunk, cache = refine_plan(cfg, 6144, 768, 2048, 384, 1536, cpu, f32)
    assert 1 <= chunk < 6144 and cache
    sizes = (128, 768, 2048, 384)
    assert refine_memory_bytes(*sizes, "auto") == max(refine_memory_bytes(*sizes, m) for m in ("varpro", "varpro_gn"))
    fixed = 256 * 2**20  # buffers of a fixed size, whatever the dtype
    assert refine_memory_bytes(*sizes, "varpro", torch.float64) - fixed == 2 * (refine_memory_bytes(*sizes, "varpro")
                                                                                 - fixed)
    assert refine_memory_bytes(*sizes, "varpro", chunk=16) < refine_memory_bytes(*sizes, "varpro")
    assert plan_refine_chunks(*sizes, "adam", 10**15) == (None, True, refine_memory_bytes(*sizes, "adam"))
    with pytest.raises(ValueError, match="unknown refinement method"):
        refine_memory_bytes(*sizes, "lbfgs")
    # refused by fit_bank before the first record (the AM would otherwise run to completion first)
    W, _ = planted(N=16, seed=2)
    monkeypatch.setenv("GLOBE_REFINE_MAX_GB", "1e-5")
    records = []
    with pytest.raises(ConfigError, match="GLOBE_REFINE_MAX_GB=1e-5"):
        fit_bank(W, GlobeConfig(r=6, m=4, steps=1, refine_steps=3), callback=records.append)
    assert records == []
    with pytest.raises(ConfigError, match="GLOBE_REFINE_MAX_GB=1e-5"):  # before the restarts, too
        fit_bank(W, GlobeConfig(r=6, m=4, steps=1, refine_steps=3, restarts=2), callback=records.append)
    assert records == []
    fit_bank(W, GlobeConfig(r=6, m=4, steps=1))  # without the refinement: not limited
    # a limit between the chunked and the all-at-once estimates: fit_bank refines in chunks, to the same result
    N, p, d = W.shape
    held = 3 * N * p * d * 4  # the refinement runs in the FitResult's float32
    lo = refine_memory_bytes(N, p, d, 6, "varpro_gn", m=4, chunk=5)
    hi = refine_memory_bytes(N, p, d, 6, "varpro_gn", m=4)
    monkeypatch.setenv("GLOBE_REFINE_MAX_GB", repr((held + (lo + hi) / 2) / 2**30))
    cfg = GlobeConfig(r=6, m=4, steps=2, refine_steps=3, refine_method="varpro_gn", val_fraction=0.1)
    chunked = fit_bank(W, cfg)
    assert 5 <= chunked.metrics["refine.chunk_experts"] < N
    monkeypatch.delenv("GLOBE_REFINE_MAX_GB")
    whole = fit_bank(W, cfg)
    assert whole.metrics["refine.chunk_experts"] is None
    assert whole.metrics["refine.rel_error"] < whole.metrics["refine.rel_error_start"]
    # float32 sums in another order: equal to 1e-4 relative
    assert math.isclose(chunked.metrics["rel_error_all"], whole.metrics["rel_error_all"], rel_tol=1e-4)
    torch.testing.assert_close(chunked.bank, whole.bank, rtol=1e-3, atol=1e-3 * float(whole.bank.abs().max()))


def _weight_aware_problem(N=13, p=9, d=11, r=5, m=7, seed=0):
    """Random experts, adapters, bank and sparse simplex codes in float64 (odd sizes)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(N, p, d, generator=g, dtype=torch.float64)
    A = torch.randn(N, p, r, generator=g, dtype=torch.float64)
    bank = torch.randn(m, r, d, generator=g, dtype=torch.float64)
    alpha = torch.rand(N, m, generator=g, dtype=torch.float64)
    alpha[alpha < 0.5] = 0
    alpha[torch.arange(N), torch.randint(m, (N,), generator=g)] += 0.3
    alpha /= alpha.sum(1, keepdim=True)
    return Z, A, bank, alpha


def test_matrix_free_weight_aware_quantities_match_the_dense_ones():
    from globe.am import _frob2, _WeightAware, _WeightAwareFree

    Z, A, bank, alpha = _weight_aware_problem()
    dense, free = _WeightAware(Z, A, _frob2(Z)), _WeightAwareFree(Z, A, _frob2(Z))
    Q, c = dense.quadratic(bank)
    # the objective against its definition, the gradient against the dense quadratic's
    F = (Z - A @ torch.einsum("nm,mrd->nrd", alpha, bank)).pow(2).sum((1, 2))
    torch.testing.assert_close(free.objective_of(bank, alpha), F, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dense.objective(Q, c, alpha), F, rtol=1e-10, atol=1e-10)
    grad = 2 * ((Q @ alpha[:, :, None]).squeeze(2) - c)
    torch.testing.assert_close(free.gradient(bank, alpha), grad, rtol=1e-10, atol=1e-10)
    # the candidate quadratic is the dense one's rows and columns of the candidates, in their order
    cand = torch.stack([torch.randperm(7, generator=torch.Generator().manual_seed(i))[:4] for i in range(13)])
    Qc, cc = free.candidate_quadratic(bank, cand)
    rows = torch.arange(13)[:, None, None]
    torch.testing.assert_close(Qc, Q[rows, cand[:, :, None], cand[:, None, :]], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cc, c.gather(1, cand), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sel", ["all", "some"])
def test_matrix_free_bank_step_solves_the_dense_normal_equations(sel):
    from globe.am import _frob2, _solve_spd, _WeightAware, _WeightAwareFree

    Z, A, bank, alpha = _weight_aware_problem(seed=1)
    alpha[:, 6] = 0  # an atom no expert uses: only the ridge holds it
    alpha /= alpha.sum(1, keepdim=True)
    idx = torch.arange(13) if sel == "all" else torch.tensor([0, 2, 3, 5, 8, 9, 12])
    H, rhs = _WeightAware(Z, A, _frob2(Z)).bank_system(alpha, idx, 1e-4)
    exact = _solve_spd(H, rhs)[0].reshape(bank.shape)
    got, info = _WeightAwareFree(Z, A, _frob2(Z)).bank_solve(alpha, idx, 1e-4, bank)
    assert info["bank_cg_residual"] <= 1e-5 and 0 < info["bank_cg_iters"] <= 60
    # the solution to the CG's tolerance: residual of the dense system relative to its right-hand side
    res = (H @ got.reshape(7 * 5, -1) - rhs).norm() / rhs.norm()
    assert float(res) < 1e-4, float(res)
    assert rel(got, exact) < 1e-3


def test_matrix_free_weight_aware_fit_follows_the_dense_one():
    # more atoms than candidates per expert (m = 16 > support + 4), odd sizes; float64 so that the two
    # solvers' differences are the CG tolerance and the candidate restriction, not rounding
    W, _ = planted(N=40, p=13, d=29, r=5, m=16, support=2, seed=4, noise=0.1)
    cfg = dict(r=5, m=16, target_support=2, weight_aware=True, center=False, steps=8, patience=100,
               val_fraction=0.0, dtype="float64")
    dense = fit_bank(W.double(), GlobeConfig(**cfg, weight_aware_solver="dense"))
    free = fit_bank(W.double(), GlobeConfig(**cfg, weight_aware_solver="cg"))
    obj = [h["objective"] for h in free.history]
    for a, b in zip(obj, obj[1:]):
        assert b <= a * (1 + 1e-9), (a, b)  # still a monotone descent
    assert all(h["weight_aware_solver"] == "cg" for h in free.history[1:])
    assert all(h["code_candidates"] < 16 for h in free.history[2:])  # the restriction was in force
    e_dense, e_free = dense.metrics["rel_error_all"], free.metrics["rel_error_all"]
    assert e_free < dense.history[0]["rel_error_all"] * 0.8
    assert abs(e_free - e_dense) <= 0.03 * e_dense, (e_free, e_dense)


def test_deterministic_bit_identical():
    W, _ = planted(N=16, seed=5)
    for wa in (False, True):
        cfg = GlobeConfig(r=6, m=4, steps=4, weight_aware=wa, seed=7)
        a, b = fit_bank(W, cfg), fit_bank(W, cfg)
        for x, y in ((a.bank, b.bank), (a.alpha, b.alpha), (a.A, b.A)):
            assert torch.equal(x, y)


def test_history_has_section5_metrics():
    W, _ = planted(N=16, seed=6)
    records = []
    fit = fit_bank(W, GlobeConfig(r=6, m=4, steps=2, final_steps=0), callback=records.append)
    assert len(records) == len(fit.history) == 3
    rec = records[-1]
    for key in (
        "rel_error",
        "rel_error_val",
        "support_median",
        "support_mean",
        "support_p95",
        "support_target_error",
        "temperature",
        "entropy_mean",
        "prune_fraction",
        "atom_usage_gini",
        "support_overlap",
        "atom_norm_dev",
        "nan_count",
        "inf_count",
        "cholesky_fallbacks",
        "cond_mod",
        "cond_adapter_median",
        "cond_adapter_max",
        "step_time_s",
        "peak_memory_bytes",
        "seeding_method",
        "m",
        "r",
        "target_support",
        "lambda_B",
        "lambda_A",
    ):
        assert key in rec, key
    assert rec["nan_count"] == 0 and rec["m"] == 4 and rec["r"] == 6
    assert any(k.startswith("backend.") for k in rec)
    assert "seed_explained_variance" in records[0]
    assert len(fit.metrics["atom_usage"]) == 4


def test_config_errors():
    with pytest.raises(ConfigError, match="phi"):
        fit_bank(torch.randn(8, 4, 6), GlobeConfig(phi="tanh"))
    with pytest.raises(ConfigError, match=r"GlobeConfig\.r"):
        fit_bank(torch.randn(8, 4, 6), GlobeConfig(r=7))  # r may exceed p = 4, not d = 6
    with pytest.raises(ConfigError, match=r"GlobeConfig\.sparsity"):
        GlobeConfig(sparsity="softmax")
    with pytest.raises(ConfigError, match="top_k"):
        GlobeConfig(sparsity="topk")
    with pytest.raises(ConfigError, match="bogus"):
        GlobeConfig.from_dict({"bogus": 1})
    cfg = GlobeConfig(r=8, m="n/8", seeding_options={"oversample": 4})
    assert GlobeConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("weight_aware", [True, False])
def test_r_above_p_fits_a_shared_row_space_wider_than_p(weight_aware):
    """Experts W_i = G_i R with one row space R of q > p dimensions: one atom of r = q rows holds it, so the fit
    is exact (up to its ridges), while r = p (one shared p-dimensional row space) cannot be. The warm start pads
    each expert's p rows with the family's directions outside them (globe.seeding.pad_outside_row_space)."""
    g = torch.Generator().manual_seed(8)
    N, p, d, q = 10, 6, 31, 11
    R = torch.linalg.qr(torch.randn(d, q, generator=g, dtype=torch.float64)).Q.T
    W = (torch.randn(N, p, q, generator=g, dtype=torch.float64) @ R).float()

    def err(r):
        fit = fit_bank(W, GlobeConfig(r=r, m=1, steps=6, weight_aware=weight_aware, val_fraction=0.0))
        assert fit.A.shape == (N, p, r) and fit.bank.shape == (1, r, d)
        return float((fit.reconstruct() - W).double().norm() / W.double().norm())

    e_q, e_p = err(q), err(p)
    assert e_q < 0.02  # exact up to the fit's ridges (lambda_A, lambda_B)
    assert e_p > 0.2 and e_p > 10 * e_q


def test_rank_presets_relative_to_min_p_d():
    assert GlobeConfig(r="p/2").resolve_r(768, 2048) == 384
    assert GlobeConfig(r="3p/4").resolve_r(768, 2048) == 576
    assert GlobeConfig(r="p/2").resolve_r(14336, 4096) == 2048  # Mixtral: p > d
    assert GlobeConfig(r=1000).resolve_r(768, 2048) == 1000  # r > p: allowed up to d
    with pytest.raises(ConfigError, match="exceeds d = 2048"):
        GlobeConfig(r=2049).resolve_r(768, 2048)
    assert GlobeConfig(m="n/4").resolve_m(128) == 32
    assert GlobeConfig(m="n/8").resolve_m(4) == 1


# --- refinement through phi, coherence penalty, new config fields -------------------------------------------


def _planted_small(seed: int) -> torch.Tensor:
    """12 experts 8 x 20 from 4 planted atoms of rank 3, plus noise and a shared offset."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(4, 3, 20, generator=g)
    alpha = torch.rand(12, 4, generator=g)
    alpha = alpha / alpha.sum(1, keepdim=True)
    A = torch.randn(12, 8, 3, generator=g)
    return A @ torch.einsum("nm,mrd->nrd", alpha, bank) + 0.1 * torch.randn(12, 8, 20, generator=g) + 0.5


def test_fit_bank_with_tanh_refinement_matches_the_artifact_and_does_not_lose_to_the_linear_start():
    from globe.artifact import Artifact

    W = _planted_small(21)
    base = dict(r=3, m=3, steps=3, target_support=2, val_fraction=0.0)
    linear = fit_bank(W, GlobeConfig(**base))
    records = []
    fit = fit_bank(W, GlobeConfig(phi="tanh", refine_steps=4, **base), callback=records.append)
    assert fit.phi == "tanh" and linear.phi == "identity"
    refine_recs = [r for r in records if r.get("stage") == "refine"]
    assert refine_recs and refine_recs == [h for h in fit.history if h.get("stage") == "refine"]
    assert "refine.rel_error" in fit.metrics and fit.metrics["refine.phi"] == "tanh"
    # reconstruct() against float64 maths: A_i tanh(sum_j alpha_ij B_j) + M (fp32 factors: atol 1e-5 x scale)
    ref = (fit.A.double() @ torch.tanh(torch.einsum("nm,mrd->nrd", fit.alpha.double(), fit.bank.double()))
           + fit.normalization.mean.double())
    R = fit.reconstruct()
    torch.testing.assert_close(R.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # the artifact path (what inference serves) gives the same weights
    art = Artifact.from_factors(
        scope="layer", phi=fit.phi, banks={("gate", "layer0"): fit.bank},
        codes={("gate", 0): fit.codes}, adapters={("gate", 0): fit.A},
        means={("gate", "layer0"): fit.normalization.mean},
    )
    torch.testing.assert_close(art.reconstruct("gate", 0), R, rtol=1e-5, atol=1e-5 * float(R.abs().max()))

    def err(f):
        return float((f.reconstruct().double() - W.double()).norm() / W.double().norm())

    # no held-out experts: the training error is the stopping criterion and never ends above its start
    assert err(fit) <= err(linear) * (1 + 1e-5)


def test_refinement_final_pass_lets_the_bank_fit_the_held_out_experts():
    W, _ = planted(N=32, seed=4, noise=0.1)
    base = dict(r=6, m=6, target_support=2, weight_aware=True, steps=6, patience=100, val_fraction=0.25,
                support_search=0, spectral_bank=False, center=False, refine_steps=40, refine_method="adam")
    held = fit_bank(W, GlobeConfig(final_steps=0, **base))
    records = []
    fit = fit_bank(W, GlobeConfig(final_steps=3, **base), callback=records.append)
    vi = fit.val_index
    assert len(vi) == 8
    finals = [r for r in records if r.get("stage") == "refine_final"]
    assert finals and finals == [h for h in fit.history if h.get("stage") == "refine_final"]
    # the final refinement starts from the validated refinement over all experts and never ends above it
    assert fit.metrics["refine.final_rel_error"] <= fit.metrics["refine.final_rel_error_start"] * (1 + 1e-6)
    assert math.isclose(fit.metrics["refine.final_rel_error"], rel(fit.reconstruct(), W), rel_tol=1e-4)
    assert rel(fit.reconstruct()[vi], W[vi]) < rel(held.reconstruct()[vi], W[vi])
    assert rel(fit.reconstruct(), W) < rel(held.reconstruct(), W)
    # the summary describes the refined factors (it kept the AM's error: 0.321 against 0.300 for this fit);
    # the AM's stays under am.
    for f in (fit, held):
        assert math.isclose(f.metrics["rel_error_all"], rel(f.reconstruct(), W), rel_tol=1e-4)
        assert f.metrics["am.rel_error_all"] > f.metrics["rel_error_all"]
        assert f.metrics["support_median"] == float((f.alpha != 0).sum(1).double().median())


def test_refinement_final_pass_takes_the_steps_the_validated_stage_left():
    """The validated stage stops as soon as the held-out error stops falling (here after its patience of 5
    steps, none better than the start); the pass over all experts then runs the rest of refine_steps instead of
    final_steps (1 here), and lowers the error over all experts well below where it started."""
    W, _ = planted(N=32, seed=0, noise=0.1)
    fit = fit_bank(W, GlobeConfig(r=6, m=6, target_support=2, weight_aware=True, steps=4, val_fraction=0.25,
                                  center=False, refine_steps=15, refine_method="varpro_gn", final_steps=1))
    M = fit.metrics
    assert M["refine.best_step"] == 0 and M["refine.steps_run"] < 15  # validation stopped the first stage
    ran = M["refine.final_steps_run"]
    assert ran == 15 - M["refine.steps_run"] or (M["refine.final_stopped_early"] and ran > 1)
    assert M["refine.final_rel_error"] < 0.9 * M["refine.final_rel_error_start"]
    assert math.isclose(M["rel_error_all"], rel(fit.reconstruct(), W), rel_tol=1e-4)


@pytest.mark.parametrize("restarts", [1, 2])
def test_refined_summary_in_chunks_of_experts(monkeypatch, restarts):
    # the refined error is summed over chunks of experts (no full-size float64 copy); chunks of 7 of 32 experts;
    # with restarts the refinement runs once on the winner, and its summary is refreshed the same way
    import globe.refine as refine_module

    monkeypatch.setattr(refine_module, "_SUMMARY_CHUNK", 7)
    W, _ = planted(N=32, seed=4, noise=0.1)
    fit = fit_bank(W, GlobeConfig(r=6, m=6, target_support=2, weight_aware=True, steps=3, val_fraction=0.0,
                                  center=True, refine_steps=20, refine_method="varpro", restarts=restarts))
    assert math.isclose(fit.metrics["rel_error_all"], rel(fit.reconstruct(), W), rel_tol=1e-5)
    assert fit.metrics["am.rel_error_all"] > fit.metrics["rel_error_all"]


def test_refinement_time_limit_covers_the_final_pass():
    W, _ = planted(N=32, seed=4, noise=0.1)
    cfg = GlobeConfig(r=6, m=6, target_support=2, weight_aware=True, steps=3, val_fraction=0.25, center=False,
                      refine_steps=100, refine_method="adam", refine_time_limit=1e-9, final_steps=3)
    fit = fit_bank(W, cfg)
    # past the limit a refinement records and stops after its first step; the final pass ran its 10 steps (a
    # tenth of refine_steps) when it ignored the limit
    assert fit.metrics["refine.steps_run"] == 1
    assert fit.metrics["refine.final_steps_run"] == 1


def test_phi_without_refinement_is_refused_and_refinement_settings_are_checked():
    with pytest.raises(ConfigError, match="refine_steps"):
        fit_bank(torch.randn(8, 4, 6), GlobeConfig(phi="silu", refine_steps=0))
    for bad, name in (
        (dict(budget=0.0), "budget"),
        (dict(budget=1.5), "budget"),
        (dict(refine_steps=-1), "refine_steps"),
        (dict(refine_method="lbfgs"), "refine_method"),
        (dict(refine_time_limit=0.0), "refine_time_limit"),
        (dict(refine_lr=0.0), "refine_lr"),
        (dict(coherence=-0.1), "coherence"),
        (dict(coherence_iters=-1), "coherence_iters"),
        (dict(coherence=1.0, weight_aware=True), "coherence"),
    ):
        with pytest.raises(ConfigError, match=rf"GlobeConfig\.{name}"):
            GlobeConfig(**bad)
    cfg = GlobeConfig(budget=0.25, refine_steps=7, refine_method="gn", refine_time_limit=3.0, coherence=0.5,
                      coherence_iters=4, phi="silu")
    assert GlobeConfig.from_dict(cfg.to_dict()) == cfg
    # the new settings change the fingerprint, and at their defaults leave it as it was without them
    default = GlobeConfig()
    assert cfg.fingerprint() != default.fingerprint()
    assert default.replace(coherence=0.5).fingerprint() != default.fingerprint()
    assert default.replace(refine_lr=0.02).fingerprint() != default.fingerprint()
    assert default.refine_lr is None and default.refine_method == "auto"
    from globe.config import REFINE_METHODS
    from globe.refine import METHODS

    assert set(REFINE_METHODS) == set(METHODS)  # the config accepts exactly what the refinement runs
    for method in ("varpro_gn", "varpro", "adam", "gn"):
        assert GlobeConfig(refine_method=method, refine_lr=0.03).refine_method == method
    import hashlib
    import json

    old = {k: v for k, v in default.to_dict().items()
           if k not in ("device", "budget", "refine_steps", "refine_method", "refine_lr", "refine_time_limit",
                        "coherence", "coherence_iters", "support_search", "support_candidates", "spectral_bank",
                        "spectral_max_dim", "fit_mean", "restarts", "final_steps", "weight_aware_solver")}
    assert default.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()


def test_weight_aware_move_settings_are_checked_and_enter_the_fingerprint_only_in_weight_aware_mode():
    for bad, name in (
        (dict(support_search=-1), "support_search"),
        (dict(support_search=1.5), "support_search"),
        (dict(support_candidates=0), "support_candidates"),
        (dict(spectral_bank=1), "spectral_bank"),
        (dict(spectral_max_dim=0), "spectral_max_dim"),
    ):
        with pytest.raises(ConfigError, match=rf"GlobeConfig\.{name}"):
            GlobeConfig(**bad)
    proxy, wa = GlobeConfig(), GlobeConfig(weight_aware=True)
    assert GlobeConfig.from_dict(wa.replace(support_search=2).to_dict()) == wa.replace(support_search=2)
    # no effect in proxy mode, so no new fingerprint there; in weight-aware mode each setting counts
    assert proxy.replace(support_search=1, spectral_bank=True).fingerprint() == proxy.fingerprint()
    assert proxy.replace(weight_aware_solver="cg").fingerprint() == proxy.fingerprint()
    for change in (dict(support_search=1), dict(support_candidates=2), dict(spectral_bank=True),
                   dict(spectral_max_dim=100), dict(weight_aware_solver="cg")):
        assert wa.replace(**change).fingerprint() != wa.fingerprint(), change


def test_coherence_penalty_runs_and_every_step_reports_atom_coherence():
    from globe.coherence import atom_coherence

    W = _planted_small(22)
    for mu in (0.0, 1.0):
        fit = fit_bank(W, GlobeConfig(r=3, m=4, steps=3, target_support=2, coherence=mu, coherence_iters=5))
        am = [h for h in fit.history if h.get("stage") != "refine"]
        for rec in am:
            assert 0.0 <= rec["mean_coherence"] <= rec["max_coherence"] <= 1.0 + 1e-9
            assert rec["coherence_atoms"] == 4
        assert all(("coherence_iterations" in rec) == (mu > 0) for rec in am[1:])
        # the metric of the kept step is the coherence of the returned bank (float64 maths)
        kept = am[fit.metrics["best_step"]]
        coh = atom_coherence(fit.bank.double())
        assert kept["max_coherence"] == pytest.approx(coh["max_coherence"], abs=1e-5)
        assert kept["mean_coherence"] == pytest.approx(coh["mean_coherence"], abs=1e-5)
        assert math.isfinite(fit.metrics["rel_error"])


def test_coherence_metric_of_a_large_bank_is_sampled_and_agrees_with_the_definition():
    from globe.am import _COHERENCE_ATOMS, _coherence_metrics
    from globe.coherence import atom_coherence

    g = torch.Generator().manual_seed(23)
    bank = torch.randn(7, 3, 5, generator=g)
    bank[4] = 2.5 * bank[1] + 1e-3 * torch.randn(3, 5, generator=g)  # a near duplicate
    bank[6] = 0.0  # a zero atom counts as orthogonal to everything
    got, want = _coherence_metrics(bank), atom_coherence(bank.double())
    # fp32 Gram: cosines within 1e-6 of the float64 definition
    assert got["max_coherence"] == pytest.approx(want["max_coherence"], abs=1e-6) and got["max_coherence"] > 0.99
    assert got["mean_coherence"] == pytest.approx(want["mean_coherence"], abs=1e-6)
    big = torch.randn(_COHERENCE_ATOMS + 37, 2, 3, generator=g)
    assert _coherence_metrics(big)["coherence_atoms"] == _COHERENCE_ATOMS
