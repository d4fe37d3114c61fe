#!/usr/bin/env bash
# GPU column of the engine benchmark (tools/bench_engine.py): the HF engine (transformers generate) and the vLLM
# engine side by side on a Qwen3-1.7B-shaped model with random weights, bf16, batch 128 × 256 new tokens, then 128
# Frozen Lake games each: tokens/s, start time, peak GPU memory, games/s, vLLM/HF ratios. For a cluster GPU node
# with vLLM installed:
#     pip install -e ".[vllm]"         # vllm==0.32.0, the CUDA wheel (needs the cluster's CUDA torch 2.13.0)
#     set -o pipefail; timeout 1500 bash tools/gpu_vllm_bench.sh 2>&1 | tee gpu_vllm_bench.log
# NOT RUN BY US: the GPU machine we could use had no vLLM, and the vllm wheel (336 MB) was too big to carry there;
# the script and the benchmark's GPU path are untested on a GPU. The HF column alone was measured on an H200 at
# 1,657 tokens/s for this shape (the issue); on CPU the benchmark runs both columns (docs/engines.md#benchmark).
#
# The random model (3.4 GB) is built once under $OEL_BENCH_MODEL_DIR (default ~/.cache/oel_hpc/bench), about a
# minute. Each engine runs in its own process; vLLM preallocates engine.vllm.gpu_memory_utilization (0.85) of the
# GPU, so its peak memory is that share, printed with the KV cache capacity it bought. ≈ 6–12 minutes on one
# H100/H200 (most of it HF generate and vLLM's CUDA-graph capture). Arguments are passed on to bench_engine.py
# (e.g. --batch 64, --games 0, --gpu-memory-utilization 0.5, --enforce-eager). Exit status: bench_engine.py's
# (non-zero when an engine failed; its error is printed). Writes gpu_vllm_bench.json beside the log.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

echo "== host: $(hostname) $(uname -m), $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv || true
else
    echo "== nvidia-smi: not found (no NVIDIA driver here)"
fi
"$PY" - <<'PYEOF'
import importlib.util, sys
import torch
print(f"== python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"available: {torch.cuda.is_available()})")
if not torch.cuda.is_available():
    sys.exit("== no CUDA device: this script is the GPU column (on CPU: python tools/bench_engine.py)")
if importlib.util.find_spec("vllm") is None:
    print("== vLLM is not installed (pip install -e \".[vllm]\"): only the HF column will run")
PYEOF

"$PY" tools/bench_engine.py --shape qwen3-1.7b --device cuda --json gpu_vllm_bench.json "$@"
