#!/usr/bin/env bash
# GPU check of the consolidation trainer backends (tools/gpu_check.py): HF-vs-megatron logits parity, then the
# torch and megatron training steps timed side by side (Qwen3-1.7B shape, 4096 tokens, bf16). <= 8 minutes on one
# H100/H200. Exit status: gpu_check.py's (non-zero on a parity FAIL, a non-finite loss or a crash; 124 on timeout).
#
# Needs only torch, transformers, numpy and megatron-core 0.16.1. oel_hpc is NOT pip-installed: it runs from this
# checkout through PYTHONPATH (its full dependency list, hydra etc., is not needed). Where `import megatron.core`
# fails, megatron-core is installed from a wheel carried in .wheels/ (into a private --target folder, nothing in
# the image changes).
#
# On a GPU machine with torch + CUDA + transformers but no megatron-core and no internet access:
#   once, on a machine with internet access, in the repository root (the wheel must match the GPU machine's Python,
#   here cp312; .wheels/ is git-ignored):
#     pip download megatron-core==0.16.1 --no-deps --python-version 3.12 --implementation cp --only-binary :all: \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .wheels
#   then copy the checkout with its .wheels/ to the GPU machine and run there:
#     set -o pipefail; timeout 540 bash tools/gpu_check.sh 2>&1 | tee gpu_check.log
# Locally (CPU, tiny shape, every code path): bash tools/gpu_check.sh --cpu-smoke
# Arguments are passed on to gpu_check.py (--steps N, --warmup N, --peak-tflops X, --skip-throughput, --cpu-smoke).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
PY="${PYTHON:-python3}"
MEGATRON_VERSION=0.16.1
WHEELS="${OEL_WHEELS_DIR:-.wheels}"  # where the megatron-core wheel is looked for (relative to the repository root)
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

echo "== host: $(hostname) $(uname -m), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version,clocks.max.sm,power.limit \
        --format=csv || nvidia-smi -L || true
else
    echo "== nvidia-smi: not found (no NVIDIA driver here)"
fi
"$PY" - <<'EOF'
import sys
import torch
cuda = torch.version.cuda or "none"
print(f"== python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__} (CUDA {cuda}, "
      f"available: {torch.cuda.is_available()})")
EOF

if ! "$PY" -c "import megatron.core" >/dev/null 2>&1; then
    tag="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
    wheels=()
    for whl in "$WHEELS"/megatron_core-"$MEGATRON_VERSION"-"$tag"-*.whl \
               "$WHEELS"/megatron_core-"$MEGATRON_VERSION"-py3-none-*.whl; do
        [ -f "$whl" ] && wheels+=("$whl")
    done
    if [ "${#wheels[@]}" -eq 0 ]; then
        pyver="${tag#cp}"; pyver="${pyver:0:1}.${pyver:1}"
        {
            echo "ERROR: megatron-core is not importable and $WHEELS/ has no megatron_core-$MEGATRON_VERSION-$tag-*.whl"
            echo "  (found there: $(ls "$WHEELS" 2>/dev/null | tr '\n' ' ' || true))"
            echo "  Make it on a machine with internet, in the repository root, and carry .wheels (carry=[\".wheels\"]):"
            echo "    echo /.wheels/ >> \"\$(git rev-parse --git-path info/exclude)\""
            echo "    pip download megatron-core==$MEGATRON_VERSION --no-deps --python-version $pyver --implementation cp \\"
            echo "        --only-binary :all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\"
            echo "        --platform manylinux2014_x86_64 -d .wheels"
        } >&2
        exit 3
    fi
    site="${TMPDIR:-/tmp}/oel-gpu-check-site"
    echo "== installing ${wheels[0]} into $site (--no-deps; megatron-core needs only torch, numpy, packaging)"
    "$PY" -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check --target "$site" \
        "${wheels[0]}"
    export PYTHONPATH="$site:$PYTHONPATH"
    "$PY" -c "import megatron.core" || { echo "ERROR: megatron.core still does not import" >&2; exit 3; }
fi
"$PY" -c "import megatron.core as m, numpy, transformers; print(f'== megatron-core {m.__version__} ({m.__file__}), transformers {transformers.__version__}, numpy {numpy.__version__}')" 2>/dev/null

rc=0
timeout 480 "$PY" -u tools/gpu_check.py "$@" || rc=$?
if [ "$rc" -eq 124 ]; then
    echo "ERROR: tools/gpu_check.py ran past 480 s and was stopped" >&2
elif [ "$rc" -ne 0 ]; then
    echo "== tools/gpu_check.py exited $rc" >&2
fi
exit "$rc"
