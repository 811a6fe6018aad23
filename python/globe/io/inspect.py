"""A summary of an MoE checkpoint: what GloBE would compress and how much of the model that is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from globe.io.checkpoint import open_checkpoint

__all__ = ["inspect_checkpoint", "format_inspection"]


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Describe the routed experts of a checkpoint from its config and safetensors headers (no tensor read).

    Keys: path, arch, layout, num_layers, moe_layers, num_moe_layers, num_experts, expert_dim (p),
    hidden_size (d), dtype (str), has_bias, num_shards, size_bytes, total_params, expert_params,
    gate_up_params, expert_share and gate_up_share (fractions of total_params).
    """
    ckpt = open_checkpoint(path)
    total, routed = ckpt.num_parameters()
    gate_up = ckpt.num_gate_up_parameters()
    return {
        "path": str(ckpt.path),
        "arch": ckpt.arch,
        "layout": ckpt.layout,
        "num_layers": ckpt.num_layers,
        "moe_layers": list(ckpt.moe_layers),
        "num_moe_layers": len(ckpt.moe_layers),
        "num_experts": ckpt.num_experts,
        "expert_dim": ckpt.expert_dim,
        "hidden_size": ckpt.hidden_size,
        "dtype": str(ckpt.dtype).removeprefix("torch."),
        "has_bias": ckpt.has_bias,
        "num_shards": len(ckpt.shards.files),
        "size_bytes": ckpt.shards.num_bytes(),
        "total_params": total,
        "expert_params": routed,
        "gate_up_params": gate_up,
        "expert_share": routed / total if total else 0.0,
        "gate_up_share": gate_up / total if total else 0.0,
    }


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 4, 6, 7] -> '0-2, 4, 6-7'."""
    parts: list[str] = []
    start = prev = None
    for layer in [*layers, None]:
        if prev is not None and layer == prev + 1:
            prev = layer
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = layer
    return ", ".join(parts)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def format_inspection(info: dict[str, Any]) -> str:
    """Render :func:`inspect_checkpoint`'s dict as an aligned, human-readable block of lines."""
    rows = [
        ("checkpoint", info["path"]),
        ("architecture", info["arch"]),
        ("layout", f"{info['layout']} keys in {info['num_shards']} safetensors file(s)"),
        ("MoE layers", f"{info['num_moe_layers']} of {info['num_layers']}: {_ranges(info['moe_layers'])}"),
        ("experts/layer", f"{info['num_experts']} routed"),
        ("expert shape", f"p={info['expert_dim']} x d={info['hidden_size']} (gate, up: p x d; down: d x p)"),
        ("dtype", info["dtype"]),
        ("expert biases", "yes" if info["has_bias"] else "no"),
        ("parameters", _count(info["total_params"])),
        (
            "routed experts",
            f"{_count(info['expert_params'])} ({100 * info['expert_share']:.1f}% of the model)",
        ),
        (
            "gate + up",
            f"{_count(info['gate_up_params'])} ({100 * info['gate_up_share']:.1f}% of the model; "
            "the part GloBE compresses)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
