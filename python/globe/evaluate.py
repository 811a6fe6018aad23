"""Reconstruction errors of the artifact, and the patched model against the original.

`globe eval CHECKPOINT OUT` and the summary at the end of `globe compress` are built from these functions:

* :func:`reconstruction_rows` compares ``artifact.reconstruct(family, layer)`` with the checkpoint's own
  weights, one row per (family, layer) plus a total row per family and one for everything: relative Frobenius
  error, parameter ratio (bank-mode parameters over dense gate/up parameters) and support sizes of the codes.
* :func:`output_agreement` runs the original model and the same model patched with the artifact on a short
  English text shipped with the package (``globe/data/sample.txt``) and reports the relative error of the
  logits, top-1 next-token agreement and the perplexity of both models.

Checkpoints without a tokenizer (the synthetic ones of :mod:`globe.synthetic`) are fed the text's UTF-8 bytes
as token ids, modulo the vocabulary size; the result says which tokenisation was used.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from globe.errors import CheckpointError, ConfigError

__all__ = [
    "MODES",
    "SAMPLE_TEXT",
    "byte_tokens",
    "format_agreement",
    "format_table",
    "load_model",
    "output_agreement",
    "reconstruction_rows",
    "sample_text",
    "stored_errors",
    "support_sizes",
    "tokenize",
]

MODES = ("precomposed", "bank")
SAMPLE_TEXT = Path(__file__).resolve().parent / "data" / "sample.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def sample_text() -> str:
    """The short English text shipped with the package for output-agreement checks."""
    try:
        return SAMPLE_TEXT.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{SAMPLE_TEXT}: cannot read the sample text shipped with GloBE ({exc})") from None


# --- reconstruction -----------------------------------------------------------------------------------------


def support_sizes(artifact: Any, family: str, layer: int) -> list[int]:
    """Number of atoms each expert of a layer mixes (nonzero code entries)."""
    idx, val = artifact.codes(family, layer)
    return [int(x) for x in ((idx >= 0) & (val != 0)).sum(dim=1).tolist()]


def _bank_mode_parameters(artifact: Any, family: str, layer: int) -> float:
    """Parameters that serve one (family, layer) in bank mode; shared banks and means are split evenly over
    the layers that share them, so the per-layer numbers add up to the artifact's total."""
    sharing = len(artifact.layers) if artifact.scope == "global" else 1
    bank = artifact.bank(family, layer).numel() / sharing
    mean = artifact.mean(family, layer)
    mean_params = mean.numel() / sharing if mean is not None else 0.0
    idx, _ = artifact.codes(family, layer)
    codes = 2 * int((idx >= 0).sum())
    return artifact.adapter(family, layer).numel() + bank + mean_params + codes


def stored_errors(artifact: Any) -> dict[tuple[str, Any], float] | None:
    """The relative errors the trainer measured while fitting (artifact metrics), keyed (family, layer),
    (family, "all") and ("all", "all"); None when the artifact does not hold all of them."""
    metrics = artifact.metrics or {}
    per_layer, per_family, total = (metrics.get(k) for k in ("rel_error_layer", "rel_error_family", "rel_error"))
    if not (isinstance(per_layer, dict) and isinstance(per_family, dict) and isinstance(total, (int, float))):
        return None
    out: dict[tuple[str, Any], float] = {}
    for family in artifact.families:
        layers = per_layer.get(family) or {}
        for layer in artifact.layers:
            value = layers.get(str(layer), layers.get(layer))  # JSON turns the layer keys into strings
            if not isinstance(value, (int, float)):
                return None
            out[(family, layer)] = float(value)
        if not isinstance(per_family.get(family), (int, float)):
            return None
        out[(family, "all")] = float(per_family[family])
    out[("all", "all")] = float(total)
    return out


