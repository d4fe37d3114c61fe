"""Consolidation loss: top-k reverse KL(student || teacher) on response tokens (DESIGN.md §1 "The loss").

For a response position t, lp = log_softmax(z_s / τ), lq = log_softmax(z_t / τ) over the full vocabulary and
S_t = the student's top-k ids (picked without gradient):

    ℓ_t = Σ_{v ∈ S_t} exp(lp_v) · (lp_v − lq_v)

With k = V this is the exact reverse KL. `topk_reverse_kl` is the production path: it takes hidden states of the
valid response positions and the LM-head weights and never materialises an [N × V] tensor — logits exist one
chunk of positions at a time, in forward and (recomputed) in backward.

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
    ids = lp.detach().topk(k, dim=-1).indices
    loss_t = _topk_kl(lp.gather(-1, ids), lq.gather(-1, ids), renormalize)
    return loss_t[mask].sum() / mask.sum()


def _logprobs(h: torch.Tensor, W: torch.Tensor, temperature: float) -> torch.Tensor:
    # matmul in the weights' dtype (bf16 GEMMs accumulate in fp32 anyway), softmax math in fp32
    return F.log_softmax(_fp32(h @ W.t()) / temperature, dim=-1)


def _entropy(lp: torch.Tensor) -> torch.Tensor:
    return -(lp.exp() * lp).sum(-1)


class _ChunkedTopKReverseKL(torch.autograd.Function):
    """Returns (Σ ℓ_t, Σ H_student, Σ H_teacher). Saves only the top-k ids, the teacher's log-probs there and
    the student's logsumexp ([N, k] + [N]); backward recomputes the student logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hs, Ws, ht, Wt, k, temperature, renormalize, chunk_size):
        N = hs.size(0)
        ids = torch.empty(N, k, dtype=torch.long, device=hs.device)
        f32 = torch.promote_types(hs.dtype, torch.float32)
        lq_S = torch.empty(N, k, dtype=f32, device=hs.device)
        lse = torch.empty(N, dtype=f32, device=hs.device)
        kl = hs.new_zeros((), dtype=f32)
        ent_s, ent_t = kl.clone(), kl.clone()
        for i in range(0, N, chunk_size):
            j = min(i + chunk_size, N)
            z = _fp32(hs[i:j] @ Ws.t()).div_(temperature)
            lse[i:j] = z.logsumexp(-1)
            lp = z.sub_(lse[i:j, None])  # in place: one [chunk, V] fp32 buffer
            ids[i:j] = lp.topk(k, dim=-1).indices
            lp_S = lp.gather(-1, ids[i:j])
            ent_s += _entropy(lp).sum()
            del z, lp
            lq = _logprobs(ht[i:j], Wt, temperature)
            lq_S[i:j] = lq.gather(-1, ids[i:j])
            ent_t += _entropy(lq).sum()
            del lq
            kl += _topk_kl(lp_S, lq_S[i:j], renormalize).sum()
        ctx.save_for_backward(hs, Ws, ids, lq_S, lse)
        ctx.temperature, ctx.renormalize, ctx.chunk_size = temperature, renormalize, chunk_size
        ctx.mark_non_differentiable(ent_s, ent_t)
        return kl, ent_s, ent_t

    @staticmethod
    def backward(ctx, grad_kl, _grad_es, _grad_et):
        hs, Ws, ids, lq_S, lse = ctx.saved_tensors
        tau, N = ctx.temperature, hs.size(0)
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.zeros_like(hs) if need_h else None
        # accumulate the head's gradient in fp32: summing many bf16 chunk products would lose precision
        gW = torch.zeros_like(Ws, dtype=torch.promote_types(Ws.dtype, torch.float32)) if need_W else None
        for i in range(0, N, ctx.chunk_size):
            j = min(i + ctx.chunk_size, N)
            lp = _fp32(hs[i:j] @ Ws.t()).div_(tau).sub_(lse[i:j, None])
            a, b = lp.gather(-1, ids[i:j]), lq_S[i:j]
            if ctx.renormalize:
                a = a - a.logsumexp(-1, keepdim=True)
                b = b - b.logsumexp(-1, keepdim=True)
            p = a.exp()
            # d/da Σ e^a (a − b) = e^a (a − b + 1)
            g = p * (a - b + 1) * grad_kl
            if ctx.renormalize:  # back through a = lp_S − logsumexp(lp_S)
                g = g - p * g.sum(-1, keepdim=True)
            # back through log_softmax: dz = g_scattered − softmax · Σg, then through z = logits / τ
            dz = lp.exp_().mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, ids[i:j], g).div_(tau)
            dz = dz.to(hs.dtype)
            if need_h:
                gh[i:j] = dz @ Ws
            if need_W:
                if gW.dtype == dz.dtype:
                    gW.addmm_(dz.t(), hs[i:j])  # in place: no [V, H] temporary per chunk
                else:
                    gW.add_(dz.t() @ hs[i:j])
            del lp, dz
        return gh, None if gW is None else gW.to(Ws.dtype), None, None, None, None, None, None


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
    kl, ent_s, ent_t = _ChunkedTopKReverseKL.apply(
        student_hidden, student_head_weight, teacher_hidden.detach(), teacher_head_weight.detach(),
        k, float(temperature), renormalize, chunk_size)
    return LossOutput(loss=kl / normalizer, kl_sum=kl.detach(), tokens=N,
                      student_entropy=ent_s / N, teacher_entropy=ent_t / N)
