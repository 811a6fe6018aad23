"""Ahead-of-time compilation of every Triton kernel configuration, without a GPU.

Each kernel module of ``globe_kernels.triton`` exposes ``aot_specs() -> list[dict]``; a spec holds

    name          unique id of the variant
    kernel        the @triton.jit function
    signature     {arg name: triton type}, e.g. "*fp32", "*bf16", "i32", "fp32", "constexpr"
    constexprs    {arg name: value} for every "constexpr" argument
    num_warps, num_stages
    divisible_by_16   (optional) arg names the JIT would specialise as 16-divisible (aligned pointers,
                      multiples of 16), so the AOT build sees the same vectorisation as a real launch
    attrs         (optional) the same in ASTSource's own form, {(arg index,): [["tt.divisibility", 16]]}

:func:`compile_spec` runs the real front end, LLVM and ptxas for a compute capability through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. That needs the kernels to be real
``JITFunction`` objects: under ``TRITON_INTERPRET=1`` ``triton.jit`` builds interpreter objects instead, so
:func:`compile_all` runs in a fresh process with the interpreter off (``python -m globe_kernels.triton.aot``).

Register counts and the stack frame are read from the cubin with the ``cuobjdump`` that ships with triton
(triton does not keep its ptxas log); a kernel with a stack frame is run through ``ptxas -v`` again to
tell spills from local arrays.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

REQUIRED_KEYS = ("name", "kernel", "signature", "constexprs", "num_warps", "num_stages")
CCS = (80, 90)


def kernel_modules() -> list[str]:
    """Names of every module of globe_kernels.triton except this one."""
    from globe_kernels import triton as pkg

    return sorted(
        f"{pkg.__name__}.{info.name}"
        for info in pkgutil.iter_modules(pkg.__path__)
        if info.name != "aot" and not info.name.startswith("_")
    )


def iter_specs(modules: list[str] | None = None) -> list[dict]:
    """Every spec of every kernel module (or of the named ones, short or full names).

    A module that fails to import or has no aot_specs raises: a kernel that cannot be listed cannot be checked.
    """
    specs: list[dict] = []
    names = kernel_modules()
    if modules is not None:
        wanted = {m if "." in m else f"globe_kernels.triton.{m}" for m in modules}
        unknown = wanted - set(names)
        if unknown:
            raise ValueError(f"no kernel modules {sorted(unknown)}; there are {names}")
        names = [n for n in names if n in wanted]
    for mod_name in names:
        mod = importlib.import_module(mod_name)
        if not hasattr(mod, "aot_specs"):
            raise AttributeError(f"{mod_name} has no aot_specs(); every Triton kernel module must list its variants")
        for spec in mod.aot_specs():
            missing = [k for k in REQUIRED_KEYS if k not in spec]
            if missing:
                raise ValueError(f"{mod_name}: spec {spec.get('name')!r} lacks {missing}")
            specs.append({**spec, "module": mod_name})
    names = [s["name"] for s in specs]
    dups = sorted({x for x in names if names.count(x) > 1})
    if dups:
        raise ValueError(f"duplicate AOT spec names: {dups}")
    return specs


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def compile_spec(spec: dict, cc: int):
    """Compile one spec for compute capability cc (e.g. 80, 90); returns triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = spec["kernel"]
    if _is_interpreted(kernel):
        raise RuntimeError(
            f"{spec['name']}: the kernel was built under TRITON_INTERPRET=1 and cannot be compiled; "
            "use compile_all() (a subprocess with the interpreter off)"
        )
    arg_names = kernel.arg_names
    signature = dict(spec["signature"])
    unknown = set(signature) - set(arg_names)
    if unknown or len(signature) != len(arg_names):
        raise ValueError(f"{spec['name']}: signature keys {sorted(signature)} do not match arguments {arg_names}")
    signature = {name: signature[name] for name in arg_names}
    attrs = {}
    for key, hints in spec.get("attrs", {}).items():  # ASTSource form: {(arg index,): [[attr, value]]}
        attrs[(arg_names.index(key),) if isinstance(key, str) else tuple(key)] = [list(h) for h in hints]
    for a in spec.get("divisible_by_16", ()):
        attrs.setdefault((arg_names.index(a),), []).append(["tt.divisibility", 16])
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(spec["constexprs"]), attrs=attrs)
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def _cuobjdump() -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def resource_usage(cubin: bytes) -> dict[str, int] | None:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, or None when it cannot be read."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if m is None:
        return None
    return dict(zip(("registers", "stack", "shared", "local"), map(int, m.groups())))


