"""Peak working memory of the refinement stage on CPU, per method, as multiples of the experts W [N, p, d] and
of one [N, r, d] tensor: the coefficients :data:`globe.refine.REFINE_MEMORY` that the trainer's memory check uses
(:func:`globe.refine.refine_memory_bytes`).

    PYTHONPATH=python:. python bench/bench_refine_memory.py [--sizes 256:32 256:95 512:32 512:64 512:95]
    PYTHONPATH=python:. python bench/bench_refine_memory.py --chunked [--chunked-sizes 1024:95:128 ...]

Each (method, N, r) runs in a fresh process: random experts (p=96, d=384, m=12, codes of about 4 atoms), a short
refinement of all N experts after a tiny warm-up call (4 experts, 2 atoms), and the growth of the process's peak
resident memory across the long call. Then a least-squares fit of growth = a * bytes(W) + b * bytes([N, r, d])
+ c per method (c: buffers of a fixed size, such as the code step's chunks of candidate atoms in "gn").

``--chunked``: the refinement in chunks of experts (``chunk_experts``), each N:r:chunk[:m] with and without the
cached Gauss-Newton factors, against the estimate :func:`globe.refine.refine_memory_bytes` (which must not be
below it), and the CPU time of the 4 steps against all experts at once (the cost of chunking).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch


def child(method: str, N: int, r: int, chunk: int | None = None, cache: bool = True, m: int = 12) -> None:
    import time

    from globe.refine import refine

    torch.set_num_threads(1)
    p, d = 96, 384
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, p, d, generator=g)
    bank = torch.randn(m, r, d, generator=g)
    alpha = torch.rand(N, m, generator=g)
    alpha[alpha < 0.6] = 0
    alpha[:, 0] += 0.1
    alpha /= alpha.sum(1, keepdim=True)
    A = torch.randn(N, p, r, generator=g)
    # the warm-up (libraries, allocator) on 4 experts and a 2-atom bank: the growth measured below then includes
    # the bank-sized buffers too (a high-water mark would hide those the warm-up reached with the same bank)
    refine(W[:4], bank[:2].clone(), torch.full((4, 2), 0.5), A[:4], "identity", method=method, steps=2, kmax=2,
           chunk_experts=chunk and 2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.process_time()
    refine(W, bank, alpha, A, "identity", method=method, steps=4, kmax=4, eval_every=2, chunk_experts=chunk,
           cache_factors=cache)
    cpu = time.process_time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth": (peak - base) * 1024, "W": N * p * d * 4, "U": N * r * d * 4, "cpu_s": cpu}))


def run_child(method: str, N: int, r: int, chunk: int | None = None, cache: bool = True, m: int = 12) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(N), str(r), str(chunk or 0), str(int(cache)), str(m)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def chunked(methods: list[str], specs: list[str]) -> None:
    from globe.refine import refine_memory_bytes

    print(f"## Refinement in chunks of experts (p=96, d=384, torch {torch.__version__}, CPU, 1 thread)\n")
    print("| method | N | r | m | chunk | cached factors | peak growth (MB) | estimate (MB) | CPU s, 4 steps | "
          "vs all at once |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in methods:
        for spec in specs:
            N, r, C, *rest = (int(x) for x in spec.split(":"))
            m = rest[0] if rest else 12
            whole = run_child(method, N, r, None, True, m)
            est = refine_memory_bytes(N, 96, 384, r, method, m=m)
            print(f"| {method} | {N} | {r} | {m} | all | yes | {whole['growth'] / 2**20:.0f} | {est / 2**20:.0f} | "
                  f"{whole['cpu_s']:.1f} | 1.00 |", flush=True)
            for cache in (True, False):
                rec = run_child(method, N, r, C, cache, m)
                est = refine_memory_bytes(N, 96, 384, r, method, m=m, chunk=C, cache=cache)
                print(f"| {method} | {N} | {r} | {m} | {C} | {'yes' if cache else 'no'} | "
                      f"{rec['growth'] / 2**20:.0f} | {est / 2**20:.0f} | {rec['cpu_s']:.1f} | "
                      f"{rec['cpu_s'] / whole['cpu_s']:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["256:32", "256:95", "512:32", "512:64", "512:95"],
                    help="N:r pairs (N must vary for the fit to tell the W term from the fixed one)")
    ap.add_argument("--methods", nargs="+", default=["varpro_gn", "gn", "varpro", "adam"])
    ap.add_argument("--chunked", action="store_true", help="measure the refinement in chunks of experts instead")
    ap.add_argument("--chunked-sizes", nargs="+", default=["1024:95:128", "1024:32:128", "512:95:64:256"],
                    help="N:r:chunk[:m] for --chunked")
    ap.add_argument("--child", nargs=6, metavar=("METHOD", "N", "R", "CHUNK", "CACHE", "M"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, *nums = args.child
        N, r, C, cache, m = (int(x) for x in nums)
        child(method, N, r, C or None, bool(cache), m)
        return
    if args.chunked:
        chunked(args.methods, args.chunked_sizes)
        return
    sizes = [tuple(int(x) for x in s.split(":")) for s in args.sizes]
    print(f"## Refinement working memory (p=96, d=384, m=12, torch {torch.__version__}, CPU)\n")
    print("| method | N | r | peak growth (MB) | / bytes(W) | / bytes([N, r, d]) |")
    print("|---|---|---|---|---|---|")
    fits = {}
    for method in args.methods:
        rows = []
        for N, r in sizes:
            rec = run_child(method, N, r)
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