def reconstruction_rows(
    checkpoint: Any,
    artifact: Any,
    *,
    times: dict[tuple[str, str], float] | None = None,
    errors: dict[tuple[str, Any], float] | None = None,
) -> list[dict[str, Any]]:
    """One row per (family, layer) of the artifact, a total row per family and one for everything.

    The relative Frobenius error compares ``artifact.reconstruct`` with the checkpoint's gate/up weights, read
    one layer at a time (``checkpoint``: a folder or an object from :func:`globe.io.open_checkpoint`); with
    ``errors`` (see :func:`stored_errors`) those numbers are used instead and the checkpoint is not read.
    ``times`` maps (family, scope id) -> seconds spent fitting that bank (per layer for scope "layer", once
    per family for scope "global"). Rows: family, layer (an int, or "all"), rel_error, param_ratio,
    median_support, mean_support, time_s (None where unknown), and err2 / ref2, the squared norms behind a
    measured error.
    """
    import torch

    from globe.io import open_checkpoint

    shape = artifact.shape
    ckpt = None
    if errors is None:
        ckpt = checkpoint if hasattr(checkpoint, "read") else open_checkpoint(checkpoint)
        if (ckpt.num_experts, ckpt.expert_dim, ckpt.hidden_size) != (shape["n"], shape["p"], shape["d"]):
            raise ConfigError(
                f"the artifact was fitted to experts of shape n={shape['n']}, p={shape['p']}, d={shape['d']}, "
                f"but {ckpt.path} has n={ckpt.num_experts}, p={ckpt.expert_dim}, d={ckpt.hidden_size}"
            )
        missing = sorted(set(artifact.layers) - set(ckpt.moe_layers))
        if missing:
            raise ConfigError(f"artifact layers {missing} are not MoE layers of {ckpt.path} ({ckpt.moe_layers})")
    times = times or {}
    dense_per_layer = shape["n"] * shape["p"] * shape["d"]
    rows: list[dict[str, Any]] = []
    grand = {"err2": 0.0, "ref2": 0.0, "params": 0.0, "dense": 0, "supports": [], "time": 0.0, "timed": False}
    for family in artifact.families:
        fam = {"err2": 0.0, "ref2": 0.0, "params": 0.0, "dense": 0, "supports": []}
        for layer in artifact.layers:
            if ckpt is not None:
                W = ckpt.read(family, layer, dtype=torch.float32).double()
                err2 = float((artifact.reconstruct(family, layer).double() - W).pow(2).sum())
                ref2 = float(W.pow(2).sum())
                del W
                rel = math.sqrt(err2 / ref2) if ref2 > 0 else float("nan")
            else:
                err2 = ref2 = float("nan")
                rel = errors[(family, layer)]
            params = _bank_mode_parameters(artifact, family, layer)
            sup = support_sizes(artifact, family, layer)
            t = times.get((family, f"layer{layer}")) if artifact.scope == "layer" else None
            rows.append(
                {
                    "family": family,
                    "layer": layer,
                    "rel_error": rel,
                    "param_ratio": params / dense_per_layer,
                    "median_support": statistics.median(sup),
                    "mean_support": sum(sup) / len(sup),
                    "time_s": t,
                    "err2": err2,
                    "ref2": ref2,
                }
            )
            fam["err2"] += err2
            fam["ref2"] += ref2
            fam["params"] += params
            fam["dense"] += dense_per_layer
            fam["supports"] += sup
        fam_times = [v for (f, _), v in times.items() if f == family]
        fam_time = sum(fam_times) if fam_times else None
        rows.append(_total_row(family, fam, fam_time, errors))
        for key in ("err2", "ref2", "params", "dense"):
            grand[key] += fam[key]
        grand["supports"] += fam["supports"]
        if fam_time is not None:
            grand["time"] += fam_time
            grand["timed"] = True
    rows.append(_total_row("all", grand, grand["time"] if grand["timed"] else None, errors))
    return rows


def _total_row(
    family: str, acc: dict[str, Any], time_s: float | None, errors: dict[tuple[str, Any], float] | None
) -> dict[str, Any]:
    sup = acc["supports"]
    if errors is not None:
        rel = errors[(family, "all")]
    else:
        rel = math.sqrt(acc["err2"] / acc["ref2"]) if acc["ref2"] > 0 else float("nan")
    return {
        "family": family,
        "layer": "all",
        "rel_error": rel,
        "param_ratio": acc["params"] / acc["dense"] if acc["dense"] else float("nan"),
        "median_support": statistics.median(sup) if sup else float("nan"),
        "mean_support": sum(sup) / len(sup) if sup else float("nan"),
        "time_s": time_s,
        "err2": acc["err2"],
        "ref2": acc["ref2"],
    }


