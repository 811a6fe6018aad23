"""Warm starts (globe.seeding): shapes, explained variance against a float64 recomputation, exactness on
low-rank experts, frame canonicalisation, determinism, option errors.

Tolerances: every method computes in float32; explained variance is compared with a float64 recomputation from
the returned proxies at atol 1e-4 (the float32 products over p*d entries carry relative errors ~1e-6, and
proxies are built with condition number <= 100, so their row space is well defined in float32).
"""

from __future__ import annotations

import pytest
import torch
from globe.errors import ConfigError
from globe.seeding import SEEDERS, SeedResult, seed_proxies
from globe.seeding.common import orthonormalize_rows
from globe.seeding.residual_greedy import greedy_select

METHODS = list(SEEDERS)
EV_ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: one thread avoids the thread start-up cost dominating every small LAPACK
    call."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(N, p, d, r, *, atoms=3, noise=0.0, seed=0):
    """W_i = A_i B_i + noise, B_i a random positive mixture of `atoms` shared r x d atoms."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(atoms, r, d, generator=g)
    mix = torch.rand(N, atoms, generator=g) + 0.1
    B = torch.einsum("na,ard->nrd", mix, bank)
    W = torch.randn(N, p, r, generator=g) @ B
    if noise:
        W = W + noise * W.pow(2).mean().sqrt() * torch.randn(N, p, d, generator=g)
    return (W - W.mean()) / W.std()


def random_experts(N=5, p=13, d=29, seed=1):
    return torch.randn(N, p, d, generator=torch.Generator().manual_seed(seed))


def explained_f64(Z, proxies):
    """sum_i ||Z_i P_i||^2 / sum_i ||Z_i||^2 in float64, P_i the projector onto the row space of proxy i."""
    Z, P = Z.double(), proxies.double()
    _, S, Vh = torch.linalg.svd(P, full_matrices=False)
    keep = (S > 1e-7 * S[:, :1]).double()
    Q = Vh * keep.unsqueeze(-1)
    return float((Z @ Q.transpose(1, 2)).square().sum() / Z.square().sum())


def seed(Z, r, method, s=0, **kw) -> SeedResult:
    return seed_proxies(Z, r, method, generator=torch.Generator().manual_seed(s), **kw)


CASES = {
    "random_odd": (random_experts(), 7),
    "planted_noisy": (planted(12, 24, 40, 6, noise=0.2, seed=2), 6),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_shapes_norms_and_explained_variance(method, case):
    Z, r = CASES[case]
    res = seed(Z, r, method)
    N, _, d = Z.shape
    assert res.method == method
    assert res.proxies.shape == (N, r, d) and res.proxies.dtype == torch.float32
    assert bool(torch.isfinite(res.proxies).all())
    norms = torch.linalg.matrix_norm(res.proxies)
    torch.testing.assert_close(norms, torch.ones(N), atol=1e-5, rtol=0)
    sv = torch.linalg.svdvals(res.proxies.double())
    assert float((sv[:, -1] / sv[:, 0]).min()) >= 0.0099  # weight floor 1e-2: full rank, condition <= 100
    assert 0.0 <= res.explained_variance <= 1.0
    assert abs(res.explained_variance - explained_f64(Z, res.proxies)) <= EV_ATOL
    assert res.metrics["time_s"] >= 0 and all(isinstance(v, float) for v in res.metrics.values())


@pytest.mark.parametrize("method", METHODS)
def test_no_method_beats_the_svd(method):
    """The per-expert truncated SVD is the rank-r optimum of the explained variance."""
    Z, r = CASES["planted_noisy"]
    best = seed(Z, r, "svd").explained_variance
    assert seed(Z, r, method).explained_variance <= best + EV_ATOL


def test_exact_low_rank_experts_are_captured():
    # 12 experts of rank exactly 6 whose row spaces lie in the 18-dim span of 3 shared atoms (d = 40).
    Z = planted(12, 24, 40, 6, atoms=3)
    r = 6
    assert seed(Z, r, "svd").explained_variance >= 0.999
    assert seed(Z, r, "left_gram_pca", left_rank=24).explained_variance >= 0.999  # U spans every column space
    # One range-finder pass recovers a rank-r row space exactly whenever Z_i V^T has rank r.
    assert seed(Z, r, "ts_pca").explained_variance >= 0.999
    assert seed(Z, r, "residual_greedy").explained_variance >= 0.999
    # Inside the shared span only (q = r + 8 = 14 < 18 dims): bounded by the energy in that span.
    confined = seed(Z, r, "ts_pca", refine=0)
    assert confined.explained_variance <= confined.metrics["energy_captured"] + 1e-6
    assert confined.explained_variance < 0.999


def test_ts_pca_close_to_svd_on_noisy_planted_experts():
    """Signal of rank r (3 shared atoms) at 30% noise: TS-PCA (one range-finder pass, q = r + 8) must stay
    within 0.01 of the SVD optimum. The bound is tight enough to fail: confining the proxies to the shared
    span
    (refine=0), which cannot hold the 3r-dim union, drops well below it."""
    Z = planted(24, 48, 96, 12, atoms=3, noise=0.3, seed=3)
    r = 12
    best = seed(Z, r, "svd").explained_variance
    assert seed(Z, r, "ts_pca").explained_variance >= best - 0.01
    assert seed(Z, r, "ts_pca", refine=0).explained_variance < best - 0.01


@pytest.mark.parametrize("method", ["svd", "ts_pca"])
@pytest.mark.parametrize("align", ["procrustes", "sign"])
def test_equal_row_spaces_give_equal_proxies(method, align):
    """Experts O_j Z_0 (O_j orthogonal p x p) share row space and energies: the sign/rotation of their
    singular
    vectors differs, the canonical proxies must not."""
    Z0 = planted(1, 20, 33, 5, noise=0.05, seed=4)[0]
    g = torch.Generator().manual_seed(5)
    O = torch.linalg.qr(torch.randn(6, 20, 20, generator=g)).Q
    Z = O @ Z0
    P = seed(Z, 5, method, align=align).proxies
    torch.testing.assert_close(P, P[:1].expand_as(P), atol=2e-4, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_given_seed(method):
    Z, r = CASES["planted_noisy"]
    a, b = seed(Z, r, method, s=7), seed(Z, r, method, s=7)
    assert torch.equal(a.proxies, b.proxies) and a.explained_variance == b.explained_variance


def test_ts_pca_seed_changes_sampling():
    Z = random_experts(8, 32, 40, seed=6)
    a, b = seed(Z, 6, "ts_pca", s=1), seed(Z, 6, "ts_pca", s=2)
    assert not torch.equal(a.proxies, b.proxies)
    c = seed_proxies(Z, 6)  # no generator: seeded 0, not the global RNG
    torch.manual_seed(123)
    assert torch.equal(c.proxies, seed_proxies(Z, 6).proxies)


def test_spherical_kmeans_snapping():
    Z = planted(16, 20, 30, 4, atoms=4, noise=0.1, seed=8)
    base = seed(Z, 4, "ts_pca")
    res = seed(Z, 4, "spherical_kmeans", clusters=4)
    m = res.metrics
    assert m["clusters"] == 4 and m["cluster_size_min"] >= 1 and m["cluster_size_max"] <= 13
    # blend 0 keeps every expert's row space: same explained variance as the base proxies.
    assert abs(res.explained_variance - base.explained_variance) <= 1e-5
    assert m["kmeans_inertia_snapped"] <= m["kmeans_inertia"] + 1e-6  # aligned to its centroid: tighter
    pulled = seed(Z, 4, "spherical_kmeans", clusters=4, blend=0.9)
    assert pulled.explained_variance < res.explained_variance
    assert abs(pulled.explained_variance - explained_f64(Z, pulled.proxies)) <= EV_ATOL


def test_residual_greedy_trace_and_span():
    Z = planted(10, 16, 40, 5, atoms=4, noise=0.1, seed=9)
    res = seed(Z, 5, "residual_greedy", refine=0)
    trace = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in res.metrics.items() if k.startswith("greedy_residual_at_"))
    values = [v for _, v in trace]
    assert values == sorted(values, reverse=True) and 0 <= values[-1] < values[0] <= 1
    # Proxies inside the selected span capture at most the span's energy.
    assert res.explained_variance <= 1 - res.metrics["greedy_residual"] + 1e-5


def test_greedy_select_against_float64():
    g = torch.Generator().manual_seed(10)
    A = torch.randn(9, 7, generator=g, dtype=torch.float64)
    X = torch.randn(30, 7, generator=g, dtype=torch.float64)
    G = X.T @ X
    B, captured = greedy_select(A @ G @ A.T, A @ A.T, 5)
    S = B.T @ A
    torch.testing.assert_close(S @ S.T, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    for t in range(1, 6):
        torch.testing.assert_close(
            torch.tensor(captured[t - 1], dtype=G.dtype), torch.trace(S[:t] @ G @ S[:t].T), rtol=1e-10, atol=0
        )
    # First pick: the candidate with the largest Rayleigh quotient.
    first = (A @ G * A).sum(1) / (A * A).sum(1)
    torch.testing.assert_close(torch.tensor(captured[0], dtype=G.dtype), first.max(), rtol=1e-12, atol=0)


def test_orthonormalize_rows_rank_deficient():
    g = torch.Generator().manual_seed(11)
    X = torch.randn(3, 6, 17, generator=g)
    X[1, 5] = X[1, 0] + X[1, 1]  # rank 5: Cholesky fails, QR completes the basis
    Q = orthonormalize_rows(X)
    torch.testing.assert_close(Q @ Q.transpose(1, 2), torch.eye(6).expand(3, 6, 6), atol=1e-5, rtol=0)
    inside = X @ Q.transpose(1, 2) @ Q  # every input row lies in the span
    torch.testing.assert_close(inside, X, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", sorted(SEEDERS))
def test_r_above_p_pads_outside_each_experts_row_space(method):
    """r > p: the first p rows are the method's own proxies (the expert's whole row space, so everything is
    explained); the other r - p are unit-norm-scaled directions outside that row space, so each proxy has full
    row rank r (the adapter fit stays well posed)."""
    Z = random_experts(N=6, p=7, d=23, seed=5)
    r = 12
    own = seed_proxies(Z, 7, method, generator=torch.Generator().manual_seed(3))
    res = seed_proxies(Z, r, method, generator=torch.Generator().manual_seed(3))
    P = res.proxies.double()
    assert P.shape == (6, r, 23) and res.metrics["padded_rows"] == r - 7
    torch.testing.assert_close(P.flatten(1).norm(dim=1), torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)
    assert res.explained_variance > 1 - 1e-4
    assert explained_f64(Z, res.proxies) > 1 - 1e-4
    # the first p rows span what the method's own p-row proxies span
    Q = torch.linalg.qr(own.proxies.double().transpose(1, 2)).Q  # [N, d, p]
    head = P[:, :7]
    torch.testing.assert_close(head - head @ Q @ Q.transpose(1, 2), torch.zeros_like(head), atol=1e-4, rtol=0)
    # the extra rows lie outside the expert's row space (float64 SVD of Z as the reference)
    Vz = torch.linalg.svd(Z.double(), full_matrices=False).Vh  # [N, p, d]
    tail = P[:, 7:]
    assert float((tail @ Vz.transpose(1, 2)).abs().max()) < 1e-4 * float(tail.abs().max())
    s = torch.linalg.svdvals(P)
    assert float((s[:, -1] / s[:, 0]).min()) > 1e-3


def test_r_above_p_with_fewer_family_directions_than_r():
    """Two experts of rank 3 span 6 directions; r = 10 needs 7 outside each expert's own 3: the padding fills
    the rest, and every proxy still has full row rank."""
    Z = random_experts(N=2, p=3, d=20, seed=9)
    P = seed_proxies(Z, 10, generator=torch.Generator().manual_seed(1)).proxies.double()
    assert P.shape == (2, 10, 20) and bool(torch.isfinite(P).all())
    assert int(torch.linalg.matrix_rank(P).min()) == 10


@pytest.mark.parametrize("N,p,d,r", [(7, 5, 19, 11), (2, 3, 20, 10)])  # the second: fewer family directions
def test_padding_by_chunks_of_experts(N, p, d, r):
    """The padding in chunks of experts equals the padding all at once (the extra rows are turned to one
    shared frame, so the basis of each expert's extra subspace is unique), and its extra rows are orthogonal to
    each other and to the expert's row space."""
    from globe.seeding.common import pad_outside_row_space

    Z = random_experts(N=N, p=p, d=d, seed=12)
    P = seed_proxies(Z, p, generator=torch.Generator().manual_seed(2)).proxies
    whole = pad_outside_row_space(Z, P, r, generator=torch.Generator().manual_seed(4))
    parts = pad_outside_row_space(Z, P, r, generator=torch.Generator().manual_seed(4), chunk_elems=100)
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=0)
    E = whole[:, p:].double()
    G = E @ E.transpose(1, 2)
    torch.testing.assert_close(G, torch.diag_embed(G.diagonal(dim1=1, dim2=2)), atol=1e-6, rtol=0)
    Vz = torch.linalg.svd(Z.double(), full_matrices=False).Vh
    assert float((E @ Vz.transpose(1, 2)).abs().max()) < 1e-4 * float(E.abs().max())


