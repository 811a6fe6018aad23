"""Find the routed-experts modules of a loaded transformers model and read or write their gate/up weights.

In transformers 5 every architecture GloBE supports (Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, Mixtral,
gpt-oss) keeps the routed experts of a layer in one module decorated with ``use_experts_implementation``: 3-D
``gate_up_proj`` and ``down_proj`` parameters, and flags set by the decorator that describe the layout:

* ``is_transposed``: weights stored [n, d, 2p] / [n, p, d] (gpt-oss) instead of [n, 2p, d] / [n, d, p];
* ``is_concatenated``: gate rows first then up rows (most), or gate and up interleaved (gpt-oss);
* ``has_bias``: ``gate_up_proj_bias`` [n, 2p] and ``down_proj_bias`` [n, d] (gpt-oss), in the same order.

The forward of such a module is looked up in transformers' experts registry by
``config._experts_implementation``, which is how the GloBE forward is installed (see ``patch.py``).
A module without the decorator cannot be served through the registry; :func:`find_experts` refuses it with a
clear error instead of guessing its calling convention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from globe.errors import ArtifactError

__all__ = [
    "ExpertsSite",
    "expert_dims",
    "find_experts",
    "join_activations",
    "join_gate_up",
    "split_gate_up",
    "uses_fused_silu",
]

_EXPERTS_NAME = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.[A-Za-z_]+\.experts$")


@dataclass
class ExpertsSite:
    """One routed-experts module: its dotted name, decoder-layer index and the module itself."""

    name: str
    layer: int
    module: nn.Module


def _uses_registry(module: nn.Module) -> bool:
    # the decorator sets these flags on the instance and wraps forward (functools.wraps keeps __wrapped__)
    return all(hasattr(module, a) for a in ("is_transposed", "is_concatenated", "has_bias", "has_gate")) and hasattr(
        type(module).forward, "__wrapped__"
    )


def find_experts(model: nn.Module) -> list[ExpertsSite]:
    """The routed-experts modules (``...layers.L.<block>.experts``) in layer order; shared experts excluded.

    Raises ArtifactError if the model has none, or if one does not use transformers' experts registry."""
    sites = []
    for name, module in model.named_modules():
        match = _EXPERTS_NAME.search(name)
        if match is None:
            continue
        if not _uses_registry(module):
            raise ArtifactError(
                f"{name} ({type(module).__name__}) does not use transformers' experts registry "
                "(use_experts_implementation); GloBE serves the 3-D experts modules of transformers >= 5"
            )
        if not getattr(module, "has_gate", True):
            raise ArtifactError(f"{name} ({type(module).__name__}) has no gate projection; GloBE needs gate and up")
        sites.append(ExpertsSite(name, int(match.group("layer")), module))
    if not sites:
        raise ArtifactError(f"{type(model).__name__} has no routed-experts modules (no '...layers.L.*.experts')")
    sites.sort(key=lambda s: s.layer)
    return sites


def expert_dims(module: nn.Module) -> tuple[int, int, int]:
    """(n, p, d) of an experts module, read from ``down_proj`` (present whether patched or not)."""
    down = module.down_proj
    n = down.shape[0]
    if module.is_transposed:
        p, d = down.shape[1], down.shape[2]
    else:
        d, p = down.shape[1], down.shape[2]
    return n, p, d


def split_gate_up(module: nn.Module, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's fused gate/up tensor -> (gate, up), each [n, p, d] in ``nn.Linear`` orientation.

    Also splits a fused bias [n, 2p] -> two [n, p] when given one (a 2-D tensor)."""
    if fused.dim() == 2:
        return (fused[:, 0::2], fused[:, 1::2]) if not module.is_concatenated else fused.chunk(2, dim=1)
    w = fused.transpose(1, 2) if module.is_transposed else fused  # [n, 2p, d]
    if module.is_concatenated:
        gate, up = w.chunk(2, dim=1)
    else:
        gate, up = w[:, 0::2], w[:, 1::2]
    return gate, up


def join_gate_up(module: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_gate_up` for weights: gate, up [n, p, d] -> the module's fused layout."""
    if module.is_concatenated:
        w = torch.cat([gate, up], dim=1)
    else:
        w = torch.stack([gate, up], dim=2).flatten(1, 2)  # rows g0, u0, g1, u1, ...
    return w.transpose(1, 2).contiguous() if module.is_transposed else w.contiguous()


def join_activations(module: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(gate, up) [S, p] -> [S, 2p] in the order the module's ``_apply_gate`` expects."""
    if module.is_concatenated:
        return torch.cat([gate, up], dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def uses_fused_silu(module: nn.Module) -> bool:
    """Whether the module's gating is transformers' default ``silu(gate) * up``, which adapter_gemm fuses.

    Anything else (gpt-oss's clamped, alpha-scaled GLU) is applied by the module's own ``_apply_gate``."""
    from transformers.integrations.moe import _default_apply_gate

    if getattr(type(module), "_apply_gate", None) is not _default_apply_gate:
        return False
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
