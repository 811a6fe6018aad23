"""Budget mode: choose r, m, the scope and the mean term for a fraction of the original gate/up parameters.

``choose_by_budget(W_by_layer or checkpoint, budget, base_config)`` counts, for every candidate, everything
bank mode stores for one family (the count is the same for gate and up):

    scope "global":  m r d (bank) + L n p r (adapters) + 2 L n k (codes: values + indices)
                     + p d (mean, if centred)
    scope "layer":   L (m r d + n p r + 2 n k + p d [if centred])

against the original L n p d (L MoE layers, n experts each, experts p x d; k = code slots per expert; the
normalisation scale is folded into the adapters and costs nothing). k is what the fit can store, not what it
aims for: top_k with sparsity "topk" (a hard cap), but m with the entmax codes, since the target support is a
median the temperature steers toward and a code may hold more atoms (on bench/synthetic_suites.py's clustered
experts, r 47, m 12, the weight-aware AM at a target of 4 ends with codes of 6 atoms at the median and up to
10). Counting m keeps the budget a bound on the artifact, for 2 L n (m - k) numbers more: 3.6e-5 of the experts
of a Qwen3-30B-A3B-sized model (L 48, n 128, p 768, d 2048, m 32, k 4). The quick fitter caps its codes at the
target support.

Candidates: each scope (global only with more than one layer), the mean term on or off, and m from
the presets {n/8, n/4, n/2} of the scope plus 1 and 2; for each, r is the largest that keeps the fraction
within the budget (at most d: r > p is allowed, see :mod:`globe.config`; a candidate with no r >= 1 is
infeasible and not fitted).

Each feasible candidate is scored by a short linear fit on a sample of experts: ``sample_layers`` evenly
spaced MoE layers and ``sample_experts`` evenly spaced experts of each. The sample keeps the candidate's r
and its experts per atom (m scaled by sampled experts in scope / experts in scope, at least 1), so the
error estimates the full fit at the same r and sharing. The error is the relative Frobenius error against the
sampled weights themselves (mean term included), over the layers for scope "layer". The fit is
:func:`globe.am.fit_bank` with ``steps=search_steps`` (or, with ``fitter="quick"`` or when the trainer cannot
run, :func:`globe.refine.linear_warm_start`; the choice records which). When ``base_config`` asks for a
refinement (``refine_steps``), the fit also refines, for at most ``search_refine_steps`` of its steps (0: the
AM alone): the refinement ranks the candidates differently from the AM. On bench/synthetic_suites.py's
lowrank_noise at half the parameters the AM alone ranks one global atom of r = 177 first: a single shared row
space, which the refinement cannot improve and which never gets near what 6 atoms of r = 127 reach once refined
(bench/RESULTS.md, time to error). The candidate with the lowest sampled error wins; candidates not scored
within ``time_limit`` seconds are recorded as skipped (the first feasible one is always scored).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from globe.config import M_PRESETS, GlobeConfig

__all__ = ["BudgetChoice", "choose_by_budget", "bank_mode_parameters", "parameter_fraction", "max_rank"]


def bank_mode_parameters(L: int, n: int, p: int, d: int, r: int, m: int, k: int, scope: str,
                         center: bool) -> int:
    """Numbers stored in bank mode for one family (see the module docstring)."""
    k = min(k, m)
    per_scope_mean = p * d if center else 0
    if scope == "global":
        return m * r * d + L * n * p * r + 2 * L * n * k + per_scope_mean
    if scope == "layer":
        return L * (m * r * d + n * p * r + 2 * n * k + per_scope_mean)
    raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


def parameter_fraction(L: int, n: int, p: int, d: int, r: int, m: int, k: int, scope: str,
                       center: bool) -> float:
    """bank_mode_parameters / (L n p d)."""
    return bank_mode_parameters(L, n, p, d, r, m, k, scope, center) / (L * n * p * d)


def max_rank(budget: float, L: int, n: int, p: int, d: int, m: int, k: int, scope: str, center: bool) -> int:
    """The largest r in [0, d] whose parameter fraction is within budget (0: none)."""
    fixed = bank_mode_parameters(L, n, p, d, 0, m, k, scope, center)
    per_r = bank_mode_parameters(L, n, p, d, 1, m, k, scope, center) - fixed
    room = budget * L * n * p * d - fixed
    r = int(math.floor(room / per_r + 1e-9)) if room > 0 else 0
    r = min(max(r, 0), d)
    while r > 0 and parameter_fraction(L, n, p, d, r, m, k, scope, center) > budget:
        r -= 1
    return r


@dataclass
class BudgetChoice:
    """The configuration chosen for a budget and how it was chosen.

    config: base_config with r, m (integers for the full model), scope and center set. candidates: one dict
    per candidate {scope, center, m, r, k, param_fraction, params, status ("scored" | "infeasible" |
    "skipped"), rel_error, m_sample, n_sample, fit_time_s}. winner: the winning candidate's dict. reason: why
    it won, in words. fitter: "fit_bank" or "quick". refine_steps: the refinement steps each candidate's fit
    took at most (0: scored by the AM alone).
    """

    config: GlobeConfig
    budget: float
    candidates: list[dict[str, Any]]
    winner: dict[str, Any]
    reason: str
    fitter: str
    search_time_s: float
    refine_steps: int = 0
    shapes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "chosen": {k: self.winner[k] for k in ("scope", "center", "r", "m", "k", "params", "param_fraction",
                                                   "rel_error")},
            "reason": self.reason,
            "fitter": self.fitter,
            "search_time_s": self.search_time_s,
            "refine_steps": self.refine_steps,
            "shapes": dict(self.shapes),
            "candidates": [dict(c) for c in self.candidates],
        }


def _even(n: int, k: int) -> list[int]:
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def _load_layers(source: Any, family: str) -> tuple[list[torch.Tensor] | None, Any, list[Any]]:
    """(tensors per layer or None if read lazily, checkpoint or None, layer keys)."""
    if isinstance(source, (str, Path)):
        from globe.io import open_checkpoint

        ckpt = open_checkpoint(source)
        return None, ckpt, list(ckpt.moe_layers)
    if isinstance(source, Mapping):
        keys = list(source.keys())
        return [source[k] for k in keys], None, keys
    if isinstance(source, torch.Tensor):
        if source.dim() != 4:
            raise ValueError(f"a tensor of experts must be [L, n, p, d], got shape {tuple(source.shape)}")
        return list(source.unbind(0)), None, list(range(source.shape[0]))
    if isinstance(source, Sequence):
        return list(source), None, list(range(len(source)))
    raise TypeError(f"expected experts per layer (dict, list, [L, n, p, d] tensor) or a checkpoint path, got "
                    f"{type(source).__name__}")


def _rel_error(W: torch.Tensor, W_hat: torch.Tensor) -> tuple[float, float]:
    """(squared error, energy) in float64."""
    return float((W.double() - W_hat.double()).pow(2).sum()), float(W.double().pow(2).sum())


def _fit_error(W: torch.Tensor, cfg: GlobeConfig, r: int, m: int, k: int, fitter: str,
               gen: torch.Generator) -> tuple[float, float, str]:
    """Squared error and energy of a short linear fit of W [N, p, d] (mean term as cfg.center says)."""
    if fitter == "fit_bank":
        try:
            from globe.am import fit_bank

            fit = fit_bank(W, cfg.replace(r=r, m=m), generator=gen)
            e, n = _rel_error(W, fit.reconstruct())
            return e, n, "fit_bank"
        except ImportError:
            fitter = "quick"
    from globe.refine import linear_warm_start

    mean = W.mean(0) if cfg.center else torch.zeros_like(W[0])
    bank, alpha, A = linear_warm_start(W - mean, r, m, k, iters=cfg.steps, generator=gen)
    from globe_kernels import ops

    e, n = _rel_error(W, A @ ops.compose(bank, alpha) + mean)
    return e, n, "quick"


def choose_by_budget(
    source: Any,
    budget: float,
    base_config: GlobeConfig | None = None,
    *,
    family: str = "gate",
    sample_experts: int = 16,
    sample_layers: int = 4,
    search_steps: int = 5,
    search_refine_steps: int = 10,
    time_limit: float | None = None,
    fitter: str = "fit_bank",
    scopes: Sequence[str] = ("global", "layer"),
    centers: Sequence[bool] = (True, False),
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> BudgetChoice:
    """Pick r, m, scope and the mean term for ``budget`` (fraction of the original gate/up parameters).

    source: experts of one family per MoE layer (dict layer -> [n, p, d], a list of them, or an [L, n, p, d]
    tensor) or a checkpoint folder (``family`` is read from it). base_config gives everything else (sparsity,
    target support, seeding, device, seed). See the module docstring for the count, the candidates and the
    scoring. callback, when given, is called after each candidate is scored with {"scored", "total" (the
    candidates to score), "scope", "center", "m", "r", "rel_error", "fit_time_s"} (progress for a long search).
    """
    if not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    if fitter not in ("fit_bank", "quick"):
        raise ValueError(f"fitter must be 'fit_bank' or 'quick', got {fitter!r}")
    if isinstance(search_refine_steps, bool) or not isinstance(search_refine_steps, int) or search_refine_steps < 0:
        raise ValueError(f"search_refine_steps must be an integer >= 0, got {search_refine_steps!r}")
    base = base_config or GlobeConfig()
    score_refine = min(base.refine_steps or 0, search_refine_steps) or None
    t0 = time.perf_counter()
    tensors, ckpt, keys = _load_layers(source, family)
    if ckpt is not None:
        L, n, p, d = len(keys), ckpt.num_experts, ckpt.expert_dim, ckpt.hidden_size
    else:
        if not tensors:
            raise ValueError("no layers given")
        L = len(tensors)
        n, p, d = tensors[0].shape
        for t in tensors:
            if tuple(t.shape) != (n, p, d):
                raise ValueError(f"every layer must hold [n, p, d] = {(n, p, d)} experts, got "
                                 f"{tuple(t.shape)}")
    topk = base.sparsity == "topk" and bool(base.top_k)
    k_fit = base.top_k if topk else base.target_support  # the quick fitter's cap on each code
    layer_sel = _even(L, sample_layers)
    expert_sel = _even(n, sample_experts)
    dev, dt = torch.device(base.device), base.torch_dtype

    def layer_sample(i: int) -> torch.Tensor:
        W = ckpt.read(family, keys[i]) if ckpt is not None else tensors[i]
        return W[expert_sel].to(device=dev, dtype=dt)

    sample = [layer_sample(i) for i in layer_sel]
    n_s = len(expert_sel)
    scopes = [s for s in scopes if s == "layer" or L > 1]

    candidates: list[dict[str, Any]] = []
    for scope in scopes:
        n_scope = n * L if scope == "global" else n
        n_scope_s = n_s * len(layer_sel) if scope == "global" else n_s
        ms = {max(1, (n_scope * a) // b) for a, b in M_PRESETS.values()} | {1, 2}
        for center in centers:
            for m in sorted(x for x in ms if x <= n_scope):
                k = min(k_fit if topk else m, m)  # slots counted: see the module docstring
                r = max_rank(budget, L, n, p, d, m, k, scope, center)
                cand = {"scope": scope, "center": center, "m": m, "r": r, "k": k, "k_fit": min(k_fit, m)}
                if r < 1:
                    cand.update(status="infeasible", param_fraction=float("nan"), params=0,
                                rel_error=float("nan"))
                else:
                    cand["params"] = bank_mode_parameters(L, n, p, d, r, m, k, scope, center)
                    cand["param_fraction"] = cand["params"] / (L * n * p * d)
                    cand["m_sample"] = max(1, min(n_scope_s, round(m * n_scope_s / n_scope)))
                    cand["n_sample"] = n_scope_s
                    cand.update(status="pending", rel_error=float("nan"))
                candidates.append(cand)

    used = fitter
    gen = torch.Generator().manual_seed(base.seed)
    n_scored = 0
    n_pending = sum(c["status"] == "pending" for c in candidates)
    for cand in candidates:
        if cand["status"] != "pending":
            continue
        if time_limit is not None and n_scored and time.perf_counter() - t0 > time_limit:
            cand["status"] = "skipped"
            continue
        t = time.perf_counter()
        cfg = base.replace(scope=cand["scope"], center=cand["center"], steps=search_steps, phi="identity",
                           refine_steps=score_refine)
        err = energy = 0.0
        groups = [torch.cat(sample, 0)] if cand["scope"] == "global" else sample
        r_s = min(cand["r"], d)
        for Wg in groups:
            e, en, used = _fit_error(Wg, cfg, r_s, cand["m_sample"], cand["k_fit"], used, gen)
            err, energy = err + e, energy + en
        cand["rel_error"] = math.sqrt(err / max(energy, 1e-300))
        cand["fit_time_s"] = time.perf_counter() - t
        cand["status"] = "scored"
        n_scored += 1
        if callback is not None:
            callback({"scored": n_scored, "total": n_pending,
                      **{k: cand[k] for k in ("scope", "center", "m", "r", "rel_error", "fit_time_s")}})

    scored = sorted((c for c in candidates if c["status"] == "scored"), key=lambda c: c["rel_error"])
    if not scored:
        raise ValueError(
            f"no candidate fits a budget of {budget} of the original parameters "
            f"(L={L}, n={n}, p={p}, d={d}): "
            "even r = 1 exceeds it" if all(c["status"] == "infeasible" for c in candidates)
            else "the time limit ran out before any candidate was scored"
        )
    win = scored[0]
    runner = scored[1] if len(scored) > 1 else None
    refined = score_refine if used == "fit_bank" else None  # the quick fitter does not refine
    how = f"the AM and {refined} refinement steps" if refined else "the AM alone"
    reason = (
        f"lowest sampled relative error {win['rel_error']:.4f} (after {how}) among {len(scored)} scored candidates "
        f"(scope={win['scope']}, center={win['center']}, m={win['m']}, r={win['r']}, parameter fraction "
        f"{win['param_fraction']:.4f} <= budget {budget})"
    )
    if runner is not None:
        reason += (f"; runner-up scope={runner['scope']}, center={runner['center']}, m={runner['m']}, "
                   f"r={runner['r']} at {runner['rel_error']:.4f}")
    n_inf = sum(c["status"] == "infeasible" for c in candidates)
    n_skip = sum(c["status"] == "skipped" for c in candidates)
    if n_inf or n_skip:
        reason += f"; {n_inf} infeasible, {n_skip} skipped by the time limit"
    config = base.replace(r=int(win["r"]), m=int(win["m"]), scope=win["scope"], center=bool(win["center"]))
    return BudgetChoice(
        config=config, budget=float(budget), candidates=candidates, winner=win, reason=reason, fitter=used,
        search_time_s=time.perf_counter() - t0, refine_steps=refined or 0,
        shapes={"layers": L, "experts": n, "p": p, "d": d, "sample_layers": len(layer_sel),
                "sample_experts": n_s},
    )
