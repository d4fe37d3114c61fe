"""Consolidation: on-policy context distillation, one optimizer step per deploy file. Read top to bottom.

For each saved deploy prompt x the student (trainable, no experience) samples a response y; the teacher (frozen
round-start weights) scores the same y behind x ⊕ e, with e one experience drawn per row (seeded by round and
step). The loss is the top-k reverse KL on y's tokens, a token mean over the whole step.

Data parallel (train/distributed.py): with several ranks each step's rows are split across them, balanced by prompt
tokens; each rank samples its own rows (a row's seed depends on the step and its index in the deploy file, and the
engine samples every row independently, so a row gets the same response on any number of ranks), and the loss is
normalised by the response tokens of all ranks, so an update equals the single-process one.

The backend (`trainer.name`) holds the models: `torch` (train/torch/trainer.py) replicates the student (DDP) or
shards it (FSDP2) by `trainer.parallel`; `megatron` (train/megatron/) splits it by tensor parallelism, the
data-parallel ranks being world / trainer.tp. The loop below is the same for both: it asks of a backend only
what train/backend.py lists.

Sampling engine (`engine.name`): `hf` generates with the trainer's sampler itself; `vllm` starts one vLLM engine per
rank (tensor parallel 1, colocated with the trainer on the rank's device) and pushes the sampler's weights into it
in place before every sample, then puts it to sleep while the trainer steps (GPU: its KV cache and weights are
released; nothing on CPU). Either way a row's response depends only on its prompt, its seed and the weights.

A round: `consolidate` prepares (`_prepare`: experience, models, a resumed checkpoint), then per step `_sample`
(on-policy responses, the teacher's prompts) → `_train_step` (loss, gradients, update) → `_log_step` →
`_save_or_stop` (checkpoint; a stop signal ends here), then exports the weights (`_finish`).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from oel_hpc.engines.hf import HFEngine
from oel_hpc.errors import AllStepsSkipped, EmptyExperience, NonFiniteWeights, SkippedInARow
from oel_hpc.experience import load_experience_list
from oel_hpc.games import make_game
from oel_hpc.log import get_logger, progress
from oel_hpc.pipeline import model_path
from oel_hpc.prompts import context_needed
from oel_hpc.rollout import derive_seed
from oel_hpc.rundir import read_jsonl
from oel_hpc.train import checkpoint, distributed, preemption
from oel_hpc.train.backend import TrainerBackend
from oel_hpc.train.metrics import MetricsLog
from oel_hpc.train.precision import NAMES, Precision
from oel_hpc.train.torch.trainer import TorchTrainer

log = get_logger(__name__)


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


def build_trainer(cfg, base, d: distributed.Dist) -> TrainerBackend:
    """The backend named by trainer.name: the student, teacher and optimizer, and how they are spread over ranks."""
    c = cfg.consolidate
    if d.is_main:
        for line in Precision.from_config(cfg.trainer).warnings():
            log.warning(line)
    if cfg.trainer.name == "megatron":
        from oel_hpc.train.megatron.trainer import MegatronTrainer

        return MegatronTrainer(cfg, base, d, lr=c.lr, weight_decay=c.weight_decay)
    return TorchTrainer(cfg, base, d, lr=c.lr, weight_decay=c.weight_decay)


@dataclass
class Round:
    """What every step of one round's consolidation uses."""
    ctx: object
    r: int
    d: distributed.Dist
    stage_hash: str
    experiences: list[str]  # non-empty texts (or [""] when empty ones are allowed)
    tokenizer: object
    trainer: TrainerBackend
    engine: object  # generates the student's responses (HFEngine or VLLMEngine); also the prompt side (chat_ids)
    builder: object  # the prompt builder: the teacher's prompt x ⊕ e
    actions: list[str]
    start: int  # the step of the checkpoint resumed from (0: none)
    metrics: MetricsLog
    skipped_in_a_row: list[int]  # the latest steps, consecutive, whose update was skipped

    @property
    def cfg(self):
        return self.ctx.cfg

    @property
    def paths(self):
        return self.ctx.paths

    def loss_args(self) -> dict:
        c = self.cfg.consolidate
        return dict(k=c.topk, temperature=c.temperature, renormalize=c.renormalize, chunk_size=c.chunk_size,
                    impl=c.loss_impl)


