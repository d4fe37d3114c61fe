"""One task of a run, from "is it done?" to its DONE marker: what the local launcher (launch/local.py) and every
Slurm job (`python -m oel_hpc.worker`) do around a stage, written once.

1. State: DONE under this config → nothing to do. DONE under another config → redone only when the caller says so
   (the local launcher under run.overwrite, whose plan() refused otherwise before anything ran); a Slurm job
   refuses it (StageConflict, exit 2): the launcher clears such a task before it submits it.
2. Stale outputs: the task's outputs are removed when it is redone, or when its `.started` marker (next to where
   DONE goes) was left by an attempt under another config. An attempt under the same config leaves them: the
   stage resumes from them (consolidation's checkpoints, deploy's finished steps).
3. `.started` is written ({config_hash, started_at}): launch/slurm.py and status.py read it.
4. The stage runs and returns the files it wrote; DONE is written from them (rundir.mark_done: the config hash and
   the sha256 of each file); `.started` is removed. An exception (a failure, a preemption) leaves `.started` and
   no DONE behind.

Consolidation may run as several processes (ranks). Only rank 0 clears, marks and writes DONE; the others run
the stage (oel_hpc/ranks.py: the rank the process group is built from). They cannot race it: the stage starts by joining the process group, which waits for rank 0.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from oel_hpc import log
from oel_hpc.errors import StageConflict
from oel_hpc.pipeline import Node, clear_outputs, conflict_message, describe, now, task_state
from oel_hpc.ranks import detect_env
from oel_hpc.rundir import RunPaths, mark_done, read_done, write_json_atomic
from oel_hpc.stages import run_task

logger = log.get_logger(__name__)


def started_marker(paths: RunPaths, node: Node, task: Optional[int]) -> Path:
    return paths.started(node.round, node.stage, task)


def execute(ctx, node: Node, task: Optional[int], *, redo_changed: bool = False) -> bool:
    """Run one task of `node` to its DONE marker. Returns False when it was already done (nothing ran).
    `redo_changed`: a task finished under another config is redone (else StageConflict)."""
    paths = ctx.paths
    name = describe(node, task)
    state = task_state(paths, node, task)
    if state == "done":
        logger.info(f"{name} is already done")
        return False
    if state == "changed" and not redo_changed:
        raise StageConflict(conflict_message(paths, node, task))
    main = detect_env().rank == 0
    marker = started_marker(paths, node, task)
    log.set_context(stage=name)
    try:
        if main:
            begun = read_done(marker)
            if state == "changed" or (begun is not None and begun.get("config_hash") != node.hash):
                logger.info(f"starting {name} afresh: its earlier outputs were made under another config")
                clear_outputs(paths, node, task)
            write_json_atomic(marker, {"config_hash": node.hash, "started_at": now()})
        t0 = time.monotonic()
        outputs = run_task(ctx, node.stage, node.round, task)
        if main:
            mark_done(paths, paths.done(node.round, node.stage, task), node.hash, outputs)
            marker.unlink(missing_ok=True)
            logger.info(f"done in {time.monotonic() - t0:.1f} s ({len(outputs)} files recorded in "
                        f"{paths.rel(paths.done(node.round, node.stage, task))})")
    finally:
        log.set_context(stage="")
    return True
