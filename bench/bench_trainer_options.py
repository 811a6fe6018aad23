"""What the trainer's robustness and quality options buy, and at what cost: restarts, the final pass over held-out
experts, the fitted mean, and the weight-aware moves.

    PYTHONPATH=python:. python bench/bench_trainer_options.py \
        [--sections restarts,final,mean,moves,solver,supports,supports_refined,refine_val]

Sections (relative Frobenius errors against the original weights, wall seconds, ``--threads`` torch threads):

* ``restarts``: the ten planted sets of tests/test_am.py (no shared mean, fitted uncentred, weight-aware with the
  support search and spectral bank); each set's error over its noise floor (the error of the noiseless truth)
  for one fit and for the best of ``--restarts`` (GlobeConfig.restarts). Within 1.3x counts as reaching the
  floor.
* ``final``: bench/bench_quality.py's planted data (N=64, p=64, d=128), r=32, m=16, 10 % of the experts held
  out for validation; GlobeConfig.final_steps 0 (held-out experts fitted with the bank frozen) against 3 (they
  join the dictionary step after the validated phase), in the weight-aware and the proxy mode. Errors of the
  held-out experts, of the others, and in all.
* ``mean``: bench/synthetic_suites.py's clustered family (6 layers x 8 experts, p=96, d=384), budget 0.25,
  global scope (r=43, m=12), no held-out experts, 40 weight-aware steps without the moves; GlobeConfig.fit_mean
  off and on; then the same on section final's data with its held-out experts (validation error at the step
  early stopping keeps).
* ``moves``: the experts `globe demo` plants (gate family, 4 layers x 32 experts, p=128, d=256), with the
  demo's settings (8 steps, patience 3, r=p/2, m=n/4): the proxy mode, the weight-aware mode, and the
  weight-aware mode with the support search and spectral bank (GlobeConfig.support_search, spectral_bank).
  The last takes a few minutes.
* ``solver``: the weight-aware steps solved densely ((m r)^2 bank system) and matrix-free
  (GlobeConfig.weight_aware_solver "dense" / "cg"): first on the four synthetic suites at budget 0.5, global
  scope (r=95, m=12, no mean, 6 weight-aware steps), where both fit; then on a bank the dense solver refuses
  (lowrank_noise with 32 layers x 32 experts, r=64, m=512: a dense system of side 32768), against the proxy
  mode at the same r and m.
* ``supports``: how many atoms the codes keep. The four synthetic suites (global scope, r=47, m=12, no mean, no
  held-out experts, the default 30 steps with early stopping) in the proxy mode and the weight-aware mode with
  entmax codes at target support 4 (a median the temperature aims at), and the weight-aware mode with the codes
  capped at 4 (sparsity "topk"): error, median and largest support (what bank mode composes per expert).
* ``supports_refined``: the same two weight-aware code modes through the trainer's whole path with the
  refinement (2 AM steps, then ``refine_method`` "auto" for ``--refine-val-time`` seconds, no held-out experts, no
  mean, as bench_time_to_error's GloBE side) at budgets ``--supports-budgets`` (r from the budget at m=12):
  error, median and largest support of the refined codes (the refinement keeps at most the AM's largest
  support), wall seconds.
* ``refine_val``: the refinement with the trainer's default held-out experts (val_fraction 0.1, final_steps 3)
  against none. The synthetic suites at r=47, m=12, global, the default mean, 2 weight-aware AM steps, then
  ``--refine-val-steps`` refinement steps of varpro_gn (ten times as many of varpro) within ``--refine-val-time``
  seconds: steps run and best step of the validated stage, its training and held-out errors at its start and last
  step, steps of the pass over all experts, the error over all experts and the wall time. Only the public API, so
  the same file measures an earlier commit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from globe import GlobeConfig, fit_bank  # noqa: E402
from globe.budget import max_rank  # noqa: E402
from globe.synthetic import planted_experts  # noqa: E402
from synthetic_suites import make_suite  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def timed_fit(W: torch.Tensor, **config) -> tuple:
    t0 = time.perf_counter()
    fit = fit_bank(W, GlobeConfig(**config))
    return fit, time.perf_counter() - t0


def restarts(args) -> None:
    # the planted sets the trainer's tests use (tests/test_am.py: planted, PLANTED_CONFIG)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_am import PLANTED_CONFIG, planted

    print(f"\n### Restarts: planted sets of tests/test_am.py, error / noise floor (best of {args.restarts})\n")
    print(f"| set | one fit | best of {args.restarts} | seconds (one / best of) |")
    print("|---|---|---|---|")
    hits = [0, 0]
    for seed in range(10):
        W, clean = planted(seed=seed)
        floor = rel(clean, W)
        one, t1 = timed_fit(W, **PLANTED_CONFIG)
        best, tn = timed_fit(W, **PLANTED_CONFIG, restarts=args.restarts)
        r1, rn = rel(one.reconstruct(), W) / floor, rel(best.reconstruct(), W) / floor
        hits[0] += r1 <= 1.3
        hits[1] += rn <= 1.3
        print(f"| {seed} | {r1:.2f} | {rn:.2f} | {t1:.1f} / {tn:.1f} |")
    print(f"\nwithin 1.3x of the floor: {hits[0]} of 10 with one fit, {hits[1]} of 10 with the best of {args.restarts}")


def quality_data() -> torch.Tensor:
    """bench_quality's experts: planted, 2 layers x 32 experts, p=64, d=128, as [64, 64, 128]."""
    return planted_experts(2, 32, 64, 128, seed=0, families=("gate",)).weights["gate"].reshape(-1, 64, 128)


