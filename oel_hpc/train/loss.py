"""Consolidation loss: top-k reverse KL(student || teacher) on response tokens (DESIGN.md §1 "The loss").

For a response position t, lp = log_softmax(z_s / τ), lq = log_softmax(z_t / τ) over the full vocabulary and
S_t = the student's top-k ids (picked without gradient):

    ℓ_t = Σ_{v ∈ S_t} exp(lp_v) · (lp_v − lq_v)

With k = V this is the exact reverse KL. `topk_reverse_kl` is the production path: it takes hidden states of the
valid response positions and the LM-head weights and never materialises an [N × V] tensor — logits exist one
chunk of positions at a time.

Two implementations sit behind `topk_reverse_kl(..., impl=)`: "chunked" (the PyTorch autograd.Function below; runs
on any device) and "fused" (the Triton kernels of loss_triton.py; CUDA only, imported lazily). "auto" picks fused
when the tensors are on CUDA and triton imports, chunked otherwise; asking for "fused" where it cannot run is an
error, never a silent fallback.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor             # scalar with grad: Σ ℓ_t / normalizer
    kl_sum: torch.Tensor           # detached Σ ℓ_t
    tokens: int                    # number of response positions N
    student_entropy: torch.Tensor  # detached mean full-vocab entropy of softmax(z_s / τ)
    teacher_entropy: torch.Tensor  # detached, same for the teacher


def response_mask(response_ids: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """True up to and including the first EOS of each row, False after it. A row without EOS (truncated
    response) is all True: its padding must then not be an EOS-free token the caller forgot about."""
    eos = torch.as_tensor(eos_token_id, device=response_ids.device).reshape(-1)
    is_eos = torch.isin(response_ids, eos).long()
    # number of EOS strictly before t; a position is valid iff there is none
    return (is_eos.cumsum(-1) - is_eos) == 0


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # softmax math in fp32 at least (bf16/fp16 upcast; fp64 stays fp64 so gradcheck can run on it)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check(k: int, V: int, temperature: float) -> None:
    if not 1 <= k <= V:
        raise ValueError(f"top-k must satisfy 1 <= k <= V, got k={k}, V={V}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _topk_kl(lp_S: torch.Tensor, lq_S: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """ℓ per row from the student/teacher log-probs at the selected ids ([..., k] -> [...])."""
    if renormalize:
        lp_S = lp_S - lp_S.logsumexp(-1, keepdim=True)
        lq_S = lq_S - lq_S.logsumexp(-1, keepdim=True)
    return (lp_S.exp() * (lp_S - lq_S)).sum(-1)


def _topk_kl_and_grad(lp_S: torch.Tensor, lq_S: torch.Tensor, renormalize: bool, normalizer
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ ℓ over the rows, ∂(Σ ℓ / normalizer)/∂lp_S [..., k]): _topk_kl's value with its gradient by hand, for the
    losses that form their gradients in the forward."""
    a, b = lp_S, lq_S
    if renormalize:
        a = a - a.logsumexp(-1, keepdim=True)
        b = b - b.logsumexp(-1, keepdim=True)
    p = a.exp()
    g = p * (a - b + 1)  # d/da Σ e^a (a − b) = e^a (a − b + 1)
    if renormalize:  # back through a = lp_S − logsumexp(lp_S)
        g = g - p * g.sum(-1, keepdim=True)
    return (p * (a - b)).sum(), g / normalizer


