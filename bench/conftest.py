"""pytest plumbing for the op microbenchmarks (bench/bench_ops.py): the size option and the summary table.

Each benchmark reports its median (from pytest-benchmark) with the FLOPs and bytes it counts through the
``bench_record`` fixture; at the end of the session the rows of one case (op, model, variant) are paired
with their baseline and printed as a markdown table. ``--bench-table PATH`` also writes the table to a file.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import pytest
import torch

_ROWS_KEY = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("globe benchmarks")
    group.addoption(
        "--bench-size",
        choices=("auto", "small", "full"),
        default=os.environ.get("GLOBE_BENCH_SIZE", "auto"),
        help="model shapes at full size or scaled down (auto: small on CPU, full on CUDA; env GLOBE_BENCH_SIZE)",
    )
    group.addoption("--bench-table", default=None, help="also write the summary table (markdown) to this file")


def pytest_configure(config):
    config.stash[_ROWS_KEY] = []


@pytest.fixture(scope="session")
def bench_size(request) -> str:
    size = request.config.getoption("--bench-size")
    if size == "auto":
        size = "full" if torch.cuda.is_available() else "small"
    return size


@pytest.fixture
def bench_record(request, benchmark):
    """bench_record(case, impl, flops=, bytes=, backend=) after the benchmark ran: stores its median."""
    rows = request.config.stash[_ROWS_KEY]

    def record(case: str, impl: str, *, flops: float = 0.0, nbytes: float = 0.0, backend: str = "") -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: the function ran once, untimed
            return
        s = stats.stats
        rows.append(
            {
                "case": case,
                "impl": impl,
                "median": s.median,
                "iqr": s.iqr,
                "rounds": s.rounds,
                "flops": flops,
                "bytes": nbytes,
                "backend": backend,
            }
        )

    return record


def _device_line() -> str:
    if torch.cuda.is_available():
        dev = f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
        except OSError:
            pass
        dev = f"CPU {model}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    try:
        import triton

        tri = f", triton {triton.__version__}"
    except Exception:
        tri = ""
    return f"{datetime.date.today()} {platform.node()}: {dev}; torch {torch.__version__}{tri}"


def summary_table(rows: list[dict], size: str) -> list[str]:
    """Markdown lines: one row per measured implementation, with the case's baseline and the ratio."""
    lines = [
        f"## Op microbenchmarks ({size} shapes)",
        "",
        _device_line(),
        "",
        "baseline/impl > 1 means the GloBE op is faster; GFLOP/s and GB/s come from counted FLOPs and bytes.",
        "",
        "| case | impl (backend) | median ms (IQR) | baseline | baseline ms | baseline/impl | GFLOP/s | GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cases: dict[str, dict[str, dict]] = {}
    for row in rows:
        cases.setdefault(row["case"], {})[row["impl"]] = row
    for case, impls in cases.items():
        base = impls.get("torch")
        for impl, row in impls.items():
            if impl == "torch":
                continue
            t = row["median"]
            gflops = f"{row['flops'] / t / 1e9:.1f}" if row["flops"] else ""
            gbs = f"{row['bytes'] / t / 1e9:.1f}" if row["bytes"] else ""
            backend = f" ({row['backend']})" if row["backend"] else ""
            b_ms = f"{base['median'] * 1e3:.3f}" if base else ""
            ratio = f"{base['median'] / t:.2f}" if base else ""
            lines.append(
                f"| {case} | {impl}{backend} | {t * 1e3:.3f} ({row['iqr'] * 1e3:.3f}) | torch | {b_ms} | {ratio} "
                f"| {gflops} | {gbs} |"
            )
        if base is not None:
            t = base["median"]
            gflops = f"{base['flops'] / t / 1e9:.1f}" if base["flops"] else ""
            gbs = f"{base['bytes'] / t / 1e9:.1f}" if base["bytes"] else ""
            timing = f"{t * 1e3:.3f} ({base['iqr'] * 1e3:.3f})"
            lines.append(f"| {case} | torch (baseline) | {timing} | | | | {gflops} | {gbs} |")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(_ROWS_KEY, [])
    if not rows:
        if any("bench_ops" in str(a) for a in config.args):
            terminalreporter.write_line("no benchmark timings recorded (run with --benchmark-enable)")
        return
    size = config.getoption("--bench-size")
    if size == "auto":
        size = "full" if torch.cuda.is_available() else "small"
    lines = summary_table(rows, size)
    terminalreporter.write_sep("=", "GloBE op benchmarks")
    for line in lines:
        terminalreporter.write_line(line)
    path = config.getoption("--bench-table")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("\n".join(lines) + "\n")
