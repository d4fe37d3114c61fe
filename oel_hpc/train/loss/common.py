"""What every implementation of the loss shares (package docstring): the output, the argument checks, the
top-k tie rule, ℓ at the selected ids with its gradient, and the autograd shell of losses that form their
gradients in the forward. Imports nothing of the package: the leaf."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


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


FUSED_MAX_K = 256  # the fused kernels keep the top-k in registers (fused.py)

