"""The loss on full [B, L, V] logits, plainly: the tests' oracle and the benchmarks' "naive" baseline."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from oel_hpc.train.loss.common import _check, _fp32, _topk_kl, topk_lowest_id


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
