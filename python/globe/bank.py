"""The initial bank, codes and adapters (design document step 5), and the code helpers of the AM loop.

* :func:`kmeans_bank`: m atoms from the proxies B_i^(0) by k-means (k-means++ seeding drawn from the caller's
  generator, then Lloyd iterations) on the unit-normalised, flattened proxies; atoms get unit Frobenius norm.
* :func:`ls_codes`: least-squares codes of targets X_i against the bank, (K + ridge) c = <X_i, B_j>, with
  K_jk = <B_j, B_k> the bank's m x m Gram matrix (a linear solve, never an inverse).
* :func:`project_simplex`: the Euclidean projection onto the probability simplex (sort-based, batched), the
  proper projection rather than clamp-and-renormalise: clamping then renormalising is not the nearest point of
  the simplex and does not shrink the support the way the projection's common shift does.
* :func:`sparsify`: the coding step's tempered entmax (or top-K) applied to the logs of probabilities,
  followed by the epsilon-prune of ``ops.prune_renorm``.
* :func:`fit_adapters`: A_i = Z_i B~_iᵀ (B~_i B~_iᵀ + lam I)^-1 through ``ops.cholesky_solve_batched``.
"""

from __future__ import annotations

import torch

from globe_kernels import ops

__all__ = [
    "kmeans_bank",
    "ls_codes",
    "project_simplex",
    "sparsify",
    "simplex_codes",
    "fit_adapters",
    "LOG_FLOOR",
]

# probabilities below this are treated as zero when taking logs for the tempered entmax
LOG_FLOOR = 1e-4