def test_padded_rows_share_a_frame():
    """Two experts with the same row space get the same padded rows (the frame of the shared basis), whatever
    the frame of their own proxy rows."""
    from globe.seeding.common import pad_outside_row_space

    Z = random_experts(N=5, p=4, d=17, seed=3)
    Z[1] = Z[0]
    P = seed_proxies(Z, 4, generator=torch.Generator().manual_seed(1)).proxies.clone()
    P[1] = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(6))).Q @ P[0]
    out = pad_outside_row_space(Z, P, 9, generator=torch.Generator().manual_seed(2))
    E = out[:, 4:] / out[:, 4:].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(E[1], E[0], atol=1e-4, rtol=0)


def test_errors_name_the_argument():
    Z = random_experts()
    for bad in (0, 30, 2.0, True):  # d = 29: r may exceed p = 13, not d
        with pytest.raises(ConfigError, match=r"\br\b"):
            seed_proxies(Z, bad)
    with pytest.raises(ConfigError) as err:
        seed_proxies(Z, 3, "pca")
    assert all(name in str(err.value) for name in SEEDERS)
    with pytest.raises(ConfigError, match="rows_per_sample"):
        seed_proxies(Z, 3, rows_per_sample=2)
    with pytest.raises(ConfigError, match="clusters"):
        seed_proxies(Z, 3, "spherical_kmeans", clusters=0)
    with pytest.raises(ConfigError, match="left_rank"):
        seed_proxies(Z, 3, "left_gram_pca", left_rank=2)
    with pytest.raises(ConfigError, match="align"):
        seed_proxies(Z, 3, "svd", align="none")
    with pytest.raises(ConfigError, match="Z"):
        seed_proxies(Z[0], 3)
    with pytest.raises(ConfigError, match="NaN"):
        seed_proxies(torch.full((2, 4, 5), float("nan")), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    Z, r = CASES["planted_noisy"]
    cpu = seed(Z, r, method)
    gpu = seed(Z.cuda(), r, method)
    assert gpu.proxies.device.type == "cuda"
    assert abs(gpu.explained_variance - cpu.explained_variance) <= 1e-3
    assert abs(gpu.explained_variance - explained_f64(Z, gpu.proxies.cpu())) <= EV_ATOL
