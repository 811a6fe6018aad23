"""Time to error: GloBE's best configuration against the MoBE-style Adam baseline run to convergence.

    PYTHONPATH=python:. python bench/bench_time_to_error.py [--suites planted,clustered,lowrank_noise]
        [--budget 0.25] [--lrs 1e-3 3e-3 1e-2 3e-2 1e-1] [--sweep-time 30] [--extend 2] [--mobe-max-time 240]
        [--globe-refine-time 240] [--json curves.json] [--baseline-json earlier.json] [--search-json earlier.json]
        [--search-refine-steps 20] [--search-sample-layers L] [--refine-option cg_iters=20]
    PYTHONPATH=python:. python bench/bench_time_to_error.py --no-time-to-error --long-refine

Part 1 (default; ``--no-time-to-error`` skips it; about 10 to 15 minutes per suite with the defaults, since
both methods are run until they stop improving). For each suite (bench/synthetic_suites.py, 6 layers x 8
experts, p=96, d=384) at one budget (default 0.25), with the parameter counts of bench/bench_refine.py:

* ``mobe``: :func:`bench_refine.mobe_fit` (silu over dense softmax mixtures, Adam, random init, dense codes
  counted as n m numbers; global scope, m = n/4, no mean term, r the largest within the budget) at every
  learning rate of ``--lrs`` for ``--sweep-time`` seconds; the ``--extend``
  best of them are continued until the best error has not improved by ``--mobe-tol`` (relative) over
  ``--mobe-window`` steps, or ``--mobe-max-time`` seconds in all. The learning rate with the lowest final
  error is kept: E_mobe is that error, T_mobe the time its run took to get within 1 % of it
  (error <= 1.01 E_mobe).
* ``globe``: GloBE's configuration for the budget, chosen by :func:`globe.budget.choose_by_budget` (scope, m, r
  and the mean term, scored by short fits on a sample of experts: the AM, then ``--search-refine-steps`` (20)
  refinement steps of ``--refine-method``, since the refinement follows, on ``--search-sample-layers`` layers, all
  six by default, as four ranked the candidates of clustered at 0.5 differently from the full fit;
  ``--globe-config fixed`` takes bench_refine's instead: global, m = n/4, centred). The search's CPU time is
  printed, not added to the curve, as the baseline's learning-rate sweep is not added to its. Then the linear AM
  (:func:`globe.am.fit_bank`, weight-aware, target support 4, ``--am-steps`` steps, 2 by default: 13 more cost
  about 2 s and the refinement ends no lower, see bench_refine.py --compare) followed by
  :func:`globe.refine.refine` (``--refine-method``, default "auto", the trainer's: "varpro_gn" where the AM's
  adapters are badly conditioned, else "varpro", decided per bank by :func:`globe.refine.auto_method` and printed;
  phi = identity, the mean refitted when there is one) until it stops improving by the refinement's own early stop
  (``--globe-patience`` records, ``--eval-every`` steps apart, default 1 for the Gauss-Newton methods and 10
  otherwise, each below a relative gain of ``--globe-min-improvement``) or ``--globe-refine-time`` seconds. Its
  curve is the error against the original weights (mean included: the AM records' ``rel_error_all``, the
  refinement records' ``rel_error``) at the moment each record reaches this script, from before ``fit_bank`` is
  called: normalisation, warm start, initial bank, AM steps, metric records and the refinement are all counted.
  With scope "layer" the layers are fitted one after the other and the curve starts once every layer has its AM.

Times are CPU seconds of this process by default (``--clock cpu``; with one torch thread the same as wall time
on an idle machine, and not inflated by other processes on a shared one); ``--clock wall`` uses wall-clock
seconds. Both clocks are recorded; the table uses the chosen one. The ratio is GloBE's time to reach E_mobe
over T_mobe; the claim "GloBE reaches the baseline's final error in at most a tenth of its time" holds where
it is <= 0.1. ``--json PATH`` writes every curve. ``--baseline-json PATH`` (repeatable) takes the MoBE curves
of each suite from such an earlier output instead of running the baseline again (it must be of the same budget:
the baseline's r and m are checked); the GloBE side is then measured alone, in a few minutes per suite.

Part 2 (``--long-refine``): does GloBE beat per-expert SVD on ``planted_silu`` (budget 0.25, global) when the
refinement gets more time or phi = silu? One linear AM, then one refinement per (method, phi) for
max(``--long-times``) seconds without early stopping; the error each would return after t seconds is the best
error of its records up to t (the refinement keeps its best state).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_refine import K, mobe_fit, mobe_rank, rel, svd_error  # noqa: E402
from globe.am import fit_bank  # noqa: E402
from globe.budget import bank_mode_parameters, choose_by_budget, max_rank  # noqa: E402
from globe.config import GlobeConfig  # noqa: E402
from globe.refine import DEFAULT_LR, METHODS, SECOND_ORDER_METHODS, auto_method, refine  # noqa: E402
from synthetic_suites import make_suite  # noqa: E402

CHECKPOINTS = (1, 2, 5, 10, 20, 30, 60, 120)  # seconds at which the curves are printed


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def time_to(curve: list[dict], target: float, key: str) -> float | None:
    """First time (key: "cpu" or "wall") at which the curve's error is <= target, None if never."""
    return next((pt[key] for pt in curve if pt["err"] <= target), None)


