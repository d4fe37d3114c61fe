"""Which dtype the student's weights live in, which one it computes in, and which one its export is written in:
`trainer.master_dtype`, `trainer.dtype` and `trainer.export_dtype`, the same meaning on both backends.

    master_dtype   the weights the optimizer updates and its state (AdamW moments): float32 by default. A 16-bit
                   master is pure 16-bit training, only when asked for explicitly (and warned about: at lr 1e-6 most
                   updates are smaller than half a bf16 ulp of the weight and round away).
    dtype          the forward and backward: the matmuls, activations and the loss's logits (its softmax math is
                   fp32 whatever the dtype). The teacher and the student's sampling copy run in it.
    export_dtype   the exported Hugging Face model; null = the master dtype, so round r+1 starts from the
                   unrounded weights.

How each backend keeps a float32 master with 16-bit compute ("mixed"):
- torch, one process or DDP: float32 parameters, forward (and the backward it records) under torch.autocast; the
  loss gets the hidden states and head weight cast to the compute dtype. FSDP2: the same, and FSDP2's
  MixedPrecisionPolicy all-gathers the shards in the compute dtype and reduce-scatters gradients in float32.
- megatron, adamw: a 16-bit model with float32 master copies and float32 gradient accumulators beside it
  (megatron/optimizer.py MasterAdamW); distributed: megatron's own scheme, a 16-bit model and float32 main
  shards in its DistributedOptimizer. Both compute as megatron does in bf16, and load their masters from the
  unrounded weights and export from them.

Checkpoints hold the float32 master weights and optimizer state; meta.json records `dtype` and `master_dtype`, and
a resume under another precision is refused naming the key (the keys are in the consolidation's config hash too).
This module is pure configuration logic (torch only for dtypes).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from oel_hpc.engines.hf import DTYPES

NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype
    master: torch.dtype
    export: torch.dtype

    @classmethod
    def from_config(cls, trainer_cfg) -> "Precision":
        compute = DTYPES[trainer_cfg.dtype]
        master = DTYPES[trainer_cfg.get("master_dtype", "float32")]
        export = trainer_cfg.get("export_dtype")
        return cls(compute, master, DTYPES[export] if export is not None else master)

    @property
    def mixed(self) -> bool:
        """16-bit compute on float32 master weights."""
        return self.compute != self.master

    def autocast(self, device: torch.device):
        """The compute dtype for the student's (and teacher's) forward when the weights are float32; nothing
        otherwise (the weights are in the compute dtype already)."""
        if not self.mixed:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.compute)

    def describe(self) -> str:
        if self.mixed:
            return f"{NAMES[self.compute]} compute, float32 master weights"
        return f"{NAMES[self.compute]} weights and compute"

    def meta(self) -> dict:
        return {"dtype": NAMES[self.compute], "master_dtype": NAMES[self.master]}

    def check_meta(self, meta: dict, path) -> None:
        """Refuse a checkpoint written under another precision (its weights and optimizer state are in other
        dtypes, or laid out for another scheme). Checkpoints from before these keys are not checked here: the
        config hash already refuses them."""
        for key, mine in self.meta().items():
            written = meta.get(key)
            if written is not None and written != mine:
                raise RuntimeError(f"{path} was written with trainer.{key}={written}, this job has trainer.{key}="
                                   f"{mine}: resume with trainer.{key}={written}, or run.overwrite=true to start "
                                   "this consolidation afresh")

    def warnings(self) -> list[str]:
        """What the user should know before a long run in this precision (logged once, by rank 0, as warnings)."""
        out = []
        if self.master != torch.float32:
            out.append(f"trainer.master_dtype={NAMES[self.master]}: the weights and the AdamW state are "
                       f"{NAMES[self.master]}, with no float32 master copy; updates smaller than "
                       f"{NAMES[self.master]} resolution round away (at lr 1e-6 most of them). "
                       "trainer.master_dtype=float32 keeps a float32 master copy.")
        if self.compute == torch.float16:
            out.append("trainer.dtype=float16 runs without a loss scaler: gradients below float16's range "
                       "flush to zero (and overflowing ones skip the step); prefer trainer.dtype=bfloat16.")
        return out


def fresh_adam_steps(optimizer) -> None:
    """Set the step counters of an optimizer state that was just created by a zero-gradient, zero-lr step (what
    torch.distributed.checkpoint's get_state_dict does to an optimizer that has never stepped) back to 0: with
    zero moments and step 0 the state is exactly a fresh one, so the first real update is the same as without
    the checkpoint (a step count of 1 would change Adam's bias correction)."""
    for group in optimizer.param_groups:
        if "step" in group:
            group["step"] = 0
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0
