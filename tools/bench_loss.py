"""Top-k reverse-KL loss through the LM head (docs/design.md, "The loss"): time and peak extra memory of one
forward+backward, side by side, for

    naive    full [T × V] logits for student and teacher through `topk_reverse_kl_reference` (all T positions valid)
    chunked  ours: `topk_reverse_kl(impl="chunked")`, chunks of positions, gradients formed in the forward
    fused    ours: `topk_reverse_kl(impl="fused")`, the Triton kernels (GPU only)
    liger    liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=1, weight_hard_loss=0): the FULL-vocabulary
             reverse KL (not top-k) over chunks of positions, its gradients computed in the forward

Each implementation runs in a fresh subprocess, so its peak memory is its own. Memory is the peak *extra* over what
the inputs hold: on CPU peak RSS (VmHWM, reset after warm-up) minus RSS after the inputs are built, with
MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 set for the child (glibc otherwise keeps freed memory and RSS
misleads); on CUDA torch.cuda.max_memory_allocated minus memory_allocated after the inputs. Both include the
gradients of h and W, which every implementation must produce (printed below the table). Time is the median of
--reps forward+backward steps after warm-up (pooled over --rounds interleaved runs); gradients are set to None between steps, as the trainer's
zero_grad(set_to_none=True) does.

    python tools/bench_loss.py                       # CPU: T 2048, H 512, V 32,000, k 256 (docs/results.md)
    python tools/bench_loss.py --shape gpu           # T 8192, H 2560, V 151,936, k 256 (default on CUDA)
    python tools/bench_loss.py --shape 64,32,500,16 --reps 1
    python tools/bench_loss.py --check               # assert naive, chunked (and fused on CUDA) agree
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

SHAPES = {"cpu": (2048, 512, 32000, 256), "gpu": (8192, 2560, 151936, 256)}
IMPLS = ("naive", "chunked", "fused", "liger")
TAU = 0.7
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
GIB, MIB = 1024 ** 3, 1024 ** 2


def parse_shape(s: str) -> tuple[int, int, int, int]:
    if s in SHAPES:
        return SHAPES[s]
    try:
        T, H, V, k = (int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be cpu, gpu or T,H,V,k, got '{s}'") from None
    if min(T, H, V, k) < 1 or k > V:
        raise argparse.ArgumentTypeError(f"--shape {s}: need positive sizes and k <= V")
    return T, H, V, k


# ------------------------------------------------------------------------------------------------ in the worker

def _rss_kib() -> tuple[int, int]:
    s = open("/proc/self/status").read()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", s).group(1)) for k in ("VmRSS", "VmHWM"))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def make_inputs(T, H, V, dtype, device, seed=0):
    """Student hidden/head with grad, teacher = student perturbed (a moderate KL); logits O(1–3) like an LM head."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    hs = torch.randn(T, H, generator=g)
    Ws = torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)
    ht = hs + 0.3 * torch.randn(T, H, generator=g)
    Wt = Ws + 0.3 * (2.0 / H ** 0.5) * torch.randn(V, H, generator=g)
    cast = lambda x: x.to(device=device, dtype=dtype)
    return cast(hs).requires_grad_(), cast(Ws).requires_grad_(), cast(ht), cast(Wt)


def make_step(impl, hs, Ws, ht, Wt, k, chunk_size, liger_compiled):
    """A function running one forward and returning the scalar loss (the caller runs backward)."""
    import torch

    from oel_hpc.train.loss import topk_reverse_kl, topk_reverse_kl_reference

    if impl == "naive":
        ones = torch.ones(1, hs.size(0), dtype=torch.bool, device=hs.device)

        def step():
            with torch.no_grad():
                zt = ht @ Wt.t()
            return topk_reverse_kl_reference((hs @ Ws.t())[None], zt[None], ones, k=k, temperature=TAU)
    elif impl in ("chunked", "fused"):
        def step():
            return topk_reverse_kl(hs, Ws, ht, Wt, k=k, temperature=TAU, chunk_size=chunk_size, impl=impl).loss
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # beta=1: F.kl_div(lq, lp, log_target) = Σ_v p_v (lp_v − lq_v), the full-vocabulary reverse KL; logits are
        # divided by the temperature before the log-softmax, as ours; weight_hard_loss=0 skips its CE term; the
        # loss is Σ_t KL_t / #(labels != -100) = the token mean (all positions valid here)
        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, temperature=TAU,
                                     compiled=liger_compiled, chunk_size=chunk_size)
        labels = torch.zeros(hs.size(0), dtype=torch.long, device=hs.device)

        def step():
            return fn(hs, Ws, ht, Wt, labels)
    else:
        raise ValueError(impl)
    return step