def best_by(curve: list[dict], t: float, key: str) -> float:
    """Lowest error of the curve's points at times <= t (nan when none)."""
    errs = [pt["err"] for pt in curve if pt[key] <= t]
    return min(errs) if errs else float("nan")


def fmt_t(t: float | None) -> str:
    return "not reached" if t is None else f"{t:.1f} s"


def am_config(r: int, m: int, center: bool, args) -> GlobeConfig:
    """The linear AM of bench_refine's table (weight-aware, no held-out experts, support 4), plus --am-option."""
    return GlobeConfig(r=r, m=m, steps=args.am_steps, weight_aware=True, val_fraction=0.0, target_support=K,
                       patience=3, center=center, **args.am_options)


def parse_option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def cell_shape(W: torch.Tensor, budget: float, scope: str) -> tuple[list[torch.Tensor], int, int, int]:
    L, n, p, d = W.shape
    groups = [W.reshape(L * n, p, d)] if scope == "global" else [W[i] for i in range(L)]
    m = max(1, groups[0].shape[0] // 4)
    r = max_rank(budget, L, n, p, d, m, K, scope, True)
    return groups, m, r, mobe_rank(budget, groups[0].shape[0], p, d, m)


def mobe_curves(W: torch.Tensor, budget: float, scope: str, args) -> dict:
    """The MoBE-style baseline: every learning rate for ``--sweep-time`` seconds, then the ``--extend`` best of
    them continued (not restarted) up to ``--mobe-max-time`` seconds or their plateau. Returns {lr: {"curve",
    "final", "steps", "stopped" ("plateau" | "time cap" | "sweep only"), ...}}."""
    L, n, p, d = W.shape
    groups, m, _, r = cell_shape(W, budget, scope)
    if len(groups) != 1:
        raise SystemExit("--scope layer: the time-to-error curves are written for one group (use global)")
    runs = {lr: {"pts": [], "state": {}} for lr in args.lrs}

    def go(lr: float, seconds: float) -> None:
        run = runs[lr]
        mobe_fit(groups[0], r, m, seconds, lr=lr, curve=run["pts"], clock=args.clock,
                 plateau=(args.mobe_window, args.mobe_tol), state=run["state"])
        run["final"] = math.sqrt(run["state"]["best"])
        pts = run["pts"]
        print(f"  mobe lr {lr:g}: {run['final']:.4f} after {len(pts)} steps, {pts[-1][0]:.1f} s cpu / "
              f"{pts[-1][1]:.1f} s wall{' (plateau)' if run['state']['converged'] else ''}", flush=True)

    for lr in args.lrs:
        go(lr, min(args.sweep_time, args.mobe_max_time))
    ranked = sorted(args.lrs, key=lambda lr: runs[lr]["final"])
    extended = [lr for lr in ranked[: args.extend] if not runs[lr]["state"]["converged"]]
    for lr in extended:
        go(lr, args.mobe_max_time)
    out = {}
    for lr, run in runs.items():
        curve, best = [], float("inf")
        for c, w, e in run["pts"]:  # running best: what the fit would return if stopped then
            best = min(best, e)
            curve.append({"cpu": c, "wall": w, "err": best})
        stopped = ("plateau" if run["state"]["converged"] else
                   "time cap" if lr in extended or args.sweep_time >= args.mobe_max_time else "sweep only")
        out[lr] = {"curve": curve, "final": best, "steps": len(curve), "r": r, "m": m, "stopped": stopped,
                   "frac": (m * r * d + groups[0].shape[0] * (p * r + m)) / (L * n * p * d)}
    return out


def baseline_from_json(paths: list[str], name: str, W: torch.Tensor, budget: float, scope: str) -> dict:
    """The MoBE curves of suite ``name`` from earlier ``--json`` outputs of this script (``--baseline-json``),
    checked to be of this cell (the baseline's r and m at this budget), instead of running the baseline again."""
    _, m, _, r = cell_shape(W, budget, scope)
    for path in paths:
        try:
            with open(path) as f:
                runs = json.load(f).get("time_to_error", {}).get(name, {}).get("mobe")
        except (OSError, ValueError) as e:
            raise SystemExit(f"--baseline-json {path}: cannot read it ({e})") from None
        if not runs:
            continue
        out = {float(lr): run for lr, run in runs.items()}
        for run in out.values():
            if (run["r"], run["m"]) != (r, m):
                raise SystemExit(f"--baseline-json {path}: suite {name}'s baseline has r / m = {run['r']} / "
                                 f"{run['m']}; budget {budget} needs {r} / {m} (another budget's run?)")
        print(f"  mobe: curves of {name} from {path} (" + ", ".join(
            f"lr {lr:g}: {run['final']:.4f}, {run['stopped']}" for lr, run in out.items()) + ")", flush=True)
        return out
    raise SystemExit(f"--baseline-json: no MoBE curves of suite {name!r} in {', '.join(paths)} (expected this "
                     "script's --json output)")


def globe_setting(W: torch.Tensor, budget: float, args, name: str) -> dict:
    """GloBE's configuration of the cell: ``--globe-config budget`` (default) takes the choice of
    :func:`globe.budget.choose_by_budget` (scope, m, r, mean term; its search time is reported, not added to the
    curve, as the baseline's learning-rate sweep is not added to its), or with ``--search-json`` the choice an
    earlier ``--json`` output of this script recorded for the suite (to rerun GloBE's side with other refinement
    options without searching again); ``fixed`` is bench_refine's (global, m = n/4, centred)."""
    if args.search_json and args.globe_config == "budget":
        try:
            with open(args.search_json) as f:
                g = json.load(f)["time_to_error"][name]["globe"]
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"--search-json {args.search_json}: no GloBE choice of suite {name!r} ({e})") from None
        if bank_mode_parameters(*W.shape, g["r"], g["m"], K, g["scope"], g["center"]) > budget * W.numel():
            raise SystemExit(f"--search-json {args.search_json}: the choice of {name} exceeds budget {budget}")
        print(f"  budget search: the choice of {args.search_json}: {g['reason']}", flush=True)
        return {k: g[k] for k in ("scope", "m", "r", "center", "search_cpu", "reason")}
    if args.globe_config == "fixed":
        _, m, r, _ = cell_shape(W, budget, "global")
        return {"scope": "global", "m": m, "r": r, "center": True, "search_cpu": 0.0, "reason": "fixed"}
    c0 = time.process_time()
    # the search knows the fit refines, so it scores each candidate after the AM and a short refinement
    base = GlobeConfig(weight_aware=True, target_support=K, val_fraction=0.0, refine_method=args.refine_method,
                       refine_steps=args.search_refine_steps or None)
    choice = choose_by_budget(W, budget, base, search_refine_steps=args.search_refine_steps,
                              sample_layers=args.search_sample_layers or W.shape[0])
    win = choice.winner
    print(f"  budget search ({time.process_time() - c0:.1f} s cpu): {choice.reason}", flush=True)
    return {"scope": win["scope"], "m": win["m"], "r": win["r"], "center": win["center"],
            "search_cpu": time.process_time() - c0, "reason": choice.reason}


