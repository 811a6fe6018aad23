"""Triton ``compose``: B~_i = phi(sum_j alpha_ij B_j) for every expert, [m, r, d] x codes -> [n, r, d].

Design
------
Each atom B_j is a contiguous run of L = r*d elements, so the kernel treats atoms and outputs as flat rows of
length L and never needs an (r, d) mask: a program owns one BLOCK-wide slice of that row (coalesced,
vectorised loads along d) and a group of GROUP_N experts. The launcher gives every group the sorted union of
its experts' supports and a [U, GROUP_N] weight table whose column e holds expert e's weight of each atom
of the union (zero where the atom is not in e's support), see :func:`group_codes`. The program loops over the
union only: it loads each atom slice once and adds the GROUP_N-vector of weights times the slice into a
[GROUP_N, BLOCK] fp32 register accumulator, so an atom shared by several experts of a group is read once,
not once per expert. The next atom's slice is loaded while the current one is accumulated (a hand-written
prefetch: triton does not pipeline these index-dependent loads). Experts are ordered by their heaviest atom
before grouping, so experts that share atoms tend to land in one group, and the grid's fast axis runs over
groups, so programs that run together read the same slice of the bank from L2. phi is applied to the
accumulator, which is cast and stored once per expert: no atomics, every output element has one writer.

When the bank is small next to the experts (a layer bank: m = n/4 atoms, each used by many experts) the
kernel re-reads each atom once per group, while the dense product alpha @ bank, a tensor-core GEMM over all m
atoms, reads each atom once in all and stays memory-bound as long as its 2 n m multiply-adds per output
element cost less than moving the (m + n) rows. :func:`dense_is_cheaper` picks that path on CUDA (measured on
an H100 at Qwen3-30B-A3B's layer shapes, bf16: 0.14 ms for the GEMM against 1.24 ms for the kernel);
GLOBE_COMPOSE_DENSE=0/1 forces either. Large shared banks (the global scope: thousands of atoms) keep the
kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference import SparseCodes, check_phi, to_sparse_codes

GROUP_N = 8
# (BLOCK, num_warps, num_stages); the first is the default when autotuning is off. Each keeps the
# accumulator at GROUP_N * BLOCK / (32 * num_warps) = 64 fp32 registers per thread. The atom loop is
# prefetched by hand (triton does not pipeline its index-dependent loads), so num_stages stays 1.
CONFIGS = (
    (1024, 4, 1),
    (2048, 8, 1),
)
BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _tanh(x):
    # accurate to a few fp32 ulps without libdevice (which the interpreter lacks): an odd Taylor polynomial
    # where 1 - 2 / (exp(2|x|) + 1) would cancel, the exponential form elsewhere (saturates to +-1)
    ax = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    big = tl.where(x < 0, -big, big)
    x2 = x * x
    p = -1382.0 / 155925.0
    p = p * x2 + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    small = x + x * x2 * p
    return tl.where(ax < 0.25, small, big)


@triton.jit
def _compose_kernel(
    bank_ptr,  # [m, L] atoms, contiguous
    out_ptr,  # [n, L] output, contiguous
    atoms_ptr,  # [G, U] int32: group g's union of atoms (first group_count[g] entries valid)
    weights_ptr,  # [G, U, GROUP_N] fp32: weight of atom u for each expert of group g
    count_ptr,  # [G] int32
    experts_ptr,  # [G, GROUP_N] int32: expert ids of group g, -1 pads the last group
    L,  # r * d
    U,  # row length of atoms_ptr / weights_ptr
    PHI: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    t = tl.program_id(1)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < L
    rows = tl.arange(0, GROUP_N)
    g64 = g.to(tl.int64)
    count = tl.load(count_ptr + g)
    acc = tl.zeros((GROUP_N, BLOCK), dtype=tl.float32)
    # software prefetch: the slice of the next atom is in flight while the current one is accumulated
    atom = tl.load(atoms_ptr + g64 * U, mask=count > 0, other=0).to(tl.int64)
    b = tl.load(bank_ptr + atom * L + offs, mask=offs < tl.where(count > 0, L, 0), other=0.0)
    for u in range(0, count):
        more = u + 1 < count
        atom_next = tl.load(atoms_ptr + g64 * U + u + 1, mask=more, other=0).to(tl.int64)
        b_next = tl.load(bank_ptr + atom_next * L + offs, mask=offs < tl.where(more, L, 0), other=0.0)
        w = tl.load(weights_ptr + (g64 * U + u) * GROUP_N + rows)
        acc += w[:, None] * b.to(tl.float32)[None, :]
        b = b_next
    if PHI == "tanh":
        acc = _tanh(acc)
    elif PHI == "silu":
        acc = acc * tl.sigmoid(acc)
    experts = tl.load(experts_ptr + g64 * GROUP_N + rows)
    out_ptrs = out_ptr + experts.to(tl.int64)[:, None] * L + offs[None, :]
    mask = (experts >= 0)[:, None] & in_row[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# the GEMM stays memory-bound while n m <= C (n + m): C ~ (matrix FLOP/s) / (2 bandwidth) * element size, with
# margin (H100: ~600 TFLOP/s bf16 and ~60 fp32 without TF32, against ~2.5 TB/s)
_DENSE_C = {torch.float32: 40, torch.bfloat16: 200, torch.float16: 200}


def dense_is_cheaper(n: int, m: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Compose by the dense GEMM alpha @ bank rather than the sparse kernel (CUDA only; see the module doc)."""
    forced = os.environ.get("GLOBE_COMPOSE_DENSE", "").strip()
    if forced in ("0", "1"):
        return forced == "1" and device.type == "cuda"
    if device.type != "cuda" or _interpreting():
        return False
    return n * m <= _DENSE_C.get(dtype, 0) * (n + m)


