"""The compiled extension ``globe_kernels._C``: load it, or build it just in time, or say why not.

:func:`load` returns the extension module, trying once per process (the result, or the failure, is cached):

1. the installed ``globe_kernels._C`` (built by ``pip install``; see setup.py);
2. otherwise, when the C++ sources sit next to the package (a source checkout or an editable install) and
   ``GLOBE_NO_JIT`` is not set, a just-in-time build with ``torch.utils.cpp_extension.load`` (ninja) into a
   cache directory (``GLOBE_EXT_DIR``, default ``~/.cache/globe_kernels/ext/<python>-<torch>-<cpu|cuXY>``);
   the first build takes about a minute, later processes reuse it;
3. otherwise :class:`ExtensionUnavailable` with the reason.

One line on the ``globe_kernels`` logger says which path was taken and why.

The op: :func:`cholesky_solve_batched` (same contract as ``globe_kernels.reference.cholesky_solve_batched``)
runs the C++ kernel on CPU tensors and the CUDA kernel on CUDA tensors when the extension was built with CUDA
and r is small enough (``status()["cuda_max_r"]``); otherwise it raises, and the dispatcher falls back to
torch. Accessing the attribute ``cholesky_solve_batched`` loads the extension, so a missing extension shows
up to the dispatcher as an unavailable backend. Importing this module builds nothing.

Environment:
    GLOBE_NO_JIT=1      never build just in time (use an installed extension or none).
    GLOBE_EXT_DIR       where just-in-time builds go.
    GLOBE_EXT_VERBOSE=1 show the compiler's output during a just-in-time build.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

# cholesky_solve_batched is provided by the module __getattr__ below
__all__ = [  # noqa: F822
    "ExtensionUnavailable", "load", "status", "missing_build_tools", "cuda_max_r", "cholesky_solve_batched"
]

log = logging.getLogger("globe_kernels")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("bindings.cpp", "cholesky_cpu.cpp")
CUDA_SOURCES = ("cholesky_cuda.cpp", "cholesky_kernel.cu")
JIT_NAME = "globe_kernels_C"


class ExtensionUnavailable(RuntimeError):
    """globe_kernels._C is neither installed nor buildable here (the message says why)."""


_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_info: dict = {"path": None, "reason": "not loaded yet", "build_dir": None, "seconds": None}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def missing_build_tools() -> list[str]:
    """What a just-in-time build lacks here: a C++ compiler, ninja (empty when both are present)."""
    from torch.utils.cpp_extension import is_ninja_available

    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"C++ compiler ({cxx})")
    if not is_ninja_available():
        missing.append("ninja")
    return missing


def _jit_cuda() -> tuple[bool, str]:
    """(build the CUDA kernel too?, why not)."""
    if not torch.version.cuda:
        return False, "torch is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME

    if not CUDA_HOME or not Path(CUDA_HOME, "bin", "nvcc").exists():
        return False, "nvcc not found"
    if not torch.cuda.is_available():
        return False, "no GPU visible"
    return True, ""


def _build_dir(cuda: bool) -> Path:
    root = os.environ.get("GLOBE_EXT_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "globe_kernels" / "ext"
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if cuda else "cpu"
    torch_version = torch.__version__.split("+")[0]
    return base / f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch_version}-{flavour}"


def _shared_libstdcxx() -> list[str]:
    """``-l:libstdc++.so.6`` where the compiler finds it (see shared_libstdcxx in setup.py for why)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        found = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libstdc++.so.6"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return ["-l:libstdc++.so.6"] if os.path.isabs(found.stdout.strip()) else []


