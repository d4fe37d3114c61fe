"""Hugging Face transformers `generate`: one batched call per game turn across all live games, left padded."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from oel_hpc.engines import Completion

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class HFEngine:
    def __init__(self, model, tokenizer, *, max_batch: int = 256, thinking: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.thinking = max_batch, thinking
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", device: str = "auto", max_batch: int = 256,
             thinking: bool = False) -> "HFEngine":
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(pick_device(device)).eval()
        return cls(model, tokenizer, max_batch=max_batch, thinking=thinking)

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                                 enable_thinking=self.thinking, return_dict=False)
        return list(ids)

    def count_chat_tokens(self, messages: Sequence[dict]) -> int:
        return len(self.chat_ids(messages))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling, seed: int) -> list[Completion]:
        """Sample one completion per prompt. The global torch RNG is left as it was (training resumes exactly)."""
        config = GenerationConfig(
            do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            top_k=sampling.top_k if sampling.temperature > 0 else None,
            max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids)
        out: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.max_batch):
                out.extend(self._generate_batch(prompts[start:start + self.max_batch], config))
        self.model.train(was_training)
        return out

    def _generate_batch(self, prompts: Sequence[Sequence[int]], config: GenerationConfig) -> list[Completion]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention[i, width - len(p):] = 1
        device = self.model.device
        sequences = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                        generation_config=config)
        completions = []
        for row in sequences[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_token_ids), None)
            ids = row if end is None else row[:end + 1]
            completions.append(Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True), end is not None))
        return completions
