"""Compress a checkpoint: fit gate and up of every MoE layer (per bank scope) and write the artifact.

    art = compress("path/to/checkpoint", "out/", GlobeConfig(scope="global"))

Parts: one fit per (family, scope id): scope "global" stacks all MoE layers' experts of a family into one bank
(N = layers x n experts; this version holds one family's experts of all layers in memory at once), scope
"layer" fits one bank per family per layer.

Resume: after each part its factors go atomically to ``out_dir/.partial/<family>.<scope id>.safetensors``
with a small JSON beside it holding the fingerprint of the config and the checkpoint's shapes. ``resume=True``
skips parts whose JSON matches and refuses (ConfigError) parts written under another config. Each part's
random generator is seeded from (config.seed, family, scope id) alone, so a resumed run gives the same factors
as an uninterrupted one, bit for bit on CPU. The partial folder is removed once the artifact is saved.

Budget (``config.budget``): before anything is fitted, :func:`globe.budget.choose_by_budget` picks r, m, scope
and center by short fits on a sample of the checkpoint's gate experts (the AM, then with ``refine_steps`` a short
refinement through the identity); the winner's config replaces the given one before the fingerprint is taken (a
resumed run makes the same, deterministic choice), and the saved config record holds the search
(``"budget_choice"``: candidates, their errors, the reason). The refinement settings of the given config are
kept.

Refinement (``config.phi`` / ``config.refine_steps``): done inside :func:`globe.am.fit_bank`; its records go to
the sinks with ``kind="refine_step"`` and the artifact records the fitted φ, which inference applies after
composing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from globe.artifact import Artifact, scope_id, write_json_atomic
from globe.config import GlobeConfig
from globe.errors import ConfigError
from globe.logs import MetricLogger, Sink
from globe_kernels import ops

__all__ = ["compress", "part_seed"]

FAMILIES = ("gate", "up")
PARTIAL = ".partial"


def part_seed(seed: int, family: str, sid: str) -> int:
    """The generator seed of one part, derived from (seed, family, scope id) only."""
    digest = hashlib.sha256(f"globe:{seed}:{family}:{sid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _fingerprint(config: GlobeConfig, facts: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps({"config": config.fingerprint(), "checkpoint": facts}, sort_keys=True).encode()
    ).hexdigest()


def _save_part(folder: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / f"{name}.safetensors")
    write_json_atomic(folder / f"{name}.json", meta)


def _load_part(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / f"{name}.safetensors"))


def compress(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: GlobeConfig | None = None,
    *,
    progress: Callable[[dict[str, Any]], Any] | None = None,
    sinks: Iterable[Sink] = (),
    resume: bool = False,
) -> Artifact:
    """Fit gate and up of a checkpoint's routed experts and save the artifact in out_dir; returns it.

    progress(event) receives dicts with "event" in {"start", "part_start", "step", "part_end", "part_skip",
    "done"} (for progress bars); sinks receive every metric record (AM steps tagged with family and scope id,
    part summaries, the final summary).
    """
    from globe.am import fit_bank
    from globe.io import open_checkpoint

    cfg = config or GlobeConfig()
    cfg.validate()
    budget_choice: dict[str, Any] | None = None
    emit = progress or (lambda event: None)
    if cfg.budget is not None:
        from globe.budget import choose_by_budget

        # with a refinement configured the search scores each candidate after a short one (through identity,
        # at most choose_by_budget's search_refine_steps): the refinement ranks candidates unlike the AM alone
        emit({"event": "budget_start", "budget": cfg.budget})
        choice = choose_by_budget(checkpoint_path, cfg.budget, cfg,
                                  callback=lambda rec: emit({"event": "budget_candidate", **rec}))
        cfg = choice.config
        budget_choice = choice.to_dict()
        emit({"event": "budget_done", "reason": choice.reason, "time_s": choice.search_time_s})
    out = Path(out_dir)
    partial = out / PARTIAL
    logger = MetricLogger(sinks)
    ckpt = open_checkpoint(checkpoint_path)
    layers = list(ckpt.moe_layers)
    n, p, d = ckpt.num_experts, ckpt.expert_dim, ckpt.hidden_size
    facts = {"arch": ckpt.arch, "n": n, "p": p, "d": d, "layers": layers, "dtype": str(ckpt.dtype)}
    fp = _fingerprint(cfg, facts)
    dtype = cfg.torch_dtype
    if cfg.scope == "global":
        parts = [(fam, "global", layers) for fam in FAMILIES]
    else:
        parts = [(fam, scope_id("layer", L), [L]) for fam in FAMILIES for L in layers]
    emit(
        {
            "event": "start",
            "parts": len(parts),
            "families": list(FAMILIES),
            "layers": layers,
            "scope": cfg.scope,
        }
    )
    if partial.exists() and not resume:
        shutil.rmtree(partial)

    banks: dict[tuple[str, str], torch.Tensor] = {}
    means: dict[tuple[str, str], torch.Tensor] = {}
    codes: dict[tuple[str, int], ops.SparseCodes] = {}
    adapters: dict[tuple[str, int], torch.Tensor] = {}
    layer_stats: dict[str, dict[str, list[float]]] = {fam: {} for fam in FAMILIES}
    part_metrics: dict[str, Any] = {}
    io_bytes, io_seconds, fit_seconds = 0, 0.0, 0.0
    resolved: dict[str, int] = {}
    element = torch.empty((), dtype=ckpt.dtype).element_size()

    for index, (fam, sid, part_layers) in enumerate(parts):
        name = f"{fam}.{sid}"
        meta_path = partial / f"{name}.json"
        info = {"family": fam, "scope_id": sid, "part": index, "parts": len(parts)}
        if resume and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") != fp:
                raise ConfigError(
                    f"{meta_path}: this partial result was written with another config or checkpoint; "
                    "resume with "
                    "the same config, or compress without resume to start over"
                )
            tensors = _load_part(partial, name)
            emit({"event": "part_skip", **info})
        else:
            emit({"event": "part_start", **info, "layers": part_layers})
            t0 = time.perf_counter()
            W = torch.cat([ckpt.read(fam, L, dtype=dtype) for L in part_layers])
            io_seconds += time.perf_counter() - t0
            io_bytes += W.numel() * element
            step_logger = logger.child(kind="am_step", family=fam, scope_id=sid)
            refine_logger = logger.child(kind="refine_step", family=fam, scope_id=sid)

            def on_step(rec: dict[str, Any], _log=step_logger, _rlog=refine_logger, _info=info) -> None:
                if str(rec.get("stage", "")).startswith("refine"):  # "refine" and its pass over all, "refine_final"
                    _rlog.log(rec)
                    emit({"event": "refine_step", **_info, "stage": rec["stage"], "step": rec["step"],
                          "rel_error": rec["rel_error"], "rel_error_val": rec.get("rel_error_val")})
                    return
                _log.log(rec)
                emit(
                    {
                        "event": "step",
                        **_info,
                        "step": rec["step"],
                        "rel_error": rec["rel_error"],
                        "support": rec.get("support_median"),
                        "temperature": rec.get("temperature"),
                        "restart": rec.get("restart"),
                    }
                )

            gen = torch.Generator().manual_seed(part_seed(cfg.seed, fam, sid))
            t0 = time.perf_counter()
            fit = fit_bank(W, cfg, callback=on_step, generator=gen)
            fit_seconds += time.perf_counter() - t0
            recon_err = {}
            for k, L in enumerate(part_layers):
                rows = slice(k * n, (k + 1) * n)
                Wl = W[rows].double()
                R = fit.reconstruct(rows).double()
                recon_err[str(L)] = [float((R - Wl).pow(2).sum()), float(Wl.pow(2).sum())]
            del W
            tensors = {
                "bank": fit.bank,
                "alpha": fit.alpha,
                "A": fit.A,
                "mean": fit.normalization.mean,
                "scale": fit.normalization.scale,
            }
            summary = {k: v for k, v in fit.metrics.items()}
            meta = {
                "fingerprint": fp,
                "family": fam,
                "scope_id": sid,
                "layers": part_layers,
                "r": fit.r,
                "m": fit.m,
                "residuals": recon_err,
                "metrics": summary,
                "config": cfg.to_dict(),
            }
            _save_part(partial, name, tensors, meta)
            logger.log({"kind": "part", "family": fam, "scope_id": sid, **summary})
            emit({"event": "part_end", **info, "rel_error": summary.get("rel_error_all")})
        bank = tensors["bank"]
        resolved = {"r": int(bank.shape[1]), "m": int(bank.shape[0])}
        banks[(fam, sid)] = bank
        if cfg.center:
            means[(fam, sid)] = tensors["mean"]
        for k, L in enumerate(part_layers):
            rows = slice(k * n, (k + 1) * n)
            codes[(fam, L)] = ops.to_sparse_codes(tensors["alpha"][rows])
            adapters[(fam, L)] = tensors["A"][rows]
        for L, pair in meta["residuals"].items():
            layer_stats[fam][L] = pair
        part_metrics[name] = meta["metrics"]

    def rel(pairs: Iterable[list[float]]) -> float:
        pairs = list(pairs)
        num, den = sum(a for a, _ in pairs), sum(b for _, b in pairs)
        return (num / den) ** 0.5 if den > 0 else 0.0

    metrics: dict[str, Any] = {
        "rel_error": rel(pair for fam in FAMILIES for pair in layer_stats[fam].values()),
        "rel_error_family": {fam: rel(layer_stats[fam].values()) for fam in FAMILIES},
        "rel_error_layer": {
            fam: {L: rel([pair]) for L, pair in layer_stats[fam].items()} for fam in FAMILIES
        },
        "io_bytes": io_bytes,
        "io_seconds": io_seconds,
        "io_throughput_MBps": io_bytes / io_seconds / 1e6 if io_seconds > 0 else None,
        "fit_seconds": fit_seconds,
        "parts": part_metrics,
        "backend_counts": ops.backend_counts(),
    }
    config_record = {
        **cfg.to_dict(),
        "r_resolved": resolved.get("r"),
        "m_resolved": resolved.get("m"),
        "fingerprint": fp,
    }
    if budget_choice is not None:
        config_record["budget_choice"] = budget_choice
    art = Artifact.from_factors(
        scope=cfg.scope,
        phi=cfg.phi,
        banks=banks,
        codes=codes,
        adapters=adapters,
        means=means or None,
        config=config_record,
        source={"path": str(checkpoint_path), **facts},
        metrics=metrics,
    )
    params = art.num_parameters()
    metrics["parameter_ratio"] = params["bank_mode"] / params["dense"]
    metrics["parameter_ratio_precomposed"] = params["precomposed"] / params["dense"]
    art.save(out)
    shutil.rmtree(partial, ignore_errors=True)
    logger.log({"kind": "summary", **{k: v for k, v in metrics.items() if k not in ("parts",)}})
    emit(
        {
            "event": "done",
            "rel_error": metrics["rel_error"],
            "parameter_ratio": metrics["parameter_ratio"],
            "out_dir": str(out),
        }
    )
    return art
