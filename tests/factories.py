"""Builders of test data shared by several test modules (imported as ``factories``: pytest puts tests/ on
sys.path for its test modules)."""

from __future__ import annotations

import torch
from globe.artifact import Artifact, scope_id

from globe_kernels.ops import SparseCodes


def random_artifact(
    *,
    n: int,
    p: int,
    d: int,
    layers: list[int] | tuple[int, ...],
    r: int = 4,
    m: int = 5,
    k: int = 3,
    scope: str = "global",
    phi: str = "identity",
    mean_scale: float | None = 1.0,
    adapter_scale: float = 1.0,
    pad: bool = False,
    seed: int = 0,
    families: tuple[str, ...] = ("gate", "up"),
    **extra,
) -> Artifact:
    """Random factors of the given shapes: unit-norm atoms, sparse simplex codes with k atoms per expert
    (``pad``: every third expert, the first included, uses one atom and -1 slots), adapters times
    adapter_scale, and a mean times mean_scale (None: no mean). ``extra`` goes to Artifact.from_factors
    (config, source, metrics)."""
    gen = torch.Generator().manual_seed(seed)
    banks, codes, adapters, means = {}, {}, {}, {}
    for f in families:
        for layer in layers:
            sid = scope_id(scope, layer)
            if (f, sid) not in banks:
                B = torch.randn(m, r, d, generator=gen)
                banks[(f, sid)] = B / B.flatten(1).norm(dim=1)[:, None, None]
                if mean_scale is not None:
                    means[(f, sid)] = mean_scale * torch.randn(p, d, generator=gen)
            idx = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)]).to(torch.int32)
            val = -torch.rand(n, k, generator=gen).clamp_min(1e-6).log()
            if pad:
                short = torch.arange(n) % 3 == 0
                idx[short, 1:] = -1
                val[short, 1:] = 0
            codes[(f, layer)] = SparseCodes(idx, val / val.sum(1, keepdim=True))
            adapters[(f, layer)] = adapter_scale * torch.randn(n, p, r, generator=gen)
    return Artifact.from_factors(
        scope=scope, phi=phi, banks=banks, codes=codes, adapters=adapters, means=means, families=families, **extra
    )
