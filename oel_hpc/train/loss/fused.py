"""Fused GPU path of the top-k reverse-KL loss (docs/design.md, "The loss"; the plain oracle is reference.py's
`topk_reverse_kl_reference`, the PyTorch path chunked.py). Triton kernels compute hidden → logits →
log-softmax → student top-k → gather → KL and the backward without ever holding a [tokens × vocab] tensor of logits.

Same contract as `topk_reverse_kl`: `fused_topk_reverse_kl(hs [N,H], Ws [V,H], ht [N,H], Wt [V,H], k=, temperature=,
renormalize=, normalizer=)` → `LossOutput` (loss = Σ ℓ_t / normalizer, kl_sum, tokens, full-vocabulary entropies).
Inputs float32, bfloat16 or float16; every softmax quantity is fp32 (logits are the fp32 accumulators of the dot
products — never rounded to bf16, unlike the PyTorch paths whose bf16 matmuls round the logits).

Forward
  1. student stream (`_stream_kernel`, DO_TOPK): grid = row blocks × vocab splits. Each program streams its vocab
     range in tiles (`tl.dot` over H slices, fp32 accumulator) and keeps per row an online max / sum-exp / entropy
     (Σ e^(z−m)(z−m)) and the running top-KP logits (KP = next power of two ≥ k, ≥ 16) as int64 keys
     (monotone fp32 bits << 32 | (2³¹−1 − id): one integer compare orders by value, then by the *lower* id, so ties
     are deterministic: the lowest ids win, as a stable descending sort would pick them). The buffer's first
     KP/BLOCK_V tiles are copied in as they are; after that only keys beating the row's current minimum are
     candidates, and each row inserts its best remaining candidate in place of its minimum, as many rounds as the
     block's largest candidate count (≤ KP) — after the first tiles that is a handful per tile (≈ k/t in tile t for
     unordered logits). No sort is needed (and `tl.sort` is very slow in the interpreter).
     The per-split partial results are combined in PyTorch (log-sum-exp of the splits, `torch.topk` over the
     splits × KP distinct keys) into the row's max m and log S = logsumexp − m, entropy, the k ids and the
     student logits at them.
  2. teacher stream: the same kernel without top-k (logsumexp and entropy of the teacher).
  3. `_gather_dot_kernel`: the teacher logits at the student's ids, h_t · W_t[id] (k rows of W_t per position).
  4. ℓ from the [N, k] log-probs in PyTorch (common.py's `_topk_kl`, with renormalisation), so autograd yields
     ga = ∂loss/∂(z_S/τ) [N, k] and glse = ∂loss/∂log S [N] for the student (log-probs as (z/τ − m) − log S:
     a rounded fp32 lse would cost near-max log-probs their precision, see `_stream`).
Backward (`_StudentTopK.backward`): ∂loss/∂z = (scatter(ga at S) + glse · softmax(z/τ)) / τ, formed vocab slab
  by vocab slab: `_dz_kernel` recomputes the logits of one slab (tl.dot) and writes dz for it ([N × Vs] in the
  input dtype, the only vocabulary-sized buffer, bounded by `slab_bytes`), the sparse part added in-kernel from the
  per-row sorted ids; then cuBLAS: grad_W[slab] = dzᵀ h (complete over all N rows in one GEMM with fp32
  accumulation, written once into the output in the weight dtype: no [V, H] fp32 accumulator, no atomics) and
  grad_h += dz W[slab] (fp32 accumulator [N, H]).

Passes over the weights: W_s three times (forward stream, backward recompute, grad_h GEMM), W_t once plus k rows
per position; five T×H×V GEMMs in total (the naive path has four; the extra one is the backward's recompute).

Stored between forward and backward: the student's top-k ids (int64 [N, k]), m and log S (fp32 [N] each), what the
autograd tail saves ([N, k] fp32: e^lp and lp − lq; a few more with renormalize) and references to the inputs.
Extra memory beyond the inputs, N tokens, 16-bit inputs:
  forward transient  N·splits·KP·8 (partial top-k keys; splits ≈ 4·SMs / row blocks) + torch.topk's [N, k] outputs
  saved              N·k·8 + N·8 + ≈ 2·N·k·4
  backward transient min(slab_bytes, N·V·2) (dz slab) + N·H·4 (fp32 grad_h) + 2048·H·4 (GEMM temporary)
                     + N·k·8 (ids sorted per row and their ga) + N·(Vs/BLOCK_V + 1)·4 (per-tile offsets)
  outputs            V·H·2 (grad_W) + N·H·2 (grad_h), as for any implementation.
At T = 8192, H = 2560, V = 151,936, k = 256, bf16, slab_bytes = 32 MiB (Vs = 2048, 75 slabs), 132 SMs (5 splits):
forward peak ≈ 0.15 GB; saved ≈ 34 MB (42 with renormalize); backward peak ≈ 0.99 GB = 0.92 GiB, of which 0.82 GB
are the gradients themselves (grad_W 0.78 GB): ≈ 0.17 GB beyond them (accounted on the meta device with the kernels
stubbed out). The kernels are checked in Triton's interpreter against the PyTorch paths (tests/test_loss_triton.py);
their tiles were chosen by compiling for sm_90 and sm_80 with ptxas so that they do not spill (`_tiles`). GPU
timings: tools/gpu_loss_check.sh; what has run where: docs/results.md.

Triton APIs: tl.dot (input_precision), tl.load/store with masks, tl.where, tl.max/min/sum reductions, tl.reshape,
bitcast .to(tl.int32, bitcast=True), int64 shifts, module-level tl.constexpr, loops and ifs on runtime scalars —
all present since Triton 3.0 (torch 2.4), so in Triton 3.5 (torch 2.11) and 3.9 alike; no tl.sort / tl.topk /
tl.gather (tl.topk is recent, tl.sort is slow in the interpreter).

k ≤ FUSED_MAX_K (256) is the kernels' range: a larger k raises ValueError (use the chunked path).

Triton is imported guardedly: this module imports without triton; calling the loss then raises a clear error. On
a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported) — how the tests
check them; there the bf16/fp16 tiles are upcast to fp32 before tl.dot (the interpreter would multiply bf16 as raw
uint16), the same numbers as a 16-bit dot with fp32 accumulation.

On a GPU, `python tools/bench_loss.py` times fused / chunked / naive / Liger at the GPU shape (T 8192, H 2560, V 151,936, k 256) and `--check`
compares their values.
"""
from __future__ import annotations

