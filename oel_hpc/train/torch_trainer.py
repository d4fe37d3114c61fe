"""trainer=torch: the student and teacher as Hugging Face models, replicated (DDP) or sharded (FSDP2) across the
data-parallel ranks. Everything the consolidation loop (train/consolidate.py) needs from a backend:

    sampler                          the HF model the student samples with (on-policy), refreshed each step
    dp_rank, dp_size                 this rank's share of the rows
    teacher_hidden / student_loss    one micro-batch (the loss inside `accumulate`, backward by the caller)
    normalizer, optimizer_step       gradient scale and the update
    checkpoint_state / load_checkpoint_state / checkpoint_meta / export

The megatron-core backend (oel_hpc/megatron/trainer.py) offers the same.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from transformers import AutoModelForCausalLM

from oel_hpc.engines.hf import DTYPES
from oel_hpc.train import checkpoint, distributed
from oel_hpc.train.loss import topk_reverse_kl


def pad_batch(sequences: list[list[int]], response_lens: list[int], pad_id: int, device):
    """Right-padded ids and attention mask, and the flat indices (into [rows × width]) of the positions that
    predict each response token, rows concatenated."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    positions = []
    for i, (s, n) in enumerate(zip(sequences, response_lens)):
        ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
        # the token at position p is predicted from position p - 1
        positions.append(torch.arange(len(s) - n - 1, len(s) - 1) + i * width)
    return ids.to(device), attention.to(device), torch.cat(positions).to(device)


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
    Returns (loss, Σ kl, Σ student entropy, Σ teacher entropy) over the micro-batch's response tokens."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, ids, attention, positions, teacher_hidden, teacher_head, normalizer, *, k: int,
                temperature: float, renormalize: bool, chunk_size: int, impl: str = "auto"):
        h = decoder_hidden(self.student, ids, attention, positions)
        out = topk_reverse_kl(h, self.student.lm_head.weight, teacher_hidden, teacher_head, k=k,
                              temperature=temperature, renormalize=renormalize, chunk_size=chunk_size,
                              normalizer=normalizer, impl=impl)
        return out.loss, out.kl_sum, out.student_entropy * out.tokens, out.teacher_entropy * out.tokens


class TorchTrainer:
    name = "torch"

    def __init__(self, cfg, base: Path, d: distributed.Dist, lr: float, weight_decay: float):
        self.d, self.parallel = d, cfg.trainer.parallel
        self.fsdp = d.enabled and self.parallel == "fsdp"
        self.student = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[cfg.trainer.dtype]).to(d.device)
        self.vocab_size = self.student.config.vocab_size
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        # FSDP2: the student's weights live in shards; sampling runs on a full copy refreshed before every step
        # (generation lengths differ across ranks, so it must not need collectives)
        self.sampler = copy.deepcopy(self.teacher) if self.fsdp else self.student
        self.model = distributed.wrap(Distiller(self.student), distributed.decoder_layers(self.student),
                                      self.parallel, d)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=lr, weight_decay=weight_decay)
        self.dp_rank, self.dp_size = d.rank, d.world_size
        self.student.train()

    def describe(self) -> str:
        return f"{self.d.world_size} ranks ({self.parallel})" if self.d.enabled else "1 process"

    def refresh_sampler(self) -> None:
        if self.fsdp:
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
        return response_hidden(self.teacher, sequences, lens, pad_id)

    def accumulate(self, last: bool):
        """DDP: all-reduce gradients only in the last micro-batch's backward."""
        return distributed.no_sync(self.model, sync=last)

    def student_loss(self, sequences, lens, pad_id, teacher_hidden, normalizer, loss_args):
        ids, attention, positions = pad_batch(sequences, lens, pad_id, self.d.device)
        return self.model(ids, attention, positions, teacher_hidden, self.teacher.lm_head.weight, normalizer,
                          **loss_args)

    def optimizer_step(self, grad_clip: float) -> float:
        norm = distributed.clip_grad_norm(self.student.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    def checkpoint_state(self) -> dict:
        model_state, optim_state = get_state_dict(self.student, self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def load_checkpoint_state(self, state: dict) -> None:
        set_state_dict(self.student, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def checkpoint_meta(self) -> dict:
        return {"trainer": self.name, "parallel": self.parallel if self.d.enabled else None}

    def check_checkpoint(self, meta: dict, path: Path) -> None:
        if meta.get("trainer", "torch") != self.name:
            raise RuntimeError(f"{path} was written by trainer={meta['trainer']}, this is trainer={self.name}")

    def export(self, tokenizer, out_dir: Path) -> None:
        full = checkpoint.full_model_state(self.student, self.d) if self.fsdp else None  # a collective
        if self.d.is_main:
            checkpoint.export_hf(self.student, tokenizer, out_dir, state_dict=full)
