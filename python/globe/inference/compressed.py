"""Compressed checkpoints: a model folder without the routed experts' gate/up weights, served by GloBE.

:func:`save_compressed` writes, into one folder (built under a temporary name, then renamed into place)::

    config.json              the model's transformers config plus a "globe" section (format, version, mode,
                             scope, phi, shapes, parameter counts, which tensors were left out)
    generation_config.json   when the model has one
    model.safetensors        every tensor of the model except the routed experts' gate_up_proj: non-expert
                             weights, the dense down projections, expert biases, and the model's
                             non-persistent buffers (rotary tables), listed in the file's metadata
    globe/                   the GloBE artifact (globe.json + factors.safetensors, see globe.artifact)

:func:`load_compressed` builds the model from config.json on the meta device, drops the experts' gate/up
parameters before anything is allocated, materialises the rest on the target device, fills it from
model.safetensors, and patches it with the artifact: the original checkpoint is never needed and the dense
gate/up weights never exist in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from globe.artifact import Artifact, write_json_atomic
from globe.errors import ArtifactError
from globe.inference.archs import find_experts
from globe.inference.patch import MODES, check_compatible, patch_model, patched_mode

__all__ = ["FORMAT", "VERSION", "save_compressed", "load_compressed", "is_compressed"]

FORMAT = "globe-compressed"
VERSION = 1
WEIGHTS = "model.safetensors"
ARTIFACT_DIR = "globe"


def _load_source_model(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto")


def _dropped_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes never written: each experts module's gate_up_proj and its GloBE factors."""
    out = []
    for site in find_experts(model):
        out += [f"{site.name}.gate_up_proj", f"{site.name}.globe."]
    return out


