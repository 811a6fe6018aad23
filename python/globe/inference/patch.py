"""Serve a loaded transformers MoE model through GloBE factors: :func:`patch_model` / :func:`unpatch_model`.

How it plugs in. transformers 5 looks the forward of every routed-experts module up in its experts registry
(``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``) under ``config._experts_implementation``. This
module registers one more implementation there, ``"globe"`` (:func:`globe_experts_forward`), and a patch:

1. checks that the artifact fits the model (layers, experts, p, d, families, architecture) before touching it;
2. in every routed-experts module, deletes the ``gate_up_proj`` parameter (the dense gate and up weights are
   freed, not kept beside the factors) and attaches a :class:`GlobeFactors` child holding, per family,
   the adapters A_i and either the precomposed B~_i (``mode="precomposed"``) or the bank and sparse codes
   (``mode="bank"``), plus the artifact's mean when it has one;
3. points the modules' config at ``"globe"``.

``down_proj`` (and gpt-oss's biases), the router, shared experts and every other module stay as they are.

The GloBE forward, per layer: tokens are grouped by expert, ``globe_kernels.ops.adapter_gemm`` computes
A_e B~_e x (+ shift) for gate and up in one call, the mean term x·meanᵀ (one dense GEMM per family, shared by
all experts) and the experts' gate/up biases enter through its ``shift`` arguments; SiLU-gated experts get
``silu(gate) * up`` fused, other gatings (gpt-oss) take (gate, up) and apply the module's own ``_apply_gate``.
The down projection is transformers' grouped linear on the dense ``down_proj``.

Unpatch contract. The dense gate/up weights are freed by default, so :func:`unpatch_model` restores the
module structure (a ``gate_up_proj`` parameter in the model's layout, dtype and device) holding the *dense
reconstruction* A_i B~_i + mean of the factors the module held, and the previous experts implementation.
``patch_model(..., keep_original=True)`` instead moves the original ``gate_up_proj`` to CPU memory (it is
freed from the accelerator, not from the host) and :func:`unpatch_model` puts that exact tensor back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from globe.artifact import Artifact, scope_id
from globe.errors import ArtifactError
from globe.inference.archs import (
    ExpertsSite,
    expert_dims,
    find_experts,
    join_activations,
    join_gate_up,
    split_gate_up,
    uses_fused_silu,
)
from globe_kernels import ops
from globe_kernels.ops import SparseCodes

__all__ = [
    "IMPLEMENTATION",
    "MODES",
    "GlobeFactors",
    "apply_reconstruction",
    "globe_experts_forward",
    "is_patched",
    "patch_model",
    "patched_mode",
    "register_implementation",
    "unpatch_model",
]

log = logging.getLogger("globe")

IMPLEMENTATION = "globe"
MODES = ("precomposed", "bank")
FAMILIES = ("gate", "up")
_PATCH_ATTR = "_globe_patch"  # on the model: what unpatch needs (mode, previous implementations)
_ORIGINAL_ATTR = "_globe_original"  # on an experts module: the original gate_up_proj when kept, requires_grad


class GlobeFactors(nn.Module):
    """The GloBE factors of one layer's gate and up projections, attached to its experts module as ``globe``.

    Buffers (per family f in gate, up): ``adapter_f`` [n, p, r]; precomposed mode: ``composed_f`` [n, r, d];
    bank mode: ``codes_f_indices`` / ``codes_f_values`` [n, k]. Parameters without gradient, because a global
    bank (and mean) is one tensor shared by every layer's module and parameters stay shared across
    ``.to()``: ``bank_f`` [m, r, d] (bank mode), ``mean_f`` [p, d] or None.
    """

    def __init__(
        self,
        mode: str,
        phi: str,
        layer: int,
        adapters: dict[str, torch.Tensor],
        *,
        composed: dict[str, torch.Tensor] | None = None,
        banks: dict[str, nn.Parameter] | None = None,
        codes: dict[str, SparseCodes] | None = None,
        means: dict[str, nn.Parameter | None] | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.phi, self.layer = mode, phi, layer
        means = means or {}
        for f in FAMILIES:
            self.register_buffer(f"adapter_{f}", adapters[f])
            if mode == "precomposed":
                self.register_buffer(f"composed_{f}", composed[f])
            else:
                self.register_parameter(f"bank_{f}", banks[f])
                self.register_buffer(f"codes_{f}_indices", codes[f].indices)
                self.register_buffer(f"codes_{f}_values", codes[f].values)
            self.register_parameter(f"mean_{f}", means.get(f))

    def extra_repr(self) -> str:
        n, p, r = self.adapter_gate.shape
        return f"layer={self.layer}, mode={self.mode}, phi={self.phi}, n={n}, p={p}, r={r}"

    def codes(self, family: str) -> SparseCodes:
        return SparseCodes(getattr(self, f"codes_{family}_indices"), getattr(self, f"codes_{family}_values"))

    def gemm_operands(self) -> dict[str, Any]:
        """Keyword arguments of ``ops.adapter_gemm`` for this layer's mode."""
        if self.mode == "precomposed":
            return {"composed_gate": self.composed_gate, "composed_up": self.composed_up}
        return {
            "bank_gate": self.bank_gate,
            "codes_gate": self.codes("gate"),
            "bank_up": self.bank_up,
            "codes_up": self.codes("up"),
            "phi": self.phi,
        }

    @torch.no_grad()
    def dense(self, family: str) -> torch.Tensor:
        """The dense weights these factors stand for, A_i B~_i (+ mean): [n, p, d] float32."""
        if self.mode == "precomposed":
            composed = getattr(self, f"composed_{family}").float()
        else:
            composed = ops.compose(
                getattr(self, f"bank_{family}"), self.codes(family), phi=self.phi, out_dtype=torch.float32
            )
        W = getattr(self, f"adapter_{family}").float() @ composed
        mean = getattr(self, f"mean_{family}")
        return W + mean.float() if mean is not None else W


