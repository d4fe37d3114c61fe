#!/usr/bin/env python3
"""GPU check of the two consolidation trainer backends: HF-vs-megatron logits parity, then the consolidation
training step of each backend timed side by side in one process. Meant for one H100/H200 in <= 8 minutes; run it
through ``tools/gpu_check.sh`` (which installs megatron-core from a carried wheel where it is missing).

    python tools/gpu_check.py               # on a GPU: Qwen3-1.7B shape, random weights
    python tools/gpu_check.py --cpu-smoke   # tiny shape on the CPU, fp32: exercises every code path

Needs only torch, transformers, megatron-core (numpy, packaging) and this repository on ``sys.path``; it imports
``oel_hpc.train.megatron.model``/``convert``/``attention`` and ``oel_hpc.train.loss``, none of which pulls hydra, omegaconf,
submitit or gymnasium (the script checks that and prints what it imported; megatron-core itself try-imports wandb,
optionally).

1. Parity. A Qwen3ForCausalLM with random weights (seed 0; every RMSNorm weight drawn from U(0.5, 1.5) so that a
   mix-up of heads or norms shows) is converted into a megatron GPTModel (tp=1) with ``load_hf``; logits on one
   batch (2 x 512 tokens) are compared:
   - fp32, SDPA attention: ``max_rel <= 1e-3`` and top-1 agreement >= 99 % (TF32 off);
   - bf16 (the fp32 weights rounded), SDPA attention and TransformerEngine if it imports: megatron's own bf16 error
     must be of the size of HF's: against the HF fp32 logits, ``mean_abs(megatron bf16) <= 2 x mean_abs(HF bf16)``
     and ``top1(megatron bf16) >= top1(HF bf16) - 3`` points. The figures against HF bf16 are printed too.
   ``max_abs`` = max |a - b| over all logits, ``max_rel`` = max_abs / max |reference logit|, ``mean_abs`` = mean
   |a - b|, top-1 = % of positions whose argmax agrees. Megatron's vocabulary padding is sliced away.
2. Throughput. One sequence of 4096 tokens, bf16, the step of each backend: student forward -> final hidden
   [4096, H] (all positions count as response positions) -> top-k reverse KL (``oel_hpc.train.loss.
   topk_reverse_kl``, k 256, T 0.7, chunks of 1024 positions) -> backward -> grad-norm clip (1.0) -> AdamW step.
   The teacher is FIXED and precomputed: a random hidden [4096, H] and a copy of the initial LM head, the same
   tensors for both backends; no teacher forward is timed. torch backend: the HF model (SDPA attention) through
   ``get_decoder()`` as ``oel_hpc.train.torch.trainer`` does; megatron backend: ``final_hidden`` +
   ``output_weight`` (at tp=1 ``topk_reverse_kl`` is what ``vocab_parallel_topk_reverse_kl`` computes). Warm-up
   steps, then timed steps between ``torch.cuda.synchronize()`` calls. Both start from the same weights, so
   their first-step losses must agree (printed).
   MFU = model FLOPs per second / peak dense bf16 FLOP/s of the GPU (table below, ``--peak-tflops`` overrides),
   model FLOPs per step = 6 * P * T + 6 * L * T^2 * (heads * head_dim), T tokens, L layers, P the parameters of
   every matrix multiply (attention and MLP projections, plus the LM head once even when tied; no embedding
   lookup, no norms): forward + backward of the weights, plus causal attention (half of 12 * L * T^2 * d). This
   reproduces the H200 MFU figures of docs/results.md (1.7B shape: P = 1.720e9, 11.73 GFLOP per token at T 4096).
   Not counted: the loss's recomputed student logits in backward and the teacher's logits (4 * H * V per token).
   Peak memory = ``torch.cuda.max_memory_allocated`` with the statistics reset after everything of the previous
   backend is freed (it includes the fixed teacher tensors, ~0.6 GiB, for both).
   A third line, ``megatron+distopt[<attention>]``: the megatron backend with megatron's distributed optimizer, the
   trainer's own ``oel_hpc.train.megatron.optimizer.DistributedAdam`` (``trainer.optimizer=distributed``; DDP wrapper with
   fp32 gradient buffers + ``get_megatron_optimizer``, dp=1): same forward/loss/backward, then ``finalize_model_grads``
   and megatron's clip + Adam step, fp32 master weights (so more memory than the plain-AdamW line, which steps the
   bf16 weights). Its first loss must equal the others'; its tokens/s and memory are also compared with the
   plain-AdamW megatron line (``RATIO megatron+distopt[...]/megatron[...]``).
   Two more lines in bf16 (not in --cpu-smoke, which is fp32): ``torch+fp32master`` and
   ``megatron+fp32master[<attention>]``, the paper recipes' precision (trainer.master_dtype=float32): float32
   weights and AdamW state with the forward under autocast (the trainer's own ``Distiller``), and the bf16 megatron
   model with the trainer's ``MasterAdamW`` (float32 copies and gradient accumulators); their RATIO lines against
   torch show what the float32 master costs. Their first losses differ from the others' by bf16 rounding only.
   Targets, reported and never failed on: megatron >= 1.25 x torch tokens/s, megatron MFU >= 40 %.

Exit status: 0 when parity passes; 1 when a parity check fails or a loss is not finite; a crash exits non-zero
with its traceback.

``--cpu-smoke``: a tiny Qwen3 (hidden 64, 2 layers, vocab 1000 so that the vocabulary padding is exercised), fp32
throughput on the CPU, parity in fp32 and bf16; the distributed-optimizer line is skipped there, with the reason
printed (``SKIP megatron+distopt[...]``: it needs CUDA). megatron-core needs CPU shims there; they are test-only code
(``tests/megatron_support/shims.py``) and this script, which lives in tools/ rather than in the package, imports
them only in this mode. On a GPU no shims are used.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# peak dense bf16 tensor-core TFLOP/s by GPU name (first match wins, so longer names come first)
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("H20", 148.0), ("GB200", 2500.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0),
)
TARGET_RATIO = 1.25
TARGET_MFU = 40.0
FP32_MAX_REL, FP32_TOP1 = 1e-3, 99.0
BF16_MEAN_FACTOR, BF16_TOP1_SLACK = 2.0, 3.0
# project dependencies the check must not need (wandb is left out: megatron-core try-imports it itself, optionally)
FORBIDDEN_IMPORTS = ("hydra", "omegaconf", "submitit", "gymnasium")


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float
    tied: bool
    parity_batch: int
    parity_seq: int
    seq: int
    warmup: int
    steps: int
    k: int
    temperature: float
    chunk: int


QWEN3_1_7B = Shape("Qwen3-1.7B shape", hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=6144,
                   vocab=151_936, rope_theta=1e6, tied=True, parity_batch=2, parity_seq=512, seq=4096, warmup=3,
                   steps=10, k=256, temperature=0.7, chunk=1024)
TINY = Shape("tiny Qwen3 (CPU smoke)", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96, vocab=1000,
             rope_theta=1e6, tied=True, parity_batch=2, parity_seq=32, seq=64, warmup=1, steps=2, k=256,
             temperature=0.7, chunk=24)


def matmul_params(s: Shape) -> int:
    """Parameters that take part in a matrix multiply per token: q/k/v/o and gate/up/down of every layer, plus the
    LM head (counted once, tied or not)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = s.hidden * q + 2 * s.hidden * kv + q * s.hidden + 3 * s.hidden * s.ffn
    return s.layers * per_layer + s.vocab * s.hidden


