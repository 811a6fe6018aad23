"""Bytes of routed-expert weights a model holds, patched or not: :func:`memory_report`."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from globe.inference.archs import find_experts
from globe.inference.patch import GlobeFactors

__all__ = ["memory_report", "format_memory_report"]

# GlobeFactors tensor name prefix -> report category
_CATEGORIES = (
    ("adapter_", "adapters"),
    ("composed_", "composed"),
    ("bank_", "banks"),
    ("codes_", "codes"),
    ("mean_", "means"),
)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_report(model: nn.Module) -> dict:
    """Bytes held by the routed experts of ``model``, counting a tensor shared by several layers once.

    Returns a dict with ``mode`` ("dense", "precomposed", "bank" or "mixed"), ``layers``, ``gate_up`` (dense
    gate/up weights, or GloBE factors once patched), ``down`` (the dense down projections), ``bias`` (expert
    biases, gpt-oss), ``total`` (their sum) and ``detail``: gate_up split into ``dense``, ``adapters``,
    ``composed``, ``banks``, ``codes`` and ``means``."""
    seen: set[int] = set()
    detail: Counter = Counter({k: 0 for k in ("dense", "adapters", "composed", "banks", "codes", "means")})
    down = bias = 0
    modes = set()

    def count(t: torch.Tensor | None) -> int:
        if t is None or id(t) in seen:
            return 0
        seen.add(id(t))
        return _nbytes(t)

    sites = find_experts(model)
    for site in sites:
        module = site.module
        factors = module._modules.get("globe")
        if isinstance(factors, GlobeFactors):
            modes.add(factors.mode)
            for name, t in list(factors.named_parameters(recurse=False)) + list(factors.named_buffers(recurse=False)):
                category = next(c for prefix, c in _CATEGORIES if name.startswith(prefix))
                detail[category] += count(t)
        else:
            modes.add("dense")
            detail["dense"] += count(module._parameters.get("gate_up_proj"))
        down += count(module._parameters.get("down_proj"))
        bias += count(module._parameters.get("gate_up_proj_bias")) + count(module._parameters.get("down_proj_bias"))
    gate_up = sum(detail.values())
    return {
        "mode": modes.pop() if len(modes) == 1 else "mixed",
        "layers": len(sites),
        "gate_up": gate_up,
        "down": down,
        "bias": bias,
        "total": gate_up + down + bias,
        "detail": dict(detail),
    }


def format_memory_report(report: dict) -> str:
    """One line per figure, in MiB."""
    mib = 1 << 20
    lines = [f"experts memory ({report['mode']}, {report['layers']} MoE layers)"]
    for key in ("gate_up", "down", "bias", "total"):
        lines.append(f"  {key:<8} {report[key] / mib:10.3f} MiB")
    for key, value in report["detail"].items():
        if value:
            lines.append(f"    {key:<10} {value / mib:10.3f} MiB")
    return "\n".join(lines)
