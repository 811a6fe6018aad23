"""The ``globe`` command: ``info``, ``inspect``, ``compress``, ``eval`` and ``demo``.

    globe info                                   versions, device, and which kernel backend each op uses
    globe inspect CHECKPOINT                     what GloBE would compress in a checkpoint
    globe compress CHECKPOINT -o OUT [options]   fit the banks, write the artifact, metrics and a report
    globe eval CHECKPOINT OUT                    reconstruction errors and patched-vs-original outputs
    globe demo                                   the whole workflow on a synthetic model, no downloads

Every error a user can cause (a bad option, a missing folder, an output folder that holds another run) is
answered with one line on stderr and exit status 2, never a traceback. ``python -m globe.cli`` works like the
console script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from globe.errors import ConfigError, GlobeError

__all__ = ["main", "build_parser", "parse_size", "load_config_file", "resolve_config"]

PROG = "globe"
CONFIG_FILE = "compress_config.json"  # the resolved config of a run, reusable with --config
RUN_FILE = "run.json"  # what was compressed, by which command
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
PARTIAL_DIR = ".partial"
MANIFEST = "globe.json"
# files and folders a run writes; --overwrite removes these and nothing else
RUN_OUTPUTS = (
    CONFIG_FILE,
    RUN_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    EVAL_FILE,
    PARTIAL_DIR,
    MANIFEST,
    "factors.safetensors",
    "report.md",
    "plots",
)
INTERRUPT_ENV = "GLOBE_TEST_INTERRUPT_AFTER"


class UsageError(GlobeError):
    """A bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so main() reports one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


# --- sizes and config ---------------------------------------------------------------------------------------


