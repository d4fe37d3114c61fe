"""Consolidation: on-policy context distillation, one optimizer step per deploy file. Read top to bottom.

For each saved deploy prompt x the student (trainable, no experience) samples a response y; the teacher (frozen
round-start weights) scores the same y behind x ⊕ e, with e one experience drawn per row (seeded by round and
step). The loss is the top-k reverse KL on y's tokens, a token mean over the whole step.

Data parallel (train/distributed.py): with several ranks each step's rows are split across them, balanced by prompt
tokens; each rank samples its own rows (a row's seed depends on the step and its index in the deploy file, and the
engine samples every row independently, so a row gets the same response on any number of ranks), and the loss is
normalised by the response tokens of all ranks, so an update equals the single-process one.

The backend (`trainer.name`) holds the models: `torch` (train/torch_trainer.py) replicates the student (DDP) or
shards it (FSDP2) by `trainer.parallel`; `megatron` (megatron/trainer.py) splits it by tensor parallelism, the
data-parallel ranks being world / trainer.tp. The loop below is the same for both.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from oel_hpc.engines.hf import HFEngine
from oel_hpc.errors import AllStepsSkipped, EmptyExperience
from oel_hpc.experience import load_experience_list
from oel_hpc.games import make_game
from oel_hpc.pipeline import model_path
from oel_hpc.rollout import derive_seed
from oel_hpc.rundir import read_jsonl
from oel_hpc.train import checkpoint, distributed, preemption
from oel_hpc.train.metrics import MetricsLog
from oel_hpc.train.precision import Precision
from oel_hpc.train.torch_trainer import TorchTrainer


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


def build_trainer(cfg, base, d: distributed.Dist):
    """The backend named by trainer.name: the student, teacher and optimizer, and how they are spread over ranks."""
    c = cfg.consolidate
    if d.is_main:
        for line in Precision.from_config(cfg.trainer).warnings():
            print(line, flush=True)
    if cfg.trainer.name == "megatron":
        from oel_hpc.megatron.trainer import MegatronTrainer

        return MegatronTrainer(cfg, base, d, lr=c.lr, weight_decay=c.weight_decay)
    return TorchTrainer(cfg, base, d, lr=c.lr, weight_decay=c.weight_decay)


def consolidate(ctx, r: int, d: distributed.Dist | None = None) -> None:
    """Every rank calls this (d: this process's place; None = one process, no process group). Raises
    preemption.Preempted after saving a checkpoint when a stop signal arrived."""
    cfg, paths, c = ctx.cfg, ctx.paths, ctx.cfg.consolidate
    d = d or distributed.Dist(distributed.DistEnv(), distributed.pick_device(cfg.trainer, 0), None)
    main = d.is_main
    stage_hash = ctx.stage_hash(r, "consolidate")

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
    trainer = build_trainer(cfg, base, d)
    if c.topk > trainer.vocab_size:
        raise ValueError(f"consolidate.topk: k={c.topk} is larger than the vocabulary ({trainer.vocab_size})")
    engine = HFEngine(trainer.sampler, tokenizer, max_batch=cfg.engine.max_batch, thinking=cfg.model.thinking)
    builder = ctx.prompt_builder(engine)
    actions = make_game(cfg.env.name, 0).action_words
    pad = engine.pad_token_id

    start = checkpoint.resume(paths.ckpt_dir(r), trainer, stage_hash, d)
    if start and main:
        print(f"r{r} consolidate: resumed from checkpoint step {start} on {trainer.describe()}")
    metrics = MetricsLog(paths.metrics(r), start, cfg.wandb, f"{cfg.run.name}-r{r}-consolidate-{stage_hash[:8]}",
                         {"round": r, "consolidate": dict(c), "model": base, "ranks": d.world_size}, enabled=main)
    loss_args = dict(k=c.topk, temperature=c.temperature, renormalize=c.renormalize, chunk_size=c.chunk_size,
                     impl=c.loss_impl)
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
                                                   trainer.dp_size)[trainer.dp_rank]

            # 1. the student samples on its own prompts (on-policy), from its current weights
            trainer.refresh_sampler()
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
            tokens, n_rows = (int(x) for x in trainer.dp_all_reduce([sum(s.response_len for s in samples),
                                                                     len(samples)]))
            if tokens == 0:
                raise ValueError(f"r{r} step {step}: the student sampled no response tokens")

            # 2. reverse KL to the teacher on the response tokens, gradients accumulated over micro-batches and
            # ranks into one token mean over the whole step
            batches = micro_batches(samples, c.micro_batch_tokens)
            passes = trainer.forward_passes(max(len(batches), 1))
            normalizer = trainer.normalizer(tokens)
            sums = [0.0, 0.0, 0.0]  # kl, student entropy, teacher entropy
            for p in range(passes):
                real = p < len(batches)
                # padding passes (this rank has fewer micro-batches, or none) count with weight 0
                batch = batches[p] if real else (batches[0] if batches else [Sample([pad] * 2, [pad] * 2, 1)])
                lens = [s.response_len for s in batch]
                h_teacher = trainer.teacher_hidden([s.teacher_ids for s in batch], lens, pad)
                with trainer.accumulate(last=p == passes - 1):
                    loss, kl, ent_s, ent_t = trainer.student_loss([s.student_ids for s in batch], lens, pad,
                                                                  h_teacher, normalizer, loss_args)
                    (loss if real else loss * 0.0).backward()
                if real:
                    sums = [a + b.item() for a, b in zip(sums, (kl, ent_s, ent_t))]
            # a non-finite gradient norm skips the update (weights and optimizer state unchanged, on every rank);
            # the step still counts: metrics, checkpoint and the loop go on
            grad_norm, stepped = trainer.optimizer_step(c.grad_clip)
            if not stepped and main:
                print(f"r{r} step {step}: gradient norm is {grad_norm}, update skipped", flush=True)

            kl, ent_s, ent_t = trainer.dp_all_reduce(sums)
            metrics.log({"step": step, "kl": kl / tokens, "student_entropy": ent_s / tokens,
                         "teacher_entropy": ent_t / tokens, "grad_norm": grad_norm, "skipped": not stepped,
                         "tokens": tokens, "rows": n_rows, "lr": c.lr, "seconds": time.time() - t0})
            saved = None
            if step % c.save_freq == 0 or step == c.steps:
                saved = checkpoint.save(paths.ckpt_dir(r), step, trainer, stage_hash, c.keep_checkpoints, d)
            # 3. a stop signal on any rank: all stop here, with a checkpoint (requeued under Slurm on SIGUSR2)
            stop = signals.agreed(d)
            if stop and step < c.steps:
                if saved is None:
                    saved = checkpoint.save(paths.ckpt_dir(r), step, trainer, stage_hash, c.keep_checkpoints, d)
                metrics.close()
                raise preemption.stop(stop, step, paths.display(saved), d, requeue=cfg.cluster.requeue)
    metrics.close()
    skipped = d.broadcast(sum(bool(row.get("skipped")) for row in metrics.rows))  # rank 0 holds the rows
    if skipped == c.steps:
        raise AllStepsSkipped(
            f"r{r} consolidate: all {c.steps} steps had a non-finite gradient norm and were skipped (see "
            f"{paths.display(paths.metrics(r))}): the weights are the round's starting weights, nothing was "
            "learned; nothing is exported. Look for NaN/inf in the loss inputs (consolidate.temperature, "
            "trainer.dtype=float16 overflow) and rerun with run.overwrite=true")
    trainer.export(tokenizer, paths.hf(r))
    d.barrier()