def step_flops(s: Shape, tokens: int) -> float:
    """Model FLOPs of one forward+backward over one causal sequence of ``tokens`` tokens."""
    return 6.0 * matmul_params(s) * tokens + 6.0 * s.layers * tokens * tokens * s.heads * s.head_dim


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def log(msg: str = "") -> None:
    print(msg, flush=True)


def gib(n: float) -> float:
    return n / 2**30


# ------------------------------------------------------------------------------------------------------ setup
class Env:
    def __init__(self, cpu: bool):
        import torch

        self.cpu = cpu
        self.device = torch.device("cpu") if cpu else torch.device("cuda", 0)
        if not cpu:
            torch.cuda.set_device(self.device)
        self.store = None

    def sync(self) -> None:
        import torch

        if not self.cpu:
            torch.cuda.synchronize()

    def free(self) -> None:
        import torch

        gc.collect()
        if not self.cpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> float | None:
        import torch

        return None if self.cpu else torch.cuda.memory_allocated()

    def peak(self) -> float | None:
        import torch

        return None if self.cpu else torch.cuda.max_memory_allocated()

    def init_megatron(self):
        """One-process torch.distributed and megatron's tp=1 groups (megatron needs them even for one process)."""
        import torch
        import torch.distributed as dist

        # one process: loopback is always right, and some sandboxes have no other usable interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        fd, self.store = tempfile.mkstemp(prefix="oel-gpu-check-pg-")
        os.close(fd)
        dist.init_process_group("gloo" if self.cpu else "nccl", init_method=f"file://{self.store}", rank=0,
                                world_size=1)
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, create_gloo_process_groups=False)
        if not self.cpu:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(0)

    def close(self) -> None:
        import torch.distributed as dist

        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.store and os.path.exists(self.store):
            os.unlink(self.store)