def final_pass(args) -> None:
    W = quality_data()
    print("\n### Final pass: bench_quality's data, r=32, m=16, 10 % held out\n")
    print("| mode | final_steps | held-out experts | the others | all | seconds |")
    print("|---|---|---|---|---|---|")
    for weight_aware in (True, False):
        for steps in (0, 3):
            fit, sec = timed_fit(W, r=32, m=16, weight_aware=weight_aware, val_fraction=0.1, final_steps=steps)
            R = fit.reconstruct()
            held = fit.val_index
            rest = [i for i in range(W.shape[0]) if i not in held]
            print(f"| {'weight-aware' if weight_aware else 'proxy'} | {steps} | {rel(R[held], W[held]):.4f} | "
                  f"{rel(R[rest], W[rest]):.4f} | {rel(R, W):.4f} | {sec:.1f} |")


def fitted_mean(args) -> None:
    W = make_suite("clustered")
    L, n, p, d = W.shape
    Wg = W.reshape(L * n, p, d)
    m = Wg.shape[0] // 4
    r = max_rank(0.25, L, n, p, d, m, 4, "global", True)
    print(f"\n### Fitted mean: clustered, budget 0.25, global (r={r}, m={m}), 40 weight-aware steps\n")
    print("| fit_mean | error | seconds |")
    print("|---|---|---|")
    for on in (False, True):
        fit, sec = timed_fit(Wg, r=r, m=m, steps=40, patience=40, weight_aware=True, val_fraction=0.0,
                             target_support=4, fit_mean=on)
        print(f"| {on} | {rel(fit.reconstruct(), Wg):.4f} | {sec:.1f} |")
    # with held-out experts (bench_quality's data, as in section final, without the final pass)
    W = quality_data()
    print("\nWith 10 % held out (bench_quality's data, r=32, m=16, final_steps=0):\n")
    print("| fit_mean | held-out error, best step | training error, last step | step kept |")
    print("|---|---|---|---|")
    for on in (False, True):
        fit, _ = timed_fit(W, r=32, m=16, weight_aware=True, val_fraction=0.1, final_steps=0, fit_mean=on)
        print(f"| {on} | {fit.metrics['rel_error_val']:.4f} | {fit.history[-1]['rel_error']:.4f} | "
              f"{fit.metrics['best_step']} of {fit.metrics['steps_run']} |")


