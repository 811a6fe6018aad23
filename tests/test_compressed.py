"""Compressed checkpoints: written without the original gate/up weights, loaded without the original model.

The loaded model must match the float64 reconstruction-dense reference of test_inference (relative error of
the logits <= 1e-5 in fp32) and generate the same greedy tokens as the fp32 reconstruction-dense model.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from globe.artifact import Artifact
from globe.errors import ArtifactError
from globe.inference import (
    is_compressed,
    is_patched,
    load_compressed,
    memory_report,
    patch_model,
    save_compressed,
)
from globe.inference.archs import find_experts
from globe.synthetic import build_tiny_model
from safetensors import safe_open
from test_inference import FP32_RTOL, logits, random_artifact, reference_model, rel_err, token_ids

# keys that would hold original gate/up weights, in every layout transformers or the original releases use
_GATE_UP_SUFFIXES = ("experts.gate_up_proj", "gate_proj.weight", "up_proj.weight", "w1.weight", "w3.weight")


def _saved_keys(folder) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def _routed_gate_up_keys(keys: list[str]) -> list[str]:
    return [k for k in keys if ".experts." in k and "shared" not in k and k.endswith(_GATE_UP_SUFFIXES)]


@pytest.mark.parametrize("arch,mode", [("qwen3_moe", "bank"), ("gpt_oss", "precomposed"), ("deepseek_v3", "bank")])
def test_roundtrip_from_checkpoint_folder(arch, mode, tiny_checkpoint, copy_checkpoint, tmp_path):
    src = copy_checkpoint(tiny_checkpoint(arch))
    art = random_artifact(build_tiny_model(arch), seed=41)
    out = save_compressed(src, art, tmp_path / "compressed", mode=mode)
    shutil.rmtree(src)  # loading must not need the original checkpoint

    keys = _saved_keys(out)
    assert keys and not _routed_gate_up_keys(keys)
    assert any(k.endswith("experts.down_proj") for k in keys)
    config = json.loads((out / "config.json").read_text())
    assert config["globe"]["format"] == "globe-compressed" and config["globe"]["mode"] == mode
    assert config["globe"]["shape"] == art.shape and config["model_type"] == arch
    assert is_compressed(out) and Artifact.load(out / "globe").shape == art.shape
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    model = load_compressed(out)
    assert is_patched(model) and memory_report(model)["mode"] == mode
    for site in find_experts(model):
        assert "gate_up_proj" not in site.module._parameters
    ids = token_ids(seed=21)
    assert rel_err(logits(model, ids), logits(reference_model(arch, art), ids)) <= FP32_RTOL


def test_save_from_patched_model_and_generate(tmp_path):
    arch = "mixtral"
    model = build_tiny_model(arch)
    art = random_artifact(model, seed=43, scope="layer")
    patch_model(model, art, mode="bank")
    out = save_compressed(model, art, tmp_path / "c")
    assert json.loads((out / "config.json").read_text())["globe"]["mode"] == "bank"  # the mode it was patched in
    keys = _saved_keys(out)
    assert not _routed_gate_up_keys(keys) and not any(".globe." in k for k in keys)
    n, p, d = 8, 32, 64
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not any(tuple(f.get_slice(k).get_shape()) == (n, 2 * p, d) for k in keys)

    loaded = load_compressed(out, mode="precomposed")
    ref = reference_model(arch, art, torch.float32)
    prompt = token_ids(batch=1, length=4, seed=23)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded.generate(prompt, **kw), ref.generate(prompt, **kw))


def test_load_bf16_and_bytes(tmp_path):
    model = build_tiny_model("olmoe")
    art = random_artifact(model, r=8, m=4, k=2, seed=47)
    out = save_compressed(model, art, tmp_path / "c", mode="bank")
    loaded = load_compressed(out, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    report = memory_report(loaded)
    params = art.num_parameters()
    assert report["mode"] == "bank"
    assert report["gate_up"] == 2 * (params["banks"] + params["adapters"] + params["means"]) + 4 * params["codes"]
    assert report["gate_up"] < memory_report(model)["gate_up"] / 2  # dense fp32 -> factors bf16
    with torch.no_grad():
        out_ids = loaded.generate(token_ids(batch=1, length=3), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out_ids.shape == (1, 6)


def test_saved_dtype_and_tied_weights(tmp_path):
    """A model cast after construction (config still says float32) loads back in the dtype it was saved in;
    tied embeddings are written once and tied again on load."""
    model = build_tiny_model("deepseek_v2", dtype=torch.bfloat16, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = save_compressed(model, random_artifact(model, seed=59), tmp_path / "c")
    assert "lm_head.weight" not in _saved_keys(out)
    loaded = load_compressed(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert find_experts(loaded)[0].module.globe.adapter_up.dtype == torch.bfloat16


def test_overwrite_rules_and_bad_folders(tmp_path):
    model = build_tiny_model("qwen2_moe")
    art = random_artifact(model, seed=53)
    out = save_compressed(model, art, tmp_path / "c")
    save_compressed(model, art, out, mode="bank")  # replacing a compressed folder is allowed
    assert json.loads((out / "config.json").read_text())["globe"]["mode"] == "bank"

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError):
        save_compressed(model, art, other)
    assert (other / "notes.txt").read_text() == "keep me"

    with pytest.raises(ArtifactError):
        load_compressed(other)
    (out / "model.safetensors").unlink()
    with pytest.raises(ArtifactError):
        load_compressed(out)
    with pytest.raises(ArtifactError):  # artifact of another model: refused before writing
        save_compressed(build_tiny_model("qwen2_moe", num_experts=4), art, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_trainer_artifact_end_to_end(tiny_checkpoint, tmp_path):
    """A checkpoint compressed by the trainer API loads, matches its reconstruction and holds fewer bytes."""
    import globe
    from globe.inference import apply_reconstruction

    src = tiny_checkpoint("qwen3_moe", structured=True)
    art = globe.compress(src, tmp_path / "artifact", globe.GlobeConfig(steps=2))
    out = save_compressed(src, tmp_path / "artifact", tmp_path / "c", mode="bank")
    model = load_compressed(out)

    from transformers import AutoModelForCausalLM

    ref = apply_reconstruction(AutoModelForCausalLM.from_pretrained(src), art)
    ids = token_ids(seed=25)
    assert rel_err(logits(model, ids), logits(ref, ids)) <= FP32_RTOL
    # bank-mode parameters in fp32, plus the -1 padding slots of the codes (a value and an index each)
    pads = sum(int((t < 0).sum()) for k, t in art.tensors.items() if k.endswith(".indices"))
    held = memory_report(model)["gate_up"]
    assert held == 4 * art.num_parameters()["bank_mode"] + 8 * pads < memory_report(ref)["gate_up"]
    with torch.no_grad():
        assert model.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 10)
