"""trainer=torch: the student and teacher as Hugging Face models, replicated (DDP) or sharded (FSDP2) across the
data-parallel ranks. Satisfies train/backend.py's TrainerBackend, as the megatron-core backend
(train/megatron/trainer.py) does."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from transformers import AutoModelForCausalLM

from oel_hpc.train import checkpoint, distributed, numerics
from oel_hpc.train.batch import pad_batch
from oel_hpc.train.loss import topk_reverse_kl
from oel_hpc.train.precision import Precision, fresh_adam_steps


def decoder_hidden(model, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Final hidden states at `positions` (flat indices): [N, H]. Only the decoder runs; logits are left to the
    chunked loss."""
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.size(-1))[positions]


def response_hidden(model, sequences: list[list[int]], response_lens: list[int], pad_id: int) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token, rows concatenated: [Σ len, H]."""
    return decoder_hidden(model, *pad_batch(sequences, response_lens, pad_id, model.device))


class Distiller(torch.nn.Module):
    """One micro-batch's loss inside one forward: the student's decoder, then the chunked top-k reverse KL against
    the teacher's hidden states and LM head. Inside `forward`, DDP and FSDP2 see every use of the student's weights
    (its LM head included): DDP's gradient hooks and FSDP2's all-gathers work as for any model.
    Mixed precision (train/precision.py): the decoder runs under autocast; the loss, outside it, gets the hidden
    states and the head weight in the compute dtype (its softmax math is fp32 anyway), so it sees the same inputs
    whether the weights are float32 (autocast) or gathered in 16 bits (FSDP2's policy); the casts' backward
    returns float32 gradients to the float32 weights.
    Returns (loss, Σ kl, Σ student entropy, Σ teacher entropy) over the micro-batch's response tokens."""

    def __init__(self, student, precision: Precision):
        super().__init__()
        self.student, self.precision = student, precision

    def forward(self, ids, attention, positions, teacher_hidden, teacher_head, normalizer, *, k: int,
                temperature: float, renormalize: bool, chunk_size: int, impl: str = "auto"):
        with self.precision.autocast(teacher_hidden.device):
            h = decoder_hidden(self.student, ids, attention, positions)
        compute = self.precision.compute
        out = topk_reverse_kl(h.to(compute), self.student.lm_head.weight.to(compute), teacher_hidden, teacher_head,
                              k=k, temperature=temperature, renormalize=renormalize, chunk_size=chunk_size,
                              normalizer=normalizer, impl=impl)
        return out.loss, out.kl_sum, out.student_entropy * out.tokens, out.teacher_entropy * out.tokens


class TorchTrainer:  # a train.backend.TrainerBackend
    name = "torch"

    def __init__(self, cfg, base: Path, d: distributed.Dist, lr: float, weight_decay: float):
        self.d, self.parallel = d, cfg.trainer.parallel
        self.fsdp = d.enabled and self.parallel == "fsdp"
        self.precision = p = Precision.from_config(cfg.trainer)
        # the student holds the master weights; the frozen teacher is loaded in the compute dtype directly (no
        # transient master-size copy)
        self.student = AutoModelForCausalLM.from_pretrained(base, dtype=p.master).to(d.device)
        self.vocab_size = self.student.config.vocab_size
        self.teacher = AutoModelForCausalLM.from_pretrained(base, dtype=p.compute).to(d.device)
        self.teacher.eval().requires_grad_(False)
        # the student samples from its current weights, as they are when it holds them whole in the compute dtype;
        # else from a full copy in the compute dtype refreshed before every step (FSDP2: the weights live in
        # shards, and generation lengths differ across ranks, so sampling must not need collectives)
        self.sampler = copy.deepcopy(self.teacher) if self.fsdp or p.mixed else self.student
        self.model = distributed.wrap(Distiller(self.student, p), distributed.decoder_layers(self.student),
                                      self.parallel, d, mixed_compute=p.compute if p.mixed else None)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=lr, weight_decay=weight_decay)
        self.dp_rank, self.dp_size = d.rank, d.world_size
        self.student.train()

    def describe(self) -> str:
        where = f"{self.d.world_size} ranks ({self.parallel})" if self.d.enabled else "1 process"
        return f"{where}, {self.precision.describe()}"

    def refresh_sampler(self) -> None:
        if self.sampler is not self.student:
            distributed.copy_full_weights(self.student, self.sampler)

    def forward_passes(self, n: int) -> int:
        """FSDP2: every rank must run as many forward/backward passes (each one gathers and reduces shards)."""
        return int(self.d.all_reduce([n], op="max")[0]) if self.fsdp else n

    def dp_all_reduce(self, values):
        return self.d.all_reduce(values)

    def normalizer(self, tokens: int) -> float:
        # DDP and FSDP2 average gradients over ranks: tokens / world makes that average a sum over all tokens
        return tokens / self.d.world_size if self.d.enabled else tokens

    @torch.no_grad()
    def teacher_hidden(self, sequences, lens, pad_id) -> torch.Tensor:
        with self.precision.autocast(self.d.device):  # as the student's forward
            return response_hidden(self.teacher, sequences, lens, pad_id).to(self.precision.compute)

    def accumulate(self, last: bool):
        """DDP: all-reduce gradients only in the last micro-batch's backward."""
        return distributed.no_sync(self.model, sync=last)

    def student_loss(self, sequences, lens, pad_id, teacher_hidden, normalizer, loss_args):
        ids, attention, positions = pad_batch(sequences, lens, pad_id, self.d.device)
        return self.model(ids, attention, positions, teacher_hidden, self.teacher.lm_head.weight, normalizer,
                          **loss_args)

    def optimizer_step(self, grad_clip: float, skip: bool = False) -> tuple[float, bool]:
        """Clip and step; returns (the gradient norm before clipping, whether the step was taken). A non-finite
        norm (or `skip`) skips the update: no weight or optimizer state changes (every rank sees the same norm:
        DDP's gradients and FSDP2's norm are reduced over all ranks)."""
        norm = distributed.clip_grad_norm(self.student.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        stepped = distributed.agree_finite(norm, self.d) and not skip
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item(), stepped

    @torch.no_grad()
    def non_finite_weight(self):
        """The student's parameters are the master weights (the sampler is a copy made from them)."""
        return numerics.non_finite_weight(self.student.named_parameters(), self.d)

    def checkpoint_state(self) -> dict:
        never_stepped = not self.optimizer.state
        model_state, optim_state = get_state_dict(self.student, self.optimizer)
        if never_stepped:  # get_state_dict created the state with a zero-lr step: make it a fresh one again
            fresh_adam_steps(self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def load_checkpoint_state(self, state: dict) -> None:
        set_state_dict(self.student, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def checkpoint_meta(self) -> dict:
        return {"trainer": self.name, "parallel": self.parallel if self.d.enabled else None, **self.precision.meta()}

    def check_checkpoint(self, meta: dict, path: Path) -> None:
        if meta.get("trainer", "torch") != self.name:
            raise RuntimeError(f"{path} was written by trainer={meta['trainer']}, this is trainer={self.name}")
        self.precision.check_meta(meta, path)

    def export(self, tokenizer, out_dir: Path) -> None:
        """The master weights as a Hugging Face folder in trainer.export_dtype (the end of training: the student
        may be cast in place)."""
        full = checkpoint.full_model_state(self.student, self.d) if self.fsdp else None  # a collective
        if not self.d.is_main:
            return
        model = self.student
        if full is not None:  # FSDP2: the gathered weights into the sampler, a plain HF model no longer needed
            model = self.sampler.to(device="cpu", dtype=self.precision.export)
            model.load_state_dict(full)
        checkpoint.export_hf(model.to(self.precision.export), tokenizer, out_dir)
