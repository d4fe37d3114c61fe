"""What the consolidation loop (train/consolidate.py) and the checkpoint code (train/checkpoint.py) ask of a trainer
backend: the student, the frozen teacher and the optimizer, however they are spread over the ranks. Two backends
satisfy it, `trainer.name=torch` (train/torch/: DDP or FSDP2) and `trainer.name=megatron` (train/megatron/: tensor
parallelism); tests/test_backend.py checks both against this protocol.

A step as the loop drives it: `refresh_sampler`, sample with `sampler`; then per micro-batch `teacher_hidden`, and
`student_loss` inside `accumulate` (the loop calls backward); then `optimizer_step`, and `non_finite_weight` after
an update.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainerBackend(Protocol):
    vocab_size: int  # the model's vocabulary (the loss's top-k may not exceed it)
    sampler: Any  # a Hugging Face causal LM holding the student's current weights, for on-policy sampling
    dp_rank: int  # this rank's index among the data-parallel ranks, which split the rows of a step
    dp_size: int  # how many data-parallel ranks (world / tensor-parallel size)

    def describe(self) -> str:
        """One line for the log: ranks, parallelism and precision."""

    def refresh_sampler(self) -> None:
        """Make `sampler` hold the student's current weights (a collective where the student is split)."""

    def dp_all_reduce(self, values: list[float]) -> list[float]:
        """The sums of `values` over the data-parallel ranks (every rank gets them)."""

    def forward_passes(self, n: int) -> int:
        """How many micro-batch passes this rank runs when it has n: more where every rank must run as many."""

    def normalizer(self, tokens: int) -> float:
        """The loss divisor that makes the update the token mean over the step's `tokens` on all ranks."""

    def teacher_hidden(self, sequences: list[list[int]], lens: list[int], pad_id: int) -> torch.Tensor:
        """The teacher's final hidden states at the positions predicting each response token: [Σ lens, H]."""

    def accumulate(self, last: bool) -> AbstractContextManager:
        """The context of one micro-batch's loss and backward; `last`: the step's final one (gradients meet)."""

    def student_loss(self, sequences: list[list[int]], lens: list[int], pad_id: int, teacher_hidden: torch.Tensor,
                     normalizer: float, loss_args: dict) -> tuple[torch.Tensor, ...]:
        """(loss, Σ kl, Σ student entropy, Σ teacher entropy) of one micro-batch; loss carries the gradient."""

    def optimizer_step(self, grad_clip: float, skip: bool = False) -> tuple[float, bool]:
        """Reduce, clip and step: (the gradient norm before clipping, whether the update was taken). No update where
        the norm is non-finite on any rank, or with `skip` (the same on every rank: the loop found the loss
        non-finite); the gradients are dropped either way."""

    def non_finite_weight(self) -> Optional[str]:
        """None when every weight the optimizer updates is finite on every rank; else one that is not, named (a
        collective: every rank calls it, after an update)."""

    def checkpoint_state(self) -> dict:
        """Model and optimizer state for DCP, under the backend's own keys (also the template a resume loads into)."""

    def load_checkpoint_state(self, state: dict) -> None:
        """Put a state of `checkpoint_state`'s shape, loaded by DCP, into the model and optimizer."""

    def checkpoint_meta(self) -> dict:
        """What meta.json records about the backend (trainer, parallel layout, precision, optimizer)."""

    def check_checkpoint(self, meta: dict, path: Path) -> None:
        """Raise, naming what differs, when this backend cannot resume the checkpoint at `path`."""

    def export(self, tokenizer, out_dir: Path) -> None:
        """The final weights as a Hugging Face folder in trainer.export_dtype (every rank calls it)."""