def parse_size(option: str, text: str | int, presets: Sequence[str]) -> str | int:
    """A size option's value: one of ``presets`` or a positive integer; else UsageError naming the option."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: str | int = text
    else:
        s = str(text).strip().replace(" ", "")
        if s in presets:
            return s
        try:
            value = int(s)
        except ValueError:
            raise UsageError(
                f"{option}: unknown preset {str(text)!r}; use {', '.join(presets)} or a positive integer"
            ) from None
    if value < 1:
        raise UsageError(f"{option}: must be a positive integer or one of {', '.join(presets)}, got {value}")
    return value


def _size_type(option: str, presets: Sequence[str]):
    def convert(text: str) -> str | int:
        try:
            return parse_size(option, text, presets)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None

    return convert


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Keys of a YAML (.yaml/.yml) or JSON config file; ConfigError naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--config: {path} is not valid {kind} ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of config keys, got {type(data).__name__}")
    if path.name == MANIFEST and isinstance(data.get("config"), dict):
        # an artifact manifest: reuse its config, without what the run derived (resolved sizes, fingerprint)
        import dataclasses

        names = {f.name for f in dataclasses.fields(_config_module().GlobeConfig)}
        data = {k: v for k, v in data["config"].items() if k in names}
    return data


# Options of `globe compress` that set GlobeConfig fields: field -> (flags, metavar, help). Defaults are read
# from GlobeConfig itself and shown in --help; fields missing here still get a generic --option.
_OPTION_HELP: dict[str, tuple[tuple[str, ...], str | None, str]] = {
    "r": (
        ("-r", "--r"),
        "R",
        "inner dimension of each adapter A_i (p x r) and atom B_j (r x d): a preset p/2, 3p/4 or p "
        "(fractions "
        "of min(p, d), p being the expert width) or an integer no larger than d (the hidden size; r > p can "
        "pay at large budgets)",
    ),
    "m": (
        ("-m", "--m"),
        "M",
        "atoms per bank: a preset n/8, n/4 or n/2 (n = experts sharing the bank: all MoE layers' experts for "
        "--scope global, one layer's for --scope layer) or an integer no larger than n",
    ),
    "scope": (
        ("--scope",),
        None,
        "global: one bank per family over all MoE layers; layer: one bank per layer",
    ),
    "seeding": (("--seeding",), None, "warm start that builds the proxies B_i^(0) of the initial bank"),
    "seeding_options": (
        ("--seeding-option",),
        "KEY=VALUE",
        "keyword argument of the warm start (repeatable; VALUE is read as JSON when it parses, else as a string)",
    ),
    "sparsity": (
        ("--sparsity",),
        None,
        "coding step: tempered 1.5-entmax, sparsemax, alpha-entmax by bisection, or a top-K support",
    ),
    "entmax_alpha": (("--entmax-alpha",), "A", "alpha of --sparsity entmax_bisect"),
    "top_k": (("--top-k",), "K", "atoms kept per expert with --sparsity topk"),
    "target_support": (
        ("--target-support",),
        "K",
        "median number of atoms per expert that the temperature controller aims at",
    ),
    "eps": (("--eps",), "EPS", "epsilon-prune: code entries below this are zeroed and the rows renormalised"),
    "T0": (("--t0",), "T", "initial temperature of the coding step"),
    "T_min": (("--t-min",), "T", "lower bound of the temperature"),
    "T_max": (("--t-max",), "T", "upper bound of the temperature"),
    "eta": (("--eta",), "ETA", "gain of the temperature controller T <- T exp(eta (support/target - 1))"),
    "lambda_A": (
        ("--lambda-a",),
        "L",
        "ridge of the adapter refit, relative to the Gram matrices' mean diagonal",
    ),
    "lambda_B": (("--lambda-b",), "L", "ridge of the dictionary (MOD) step, relative to its mean diagonal"),
    "steps": (("--steps",), "S", "alternating-minimisation steps at most"),
    "patience": (
        ("--patience",),
        "P",
        "early stop after this many steps without validation improvement while supports are stable",
    ),
    "min_improvement": (
        ("--min-improvement",),
        "X",
        "relative validation improvement that counts as progress",
    ),
    "support_tol": (("--support-tol",), "X", "relative change of the median support still called stable"),
    "val_fraction": (
        ("--val-fraction",),
        "F",
        "share of experts held out of the bank fit to measure validation",
    ),
    "weight_aware": (
        ("--weight-aware",),
        None,
        "fit codes and bank against the true objective sum_i ||W_i - A_i sum_j alpha_ij B_j||^2",
    ),
    "weight_aware_solver": (
        ("--weight-aware-solver",),
        None,
        "weight-aware mode: dense (assembled (m r)^2 bank system), cg (matrix-free, for the global scope of a "
        "real model) or auto (dense where it fits in memory)",
    ),
    "refresh_targets": (
        ("--refresh-targets",),
        None,
        "after the first step, replace the fixed proxies by each expert's least-squares right factor given its "
        "adapter (proxy mode)",
    ),
    "pg_iters": (("--pg-iters",), "N", "projected-gradient iterations of the weight-aware code update"),
    "kmeans_iters": (("--kmeans-iters",), "N", "Lloyd iterations of the initial k-means bank"),
    "phi": (
        ("--phi",),
        None,
        "nonlinearity of the composition phi(sum_j alpha_ij B_j); the AM fits identity, tanh and silu are "
        "fitted by the refinement stage and need --refine-steps",
    ),
    "center": (("--center",), None, "subtract the per-family mean before fitting (folded back at export)"),
    "seed": (("--seed",), "N", "random seed: the same seed and inputs give bit-identical factors on CPU"),
    "device": (("--device",), "DEV", "torch device of the fit, e.g. cpu or cuda"),
    "dtype": (("--dtype",), None, "precision of the fit"),
    "budget": (
        ("--budget",),
        "F",
        "fraction in (0, 1] of the original gate/up parameters: choose r, m, scope and center by a short "
        "search on a sample of experts, each candidate scored after the AM and, with --refine-steps, 10 "
        "refinement steps (replaces --r, --m, --scope, --center; r may exceed p; the candidates are recorded "
        "in the artifact's config)",
    ),
    "refine_steps": (
        ("--refine-steps",),
        "N",
        "iterations of the refinement through phi after the AM, early-stopped on the held-out experts "
        "(none or 0: no refinement; required for --phi tanh or silu)",
    ),
    "refine_method": (
        ("--refine-method",),
        None,
        "refinement optimiser: auto (varpro_gn where the adapters are badly conditioned, else varpro), varpro "
        "(adapters solved exactly each step, Adam on bank and codes), varpro_gn (adapters solved exactly, "
        "Gauss-Newton steps on the bank), adam (Adam on adapters, bank and codes) or gn (block Gauss-Newton)",
    ),
    "refine_lr": (("--refine-lr",), "LR", "Adam's learning rate of the refinement, relative to each tensor's RMS "
                  "(default: the method's, 0.1 for varpro and adam, 0.01 for varpro_gn's codes)"),
    "refine_time_limit": (("--refine-time-limit",), "SEC", "seconds of refinement per bank at most"),
    "coherence": (
        ("--coherence",),
        "MU",
        "relative weight of the atom-coherence penalty mu sum_{j!=k} <B_j, B_k>^2 in the dictionary step "
        "(0: off; proxy mode only)",
    ),
    "coherence_iters": (("--coherence-iters",), "N", "iterations of the coherence-penalised dictionary solve"),
    "support_search": (
        ("--support-search",),
        "N",
        "weight-aware mode: rounds per step of atom swaps scored with the adapter eliminated (0: off)",
    ),
    "support_candidates": (("--support-candidates",), "N", "outside atoms each expert tries per swap round"),
    "spectral_bank": (
        ("--spectral-bank",),
        None,
        "weight-aware mode: also try a bank from one eigenproblem that puts every atom in one frame",
    ),
    "spectral_max_dim": (("--spectral-max-dim",), "N", "largest (used atoms x d) the spectral bank is tried at"),
    "fit_mean": (
        ("--fit-mean",),
        None,
        "weight-aware mode with --center: refit the shared mean term exactly every step",
    ),
    "restarts": (
        ("--restarts",),
        "N",
        "whole AM fits from seeds seed, seed+1, ...; the one with the lowest error is kept",
    ),
    "final_steps": (
        ("--final-steps",),
        "N",
        "steps after the validated phase with the held-out experts in the dictionary step too (0: they stay "
        "fitted with the bank frozen)",
    ),
}


def _config_module():
    from globe import config as config_module

    return config_module


def _choices(field_name: str) -> Sequence[str] | None:
    cm = _config_module()
    table = {
        "scope": getattr(cm, "SCOPES", None),
        "sparsity": getattr(cm, "SPARSITIES", None),
        "phi": getattr(cm, "PHIS", None),
        "refine_method": getattr(cm, "REFINE_METHODS", None),
        "weight_aware_solver": getattr(cm, "WEIGHT_AWARE_SOLVERS", None),
        "seeding": getattr(cm, "SEEDING_METHODS", None),
        "dtype": tuple(getattr(cm, "DTYPES", {})) or None,
    }
    return table.get(field_name)


def _at_least_two(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 tokens (one to predict from), got {value}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _default_text(value: Any) -> str:
    if isinstance(value, dict):
        return "none" if not value else json.dumps(value)
    if value is None:
        return "none"
    return str(value)


def _add_config_options(parser: argparse.ArgumentParser) -> list[str]:
    """Add one option per GlobeConfig field; returns the field names (argparse dests)."""
    import dataclasses

    cm = _config_module()
    defaults = cm.GlobeConfig()
    group = parser.add_argument_group(
        "trainer options (defaults of the design document; each overrides the same key of --config)"
    )
    names = []
    for f in dataclasses.fields(cm.GlobeConfig):
        name = f.name
        default = getattr(defaults, name)
        flags, metavar, text = _OPTION_HELP.get(
            name, ((f"--{name.lower().replace('_', '-')}",), None, f"the config key {name}")
        )
        kwargs: dict[str, Any] = {"dest": name, "default": None}
        if name == "r":
            kwargs["type"] = _size_type(flags[-1], tuple(cm.R_PRESETS))
        elif name == "m":
            kwargs["type"] = _size_type(flags[-1], tuple(cm.M_PRESETS))
        elif name == "seeding_options":
            kwargs.update(type=_key_value, action="append")
        elif isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, int) or name in ("top_k", "refine_steps"):
            kwargs["type"] = int
        elif isinstance(default, float) or name in ("budget", "refine_time_limit", "refine_lr"):
            kwargs["type"] = float
        choices = _choices(name)
        if choices:
            kwargs["choices"] = list(choices)
        if metavar and kwargs.get("action") is not argparse.BooleanOptionalAction:
            kwargs["metavar"] = metavar
        kwargs["help"] = f"{text} (default: {_default_text(default)})"
        group.add_argument(*flags, **kwargs)
        names.append(name)
    return names


def resolve_config(args: argparse.Namespace, fields: Sequence[str]) -> Any:
    """GlobeConfig from its defaults, then the --config file, then the options given on the command line."""
    cm = _config_module()
    data: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for key in ("r", "m"):
        if key in data:
            presets = cm.R_PRESETS if key == "r" else cm.M_PRESETS
            try:
                data[key] = parse_size(f"{key} in {args.config}", data[key], tuple(presets))
            except UsageError as exc:
                raise ConfigError(str(exc)) from None
    for name in fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "seeding_options":
            value = {**data.get("seeding_options", {}), **dict(value)}
        data[name] = value
    return cm.GlobeConfig.from_dict(data)


def _name_option(message: str, args: argparse.Namespace) -> str:
    """'GlobeConfig.eps: ...' -> '--eps: ...' when the value came from the command line, else name the key."""
    import re

    match = re.match(r"GlobeConfig\.(\w+): (.*)", message)
    if not match:
        return message
    name, rest = match.groups()
    flags = _OPTION_HELP.get(name, ((f"--{name.lower().replace('_', '-')}",), None, ""))[0]
    if getattr(args, name, None) is not None:
        return f"{flags[-1]}: {rest}"
    where = f" in {args.config}" if args.config else ""
    return f"config key {name}{where}: {rest}"


def check_before_writing(config: Any) -> None:
    """Catch what would only fail once the fit runs: the device, the warm start's options."""
    import torch

    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {config.device} was asked for, but torch sees no CUDA device")
    if config.phi != "identity" and not config.refine_steps:
        raise UsageError(
            f"--phi: {config.phi} is fitted by the refinement stage after the linear AM; pass --refine-steps N "
            "(e.g. 200 with --refine-method adam)"
        )
    try:
        from globe.seeding import SEEDERS, _options_of
    except ImportError:  # an older seeding package: it checks its own options when it runs
        return
    if config.seeding not in SEEDERS:
        raise UsageError(f"--seeding: unknown method {config.seeding!r}; known: {', '.join(SEEDERS)}")
    known = list(_options_of(SEEDERS[config.seeding]))
    unknown = sorted(set(config.seeding_options) - set(known))
    if unknown:
        raise UsageError(
            f"--seeding-option: {', '.join(unknown)} is not an option of the {config.seeding} warm start; "
            f"it accepts: {', '.join(known) or 'none'}"
        )