def globe_curve(W: torch.Tensor, budget: float, setting: dict, args) -> dict:
    """GloBE's configuration (``setting``): the linear AM, then the refinement (``--refine-method``, phi =
    identity, the mean refitted when centred), with its curve. Scope "layer" fits the layers one after the
    other (all AMs first, then the refinements, each ``--globe-refine-time`` / L seconds at most); the curve's
    error is over all layers, each at its latest state, from the moment every layer has one."""
    L, n, p, d = W.shape
    scope, m, r, center = setting["scope"], setting["m"], setting["r"], setting["center"]
    groups = [W.reshape(L * n, p, d)] if scope == "global" else [W[i] for i in range(L)]
    energy = [float(g.double().pow(2).sum()) for g in groups]
    resid: list[float | None] = [None] * len(groups)
    curve: list[dict] = []
    c0, w0 = time.process_time(), time.perf_counter()

    def stamp(stage: str, gi: int, err: float) -> None:
        resid[gi] = err**2 * energy[gi]
        if all(x is not None for x in resid):
            curve.append({"cpu": time.process_time() - c0, "wall": time.perf_counter() - w0,
                          "err": rel(sum(resid), sum(energy)), "stage": stage})

    fits = []
    for gi, Wg in enumerate(groups):
        fits.append(fit_bank(Wg, am_config(r, m, center, args),
                             callback=lambda rec, gi=gi: stamp("am", gi, rec["rel_error_all"])))
    am_err = rel(sum(float((f.reconstruct() - Wg).double().pow(2).sum()) for f, Wg in zip(fits, groups)),
                 sum(energy))
    am_cpu, am_wall = time.process_time() - c0, time.perf_counter() - w0
    final_resid, steps_run, early = 0.0, 0, True
    methods = []
    for gi, (fit, Wg) in enumerate(zip(fits, groups)):
        method, kappa = (auto_method(fit.A) if args.refine_method == "auto" else (args.refine_method, None))
        methods.append(method if kappa is None else f"auto: {method}, kappa {kappa:.2g}")
        eval_every = args.eval_every or (1 if method in SECOND_ORDER_METHODS else 10)
        res = refine(Wg, fit.bank, fit.alpha, fit.A, "identity", method=method,
                     mean=fit.normalization.mean if center else None, fit_mean=center, kmax=K, steps=10**7,
                     time_limit=args.globe_refine_time / len(groups), patience=args.globe_patience,
                     min_improvement=args.globe_min_improvement, eval_every=eval_every, lr=args.adam_lr,
                     callback=lambda rec, gi=gi: stamp("refine", gi, rec["rel_error"]), **args.refine_options)
        final_resid += float((res.reconstruct() - Wg).double().pow(2).sum())
        steps_run, early = steps_run + res.steps_run, early and res.stopped_early
    final = rel(final_resid, sum(energy))
    best = float("inf")
    for pt in curve:
        pt["err_raw"] = pt["err"]
        best = min(best, pt["err"])
        pt["err"] = best
    frac = bank_mode_parameters(L, n, p, d, r, m, K, scope, center) / (L * n * p * d)
    print(f"  globe ({scope}, m={m}, r={r}, {'centred' if center else 'no mean'}): AM {am_err:.4f} in "
          f"{am_cpu:.1f} s cpu / {am_wall:.1f} s wall, after refinement ({'; '.join(sorted(set(methods)))}) "
          f"{final:.4f} ({steps_run} steps, {'early stop' if early else 'time limit'}), total "
          f"{curve[-1]['cpu']:.1f} s cpu / {curve[-1]['wall']:.1f} s wall", flush=True)
    return {"curve": curve, "final": final, "am_final": am_err, "am_cpu": am_cpu, "am_wall": am_wall, "r": r,
            "m": m, "frac": frac, "methods": methods,
            **{k: setting[k] for k in ("scope", "center", "search_cpu", "reason")}}


