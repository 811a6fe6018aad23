#!/usr/bin/env bash
# GPU run of the kernels: the GPU tests, then the benchmarks, summarised in OUTDIR/RESULTS_gpu.md.
#
#   bench/gpu.sh OUTDIR [STEP ...]
#
# STEP: any of env tests bench_ops bench_cholesky bench_decode bench_am bench_am_global bench_refine (default: all,
# in that order; env always runs). Each step is cut off after STEP_TIMEOUT seconds (default 900; TIMEOUT_<step> for one step) so one
# hang cannot eat the others.
#
# Run from anywhere on a CUDA machine with the project's environment (PYTHON=/path/to/python to choose the
# interpreter; default: python3). Steps, each logged to OUTDIR/<step>.log, each allowed to fail without
# stopping the others (the summary records every exit status):
#   1. the GPU tests: tests/test_gpu.py and the CUDA tests of tests/test_cholesky.py (-m gpu), without
#      TRITON_INTERPRET (the tests/test_triton_*.py files run only under the interpreter, on CPU tensors, so
#      tests/test_gpu.py is their on-device counterpart);
#   2. the op microbenchmarks at full model sizes (bench/bench_ops.py: compose against the dense product and a
#      device-to-device copy of the same bytes, prune_renorm, adapter_gemm precomposed and bank mode at prefill
#      and decode sizes against the dense grouped expert GEMM, Cholesky against torch on CUDA);
#   3. the batched Cholesky sweep on CUDA (bench/bench_cholesky.py --device cuda);
#   4. decode throughput of a patched model (bench/bench_decode.py);
#   5. seconds per AM step of the trainer at one Qwen3-30B-A3B layer's shapes (bench/bench_am.py), proxy and
#      weight-aware mode (dense and matrix-free solvers);
#   5b. the same over one global bank of 8 such layers (1024 experts, m = 256), where the dense weight-aware
#      system (side m r = 98304) is refused and the matrix-free solver runs;
#   6. milliseconds per refinement step at one Qwen3-30B-A3B layer's shapes (128 experts of 768 x 2048, m = 32,
#      r = 192 and 384; bench/bench_refine.py --step-time --device cuda): joint Adam, varpro, a varpro_gn
#      iteration, and that iteration in chunks of 32 experts (the refinement's chunk_experts).
# Without a CUDA device the script still runs, as a dry run of itself: small shapes, CPU benchmarks, and the
# summary says so. Nothing is written outside OUTDIR except the usual caches (the extension's just-in-time build in
# ~/.cache/globe_kernels, Triton's kernel cache, pip/torch caches): no .pytest_cache, no __pycache__, no
# pytest-benchmark storage in the checkout.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR [STEP ...]" >&2
    exit 2
fi
OUT=$1
shift
ALL_STEPS="tests bench_ops bench_cholesky bench_decode bench_am bench_am_global bench_refine"
WANT=" ${*:-$ALL_STEPS} "
for s in $WANT; do
    case " $ALL_STEPS " in *" $s "*) ;; *) echo "unknown step $s (steps: $ALL_STEPS)" >&2; exit 2 ;; esac
done
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
cd "$ROOT" || exit 2

export PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
PYTEST=("$PY" -m pytest -p no:cacheprovider -o addopts="" --rootdir="$ROOT")

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    CUDA=1
    SIZE=full
    CHOL_ARGS=(--device cuda --reps 7)
    DECODE_ARGS=(--device cuda --dtype bfloat16 --shape qwen3-medium)
    AM_ARGS=(--device cuda --steps 3 --weight-aware)
    AM_GLOBAL_ARGS=(--device cuda --steps 2 --weight-aware --layers 8 --solvers dense,cg)
    REFINE_ARGS=(--step-time --device cuda --step-shape 128,768,2048,32 --step-ranks 192 384 --step-reps 5
                 --step-chunk 32)
else
    CUDA=0
    SIZE=small
    CHOL_ARGS=(--device cpu --reps 3 --threads 2 --r 8 64)
    DECODE_ARGS=(--device cpu --repeats 1)
    AM_ARGS=(--device cpu --small --steps 2)
    AM_GLOBAL_ARGS=(--device cpu --small --steps 1 --weight-aware --layers 2 --solvers dense,cg)
    REFINE_ARGS=(--step-time --device cpu --step-shape 32,48,96,8 --step-ranks 16 24 --step-reps 2 --step-count 10
                 --step-chunk 8)
    echo "no CUDA device: dry run on CPU (small shapes)" >&2
fi

