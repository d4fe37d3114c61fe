"""Whether weights are finite: the check after every update (train/consolidate.py through the backends'
`non_finite_weight`) and before every export (checkpoint.export_hf).

`all_finite` is exact and cheap enough for every step: one float32 sum per tensor, then a single sync. A finite
total proves every element finite (a NaN or an infinity survives any sum, and ∞ - ∞ is NaN); a non-finite total can
also be finite terms overflowing float32, so only then is each tensor looked at element by element.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard; FSDP2 parameters are DTensors)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _floats(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in (_local(x).detach() for x in tensors) if t.is_floating_point() and t.numel()]


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every (floating-point) tensor is finite, on this rank."""
    ts = _floats(tensors)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in ts:
        by_device.setdefault(t.device, []).append(t.sum(dtype=torch.float32))
    if all(bool(torch.isfinite(torch.stack(sums).sum())) for sums in by_device.values()):
        return True
    return all(bool(t.isfinite().all()) for t in ts)  # the sum may have overflowed: look exactly


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> Optional[str]:
    """'<name> (<dtype>, <n> of <size> values non-finite)' for the first tensor holding a NaN or an infinity; None
    when all are finite."""
    for name, t in named:
        t = _local(t).detach()
        if not t.is_floating_point() or all_finite([t]):
            continue
        bad = int((~t.isfinite()).sum())
        return f"{name} ({str(t.dtype).replace('torch.', '')}, {bad} of {t.numel()} values non-finite)"
    return None


def non_finite_weight(named_params, d) -> Optional[str]:
    """None when every parameter is finite on every rank of `d` (a train.distributed.Dist: one MAX all-reduce);
    else the first non-finite one of this rank, named, or 'a weight held by another rank'."""
    from oel_hpc.train.distributed import agree

    named_params = list(named_params)
    if agree(all_finite(p for _, p in named_params), d):
        return None
    return first_non_finite(named_params) or "a weight held by another rank"
