"""One task of a run, from "is it done?" to its DONE marker: what the local launcher (launch/local.py) and every
Slurm job (`python -m oel_hpc.worker`) do around a stage, written once.

1. State: DONE under this config, its outputs verified (oel_hpc/verify.py) → nothing to do. DONE under another
   config → redone only when the caller says so (the local launcher under run.overwrite, whose plan() refused
   otherwise before anything ran); a Slurm job refuses it (StageConflict, exit 2): the launcher clears such a task
   before it submits it. DONE but damaged (a recorded file no longer matches) → redone, with a warning naming it.
   Inputs: every task the node reads from (pipeline.reads) must be DONE with its outputs verified, else the task
   stops before it starts (DamagedInput / MissingInput, exit 2, naming the file): a job cannot redo its upstream;
   the launchers redo a damaged task and what depends on it.
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
from oel_hpc.errors import DamagedInput, MissingInput, StageConflict
from oel_hpc.pipeline import (Node, build_dag, clear_outputs, conflict_message, describe, inspect_task, now,
                              reads)
from oel_hpc.ranks import detect_env
from oel_hpc.rundir import RunPaths, mark_done, read_started, write_json_atomic
from oel_hpc.stages import run_task
from oel_hpc.verify import summary

logger = log.get_logger(__name__)


def started_marker(paths: RunPaths, node: Node, task: Optional[int]) -> Path:
    return paths.started(node.round, node.stage, task)


def execute(ctx, node: Node, task: Optional[int], *, redo_changed: bool = False) -> bool:
    """Run one task of `node` to its DONE marker. Returns False when it was already done (nothing ran).
    `redo_changed`: a task finished under another config is redone (else StageConflict)."""
    paths = ctx.paths
    name = describe(node, task)
    full = ctx.cfg.run.verify == "full"
    state, damage = inspect_task(paths, node, task, full)
    if state == "done":
        logger.info(f"{name} is already done")
        return False
    if state == "changed" and not redo_changed:
        raise StageConflict(conflict_message(paths, node, task))
    check_inputs(ctx, node, name, full)
    main = detect_env().rank == 0
    marker = started_marker(paths, node, task)
    log.set_context(stage=name)
    try:
        if main:
            begun = read_started(marker)
            if state == "damaged":
                logger.warning(f"{name} is damaged: {summary(damage)}; redoing it")
                clear_outputs(paths, node, task)
            elif state == "changed" or (begun is not None and begun.get("config_hash") != node.hash):
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


def check_inputs(ctx, node: Node, name: str, full: bool) -> None:
    """Every task `node` reads from is DONE under this config with its outputs as recorded; else the task stops,
    naming the file (a job cannot redo its upstream: running the launcher again does)."""
    paths = ctx.paths
    nodes = {n.id: n for n in build_dag(ctx.cfg)}
    for upstream in (nodes[i] for i in reads(node)):
        for task in upstream.task_ids():
            state, damage = inspect_task(paths, upstream, task, full)
            if state == "done":
                continue
            done = paths.done(upstream.round, upstream.stage, task)
            source = describe(upstream, task)
            if state == "damaged":
                raise DamagedInput(paths.root / damage[0].path,
                                   f"{name} reads what {source} wrote, and {damage[0].at(paths.root)}: run the "
                                   f"run's command again to redo {source} and what depends on it")
            if state == "changed":
                raise StageConflict(f"{name}: its input {conflict_message(paths, upstream, task)}")
            raise MissingInput(done, f"{name} reads what {source} writes, and {source} is not done ({done} does "
                                     "not exist)")
