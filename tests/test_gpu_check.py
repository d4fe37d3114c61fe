"""tools/gpu_check.py: its MFU arithmetic, and --cpu-smoke, which runs every code path of the GPU check (parity,
both backends' training steps, the report) at a tiny shape on the CPU, except the distributed-optimizer line (CUDA
only: skipped, with its reason printed). The GPU run itself (tools/gpu_check.sh) needs a GPU machine."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", mod)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["gpu_check"])  # imports only the standard library at module level
    return sys.modules["gpu_check"]


def test_mfu_formula_reproduces_the_anchors():
    """The H200 reference point of docs/results.md, Qwen3-1.7B shape, 4096 tokens, 989 TFLOP/s: HF 26,482 tokens/s = 31.4 % MFU, megatron
    31,348 tokens/s = 37.2 %."""
    g = _module()
    s = g.QWEN3_1_7B
    assert g.matmul_params(s) == 1_720_451_072
    per_token = g.step_flops(s, s.seq) / s.seq
    for tokens_per_s, mfu in ((26_482, 31.4), (31_348, 37.2)):
        assert round(100 * tokens_per_s * per_token / 989e12, 1) == mfu
    assert g.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and g.peak_tflops("NVIDIA H200") == 989.0
    assert g.peak_tflops("NVIDIA H100 PCIe") == 756.0 and g.peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert g.peak_tflops("Some Future GPU") is None


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                    reason="megatron-core is not installed (pip install -e '.[megatron]')")
def test_gpu_check_cpu_smoke():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("OEL_MEGATRON_CPU_SHIMS", None)  # the script installs the shims itself in --cpu-smoke
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, f"rc {proc.returncode}\n{out[-4000:]}\n{proc.stderr[-6000:]}"
    lines = out.splitlines()
    parity = [line for line in lines if line.startswith("PARITY")]
    assert any(line.startswith("PARITY fp32 sdpa") and line.endswith("PASS") for line in parity), out
    assert any(line.startswith("PARITY bf16 sdpa") and line.endswith("PASS") for line in parity), out
    assert "PARITY: PASS" in out and not any("FAIL" in line for line in parity), out
    torch_line = [line for line in lines if line.startswith("THROUGHPUT torch")]
    mg_line = [line for line in lines if line.startswith("THROUGHPUT megatron[sdpa]")]
    assert len(torch_line) == 1 and len(mg_line) == 1, out
    for line in torch_line + mg_line:
        assert re.search(r"[\d,]+ tokens/s", line), line
    assert re.search(r"^RATIO megatron\[sdpa\]/torch: [\d.]+x", out, re.M), out
    # the distributed-optimizer line needs CUDA: skipped on the CPU, saying why
    assert re.search(r"^SKIP megatron\+distopt\[sdpa\]: .*needs CUDA", out, re.M), out
    assert not any(line.startswith("THROUGHPUT megatron+distopt") for line in lines), out
    # same weights, ids and teacher: the two backends' first losses agree
    m = re.search(r"^LOSS\(step 0\) megatron\[sdpa\] vs torch: .* \(rel diff ([\d.e+-]+);", out, re.M)
    assert m and float(m.group(1)) < 1e-4, out
    assert "WARNING: the import chain pulled" not in out, out
    assert re.search(r"^RESULT: parity PASS; losses finite", out, re.M), out


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                    reason="megatron-core is not installed (pip install -e '.[megatron]')")
def test_gpu_check_cpu_smoke_bf16_has_the_fp32_master_lines():
    """--throughput-dtype bfloat16 adds the paper recipes' precision (float32 master weights, bf16 compute) for both
    backends, through the trainer's own Distiller and MasterAdamW; their first losses are the bf16 lines' up to
    bf16 rounding."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("OEL_MEGATRON_CPU_SHIMS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--throughput-dtype", "bfloat16"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout
    assert proc.returncode == 0, f"rc {proc.returncode}\n{out[-4000:]}\n{proc.stderr[-6000:]}"
    for name in (r"torch\+fp32master", r"megatron\+fp32master\[sdpa\]"):
        assert re.search(rf"^THROUGHPUT {name}\s*: +[\d,]+ tokens/s", out, re.M), out
        m = re.search(rf"^LOSS\(step 0\) {name} vs torch: .* \(rel diff ([\d.e+-]+);", out, re.M)
        assert m and float(m.group(1)) < 1e-2, out
    assert re.search(r"^RATIO torch\+fp32master/torch: [\d.]+x tokens/s$", out, re.M), out
    assert re.search(r"^RESULT: parity PASS; losses finite", out, re.M), out