def time_to_error(args) -> dict:
    clk = args.clock
    results = {}
    for name in args.suites.split(","):
        W = make_suite(name)
        print(f"\n{name}: budget {args.budget}, baseline scope {args.scope} (load {load()})", flush=True)
        mobe = (baseline_from_json(args.baseline_json, name, W, args.budget, args.scope) if args.baseline_json
                else mobe_curves(W, args.budget, args.scope, args))
        globe = globe_curve(W, args.budget, globe_setting(W, args.budget, args, name), args)
        results[name] = {"mobe": mobe, "globe": globe}

    print(f"\n### Time to error ({clk} seconds; budget {args.budget}, baseline scope {args.scope}, 6 layers x 8 "
          "experts)\n")
    print("| cell | MoBE r / m, params | MoBE lr | MoBE final error | MoBE time to final (1 %) | GloBE scope, mean, "
          "r / m, params | GloBE final error | GloBE time to MoBE's final error | ratio (GloBE / MoBE) | "
          "claim (<= 0.1) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        lr, mb = min(res["mobe"].items(), key=lambda kv: kv[1]["final"])
        e_mobe = mb["final"]
        t_mobe = time_to(mb["curve"], 1.01 * e_mobe, clk)
        gl = res["globe"]
        t_globe = time_to(gl["curve"], e_mobe, clk)
        ratio = None if t_globe is None or not t_mobe else t_globe / t_mobe
        cap = "" if mb["stopped"] == "plateau" else f" ({mb['stopped']})"
        print(f"| {name} | {mb['r']} / {mb['m']}, {mb['frac']:.3f} | {lr:g}{cap} | {e_mobe:.4f} | {fmt_t(t_mobe)} | "
              f"{gl['scope']}, {'mean' if gl['center'] else 'no mean'}, {gl['r']} / {gl['m']}, {gl['frac']:.3f} | "
              f"{gl['final']:.4f} | {fmt_t(t_globe)} | "
              f"{'-' if ratio is None else f'{ratio:.3f}'} | "
              f"{'yes' if ratio is not None and ratio <= 0.1 else 'no'} |")

    print(f"\n### MoBE learning-rate sweep (final error; {clk} seconds run)\n")
    print("| cell | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |")
    print("|---|" + "---|" * len(args.lrs))
    for name, res in results.items():
        cells = [f"{v['final']:.4f} ({v['curve'][-1][clk]:.0f} s, {v['stopped']})" for v in res["mobe"].values()]
        print(f"| {name} | " + " | ".join(cells) + " |")

    print(f"\n### Error against time (best so far at each {clk} time; '-' before the first record)\n")
    print("| cell | method | " + " | ".join(f"{t} s" for t in CHECKPOINTS) + " | final |")
    print("|---|---|" + "---|" * len(CHECKPOINTS) + "---|")
    for name, res in results.items():
        lr, mb = min(res["mobe"].items(), key=lambda kv: kv[1]["final"])
        gl = res["globe"]
        for label, curve, final in ((f"mobe lr {lr:g}", mb["curve"], mb["final"]),
                                    (f"globe am+{args.refine_method}", gl["curve"], gl["final"])):
            end = curve[-1][clk]
            cells = []
            for t in CHECKPOINTS:
                e = best_by(curve, t, clk)
                cells.append("-" if math.isnan(e) else ("" if t > end else f"{e:.4f}"))
            print(f"| {name} | {label} | " + " | ".join(cells) + f" | {final:.4f} ({end:.1f} s) |")
    for name, res in results.items():
        gl = res["globe"]
        print(f"\n{name}: GloBE's configuration: {gl['reason']} (search {gl['search_cpu']:.1f} s cpu, not in the "
              f"curve); refinement: {', '.join(gl['methods'])}")
        am_end = max(pt[clk] for pt in gl["curve"] if pt["stage"] == "am")
        recs = ", ".join(f"{pt[clk]:.1f}: {pt['err']:.4f}" for pt in gl["curve"] if pt["stage"] == "am")
        print(f"\n{name}: GloBE's linear AM ends at {am_end:.1f} s with {gl['am_final']:.4f}; its records "
              f"(s: error): {recs}")
    return results


def long_refine(args) -> dict:
    W = make_suite("planted_silu")
    L, n, p, d = W.shape
    Wg = W.reshape(L * n, p, d)
    err, frac_svd, _, k_svd = svd_error(Wg, args.budget)
    svd = rel(err, float(Wg.double().pow(2).sum()))
    groups, m, r, _ = cell_shape(W, args.budget, "global")
    print(f"\nplanted_silu: budget {args.budget}, global, r={r}, m={m} (load {load()})", flush=True)
    c0, w0 = time.process_time(), time.perf_counter()
    fit = fit_bank(Wg, am_config(r, m, True, args))
    am_cpu, am_wall = time.process_time() - c0, time.perf_counter() - w0
    am_err = rel(float((fit.reconstruct() - Wg).double().pow(2).sum()), float(Wg.double().pow(2).sum()))
    frac = bank_mode_parameters(L, n, p, d, r, m, K, "global", True) / (L * n * p * d)
    print(f"  AM {am_err:.4f} in {am_cpu:.1f} s cpu / {am_wall:.1f} s wall", flush=True)
    runs = {}
    for method in args.long_methods:
        for phi in args.long_phis:
            for lr in (args.long_lrs if method == "adam" else [None]):
                label = f"{method}:{phi}" + (f" lr {lr:g}" if lr is not None else "")
                pts: list[dict] = []
                c1 = time.process_time()
                res = refine(Wg, fit.bank, fit.alpha, fit.A, phi, method=method, mean=fit.normalization.mean,
                             fit_mean=True, kmax=K, steps=10**7, time_limit=max(args.long_times), patience=10**9,
                             eval_every=1 if method in SECOND_ORDER_METHODS else args.eval_every or 10,
                             lr=lr or args.adam_lr or DEFAULT_LR.get(method),
                             callback=lambda rec, pts=pts, c1=c1: pts.append(
                                 {"cpu": time.process_time() - c1, "wall": rec["time_s"], "err": rec["rel_error"]}))
                runs[label] = {"curve": pts, "final": res.rel_error, "steps": res.steps_run}
                print(f"  {label}: {res.rel_error:.5f} after {res.steps_run} steps", flush=True)
    clk = args.clock
    print(f"\n### planted_silu, budget {args.budget}, global: refinement time against per-expert SVD "
          f"({clk} seconds of refinement after the AM)\n")
    print(f"per-expert SVD (rank {k_svd}, params {frac_svd:.3f}): {svd:.4f}; linear AM (r={r}, m={m}, params "
          f"{frac:.3f}): {am_err:.4f} in {am_cpu:.1f} s cpu / {am_wall:.1f} s wall\n")
    print("| refinement | " + " | ".join(f"{t:g} s" for t in args.long_times) + " | beats SVD from | steps run "
          "(cpu s / wall s) |")
    print("|---|" + "---|" * len(args.long_times) + "---|---|")
    for label, run in runs.items():
        cells = [f"{best_by(run['curve'], t, clk):.4f}" for t in args.long_times]
        first = time_to(run["curve"], svd * (1 - 1e-9), clk)
        end = run["curve"][-1]
        print(f"| {label} | " + " | ".join(cells) + f" | {fmt_t(first)} | {run['steps']} ({end['cpu']:.1f} / "
              f"{end['wall']:.1f}) |")
    return {"svd": svd, "am": am_err, "am_cpu": am_cpu, "am_wall": am_wall, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="planted,clustered,lowrank_noise")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--scope", default="global", choices=["global"], help="the baseline's scope")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    ap.add_argument("--sweep-time", type=float, default=30.0, help="seconds of every MoBE learning rate")
    ap.add_argument("--extend", type=int, default=2, help="best learning rates of the sweep continued")
    ap.add_argument("--mobe-max-time", type=float, default=240.0, help="seconds per continued MoBE run at most")
    ap.add_argument("--mobe-window", type=int, default=500, help="plateau window (steps)")
    ap.add_argument("--mobe-tol", type=float, default=1e-3, help="relative improvement over the window")
    ap.add_argument("--globe-config", choices=["budget", "fixed"], default="budget",
                    help="GloBE's scope, m, r and mean term: chosen by the budget search, or bench_refine's")
    ap.add_argument("--am-steps", type=int, default=2, help="weight-aware AM steps before the refinement")
    ap.add_argument("--search-refine-steps", type=int, default=20,
                    help="refinement steps of --refine-method each budget-search candidate is scored after "
                         "(0: the AM alone)")
    ap.add_argument("--search-sample-layers", type=int, default=None,
                    help="layers the budget search scores its candidates on (default: all of the suite's)")
    ap.add_argument("--refine-method", choices=list(METHODS), default="auto")
    ap.add_argument("--am-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra GlobeConfig field of the linear AM (repeatable), e.g. support_search=1")
    ap.add_argument("--globe-refine-time", type=float, default=240.0, help="seconds of refinement at most")
    ap.add_argument("--globe-patience", type=int, default=50, help="refinement records without improvement")
    ap.add_argument("--globe-min-improvement", type=float, default=2e-5,
                    help="relative improvement per record that counts (50 x 2e-5: 0.1 %% over 500 Adam steps)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="refinement steps between records (default 1 for gn and varpro_gn, 10 otherwise)")
    ap.add_argument("--adam-lr", type=float, default=None,
                    help="the refinement's (relative) learning rate (default: the method's DEFAULT_LR)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--no-time-to-error", action="store_true", help="skip part 1")
    ap.add_argument("--long-refine", action="store_true", help="run part 2 (planted_silu against SVD)")
    ap.add_argument("--long-times", type=float, nargs="+", default=[3.0, 10.0, 30.0])
    ap.add_argument("--long-phis", nargs="+", default=["identity", "tanh", "silu"])
    ap.add_argument("--long-methods", nargs="+", default=["adam", "gn"])
    ap.add_argument("--long-lrs", type=float, nargs="+", default=[1e-2], help="Adam learning rates of part 2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the curves here")
    ap.add_argument("--search-json", metavar="PATH",
                    help="take GloBE's configuration from this earlier --json output instead of searching again")
    ap.add_argument("--refine-option", action="append", default=[], metavar="KEY=VALUE",
                    help="keyword argument of globe.refine.refine for GloBE's refinement (e.g. cg_iters=20)")
    ap.add_argument("--baseline-json", action="append", default=[], metavar="PATH",
                    help="take the MoBE curves from this earlier --json output (same budget) instead of running "
                         "the baseline; may be repeated")
    args = ap.parse_args()
    args.am_options = dict(parse_option(o) for o in args.am_option)
    args.refine_options = dict(parse_option(o) for o in args.refine_option)
    torch.set_num_threads(args.threads)
    t_all, c_all = time.perf_counter(), time.process_time()
    print(f"## bench_time_to_error ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M')}, load average at start {load()})")
    print(f"linear AM: fit_bank(weight_aware=True, steps={args.am_steps}, target_support={K}, patience=3"
          + "".join(f", {k}={v!r}" for k, v in args.am_options.items()) + f"); refinement {args.refine_method}, "
          f"lr {'the method default' if args.adam_lr is None else args.adam_lr}"
          + "".join(f", {k}={v!r}" for k, v in args.refine_options.items()) + "; GloBE configuration: "
          f"{args.globe_config}" + (f" from {args.search_json}" if args.search_json else ""))
    out = {}
    if not args.no_time_to_error:
        out["time_to_error"] = time_to_error(args)
    if args.long_refine:
        out["long_refine"] = long_refine(args)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s wall, {time.process_time() - c_all:.0f} s cpu; "
          f"load average at end {load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, default=lambda x: str(x))


if __name__ == "__main__":
    main()
