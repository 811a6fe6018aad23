"""Ahead-of-time compilation of every Triton kernel variant for sm_80 and sm_90, without a GPU.

Runs triton's real compiler and ptxas (which triton ships), so it catches what the interpreter forgives. The
compilation runs in a subprocess with TRITON_INTERPRET=0: under the interpreter ``triton.jit`` builds objects
that cannot be compiled, and CI runs the whole suite with TRITON_INTERPRET=1. One subprocess per kernel
module compiles all of that module's variants (in parallel), results are cached by triton.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from globe_kernels.triton import aot  # noqa: E402

SPECS = aot.iter_specs()
CASES = [(s["module"], s["name"], cc) for s in SPECS for cc in aot.CCS]
_results: dict[str, dict[tuple[str, int], dict]] = {}


def results_for(module: str) -> dict[tuple[str, int], dict]:
    if module not in _results:
        rows = aot.compile_all(aot.CCS, modules=[module])
        _results[module] = {(r["name"], r["cc"]): r for r in rows}
    return _results[module]


@pytest.mark.slow
@pytest.mark.parametrize("module,name,cc", CASES, ids=[f"{name}-sm{cc}" for _, name, cc in CASES])
def test_compiles(module, name, cc):
    row = results_for(module)[(name, cc)]
    assert row["error"] is None, row["error"]
    assert row["ptx_bytes"] > 0 and row["ptx_target"].startswith(f"sm_{cc}")
    assert row["cubin_bytes"] > 0
    if row.get("spill_bytes") is not None:  # None or absent: the tools to read it are missing
        spilled = f"{name} spills {row['spill_bytes']} bytes on sm_{cc} ({row['registers']} registers)"
        assert row["spill_bytes"] == 0, spilled
    if cc < 90:
        assert not row["wgmma"]


def test_every_kernel_module_lists_specs():
    assert {s["module"] for s in SPECS} == set(aot.kernel_modules())
    for spec in SPECS:
        arg_names = spec["kernel"].arg_names
        assert set(spec["signature"]) == set(arg_names), spec["name"]
        constexpr_args = {k for k, v in spec["signature"].items() if v == "constexpr"}
        assert constexpr_args == set(spec["constexprs"]), spec["name"]


def test_compose_specs_cover_the_launcher():
    from globe_kernels.reference import PHIS
    from globe_kernels.triton import compose as tc

    got = {
        (sig["bank_ptr"], sig["out_ptr"], c["PHI"], c["BLOCK"], s["num_warps"], s["num_stages"])
        for s in SPECS
        if s["module"].endswith(".compose")
        for sig, c in [(s["signature"], s["constexprs"])]
    }
    want = set()
    for bank in tc.BANK_DTYPES:
        for out in tc.BANK_DTYPES:
            store = tc.kernel_out_dtype(bank, out)
            for phi in PHIS:
                for block, warps, stages in tc.CONFIGS:
                    want.add(("*" + tc._TL_NAMES[bank], "*" + tc._TL_NAMES[store], phi, block, warps, stages))
    assert got == want


def test_prune_renorm_specs_cover_the_launcher():
    from globe_kernels.triton import prune_renorm as tp

    got = {(s["signature"]["alpha_ptr"], s["constexprs"]["ROWS"], s["constexprs"]["BLOCK_M"], s["num_warps"])
           for s in SPECS if s["module"].endswith(".prune_renorm")}
    want = {("*" + tp._TL_NAMES[d], *tp.config_for(m)) for d in tp.DTYPES for m in (1, 64, 65, 5000)}
    assert got == want


def test_compile_spec_refuses_interpreted_kernels():
    spec = next(s for s in SPECS if s["module"].endswith(".compose"))
    if type(spec["kernel"]).__name__ != "InterpretedFunction":
        pytest.skip("the interpreter is off in this process")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_spec(spec, 90)
