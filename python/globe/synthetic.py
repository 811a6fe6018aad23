"""Tiny Mixture-of-Experts checkpoints built with transformers, for tests and demos without a model hub.

:func:`build_tiny_checkpoint` makes a randomly initialised model of a real architecture (its own config class,
a 128-token vocabulary, a few heads) and saves it with ``save_pretrained``, so the files on disk are exactly
what transformers writes for that architecture. With ``structured=True`` the routed experts' gate and up
weights are replaced, before saving, by weights with the structure of trained experts
(:func:`planted_experts`), so compression has something to find.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from globe.errors import ConfigError
from globe.io.archs import ARCHS

__all__ = [
    "PlantedExperts",
    "build_tiny_checkpoint",
    "build_tiny_model",
    "list_supported_archs",
    "planted_experts",
    "tiny_config",
]

VOCAB_SIZE = 128
NUM_HEADS = 4
NUM_KV_HEADS = 2
TARGET_STD = 0.02


def _config_class(arch: str) -> Any:
    import transformers

    spec = ARCHS.get(arch)
    cls = getattr(transformers, spec.config_class, None) if spec is not None and spec.config_class else None
    if cls is None:
        raise ConfigError(
            f"unknown or unavailable architecture {arch!r}; the installed transformers provides: "
            f"{', '.join(list_supported_archs())}"
        )
    return cls


def list_supported_archs() -> list[str]:
    """The architectures of :mod:`globe.io` whose config class the installed transformers provides."""
    import transformers

    return [
        arch
        for arch, spec in sorted(ARCHS.items())
        if spec.config_class and getattr(transformers, spec.config_class, None) is not None
    ]


def _arch_kwargs(arch: str, num_experts: int, hidden_size: int, expert_dim: int) -> dict[str, Any]:
    """Config arguments that size the experts of each architecture (their names differ per config class)."""
    dense_dim = 2 * expert_dim  # dense MLP layers and shared experts
    top_k = min(2, num_experts)
    head_dim = hidden_size // NUM_HEADS
    if arch in ("qwen2_moe", "qwen3_moe"):
        kw = dict(
            num_experts=num_experts,
            moe_intermediate_size=expert_dim,
            intermediate_size=dense_dim,
            num_experts_per_tok=top_k,
        )
        if arch == "qwen2_moe":
            kw["shared_expert_intermediate_size"] = dense_dim
        else:
            kw["head_dim"] = head_dim
        return kw
    if arch == "olmoe":
        return dict(num_experts=num_experts, intermediate_size=expert_dim, num_experts_per_tok=top_k)
    if arch in ("deepseek_v2", "deepseek_v3"):
        rope = max(2, head_dim // 2) // 2 * 2
        return dict(
            n_routed_experts=num_experts,
            moe_intermediate_size=expert_dim,
            intermediate_size=dense_dim,
            num_experts_per_tok=top_k,
            first_k_dense_replace=1,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=max(4, hidden_size // 4),
            q_lora_rank=None if arch == "deepseek_v2" else max(4, hidden_size // 4),
            qk_rope_head_dim=rope,
            qk_nope_head_dim=rope,
            v_head_dim=head_dim,
        )
    if arch == "mixtral":
        return dict(num_local_experts=num_experts, intermediate_size=expert_dim, num_experts_per_tok=top_k)
    if arch == "gpt_oss":
        return dict(
            num_local_experts=num_experts,
            intermediate_size=expert_dim,
            num_experts_per_tok=top_k,
            head_dim=head_dim,
            sliding_window=16,
        )
    raise ConfigError(f"no tiny-config recipe for architecture {arch!r}")


def tiny_config(
    arch: str,
    *,
    num_layers: int = 2,
    num_experts: int = 8,
    hidden_size: int = 64,
    expert_dim: int = 32,
    **config_overrides: Any,
) -> Any:
    """A transformers config of ``arch`` sized for tests: 128-token vocabulary, 4 heads (2 key/value).

    DeepSeek gets one dense first layer (``first_k_dense_replace=1``) and one shared expert; Qwen2-MoE a
    shared expert; ``config_overrides`` (e.g. ``mlp_only_layers=[0]`` for Qwen3-MoE) go to the config
    class last.
    """
    if hidden_size % NUM_HEADS:
        raise ConfigError(f"hidden_size must be a multiple of {NUM_HEADS}, got {hidden_size}")
    cls = _config_class(arch)
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch == "gpt_oss":
        del kwargs["max_position_embeddings"]  # its YaRN rope parameters expect the default context length
    kwargs.update(_arch_kwargs(arch, num_experts, hidden_size, expert_dim))
    kwargs.update(config_overrides)
    return cls(**kwargs)


@dataclass
class PlantedExperts:
    """Synthetic gate/up weights and the structure planted in them (see :func:`planted_experts`).

    ``weights[f]`` [L, n, p, d]; ``banks[f]`` [K, r, d]; ``codes[f]`` [L, n, K] (rows on the simplex, 2 to 4
    non-zeros); ``adapters[f]`` [L, n, p, r]; ``means[f]`` [p, d]. ``L`` counts the MoE layers only.
    """

    weights: dict[str, torch.Tensor]
    banks: dict[str, torch.Tensor]
    codes: dict[str, torch.Tensor]
    adapters: dict[str, torch.Tensor]
    means: dict[str, torch.Tensor]
    rank: int
    num_atoms: int


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    """Scale each [p, d] matrix of a [..., p, d] stack to RMS 1."""
    return x / x.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-12)


def planted_experts(
    num_layers: int,
    num_experts: int,
    expert_dim: int,
    hidden_size: int,
    *,
    seed: int = 0,
    rank: int | None = None,
    num_atoms: int | None = None,
    families: Sequence[str] = ("gate", "up"),
) -> PlantedExperts:
    """Expert weights with the structure GloBE looks for, deterministic from ``seed``.

    Recipe, per family (gate and up independently; p = ``expert_dim``, d = ``hidden_size``):

    1. a bank of K = ``num_atoms`` (default max(4, n/2)) atoms B_j, r x d with r = ``rank`` (default
       max(2, min(p, d)/4)), shared by all experts of all layers; atom rows are scaled by (1+k)^-1/2 so each
       atom has a decaying spectrum, and atoms have unit Frobenius norm;
    2. for every expert of every layer a sparse code α_i on the simplex: 2 to 4 atoms drawn at random, weights
       from a flat Dirichlet;
    3. an adapter A_i (p x r), Gaussian with column k scaled by (1+k)^-1 (decaying singular values);
    4. W_i = c_i (u(A_i Σ_j α_ij B_j) + 0.3 u(U_i V_iᵀ) + 0.1 u(N_i) + 0.5 u(M)), where u(.) scales a matrix
       to RMS 1, U_i V_iᵀ is a rank-2 expert-specific term, N_i is i.i.d. Gaussian noise, M is a family mean
       offset (p x d) shared by all experts and layers, and c_i scales W_i to RMS 0.02 (the usual
       initialiser scale, so a forward pass stays sane).

    The planted part spans at most K·r row directions of R^d, so the stacked experts of all layers have most
    of their energy (about 90 % after removing the mean) in a K·r-dimensional row space.
    """
    n, p, d, L = num_experts, expert_dim, hidden_size, num_layers
    r = rank if rank is not None else max(2, min(p, d) // 4)
    K = num_atoms if num_atoms is not None else max(4, n // 2)
    if not 1 <= r <= min(p, d):
        raise ConfigError(f"rank must be in [1, min(p, d)={min(p, d)}], got {r}")
    if K < 1:
        raise ConfigError(f"num_atoms must be at least 1, got {K}")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    out = PlantedExperts({}, {}, {}, {}, {}, r, K)
    steps = torch.arange(r, dtype=torch.float64)
    for family in families:
        bank = randn(K, r, d) * (1 + steps).rsqrt()[None, :, None]
        bank = bank / bank.flatten(1).norm(dim=1)[:, None, None]
        codes = torch.zeros(L, n, K, dtype=torch.float64)
        for layer in range(L):
            for e in range(n):
                s = int(torch.randint(2, min(4, K) + 1, (1,), generator=gen)) if K > 1 else 1
                support = torch.randperm(K, generator=gen)[:s]
                w = -torch.rand(s, generator=gen, dtype=torch.float64).clamp_min(1e-12).log()
                codes[layer, e, support] = w / w.sum()
        adapters = randn(L, n, p, r) / math.sqrt(r) * (1 + steps).reciprocal()
        signal = adapters @ torch.einsum("lnk,krd->lnrd", codes, bank)
        low_rank = randn(L, n, p, 2) @ randn(L, n, 2, d)
        noise = randn(L, n, p, d)
        mean = randn(p, d)
        w = _unit_rms(signal) + 0.3 * _unit_rms(low_rank) + 0.1 * _unit_rms(noise) + 0.5 * _unit_rms(mean)
        w = TARGET_STD * _unit_rms(w)
        out.weights[family] = w.float()
        out.banks[family] = bank.float()
        out.codes[family] = codes.float()
        out.adapters[family] = adapters.float()
        out.means[family] = mean.float()
    return out


def _routed_experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The routed-experts modules in layer order (``...layers.L.mlp.experts``), shared experts excluded."""
    found: list[tuple[int, torch.nn.Module]] = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 4 and parts[-1] == "experts" and parts[-4] == "layers" and parts[-3].isdigit():
            found.append((int(parts[-3]), module))
    return [module for _, module in sorted(found, key=lambda item: item[0])]


