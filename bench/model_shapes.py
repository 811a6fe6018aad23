"""Shapes of real MoE models, for the README size table and the benchmarks (no download needed).

Run ``PYTHONPATH=python:. python bench/model_shapes.py`` to print the size table of the README.
"""

from __future__ import annotations

from globe.inference.sizes import ModelShape, render_size_table

__all__ = ["MODEL_SHAPES", "BENCH_SHAPES"]

#: Published configurations (config.json of each hub id): routed experts n, hidden size d, expert width p
#: (moe_intermediate_size, or intermediate_size where experts use it), experts per token, MoE layers.
MODEL_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape(
            "Qwen3-30B-A3B",
            num_experts=128,
            hidden_size=2048,
            expert_dim=768,
            top_k=8,
            moe_layers=48,
            num_layers=48,
            model_type="qwen3_moe",
            hub_id="Qwen/Qwen3-30B-A3B",
        ),
        ModelShape(
            # first_k_dense_replace = 3 of 61 layers are dense
            "DeepSeek-V3",
            num_experts=256,
            hidden_size=7168,
            expert_dim=2048,
            top_k=8,
            moe_layers=58,
            num_layers=61,
            shared_experts=1,
            model_type="deepseek_v3",
            hub_id="deepseek-ai/DeepSeek-V3",
        ),
        ModelShape(
            "Mixtral-8x7B",
            num_experts=8,
            hidden_size=4096,
            expert_dim=14336,
            top_k=2,
            moe_layers=32,
            num_layers=32,
            model_type="mixtral",
            hub_id="mistralai/Mixtral-8x7B-v0.1",
        ),
        ModelShape(
            "OLMoE-1B-7B",
            num_experts=64,
            hidden_size=2048,
            expert_dim=1024,
            top_k=8,
            moe_layers=16,
            num_layers=16,
            model_type="olmoe",
            hub_id="allenai/OLMoE-1B-7B-0924",
        ),
    )
}

#: Scaled-down synthetic shapes that keep a real model's proportions, for benchmarks on small machines.
BENCH_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        # Qwen3-30B-A3B proportions (p = 3d/8, top-8 of 128 -> top-4 of 32), CPU-sized
        ModelShape(
            "qwen3-small",
            num_experts=32,
            hidden_size=256,
            expert_dim=96,
            top_k=4,
            moe_layers=4,
            num_layers=4,
            model_type="qwen3_moe",
        ),
        # the same proportions, large enough for a GPU to be busy
        ModelShape(
            "qwen3-medium",
            num_experts=128,
            hidden_size=1024,
            expert_dim=384,
            top_k=8,
            moe_layers=8,
            num_layers=8,
            model_type="qwen3_moe",
        ),
    )
}


if __name__ == "__main__":
    print(render_size_table(MODEL_SHAPES.values()))
