"""Batched small Cholesky solve: the compiled extension vs torch's batched path, printed as a table.

    PYTHONPATH=python:. python bench/bench_cholesky.py [--device cpu|cuda] [--reps 7]

Shapes: (n, r, p) = (1024, 64, 128) (the reference point), a Qwen3-30B-A3B-like layer at small r, and an
OLMoE-like one. Times are medians of --reps runs after a warm-up; "torch" is
globe_kernels.reference.cholesky_solve_batched (cholesky_ex + cholesky_solve), measured in the same run.
GFLOP/s counts r^3/3 (factor) + 2 p r^2 (two triangular solves) per system.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from globe_kernels import _ext, reference

SHAPES = {
    "reference point": (1024, 64, 128),
    "Qwen3-30B-A3B layer, r=96": (128, 96, 768),
    "OLMoE-1B-7B layer, r=128": (64, 128, 1024),
}


def make(n: int, r: int, p: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    d = 2 * r + 3
    B = torch.randn(n, r, d, generator=gen, dtype=torch.float64) / d**0.5
    G = (B @ B.mT).to(dtype).to(device)
    R = torch.randn(n, p, r, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return G, R


def median_seconds(fn, reps: int, device: str) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), (max(times) - min(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _ext.load()
    lam = 1e-3
    print(
        f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()} "
        f"torch {torch.__version__} threads={torch.get_num_threads()} device={args.device} "
        f"ext={_ext.status(load_ext=False)['path']}"
    )
    header = "| shape (n, r, p) | dtype | ext ms (spread) | torch ms (spread) | torch/ext | ext GFLOP/s |"
    print(header)
    print("|---|---|---|---|---|---|")
    for label, (n, r, p) in SHAPES.items():
        for dtype in (torch.float32, torch.float64):
            G, R = make(n, r, p, dtype, args.device)
            name = f"{label} ({n}, {r}, {p})"
            kind = str(dtype).removeprefix("torch.")

            def run_ext(G=G, R=R):
                return _ext.cholesky_solve_batched(G, R, lam)

            def run_torch(G=G, R=R):
                return reference.cholesky_solve_batched(G, R, lam)

            try:
                t_ext, s_ext = median_seconds(run_ext, args.reps, args.device)
            except (NotImplementedError, RuntimeError) as exc:
                print(f"| {name} | {kind} | n/a: {exc} | | | |")
                continue
            t_ref, s_ref = median_seconds(run_torch, args.reps, args.device)
            gflops = n * (r**3 / 3 + 2 * p * r * r) / t_ext / 1e9
            print(
                f"| {name} | {kind} | {t_ext * 1e3:.2f} ({s_ext * 1e3:.2f}) "
                f"| {t_ref * 1e3:.2f} ({s_ref * 1e3:.2f}) | {t_ref / t_ext:.2f} | {gflops:.2f} |"
            )


if __name__ == "__main__":
    main()