def install_cpu_shims() -> None:
    """megatron-core on a CPU-only torch: the repository's test-only shims (tools/ may use test support code;
    the package never does)."""
    support = ROOT / "tests" / "megatron_support"
    sys.path.insert(0, str(support))
    try:
        import shims
    finally:
        sys.path.remove(str(support))
    shims.install()


def hf_config(s: Shape):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       head_dim=s.head_dim, max_position_embeddings=max(40960, s.seq), rms_norm_eps=1e-6,
                       tie_word_embeddings=s.tied, initializer_range=0.02,
                       rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta})


def build_hf(s: Shape, env: Env):
    """The HF model, random weights (seed 0), fp32, SDPA attention, every RMSNorm weight from U(0.5, 1.5)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(env.device):
        model = AutoModelForCausalLM.from_config(hf_config(s), attn_implementation="sdpa", dtype=torch.float32)
    model = model.to(env.device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def cast_hf(model, dtype):
    """``model.to(dtype)`` that keeps the RoPE ``inv_freq`` buffers in fp32, as a model loaded with
    ``from_pretrained(dtype=...)`` has them (``Module.to`` would round them too, and bf16 inverse frequencies put the
    rotation angles off by up to ~0.8 rad at position 512)."""
    keep = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model.to(dtype)
    for name, buf in keep.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buf
    return model


def build_megatron(s: Shape, env: Env, hf_state: dict, dtype, attention: str):
    from oel_hpc.train.megatron.convert import load_hf
    from oel_hpc.train.megatron.model import build_gpt

    cfg = hf_config(s)
    model = build_gpt(cfg, tp=1, dtype=dtype, attention=attention, cpu=env.cpu)
    load_hf(model, hf_state, cfg, 0, 1)
    return model.to(env.device)


# ----------------------------------------------------------------------------------------------------- parity
def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def megatron_logits(model, ids, vocab: int):
    import torch

    from oel_hpc.train.megatron.model import final_hidden, output_weight

    with torch.no_grad():
        h = final_hidden(model, ids)
        return (h @ output_weight(model)[:vocab].t()).float()


def compare(ref, got) -> dict:
    d = (got - ref).abs()
    out = {"max_abs": d.max().item(), "mean_abs": d.mean().item()}
    del d
    out["max_rel"] = out["max_abs"] / max(ref.abs().max().item(), 1e-30)
    out["top1"] = 100.0 * (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return out


def fmt(c: dict) -> str:
    return (f"max_abs={c['max_abs']:.3e} max_rel={c['max_rel']:.3e} mean_abs={c['mean_abs']:.3e} "
            f"top1={c['top1']:6.2f}%")


def run_parity(s: Shape, env: Env, attentions: list[str]) -> tuple[bool, object]:
    """Returns (all passed, the HF model in bf16 for the throughput part)."""
    import torch

    t0 = time.perf_counter()
    ok = True
    log(f"== [1/2] parity: HF vs megatron (tp=1) logits, batch {s.parity_batch} x {s.parity_seq} tokens, "
        f"reference = HF SDPA")
    log(f"   tolerances: fp32 max_rel <= {FP32_MAX_REL:g} and top1 >= {FP32_TOP1:g}%; bf16 vs HF fp32: "
        f"mean_abs <= {BF16_MEAN_FACTOR:g} x HF bf16's and top1 >= HF bf16's - {BF16_TOP1_SLACK:g} points "
        f"(max_rel = max_abs / max |reference logit|)")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s.vocab, (s.parity_batch, s.parity_seq), generator=g).to(env.device)

    hf = build_hf(s, env)
    log(f"   HF model built: {sum(p.numel() for p in hf.parameters()):,} parameters "
        f"({time.perf_counter() - t0:.0f} s)")
    ref32 = hf_logits(hf, ids)
    log(f"   HF fp32 logits: max |logit| {ref32.abs().max().item():.3f}, std {ref32.std().item():.3f}")

    # fp32, SDPA (TE is a bf16 path; its fp32 logits are not checked)
    mg = build_megatron(s, env, hf.state_dict(), torch.float32, "sdpa")
    got = megatron_logits(mg, ids, s.vocab)
    del mg
    env.free()
    c = compare(ref32, got)
    del got
    passed = c["max_rel"] <= FP32_MAX_REL and c["top1"] >= FP32_TOP1
    ok &= passed
    log(f"PARITY fp32 sdpa  vs HF fp32: {fmt(c)}  {'PASS' if passed else 'FAIL'}")

    cast_hf(hf, torch.bfloat16)
    env.free()
    ref16 = hf_logits(hf, ids)
    noise = compare(ref32, ref16)
    log(f"   (bf16 noise)  HF bf16 vs HF fp32: {fmt(noise)}")
    for attention in attentions:
        mg = build_megatron(s, env, hf.state_dict(), torch.bfloat16, attention)
        got = megatron_logits(mg, ids, s.vocab)
        del mg
        env.free()
        vs16, vs32 = compare(ref16, got), compare(ref32, got)
        del got
        mean_tol = BF16_MEAN_FACTOR * noise["mean_abs"]
        top1_tol = noise["top1"] - BF16_TOP1_SLACK
        passed = vs32["mean_abs"] <= mean_tol and vs32["top1"] >= top1_tol
        ok &= passed
        log(f"PARITY bf16 {attention:<5} vs HF bf16: {fmt(vs16)}  |  vs HF fp32: mean_abs={vs32['mean_abs']:.3e} "
            f"(<= {mean_tol:.3e}) top1={vs32['top1']:.2f}% (>= {top1_tol:.2f}%)  {'PASS' if passed else 'FAIL'}")
    del ref32, ref16
    env.free()
    log(f"PARITY: {'PASS' if ok else 'FAIL'}  ({time.perf_counter() - t0:.0f} s)")
    return ok, hf


# ------------------------------------------------------------------------------------------------- throughput
@dataclass
class Result:
    name: str
    tokens_per_s: float
    step_ms: float
    mfu: float | None
    peak: float | None
    loss0: float
    losses_finite: bool


def bench(name: str, s: Shape, env: Env, step, peak_tf: float | None) -> Result:
    """Warm-up steps, then timed steps; ``step()`` returns the loss (a tensor, read only after timing)."""
    import torch

    losses = [step() for _ in range(s.warmup)]
    env.sync()
    t0 = time.perf_counter()
    for _ in range(s.steps):
        losses.append(step())
    env.sync()
    dt = (time.perf_counter() - t0) / s.steps
    values = [float(x) for x in torch.stack([x.detach().float() for x in losses]).cpu()]
    tps = s.seq / dt
    mfu = None if peak_tf is None else 100.0 * step_flops(s, s.seq) / dt / (peak_tf * 1e12)
    return Result(name, tps, dt * 1e3, mfu, env.peak(), values[0], all(math.isfinite(v) for v in values))


def run_throughput(s: Shape, env: Env, hf_box: list, dtype, attentions: list[str],
                   peak_tf: float | None) -> list[Result]:
    """``hf_box`` holds the only reference to the HF model, so that it can be freed before megatron runs."""
    import torch

    from oel_hpc.train.megatron.model import final_hidden, finalize_grads, output_weight
    from oel_hpc.train.loss import topk_reverse_kl

    t_start = time.perf_counter()
    log(f"== [2/2] throughput: one sequence of {s.seq} tokens, {str(dtype).replace('torch.', '')}, step = student "
        f"forward -> final hidden [{s.seq}, {s.hidden}] -> top-k reverse KL (k {s.k}, T {s.temperature}, chunks of "
        f"{s.chunk}) -> backward -> clip 1.0 -> AdamW; {s.warmup} warm-up + {s.steps} timed steps per backend")
    log(f"   teacher: fixed, precomputed (random hidden [{s.seq}, {s.hidden}] + a copy of the initial LM head), the "
        f"same tensors for both backends; teacher forward NOT timed")
    log(f"   MFU: model FLOPs/step = 6*P*T + 6*L*T^2*(heads*head_dim) = {step_flops(s, s.seq) / 1e12:.3g} TFLOP "
        f"(P = {matmul_params(s):,} matmul params incl. the LM head, T = {s.seq}); peak "
        + (f"{peak_tf:g} TFLOP/s dense bf16" if peak_tf else "unknown (no MFU)"))

    model = cast_hf(hf_box.pop(), dtype)
    model.train().requires_grad_(True)
    # the same start for every backend: a CPU snapshot of the weights, taken before the torch backend trains
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
             if not (s.tied and k == "lm_head.weight")}  # tied: the alias of the embedding, not a second copy
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, s.vocab, (1, s.seq), generator=g).to(env.device)
    attention_mask = torch.ones_like(ids)
    teacher_hidden = torch.randn(s.seq, s.hidden, generator=g).to(env.device, dtype)
    teacher_head = model.lm_head.weight.detach().clone()
    loss_args = dict(k=s.k, temperature=s.temperature, renormalize=False, chunk_size=s.chunk)
    results: list[Result] = []

    def report(r: Result) -> None:
        mfu = f"{r.mfu:5.1f}%" if r.mfu is not None else "  n/a"
        peak = f"{gib(r.peak):5.1f} GiB" if r.peak is not None else "n/a (CPU)"
        log(f"THROUGHPUT {r.name:<16}: {r.tokens_per_s:10,.0f} tokens/s  MFU {mfu}  peak mem {peak}  "
            f"step {r.step_ms:8.1f} ms  loss(step 0) {r.loss0:.6f}")

    # ---- torch backend: the HF model, run as oel_hpc.train.torch.trainer's Distiller runs it
    env.free()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)

    def torch_step():
        h = model.get_decoder()(input_ids=ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        out = topk_reverse_kl(h.reshape(-1, s.hidden), model.lm_head.weight, teacher_hidden, teacher_head,
                              **loss_args)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    results.append(bench("torch", s, env, torch_step, peak_tf))
    report(results[-1])
    del model, opt, torch_step

    # ---- torch backend as the paper recipes run it (trainer.master_dtype=float32 with 16-bit compute): float32
    # weights and AdamW state, the forward under autocast; the trainer's own Distiller
    if dtype != torch.float32:
        from oel_hpc.train.precision import Precision
        from oel_hpc.train.torch.trainer import Distiller

        env.free()
        master = build_hf(s, env).train().requires_grad_(True)  # the float32 weights `state` is the rounding of
        distiller = Distiller(master, Precision(dtype, torch.float32, torch.float32))
        master_opt = torch.optim.AdamW(master.parameters(), lr=1e-6, weight_decay=0.0)
        positions = torch.arange(s.seq, device=env.device)

        def torch_master_step():
            loss, *_ = distiller(ids, attention_mask, positions, teacher_hidden, teacher_head, s.seq, **loss_args)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(master.parameters(), 1.0)
            master_opt.step()
            master_opt.zero_grad(set_to_none=True)
            return loss.detach()

        results.append(bench("torch+fp32master", s, env, torch_master_step, peak_tf))
        report(results[-1])
        del master, distiller, master_opt, torch_master_step

    # ---- megatron backend: GPTModel (tp=1) from the same weights
    def head(mg):
        w = output_weight(mg)  # [padded vocab, hidden]: slice the padding rows away (none for 151,936 at tp=1)
        return w if w.size(0) == s.vocab else w[:s.vocab]

    for attention in attentions:
        env.free()
        if not env.cpu:  # what is left before the build: the fixed teacher tensors and the ids, nothing of torch's
            log(f"   allocated before building megatron[{attention}]: {gib(env.allocated()):.2f} GiB")
        mg = build_megatron(s, env, state, dtype, attention).train()
        mg_opt = torch.optim.AdamW(mg.parameters(), lr=1e-6, weight_decay=0.0)

        def megatron_step():
            h = final_hidden(mg, ids)  # tp=1: no hidden-state gradient all-reduce needed
            out = topk_reverse_kl(h.reshape(-1, s.hidden), head(mg), teacher_hidden, teacher_head, **loss_args)
            out.loss.backward()
            finalize_grads(mg)  # a no-op at tp=1, called as the trainer does
            torch.nn.utils.clip_grad_norm_(mg.parameters(), 1.0)
            mg_opt.step()
            mg_opt.zero_grad(set_to_none=True)
            return out.loss.detach()

        results.append(bench(f"megatron[{attention}]", s, env, megatron_step, peak_tf))
        report(results[-1])
        del mg, mg_opt, megatron_step

        if dtype == torch.float32:
            continue
        # the same with float32 master weights (trainer.optimizer=adamw, master_dtype=float32): the trainer's own
        # MasterAdamW, float32 copies and gradient accumulators beside the 16-bit model
        from oel_hpc.train.megatron.optimizer import MasterAdamW

        env.free()
        mg = build_megatron(s, env, state, dtype, attention).train()
        mg_master = MasterAdamW(mg, lr=1e-6, weight_decay=0.0)

        def megatron_master_step():
            h = final_hidden(mg, ids)
            out = topk_reverse_kl(h.reshape(-1, s.hidden), head(mg), teacher_hidden, teacher_head, **loss_args)
            out.loss.backward()
            finalize_grads(mg)
            grads = [g for _, g in mg_master.grads()]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            coef = (1.0 / (norm + 1e-6)).clamp(max=1.0)  # clip 1.0, as the trainer
            for g in grads:
                g.mul_(coef)
            mg_master.step()
            mg_master.zero_grad()
            return out.loss.detach()

        results.append(bench(f"megatron+fp32master[{attention}]", s, env, megatron_master_step, peak_tf))
        report(results[-1])
        del mg, mg_master, megatron_master_step

    # ---- megatron backend with megatron's distributed optimizer: the trainer's code path (trainer.optimizer=
    # distributed), imported from the package
    for attention in attentions:
        name = f"megatron+distopt[{attention}]"
        if env.cpu:
            log(f"SKIP {name}: megatron's distributed optimizer needs CUDA (megatron allocates its gradient buffers "
                f"and scalars on CUDA); trainer.optimizer=auto uses torch AdamW on CPU")
            continue
        from oel_hpc.train.megatron.optimizer import DistributedAdam

        env.free()
        mg = build_megatron(s, env, state, dtype, attention).train()
        dist_opt = DistributedAdam(mg, lr=1e-6, weight_decay=0.0, grad_clip=1.0)

        def distopt_step():
            h = final_hidden(mg, ids)  # the GPTModel is called directly; the DDP hooks fill the fp32 grad buffers
            out = topk_reverse_kl(h.reshape(-1, s.hidden), head(mg), teacher_hidden, teacher_head, **loss_args)
            out.loss.backward()
            dist_opt.step()  # finalize_model_grads, clip 1.0, Adam step, all-gather, zero the buffers
            return out.loss.detach()

        results.append(bench(name, s, env, distopt_step, peak_tf))
        report(results[-1])
        del mg, dist_opt, distopt_step
    env.free()
    log(f"   throughput part took {time.perf_counter() - t_start:.0f} s")
    return results


def report_targets(results: list[Result]) -> None:
    base = results[0]
    by_name = {r.name: r for r in results}
    for r in results[1:]:
        ratio = r.tokens_per_s / base.tokens_per_s
        if not r.name.startswith("megatron"):  # torch+fp32master: what the float32 master costs, no target
            log(f"RATIO {r.name}/torch: {ratio:.3f}x tokens/s")
        else:
            met = "MET" if ratio >= TARGET_RATIO else "NOT MET"
            log(f"RATIO {r.name}/torch: {ratio:.3f}x tokens/s  (target >= {TARGET_RATIO:g}x: {met})")
        if r.mfu is None:
            log(f"TARGET {r.name} MFU >= {TARGET_MFU:g}%: n/a (unknown peak)")
        else:
            log(f"TARGET {r.name} MFU >= {TARGET_MFU:g}%: {'MET' if r.mfu >= TARGET_MFU else 'NOT MET'} "
                f"({r.mfu:.1f}%)")
        if r.peak is not None and base.peak is not None:
            log(f"MEMORY {r.name}/torch peak: {r.peak / base.peak:.3f}x ({gib(r.peak):.1f} vs {gib(base.peak):.1f} GiB)")
        d = abs(r.loss0 - base.loss0) / max(abs(base.loss0), 1e-12)
        log(f"LOSS(step 0) {r.name} vs torch: {r.loss0:.6f} vs {base.loss0:.6f} (rel diff {d:.2e}; same weights, "
            f"same teacher)")
        plain = by_name.get(r.name.replace("megatron+distopt[", "megatron[")) if "+distopt[" in r.name else None
        if plain is not None:
            memory = (f", peak memory {r.peak / plain.peak:.3f}x ({gib(r.peak):.1f} vs {gib(plain.peak):.1f} GiB)"
                      if r.peak is not None and plain.peak is not None else "")
            log(f"RATIO {r.name}/{plain.name}: {r.tokens_per_s / plain.tokens_per_s:.3f}x tokens/s{memory} "
                f"(distributed optimizer vs plain AdamW, dp=1)")


# ------------------------------------------------------------------------------------------------------- main
def imported_third_party() -> list[str]:
    stdlib = getattr(sys, "stdlib_module_names", set())
    tops = {name.split(".")[0] for name in list(sys.modules)}
    return sorted(t for t in tops if t and not t.startswith("_") and t not in stdlib and t not in ("oel_hpc",
                                                                                                    "shims"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU, fp32 (CPU shims for megatron)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per backend")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per backend")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (overrides the table)")
    ap.add_argument("--skip-throughput", action="store_true", help="parity only")
    ap.add_argument("--throughput-dtype", choices=("float32", "bfloat16"), default=None,
                    help="default: bfloat16 on the GPU, float32 with --cpu-smoke (bfloat16 there adds the fp32-master "
                         "lines)")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()

    if args.cpu_smoke:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        install_cpu_shims()  # before megatron is imported
    import torch
    import transformers

    if not args.cpu_smoke and not torch.cuda.is_available():
        log("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --cpu-smoke on a CPU machine")
        return 2
    if args.cpu_smoke:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = TINY if args.cpu_smoke else QWEN3_1_7B
    s = replace(s, steps=args.steps or s.steps, warmup=s.warmup if args.warmup is None else args.warmup)
    env = Env(cpu=args.cpu_smoke)
    import megatron.core

    from oel_hpc.train.megatron.model import have_transformer_engine

    te = have_transformer_engine()
    attentions = ["sdpa"] + (["te"] if te else [])
    if args.cpu_smoke:
        device_name, peak_tf = "CPU", args.peak_tflops
    else:
        device_name = torch.cuda.get_device_name(env.device)
        peak_tf = args.peak_tflops or peak_tflops(device_name)
        # parity in fp32 means fp32: no TF32 anywhere
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    throughput_dtype = getattr(torch, args.throughput_dtype or ("float32" if args.cpu_smoke else "bfloat16"))
    log(f"== gpu_check{' --cpu-smoke' if args.cpu_smoke else ''}: device {device_name}"
        + (f" (peak dense bf16 {peak_tf:g} TFLOP/s)" if peak_tf else " (peak FLOP/s unknown: MFU n/a)")
        + f"; python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"megatron-core {getattr(megatron.core, '__version__', '?')}, TransformerEngine {'yes' if te else 'no'}")
    log(f"== model: {s.name}: hidden {s.hidden}, {s.layers} layers, {s.heads} heads / {s.kv_heads} KV heads, head_dim "
        f"{s.head_dim}, FFN {s.ffn}, vocab {s.vocab:,}, {'tied' if s.tied else 'untied'} embeddings, rope_theta "
        f"{s.rope_theta:g}; random weights")
    env.init_megatron()
    try:
        ok, hf = run_parity(s, env, attentions)
        box = [hf]
        del hf
        results = []
        if not args.skip_throughput:
            results = run_throughput(s, env, box, throughput_dtype, attentions, peak_tf)
            report_targets(results)
        box.clear()
    finally:
        env.close()

    third = imported_third_party()
    bad = [m for m in FORBIDDEN_IMPORTS if m in third]
    log(f"== imports: {', '.join(third)}")
    if bad:
        log(f"   WARNING: the import chain pulled {', '.join(bad)} (the check should need only torch, transformers, "
            f"megatron-core, numpy, safetensors)")
    else:
        log(f"   none of {', '.join(FORBIDDEN_IMPORTS)} imported")
    finite = all(r.losses_finite for r in results)
    if not finite:
        log("FAIL: a loss was not finite: " + ", ".join(r.name for r in results if not r.losses_finite))
    log(f"RESULT: parity {'PASS' if ok else 'FAIL'}"
        + (f"; losses {'finite' if finite else 'NOT finite'}" if results else "")
        + f"; total {time.perf_counter() - t_all:.0f} s")
    return 0 if ok and finite else 1


if __name__ == "__main__":
    sys.exit(main())
