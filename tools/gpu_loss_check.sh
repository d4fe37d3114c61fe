#!/usr/bin/env bash
# GPU check of the consolidation loss (oel_hpc/train/loss/: chunked.py, fused.py) in one call, most valuable first:
#   1. tools/bench_loss.py at the GPU shape (T 8192, H 2560, V 151,936, k 256, bf16): naive, chunked, fused
#      and Liger side by side, ratios to naive, the issue's targets;
#   2. tools/bench_loss.py --check: naive, chunked and fused values and gradients agree (bf16, then fp32);
#   3. the fused cases of tests/test_loss_adversarial.py on CUDA (ties, peaked/flat, masked rows, k = 1 / V).
# ≈ 6–8 minutes on one H100/H200 (most of it Triton and torch.compile compiling). Exit status: non-zero when a step
# failed (its status is printed at the end); later steps still run.
#
# Needs torch + triton (and pytest) and, for the Liger row, liger-kernel: where it does not import, its wheel is
# installed from .wheels/ (git-ignored) into a private folder. oel_hpc is not installed: it runs from this checkout
# through PYTHONPATH. On a GPU machine without internet access:
#   once, on a machine with internet access, in the repository root:
#     pip download liger-kernel==0.8.5 --no-deps --only-binary :all: -d .wheels
#   then copy the checkout with its .wheels/ to the GPU machine and run there:
#     set -o pipefail; timeout 570 bash tools/gpu_loss_check.sh 2>&1 | tee gpu_loss_check.log
# On a CPU (small shapes, the script's plumbing; the fused kernels in Triton's interpreter):
#   bash tools/gpu_loss_check.sh --cpu-smoke
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
PY="${PYTHON:-python3}"
WHEELS="${OEL_WHEELS_DIR:-.wheels}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
smoke=0
[ "${1:-}" = "--cpu-smoke" ] && smoke=1

echo "== host: $(hostname) $(uname -m), $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
"$PY" -c "import sys, torch, triton; print(f'== python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}), triton {triton.__version__}')"

if ! "$PY" -c "import liger_kernel" >/dev/null 2>&1; then
    whl="$(ls "$WHEELS"/liger_kernel-*.whl 2>/dev/null | head -1)"
    if [ -n "$whl" ]; then
        site="${TMPDIR:-/tmp}/oel-loss-check-site"
        "$PY" -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check --target "$site" "$whl" \
            && export PYTHONPATH="$PYTHONPATH:$site" && echo "== liger-kernel from $whl"
    else
        echo "== liger-kernel not importable and no $WHEELS/liger_kernel-*.whl: the Liger row will say so"
    fi
fi

declare -a names=() codes=()
step() {  # step NAME LIMIT_S COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo
    echo "== $name: $*"
    local t0=$SECONDS rc=0
    timeout "$limit" "$@" || rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    names+=("$name")
    codes+=("$rc")
}

if [ "$smoke" = 1 ]; then
    export TRITON_INTERPRET=1  # read by triton at import: the kernels run on the CPU
    step bench 300 "$PY" tools/bench_loss.py --shape 256,64,2000,16 --reps 1 --warmup 0 --rounds 1 --chunk-size 64
    step check 300 "$PY" tools/bench_loss.py --check --shape 64,32,500,16 --chunk-size 16
    step fused-tests 600 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_loss_adversarial.py -k "fused and peaked"
else
    step bench 330 "$PY" tools/bench_loss.py --shape gpu
    step check-bf16 90 "$PY" tools/bench_loss.py --check --shape 2048,2560,151936,256 --dtype bfloat16
    step check-fp32 90 "$PY" tools/bench_loss.py --check --shape 1024,1024,32000,64 --dtype float32
    step fused-tests 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_loss_adversarial.py -k fused
fi

echo
status=0
for i in "${!names[@]}"; do
    echo "== summary: ${names[$i]} exit ${codes[$i]}"
    [ "${codes[$i]}" -ne 0 ] && status=1
done
exit $status
