"""Builds the optional compiled extension ``globe_kernels._C``; everything else is in pyproject.toml.

The extension holds the batched small Cholesky factor + solve (sources in ``csrc/``): always the CPU kernel,
and the CUDA kernel when CUDA is on. The package installs and works without it (``globe_kernels._ext`` then
builds it just in time, or the ops run on torch).

Environment:
    GLOBE_SKIP_EXT=1     build no extension at all.
    GLOBE_FORCE_CUDA=1   build the CUDA kernel even when no GPU is visible (e.g. on a build machine), as long
                         as torch is a CUDA build and nvcc is found (CUDA_HOME); fails with a message
                         otherwise. Without it, the CUDA kernel is built when torch is a CUDA build, nvcc is
                         found and a GPU is visible.
    TORCH_CUDA_ARCH_LIST the GPU architectures to compile for (read by torch's BuildExtension); when forcing
                         a build with no visible GPU and this is unset, "8.0;9.0+PTX" is used.
    MAX_JOBS             parallel compile jobs (ninja).

No downloads, no git: this file only declares what to compile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup

CSRC = "csrc"
CPU_SOURCES = ["bindings.cpp", "cholesky_cpu.cpp"]
CUDA_SOURCES = ["cholesky_cuda.cpp", "cholesky_kernel.cu"]
DEFAULT_FORCED_ARCHS = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"globe setup: {msg}", file=sys.stderr)


def _cuda_wanted() -> bool:
    """Whether to build the CUDA kernel; raises when GLOBE_FORCE_CUDA=1 cannot be honoured."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    has_nvcc = nvcc is not None and nvcc.exists()
    if _flag("GLOBE_FORCE_CUDA"):
        if not torch.version.cuda:
            raise RuntimeError(
                f"GLOBE_FORCE_CUDA=1, but the installed torch {torch.__version__} is not a CUDA build; "
                "install a CUDA build of torch, or unset GLOBE_FORCE_CUDA to build the CPU kernel only"
            )
        if not has_nvcc:
            raise RuntimeError(
                f"GLOBE_FORCE_CUDA=1, but nvcc was not found (CUDA_HOME={CUDA_HOME!r}); set CUDA_HOME to the "
                "CUDA toolkit that matches torch's CUDA " + str(torch.version.cuda)
            )
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_FORCED_ARCHS
            _say(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: compiling for {DEFAULT_FORCED_ARCHS}")
        return True
    if not torch.version.cuda:
        _say(f"torch {torch.__version__} is a CPU build: building the CPU kernel only")
        return False
    if not has_nvcc:
        _say(f"nvcc not found (CUDA_HOME={CUDA_HOME!r}): building the CPU kernel only")
        return False
    if not torch.cuda.is_available():
        _say("no GPU visible: building the CPU kernel only (GLOBE_FORCE_CUDA=1 builds the CUDA kernel anyway)")
        return False
    return True


def shared_libstdcxx() -> list[str]:
    """Link flags that make the extension use the process's shared C++ runtime.

    A toolchain that links libstdc++ statically by default puts a second copy of the C++ runtime into the
    extension; the first error message it formats (an ostream in that copy, never initialised) then crashes the
    process instead of raising. Naming libstdc++.so.6 first binds those symbols to the shared library that
    torch already loaded. Nothing is added where the compiler cannot find the shared library. Mirrored in
    globe_kernels/_ext.py for the just-in-time build.
    """
    if not sys.platform.startswith("linux"):
        return []
    cxx = os.environ.get("CXX", "c++")
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return ["-l:libstdc++.so.6"] if os.path.isabs(found.stdout.strip()) else []


def extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); both empty with GLOBE_SKIP_EXT=1."""
    if _flag("GLOBE_SKIP_EXT"):
        _say("GLOBE_SKIP_EXT=1: not building globe_kernels._C")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cuda = _cuda_wanted()
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []  # at::parallel_for is serial without it
    link = [*openmp, *shared_libstdcxx()]
    # no -march: the CPU kernel carries its own AVX2+FMA clone, chosen at run time (see csrc/cholesky_cpu.cpp);
    # -ffp-contract=fast lets the compiler fuse its multiply-adds whatever the language mode's default
    fp_contract = [] if sys.platform == "win32" else ["-ffp-contract=fast"]
    cxx = ["-O3", *fp_contract, *openmp]
    macros = [("GLOBE_WITH_CUDA", None)] if cuda else []
    sources = [f"{CSRC}/{s}" for s in CPU_SOURCES + (CUDA_SOURCES if cuda else [])]
    if cuda:
        ext = CUDAExtension(
            "globe_kernels._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("globe_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    _say(f"building globe_kernels._C ({'CPU + CUDA' if cuda else 'CPU'}) from {', '.join(sources)}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
