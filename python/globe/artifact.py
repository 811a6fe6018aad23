"""The GloBE artifact: the fitted factors of one checkpoint, versioned, written atomically.

On disk, a folder with two files:

    globe.json            manifest: format, version, config, source checkpoint facts, bank list, summary metrics
    factors.safetensors   the tensors, keyed by family ("gate" / "up"), layer and bank scope:
        bank.{family}.{scope}            [m, r, d]  the atoms (unit Frobenius norm), scope "global" or "layer{L}"
        codes.{family}.{L}.indices       [n, k]     int32 atom indices per expert, -1 pads unused slots
        codes.{family}.{L}.values        [n, k]     float32 mixture weights (rows sum to 1 after epsilon-prune)
        adapter.{family}.{L}             [n, p, r]  A_i with the normalisation scale folded in
        mean.{family}.{scope}            [p, d]     the per-family mean removed before fitting (optional)

so that W_i ~= adapter_i @ phi(sum_s values_is * bank[indices_is]) + mean, exactly what `reconstruct` returns.
The manifest is written last and names the factors file's size and SHA-256: a folder without a valid
manifest is an incomplete write, never a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from globe.errors import ArtifactError
from globe_kernels import ops
from globe_kernels.ops import SparseCodes

FORMAT = "globe-artifact"
VERSION = 1
MANIFEST = "globe.json"
FACTORS = "factors.safetensors"
FAMILIES = ("gate", "up")


def scope_id(scope: str, layer: int) -> str:
    """Key of the bank (and mean) that serves `layer` under a bank scope ("global" or "layer")."""
    if scope == "global":
        return "global"
    if scope == "layer":
        return f"layer{layer}"
    raise ArtifactError(f"unknown bank scope {scope!r}; expected 'global' or 'layer'")


@dataclass
class Artifact:
    """Fitted GloBE factors for the gate and up families of every MoE layer of one checkpoint."""

    scope: str
    phi: str
    layers: list[int]
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    families: tuple[str, ...] = FAMILIES

    # --- accessors -------------------------------------------------------------------------------------

    def _get(self, key: str) -> torch.Tensor:
        try:
            return self.tensors[key]
        except KeyError:
            raise ArtifactError(f"artifact has no tensor {key!r}") from None

    def _check(self, family: str, layer: int) -> None:
        if family not in self.families:
            raise ArtifactError(f"family must be one of {self.families}, got {family!r}")
        if layer not in self.layers:
            raise ArtifactError(f"layer {layer} is not in the artifact; its MoE layers are {self.layers}")

    def bank(self, family: str, layer: int) -> torch.Tensor:
        self._check(family, layer)
        return self._get(f"bank.{family}.{scope_id(self.scope, layer)}")

    def codes(self, family: str, layer: int) -> SparseCodes:
        self._check(family, layer)
        return SparseCodes(
            self._get(f"codes.{family}.{layer}.indices"), self._get(f"codes.{family}.{layer}.values")
        )

    def alpha(self, family: str, layer: int) -> torch.Tensor:
        """Dense codes [n, m]."""
        return ops.to_dense_codes(self.codes(family, layer), self.bank(family, layer).shape[0])

    def adapter(self, family: str, layer: int) -> torch.Tensor:
        self._check(family, layer)
        return self._get(f"adapter.{family}.{layer}")

    def mean(self, family: str, layer: int) -> torch.Tensor | None:
        self._check(family, layer)
        return self.tensors.get(f"mean.{family}.{scope_id(self.scope, layer)}")

    def composed(self, family: str, layer: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """B~_i = phi(sum_j alpha_ij B_j) for every expert of the layer: [n, r, d]."""
        return ops.compose(self.bank(family, layer), self.codes(family, layer), phi=self.phi, out_dtype=dtype)

    def reconstruct(self, family: str, layer: int) -> torch.Tensor:
        """The dense gate or up weights the factors stand for: [n, p, d] float32, original scale."""
        composed = self.composed(family, layer, torch.float32)
        W = self.adapter(family, layer).float() @ composed
        mean = self.mean(family, layer)
        return W + mean.float() if mean is not None else W

    @property
    def num_experts(self) -> int:
        return self.adapter(self.families[0], self.layers[0]).shape[0]

    @property
    def shape(self) -> dict[str, int]:
        """n, p, r, d and m of the first family (all families share them)."""
        A = self.adapter(self.families[0], self.layers[0])
        B = self.bank(self.families[0], self.layers[0])
        return {"n": A.shape[0], "p": A.shape[1], "r": A.shape[2], "d": B.shape[2], "m": B.shape[0]}

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of gate+up: original dense, bank mode (bank, codes, adapters, means), precomposed.

        Codes count as their nonzero values plus one index each."""
        s = self.shape
        n_layers, n_fam = len(self.layers), len(self.families)
        dense = n_layers * n_fam * s["n"] * s["p"] * s["d"]
        banks = sum(t.numel() for k, t in self.tensors.items() if k.startswith("bank."))
        means = sum(t.numel() for k, t in self.tensors.items() if k.startswith("mean."))
        adapters = sum(t.numel() for k, t in self.tensors.items() if k.startswith("adapter."))
        codes = sum(
            2 * int((t >= 0).sum())
            for k, t in self.tensors.items()
            if k.startswith("codes.") and k.endswith("indices")
        )
        composed = n_layers * n_fam * s["n"] * s["r"] * s["d"]
        return {
            "dense": dense,
            "bank_mode": banks + means + adapters + codes,
            "precomposed": composed + adapters + means,
            "banks": banks,
            "adapters": adapters,
            "codes": codes,
            "means": means,
        }

    # --- persistence -----------------------------------------------------------------------------------

    def manifest(self, factors_size: int, factors_sha256: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "scope": self.scope,
            "phi": self.phi,
            "layers": list(self.layers),
            "families": list(self.families),
            "shape": self.shape,
            "config": self.config,
            "source": self.source,
            "metrics": self.metrics,
            "parameters": self.num_parameters(),
            "factors": {"file": FACTORS, "size": factors_size, "sha256": factors_sha256},
        }

    def validate(self) -> None:
        """Every expected tensor present with consistent shapes and finite values; raises ArtifactError."""
        if not self.layers:
            raise ArtifactError("artifact has no layers")
        s = self.shape
        for family in self.families:
            for layer in self.layers:
                B = self.bank(family, layer)
                A = self.adapter(family, layer)
                idx, val = self.codes(family, layer)
                m = B.shape[0]
                expect = {
                    f"bank.{family}.{scope_id(self.scope, layer)}": (tuple(B.shape), (m, s["r"], s["d"])),
                    f"adapter.{family}.{layer}": (tuple(A.shape), (s["n"], s["p"], s["r"])),
                    f"codes.{family}.{layer}.values": (tuple(val.shape), tuple(idx.shape)),
                }
                mean = self.mean(family, layer)
                if mean is not None:
                    expect[f"mean.{family}.{scope_id(self.scope, layer)}"] = (
                        tuple(mean.shape),
                        (s["p"], s["d"]),
                    )
                for key, (got, want) in expect.items():
                    if got != want:
                        raise ArtifactError(f"tensor {key!r} has shape {got}, expected {want}")
                if idx.shape[0] != s["n"] or int(idx.max()) >= m or int(idx.min()) < -1:
                    raise ArtifactError(
                        f"codes.{family}.{layer}.indices must be [{s['n']}, k] with values in [-1, {m}); "
                        f"got shape {tuple(idx.shape)}, range [{int(idx.min())}, {int(idx.max())}]"
                    )
        for key, t in self.tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ArtifactError(f"tensor {key!r} holds {int((~torch.isfinite(t)).sum())} NaN/Inf values")

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write factors then manifest, each to a temporary name renamed into place (atomic per file)."""
        from safetensors.torch import save_file

        self.validate()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        factors_path = out / FACTORS
        with tempfile.NamedTemporaryFile(dir=out, prefix=".factors.", suffix=".tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            save_file(tensors, str(tmp_path), metadata={"format": FORMAT, "version": str(VERSION)})
            digest, size = _sha256(tmp_path), tmp_path.stat().st_size
            os.chmod(tmp_path, 0o644)
            os.replace(tmp_path, factors_path)
        finally:
            tmp_path.unlink(missing_ok=True)
        write_json_atomic(out / MANIFEST, self.manifest(size, digest))
        return out

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, verify: bool = True, device: str | torch.device = "cpu"
    ) -> Artifact:
        """Read an artifact folder; raises ArtifactError naming the file and what was expected."""
        from safetensors import safe_open

        root = Path(path)
        manifest_path = root / MANIFEST
        if not root.is_dir():
            raise ArtifactError(f"{root}: no such artifact folder")
        if not manifest_path.is_file():
            raise ArtifactError(f"{root}: no {MANIFEST}; not a GloBE artifact, or an interrupted write")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{manifest_path}: not valid JSON ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise ArtifactError(
                f"{manifest_path}: artifact version {manifest.get('version')!r}, this GloBE reads version {VERSION}"
            )
        factors = root / manifest["factors"]["file"]
        if not factors.is_file():
            raise ArtifactError(f"{factors}: missing factors file named by {manifest_path}")
        if factors.stat().st_size != manifest["factors"]["size"]:
            raise ArtifactError(
                f"{factors}: size {factors.stat().st_size} bytes, manifest says {manifest['factors']['size']} "
                "(truncated or replaced)"
            )
        if verify and _sha256(factors) != manifest["factors"]["sha256"]:
            raise ArtifactError(f"{factors}: SHA-256 does not match {manifest_path} (corrupt file)")
        try:
            with safe_open(str(factors), framework="pt", device=str(device)) as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise ArtifactError(f"{factors}: cannot read safetensors ({exc})") from None
        art = cls(
            scope=manifest["scope"],
            phi=manifest["phi"],
            layers=[int(x) for x in manifest["layers"]],
            tensors=tensors,
            config=manifest.get("config", {}),
            source=manifest.get("source", {}),
            metrics=manifest.get("metrics", {}),
            families=tuple(manifest.get("families", FAMILIES)),
        )
        art.validate()
        return art

    @classmethod
    def from_factors(
        cls,
        *,
        scope: str,
        phi: str,
        banks: dict[tuple[str, str], torch.Tensor],
        codes: dict[tuple[str, int], SparseCodes],
        adapters: dict[tuple[str, int], torch.Tensor],
        means: dict[tuple[str, str], torch.Tensor] | None = None,
        config: dict | None = None,
        source: dict | None = None,
        metrics: dict | None = None,
        families: Iterable[str] = FAMILIES,
    ) -> Artifact:
        """Assemble from per-key dicts: banks/means keyed (family, scope id), codes/adapters (family, layer)."""
        tensors: dict[str, torch.Tensor] = {}
        for (fam, sid), B in banks.items():
            tensors[f"bank.{fam}.{sid}"] = B.float()
        for (fam, sid), M in (means or {}).items():
            tensors[f"mean.{fam}.{sid}"] = M.float()
        for (fam, layer), c in codes.items():
            tensors[f"codes.{fam}.{layer}.indices"] = c.indices.to(torch.int32)
            tensors[f"codes.{fam}.{layer}.values"] = c.values.float()
        for (fam, layer), A in adapters.items():
            tensors[f"adapter.{fam}.{layer}"] = A.float()
        layers = sorted({layer for (_, layer) in adapters})
        return cls(scope, phi, layers, tensors, config or {}, source or {}, metrics or {}, tuple(families))


def load_artifact(path: str | os.PathLike, *, verify: bool = True) -> Artifact:
    """Read a GloBE artifact folder written by `globe.compress` / `Artifact.save`."""
    return Artifact.load(path, verify=verify)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        json.dump(obj, tmp, indent=2, sort_keys=False, default=_json_default)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.chmod(tmp.name, 0o644)  # temporary files are created private; the result is an ordinary file
    os.replace(tmp.name, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