def _jit_build(cuda: bool) -> tuple[ModuleType, Path]:
    from torch.utils.cpp_extension import load as cpp_load

    build_dir = _build_dir(cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    names = CPU_SOURCES + (CUDA_SOURCES if cuda else ())
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    fp_contract = [] if sys.platform == "win32" else ["-ffp-contract=fast"]  # the same flags as setup.py
    defines = ["-DGLOBE_WITH_CUDA"] if cuda else []
    # torch's loader hashes the sources and these flags within a process and reruns ninja (which tracks the
    # headers too) in every new one, so an edited kernel is rebuilt on the next load
    module = cpp_load(
        name=JIT_NAME,
        sources=[str(CSRC / s) for s in names],
        extra_cflags=["-O3", *fp_contract, *openmp, *defines],
        extra_cuda_cflags=["-O3", *defines],
        extra_ldflags=[*openmp, *_shared_libstdcxx()],
        build_directory=str(build_dir),
        with_cuda=cuda,
        verbose=_env_flag("GLOBE_EXT_VERBOSE"),
    )
    return module, build_dir


def _load_uncached() -> tuple[ModuleType, str]:
    """(module, the log line) or raises ExtensionUnavailable."""
    try:
        module = importlib.import_module("globe_kernels._C")
        _info.update(path="installed", reason="")
        return module, f"globe_kernels: using the installed extension {module.__file__}"
    except ImportError as exc:
        installed = (
            "no installed globe_kernels._C"
            if isinstance(exc, ModuleNotFoundError) and exc.name == "globe_kernels._C"
            else f"the installed globe_kernels._C does not import ({exc})"
        )
    if _env_flag("GLOBE_NO_JIT"):
        raise ExtensionUnavailable(f"{installed} and GLOBE_NO_JIT=1 forbids building it just in time")
    missing = [s for s in CPU_SOURCES + CUDA_SOURCES if not (CSRC / s).exists()]
    if missing:
        raise ExtensionUnavailable(f"{installed} and no C++ sources to build it from ({CSRC} lacks {missing})")
    tools = missing_build_tools()
    if tools:
        raise ExtensionUnavailable(f"{installed} and a just-in-time build needs {' and '.join(tools)}")
    cuda, no_cuda = _jit_cuda()
    start = time.perf_counter()
    try:
        module, build_dir = _jit_build(cuda)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtensionUnavailable(
            f"{installed} and the just-in-time build failed ({type(exc).__name__}: {first_line}); "
            "GLOBE_EXT_VERBOSE=1 shows the compiler output"
        ) from exc
    seconds = time.perf_counter() - start
    _info.update(path="jit", reason=installed, build_dir=str(build_dir), seconds=round(seconds, 1))
    kind = "CPU + CUDA" if cuda else f"CPU only: {no_cuda}"
    return module, (f"globe_kernels: {installed}; built it just in time ({kind}) in {build_dir} ({seconds:.1f} s)")


def load() -> ModuleType:
    """The compiled extension module; raises ExtensionUnavailable (with the reason) when there is none."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise ExtensionUnavailable(_error)
        try:
            module, line = _load_uncached()
        except ExtensionUnavailable as exc:
            _error = str(exc)
            _info.update(path=None, reason=_error)
            # an explicit opt-out is not a problem worth a warning
            (log.info if _env_flag("GLOBE_NO_JIT") else log.warning)("globe_kernels: extension unavailable: %s", exc)
            raise
        _module = module
        log.info("%s", line)
        return module


def status(load_ext: bool = True) -> dict:
    """What ``globe info`` shows: available, path ("installed" | "jit" | None), cuda, cuda_max_r, reason, ...

    With load_ext=False nothing is loaded or built; the answer then reflects only earlier attempts.
    """
    if load_ext:
        try:
            load()
        except ExtensionUnavailable:
            pass
    module = _module
    return {
        "available": True if module is not None else (False if _error is not None else None),
        "path": _info["path"],
        "module_file": getattr(module, "__file__", None),
        "cuda": bool(getattr(module, "with_cuda", 0)),
        "cuda_max_r": int(getattr(module, "cuda_max_r", 0)),
        "jit_allowed": not _env_flag("GLOBE_NO_JIT"),
        "sources": str(CSRC) if (CSRC / CPU_SOURCES[0]).exists() else None,
        "build_dir": _info["build_dir"],
        "build_seconds": _info["seconds"],
        "reason": _info["reason"],
    }


def cuda_smem_bytes(r: int, elem_size: int, threads: int) -> int:
    """Shared memory one block of the CUDA kernel needs (mirrors cholesky_cuda_smem_bytes in csrc)."""
    return 8 * r + elem_size * (r + r * (r + 1) + r * (threads + 1))


def cuda_max_r(dtype: torch.dtype, device: torch.device | str | int | None = None) -> int:
    """Largest r the CUDA kernel takes in this dtype on this device (0 without the CUDA kernel).

    Checked here, before the call, so that a system too large for the device's shared memory falls back to
    torch without an exception crossing the compiled code.
    """
    module = load()
    if not getattr(module, "with_cuda", 0) or not torch.cuda.is_available():
        return 0
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    optin = int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))
    elem = torch.empty((), dtype=dtype).element_size()
    r = int(module.cuda_max_r)
    while r > 0 and cuda_smem_bytes(r, elem, int(module.cuda_threads)) > optin:
        r -= 1
    return r


def _cholesky_solve_batched(G: torch.Tensor, R: torch.Tensor, lam: float) -> tuple[torch.Tensor, int]:
    """A_i = R_i (G_i + lam I)^-1 for n symmetric systems: G [n, r, r], R [n, p, r] -> (A, n_fallback).

    The compiled kernel factors G_i + lam I by Cholesky and solves; systems it flags as not positive definite
    are solved here by least squares, as the reference does, and counted.
    """
    if G.dim() != 3 or G.shape[1] != G.shape[2]:
        raise ValueError(f"G must be [n, r, r], got shape {tuple(G.shape)}")
    if R.dim() != 3 or R.shape[0] != G.shape[0] or R.shape[2] != G.shape[1]:
        raise ValueError(f"R must be [n, p, {G.shape[1]}] to match G {tuple(G.shape)}, got {tuple(R.shape)}")
    if G.dtype not in (torch.float32, torch.float64) or R.dtype != G.dtype:
        raise TypeError(f"the extension takes float32 or float64 G and R of one dtype, got {G.dtype}, {R.dtype}")
    if G.device != R.device:
        raise ValueError(f"G and R must be on one device, got {G.device} and {R.device}")
    module = load()
    r = G.shape[1]
    if G.device.type == "cuda":
        if not getattr(module, "with_cuda", 0):
            raise ExtensionUnavailable("globe_kernels._C was built without its CUDA kernel")
        limit = cuda_max_r(G.dtype, G.device)
        if r > limit:
            raise NotImplementedError(
                f"the CUDA kernel takes r <= {limit} in {G.dtype} on this device (one system per block in shared "
                f"memory), got r={r}"
            )
    elif G.device.type != "cpu":
        raise ExtensionUnavailable(f"the extension has no kernel for {G.device.type} tensors")
    A, failed = torch.ops.globe_ext.cholesky_solve_batched(G, R, float(lam))
    n_bad = int(failed.sum().item())
    if n_bad:
        idx = failed.nonzero().squeeze(1)
        Gl = G[idx] + lam * torch.eye(r, dtype=G.dtype, device=G.device)
        A[idx] = torch.linalg.lstsq(Gl, R[idx].transpose(1, 2)).solution.transpose(1, 2)
    return A, n_bad


def __getattr__(name: str):
    # the op is reached through the attribute so that a missing extension surfaces at lookup time
    if name == "cholesky_solve_batched":
        load()
        return _cholesky_solve_batched
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"cholesky_solve_batched"})
