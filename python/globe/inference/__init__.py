"""Serve compressed experts: patch a loaded model, report its memory, save and load compressed folders.

Usage::

    model = AutoModelForCausalLM.from_pretrained(path)
    patch_model(model, load_artifact(artifact_dir), mode="bank")  # gate/up served by GloBE factors
    memory_report(model)["gate_up"]  # bytes of expert gate/up held now
    save_compressed(path, artifact_dir, out_dir)  # never writes the original gate/up weights
    model = load_compressed(out_dir, dtype=torch.bfloat16)  # ready and patched; generate() works
"""

from globe.inference.compressed import is_compressed, load_compressed, save_compressed
from globe.inference.memory import format_memory_report, memory_report
from globe.inference.patch import (
    IMPLEMENTATION,
    MODES,
    GlobeFactors,
    apply_reconstruction,
    check_compatible,
    globe_experts_forward,
    is_patched,
    patch_model,
    patched_mode,
    register_implementation,
    unpatch_model,
)

__all__ = [
    "IMPLEMENTATION",
    "MODES",
    "GlobeFactors",
    "apply_reconstruction",
    "check_compatible",
    "format_memory_report",
    "globe_experts_forward",
    "is_compressed",
    "is_patched",
    "load_compressed",
    "memory_report",
    "patch_model",
    "patched_mode",
    "register_implementation",
    "save_compressed",
    "unpatch_model",
]
