"""Consolidate: on-policy context distillation of the gathered experience into the weights (train/consolidate.py);
checkpoints every `save_freq` steps, resumed from the newest; ends with one Hugging Face export.

Runs on every rank of a data-parallel job (the process group comes from the environment: torchrun or Slurm tasks;
none for one process). Every rank returns once all have finished; the lifecycle writes DONE on rank 0 from rank
0's list of outputs."""
from __future__ import annotations

from pathlib import Path

from oel_hpc.stages.common import StageContext


def run(ctx: StageContext, r: int, task=None) -> list[Path]:
    from oel_hpc.train import distributed
    from oel_hpc.train.consolidate import consolidate

    ctx.drop_engine()  # the trainer holds its own student and teacher
    with distributed.process_group(ctx.cfg.trainer) as d:
        # rank 0's list; the others get [] (only rank 0 writes DONE). Every rank returns once the export (rank 0)
        # is complete: consolidate ends with a barrier (its last collective: a vLLM engine's shutdown may end the
        # process group)
        return consolidate(ctx, r, d)