def check_sizes(config: Any, ckpt: Any) -> tuple[int, int, int]:
    """r, m for the checkpoint's shapes: (r, m, n in the bank's scope); UsageError if too big."""
    p, d = ckpt.expert_dim, ckpt.hidden_size
    n = ckpt.num_experts * (len(ckpt.moe_layers) if config.scope == "global" else 1)
    if isinstance(config.r, int) and config.r > d:
        raise UsageError(f"--r: {config.r} is larger than the hidden size d={d} of the experts of {ckpt.path} "
                         "(r may be at most d)")
    if isinstance(config.m, int) and config.m > n:
        where = "all MoE layers" if config.scope == "global" else "one layer (--scope layer)"
        raise UsageError(f"--m: {config.m} atoms is more than the n={n} experts of {where} that share the bank")
    return config.resolve_r(p, d), config.resolve_m(n), n


# --- output folder ------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_output(out: Path, config: Any, checkpoint: Path, *, resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """Decide what to do with the output folder: (resume the run there?, is that run already complete?).

    An existing run (run.json, compress_config.json, .partial/ or globe.json present) is continued only with
    --resume and the same config and checkpoint, replaced only with --overwrite; a non-empty folder that holds
    no run is refused.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o/--out: {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        if resume:
            print(f"note: {out} holds no run to resume; starting a new one", file=sys.stderr)
        return False, False
    markers = [name for name in (RUN_FILE, CONFIG_FILE, PARTIAL_DIR, MANIFEST) if (out / name).exists()]
    if not markers:
        raise UsageError(f"-o/--out: {out} is not empty and holds no GloBE run; choose a new or empty folder")
    complete = (out / MANIFEST).is_file() and not (out / PARTIAL_DIR).exists()
    state = "a finished run" if complete else "an interrupted run"
    if overwrite:
        for name in RUN_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return False, False
    old_config = _read_json(out / CONFIG_FILE)
    if old_config is None and (out / MANIFEST).is_file():
        old_config = (_read_json(out / MANIFEST) or {}).get("config")
    old_run = _read_json(out / RUN_FILE) or {}
    if not resume:
        raise UsageError(
            f"-o/--out: {out} already holds {state}; pass --resume to continue it, --overwrite to replace "
            "it, or choose another folder"
        )
    # the device changes where the fit runs, not its result: a run may be resumed on another device
    new_config = {k: v for k, v in config.to_dict().items() if k != "device"}
    old_config = {k: v for k, v in old_config.items() if k != "device"} if isinstance(old_config, dict) else None
    diff = _config_diff(old_config, new_config) if old_config is not None else ["no saved config"]
    if diff:
        raise UsageError(
            f"--resume: {out} holds a run with a different config ({'; '.join(diff[:4])}"
            f"{'; ...' if len(diff) > 4 else ''}); use the same options, another folder, or --overwrite"
        )
    old_ckpt = old_run.get("checkpoint")
    if old_ckpt is not None and Path(old_ckpt) != checkpoint:
        raise UsageError(
            f"--resume: {out} holds a run of checkpoint {old_ckpt}, not {checkpoint}; use another folder or --overwrite"
        )
    return True, complete


# --- progress -----------------------------------------------------------------------------------------------


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{int(s // 60)}m{int(s % 60):02d}s"


class Progress:
    """Turns the trainer's progress events into tqdm bars and a line per finished stage.

    Bars: one over the banks to fit (one per family, or per family and layer with --scope layer), one per
    AM run counting its steps, with the current relative error, median support and temperature as postfix, and
    one per refinement counting its records, with the current errors. Lines: for each bank, reading plus warm
    start plus initial bank, the AM run, each stage of the refinement; at the end, export.
    Also records the seconds spent per bank and honours the test hook GLOBE_TEST_INTERRUPT_AFTER.
    """

    def __init__(self, *, steps: int, enabled: bool = True, stream: Any = None):
        self.steps = int(steps)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.parts_bar: Any = None
        self.am_bar: Any = None
        self.refine_bar: Any = None
        self.search_bar: Any = None
        self.refine_stage: dict[tuple[str, str], str] = {}
        self.t_part: dict[tuple[str, str], float] = {}
        self.t_last = time.perf_counter()
        self.times: dict[tuple[str, str], float] = {}
        self.first_error: dict[tuple[str, str], float] = {}
        self.last_step: dict[tuple[str, str], int] = {}
        self.parts_done = 0
        self.interrupt_after = os.environ.get(INTERRUPT_ENV)

    def _bar(self, **kwargs: Any) -> Any:
        from tqdm import tqdm

        return tqdm(file=self.stream, disable=not self.enabled, dynamic_ncols=True, **kwargs)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        tqdm.write(text, file=self.stream)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        part = (str(event.get("family", "?")), str(event.get("scope_id", "?")))
        label = f"{part[0]}/{part[1]}"
        now = time.perf_counter()
        if kind == "budget_start":
            self.write(f"budget search: r, m, scope and mean term for {event.get('budget'):g} of the gate/up "
                       "parameters, short fits on a sample of experts")
        elif kind == "budget_candidate":
            if self.search_bar is None:
                self.search_bar = self._bar(total=event.get("total"), desc="budget search", unit="candidate",
                                            position=0, leave=False)
            self.search_bar.set_postfix_str(f"{event.get('scope')}, m={event.get('m')}, r={event.get('r')}: "
                                            f"{event.get('rel_error', float('nan')):.4f}")
            self.search_bar.update(1)
        elif kind == "budget_done":
            self._close_stage_bars()
            self.write(f"budget search in {_fmt_seconds(float(event.get('time_s', 0.0)))}: {event.get('reason')}")
            self.t_last = now
        elif kind == "start":
            self.parts_bar = self._bar(total=event.get("parts"), desc="banks", unit="bank", position=0)
        elif kind == "part_skip":
            self.write(f"{label}: kept from the interrupted run (--resume)")
            self._advance_parts()
        elif kind == "part_start":
            self.t_part[part] = self.t_last = now
            if self.parts_bar is not None:
                self.parts_bar.set_postfix_str(f"{label}: reading experts, warm start", refresh=True)
        elif kind == "step":
            step = int(event.get("step", 0))
            prev_step = self.last_step.get(part, 0)
            self.last_step[part] = step
            err = event.get("rel_error")
            if step == 0:
                self.first_error[part] = err
                restart = event.get("restart") or 0
                if restart:  # GlobeConfig.restarts: another whole fit of the same experts
                    self.write(f"{label}: {prev_step} AM steps in "
                               f"{_fmt_seconds(now - self.t_last)}; restart {restart}: warm start and initial bank "
                               f"(rel. error {err:.4f})")
                else:
                    took = now - self.t_part.get(part, now)
                    self.write(f"{label}: experts read, warm start and initial bank in {_fmt_seconds(took)} "
                               f"(rel. error {err:.4f})")
                self.t_last = now
                self._close_stage_bars()
                self.am_bar = self._bar(total=self.steps, desc=f"{label} AM", unit="step", position=1, leave=False)
                if self.parts_bar is not None:
                    self.parts_bar.set_postfix_str(f"{label}: alternating minimisation", refresh=True)
            if self.am_bar is not None:
                post = {"err": err, "supp": event.get("support"), "T": event.get("temperature")}
                self.am_bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in post.items() if isinstance(v, (int, float))}, refresh=step == 0
                )
                if step > 0:
                    self.am_bar.update(1)
            self._maybe_interrupt(label, step)
        elif kind == "refine_step":
            stage = str(event.get("stage") or "refine")
            if self.refine_stage.get(part) != stage:
                self._close_stage_bars()
                if part not in self.refine_stage:
                    self.write(f"{label}: {self.last_step.get(part, 0)} AM steps in {_fmt_seconds(now - self.t_last)}"
                               "; refining through phi")
                    if self.parts_bar is not None:
                        self.parts_bar.set_postfix_str(f"{label}: refinement", refresh=True)
                else:
                    self.write(f"{label}: refinement on the fitted experts done in {_fmt_seconds(now - self.t_last)}"
                               "; continuing over all experts")
                self.refine_stage[part] = stage
                self.t_last = now
                desc = f"{label} refine" + (" (all)" if stage == "refine_final" else "")
                self.refine_bar = self._bar(desc=desc, unit="record", position=1, leave=False)
            if self.refine_bar is not None:
                post = {"err": event.get("rel_error"), "held-out": event.get("rel_error_val")}
                self.refine_bar.set_postfix({k: f"{v:.4g}" for k, v in post.items()
                                             if isinstance(v, (int, float)) and math.isfinite(v)})
                self.refine_bar.update(1)
        elif kind == "part_end":
            self._close_stage_bars()
            took = now - self.t_part.get(part, now)
            self.times[part] = took
            steps = self.last_step.get(part, 0)
            err = event.get("rel_error")
            stage = "refinement" if part in self.refine_stage else f"{steps} AM steps"
            self.write(
                f"{label}: {stage} in {_fmt_seconds(now - self.t_last)}"
                + (f" (rel. error {err:.4f})" if isinstance(err, float) else "")
                + f"; bank done in {_fmt_seconds(took)}"
            )
            self.t_last = now
            self._advance_parts()
            self._maybe_interrupt(label, None)
        elif kind == "done":
            self.close()
            self.write(f"finalize and export: {_fmt_seconds(now - self.t_last)}")

    def _advance_parts(self) -> None:
        self.parts_done += 1
        if self.parts_bar is not None:
            self.parts_bar.update(1)

    def _close_stage_bars(self) -> None:
        for name in ("am_bar", "refine_bar", "search_bar"):
            bar = getattr(self, name)
            if bar is not None:
                bar.close()
                setattr(self, name, None)

    def close(self) -> None:
        self._close_stage_bars()
        if self.parts_bar is not None:
            self.parts_bar.set_postfix_str("", refresh=False)
            self.parts_bar.close()
            self.parts_bar = None

    def _maybe_interrupt(self, label: str, step: int | None) -> None:
        """Test hook GLOBE_TEST_INTERRUPT_AFTER: stop like Ctrl-C (or, with a ":kill" suffix, like a killed
        process) after the N-th finished bank ("2"), after a named bank ("up/layer0"), or inside a bank's AM
        run right after one of its steps ("up/layer0@2")."""
        spec = self.interrupt_after
        if not spec:
            return
        target, _, how = spec.partition(":")
        target, _, at = target.partition("@")
        if at:
            hit = step is not None and target == label and str(step) == at
        elif step is not None:
            hit = False
        else:
            hit = self.parts_done == int(target) if target.isdigit() else target == label
        if not hit:
            return
        self.close()
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise KeyboardInterrupt


# --- commands -----------------------------------------------------------------------------------------------


def _existing_dir(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{what}: no such folder {p}")
    if not p.is_dir():
        raise UsageError(f"{what}: {p} is not a folder")
    return p.resolve()


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:
        return f"not available ({type(exc).__name__}: {exc})"
    return str(getattr(mod, "__version__", "unknown version"))


def globe_version() -> str:
    try:
        import globe

        v = getattr(globe, "__version__", None)
        if v:
            return str(v)
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return version("globe-moe")
    except Exception:
        return "unknown (not installed; running from the source tree)"


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from globe_kernels import ops

    print(f"globe         {globe_version()}  ({Path(__file__).resolve().parent})")
    print(f"python        {platform.python_version()} ({sys.executable})")
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    print(f"torch         {torch.__version__} ({cuda})")
    print(f"triton        {_version('triton')}")
    print(f"transformers  {_version('transformers')}")
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index or 0
        props = torch.cuda.get_device_properties(idx)
        desc = f"cuda:{idx} {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    elif device.type == "cuda":
        raise UsageError("--device: CUDA was asked for but torch sees no CUDA device")
    else:
        cuda_seen = "CUDA device present" if torch.cuda.is_available() else "no CUDA device"
        desc = f"{device.type} ({os.cpu_count()} CPU cores; {cuda_seen})"
    print(f"device        {desc}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("note          TRITON_INTERPRET is set: Triton kernels run in the interpreter when forced")
    print()
    print("compiled extension globe_kernels._C:")
    try:
        from globe_kernels import _ext

        status = _ext.status()
    except Exception as exc:
        status = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    if isinstance(status, dict):
        width = max((len(str(k)) for k in status), default=0)
        for key, value in status.items():
            print(f"  {str(key):<{width}}  {value}")
    else:
        print(f"  {status}")
    print()
    rows = ops.describe(device)
    print(f"op backends on {device.type} (GLOBE_BACKEND / GLOBE_BACKEND_<OP> force one):")
    w_op = max(len("op"), *(len(r["op"]) for r in rows))
    w_be = max(len("backend"), *(len(r["backend"]) for r in rows))
    print(f"  {'op':<{w_op}}  {'backend':<{w_be}}  status")
    last = None
    for r in rows:
        op = r["op"] if r["op"] != last else ""
        last = r["op"]
        print(f"  {op:<{w_op}}  {r['backend']:<{w_be}}  {r['status']}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path = _existing_dir(args.checkpoint, "CHECKPOINT")
    from globe.io import format_inspection, inspect_checkpoint

    info = inspect_checkpoint(path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_inspection(info))
    return 0


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name in the same folder, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _SweepKeyed:
    """A sink wrapper that puts the sweep key (seeding_method, m, r, target_support, lambda_B, lambda_A) on
    every record that lacks it (the run summary, for instance), so any record can be grouped by ablation."""

    def __init__(self, sink: Any, sweep: dict[str, Any]):
        self.sink = sink
        self.sweep = dict(sweep)

    def log(self, record: dict[str, Any]) -> None:
        self.sink.log({**self.sweep, **record})

    def close(self) -> None:
        self.sink.close()


def _make_sinks(out: Path, config: Any, args: argparse.Namespace, sweep: dict[str, Any]) -> list[Any]:
    from globe import logs

    sinks: list[Any] = [logs.JsonlSink(out / METRICS_FILE)]
    if args.wandb:
        try:
            sinks.append(
                logs.WandbSink(
                    args.wandb_project,
                    {**config.to_dict(), **sweep},
                    offline_if_no_credentials=True,
                    dir=str(out),  # the run's files stay with the rest of the output, not in the working folder
                )
            )
        except ImportError:
            raise UsageError("--wandb: the wandb package is not installed (pip install 'globe-moe[wandb]')") from None
    return [_SweepKeyed(sink, sweep) for sink in sinks]


def _close_all(objs: Sequence[Any]) -> None:
    for obj in objs:
        close = getattr(obj, "close", None) or getattr(obj, "finish", None)
        if close is not None:
            try:
                close()
            except Exception as exc:  # closing a sink must not hide the run's own outcome
                print(f"warning: could not close {type(obj).__name__}: {exc}", file=sys.stderr)


def clean_metrics(path: Path) -> int:
    """Drop the records of AM runs that an interruption cut short and a resumed run redid.

    Records are grouped by part (family, scope id); when a part's AM step counter starts again within the same
    restart (``GlobeConfig.restarts`` numbers its fits, each from step 0), the part was fitted again from the
    start, and its per-step records before that point (AM steps and refinement records) are dropped. Returns
    the number of records removed."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    from globe.report import part_of, step_of

    def per_step(rec: dict[str, Any]) -> bool:
        return rec.get("kind", "am_step") in ("am_step", "refine_step")

    keep = [True] * len(records)
    last: dict[Any, float] = {}
    for i, rec in enumerate(records):
        part, step = part_of(rec), step_of(rec)
        if step is None:
            continue
        key = (part, rec.get("restart"))
        if key in last and step <= last[key]:
            for j in range(i):
                if keep[j] and part_of(records[j]) == part and per_step(records[j]):
                    keep[j] = False
            last = {k: v for k, v in last.items() if k[0] != part}
        last[key] = step
    removed = len(lines) - sum(keep)
    if removed:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r, k in zip(records, keep) if k), encoding="utf-8")
        os.replace(tmp, path)
    return removed


def cmd_compress(args: argparse.Namespace) -> int:
    checkpoint = _existing_dir(args.checkpoint, "CHECKPOINT")
    out = Path(args.out).expanduser().resolve()
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    try:
        config = resolve_config(args, args.config_fields)
    except ConfigError as exc:
        raise ConfigError(_name_option(str(exc), args)) from None
    if args.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UsageError("--wandb: the wandb package is not installed (pip install 'globe-moe[wandb]')")
    from globe.io import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    # with --budget the search picks r, m and scope (compress records the choice), so the given ones are moot
    r, m, n = check_sizes(config, ckpt) if config.budget is None else (None, None, None)
    check_before_writing(config)
    resume, complete = prepare_output(out, config, checkpoint, resume=args.resume, overwrite=args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    sizes = (
        f"r, m, scope and center chosen for a budget of {config.budget} of the gate/up parameters"
        if config.budget is not None
        else f"r={r}, m={m} per bank over n={n} experts (scope {config.scope})"
    )
    say(
        f"compressing {ckpt.arch} at {checkpoint}: {len(ckpt.moe_layers)} MoE layers x {ckpt.num_experts} "
        f"experts, p={ckpt.expert_dim}, d={ckpt.hidden_size}; {sizes}, seeding {config.seeding}, "
        f"{config.steps} AM steps at most"
        + (f", then {config.refine_steps} {config.refine_method} refinement steps (phi {config.phi})"
           if config.refine_steps else "")
    )
    if not complete:
        _write_json(out / CONFIG_FILE, config.to_dict())
        _write_json(
            out / RUN_FILE,
            {
                "checkpoint": str(checkpoint),
                "command": [PROG, *(args.argv or [])],
                "globe_version": globe_version(),
                "resumed": resume,
            },
        )
    from globe.artifact import load_artifact

    times: dict[tuple[str, str], float] = {}
    if complete:
        say(f"{out} already holds the finished run with this config; nothing to redo")
        artifact = load_artifact(out)
        times = {
            tuple(k.split("/", 1)): v for k, v in ((_read_json(out / SUMMARY_FILE) or {}).get("times", {})).items()
        }
    else:
        from globe.compress import compress

        sweep = config.sweep_key(r, m)
        sinks = _make_sinks(out, config, args, sweep)
        progress = Progress(steps=config.steps + config.final_steps, enabled=not args.quiet)  # an upper bound
        t0 = time.perf_counter()
        try:
            artifact = compress(checkpoint, out, config, progress=progress, sinks=sinks, resume=resume)
        finally:
            progress.close()
            _close_all(sinks)
        times = progress.times
        removed = clean_metrics(out / METRICS_FILE)
        if removed:
            say(f"dropped {removed} metric records of steps redone after the interruption")
        say(f"fitted in {_fmt_seconds(time.perf_counter() - t0)}")
    return _finish_compress(out, checkpoint, ckpt, artifact, times, args)


def _finish_compress(
    out: Path, checkpoint: Path, ckpt: Any, artifact: Any, times: dict, args: argparse.Namespace
) -> int:
    from globe.evaluate import SUMMARY_COLUMNS, format_table, reconstruction_rows, stored_errors
    from globe.report import write_report

    # seconds per bank: the trainer's own fit time (kept across a resume), else what the progress bars saw
    for name, part in (artifact.metrics.get("parts") or {}).items():
        family, _, sid = name.partition(".")
        if isinstance(part, dict) and isinstance(part.get("fit_time_s"), (int, float)):
            times[(family, sid)] = float(part["fit_time_s"])
    # the errors the trainer measured while fitting (no second pass over the checkpoint); `globe eval`
    # recomputes them from the saved artifact
    errors = stored_errors(artifact)
    rows = reconstruction_rows(ckpt, artifact, times=times, errors=errors)
    params = artifact.num_parameters()
    summary = {
        "checkpoint": str(checkpoint),
        "rows": [{k: v for k, v in row.items() if k not in ("err2", "ref2")} for row in rows],
        "errors_from": "trainer" if errors is not None else "checkpoint",
        "parameters": params,
        "times": {f"{f}/{s}": t for (f, s), t in times.items()},
    }
    _write_json(out / SUMMARY_FILE, summary)
    report = write_report(out)
    print(format_table(rows, SUMMARY_COLUMNS))
    print(
        f"gate+up parameters: {params['dense']:,} dense -> {params['bank_mode']:,} in bank mode "
        f"({params['bank_mode'] / params['dense']:.3f}), {params['precomposed']:,} precomposed "
        f"({params['precomposed'] / params['dense']:.3f})"
    )
    print(f"artifact: {out}")
    print(f"report:   {report}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    checkpoint = _existing_dir(args.checkpoint, "CHECKPOINT")
    out = _existing_dir(args.out, "OUT")
    from globe.artifact import load_artifact
    from globe.evaluate import (
        SUMMARY_COLUMNS,
        format_agreement,
        format_table,
        output_agreement,
        reconstruction_rows,
    )
    from globe.io import open_checkpoint

    artifact = load_artifact(out)
    ckpt = open_checkpoint(checkpoint)
    rows = reconstruction_rows(ckpt, artifact)
    print(f"reconstruction of {checkpoint} by the artifact in {out}:")
    print(format_table(rows, [c for c in SUMMARY_COLUMNS if c[0] != "time_s"]))
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "reconstruction": [{k: v for k, v in row.items() if k not in ("err2", "ref2")} for row in rows],
    }
    if not args.no_model:
        import torch

        modes = ["precomposed", "bank"] if args.mode == "both" else [args.mode]
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        agreement = output_agreement(
            checkpoint, artifact, modes=modes, max_tokens=args.max_tokens, dtype=dtype, device=args.device
        )
        print()
        print(format_agreement(agreement))
        result["outputs"] = agreement
    _write_json(out / EVAL_FILE, result)
    if (out / METRICS_FILE).exists() or (out / SUMMARY_FILE).exists():
        from globe.report import write_report

        print(f"report:   {write_report(out, replot=False)} (updated with these results)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from globe.demo import run_demo

    return run_demo(out=args.out, keep=args.keep, small=args.small, quiet=args.quiet)


# --- parser -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="GloBE: compress the experts of Mixture-of-Experts models into shared banks of atoms.",
        epilog="Run 'globe COMMAND --help' for the options of a command. 'globe demo' shows the whole "
        "workflow on a synthetic model in a few minutes.",
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "info",
        help="versions, device, and the kernel backend of every op",
        description="Print the versions of python, torch, triton, transformers and globe, the "
        "device, the compiled extension's status, and for every op which backend is active "
        "and why the others are not.",
    )
    p.add_argument("--device", help="device to describe (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "inspect",
        help="what GloBE would compress in a checkpoint",
        description="Architecture, MoE layers, experts per layer, p, d, dtype and the share of "
        "the model's parameters held by routed experts, from config.json and the safetensors "
        "headers (no weights are read).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="local Hugging Face checkpoint folder")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "compress",
        help="fit the banks of a checkpoint and write the artifact, metrics and report",
        formatter_class=fmt,
        description="Compress the gate and up projections of every routed expert: extract, normalise, warm "
        "start, initial bank, alternating minimisation, finalize and export, per family.\n\n"
        "OUT receives the artifact (globe.json + factors.safetensors), the resolved config "
        "(compress_config.json, "
        "reusable with --config), metrics.jsonl (one line per AM step and refinement record), summary.json, and "
        "report.md with plots/. Options override the keys of --config, which override the defaults.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="local Hugging Face checkpoint folder")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder (created if missing)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of config keys (the names of the options "
        "below with underscores, e.g. lambda_A, T_min, seeding_options)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in OUT (same config and "
        "checkpoint): finished families/banks are kept, the rest is fitted again",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run in OUT")
    p.add_argument(
        "--wandb",
        action="store_true",
        help="also log to Weights & Biases (offline mode when no credentials are configured)",
    )
    p.add_argument("--wandb-project", default="globe", metavar="P", help="W&B project (default: globe)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or stage lines")
    p.set_defaults(func=cmd_compress, config_fields=_add_config_options(p))

    p = sub.add_parser(
        "eval",
        help="reconstruction errors and patched-vs-original model outputs",
        description="Reconstruction error per family and layer from the artifact in OUT, then the original "
        "model against the model patched with the artifact on a short English text shipped with GloBE: "
        "relative error of the logits, top-1 next-token agreement, perplexity of both. Checkpoints without a "
        "tokenizer are fed the text's bytes modulo the vocabulary size. Results go to OUT/eval.json and the "
        "report.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="the checkpoint folder that was compressed")
    p.add_argument("out", metavar="OUT", help="the output folder of 'globe compress'")
    p.add_argument(
        "--mode",
        choices=["both", "precomposed", "bank"],
        default="both",
        help="serving mode(s) of the patched model (default: both)",
    )
    p.add_argument(
        "--max-tokens",
        type=_at_least_two,
        default=256,
        metavar="N",
        help="tokens of the sample text fed to the models (default: 256, capped by the context)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="precision of both models (default: float32)",
    )
    p.add_argument("--device", help="device of both models, e.g. cuda (default: cpu)")
    p.add_argument("--no-model", action="store_true", help="reconstruction errors only; do not load the model")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo",
        help="the whole workflow on a synthetic model (no downloads, a few minutes)",
        description="Build a small synthetic Qwen3-MoE checkpoint in a temporary folder (experts with shared "
        "structure and decaying spectra; random attention and embeddings), compress it, evaluate it, "
        "generate a few tokens with the patched model, and print where the report is.",
    )
    p.add_argument("--out", metavar="DIR", help="folder for the run (default: a new temporary folder, kept)")
    p.add_argument("--keep", action="store_true", help="also keep the synthetic checkpoint")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``globe`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = argv
        return int(args.func(args) or 0)
    except UsageError as exc:
        msg = _one_line(exc)
        print(f"{msg if msg.startswith(PROG) else f'{PROG}: {msg}'}", file=sys.stderr)
        return 2
    except GlobeError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if argv and argv[0] == "compress":
            hint = "; continue with the same command and --resume"
        print(f"{PROG}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:
        if os.environ.get("GLOBE_DEBUG"):
            raise
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {_one_line(exc)} (set GLOBE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
