"""What every engine returns for one prompt, and the prompt side every engine shares (chat template, token counts,
stop tokens): both engines see the same prompt token ids for the same messages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens up to and including the first EOS (no padding)
    text: str  # decoded without special tokens; a thinking model's <think>...</think> stays in
    finished: bool  # ended with EOS rather than at max_new_tokens


def stop_token_ids(generation_eos, tokenizer) -> list[int]:
    """A model's EOS ids: its generation config's (an int or a list), plus the tokenizer's own."""
    eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if not eos:
        raise ValueError("the model names no EOS token (generation_config.json or the tokenizer)")
    return eos


class ChatPrompts:
    """Prompt-side methods over `self.tokenizer` and `self.thinking`."""

    tokenizer = None
    thinking = False

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                                 enable_thinking=self.thinking, return_dict=False)
        return list(ids)

    def count_chat_tokens(self, messages: Sequence[dict]) -> int:
        return len(self.chat_ids(messages))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def completion(self, ids: list[int]) -> Completion:
        """The completion of generated `ids`, cut after the first EOS."""
        end = next((i for i, t in enumerate(ids) if t in self.eos_token_ids), None)
        ids = list(ids) if end is None else list(ids[:end + 1])
        return Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True), end is not None)