@torch.no_grad()
def _write_gate_up(experts: torch.nn.Module, gate: torch.Tensor, up: torch.Tensor) -> None:
    """Store gate and up ([n, p, d], nn.Linear orientation) in an experts module, whatever its layout."""
    fused = getattr(experts, "gate_up_proj", None)
    if isinstance(fused, torch.Tensor):
        if getattr(experts, "is_transposed", False):
            gate, up = gate.transpose(1, 2), up.transpose(1, 2)  # [n, d, p]
            if getattr(experts, "is_concatenated", True):
                fused.copy_(torch.cat([gate, up], dim=2))
            else:
                fused[..., 0::2] = gate
                fused[..., 1::2] = up
        elif getattr(experts, "is_concatenated", True):
            fused.copy_(torch.cat([gate, up], dim=1))
        else:
            fused[:, 0::2] = gate
            fused[:, 1::2] = up
        return
    for e, expert in enumerate(experts):  # older per-expert ModuleList
        names = ("gate_proj", "up_proj") if hasattr(expert, "gate_proj") else ("w1", "w3")
        getattr(expert, names[0]).weight.copy_(gate[e])
        getattr(expert, names[1]).weight.copy_(up[e])


def build_tiny_model(
    arch: str,
    *,
    num_layers: int = 2,
    num_experts: int = 8,
    hidden_size: int = 64,
    expert_dim: int = 32,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    structured: bool = False,
    **config_overrides: Any,
) -> torch.nn.Module:
    """The in-memory model that :func:`build_tiny_checkpoint` saves (a ``*ForCausalLM`` in eval mode)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        arch,
        num_layers=num_layers,
        num_experts=num_experts,
        hidden_size=hidden_size,
        expert_dim=expert_dim,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if structured:
        modules = _routed_experts_modules(model)
        plant = planted_experts(len(modules), num_experts, expert_dim, hidden_size, seed=seed)
        for i, experts in enumerate(modules):
            _write_gate_up(experts, plant.weights["gate"][i], plant.weights["up"][i])
    return model.to(dtype).eval()


def build_tiny_checkpoint(
    arch: str,
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    num_experts: int = 8,
    hidden_size: int = 64,
    expert_dim: int = 32,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    seed: int = 0,
    structured: bool = False,
    original_format: bool = True,
    **config_overrides: Any,
) -> Path:
    """Build a tiny random model of ``arch`` and save it with ``save_pretrained`` into ``out_dir``.

    ``arch`` is a ``model_type`` from :func:`list_supported_archs`. ``max_shard_size`` (e.g. ``"200KB"``)
    shards the safetensors files. ``structured=True`` plants trained-looking gate/up weights
    (:func:`planted_experts`).
    ``original_format=False`` saves experts in transformers' in-memory fused layout (``experts.gate_up_proj``)
    instead of the per-expert keys of the original releases. Deterministic from ``seed``. Returns the folder.
    """
    from transformers.utils import logging as hf_logging

    model = build_tiny_model(
        arch,
        num_layers=num_layers,
        num_experts=num_experts,
        hidden_size=hidden_size,
        expert_dim=expert_dim,
        dtype=dtype,
        seed=seed,
        structured=structured,
        **config_overrides,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"save_original_format": original_format}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    recipe = {
        "arch": arch,
        "seed": seed,
        "structured": structured,
        "dtype": str(dtype).removeprefix("torch."),
    }
    (out / "globe_synthetic.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return out
