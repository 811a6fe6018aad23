"""globe.compress over tiny checkpoints of every supported architecture, reload, resume."""

import json

import pytest
import torch

pytest.importorskip("globe.seeding")

from globe import GlobeConfig, compress, load_artifact  # noqa: E402
from globe.errors import ConfigError  # noqa: E402
from globe.io import open_checkpoint  # noqa: E402
from globe.logs import JsonlSink  # noqa: E402
from globe.synthetic import build_tiny_checkpoint, list_supported_archs  # noqa: E402

FAST = dict(steps=3, r=8, patience=2)


def _rel_error(art, ckpt_path):
    ckpt = open_checkpoint(ckpt_path)
    num = den = 0.0
    for fam in ("gate", "up"):
        for layer in ckpt.moe_layers:
            W = ckpt.read(fam, layer).double()
            R = art.reconstruct(fam, layer).double()
            assert R.shape == W.shape
            num += float((R - W).pow(2).sum())
            den += float(W.pow(2).sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("arch", list_supported_archs())
def test_compress_each_architecture(arch, tmp_path):
    ckpt = build_tiny_checkpoint(
        arch, tmp_path / "ckpt", num_experts=8, hidden_size=32, expert_dim=16, structured=True
    )
    scope = "layer" if arch in ("mixtral", "olmoe") else "global"
    events = []
    art = compress(ckpt, tmp_path / "out", GlobeConfig(scope=scope, **FAST), progress=events.append)
    back = load_artifact(tmp_path / "out")
    err = _rel_error(back, ckpt)
    # the error of the saved factors is the error the fit reported
    assert err == pytest.approx(art.metrics["rel_error"], rel=1e-4)
    assert err < 0.9
    assert back.config["r_resolved"] == 8 and back.config["m_resolved"] >= 1
    assert 0 < art.metrics["parameter_ratio"]
    kinds = {e["event"] for e in events}
    assert {"start", "part_start", "step", "part_end", "done"} <= kinds
    assert not (tmp_path / "out" / ".partial").exists()


def test_compress_with_r_above_p(tmp_path):
    """r = 24 > p = 16 (allowed up to d = 32): the artifact holds [n, p, r] adapters and [m, r, d] atoms, and
    its reloaded error is the one the fit reported; with a refinement too."""
    ckpt = _tiny(tmp_path)
    cfg = GlobeConfig(scope="global", steps=3, r=24, patience=2, weight_aware=True, refine_steps=4)
    art = compress(ckpt, tmp_path / "out", cfg)
    back = load_artifact(tmp_path / "out")
    assert back.config["r_resolved"] == 24
    layer = back.layers[0]
    assert back.adapter("gate", layer).shape[1:] == (16, 24) and back.bank("gate", layer).shape[1:] == (24, 32)
    err = _rel_error(back, ckpt)
    assert err == pytest.approx(art.metrics["rel_error"], rel=1e-4) and err < 0.9


def _tiny(tmp_path):
    return build_tiny_checkpoint(
        "qwen3_moe", tmp_path / "ckpt", num_experts=8, hidden_size=32, expert_dim=16, structured=True
    )


def test_resume_after_interruption_is_bit_identical(tmp_path):
    ckpt = _tiny(tmp_path)
    cfg = GlobeConfig(scope="layer", **FAST)
    full = compress(ckpt, tmp_path / "full", cfg)

    class Stop(Exception):
        pass

    def interrupt(event):
        if event["event"] == "part_end":
            raise Stop

    with pytest.raises(Stop):
        compress(ckpt, tmp_path / "resumed", cfg, progress=interrupt)
    assert len(list((tmp_path / "resumed" / ".partial").glob("*.safetensors"))) == 1
    skipped = []
    resumed = compress(
        ckpt,
        tmp_path / "resumed",
        cfg,
        resume=True,
        progress=lambda e: skipped.append(e) if e["event"] == "part_skip" else None,
    )
    assert len(skipped) == 1
    assert full.tensors.keys() == resumed.tensors.keys()
    for key in full.tensors:
        assert torch.equal(full.tensors[key], resumed.tensors[key]), key


def test_resume_refuses_other_config(tmp_path):
    ckpt = _tiny(tmp_path)
    cfg = GlobeConfig(scope="layer", **FAST)

    def interrupt(event):
        if event["event"] == "part_end":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(ckpt, tmp_path / "out", cfg, progress=interrupt)
    with pytest.raises(ConfigError, match="another config"):
        compress(ckpt, tmp_path / "out", cfg.replace(lambda_A=1e-3), resume=True)


def test_sinks_receive_records(tmp_path):
    ckpt = _tiny(tmp_path)
    path = tmp_path / "metrics.jsonl"
    with JsonlSink(path) as sink:
        compress(ckpt, tmp_path / "out", GlobeConfig(**FAST), sinks=[sink])
    records = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("part") == 2 and kinds[-1] == "summary"
    steps = [r for r in records if r["kind"] == "am_step"]
    assert {r["family"] for r in steps} == {"gate", "up"}
    assert all("seeding_method" in r and "rel_error" in r for r in steps)
    assert records[-1]["io_bytes"] > 0 and "rel_error_family" in records[-1]


def test_refined_phi_reaches_the_artifact_and_its_error(tmp_path):
    ckpt = _tiny(tmp_path)
    path = tmp_path / "metrics.jsonl"
    cfg = GlobeConfig(scope="layer", phi="tanh", refine_steps=3, **FAST)
    with JsonlSink(path) as sink:
        art = compress(ckpt, tmp_path / "out", cfg, sinks=[sink])
    back = load_artifact(tmp_path / "out")
    assert art.phi == back.phi == "tanh"
    # the saved factors, composed through tanh, give the error the fit measured through its reconstruct()
    assert _rel_error(back, ckpt) == pytest.approx(art.metrics["rel_error"], rel=1e-4)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    refine = [r for r in records if r["kind"] == "refine_step"]
    assert {(r["family"], r["scope_id"]) for r in refine} == {(f, f"layer{L}") for f in ("gate", "up")
                                                               for L in open_checkpoint(ckpt).moe_layers}
    # both refinement stages (held-out validated, then all experts) are refinement records, never AM steps
    assert {r["stage"] for r in refine} == {"refine", "refine_final"}
    am = [r for r in records if r["kind"] == "am_step"]
    assert am and {r.get("stage") for r in am} <= {None, "final"}
    part = next(iter(art.metrics["parts"].values()))
    # the refinement keeps its best state by the held-out experts' error (one per layer here)
    assert part["refine.phi"] == "tanh" and part["n_val"] == 1
    assert part["refine.rel_error_val"] <= part["refine.rel_error_val_start"]
