"""Spherical k-means: cluster the experts' proxies on the unit sphere, then snap each proxy to its cluster.

1. Base proxies X_i (unit Frobenius norm) from TS-PCA (``base="ts_pca"``, default) or the SVD
   (``base="svd"``).
2. Spherical k-means over the flattened X_i with cosine similarity: seeded k-means++ initialisation (each next
   centre drawn with probability proportional to 1 - max cosine to the centres so far), then up to
   ``iterations`` rounds of assign-to-most-similar / centroid = normalised sum of members, stopping early when
   no assignment changes. An empty cluster is re-seeded with the expert least similar to its centroid.
3. Snap: each expert's row space becomes that of the blend (1 - ``blend``) X_i + ``blend`` C_c(i)
   (``blend=0``, the default, keeps the expert's own row space and explained variance), and its orthonormal
   basis is Procrustes-aligned to its own centroid C_c(i) instead of the family-wide frame before the energy
   weighting of :func:`globe.seeding.common.finish`. Proxies of one cluster thus share a frame, which tightens
   the clusters the initial bank is built from without changing what each proxy can reconstruct (at blend 0).

Cost: the base method, then per k-means round one N x k similarity product over r*d-long vectors (N k r d),
and the finish (N r^2 d products and N small r x r SVDs; N p d r more when blend > 0).

Metrics: kmeans_inertia (sum_i 1 - cos(X_i, C_c(i)) of the base proxies), kmeans_inertia_snapped (the same for
the returned proxies against their recomputed centroids), clusters, cluster_size_min / _max, empty_reseeds,
kmeans_iterations, base_explained_variance.
"""

from __future__ import annotations

import torch

from globe.errors import ConfigError
from globe.seeding.common import (
    SeedResult,
    check_fraction,
    check_positive_int,
    finish,
    make_generator,
    orthonormalize_rows,
)
from globe.seeding.svd import seed_svd
from globe.seeding.ts_pca import seed_ts_pca

__all__ = ["seed_spherical_kmeans", "spherical_kmeans"]

BASES = ("ts_pca", "svd")


def _normalize(X: torch.Tensor) -> torch.Tensor:
    return X / torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)


def spherical_kmeans(
    X: torch.Tensor, k: int, iterations: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Cluster unit rows X [N, D] by cosine: returns (labels [N] int64, unit centroids [k, D], stats)."""
    N = X.shape[0]
    gdev = generator.device
    first = int(torch.randint(N, (1,), generator=generator, device=gdev))
    centres = [first]
    best = X @ X[first]
    for _ in range(1, k):
        dist = (1 - best).clamp_min(0).to(gdev)
        if float(dist.sum()) <= 0:  # every expert coincides with a centre: take the first unused index
            used = set(centres)
            nxt = next(i for i in range(N) if i not in used)
        else:
            nxt = int(torch.multinomial(dist, 1, generator=generator))
        centres.append(nxt)
        best = torch.maximum(best, X @ X[nxt])
    C = X[centres].clone()
    labels = torch.full((N,), -1, dtype=torch.long, device=X.device)
    reseeds = 0
    rounds = 0
    for _ in range(iterations):
        rounds += 1
        new = (X @ C.transpose(0, 1)).argmax(dim=1)
        changed = bool((new != labels).any())
        labels = new
        sums = torch.zeros_like(C).index_add_(0, labels, X)
        counts = torch.bincount(labels, minlength=k)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            sim = (X * C[labels]).sum(1)
        for j in empty:
            # Move the expert least similar to its centroid, from a cluster that keeps a member.
            far = int(torch.where(counts[labels] > 1, sim, torch.full_like(sim, float("inf"))).argmin())
            reseeds += 1
            counts[labels[far]] -= 1
            sums[labels[far]] -= X[far]
            labels[far] = j
            sums[j] = X[far]
            counts[j] = 1
            sim[far] = float("inf")
            changed = True
        C = _normalize(sums)
        if not changed:
            break
    counts = torch.bincount(labels, minlength=k)
    inertia = float((1 - (X * C[labels]).sum(1)).to("cpu", torch.float64).sum())
    stats = {
        "kmeans_inertia": inertia,
        "cluster_size_min": float(counts.min()),
        "cluster_size_max": float(counts.max()),
        "empty_reseeds": float(reseeds),
        "kmeans_iterations": float(rounds),
    }
    return labels, C, stats


def seed_spherical_kmeans(
    Z: torch.Tensor,
    r: int,
    *,
    generator: torch.Generator | None = None,
    clusters: int | None = None,
    iterations: int = 20,
    blend: float = 0.0,
    base: str = "ts_pca",
    weight_floor: float = 1e-2,
) -> SeedResult:
    """Cluster-snapped proxies. Options: clusters (default max(1, round(N / 4)), the usual bank size m = n/4),
    iterations (default 20), blend (in [0, 1], default 0), base ("ts_pca" or "svd"), weight_floor."""
    N, p, d = Z.shape
    k = max(1, round(N / 4)) if clusters is None else check_positive_int("clusters", clusters, 1, N)
    check_positive_int("iterations", iterations, 1)
    check_fraction("blend", blend, open_low=False)
    check_fraction("weight_floor", weight_floor)
    if base not in BASES:
        raise ConfigError(f"base must be one of {BASES}, got {base!r}")
    g = make_generator(generator)
    seeded = (seed_ts_pca if base == "ts_pca" else seed_svd)(Z, r, generator=g, weight_floor=weight_floor)
    X = seeded.proxies.reshape(N, r * d)
    labels, C, stats = spherical_kmeans(X, k, iterations, g)
    cent = C[labels].reshape(N, r, d)
    if blend == 0:
        # The base proxies are diag(w) Q with orthogonal rows: normalising the rows gives Q back.
        Q = _normalize(seeded.proxies)
    else:
        Q = orthonormalize_rows((1 - blend) * seeded.proxies + blend * cent)
    proxies, explained, _ = finish(Z, Q, ref=cent, align="procrustes", weight_floor=weight_floor)
    Xs = proxies.reshape(N, r * d)
    Cs = _normalize(torch.zeros_like(C).index_add_(0, labels, Xs))
    stats["kmeans_inertia_snapped"] = float((1 - (Xs * Cs[labels]).sum(1)).to("cpu", torch.float64).sum())
    stats["clusters"] = float(k)
    stats["base_explained_variance"] = seeded.explained_variance
    return SeedResult(proxies, explained, stats, "spherical_kmeans")
