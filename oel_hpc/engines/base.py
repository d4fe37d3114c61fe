"""What every engine returns for one prompt."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens up to and including the first EOS (no padding)
    text: str  # decoded without special tokens; a thinking model's <think>...</think> stays in
    finished: bool  # ended with EOS rather than at max_new_tokens