import os

import torch

from oel_hpc.train.loss.common import FUSED_MAX_K, LossOutput, _topk_kl, check_inputs

try:  # guarded: the package must import where triton is absent (CPU-only installs)
    import triton
    import triton.language as tl
except Exception as _e:  # ImportError, or a broken install raising something else
    triton = tl = None
    _TRITON_ERROR: Exception | None = _e
else:
    _TRITON_ERROR = None

_INT64_MIN = -(2 ** 63)
_KEY_LOW = 0x7FFFFFFF      # low 32 bits of a key: _KEY_LOW - id (lower id = larger key)


if triton is not None:
    _KMIN = tl.constexpr(_INT64_MIN)  # kernels may read module globals only as constexpr

    @triton.jit
    def _logits_tile(h_rows, w_cols, row_ok, col_ok, H, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
        """h·Wᵀ for BLOCK_M rows × BLOCK_V vocab columns, fp32 accumulation over H in BLOCK_H slices."""
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            h_ok = hh < H
            a = tl.load(h_rows + hh[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            b = tl.load(w_cols + hh[:, None], mask=h_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_UPCAST:  # Triton's interpreter multiplies bf16 as raw uint16: give it fp32 (exact products)
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _stream_kernel(h_ptr, w_ptr, m_ptr, s_ptr, t_ptr, key_ptr,
                       N, V, H, stride_h, stride_w, tiles_per_split, n_splits, tau,
                       BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, KP: tl.constexpr,
                       DO_TOPK: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
        """Online logsumexp / entropy statistics (and the running top-KP keys) of z = h·Wᵀ/τ over one vocab split
        for BLOCK_M rows. Writes m, s = Σ e^(z−m), t = Σ e^(z−m)(z−m) and KP keys per (row, split)."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: keeps 0·(m_old − m_new) a number
        s = tl.zeros([BLOCK_M], tl.float32)
        t = tl.zeros([BLOCK_M], tl.float32)
        kk = tl.arange(0, KP)
        # unique sentinels (every real key is larger): the buffer's minimum is always at exactly one position
        buf = tl.zeros([BLOCK_M, KP], tl.int64) + (kk.to(tl.int64)[None, :] + (_KMIN + 1))
        v_begin = pid_s * tiles_per_split * BLOCK_V
        v_stop = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
        for v0 in range(v_begin, v_stop, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
            acc = _logits_tile(h_rows, w_cols, row_ok, col_ok, H, BLOCK_M, BLOCK_V, BLOCK_H, PRECISION, DOT_UPCAST)
            z = tl.where(col_ok[None, :], acc / tau, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            d = z - m_new[:, None]
            e = tl.exp(d)
            t = alpha * (t + s * (m - m_new)) + tl.sum(e * tl.where(col_ok[None, :], d, 0.0), axis=1)
            s = alpha * s + tl.sum(e, axis=1)
            m = m_new
            if DO_TOPK:
                bits = z.to(tl.int32, bitcast=True)
                bits = tl.where(z == 0.0, 0, bits)                   # -0.0 ties with +0.0
                mono = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)    # signed order = float order
                key = (mono.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)
                tile = (v0 - v_begin) // BLOCK_V
                if tile < KP // BLOCK_V:  # never when KP < BLOCK_V
                    if KP >= BLOCK_V:
                        # a whole chunk of the buffer is still free (sentinels): the tile's keys go there as they are
                        b3 = tl.reshape(buf, [BLOCK_M, KP // BLOCK_V, BLOCK_V])
                        here = (tl.arange(0, KP // BLOCK_V)[None, :, None] == tile) & col_ok[None, None, :]
                        buf = tl.reshape(tl.where(here, key[:, None, :], b3), [BLOCK_M, KP])
                else:
                    key = tl.where(col_ok[None, :], key, _KMIN)
                    thr = tl.min(buf, axis=1)
                    cand = key > thr[:, None]
                    steps = tl.minimum(tl.max(tl.sum(cand.to(tl.int32), axis=1), axis=0), KP)
                    for _ in range(0, steps):
                        # every row inserts its best remaining candidate in place of its buffer's minimum
                        best = tl.max(tl.where(cand, key, _KMIN), axis=1)
                        upd = best > thr
                        buf = tl.where((buf == thr[:, None]) & upd[:, None], best[:, None], buf)
                        thr = tl.min(buf, axis=1)
                        cand = cand & (key < best[:, None]) & (key > thr[:, None])
        out = rows.to(tl.int64) * n_splits + pid_s
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(t_ptr + out, t, mask=row_ok)
        if DO_TOPK:
            tl.store(key_ptr + out[:, None] * KP + kk[None, :], buf, mask=row_ok[:, None])

    @triton.jit
    def _gather_dot_kernel(h_ptr, w_ptr, ids_ptr, out_ptr, k, H, stride_h, stride_w, tau,
                           BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[n, j] = h[n] · W[ids[n, j]] / τ in fp32."""
        n = tl.program_id(0).to(tl.int64)
        jj = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        j_ok = jj < k
        ids = tl.load(ids_ptr + n * k + jj, mask=j_ok, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_K], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            h_ok = hh < H
            x = tl.load(h_ptr + n * stride_h + hh, mask=h_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + ids[:, None] * stride_w + hh[None, :], mask=j_ok[:, None] & h_ok[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(out_ptr + n * k + jj, acc / tau, mask=j_ok)

    @triton.jit
    def _dz_kernel(h_ptr, w_ptr, m_ptr, logs_ptr, glse_ptr, sid_ptr, sga_ptr, off_ptr, dz_ptr,
                   N, H, k, stride_h, stride_w, v_lo, v_hi, slab_w, n_off, tau,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                   DOT_UPCAST: tl.constexpr):
        """dz[n, v − v_lo] = (glse[n]·softmax(z/τ)[n, v] + Σ_j [sid[n, j] = v]·sga[n, j]) / τ for v in [v_lo, v_hi),
        softmax = exp((z/τ − m) − log S) with the row's max m and log S = lse − m (_stream).
        sid: each row's top-k ids sorted ascending, sga the matching ∂loss/∂(z/τ); off[n, i]: how many of row n's ids
        lie below the start of the slab's tile i (so tile i's ids are sid[n, off[n, i]:off[n, i+1]])."""
        pid_m = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        cols = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        h_rows = h_ptr + rows64[:, None] * stride_h
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
        acc = _logits_tile(h_rows, w_cols, row_ok, col_ok, H, BLOCK_M, BLOCK_V, BLOCK_H, PRECISION, DOT_UPCAST)
        m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
        logs = tl.load(logs_ptr + rows, mask=row_ok, other=0.0)
        gl = tl.load(glse_ptr + rows, mask=row_ok, other=0.0)
        dz = gl[:, None] * tl.exp((acc / tau - m[:, None]) - logs[:, None])
        start = tl.load(off_ptr + rows64 * n_off + pid_v, mask=row_ok, other=0)
        cnt = tl.load(off_ptr + rows64 * n_off + pid_v + 1, mask=row_ok, other=0) - start
        for j in range(0, tl.max(cnt, axis=0)):
            ok = row_ok & (j < cnt)
            c = tl.load(sid_ptr + rows64 * k + start + j, mask=ok, other=-1)
            g = tl.load(sga_ptr + rows64 * k + start + j, mask=ok, other=0.0)
            dz += tl.where(cols[None, :] == c[:, None], g[:, None], 0.0)
        dz = dz / tau
        tl.store(dz_ptr + rows64[:, None] * slab_w + (cols - v_lo)[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


# ------------------------------------------------------------------------------------------------ host side

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _require_triton(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError(f"the fused top-k reverse-KL loss needs triton, which does not import here "
                           f"({_TRITON_ERROR!r}); use the chunked path (impl='chunked')")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the fused top-k reverse-KL loss runs on CUDA tensors (or on the CPU in Triton's "
                           "interpreter: TRITON_INTERPRET=1 set before triton is imported); use impl='chunked'")


def _dot_args(x: torch.Tensor) -> dict:
    """PRECISION: fp32 inputs multiply in IEEE fp32 (no TF32 rounding); for 16-bit inputs it is unused. DOT_UPCAST:
    Triton's interpreter (CPU) feeds bf16 to numpy as raw uint16 in tl.dot, so there the tiles are upcast to fp32
    first — the same numbers (a product of two bf16 is exact in fp32, the accumulation is fp32 either way)."""
    upcast = not x.is_cuda and x.dtype != torch.float32
    return dict(PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32", DOT_UPCAST=upcast)


def _tiles(kernel: str, x: torch.Tensor, kp: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_V) per kernel, chosen by compiling for sm_90 and sm_80 at 8 warps and reading ptxas's register
    and spill counts (not timed). 16-bit: student 64×128 (KP 256: 255 registers and a 24-byte
    spill on sm_90; 64×64 without spill elsewhere), teacher and dz 128×128 (≤ 231 registers). fp32 (IEEE dots):
    smaller tiles, which keep sm_80 from spilling."""
    wide = x.dtype != torch.float32
    if kernel == "student":
        if not wide:
            return 32, 64
        hopper = not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] >= 9
        return (64, 128) if kp < 256 or hopper else (64, 64)
    return (128, 128) if wide else (64, 64)


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _stream(h: torch.Tensor, W: torch.Tensor, tau: float, kp: int | None, splits: int | None):
    """Run _stream_kernel; returns (m [N], log S [N], entropy [N], keys [N, splits·KP] or None): the row's max
    logit m and log S = lse − m, kept apart because lse rounded in fp32 loses what near-max log-probs z − lse need
    (ulp(lse) ≈ 1e-5 at |lse| ≈ 100, while 1 − p of a peaked row's top token can be ≈ 1e-3)."""
    N, H = h.shape
    V = W.size(0)
    do_topk = kp is not None
    kp = kp or 16
    block_m, block_v = _tiles("student" if do_topk else "teacher", h, kp)
    block_h = 64
    row_blocks = triton.cdiv(N, block_m)
    v_tiles = triton.cdiv(V, block_v)
    if splits is None:  # enough programs to fill the GPU (4 per SM); on the CPU (interpreter) two when possible
        splits = triton.cdiv(4 * _sms(h.device), row_blocks) if h.is_cuda else 2
    splits = max(1, min(splits, v_tiles))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)  # no empty split
    f32 = dict(dtype=torch.float32, device=h.device)
    m, s, t = (torch.empty(N, splits, **f32) for _ in range(3))
    keys = torch.empty(N, splits, kp, dtype=torch.int64, device=h.device) if do_topk else m
    _stream_kernel[(row_blocks, splits)](
        h, W, m, s, t, keys, N, V, H, h.stride(0), W.stride(0), tiles_per_split, splits, tau,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_H=block_h, KP=kp, DO_TOPK=do_topk,
        **_dot_args(h), num_warps=8)
    # combine the splits: m, s, t are relative to each split's own max
    mx = m.max(dim=1, keepdim=True).values
    scale = torch.exp(m - mx)
    S = (s * scale).sum(1)
    T = (scale * (t + s * (m - mx))).sum(1)
    ent = S.log() - T / S
    return mx.squeeze(1), S.log(), ent, (keys.view(N, splits * kp) if do_topk else None)


def _decode(keys: torch.Tensor):
    """int64 keys → (fp32 values, int64 ids)."""
    mono = (keys >> 32).to(torch.int32)
    bits = torch.where(mono < 0, mono ^ 0x7FFFFFFF, mono)
    return bits.view(torch.float32), _KEY_LOW - (keys & 0xFFFFFFFF)


class _StudentTopK(torch.autograd.Function):
    """(hs, Ws) → (a_S = z_S/τ − m at the student's top-k ids [N, k] fp32, log S [N] fp32, Σ entropy, ids [N, k]
    int64), so lp_S = a_S − log S. Gradient flows through a_S and log S (∂ log S/∂z = softmax, as ∂lse/∂z); ids and
    entropy are not differentiable."""

    @staticmethod
    def forward(ctx, hs, Ws, k, tau, splits, slab_bytes):
        kp = max(16, _next_pow2(k))
        m, logs, ent, keys = _stream(hs, Ws, tau, kp, splits)
        vals, ids = _decode(keys.topk(k, dim=1, sorted=False).values)
        ctx.save_for_backward(hs, Ws, ids, m, logs)
        ctx.tau, ctx.slab_bytes = tau, slab_bytes
        ent_sum = ent.sum()
        ctx.mark_non_differentiable(ent_sum, ids)
        return vals - m[:, None], logs, ent_sum, ids

    @staticmethod
    def backward(ctx, ga, glse, _g_ent, _g_ids):
        hs, Ws, ids, m, logs = ctx.saved_tensors
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_W):
            return None, None, None, None, None, None
        N, H = hs.shape
        V, k = Ws.size(0), ids.size(1)
        tau = ctx.tau
        ga = torch.zeros(N, k, dtype=torch.float32, device=hs.device) if ga is None else ga.float()
        glse = torch.zeros(N, dtype=torch.float32, device=hs.device) if glse is None else glse.float().contiguous()
        sid, order = ids.sort(dim=1)
        sga = ga.gather(1, order).contiguous()
        sid = sid.to(torch.int32).contiguous()
        del order, ga
        (block_m, block_v), block_h = _tiles("dz", hs, 0), 64
        # vocab slab: the dz buffer [N, Vs] in the input dtype stays within slab_bytes (at least one tile)
        vs = max(block_v, (ctx.slab_bytes // max(1, N * hs.element_size())) // block_v * block_v)
        vs = min(vs, triton.cdiv(V, block_v) * block_v)
        buf = torch.empty(N * min(vs, V), dtype=hs.dtype, device=hs.device)
        gh = torch.zeros(N, H, dtype=torch.float32, device=hs.device) if need_h else None
        gW = torch.empty_like(Ws) if need_W else None
        for v_lo in range(0, V, vs):
            v_hi = min(v_lo + vs, V)
            w = v_hi - v_lo
            n_tiles = triton.cdiv(w, block_v)
            bounds = torch.arange(n_tiles + 1, device=hs.device, dtype=torch.int32) * block_v + v_lo
            off = torch.searchsorted(sid, bounds.clamp_(max=v_hi).expand(N, -1).contiguous(), out_int32=True)
            dz = buf[:N * w].view(N, w)
            _dz_kernel[(triton.cdiv(N, block_m), n_tiles)](
                hs, Ws, m, logs, glse, sid, sga, off, dz, N, H, k, hs.stride(0), Ws.stride(0), v_lo, v_hi, w,
                n_tiles + 1, tau, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_H=block_h,
                **_dot_args(hs), num_warps=8)
            Wslab = Ws[v_lo:v_hi]
            if need_W:
                torch.mm(dz.t(), hs, out=gW[v_lo:v_hi])  # all N rows at once: one fp32-accumulated GEMM
            if need_h:
                _addmm_fp32(gh, dz, Wslab)
        del buf, dz, sid, sga, off
        return (gh.to(hs.dtype) if need_h else None), gW, None, None, None, None


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: int = 2048) -> None:
    """acc (fp32) += a @ b with the product kept in fp32 (a, b possibly 16-bit); row chunks bound the temporary."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    for r in range(0, a.size(0), rows):
        part = a[r:r + rows]
        if a.is_cuda:
            try:
                acc[r:r + rows] += torch.mm(part, b, out_dtype=torch.float32)
                continue
            except (TypeError, RuntimeError, NotImplementedError):  # torch without mm(out_dtype=) for this case
                pass
        acc[r:r + rows] += (part @ b).float()


def _teacher(ht: torch.Tensor, Wt: torch.Tensor, ids: torch.Tensor, tau: float, splits: int | None):
    """Teacher log-probs at the student's ids [N, k] and Σ entropy (no gradient)."""
    m, logs, ent, _ = _stream(ht, Wt, tau, None, splits)
    N, k = ids.shape
    zt = torch.empty(N, k, dtype=torch.float32, device=ht.device)
    block_k = min(64, _next_pow2(k))
    _gather_dot_kernel[(N, triton.cdiv(k, block_k))](ht, Wt, ids.contiguous(), zt, k, ht.size(1), ht.stride(0),
                                                     Wt.stride(0), tau, BLOCK_K=block_k, BLOCK_H=64, num_warps=4)
    return (zt - m[:, None]) - logs[:, None], ent.sum()


def _validate(hs, Ws, ht, Wt, k, temperature, normalizer):
    normalizer = check_inputs(hs, Ws, ht, Wt, k=k, temperature=temperature, normalizer=normalizer)
    if k > FUSED_MAX_K:
        raise ValueError(f"the fused loss kernels support k <= {FUSED_MAX_K}, got k={k}; use impl='chunked'")
    for name, x in (("student hidden", hs), ("student head weight", Ws), ("teacher hidden", ht),
                    ("teacher head weight", Wt)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"the fused loss takes float32, bfloat16 or float16 tensors, got {name} {x.dtype}")
    if hs.dtype != Ws.dtype or ht.dtype != Wt.dtype:
        raise ValueError(f"hidden and head weight must share a dtype: student {hs.dtype}/{Ws.dtype}, "
                         f"teacher {ht.dtype}/{Wt.dtype}")
    return normalizer


def fused_topk_reverse_kl(student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                          teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor, *,
                          k: int = 256, temperature: float = 0.7, renormalize: bool = False,
                          normalizer: float | int | torch.Tensor | None = None,
                          vocab_splits: int | None = None, slab_bytes: int = 32 << 20) -> LossOutput:
    """`topk_reverse_kl` (dispatch.py) on the Triton kernels of this module: same arguments, same LossOutput.
    vocab_splits: vocabulary ranges per row block in the forward (None: enough programs for the GPU);
    slab_bytes: bound on the backward's dz buffer [N × vocab slab] (module docstring)."""
    normalizer = _validate(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, k,
                           temperature, normalizer)
    hs, Ws = student_hidden, student_head_weight
    ht, Wt = teacher_hidden.detach(), teacher_head_weight.detach()
    _require_triton(hs, Ws, ht, Wt)
    tau = float(temperature)
    hs, Ws, ht, Wt = (x if x.stride(-1) == 1 else x.contiguous() for x in (hs, Ws, ht, Wt))
    N = hs.size(0)
    a_S, logs_s, ent_s, ids = _StudentTopK.apply(hs, Ws, k, tau, vocab_splits, slab_bytes)
    with torch.no_grad():
        lq_S, ent_t = _teacher(ht, Wt, ids, tau, vocab_splits)
    kl = _topk_kl(a_S - logs_s[:, None], lq_S, renormalize).sum()
    return LossOutput(loss=kl / normalizer, kl_sum=kl.detach(), tokens=N,
                      student_entropy=ent_s / N, teacher_entropy=ent_t / N)

