"""Run every pending task of the DAG here, in order, recording each stage in the manifest."""
from __future__ import annotations

import time

from omegaconf import OmegaConf

from oel_hpc.lifecycle import execute
from oel_hpc.pipeline import Manifest, Node, clear_for_redo, now, plan, survey
from oel_hpc.rundir import RunPaths, share_run_dir, write_text_atomic
from oel_hpc.runlock import launcher_lock
from oel_hpc.stages.common import StageContext


def run_local(cfg, paths: RunPaths, nodes: list[Node], run_hash: str) -> int:
    """Runs what is not done, holding the run's lock (oel_hpc/runlock.py: no other launcher, no Slurm job of the
    run meanwhile); returns how many tasks ran (0: nothing to do, and nothing is written, not even the lock)."""
    if not plan(paths, nodes, cfg.run.overwrite, full=cfg.run.verify == "full"):
        return 0
    share_run_dir(paths.root, cfg.run.umask, cfg.run.group)  # creates it, under run.umask and run.group
    with launcher_lock(paths.root, "local launcher", exclude_jobs=True):
        return _run_pending(cfg, paths, nodes, run_hash)  # planned again: another writer may have finished some


def _run_pending(cfg, paths: RunPaths, nodes: list[Node], run_hash: str) -> int:
    # a task finished under another config: refused here, or redone; a damaged one: redone with what depends on it
    found = survey(paths, nodes, cfg.run.overwrite, full=cfg.run.verify == "full")
    todo = found.todo
    if not todo:
        return 0
    write_text_atomic(paths.config, OmegaConf.to_yaml(cfg, resolve=True))
    manifest = Manifest.open(paths, cfg.run.name, run_hash, nodes)
    ctx = StageContext(cfg, paths, {n.id: n.hash for n in nodes})
    for node, tasks in todo:  # before anything runs: a crash now leaves them not done, never stale
        for task in tasks:
            if (node.id, task) in found.redo:
                clear_for_redo(paths, node, task, found.redo[(node.id, task)])
    ran = 0
    for node, tasks in todo:
        manifest.update(node.id, state="running", started=now(), ended=None, job_ids=["local"])
        t0 = time.time()
        try:
            for task in tasks:
                ran += execute(ctx, node, task, redo_changed=cfg.run.overwrite)
        except BaseException:
            manifest.update(node.id, state="failed", ended=now(), seconds=round(time.time() - t0, 2))
            raise
        manifest.update(node.id, state="done", ended=now(), seconds=round(time.time() - t0, 2))
    return ran