def consolidate(ctx, r: int, d: distributed.Dist | None = None) -> list[Path]:
    """Every rank calls this (d: this process's place; None = one process, no process group). Returns the round's
    outputs for its DONE marker (on rank 0; [] elsewhere). Raises preemption.Preempted after saving a checkpoint
    when a stop signal arrived."""
    c = ctx.cfg.consolidate
    d = d or distributed.Dist(distributed.DistEnv(), distributed.pick_device(ctx.cfg.trainer, 0), None)
    run = _prepare(ctx, r, d)
    finished = False
    try:
        with preemption.StopSignals() as signals:
            for step in progress(range(run.start + 1, c.steps + 1), desc=f"r{r} consolidate", unit="step",
                                 initial=run.start, total=c.steps, disable=not d.is_main):
                t0 = time.time()
                samples, tokens, n_rows = _sample(run, step)
                sums, grad_norm, skip_reason = _train_step(run, step, samples, tokens)
                _log_step(run, step, sums, grad_norm, skip_reason, tokens, n_rows, time.time() - t0)
                _stop_when_skipping(run, step, skip_reason)
                _save_or_stop(run, step, signals)
        outputs = _finish(run)
        d.barrier()  # the export (rank 0) is complete before any rank ends the stage
        finished = True
    finally:
        run.metrics.close(failed=not finished)  # its wandb run ends with the stage, whatever happened
        # vLLM's shutdown also ends the torch.distributed group its engine joined (the trainer's, with several
        # ranks): only after the stage's last collective. A process of one closes it whatever happened, so a next
        # stage in the same process starts its engine clean; a rank that failed leaves it to the process's exit.
        if finished or not d.enabled:
            close = getattr(run.engine, "close", None)
            if close is not None:
                close()
    return outputs


def _prepare(ctx, r: int, d: distributed.Dist) -> Round:
    """The round's experience, the backend's models (from the round's base model), the sampling engine, and the
    newest checkpoint loaded when there is one."""
    cfg, paths, c = ctx.cfg, ctx.paths, ctx.cfg.consolidate
    stage_hash = ctx.stage_hash(r, "consolidate")
    _, texts = load_experience_list(paths.experience_list(r), paths.root)
    experiences = [t for t in texts if t.strip()]
    if not experiences and not c.allow_empty_experience:
        raise EmptyExperience(
            f"every experience in {paths.experience_list(r)} is empty: the teacher would see the student's own "
            "prompt and the loss would carry no knowledge; set consolidate.allow_empty_experience=true to train anyway")
    if not experiences:
        if d.is_main:
            log.warning("every experience is empty; training anyway (consolidate.allow_empty_experience=true)")
        experiences = [""]
    elif len(experiences) < len(texts) and d.is_main:
        log.warning(f"{len(texts) - len(experiences)} of {len(texts)} experiences are empty; rows draw from the rest")

    base = model_path(cfg, paths, r)
    tokenizer = AutoTokenizer.from_pretrained(base)
    trainer = build_trainer(cfg, base, d)
    if c.topk > trainer.vocab_size:
        raise ValueError(f"consolidate.topk: k={c.topk} is larger than the vocabulary ({trainer.vocab_size})")
    engine = build_sampling_engine(cfg, base, trainer, tokenizer)
    builder = ctx.prompt_builder(engine)
    actions = make_game(cfg.env.name, 0).action_words

    start = checkpoint.resume(paths.ckpt_dir(r), trainer, stage_hash, d)
    if start and d.is_main:
        log.info(f"r{r} consolidate: resumed from checkpoint step {start} on {trainer.describe()}")
    record = ctx.record(r, "consolidate", None, total=c.steps, keep_upto=start, enabled=d.is_main)
    metrics = MetricsLog(paths.metrics(r), start, record, enabled=d.is_main)
    # a resumed run goes on counting the skipped steps its checkpoint ended with (rank 0 holds the rows)
    return Round(ctx, r, d, stage_hash, experiences, tokenizer, trainer, engine, builder, actions, start, metrics,
                 d.broadcast(skipped_at_end(metrics.rows)))


