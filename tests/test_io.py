"""globe.io: reading routed experts from Hugging Face MoE checkpoints (tiny ones built with transformers)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from globe.errors import CheckpointError, GlobeError
from globe.io import FAMILIES, format_inspection, inspect_checkpoint, open_checkpoint, supported_archs
from globe.synthetic import list_supported_archs
from safetensors.torch import load_file, save_file

ARCHS = list_supported_archs()
N, D, P = 8, 64, 32  # defaults of build_tiny_checkpoint; p != d and 2p != d so orientation mistakes show
SHARD = "60KB"


def _expected_moe_layers(arch, num_layers=2):
    first = 1 if arch.startswith("deepseek") else 0  # one dense first layer in the tiny DeepSeek models
    return list(range(first, num_layers))


def _load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


def _module_experts(model, layer):
    """The model's own routed experts of one layer in nn.Linear orientation, from its experts module."""
    experts = model.model.layers[layer].mlp.experts
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    out = {}
    if getattr(experts, "is_transposed", False):  # gpt-oss: [n, d, 2p] interleaved, down [n, p, d]
        assert not experts.is_concatenated
        out["gate"] = gate_up[..., 0::2].transpose(1, 2)
        out["up"] = gate_up[..., 1::2].transpose(1, 2)
        out["down"] = down.transpose(1, 2)
        bias = experts.gate_up_proj_bias.detach()
        out["bias"] = {"gate": bias[:, 0::2], "up": bias[:, 1::2], "down": experts.down_proj_bias.detach()}
    else:  # [n, 2p, d] gate rows then up rows, down [n, d, p]
        p = gate_up.shape[1] // 2
        out["gate"], out["up"], out["down"] = gate_up[:, :p], gate_up[:, p:], down
        out["bias"] = None
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_read_returns_the_models_own_experts(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch, max_shard_size=SHARD)
    ckpt = open_checkpoint(path)
    assert len(ckpt.shards.files) > 1, "the checkpoint should be sharded"
    assert ckpt.arch == arch
    assert ckpt.moe_layers == _expected_moe_layers(arch)
    assert (ckpt.num_experts, ckpt.expert_dim, ckpt.hidden_size) == (N, P, D)
    assert ckpt.dtype == torch.float32
    assert ckpt.has_bias == (arch == "gpt_oss")
    assert ckpt.layout == ("fused" if arch == "gpt_oss" else "per-expert")
    assert ckpt.config["model_type"] == arch
    model = _load_model(path)
    for layer in ckpt.moe_layers:
        own = _module_experts(model, layer)
        got = ckpt.read_layer(layer)
        assert set(got) == set(FAMILIES)
        for family in FAMILIES:
            assert got[family].dtype == torch.float32
            assert got[family].shape == ((N, D, P) if family == "down" else (N, P, D))
            assert torch.equal(got[family], own[family]), (layer, family)
            bias = ckpt.read_bias(family, layer)
            if own["bias"] is None:
                assert bias is None
            else:
                assert torch.equal(bias, own["bias"][family]), (layer, family)
    # Dense layers hold no routed experts.
    for layer in set(range(ckpt.num_layers)) - set(ckpt.moe_layers):
        with pytest.raises(ValueError, match="no routed experts"):
            ckpt.read("gate", layer)


