"""torch.distributed for consolidation: the process group from the environment, rows balanced across ranks, and
the model wrapped for data parallelism (DDP replicas or FSDP2 shards).

Where the ranks come from (first match wins):
- torchrun (or anything that sets the same variables): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
- Slurm, one task per rank (`srun python -m oel_hpc.worker ...`): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the
  master is the first host of SLURM_JOB_NODELIST (oel_hpc.slurm.hostnames), the port derived from SLURM_JOB_ID
  (MASTER_ADDR / MASTER_PORT in the environment take precedence). Only inside a job *step* (srun sets
  SLURM_STEP_ID): a batch script itself is not a rank, even when the job has several tasks.
- Neither, or a world of 1: no process group at all; every collective below is a no-op and training is the plain
  single-process loop.

One device per local rank (cuda:LOCAL_RANK on GPU nodes); backend `auto` = NCCL on GPU, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager, nullcontext
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from oel_hpc import log
from oel_hpc.ranks import DistEnv, detect_env


class Dist:
    """This process's rank, world and device, with the few collectives training needs. With a world of 1 (no
    process group) every collective returns its input."""

    def __init__(self, env: DistEnv, device: torch.device, backend: Optional[str]):
        self.env, self.device, self.backend = env, device, backend
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Element-wise sum / max over ranks, in float64 (token counts and metric sums stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.tolist()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(trainer_cfg, local_rank: int) -> torch.device:
    name = trainer_cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        index = local_rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def init(trainer_cfg, environ: Mapping[str, str] = os.environ, timeout_min: float = 30) -> Dist:
    """The process group this process belongs to (none for a world of 1). Pair with `Dist.close()`."""
    env = detect_env(environ)
    device = pick_device(trainer_cfg, env.local_rank)
    log.set_context(rank=env.rank, world=env.world_size)  # every log line of this process names its rank
    if env.world_size == 1:
        return Dist(env, device, None)
    backend = trainer_cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # torchrun: env:// (it may serve the store from its agent: TORCHELASTIC_USE_AGENT_STORE); Slurm: rank 0's
        # store at the derived address
        init_method = "env://" if env.source == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}"
        dist.init_process_group(backend=backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=device if device.type == "cuda" else None)
    return Dist(env, device, backend)


@contextmanager
def process_group(trainer_cfg, environ: Mapping[str, str] = os.environ):
    d = init(trainer_cfg, environ)
    try:
        yield d
    finally:
        d.close()


# ---------------------------------------------------------------------------------------------------------------
# Rows across ranks

def partition_by_tokens(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Row indices per rank, balanced by tokens: longest rows first, each to the rank with the fewest tokens so far
    (ties: the lower rank; equal lengths: the lower index first). Deterministic, so every rank computes the same
    split; each rank's indices come back in ascending order."""
    loads = [0] * world_size
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        parts[r].append(i)
        loads[r] += lengths[i]
    return [sorted(p) for p in parts]


# ---------------------------------------------------------------------------------------------------------------
# The model across ranks

def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (the unit FSDP2 shards and gathers one at a time)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` to shard")
    return list(layers)


def wrap(module: torch.nn.Module, layers: Sequence[torch.nn.Module], parallel: str, d: Dist,
         mixed_compute: Optional[torch.dtype] = None) -> torch.nn.Module:
    """`module` ready for data-parallel training: itself for a world of 1; DDP replicas; or FSDP2 (`fully_shard` per
    layer, then the root). Gradients are averaged over ranks either way, so callers scale losses by world size.
    `mixed_compute`: float32 parameters computing in this dtype (train/precision.py); FSDP2 then gathers the
    shards in it and reduces gradients in float32 (DDP reduces the float32 gradients as they are)."""
    if not d.enabled:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # no buffer sync in forward: it is a collective, and ranks run different numbers of forwards (the only
        # buffers, rotary tables, are equal everywhere anyway)
        ddp = DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                  forward_sync_buffers=False)
        ddp.register_comm_hook(state=None, hook=average_each_gradient)
        return ddp
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=mixed_compute, reduce_dtype=torch.float32) if mixed_compute \
            else MixedPrecisionPolicy()
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        return fully_shard(module, mp_policy=policy)
    raise ValueError(f"trainer.parallel: must be ddp or fsdp, got '{parallel}'")


def average_each_gradient(group, bucket):  # no annotations: DDP checks them, and here they are strings
    """DDP communication hook: the mean over ranks of each parameter's gradient, one all-reduce per parameter,
    instead of one per bucket (DDP's own). The result is then independent of how DDP groups gradients into buckets,
    which it changes after a process's first step (to the order gradients became ready): in a ring all-reduce
    (3 or more ranks) where an element sits in the reduced buffer decides the order in which the ranks' values are
    added, so a job resumed from a checkpoint, whose first step uses the first grouping, would differ in the last
    bits from the uninterrupted run (tests/test_resume_exact.py). A few hundred small all-reduces per step."""
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    futures = [dist.all_reduce(g.div_(world), group=group, async_op=True).get_future() for g in bucket.gradients()]
    buffer = bucket.buffer()  # the gradients are views into it: reduced in place
    return torch.futures.collect_all(futures).then(lambda _: buffer)


def no_sync(wrapped: torch.nn.Module, sync: bool):
    """DDP: skip the gradient all-reduce of this backward unless `sync` (the last micro-batch). Others: nothing."""
    if not sync and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return nullcontext()


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@torch.no_grad()
def copy_full_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst's parameters := src's, gathering sharded (FSDP2) ones. A collective when src is sharded: every rank calls
    it, and parameters are visited in the same order everywhere."""
    targets = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        full = p.full_tensor() if is_sharded(p) else p
        targets[name].copy_(full)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Gradient clipping that also works on FSDP2's sharded gradients (the norm is computed over all shards).
    A non-finite norm leaves the gradients alone (the caller skips the step)."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if is_sharded(total):
        total = total.full_tensor()
    if max_norm != float("inf") and torch.isfinite(total):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def agree_finite(values, d: Dist) -> bool:
    """Whether `values` (a gradient norm, a step's loss sums) are finite on every rank: the skip-or-step decision
    must be the same everywhere (one MAX all-reduce with several ranks)."""
    return agree(bool(torch.isfinite(torch.as_tensor(values)).all()), d)


def agree(ok: bool, d: Dist) -> bool:
    """Whether `ok` holds on every rank (one MAX all-reduce with several ranks)."""
    return d.all_reduce([0.0 if ok else 1.0], op="max")[0] == 0.0
