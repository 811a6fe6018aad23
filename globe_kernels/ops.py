"""The GloBE ops and their dispatcher: the only kernel API the trainer and the inference patch call.

Every op has a registry of backends in priority order, each with the devices it serves and a loader that
imports its implementation lazily (so importing this module costs nothing and never needs triton or the
compiled extension). Selection per call:

* forced: the environment (``GLOBE_BACKEND=torch`` for every op, ``GLOBE_BACKEND_COMPOSE=triton`` for one)
  or the context manager :func:`use_backend`; a forced backend that cannot run raises.
* automatic: the first registered backend that serves the tensor's device and loads; if it raises, the call
  falls back to the next one, the fallback is counted and logged once.

:func:`backend_counts` tells the trainer which path ran; :func:`describe` feeds ``globe info``.

Each op is also a ``torch.library`` custom op (namespace ``globe``) with a fake implementation, so a patched
model traces under ``torch.compile`` without looking inside the kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import reference
from .reference import SparseCodes, to_dense_codes, to_sparse_codes

__all__ = [
    "SparseCodes",
    "to_sparse_codes",
    "to_dense_codes",
    "compose",
    "prune_renorm",
    "adapter_gemm",
    "cholesky_solve_batched",
    "group_by_expert",
    "use_backend",
    "backend_counts",
    "reset_counts",
    "describe",
    "OPS",
]

log = logging.getLogger("globe_kernels")

OPS = ("compose", "prune_renorm", "adapter_gemm", "cholesky_solve_batched")


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (missing package, wrong device, extension not built)."""


@dataclass
class Backend:
    name: str
    devices: frozenset[str]
    target: str  # "module:function"
    # extra availability rule beyond the device: returns a reason string when the backend cannot run
    requires: Callable[[], str | None] | None = None
    # availability on a particular device once loaded (e.g. an extension built without its CUDA part)
    device_check: Callable[[torch.device], str | None] | None = None
    _fn: Callable | None = None
    _error: str | None = None

    def load(self) -> Callable:
        if self._fn is not None:
            return self._fn
        if self._error is not None:
            raise BackendUnavailable(self._error)
        reason = self.requires() if self.requires else None
        if reason is None:
            module, _, attr = self.target.partition(":")
            try:
                self._fn = getattr(importlib.import_module(module), attr)
                return self._fn
            except Exception as exc:  # ImportError, or the extension's own build error
                reason = f"{type(exc).__name__}: {exc}"
        self._error = reason
        raise BackendUnavailable(reason)

    def unavailable_reason(self) -> str | None:
        try:
            self.load()
            return None
        except BackendUnavailable as exc:
            return str(exc)


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _needs_triton() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({exc})"
    return None


_REGISTRY: dict[str, list[Backend]] = {op: [] for op in OPS}


