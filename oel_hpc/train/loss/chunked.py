"""The PyTorch path of the loss (any device): logits one chunk of positions at a time, gradients formed in
the forward while the chunk's logits exist."""
from __future__ import annotations

import torch

from oel_hpc.train.loss.common import (GradientsFromForward, LossOutput, _log_softmax_, _logits_into,
                                       _topk_kl_and_grad, topk_lowest_id)


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


def chunked_topk_reverse_kl(hs: torch.Tensor, Ws: torch.Tensor, ht: torch.Tensor, Wt: torch.Tensor, *, k: int,
                            temperature: float, renormalize: bool, chunk_size: int, normalizer) -> LossOutput:
    """`topk_reverse_kl` on checked arguments (dispatch.py checks them; normalizer resolved)."""
    N = hs.size(0)
    grad = torch.is_grad_enabled()
    loss, kl, ent_s, ent_t = _ChunkedTopKReverseKL.apply(
        hs, Ws, ht.detach(), Wt.detach(), k, float(temperature), renormalize, chunk_size, normalizer,
        grad and hs.requires_grad, grad and Ws.requires_grad)
    return LossOutput(loss=loss, kl_sum=kl, tokens=N, student_entropy=ent_s / N, teacher_entropy=ent_t / N)
