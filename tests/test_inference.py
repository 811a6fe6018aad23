"""The drop-in patch: patched models match their reconstruction-dense twins, in every architecture and mode.

Reference: the same tiny model in float64 whose expert gate/up weights are the float64 dense reconstructions
A_i phi(sum_j alpha_ij B_j) + mean (computed here, independently of the package), run through transformers'
own eager experts loop. Tolerances on the relative Frobenius error of the logits:

* fp32 patched vs float64 reference: 1e-5 (the issue's bound; observed ~2e-7);
* bf16 patched vs float64 reference: 3e-2, and at most 3x the error of the bf16 reconstruction-dense model
  itself (bf16 keeps 8 mantissa bits, 2^-9 ~ 2e-3 per rounding, and errors add over the layers; observed
  ~5e-3 for both).

Each tolerance is shown able to fail: the original (unreconstructed) model is far outside it.
"""

from __future__ import annotations

import functools
import gc
import math
import weakref

import factories
import pytest
import torch
from globe.artifact import Artifact
from globe.errors import ArtifactError
from globe.inference import (
    GlobeFactors,
    apply_reconstruction,
    is_patched,
    memory_report,
    patch_model,
    unpatch_model,
)
from globe.inference.archs import expert_dims, find_experts
from globe.synthetic import build_tiny_model

from globe_kernels import reference

ARCHS = ["qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v2", "deepseek_v3", "mixtral", "gpt_oss"]
MODES = ["precomposed", "bank"]
FP32_RTOL = 1e-5
BF16_RTOL = 3e-2


# --- helpers shared with test_compressed.py -----------------------------------------------------------------


def random_artifact(
    model: torch.nn.Module,
    *,
    r: int = 12,
    m: int = 6,
    k: int = 3,
    scope: str = "global",
    phi: str = "identity",
    mean: bool = True,
    pad: bool = False,
    seed: int = 0,
    families: tuple[str, ...] = ("gate", "up"),
    n: int | None = None,
    p: int | None = None,
    d: int | None = None,
    layers: list[int] | None = None,
) -> Artifact:
    """Random factors of the right shapes for ``model`` (see factories.random_artifact), with adapters sized so
    that the dense reconstruction has entries ~0.02 like an initialised expert and a small optional mean."""
    sites = find_experts(model)
    n0, p0, d0 = expert_dims(sites[0].module)
    n, p, d = n or n0, p or p0, d or d0
    return factories.random_artifact(
        n=n,
        p=p,
        d=d,
        layers=[s.layer for s in sites] if layers is None else layers,
        r=r,
        m=m,
        k=k,
        scope=scope,
        phi=phi,
        mean_scale=0.01 if mean else None,
        adapter_scale=0.02 * math.sqrt(d * k),
        pad=pad,
        seed=seed,
        families=families,
        source={"arch": model.config.model_type},
    )


def dense64(artifact: Artifact, family: str, layer: int) -> torch.Tensor:
    """A_i phi(sum_j alpha_ij B_j) + mean in float64, from the raw tensors (not Artifact.reconstruct)."""
    bank = artifact.bank(family, layer).double()
    alpha = reference.to_dense_codes(artifact.codes(family, layer), bank.shape[0]).double()
    composed = reference.apply_phi(torch.einsum("nm,mrd->nrd", alpha, bank), artifact.phi)
    W = artifact.adapter(family, layer).double() @ composed
    mean = artifact.mean(family, layer)
    return W + mean.double() if mean is not None else W


@torch.no_grad()
def write_dense(module: torch.nn.Module, gate: torch.Tensor, up: torch.Tensor) -> None:
    """Store gate/up [n, p, d] into an experts module's fused parameter, spelled out per layout."""
    fused = module.gate_up_proj
    if module.is_transposed:  # gpt-oss: [n, d, 2p], gate and up interleaved along the last axis
        assert not module.is_concatenated
        fused[..., 0::2] = gate.transpose(1, 2).to(fused.dtype)
        fused[..., 1::2] = up.transpose(1, 2).to(fused.dtype)
    else:  # [n, 2p, d], gate rows then up rows
        fused.copy_(torch.cat([gate, up], dim=1).to(fused.dtype))


