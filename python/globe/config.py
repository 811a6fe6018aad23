"""The trainer's configuration: :class:`GlobeConfig`, its validation and its resolution against shapes.

Sizes are given as presets or integers and resolved once the experts' shapes are known
(:meth:`GlobeConfig.resolve_r`, :meth:`GlobeConfig.resolve_m`):

* ``r`` (inner dimension of A_i B~_i): ``"p/2"``, ``"3p/4"``, ``"p"`` or an integer. The presets are fractions
  of ``q = min(p, d)``, not of p: W_i (p x d) has rank at most min(p, d), so when p > d (Mixtral: p=14336,
  d=4096) a preset relative to p would ask for a rank W cannot have. For every fine-grained MoE (p <= d) this
  is the same as relative to p. Presets round down and are at least 1; an integer must lie in [1, d].
  r > p (possible where p < d) is allowed: the product A_i B~_i still has rank <= p, but B~_i's r rows give
  each expert an r-dimensional row space to choose its p directions from, which at a large budget (about half
  the original parameters and more) fits better than r <= p at the same count (bench/RESULTS.md). r > d would
  add nothing: B~_i's rows then span all of R^d.
* ``m`` (atoms in the bank): ``"n/8"``, ``"n/4"``, ``"n/2"`` or an integer, n being the number of experts in
  the bank's scope (all layers' experts for scope ``global``, one layer's for scope ``layer``). Presets round
  down and are at least 1; m may not exceed the experts the bank is fitted on.

Regularisers are relative: ``lambda_A`` multiplies the mean diagonal of the adapter Gram matrices B~_i B~_iᵀ
and ``lambda_B`` the mean diagonal of the dictionary step's system, so their defaults do not depend on the
weights' scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from globe.errors import ConfigError

__all__ = ["GlobeConfig", "R_PRESETS", "M_PRESETS", "SPARSITIES", "SCOPES", "PHIS", "REFINE_METHODS",
           "WEIGHT_AWARE_SOLVERS"]

R_PRESETS = {"p/2": (1, 2), "3p/4": (3, 4), "p": (1, 1)}
M_PRESETS = {"n/8": (1, 8), "n/4": (1, 4), "n/2": (1, 2)}
SPARSITIES = ("entmax15", "sparsemax", "entmax_bisect", "topk")
SCOPES = ("global", "layer")
PHIS = ("identity", "tanh", "silu")
REFINE_METHODS = ("adam", "gn", "varpro", "varpro_gn", "auto")
WEIGHT_AWARE_SOLVERS = ("auto", "dense", "cg")
SEEDING_METHODS = ("ts_pca", "left_gram_pca", "svd", "spherical_kmeans", "residual_greedy")
INITS = ("subspace", "kmeans")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class GlobeConfig:
    """Every knob of the GloBE trainer (design document sections 1-4), with its defaults.

    r, m: sizes (presets or integers, see the module docstring). scope: "global" (one bank per family over all
    MoE layers) or "layer". seeding / seeding_options: the warm start of :mod:`globe.seeding` and its keyword
    arguments. sparsity: "entmax15", "sparsemax", "entmax_bisect" (with entmax_alpha) or "topk" (with top_k).
    target_support: median number of atoms per expert the temperature controller aims at, not a cap (the
    weight-aware code steps are accepted only where they lower the objective, so there the supports can stay
    above it; the budget search counts m slots per code for that reason). eps: epsilon-prune
    threshold on the codes. T0, T_min, T_max, eta: initial temperature, its bounds, the controller gain.
    lambda_A, lambda_B: relative ridge of the adapter refit and of the dictionary step. steps: AM steps at
    most;
    patience: steps without validation improvement (with stable supports) before stopping; val_fraction:
    experts held out of the dictionary step to measure generalisation. final_steps: after that validated phase
    (early stop or ``steps``), the best state is restored and this many more steps run with the held-out
    experts in the dictionary step too, so that every expert of the artifact is fitted by the bank; the step
    with the lowest error over all experts is kept (the validated state included). 0 leaves the held-out
    experts fitted with the bank frozen: on bench/bench_quality.py's data (r=32, weight-aware) they end at 0.27
    relative error against 0.09 for the others, and at 0.11 with the final pass (bench/bench_trainer_options.py,
    section final). weight_aware: fit codes and bank
    against the true objective sum_i ||W_i - A_i sum_j alpha_ij B_j||^2 instead of the proxies.
    weight_aware_solver: how the weight-aware steps are solved. "dense" assembles the bank's (m r) x (m r)
    normal equations and every expert's m x m code quadratic (exact; memory grows with (m r)^2, so it refuses
    a fit that would not fit in memory); "cg" never forms them: the bank step is a conjugate-gradient solve
    of the same equations (products through the composition, preconditioned by each atom's r x r block) and
    each code step restricts the quadratic to a few candidate atoms per expert (its support, then the atoms
    of most negative gradient), so the global scope of a real model fits; "auto" (default) takes "dense"
    where it fits in memory and "cg" elsewhere. The support search needs "dense".
    refresh_targets (proxy mode): after the first step, replace the fixed proxies by each expert's
    least-squares right factor given its current adapter, pinv(A_i) Z_i (fixes the per-expert gauge of the
    proxies). phi: the
    nonlinearity of the composition; the AM fits "identity" (the warm start) and "tanh" / "silu" are reached
    by the refinement stage, so they need refine_steps. center: subtract the per-family mean.
    init: the initial bank, "kmeans" (k-means over the flattened proxies, the design document's step) or
    "subspace" (k-subspaces over the proxies' row spaces, frame-free, one-hot codes; measured no better on
    planted data so far); init_restarts: draws of it, the one with the lowest training objective is kept.
    restarts: whole AM fits from seeds seed, seed + 1, ... (warm start, initial bank and every step), the one
    with the lowest training objective (with held-out experts: the lowest error over all experts) kept, then
    refined; the cost is linear. The AM converges to a local minimum that depends on the start: on the planted
    sets of tests/test_am.py one weight-aware fit reaches the noise floor on 6 of 10, the best of 4 on 9 of 10
    (bench/bench_trainer_options.py, section restarts).
    seed, device, dtype: reproducibility and placement of the fit.

    budget: when set, a fraction in (0, 1] of the original gate/up parameters; :func:`globe.compress.compress` then
    chooses r, m, scope and center by a short search on a sample of experts (:func:`globe.budget.choose_by_budget`)
    and records the candidates (with refine_steps set, each scored after the AM and up to 10 refinement steps); the
    r, m, scope and center given here are replaced by the winner's. refine_steps:
    iterations of the refinement through phi after the AM (:func:`globe.refine.apply_refinement`: early-stopped on
    the held-out experts, then continued over all experts with the steps left, as a bank refined on some experts
    alone soon fits the others worse); None or 0: no refinement, which phi other than "identity" does not allow
    (fit_bank raises ConfigError). Where all of a bank's experts at once would exceed the device's memory or
    GLOBE_REFINE_MAX_GB (:func:`globe.am.refine_plan`), the refinement works on chunks of experts (the same steps;
    at the global scope of Qwen3-30B-A3B, r = 384, m = 1536: about 207 GiB with the experts instead of 333);
    fit_bank refuses, before the AM starts, only a refinement that does not fit even one expert at a time.
    refine_method: "auto" (the default: "varpro_gn" where the AM's adapters are badly conditioned, "varpro"
    elsewhere; see :func:`globe.refine.auto_method`), "varpro" (the adapters solved exactly every step, Adam on bank and
    codes), "varpro_gn" (the adapters solved exactly, preconditioned Gauss-Newton steps on the bank, Adam on the
    codes), "adam" (Adam on A, bank and codes jointly) or "gn" (block Gauss-Newton / Levenberg-Marquardt);
    ``python bench/bench_refine.py --compare`` compares them at equal CPU time. refine_lr: Adam's learning rate,
    relative to each tensor's RMS (None: the method's own, :data:`globe.refine.DEFAULT_LR`: 0.1 for "varpro"
    and "adam", which beat 0.01 at every time on every suite there; 0.01 for the codes of "varpro_gn").
    refine_time_limit: seconds of refinement at most (None: no limit). coherence: relative weight mu of the
    atom-coherence penalty mu sum_{j != k} <B_j, B_k>^2 in the proxy-mode dictionary step (:func:`globe.coherence.
    mod_solve_with_coherence`; 0 = the plain MOD solve; not available with weight_aware); coherence_iters:
    its preconditioned gradient iterations at most.

    Weight-aware moves (used only with weight_aware=True; the proxy mode re-estimates its codes from the proxies
    every step, so they would not persist there). support_search: rounds of the support search per AM step
    (0 = off): every expert tries to swap one atom of its support for an outside atom (and, below the target
    support, to add one), each candidate scored by the true objective with the adapter eliminated, kept only
    if that expert's error drops (:func:`globe.am._support_search`). support_candidates: outside atoms tried
    per expert, the most promising first (all of them when m - support <= support_candidates).
    spectral_bank: each step also try the bank in which every expert's composed atoms lie closest to its
    dominant row space, all atoms in one common frame (an eigenproblem of size (used atoms x d), kept only if
    the objective drops; :func:`globe.am._spectral_bank`); spectral_max_dim: the largest (used atoms x d) for
    which it is tried (a dense float64 matrix of that side, factorised by Cholesky: at 4096 about 130 MB and a
    second or two on CPU).
    Measured on planted data (tests/test_am.py): neither move alone reaches the noise floor, both together do
    on 6 of 10 planted sets (the others end in other local minima of the bank; see restarts). On
    bench/bench_quality.py's data (shared mean, expert-specific terms) they change the error little (0.2491 ->
    0.2455 at r=16, 0.0986 -> 0.0957 at r=32) and cost several plain steps each (the support search about 1 s
    per step at N=64, m=16, r=32, against 0.1 s for the rest of the step); the refinement stage makes better
    use of that time there (0.0684 in the same 20 s). On `globe demo`'s gate experts the weight-aware fit
    takes 125 s with both moves and 4.4 s without, for 0.0781 against 0.0789 (bench/bench_trainer_options.py,
    section moves). So both are off by default: turn
    them on (support_search=1, spectral_bank=True) for data with a sharply planted sparse structure.
    fit_mean (with center=True): every step also refit the shared mean term,
    M = mean_i (W_i - A_i B~_i) over the training experts (its exact minimiser, so the training objective stays
    non-increasing), instead of keeping the experts' average. On bench/synthetic_suites.py's clustered family
    (budget 0.25, global, no held-out experts, 40 steps, both moves off) it takes the weight-aware AM from
    0.195 to 0.149 (bench/bench_trainer_options.py, section mean). Off by default: with held-out experts
    (bench/bench_quality.py's data, same section) the training error drops (0.093 against 0.105) but the
    held-out experts' error never improves on step 1 (0.335 against 0.304 without), so early stopping keeps
    step 1.
    center stays True by default: on that data, which has a shared mean, the weight-aware fit ends at 0.25
    centred and 0.44 uncentred; the planted model of the tests has no mean and needs center=False.
    """

    r: str | int = "p/2"
    m: str | int = "n/4"
    scope: str = "global"
    seeding: str = "ts_pca"
    seeding_options: dict[str, Any] = field(default_factory=dict)
    sparsity: str = "entmax15"
    entmax_alpha: float = 1.5
    top_k: int | None = None
    target_support: int = 4
    eps: float = 1e-3
    T0: float = 1.0
    T_min: float = 0.05
    T_max: float = 20.0
    eta: float = 0.5
    lambda_A: float = 1e-4
    lambda_B: float = 1e-4
    steps: int = 30
    patience: int = 5
    min_improvement: float = 1e-4
    support_tol: float = 0.02
    val_fraction: float = 0.1
    weight_aware: bool = False
    weight_aware_solver: str = "auto"
    refresh_targets: bool = True
    pg_iters: int = 100
    kmeans_iters: int = 20
    init: str = "kmeans"
    init_restarts: int = 1
    restarts: int = 1
    final_steps: int = 3
    phi: str = "identity"
    center: bool = True
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    budget: float | None = None
    refine_steps: int | None = None
    refine_method: str = "auto"
    refine_lr: float | None = None
    refine_time_limit: float | None = None
    coherence: float = 0.0
    coherence_iters: int = 20
    support_search: int = 0
    support_candidates: int = 4
    spectral_bank: bool = False
    spectral_max_dim: int = 4096
    fit_mean: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # --- validation -------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ConfigError naming the first field that is invalid."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"GlobeConfig.{name}: {why} (got {getattr(self, name)!r})")

        def check_int(name: str, lo: int, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise bad(name, f"must be an integer >= {lo}")

        def check_float(name: str, lo: float, strict: bool = False, hi: float | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise bad(name, "must be a number")
            if (v <= lo) if strict else (v < lo):
                raise bad(name, f"must be {'>' if strict else '>='} {lo}")
            if hi is not None and v > hi:
                raise bad(name, f"must be <= {hi}")

        if isinstance(self.r, str):
            if self.r not in R_PRESETS:
                raise bad("r", f"must be one of {sorted(R_PRESETS)} or a positive integer")
        else:
            check_int("r", 1)
        if isinstance(self.m, str):
            if self.m not in M_PRESETS:
                raise bad("m", f"must be one of {sorted(M_PRESETS)} or a positive integer")
        else:
            check_int("m", 1)
        if self.scope not in SCOPES:
            raise bad("scope", f"must be one of {SCOPES}")
        if not isinstance(self.seeding, str) or not self.seeding:
            raise bad("seeding", "must name a warm start method")
        if not isinstance(self.seeding_options, dict):
            raise bad("seeding_options", "must be a dict of keyword arguments")
        if self.sparsity not in SPARSITIES:
            raise bad("sparsity", f"must be one of {SPARSITIES}")
        check_float("entmax_alpha", 1.0, strict=True)
        check_int("top_k", 1, allow_none=True)
        if self.sparsity == "topk" and self.top_k is None:
            raise bad("top_k", 'must be set when sparsity="topk"')
        check_int("target_support", 1)
        check_float("eps", 0.0, hi=0.5)
        check_float("T_min", 0.0, strict=True)
        check_float("T_max", 0.0, strict=True)
        check_float("T0", 0.0, strict=True)
        if self.T_min > self.T_max:
            raise bad("T_min", f"must not exceed T_max={self.T_max}")
        if not self.T_min <= self.T0 <= self.T_max:
            raise bad("T0", f"must lie in [T_min, T_max] = [{self.T_min}, {self.T_max}]")
        check_float("eta", 0.0)
        check_float("lambda_A", 0.0)
        check_float("lambda_B", 0.0)
        check_int("steps", 0)
        check_int("patience", 1)
        check_float("min_improvement", 0.0)
        check_float("support_tol", 0.0, hi=1.0)
        check_float("val_fraction", 0.0, hi=0.5)
        if not isinstance(self.weight_aware, bool):
            raise bad("weight_aware", "must be a bool")
        if not isinstance(self.refresh_targets, bool):
            raise bad("refresh_targets", "must be a bool")
        check_int("pg_iters", 0)
        check_int("kmeans_iters", 0)
        if self.init not in INITS:
            raise bad("init", f"must be one of {INITS}")
        check_int("init_restarts", 1)
        check_int("restarts", 1)
        check_int("final_steps", 0)
        if self.phi not in PHIS:
            raise bad("phi", f"must be one of {PHIS}")
        if not isinstance(self.center, bool):
            raise bad("center", "must be a bool")
        check_int("seed", 0)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise bad("device", "must be a torch device string such as 'cpu' or 'cuda'") from None
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {sorted(DTYPES)}")
        if self.budget is not None:
            check_float("budget", 0.0, strict=True, hi=1.0)
        check_int("refine_steps", 0, allow_none=True)
        if self.refine_method not in REFINE_METHODS:
            raise bad("refine_method", f"must be one of {REFINE_METHODS}")
        if self.weight_aware_solver not in WEIGHT_AWARE_SOLVERS:
            raise bad("weight_aware_solver", f"must be one of {WEIGHT_AWARE_SOLVERS}")
        if self.refine_lr is not None:
            check_float("refine_lr", 0.0, strict=True)
        if self.refine_time_limit is not None:
            check_float("refine_time_limit", 0.0, strict=True)
        check_float("coherence", 0.0)
        check_int("coherence_iters", 0)
        check_int("support_search", 0)
        check_int("support_candidates", 1)
        if not isinstance(self.spectral_bank, bool):
            raise bad("spectral_bank", "must be a bool")
        if not isinstance(self.fit_mean, bool):
            raise bad("fit_mean", "must be a bool")
        check_int("spectral_max_dim", 1)
        if self.coherence > 0 and self.weight_aware:
            raise bad("coherence", "the coherence penalty acts on the proxy-mode dictionary step; it is not "
                                   "available with weight_aware=True")

    # --- resolution -------------------------------------------------------------------------------------

    def resolve_r(self, p: int, d: int) -> int:
        """The inner dimension for experts of shape p x d (presets are fractions of min(p, d); an integer may
        be up to d, see the module docstring)."""
        if isinstance(self.r, str):
            num, den = R_PRESETS[self.r]
            return max(1, (min(p, d) * num) // den)
        if self.r > d:
            raise ConfigError(
                f"GlobeConfig.r: {self.r} exceeds d = {d} for experts of shape {p} x {d} (the atoms' rows would "
                "span all of R^d)"
            )
        return int(self.r)

    def resolve_m(self, n: int) -> int:
        """The number of atoms for a bank over n experts."""
        if isinstance(self.m, str):
            num, den = M_PRESETS[self.m]
            return max(1, (n * num) // den)
        if self.m > n:
            raise ConfigError(f"GlobeConfig.m: {self.m} atoms for a bank over only {n} experts")
        return int(self.m)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    # --- serialisation ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GlobeConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"GlobeConfig.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"GlobeConfig: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(names))}"
            )
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"GlobeConfig: {exc}") from None

    def replace(self, **changes: Any) -> GlobeConfig:
        return GlobeConfig.from_dict({**self.to_dict(), **changes})

    def fingerprint(self) -> str:
        """SHA-256 of the settings that change the factors (device excluded: it changes placement only).

        The budget, refinement and coherence settings enter only when they differ from their defaults, so a
        default config keeps the fingerprint it had before they existed (partial results stay resumable). The
        weight-aware moves (support search, spectral bank) enter only with weight_aware=True: they change the
        factors there, so a weight-aware fit from before them does not resume into one with them.
        """
        data = self.to_dict()
        data.pop("device", None)
        for name, default in _LATER_DEFAULTS.items():
            if data.get(name) == default:
                data.pop(name)
        if not self.weight_aware:  # these act in the weight-aware mode only
            for name in _WEIGHT_AWARE_FIELDS:
                data.pop(name, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def sweep_key(self, r: int | None = None, m: int | None = None) -> dict[str, Any]:
        """The design document's ablation key: (seeding_method, m, r, target_support, lambda_B, lambda_A)."""
        return {
            "seeding_method": self.seeding,
            "m": m if m is not None else self.m,
            "r": r if r is not None else self.r,
            "target_support": self.target_support,
            "lambda_B": self.lambda_B,
            "lambda_A": self.lambda_A,
        }


# fields added after the first release: left out of the fingerprint while at their defaults
_LATER_FIELDS = ("budget", "refine_steps", "refine_method", "refine_lr", "refine_time_limit", "coherence",
                 "coherence_iters", "fit_mean", "restarts", "final_steps", "weight_aware_solver")
# fields that act only in the weight-aware mode: left out of the fingerprint without it
_WEIGHT_AWARE_FIELDS = ("support_search", "support_candidates", "spectral_bank", "spectral_max_dim", "fit_mean",
                        "weight_aware_solver")
_LATER_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(GlobeConfig) if f.name in _LATER_FIELDS
}


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