def moves(args) -> None:
    p, d = 128, 256
    W = planted_experts(4, 32, p, d, seed=0).weights["gate"].reshape(-1, p, d)
    print("\n### Weight-aware moves: the demo's gate experts (128 experts, p=128, d=256), 8 steps, patience 3\n")
    print("| mode | error | seconds |")
    print("|---|---|---|")
    for label, extra in (("proxy", {}), ("weight-aware", dict(weight_aware=True)),
                         ("weight-aware + support search + spectral bank",
                          dict(weight_aware=True, support_search=1, spectral_bank=True))):
        fit, sec = timed_fit(W, steps=8, patience=3, **extra)
        print(f"| {label} | {rel(fit.reconstruct(), W):.4f} | {sec:.1f} |")


def solver(args) -> None:
    from globe.am import _weight_aware_solver, dense_weight_aware_bytes

    print("\n### Weight-aware solver: dense against matrix-free, budget 0.5, global (r=95, m=12), 6 steps\n")
    print("| suite | solver | error | seconds | CG iterations per bank step (median) |")
    print("|---|---|---|---|---|")
    for suite in ("planted", "planted_silu", "lowrank_noise", "clustered"):
        W = make_suite(suite)
        Wg = W.reshape(-1, *W.shape[2:])
        for kind in ("dense", "cg"):
            fit, sec = timed_fit(Wg, r=95, m=12, steps=6, patience=6, weight_aware=True, val_fraction=0.0,
                                 target_support=4, center=False, weight_aware_solver=kind)
            its = sorted(h.get("bank_cg_iters", 0) for h in fit.history[1:])
            print(f"| {suite} | {kind} | {rel(fit.reconstruct(), Wg):.4f} | {sec:.1f} | "
                  f"{its[len(its) // 2] if kind == 'cg' else '-'} |")
    L, n, r, m = 32, 32, 64, 512
    W = make_suite("lowrank_noise", L=L, n=n)
    Wg = W.reshape(-1, *W.shape[2:])
    N, p, d = Wg.shape
    dense_gb = dense_weight_aware_bytes(N, m, r) / 2**30
    chosen = _weight_aware_solver(GlobeConfig(weight_aware=True), N, m, r, torch.device("cpu"), torch.float32)
    print(f"\nA bank the dense solver refuses: lowrank_noise, {L} x {n} experts (p={p}, d={d}), global, r={r}, "
          f"m={m}, 4 steps; the dense steps would need about {dense_gb:.1f} GB (auto chooses {chosen!r} here)\n")
    print("| mode | error | seconds | process peak RSS so far (GB) |")
    print("|---|---|---|---|")
    import resource

    for label, extra in (("proxy", {}), ("weight-aware, matrix-free", dict(weight_aware=True,
                                                                            weight_aware_solver="cg"))):
        fit, sec = timed_fit(Wg, r=r, m=m, steps=4, patience=4, val_fraction=0.0, target_support=4, center=False,
                             **extra)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(f"| {label} | {rel(fit.reconstruct(), Wg):.4f} | {sec:.1f} | {peak:.2f} |")


def supports(args) -> None:
    print("\n### Code supports: entmax at target 4 against a cap of 4, global (r=47, m=12), no mean, 30 steps\n")
    print("| suite | mode | error | median support | largest support | seconds |")
    print("|---|---|---|---|---|---|")
    modes = (("proxy, entmax", {}), ("weight-aware, entmax", dict(weight_aware=True)),
             ("weight-aware, top 4", dict(weight_aware=True, sparsity="topk", top_k=4)))
    for suite in ("planted", "planted_silu", "lowrank_noise", "clustered"):
        W = make_suite(suite)
        Wg = W.reshape(-1, *W.shape[2:])
        for label, extra in modes:
            fit, sec = timed_fit(Wg, r=47, m=12, val_fraction=0.0, target_support=4, center=False, **extra)
            s = (fit.alpha != 0).sum(1).double()
            print(f"| {suite} | {label} | {rel(fit.reconstruct(), Wg):.4f} | {s.median().item():.0f} | "
                  f"{s.max().item():.0f} | {sec:.1f} |", flush=True)