def _expert_output(experts, x, e):
    """Output of expert e alone (routing weight 1) through the model's own experts module."""
    index = torch.full((x.shape[0], 1), e, dtype=torch.long)
    return experts(x, index, torch.ones(x.shape[0], 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_read_weights_compute_the_same_expert_function(arch, tiny_checkpoint):
    """Orientation check independent of layout: our [p, d] gate/up and [d, p] down reproduce each expert."""
    path = tiny_checkpoint(arch, max_shard_size=SHARD)
    ckpt = open_checkpoint(path)
    model = _load_model(path)
    layer = ckpt.moe_layers[-1]
    experts = model.model.layers[layer].mlp.experts
    w = ckpt.read_layer(layer)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    for e in (0, N - 1):
        g, u = x @ w["gate"][e].T, x @ w["up"][e].T
        if arch == "gpt_oss":
            b = {f: ckpt.read_bias(f, layer)[e] for f in FAMILIES}
            g, u = (
                (g + b["gate"]).clamp(max=experts.limit),
                (u + b["up"]).clamp(-experts.limit, experts.limit),
            )
            y = ((u + 1) * g * torch.sigmoid(g * experts.alpha)) @ w["down"][e].T + b["down"]
        else:
            y = (experts.act_fn(g) * u) @ w["down"][e].T
        with torch.no_grad():
            ref = _expert_output(experts, x, e)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_fused_layout_written_by_transformers(arch, tiny_checkpoint):
    per_expert = open_checkpoint(tiny_checkpoint(arch))
    fused = open_checkpoint(tiny_checkpoint(arch, original_format=False))
    assert per_expert.layout == "per-expert" and fused.layout == "fused"
    layer = fused.moe_layers[0]
    assert fused.expert_keys(layer)["gate"] == [f"model.layers.{layer}.mlp.experts.gate_up_proj"]
    assert per_expert.num_parameters() == fused.num_parameters()
    for layer in fused.moe_layers:
        for family in FAMILIES:
            assert torch.equal(fused.read(family, layer), per_expert.read(family, layer))


def _write_checkpoint(folder, config, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _moe_config(model_type, **extra):
    base = {"model_type": model_type, "hidden_size": 12, "num_hidden_layers": 1}
    return {**base, **extra}


def test_hand_written_fused_layout(tmp_path):
    n, p, d = 3, 5, 12
    gen = torch.Generator().manual_seed(0)
    gate, up, down = (
        torch.randn(n, p, d, generator=gen),
        torch.randn(n, p, d, generator=gen),
        torch.randn(n, d, p),
    )
    folder = _write_checkpoint(
        tmp_path / "fused",
        _moe_config("qwen3_moe", num_experts=n, moe_intermediate_size=p),
        {
            "model.layers.0.mlp.experts.gate_up_proj": torch.cat([gate, up], dim=1),
            "model.layers.0.mlp.experts.down_proj": down,
            "model.embed_tokens.weight": torch.zeros(7, d),
        },
    )
    ckpt = open_checkpoint(folder)
    assert ckpt.layout == "fused" and not ckpt.has_bias
    assert torch.equal(ckpt.read("gate", 0), gate)
    assert torch.equal(ckpt.read("up", 0), up)
    assert torch.equal(ckpt.read("down", 0), down)
    assert ckpt.num_parameters() == (3 * n * p * d + 7 * d, 3 * n * p * d)


def test_hand_written_gpt_oss_layout(tmp_path):
    """gpt-oss on disk: gate_up [n, d, 2p] with gate/up interleaved on the last axis, down [n, p, d]."""
    n, p, d = 2, 3, 12
    gate = torch.arange(n * p * d, dtype=torch.float32).reshape(n, p, d)
    up = -gate - 0.5
    down = torch.randn(n, d, p)
    gate_up = torch.empty(n, d, 2 * p)
    gate_up[..., 0::2], gate_up[..., 1::2] = gate.transpose(1, 2), up.transpose(1, 2)
    gate_b, up_b = torch.arange(n * p, dtype=torch.float32).reshape(n, p), torch.full((n, p), 7.0)
    gate_up_b = torch.stack([gate_b, up_b], dim=-1).reshape(n, 2 * p)
    folder = _write_checkpoint(
        tmp_path / "gpt_oss",
        _moe_config("gpt_oss", num_local_experts=n, intermediate_size=p),
        {
            "model.layers.0.mlp.experts.gate_up_proj": gate_up,
            "model.layers.0.mlp.experts.gate_up_proj_bias": gate_up_b,
            "model.layers.0.mlp.experts.down_proj": down.transpose(1, 2).contiguous(),
            "model.layers.0.mlp.experts.down_proj_bias": torch.ones(n, d),
        },
    )
    ckpt = open_checkpoint(folder)
    assert ckpt.has_bias
    assert torch.equal(ckpt.read("gate", 0), gate)
    assert torch.equal(ckpt.read("up", 0), up)
    assert torch.equal(ckpt.read("down", 0), down)
    assert torch.equal(ckpt.read_bias("gate", 0), gate_b)
    assert torch.equal(ckpt.read_bias("up", 0), up_b)
    assert torch.equal(ckpt.read_bias("down", 0), torch.ones(n, d))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_on_disk_dtypes(arch, dtype, tiny_checkpoint):
    path = tiny_checkpoint(arch, dtype=dtype, num_layers=1)
    ckpt = open_checkpoint(path)
    assert ckpt.dtype == dtype
    own = _module_experts(_load_model(path), 0)
    for family in FAMILIES:
        native = ckpt.read(family, 0, dtype=dtype)
        assert native.dtype == dtype and torch.equal(native, own[family].to(dtype))
        assert torch.equal(ckpt.read(family, 0), own[family].float())  # upcast is exact


@pytest.mark.parametrize(
    ("arch", "num_layers", "overrides", "moe_layers"),
    [
        ("qwen3_moe", 3, {"mlp_only_layers": [0]}, [1, 2]),
        ("qwen2_moe", 4, {"decoder_sparse_step": 2}, [1, 3]),
        ("deepseek_v2", 3, {}, [1, 2]),
    ],
)
def test_dense_layers_and_shared_experts_are_skipped(
    arch, num_layers, overrides, moe_layers, tiny_checkpoint
):
    ckpt = open_checkpoint(tiny_checkpoint(arch, num_layers=num_layers, **overrides))
    assert ckpt.moe_layers == moe_layers
    total, routed = ckpt.num_parameters()
    assert routed == len(moe_layers) * N * 3 * P * D  # shared experts and dense MLPs excluded
    assert ckpt.num_gate_up_parameters() == len(moe_layers) * N * 2 * P * D
    model = _load_model(ckpt.path)
    assert total == sum(t.numel() for t in model.state_dict().values())
    keys = ckpt.expert_keys(moe_layers[0])
    assert len(keys["up"]) == N and all(".mlp.experts." in k for k in keys["up"])


def test_num_parameters_counts_biases(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint("gpt_oss", max_shard_size=SHARD))
    total, routed = ckpt.num_parameters()
    assert routed == 2 * N * (3 * P * D + 2 * P + D)
    assert 0 < routed < total


def test_inspect_checkpoint(tiny_checkpoint):
    info = inspect_checkpoint(tiny_checkpoint("deepseek_v3", max_shard_size=SHARD))
    assert info["arch"] == "deepseek_v3"
    assert info["moe_layers"] == [1] and info["num_layers"] == 2
    assert (info["num_experts"], info["expert_dim"], info["hidden_size"]) == (N, P, D)
    assert info["dtype"] == "float32" and info["has_bias"] is False and info["num_shards"] > 1
    assert info["expert_params"] == N * 3 * P * D
    assert math.isclose(info["expert_share"], info["expert_params"] / info["total_params"])
    assert math.isclose(info["gate_up_share"], 2 / 3 * info["expert_share"])
    text = format_inspection(info)
    for piece in ("deepseek_v3", "per-expert", "1 of 2", "p=32 x d=64", "float32", "%"):
        assert piece in text
    assert re.search(r"expert biases\s+no", text)


def test_checkpoint_handles_are_cached_and_closed(tiny_checkpoint):
    with open_checkpoint(tiny_checkpoint("mixtral", max_shard_size=SHARD)) as ckpt:
        ckpt.read("gate", 0)
        ckpt.read("gate", 1)
        assert 0 < len(ckpt._handles) <= len(ckpt.shards.files)
    assert not ckpt._handles
    assert ckpt.read("up", 0).shape == (N, P, D)  # reopens on demand


# ---------------------------------------------------------------------------- bad input


def _rewrite(path, edit):
    """Load model.safetensors of a single-file checkpoint, let ``edit`` change the dict, save it back."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_errors_share_one_base_class():
    assert issubclass(CheckpointError, GlobeError)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        open_checkpoint(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json") as info:
        open_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        open_checkpoint(tmp_path / "file")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_dense_model(tmp_path, model_type):
    _write_checkpoint(
        tmp_path, {"model_type": model_type, "hidden_size": 8, "intermediate_size": 16}, {"w": torch.zeros(2)}
    )
    with pytest.raises(CheckpointError, match="no routed experts") as info:
        open_checkpoint(tmp_path)
    assert model_type in str(info.value)


def test_moe_arch_with_zero_experts(tmp_path):
    _write_checkpoint(tmp_path, _moe_config("qwen2_moe", num_experts=0, moe_intermediate_size=4), {})
    with pytest.raises(CheckpointError, match="no routed experts"):
        open_checkpoint(tmp_path)


def test_unsupported_arch_lists_supported(tmp_path):
    _write_checkpoint(tmp_path, _moe_config("jamba", num_experts=16), {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unsupported MoE architecture model_type 'jamba'") as info:
        open_checkpoint(tmp_path)
    for arch in supported_archs():
        assert arch in str(info.value)


def test_missing_shard(tiny_checkpoint, copy_checkpoint):
    path = copy_checkpoint(tiny_checkpoint("qwen3_moe", max_shard_size=SHARD))
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        open_checkpoint(path)
    assert shard.name in str(info.value)


def test_no_safetensors_files(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(_moe_config("olmoe", num_experts=2, intermediate_size=4))
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("cut", [4, 40, 1000])
def test_truncated_file(tiny_checkpoint, copy_checkpoint, cut):
    path = copy_checkpoint(tiny_checkpoint("olmoe", max_shard_size=SHARD))
    shard = sorted(path.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:cut] if cut < 100 else data[:-cut])
    with pytest.raises(CheckpointError, match="truncated") as info:
        open_checkpoint(path)
    assert shard.name in str(info.value)


def test_corrupt_header(tiny_checkpoint, copy_checkpoint):
    path = copy_checkpoint(tiny_checkpoint("olmoe"))
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:16] = b"\xff\xfe garb"
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as info:
        open_checkpoint(path)
    assert "model.safetensors" in str(info.value)
    file.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(path)


def test_inconsistent_expert_shape(tiny_checkpoint, copy_checkpoint):
    path = copy_checkpoint(tiny_checkpoint("qwen3_moe"))
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    _rewrite(path, lambda t: t.__setitem__(key, torch.zeros(P + 1, D)))
    with pytest.raises(CheckpointError, match="expected") as info:
        open_checkpoint(path)
    msg = str(info.value)
    assert key in msg and f"[{P + 1}, {D}]" in msg and f"[{P}, {D}]" in msg


def test_missing_expert_key(tiny_checkpoint, copy_checkpoint):
    path = copy_checkpoint(tiny_checkpoint("mixtral"))
    key = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    _rewrite(path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="layer 1") as info:
        open_checkpoint(path)
    assert key in str(info.value)


def test_config_promises_experts_the_keys_lack(tiny_checkpoint, copy_checkpoint):
    path = copy_checkpoint(tiny_checkpoint("deepseek_v2"))
    _edit_config(path, first_k_dense_replace=0)  # layer 0 is dense on disk
    with pytest.raises(CheckpointError, match="layer 0") as info:
        open_checkpoint(path)
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in str(info.value)


def test_config_dense_layer_holding_experts(tiny_checkpoint, copy_checkpoint):
    path = copy_checkpoint(tiny_checkpoint("qwen3_moe"))
    _edit_config(path, mlp_only_layers=[0])
    with pytest.raises(CheckpointError, match="makes layer 0 dense") as info:
        open_checkpoint(path)
    assert "model.layers.0.mlp.experts." in str(info.value)


def test_no_expert_keys_at_all(tmp_path):
    _write_checkpoint(
        tmp_path, _moe_config("mixtral", num_local_experts=2, intermediate_size=4), {"w": torch.zeros(1)}
    )
    with pytest.raises(CheckpointError, match="expert keys are absent") as info:
        open_checkpoint(tmp_path)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in str(info.value)


def test_quantized_experts_are_refused(tmp_path):
    _write_checkpoint(
        tmp_path,
        _moe_config("qwen3_moe", num_experts=1, moe_intermediate_size=4),
        {
            "model.layers.0.mlp.experts.0.gate_proj.weight": torch.zeros(4, 12, dtype=torch.float8_e4m3fn),
            "model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(4, 12, dtype=torch.float8_e4m3fn),
            "model.layers.0.mlp.experts.0.down_proj.weight": torch.zeros(12, 4, dtype=torch.float8_e4m3fn),
        },
    )
    with pytest.raises(CheckpointError, match="F8_E4M3") as info:
        open_checkpoint(tmp_path)
    assert "gate_proj.weight" in str(info.value)


def test_nonfinite_values(tiny_checkpoint, copy_checkpoint):
    path = copy_checkpoint(tiny_checkpoint("qwen2_moe"))
    key = "model.layers.0.mlp.experts.2.gate_proj.weight"

    def poison(tensors):
        tensors[key][0, :3] = float("nan")
        tensors[key][1, 0] = float("inf")

    _rewrite(path, poison)
    ckpt = open_checkpoint(path)  # opening reads headers only
    ckpt.read("up", 0)
    with pytest.raises(CheckpointError, match="4 non-finite") as info:
        ckpt.read("gate", 0)
    assert key in str(info.value)

    counting = open_checkpoint(path, nonfinite="count")
    gate = counting.read("gate", 0)
    assert counting.nonfinite_counts == {key: 4}
    assert torch.isnan(gate[2, 0, :3]).all() and torch.isinf(gate[2, 1, 0])
    counting.read("gate", 0)  # reading again does not double the count
    assert counting.nonfinite_counts == {key: 4}
    with pytest.raises(ValueError, match="nonfinite"):
        open_checkpoint(path, nonfinite="ignore")


def test_nonfinite_in_fused_tensor(tiny_checkpoint, copy_checkpoint):
    path = copy_checkpoint(tiny_checkpoint("gpt_oss"))
    key = "model.layers.1.mlp.experts.gate_up_proj"
    _rewrite(path, lambda t: t[key].__setitem__((0, 0, 0), float("inf")))
    with pytest.raises(CheckpointError, match=key):
        open_checkpoint(path).read("up", 1)
    counting = open_checkpoint(path, nonfinite="count")
    counting.read("up", 1)
    assert counting.nonfinite_counts == {key: 1}


def test_bad_requests(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint("olmoe"))
    with pytest.raises(ValueError, match="family"):
        ckpt.read("gate_up", 0)
    with pytest.raises(ValueError, match="MoE layers"):
        ckpt.read("gate", 7)