def _tensors_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """(tensors by name, the non-persistent buffers among them, aliases {name: name sharing its storage})."""
    dropped = _dropped_prefixes(model)

    def keep(name: str) -> bool:
        return not any(name == p or (p.endswith(".") and name.startswith(p)) for p in dropped)

    state = {k: v for k, v in model.state_dict().items() if keep(k)}
    persistent = set(model.state_dict())
    buffers = {k: v for k, v in model.named_buffers() if k not in persistent and keep(k)}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple, str] = {}
    for name, t in list(state.items()) + list(buffers.items()):
        if t.device.type == "meta":
            raise ArtifactError(f"save_compressed: tensor {name!r} is on the meta device (not loaded)")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in owners:  # tied weights: safetensors stores a storage once
            aliases[name] = owners[key]
            continue
        owners[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, sorted(buffers), aliases


def save_compressed(
    model_dir_or_model: str | os.PathLike | nn.Module,
    artifact: Artifact | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    mode: str | None = None,
) -> Path:
    """Write a compressed checkpoint folder (see the module docstring); returns its path.

    ``model_dir_or_model``: a checkpoint folder (loaded on CPU in its own dtype) or a loaded model, patched or
    not. ``artifact``: an Artifact or its folder. ``mode``: the serving mode :func:`load_compressed` uses
    unless told otherwise (default: the mode the model is patched in, else "precomposed"). The original gate/up
    weights are never written. ``out_dir`` is replaced only if it is itself a compressed checkpoint (or empty);
    the new folder appears complete or not at all.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    from safetensors.torch import save_file

    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    model = model_dir_or_model
    if not isinstance(model, nn.Module):
        model = _load_source_model(Path(model))
    check_compatible(model, art)
    if mode is None:
        mode = patched_mode(model) or "precomposed"
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not is_compressed(out):
        raise ArtifactError(f"{out}: exists and is not a GloBE compressed checkpoint; refusing to overwrite it")

    tensors, buffers, aliases = _tensors_to_save(model)
    config = model.config.to_dict()
    config.pop("globe", None)
    # the dtype the weights are written in (a model cast after loading no longer matches its config)
    dtype = str(getattr(model, "dtype", torch.float32)).removeprefix("torch.")
    config["dtype"] = dtype
    config["globe"] = {
        "format": FORMAT,
        "version": VERSION,
        "mode": mode,
        "dtype": dtype,
        "artifact": ARTIFACT_DIR,
        "weights": WEIGHTS,
        "scope": art.scope,
        "phi": art.phi,
        "layers": list(art.layers),
        "shape": art.shape,
        "parameters": art.num_parameters(),
        "omitted": "gate_up_proj of every routed-experts module (served by the GloBE factors)",
        "nonpersistent_buffers": buffers,
        "tied": aliases,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "globe": FORMAT})
        art.save(tmp / ARTIFACT_DIR)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        write_json_atomic(tmp / "config.json", config)  # last: a folder with a valid config is complete
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _globe_section(path: Path) -> dict | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    section = config.get("globe") if isinstance(config, dict) else None
    return section if isinstance(section, dict) and section.get("format") == FORMAT else None


def is_compressed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`save_compressed`."""
    return _globe_section(Path(path)) is not None


@torch.no_grad()
def load_compressed(
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    mode: str | None = None,
    *,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A ready, patched ``*ForCausalLM`` from a folder written by :func:`save_compressed`.

    dtype: of the model and the factors (default: the dtype it was saved in); mode: "precomposed" or "bank"
    (default: the mode recorded at save time); device: where it is materialised. Raises ArtifactError if the
    folder is not a compressed checkpoint, is of another version, or lacks tensors."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    root = Path(out_dir)
    section = _globe_section(root)
    if section is None:
        raise ArtifactError(f"{root}: no config.json with a '{FORMAT}' globe section; not a compressed checkpoint")
    if section.get("version") != VERSION:
        raise ArtifactError(
            f"{root}: compressed checkpoint version {section.get('version')!r}, this GloBE reads {VERSION}"
        )
    mode = mode or section.get("mode", "precomposed")
    weights = root / section.get("weights", WEIGHTS)
    if not weights.is_file():
        raise ArtifactError(f"{weights}: missing weights file of the compressed checkpoint")
    artifact = Artifact.load(root / section.get("artifact", ARTIFACT_DIR))
    device = torch.device(device)

    config = AutoConfig.from_pretrained(root)
    build_dtype = dtype or section.get("dtype") or getattr(config, "dtype", None) or torch.float32
    if isinstance(build_dtype, str):
        build_dtype = getattr(torch, build_dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=build_dtype)
    for site in find_experts(model):
        site.module._parameters.pop("gate_up_proj", None)  # never allocated
    model.to_empty(device=device)

    buffers = set(section.get("nonpersistent_buffers", []))
    loaded: set[str] = set()
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        for name in f.keys():
            module_name, _, leaf = name.rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise ArtifactError(f"{weights}: tensor {name!r} has no place in {type(model).__name__}") from None
            target = module._parameters.get(leaf)
            if target is None:
                target = module._buffers.get(leaf)
            if target is None:
                raise ArtifactError(f"{weights}: tensor {name!r} has no place in {type(model).__name__}")
            value = f.get_tensor(name)
            if tuple(value.shape) != tuple(target.shape):
                raise ArtifactError(
                    f"{weights}: {name!r} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
                )
            # non-persistent buffers (rotary tables) keep the dtype they were computed in
            if name in buffers:
                module._buffers[leaf] = value.to(device)
            else:
                target.copy_(value)
            loaded.add(name)

    tied = section.get("tied", {})
    if tied:
        model.tie_weights()
    for alias, source in tied.items():
        a, s = model.get_parameter_or_buffer(alias), model.get_parameter_or_buffer(source)
        if a.data_ptr() != s.data_ptr():
            a.copy_(s)
        loaded.add(alias)
    missing = sorted(set(model.state_dict()) - loaded)
    if missing:
        raise ArtifactError(f"{weights}: missing {len(missing)} tensors the model needs, e.g. {missing[:3]}")

    patch_model(model, artifact, mode=mode, dtype=dtype)
    if (root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(root)
    return model.eval()