def build_sampling_engine(cfg, base, trainer: TrainerBackend, tokenizer):
    """The engine the student samples with: HF generate on the trainer's sampler, or (engine=vllm) a vLLM engine of
    this rank on the round's base model, colocated with the trainer (its own share of the GPU, sleep mode), in the
    trainer's compute dtype. Tensor parallel 1: every data-parallel rank samples its own rows, as with HF; the
    weights it samples with are pushed in before every sample (_sample)."""
    if cfg.engine.name == "vllm":
        from oel_hpc.engines.vllm_engine import VLLMEngine

        return VLLMEngine.load(str(base), dtype=NAMES[Precision.from_config(cfg.trainer).compute],
                               max_batch=cfg.engine.max_batch, thinking=cfg.model.thinking, options=cfg.engine.vllm,
                               tensor_parallel=1, colocated=True, context=context_needed(cfg, "consolidate"))
    return HFEngine(trainer.sampler, tokenizer, max_batch=cfg.engine.max_batch, thinking=cfg.model.thinking)


def skipped_at_end(rows: list[dict]) -> list[int]:
    """The steps of the metrics rows' final run of skipped updates ([] when the last update was taken)."""
    steps: list[int] = []
    for row in rows:
        steps = [*steps, row["step"]] if row.get("skipped") else []
    return steps


def _sample(run: Round, step: int) -> tuple[list[Sample], int, int]:
    """This rank's share of the step's deploy rows, each with the student's response from its current weights
    (on-policy) behind the student's prompt x and the teacher's x ⊕ e. Returns (samples, response tokens and rows
    on all ranks)."""
    cfg, paths, r, trainer, engine = run.cfg, run.paths, run.r, run.trainer, run.engine
    rows = read_jsonl(paths.deploy_step(r, step))
    if not rows:
        raise ValueError(f"{paths.deploy_step(r, step)} has no rows to train on")
    draw = random.Random(derive_seed("experience", cfg.pipeline.seed, r, step))
    drawn = [draw.choice(run.experiences) for _ in rows]  # every rank draws for every row: the same draws
    mine = distributed.partition_by_tokens([len(row["prompt_token_ids"]) for row in rows],
                                           trainer.dp_size)[trainer.dp_rank]

    trainer.refresh_sampler()  # a collective where the student is split: every rank, even one with no rows
    pushed = cfg.engine.name == "vllm"
    if pushed:  # the student's current weights into the engine, in place; a resumed run's first step too
        engine.load_weights(trainer.sampler.named_parameters())
    responses = engine.generate(
        [rows[i]["prompt_token_ids"] for i in mine], cfg.consolidate.sampling, seed=0,
        row_seeds=[derive_seed("student", cfg.pipeline.seed, r, step, i) for i in mine]) if mine else []
    if pushed:
        engine.sleep()  # on GPU its memory goes back to the trainer until the next sample (a no-op on CPU)
    samples = []
    for i, y in zip(mine, responses):
        if not y.token_ids:
            continue
        teacher_prompt = engine.chat_ids(run.builder.game_turn(rows[i]["log_blocks"], run.actions,
                                                               experience=drawn[i] or None))
        samples.append(Sample(rows[i]["prompt_token_ids"] + y.token_ids, teacher_prompt + y.token_ids,
                              len(y.token_ids)))
    tokens, n_rows = (int(x) for x in trainer.dp_all_reduce([sum(s.response_len for s in samples), len(samples)]))
    if tokens == 0:
        raise ValueError(f"r{r} step {step}: the student sampled no response tokens")
    return samples, tokens, n_rows


