"""Per-family z-score of the experts in a bank's scope, and its exact fold-back.

For experts W [N, p, d] of one family:

    M   = mean_i W_i                                  [p, d]   (zeros when center=False)
    s_k = sqrt(mean_{i, c} (W_ikc - M_kc)^2)          [p]      one scale per output row
    Z_i = diag(s)^-1 (W_i - M)

so W_i = diag(s) Z_i + M exactly. A fit Z_i ~= A_i B~_i becomes W_i ~= (diag(s) A_i) B~_i + M: the scale
folds into the adapter's rows (:meth:`Normalization.fold_adapters`) and the mean stays an explicit term of
the artifact, so nothing is dropped. A per-row scale (rather than a single scalar) evens out rows of very
different norms, which the adapter can absorb at no cost; the scale is shared by all experts so the bank sees
one geometry. Rows that are constant across experts and columns get scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Normalization", "fit_normalization"]


@dataclass
class Normalization:
    """Mean [p, d] and per-row scale [p] of one family over the experts of one bank scope."""

    mean: torch.Tensor
    scale: torch.Tensor
    center: bool = True

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        """W [..., p, d] -> Z = diag(s)^-1 (W - M)."""
        mean, scale = self.mean.to(W), self.scale.to(W)
        return (W - mean) / scale[:, None]

    def invert(self, Z: torch.Tensor) -> torch.Tensor:
        """Z [..., p, d] -> W = diag(s) Z + M."""
        mean, scale = self.mean.to(Z), self.scale.to(Z)
        return Z * scale[:, None] + mean

    def fold_adapters(self, A: torch.Tensor) -> torch.Tensor:
        """Adapters of the normalised problem [N, p, r] -> adapters of the original scale diag(s) A_i."""
        return A * self.scale.to(A)[:, None]

    def to(self, *args, **kwargs) -> Normalization:
        return Normalization(self.mean.to(*args, **kwargs), self.scale.to(*args, **kwargs), self.center)


def fit_normalization(W: torch.Tensor, center: bool = True, chunk: int = 256) -> Normalization:
    """Statistics of experts W [N, p, d] (accumulated in float64, chunked over experts to bound memory)."""
    if W.dim() != 3:
        raise ValueError(f"W must be [N, p, d], got shape {tuple(W.shape)}")
    N, p, d = W.shape
    acc = torch.float64
    if center:
        mean = torch.zeros(p, d, dtype=acc, device=W.device)
        for lo in range(0, N, chunk):
            mean += W[lo : lo + chunk].to(acc).sum(0)
        mean /= N
    else:
        mean = torch.zeros(p, d, dtype=acc, device=W.device)
    sq = torch.zeros(p, dtype=acc, device=W.device)
    for lo in range(0, N, chunk):
        sq += (W[lo : lo + chunk].to(acc) - mean).pow(2).sum(dim=(0, 2))
    scale = (sq / (N * d)).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    out_dtype = W.dtype if W.is_floating_point() else torch.float32
    return Normalization(mean.to(out_dtype), scale.to(out_dtype), center)