def topk_lowest_id(x: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices [..., k] of the k largest entries of each row of x [..., n], ties at the k-th value broken
    towards the lower index, in ascending index order: THE tie rule of every loss implementation (the fused
    kernels' keys order equal values by lower id too), so the selected set is a function of x alone and the same
    on any device, chunking or tensor-parallel split.

    torch.topk leaves the choice among equal values open. It is kept where it cannot matter: a top-(k+1) shows
    which rows have the k-th and (k+1)-th values equal (a tie across the cut; frequent with bf16 logits), and only
    those rows are redone — the entries strictly above the k-th value, then the lowest indices equal to it — in
    blocks of rows, so the extra memory stays a fraction of the [c, n] input's."""
    if x.dim() != 2:  # leading dimensions as rows
        return topk_lowest_id(x.reshape(-1, x.size(-1)), k).view(*x.shape[:-1], k)
    c, n = x.shape
    if k == n:
        return torch.arange(n, device=x.device).expand(c, n).clone()
    vals, ids = x.topk(k + 1, dim=-1, sorted=False)
    last = vals.argmin(-1, keepdim=True)  # the (k+1)-th largest (one of them, if tied): moved to the end, dropped
    cut = vals.gather(-1, last)
    vals.scatter_(-1, last, vals[:, -1:].clone())
    ids.scatter_(-1, last, ids[:, -1:].clone())
    vals, ids = vals[:, :k], ids[:, :k].contiguous()
    thr = vals.amin(-1, keepdim=True)  # the k-th largest
    split = (thr == cut).squeeze(-1)
    if not split.any():
        return ids.sort(-1).values
    above = vals > thr
    n_above = above.sum(-1)
    # in the rows to redo: the ids above the k-th value first (any order); the lowest tied indices fill the rest
    front = above.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
    ids = torch.where(split[:, None], ids.gather(-1, front), ids)
    step = max(1, c // 8)
    for b in range(0, c, step):
        if not split[b:b + step].any():
            continue
        tied = x[b:b + step] == thr[b:b + step]  # x[b:b + step] is a view: no copy
        row, col = tied.nonzero(as_tuple=True)  # row-major: ascending indices within a row
        count = torch.bincount(row, minlength=tied.size(0))
        rank = torch.arange(row.numel(), device=x.device) - (count.cumsum(0) - count)[row]
        row = row + b
        take = split[row] & (rank < (k - n_above)[row])
        row, col, rank = row[take], col[take], rank[take]
        ids.view(-1)[row * k + n_above[row] + rank] = col
    return ids.sort(-1).values


def topk_reverse_kl_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
                              k: int, temperature: float, renormalize: bool = False) -> torch.Tensor:
    """Plain version on full [B, L, V] logits: token mean of ℓ_t over mask. Test oracle and "naive" baseline."""
    _check(k, student_logits.size(-1), temperature)
    if student_logits.shape != teacher_logits.shape or mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"shape mismatch: student {tuple(student_logits.shape)}, "
                         f"teacher {tuple(teacher_logits.shape)}, mask {tuple(mask.shape)}")
    if not mask.any():
        raise ValueError("no valid response tokens (mask is all False)")
    lp = F.log_softmax(_fp32(student_logits) / temperature, dim=-1)
    lq = F.log_softmax(_fp32(teacher_logits.detach()) / temperature, dim=-1)
    # selected on the scaled logits, as the production paths do (log-probs could round distinct logits together)
    ids = topk_lowest_id(_fp32(student_logits.detach()) / temperature, k)
    loss_t = _topk_kl(lp.gather(-1, ids), lq.gather(-1, ids), renormalize)
    return loss_t[mask].sum() / mask.sum()


def _logits_into(out: torch.Tensor, h: torch.Tensor, W: torch.Tensor, temperature: float) -> torch.Tensor:
    """out[:] = (h @ W.t()) / τ in out's (fp32) dtype, without a second [chunk, V] temporary when dtypes agree."""
    if h.dtype == out.dtype:
        torch.matmul(h, W.t(), out=out)
    else:  # bf16 GEMMs accumulate in fp32 anyway; the softmax math is fp32
        out.copy_(h @ W.t())
    return out.div_(temperature)


def _log_softmax_(z: torch.Tensor, probs_out: torch.Tensor) -> torch.Tensor:
    """z ← log_softmax(z) in place and probs_out ← softmax(z); returns probs_out. No [chunk, V] temporary
    (logsumexp would allocate one)."""
    z.sub_(z.amax(-1, keepdim=True))
    total = torch.exp(z, out=probs_out).sum(-1, keepdim=True)
    z.sub_(total.log())
    return probs_out.div_(total)


class GradientsFromForward(torch.autograd.Function):
    """For losses that compute the gradients of (hidden, head weight), their first two inputs, in the forward and
    save them with ctx.save_for_backward(gh, gW). Outputs: (loss, then non-differentiable extras); ctx.w_dtype is
    the head weight's dtype. loss.backward() passes 1: the saved tensors are handed over without a copy."""

    @staticmethod
    def backward(ctx, grad_loss, *_grad_extras):
        gh, gW = ctx.saved_tensors
        one = bool((grad_loss == 1).all())
        if gh is not None and not one:
            gh = gh * grad_loss
        if gW is not None:
            if not one:
                gW = torch.mul(gW, grad_loss, out=torch.empty_like(gW, dtype=ctx.w_dtype))
            elif gW.dtype != ctx.w_dtype:
                gW = gW.to(ctx.w_dtype)
        return (gh, gW) + (None,) * (len(ctx.needs_input_grad) - 2)


class _ChunkedTopKReverseKL(GradientsFromForward):
    """Returns (loss = Σ ℓ_t / normalizer, Σ ℓ_t, Σ H_student, Σ H_teacher); only the loss is differentiable.

    The gradients of h and W are computed in the forward, chunk by chunk, while the chunk's logits exist (as
    Liger-Kernel does): recomputing them in backward would cost a fifth [N × H × V] matmul on top of the four any
    implementation needs. Per chunk two [chunk, V] fp32 buffers, reused. Saved for backward: gh [N, H] and gW
    [V, H] (fp32), which the caller needs anyway."""

    @staticmethod
    def forward(ctx, hs, Ws, ht, Wt, k, temperature, renormalize, chunk_size, normalizer, need_h, need_W):
        N, V = hs.size(0), Ws.size(0)
        f32 = torch.promote_types(hs.dtype, torch.float32)
        kl = hs.new_zeros((), dtype=f32)
        ent_s, ent_t = kl.clone(), kl.clone()
        gh = torch.empty_like(hs) if need_h else None
        # the head's gradient accumulates in fp32: summing many bf16 chunk products would lose precision
        gW = torch.zeros_like(Ws, dtype=f32) if need_W else None
        c = min(chunk_size, N)
        buf_a = hs.new_empty((c, V), dtype=f32)
        buf_b = torch.empty_like(buf_a)
        for i in range(0, N, chunk_size):
            j = min(i + chunk_size, N)
            n = j - i
            # teacher: lq in buf_b, its entropy from its probabilities in buf_a
            lq = _logits_into(buf_b[:n], ht[i:j], Wt, temperature)
            ent_t -= torch.dot(_log_softmax_(lq, buf_a[:n]).view(-1), lq.view(-1))
            # student: top-k ids (of the logits: the same as of the log-probs; ties to the lowest id), the
            # teacher's log-probs there; then lp in buf_a and its probabilities in buf_b, which lq no longer needs
            lp = _logits_into(buf_a[:n], hs[i:j], Ws, temperature)
            ids = topk_lowest_id(lp, k)
            b = lq.gather(-1, ids)
            p_full = _log_softmax_(lp, buf_b[:n])
            a = lp.gather(-1, ids)
            ent_s -= torch.dot(p_full.view(-1), lp.view(-1))
            kl_chunk, g = _topk_kl_and_grad(a, b, renormalize, normalizer)
            kl += kl_chunk
            if not (need_h or need_W):
                continue
            # back through log_softmax: dz = g_scattered − softmax · Σg, then through z = logits / τ
            dz = p_full.mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, ids, g).div_(temperature).to(hs.dtype)
            if need_h:
                torch.matmul(dz, Ws, out=gh[i:j])
            if need_W:
                if gW.dtype == dz.dtype:
                    gW.addmm_(dz.t(), hs[i:j])  # in place: no [V, H] temporary per chunk
                else:
                    gW.add_(dz.t() @ hs[i:j])
        ctx.save_for_backward(gh, gW)
        ctx.w_dtype = Ws.dtype
        ctx.mark_non_differentiable(kl, ent_s, ent_t)
        return kl / normalizer, kl, ent_s, ent_t


