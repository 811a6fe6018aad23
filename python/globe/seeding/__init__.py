"""Warm starts: proxy right factors B_i^(0) [r, d] for every expert of one (z-scored) family.

    result = seed_proxies(Z, r, "ts_pca", generator=torch.Generator().manual_seed(0))
    result.proxies             # [N, r, d] float32, unit Frobenius norm each, on Z's device
    result.explained_variance  # sum_i ||Z_i P_i||^2 / sum_i ||Z_i||^2, P_i projector onto proxy i's row space

Methods (one module each; the shared last step, frame alignment and energy weighting, is in `common`):
    ts_pca            row-sampled tall-skinny PCA + per-expert range finder (default, no per-expert SVD)
    left_gram_pca     shared left subspace from sum_i Z_i Z_i^T, each expert's top row space through it svd
    per-expert truncated SVD (the best rank-r row spaces; most expensive) spherical_kmeans  cosine k-means
    over base proxies, each proxy aligned to (or blended with) its centroid residual_greedy   shared atoms
    picked greedily from the experts' own top directions for the lowest residual

r may exceed p (not d): every method then proposes the expert's whole row space (its p rows) and
:func:`globe.seeding.common.pad_outside_row_space` adds r - p rows of the family's shared row basis outside
it (metric "padded_rows").

Every method is deterministic given the generator (bit-identical on CPU for equal inputs and seed); without
one, a generator seeded 0 is used. Options are keyword arguments of each method (see its docstring); an
unknown option, a bad r or an unknown method raises :class:`globe.errors.ConfigError`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

import torch

from globe.errors import ConfigError
from globe.seeding.common import SeedResult, make_generator, pad_outside_row_space
from globe.seeding.left_gram import seed_left_gram
from globe.seeding.residual_greedy import seed_residual_greedy
from globe.seeding.spherical_kmeans import seed_spherical_kmeans
from globe.seeding.svd import seed_svd
from globe.seeding.ts_pca import seed_ts_pca

__all__ = ["SEEDERS", "SeedResult", "seed_proxies"]

SEEDERS: dict[str, Callable[..., SeedResult]] = {
    "ts_pca": seed_ts_pca,
    "left_gram_pca": seed_left_gram,
    "svd": seed_svd,
    "spherical_kmeans": seed_spherical_kmeans,
    "residual_greedy": seed_residual_greedy,
}


def _options_of(fn: Callable) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "generator"]


def seed_proxies(
    Z: torch.Tensor,
    r: int,
    method: str = "ts_pca",
    *,
    generator: torch.Generator | None = None,
    **options,
) -> SeedResult:
    """Proxy right factors of the experts Z [N, p, d] (already z-scored) by `method`; see the module
    docstring.

    Computes in float32 on Z's device. metrics always include "time_s" (wall time of the call).
    """
    if method not in SEEDERS:
        raise ConfigError(f"unknown seeding method {method!r}; known methods: {', '.join(SEEDERS)}")
    if not isinstance(Z, torch.Tensor) or Z.dim() != 3:
        shape = tuple(Z.shape) if isinstance(Z, torch.Tensor) else type(Z).__name__
        raise ConfigError(f"Z must be a [N, p, d] tensor of experts, got {shape}")
    if not (Z.is_floating_point() and Z.numel() > 0):
        raise ConfigError(f"Z must be a non-empty floating-point tensor, got dtype {Z.dtype}, shape {tuple(Z.shape)}")
    N, p, d = Z.shape
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d:
        raise ConfigError(f"r must be an integer in [1, d] = [1, {d}] for experts {p}x{d}, got {r!r}")
    fn = SEEDERS[method]
    known = _options_of(fn)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for seeding method {method!r}; it accepts: {', '.join(known)}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    Zf = Z.detach().to(torch.float32).contiguous()
    if not bool(torch.isfinite(Zf).all()):
        raise ConfigError("Z holds NaN or Inf values; seeding needs finite experts")
    sync = torch.cuda.synchronize if Zf.is_cuda else (lambda: None)
    start = time.perf_counter()
    if r <= min(p, d):
        result = fn(Zf, r, generator=generator, **options)
    else:  # r > p: the method's proxies span each expert's row space; the rest come from the family
        generator = make_generator(generator)
        result = fn(Zf, p, generator=generator, **options)
        result.proxies = pad_outside_row_space(Zf, result.proxies, r, generator=generator)
        result.metrics["padded_rows"] = r - p
    sync()
    result.metrics["time_s"] = time.perf_counter() - start
    result.method = method
    return result
