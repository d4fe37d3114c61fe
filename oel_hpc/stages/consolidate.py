"""Consolidate: on-policy context distillation of the gathered experience into the weights (train/consolidate.py);
checkpoints every `save_freq` steps, resumed from the newest; ends with one Hugging Face export.

Runs on every rank of a data-parallel job (the process group comes from the environment: torchrun or Slurm tasks;
none for one process). Rank 0 writes the DONE marker once every rank has finished."""
from __future__ import annotations

from oel_hpc.rundir import mark_done
from oel_hpc.stages.common import StageContext


def run(ctx: StageContext, r: int, task=None) -> None:
    from oel_hpc.train import distributed
    from oel_hpc.train.consolidate import consolidate

    ctx.drop_engine()  # the trainer holds its own student and teacher
    with distributed.process_group(ctx.cfg.trainer) as d:
        consolidate(ctx, r, d)
        paths = ctx.paths
        if d.is_main:
            outputs = [p for p in paths.hf(r).iterdir() if p.is_file()] + [paths.metrics(r)]
            mark_done(paths, paths.done(r, "consolidate"), ctx.stage_hash(r, "consolidate"), outputs)
        d.barrier()