def reference_model(arch: str, artifact: Artifact, dtype: torch.dtype = torch.float64, **kw) -> torch.nn.Module:
    """The tiny model in ``dtype`` with reconstruction-dense gate/up, served by transformers' eager loop."""
    model = build_tiny_model(arch, **kw).to(dtype)
    for site in find_experts(model):
        write_dense(site.module, dense64(artifact, "gate", site.layer), dense64(artifact, "up", site.layer))
    model.config._experts_implementation_internal = "eager"
    return model


def token_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- correctness --------------------------------------------------------------------------------------------


@functools.cache
def _case(arch: str) -> tuple[Artifact, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(artifact, token ids, float64 reference logits, logits of the original model) for one architecture.

    Every other architecture has a per-layer bank and padded codes, so both bank layouts and -1 slots run."""
    model = build_tiny_model(arch)
    layer_scope = ARCHS.index(arch) % 2 == 1
    art = random_artifact(model, scope="layer" if layer_scope else "global", pad=layer_scope, seed=3)
    ids = token_ids()
    return art, ids, logits(reference_model(arch, art), ids), logits(model, ids)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_patched_matches_reconstruction_fp32(arch, mode):
    art, ids, ref, original = _case(arch)
    model = build_tiny_model(arch)
    patch_model(model, art, mode=mode)
    assert model.config._experts_implementation == "globe"
    for site in find_experts(model):
        assert "gate_up_proj" not in site.module._parameters
        assert isinstance(site.module.globe, GlobeFactors) and site.module.globe.mode == mode
    assert rel_err(logits(model, ids), ref) <= FP32_RTOL
    # the tolerance can fail: the model before reconstruction is far outside it
    assert rel_err(original, ref) > 100 * FP32_RTOL


@pytest.mark.parametrize("mode", MODES)
def test_patched_with_r_above_p(mode):
    """An inner dimension r > p (allowed up to d): the patch serves it exactly like any other r."""
    model = build_tiny_model("qwen3_moe")
    n, p, d = expert_dims(find_experts(model)[0].module)
    r = p + 7
    assert r <= d
    art = random_artifact(model, r=r, seed=11)
    assert art.adapter("gate", find_experts(model)[0].layer).shape == (n, p, r)
    ids = token_ids(seed=4)
    ref = logits(reference_model("qwen3_moe", art), ids)
    patch_model(model, art, mode=mode)
    assert rel_err(logits(model, ids), ref) <= FP32_RTOL


@pytest.mark.parametrize(
    "arch,phi,mode",
    [("qwen3_moe", "tanh", "bank"), ("gpt_oss", "silu", "precomposed"), ("mixtral", "silu", "bank")],
)
def test_phi_and_no_mean(arch, phi, mode):
    model = build_tiny_model(arch)
    art = random_artifact(model, phi=phi, mean=False, scope="layer", seed=5)
    ids = token_ids(seed=2)
    ref = logits(reference_model(arch, art), ids)
    patch_model(model, art, mode=mode)
    assert rel_err(logits(model, ids), ref) <= FP32_RTOL


@pytest.mark.parametrize("arch,mode", [("qwen3_moe", "precomposed"), ("gpt_oss", "bank")])
def test_patched_bf16(arch, mode):
    art = random_artifact(build_tiny_model(arch), seed=7)
    ids = token_ids(seed=4)
    ref = logits(reference_model(arch, art), ids)
    dense_bf16 = reference_model(arch, art, torch.bfloat16)
    dense_bf16.config._experts_implementation_internal = "grouped_mm"
    err_dense = rel_err(logits(dense_bf16, ids), ref)

    model = build_tiny_model(arch, dtype=torch.bfloat16)
    patch_model(model, art, mode=mode)
    assert model.model.layers[0].mlp.experts.globe.adapter_gate.dtype == torch.bfloat16
    err = rel_err(logits(model, ids), ref)
    assert err <= BF16_RTOL and err <= 3 * max(err_dense, 1e-3), (err, err_dense)


@pytest.mark.parametrize("arch,mode", [("deepseek_v3", "precomposed"), ("gpt_oss", "bank")])
def test_generate_matches_reconstruction(arch, mode):
    art = random_artifact(build_tiny_model(arch), seed=11)
    ref = reference_model(arch, art, torch.float32)
    model = patch_model(build_tiny_model(arch), art, mode=mode)
    prompt = token_ids(batch=2, length=5, seed=6)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(prompt, **kw)
        got = model.generate(prompt, **kw)
    assert got.shape == want.shape == (2, 11)
    assert torch.equal(got, want)


def test_dtype_override_and_mixed_precision():
    """Factors in a compute dtype other than the model's (fp32 model, fp64 factors) still match."""
    model = build_tiny_model("olmoe")
    art = random_artifact(model, seed=13)
    ids = token_ids(seed=8)
    ref = logits(reference_model("olmoe", art), ids)
    patch_model(model, art, mode="precomposed", dtype=torch.float64)
    assert model.model.layers[1].mlp.experts.globe.composed_up.dtype == torch.float64
    assert rel_err(logits(model, ids), ref) <= FP32_RTOL


# --- integration details ------------------------------------------------------------------------------------


def test_expert_forward_matches_eager_loop_with_idle_experts():
    """One experts module, 1 token and a batch that leaves experts without tokens, against the eager loop."""
    model = build_tiny_model("gpt_oss")  # interleaved, transposed, biased, custom gating
    art = random_artifact(model, seed=17, pad=True)
    ref = reference_model("gpt_oss", art, torch.float64)
    patch_model(model, art, mode="bank")
    gen = torch.Generator().manual_seed(9)
    for T in (1, 3, 11):
        x = torch.randn(T, 64, generator=gen)
        idx = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(T)])
        w = torch.rand(T, 2, generator=gen)
        for layer in (0, 1):
            got = model.model.layers[layer].mlp.experts(x, idx, w)
            want = ref.model.layers[layer].mlp.experts(x.double(), idx, w.double())
            assert got.shape == (T, 64)
            assert rel_err(got, want) <= FP32_RTOL