def worker(a) -> dict:
    import torch

    torch.manual_seed(0)
    T, H, V, k = a.shape
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = getattr(torch, a.dtype)
    inputs = make_inputs(T, H, V, dtype, dev)
    hs, Ws = inputs[:2]
    step = make_step(a.worker, *inputs, k, a.chunk_size, a.liger_compiled)  # imports (liger: triton) before the base
    sync()
    if cuda:
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib()[0] * 1024

    def run():
        loss = step()
        loss.backward()
        sync()
        assert hs.grad is not None and Ws.grad is not None
        value = float(loss.detach())
        hs.grad = Ws.grad = None
        return value

    for _ in range(a.warmup):
        run()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        peak_reset = _reset_peak_rss()
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        value = run()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        note = ""
    else:
        peak = _rss_kib()[1] * 1024 - base
        note = "" if peak_reset else "peak RSS since process start (clear_refs not writable)"
    return {"impl": a.worker, "time_s": statistics.median(times), "times_s": times, "extra_bytes": peak,
            "loss": value, "threads": torch.get_num_threads(), "note": note}


# ------------------------------------------------------------------------------------------------ in the parent

def run_worker(a, impl) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--shape", ",".join(map(str, a.shape)),
           "--dtype", a.dtype, "--device", a.device, "--reps", str(a.reps), "--warmup", str(a.warmup),
           "--chunk-size", str(a.chunk_size), "--liger-compile", "on" if a.liger_compiled else "off"]
    env = dict(os.environ, **(MALLOC_ENV if a.device == "cpu" else {}))
    env.setdefault("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return {"impl": impl, "error": err[:200]}


def fmt_mem(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB else f"{b / MIB:.0f} MiB"


def fmt_time(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def bench(a) -> int:
    T, H, V, k = a.shape
    cuda = a.device == "cuda"
    print(f"top-k reverse KL, forward+backward: T {T}, H {H}, V {V:,}, k {k}, τ {TAU}, {a.dtype} on {a.device}"
          f"{'' if cuda else f' ({os.cpu_count()} cores)'}; chunk {a.chunk_size} positions (chunked, liger); "
          f"median of {a.reps} after {a.warmup} warm-up, × {a.rounds} interleaved rounds; one fresh process per "
          f"implementation and round")
    rows = {impl: {"impl": impl, "na": "n/a (GPU only)"} for impl in IMPLS if impl == "fused" and not cuda}
    for _ in range(a.rounds):  # interleaved, so a change in the machine's load hits every implementation alike
        for impl in IMPLS:
            if impl in rows and ("na" in rows[impl] or "error" in rows[impl]):
                continue
            r = run_worker(a, impl)
            if impl in rows and "error" not in r:  # pool the rounds: all timed steps, the highest peak
                r["times_s"] = rows[impl]["times_s"] + r["times_s"]
                r["time_s"] = statistics.median(r["times_s"])
                r["extra_bytes"] = max(r["extra_bytes"], rows[impl]["extra_bytes"])
            rows[impl] = r
    rows = {impl: rows[impl] for impl in IMPLS}
    naive = rows["naive"]
    labels = {"naive": "naive full [T×V] logits", "chunked": "ours: chunked", "fused": "ours: fused (Triton)",
              "liger": "Liger fused linear JSD β=1*"}
    print()
    print(f"| {'implementation':<28} | {'time':>9} | {'(min)':>9} | {'× naive':>7} | {'extra peak mem':>14} | "
          f"{'× naive':>7} | {'loss':>10} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 16}|{'-' * 9}|{'-' * 12}|")
    for impl, r in rows.items():
        if "na" in r or "error" in r:
            msg = r.get("na") or f"error: {r['error']}"
            print(f"| {labels[impl]:<28} | {msg}")
            continue
        tr = r["time_s"] / naive["time_s"] if "time_s" in naive else float("nan")
        mr = r["extra_bytes"] / naive["extra_bytes"] if naive.get("extra_bytes") else float("nan")
        print(f"| {labels[impl]:<28} | {fmt_time(r['time_s']):>9} | {fmt_time(min(r['times_s'])):>9} | {tr:>6.2f}× | "
              f"{fmt_mem(r['extra_bytes']):>14} | {mr:>6.3f}× | {r['loss']:>10.5f} |")
        if r.get("note"):
            print(f"|   note: {r['note']}")
    el = 2 if a.dtype in ("bfloat16", "float16") else 4 if a.dtype == "float32" else 8
    print(f"\n* Liger computes the FULL-vocabulary reverse KL (k = V), not our top-k: its loss is another quantity, "
          f"and it is not a correctness oracle here.")
    print(f"Every row includes the gradients it must return: dW [V×H] + dh [T×H] = {fmt_mem((V + T) * H * el)} in "
          f"{a.dtype} (the chunked path accumulates dW in fp32: {fmt_mem(V * H * max(el, 4))}).")
    if not cuda:
        print("CPU figures on a shared machine are noisy: compare ratios from one run, not across runs.")

    print("\ntargets:")
    ours = rows["fused"] if cuda else rows["chunked"]
    liger = rows["liger"]
    if "time_s" not in naive or "time_s" not in ours:
        print(f"  cannot evaluate: {'naive' if 'time_s' not in naive else ours['impl']} did not run")
        return 1
    tr, mr = ours["time_s"] / naive["time_s"], ours["extra_bytes"] / naive["extra_bytes"]
    checks = []
    if cuda:
        checks.append((f"fused extra peak ≤ 1.0 GiB: {fmt_mem(ours['extra_bytes'])}", ours["extra_bytes"] <= GIB))
        checks.append((f"fused time ≤ 1.0× naive: {tr:.2f}×", tr <= 1.0))
    else:
        checks.append((f"chunked extra memory ≤ 1/8 of naive: {mr:.3f}× (1/8 = 0.125)", mr <= 0.125))
        checks.append((f"chunked time ≤ 1.3× naive: {tr:.2f}×", tr <= 1.3))
    if "extra_bytes" in liger:
        checks.append((f"{ours['impl']} memory below Liger's: {fmt_mem(ours['extra_bytes'])} vs "
                       f"{fmt_mem(liger['extra_bytes'])}", ours["extra_bytes"] < liger["extra_bytes"]))
    else:
        checks.append(("below Liger's memory: Liger did not run", False))
    for text, ok in checks:
        print(f"  [{verdict(ok):>7}] {text}")
    return 0


def check(a) -> int:
    """One process: loss values and gradients of naive vs chunked (vs fused on CUDA) on the same inputs."""
    import torch

    T, H, V, k = a.shape
    dtype = getattr(torch, a.dtype)
    low = dtype in (torch.bfloat16, torch.float16)
    impls = ["naive", "chunked"] + (["fused"] if a.device == "cuda" else [])
    res = {}
    for impl in impls:
        hs, Ws, ht, Wt = make_inputs(T, H, V, dtype, torch.device(a.device))
        loss = make_step(impl, hs, Ws, ht, Wt, k, a.chunk_size, False)()
        loss.backward()
        res[impl] = (loss.detach().double().cpu(), hs.grad.double().cpu(), Ws.grad.double().cpu())
        del hs, Ws, ht, Wt, loss
    ref = res["naive"]
    ok = True
    rtol, atol = (2e-2, 2e-3) if low else (1e-4, 1e-6)
    for impl in impls:
        loss, gh, gW = res[impl]
        rel = abs(loss - ref[0]).item() / max(abs(ref[0]).item(), 1e-30)
        errs = [((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in ((gh, ref[1]), (gW, ref[2]))]
        good = rel <= rtol and max(errs) <= (5 * rtol if low else 1e-3)
        ok &= good
        print(f"{impl:>8}: loss {loss.item():.8f}  rel. diff {rel:.2e}  grad max rel. diff h {errs[0]:.2e} "
              f"W {errs[1]:.2e}  {'ok' if good else 'MISMATCH'}")
    print(f"check ({a.dtype}, T {T}, H {H}, V {V}, k {k}): {'PASSED' if ok else 'FAILED'} "
          "(Liger computes the full-vocabulary KL: not compared)")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", type=parse_shape, default=None, help="cpu | gpu | T,H,V,k (default: by device)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default: 3 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--rounds", type=int, default=None,
                   help="run every implementation this many times, interleaved, and pool the steps "
                        "(default: 2 on CPU, where the machine is shared; 1 on CUDA)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="positions per chunk, ours and Liger's (default: 256 on CPU, 1024 on CUDA)")
    p.add_argument("--liger-compile", choices=("auto", "on", "off"), default="auto",
                   help="Liger's torch.compile of its chunk step (auto: on CUDA only)")
    p.add_argument("--check", action="store_true", help="assert naive and our implementations agree, then exit")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = a.device == "cuda"
    a.shape = a.shape or SHAPES["gpu" if cuda else "cpu"]
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.reps = a.reps if a.reps is not None else (10 if cuda else 3)
    a.warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    a.rounds = a.rounds if a.rounds is not None else (1 if cuda else 2)
    a.chunk_size = a.chunk_size or (1024 if cuda else 256)
    a.liger_compiled = a.liger_compile == "on" or (a.liger_compile == "auto" and cuda)
    if a.reps < 1 or a.warmup < 0 or a.chunk_size < 1 or a.rounds < 1:
        p.error("--reps >= 1, --rounds >= 1, --warmup >= 0 and --chunk-size >= 1")

    if a.worker:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return 0
    if a.check:
        return check(a)
    return bench(a)


if __name__ == "__main__":
    sys.exit(main())
