"""Pretend-CUDA on the CPU, just enough for megatron-core 0.16.1's DistributedDataParallel + DistributedOptimizer.
TESTS ONLY (like shims.py beside it, whose patches it needs too), never part of the package.

megatron's distributed optimizer refuses CPU tensors by name (``param.type() == 'torch.cuda.FloatTensor'``) and
creates its scalars with ``device='cuda'``; gloo itself can reduce-scatter and all-gather (torch 2.13). A
``TorchFunctionMode`` that is entered once for the whole process bridges the gap:

- ``Tensor.type()`` (no argument) answers ``torch.cuda.<X>Tensor`` for a CPU tensor;
- any ``device=`` that names CUDA becomes the CPU; ``Tensor.cuda()`` is the identity.

Everything else runs as megatron wrote it: the buffers, the reduce-scatter, the fp32 shards, the clip, the inner
torch AdamW (no TransformerEngine/Apex here), the all-gather. What this cannot show is anything CUDA-specific
(streams, NCCL, TE's FusedAdam): the GPU run of tools/gpu_check.py still has to.

    from fake_cuda import install; install()   # after shims.install(), before the model is built

Run as a script, it is ``python -m oel_hpc.worker`` under the mode, with ``trainer.optimizer`` resolved as on a
GPU (``oel_hpc.train.megatron.trainer.resolve`` sees device "cuda"):

    PYTHONPATH=tests/megatron_support OEL_MEGATRON_CPU_SHIMS=1 \\
        torchrun --nproc_per_node=2 tests/megatron_support/fake_cuda.py <run-dir> r1/consolidate
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

_mode = None


def _cpu(device):
    if device is None:
        return None
    if isinstance(device, int):  # a CUDA ordinal
        return torch.device("cpu")
    return torch.device("cpu") if torch.device(device).type == "cuda" else device


class FakeCuda(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return func(*args, **kwargs)


def install() -> None:
    """Enter the mode for the rest of the process (idempotent)."""
    global _mode
    if _mode is None:
        _mode = FakeCuda()
        _mode.__enter__()


def resolve_as_on_gpu() -> None:
    """trainer.optimizer resolves as if the trainer's device were CUDA (the trainer itself still runs on the CPU)."""
    import oel_hpc.train.megatron.trainer as trainer

    real = trainer.resolve
    trainer.resolve = lambda kind, device, *dtypes: real(kind, "cuda", *dtypes)


if __name__ == "__main__":
    # the checkout this file belongs to, before any installed copy: run as a script, Python puts this folder (not
    # the working directory) first on sys.path, and an editable install elsewhere would win
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    install()
    resolve_as_on_gpu()
    sys.argv = ["oel_hpc.worker", *sys.argv[1:]]
    runpy.run_module("oel_hpc.worker", run_name="__main__", alter_sys=True)
