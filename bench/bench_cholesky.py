"""Batched small Cholesky factor + solve: the compiled extension against torch, printed as a markdown table.

    PYTHONPATH=python:. python bench/bench_cholesky.py                  # CPU: threads 2 and 1, the full sweep
    PYTHONPATH=python:. python bench/bench_cholesky.py --threads 1 --reps 3 --r 8 64
    PYTHONPATH=python:. python bench/bench_cholesky.py --device cuda    # the CUDA kernel against torch on CUDA

Sweep: r in {8, 16, 32, 64, 128, 256, 512}, p = 2r, float32 and float64, two batch sizes per r (512 and 2048
up to r = 64; smaller above, so that torch's side stays within seconds). "torch" is
globe_kernels.reference.cholesky_solve_batched (torch.linalg.cholesky_ex + torch.cholesky_solve), timed in the
same run: the two are interleaved (alternating which goes first) so that a change in machine load hits both,
and each figure is the median of --reps runs after a warm-up. On CPU the table is repeated for each
--threads setting (torch.set_num_threads; the extension parallelises over the batch with at::parallel_for).

Columns: wall-clock medians (min-max), torch/ext wall ratio, the same ratio on process CPU time (which a
loaded machine disturbs less with one thread), and GFLOP/s counting r^3/3 (factor) + 2 p r^2 (the two
triangular solves) per system. The goal (issue 4): torch/ext >= 3 at r <= 64 with batch >= 512, and >= 1 up
to r = 512; the summary line under each table gives both minima.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from globe_kernels import _ext, reference

R_VALUES = (8, 16, 32, 64, 128, 256, 512)
LAM = 1e-3


def batches(r: int) -> tuple[int, int]:
    """Two batch sizes per r: 512 and 2048 while r <= 64, then fewer as r^3 work grows."""
    if r <= 64:
        return 512, 2048
    return {128: (128, 512), 256: (32, 128)}.get(r, (8, 32))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make(n: int, r: int, p: int, dtype: torch.dtype, device: str, seed: int = 0):
    """n SPD systems B B^T / d (d = 2r + 3, eigenvalues about 0.09 .. 2.9) and right-hand sides R [n, p, r]."""
    gen = torch.Generator().manual_seed(seed)
    d = 2 * r + 3
    B = torch.randn(n, r, d, generator=gen, dtype=torch.float64) / d**0.5
    G = (B @ B.mT).to(dtype).to(device)
    R = torch.randn(n, p, r, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return G, R


def timed(fn, device: str) -> tuple[float, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def compare(ext_fn, torch_fn, reps: int, device: str) -> dict[str, dict[str, list[float]]]:
    """Interleaved timings: {"ext"|"torch": {"wall": [...], "cpu": [...]}} after one warm-up call each."""
    ext_fn()
    torch_fn()
    out = {k: {"wall": [], "cpu": []} for k in ("ext", "torch")}
    for i in range(reps):
        order = (("ext", ext_fn), ("torch", torch_fn)) if i % 2 == 0 else (("torch", torch_fn), ("ext", ext_fn))
        for name, fn in order:
            wall, cpu = timed(fn, device)
            out[name]["wall"].append(wall)
            out[name]["cpu"].append(cpu)
    return out


def table(args, threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"\n### device={args.device} threads={torch.get_num_threads()}"
        + (f" (load average at start {load[0]:.2f})" if load else "")
    )
    print(
        "| r | p | n | dtype | ext ms (min-max) | torch ms (min-max) | torch/ext | cpu-time ratio "
        "| ext GFLOP/s | torch GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    goal, never = [], []
    for r in args.r:
        p = 2 * r
        for n in batches(r):
            for dtype in (torch.float32, torch.float64):
                G, R = make(n, r, p, dtype, args.device)
                kind = str(dtype).removeprefix("torch.")

                def run_ext(G=G, R=R):
                    return _ext.cholesky_solve_batched(G, R, LAM)

                def run_torch(G=G, R=R):
                    return reference.cholesky_solve_batched(G, R, LAM)

                try:
                    t = compare(run_ext, run_torch, args.reps, args.device)
                except (NotImplementedError, RuntimeError) as exc:
                    print(f"| {r} | {p} | {n} | {kind} | n/a: {exc} | | | | | |")
                    continue
                med = {k: statistics.median(v["wall"]) for k, v in t.items()}
                cpu = {k: statistics.median(v["cpu"]) for k, v in t.items()}
                flops = n * (r**3 / 3 + 2 * p * r * r)
                ratio = med["torch"] / med["ext"]
                cpu_ratio = cpu["torch"] / cpu["ext"] if cpu["ext"] > 0 else float("nan")
                if r <= 64 and n >= 512:
                    goal.append(ratio)
                never.append(ratio)
                span = {k: f"{min(v['wall']) * 1e3:.2f}-{max(v['wall']) * 1e3:.2f}" for k, v in t.items()}
                print(
                    f"| {r} | {p} | {n} | {kind} | {med['ext'] * 1e3:.2f} ({span['ext']}) "
                    f"| {med['torch'] * 1e3:.2f} ({span['torch']}) | {ratio:.2f} | {cpu_ratio:.2f} "
                    f"| {flops / med['ext'] / 1e9:.1f} | {flops / med['torch'] / 1e9:.1f} |",
                    flush=True,
                )
    end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    summary = []
    if goal:
        summary.append(f"min torch/ext at r <= 64, batch >= 512: {min(goal):.2f} (goal >= 3)")
    if never:
        summary.append(f"min over all rows: {min(never):.2f} (goal >= 1)")
    if end is not None:
        summary.append(f"load average at end {end:.2f}")
    print("\n" + "; ".join(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--reps", type=int, default=5, help="timed runs per point (median), after one warm-up")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="torch.set_num_threads values (CPU default: 2 1)"
    )
    parser.add_argument("--r", type=int, nargs="+", default=list(R_VALUES), help="the r values (p = 2r)")
    args = parser.parse_args()
    _ext.load()
    st = _ext.status(load_ext=False)
    cpu_threads = args.threads or ([2, 1] if args.device == "cpu" else [None])
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    print(f"## Batched Cholesky solve: extension vs torch ({datetime.date.today()})")
    print(
        f"\nmachine: {platform.node()}, {device_name}, {os.cpu_count()} logical CPUs; torch {torch.__version__}; "
        f"extension: {st['path']} (ISA path: {os.environ.get('GLOBE_EXT_ISA', 'auto')}); "
        f"medians of {args.reps} interleaved runs; lam = {LAM}"
    )
    for threads in cpu_threads:
        table(args, threads)


if __name__ == "__main__":
    main()
