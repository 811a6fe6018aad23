"""Seconds per AM step at the shapes of one Qwen3-30B-A3B layer (planted synthetic experts).

    PYTHONPATH=python:. python bench/bench_am.py            # N=128, p=768, d=2048, r=384, m=32
    PYTHONPATH=python:. python bench/bench_am.py --small    # N=32, p=192, d=512, r=96, m=8
    ... --weight-aware                                       # the weight-aware mode as well, per solver
    ... --layers 8 --weight-aware --solvers cg               # one global bank over 8 layers (N=1024, m=256)
    ... --device cuda                                        # on the GPU (default: cpu)

Prints one row per mode: warm start + initial bank time, median (min-max) seconds per AM step, peak memory
(RSS on CPU, allocated device memory on CUDA). The weight-aware mode runs once per solver of --solvers
(GlobeConfig.weight_aware_solver); a dense solver the memory check refuses prints the refusal as its row.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from globe import GlobeConfig, fit_bank
from globe.errors import ConfigError
from globe.synthetic import planted_experts

SHAPES = {
    "qwen3_30b_a3b_layer": dict(N=128, p=768, d=2048, r=384, m=32),
    "small": dict(N=32, p=192, d=512, r=96, m=8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--weight-aware", action="store_true", help="also time the weight-aware mode")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="where the fit runs (cpu, cuda)")
    ap.add_argument("--layers", type=int, default=1,
                    help="layers of experts in one global bank (N and m scale with it; m stays n/4)")
    ap.add_argument("--solvers", default="dense,cg", help="weight-aware solvers to time (dense, cg, auto)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "small" if args.small else "qwen3_30b_a3b_layer"
    s = dict(SHAPES[name])
    L = args.layers
    plant = planted_experts(L, s["N"], s["p"], s["d"], seed=0, rank=s["r"] // 4, num_atoms=s["m"] * L,
                            families=("gate",))
    W = plant.weights["gate"].reshape(L * s["N"], s["p"], s["d"])
    del plant
    s["N"], s["m"] = L * s["N"], L * s["m"]
    if L > 1:
        name = f"{name} x {L} layers, global"
    print(
        f"# bench_am: {name} N={s['N']} p={s['p']} d={s['d']} r={s['r']} m={s['m']}, {args.steps} steps, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
        + (f", {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else "")
    )
    print("| mode | init s | s/step median | min | max | rel error | peak memory GB |")
    print("|---|---|---|---|---|---|---|")
    modes = [(False, "auto")] + ([(True, x) for x in args.solvers.split(",")] if args.weight_aware else [])
    for wa, solver in modes:
        label = f"weight-aware, {solver}" if wa else "proxy (default)"
        cfg = GlobeConfig(r=s["r"], m=s["m"], steps=args.steps, patience=args.steps + 1, weight_aware=wa,
                          weight_aware_solver=solver, device=args.device)
        t0 = time.perf_counter()
        try:
            fit = fit_bank(
                W,
                cfg,
                callback=lambda rec: print(
                    f"#   step {rec['step']}: {rec.get('step_time_s', 0):.2f} s, rel error {rec['rel_error']:.4f}",
                    file=sys.stderr,
                    flush=True,
                ),
            )
        except ConfigError as exc:
            print(f"| {label} | refused: {str(exc).split(';')[0]} | | | | | |")
            continue
        total = time.perf_counter() - t0
        steps = [h["step_time_s"] for h in fit.history[1:]]
        init = total - sum(steps)
        print(
            f"| {label} | {init:.1f} | "
            f"{statistics.median(steps):.2f} | "
            f"{min(steps):.2f} | {max(steps):.2f} | {fit.metrics['rel_error']:.4f} | "
            f"{fit.history[-1]['peak_memory_bytes'] / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()