def _train_step(run: Round, step: int, samples: list[Sample], tokens: int) -> tuple[list[float], float, str | None]:
    """Reverse KL to the teacher on the response tokens, gradients accumulated over micro-batches and ranks into one
    token mean over the whole step, then the update. Returns (this rank's [Σ kl, Σ student entropy, Σ teacher
    entropy], the gradient norm, why the update was skipped: None when it was taken)."""
    trainer, pad, loss_args = run.trainer, run.engine.pad_token_id, run.loss_args()
    batches = micro_batches(samples, run.cfg.consolidate.micro_batch_tokens)
    passes = trainer.forward_passes(max(len(batches), 1))
    normalizer = trainer.normalizer(tokens)
    sums = [0.0, 0.0, 0.0]
    for p in range(passes):
        real = p < len(batches)
        # padding passes (this rank has fewer micro-batches, or none) count with weight 0
        batch = batches[p] if real else (batches[0] if batches else [Sample([pad] * 2, [pad] * 2, 1)])
        lens = [s.response_len for s in batch]
        h_teacher = trainer.teacher_hidden([s.teacher_ids for s in batch], lens, pad)
        with trainer.accumulate(last=p == passes - 1):
            loss, kl, ent_s, ent_t = trainer.student_loss([s.student_ids for s in batch], lens, pad, h_teacher,
                                                          normalizer, loss_args)
            (loss if real else loss * 0.0).backward()
        if real:
            sums = [a + b.item() for a, b in zip(sums, (kl, ent_s, ent_t))]
    # a non-finite loss (on any rank) or gradient norm skips the update (weights and optimizer state unchanged, on
    # every rank); the step still counts: metrics, checkpoint and the loop go on (_stop_when_skipping ends it when
    # it keeps happening). The loss is looked at on its own: a NaN can sit where no gradient flows (a masked
    # position, the teacher's side) and still mean the step's numbers are garbage.
    loss_finite = distributed.agree_finite(sums, run.d)
    grad_norm, stepped = trainer.optimizer_step(run.cfg.consolidate.grad_clip, skip=not loss_finite)
    if not stepped:
        reason = "non-finite loss" if not loss_finite else "non-finite gradient norm"
        if run.d.is_main:
            what = "the loss is not finite" if not loss_finite else f"gradient norm is {grad_norm}"
            log.warning(f"r{run.r} step {step}: {what}, update skipped")
        return sums, grad_norm, reason
    # An update from a finite gradient can still leave non-finite weights (a learning rate so high that lr × update
    # overflows, 16-bit master weights overflowing). Restoring the weights would need a copy of the model and its
    # optimizer state every step, and the next update would overflow the same way: stop instead, before any
    # checkpoint or export holds them. One reduction per weight and one sync (train/numerics.py).
    bad = trainer.non_finite_weight()
    if bad is not None:
        run.metrics.close(failed=True)
        c = run.cfg.consolidate
        raise NonFiniteWeights(
            f"r{run.r} consolidate: the update of step {step} made the weights non-finite ({bad}) from a finite "
            f"gradient norm ({grad_norm:.4g}): the learning rate is likely too high (consolidate.lr={c.lr:g}, "
            f"consolidate.grad_clip={c.grad_clip:g}); nothing of this step is saved or exported. Lower it and rerun "
            "with run.overwrite=true")
    return sums, grad_norm, None


