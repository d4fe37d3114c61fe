"""Hugging Face transformers `generate`: one batched call per game turn across all live games, left padded.

Sampling is per-row seeded (Gumbel-max): a row's completion depends only on its prompt, its seed and the weights,
never on which other rows share its batch. That is what lets data-parallel consolidation split a step's rows across
ranks (and micro-batches) and still sample exactly what one process would.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                                     TopKLogitsWarper, TopPLogitsWarper)

from oel_hpc.engines.base import ChatPrompts, Completion, stop_token_ids
from oel_hpc.rollout import derive_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def row_seeds_for(seed: int, n: int) -> list[int]:
    """Default row seeds of one generate call: row i of a call with `seed` gets derive_seed("row", seed, i)."""
    return [derive_seed("row", seed, i) for i in range(n)]


class RowSeededSampler(LogitsProcessor):
    """Sampling as greedy decoding over perturbed scores: temperature, then top-k and top-p filtering (the order
    transformers uses), then Gumbel noise added and the argmax taken by greedy search. argmax(z + G) with
    G ~ Gumbel(0, 1) i.i.d. is an exact sample of softmax(z). Row i draws its noise from its own generator, seeded
    with `row_seeds[i]`, one [V] draw per decoding step: its sample depends on its seed and its own logits only."""

    def __init__(self, row_seeds: Sequence[int], temperature: float, top_k: int, top_p: float, device):
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in row_seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        if scores.size(0) != len(self.generators):
            raise ValueError(f"{scores.size(0)} rows of scores for {len(self.generators)} row seeds")
        u = torch.stack([torch.rand(scores.size(-1), generator=g, device=scores.device) for g in self.generators])
        return scores - torch.log(-torch.log(u.clamp_(min=torch.finfo(u.dtype).tiny)))


class HFEngine(ChatPrompts):
    def __init__(self, model, tokenizer, *, max_batch: int = 256, thinking: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.thinking = max_batch, thinking
        self.eos_token_ids = stop_token_ids(model.generation_config.eos_token_id, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", device: str = "auto", max_batch: int = 256,
             thinking: bool = False) -> "HFEngine":
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(pick_device(device)).eval()
        return cls(model, tokenizer, max_batch=max_batch, thinking=thinking)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling, seed: int,
                 row_seeds: Optional[Sequence[int]] = None) -> list[Completion]:
        """Sample one completion per prompt; temperature 0 is greedy. Row i is sampled with `row_seeds[i]`
        (default: derived from `seed` and i), independently of the other rows. The global RNG is not touched."""
        if row_seeds is None:
            row_seeds = row_seeds_for(seed, len(prompts))
        if len(row_seeds) != len(prompts):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
        # greedy search always; sampling happens in RowSeededSampler. The sampling knobs are set to transformers'
        # neutral defaults so the model's own generation_config (do_sample, temperature, ...) fills in nothing.
        config = GenerationConfig(do_sample=False, num_beams=1, temperature=1.0, top_k=50, top_p=1.0,
                                  max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_token_id,
                                  eos_token_id=self.eos_token_ids)
        out: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), self.max_batch):
                end = start + self.max_batch
                out.extend(self._generate_batch(prompts[start:end], config, sampling, row_seeds[start:end]))
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, prompts: Sequence[Sequence[int]], config: GenerationConfig, sampling,
                        row_seeds: Sequence[int]) -> list[Completion]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention[i, width - len(p):] = 1
        device = self.model.device
        processors = LogitsProcessorList()
        if sampling.temperature > 0:
            processors.append(RowSeededSampler(row_seeds, sampling.temperature, sampling.top_k, sampling.top_p,
                                               device))
        sequences = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                        generation_config=config, logits_processor=processors)
        return [self.completion(row) for row in sequences[:, width:].tolist()]
