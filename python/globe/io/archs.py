"""Registry of the Mixture-of-Experts architectures whose routed experts :mod:`globe.io` can read.

An architecture is one :class:`ArchSpec`: the ``model_type`` of its ``config.json``, the config keys that give
the number of routed experts, the expert width ``p`` and the hidden size ``d``, the rule that says which
decoder layers hold routed experts, and the on-disk key layouts its experts may be stored in. Adding an
architecture is adding one entry to :data:`ARCHS` (see :func:`register`).

Two families of layouts exist on disk:

* per-expert keys, one 2-D ``nn.Linear`` weight per expert and projection, e.g.
  ``model.layers.3.mlp.experts.7.gate_proj.weight`` [p, d] (what ``save_pretrained`` of transformers 5
  writes by default for every architecture here but gpt-oss, and what the original releases hold);
* fused 3-D keys, all experts of a layer in one tensor, e.g. ``model.layers.3.mlp.experts.gate_up_proj``
  [n, 2p, d] (gate rows first, then up) and ``...experts.down_proj`` [n, d, p], as transformers 5 holds
  them in memory and writes them with ``save_pretrained(save_original_format=False)``. gpt-oss stores them
  transposed, [n, d, 2p] and [n, p, d], with gate and up interleaved along the last axis
  (gate = ``[..., ::2]``, up = ``[..., 1::2]``) and biases ``gate_up_proj_bias`` [n, 2p] (interleaved
  likewise) and ``down_proj_bias`` [n, d].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FAMILIES",
    "ArchSpec",
    "FusedLayout",
    "PerExpertLayout",
    "ARCHS",
    "register",
    "get_arch",
    "supported_archs",
    "EXPERT_COUNT_KEYS",
]

#: The three projections of a gated expert MLP, in the names this package uses.
FAMILIES: tuple[str, ...] = ("gate", "up", "down")

#: Config keys that, in any architecture we know of, hold the number of routed experts. A config that has
#: none of them (or only zeros) describes a dense model.
EXPERT_COUNT_KEYS: tuple[str, ...] = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
)


@dataclass(frozen=True)
class PerExpertLayout:
    """One 2-D weight per expert and projection: ``{prefix}layers.L.{block}.experts.E.{name}.weight``.

    ``names`` maps the families gate/up/down to the module names of the projections (Mixtral: w1/w3/w2).
    Weights are in ``nn.Linear.weight`` orientation: gate and up [p, d], down [d, p]; optional biases
    ``.bias`` [p] / [d].
    """

    block: str = "mlp"
    names: Mapping[str, str] = field(
        default_factory=lambda: {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    )

    kind = "per-expert"

    def layer_prefix(self, prefix: str, layer: int) -> str:
        return f"{prefix}layers.{layer}.{self.block}.experts."

    def key(self, prefix: str, layer: int, expert: int, family: str, *, bias: bool = False) -> str:
        suffix = "bias" if bias else "weight"
        return f"{self.layer_prefix(prefix, layer)}{expert}.{self.names[family]}.{suffix}"

    def marker(self, prefix: str, layer: int) -> str:
        """The key whose presence shows that a layer's experts are stored in this layout."""
        return self.key(prefix, layer, 0, "gate")

    def matches_rest(self, rest: str) -> bool:
        """Whether ``rest`` (the part of a key after ``experts.``) belongs to this layout."""
        head, _, tail = rest.partition(".")
        return head.isdigit() and tail in {f"{name}.weight" for name in self.names.values()}


@dataclass(frozen=True)
class FusedLayout:
    """All experts of a layer in 3-D tensors ``{prefix}layers.L.{block}.experts.{gate_up_proj,down_proj}``.

    Not transposed: gate_up [n, 2p, d] with the gate rows first, down [n, d, p]. Transposed (gpt-oss):
    gate_up [n, d, 2p], down [n, p, d]. ``interleaved`` means gate and up alternate along the 2p axis.
    Biases, when present, are ``gate_up_proj_bias`` [n, 2p] (same order as the weight) and
    ``down_proj_bias`` [n, d].
    """

    block: str = "mlp"
    transposed: bool = False
    interleaved: bool = False
    gate_up_name: str = "gate_up_proj"
    down_name: str = "down_proj"

    kind = "fused"

    def layer_prefix(self, prefix: str, layer: int) -> str:
        return f"{prefix}layers.{layer}.{self.block}.experts."

    def tensor_name(self, family: str) -> str:
        return self.down_name if family == "down" else self.gate_up_name

    def key(self, prefix: str, layer: int, family: str, *, bias: bool = False) -> str:
        name = self.tensor_name(family)
        return f"{self.layer_prefix(prefix, layer)}{name}{'_bias' if bias else ''}"

    def marker(self, prefix: str, layer: int) -> str:
        return self.key(prefix, layer, "gate")

    def matches_rest(self, rest: str) -> bool:
        return rest in (self.gate_up_name, self.down_name)


