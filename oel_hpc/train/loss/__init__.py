"""Consolidation loss: top-k reverse KL(student || teacher) on response tokens (docs/design.md, "The loss").

For a response position t, lp = log_softmax(z_s / τ), lq = log_softmax(z_t / τ) over the full vocabulary and
S_t = the student's top-k ids (picked without gradient):

    ℓ_t = Σ_{v ∈ S_t} exp(lp_v) · (lp_v − lq_v)

With k = V this is the exact reverse KL. `topk_reverse_kl` is the production path: it takes hidden states of the
valid response positions and the LM-head weights and never materialises an [N × V] tensor — logits exist one
chunk of positions at a time.

    common.py          what every implementation shares: LossOutput, the argument checks, the tie rule of the
                       top-k (topk_lowest_id), ℓ and its gradient at the selected ids, GradientsFromForward
    chunked.py         the PyTorch path (any device), chunk by chunk
    fused.py           the Triton kernels (CUDA; the CPU tests run them in Triton's interpreter), imported lazily
    vocab_parallel.py  the LM head split by vocabulary over a tensor-parallel group (trainer=megatron, tp > 1)
    reference.py       the plain version on full logits: the tests' oracle
    dispatch.py        `topk_reverse_kl(..., impl=)`: "auto" picks fused when the tensors are on CUDA and triton
                       imports, chunked otherwise; "fused" where it cannot run is an error, never a silent fallback

Every implementation imports common.py and nothing else of this package (vocab_parallel.py also the dispatcher,
for a group of one rank): no cycle.
"""
from oel_hpc.train.loss.common import FUSED_MAX_K, LossOutput, check_inputs, response_mask, topk_lowest_id
from oel_hpc.train.loss.dispatch import IMPLS, resolve_impl, topk_reverse_kl
from oel_hpc.train.loss.reference import topk_reverse_kl_reference

__all__ = ["FUSED_MAX_K", "IMPLS", "LossOutput", "check_inputs", "resolve_impl", "response_mask", "topk_lowest_id",
           "topk_reverse_kl", "topk_reverse_kl_reference"]
