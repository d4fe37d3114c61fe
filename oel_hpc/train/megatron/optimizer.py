"""`trainer.optimizer` of trainer=megatron: which optimizer steps the student, and megatron-core's distributed one.

    auto         distributed on CUDA (float32 / bfloat16 compute, float32 master), adamw otherwise (the CPU,
                 float16, pure 16-bit training)
    adamw        torch.optim.AdamW on each rank's whole TP shard; gradients reduced by hand (megatron/trainer.py).
                 With 16-bit compute and float32 master weights (train/precision.py): `MasterAdamW`, AdamW on
                 float32 copies of the 16-bit model's weights with float32 gradient accumulators
    distributed  megatron's DistributedDataParallel + DistributedOptimizer (ZeRO-1): the Adam state, an fp32
                 master copy of the weights (bfloat16) and the fp32 gradient buffer are sharded over the
                 data-parallel ranks; CUDA only (megatron allocates its buffers and scalars on CUDA)

Either way a non-finite global gradient norm skips the update (`step` returns it with stepped=False).

`DistributedAdam` is the distributed path behind three calls, shared by the trainer and tools/gpu_check.py::

    opt = DistributedAdam(student, lr=..., weight_decay=..., grad_clip=...)  # student: the (unwrapped) GPTModel
    ... forward/backward of every micro-batch (student called directly; gradients land in opt.ddp's buffers)
    grad_norm, stepped = opt.step()  # finalize_model_grads + optimizer step (skipped on a non-finite norm),
                                     # then the buffers are zeroed again

Same update as the adamw path: Adam with decoupled weight decay on every parameter (`config_overrides={}`: megatron
otherwise exempts norms and biases), torch's AdamW betas/eps, clipping by the global norm with coefficient
clip / (norm + 1e-6) as torch.nn.utils.clip_grad_norm_. The global norm is taken over the world (each rank's
fp32 gradient shard; TP-split weights per shard, replicated ones on TP rank 0 only; DP shards are disjoint): the
adamw path's norm. In float32 the two paths agree up to summation order; in bfloat16 with float32 master weights
both step float32 masters with float32 gradients accumulated from the bf16 backward (MasterAdamW on the adamw
path) and agree up to summation order too. float16 is refused: megatron would need a loss scaler. The model the
master weights come from is 16-bit: `load_master` sets them from the unrounded float32 weights, `master_value`
assembles one back (for the export).

Gradient convention, checked against megatron-core 0.16.1's finalize_model_grads.py:
- the DDP hooks add each parameter's .grad into its fp32 `main_grad` buffer; `finalize_model_grads` reduce-scatters
  the buffers over dp (gradient_scaling_factor 1/dp: an AVERAGE, see `loss_normalizer`), then all-reduces over the
  TP group exactly the q/k layernorm gradients of Qwen3 (`_allreduce_non_tensor_model_parallel_grads`: the set of
  `model.tp_partial_grad_params`, so `model.finalize_grads` must not run too), and at pp=1 nothing else (the
  embedding and position-embedding groups have one rank);
- the gradient of the final hidden states is summed over the TP group by the vocab-parallel loss's backward, an
  autograd op that finalize_model_grads does not see: nothing is summed twice.

Checkpoints (the same step folder, meta.json and DCP call of train/checkpoint.py; the trainer nests the pieces):

    tp<r>_of_<tp>.model.*                          the model, exactly as the adamw path writes it (DP replicas
                                                   write one copy): evaluation exports read it unchanged
    tp<r>_of_<tp>.dist_optimizer.dp<d>_of_<dp>.*   rank (r, d)'s shard of the optimizer: for every parameter
                                                   shard of its inner Adam, the fp32 master slice ("main") and
                                                   the Adam state (exp_avg, exp_avg_sq, step), plus any
                                                   per-group step (TransformerEngine's FusedAdam keeps it there)

Each rank writes and reads only its own shard: no gather, no full-size copy, nothing but DCP's own collectives. The
shards follow megatron's gradient-buffer layout, which depends on the number of data-parallel ranks, so such a
checkpoint resumes at the same tp AND dp only (the trainer refuses another dp, naming it). The adamw path resumes
at any dp; resharding this one would take megatron's dist_checkpointing (`optimizer.sharded_state_dict(
model.sharded_state_dict(), metadata={"distrib_optim_sharding_type": "fully_reshardable"})`), a second on-disk
format beside DCP, for consolidation jobs that requeue on the same allocation anyway.

`tools/gpu_check.py` exercises `DistributedAdam` (dp=1) on a GPU (what has run where: docs/results.md).
tests/test_megatron_optimizer.py runs it on the CPU, megatron's own code with gloo (which reduce-scatters
and all-gathers in torch 2.13), under a test-only pretend-CUDA mode (tests/megatron_support/fake_cuda.py): whole
consolidations at tp=2 x dp=2 give the adamw path's weights, resume exactly, refuse another dp or optimizer.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Union

import torch

from oel_hpc.train.precision import fresh_adam_steps

KINDS = ("auto", "adamw", "distributed")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype)) if isinstance(dtype, torch.dtype) else str(dtype)


def resolve(kind: str, device: Union[str, torch.device], dtype: Union[str, torch.dtype],
            master_dtype: Union[str, torch.dtype] = "float32") -> str:
    """The optimizer `trainer.optimizer=kind` means for a trainer on `device` computing in `dtype` with master
    weights in `master_dtype`: "adamw" or "distributed". ValueError (naming the key) for an unknown kind, or
    "distributed" off CUDA, in float16 or without float32 master weights (it always keeps them)."""
    device, dtype, master = torch.device(device), _dtype_name(dtype), _dtype_name(master_dtype)
    if kind not in KINDS:
        raise ValueError(f"trainer.optimizer: must be auto, adamw or distributed, got '{kind}'")
    if kind == "auto":
        return "distributed" if device.type == "cuda" and dtype != "float16" and master == "float32" else "adamw"
    if kind == "distributed":
        if device.type != "cuda":
            raise ValueError(f"trainer.optimizer: distributed (megatron's distributed optimizer) needs CUDA, but the "
                             f"trainer runs on {device.type}; use trainer.optimizer=adamw (or auto)")
        if dtype == "float16":
            raise ValueError("trainer.optimizer: distributed supports float32 and bfloat16, not float16 (it would "
                             "need a loss scaler); use trainer.dtype=bfloat16 or trainer.optimizer=adamw")
        if master != "float32":
            raise ValueError(f"trainer.master_dtype: megatron's distributed optimizer always keeps float32 master "
                             f"weights; pure {master} training needs trainer.optimizer=adamw (auto picks it)")
    return kind


def loss_normalizer(tokens: int, dp_size: int, kind: str) -> float:
    """What the summed KL of a rank's micro-batches is divided by, so that the update is the token mean over the
    whole step (all dp ranks). The adamw path SUMS the gradients over dp: the global token count. megatron's DDP
    AVERAGES them (it scales each rank's gradient by 1/dp before the reduce-scatter): tokens / dp, so that
    (1/dp) * sum_r dp * grad(kl_r) / tokens = sum_r grad(kl_r) / tokens, the same update."""
    if kind == "distributed":
        return tokens / dp_size
    return tokens


# ------------------------------------------------------------------------- checkpoint shards (pure torch)
def _restore(live, saved):
    """`saved` into `live` in place when both are tensors (DCP has usually loaded into `live` already: then they
    are the same object), else the saved value."""
    if torch.is_tensor(live) and torch.is_tensor(saved):
        if live is not saved:
            live.copy_(saved)
        return live
    return saved


def ensure_state(optimizers) -> None:
    """Give every inner optimizer its state tensors (exp_avg, exp_avg_sq, step: what a first step creates), so that
    `shard_state` can serve as DCP's load template before any step, or a checkpoint can be written after steps that
    were all skipped. Done as megatron does (DistributedOptimizer._init_optimizer_states_with_dummy_values): one
    step with zero gradients, at lr 0 (no weight decay moves the master weights) and its step counts set back to 0
    after: the state of an optimizer that never stepped."""
    for opt in optimizers:
        if opt is None:
            continue
        params = [p for group in opt.param_groups for p in group["params"] if p.numel() > 0]
        if not params or all(opt.state.get(p) for p in params):
            continue
        for p in params:
            p.grad = torch.zeros_like(p)
        lrs = [group["lr"] for group in opt.param_groups]
        for group in opt.param_groups:
            group["lr"] = 0.0
        opt.step()
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        fresh_adam_steps(opt)


def shard_state(optimizers) -> dict:
    """This rank's optimizer shards as a DCP-ready dict: for inner optimizer c, parameter i of group g,
    `opt<c>.group<g>_param<i>` = {"main": the (fp32 master) parameter shard, its Adam state tensors}, and
    `opt<c>.group<g>.step` where the optimizer counts steps per group. Live tensors, not copies: DCP saves them,
    and loads into them in place."""
    out = {}
    for c, opt in enumerate(optimizers):
        if opt is None:
            continue
        entry = {}
        for g, group in enumerate(opt.param_groups):
            if "step" in group:
                entry[f"group{g}"] = {"step": group["step"]}
            for i, p in enumerate(group["params"]):
                entry[f"group{g}_param{i}"] = {"main": p.detach(), **opt.state.get(p, {})}
        out[f"opt{c}"] = entry
    return out


@torch.no_grad()
def load_shard_state(optimizers, state: dict) -> None:
    """The inverse of `shard_state`: `state` (as DCP loaded it into `shard_state`'s template) into the optimizers."""
    for c, opt in enumerate(optimizers):
        if opt is None:
            continue
        entry = state[f"opt{c}"]
        for g, group in enumerate(opt.param_groups):
            if "step" in group:
                group["step"] = _restore(group["step"], entry[f"group{g}"]["step"])
            for i, p in enumerate(group["params"]):
                saved = entry[f"group{g}_param{i}"]
                _restore(p.detach(), saved["main"])
                live = opt.state[p]
                for key, value in saved.items():
                    if key != "main":
                        live[key] = _restore(live.get(key), value)


# ------------------------------------------------------------------------------- the distributed path
class DistributedAdam:
    """megatron-core's DistributedDataParallel (fp32 gradient buffers, no overlap) around `model`, and its
    DistributedOptimizer (Adam, decoupled weight decay) over the data-parallel group of megatron's parallel_state.
    Needs CUDA, torch.distributed and initialize_model_parallel done; `model` is a GPTModel (or any MegatronModule)
    already on the current CUDA device, its parameters in float32 or bfloat16. The model keeps being called
    directly; `ddp` only owns the gradient buffers and their reduction."""

    def __init__(self, model, *, lr: float, weight_decay: float, grad_clip: float):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        config = model.config  # the TransformerConfig
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"trainer.optimizer: distributed supports float32 and bfloat16 parameters, not {dtype}")
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,  # main_grad in fp32 whatever the parameter dtype
            overlap_grad_reduce=False,  # one synchronous reduce-scatter in finalize_model_grads
            overlap_param_gather=False,  # one synchronous all-gather at the end of optimizer.step()
            use_distributed_optimizer=True,
            average_in_collective=False,  # pre-scale by 1/dp, then sum (see loss_normalizer)
        )
        self.ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        self.config = OptimizerConfig(
            optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
            decoupled_weight_decay=True, clip_grad=grad_clip, bf16=dtype == torch.bfloat16, fp16=False,
            params_dtype=dtype, use_distributed_optimizer=True)
        # config_overrides={}: weight decay on every parameter, as torch.optim.AdamW(model.parameters()) does (None
        # would exempt biases and 1-d weights); no gloo groups: nothing here gathers over gloo
        self.optimizer = get_megatron_optimizer(self.config, [self.ddp], config_overrides={},
                                                use_gloo_process_groups=False)
        self.zero_grad()

    def zero_grad(self) -> None:
        """Empty the gradient buffers: before the first micro-batch of a step (done at construction and after
        every step)."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self, grad_clip: float | None = None, skip: bool = False) -> tuple[float, bool]:
        """Reduce the accumulated gradients (dp reduce-scatter, TP sum of the q/k-norm gradients), clip, step, gather
        the updated weights into every rank's model, zero the buffers. Returns (the global gradient norm before
        clipping, whether the step was taken): a non-finite norm skips the update (megatron's own step would apply
        it: without a loss scaler it does not look), the same on every rank since the norm is reduced over all;
        so does `skip` (the caller's decision, the same on every rank).
        ChainedOptimizer.step, with that check between the norm and the clip."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        if grad_clip is not None:
            self.config.clip_grad = grad_clip  # the config object every chained optimizer reads
        finalize_model_grads([self.ddp])
        found_inf = self.optimizer.prepare_grads()  # model grads -> main grads (and a scaler's check: none here)
        grad_norm = float(self.optimizer.get_grad_norm())
        stepped = not found_inf and math.isfinite(grad_norm) and not skip
        if stepped:
            for opt in self.optimizer.chained_optimizers:
                if getattr(opt, "is_stub_optimizer", False):
                    continue
                params = opt.get_parameters()
                if params and opt.config.clip_grad > 0.0:
                    clip_grad_by_total_norm_fp32(
                        params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                        use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
            if not self.optimizer.step_with_ready_grads():
                raise RuntimeError("megatron's distributed optimizer did not step")
        self.zero_grad()
        return grad_norm, stepped

    # --------------------------------------------------------------- float32 master weights (16-bit model)
    def _main_shards(self) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor, int, int]]:
        """(model parameter, its float32 main shard on this rank, [start, end) of the flattened parameter it
        covers), for every parameter this rank holds a shard of (a 16-bit model's parameters have separate main
        shards; a float32 model's shards are views of the parameters themselves)."""
        for opt in self.optimizer.chained_optimizers:
            pairs = [(opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                     (opt.model_fp32_groups, opt.shard_fp32_groups)]
            for model_groups, main_groups in pairs:
                for model_group, main_group in zip(model_groups, main_groups):
                    for param, main in zip(model_group, main_group):
                        r = opt._get_model_param_range_map(param)["param"]
                        yield param, main, r.start, r.end

    @torch.no_grad()
    def load_master(self, value: Callable[[torch.nn.Parameter], torch.Tensor]) -> None:
        """Every main shard := its slice of `value(param)` (the full float32 weight): the master weights from
        unrounded values rather than from the 16-bit model they were initialised from."""
        for param, main, start, end in self._main_shards():
            main.copy_(value(param).reshape(-1)[start:end])

    @torch.no_grad()
    def master_value(self, param: torch.nn.Parameter, group) -> torch.Tensor:
        """The full float32 master weight of `param` (this TP rank's shard of it), assembled from the main shards
        of the data-parallel `group` (a collective: every rank of the group calls it for the same parameters in the
        same order)."""
        import torch.distributed as dist

        if not hasattr(self, "_shards_by_param"):
            self._shards_by_param = {}
            for p, main, start, end in self._main_shards():
                self._shards_by_param.setdefault(p, []).append((main, start, end))
        full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        for main, start, end in self._shards_by_param.get(param, []):
            full[start:end] = main  # each element is held by exactly one dp rank: the sum assembles the weight
        dist.all_reduce(full, group=group)
        return full.view(param.shape)

    def _inner(self) -> list:
        return [getattr(o, "optimizer", None) for o in self.optimizer.chained_optimizers]

    def checkpoint_state(self) -> dict:
        """This rank's shard (see the module doc); before any step it first allocates the state (`ensure_state`)
        so that the dict can be DCP's load template."""
        ensure_state(self._inner())
        return shard_state(self._inner())

    def load_checkpoint_state(self, state: dict) -> None:
        load_shard_state(self._inner(), state)


# ------------------------------------------------------------------ the adamw path with float32 master weights
def _accumulate_main_grad(param: torch.nn.Parameter) -> None:
    # after each backward: this micro-batch's 16-bit gradient into the float32 accumulator, then dropped
    param.main_grad.add_(param.grad)
    param.grad = None


class MasterAdamW:
    """trainer.optimizer=adamw on a 16-bit model with float32 master weights (trainer.dtype 16-bit, master_dtype
    float32): torch AdamW on float32 copies of the model's parameters (this rank's TP shard of each), and a float32
    gradient accumulator per parameter (`param.main_grad`, as megatron's DDP keeps one) that every backward's 16-bit
    gradient is added to. `step` sets the masters' gradients to the accumulators, steps, rounds the masters into the
    model and zeroes the accumulators. The same scheme as the distributed optimizer's, unsharded, on any device.

    Checkpoints: `shard_state([optimizer])` ({"main": master, exp_avg, exp_avg_sq, step} per parameter), beside
    the 16-bit model: the same at every dp rank (replicas), so the adamw path keeps resuming at any dp."""

    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in self.params]
        for p in self.params:
            p.main_grad = torch.zeros_like(p, dtype=torch.float32)
            p.register_post_accumulate_grad_hook(_accumulate_main_grad)
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, weight_decay=weight_decay)

    def grads(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(model parameter, its float32 accumulated gradient): what the trainer reduces, measures and clips."""
        return [(p, p.main_grad) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = p.main_grad  # every master gets a gradient (zeros if unused): every one has Adam state
        self.optimizer.step()
        for p, m in zip(self.params, self.master):
            p.copy_(m)
            m.grad = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.main_grad.zero_()
            p.grad = None

    @torch.no_grad()
    def load_master(self, value: Callable[[torch.nn.Parameter], torch.Tensor]) -> None:
        """The masters from unrounded float32 weights (`value(param)`: this TP rank's full weight)."""
        for p, m in zip(self.params, self.master):
            m.copy_(value(p))

    def master_value(self, param: torch.nn.Parameter, group=None) -> torch.Tensor:
        return self.master[self._index()[param]].detach()

    def _index(self) -> dict:
        if not hasattr(self, "_by_param"):
            self._by_param = {p: i for i, p in enumerate(self.params)}
        return self._by_param

    def checkpoint_state(self) -> dict:
        ensure_state([self.optimizer])
        return shard_state([self.optimizer])

    def load_checkpoint_state(self, state: dict) -> None:
        load_shard_state([self.optimizer], state)
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)  # the model from the loaded masters (the checkpoint's 16-bit model is their rounding)
