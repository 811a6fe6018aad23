"""Artifact save/load round trip and the load errors, each naming the file or key at fault."""

import json

import factories
import pytest
import torch
from globe.artifact import FACTORS, MANIFEST, _sha256, load_artifact
from globe.errors import ArtifactError
from safetensors.torch import load_file, save_file


def _artifact(scope="layer", seed=0):
    return factories.random_artifact(
        n=5, p=6, d=7, r=3, m=4, layers=[0, 2], scope=scope, seed=seed, config={"r": 3}, metrics={"rel_error": 0.1}
    )


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_round_trip(tmp_path, scope):
    art = _artifact(scope)
    art.save(tmp_path)
    back = load_artifact(tmp_path)
    assert back.scope == scope and back.layers == [0, 2] and back.config == {"r": 3}
    for key, t in art.tensors.items():
        assert torch.equal(back.tensors[key], t), key
    for fam in ("gate", "up"):
        for L in (0, 2):
            # reconstruct = A (sum_j alpha_j B_j) + mean, checked against float64 maths (fp32 tol 1e-5)
            A, B, M = art.adapter(fam, L).double(), art.bank(fam, L).double(), art.mean(fam, L).double()
            ref = A @ torch.einsum("nm,mrd->nrd", art.alpha(fam, L).double(), B) + M
            torch.testing.assert_close(back.reconstruct(fam, L).double(), ref, rtol=1e-5, atol=1e-5)


def _saved(tmp_path):
    _artifact().save(tmp_path)
    return tmp_path / MANIFEST, tmp_path / FACTORS


def test_unknown_version(tmp_path):
    manifest, _ = _saved(tmp_path)
    data = json.loads(manifest.read_text())
    data["version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"globe\.json.*version 99"):
        load_artifact(tmp_path)


def _rewrite(manifest, factors, tensors):
    save_file(tensors, str(factors))
    data = json.loads(manifest.read_text())
    data["factors"].update(size=factors.stat().st_size, sha256=_sha256(factors))
    manifest.write_text(json.dumps(data))


def test_missing_tensor(tmp_path):
    manifest, factors = _saved(tmp_path)
    tensors = load_file(str(factors))
    del tensors["adapter.up.2"]
    _rewrite(manifest, factors, tensors)
    with pytest.raises(ArtifactError, match=r"adapter\.up\.2"):
        load_artifact(tmp_path)


def test_truncated_factors(tmp_path):
    _, factors = _saved(tmp_path)
    data = factors.read_bytes()
    factors.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"factors\.safetensors.*truncated"):
        load_artifact(tmp_path)


def test_wrong_sha(tmp_path):
    _, factors = _saved(tmp_path)
    data = bytearray(factors.read_bytes())
    data[-3] ^= 0xFF  # same size, different content
    factors.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"factors\.safetensors.*SHA-256"):
        load_artifact(tmp_path)


def test_nan_tensor(tmp_path):
    manifest, factors = _saved(tmp_path)
    tensors = load_file(str(factors))
    tensors["bank.gate.layer0"][1, 0, 0] = float("nan")
    _rewrite(manifest, factors, tensors)
    with pytest.raises(ArtifactError, match=r"bank\.gate\.layer0.*NaN"):
        load_artifact(tmp_path)


def test_missing_manifest_is_incomplete(tmp_path):
    _, _ = _saved(tmp_path)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="interrupted write"):
        load_artifact(tmp_path)