def supports_refined(args) -> None:
    T = args.refine_val_time
    print(f"\n### Code supports through the refinement: global, m=12, no mean, 2 weight-aware AM steps, then "
          f"refine_method auto for {T:g} s\n")
    print("| budget | suite | r | mode | error | median support | largest support | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    modes = (("entmax", {}), ("top 4", dict(sparsity="topk", top_k=4)))
    for budget in args.supports_budgets:
        for suite in ("planted", "planted_silu", "lowrank_noise", "clustered"):
            W = make_suite(suite)
            L, n, p, d = W.shape
            Wg = W.reshape(-1, p, d)
            r = max_rank(budget, L, n, p, d, 12, 4, "global", False)
            for label, extra in modes:
                fit, sec = timed_fit(Wg, r=r, m=12, steps=2, weight_aware=True, val_fraction=0.0, target_support=4,
                                     center=False, refine_steps=10**6, refine_time_limit=T, **extra)
                s = (fit.alpha != 0).sum(1).double()
                print(f"| {budget:g} | {suite} | {r} | {label} | {rel(fit.reconstruct(), Wg):.4f} | "
                      f"{s.median().item():.0f} | {s.max().item():.0f} | {sec:.1f} |", flush=True)


def refine_val(args) -> None:
    n, T = args.refine_val_steps, args.refine_val_time
    print(f"\n### The refinement with held-out experts: global (r=47, m=12), 2 weight-aware AM steps, {n} varpro_gn "
          f"steps ({10 * n} varpro) within {T:g} s\n")
    print("| suite | method | val_fraction | validated stage: steps run / best step | validated stage: training / "
          "held-out error, start -> last step | pass over all experts: steps | error (all experts) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for suite in ("planted", "clustered", "lowrank_noise"):
        Wg = make_suite(suite).reshape(-1, 96, 384)
        for method in ("varpro_gn", "varpro"):
            for vf in (0.1, 0.0):
                fit, sec = timed_fit(Wg, r=47, m=12, steps=2, weight_aware=True, val_fraction=vf, refine_method=method,
                                     refine_steps=n if method == "varpro_gn" else 10 * n, refine_time_limit=T)
                M = fit.metrics
                stage = f"{M['refine.steps_run']} / {M['refine.best_step']}" if vf else "-"
                recs = [h for h in fit.history if h.get("stage") == "refine"]
                path = (f"{recs[0]['rel_error']:.4f} -> {recs[-1]['rel_error']:.4f} / {recs[0]['rel_error_val']:.4f} "
                        f"-> {recs[-1]['rel_error_val']:.4f}" if vf else "-")
                print(f"| {suite} | {method} | {vf:g} | {stage} | {path} | {M.get('refine.final_steps_run', '-')} | "
                      f"{rel(fit.reconstruct(), Wg):.4f} | {sec:.1f} |", flush=True)


SECTIONS = {"restarts": restarts, "final": final_pass, "mean": fitted_mean, "moves": moves, "solver": solver,
            "supports": supports, "supports_refined": supports_refined, "refine_val": refine_val}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refine-val-steps", type=int, default=60, help="varpro_gn steps of section refine_val")
    ap.add_argument("--refine-val-time", type=float, default=20.0,
                    help="refinement time limit of sections refine_val and supports_refined (s)")
    ap.add_argument("--supports-budgets", type=float, nargs="+", default=[0.25, 0.5])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"## bench_trainer_options (torch {torch.__version__}, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M')})")
    for name in args.sections.split(","):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
