"""Peak working memory of the refinement stage on CPU, per method, as multiples of the experts W [N, p, d] and
of one [N, r, d] tensor: the coefficients :data:`globe.refine.REFINE_MEMORY` that the trainer's memory check uses
(:func:`globe.refine.refine_memory_bytes`).

    PYTHONPATH=python:. python bench/bench_refine_memory.py [--sizes 256:32 256:95 512:32 512:64 512:95]

Each (method, N, r) runs in a fresh process: random experts (p=96, d=384, m=12, codes of about 4 atoms), a short
refinement of all N experts after a tiny warm-up call, and the growth of the process's peak resident memory
across the long call. Then a least-squares fit of growth = a * bytes(W) + b * bytes([N, r, d]) + c per method
(c: buffers of a fixed size, such as the code step's chunks of candidate atoms in "gn").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch


def child(method: str, N: int, r: int) -> None:
    from globe.refine import refine

    torch.set_num_threads(1)
    p, d, m = 96, 384, 12
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, p, d, generator=g)
    bank = torch.randn(m, r, d, generator=g)
    alpha = torch.rand(N, m, generator=g)
    alpha[alpha < 0.6] = 0
    alpha[:, 0] += 0.1
    alpha /= alpha.sum(1, keepdim=True)
    A = torch.randn(N, p, r, generator=g)
    refine(W[:4], bank, alpha[:4], A[:4], "identity", method=method, steps=2, kmax=4)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refine(W, bank, alpha, A, "identity", method=method, steps=4, kmax=4, eval_every=2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth": (peak - base) * 1024, "W": N * p * d * 4, "U": N * r * d * 4}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["256:32", "256:95", "512:32", "512:64", "512:95"],
                    help="N:r pairs (N must vary for the fit to tell the W term from the fixed one)")
    ap.add_argument("--methods", nargs="+", default=["varpro_gn", "gn", "varpro", "adam"])
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "N", "R"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    sizes = [tuple(int(x) for x in s.split(":")) for s in args.sizes]
    print(f"## Refinement working memory (p=96, d=384, m=12, torch {torch.__version__}, CPU)\n")
    print("| method | N | r | peak growth (MB) | / bytes(W) | / bytes([N, r, d]) |")
    print("|---|---|---|---|---|---|")
    fits = {}
    for method in args.methods:
        rows = []
        for N, r in sizes:
            out = subprocess.run([sys.executable, __file__, "--child", method, str(N), str(r)],
                                 capture_output=True, text=True, check=True, env=os.environ.copy())
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(rec)
            print(f"| {method} | {N} | {r} | {rec['growth'] / 2**20:.0f} | {rec['growth'] / rec['W']:.2f} | "
                  f"{rec['growth'] / rec['U']:.2f} |")
        mb = 2.0**20  # columns in MB: the fit is then well scaled
        X = torch.tensor([[x["W"] / mb, x["U"] / mb, 1.0] for x in rows], dtype=torch.float64)
        y = torch.tensor([x["growth"] / mb for x in rows], dtype=torch.float64)
        fits[method] = torch.linalg.lstsq(X, y[:, None]).solution.flatten().tolist()
    print("\n| method | a (per W) | b (per [N, r, d]) | c (MB) |")
    print("|---|---|---|---|")
    for method, (a, b, c) in fits.items():
        print(f"| {method} | {a:.2f} | {b:.2f} | {c:.0f} |")


if __name__ == "__main__":
    main()
