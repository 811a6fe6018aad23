"""globe.synthetic: tiny checkpoints of real architectures and planted expert structure."""

from __future__ import annotations

import pytest
import torch
from globe.errors import ConfigError
from globe.io import open_checkpoint
from globe.synthetic import (
    build_tiny_checkpoint,
    build_tiny_model,
    list_supported_archs,
    planted_experts,
    tiny_config,
)
from safetensors.torch import load_file

ALL_ARCHS = {"qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "mixtral", "gpt_oss"}


def test_installed_transformers_provides_every_arch():
    assert set(list_supported_archs()) == ALL_ARCHS


def test_unknown_arch():
    with pytest.raises(ConfigError, match="llama"):
        tiny_config("llama")
    with pytest.raises(ConfigError, match="multiple of 4"):
        tiny_config("olmoe", hidden_size=30)


def test_config_sizes_and_overrides():
    cfg = tiny_config(
        "qwen3_moe", num_layers=3, num_experts=6, hidden_size=32, expert_dim=16, mlp_only_layers=[0]
    )
    assert (cfg.num_hidden_layers, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size) == (
        3,
        6,
        32,
        16,
    )
    assert cfg.mlp_only_layers == [0] and cfg.vocab_size == 128
    ds = tiny_config("deepseek_v3")
    assert ds.first_k_dense_replace == 1 and ds.n_shared_experts == 1 and ds.n_routed_experts == 8


def test_build_is_deterministic(tmp_path):
    a = load_file(str(build_tiny_checkpoint("olmoe", tmp_path / "a", seed=3) / "model.safetensors"))
    b = load_file(str(build_tiny_checkpoint("olmoe", tmp_path / "b", seed=3) / "model.safetensors"))
    c = load_file(str(build_tiny_checkpoint("olmoe", tmp_path / "c", seed=4) / "model.safetensors"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "model.layers.0.mlp.experts.0.gate_proj.weight"
    assert not torch.equal(a[key], c[key])


def test_sharded_build(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe", max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    assert (path / "config.json").is_file()


def test_planted_experts_recipe():
    plant = planted_experts(3, 8, 32, 64, seed=5)
    assert plant.rank == 8 and plant.num_atoms == 4
    for family in ("gate", "up"):
        w, codes = plant.weights[family], plant.codes[family]
        assert w.shape == (3, 8, 32, 64) and w.dtype == torch.float32
        rms = w.pow(2).mean(dim=(-2, -1)).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 0.02), rtol=1e-5, atol=0)
        torch.testing.assert_close(codes.sum(-1), torch.ones(3, 8))
        support = (codes > 0).sum(-1)
        assert support.min() >= 2 and support.max() <= 4 and (codes >= 0).all()
        norms = plant.banks[family].flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(4))
    assert not torch.equal(plant.weights["gate"], plant.weights["up"])
    again = planted_experts(3, 8, 32, 64, seed=5)
    assert torch.equal(again.weights["gate"], plant.weights["gate"])
    with pytest.raises(ConfigError, match="rank"):
        planted_experts(1, 2, 4, 8, rank=9)


def _bank_energy(w, k):
    """Share of the energy of mean-removed experts [..., p, d] that lies in their top-k row directions."""
    rows = w - w.mean(dim=tuple(range(w.dim() - 2)), keepdim=True)
    s = torch.linalg.svdvals(rows.reshape(-1, rows.shape[-1]).double())
    return float(s[:k].pow(2).sum() / s.pow(2).sum())


def test_structured_checkpoint_holds_the_plant_and_its_structure(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe", num_layers=3, structured=True)
    ckpt = open_checkpoint(path)
    plant = planted_experts(3, 8, 32, 64, seed=0)
    random_ckpt = open_checkpoint(tiny_checkpoint("qwen3_moe", num_layers=3))
    k = plant.rank * plant.num_atoms  # 32 of d = 64 row directions
    for family in ("gate", "up"):
        w = torch.stack([ckpt.read(family, layer) for layer in ckpt.moe_layers])
        assert torch.equal(w, plant.weights[family])
        # Shared across experts and layers: the stacked experts of all layers live mostly in the bank's rows.
        assert _bank_energy(w, k) > 0.8
        rand = torch.stack([random_ckpt.read(family, layer) for layer in random_ckpt.moe_layers])
        assert _bank_energy(rand, k) < 0.65
        # Decaying spectrum per expert: the top quarter of singular values holds most of the energy.
        s = torch.linalg.svdvals(w[0, 0].double())
        assert s[: len(s) // 4].pow(2).sum() / s.pow(2).sum() > 0.6
    # Down stays as initialised.
    down = ckpt.read("down", 0)
    assert torch.equal(down, random_ckpt.read("down", 0))


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3", "mixtral"])
def test_structured_weights_land_in_every_layout(arch, tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint(arch, structured=True, max_shard_size="60KB"))
    plant = planted_experts(len(ckpt.moe_layers), 8, 32, 64, seed=0)
    for i, layer in enumerate(ckpt.moe_layers):
        assert torch.equal(ckpt.read("gate", layer), plant.weights["gate"][i])
        assert torch.equal(ckpt.read("up", layer), plant.weights["up"][i])


def test_structured_model_runs_sanely():
    model = build_tiny_model("olmoe", structured=True, dtype=torch.bfloat16)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert torch.isfinite(logits).all() and logits.abs().max() < 50
