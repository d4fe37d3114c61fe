"""The consolidation loss (this package) when the LM head is split by vocabulary rows over a tensor-parallel group.

Rank r of the group holds rows [r·Vs, (r+1)·Vs) of a vocabulary padded to Vs·tp ≥ V; the hidden states are the
same on every rank. Nothing of size [N × V] may exist, not even [chunk × V] on one rank, so every quantity that
needs the whole vocabulary is rebuilt from per-shard pieces that are small:

- logsumexp and entropy: each shard sends (max m_r, Σ e^{z−m_r}, Σ e^{z−m_r}(z−m_r)) and every rank combines them
  rescaled to the global max — the entropy in its shifted form log S − T/S, which does not cancel large numbers
  the way lse − E[z] would in fp32.
- the student's top-k: the global top-k lies within the union of the per-shard top-k's, so each shard sends at most
  k candidates (value, global id) and every rank merges the same gathered list. Ties are broken towards the lower
  global id, in the shard *and* in the merge, so every rank picks the same set and it is the set a single device
  would pick (common.py's topk_lowest_id, the rule of every implementation; a rank-dependent choice would give
  different losses on different ranks).
- the teacher's log-probs at S: only the owner of an id has its logit; the others add exact zeros (all-reduce).

Per chunk of c positions the forward makes three collectives: an all-gather of [c, min(k, Vs) + 6] floats
(candidates and the six softmax statistics of student and teacher), an all-gather of [c, min(k, Vs)] ids and an
all-reduce of [c, k] teacher logits; every rank then holds the same ℓ, loss, kl_sum and entropies. When gradients
are wanted a fourth, an all-reduce of [c, H], follows.

The gradients are computed in the forward, while the chunk's local logits exist (common.py's GradientsFromForward).
dℓ/dlp at S depends on the student's values at ids other ranks own, but every rank holds the same gathered
candidates, so every rank has it. The gradient of the local logits is local (scatter of g at the owned ids −
softmax_local·Σg, as in chunked.py); so is the head shard's. The hidden states feed every rank's replica of the
decoder, so their gradient is the sum over ranks of dz_local @ W_shard, all-reduced here as megatron's
ColumnParallelLinear does in its backward (do not wrap the input in
copy_to_tensor_model_parallel_region as well). A group of one rank is `topk_reverse_kl` itself.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from oel_hpc.train.loss.common import (GradientsFromForward, LossOutput, _fp32, _logits_into, _topk_kl_and_grad,
                                       check_inputs, topk_lowest_id)
from oel_hpc.train.loss.dispatch import topk_reverse_kl

_N_STATS = 3  # per shard and model: max, Σ e^{z−max}, Σ e^{z−max}(z−max)
# all_gather_into_tensor is deprecated from torch 2.13 in favour of all_gather_single, which older torch lacks
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _group_shape(group) -> tuple[int, int]:
    """(tp, rank in the group); no process group at all counts as a group of one."""
    if group is None and not dist.is_initialized():
        return 1, 0
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the tensor-parallel group")
    return tp, rank


def _shard_stats_(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """[c, 3]: (m, Σ e^{z−m}, Σ e^{z−m}(z−m)) over this shard's real ids, m = the shard's max (−inf if it has none);
    z is left shifted by m, in place (scratch: a buffer of z's shape, overwritten)."""
    if z.size(-1) == 0:
        out = z.new_zeros(z.size(0), _N_STATS)
        out[:, 0] = float("-inf")
        return out
    m = z.amax(-1, keepdim=True)
    d = z.sub_(m)
    e = torch.exp(d, out=scratch)
    s = e.sum(-1)
    return torch.stack([m.squeeze(-1), s, e.mul_(d).sum(-1)], -1)


def _combine(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary (logsumexp, entropy) [c] from the gathered per-shard statistics [c, tp, 3]."""
    m, s, t = stats.unbind(-1)
    M = m.amax(-1, keepdim=True)
    real = torch.isfinite(m)  # a shard of padding only has m = −inf, s = t = 0
    shift = torch.where(real, m - M, 0)
    w = torch.where(real, shift.exp(), 0)
    S = (w * s).sum(-1)
    T = (w * (t + shift * s)).sum(-1)  # Σ e^{z−M}(z−M) over the vocabulary
    logS = S.log()
    return M.squeeze(-1) + logS, logS - T / S


class _VocabParallelTopKReverseKL(GradientsFromForward):
    """Returns (loss = Σ ℓ_t / normalizer, Σ ℓ_t, Σ H_student, Σ H_teacher), the same on every rank of the group.
    As the chunked loss, the gradients (of h, all-reduced, and of this rank's head shard) are computed in
    the forward while a chunk's local logits exist; per chunk three [chunk, Vs] fp32 buffers."""

    @staticmethod
    def forward(ctx, hs, Ws, ht, Wt, k, temperature, renormalize, chunk_size, normalizer, need_h, need_W,
                vocab_size, group, tp, rank):
        N, Vs = hs.size(0), Ws.size(0)
        lo = rank * Vs
        n_real = max(0, min(Vs, vocab_size - lo))  # this shard's rows that are tokens; the rest is padding
        Wr, Wtr = Ws[:n_real], Wt[:n_real]
        kk = min(k, Vs)  # candidates each shard sends (padded with −inf where it has fewer real ids)
        f32 = torch.promote_types(hs.dtype, torch.float32)
        dev = hs.device
        kl = torch.zeros((), dtype=f32, device=dev)
        ent_s, ent_t = kl.clone(), kl.clone()
        gh = torch.empty_like(hs) if need_h else None  # need_h, need_W: the same on every rank
        # the head's gradient accumulates in fp32 (many bf16 chunk products would lose precision); padding rows get 0
        gW = torch.zeros_like(Ws, dtype=f32) if need_W else None
        z_buf, zt_buf, scratch = (torch.empty(min(chunk_size, N), n_real, dtype=f32, device=dev) for _ in range(3))
        for i in range(0, N, chunk_size):
            j = min(i + chunk_size, N)
            c = j - i
            send = torch.full((c, kk + 2 * _N_STATS), float("-inf"), dtype=f32, device=dev)
            send_ids = torch.full((c, kk), tp * Vs, dtype=torch.long, device=dev)  # never selected: value −inf
            z = _logits_into(z_buf[:c], hs[i:j], Wr, temperature)
            if n_real:
                local = topk_lowest_id(z, min(k, n_real))
                send[:, :local.size(1)] = z.gather(-1, local)
                send_ids[:, :local.size(1)] = local + lo
            stats_s = _shard_stats_(z, scratch[:c])  # z is now z − m_s
            send[:, kk:kk + _N_STATS] = stats_s
            zt = _logits_into(zt_buf[:c], ht[i:j], Wtr, temperature)
            stats_t = _shard_stats_(zt, scratch[:c])  # zt is now zt − m_t
            send[:, kk + _N_STATS:] = stats_t
            got = send.new_empty(tp * c, send.size(1))
            got_ids = send_ids.new_empty(tp * c, kk)
            _all_gather(got, send, group=group)
            _all_gather(got_ids, send_ids, group=group)
            got = got.view(tp, c, -1).transpose(0, 1)  # [c, tp, ·]: rank-major, so ascending global id
            lse_s, h_s = _combine(got[..., kk:kk + _N_STATS])
            lse_t, h_t = _combine(got[..., kk + _N_STATS:])
            cand = got[..., :kk].reshape(c, tp * kk)
            pos = topk_lowest_id(cand, k)
            ids = got_ids.view(tp, c, kk).transpose(0, 1).reshape(c, tp * kk).gather(-1, pos)
            lp_S = cand.gather(-1, pos) - lse_s[:, None]
            # the teacher's logits at S: the owner's value plus exact zeros from the others
            own_local = ids - lo
            own = (own_local >= 0) & (own_local < n_real)
            zt_S = (zt.gather(-1, own_local.clamp(0, max(n_real - 1, 0))) + stats_t[:, :1] if n_real
                    else zt.new_zeros(c, k))
            zt_S = torch.where(own, zt_S, 0)
            dist.all_reduce(zt_S, group=group)
            lq_S = zt_S - lse_t[:, None]

            kl_chunk, g = _topk_kl_and_grad(lp_S, lq_S, renormalize, normalizer)
            kl += kl_chunk
            ent_s += h_s.sum()
            ent_t += h_t.sum()
            if not (need_h or need_W):
                continue
            # back through log_softmax: dz = g_scattered − softmax · Σg (this shard's columns), then z = logits / τ
            dz = torch.sub(z, (lse_s - stats_s[:, 0])[:, None], out=scratch[:c]).exp_()
            dz.mul_(-g.sum(-1, keepdim=True))
            if n_real:
                dz.scatter_add_(-1, own_local.clamp(0, n_real - 1), torch.where(own, g, 0))
            dz = dz.div_(temperature).to(hs.dtype)
            if need_h:  # Σ over ranks of this shard's part, reduced in fp32
                part = _fp32(dz @ Wr)
                dist.all_reduce(part, group=group)
                gh[i:j] = part
            if need_W:
                gW[:n_real].add_(dz.t() @ hs[i:j])
        ctx.save_for_backward(gh, gW)
        ctx.w_dtype = Ws.dtype
        ctx.mark_non_differentiable(kl, ent_s, ent_t)
        return kl / normalizer, kl, ent_s, ent_t


def vocab_parallel_topk_reverse_kl(student_hidden: torch.Tensor, student_head_shard: torch.Tensor,
                                   teacher_hidden: torch.Tensor, teacher_head_shard: torch.Tensor, *,
                                   vocab_size: int, group: dist.ProcessGroup | None,
                                   k: int = 256, temperature: float = 0.7, renormalize: bool = False,
                                   chunk_size: int = 1024,
                                   normalizer: float | int | torch.Tensor | None = None) -> LossOutput:
    """`topk_reverse_kl` with each LM head split by vocabulary rows over the ranks of `group` (None: the default
    group, or no group at all = one rank): this rank's shards are rows [r·Vs, (r+1)·Vs) of the head padded to
    Vs·tp ≥ vocab_size rows, Vs the same on every rank; rows ≥ vocab_size are not tokens. The hidden states [N, H]
    must be identical on every rank; every rank gets the same loss, kl_sum and entropies, the full gradient of
    student_hidden and the gradient of its own head shard. Every rank of the group must call it (collectives)."""
    Vs = student_head_shard.size(0)
    tp, rank = _group_shape(group)
    if not 1 <= vocab_size <= Vs * tp:
        raise ValueError(f"vocab_size must satisfy 1 <= vocab_size <= shard rows × ranks = {Vs} × {tp}, "
                         f"got {vocab_size}")
    normalizer = check_inputs(student_hidden, student_head_shard, teacher_hidden, teacher_head_shard, k=k,
                              temperature=temperature, normalizer=normalizer, vocab_size=vocab_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    N = student_hidden.size(0)

    if tp == 1:  # the whole head is here: the single-device path, bit for bit (padding rows get zero gradient)
        return topk_reverse_kl(student_hidden, student_head_shard[:vocab_size], teacher_hidden,
                               teacher_head_shard[:vocab_size], k=k, temperature=temperature,
                               renormalize=renormalize, chunk_size=chunk_size, normalizer=normalizer)
    grad = torch.is_grad_enabled()
    loss, kl, ent_s, ent_t = _VocabParallelTopKReverseKL.apply(
        student_hidden, student_head_shard, teacher_hidden.detach(), teacher_head_shard.detach(),
        k, float(temperature), renormalize, chunk_size, normalizer,
        grad and student_hidden.requires_grad, grad and student_head_shard.requires_grad,
        vocab_size, group, tp, rank)
    return LossOutput(loss=loss, kl_sum=kl, tokens=N,
                      student_entropy=ent_s / N, teacher_entropy=ent_t / N)