declare -A STATUS
step() {  # step NAME CMD...: run CMD (if NAME was asked for), log to OUT/NAME.log, remember its exit status
    local name=$1
    shift
    if [ "$name" != env ] && [[ "$WANT" != *" $name "* ]]; then
        return 0
    fi
    echo "== $name: $*" >&2
    local start=$SECONDS
    local limit_var="TIMEOUT_$name"
    timeout --kill-after=20 "${!limit_var:-$STEP_TIMEOUT}" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    STATUS[$name]="exit $rc, $((SECONDS - start)) s"
    echo "   -> exit $rc ($((SECONDS - start)) s), log $OUT/$name.log" >&2
    return 0
}

step env "$PY" - <<'EOF'
import platform, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton not importable:", exc)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
from globe_kernels import _ext, ops
print("extension:", _ext.status())
for row in ops.describe("cuda" if torch.cuda.is_available() else "cpu"):
    print(f"  {row['op']:24s} {row['backend']:8s} {row['status']}")
try:
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout)
except Exception as exc:
    print("nvidia-smi:", exc)
EOF

step tests "${PYTEST[@]}" tests -m gpu -q -rs \
    --junitxml="$OUT/tests_junit.xml"

step bench_ops "${PYTEST[@]}" bench/bench_ops.py -o python_files='bench_*.py' -q --benchmark-enable \
    --bench-size "$SIZE" --bench-table "$OUT/bench_ops.md" --benchmark-json="$OUT/bench_ops.json" \
    --benchmark-columns=min,median,iqr,rounds

step bench_cholesky "$PY" bench/bench_cholesky.py "${CHOL_ARGS[@]}"

step bench_decode "$PY" bench/bench_decode.py "${DECODE_ARGS[@]}"

step bench_am "$PY" bench/bench_am.py "${AM_ARGS[@]}"

step bench_am_global "$PY" bench/bench_am.py "${AM_GLOBAL_ARGS[@]}"

step bench_refine "$PY" bench/bench_refine.py "${REFINE_ARGS[@]}"

# ---- the summary ------------------------------------------------------------------------------------------
# section STEP TITLE PATTERN: a step that ran, as a heading and its log's lines matching PATTERN (its tail when
# none match)
section() {
    [ -n "${STATUS[$1]+x}" ] || return 0
    echo
    echo "## $2"
    echo
    grep -E "$3" "$OUT/$1.log" 2>/dev/null || tail -n 30 "$OUT/$1.log"
}
GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
[ -n "$GPU" ] || GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>/dev/null)
VERSIONS=$("$PY" -c "
import torch
try:
    import triton; t = triton.__version__
except Exception:
    t = 'n/a'
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {t}')" 2>/dev/null)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "unknown")
TESTLINE=$(grep -E "(passed|failed|error|skipped)" "$OUT/tests.log" 2>/dev/null | tail -n 1)

{
    echo "# GloBE kernels on GPU"
    echo
    [ "$CUDA" = 1 ] || echo "**No CUDA device: this is a CPU dry run of bench/gpu.sh (small shapes), not GPU results.**"
    [ "$CUDA" = 1 ] || echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- GPU: $GPU"
    echo "- host: $(hostname), $(nproc) CPUs"
    echo "- versions: $VERSIONS; python $("$PY" -c 'import platform; print(platform.python_version())')"
    echo "- checkout: $COMMIT"
    echo
    echo "## Steps"
    echo
    echo "| step | status | log |"
    echo "|---|---|---|"
    for name in env $ALL_STEPS; do
        [ -n "${STATUS[$name]+x}" ] && echo "| $name | ${STATUS[$name]} | $name.log |"
    done
    echo
    echo "## GPU tests"
    echo
    echo "\`python -m pytest tests -m gpu\`: ${TESTLINE:-see tests.log}"
    echo
    grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/tests.log" 2>/dev/null | sed 's/^/    /' | head -n 40
    echo
    if [ -f "$OUT/bench_ops.md" ]; then
        cat "$OUT/bench_ops.md"
    elif [ -n "${STATUS[bench_ops]+x}" ]; then
        echo "## Op microbenchmarks"
        echo
        echo "no table (see bench_ops.log)"
    fi
    echo
    if [ -n "${STATUS[bench_cholesky]+x}" ]; then
        echo "## Batched Cholesky (bench/bench_cholesky.py ${CHOL_ARGS[*]})"
        echo
        sed -n '/^## Batched/,$p' "$OUT/bench_cholesky.log" 2>/dev/null | tail -n +2
    fi
    section bench_decode "Decode throughput (bench/bench_decode.py ${DECODE_ARGS[*]})" "^\||^#"
    section bench_am "AM step time (bench/bench_am.py ${AM_ARGS[*]})" "^\||^# bench_am"
    section bench_am_global "AM step time, one global bank (bench/bench_am.py ${AM_GLOBAL_ARGS[*]})" \
        "^\||^# bench_am"
    section bench_refine "Refinement step time (bench/bench_refine.py ${REFINE_ARGS[*]})" "^\||^###"
} >"$OUT/RESULTS_gpu.md"

echo "wrote $OUT/RESULTS_gpu.md" >&2
