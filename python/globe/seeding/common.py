"""Pieces shared by the warm-start methods: the result type, input checks, small linear algebra, and `finish`.

Every method reduces to the same last step. It finds, for each expert i, an orthonormal basis Q_i [r, d] of
the row space it proposes (the directions of Z_i worth keeping), and :func:`finish` turns that basis into the
proxy

    B_i^(0) = diag(w_i) O_i Q_i / ||w_i||

where
  * O_i [r, r] is the orthogonal frame fix. Singular vectors come with arbitrary signs and, inside a subspace,
    an arbitrary rotation, so two experts with the same row space could get unrelated proxies and k-means or
    least squares over the proxies would see noise. With ``align="procrustes"`` (default) O_i is the rotation
    that brings Q_i closest to a shared reference frame R [r, d] (the polar factor of R Q_i^T): the aligned
    basis depends only on the subspace and R, so equal subspaces give equal proxies and nearby subspaces give
    nearby proxies. With ``align="sign"`` only signs are fixed (each row's largest coordinate in the reference
    frame, or in the standard basis without a reference, is made positive): cheaper, rows stay ordered by
    energy.
  * w_ik = ||Z_i q_ik|| is the expert's energy along each aligned direction, floored at ``weight_floor`` times
    its largest, so the proxy carries the expert's energy distribution (least-squares coding then weights the
    dominant directions) while staying full rank with condition number <= 1 / weight_floor, which keeps the
    adapter fit A_i = W_i B_i^+ well posed. A diagonal positive scaling does not change the row space.
  * the division makes every proxy unit Frobenius norm, the scale of the bank's atoms and of simplex mixtures.

The explained variance of proxies built this way is sum_i ||Z_i Q_i^T||^2 / sum_i ||Z_i||^2 (exactly the
definition with the projector onto each proxy's row space, since that row space is span(Q_i)).

All methods compute in float32 on the device of Z. The few dense factorisations (eigh, svd, qr, Cholesky) are
small (r x r, q x q) except where a module says otherwise; torch does not implement them on MPS, so
:func:`on_cpu_if_mps` runs them on the CPU there and moves the result back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from globe.errors import ConfigError

__all__ = [
    "ALIGNS",
    "SeedResult",
    "check_align",
    "check_fraction",
    "check_positive_int",
    "eigh_desc",
    "energy_fraction",
    "finish",
    "frame_turn",
    "make_generator",
    "on_cpu_if_mps",
    "orthonormalize_rows",
    "pad_outside_row_space",
    "sample_rows",
    "shared_row_basis",
    "top_right_singular",
    "total_energy",
]

ALIGNS = ("procrustes", "sign")


@dataclass
class SeedResult:
    """Proxy right factors of every expert of one family, with how well they describe the experts."""

    proxies: torch.Tensor  # [N, r, d] float32, on the device of the input
    explained_variance: float  # sum_i ||Z_i P_i||^2 / sum_i ||Z_i||^2, P_i the projector onto rows of proxy i
    metrics: dict[str, float] = field(default_factory=dict)
    method: str = ""


# --------------------------------------------------------------------------------------------------- checks


def check_positive_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return value


def check_fraction(name: str, value, *, open_low: bool = True, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if (value <= low if open_low else value < low) or value > high:
        raise ConfigError(f"{name} must be in {'(' if open_low else '['}{low}, {high}], got {value}")
    return float(value)


def check_align(align: str) -> str:
    if align not in ALIGNS:
        raise ConfigError(f"align must be one of {ALIGNS}, got {align!r}")
    return align


def make_generator(generator: torch.Generator | None) -> torch.Generator:
    """The generator to draw from: the caller's, or a fresh one seeded 0 (results never depend on global
    RNG)."""
    if generator is not None:
        return generator
    g = torch.Generator()
    g.manual_seed(0)
    return g


# ------------------------------------------------------------------------------------------ linear algebra


def on_cpu_if_mps(fn: Callable, *tensors: torch.Tensor, **kwargs):
    """Call a torch.linalg factorisation; on MPS (where eigh, svd, qr, cholesky are not implemented) run it on
    the CPU and move the result back. The inputs given here are small (r x r or q x q per expert) or, for QR,
    one
    expert-batch of [d, r] bases, so the round trip is cheap next to the products that built them."""
    device = tensors[0].device
    if device.type != "mps":
        return fn(*tensors, **kwargs)
    out = fn(*(t.cpu() for t in tensors), **kwargs)
    if isinstance(out, torch.Tensor):
        return out.to(device)
    return type(out)(*(o.to(device) for o in out))


def eigh_desc(G: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of symmetric G [..., n, n]: values [..., k] descending (clamped at 0), vectors [...,
    n, k]."""
    G = 0.5 * (G + G.transpose(-1, -2))
    vals, vecs = on_cpu_if_mps(torch.linalg.eigh, G)
    vals = vals.flip(-1)[..., :k].clamp_min(0)
    vecs = vecs.flip(-1)[..., :k]
    return vals, vecs


