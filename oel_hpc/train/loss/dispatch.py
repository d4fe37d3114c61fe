"""`topk_reverse_kl(..., impl=)`: the checks, then the chunked or the fused implementation (package
docstring)."""
from __future__ import annotations

import functools
import importlib.util

import torch

from oel_hpc.train.loss.chunked import chunked_topk_reverse_kl
from oel_hpc.train.loss.common import FUSED_MAX_K, LossOutput, check_inputs

IMPLS = ("auto", "chunked", "fused")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else at import
        return False
    return importlib.util.find_spec("oel_hpc.train.loss.fused") is not None


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
            raise ValueError("loss impl 'fused' needs triton and oel_hpc.train.loss.fused, which do not import "
                             "here; use impl='chunked' or 'auto'")
    return impl


def topk_reverse_kl(student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                    teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor, *,
                    k: int = 256, temperature: float = 0.7, renormalize: bool = False, chunk_size: int = 1024,
                    normalizer: float | int | torch.Tensor | None = None, impl: str = "auto") -> LossOutput:
    """Top-k reverse KL from hidden states of the N valid response positions (gathered across rows) and the
    LM-head weights ([V, H], no bias). loss = Σ ℓ_t / normalizer (default N); pass the global token count as
    normalizer when accumulating over micro-batches or ranks so the result is one token mean over all of them.
    impl: "auto" | "chunked" | "fused" (package docstring); chunk_size is the chunked path's only."""
    normalizer = check_inputs(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, k=k,
                              temperature=temperature, normalizer=normalizer)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if resolve_impl(impl, student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, k=k) == "fused":
        from oel_hpc.train.loss.fused import fused_topk_reverse_kl  # lazily: triton is GPU-only

        return fused_topk_reverse_kl(student_hidden, student_head_weight, teacher_hidden.detach(),
                                     teacher_head_weight.detach(), k=k, temperature=float(temperature),
                                     renormalize=renormalize, normalizer=normalizer)
    return chunked_topk_reverse_kl(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, k=k,
                                   temperature=temperature, renormalize=renormalize, chunk_size=chunk_size,
                                   normalizer=normalizer)