IMPLS = ("auto", "chunked", "fused")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else at import
        return False
    return importlib.util.find_spec("oel_hpc.train.loss_triton") is not None


def check_inputs(hs: torch.Tensor, Ws: torch.Tensor, ht: torch.Tensor, Wt: torch.Tensor, *, k: int,
                 temperature: float, normalizer, vocab_size: int | None = None):
    """The argument checks every implementation shares (hidden [N, H], head weights [V, H] or vocab shards, k,
    temperature, normalizer); returns the normalizer (default N). vocab_size: the real vocabulary when the heads
    hold padding rows (default: all rows)."""
    if hs.dim() != 2 or ht.dim() != 2:
        raise ValueError(f"hidden states must be [N, H], got student {tuple(hs.shape)}, teacher {tuple(ht.shape)}")
    N, V = hs.size(0), Ws.size(0)
    if N == 0:
        raise ValueError("no valid response tokens (N == 0): refusing to return a silent zero loss")
    if ht.size(0) != N:
        raise ValueError(f"student has {N} positions, teacher {ht.size(0)}")
    if Ws.dim() != 2 or Ws.size(1) != hs.size(1):
        raise ValueError(f"student head weight {tuple(Ws.shape)} does not match hidden {tuple(hs.shape)}")
    if Wt.shape != (V, ht.size(1)):
        raise ValueError(f"teacher head weight {tuple(Wt.shape)} does not match the student's {V} rows and "
                         f"teacher hidden {tuple(ht.shape)}")
    _check(k, V if vocab_size is None else vocab_size, temperature)
    normalizer = N if normalizer is None else normalizer
    if not (torch.as_tensor(normalizer) > 0).all():
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return normalizer