def ptxas_spills(ptx: str, cc: int) -> dict[str, int] | None:
    """Registers and spill bytes from ``ptxas -v`` on the PTX (the options triton uses), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(cc).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cc)}",
               src, "-o", os.path.join(tmp, "k.o")]
        try:
            log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        except (OSError, subprocess.CalledProcessError):
            return None
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        return None
    return {"registers": int(regs[1]), "spill_bytes": int(spills[1]) + int(spills[2])}


def summarize(compiled, spec: dict, cc: int) -> dict:
    """What a test or a report needs to know about one compiled variant."""
    ptx = compiled.asm.get("ptx", "")
    cubin = compiled.asm.get("cubin", b"")
    usage = resource_usage(cubin) if cubin else None
    row = {
        "name": spec["name"],
        "module": spec.get("module"),
        "cc": cc,
        "ptx_bytes": len(ptx),
        "cubin_bytes": len(cubin),
        "ptx_target": (re.search(r"\.target\s+(\w+)", ptx) or [None, None])[1],
        "shared": getattr(compiled.metadata, "shared", None),
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "wgmma": "wgmma" in ptx,
        "mma": bool(re.search(r"\bmma\.sync", ptx)),
        "vector_loads": bool(re.search(r"ld\.global(\.\w+)*\.v[24]", ptx)),
        "cp_async": "cp.async" in ptx,
    }
    if usage is not None:
        row.update(registers=usage["registers"], stack_bytes=usage["stack"], spill_bytes=0)
        if usage["stack"] or usage["local"]:  # a stack frame: ask ptxas whether it holds spills
            exact = ptxas_spills(ptx, cc)
            row["spill_bytes"] = None if exact is None else exact["spill_bytes"]
    return row


_WORKER_SPECS: list[dict] | None = None
_WORKER_MODULES: list[str] | None = None


def _init_worker(modules) -> None:
    global _WORKER_MODULES, _WORKER_SPECS
    _WORKER_MODULES, _WORKER_SPECS = modules, None


def _compile_one(job: tuple[int, int]) -> dict:
    global _WORKER_SPECS
    if _WORKER_SPECS is None:
        _WORKER_SPECS = iter_specs(_WORKER_MODULES)
    i, cc = job
    spec = _WORKER_SPECS[i]
    t0 = time.perf_counter()
    try:
        row = summarize(compile_spec(spec, cc), spec, cc)
        row["error"] = None
    except Exception as exc:  # reported per variant, the caller decides
        row = {"name": spec["name"], "module": spec.get("module"), "cc": cc, "error": f"{type(exc).__name__}: {exc}"}
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _compile_here(ccs, jobs: int, modules=None) -> list[dict]:
    specs = iter_specs(modules)
    work = [(i, cc) for i in range(len(specs)) for cc in ccs]
    _init_worker(modules)
    if jobs <= 1:
        return [_compile_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(modules,)) as pool:
        return list(pool.map(_compile_one, work, chunksize=2))


def compile_all(ccs=CCS, jobs: int | None = None, modules: list[str] | None = None, timeout: float = 900.0) -> list[dict]:
    """Compile every spec (of the named modules) for every cc in a fresh process with the interpreter off.

    Returns one summary dict per (spec, cc) with "error" None or the compiler's message. Compiled kernels
    land in triton's cache (TRITON_CACHE_DIR), so a second run only reads them back.
    """
    jobs = jobs or min(os.cpu_count() or 1, 8)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "aot.json")
        cmd = [sys.executable, "-m", "globe_kernels.triton.aot", "--json", path, "--jobs", str(jobs)]
        cmd += ["--cc", *map(str, ccs)] + (["--module", *modules] if modules else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"AOT compile process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(path) as f:
            return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compile every Triton kernel variant of globe_kernels ahead of time.")
    ap.add_argument("--cc", type=int, nargs="+", default=list(CCS), help="compute capabilities (default 80 90)")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes")
    ap.add_argument("--module", nargs="+", help="only these kernel modules (e.g. compose prune_renorm)")
    ap.add_argument("--json", help="write the per-variant summaries here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("run with TRITON_INTERPRET=0: the interpreter replaces kernels with objects triton cannot compile")
    rows = _compile_here(args.cc, args.jobs, args.module)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for row in rows:
        status = "ERROR " + row["error"] if row["error"] else (
            f"regs={row.get('registers')} spill={row.get('spill_bytes')} wgmma={row['wgmma']} "
            f"v_loads={row['vector_loads']} cp_async={row['cp_async']}"
        )
        print(f"sm_{row['cc']} {row['name']}: {status} ({row['seconds']} s)")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
