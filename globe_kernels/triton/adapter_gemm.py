"""Fused GloBE adapter GEMM in Triton: silu(A_g B~_g x + s_g) * (A_u B~_u x + s_u) for tokens grouped by expert.

Design
------
Two grouped kernels, scheduled like fused-MoE kernels over (expert, token-block) tiles:

1. ``_adapter_inner_kernel``: inner = x_e @ B~_e^T for the gate and the up family at once (one program owns a
   token block and an r block; both families share each loaded x tile). B~ comes either from a precomposed
   [n, r, d] tensor, or (bank mode) is composed on the fly per [BLOCK_D, BLOCK_R] tile: the k atom tiles named
   by the expert's sparse codes are loaded, mixed in fp32, passed through phi and cast to the compute dtype
   before ``tl.dot``; B~ never exists in memory. inner is written to two [T, r] buffers in the compute dtype
   (x.dtype), the rounding the reference applies. The chained product cannot keep [BLOCK_T, r] in registers
   for r up to 2048, hence the round trip through memory.
2. ``_adapter_out_kernel``: out = inner_e @ A_e^T for both families, plus the shifts, with silu(gate) * up
   fused in the epilogue (or gate and up written separately for act=None).

Scheduling: the launcher turns ``offsets`` into a flat tile map (tile -> expert, first row) with a handful of
torch ops on the device. Its length is the bound cdiv(T, BLOCK_T) + n, which needs no device sync; tiles past
the real count carry expert -1 and their programs return at once, and experts without tokens own no tile.
Partial token blocks and odd r, d, p are masked; every ``tl.dot`` dimension is at least 16 (a one-token decode
tile still has 16 masked rows).

Configurations: no autotuning. Two fixed configurations per dtype, "decode" (BLOCK_T=16, for few tokens per
expert; mma.sync) and "prefill" (BLOCK_T=64, wgmma on sm_90), picked from the host-known T and n, or forced
with GLOBE_TRITON_ADAPTER_CONFIG=decode|prefill. ``aot_specs()`` lists every (configuration, dtype, variant)
the launcher can launch, for ahead-of-time compilation.

Bank mode reads k atom tiles per B~ tile and recomposes them for every token block of the expert: it trades
FLOPs and L2 traffic for never materialising B~ (the memory-saving serving mode).

Dtypes: x in fp32, bf16 or fp16 is the compute dtype; weights in another dtype are cast to it first. fp32 runs
the dot products in IEEE fp32 (no tf32), matching the reference. Accumulation is fp32 throughout. The output
is written in x.dtype or fp32 directly; any other out_dtype is a cast after the kernel.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference import ACTS, SparseCodes, check_phi

__all__ = ["adapter_gemm", "aot_specs"]

_PHI_CODE = {"identity": 0, "tanh": 1, "silu": 2}
_TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --- kernels -------------------------------------------------------------------------------------------------


@triton.jit
def _phi(t, PHI: tl.constexpr):
    if PHI == 1:  # tanh(t) = 2 sigmoid(2t) - 1
        t = 2.0 * tl.sigmoid(2.0 * t) - 1.0
    elif PHI == 2:
        t = t * tl.sigmoid(t)
    return t


@triton.jit
def _b_tile(b_ptr, ind_ptr, val_ptr, e, K, R, D, offs, mask, BANK: tl.constexpr, PHI: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """The [BLOCK_D, BLOCK_R] tile of B~_e^T at offs (offsets inside one [R, D] matrix), fp32 or stored dtype."""
    if BANK:
        acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
        for s in range(0, K):
            j = tl.load(ind_ptr + e * K + s)
            if j >= 0:  # a padded slot (index -1) loads nothing
                v = tl.load(val_ptr + e * K + s)
                atom = tl.load(b_ptr + j.to(tl.int64) * R * D + offs, mask=mask, other=0.0)
                acc += v * atom.to(tl.float32)
        tile = _phi(acc, PHI)
    else:
        tile = tl.load(b_ptr + e.to(tl.int64) * R * D + offs, mask=mask, other=0.0)
    return tile


@triton.jit
def _adapter_inner_kernel(
    x_ptr, bg_ptr, bu_ptr, ig_ptr, vg_ptr, iu_ptr, vu_ptr, hg_ptr, hu_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr,
    R_G, R_U, D, K_G, K_U,
    BANK: tl.constexpr, PHI: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """hg[rows, rb] = x[rows] @ B~_g,e^T and hu likewise, for one (expert, token block) tile and one r block."""
    tile = tl.program_id(0)
    rb = tl.program_id(1)
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BLOCK_T)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    rr = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_g = rr < R_G
    mask_u = rr < R_U
    dt = x_ptr.dtype.element_ty

    acc_g = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        xt = tl.load(x_ptr + rows64[:, None] * D + dd[None, :], mask=row_mask[:, None] & dmask[None, :], other=0.0)
        offs = rr[None, :] * D + dd[:, None]
        bg = _b_tile(bg_ptr, ig_ptr, vg_ptr, e, K_G, R_G, D, offs, dmask[:, None] & mask_g[None, :],
                     BANK, PHI, BLOCK_D, BLOCK_R)
        acc_g = tl.dot(xt, bg.to(dt), acc_g, input_precision="ieee")
        bu = _b_tile(bu_ptr, iu_ptr, vu_ptr, e, K_U, R_U, D, offs, dmask[:, None] & mask_u[None, :],
                     BANK, PHI, BLOCK_D, BLOCK_R)
        acc_u = tl.dot(xt, bu.to(dt), acc_u, input_precision="ieee")

    tl.store(hg_ptr + rows64[:, None] * R_G + rr[None, :], acc_g.to(dt), mask=row_mask[:, None] & mask_g[None, :])
    tl.store(hu_ptr + rows64[:, None] * R_U + rr[None, :], acc_u.to(dt), mask=row_mask[:, None] & mask_u[None, :])


@triton.jit
def _project(h_ptr, a_ptr, e, rows64, row_mask, pp, pmask, P, R, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
             BLOCK_R: tl.constexpr):
    """h[rows] @ A_e[pp]^T in fp32 for h [T, R] and A [n, P, R]."""
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    a_base = a_ptr + e.to(tl.int64) * P * R
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rmask = rr < R
        h = tl.load(h_ptr + rows64[:, None] * R + rr[None, :], mask=row_mask[:, None] & rmask[None, :], other=0.0)
        a = tl.load(a_base + pp[None, :] * R + rr[:, None], mask=rmask[:, None] & pmask[None, :], other=0.0)
        acc = tl.dot(h, a, acc, input_precision="ieee")
    return acc


@triton.jit
def _adapter_out_kernel(
    hg_ptr, hu_ptr, ag_ptr, au_ptr, sg_ptr, su_ptr, og_ptr, ou_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr,
    P, R_G, R_U,
    ACT: tl.constexpr, HAS_SHIFT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """gate = hg @ A_g,e^T + sg, up = hu @ A_u,e^T + su; og = silu(gate) * up (ACT=1) or og, ou = gate, up."""
    tile = tl.program_id(0)
    pb = tl.program_id(1)
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BLOCK_T)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    pp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pp < P

    gate = _project(hg_ptr, ag_ptr, e, rows64, row_mask, pp, pmask, P, R_G, BLOCK_T, BLOCK_P, BLOCK_R)
    up = _project(hu_ptr, au_ptr, e, rows64, row_mask, pp, pmask, P, R_U, BLOCK_T, BLOCK_P, BLOCK_R)
    out_offs = rows64[:, None] * P + pp[None, :]
    out_mask = row_mask[:, None] & pmask[None, :]
    if HAS_SHIFT:
        gate += tl.load(sg_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        up += tl.load(su_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    if ACT == 1:
        h = gate * tl.sigmoid(gate) * up
        tl.store(og_ptr + out_offs, h.to(og_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(og_ptr + out_offs, gate.to(og_ptr.dtype.element_ty), mask=out_mask)
        tl.store(ou_ptr + out_offs, up.to(ou_ptr.dtype.element_ty), mask=out_mask)


# --- configurations ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    name: str
    block_t: int  # shared by both kernels (one tile map)
    inner_r: int
    inner_d: int
    out_p: int
    out_r: int
    num_warps: int
    num_stages: int


def _configs(dtype: torch.dtype) -> dict[str, _Config]:
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units with operands in registers: short reductions and 8 warps keep
        # ptxas from spilling (checked for sm_80 and sm_90)
        return {
            "decode": _Config("decode", 16, 64, 32, 64, 64, 8, 2),
            "prefill": _Config("prefill", 64, 64, 16, 64, 32, 8, 2),
        }
    return {
        "decode": _Config("decode", 16, 64, 128, 64, 128, 4, 3),
        "prefill": _Config("prefill", 64, 64, 64, 64, 64, 4, 3),
    }


def _pick_config(T: int, n: int, dtype: torch.dtype) -> _Config:
    forced = os.environ.get("GLOBE_TRITON_ADAPTER_CONFIG")
    configs = _configs(dtype)
    if forced:
        if forced not in configs:
            raise ValueError(f"GLOBE_TRITON_ADAPTER_CONFIG must be one of {sorted(configs)}, got {forced!r}")
        return configs[forced]
    # fewer than 32 tokens per expert on average: 64-row blocks would be mostly masked
    return configs["decode" if T < 32 * max(n, 1) else "prefill"]


# --- launcher ------------------------------------------------------------------------------------------------


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the launcher hands to a kernel (tests replace this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tile_map(offsets: torch.Tensor, T: int, block_t: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tile_expert, tile_row, number of tiles launched) for tokens grouped by offsets; no device sync.

    Expert e owns cdiv(count_e, block_t) consecutive tiles; the map has the static length
    cdiv(T, block_t) + n >= sum_e cdiv(count_e, block_t), and the tiles past the real count get expert -1.
    """
    n = offsets.numel() - 1
    max_tiles = triton.cdiv(T, block_t) + n
    off = offsets.to(torch.int64)
    counts = (off[1:] - off[:-1]).clamp(min=0)
    tiles = (counts + block_t - 1) // block_t
    cum = torch.cumsum(tiles, 0)
    t = torch.arange(max_tiles, device=offsets.device, dtype=torch.int64)
    e = torch.searchsorted(cum, t, right=True).clamp(max=n - 1)
    row = off[e] + (t - (cum[e] - tiles[e])) * block_t
    valid = t < cum[-1]
    tile_expert = torch.where(valid, e, torch.full_like(e, -1)).to(torch.int32)
    return tile_expert, row.to(torch.int32), max_tiles