def project_simplex(v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean projection of each row of v [n, m] onto {x >= 0, sum x = 1}.

    With mask [n, m] (bool), entries outside the mask are fixed to zero and the rest projected onto the
    simplex of the masked coordinates (every row needs at least one masked-in entry).
    Algorithm: sort descending, find the largest k with u_k - (sum_{l<=k} u_l - 1)/k > 0, shift by that
    threshold and clamp at zero.
    """
    if v.dim() != 2:
        raise ValueError(f"v must be [n, m], got shape {tuple(v.shape)}")
    if mask is not None:
        v = v.masked_fill(~mask, float("-inf"))
    u, _ = torch.sort(v, dim=1, descending=True)
    finite = torch.isfinite(u)
    css = torch.cumsum(torch.where(finite, u, torch.zeros_like(u)), dim=1) - 1
    k = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = finite & (u - css / k > 0)
    rho = (cond * k).argmax(dim=1, keepdim=True)  # last index where cond holds (cond is a prefix)
    theta = css.gather(1, rho) / (rho + 1).to(v.dtype)
    out = (v - theta).clamp_min(0)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def kmeans_bank(
    proxies: torch.Tensor, m: int, *, generator: torch.Generator | None = None, iters: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means over flattened unit-norm proxies [N, r, d] -> (bank [m, r, d] unit Frobenius norm, labels [N]).

    k-means++ seeding (first centre uniformly, then proportional to squared distance) from `generator`, then
    `iters` Lloyd iterations; an emptied cluster is re-seeded with the point farthest from its centre.
    """
    N, r, d = proxies.shape
    if not 1 <= m <= N:
        raise ValueError(f"k-means needs 1 <= m <= N, got m={m}, N={N}")
    X = proxies.reshape(N, r * d)
    X = X / X.norm(dim=1, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
    xx = X.pow(2).sum(1)

    def sqdist(C: torch.Tensor) -> torch.Tensor:
        return (xx[:, None] + C.pow(2).sum(1)[None, :] - 2 * X @ C.T).clamp_min(0)

    first = int(torch.randint(N, (1,), generator=generator, device="cpu"))
    centres = [X[first]]
    dmin = sqdist(X[first : first + 1]).squeeze(1)
    for _ in range(1, m):
        total = float(dmin.sum())
        if total > 0:
            probs = (dmin / total).double().cpu()
            idx = int(torch.multinomial(probs, 1, generator=generator))
        else:  # all points coincide with centres: take any point not yet chosen
            idx = int(torch.randint(N, (1,), generator=generator, device="cpu"))
        centres.append(X[idx])
        dmin = torch.minimum(dmin, sqdist(X[idx : idx + 1]).squeeze(1))
    C = torch.stack(centres)
    labels = sqdist(C).argmin(1)
    for _ in range(iters):
        counts = torch.bincount(labels, minlength=m)
        sums = torch.zeros_like(C).index_add_(0, labels, X)
        newC = sums / counts.clamp_min(1)[:, None].to(X.dtype)
        dist = sqdist(newC)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            own = dist.gather(1, labels[:, None]).squeeze(1)
            far = torch.argsort(own, descending=True, stable=True)
            for slot, j in enumerate(empty):
                newC[j] = X[far[slot]]
            dist = sqdist(newC)
        new_labels = dist.argmin(1)
        C = newC
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    norms = C.norm(dim=1, keepdim=True)
    # a zero centre (opposite proxies averaging out) is replaced by its cluster's first member
    for j in (norms.squeeze(1) == 0).nonzero().flatten().tolist():
        members = (labels == j).nonzero().flatten()
        C[j] = X[members[0]] if members.numel() else X[j % N]
    C = C / C.norm(dim=1, keepdim=True)
    return C.reshape(m, r, d), labels


def ls_codes(targets: torch.Tensor, bank: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Unconstrained least-squares codes [N, m] of targets [N, r, d] against bank [m, r, d].

    Solves (K + ridge * mean(diag K) I) c_i = (<X_i, B_j>)_j by Cholesky (LU if K is not definite).
    """
    m = bank.shape[0]
    Bf = bank.reshape(m, -1)
    K = Bf @ Bf.T
    K = K + ridge * K.diagonal().mean().clamp_min(torch.finfo(K.dtype).tiny) * torch.eye(
        m, dtype=K.dtype, device=K.device
    )
    rhs = targets.reshape(targets.shape[0], -1) @ Bf.T  # [N, m]
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, L).T
    return torch.linalg.solve(K, rhs.T).T


def _tempered_logits(probs: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """log of probabilities with a graded floor: zero entries get log(LOG_FLOOR) * (1 + their score deficit).

    The deficit orders the zeros by how close their raw score came to the support (the least-squares value
    for the projection's zeros), so when the temperature rises the atoms enter one by one in that order
    instead of all at once at a common floor.
    """
    logp = probs.clamp_min(LOG_FLOOR).log()
    if scores is None:
        return logp
    zero = probs <= 0
    if not bool(zero.any()):
        return logp
    span = (scores.max(1, keepdim=True).values - scores.min(1, keepdim=True).values).clamp_min(
        torch.finfo(scores.dtype).tiny
    )
    deficit = (scores.max(1, keepdim=True).values - scores) / span  # in [0, 1]
    return torch.where(zero, logp * (1 + deficit), logp)


def sparsify(
    probs: torch.Tensor,
    temperature: float,
    *,
    sparsity: str = "entmax15",
    eps: float = 1e-3,
    entmax_alpha: float = 1.5,
    top_k: int | None = None,
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The coding step's sparsity: alpha = prune(entmax(log(probs) / T)) or prune(top-K(probs)).

    probs [N, m] rows on the simplex; scores [N, m] optional raw scores that order the zero entries (see
    :func:`_tempered_logits`). Returns (alpha [N, m] on the simplex, support int32 [N], pruned fraction: the
    share of the entmax output's nonzeros that the epsilon-prune removed).
    """
    import entmax

    if sparsity == "topk":
        if top_k is None:
            raise ValueError('sparsity="topk" needs top_k')
        k = min(top_k, probs.shape[1])
        z = _tempered_logits(probs, scores)
        idx = z.topk(k, dim=1).indices
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)
        out = torch.where(keep, probs, torch.zeros_like(probs))
        # a row whose projection left fewer than k nonzeros keeps what it has
        out = out / out.sum(1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    else:
        z = _tempered_logits(probs, scores) / temperature
        if sparsity == "entmax15":
            out = entmax.entmax15(z, dim=1)
        elif sparsity == "sparsemax":
            out = entmax.sparsemax(z, dim=1)
        elif sparsity == "entmax_bisect":
            out = entmax.entmax_bisect(z, alpha=entmax_alpha, dim=1)
        else:
            raise ValueError(f"unknown sparsity {sparsity!r}")
    before = int((out > 0).sum())
    alpha, support = ops.prune_renorm(out, eps)
    pruned = (before - int(support.sum())) / max(before, 1)
    return alpha, support, pruned


def simplex_codes(targets: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares then Euclidean simplex projection: (probabilities [N, m], raw LS codes [N, m])."""
    raw = ls_codes(targets, bank)
    return project_simplex(raw), raw


def fit_adapters(
    Z: torch.Tensor, composed: torch.Tensor, lam: float, chunk: int = 512
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """A_i = Z_i B~_iᵀ (B~_i B~_iᵀ + lam_i I)^-1 for Z [N, p, d], composed [N, r, d].

    lam is relative: the ridge is lam * mean_i(trace(G_i) / r). Returns (A [N, p, r], Cholesky fallbacks, G
    [N, r, r] without the ridge, for condition numbers).
    """
    G = composed @ composed.transpose(1, 2)
    r = G.shape[1]
    ridge = float(lam) * float(G.diagonal(dim1=1, dim2=2).sum(1).mean()) / r
    ridge = max(ridge, float(torch.finfo(G.dtype).tiny))
    A = torch.empty(Z.shape[0], Z.shape[1], r, dtype=Z.dtype, device=Z.device)
    fallbacks = 0
    for lo in range(0, Z.shape[0], chunk):
        hi = min(lo + chunk, Z.shape[0])
        R = Z[lo:hi] @ composed[lo:hi].transpose(1, 2)
        A[lo:hi], nf = ops.cholesky_solve_batched(G[lo:hi], R, ridge)
        fallbacks += nf
    return A, fallbacks, G


def row_bases(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal bases [N, r, d] of the row spaces of X [N, r, d] (thin QR of each X_iᵀ)."""
    Q, _ = torch.linalg.qr(X.transpose(1, 2))
    return Q.transpose(1, 2)


def subspace_similarity(V: torch.Tensor, C: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """sim[i, j] = ||C_j V_iᵀ||_F^2 in [0, r] for orthonormal row bases V [N, r, d] and C [m, r, d]: the
    energy of subspace j inside subspace i (r when they coincide). Frame-free: it only depends on the
    projectors V_iᵀV_i and C_jᵀC_j."""
    N, r, d = V.shape
    m = C.shape[0]
    Cf = C.reshape(m * r, d)
    out = torch.empty(N, m, dtype=V.dtype, device=V.device)
    for lo in range(0, N, chunk):
        Vc = V[lo : lo + chunk]
        G = (Vc.reshape(-1, d) @ Cf.T).reshape(Vc.shape[0], r, m, r)
        out[lo : lo + chunk] = G.square().sum(dim=(1, 3))
    return out


def subspace_bank(
    X: torch.Tensor,
    m: int,
    *,
    generator: torch.Generator | None = None,
    iters: int = 20,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k-subspaces over the row spaces of X [N, r, d]: m atoms, each the shared r-dimensional row space of
    a cluster of experts -> (bank [m, r, d] unit Frobenius norm, labels [N], sim [N, m]).

    Because W_i ~= A_i B~_i with A_i free, only the row space of B~_i is identifiable from W_i; a proxy's
    frame (which basis of that row space) is arbitrary, so k-means over flattened proxies compares frames as
    much as subspaces. Here the distance is frame-free: r - ||C_j V_iᵀ||^2 (V_i, C_j orthonormal row bases).
    Seeding is k-means++ on that distance (from ``generator``); the centre update is the top-r right singular
    subspace of the members' stacked bases (optionally row-weighted by ``weights`` [N, r]), which maximises
    the members' total similarity. An emptied cluster is re-seeded with the worst-fitted expert.
    Atoms are C_j / sqrt(r) (orthonormal rows scaled to unit Frobenius norm).
    """
    N, r, d = X.shape
    if not 1 <= m <= N:
        raise ValueError(f"k-subspaces needs 1 <= m <= N, got m={m}, N={N}")
    V = row_bases(X)
    Vw = V if weights is None else V * weights[:, :, None].to(V)

    first = int(torch.randint(N, (1,), generator=generator, device="cpu"))
    idx = [first]
    dmin = (r - subspace_similarity(V, V[first : first + 1]).squeeze(1)).clamp_min(0)
    for _ in range(1, m):
        total = float(dmin.sum())
        if total > 0:
            nxt = int(torch.multinomial((dmin / total).double().cpu(), 1, generator=generator))
        else:
            nxt = int(torch.randint(N, (1,), generator=generator, device="cpu"))
        idx.append(nxt)
        dmin = torch.minimum(dmin, (r - subspace_similarity(V, V[nxt : nxt + 1]).squeeze(1)).clamp_min(0))
    C = V[idx].clone()
    sim = subspace_similarity(V, C)
    labels = sim.argmax(1)
    for _ in range(iters):
        counts = torch.bincount(labels, minlength=m)
        fit = sim.gather(1, labels[:, None]).squeeze(1)
        worst = torch.argsort(fit, stable=True)
        slot = 0
        newC = torch.empty_like(C)
        for j in range(m):
            if int(counts[j]) == 0:
                newC[j] = V[worst[slot % N]]
                slot += 1
                continue
            S = Vw[labels == j].reshape(-1, d)
            _, _, Vh = torch.linalg.svd(S, full_matrices=False)
            k = Vh.shape[0]
            if k >= r:
                newC[j] = Vh[:r]
            else:  # fewer stacked rows than r: complete the basis from the old centre
                Q, _ = torch.linalg.qr(torch.cat([Vh, C[j]], 0).T)
                newC[j] = Q.T[:r]
        C = newC
        sim = subspace_similarity(V, C)
        new_labels = sim.argmax(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return C / r**0.5, labels, sim
