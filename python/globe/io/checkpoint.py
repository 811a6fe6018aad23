"""Lazy, layer-at-a-time access to the routed experts of a Hugging Face MoE checkpoint on disk.

:func:`open_checkpoint` reads ``config.json`` and the safetensors headers only; it checks that every MoE layer
the config announces holds all its expert tensors with the shapes the config implies. Tensors are read when
asked for, one at a time through ``safetensors.safe_open``, so memory stays near one layer's experts. The
model is never instantiated.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from globe.errors import CheckpointError
from globe.io.archs import (
    EXPERT_COUNT_KEYS,
    FAMILIES,
    ArchSpec,
    FusedLayout,
    Layout,
    PerExpertLayout,
    get_arch,
    supported_archs,
)
from globe.io.shards import FLOAT_DTYPES, ShardSet, TensorInfo

__all__ = ["Checkpoint", "open_checkpoint"]

Nonfinite = Literal["error", "count"]

_LAYER_KEY = re.compile(
    r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<block>[A-Za-z_]+)\.experts\.(?P<rest>.+)$"
)


def _config_value(config: dict[str, Any], keys: Sequence[str], what: str, path: Path) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise CheckpointError(f"{path}: config.json gives no {what} (looked for {', '.join(keys)})")


def _load_config(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a checkpoint folder with config.json)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: cannot parse ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    return config


def _resolve_arch(config: dict[str, Any], folder: Path) -> ArchSpec:
    model_type = config.get("model_type")
    if not model_type:
        raise CheckpointError(f"{folder / 'config.json'}: no model_type")
    spec = get_arch(model_type)
    if spec is not None:
        return spec
    supported = ", ".join(supported_archs())
    nested = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    if not any(config.get(key) or nested.get(key) for key in EXPERT_COUNT_KEYS):
        raise CheckpointError(
            f"{folder}: model_type '{model_type}' is a dense model: its config.json has no routed experts "
            f"(none of {', '.join(EXPERT_COUNT_KEYS)}); GloBE compresses MoE models ({supported})"
        )
    raise CheckpointError(
        f"{folder}: unsupported MoE architecture model_type '{model_type}'; supported: {supported}"
    )


def _format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


class Checkpoint:
    """The routed experts of one MoE checkpoint folder, read lazily. Use :func:`open_checkpoint`.

    Attributes: ``path``, ``arch`` (config ``model_type``), ``config`` (dict of config.json), ``num_layers``,
    ``moe_layers`` (layer indices holding routed experts), ``num_experts`` (n), ``hidden_size`` (d),
    ``expert_dim`` (p), ``dtype`` (torch dtype of the gate weights on disk), ``has_bias``, ``layout``
    ("per-expert" or "fused"), ``nonfinite_counts`` (key -> number of NaN/Inf values found so far in the
    tensors read, only keys with some; filled when opened with ``nonfinite="count"``).

    Orientation is that of ``nn.Linear.weight``: :meth:`read` gives gate and up as [n, p, d] and down as
    [n, d, p], whatever the layout on disk.
    """

    def __init__(self, path: str | Path, *, nonfinite: Nonfinite = "error"):
        if nonfinite not in ("error", "count"):
            raise ValueError(f"nonfinite must be 'error' or 'count', not {nonfinite!r}")
        self.path = Path(path)
        self.nonfinite = nonfinite
        self._nonfinite: dict[tuple[str, str], int] = {}
        self._handles: dict[Path, Any] = {}
        self.config = _load_config(self.path)
        self.spec = _resolve_arch(self.config, self.path)
        self.arch = self.spec.model_type
        self._read_dims()
        self.shards = ShardSet(self.path)
        self._layout, self._prefix = self._detect_layout()
        self.layout = self._layout.kind
        self._validate()

    # ------------------------------------------------------------------ opening

    def _read_dims(self) -> None:
        spec, cfg, path = self.spec, self.config, self.path
        n = _config_value(cfg, spec.num_experts_keys, "number of routed experts", path)
        if not n:
            raise CheckpointError(
                f"{path}: config.json sets {spec.num_experts_keys[0]}={n}: the model has no routed experts"
            )
        self.num_experts = int(n)
        self.expert_dim = int(_config_value(cfg, spec.expert_dim_keys, "expert width", path))
        self.hidden_size = int(_config_value(cfg, spec.hidden_keys, "hidden size", path))
        self.num_layers = int(_config_value(cfg, spec.num_layers_keys, "number of layers", path))
        self.moe_layers = [layer for layer in range(self.num_layers) if spec.is_moe_layer(cfg, layer)]
        if not self.moe_layers:
            raise CheckpointError(
                f"{path}: config.json leaves no layer with routed experts (model_type '{self.arch}', "
                f"{self.num_layers} layers): the model is dense"
            )

    def _detect_layout(self) -> tuple[Layout, str]:
        """Pick the layout and key prefix from the expert keys present in the MoE layers."""
        votes: Counter[tuple[int, str]] = Counter()
        moe = set(self.moe_layers)
        for key in self.shards.tensors:
            m = _LAYER_KEY.match(key)
            if m is None or int(m["layer"]) not in moe:
                continue
            for i, layout in enumerate(self.spec.layouts):
                if m["block"] == layout.block and layout.matches_rest(m["rest"]):
                    votes[(i, m["prefix"])] += 1
        if not votes:
            self._explain_missing_experts()
        (index, prefix), _ = votes.most_common(1)[0]
        return self.spec.layouts[index], prefix

    def _explain_missing_experts(self) -> None:
        layer = self.moe_layers[0]
        quantized = [
            k
            for k in self.shards.tensors
            if f"layers.{layer}." in k
            and ".experts." in k
            and k.endswith(("_blocks", "_scales", "scale_inv"))
        ]
        if quantized:
            raise CheckpointError(
                f"{self.path}: the experts of layer {layer} are stored quantized (e.g. '{quantized[0]}'); "
                "dequantize the checkpoint to bf16/fp16/fp32 first"
            )
        expected = " or ".join(f"'{lay.marker('model.', layer)}'" for lay in self.spec.layouts)
        raise CheckpointError(
            f"{self.path}: config.json makes layer {layer} an MoE layer ({self.arch}) but its expert keys "
            f"are absent: expected {expected}"
        )

    def _expected_shapes(self, family: str, bias: bool) -> tuple[int, ...]:
        n, p, d = self.num_experts, self.expert_dim, self.hidden_size
        lay = self._layout
        if isinstance(lay, PerExpertLayout):
            if bias:
                return (d,) if family == "down" else (p,)
            return (d, p) if family == "down" else (p, d)
        if bias:
            return (n, d) if family == "down" else (n, 2 * p)
        if family == "down":
            return (n, p, d) if lay.transposed else (n, d, p)
        return (n, d, 2 * p) if lay.transposed else (n, 2 * p, d)

    def _tensor_keys(self, layer: int, family: str, *, bias: bool = False) -> list[str]:
        lay = self._layout
        if isinstance(lay, PerExpertLayout):
            return [lay.key(self._prefix, layer, e, family, bias=bias) for e in range(self.num_experts)]
        return [lay.key(self._prefix, layer, family, bias=bias)]

    def _check_key(self, key: str, layer: int, expected: tuple[int, ...]) -> TensorInfo:
        info = self.shards.tensors.get(key)
        if info is None:
            raise CheckpointError(
                f"{self.path}: layer {layer} is an MoE layer but its expert key '{key}' is absent"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{info.file}: expert tensor '{key}' is stored as {info.dtype}; supported on-disk dtypes are "
                f"{', '.join(FLOAT_DTYPES)} (dequantize the checkpoint first)"
            )
        if info.shape != expected:
            raise CheckpointError(
                f"{info.file}: expert tensor '{key}' has shape {_format_shape(info.shape)}, expected "
                f"{_format_shape(expected)} (n={self.num_experts}, p={self.expert_dim}, d={self.hidden_size} "
                "from config.json)"
            )
        return info

    def _validate(self) -> None:
        first = self.moe_layers[0]
        self.has_bias = self._tensor_keys(first, "gate", bias=True)[0] in self.shards
        for layer in self.moe_layers:
            for family in FAMILIES:
                for bias in (False, True) if self.has_bias else (False,):
                    expected = self._expected_shapes(family, bias)
                    for key in self._tensor_keys(layer, family, bias=bias):
                        self._check_key(key, layer, expected)
        gate_key = self._tensor_keys(first, "gate")[0]
        self.dtype = FLOAT_DTYPES[self.shards[gate_key].dtype]
        # Expert keys in layers the config calls dense mean the config and the weights disagree.
        moe = set(self.moe_layers)
        for key in self.shards.tensors:
            m = _LAYER_KEY.match(key)
            if m is None or m["prefix"] != self._prefix or m["block"] != self._layout.block:
                continue
            layer = int(m["layer"])
            if layer < self.num_layers and layer not in moe and self._layout.matches_rest(m["rest"]):
                raise CheckpointError(
                    f"{self.path}: config.json makes layer {layer} dense but the checkpoint holds routed "
                    f"expert tensor '{key}'"
                )

    # ------------------------------------------------------------------ reading

    def _handle(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: cannot open safetensors file ({exc})") from exc
            self._handles[file] = handle
        return handle

    def _load(self, key: str, part: str = "", index: tuple[slice, ...] | None = None) -> torch.Tensor:
        info = self.shards[key]
        handle = self._handle(info.file)
        try:
            tensor = handle.get_slice(key)[index] if index is not None else handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor '{key}' ({exc})") from exc
        bad = int(tensor.numel() - torch.isfinite(tensor).sum())
        if bad:
            if self.nonfinite == "error":
                where = f" ({part} part)" if part else ""
                raise CheckpointError(
                    f"{info.file}: tensor '{key}'{where} holds {bad} non-finite value(s) (NaN or Inf); open "
                    "with nonfinite='count' to count them and go on"
                )
            self._nonfinite[(key, part)] = bad
        return tensor

    @property
    def nonfinite_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (key, _part), count in self._nonfinite.items():
            out[key] = out.get(key, 0) + count
        return out

    def _check_request(self, family: str, layer: int) -> None:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} holds no routed experts; MoE layers: {self.moe_layers}")

    def _fused_part(self, key: str, family: str, *, bias: bool) -> torch.Tensor:
        """Gate or up out of a fused gate_up tensor (weight or bias), or the whole down tensor."""
        lay = self._layout
        assert isinstance(lay, FusedLayout)
        if family == "down":
            return self._load(key)
        p = self.expert_dim
        full = (slice(None),) * (1 if bias else 2)
        if lay.interleaved:
            # Strided slices are not supported by safetensors: read all, keep every other column.
            both = self._load(key, part="gate+up")
            return both[..., 0::2] if family == "gate" else both[..., 1::2]
        half = slice(0, p) if family == "gate" else slice(p, 2 * p)
        if lay.transposed or bias:
            return self._load(key, part=family, index=full + (half,))
        return self._load(key, part=family, index=(slice(None), half))

    def read(self, family: str, layer: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The routed experts of one layer and family: gate/up [n, p, d], down [n, d, p], as ``dtype``."""
        self._check_request(family, layer)
        n, p, d = self.num_experts, self.expert_dim, self.hidden_size
        if isinstance(self._layout, PerExpertLayout):
            shape = (n, d, p) if family == "down" else (n, p, d)
            out = torch.empty(shape, dtype=dtype)
            for e, key in enumerate(self._tensor_keys(layer, family)):
                out[e].copy_(self._load(key))
            return out
        (key,) = self._tensor_keys(layer, family)
        t = self._fused_part(key, family, bias=False)
        if self._layout.transposed:
            t = t.transpose(1, 2)
        return t.to(dtype).contiguous()

    def read_bias(self, family: str, layer: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Expert biases of one layer: gate/up [n, p], down [n, d]; None when the checkpoint has none."""
        self._check_request(family, layer)
        if not self.has_bias:
            return None
        keys = self._tensor_keys(layer, family, bias=True)
        if isinstance(self._layout, PerExpertLayout):
            return torch.stack([self._load(key) for key in keys]).to(dtype)
        return self._fused_part(keys[0], family, bias=True).to(dtype).contiguous()

    def read_layer(
        self, layer: int, dtype: torch.dtype = torch.float32, families: Sequence[str] = FAMILIES
    ) -> dict[str, torch.Tensor]:
        """``{family: read(family, layer, dtype)}`` for the families asked for."""
        return {family: self.read(family, layer, dtype) for family in families}

    def iter_layers(
        self, family: str, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(layer, read(family, layer))`` for every MoE layer in order, one layer in memory at a time."""
        for layer in self.moe_layers:
            yield layer, self.read(family, layer, dtype)

    def expert_keys(self, layer: int, *, bias: bool = False) -> dict[str, list[str]]:
        """The tensor keys that hold each family of one layer (n keys per family, or one fused key)."""
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} holds no routed experts; MoE layers: {self.moe_layers}")
        if bias and not self.has_bias:
            return {}
        return {family: self._tensor_keys(layer, family, bias=bias) for family in FAMILIES}

    # ------------------------------------------------------------------ sizes

    def _routed_keys(self) -> set[str]:
        keys: set[str] = set()
        for layer in self.moe_layers:
            for bias in (False, True) if self.has_bias else (False,):
                for family_keys in self.expert_keys(layer, bias=bias).values():
                    keys.update(family_keys)
        return keys

    def num_parameters(self) -> tuple[int, int]:
        """(parameters stored in the checkpoint, parameters of the routed experts), from headers only."""
        routed = sum(self.shards[key].numel for key in self._routed_keys())
        return self.shards.num_parameters(), routed

    def num_gate_up_parameters(self) -> int:
        """Parameters of the routed experts' gate and up weights (biases excluded): what GloBE compresses."""
        return 2 * len(self.moe_layers) * self.num_experts * self.expert_dim * self.hidden_size

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Drop the cached shard handles (reading again reopens them)."""
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.path)!r}, arch={self.arch!r}, layout={self.layout!r}, "
            f"moe_layers={len(self.moe_layers)}/{self.num_layers}, n={self.num_experts}, "
            f"p={self.expert_dim}, d={self.hidden_size}, dtype={self.dtype}, bias={self.has_bias})"
        )


def open_checkpoint(path: str | Path, *, nonfinite: Nonfinite = "error") -> Checkpoint:
    """Open a Hugging Face MoE checkpoint folder for lazy expert reads.

    ``nonfinite="error"`` (default) raises :class:`~globe.errors.CheckpointError` naming the key and the count
    when a tensor read holds NaN or Inf; ``"count"`` records the counts in ``Checkpoint.nonfinite_counts`` and
    returns the values as they are.
    """
    return Checkpoint(path, nonfinite=nonfinite)
