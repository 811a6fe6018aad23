"""Bytes of routed-expert gate/up weights before and after GloBE, computed from model shapes (no download).

Assumptions (the defaults of :func:`expert_bytes`, stated again under the rendered table):

* weights, adapters, atoms, precomposed B~ and the mean in bf16 (2 bytes);
* codes as they are held at inference: one float32 value and one int32 index per nonzero, ``support`` = 4
  nonzeros per expert (the trainer's default target support);
* r and m at the trainer's defaults (:class:`globe.config.GlobeConfig`): r = p/2 taken of min(p, d)
  (a W_i of p x d has rank <= min(p, d), so for Mixtral, where p > d, r = d/2), m = n/4 of the experts in a
  bank's scope; scope "global": one bank per family over all MoE layers (m = L*n/4 atoms), with one mean per
  family. Scope "layer" gives the same bank bytes (L banks of n/4 atoms) and L means;
* both families (gate and up), all MoE layers; down projections stay dense and are not counted.

"Read per token" is what one decode token at batch 1 touches in gate/up over all MoE layers: dense reads k
experts' W_i; precomposed reads k (A_i, B~_i); bank mode reads k adapters and the atoms their codes use
(at most min(m, k*support) per family and layer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ModelShape", "expert_bytes", "render_size_table"]

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """MoE facts of one model: n routed experts per layer, hidden size d, expert width p, top-k, layers."""

    name: str
    num_experts: int
    hidden_size: int
    expert_dim: int
    top_k: int
    moe_layers: int
    num_layers: int
    shared_experts: int = 0
    model_type: str = ""
    hub_id: str = ""


def expert_bytes(
    shape: ModelShape,
    *,
    r: int | str = "p/2",
    m: int | str = "n/4",
    scope: str = "global",
    support: int = 4,
    weight_bytes: int = 2,
    code_bytes: int = 8,
    mean: bool = True,
) -> dict[str, int]:
    """Bytes of gate+up expert weights of ``shape``: dense, precomposed and bank mode, and their parts.

    ``r`` and ``m`` are presets or integers as in :class:`globe.config.GlobeConfig`; ``code_bytes`` per
    nonzero code (value + index). Returns dense, precomposed, bank, their parts (adapters, composed, banks,
    codes, means), r, m and the bytes read per decode token at batch 1 (read_dense, read_precomposed,
    read_bank)."""
    from globe.config import GlobeConfig

    n, d, p, L, k = shape.num_experts, shape.hidden_size, shape.expert_dim, shape.moe_layers, shape.top_k
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    banks_per_family = 1 if scope == "global" else L
    config = GlobeConfig(r=r, m=m, scope=scope)
    rr = config.resolve_r(p, d)
    mm = config.resolve_m(n * L if scope == "global" else n)
    fam = 2
    adapters = fam * L * n * p * rr * weight_bytes
    composed = fam * L * n * rr * d * weight_bytes
    banks = fam * banks_per_family * mm * rr * d * weight_bytes
    codes = fam * L * n * support * code_bytes
    means = fam * banks_per_family * p * d * weight_bytes if mean else 0
    atoms_read = min(mm, k * support)
    return {
        "r": rr,
        "m": mm,
        "dense": fam * L * n * p * d * weight_bytes,
        "precomposed": composed + adapters + means,
        "bank": banks + adapters + codes + means,
        "adapters": adapters,
        "composed": composed,
        "banks": banks,
        "codes": codes,
        "means": means,
        "read_dense": fam * L * k * p * d * weight_bytes,
        "read_precomposed": fam * L * k * rr * (p + d) * weight_bytes,
        "read_bank": fam * L * (atoms_read * rr * d + k * p * rr) * weight_bytes,
    }


def render_size_table(shapes: Iterable[ModelShape], **kwargs) -> str:
    """A markdown table of :func:`expert_bytes` per shape (keyword arguments go to it), with its notes."""
    rows = [
        "| model (n experts, d, p, top-k, MoE layers) | r | m | dense gate+up | precomposed | bank mode "
        "| read per token, batch 1: dense / precomposed / bank |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in shapes:
        b = expert_bytes(s, **kwargs)
        dense = b["dense"]
        rows.append(
            f"| {s.name} ({s.num_experts}, {s.hidden_size}, {s.expert_dim}, {s.top_k}, {s.moe_layers}) "
            f"| {b['r']} | {b['m']} | {dense / GB:.2f} GB "
            f"| {b['precomposed'] / GB:.2f} GB ({b['precomposed'] / dense:.2f}) "
            f"| {b['bank'] / GB:.2f} GB ({b['bank'] / dense:.2f}) "
            f"| {b['read_dense'] / GB * 1e3:.0f} / {b['read_precomposed'] / GB * 1e3:.0f} / "
            f"{b['read_bank'] / GB * 1e3:.0f} MB |"
        )
    scope = kwargs.get("scope", "global")
    support = kwargs.get("support", 4)
    scope_note = "one bank per family over all layers" if scope == "global" else "one bank per layer"
    notes = (
        "\nGB = 10^9 bytes; ratios to dense in parentheses. Gate and up of the routed experts of all MoE "
        f"layers, bf16 weights, factors and means; codes {support} nonzeros per expert, each a float32 value "
        "and an int32 index; defaults r = p/2 of min(p, d) and m = n/4 of the experts in a bank's scope "
        f"(scope {scope}: {scope_note}); down projections stay dense and are not counted. Bank-mode reads "
        f"count the atoms the k routed experts' codes use, at most min(m, {support}k) per family and layer."
    )
    return "\n".join(rows) + "\n" + notes
