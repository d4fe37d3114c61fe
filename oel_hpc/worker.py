"""`python -m oel_hpc.worker <run-dir> <stage-id> [--task N]`: run one task of a run, as a batch job does.

Everything comes from the run directory (config.yaml, the DAG rebuilt from it, files on disk), never from the
submitting process: a requeued or resubmitted job finds the state it needs by itself. A task already DONE under
the same config is skipped, so a job may be run twice safely.

Consolidation may run as several processes, one per rank (`srun` with one task per rank, or `torchrun`); see
oel_hpc/train/distributed.py for the environment it reads. Exit status: 0 done (or already done), 2 bad input,
75 stopped early by SIGUSR2/SIGTERM with a checkpoint saved (under Slurm, after SIGUSR2, the job has been requeued
and resumes from that checkpoint by itself; otherwise run the same command again), anything else a failure.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional


def run(run_dir: Path, stage_id: str, task: Optional[int]) -> int:
    from oel_hpc.config import load_run_config
    from oel_hpc.pipeline import build_dag, describe, task_state
    from oel_hpc.rundir import RunPaths
    from oel_hpc.stages import run_task
    from oel_hpc.stages.common import StageContext

    paths = RunPaths(run_dir.resolve())
    if not paths.config.is_file():
        print(f"oel_hpc.worker: error: {paths.config} does not exist", file=sys.stderr)
        return 2
    cfg = load_run_config(paths.config)
    nodes = {n.id: n for n in build_dag(cfg)}
    if stage_id not in nodes:
        print(f"oel_hpc.worker: error: no stage '{stage_id}' in {paths.config} (stages: {', '.join(nodes)})",
              file=sys.stderr)
        return 2
    node = nodes[stage_id]
    if node.tasks is not None and task not in node.tasks:
        print(f"oel_hpc.worker: error: {stage_id} has tasks {node.tasks}, not {task}", file=sys.stderr)
        return 2
    state = task_state(paths, node, task)
    if state == "done":
        print(f"{describe(node, task)} is already done")
        return 0
    if state == "changed":
        print(f"oel_hpc.worker: error: {describe(node, task)} finished under another config", file=sys.stderr)
        return 2
    from oel_hpc.train.preemption import EXIT_PREEMPTED, Preempted

    ctx = StageContext(cfg, paths, {n.id: n.hash for n in nodes.values()})
    try:
        run_task(ctx, node.stage, node.round, task)
    except Preempted as e:
        print(f"{describe(node, task)}: {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oel_hpc.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("stage_id", help="e.g. r1/extract")
    parser.add_argument("--task", type=int, default=None,
                        help="array task (extract: seed, evaluate: step); default $SLURM_ARRAY_TASK_ID")
    args = parser.parse_args(argv)
    task = args.task
    if task is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
        task = int(os.environ["SLURM_ARRAY_TASK_ID"])
    return run(args.run_dir, args.stage_id, task)


if __name__ == "__main__":
    sys.exit(main())
