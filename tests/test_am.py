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


@functools.lru_cache(maxsize=1)
def _planted_fit():
    W, clean = planted()
    cfg = GlobeConfig(r=6, m=6, target_support=2, weight_aware=True, steps=25, patience=25, val_fraction=0.0)
    return W, clean, fit_bank(W, cfg)


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


@pytest.mark.xfail(
    reason="the AM stalls near 6x the noise floor (0.32 vs 0.05) on this planted set. Two causes measured: "
    "centring (the planted model has no shared mean; from the true factors the centred fit sits at 3.1x the "
    "floor, uncentred at 0.9x) and a local minimum of the codes' supports (uncentred, from the k-means or "
    "k-subspaces start the weight-aware AM stops near 4.3x). Recovering the supports is still open",
    strict=False,
)
def test_planted_reaches_noise_floor():
    W, clean, fit = _planted_fit()
    floor = rel(clean, W)  # the error of the noiseless truth against the noisy data
    assert rel(fit.reconstruct(), W) <= 1.3 * floor


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
    )
    fit = fit_bank(W.double(), cfg)
    obj = [h["objective"] for h in fit.history]
    assert len(obj) == 13
    for a, b in zip(obj, obj[1:]):
        assert b <= a * (1 + 1e-6), (a, b)
    assert obj[-1] < obj[0]


def test_topk_caps_support():
    W, _ = planted(N=24, m=8, support=3, seed=4)
    fit = fit_bank(W, GlobeConfig(r=6, m=8, sparsity="topk", top_k=2, steps=5))
    assert int((fit.alpha != 0).sum(1).max()) <= 2


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
    fit = fit_bank(W, GlobeConfig(r=6, m=4, steps=2), callback=records.append)
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
        fit_bank(torch.randn(8, 4, 6), GlobeConfig(r=5))
    with pytest.raises(ConfigError, match=r"GlobeConfig\.sparsity"):
        GlobeConfig(sparsity="softmax")
    with pytest.raises(ConfigError, match="top_k"):
        GlobeConfig(sparsity="topk")
    with pytest.raises(ConfigError, match="bogus"):
        GlobeConfig.from_dict({"bogus": 1})
    cfg = GlobeConfig(r=8, m="n/8", seeding_options={"oversample": 4})
    assert GlobeConfig.from_dict(cfg.to_dict()) == cfg


def test_rank_presets_relative_to_min_p_d():
    assert GlobeConfig(r="p/2").resolve_r(768, 2048) == 384
    assert GlobeConfig(r="3p/4").resolve_r(768, 2048) == 576
    assert GlobeConfig(r="p/2").resolve_r(14336, 4096) == 2048  # Mixtral: p > d
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


def test_phi_without_refinement_is_refused_and_refinement_settings_are_checked():
    with pytest.raises(ConfigError, match="refine_steps"):
        fit_bank(torch.randn(8, 4, 6), GlobeConfig(phi="silu", refine_steps=0))
    for bad, name in (
        (dict(budget=0.0), "budget"),
        (dict(budget=1.5), "budget"),
        (dict(refine_steps=-1), "refine_steps"),
        (dict(refine_method="lbfgs"), "refine_method"),
        (dict(refine_time_limit=0.0), "refine_time_limit"),
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
    import hashlib
    import json

    old = {k: v for k, v in default.to_dict().items()
           if k not in ("device", "budget", "refine_steps", "refine_method", "refine_time_limit", "coherence",
                        "coherence_iters")}
    assert default.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()


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