def format_cell(value: Any, spec: str) -> str:
    """One table cell: "-" for a missing value, "nan" for NaN, else ``format(value, spec)`` or ``str(value)``."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns``: (key, header, format spec), e.g. ("rel_error", "rel. error", ".4f")."""
    body = [[format_cell(row.get(key), spec) for key, _, spec in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


SUMMARY_COLUMNS = (
    ("family", "family", "s"),
    ("layer", "layer", "s"),
    ("rel_error", "rel. error", ".4f"),
    ("param_ratio", "params", ".3f"),
    ("median_support", "median support", "g"),
    ("time_s", "time (s)", ".1f"),
)


# --- model outputs ------------------------------------------------------------------------------------------


def byte_tokens(text: str, vocab_size: int) -> list[int]:
    """The text's UTF-8 bytes as token ids modulo the vocabulary size (checkpoints without a tokenizer)."""
    return [b % vocab_size for b in text.encode("utf-8")]


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def tokenize(folder: str | Path, text: str, vocab_size: int, max_tokens: int) -> tuple[list[int], str]:
    """Token ids of ``text`` (at most ``max_tokens``) and a description of the tokenisation used."""
    if has_tokenizer(folder):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # a broken tokenizer should not stop the evaluation
            ids = byte_tokens(text, vocab_size)[:max_tokens]
            return ids, f"UTF-8 bytes modulo vocab_size={vocab_size} (the tokenizer failed to load: {exc})"
        ids = [i for i in tok(text)["input_ids"] if i < vocab_size][:max_tokens]
        return ids, f"the checkpoint's tokenizer ({type(tok).__name__})"
    ids = byte_tokens(text, vocab_size)[:max_tokens]
    return ids, f"UTF-8 bytes modulo vocab_size={vocab_size} (the checkpoint has no tokenizer)"


def load_model(folder: str | Path, dtype: Any = None) -> Any:
    """The checkpoint's ``*ForCausalLM`` in eval mode (float32 by default); CheckpointError if it fails."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    dtype = torch.float32 if dtype is None else dtype
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except Exception as exc:
        raise CheckpointError(f"{folder}: transformers cannot load the model ({type(exc).__name__}: {exc})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


def _max_positions(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _nll(logits: Any, ids: Any) -> float:
    """Mean next-token negative log-likelihood (float64)."""
    import torch.nn.functional as F

    return float(F.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="mean"))


def output_agreement(
    checkpoint: str | Path,
    artifact: Any,
    *,
    modes: Iterable[str] = MODES,
    max_tokens: int = 256,
    dtype: Any = None,
    device: Any = None,
    text: str | None = None,
    model: Any = None,
) -> dict[str, Any]:
    """Original model against the model patched with ``artifact`` in each mode, on the shipped sample text.

    Returns {"tokens", "tokenization", "original": {"perplexity"}, "modes": {mode: {"logit_rel_error",
    "top1_agreement", "perplexity", "memory"}}}. The model is patched in place and restored between modes
    (reloaded when the inference package offers no unpatch). ``device``: where both models run (default: where
    the model loads, the CPU). ``model`` may be a loaded model to reuse.
    """
    import torch

    from globe import inference

    modes = list(modes)
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if model is None:
        model = load_model(checkpoint, dtype)
    if device is not None:
        model = model.to(device)
    vocab = int(model.config.vocab_size)
    limit = max_tokens
    positions = _max_positions(model)
    if positions is not None:
        limit = min(limit, positions)
    ids_list, how = tokenize(checkpoint, text if text is not None else sample_text(), vocab, limit)
    if len(ids_list) < 2:
        raise ConfigError("the evaluation text gives fewer than 2 tokens; nothing to predict")
    ids = torch.tensor([ids_list], dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
    result: dict[str, Any] = {
        "tokens": len(ids_list),
        "tokenization": how,
        "original": {"perplexity": math.exp(_nll(ref, ids))},
        "modes": {},
    }
    top1_ref = ref.argmax(-1)
    unpatch = getattr(inference, "unpatch_model", None)
    for i, mode in enumerate(modes):
        if i > 0 and unpatch is None:
            model = load_model(checkpoint, dtype)
            if device is not None:
                model = model.to(device)
        if unpatch is not None:
            # keep the original gate/up weights (in CPU memory) so that unpatching restores them exactly
            inference.patch_model(model, artifact, mode=mode, keep_original=True)
        else:
            inference.patch_model(model, artifact, mode=mode)
        try:
            with torch.no_grad():
                out = model(input_ids=ids).logits.double()
            entry: dict[str, Any] = {
                "logit_rel_error": float((out - ref).norm() / ref.norm()),
                "top1_agreement": float((out.argmax(-1) == top1_ref).double().mean()),
                "perplexity": math.exp(_nll(out, ids)),
            }
            report = getattr(inference, "memory_report", None)
            if report is not None:
                try:
                    entry["memory"] = _jsonable(report(model))
                except Exception:  # a report is a nicety; never fail the evaluation for it
                    pass
            result["modes"][mode] = entry
        finally:
            if unpatch is not None:
                unpatch(model)
    return result


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    if hasattr(obj, "_asdict"):
        return _jsonable(obj._asdict())
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return _jsonable(dataclasses.asdict(obj))
    return str(obj)


def format_agreement(result: dict[str, Any]) -> str:
    """Text block for :func:`output_agreement`'s result."""
    lines = [
        f"output agreement on {result['tokens']} tokens of the sample text; tokens: {result['tokenization']}",
        f"original model perplexity: {result['original']['perplexity']:.4g}",
    ]
    rows = [{"mode": mode, **entry} for mode, entry in result["modes"].items()]
    lines.append(
        format_table(
            rows,
            (
                ("mode", "mode", "s"),
                ("logit_rel_error", "logit rel. error", ".3e"),
                ("top1_agreement", "top-1 agreement", ".1%"),
                ("perplexity", "perplexity", ".4g"),
            ),
        )
    )
    return "\n".join(lines)