def register_backend(
    op: str, name: str, devices: set[str] | frozenset[str], target: str, requires=None, device_check=None
) -> None:
    """Add a backend to an op's registry (later registrations have lower priority)."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; ops are {OPS}")
    _REGISTRY[op] = [b for b in _REGISTRY[op] if b.name != name]
    _REGISTRY[op].append(Backend(name, frozenset(devices), target, requires, device_check))


def _ext_serves(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    from . import _ext

    return None if _ext.status(load_ext=False)["cuda"] else "the extension was built without its CUDA part"


for _op in ("compose", "prune_renorm", "adapter_gemm"):
    register_backend(_op, "triton", {"cuda"}, f"globe_kernels.triton.{_op}:{_op}", _needs_triton)
register_backend(
    "cholesky_solve_batched", "ext", {"cpu", "cuda"}, "globe_kernels._ext:cholesky_solve_batched", None, _ext_serves
)
for _op in OPS:
    register_backend(_op, "torch", {"cpu", "cuda", "mps", "xpu", "meta"}, f"globe_kernels.reference:{_op}")


# --- selection --------------------------------------------------------------------------------

_forced_ctx: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("globe_forced", default=None)
_counts: Counter = Counter()
_fallbacks: Counter = Counter()
_warned: set[tuple[str, str]] = set()


@contextlib.contextmanager
def use_backend(name: str, ops: str | tuple[str, ...] | None = None) -> Iterator[None]:
    """Force a backend inside a ``with`` block; a forced backend that cannot run raises.

    With ops=None the backend is forced on every op that has it (``use_backend("triton")`` leaves the Cholesky
    op, which has no Triton backend, to automatic selection); named ops must all have it."""
    if ops is None:
        ops = tuple(op for op in OPS if name in {b.name for b in _REGISTRY[op]})
        if not ops:
            raise KeyError(f"no op has a backend {name!r}")
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    for op in ops:
        if op not in _REGISTRY:
            raise KeyError(f"unknown op {op!r}; ops are {OPS}")
        if name not in {b.name for b in _REGISTRY[op]}:
            raise KeyError(f"op {op!r} has no backend {name!r}; it has {[b.name for b in _REGISTRY[op]]}")
    token = _forced_ctx.set({**(_forced_ctx.get() or {}), **{op: name for op in ops}})
    try:
        yield
    finally:
        _forced_ctx.reset(token)


def forced_backend(op: str) -> str | None:
    """The backend forced for op by use_backend or the environment, or None."""
    forced = (_forced_ctx.get() or {}).get(op)
    if forced:
        return forced
    env = os.environ.get(f"GLOBE_BACKEND_{op.upper()}") or os.environ.get("GLOBE_BACKEND")
    if env:
        names = [b.name for b in _REGISTRY[op]]
        if env not in names:
            if os.environ.get(f"GLOBE_BACKEND_{op.upper()}"):
                raise ValueError(f"GLOBE_BACKEND_{op.upper()}={env!r} is not a backend of {op}: {names}")
            return None  # a global choice applies only to the ops that have that backend
        return env
    return None


def _serves(backend: Backend, device: torch.device) -> bool:
    if device.type in backend.devices:
        return True
    # the Triton interpreter runs kernels on CPU tensors; used when triton is forced, never chosen by itself
    return backend.name == "triton" and device.type == "cpu" and _triton_interpret()


def _run(op: str, device: torch.device, *args, **kwargs):
    forced = forced_backend(op)
    if forced is not None:
        backend = next(b for b in _REGISTRY[op] if b.name == forced)
        if not _serves(backend, device):
            raise BackendUnavailable(f"backend {forced!r} of {op} does not serve {device.type} tensors")
        fn = backend.load()
        out = fn(*args, **kwargs)
        _counts[(op, forced)] += 1
        return out
    errors = []
    for backend in _REGISTRY[op]:
        if device.type not in backend.devices:
            continue
        try:
            fn = backend.load()
            reason = backend.device_check(device) if backend.device_check else None
            if reason is not None:
                raise BackendUnavailable(reason)
        except BackendUnavailable as exc:
            errors.append(f"{backend.name}: {exc}")
            continue
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:
            if backend.name == "torch":
                raise
            _fallbacks[(op, backend.name)] += 1
            if (op, backend.name) not in _warned:
                _warned.add((op, backend.name))
                log.warning("globe_kernels: %s backend %r failed (%s); falling back", op, backend.name, exc)
            errors.append(f"{backend.name}: {exc}")
            continue
        _counts[(op, backend.name)] += 1
        return out
    raise BackendUnavailable(f"no backend of {op} can run on {device.type}: " + "; ".join(errors))


def backend_counts() -> dict[str, dict[str, int]]:
    """Calls per op and backend since the last reset, and fallbacks as ``"<backend>->fallback"``."""
    out: dict[str, dict[str, int]] = {}
    for (op, name), c in _counts.items():
        out.setdefault(op, {})[name] = c
    for (op, name), c in _fallbacks.items():
        out.setdefault(op, {})[f"{name}->fallback"] = c
    return out


def reset_counts() -> None:
    _counts.clear()
    _fallbacks.clear()


def describe(device: str | torch.device | None = None) -> list[dict[str, str]]:
    """For each op and backend on a device: whether it would be used, and why not otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for op in OPS:
        chosen = None
        forced = forced_backend(op)
        for backend in _REGISTRY[op]:
            if forced is not None and backend.name != forced:
                status = f"not used: {forced!r} is forced"
            elif not _serves(backend, device):
                status = f"not used: serves {sorted(backend.devices)}, not {device.type}"
            else:
                reason = backend.unavailable_reason()
                if reason is None and backend.device_check is not None:
                    reason = backend.device_check(device)
                if reason is not None:
                    status = f"unavailable: {reason}"
                elif chosen is None:
                    chosen = backend.name
                    status = "ACTIVE" + (" (forced)" if forced else "")
                else:
                    status = f"standby: {chosen!r} has priority"
            rows.append({"op": op, "backend": backend.name, "status": status})
    return rows


