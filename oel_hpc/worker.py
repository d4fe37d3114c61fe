"""`python -m oel_hpc.worker <run-dir> <stage-id> [--task N]`: run one task of a run, as a batch job does.

An array job's task is its SLURM_ARRAY_TASK_ID plus OEL_TASK_OFFSET (set by the launcher on the parts of an array
split to keep its indices below MaxArraySize; unset = 0).

Everything comes from the run directory (config.yaml, the DAG rebuilt from it, files on disk), never from the
submitting process: a requeued or resubmitted job finds the state it needs by itself. The task runs through
oel_hpc/lifecycle.py, as under the local launcher: a task already DONE under the same config is skipped (a job may
run twice safely), one DONE under another config is refused.

Consolidation may run as several processes, one per rank (`srun` with one task per rank, or `torchrun`); see
oel_hpc/train/distributed.py for the environment it reads. Exit status (oel_hpc/errors.py): 0 done (or already
done), 2 bad input, 75 stopped early by SIGUSR2/SIGTERM with a checkpoint saved (under Slurm, after SIGUSR2, the
job has been requeued and resumes from that checkpoint by itself; otherwise run the same command again), anything
else a failure.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from oel_hpc.errors import ConfigError, MissingInput, exit_on_error
from oel_hpc.slurm import TASK_OFFSET_VAR

PROG = "oel_hpc.worker"


def run(run_dir: Path, stage_id: str, task: Optional[int]) -> None:
    from oel_hpc.config import load_run_config
    from oel_hpc.lifecycle import execute
    from oel_hpc.pipeline import build_dag
    from oel_hpc.rundir import RunPaths, apply_umask
    from oel_hpc.runlock import job_lock
    from oel_hpc.stages.common import StageContext

    paths = RunPaths(run_dir.resolve())
    if not paths.config.is_file():
        raise MissingInput(paths.config, f"{paths.config} does not exist")
    cfg = load_run_config(paths.config)
    apply_umask(cfg.run.umask)  # sbatch passes the launcher's on; a worker started by hand or torchrun has the shell's
    nodes = {n.id: n for n in build_dag(cfg)}
    if stage_id not in nodes:
        raise ConfigError(stage_id, f"no such stage in {paths.config} (stages: {', '.join(nodes)})")
    node = nodes[stage_id]
    if node.tasks is not None and task not in node.tasks:
        raise ConfigError("--task", f"{stage_id} has tasks {node.tasks}, not {task}")
    with job_lock(paths.root):  # shared with the run's other jobs; refused while a local run holds the run
        execute(StageContext(cfg, paths, {n.id: n.hash for n in nodes.values()}), node, task)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("stage_id", help="e.g. r1/extract")
    parser.add_argument("--task", type=int, default=None,
                        help="array task (extract: seed, evaluate: step); default $SLURM_ARRAY_TASK_ID + "
                             "$OEL_TASK_OFFSET (a split array's offset, 0 when unset)")
    args = parser.parse_args(argv)
    with exit_on_error(PROG):
        task = args.task if args.task is not None else array_task(os.environ)
        run(args.run_dir, args.stage_id, task)
    return 0


def array_task(environ) -> Optional[int]:
    """The task an array job runs: its index plus the index offset the launcher gave a split array's jobs
    (oel_hpc/launch/slurm.py); None outside an array job."""
    index = environ.get("SLURM_ARRAY_TASK_ID")
    if not index:
        return None
    offset = environ.get(TASK_OFFSET_VAR) or "0"
    if not offset.isdigit():
        raise ConfigError(TASK_OFFSET_VAR, f"must be a non-negative integer, got {offset!r}")
    return int(index) + int(offset)


if __name__ == "__main__":
    sys.exit(main())
