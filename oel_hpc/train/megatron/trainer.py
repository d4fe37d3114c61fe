"""trainer=megatron: the consolidation step on megatron-core GPTModels split by tensor parallelism.

The same backend interface (train/backend.py) as train/torch/, so train/consolidate.py runs unchanged. The ranks
form a grid of tp × dp (megatron's parallel_state): the `tp` ranks of one group hold one copy of the model, each a slice
of every layer and a vocabulary shard of the LM head; they see the same rows, sample the same responses (the
sampler is a full HF copy, per-row seeds), and compute the loss over vocab-parallel logits
(train/loss/vocab_parallel.py). The dp groups split the rows and sum their gradients.

Sampling and the final export go through a Hugging Face copy of the student, refreshed from the TP shards every
step (an all-gather in the TP group): simple and exact, but a full copy per rank — fine up to a few B parameters.
The optimizer (`trainer.optimizer`, megatron/optimizer.py): `adamw` = torch.optim.AdamW on each rank's shard,
gradients reduced by hand in `optimizer_step` (CPU and GPU); `distributed` = megatron's DistributedDataParallel +
DistributedOptimizer, state sharded over dp (CUDA only); `auto` = distributed on CUDA.

Checkpoints (DCP) hold each TP rank's model and optimizer state under `tp<r>_of_<tp>`; data-parallel replicas
write one copy of the model (and, with adamw, of the optimizer; the distributed optimizer's shards are per dp
rank). They resume at the same tp (adamw: any dp; distributed: the same dp) and the same resolved optimizer;
evaluation exports reassemble the model shards without megatron.
"""
from __future__ import annotations

import math
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from transformers import AutoConfig, AutoModelForCausalLM

from oel_hpc.train.megatron import convert
from oel_hpc.train.megatron.convert import shard_key
from oel_hpc.train.megatron.model import build_gpt, final_hidden, finalize_grads, output_weight
from oel_hpc.train.megatron.optimizer import MasterAdamW, loss_normalizer, resolve
from oel_hpc.train import checkpoint, distributed, numerics
from oel_hpc.train.batch import pad_batch
from oel_hpc.train.loss import topk_reverse_kl
from oel_hpc.train.loss.vocab_parallel import vocab_parallel_topk_reverse_kl
from oel_hpc.train.precision import Precision, fresh_adam_steps


