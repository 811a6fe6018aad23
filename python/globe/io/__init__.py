"""Read the routed experts of Hugging Face Mixture-of-Experts checkpoints, lazily and layer by layer.

    ckpt = open_checkpoint("path/to/Qwen3-30B-A3B")
    for layer in ckpt.moe_layers:
        gate = ckpt.read("gate", layer)   # [n, p, d], nn.Linear orientation, float32

Supports the per-expert and fused key layouts of Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, Mixtral and
gpt-oss (see :mod:`globe.io.archs`), sharded or not, stored as bf16, fp16 or fp32.
"""

from globe.io.archs import FAMILIES, ArchSpec, FusedLayout, PerExpertLayout, register, supported_archs
from globe.io.checkpoint import Checkpoint, open_checkpoint
from globe.io.inspect import format_inspection, inspect_checkpoint

__all__ = [
    "FAMILIES",
    "ArchSpec",
    "Checkpoint",
    "FusedLayout",
    "PerExpertLayout",
    "format_inspection",
    "inspect_checkpoint",
    "open_checkpoint",
    "register",
    "supported_archs",
]
