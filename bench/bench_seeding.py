"""Explained variance and wall time of every warm-start method on planted experts of a real layer shape.

    PYTHONPATH=python:. python bench/bench_seeding.py --threads 1   # Qwen3-30B-A3B layer (N=128, p=768, ...)
    PYTHONPATH=python:. python bench/bench_seeding.py --small       # N=32, p=192, d=512, r=96
    PYTHONPATH=python:. python bench/bench_seeding.py --device cuda --methods ts_pca,svd --repeat 3
    PYTHONPATH=python:. python bench/bench_seeding.py --r 1024   # r > p: each proxy padded to r rows

Planted data: every expert is W_i = A_i B_i + noise with B_i a random mixture of 3 of `atoms` shared r x d
atoms (so the family has shared right structure, as the bank assumes), A_i Gaussian, noise at `--noise` of the
signal's RMS; the family is then z-scored (one mean and scale), as the trainer does before seeding. The table
gives the median wall time over `--repeat` runs, the explained variance, and the method's headline metric.
``--r`` asks for another inner dimension than the shape's; above p the method proposes p rows and
:func:`globe.seeding.common.pad_outside_row_space` adds the rest (its time is in the method's).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from globe.seeding import SEEDERS, seed_proxies  # noqa: E402

SHAPES = {
    # name: (experts N, p, d, r) -- one family (up or gate) of one MoE layer
    "qwen3-30b-a3b": (128, 768, 2048, 384),
    "small": (32, 192, 512, 96),
}
HEADLINE = {
    "ts_pca": "energy_captured",
    "left_gram_pca": "energy_captured",
    "svd": "sigma_ratio",
    "spherical_kmeans": "kmeans_inertia",
    "residual_greedy": "greedy_residual",
}


def planted_family(N: int, p: int, d: int, r: int, atoms: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(atoms, r, d, generator=g) / d**0.5
    pick = torch.rand(N, atoms, generator=g).argsort(dim=1)[:, :3]
    mix = torch.zeros(N, atoms).scatter_(1, pick, torch.rand(N, 3, generator=g) + 0.2)
    B = torch.einsum("na,ard->nrd", mix, bank)
    W = torch.randn(N, p, r, generator=g) @ B
    W += noise * W.pow(2).mean().sqrt() * torch.randn(N, p, d, generator=g)
    return (W - W.mean()) / W.std()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="N=32, p=192, d=512, r=96 instead of the Qwen layer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default=",".join(SEEDERS))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--atoms", type=int, default=8, help="shared planted atoms")
    ap.add_argument("--noise", type=float, default=0.3, help="noise RMS relative to the signal RMS")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--r", type=int, default=None, help="inner dimension asked of the warm start (default: the "
                                                          "shape's; up to d, above p the proxies are padded)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    name = "small" if args.small else "qwen3-30b-a3b"
    N, p, d, r = SHAPES[name]
    Z = planted_family(N, p, d, r, args.atoms, args.noise, seed=0).to(args.device)
    r = args.r or r
    print(
        f"# {name}: N={N} p={p} d={d} r={r}, planted {args.atoms} atoms, noise {args.noise}; "
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"| method | explained variance | seconds (median of {args.repeat}) | headline metric |")
    print("|---|---|---|---|")
    for method in args.methods.split(","):
        times = []
        for _ in range(args.repeat):
            res = seed_proxies(Z, r, method, generator=torch.Generator().manual_seed(0))
            times.append(res.metrics["time_s"])
        key = HEADLINE.get(method, "")
        head = f"{key} = {res.metrics[key]:.4f}" if key in res.metrics else ""
        print(
            f"| {method} | {res.explained_variance:.4f} | {statistics.median(times):.2f} | {head} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