def _init_parallel(d: distributed.Dist, tp: int):
    """megatron's process groups; it needs torch.distributed even for one process (a private one-rank group)."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="oel-megatron-pg-", delete=False).name
        dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", init_method=f"file://{store}",
                                rank=0, world_size=1)
    world = dist.get_world_size()
    if world % tp:
        raise ValueError(f"trainer.tp: {tp} does not divide the {world} ranks of this job")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if d.device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)  # dropout is 0: the seed only has to be set
    return parallel_state


def check_optimizer(meta: dict, path, kind: str, dp_size: int) -> None:
    """Refuse a checkpoint whose optimizer state this job cannot load: another optimizer (the two store different
    state; megatron checkpoints from before trainer.optimizer are adamw), or the distributed optimizer's shards at
    another number of data-parallel ranks."""
    written = meta.get("optimizer", "adamw")
    if written != kind:
        raise RuntimeError(f"{path} holds the state of trainer.optimizer={written}, this job runs trainer.optimizer="
                           f"{kind} (auto = distributed on CUDA, adamw elsewhere) and cannot read it: resume where it "
                           f"resolves to {written}, or run.overwrite=true to start this consolidation afresh")
    if kind == "distributed" and meta.get("dp") != dp_size:
        raise RuntimeError(f"{path} was written by the distributed optimizer at {meta.get('dp')} data-parallel ranks, "
                           f"this job has {dp_size}: its optimizer shards only load at the same dp; resume with "
                           f"{meta.get('dp')} x trainer.tp ranks")


class MegatronTrainer:  # a train.backend.TrainerBackend
    name = "megatron"

    def __init__(self, cfg, base: Path, d: distributed.Dist, lr: float, weight_decay: float):
        t = cfg.trainer
        self.d, self.tp = d, t.tp
        ps = _init_parallel(d, t.tp)
        self.tp_group, self.dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        # precision (train/precision.py): student and teacher compute in the compute dtype; with float32 master
        # weights the optimizer keeps them (MasterAdamW, or megatron's main shards), loaded from unrounded values
        self.precision = p = Precision.from_config(t)
        self.optimizer_kind = resolve(t.get("optimizer", "auto"), d.device, p.compute, p.master)
        self.hf_config = AutoConfig.from_pretrained(base)
        self.vocab_size = self.hf_config.vocab_size

        hf_state = AutoModelForCausalLM.from_pretrained(base, dtype=p.master).state_dict()  # on the CPU
        self.sampler = AutoModelForCausalLM.from_pretrained(base, dtype=p.compute).to(d.device).eval()
        cpu = d.device.type == "cpu"

        def build():
            model = build_gpt(self.hf_config, tp=t.tp, dtype=p.compute, attention=t.attention, cpu=cpu)
            convert.load_hf(model, hf_state, self.hf_config, self.tp_rank, t.tp)
            return model.to(d.device)

        self.student = build().train()
        self.teacher = build().eval().requires_grad_(False)
        self.dist_opt = self.master_opt = None
        if self.optimizer_kind == "distributed":
            from oel_hpc.train.megatron.optimizer import DistributedAdam

            # the student stays the GPTModel, called directly; dist_opt.ddp owns its gradient buffers
            self.dist_opt = DistributedAdam(self.student, lr=lr, weight_decay=weight_decay,
                                            grad_clip=cfg.consolidate.grad_clip)
            self.optimizer = self.dist_opt.optimizer
        elif p.mixed:
            self.master_opt = MasterAdamW(self.student, lr=lr, weight_decay=weight_decay)
            self.optimizer = self.master_opt.optimizer
        else:
            self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=lr, weight_decay=weight_decay)
        if p.mixed:  # the masters from the unrounded weights, not from the 16-bit model (round r+1's start)
            mine = convert.hf_to_megatron(hf_state, self.hf_config, tp_rank=self.tp_rank, tp_size=t.tp,
                                          fused_norms=convert.uses_fused_norms(self.student.state_dict().keys()))
            names = {param: name for name, param in self.student.named_parameters()}
            (self.dist_opt or self.master_opt).load_master(lambda param: mine[names[param]].to(param.device))
        del hf_state

    def describe(self) -> str:
        extra = ", distributed optimizer" if self.optimizer_kind == "distributed" else ""
        return (f"{self.d.world_size} ranks (megatron tp={self.tp} x dp={self.dp_size}{extra}), "
                f"{self.precision.describe()}")

    @torch.no_grad()
    def refresh_sampler(self) -> None:
        """The HF sampler := the student's current weights (an all-gather in the TP group)."""
        state = convert.gather_hf_state(self.student, self.hf_config, self.tp_group)
        for name, p in self.sampler.named_parameters():
            if name not in state:
                raise KeyError(f"the student's gathered weights have no '{name}' for the HF sampler")
            p.copy_(state[name].to(p.device, p.dtype))

    def forward_passes(self, n: int) -> int:
        return n  # TP ranks of a group run the same micro-batches; dp groups only meet at the gradient sum

    def dp_all_reduce(self, values):
        if self.dp_size == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.d.device)
        dist.all_reduce(t, group=self.dp_group)
        return t.tolist()

    def normalizer(self, tokens: int) -> float:
        # adamw: gradients summed over dp -> the global token count; distributed: megatron's DDP averages them over
        # dp -> tokens / dp (see optimizer.loss_normalizer); either way the update is the step's token mean
        return loss_normalizer(tokens, self.dp_size, self.optimizer_kind)

    def _hidden(self, model, sequences, lens, pad_id) -> torch.Tensor:
        ids, _, positions = pad_batch(sequences, lens, pad_id, self.d.device)
        h = final_hidden(model, ids)  # right padding: a causal mask alone is exact for the real positions
        return h.reshape(-1, h.size(-1))[positions]

    @torch.no_grad()
    def teacher_hidden(self, sequences, lens, pad_id) -> torch.Tensor:
        return self._hidden(self.teacher, sequences, lens, pad_id)

    def accumulate(self, last: bool):
        return nullcontext()  # gradients are reduced once, in optimizer_step (both optimizers)

    def student_loss(self, sequences, lens, pad_id, teacher_hidden, normalizer, loss_args):
        h = self._hidden(self.student, sequences, lens, pad_id)
        loss_args = dict(loss_args)
        impl = loss_args.pop("impl", "auto")  # the loss package's choice (auto | chunked | fused); vocab-parallel: chunked only
        if self.tp == 1:  # the whole head is here: topk_reverse_kl (what the vocab-parallel loss is at tp=1)
            V = self.vocab_size
            out = topk_reverse_kl(h, output_weight(self.student)[:V], teacher_hidden, output_weight(self.teacher)[:V],
                                  normalizer=normalizer, impl=impl, **loss_args)
            return out.loss, out.kl_sum, out.student_entropy * out.tokens, out.teacher_entropy * out.tokens
        if impl == "fused":
            raise ValueError(f"consolidate.loss_impl=fused is not vocab-parallel: trainer=megatron at tp={self.tp} "
                             "runs the chunked loss only (use loss_impl=auto or chunked)")
        out = vocab_parallel_topk_reverse_kl(h, output_weight(self.student), teacher_hidden,
                                             output_weight(self.teacher), vocab_size=self.vocab_size,
                                             group=self.tp_group, normalizer=normalizer, **loss_args)
        return out.loss, out.kl_sum, out.student_entropy * out.tokens, out.teacher_entropy * out.tokens

    def optimizer_step(self, grad_clip: float, skip: bool = False) -> tuple[float, bool]:
        """Reduce, clip and step; returns (the gradient norm before clipping, whether the step was taken). A
        non-finite norm on any rank (or `skip`) skips the update everywhere (no weight or optimizer state
        changes)."""
        if self.dist_opt is not None:  # finalize_model_grads (dp reduce-scatter, q/k-norm TP sum), clip, step, zero
            return self.dist_opt.step(grad_clip, skip=skip)
        # (parameter, its gradient): the float32 accumulators with master weights, else .grad
        grads = self.master_opt.grads() if self.master_opt is not None else \
            [(p, p.grad) for p in self.student.parameters() if p.grad is not None]
        finalize_grads(self.student, self.tp_group)  # main_grad where there is one
        if self.dp_size > 1:
            flat = torch._utils._flatten_dense_tensors([g for _, g in grads])
            dist.all_reduce(flat, group=self.dp_group)
            for (_, g), reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, [g for _, g in grads])):
                g.copy_(reduced)
        norm = self._grad_norm(grads)
        # replicated weights' gradients are not reduced over TP: agree on the decision over the whole job
        stepped = distributed.agree_finite(norm, self.d) and not skip
        if stepped:
            if grad_clip > 0:
                scale = min(1.0, grad_clip / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
                if scale < 1.0:
                    for _, g in grads:
                        g.mul_(scale)
            (self.master_opt or self.optimizer).step()
        if self.master_opt is not None:
            self.master_opt.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    @torch.no_grad()
    def non_finite_weight(self):
        """The model's parameters (this rank's TP shard): with float32 master weights they are the masters rounded
        to the compute dtype, and rounding keeps a NaN or an infinity, so a non-finite master shows here too."""
        return numerics.non_finite_weight(self.student.named_parameters(), self.d)

    def _grad_norm(self, grads) -> float:
        """2-norm over the whole model: TP-split weights count every shard, replicated ones once."""
        split = torch.zeros((), dtype=torch.float64, device=self.d.device)
        replicated = split.clone()
        for p, g in grads:
            sq = g.detach().double().pow(2).sum()
            if getattr(p, "tensor_model_parallel", False):
                split += sq
            else:
                replicated += sq
        if self.tp > 1:
            dist.all_reduce(split, group=self.tp_group)
        return math.sqrt((split + replicated).item())

    def _dp_key(self) -> str:
        return f"dp{self.dp_rank}_of_{self.dp_size}"

    def checkpoint_state(self) -> dict:
        opts = StateDictOptions(strict=False)
        if self.dist_opt is not None:  # the model as below; the optimizer: this rank's shard, under its dp rank
            model_state = get_model_state_dict(self.student, options=opts)
            model_state = {k: v for k, v in model_state.items() if not convert.is_extra_state(k)}
            return {shard_key(self.tp_rank, self.tp): {
                "model": model_state, "dist_optimizer": {self._dp_key(): self.dist_opt.checkpoint_state()}}}
        if self.master_opt is not None:  # the 16-bit model as above; the float32 masters and their Adam state
            model_state = get_model_state_dict(self.student, options=opts)
            model_state = {k: v for k, v in model_state.items() if not convert.is_extra_state(k)}
            return {shard_key(self.tp_rank, self.tp): {"model": model_state,
                                                       "master_optimizer": self.master_opt.checkpoint_state()}}
        never_stepped = not self.optimizer.state
        model_state, optim_state = get_state_dict(self.student, self.optimizer, options=opts)
        if never_stepped:  # get_state_dict created the state with a zero-lr step: make it a fresh one again
            fresh_adam_steps(self.optimizer)
        model_state = {k: v for k, v in model_state.items() if not convert.is_extra_state(k)}
        return {shard_key(self.tp_rank, self.tp): {"model": model_state, "optimizer": optim_state}}

    def load_checkpoint_state(self, state: dict) -> None:
        mine = state[shard_key(self.tp_rank, self.tp)]
        if self.dist_opt is not None:
            set_model_state_dict(self.student, mine["model"], options=StateDictOptions(strict=False))
            self.dist_opt.load_checkpoint_state(mine["dist_optimizer"][self._dp_key()])
            return
        if self.master_opt is not None:
            set_model_state_dict(self.student, mine["model"], options=StateDictOptions(strict=False))
            self.master_opt.load_checkpoint_state(mine["master_optimizer"])
            return
        set_state_dict(self.student, self.optimizer, model_state_dict=mine["model"],
                       optim_state_dict=mine["optimizer"], options=StateDictOptions(strict=False))

    def checkpoint_meta(self) -> dict:
        meta = {"trainer": self.name, "tp": self.tp, "optimizer": self.optimizer_kind, **self.precision.meta()}
        if self.dist_opt is not None:
            meta["dp"] = self.dp_size  # the optimizer shards follow the dp layout
        return meta

    def check_checkpoint(self, meta: dict, path: Path) -> None:
        if meta.get("trainer", "torch") != self.name:
            raise RuntimeError(f"{path} was written by trainer={meta.get('trainer', 'torch')}, this is "
                               f"trainer={self.name}; run.overwrite=true starts this consolidation afresh")
        if meta.get("tp") != self.tp:
            raise RuntimeError(f"{path} was written at trainer.tp={meta.get('tp')}, this job has trainer.tp={self.tp}:"
                               f" resume with trainer.tp={meta.get('tp')} (any number of data-parallel ranks)")
        check_optimizer(meta, path, self.optimizer_kind, self.dp_size)
        self.precision.check_meta(meta, path)

    @torch.no_grad()
    def export(self, tokenizer, out_dir: Path) -> None:
        """The master weights (gathered over TP, and over dp from the distributed optimizer's shards) as a Hugging
        Face folder in trainer.export_dtype, through the sampler (no longer needed). Collectives on every rank."""
        values = None
        if self.precision.mixed:
            opt = self.dist_opt or self.master_opt
            params = dict(self.student.named_parameters())
            values = lambda name, t: opt.master_value(params[name], self.dp_group) if name in params else t  # noqa: E731
        state = convert.gather_hf_state(self.student, self.hf_config, self.tp_group, values=values)
        if not self.d.is_main:
            return
        model = self.sampler.to(device="cpu", dtype=self.precision.export)
        for name, p in model.named_parameters():
            p.copy_(state[name])
        checkpoint.export_hf(model, tokenizer, out_dir)