def _log_step(run: Round, step: int, sums: list[float], grad_norm: float, skip_reason: str | None, tokens: int,
              n_rows: int, seconds: float) -> None:
    kl, ent_s, ent_t = run.trainer.dp_all_reduce(sums)
    run.metrics.log({"step": step, "kl": kl / tokens, "student_entropy": ent_s / tokens,
                     "teacher_entropy": ent_t / tokens, "grad_norm": grad_norm, "skipped": skip_reason is not None,
                     "skip_reason": skip_reason, "tokens": tokens, "rows": n_rows, "lr": run.cfg.consolidate.lr,
                     "seconds": seconds})


def _stop_when_skipping(run: Round, step: int, skip_reason: str | None) -> None:
    """consolidate.max_skipped_in_a_row skipped updates in a row (0: never) stop the stage before this step's
    checkpoint: every rank took the same decisions, so all stop here together."""
    run.skipped_in_a_row = [*run.skipped_in_a_row, step] if skip_reason else []
    limit, skipped = run.cfg.consolidate.max_skipped_in_a_row, run.skipped_in_a_row
    if not limit or len(skipped) < limit:
        return
    run.metrics.close(failed=True)
    where = run.paths.display(run.paths.metrics(run.r))
    steps = f"update of step {step} was" if len(skipped) == 1 else f"updates of steps {skipped[0]}-{step} were"
    raise SkippedInARow(
        f"r{run.r} consolidate: the {steps} skipped ({skip_reason}; {len(skipped)} in a row, "
        f"consolidate.max_skipped_in_a_row={limit}; skip_reason in {where}); nothing is exported. Likely causes: "
        "NaN/inf in the loss inputs (consolidate.temperature, a damaged deploy file), trainer.dtype=float16 overflow, "
        "a learning rate too high (consolidate.lr); fix it and rerun with run.overwrite=true")


def _save_or_stop(run: Round, step: int, signals: preemption.StopSignals) -> None:
    """A checkpoint every save_freq steps and at the last; a stop signal on any rank: all stop here, with a
    checkpoint (requeued under Slurm on SIGUSR2)."""
    c, ckpt_dir = run.cfg.consolidate, run.paths.ckpt_dir(run.r)
    saved = None
    if step % c.save_freq == 0 or step == c.steps:
        saved = checkpoint.save(ckpt_dir, step, run.trainer, run.stage_hash, c.keep_checkpoints, run.d)
    stop = signals.agreed(run.d)
    if stop and step < c.steps:
        if saved is None:
            saved = checkpoint.save(ckpt_dir, step, run.trainer, run.stage_hash, c.keep_checkpoints, run.d)
        run.metrics.close(failed=True)
        raise preemption.stop(stop, step, run.paths.display(saved), run.d, requeue=run.cfg.cluster.requeue)


def _finish(run: Round) -> list[Path]:
    """The trained weights as a Hugging Face folder, unless no step updated them; the round's outputs."""
    r, paths, steps = run.r, run.paths, run.cfg.consolidate.steps
    run.metrics.close()
    skipped = run.d.broadcast(sum(bool(row.get("skipped")) for row in run.metrics.rows))  # rank 0 holds the rows
    if skipped == steps:
        raise AllStepsSkipped(
            f"r{r} consolidate: all {steps} steps had a non-finite loss or gradient norm and were skipped (see "
            f"{paths.display(paths.metrics(r))}): the weights are the round's starting weights, nothing was "
            "learned; nothing is exported. Look for NaN/inf in the loss inputs (consolidate.temperature, "
            "trainer.dtype=float16 overflow) and rerun with run.overwrite=true")
    refused = None
    try:  # rank 0 writes; a refusal (a weight non-finite in the export dtype) must stop every rank, not hang them
        run.trainer.export(run.tokenizer, paths.hf(r))
    except NonFiniteWeights as e:
        refused = str(e)
    refused = run.d.broadcast(refused)  # also the barrier: the folder is complete when the others go on
    if refused is not None:
        raise NonFiniteWeights(refused)
    if not run.d.is_main:
        return []
    return [p for p in paths.hf(r).iterdir() if p.is_file()] + [paths.metrics(r)]
