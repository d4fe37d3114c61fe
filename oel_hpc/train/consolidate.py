"""Consolidation: on-policy context distillation, one optimizer step per deploy file. Read top to bottom.

For each saved deploy prompt x the student (trainable, no experience) samples a response y; the teacher (frozen
round-start weights) scores the same y behind x ⊕ e, with e one experience drawn per row (seeded by round and
step). The loss is the top-k reverse KL on y's tokens, a token mean over the whole step.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from oel_hpc.engines.hf import DTYPES, HFEngine, pick_device
from oel_hpc.experience import EmptyExperience, load_experience_list
from oel_hpc.games import make_game
from oel_hpc.pipeline import model_path
from oel_hpc.rollout import derive_seed
from oel_hpc.rundir import read_jsonl
from oel_hpc.train import checkpoint
from oel_hpc.train.loss import topk_reverse_kl
from oel_hpc.train.metrics import MetricsLog


@dataclass
class Sample:
    student_ids: list[int]  # x + y
    teacher_ids: list[int]  # (x ⊕ e) + y
    response_len: int


def micro_batches(samples: list[Sample], max_tokens: int) -> list[list[Sample]]:
    """Consecutive groups whose padded size (rows × longest row) stays within max_tokens (at least one row)."""
    batches, current, longest = [], [], 0
    for s in samples:
        length = max(len(s.student_ids), len(s.teacher_ids))
        if current and (len(current) + 1) * max(longest, length) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(s)
        longest = max(longest, length)
    return batches + [current] if current else batches


def response_hidden(model, sequences: list[list[int]], response_lens: list[int], pad_id: int) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token, rows concatenated: [Σ len, H].
    Only the decoder runs here; logits are left to the chunked loss."""
    device = model.device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
    hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=attention.to(device)).last_hidden_state
    # the token at position p is predicted from position p - 1
    return torch.cat([hidden[i, len(s) - n - 1:len(s) - 1] for i, (s, n) in enumerate(zip(sequences, response_lens))])


def consolidate(ctx, r: int) -> None:
    cfg, paths, c = ctx.cfg, ctx.paths, ctx.cfg.consolidate
    stage_hash = ctx.stage_hash(r, "consolidate")
    device, dtype = pick_device(cfg.trainer.device), DTYPES[cfg.trainer.dtype]

    _, texts = load_experience_list(paths.experience_list(r), paths.root)
    experiences = [t for t in texts if t.strip()]
    if not experiences and not c.allow_empty_experience:
        raise EmptyExperience(
            f"every experience in {paths.experience_list(r)} is empty: the teacher would see the student's own "
            "prompt and the loss would carry no knowledge; set consolidate.allow_empty_experience=true to train anyway")
    if not experiences:
        print("WARNING: every experience is empty; training anyway (consolidate.allow_empty_experience=true)")
        experiences = [""]
    elif len(experiences) < len(texts):
        print(f"WARNING: {len(texts) - len(experiences)} of {len(texts)} experiences are empty; rows draw from the rest")

    base = model_path(cfg, paths, r)
    tokenizer = AutoTokenizer.from_pretrained(base)
    student = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    engine = HFEngine(student, tokenizer, max_batch=cfg.engine.max_batch, thinking=cfg.model.thinking)
    builder = ctx.prompt_builder(engine)
    actions = make_game(cfg.env.name, 0).action_words
    if c.topk > student.config.vocab_size:
        raise ValueError(f"consolidate.topk: k={c.topk} is larger than the vocabulary ({student.config.vocab_size})")

    start = checkpoint.resume(paths.ckpt_dir(r), student, optimizer, stage_hash)
    if start:
        print(f"r{r} consolidate: resumed from checkpoint step {start}")
    metrics = MetricsLog(paths.metrics(r), start, cfg.wandb, f"{cfg.run.name}-r{r}-consolidate-{stage_hash[:8]}",
                         {"round": r, "consolidate": dict(c), "model": base})
    student.train()
    for step in tqdm(range(start + 1, c.steps + 1), desc=f"r{r} consolidate", unit="step", initial=start,
                     total=c.steps):
        t0 = time.time()
        rows = read_jsonl(paths.deploy_step(r, step))
        if not rows:
            raise ValueError(f"{paths.deploy_step(r, step)} has no rows to train on")
        draw = random.Random(derive_seed("experience", cfg.pipeline.seed, r, step))
        drawn = [draw.choice(experiences) for _ in rows]

        # 1. the student samples on its own prompts (on-policy), from its current weights
        prompts = [row["prompt_token_ids"] for row in rows]
        responses = engine.generate(prompts, c.sampling, seed=derive_seed("student", cfg.pipeline.seed, r, step))
        samples = []
        for row, e, y in zip(rows, drawn, responses):
            if not y.token_ids:
                continue
            teacher_prompt = engine.chat_ids(builder.game_turn(row["log_blocks"], actions, experience=e or None))
            samples.append(Sample(row["prompt_token_ids"] + y.token_ids, teacher_prompt + y.token_ids, len(y.token_ids)))
        tokens = sum(s.response_len for s in samples)
        if tokens == 0:
            raise ValueError(f"r{r} step {step}: the student sampled no response tokens")

        # 2. reverse KL to the teacher on the response tokens, gradients accumulated over micro-batches
        optimizer.zero_grad(set_to_none=True)
        kl = student_entropy = teacher_entropy = 0.0
        for batch in micro_batches(samples, c.micro_batch_tokens):
            lens = [s.response_len for s in batch]
            h_student = response_hidden(student, [s.student_ids for s in batch], lens, engine.pad_token_id)
            with torch.no_grad():
                h_teacher = response_hidden(teacher, [s.teacher_ids for s in batch], lens, engine.pad_token_id)
            out = topk_reverse_kl(h_student, student.lm_head.weight, h_teacher, teacher.lm_head.weight,
                                  k=c.topk, temperature=c.temperature, renormalize=c.renormalize,
                                  chunk_size=c.chunk_size, normalizer=tokens)
            out.loss.backward()
            kl += out.kl_sum.item()
            student_entropy += out.student_entropy.item() * out.tokens
            teacher_entropy += out.teacher_entropy.item() * out.tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf"))
        optimizer.step()

        metrics.log({"step": step, "kl": kl / tokens, "student_entropy": student_entropy / tokens,
                     "teacher_entropy": teacher_entropy / tokens, "grad_norm": grad_norm.item(), "tokens": tokens,
                     "rows": len(samples), "lr": c.lr, "seconds": time.time() - t0})
        if step % c.save_freq == 0 or step == c.steps:
            checkpoint.save(paths.ckpt_dir(r), step, student, optimizer, stage_hash, c.keep_checkpoints)
    metrics.close()
    checkpoint.export_hf(student, tokenizer, paths.hf(r))