def orthonormalize_rows(X: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """Orthonormal rows spanning the row space of X [..., k, d] (k <= d), k rows always.

    Cholesky QR (a Gram, a small Cholesky and one product: fast where Householder QR is not), repeated up to
    three times while max |Q Q^T - I| > tol, which brings inputs with condition number up to ~1e3 to float32
    orthonormality. Batch entries whose Gram is not positive definite or still not orthonormal (rank-deficient
    input) go through Householder QR, which completes the basis with further directions.
    """
    squeeze = X.dim() == 2
    if squeeze:
        X = X.unsqueeze(0)
    Q = X
    eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
    failed = torch.zeros(X.shape[0], dtype=torch.bool, device=X.device)
    for attempt in range(4):
        G = Q @ Q.transpose(-1, -2)
        todo = ((G - eye).abs().amax(dim=(-1, -2)) > tol) & ~failed
        if attempt == 3 or not bool(todo.any()):
            break
        L, info = on_cpu_if_mps(torch.linalg.cholesky_ex, G)
        failed |= todo & (info != 0)
        todo &= info == 0
        L = torch.where(todo[:, None, None], L, eye)
        # Invert the small triangle, then one product: faster than a batched triangular solve against [k, d].
        Q = on_cpu_if_mps(torch.linalg.solve_triangular, L, eye.expand_as(L), upper=False) @ Q
    bad = failed | ((G - eye).abs().amax(dim=(-1, -2)) > 10 * tol)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        Qb = on_cpu_if_mps(torch.linalg.qr, X[idx].transpose(-1, -2)).Q.transpose(-1, -2)
        Q = Q.index_copy(0, idx, Qb)
    return Q[0] if squeeze else Q


def top_right_singular(T: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r right singular vectors of T [..., k, d] (r <= k) through the k x k Gram, as orthonormal rows.

    Returns (Q [..., r, d], squared singular values [..., r] descending).
    """
    mu, L = eigh_desc(T @ T.transpose(-1, -2), r)
    top = mu[..., :1].clamp_min(torch.finfo(T.dtype).tiny)
    scale = mu.clamp_min(top * 1e-12).rsqrt()
    Q = (L * scale.unsqueeze(-2)).transpose(-1, -2) @ T
    return orthonormalize_rows(Q), mu


def total_energy(Z: torch.Tensor) -> torch.Tensor:
    """||Z_i||_F^2 per expert, float64 [N] on the CPU (norms taken in float32, which sums in a cascade, then
    squared). Sums of this kind are moved to the CPU before going to float64: MPS has no float64."""
    return torch.linalg.vector_norm(Z, dim=(-2, -1)).to("cpu", torch.float64).square()


def energy_fraction(X: torch.Tensor, total: torch.Tensor) -> float:
    """sum_i ||X_i||_F^2 / sum(total), `total` the per-expert energies (float64, on the CPU)."""
    denom = float(total.sum())
    return float(total_energy(X).sum()) / denom if denom > 0 else 1.0


# -------------------------------------------------------------------------------------------- sampling


def sample_rows(Z: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """`rows` distinct rows of every expert, uniformly at random: [N * rows, d] (a copy)."""
    N, p, _ = Z.shape
    keys = torch.rand(N, p, generator=generator, device=generator.device)
    idx = keys.argsort(dim=1)[:, :rows].to(Z.device)
    S = torch.gather(Z, 1, idx.unsqueeze(-1).expand(N, rows, Z.shape[2]))
    return S.reshape(N * rows, Z.shape[2])


def shared_row_basis(S: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q right singular subspace of a tall (or wide) sample S [R, d]: rows V [q, d], squared values [q].

    Uses the d x d Gram when R >= d and the R x R Gram otherwise, so the eigenproblem is min(R, d) wide.
    """
    R, d = S.shape
    if R >= d:
        lam, W = eigh_desc(S.transpose(0, 1) @ S, q)
        return W.transpose(0, 1).contiguous(), lam
    return top_right_singular(S, q)


# ------------------------------------------------------------------------------------------- the last step


def frame_turn(Q: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The rotation O [..., k, k] that brings orthonormal rows Q [..., k, d] closest to the frame ref ([k, d] or
    [..., k, d]): the polar factor of ref Qᵀ (orthogonal Procrustes)."""
    U, _, Vh = on_cpu_if_mps(torch.linalg.svd, ref @ Q.transpose(-1, -2))
    return U @ Vh


def _canonical_signs(Q: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    coords = Q if ref is None else Q @ ref.transpose(-1, -2)
    pick = coords.abs().argmax(dim=-1, keepdim=True)
    sign = torch.gather(coords, -1, pick).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return Q * sign


def finish(
    Z: torch.Tensor,
    Q: torch.Tensor,
    *,
    ref: torch.Tensor | None,
    align: str,
    weight_floor: float,
    energies: torch.Tensor | None = None,
    total: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Aligned, energy-weighted, unit-norm proxies from orthonormal bases Q [N, r, d] (see the module
    docstring).

    ``ref`` is the reference frame, [r, d] shared or [N, r, d] per expert. ``energies`` [N, r], when the
    caller knows them, are ||Z_i q_ik||^2 for the rows of Q with Q's rows the eigenvectors of Q Z_i^T Z_i Q^T
    (so the projected Gram is diagonal); otherwise Z_i Q_i^T is formed here (one N*p*d*r product). Returns
    (proxies [N, r, d], explained variance, captured energy per expert float64 [N]).
    """
    if align == "procrustes" and ref is not None:
        O = frame_turn(Q, ref)
        Q = O @ Q
        if energies is not None:  # diag(O diag(e) O^T)
            energies = (O.square() * energies.unsqueeze(-2)).sum(-1)
    else:
        Q = _canonical_signs(Q, ref)
    if energies is None:
        energies = (Z @ Q.transpose(-1, -2)).square().sum(dim=-2)
    energies = energies.clamp_min(0)
    captured = energies.to("cpu", torch.float64).sum(-1)
    total = total_energy(Z) if total is None else total
    denom = float(total.sum())
    explained = float(captured.sum()) / denom if denom > 0 else 1.0

    w = energies.sqrt()
    top = w.amax(dim=-1, keepdim=True)
    w = torch.where(top > 0, torch.maximum(w, weight_floor * top), torch.ones_like(w))
    w = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    proxies = w.unsqueeze(-1) * Q
    return proxies.contiguous(), min(max(explained, 0.0), 1.0), captured


def pad_outside_row_space(Z: torch.Tensor, proxies: torch.Tensor, r: int, *, generator: torch.Generator,
                          chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Proxies of r rows from proxies [N, k, d] that already span each expert's whole row space (k = p < r).

    An expert of rank p has no energy outside its p-row proxy, so the r - k extra rows (an inner dimension r > p,
    see :mod:`globe.config`) come from the family instead: the directions of the shared top-r row basis of a
    row sample of all experts that lie furthest outside the expert's own row space (the top right singular
    vectors of that basis with the expert's rows projected out), turned to the frame of the basis's rows k..r so
    that experts with the same extra subspace get the same rows. Rows shared by many experts let the bank's atoms
    start from a common extra subspace each expert's adapter can draw on. The extra rows get the weight of
    the proxy's weakest row (they carry no energy of the expert, so no more than its least direction), and each
    proxy is scaled back to unit Frobenius norm. Works on chunks of experts (at most ``chunk_elems`` numbers of
    candidates at a time; the result does not depend on it). Returns [N, r, d]."""
    N, k, d = proxies.shape
    if not k < r <= d:
        raise ValueError(f"pad_outside_row_space: needs k < r <= d, got k={k}, r={r}, d={d}")
    from globe.seeding.ts_pca import shared_basis  # ts_pca imports this module

    V, _ = shared_basis(Z, min(r, N * Z.shape[1]), generator=generator)  # [q, d], q <= the rows there are
    q = V.shape[0]
    if q < r:
        # a family of few experts may span fewer than r directions: random ones at a thousandth of the weight
        # fill what is left without outranking any shared direction (drawn from their own generator, seeded
        # from the caller's seed, so the caller's draws after the warm start do not depend on them)
        own = torch.Generator(device=generator.device).manual_seed(generator.initial_seed() + 1)
        fill = torch.randn(r - q, d, generator=own, device=generator.device).to(V)
        V = torch.cat([V, 1e-3 * fill / fill.norm(dim=1, keepdim=True)])
    ref = V[k:r]  # the frame the extra rows are turned to, as finish() turns the experts' own rows
    out = torch.empty(N, r, d, dtype=proxies.dtype, device=proxies.device)
    out[:, :k] = proxies
    # by chunks of experts, each expert's working set being a few [r, d] matrices
    chunk = max(1, chunk_elems // (V.shape[0] * d))
    for lo in range(0, N, chunk):
        P = proxies[lo : lo + chunk]
        Q = orthonormalize_rows(P)  # the expert's row space
        M = V @ Q.transpose(-1, -2)  # [c, r, k]
        if q == r:
            # V's rows are orthonormal, so V outside Q_i, V - M Q_i, has singular value 1 exactly on the
            # null space of M_iᵀ (dimension >= r - k) and below 1 elsewhere: its top r - k directions are that
            # null space, read from a complete QR of M_i instead of an r x r eigenproblem
            U = on_cpu_if_mps(torch.linalg.qr, M, mode="complete").Q
            extra = U[:, :, k:r].transpose(-1, -2) @ V
        else:
            extra, _ = top_right_singular(V.unsqueeze(0) - M @ Q, r - k)
        extra = frame_turn(extra, ref) @ extra
        w = torch.linalg.vector_norm(P, dim=-1).amin(dim=-1)
        out[lo : lo + chunk, k:] = w[:, None, None] * extra
    return out / torch.linalg.vector_norm(out, dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
