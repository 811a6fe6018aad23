"""Triton ``prune_renorm``: epsilon-prune rows of mixture codes and renormalise them to sum 1.

Design: one program owns ROWS rows and walks the m columns in BLOCK_M-wide chunks twice. The first pass
accumulates, per row in fp32, the kept mass (entries >= eps and > 0), the kept count and the running
(max, first argmax) pair; the second pass writes a / kept_mass for kept entries, or a single 1 at the argmax
for a row where nothing survives (the reference's rescue rule), plus the support size. The second pass reads
rows the first pass just brought into L2. Two fixed configurations: short rows pack more rows per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# name: (ROWS, BLOCK_M, num_warps); "short" serves m <= 64
CONFIGS = {"short": (16, 64, 4), "long": (4, 256, 4)}


def config_for(m: int) -> tuple[int, int, int]:
    return CONFIGS["short"] if m <= CONFIGS["short"][1] else CONFIGS["long"]


@triton.jit
def _prune_renorm_kernel(
    alpha_ptr,  # [n, m], unit column stride
    out_ptr,  # [n, m] contiguous
    support_ptr,  # [n] int32
    n,
    m,
    stride_row,
    eps,  # fp32
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_M)
    mass = tl.zeros((ROWS,), dtype=tl.float32)
    count = tl.zeros((ROWS,), dtype=tl.int32)
    best = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((ROWS,), dtype=tl.int32)
    for start in range(0, m, BLOCK_M):
        c = start + cols
        mask = row_ok[:, None] & (c < m)[None, :]
        a = tl.load(alpha_ptr + rows64[:, None] * stride_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
        keep = (a >= eps) & (a > 0.0) & mask
        mass += tl.sum(tl.where(keep, a, 0.0), axis=1)
        count += tl.sum(keep.to(tl.int32), axis=1)
        chunk_max, chunk_arg = tl.max(
            tl.where(mask, a, float("-inf")), axis=1, return_indices=True, return_indices_tie_break_left=True
        )
        better = chunk_max > best  # strict: the first maximum of the row wins, as torch.argmax
        best_idx = tl.where(better, start + chunk_arg, best_idx)
        best = tl.where(better, chunk_max, best)
    rescue = count == 0
    denom = tl.where(rescue, 1.0, mass)
    for start in range(0, m, BLOCK_M):
        c = start + cols
        mask = row_ok[:, None] & (c < m)[None, :]
        a = tl.load(alpha_ptr + rows64[:, None] * stride_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
        keep = (a >= eps) & (a > 0.0)
        val = tl.where(keep, a / denom[:, None], 0.0)
        val = tl.where(rescue[:, None], tl.where(c[None, :] == best_idx[:, None], 1.0, 0.0), val)
        tl.store(out_ptr + rows64[:, None] * m + c[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(support_ptr + rows, tl.where(rescue, 1, count), mask=row_ok)


def launch_prune_renorm(alpha: torch.Tensor, eps: float, out: torch.Tensor, support: torch.Tensor) -> None:
    """Write the pruned, renormalised rows of alpha into out [n, m] (contiguous) and support [n] (int32)."""
    n, m = alpha.shape
    if n == 0:
        return
    if alpha.stride(1) != 1:
        alpha = alpha.contiguous()
    rows, block_m, warps = config_for(m)
    _prune_renorm_kernel[(triton.cdiv(n, rows),)](
        alpha, out, support, n, m, alpha.stride(0), float(eps), ROWS=rows, BLOCK_M=block_m, num_warps=warps
    )


def prune_renorm(alpha: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero entries below eps (and <= 0), renormalise rows to 1; an emptied row keeps its largest entry.

    Same contract as ``reference.prune_renorm`` for fp32/bf16/fp16 (fp32 arithmetic); float64 raises
    TypeError (the dispatcher then falls back to the reference). Returns (alpha', support int32 [n]).
    """
    if alpha.dim() != 2:
        raise ValueError(f"alpha must be [n, m], got shape {tuple(alpha.shape)}")
    if alpha.dtype not in DTYPES:
        raise TypeError(f"triton prune_renorm supports {DTYPES}, got {alpha.dtype}")
    n, m = alpha.shape
    if m == 0 and n > 0:
        raise ValueError("alpha has rows but no columns: no entry to keep")
    out = torch.empty((n, m), dtype=alpha.dtype, device=alpha.device)
    support = torch.empty((n,), dtype=torch.int32, device=alpha.device)
    launch_prune_renorm(alpha, eps, out, support)
    return out, support


def aot_specs() -> list[dict]:
    """Every variant the launcher can produce: dtype x configuration."""
    specs = []
    for dtype in DTYPES:
        tn = _TL_NAMES[dtype]
        for name, (rows, block_m, warps) in CONFIGS.items():
            specs.append(
                {
                    "name": f"prune_renorm_{tn}_{name}",
                    "kernel": _prune_renorm_kernel,
                    "signature": {
                        "alpha_ptr": f"*{tn}",
                        "out_ptr": f"*{tn}",
                        "support_ptr": "*i32",
                        "n": "i32",
                        "m": "i32",
                        "stride_row": "i32",
                        "eps": "fp32",
                        "ROWS": "constexpr",
                        "BLOCK_M": "constexpr",
                    },
                    "constexprs": {"ROWS": rows, "BLOCK_M": block_m},
                    # the JIT specialisation at real shapes: aligned tensors, m (and the row stride) % 16 == 0
                    "divisible_by_16": ["alpha_ptr", "out_ptr", "support_ptr", "m", "stride_row"],
                    "num_warps": warps,
                    "num_stages": 1,
                }
            )
    return specs