# --- the experts forward registered in transformers ---------------------------------------------------------


def _route(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T*k routing slots by expert: (sorted expert ids, perm, offsets [n+1] int32).

    Same result as ``ops.group_by_expert`` but with static shapes (scatter-add counts instead of bincount), so
    torch.compile traces it without a graph break."""
    ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids.long(), torch.ones_like(ids, dtype=torch.int64))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    return sorted_ids, perm, offsets


def globe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``"globe"`` experts implementation: gate/up from GloBE factors, dense down, routing-weighted sum.

    A module of the model that carries no factors (not patched) runs its own eager forward."""
    factors = getattr(self, "globe", None)
    if not isinstance(factors, GlobeFactors):
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    from transformers.integrations.moe import _grouped_linear

    num_tokens, k = top_k_index.shape
    sorted_ids, perm, offsets = _route(top_k_index, self.num_experts)
    token = perm // k
    compute = factors.adapter_gate.dtype
    x = hidden_states.to(compute)
    xs = x[token]

    shifts: dict[str, torch.Tensor | None] = {}
    bias_gate = bias_up = None
    if self.has_bias:
        bias_gate, bias_up = split_gate_up(self, self.gate_up_proj_bias)
    for f, bias in (("gate", bias_gate), ("up", bias_up)):
        mean = getattr(factors, f"mean_{f}")
        shift = (x @ mean.T)[token] if mean is not None else None  # one GEMM per family over the T tokens
        if bias is not None:
            b = bias[sorted_ids].to(compute)
            shift = b if shift is None else shift + b
        shifts[f] = shift

    operands = factors.gemm_operands()
    args = (xs, offsets, factors.adapter_gate, factors.adapter_up)
    if uses_fused_silu(self):
        h = ops.adapter_gemm(*args, **operands, shift_gate=shifts["gate"], shift_up=shifts["up"], act="silu")
    else:
        gate, up = ops.adapter_gemm(*args, **operands, shift_gate=shifts["gate"], shift_up=shifts["up"], act=None)
        h = self._apply_gate(join_activations(self, gate, up))

    down_bias = self.down_proj_bias[sorted_ids] if self.has_bias else None
    out = _grouped_linear(h, self.down_proj, offsets[1:], bias=down_bias, is_transposed=self.is_transposed)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(out.dtype)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    # fixed-order sum over the k slots of each token, as transformers' own implementations do
    out = out[inv_perm].view(num_tokens, k, -1).sum(dim=1)
    return out.to(hidden_states.dtype)


def register_implementation() -> None:
    """Register ``"globe"`` in transformers' experts registry (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION) is not globe_experts_forward:
        ExpertsInterface.register(IMPLEMENTATION, globe_experts_forward)


# --- checks -------------------------------------------------------------------------------------------------


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def check_compatible(model: nn.Module, artifact: Artifact, sites: list[ExpertsSite] | None = None) -> None:
    """Raise ArtifactError, naming what differs, unless the artifact's factors fit the model's experts."""
    sites = find_experts(model) if sites is None else sites
    if sorted(artifact.families) != sorted(FAMILIES):
        raise ArtifactError(f"artifact families are {list(artifact.families)}; serving needs exactly {list(FAMILIES)}")
    artifact.validate()
    arch = artifact.source.get("arch") or artifact.source.get("model_type")
    model_type = _model_type(model)
    if arch and model_type and arch != model_type:
        raise ArtifactError(f"artifact was fitted on a {arch!r} checkpoint, the model is {model_type!r}")
    layers = [s.layer for s in sites]
    if layers != sorted(artifact.layers):
        raise ArtifactError(
            f"the model has {len(layers)} MoE layers {layers}, the artifact has {len(artifact.layers)} "
            f"{sorted(artifact.layers)}"
        )
    s = artifact.shape
    for site in sites:
        n, p, d = expert_dims(site.module)
        for what, got, want in (
            ("experts", n, s["n"]),
            ("expert dim p", p, s["p"]),
            ("hidden size d", d, s["d"]),
        ):
            if got != want:
                raise ArtifactError(f"{site.name}: model has {what} = {got}, the artifact has {want}")
        fused = getattr(site.module, "gate_up_proj", None)
        if isinstance(fused, torch.Tensor):
            gate, _ = split_gate_up(site.module, fused)
            if tuple(gate.shape) != (n, p, d):
                raise ArtifactError(f"{site.name}: gate_up_proj {tuple(fused.shape)} does not hold [n, p, d] gates")
        for f in FAMILIES:
            A = artifact.adapter(f, site.layer)
            if tuple(A.shape[:2]) != (n, p) or artifact.bank(f, site.layer).shape[2] != d:
                raise ArtifactError(f"{site.name}: artifact factors of {f} do not fit [n={n}, p={p}, d={d}]")


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _PATCH_ATTR, None) is not None


def patched_mode(model: nn.Module) -> str | None:
    """The serving mode the model is patched in ("precomposed" or "bank"), or None if it is not patched."""
    record = getattr(model, _PATCH_ATTR, None)
    return None if record is None else record["mode"]


# --- patch / unpatch ----------------------------------------------------------------------------------------


def _shared(cache: dict, key: tuple, make) -> nn.Parameter | None:
    if key not in cache:
        t = make()
        cache[key] = None if t is None else nn.Parameter(t, requires_grad=False)
    return cache[key]


@torch.no_grad()
def _build_factors(
    artifact: Artifact, layer: int, mode: str, dtype: torch.dtype, device: torch.device, cache: dict
) -> GlobeFactors:
    sid = scope_id(artifact.scope, layer)
    adapters, composed, banks, codes, means = {}, {}, {}, {}, {}
    for f in FAMILIES:
        adapters[f] = artifact.adapter(f, layer).to(device=device, dtype=dtype).contiguous()
        means[f] = _shared(cache, ("mean", f, sid), lambda f=f: _cast(artifact.mean(f, layer), device, dtype))
        if mode == "precomposed":
            bank = artifact.bank(f, layer).to(device=device, dtype=torch.float32)
            c = artifact.codes(f, layer)
            c = SparseCodes(c.indices.to(device), c.values.to(device))
            composed[f] = ops.compose(bank, c, phi=artifact.phi, out_dtype=dtype).contiguous()
        else:
            banks[f] = _shared(cache, ("bank", f, sid), lambda f=f: _cast(artifact.bank(f, layer), device, dtype))
            c = artifact.codes(f, layer)
            codes[f] = SparseCodes(
                c.indices.to(device=device, dtype=torch.int32).contiguous(),
                c.values.to(device=device, dtype=torch.float32).contiguous(),
            )
    return GlobeFactors(
        mode,
        artifact.phi,
        layer,
        adapters,
        composed=composed or None,
        banks=banks or None,
        codes=codes or None,
        means=means,
    )


def _cast(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype).contiguous()


def patch_model(
    model: nn.Module,
    artifact: Artifact,
    mode: str = "precomposed",
    dtype: torch.dtype | None = None,
    *,
    keep_original: bool = False,
) -> nn.Module:
    """Serve the routed experts' gate and up projections of ``model`` from ``artifact``; returns ``model``.

    mode: ``"precomposed"`` caches B~_i = phi(sum_j alpha_ij B_j) per expert in the compute dtype;
    ``"bank"`` keeps only the bank, the sparse codes and the adapters and composes on the fly. dtype: the
    compute dtype of the factors (default: the dtype of the experts' ``down_proj``). The dense gate/up weights
    are freed; with ``keep_original=True`` they are moved to CPU memory so that :func:`unpatch_model` can put
    them back exactly. Raises ArtifactError, before changing anything, if the artifact does not fit the model.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if is_patched(model):
        raise ArtifactError("the model is already patched with GloBE factors; call unpatch_model first")
    sites = find_experts(model)
    check_compatible(model, artifact, sites)
    register_implementation()

    cache: dict = {}
    for site in sites:
        module = site.module
        device, model_dtype = module.down_proj.device, module.down_proj.dtype
        compute = dtype or model_dtype
        factors = _build_factors(artifact, site.layer, mode, compute, device, cache)
        original = module._parameters.pop("gate_up_proj", None)
        kept = None
        if keep_original and original is not None:
            kept = original if original.device.type == "cpu" else nn.Parameter(original.detach().cpu())
            kept.requires_grad_(original.requires_grad)
        grad = original.requires_grad if original is not None else False
        setattr(module, _ORIGINAL_ATTR, {"gate_up_proj": kept, "grad": grad})
        del original
        module.globe = factors

    previous = []
    for config in {id(s.module.config): s.module.config for s in sites}.values():
        previous.append((config, config._experts_implementation))
        config._experts_implementation_internal = IMPLEMENTATION
    setattr(model, _PATCH_ATTR, {"mode": mode, "previous": previous, "scope": artifact.scope, "phi": artifact.phi})
    return model


@torch.no_grad()
def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: restore each experts module's ``gate_up_proj`` and experts implementation.

    The restored weights are the originals when the patch kept them (``keep_original=True``), else the dense
    reconstruction of the factors the module held (the original weights were freed). Returns ``model``."""
    record = getattr(model, _PATCH_ATTR, None)
    if record is None:
        raise ValueError("unpatch_model: the model is not patched with GloBE factors")
    for site in find_experts(model):
        module = site.module
        factors = module._modules.get("globe")
        if not isinstance(factors, GlobeFactors):
            continue
        info = getattr(module, _ORIGINAL_ATTR, {}) or {}
        # where and in what dtype the experts live now (the model may have been moved or cast since the patch)
        device, dtype = module.down_proj.device, module.down_proj.dtype
        kept = info.get("gate_up_proj")
        if kept is not None:
            weight = kept if kept.device == device else nn.Parameter(kept.detach().to(device, dtype))
        else:
            weight = join_gate_up(module, factors.dense("gate"), factors.dense("up")).to(device=device, dtype=dtype)
            weight = nn.Parameter(weight)
        weight.requires_grad_(info.get("grad", False))
        del module.globe
        module.gate_up_proj = weight
        if hasattr(module, _ORIGINAL_ATTR):
            delattr(module, _ORIGINAL_ATTR)
    for config, impl in record["previous"]:
        config._experts_implementation_internal = impl
    delattr(model, _PATCH_ATTR)
    return model


@torch.no_grad()
def apply_reconstruction(model: nn.Module, artifact: Artifact) -> nn.Module:
    """Overwrite an unpatched model's gate/up weights with the artifact's dense reconstructions, in place.

    The result is the "reconstruction-dense" model that a patched model must match. Returns ``model``."""
    if is_patched(model):
        raise ArtifactError("apply_reconstruction needs an unpatched model")
    sites = find_experts(model)
    check_compatible(model, artifact, sites)
    for site in sites:
        fused = site.module.gate_up_proj
        W = join_gate_up(site.module, artifact.reconstruct("gate", site.layer), artifact.reconstruct("up", site.layer))
        fused.copy_(W.to(device=fused.device, dtype=fused.dtype))
    return model
