"""The build of globe_kernels._C: the CUDA sources compile (no GPU needed), setup.py's switches, and the
package working without any extension.

The CUDA kernel (csrc/cholesky_kernel.cu) is plain CUDA C++ without torch headers, so nvcc compiles it here
for real (ptxas included); `-Xptxas -v` reports registers and spills per kernel. The torch binding
(csrc/cholesky_cuda.cpp) is checked with the host compiler against torch's headers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    return None


NVCC = find_nvcc()


def ptxas_report(log: str) -> dict[tuple[str, str], dict[str, int]]:
    """Per (kernel, arch) from `-Xptxas -v`: registers, spill stores, spill loads, stack bytes."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
        if m:
            current = out.setdefault((m.group(1), m.group(2)), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return out


ARCHS = ("sm_90", "sm_80")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
def test_cuda_kernel_compiles_without_spills(tmp_path):
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    proc = subprocess.run(
        [
            NVCC,
            *gencode,
            "-O3",
            "-std=c++17",
            "-Xptxas",
            "-v",
            "-c",
            str(CSRC / "cholesky_kernel.cu"),
            "-o",
            str(tmp_path / "cholesky_kernel.o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    kernels = {key: info for key, info in ptxas_report(log).items() if "cholesky_solve_kernel" in key[0]}
    # per arch one kernel per dtype: ...cholesky_solve_kernelIfE... (float) and ...IdE... (double)
    assert sorted(arch for _, arch in kernels) == sorted(ARCHS * 2), log
    summary = "; ".join(
        f"{arch} {'fp32' if 'IfE' in name else 'fp64'}: {k['registers']} registers, "
        f"{k['spill_stores']} B spill stores, {k['spill_loads']} B spill loads"
        for (name, arch), k in sorted(kernels.items(), key=lambda kv: kv[0][::-1])
    )
    print(f"\nptxas: {summary}")
    for info in kernels.values():
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, summary
        assert info["registers"] <= 255, summary


@pytest.mark.slow  # ~12 s of CPU: torch's headers
@pytest.mark.skipif(NVCC is None or shutil.which("c++") is None, reason="needs nvcc (for CUDA headers) and c++")
def test_cuda_binding_compiles(tmp_path):
    """cholesky_cuda.cpp against torch's headers and the CUDA runtime headers (syntax and types only).

    A CPU build of torch ships c10/cuda but not the generated c10/cuda/impl/cuda_cmake_macros.h; a stand-in
    with the usual content is provided then.
    """
    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    homes = [CUDA_HOME, Path(NVCC).resolve().parent.parent, "/usr/local/cuda"]
    cuda_include = next(
        (Path(h, "include") for h in homes if h and Path(h, "include", "cuda_runtime_api.h").exists()), None
    )
    if cuda_include is None:
        pytest.skip(f"no CUDA runtime headers under {homes}")
    includes = [*include_paths(), str(cuda_include)]
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, str(tmp_path / "stub"))
    cmd = ["c++", "-std=c++20", "-fsyntax-only", "-Wall", "-DGLOBE_WITH_CUDA"]
    cmd += [f for p in includes for f in ("-isystem", p)]
    proc = subprocess.run([*cmd, str(CSRC / "cholesky_cuda.cpp")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr


def load_setup_module():
    spec = importlib.util.spec_from_file_location("globe_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines extensions(); setup() runs only as __main__
    return module


def test_setup_and_jit_agree_on_the_sources():
    from globe_kernels import _ext

    setup_py = load_setup_module()
    assert set(setup_py.CPU_SOURCES) == set(_ext.CPU_SOURCES)
    assert set(setup_py.CUDA_SOURCES) == set(_ext.CUDA_SOURCES)
    on_disk = {p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu")}
    assert on_disk == set(setup_py.CPU_SOURCES) | set(setup_py.CUDA_SOURCES)


def test_setup_switches(monkeypatch):
    setup_py = load_setup_module()
    for name in ("GLOBE_SKIP_EXT", "GLOBE_FORCE_CUDA"):
        monkeypatch.delenv(name, raising=False)

    monkeypatch.setenv("GLOBE_SKIP_EXT", "1")
    assert setup_py.extensions() == ([], {})
    monkeypatch.delenv("GLOBE_SKIP_EXT")

    exts, cmdclass = setup_py.extensions()
    assert [e.name for e in exts] == ["globe_kernels._C"] and "build_ext" in cmdclass
    sources = [Path(s).name for s in exts[0].sources]
    cuda = any(s.endswith(".cu") for s in sources)
    assert set(sources) == set(setup_py.CPU_SOURCES) | (set(setup_py.CUDA_SOURCES) if cuda else set())
    if not torch.version.cuda:
        assert not cuda
        monkeypatch.setenv("GLOBE_FORCE_CUDA", "1")
        with pytest.raises(RuntimeError, match="GLOBE_FORCE_CUDA=1, but the installed torch .* not a CUDA build"):
            setup_py.extensions()


NO_EXT_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    # an editable install's finder would resolve globe_kernels._C in the source tree, beside this copy
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    fmt = "LOG %(name)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=fmt)
    import torch
    import globe_kernels._ext  # importing must neither build nor log
    print("IMPORTED", file=sys.stderr, flush=True)
    from globe_kernels import ops, reference
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(5, 6, 15, generator=gen, dtype=torch.float64)
    G, R = B @ B.mT, torch.randn(5, 4, 6, generator=gen, dtype=torch.float64)
    G[2] = -G[2]
    for _ in range(2):
        A, n_bad = ops.cholesky_solve_batched(G, R, 0.1)
    A_ref, n_ref = reference.cholesky_solve_batched(G, R, 0.1)
    assert torch.allclose(A, A_ref, rtol=1e-12, atol=1e-12) and n_bad == n_ref == 1
    rows = {x["backend"]: x["status"] for x in ops.describe("cpu") if x["op"] == "cholesky_solve_batched"}
    status = globe_kernels._ext.status()
    print(json.dumps({"counts": ops.backend_counts(), "describe": rows, "status": status}))
    """
)


def test_works_without_the_extension(tmp_path):
    """GLOBE_NO_JIT=1 and no built extension: the op runs on torch, one log line says why."""
    pkg = tmp_path / "globe_kernels"
    shutil.copytree(ROOT / "globe_kernels", pkg, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLOBE_")}
    env.update(GLOBE_NO_JIT="1", PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", NO_EXT_SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["counts"] == {"cholesky_solve_batched": {"torch": 2}}
    assert out["describe"]["ext"].startswith("unavailable") and "GLOBE_NO_JIT" in out["describe"]["ext"]
    assert out["describe"]["torch"] == "ACTIVE"
    assert out["status"]["available"] is False and out["status"]["path"] is None
    before, _, after = proc.stderr.partition("IMPORTED")
    assert "LOG globe_kernels" not in before
    lines = [line for line in after.splitlines() if line.startswith("LOG globe_kernels")]
    assert len(lines) == 1 and "GLOBE_NO_JIT" in lines[0] and "no installed globe_kernels._C" in lines[0], after