# --- custom ops --------------------------------------------------------------------------------
# Sparse codes travel as two optional tensors because custom-op schemas take tensors, not tuples.


def _codes(indices: torch.Tensor | None, values: torch.Tensor | None) -> SparseCodes | None:
    return None if indices is None else SparseCodes(indices, values)


@torch.library.custom_op("globe::compose", mutates_args=())
def _compose_op(
    bank: torch.Tensor,
    alpha: torch.Tensor | None,
    indices: torch.Tensor | None,
    values: torch.Tensor | None,
    phi: str,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    codes = alpha if alpha is not None else SparseCodes(indices, values)
    return _run("compose", bank.device, bank, codes, phi, out_dtype)


@_compose_op.register_fake
def _(bank, alpha, indices, values, phi, out_dtype):
    n = alpha.shape[0] if alpha is not None else indices.shape[0]
    return bank.new_empty((n, bank.shape[1], bank.shape[2]), dtype=out_dtype or bank.dtype)


@torch.library.custom_op("globe::prune_renorm", mutates_args=())
def _prune_renorm_op(alpha: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("prune_renorm", alpha.device, alpha, eps)


@_prune_renorm_op.register_fake
def _(alpha, eps):
    return torch.empty_like(alpha), alpha.new_empty((alpha.shape[0],), dtype=torch.int32)


@torch.library.custom_op("globe::adapter_gemm", mutates_args=())
def _adapter_gemm_op(
    x: torch.Tensor,
    offsets: torch.Tensor,
    adapter_gate: torch.Tensor,
    adapter_up: torch.Tensor,
    composed_gate: torch.Tensor | None,
    composed_up: torch.Tensor | None,
    bank_gate: torch.Tensor | None,
    indices_gate: torch.Tensor | None,
    values_gate: torch.Tensor | None,
    bank_up: torch.Tensor | None,
    indices_up: torch.Tensor | None,
    values_up: torch.Tensor | None,
    phi: str,
    shift_gate: torch.Tensor | None,
    shift_up: torch.Tensor | None,
    act: str,
    out_dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    out = _run(
        "adapter_gemm",
        x.device,
        x,
        offsets,
        adapter_gate,
        adapter_up,
        composed_gate=composed_gate,
        composed_up=composed_up,
        bank_gate=bank_gate,
        codes_gate=_codes(indices_gate, values_gate),
        bank_up=bank_up,
        codes_up=_codes(indices_up, values_up),
        phi=phi,
        shift_gate=shift_gate,
        shift_up=shift_up,
        act=None if act == "none" else act,
        out_dtype=out_dtype,
    )
    return list(out) if isinstance(out, tuple) else [out]


@_adapter_gemm_op.register_fake
def _(x, offsets, adapter_gate, adapter_up, *rest):
    act, out_dtype = rest[-2], rest[-1]
    shape = (x.shape[0], adapter_gate.shape[1])
    one = x.new_empty(shape, dtype=out_dtype or x.dtype)
    return [one] if act != "none" else [one, x.new_empty(shape, dtype=out_dtype or x.dtype)]


@torch.library.custom_op("globe::cholesky_solve_batched", mutates_args=())
def _cholesky_op(G: torch.Tensor, R: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    A, n_fallback = _run("cholesky_solve_batched", G.device, G, R, lam)
    return A, torch.tensor(int(n_fallback), dtype=torch.int64)


@_cholesky_op.register_fake
def _(G, R, lam):
    return torch.empty_like(R), torch.empty((), dtype=torch.int64)


# --- public API --------------------------------------------------------------------------------


def _eager() -> bool:
    """Outside torch.compile call the dispatcher directly: the custom-op layer is only needed for tracing, and
    its first call imports torch._dynamo (seconds of start-up for a command-line run)."""
    return not torch.compiler.is_compiling()


def compose(
    bank: torch.Tensor,
    alpha: torch.Tensor | SparseCodes,
    phi: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """B~_i = phi(sum_j alpha_ij B_j): bank [m, r, d], alpha [n, m] or SparseCodes -> [n, r, d]."""
    phi = reference.check_phi(phi)
    if _eager():
        return _run("compose", bank.device, bank, alpha, phi, out_dtype)
    if isinstance(alpha, SparseCodes):
        return _compose_op(bank, None, alpha.indices, alpha.values, phi, out_dtype)
    return _compose_op(bank, alpha, None, None, phi, out_dtype)


def prune_renorm(alpha: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero entries below eps, renormalise rows to 1 (an emptied row keeps its largest entry).

    Returns (pruned alpha, support size per row as int32)."""
    if _eager():
        return _run("prune_renorm", alpha.device, alpha, float(eps))
    return _prune_renorm_op(alpha, float(eps))


def adapter_gemm(
    x: torch.Tensor,
    offsets: torch.Tensor,
    adapter_gate: torch.Tensor,
    adapter_up: torch.Tensor,
    *,
    composed_gate: torch.Tensor | None = None,
    composed_up: torch.Tensor | None = None,
    bank_gate: torch.Tensor | None = None,
    codes_gate: SparseCodes | None = None,
    bank_up: torch.Tensor | None = None,
    codes_up: SparseCodes | None = None,
    phi: str | None = None,
    shift_gate: torch.Tensor | None = None,
    shift_up: torch.Tensor | None = None,
    act: str | None = "silu",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """silu(A_g B~_g x + shift_g) * (A_u B~_u x + shift_u) per routed token; (gate, up) when act=None.

    x [T, d] sorted by expert, offsets [n+1] (expert e owns rows offsets[e]:offsets[e+1]). Give composed_*
    [n, r, d] (precomposed mode) or bank_* [m, r, d] with codes_* SparseCodes (bank mode).
    """
    if (composed_gate is None) == (bank_gate is None) or (composed_up is None) == (bank_up is None):
        raise ValueError("adapter_gemm: give composed_gate/up or bank_gate/up (with codes), not both")
    if bank_gate is not None and (codes_gate is None or codes_up is None):
        raise ValueError("adapter_gemm: bank mode needs codes_gate and codes_up (SparseCodes)")
    if _eager():
        return _run(
            "adapter_gemm",
            x.device,
            x,
            offsets,
            adapter_gate,
            adapter_up,
            composed_gate=composed_gate,
            composed_up=composed_up,
            bank_gate=bank_gate,
            codes_gate=codes_gate,
            bank_up=bank_up,
            codes_up=codes_up,
            phi=reference.check_phi(phi),
            shift_gate=shift_gate,
            shift_up=shift_up,
            act=act,
            out_dtype=out_dtype,
        )
    ig, vg = (codes_gate.indices, codes_gate.values) if codes_gate is not None else (None, None)
    iu, vu = (codes_up.indices, codes_up.values) if codes_up is not None else (None, None)
    out = _adapter_gemm_op(
        x,
        offsets,
        adapter_gate,
        adapter_up,
        composed_gate,
        composed_up,
        bank_gate,
        ig,
        vg,
        bank_up,
        iu,
        vu,
        reference.check_phi(phi),
        shift_gate,
        shift_up,
        "none" if act is None else act,
        out_dtype,
    )
    return out[0] if act is not None else (out[0], out[1])


def cholesky_solve_batched(G: torch.Tensor, R: torch.Tensor, lam: float) -> tuple[torch.Tensor, int]:
    """A_i = R_i (G_i + lam I)^-1 for G [n, r, r] SPD, R [n, p, r]; returns (A, systems that fell back)."""
    if _eager():
        A, n_fallback = _run("cholesky_solve_batched", G.device, G, R, float(lam))
    else:
        A, n_fallback = _cholesky_op(G, R, float(lam))
    return A, int(n_fallback)


def group_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort flat routing assignments by expert.

    expert_ids [S] (e.g. top_k_index.flatten()) -> (perm [S], offsets [num_experts + 1] int32) such that
    expert_ids[perm] is sorted and expert e owns rows offsets[e]:offsets[e+1] of x[perm]."""
    perm = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=expert_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return perm, offsets
