"""Pure-torch versions of every GloBE op.

These are the ground truth the kernels are tested against and the path used on CPU and MPS. They favour
clarity over speed but stay vectorised, so the trainer can run on them at realistic sizes.

Shapes used throughout:
    bank      [m, r, d]   the shared atoms B_j
    alpha     [n, m]      mixture codes, rows on the simplex, mostly zero
    codes     SparseCodes(indices [n, k] int, values [n, k]); an index of -1 marks an unused slot
    composed  [n, r, d]   B~_i = phi(sum_j alpha_ij B_j)
    adapter   [n, p, r]   A_i
    x         [T, d]      tokens grouped by expert: rows offsets[e]:offsets[e+1] belong to expert e
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

PHIS = ("identity", "tanh", "silu")
ACTS = ("silu",)


class SparseCodes(NamedTuple):
    """Row-sparse mixture codes: for expert i, atoms indices[i, s] with weight values[i, s].

    Slots with index -1 are padding and contribute nothing (their value is ignored).
    """

    indices: torch.Tensor  # [n, k] int32/int64
    values: torch.Tensor  # [n, k] float


def check_phi(phi: str | None) -> str:
    phi = "identity" if phi is None else phi
    if phi not in PHIS:
        raise ValueError(f"phi must be one of {PHIS}, got {phi!r}")
    return phi


def apply_phi(t: torch.Tensor, phi: str | None) -> torch.Tensor:
    phi = check_phi(phi)
    if phi == "tanh":
        return torch.tanh(t)
    if phi == "silu":
        return F.silu(t)
    return t


def to_sparse_codes(alpha: torch.Tensor, k: int | None = None) -> SparseCodes:
    """Dense codes [n, m] -> SparseCodes with k slots per row (default: the largest support).

    Slots are filled by decreasing weight; rows with fewer than k nonzeros are padded with index -1.
    """
    if alpha.dim() != 2:
        raise ValueError(f"alpha must be [n, m], got shape {tuple(alpha.shape)}")
    nnz = (alpha != 0).sum(1)
    if k is None:
        k = max(int(nnz.max().item()) if alpha.numel() else 1, 1)
    k = min(k, alpha.shape[1])
    values, indices = alpha.abs().topk(k, dim=1)
    values = alpha.gather(1, indices)
    indices = indices.to(torch.int32)
    unused = values == 0
    indices = indices.masked_fill(unused, -1)
    values = values.masked_fill(unused, 0)
    return SparseCodes(indices, values)


def to_dense_codes(codes: SparseCodes, m: int) -> torch.Tensor:
    """SparseCodes -> dense [n, m] (duplicate indices add up)."""
    idx = codes.indices.long()
    valid = idx >= 0
    dense = torch.zeros(idx.shape[0], m, dtype=codes.values.dtype, device=codes.values.device)
    dense.scatter_add_(1, idx.clamp(min=0), torch.where(valid, codes.values, torch.zeros_like(codes.values)))
    return dense


def compose(
    bank: torch.Tensor,
    alpha: torch.Tensor | SparseCodes,
    phi: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """B~_i = phi(sum_j alpha_ij B_j) for every expert: [m, r, d] x [n, m] -> [n, r, d].

    Accumulates in float32 (float64 stays float64); the result is cast to out_dtype (default bank.dtype).
    """
    if bank.dim() != 3:
        raise ValueError(f"bank must be [m, r, d], got shape {tuple(bank.shape)}")
    m, r, d = bank.shape
    acc = torch.float64 if bank.dtype == torch.float64 else torch.float32
    if isinstance(alpha, SparseCodes) and alpha.indices.dim() == 2 and 48 * alpha.indices.shape[1] <= m:
        # few atoms per expert out of many: gather them, k axpys of [n, r*d], instead of a product with the
        # mostly-zero dense codes over all m atoms (on CPU an axpy costs about as much as 45 atoms of the
        # product: at m = 512, r*d = 24576, 53 ms against 90 for k = 4 and 320 against 110 for k = 49)
        idx = alpha.indices.long()
        if bool(((idx < -1) | (idx >= m)).any()):
            raise ValueError(f"code indices must lie in [0, {m}) or be -1 (unused slot)")
        valid = idx >= 0
        vals = torch.where(valid, alpha.values, torch.zeros((), dtype=alpha.values.dtype)).to(acc)
        flat = bank.reshape(m, r * d)
        out = torch.zeros(idx.shape[0], r * d, dtype=acc, device=bank.device)
        for k in range(idx.shape[1]):
            out.addcmul_(flat.index_select(0, idx[:, k].clamp_min(0)).to(acc), vals[:, k : k + 1])
        return apply_phi(out.reshape(-1, r, d), phi).to(out_dtype or bank.dtype)
    dense = to_dense_codes(alpha, m) if isinstance(alpha, SparseCodes) else alpha
    if dense.dim() != 2 or dense.shape[1] != m:
        raise ValueError(f"alpha must be [n, {m}] for a bank of {m} atoms, got shape {tuple(dense.shape)}")
    out = (dense.to(acc) @ bank.reshape(m, r * d).to(acc)).reshape(-1, r, d)
    out = apply_phi(out, phi)
    return out.to(out_dtype or bank.dtype)


def prune_renorm(alpha: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """epsilon-prune and renormalise rows of probabilities.

    Entries below eps (and entries <= 0) are zeroed and every row is rescaled to sum 1. A row whose entries
    would all be pruned keeps its largest entry (weight 1).
    Returns (pruned alpha in alpha's dtype, support size per row int32).
    """
    if alpha.dim() != 2:
        raise ValueError(f"alpha must be [n, m], got shape {tuple(alpha.shape)}")
    acc = torch.float64 if alpha.dtype == torch.float64 else torch.float32
    a = alpha.to(acc)
    keep = (a >= eps) & (a > 0)
    top = a.argmax(dim=1, keepdim=True)
    # keep the row's largest entry when nothing else survives, or when what survives carries no mass
    rescue = ~keep.any(dim=1, keepdim=True)
    keep = torch.where(rescue, torch.zeros_like(keep), keep)
    keep = keep.scatter(1, top, keep.gather(1, top) | rescue)
    out = torch.where(keep, a, torch.zeros_like(a))
    out = torch.where(rescue & keep, torch.ones_like(out), out)
    out = out / out.sum(1, keepdim=True)
    return out.to(alpha.dtype), keep.sum(1).to(torch.int32)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ weight[e].T for every expert e; fp32 accumulation."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty(x.shape[0], weight.shape[1], dtype=acc, device=x.device)
    bounds = offsets.tolist()
    for e in range(weight.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = x[lo:hi].to(acc) @ weight[e].to(acc).T
    return out


def expert_projection(
    x: torch.Tensor,
    offsets: torch.Tensor,
    adapter: torch.Tensor,
    composed: torch.Tensor | None = None,
    bank: torch.Tensor | None = None,
    codes: SparseCodes | None = None,
    phi: str | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """A_e (B~_e x) for every token, in float32 (or float64): [T, d] -> [T, p].

    B~ comes precomposed ([n, r, d]) or is composed here from bank + codes. shift [T, p] is added as is
    (the inference patch passes the normalisation mean's product and expert biases through it).
    """
    if composed is None:
        if bank is None or codes is None:
            raise ValueError("pass either composed, or bank and codes")
        composed = compose(
            bank, codes, phi=phi, out_dtype=torch.float64 if x.dtype == torch.float64 else None
        )
    inner = _grouped_linear(x, composed, offsets)
    out = _grouped_linear(inner.to(x.dtype) if x.dtype != torch.float64 else inner, adapter, offsets)
    if shift is not None:
        out = out + shift.to(out.dtype)
    return out


def adapter_gemm(
    x: torch.Tensor,
    offsets: torch.Tensor,
    adapter_gate: torch.Tensor,
    adapter_up: torch.Tensor,
    *,
    composed_gate: torch.Tensor | None = None,
    composed_up: torch.Tensor | None = None,
    bank_gate: torch.Tensor | None = None,
    codes_gate: SparseCodes | None = None,
    bank_up: torch.Tensor | None = None,
    codes_up: SparseCodes | None = None,
    phi: str | None = None,
    shift_gate: torch.Tensor | None = None,
    shift_up: torch.Tensor | None = None,
    act: str | None = "silu",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The gate/up half of a GloBE expert for tokens grouped by expert.

    gate = A_g,e (B~_g,e x) + shift_gate, up = A_u,e (B~_u,e x) + shift_up. With act="silu" returns
    h = silu(gate) * up [T, p]; with act=None returns (gate, up). B~ is either precomposed (composed_*) or
    composed from a bank and sparse codes (bank mode). The inner product B~ x is rounded to x's dtype before
    the adapter, as a kernel keeping it in the compute dtype does.
    """
    if act is not None and act not in ACTS:
        raise ValueError(f"act must be one of {ACTS} or None, got {act!r}")
    gate = expert_projection(x, offsets, adapter_gate, composed_gate, bank_gate, codes_gate, phi, shift_gate)
    up = expert_projection(x, offsets, adapter_up, composed_up, bank_up, codes_up, phi, shift_up)
    out_dtype = out_dtype or x.dtype
    if act is None:
        return gate.to(out_dtype), up.to(out_dtype)
    return (F.silu(gate) * up).to(out_dtype)


def cholesky_solve_batched(G: torch.Tensor, R: torch.Tensor, lam: float) -> tuple[torch.Tensor, int]:
    """A_i = R_i (G_i + lam I)^-1 for n symmetric systems: G [n, r, r], R [n, p, r] -> A [n, p, r].

    Factors G_i + lam I by Cholesky; systems that are not positive definite are solved by a general LU solve
    instead (least squares if singular). Returns (A, number of systems that fell back).
    """
    if G.dim() != 3 or G.shape[1] != G.shape[2]:
        raise ValueError(f"G must be [n, r, r], got shape {tuple(G.shape)}")
    if R.dim() != 3 or R.shape[0] != G.shape[0] or R.shape[2] != G.shape[1]:
        raise ValueError(f"R must be [n, p, {G.shape[1]}] to match G {tuple(G.shape)}, got {tuple(R.shape)}")
    r = G.shape[1]
    Gl = G + lam * torch.eye(r, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(Gl)
    # (G + lam I) A^T = R^T since G is symmetric
    A = torch.cholesky_solve(R.transpose(1, 2), L).transpose(1, 2)
    bad = info != 0
    n_bad = int(bad.sum().item())
    if n_bad:
        idx = bad.nonzero().squeeze(1)
        At = torch.linalg.lstsq(Gl[idx], R[idx].transpose(1, 2)).solution
        A[idx] = At.transpose(1, 2)
    return A, n_bad