Layout = PerExpertLayout | FusedLayout

MoeRule = Callable[[Mapping[str, Any], int], bool]


def _every_layer(config: Mapping[str, Any], layer: int) -> bool:
    return True


def _qwen_rule(config: Mapping[str, Any], layer: int) -> bool:
    """Qwen2-MoE / Qwen3-MoE: MoE unless listed in ``mlp_only_layers``, every ``decoder_sparse_step``-th."""
    mlp_only = config.get("mlp_only_layers") or []
    step = config.get("decoder_sparse_step") or 1
    return layer not in mlp_only and (layer + 1) % step == 0


def _deepseek_rule(config: Mapping[str, Any], layer: int) -> bool:
    """DeepSeek-V2/V3: dense for the first ``first_k_dense_replace`` layers, then each ``moe_layer_freq``."""
    first_dense = config.get("first_k_dense_replace") or 0
    freq = config.get("moe_layer_freq") or 1
    return layer >= first_dense and layer % freq == 0


@dataclass(frozen=True)
class ArchSpec:
    """How to find the routed experts of one architecture (one ``model_type``).

    The ``*_keys`` fields are tuples of alternative config keys, tried in order (transformers writes some
    under an alias: a Qwen3-MoE config saved by transformers 5 says ``num_local_experts`` where the released
    checkpoints say ``num_experts``). ``layouts`` lists the on-disk layouts to try, the usual one first.
    """

    model_type: str
    num_experts_keys: tuple[str, ...]
    expert_dim_keys: tuple[str, ...]
    layouts: tuple[Layout, ...]
    hidden_keys: tuple[str, ...] = ("hidden_size",)
    num_layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    is_moe_layer: MoeRule = _every_layer
    config_class: str = ""  # the transformers config class, for the synthetic builder


ARCHS: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add (or replace) an architecture in the registry and return it."""
    ARCHS[spec.model_type] = spec
    return spec


def supported_archs() -> list[str]:
    """The ``model_type`` values that :mod:`globe.io` can read, sorted."""
    return sorted(ARCHS)


def get_arch(model_type: str) -> ArchSpec | None:
    return ARCHS.get(model_type)


_MLP_PER_EXPERT = PerExpertLayout()
_MLP_FUSED = FusedLayout()

register(
    ArchSpec(
        "qwen2_moe",
        num_experts_keys=("num_experts", "num_local_experts"),
        expert_dim_keys=("moe_intermediate_size",),
        layouts=(_MLP_PER_EXPERT, _MLP_FUSED),
        is_moe_layer=_qwen_rule,
        config_class="Qwen2MoeConfig",
    )
)
register(
    ArchSpec(
        "qwen3_moe",
        num_experts_keys=("num_experts", "num_local_experts"),
        expert_dim_keys=("moe_intermediate_size",),
        layouts=(_MLP_PER_EXPERT, _MLP_FUSED),
        is_moe_layer=_qwen_rule,
        config_class="Qwen3MoeConfig",
    )
)
register(
    ArchSpec(
        "olmoe",
        num_experts_keys=("num_experts", "num_local_experts"),
        expert_dim_keys=("intermediate_size",),
        layouts=(_MLP_PER_EXPERT, _MLP_FUSED),
        config_class="OlmoeConfig",
    )
)
register(
    ArchSpec(
        "deepseek_v2",
        num_experts_keys=("n_routed_experts", "num_experts"),
        expert_dim_keys=("moe_intermediate_size",),
        layouts=(_MLP_PER_EXPERT, _MLP_FUSED),
        is_moe_layer=_deepseek_rule,
        config_class="DeepseekV2Config",
    )
)
register(
    ArchSpec(
        "deepseek_v3",
        num_experts_keys=("n_routed_experts", "num_local_experts"),
        expert_dim_keys=("moe_intermediate_size",),
        layouts=(_MLP_PER_EXPERT, _MLP_FUSED),
        is_moe_layer=_deepseek_rule,
        config_class="DeepseekV3Config",
    )
)
register(
    ArchSpec(
        "mixtral",
        num_experts_keys=("num_local_experts", "num_experts"),
        expert_dim_keys=("intermediate_size",),
        layouts=(
            PerExpertLayout(block="block_sparse_moe", names={"gate": "w1", "up": "w3", "down": "w2"}),
            _MLP_FUSED,
        ),
        config_class="MixtralConfig",
    )
)
register(
    ArchSpec(
        "gpt_oss",
        num_experts_keys=("num_local_experts", "num_experts"),
        expert_dim_keys=("intermediate_size",),
        layouts=(FusedLayout(transposed=True, interleaved=True),),
        config_class="GptOssConfig",
    )
)