def test_global_bank_is_shared_not_copied():
    model = build_tiny_model("qwen3_moe")
    patch_model(model, random_artifact(model, scope="global"), mode="bank")
    f0, f1 = (model.model.layers[i].mlp.experts.globe for i in (0, 1))
    assert f0.bank_gate is f1.bank_gate and f0.mean_up is f1.mean_up
    assert f0.adapter_gate is not f1.adapter_gate
    assert not any(p.requires_grad for p in f0.parameters())


def test_torch_compile_traces():
    model = build_tiny_model("gpt_oss", num_layers=1)  # the gating that runs in torch, after the custom op
    patch_model(model, random_artifact(model, seed=19), mode="bank")
    ids = token_ids(seed=10)
    eager = logits(model, ids)
    compiled = torch.compile(model.forward, backend="eager")
    with torch.no_grad():
        out = compiled(input_ids=ids).logits
    torch.testing.assert_close(out.double(), eager, rtol=0, atol=1e-6)
    # the experts module alone traces into one graph: custom ops hide the kernels, routing has static shapes
    experts = model.model.layers[0].mlp.experts
    x, idx, w = torch.randn(5, 64), torch.randint(0, 8, (5, 2)), torch.rand(5, 2)
    with torch.no_grad():
        want = experts(x, idx, w)
        got = torch.compile(experts, backend="eager", fullgraph=True)(x, idx, w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# --- memory -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_memory_shrinks_as_parameter_count_says(mode):
    model = build_tiny_model("qwen2_moe", num_experts=16, expert_dim=48)
    art = random_artifact(model, r=8, m=4, k=2, scope="global")
    params = art.num_parameters()
    before = memory_report(model)
    assert before["mode"] == "dense" and before["gate_up"] == 4 * params["dense"]
    patch_model(model, art, mode=mode)
    after = memory_report(model)
    assert after["mode"] == mode
    assert after["gate_up"] == 4 * params["bank_mode" if mode == "bank" else "precomposed"]
    assert after["down"] == before["down"] and after["gate_up"] < before["gate_up"]
    # nothing else in the model holds the freed weights
    n, p, d = 16, 48, 64
    assert not any(t.shape == (n, 2 * p, d) for t in model.state_dict().values())


def test_original_weights_are_freed():
    model = build_tiny_model("olmoe")
    refs = [weakref.ref(site.module.gate_up_proj) for site in find_experts(model)]
    patch_model(model, random_artifact(model), mode="bank")
    gc.collect()
    assert all(r() is None for r in refs)


def test_memory_bf16_bank_mode():
    model = build_tiny_model("mixtral", dtype=torch.bfloat16)
    art = random_artifact(model, r=8, m=4, k=2, scope="layer")
    params = art.num_parameters()
    patch_model(model, art, mode="bank")
    detail = memory_report(model)["detail"]
    assert detail["banks"] == 2 * params["banks"] and detail["adapters"] == 2 * params["adapters"]
    assert detail["means"] == 2 * params["means"]
    assert detail["codes"] == 4 * params["codes"]  # fp32 values + int32 indices
    assert detail["dense"] == 0 and detail["composed"] == 0


# --- mismatches are refused before anything changes ---------------------------------------------------------


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config._experts_implementation


@pytest.mark.parametrize(
    "case",
    ["layers_fewer", "layers_more", "experts", "hidden", "expert_dim", "family", "arch"],
)
def test_mismatch_raises_before_changes(case):
    model = build_tiny_model("qwen3_moe")
    layers = [s.layer for s in find_experts(model)]
    kw = {
        "layers_fewer": dict(layers=layers[:1]),
        "layers_more": dict(layers=layers + [2]),
        "experts": dict(n=4),
        "hidden": dict(d=32),
        "expert_dim": dict(p=16),
        "family": dict(families=("up",)),
    }.get(case, {})
    art = random_artifact(model, **kw)
    if case == "arch":
        art.source["arch"] = "mixtral"
    state, impl = _snapshot(model)
    with pytest.raises(ArtifactError) as info:
        patch_model(model, art, mode="bank")
    assert str(info.value)
    assert not is_patched(model) and model.config._experts_implementation == impl
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_patch_twice_and_bad_mode_raise():
    model = build_tiny_model("olmoe")
    art = random_artifact(model)
    with pytest.raises(ValueError):
        patch_model(model, art, mode="dense")
    patch_model(model, art)
    with pytest.raises(ArtifactError):
        patch_model(model, art)


# --- unpatch ------------------------------------------------------------------------------------------------


def test_unpatch_keep_original_restores_exact_weights():
    model = build_tiny_model("gpt_oss")
    art = random_artifact(model, seed=23)
    ids = token_ids(seed=12)
    state, impl = _snapshot(model)
    before = logits(model, ids)
    patch_model(model, art, mode="bank", keep_original=True)
    unpatch_model(model)
    assert not is_patched(model) and model.config._experts_implementation == impl
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_unpatch_restores_reconstruction_by_default(arch):
    model = build_tiny_model(arch)
    art = random_artifact(model, seed=29)
    ids = token_ids(seed=14)
    ref = reference_model(arch, art, torch.float32)
    patch_model(model, art, mode="precomposed")
    unpatch_model(model)
    for site, ref_site in zip(find_experts(model), find_experts(ref)):
        assert site.module.gate_up_proj.dtype == torch.float32
        torch.testing.assert_close(site.module.gate_up_proj, ref_site.module.gate_up_proj, rtol=1e-5, atol=1e-7)
    assert rel_err(logits(model, ids), logits(ref, ids)) <= FP32_RTOL
    with pytest.raises(ValueError):
        unpatch_model(model)


def test_apply_reconstruction_matches_reference_writer():
    for arch in ("qwen3_moe", "gpt_oss"):
        model = build_tiny_model(arch)
        art = random_artifact(model, seed=31)
        apply_reconstruction(model, art)
        ref = reference_model(arch, art, torch.float32)
        for site, ref_site in zip(find_experts(model), find_experts(ref)):
            torch.testing.assert_close(site.module.gate_up_proj, ref_site.module.gate_up_proj, rtol=1e-5, atol=1e-7)


# --- the Triton path ----------------------------------------------------------------------------------------


def _triton_interpreted() -> bool:
    """Whether the Triton adapter_gemm runs in the interpreter here (TRITON_INTERPRET=1 before triton loaded)."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    try:
        from triton.runtime import interpreter

        from globe_kernels.triton import adapter_gemm as agm
    except Exception:
        return False
    return isinstance(agm._adapter_inner_kernel, interpreter.InterpretedFunction)


@pytest.mark.skipif(not _triton_interpreted(), reason="needs TRITON_INTERPRET=1 set before triton is imported")
@pytest.mark.parametrize("arch,mode,r", [("qwen3_moe", "bank", 12), ("gpt_oss", "precomposed", 12),
                                         ("qwen3_moe", "bank", 45), ("gpt_oss", "precomposed", 37)])
def test_expert_forward_through_triton_interpreter(arch, mode, r):
    """The patched experts module with adapter_gemm forced to the Triton kernels (interpreted on CPU); r = 45
    and 37 exceed p = 32 (odd, so the r masks run)."""
    from globe_kernels import ops

    model = build_tiny_model(arch, num_layers=1)
    art = random_artifact(model, r=r, seed=37, pad=True)
    ref = reference_model(arch, art, torch.float64, num_layers=1)
    patch_model(model, art, mode=mode)
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(6, 64, generator=gen)
    idx = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(6)])
    w = torch.rand(6, 2, generator=gen)
    ops.reset_counts()
    with ops.use_backend("triton", "adapter_gemm"), torch.no_grad():
        got = model.model.layers[0].mlp.experts(x, idx, w)
    assert ops.backend_counts()["adapter_gemm"] == {"triton": 1}
    want = ref.model.layers[0].mlp.experts(x.double(), idx, w.double())
    assert rel_err(got, want) <= 2e-5  # the kernel's own fp32 parity bound


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("mode", MODES)
def test_patched_matches_reconstruction_cuda(arch, mode):
    """The fp32 correctness test on CUDA, where adapter_gemm runs the Triton kernels."""
    from globe_kernels import ops

    art, ids, ref, _ = _case(arch)
    model = patch_model(build_tiny_model(arch).cuda(), art, mode=mode)
    ops.reset_counts()
    out = logits(model, ids.cuda()).cpu()
    assert set(ops.backend_counts()["adapter_gemm"]) == {"triton"}
    assert rel_err(out, ref) <= FP32_RTOL


# --- size table -------------------------------------------------------------------------------------------------


def test_expert_bytes_by_hand():
    from globe.inference.sizes import ModelShape, expert_bytes, render_size_table

    s = ModelShape("toy", num_experts=8, hidden_size=16, expert_dim=12, top_k=2, moe_layers=3, num_layers=4)
    b = expert_bytes(s)  # r = 12/2 = 6 of min(p, d) = 12; m = (8*3)/4 = 6 atoms in one global bank
    assert (b["r"], b["m"]) == (6, 6)
    assert b["dense"] == 2 * 3 * 8 * 12 * 16 * 2
    assert b["adapters"] == 2 * 3 * 8 * 12 * 6 * 2 and b["composed"] == 2 * 3 * 8 * 6 * 16 * 2
    assert b["banks"] == 2 * 6 * 6 * 16 * 2 and b["means"] == 2 * 12 * 16 * 2
    assert b["codes"] == 2 * 3 * 8 * 4 * 8
    assert b["bank"] == b["banks"] + b["adapters"] + b["codes"] + b["means"]
    assert b["read_bank"] == 2 * 3 * (6 * 6 * 16 + 2 * 12 * 6) * 2  # min(m=6, k*support=8) atoms
    layer = expert_bytes(s, scope="layer")  # L banks of n/4 atoms: same bank bytes, L means
    assert layer["m"] == 2 and layer["banks"] == b["banks"] and layer["means"] == 3 * b["means"]
    # Mixtral: p > d, so r is half of d, not of p
    mixtral = ModelShape("Mixtral-8x7B", 8, 4096, 14336, 2, 32, 32)
    assert expert_bytes(mixtral)["r"] == 2048
    # Qwen3-30B-A3B: precomposed / dense = r (p + d) / (p d) and bank mode ~0.31 (design table)
    qwen = ModelShape("Qwen3-30B-A3B", 128, 2048, 768, 8, 48, 48)
    q = expert_bytes(qwen, mean=False)
    assert q["precomposed"] / q["dense"] == pytest.approx(384 * (768 + 2048) / (768 * 2048))
    assert q["bank"] / q["dense"] == pytest.approx(0.31, abs=0.01)
    table = render_size_table([s, qwen])
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3  # header + 2 rows
    assert "| Qwen3-30B-A3B (128, 2048, 768, 8, 48) | 384 | 1536 |" in table
