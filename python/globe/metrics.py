"""Metrics of the design document's section 5, computed from the trainer's state as flat dicts of numbers.

Each function returns plain Python numbers (or a list for the atom-usage vector), so records serialise to
JSON as they are. The trainer assembles one record per AM step (:func:`step_record`); ``globe.compress`` adds
per-family / per-layer errors, the parameter ratio and I/O throughput.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

__all__ = [
    "support_stats",
    "entropy_stats",
    "atom_popularity",
    "support_overlap",
    "gini",
    "nonfinite_counts",
    "condition_numbers",
    "peak_memory_bytes",
    "backend_metrics",
    "relative_error",
]

_OVERLAP_MAX = 4096  # support overlap is measured on at most this many evenly spaced experts
_COND_MAX = 64  # adapter Gram condition numbers on at most this many evenly spaced experts


def _even_subset(n: int, k: int, device: torch.device) -> torch.Tensor:
    if n <= k:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, k, device=device).round().long()


def support_stats(alpha: torch.Tensor, target: float | None = None) -> dict[str, float]:
    """Support size |supp(alpha_i)|: median, mean, p95, min, max and the median's error against a target."""
    s = (alpha != 0).sum(1).double()
    if s.numel() == 0:
        return {}
    out = {
        "support_median": float(s.median()),
        "support_mean": float(s.mean()),
        "support_p95": float(torch.quantile(s, 0.95)),
        "support_min": float(s.min()),
        "support_max": float(s.max()),
    }
    if target is not None:
        out["support_target"] = float(target)
        out["support_target_error"] = out["support_median"] - float(target)
    return out


def entropy_stats(alpha: torch.Tensor) -> dict[str, float]:
    """H(alpha_i) = -sum_j alpha_ij log alpha_ij in nats with 0 log 0 = 0: mean, max, and mean normalised by
    log(support) (1 = uniform over the support; experts with a single atom count as 0)."""
    a = alpha.double().clamp_min(0)
    H = -torch.xlogy(a, a).sum(1)
    s = (alpha != 0).sum(1).double()
    norm = torch.where(s > 1, H / s.clamp_min(2).log(), torch.zeros_like(H))
    return {
        "entropy_mean": float(H.mean()),
        "entropy_max": float(H.max()),
        "entropy_norm_mean": float(norm.mean()),
    }


def gini(x: torch.Tensor) -> float:
    """Gini coefficient of non-negative values (0: all equal, ->1: concentrated on one)."""
    x = x.double().flatten().sort().values
    n = x.numel()
    total = float(x.sum())
    if n == 0 or total <= 0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    return float((2 * (ranks * x).sum() / (n * total)) - (n + 1) / n)


def atom_popularity(alpha: torch.Tensor, keep_vector: bool = False) -> dict[str, Any]:
    """Atom usage: experts using each atom (counts) and code mass per atom; max/min/Gini and unused atoms."""
    counts = (alpha != 0).sum(0)
    mass = alpha.double().sum(0)
    out: dict[str, Any] = {
        "atom_usage_max": int(counts.max()),
        "atom_usage_min": int(counts.min()),
        "atom_usage_gini": gini(counts),
        "atom_mass_gini": gini(mass),
        "atoms_unused": int((counts == 0).sum()),
    }
    if keep_vector:
        out["atom_usage"] = [int(c) for c in counts.tolist()]
        out["atom_mass"] = [float(c) for c in mass.tolist()]
    return out


def support_overlap(alpha: torch.Tensor) -> float:
    """Mean Jaccard index |S_i ∩ S_k| / |S_i ∪ S_k| over pairs of distinct experts."""
    n = alpha.shape[0]
    if n < 2:
        return 0.0
    S = (alpha[_even_subset(n, _OVERLAP_MAX, alpha.device)] != 0).double()
    inter = S @ S.T
    size = S.sum(1)
    union = size[:, None] + size[None, :] - inter
    jac = inter / union.clamp_min(1)
    k = S.shape[0]
    off = jac.sum() - jac.diagonal().sum()
    return float(off / (k * (k - 1)))


def nonfinite_counts(**tensors: torch.Tensor) -> dict[str, int]:
    """NaN and Inf counts per named tensor and in total."""
    out: dict[str, int] = {}
    total_nan = total_inf = 0
    for name, t in tensors.items():
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        out[f"nan_{name}"] = n_nan
        out[f"inf_{name}"] = n_inf
        total_nan += n_nan
        total_inf += n_inf
    out["nan_count"] = total_nan
    out["inf_count"] = total_inf
    return out


def condition_numbers(G: torch.Tensor, ridge: float) -> dict[str, float]:
    """Median and max condition number of the adapter systems G_i + ridge I (on an evenly spaced subset)."""
    if G.numel() == 0:
        return {}
    sub = G[_even_subset(G.shape[0], _COND_MAX, G.device)].double()
    eye = torch.eye(G.shape[1], dtype=torch.float64, device=G.device)
    ev = torch.linalg.eigvalsh(sub + ridge * eye)
    cond = ev[:, -1] / ev[:, 0].clamp_min(torch.finfo(torch.float64).tiny)
    raw = torch.linalg.eigvalsh(sub)
    cond_raw = raw[:, -1] / raw[:, 0].clamp_min(torch.finfo(torch.float64).tiny)
    return {
        "cond_adapter_median": float(cond.median()),
        "cond_adapter_max": float(cond.max()),
        "cond_adapter_unregularised_median": float(cond_raw.median()),
    }


def peak_memory_bytes(device: torch.device) -> int:
    """torch.cuda.max_memory_allocated on CUDA; the process's peak resident set size on CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def backend_metrics() -> dict[str, int]:
    """ops.backend_counts() flattened to backend.<op>.<backend> = calls."""
    from globe_kernels import ops

    return {
        f"backend.{op}.{name}": c for op, names in ops.backend_counts().items() for name, c in names.items()
    }


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||W_hat - W||_F / ||W||_F accumulated in float64."""
    num = (W_hat.double() - W.double()).pow(2).sum()
    den = W.double().pow(2).sum()
    return float((num / den.clamp_min(torch.finfo(torch.float64).tiny)).sqrt())
