"""Tests of globe.budget: the parameter count of bank mode and the budget-driven choice of r, m and scope."""

from __future__ import annotations

import pytest
import torch
from globe.budget import bank_mode_parameters, choose_by_budget, max_rank, parameter_fraction
from globe.config import GlobeConfig
from globe.synthetic import planted_experts


def test_parameter_count_by_hand():
    L, n, p, d, r, m, k = 3, 8, 6, 10, 4, 2, 2
    glob = m * r * d + L * n * p * r + 2 * L * n * k + p * d
    assert bank_mode_parameters(L, n, p, d, r, m, k, "global", True) == glob
    assert bank_mode_parameters(L, n, p, d, r, m, k, "global", False) == glob - p * d
    layer = L * (m * r * d + n * p * r + 2 * n * k + p * d)
    assert bank_mode_parameters(L, n, p, d, r, m, k, "layer", True) == layer
    assert bank_mode_parameters(L, n, p, d, r, 1, 5, "layer", False) == L * (r * d + n * p * r + 2 * n * 1)
    with pytest.raises(ValueError):
        bank_mode_parameters(L, n, p, d, r, m, k, "model", True)


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_max_rank_is_the_largest_within_budget(budget, scope):
    L, n, p, d = 4, 8, 12, 40
    for m in (1, 2, 4):
        for center in (True, False):
            r = max_rank(budget, L, n, p, d, m, 4, scope, center)
            if r > 0:
                assert parameter_fraction(L, n, p, d, r, m, 4, scope, center) <= budget
            if r < d:  # r may exceed p (up to d)
                assert parameter_fraction(L, n, p, d, r + 1, m, 4, scope, center) > budget


@pytest.fixture(scope="module")
def layers():
    return list(planted_experts(3, 8, 12, 40, seed=1, families=("gate",)).weights["gate"].unbind(0))


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_choice_respects_budget_and_records_candidates(layers, budget):
    base = GlobeConfig(target_support=2, steps=3)
    told = []
    choice = choose_by_budget(layers, budget, base, fitter="quick", search_steps=0, sample_experts=8,
                              callback=told.append)
    scored = [c for c in choice.candidates if c["status"] == "scored"]
    # the progress callback: once per scored candidate, in order, with its numbers
    assert [t["scored"] for t in told] == list(range(1, len(scored) + 1))
    assert all(t["total"] == len(scored) for t in told)
    assert [(t["scope"], t["m"], t["r"], t["rel_error"]) for t in told] == [
        (c["scope"], c["m"], c["r"], c["rel_error"]) for c in scored]
    assert scored and all(c["param_fraction"] <= budget for c in scored)
    assert {c["scope"] for c in scored} == {"global", "layer"}
    assert {c["center"] for c in scored} == {True, False}
    assert all(c["rel_error"] == c["rel_error"] and 0 < c["rel_error"] < 1.5 for c in scored)
    win = choice.winner
    assert win["rel_error"] == min(c["rel_error"] for c in scored)
    cfg = choice.config
    assert (cfg.r, cfg.m, cfg.scope, cfg.center) == (win["r"], win["m"], win["scope"], win["center"])
    # entmax codes are counted with m slots (the target support is not a cap), topk codes with top_k
    assert all(c["k"] == c["m"] and c["k_fit"] == min(2, c["m"]) for c in scored)
    assert parameter_fraction(3, 8, 12, 40, cfg.r, cfg.m, cfg.m, cfg.scope, cfg.center) <= budget
    assert "lowest sampled relative error" in choice.reason
    d = choice.to_dict()
    assert d["budget"] == budget and len(d["candidates"]) == len(choice.candidates)
    assert cfg.target_support == 2  # the rest of the base config is kept


def test_choice_with_the_trainer_and_a_tensor(layers):
    W = torch.stack(layers)
    choice = choose_by_budget(W, 0.3, GlobeConfig(target_support=2), search_steps=1, scopes=("global",),
                              centers=(True,))
    assert choice.fitter == "fit_bank"
    assert choice.winner["param_fraction"] <= 0.3 and choice.config.scope == "global"


def test_search_scores_with_the_configured_refinement(layers):
    """With a refinement in the base config each candidate is scored after the AM and at most
    search_refine_steps refinement steps; the refinement keeps its best state, so no candidate scores worse than
    by the AM alone. At half the parameters the candidates include r > p (p = 12)."""
    kw = dict(search_steps=2, scopes=("global",), centers=(False,), sample_experts=8)
    base = GlobeConfig(target_support=2, val_fraction=0.0)
    am_only = choose_by_budget(layers, 0.5, base, **kw)
    refined = choose_by_budget(layers, 0.5, base.replace(refine_steps=40, refine_method="varpro_gn"),
                               search_refine_steps=3, **kw)
    assert am_only.refine_steps == 0 and "after the AM alone" in am_only.reason
    assert refined.refine_steps == 3 and "after the AM and 3 refinement steps" in refined.reason
    assert refined.to_dict()["refine_steps"] == 3
    assert refined.config.refine_steps == 40  # the fit itself keeps the configured refinement
    before = {(c["m"], c["r"]): c["rel_error"] for c in am_only.candidates if c["status"] == "scored"}
    after = {(c["m"], c["r"]): c["rel_error"] for c in refined.candidates if c["status"] == "scored"}
    assert before.keys() == after.keys() and any(r > 12 for _, r in before)
    assert all(after[k] <= before[k] * (1 + 1e-5) for k in before)
    assert sum(after[k] < 0.99 * before[k] for k in before) >= 2  # the refinement moved them
    with pytest.raises(ValueError, match="search_refine_steps"):
        choose_by_budget(layers, 0.5, base, search_refine_steps=-1)


def test_infeasible_budget_and_time_limit(layers):
    with pytest.raises(ValueError, match="even r = 1"):
        choose_by_budget(layers, 0.01, GlobeConfig(), fitter="quick")
    with pytest.raises(ValueError):
        choose_by_budget(layers, 0.0, GlobeConfig())
    choice = choose_by_budget(layers, 0.4, GlobeConfig(target_support=2), fitter="quick", search_steps=1,
                              time_limit=0.0)
    # the first candidate is scored before the limit is checked again; the others are recorded as skipped
    assert any(c["status"] == "skipped" for c in choice.candidates)
    assert "skipped by the time limit" in choice.reason


def test_topk_codes_are_counted_with_top_k_slots(layers):
    choice = choose_by_budget(layers, 0.4, GlobeConfig(sparsity="topk", top_k=2), fitter="quick", search_steps=0,
                              sample_experts=8)
    scored = [c for c in choice.candidates if c["status"] == "scored"]
    assert scored and all(c["k"] == min(2, c["m"]) for c in scored)
