"""Consolidation: on-policy context distillation, one optimizer step per deploy file. Read top to bottom.

For each saved deploy prompt x the student (trainable, no experience) samples a response y; the teacher (frozen
round-start weights) scores the same y behind x ⊕ e, with e one experience drawn per row (seeded by round and
step). The loss is the top-k reverse KL on y's tokens, a token mean over the whole step.

Data parallel (train/distributed.py): with several ranks each step's rows are split across them, balanced by prompt
tokens; each rank samples its own rows (a row's seed depends on the step and its index in the deploy file, and the
engine samples every row independently, so a row gets the same response on any number of ranks), and the loss is
normalised by the response tokens of all ranks, so an update equals the single-process one. The student is
replicated (DDP) or sharded (FSDP2) by `trainer.parallel`; the frozen teacher is a plain copy on every rank.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from oel_hpc.engines.hf import DTYPES, HFEngine
from oel_hpc.experience import EmptyExperience, load_experience_list
from oel_hpc.games import make_game
from oel_hpc.pipeline import model_path
from oel_hpc.rollout import derive_seed
from oel_hpc.rundir import read_jsonl
from oel_hpc.train import checkpoint, distributed, preemption
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
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state
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
                temperature: float, renormalize: bool, chunk_size: int):
        h = decoder_hidden(self.student, ids, attention, positions)
        out = topk_reverse_kl(h, self.student.lm_head.weight, teacher_hidden, teacher_head, k=k,
                              temperature=temperature, renormalize=renormalize, chunk_size=chunk_size,
                              normalizer=normalizer)
        return out.loss, out.kl_sum, out.student_entropy * out.tokens, out.teacher_entropy * out.tokens


def consolidate(ctx, r: int, d: distributed.Dist | None = None) -> None:
    """Every rank calls this (d: this process's place; None = one process, no process group). Raises
    preemption.Preempted after saving a checkpoint when a stop signal arrived."""
    cfg, paths, c = ctx.cfg, ctx.paths, ctx.cfg.consolidate
    d = d or distributed.Dist(distributed.DistEnv(), distributed.pick_device(cfg.trainer, 0), None)
    main = d.is_main
    stage_hash = ctx.stage_hash(r, "consolidate")
    device, dtype = d.device, DTYPES[cfg.trainer.dtype]
    fsdp = d.enabled and cfg.trainer.parallel == "fsdp"

    _, texts = load_experience_list(paths.experience_list(r), paths.root)
    experiences = [t for t in texts if t.strip()]
    if not experiences and not c.allow_empty_experience:
        raise EmptyExperience(
            f"every experience in {paths.experience_list(r)} is empty: the teacher would see the student's own "
            "prompt and the loss would carry no knowledge; set consolidate.allow_empty_experience=true to train anyway")
    if not experiences:
        if main:
            print("WARNING: every experience is empty; training anyway (consolidate.allow_empty_experience=true)")
        experiences = [""]
    elif len(experiences) < len(texts) and main:
        print(f"WARNING: {len(texts) - len(experiences)} of {len(texts)} experiences are empty; rows draw from the rest")

    base = model_path(cfg, paths, r)
    tokenizer = AutoTokenizer.from_pretrained(base)
    student = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    if c.topk > student.config.vocab_size:
        raise ValueError(f"consolidate.topk: k={c.topk} is larger than the vocabulary ({student.config.vocab_size})")
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    # FSDP2: the student's weights live in shards; sampling runs on a full copy refreshed before every step
    # (generation lengths differ across ranks, so it must not need collectives)
    sampler = copy.deepcopy(teacher) if fsdp else student
    model = distributed.wrap(Distiller(student), distributed.decoder_layers(student), cfg.trainer.parallel, d)
    optimizer = torch.optim.AdamW(student.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    engine = HFEngine(sampler, tokenizer, max_batch=cfg.engine.max_batch, thinking=cfg.model.thinking)
    builder = ctx.prompt_builder(engine)
    actions = make_game(cfg.env.name, 0).action_words

    start = checkpoint.resume(paths.ckpt_dir(r), student, optimizer, stage_hash, d)
    if start and main:
        print(f"r{r} consolidate: resumed from checkpoint step {start}"
              + (f" on {d.world_size} ranks ({cfg.trainer.parallel})" if d.enabled else ""))
    metrics = MetricsLog(paths.metrics(r), start, cfg.wandb, f"{cfg.run.name}-r{r}-consolidate-{stage_hash[:8]}",
                         {"round": r, "consolidate": dict(c), "model": base, "ranks": d.world_size}, enabled=main)
    loss_args = dict(k=c.topk, temperature=c.temperature, renormalize=c.renormalize, chunk_size=c.chunk_size)
    student.train()
    with preemption.StopSignals() as signals:
        for step in tqdm(range(start + 1, c.steps + 1), desc=f"r{r} consolidate", unit="step", initial=start,
                         total=c.steps, disable=not main):
            t0 = time.time()
            rows = read_jsonl(paths.deploy_step(r, step))
            if not rows:
                raise ValueError(f"{paths.deploy_step(r, step)} has no rows to train on")
            draw = random.Random(derive_seed("experience", cfg.pipeline.seed, r, step))
            drawn = [draw.choice(experiences) for _ in rows]  # every rank draws for every row: the same draws
            mine = distributed.partition_by_tokens([len(row["prompt_token_ids"]) for row in rows],
                                                   d.world_size)[d.rank]

            # 1. the student samples on its own prompts (on-policy), from its current weights
            if fsdp:
                distributed.copy_full_weights(student, sampler)
            responses = engine.generate(
                [rows[i]["prompt_token_ids"] for i in mine], c.sampling, seed=0,
                row_seeds=[derive_seed("student", cfg.pipeline.seed, r, step, i) for i in mine]) if mine else []
            samples = []
            for i, y in zip(mine, responses):
                if not y.token_ids:
                    continue
                teacher_prompt = engine.chat_ids(builder.game_turn(rows[i]["log_blocks"], actions,
                                                                   experience=drawn[i] or None))
                samples.append(Sample(rows[i]["prompt_token_ids"] + y.token_ids, teacher_prompt + y.token_ids,
                                      len(y.token_ids)))
            tokens, n_rows = (int(x) for x in d.all_reduce([sum(s.response_len for s in samples), len(samples)]))
            if tokens == 0:
                raise ValueError(f"r{r} step {step}: the student sampled no response tokens")

            # 2. reverse KL to the teacher on the response tokens, gradients accumulated over micro-batches. Ranks
            # average gradients, hence the normaliser tokens / world: the sum over all ranks' tokens / tokens.
            batches = micro_batches(samples, c.micro_batch_tokens)
            passes = max(len(batches), 1)
            if fsdp:  # every rank must run as many forward/backward passes (each one gathers and reduces shards)
                passes = int(d.all_reduce([passes], op="max")[0])
            normalizer = tokens / d.world_size if d.enabled else tokens
            optimizer.zero_grad(set_to_none=True)
            sums = [0.0, 0.0, 0.0]  # kl, student entropy, teacher entropy
            for p in range(passes):
                real = p < len(batches)
                # padding passes (this rank has fewer micro-batches, or none) count with weight 0
                batch = batches[p] if real else (batches[0] if batches else
                                                 [Sample([engine.pad_token_id] * 2, [engine.pad_token_id] * 2, 1)])
                lens = [s.response_len for s in batch]
                with torch.no_grad():
                    h_teacher = response_hidden(teacher, [s.teacher_ids for s in batch], lens, engine.pad_token_id)
                ids, attention, positions = pad_batch([s.student_ids for s in batch], lens, engine.pad_token_id,
                                                      device)
                with distributed.no_sync(model, sync=p == passes - 1):
                    loss, kl, ent_s, ent_t = model(ids, attention, positions, h_teacher, teacher.lm_head.weight,
                                                   normalizer, **loss_args)
                    (loss if real else loss * 0.0).backward()
                if real:
                    sums = [a + b.item() for a, b in zip(sums, (kl, ent_s, ent_t))]
            grad_norm = distributed.clip_grad_norm(student.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf"))
            optimizer.step()

            kl, ent_s, ent_t = d.all_reduce(sums)
            metrics.log({"step": step, "kl": kl / tokens, "student_entropy": ent_s / tokens,
                         "teacher_entropy": ent_t / tokens, "grad_norm": grad_norm.item(), "tokens": tokens,
                         "rows": n_rows, "lr": c.lr, "seconds": time.time() - t0})
            saved = None
            if step % c.save_freq == 0 or step == c.steps:
                saved = checkpoint.save(paths.ckpt_dir(r), step, student, optimizer, stage_hash, c.keep_checkpoints,
                                        d, cfg.trainer.parallel)
            # 3. a stop signal on any rank: all stop here, with a checkpoint (requeued under Slurm on SIGUSR2)
            stop = signals.agreed(d)
            if stop and step < c.steps:
                if saved is None:
                    saved = checkpoint.save(paths.ckpt_dir(r), step, student, optimizer, stage_hash,
                                            c.keep_checkpoints, d, cfg.trainer.parallel)
                metrics.close()
                raise preemption.stop(stop, step, paths.display(saved), d, requeue=cfg.cluster.requeue)
    metrics.close()
    full = checkpoint.full_model_state(student, d) if fsdp else None  # a collective: every rank
    if main:
        checkpoint.export_hf(student, tokenizer, paths.hf(r), state_dict=full)
    d.barrier()