def _as(t: torch.Tensor, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    return t.to(device=device or t.device, dtype=dtype).contiguous()


def _codes(codes: SparseCodes, n: int, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    ind, val = codes.indices, codes.values
    if ind.dim() != 2 or ind.shape[0] != n or val.shape != ind.shape:
        raise ValueError(f"{name} must hold indices and values [{n}, k], got {tuple(ind.shape)} and {tuple(val.shape)}")
    return _as(ind, torch.int32, device), _as(val, torch.float32, device), ind.shape[1]


def _check3(t: torch.Tensor, n: int | None, name: str) -> None:
    if t.dim() != 3 or (n is not None and t.shape[0] != n):
        raise ValueError(f"{name} must be [{n if n is not None else 'm'}, ., .], got shape {tuple(t.shape)}")


def _shifts(shift_gate, shift_up, T, p, dtype):
    """Both shifts in one dtype (x.dtype or fp32), a missing one as zeros; (None, None) when neither is given."""
    if shift_gate is None and shift_up is None:
        return None, None
    for s, name in ((shift_gate, "shift_gate"), (shift_up, "shift_up")):
        if s is not None and tuple(s.shape) != (T, p):
            raise ValueError(f"{name} must be [{T}, {p}], got shape {tuple(s.shape)}")
    given = [s.dtype for s in (shift_gate, shift_up) if s is not None]
    sdt = given[0] if len(set(given)) == 1 and given[0] in (dtype, torch.float32) else torch.float32
    ref = shift_gate if shift_gate is not None else shift_up
    sg = _as(shift_gate, sdt) if shift_gate is not None else torch.zeros(T, p, dtype=sdt, device=ref.device)
    su = _as(shift_up, sdt) if shift_up is not None else torch.zeros(T, p, dtype=sdt, device=ref.device)
    return sg, su


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
    """Triton version of :func:`globe_kernels.reference.adapter_gemm` (same arguments and results)."""
    return _launch(
        x, offsets, adapter_gate, adapter_up, composed_gate=composed_gate, composed_up=composed_up,
        bank_gate=bank_gate, codes_gate=codes_gate, bank_up=bank_up, codes_up=codes_up, phi=phi,
        shift_gate=shift_gate, shift_up=shift_up, act=act, out_dtype=out_dtype,
    )


def _launch(
    x, offsets, adapter_gate, adapter_up, *, composed_gate, composed_up, bank_gate, codes_gate, bank_up, codes_up,
    phi, shift_gate, shift_up, act, out_dtype, config: str | None = None,
):
    if act is not None and act not in ACTS:
        raise ValueError(f"act must be one of {ACTS} or None, got {act!r}")
    phi = check_phi(phi)
    dtype = x.dtype
    if dtype not in _TL_NAME:
        raise TypeError(f"the Triton adapter_gemm runs fp32, bf16 and fp16, got x of {dtype}")
    if x.dim() != 2 or offsets.dim() != 1:
        raise ValueError(f"x must be [T, d] and offsets [n+1], got {tuple(x.shape)} and {tuple(offsets.shape)}")
    T, d = x.shape
    n = offsets.numel() - 1
    _check3(adapter_gate, n, "adapter_gate")
    _check3(adapter_up, n, "adapter_up")
    p, r_g = adapter_gate.shape[1:]
    r_u = adapter_up.shape[2]
    if adapter_up.shape[1] != p:
        raise ValueError(f"adapter_gate and adapter_up must share p, got {tuple(adapter_gate.shape)} and {tuple(adapter_up.shape)}")
    bank = composed_gate is None
    if bank == (bank_gate is None) or (composed_up is None) == (bank_up is None) or bank != (composed_up is None):
        raise ValueError("adapter_gemm: give composed_gate/composed_up or bank_gate/bank_up (with codes), not both")
    if bank:
        if codes_gate is None or codes_up is None:
            raise ValueError("adapter_gemm: bank mode needs codes_gate and codes_up (SparseCodes)")
        _check3(bank_gate, None, "bank_gate")
        _check3(bank_up, None, "bank_up")
        bg, bu = bank_gate, bank_up
    else:
        _check3(composed_gate, n, "composed_gate")
        _check3(composed_up, n, "composed_up")
        bg, bu = composed_gate, composed_up
    if tuple(bg.shape[1:]) != (r_g, d) or tuple(bu.shape[1:]) != (r_u, d):
        raise ValueError(
            f"B~ must be [., r, d] = [., {r_g}, {d}] (gate) and [., {r_u}, {d}] (up), got {tuple(bg.shape)} and {tuple(bu.shape)}"
        )
    out_dtype = out_dtype or dtype
    kernel_out = out_dtype if out_dtype in (dtype, torch.float32) else torch.float32
    device = x.device

    cfg = _configs(dtype)[config] if config is not None else _pick_config(T, n, dtype)
    og = _empty((T, p), kernel_out, device)
    ou = _empty((T, p), kernel_out, device) if act is None else og
    if T > 0 and n > 0:
        xc = x.contiguous()
        offs = _as(offsets, torch.int32, device)
        bg, bu = _as(bg, dtype), _as(bu, dtype)
        ag, au = _as(adapter_gate, dtype), _as(adapter_up, dtype)
        if bank:
            ig, vg, k_g = _codes(codes_gate, n, "codes_gate", device)
            iu, vu, k_u = _codes(codes_up, n, "codes_up", device)
        else:
            dummy = torch.empty(1, dtype=torch.float32, device=device)  # codes are not read in this mode
            ig, vg, iu, vu, k_g, k_u = offs, dummy, offs, dummy, 0, 0
        sg, su = _shifts(shift_gate, shift_up, T, p, dtype)
        has_shift = sg is not None
        if not has_shift:
            sg = su = og  # not read
        hg = _empty((T, r_g), dtype, device)
        hu = _empty((T, r_u), dtype, device)
        # the grid uses the static tile bound, so no .item() on offsets is needed
        tile_expert, tile_row, max_tiles = _tile_map(offs, T, cfg.block_t)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            _adapter_inner_kernel[(max_tiles, triton.cdiv(max(r_g, r_u), cfg.inner_r))](
                xc, bg, bu, ig, vg, iu, vu, hg, hu, tile_expert, tile_row, offs,
                r_g, r_u, d, k_g, k_u,
                BANK=bank, PHI=_PHI_CODE[phi] if bank else 0,
                BLOCK_T=cfg.block_t, BLOCK_R=cfg.inner_r, BLOCK_D=cfg.inner_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            _adapter_out_kernel[(max_tiles, triton.cdiv(p, cfg.out_p))](
                hg, hu, ag, au, sg, su, og, ou, tile_expert, tile_row, offs,
                p, r_g, r_u,
                ACT=0 if act is None else 1, HAS_SHIFT=has_shift,
                BLOCK_T=cfg.block_t, BLOCK_P=cfg.out_p, BLOCK_R=cfg.out_r,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    if kernel_out != out_dtype:
        og = og.to(out_dtype)
        ou = ou.to(out_dtype) if act is None else og
    return og if act is not None else (og, ou)


# --- ahead-of-time specifications ----------------------------------------------------------------------------


_ALIGNED_INTS = ("R_G", "R_U", "D", "P")


def _aligned_attrs(kernel, signature: dict[str, str]) -> dict[tuple[int], list[list]]:
    """ASTSource attrs for the usual model shapes: 16-byte aligned pointers, r, d and p multiples of 16.

    The JIT specializes on the same facts when they hold, and the loads only pipeline (cp.async / TMA) with them.
    """
    return {
        (kernel.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, ty in signature.items()
        if ty.startswith("*") or name in _ALIGNED_INTS
    }


def aot_specs() -> list[dict]:
    """Every (configuration, dtype, variant) the launcher can launch, as triton.compile specifications.

    Pointers that a variant does not read keep the type the launcher passes for them (offsets for the codes of
    precomposed mode, the output for absent shifts and for the up output of act="silu"). Each spec also has
    "attrs" for ``ASTSource(..., attrs=spec["attrs"])``: the alignment the JIT finds at real model shapes;
    compiling without it gives the generic (odd-shape) variant.
    """
    specs = []
    for dtype, tn in _TL_NAME.items():
        for cfg in _configs(dtype).values():
            launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            inner_sig = {
                "x_ptr": f"*{tn}", "bg_ptr": f"*{tn}", "bu_ptr": f"*{tn}",
                "ig_ptr": "*i32", "vg_ptr": "*fp32", "iu_ptr": "*i32", "vu_ptr": "*fp32",
                "hg_ptr": f"*{tn}", "hu_ptr": f"*{tn}",
                "tile_expert_ptr": "*i32", "tile_row_ptr": "*i32", "offsets_ptr": "*i32",
                "R_G": "i32", "R_U": "i32", "D": "i32", "K_G": "i32", "K_U": "i32",
            }
            blocks = {"BLOCK_T": cfg.block_t, "BLOCK_R": cfg.inner_r, "BLOCK_D": cfg.inner_d}
            for bank, phi in [(False, "identity")] + [(True, ph) for ph in _PHI_CODE]:
                consts = {"BANK": bank, "PHI": _PHI_CODE[phi], **blocks}
                mode = f"bank_{phi}" if bank else "precomposed"
                specs.append({
                    "name": f"adapter_inner_{cfg.name}_{tn}_{mode}",
                    "kernel": _adapter_inner_kernel,
                    "signature": {**inner_sig, **{k: "constexpr" for k in consts}},
                    "constexprs": consts,
                    "attrs": _aligned_attrs(_adapter_inner_kernel, inner_sig),
                    **launch,
                })
            blocks = {"BLOCK_T": cfg.block_t, "BLOCK_P": cfg.out_p, "BLOCK_R": cfg.out_r}
            out_names = [tn] if dtype == torch.float32 else [tn, "fp32"]
            for act in ("silu", None):
                for on in out_names:
                    shift_names = [None] + sorted({tn, "fp32"})
                    for sn in shift_names:
                        consts = {"ACT": 0 if act is None else 1, "HAS_SHIFT": sn is not None, **blocks}
                        sig = {
                            "hg_ptr": f"*{tn}", "hu_ptr": f"*{tn}", "ag_ptr": f"*{tn}", "au_ptr": f"*{tn}",
                            "sg_ptr": f"*{sn or on}", "su_ptr": f"*{sn or on}", "og_ptr": f"*{on}", "ou_ptr": f"*{on}",
                            "tile_expert_ptr": "*i32", "tile_row_ptr": "*i32", "offsets_ptr": "*i32",
                            "P": "i32", "R_G": "i32", "R_U": "i32",
                            **{k: "constexpr" for k in consts},
                        }
                        specs.append({
                            "name": f"adapter_out_{cfg.name}_{tn}_out{on}_{act or 'none'}_shift{sn or 'none'}",
                            "kernel": _adapter_out_kernel,
                            "signature": sig,
                            "constexprs": consts,
                            "attrs": _aligned_attrs(_adapter_out_kernel, sig),
                            **launch,
                        })
    return specs
