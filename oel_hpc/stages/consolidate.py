"""Consolidate: on-policy context distillation of the gathered experience into the weights (train/consolidate.py);
checkpoints every `save_freq` steps, resumed from the newest; ends with one Hugging Face export."""
from __future__ import annotations

from oel_hpc.rundir import mark_done
from oel_hpc.stages.common import StageContext


def run(ctx: StageContext, r: int, task=None) -> None:
    from oel_hpc.train.consolidate import consolidate

    ctx.drop_engine()  # the trainer holds its own student and teacher
    consolidate(ctx, r)
    paths = ctx.paths
    outputs = [p for p in paths.hf(r).iterdir() if p.is_file()] + [paths.metrics(r)]
    mark_done(paths, paths.done(r, "consolidate"), ctx.stage_hash(r, "consolidate"), outputs)
