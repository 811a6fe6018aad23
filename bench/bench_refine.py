"""Quality of GloBE's linear AM, its nonlinear refinement and the baselines at a parameter budget.

    PYTHONPATH=python:. python bench/bench_refine.py [--suites planted,clustered] [--budgets 0.25 0.5]

For each synthetic suite (bench/synthetic_suites.py; 6 layers x 8 experts, p=96, d=384 by default, plus
``planted`` at 2 layers x 32 experts with --many), budget (fraction of the original gate parameters, counted as
:mod:`globe.budget` counts bank mode: bank, adapters, codes as values + indices, the mean) and scope (one bank
per layer, or one over all layers), the relative Frobenius error against the original weights of:

* ``svd``: per-expert truncated SVD at the largest rank within the budget (no sharing; scope-independent);
* ``am``: the trainer's linear AM (:func:`globe.am.fit_bank`, weight-aware mode, m = n/4 of the scope, target
  support 4, r the largest within the budget, centred, every expert in the fit);
* ``gn:<φ>`` / ``adam:<φ>``: :func:`globe.refine.refine` from the AM solution, in the original scale with the
  mean term refitted, for the same wall time each (``--refine-time`` seconds per scope), early stop on the
  training objective (all experts are compressed, so there is nothing to hold out);
* ``mobe``: the Adam-only baseline of the MoBE kind: silu over the mixture, dense softmax codes, no mean, random
  init, the largest r within the same budget (dense codes counted as n m numbers), for the wall time of GloBE's
  best row in that cell (AM + its refinement).

Then a convergence comparison of GN and Adam (wall time to reach given errors) on one cell. ``--compare`` runs
instead every refinement method of ``--compare-methods`` (``method[:lr]``, lr defaulting to the method's
``globe.refine.DEFAULT_LR``) from one short AM per suite (``--compare-budget``, default 0.25, global, centred
unless ``--compare-no-mean``, phi = identity) and prints the lowest error each has reached after
``--compare-times`` CPU seconds. ``--step-time`` prints the CPU time per refinement step (joint Adam with
autograd's gradient and with the written-out one, varpro's step, a varpro_gn iteration) at r = 47 and 95
(``--device cuda --step-shape N,p,d,m`` on a GPU at other shapes).
Timings are wall-clock seconds on this machine with ``--threads`` torch threads. The time-to-error comparison
with the ``mobe`` baseline run to convergence (learning-rate sweep) is bench/bench_time_to_error.py.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from globe.am import fit_bank  # noqa: E402
from globe.budget import bank_mode_parameters, max_rank  # noqa: E402
from globe.config import GlobeConfig  # noqa: E402
from globe.refine import (  # noqa: E402
    DEFAULT_LR,
    SECOND_ORDER_METHODS,
    _adapter_solve,
    _mix,
    auto_method,
    objective,
    objective_grads,
    refine,
    sparse_simplex_projection,
)
from synthetic_suites import make_suite  # noqa: E402

from globe_kernels import ops  # noqa: E402

PHIS = ("identity", "tanh", "silu")
K = 4  # target support


def rel(num: float, den: float) -> float:
    return math.sqrt(num / den)


def svd_error(W: torch.Tensor, budget: float) -> tuple[float, float, float, int]:
    N, p, d = W.shape
    k = max(1, int(budget * p * d // (p + d)))
    t = time.perf_counter()
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    R = (U[:, :, :k] * S[:, None, :k]) @ Vh[:, :k]
    err = float((R - W.double()).pow(2).sum())
    return err, k * (p + d) / (p * d), time.perf_counter() - t, k


def mobe_fit(W: torch.Tensor, r: int, m: int, seconds: float, seed: int = 0, lr: float = 3e-3, *,
             curve: list[tuple[float, float, float]] | None = None, clock: str = "wall",
             plateau: tuple[int, float] | None = None, state: dict | None = None) -> float:
    """Adam on A_i silu(softmax(z_i) B) from random init for `seconds`; returns the squared error.

    clock: what `seconds` measures, "wall" (time.perf_counter) or "cpu" (time.process_time of this process).
    curve: when given, one (cpu seconds, wall seconds, relative error) per step is appended (the error of the
    parameters the step starts from, times since the start of the run). plateau (window, tol): also stop once
    the best error has not improved by a relative `tol` over the last `window` steps. state: when given, the
    run is saved into it on return (parameters, optimiser, best error, times; ``state["converged"]`` when the
    plateau stopped it) and continued from it when it already holds a run: `seconds` then counts the whole
    run, earlier calls included.
    """
    N, p, d = W.shape
    s = float(W.pow(2).mean().sqrt())
    X = W / s
    energy = float(X.pow(2).sum())
    if state and "opt" in state:
        A, B, z, opt = state["A"], state["B"], state["z"], state["opt"]
        best, bests, elapsed = state["best"], state["bests"], state["elapsed"]
    else:
        g = torch.Generator().manual_seed(seed)
        A = (torch.randn(N, p, r, generator=g) / math.sqrt(r)).requires_grad_(True)
        B = torch.randn(m, r, d, generator=g).requires_grad_(True)
        z = (0.01 * torch.randn(N, m, generator=g)).requires_grad_(True)
        opt = torch.optim.Adam([A, B, z], lr=lr)
        best, bests, elapsed = float("inf"), [], {"cpu": 0.0, "wall": 0.0}
    now = time.process_time if clock == "cpu" else time.perf_counter
    t0, c0, w0 = now() - elapsed[clock], time.process_time(), time.perf_counter()
    converged = False
    while now() - t0 < seconds:
        opt.zero_grad(set_to_none=True)
        loss = (X - A @ ops.compose(B, torch.softmax(z, 1), "silu")).pow(2).sum() / energy
        loss.backward()
        opt.step()
        value = float(loss.detach())
        best = min(best, value)
        if curve is not None:
            curve.append((elapsed["cpu"] + time.process_time() - c0, elapsed["wall"] + time.perf_counter() - w0,
                          math.sqrt(max(value, 0.0))))
        if plateau is not None:
            window, tol = plateau
            bests.append(best)
            if len(bests) > window and best > bests[-1 - window] * (1 - tol) ** 2:  # tol on the error
                converged = True
                break
            if not math.isfinite(value):
                break
    if state is not None:
        state.update(A=A, B=B, z=z, opt=opt, best=best, bests=bests, converged=converged,
                     elapsed={"cpu": elapsed["cpu"] + time.process_time() - c0,
                              "wall": elapsed["wall"] + time.perf_counter() - w0})
    return best * energy * s * s


def mobe_rank(budget: float, N: int, p: int, d: int, m: int) -> int:
    r = int((budget * N * p * d - N * m) // (m * d + N * p))
    return max(1, min(r, p, d))


def run_cell(W: torch.Tensor, budget: float, scope: str, args) -> list[dict]:
    L, n, p, d = W.shape
    groups = [W.reshape(L * n, p, d)] if scope == "global" else [W[i] for i in range(L)]
    n_scope = groups[0].shape[0]
    m = max(1, n_scope // 4)
    r = max_rank(budget, L, n, p, d, m, K, scope, True)
    energy = float(W.double().pow(2).sum())
    rows = []
    # linear AM
    t = time.perf_counter()
    fits = [fit_bank(Wg, GlobeConfig(r=r, m=m, steps=args.am_steps, weight_aware=True, val_fraction=0.0,
                                     target_support=K, patience=3)) for Wg in groups]
    am_time = time.perf_counter() - t
    err = sum(float((f.reconstruct() - Wg).double().pow(2).sum()) for f, Wg in zip(fits, groups))
    k_am = max(int((f.alpha > 0).sum(1).max()) for f in fits)
    frac = bank_mode_parameters(L, n, p, d, r, m, k_am, scope, True) / (L * n * p * d)
    rows.append({"method": "am", "r": r, "m": m, "frac": frac, "err": rel(err, energy), "time": am_time})
    # refinements
    for method in ("gn", "adam"):
        for phi in PHIS:
            t = time.perf_counter()
            err = 0.0
            for f, Wg in zip(fits, groups):
                res = refine(Wg, f.bank, f.alpha, f.A, phi, method=method, mean=f.normalization.mean, fit_mean=True,
                             kmax=K, steps=100000, time_limit=args.refine_time / len(groups), patience=3,
                             eval_every=1 if method == "gn" else 20, lr=args.adam_lr)
                err += float((res.reconstruct() - Wg).double().pow(2).sum())
            frac = bank_mode_parameters(L, n, p, d, r, m, min(K, m), scope, True) / (L * n * p * d)
            rows.append({"method": f"{method}:{phi}", "r": r, "m": m, "frac": frac, "err": rel(err, energy),
                         "time": am_time + time.perf_counter() - t})
    best = min((row for row in rows if row["method"] != "am"), key=lambda row: row["err"])
    # MoBE-style baseline for the same wall time as GloBE's best
    r_mobe = mobe_rank(budget, n_scope, p, d, m)
    t = time.perf_counter()
    err = sum(mobe_fit(Wg, r_mobe, m, best["time"] / len(groups)) for Wg in groups)
    params = len(groups) * (m * r_mobe * d + n_scope * p * r_mobe + n_scope * m)
    rows.append({"method": "mobe", "r": r_mobe, "m": m, "frac": params / (L * n * p * d), "err": rel(err, energy),
                 "time": time.perf_counter() - t})
    return rows


def convergence(args) -> None:
    W = make_suite("planted_silu")
    L, n, p, d = W.shape
    Wg = W.reshape(L * n, p, d)
    m = Wg.shape[0] // 4
    r = max_rank(0.25, L, n, p, d, m, K, "global", True)
    fit = fit_bank(Wg, GlobeConfig(r=r, m=m, steps=args.am_steps, weight_aware=True, val_fraction=0.0,
                                   target_support=K, patience=3))
    print(f"\n### GN vs Adam: convergence (planted_silu, global, budget 0.25, r={r}, m={m}, phi=silu, "
          f"{args.conv_time:.0f} s each)\n")
    curves = {}
    for method in ("gn", "adam"):
        res = refine(Wg, fit.bank, fit.alpha, fit.A, "silu", method=method, mean=fit.normalization.mean,
                     fit_mean=True, kmax=K, steps=100000, time_limit=args.conv_time, patience=10**6,
                     eval_every=1 if method == "gn" else 10, lr=args.adam_lr)
        curves[method] = [(h["time_s"], h["rel_error"]) for h in res.history]
    start = curves["gn"][0][1]
    finals = {k: min(e for _, e in v) for k, v in curves.items()}
    targets = sorted({round(start - f * (start - min(finals.values())), 5) for f in (0.5, 0.9, 0.99)}
                     | {round(finals["adam"], 5)}, reverse=True)
    print("| method | start | " + " | ".join(f"time to {x:.5f}" for x in targets) + " | best error |")
    print("|---|---|" + "---|" * len(targets) + "---|")
    for method, curve in curves.items():
        cells = []
        for x in targets:
            hit = next((t for t, e in curve if e <= x), None)
            cells.append("not reached" if hit is None else f"{hit:.1f} s")
        print(f"| {method} | {curve[0][1]:.5f} | " + " | ".join(cells) + f" | {finals[method]:.5f} |")


def compare_methods(args) -> None:
    """Every refinement method from one short AM per suite (budget 0.25, global, phi = identity): the lowest
    error each has reached after t CPU seconds, no early stop."""
    torch.set_num_threads(args.threads)
    times = args.compare_times
    budget, center = args.compare_budget, not args.compare_no_mean
    print(f"\n### Refinement methods at equal time (budget {budget:g}, global, {'centred' if center else 'no mean'}, "
          f"phi = identity, after a {args.compare_am_steps}-step weight-aware AM; lowest error after t CPU seconds "
          "of refinement)\n")
    print("| suite | r / m | AM error (cpu s) | method | " + " | ".join(f"{t:g} s" for t in times) + " | steps |")
    print("|---|---|---|---|" + "---|" * len(times) + "---|")
    for name in args.suites.split(","):
        W = make_suite(name)
        L, n, p, d = W.shape
        Wg = W.reshape(L * n, p, d)
        m = Wg.shape[0] // 4
        r = max_rank(budget, L, n, p, d, m, K, "global", center)
        c0 = time.process_time()
        fit = fit_bank(Wg, GlobeConfig(r=r, m=m, steps=args.compare_am_steps, weight_aware=True,
                                       val_fraction=0.0, target_support=K, patience=3, center=center))
        am_cpu = time.process_time() - c0
        am_err = rel(float((fit.reconstruct() - Wg).double().pow(2).sum()), float(Wg.double().pow(2).sum()))
        for spec in args.compare_methods:
            method, _, lr = spec.partition(":")
            if method == "auto":  # resolved here so that the record spacing fits the method that runs
                method = auto_method(fit.A)[0]
            pts: list[tuple[float, float]] = []
            c1 = time.process_time()
            res = refine(Wg, fit.bank, fit.alpha, fit.A, "identity", method=method,
                         mean=fit.normalization.mean if center else None, fit_mean=center, kmax=K, steps=10**7,
                         time_limit=max(times), patience=10**9, eval_every=1 if method in SECOND_ORDER_METHODS else 10,
                         lr=float(lr) if lr else DEFAULT_LR[method],
                         callback=lambda rec, pts=pts, c1=c1: pts.append((time.process_time() - c1,
                                                                          rec["rel_error"])))
            cells = [min((e for t, e in pts if t <= T), default=float("nan")) for T in times]
            print(f"| {name} | {r} / {m} | {am_err:.4f} ({am_cpu:.1f}) | {spec} | "
                  + " | ".join(f"{c:.4f}" for c in cells) + f" | {res.steps_run} |", flush=True)


def _clock(device: torch.device) -> float:
    """CPU seconds of this process on CPU; wall seconds after a synchronize on a GPU (its kernels run
    asynchronously, and the CPU time of the launching thread would miss them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def _step_ms(kind: str, Wg: torch.Tensor, A: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor,
             args) -> float:
    """Median ms per step of one refinement kind ("autograd", "written-out", "varpro") from this state."""
    E = float(Wg.double().pow(2).sum())
    st = [A.clone(), bank.clone(), alpha.clone()]
    opt = torch.optim.Adam([{"params": [t]} for t in st], lr=1e-4)
    times = []
    for _ in range(args.step_reps):
        c = _clock(Wg.device)
        for _ in range(args.step_count):
            if kind == "autograd":
                for t in st:
                    t.requires_grad_(True)
                opt.zero_grad(set_to_none=True)
                (objective(Wg, *st, "identity") / E).backward()
            else:
                with torch.no_grad():
                    U = _mix(st[1], st[2])
                    if kind == "varpro":
                        st[0].copy_(_adapter_solve(Wg, U, 1e-6))
                    gA, gB, ga, _ = objective_grads(Wg, *st, "identity", scale=1 / E, grad_A=kind != "varpro",
                                                    U=U)
                st[0].grad, st[1].grad, st[2].grad = gA, gB, ga
            opt.step()
        times.append((_clock(Wg.device) - c) / args.step_count * 1e3)
    return sorted(times)[len(times) // 2]


def _gn_iteration_ms(Wg: torch.Tensor, A: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor, args,
                     chunk: int | None = None, cache: bool = True) -> float:
    """Median ms per varpro_gn iteration: --step-reps runs of :func:`globe.refine.refine` with
    max(1, --step-count // 10) iterations each, one record at the end (its setup, the exact adapters and one
    objective, is included and spread over the iterations); chunk / cache: refine's chunk_experts /
    cache_factors."""
    n = max(1, args.step_count // 10)
    times = []
    for _ in range(args.step_reps):
        c = _clock(Wg.device)
        refine(Wg, bank, alpha, A, "identity", method="varpro_gn", kmax=K, steps=n, eval_every=n, patience=n + 1,
               chunk_experts=chunk, cache_factors=cache)
        times.append((_clock(Wg.device) - c) / n * 1e3)
    return sorted(times)[len(times) // 2]


def step_times(args) -> None:
    """Milliseconds per refinement step (median of --step-reps timings of --step-count steps each; CPU time on
    CPU, wall time on a GPU) at the suites' shape (48 experts, p=96, d=384, m=12, support 4, no mean), or with
    ``--step-shape N,p,d,m`` at that shape on random experts: joint Adam with the gradient by autograd through
    :func:`globe.refine.objective` (the refinement before the written-out gradients), joint Adam with
    :func:`globe.refine.objective_grads`, varpro's step (exact adapters, then Adam on bank and codes), and one
    varpro_gn iteration (a Levenberg-Marquardt bank step of up to 10 CG products by default, a codes step, exact
    adapters; see :func:`_gn_iteration_ms`). ``--device cuda`` runs it on the GPU. ``--step-chunk C`` adds the
    varpro_gn iteration in chunks of C experts, with its Gauss-Newton factors cached and recomputed."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.step_shape:
        N, p, d, m = (int(x) for x in args.step_shape.split(","))
        Wg = torch.randn(N, p, d, generator=torch.Generator().manual_seed(1)) * 0.02
    else:
        W = make_suite("clustered")
        Wg = W.reshape(-1, *W.shape[2:])
        N, p, d = Wg.shape
        m = 12
    Wg = Wg.to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} thread(s)"
    clock = "wall" if device.type == "cuda" else "CPU"
    print(f"\n### {clock} ms per refinement step (N={N}, p={p}, d={d}, m={m}, {where}, median of "
          f"{args.step_reps} x {args.step_count} steps)\n")
    C = args.step_chunk
    extra = f" varpro_gn, chunks of {C}, cached | recomputed | chunked / all at once |" if C else ""
    print("| r | Adam, autograd | Adam, written-out gradients | varpro | varpro_gn iteration | autograd / "
          "written-out | varpro_gn / varpro |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|---|---|" if C else ""))
    for r in args.step_ranks:
        g = torch.Generator().manual_seed(0)
        bank = (torch.randn(m, r, d, generator=g) / r**0.5).to(device)
        alpha = sparse_simplex_projection(torch.rand(N, m, generator=g), K).to(device)
        A = (torch.randn(N, p, r, generator=g) * 0.01).to(device)
        auto, manual, vp = (_step_ms(kind, Wg, A, bank, alpha, args)
                            for kind in ("autograd", "written-out", "varpro"))
        gn = _gn_iteration_ms(Wg, A, bank, alpha, args)
        row = f"| {r} | {auto:.1f} | {manual:.1f} | {vp:.1f} | {gn:.1f} | {auto / manual:.2f} | {gn / vp:.1f} |"
        if C:
            cached, recomputed = (_gn_iteration_ms(Wg, A, bank, alpha, args, C, cache) for cache in (True, False))
            row += f" {cached:.1f} | {recomputed:.1f} | {cached / gn:.2f} / {recomputed / gn:.2f} |"
        print(row, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="planted,planted_silu,lowrank_noise,clustered")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--scopes", nargs="+", default=["layer", "global"])
    ap.add_argument("--many", action="store_true", help="add planted at 2 layers x 32 experts")
    ap.add_argument("--am-steps", type=int, default=15)
    ap.add_argument("--refine-time", type=float, default=3.0, help="seconds per refinement run and scope")
    ap.add_argument("--adam-lr", type=float, default=1e-2)
    ap.add_argument("--conv-time", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-convergence", action="store_true")
    ap.add_argument("--compare", action="store_true",
                    help="only the comparison of refinement methods at equal CPU time (--compare-methods)")
    ap.add_argument("--compare-methods", nargs="+", default=["gn", "adam:0.1", "varpro:0.1", "varpro_gn:0.01"],
                    metavar="METHOD[:LR]")
    ap.add_argument("--compare-times", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0])
    ap.add_argument("--compare-am-steps", type=int, default=2)
    ap.add_argument("--compare-budget", type=float, default=0.25)
    ap.add_argument("--compare-no-mean", action="store_true", help="fit without the mean term")
    ap.add_argument("--step-time", action="store_true", help="only the CPU time per refinement step")
    ap.add_argument("--step-ranks", type=int, nargs="+", default=[47, 95])
    ap.add_argument("--step-count", type=int, default=20)
    ap.add_argument("--step-reps", type=int, default=5)
    ap.add_argument("--step-shape", default=None, metavar="N,p,d,m",
                    help="--step-time on random experts of this shape instead of the suites'")
    ap.add_argument("--device", default="cpu", help="--step-time's device (cpu or cuda)")
    ap.add_argument("--step-chunk", type=int, default=0, metavar="C",
                    help="--step-time: also a varpro_gn iteration in chunks of C experts (refine's chunk_experts)")
    args = ap.parse_args()
    if args.step_time:
        print(f"## bench_refine --step-time ({platform.processor() or platform.machine()}, torch "
              f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')})")
        step_times(args)
        return
    if args.compare:
        print(f"## bench_refine --compare ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M')})")
        compare_methods(args)
        return
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    print(f"## bench_refine ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {time.strftime('%Y-%m-%d')})\n")
    suites = [(s, 6, 8) for s in args.suites.split(",") if s]
    if args.many:
        suites.append(("planted", 2, 32))
    print("| suite | budget | scope | method | r | m | param fraction | rel. error | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    winners = []
    for name, L, n in suites:
        W = make_suite(name, L=L, n=n)
        label = f"{name} {L}x{n}"
        for budget in args.budgets:
            err, frac, secs, k = svd_error(W.reshape(-1, *W.shape[2:]), budget)
            svd_err = rel(err, float(W.double().pow(2).sum()))
            print(f"| {label} | {budget} | - | svd (rank {k}) | - | - | {frac:.3f} | {svd_err:.4f} | {secs:.1f} |")
            cell_rows = [("-", {"method": f"svd (rank {k})", "err": svd_err})]
            for scope in args.scopes:
                rows = run_cell(W, budget, scope, args)
                for row in rows:
                    print(f"| {label} | {budget} | {scope} | {row['method']} | {row['r']} | {row['m']} | "
                          f"{row['frac']:.3f} | {row['err']:.4f} | {row['time']:.1f} |", flush=True)
                    cell_rows.append((scope, row))
            scope, best = min(cell_rows, key=lambda sr: sr[1]["err"])
            winners.append((label, budget, scope, best))
    print("\n### Winner per suite and budget\n")
    print("| suite | budget | winner | rel. error |")
    print("|---|---|---|---|")
    for label, budget, scope, best in winners:
        print(f"| {label} | {budget} | {best['method']} ({scope}) | {best['err']:.4f} |")
    if not args.no_convergence:
        convergence(args)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
