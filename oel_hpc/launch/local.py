"""Run every pending task of the DAG here, in order, recording each stage in the manifest."""
from __future__ import annotations

import time

from oel_hpc.pipeline import Manifest, Node, clear_outputs, describe, now, plan, task_state
from omegaconf import OmegaConf

from oel_hpc.rundir import RunPaths, read_done, write_json_atomic, write_text_atomic
from oel_hpc.stages import run_task
from oel_hpc.stages.common import StageContext


def started_marker(paths: RunPaths, node: Node, task):
    done = paths.done(node.round, node.stage, task)
    return done.with_name(done.name + ".started")


def run_local(cfg, paths: RunPaths, nodes: list[Node], run_hash: str) -> int:
    """Runs what is not done; returns how many tasks ran (0: nothing to do, and nothing is written)."""
    todo = plan(paths, nodes, cfg.run.overwrite)
    if not todo:
        return 0
    paths.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.config, OmegaConf.to_yaml(cfg, resolve=True))
    manifest = Manifest.open(paths, cfg.run.name, run_hash, nodes)
    ctx = StageContext(cfg, paths, {n.id: n.hash for n in nodes})
    ran = 0
    for node, tasks in todo:
        manifest.update(node.id, state="running", started=now(), ended=None, job_ids=["local"])
        t0 = time.time()
        try:
            for task in tasks:
                # leftovers of a task begun under another config (or redone by overwrite) must not be resumed
                marker = started_marker(paths, node, task)
                begun = read_done(marker)
                if task_state(paths, node, task) == "changed" or (begun and begun["config_hash"] != node.hash):
                    print(f"starting {describe(node, task)} afresh: its earlier outputs were made under another config")
                    clear_outputs(paths, node, task)
                write_json_atomic(marker, {"config_hash": node.hash, "started_at": now()})
                run_task(ctx, node.stage, node.round, task)
                marker.unlink(missing_ok=True)
                ran += 1
        except BaseException:
            manifest.update(node.id, state="failed", ended=now(), seconds=round(time.time() - t0, 2))
            raise
        manifest.update(node.id, state="done", ended=now(), seconds=round(time.time() - t0, 2))
    return ran
