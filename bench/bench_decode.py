"""Decode throughput of a GloBE-patched model (precomposed and bank mode) against the original model.

A synthetic model with the proportions of a real one (``bench/model_shapes.py``: ``BENCH_SHAPES``) is built
with random weights, given random GloBE factors at the trainer's default r and m (support 4 per expert), and
decoded greedily with a KV cache: after a prefill of ``--prompt`` tokens, ``--new-tokens`` steps are timed at
each batch size. Reported: median tokens/s over ``--repeats`` runs (and min-max), the ratio to the original
model measured in the same run, and the bytes of expert gate/up weights each variant holds.

    PYTHONPATH=python:. python bench/bench_decode.py                       # CPU, qwen3-small
    PYTHONPATH=python:. python bench/bench_decode.py --device cuda --dtype bfloat16 --shape qwen3-medium
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from globe.artifact import Artifact, scope_id  # noqa: E402
from globe.config import GlobeConfig  # noqa: E402
from globe.inference import memory_report, patch_model  # noqa: E402
from globe.inference.archs import expert_dims, find_experts  # noqa: E402
from globe.synthetic import build_tiny_model  # noqa: E402
from model_shapes import BENCH_SHAPES  # noqa: E402

from globe_kernels import ops  # noqa: E402
from globe_kernels.ops import SparseCodes  # noqa: E402


def random_artifact(model: torch.nn.Module, *, support: int = 4, seed: int = 0) -> Artifact:
    """Random factors at the trainer's default r and m (scope global), sized like an initialised expert."""
    gen = torch.Generator().manual_seed(seed)
    sites = find_experts(model)
    n, p, d = expert_dims(sites[0].module)
    config = GlobeConfig()
    r, m = config.resolve_r(p, d), config.resolve_m(n * len(sites))
    k = min(support, m)
    banks, codes, adapters, means = {}, {}, {}, {}
    for f in ("gate", "up"):
        B = torch.randn(m, r, d, generator=gen)
        banks[(f, "global")] = B / B.flatten(1).norm(dim=1)[:, None, None]
        means[(f, "global")] = 0.01 * torch.randn(p, d, generator=gen)
        for site in sites:
            idx = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)]).to(torch.int32)
            val = torch.rand(n, k, generator=gen) + 0.1
            codes[(f, site.layer)] = SparseCodes(idx, val / val.sum(1, keepdim=True))
            adapters[(f, site.layer)] = 0.02 * math.sqrt(d * k) * torch.randn(n, p, r, generator=gen)
    assert scope_id("global", sites[0].layer) == "global"
    return Artifact.from_factors(
        scope="global", phi="identity", banks=banks, codes=codes, adapters=adapters, means=means
    )


def build(shape, variant: str, artifact: Artifact | None, dtype: torch.dtype, device: str) -> torch.nn.Module:
    model = build_tiny_model(
        shape.model_type,
        num_layers=shape.num_layers,
        num_experts=shape.num_experts,
        hidden_size=shape.hidden_size,
        expert_dim=shape.expert_dim,
        num_experts_per_tok=shape.top_k,
        dtype=dtype,
    ).to(device)
    if variant != "original":
        patch_model(model, artifact, mode=variant)
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode_seconds(model, batch: int, prompt: int, new_tokens: int, device: str, seed: int) -> float:
    """Seconds for new_tokens greedy decode steps at batch size ``batch`` after a prefill (not timed)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=gen).to(device)
    out = model(input_ids=ids, use_cache=True)
    # transformers >= 5.2x names the cache `cache`; earlier releases `past_key_values`
    key = "cache" if hasattr(out, "cache") else "past_key_values"
    past, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
    sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{key: past})
        past, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-small", choices=sorted(BENCH_SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--variants", nargs="+", default=["original", "precomposed", "bank"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    shape = BENCH_SHAPES[args.shape]
    torch.manual_seed(0)

    probe = build_tiny_model(
        shape.model_type,
        num_layers=shape.num_layers,
        num_experts=shape.num_experts,
        hidden_size=shape.hidden_size,
        expert_dim=shape.expert_dim,
    )
    artifact = random_artifact(probe)
    del probe
    s = artifact.shape
    print(f"# decode throughput, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f", torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {str(dtype)[6:]}"
    )
    print(
        f"# shape {shape.name}: {shape.model_type}, n={s['n']} d={s['d']} p={s['p']} top-{shape.top_k}, "
        f"{shape.num_layers} layers; r={s['r']} m={s['m']} (global bank), support 4; prompt {args.prompt}, "
        f"{args.new_tokens} timed decode steps, median of {args.repeats}"
    )
    print()
    print("| variant | batch | tokens/s (median) | min-max | vs original | gate/up MiB held | backends |")
    print("|---|---|---|---|---|---|---|")
    baseline: dict[int, float] = {}
    for variant in args.variants:
        model = build(shape, variant, artifact, dtype, args.device)
        held = memory_report(model)["gate_up"] / 2**20
        for batch in args.batch:
            decode_seconds(model, batch, args.prompt, 2, args.device, seed=99)  # warm-up
            ops.reset_counts()
            rates = [
                batch
                * args.new_tokens
                / decode_seconds(model, batch, args.prompt, args.new_tokens, args.device, seed=i)
                for i in range(args.repeats)
            ]
            med = statistics.median(rates)
            if variant == "original":
                baseline[batch] = med
            ratio = f"{med / baseline[batch]:.2f}x" if batch in baseline else "-"
            used = ",".join(f"{op}:{'/'.join(c)}" for op, c in ops.backend_counts().items()) or "-"
            print(
                f"| {variant} | {batch} | {med:.1f} | {min(rates):.1f}-{max(rates):.1f} | {ratio} "
                f"| {held:.2f} | {used} |",
                flush=True,
            )
        del model


if __name__ == "__main__":
    main()