FUSED_MAX_K = 256  # the fused kernels keep the top-k in registers (loss_triton.FUSED_MAX_K)


def resolve_impl(impl: str, *tensors: torch.Tensor, k: int = 1) -> str:
    """"chunked" or "fused" for these tensors. auto = fused when every tensor is on CUDA (in a dtype the kernels
    take: float32, bfloat16, float16), k ≤ FUSED_MAX_K and triton imports, else chunked; "fused" where it cannot
    run raises."""
    if impl not in IMPLS:
        raise ValueError(f"loss impl must be one of {', '.join(IMPLS)}, got '{impl}'")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        ok = (on_cuda and k <= FUSED_MAX_K and all(t.dtype in _FUSED_DTYPES for t in tensors)
              and _triton_imports())
        return "fused" if ok else "chunked"
    if impl == "fused":
        if not on_cuda:
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(f"loss impl 'fused' is the Triton GPU kernel and needs CUDA tensors, got them on "
                             f"{', '.join(devices)}; use impl='chunked' (or 'auto', which picks chunked off the GPU)")
        if not _triton_imports():
            raise ValueError("loss impl 'fused' needs triton and oel_hpc.train.loss_triton, which do not import "
                             "here; use impl='chunked' or 'auto'")
    return impl


def topk_reverse_kl(student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                    teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor, *,
                    k: int = 256, temperature: float = 0.7, renormalize: bool = False, chunk_size: int = 1024,
                    normalizer: float | int | torch.Tensor | None = None, impl: str = "auto") -> LossOutput:
    """Top-k reverse KL from hidden states of the N valid response positions (gathered across rows) and the
    LM-head weights ([V, H], no bias). loss = Σ ℓ_t / normalizer (default N); pass the global token count as
    normalizer when accumulating over micro-batches or ranks so the result is one token mean over all of them.
    impl: "auto" | "chunked" | "fused" (module docstring); chunk_size is the chunked path's only."""
    normalizer = check_inputs(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, k=k,
                              temperature=temperature, normalizer=normalizer)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    N = student_hidden.size(0)

    if resolve_impl(impl, student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, k=k) == "fused":
        from oel_hpc.train.loss_triton import fused_topk_reverse_kl  # lazily: triton is GPU-only

        return fused_topk_reverse_kl(student_hidden, student_head_weight, teacher_hidden.detach(),
                                     teacher_head_weight.detach(), k=k, temperature=float(temperature),
                                     renormalize=renormalize, normalizer=normalizer)
    grad = torch.is_grad_enabled()
    loss, kl, ent_s, ent_t = _ChunkedTopKReverseKL.apply(
        student_hidden, student_head_weight, teacher_hidden.detach(), teacher_head_weight.detach(),
        k, float(temperature), renormalize, chunk_size, normalizer,
        grad and student_hidden.requires_grad, grad and student_head_weight.requires_grad)
    return LossOutput(loss=loss, kl_sum=kl, tokens=N,
                      student_entropy=ent_s / N, teacher_entropy=ent_t / N)