def _compose_dense(bank: torch.Tensor, codes: SparseCodes, out: torch.Tensor, phi: str) -> torch.Tensor:
    m = bank.shape[0]
    n = codes.indices.shape[0]
    dense = torch.zeros(n, m, dtype=torch.float32, device=bank.device)
    idx = codes.indices.long()
    valid = (idx >= 0) & (idx < m)
    dense.scatter_add_(1, torch.where(valid, idx, 0), torch.where(valid, codes.values.float(), 0.0))
    # fp32 accumulation in either case; a 16-bit bank takes 16-bit weights (the GEMM's operand type). The
    # product goes straight into out when the dtypes allow (no second pass over n r d elements), phi in place.
    a = dense.to(bank.dtype)
    flat = out.view(n, -1) if out.dtype == bank.dtype else torch.empty(n, out[0].numel(), dtype=bank.dtype,
                                                                        device=bank.device)
    torch.mm(a, bank.reshape(m, -1), out=flat)
    if phi == "tanh":
        flat.tanh_()
    elif phi == "silu":
        torch.nn.functional.silu(flat, inplace=True)
    if out.dtype != bank.dtype:
        out.view(n, -1).copy_(flat)
    return out


_compose_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK": b}, num_warps=w, num_stages=s) for b, w, s in CONFIGS],
    key=["L", "U"],
)(_compose_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """GLOBE_TRITON_AUTOTUNE=0 (or the interpreter) selects the fixed default config CONFIGS[0]."""
    return os.environ.get("GLOBE_TRITON_AUTOTUNE", "1") not in ("", "0") and not _interpreting()


def kernel_out_dtype(bank_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel stores: out_dtype when it is the bank's dtype or fp32, else fp32 then a cast."""
    return out_dtype if out_dtype in (bank_dtype, torch.float32) else torch.float32


def group_codes(codes: SparseCodes, m: int, group_n: int = GROUP_N):
    """Per group of group_n experts: the union of their atoms and each expert's weight of every union atom.

    Returns (atoms [G, U] int32, weights [G, U, group_n] fp32, count [G] int32, experts [G, group_n] int32)
    with U = min(group_n * k, m) (a bound, so no device sync); duplicate indices of one expert add up and
    slots with index -1 are ignored (so are indices >= m, which the reference rejects; checking would cost a
    device sync). Experts are sorted by their heaviest atom so overlapping ones group.
    """
    idx = codes.indices.long()
    vals = codes.values.float()
    n, k = idx.shape
    dev = idx.device
    G = triton.cdiv(n, group_n)
    valid = idx >= 0
    score = torch.where(valid, vals.abs(), torch.full_like(vals, -1.0))
    if k > 0:
        top = idx.gather(1, score.argmax(1, keepdim=True)).squeeze(1)
        key = torch.where(valid.any(1), top, torch.full_like(top, m))
    else:
        key = torch.full((n,), m, dtype=torch.long, device=dev)
    order = torch.argsort(key, stable=True)
    pad = G * group_n - n
    experts = torch.cat([order, order.new_full((pad,), -1)]).to(torch.int32).view(G, group_n)
    slot_atoms = torch.where(valid, idx, torch.full_like(idx, m))[order]
    slot_vals = torch.where(valid, vals, torch.zeros_like(vals))[order]
    slot_atoms = torch.cat([slot_atoms, slot_atoms.new_full((pad, k), m)]).view(G, group_n * k)
    slot_vals = torch.cat([slot_vals, slot_vals.new_zeros((pad, k))]).view(G, group_n * k)
    U = max(min(group_n * k, m), 1)
    atoms = torch.zeros(G, U + 1, dtype=torch.int32, device=dev)  # column U collects the padding
    weights = torch.zeros(G, U + 1, group_n, dtype=torch.float32, device=dev)
    if k == 0:
        return atoms[:, :U].contiguous(), weights[:, :U].contiguous(), torch.zeros(G, dtype=torch.int32, device=dev), experts
    sorted_atoms, perm = slot_atoms.sort(dim=1)
    first = torch.ones_like(sorted_atoms, dtype=torch.bool)
    first[:, 1:] = sorted_atoms[:, 1:] != sorted_atoms[:, :-1]
    first &= sorted_atoms < m
    rank_sorted = first.cumsum(1) - 1  # a duplicate gets the rank of its run's first element
    count = first.sum(1).to(torch.int32)
    atoms.scatter_(1, torch.where(first, rank_sorted, U), sorted_atoms.to(torch.int32))
    rank = torch.empty_like(rank_sorted).scatter_(1, perm, rank_sorted)
    col = torch.where(slot_atoms < m, rank, U)
    expert_of_slot = (torch.arange(group_n * k, device=dev) // k).expand(G, -1)
    flat = (torch.arange(G, device=dev)[:, None] * (U + 1) + col) * group_n + expert_of_slot
    weights.view(-1).index_add_(0, flat.reshape(-1), slot_vals.reshape(-1))
    return atoms[:, :U].contiguous(), weights[:, :U].contiguous(), count, experts


def launch_compose(bank: torch.Tensor, codes: SparseCodes, out: torch.Tensor, phi: str = "identity") -> torch.Tensor:
    """Write phi(sum_j alpha_ij B_j) into out [n, r, d] (contiguous, dtype bank.dtype or fp32)."""
    m, r, d = bank.shape
    n = codes.indices.shape[0]
    L = r * d
    if n == 0 or L == 0:
        return out
    if not out.is_contiguous() or out.shape != (n, r, d):
        raise ValueError(f"out must be a contiguous [{n}, {r}, {d}] tensor, got {tuple(out.shape)}")
    bank = bank.contiguous()
    codes = SparseCodes(codes.indices.to(bank.device), codes.values.to(bank.device))
    if dense_is_cheaper(n, m, bank.dtype, bank.device):
        return _compose_dense(bank, codes, out, phi)
    atoms, weights, count, experts = group_codes(codes, m)
    G, U = atoms.shape
    if autotune_enabled():
        grid = lambda meta: (G, triton.cdiv(L, meta["BLOCK"]))
        _compose_kernel_tuned[grid](bank, out, atoms, weights, count, experts, L, U, PHI=phi, GROUP_N=GROUP_N)
    else:
        block, warps, stages = CONFIGS[0]
        _compose_kernel[(G, triton.cdiv(L, block))](
            bank, out, atoms, weights, count, experts, L, U,
            PHI=phi, GROUP_N=GROUP_N, BLOCK=block, num_warps=warps, num_stages=stages,
        )
    return out


def compose(
    bank: torch.Tensor,
    alpha: torch.Tensor | SparseCodes,
    phi: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """B~_i = phi(sum_j alpha_ij B_j): bank [m, r, d], alpha [n, m] or SparseCodes -> [n, r, d].

    Same contract as ``reference.compose`` for fp32/bf16/fp16 banks (fp32 accumulation); a float64 bank
    raises TypeError (the dispatcher then falls back to the torch reference).
    """
    phi = check_phi(phi)
    if bank.dim() != 3:
        raise ValueError(f"bank must be [m, r, d], got shape {tuple(bank.shape)}")
    if bank.dtype not in BANK_DTYPES:
        raise TypeError(f"triton compose supports banks in {BANK_DTYPES}, got {bank.dtype}")
    m, r, d = bank.shape
    if isinstance(alpha, SparseCodes):
        if alpha.indices.dim() != 2 or alpha.indices.shape != alpha.values.shape:
            raise ValueError(
                f"codes must be indices [n, k] and values [n, k], got {tuple(alpha.indices.shape)} "
                f"and {tuple(alpha.values.shape)}"
            )
        if alpha.indices.dtype.is_floating_point or alpha.indices.dtype == torch.bool:
            raise TypeError(f"codes.indices must be an integer tensor, got {alpha.indices.dtype}")
        codes = alpha
    else:
        if alpha.dim() != 2 or alpha.shape[1] != m:
            raise ValueError(f"alpha must be [n, {m}] for a bank of {m} atoms, got shape {tuple(alpha.shape)}")
        codes = to_sparse_codes(alpha)
    out_dtype = out_dtype or bank.dtype
    n = codes.indices.shape[0]
    store_dtype = kernel_out_dtype(bank.dtype, out_dtype)
    out = torch.empty((n, r, d), dtype=store_dtype, device=bank.device)
    launch_compose(bank, codes, out, phi)
    return out if store_dtype == out_dtype else out.to(out_dtype)


def aot_specs() -> list[dict]:
    """Every kernel variant the launcher can produce: config x (bank dtype, stored dtype) x phi."""
    specs = []
    for bank_dtype in BANK_DTYPES:
        for store_dtype in dict.fromkeys((bank_dtype, torch.float32)):
            for phi in ("identity", "tanh", "silu"):
                for block, warps, stages in CONFIGS:
                    specs.append(
                        {
                            "name": f"compose_{_TL_NAMES[bank_dtype]}_to_{_TL_NAMES[store_dtype]}_{phi}_b{block}_w{warps}_s{stages}",
                            "kernel": _compose_kernel,
                            "signature": {
                                "bank_ptr": "*" + _TL_NAMES[bank_dtype],
                                "out_ptr": "*" + _TL_NAMES[store_dtype],
                                "atoms_ptr": "*i32",
                                "weights_ptr": "*fp32",
                                "count_ptr": "*i32",
                                "experts_ptr": "*i32",
                                "L": "i32",
                                "U": "i32",
                                "PHI": "constexpr",
                                "GROUP_N": "constexpr",
                                "BLOCK": "constexpr",
                            },
                            "constexprs": {"PHI": phi, "GROUP_N": GROUP_N, "BLOCK": block},
                            # what the JIT specialises on for real launches: 16-byte aligned tensors, L % 16 == 0
                            "divisible_by_16": ["bank_ptr", "out_ptr", "atoms_ptr", "weights_ptr", "count_ptr",
                                                "experts_ptr", "L"],
                            "num_warps": warps,
                            "num_stages": stages,
                        }
                    )
    return specs
