"""The DAG of one run: rounds × stages, what each depends on, its config hash, and what is already done.

Declared once here and executed by any launcher. A stage's hash covers the config it reads plus the hashes of
the stages it reads from, so a change upstream (a new model, other experience) changes every hash downstream.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from oel_hpc import log
from oel_hpc.errors import ConfigError, DamagedInput, StageConflict
from oel_hpc.rundir import HASH_SCHEME, RunPaths, config_hash, read_done, sha256_file, write_json_atomic
from oel_hpc.verify import Damage, check_outputs, summary

logger = log.get_logger(__name__)

STAGES = ("extract", "gather", "deploy", "consolidate", "evaluate")

# The config keys each stage reads (a section: every key in it), besides its upstream stages and the round's model:
# its hash covers exactly these, so a change to one of them redoes the stage (and what depends on it) and a change to
# any other key does not. Keys that shape a stage's tasks count as read (extract.seeds; evaluate.steps and
# consolidate.save_freq pick the checkpoints), since a node's hash covers all its tasks. Read through helpers:
# ctx.engine → engine, trainer.device; the prompt builder's budgets (oel_hpc.prompts.prompt_budgets) →
# experience.max_tokens, prompts.tokens_per_turn, env.max_turns, extract.sampling.max_new_tokens (deploy,
# consolidate and evaluate build only turn prompts, but the builder takes both budgets); rollout.game_rules →
# env.generator, env.invalid_move_limit; an intermediate checkpoint's export (train/checkpoint.export_for_eval) →
# trainer.dtype, master_dtype, export_dtype. tests/test_stage_keys.py runs every stage with only these keys (and
# UNHASHED_KEYS) in its config, so a read of any other key fails there.
STAGE_KEYS = {
    "extract": ("env", "prompts", "experience", "extract.seeds", "extract.steps", "extract.show_previous",
                "extract.eval_games", "extract.shared_games", "extract.sampling", "extract.extractor_sampling",
                "engine", "trainer.device", "pipeline.seed"),
    "gather": ("extract.seeds", "extract.use_step", "gather"),
    "deploy": ("env", "prompts", "experience.max_tokens", "extract.sampling.max_new_tokens", "deploy", "engine",
               "trainer.device", "pipeline.seed"),
    "consolidate": ("env.name", "env.max_turns", "prompts", "experience.max_tokens",
                    "extract.sampling.max_new_tokens", "consolidate", "engine", "trainer",
                    "pipeline.seed"),
    "evaluate": ("env", "prompts", "experience.max_tokens", "extract.sampling.max_new_tokens", "evaluate", "engine",
                 "trainer.device", "trainer.dtype", "trainer.master_dtype", "trainer.export_dtype",
                 "consolidate.steps", "consolidate.save_freq", "pipeline.seed"),
}

# What stages may read that no stage hash covers, on purpose: model.* enters every hash through the model hash
# (model.path, dtype, thinking; model.name and model.build are labels); run.* says where the run lives, whether a
# changed stage may be redone and who may read its files (run.umask, run.group: modes, not contents; consolidation
# also names its wandb run after run.name); cluster.* and launch.* say where and how jobs run, not what they compute
# (cluster.requeue: what a preempted job does next); wandb.* is where metrics are also sent, and how long to wait
# for it; experiment is the recipe's name; pipeline.rounds adds or drops rounds after the ones that are there,
# leaving those as they are. run.verify says how closely finished outputs are checked, not what
# they are.
UNHASHED_KEYS = ("model", "run", "cluster", "launch", "wandb", "experiment", "pipeline.rounds")


@dataclass
class Node:
    round: int
    stage: str
    deps: list[str]
    hash: str
    tasks: Optional[list[int]] = None  # array tasks (extract: seeds, evaluate: checkpoint steps); None = one task

    @property
    def id(self) -> str:
        return f"r{self.round}/{self.stage}"

    def task_ids(self) -> list[Optional[int]]:
        return list(self.tasks) if self.tasks is not None else [None]


def model_path(cfg: DictConfig, paths: RunPaths, r: int) -> str:
    """Round 1 starts from the configured model; round r+1 from round r's exported model."""
    return str(cfg.model.path) if r == 1 else str(paths.hf(r - 1))


def eval_steps(cfg: DictConfig) -> list[int]:
    last = cfg.consolidate.steps
    if cfg.evaluate.steps == "first_last":
        return [0, last]
    return sorted({0, last, *range(cfg.consolidate.save_freq, last + 1, cfg.consolidate.save_freq)})


def _section(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def run_hash(cfg: DictConfig) -> str:
    """The manifest's config hash: the whole resolved config but `run` (where and under which name it runs)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return config_hash({k: v for k, v in resolved.items() if k != "run"})


def build_dag(cfg: DictConfig) -> list[Node]:
    """All nodes in an order where every node comes after its dependencies."""
    nodes: list[Node] = []
    model_hash = config_hash({k: _section(cfg, f"model.{k}") for k in ("path", "dtype", "thinking")})
    previous: list[Node] = []  # the consolidation whose export this round starts from
    for r in range(1, cfg.pipeline.rounds + 1):
        def make(stage: str, deps: list[Node], tasks=None, **extra) -> Node:
            payload = {"round": r, "model": model_hash, "deps": [d.hash for d in deps], **extra,
                       **{k: _section(cfg, k) for k in STAGE_KEYS[stage]}}
            node = Node(r, stage, [d.id for d in deps], config_hash(payload), tasks)
            nodes.append(node)
            return node

        if cfg.gather.source is None:
            gather = make("gather", [make("extract", previous, list(range(cfg.extract.seeds)))])
        else:  # the experience comes from outside; its content is part of the hash
            source = Path(cfg.gather.source)
            if not source.is_file():  # a job's config.yaml is not validated again: say it here, in one line
                raise ConfigError("gather.source", f"experience list {source} does not exist")
            gather = make("gather", previous, source=sha256_file(source))
        deploy = make("deploy", previous)
        consolidate = make("consolidate", [gather, deploy])
        make("evaluate", [consolidate], eval_steps(cfg))
        previous, model_hash = [consolidate], consolidate.hash
    return nodes


def reads(node: Node) -> list[str]:
    """The nodes whose outputs a node's tasks read: its dependencies and, from round 2, the consolidation whose
    exported model the round starts from."""
    start = [f"r{node.round - 1}/consolidate"] if node.round > 1 else []
    return list(dict.fromkeys([*node.deps, *start]))


def inspect_task(paths: RunPaths, node: Node, task: Optional[int],
                 full: bool = False) -> tuple[str, list[Damage]]:
    """(state, damage). state: done | changed (finished under another config) | damaged (finished under this
    config, but a file its DONE marker records no longer matches it, or the marker cannot be read; `damage` says
    which) | pending. `full`: hash every recorded file (oel_hpc/verify.py)."""
    done_path = paths.done(node.round, node.stage, task)
    try:
        done = read_done(done_path)
    except DamagedInput:
        return "damaged", [Damage(paths.rel(done_path), "cannot be read as a DONE marker")]
    if done is None:
        return "pending", []
    if done["config_hash"] != node.hash:
        return "changed", []
    damage = check_outputs(paths.root, done, full)
    return ("damaged", damage) if damage else ("done", [])


def task_state(paths: RunPaths, node: Node, task: Optional[int], full: bool = False) -> str:
    """done | changed | damaged | pending (inspect_task)."""
    return inspect_task(paths, node, task, full)[0]


def task_outputs(paths: RunPaths, node: Node, task: Optional[int]) -> list[Path]:
    """What a task owns: removed before it is redone, so no stale checkpoint or file is ever resumed from."""
    r = node.round
    return {
        "extract": lambda: [paths.seed_dir(r, task)],
        "gather": lambda: [paths.experience_list(r), paths.done(r, "gather").parent],
        "deploy": lambda: [paths.deploy_dir(r)],
        "consolidate": lambda: [paths.consolidate_dir(r)],
        # its progress record too: the other stages' lie in the folders above (the dashboard must not show an
        # attempt's rows as those of the next)
        "evaluate": lambda: [paths.eval_result(r, task), paths.done(r, "evaluate", task),
                             paths.progress(r, "evaluate", task)],
    }[node.stage]()


def clear_outputs(paths: RunPaths, node: Node, task: Optional[int]) -> None:
    for p in task_outputs(paths, node, task):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def describe(node: Node, task: Optional[int]) -> str:
    label = {"extract": "seed", "evaluate": "step"}.get(node.stage, "task")
    return node.id if task is None else f"{node.id} ({label} {task})"


def conflict_message(paths: RunPaths, node: Node, task: Optional[int]) -> str:
    """Why a finished task cannot be reused, and how to go on."""
    done = read_done(paths.done(node.round, node.stage, task)) or {}
    why = ("was made by an older oel_hpc whose stage hashes cover other config keys, so it cannot be checked against "
           "this config" if done.get("hash_scheme") != HASH_SCHEME else "already finished with a different config")
    return (f"{describe(node, task)} {why} (run directory {paths.root}): use another run.name, or run.overwrite=true "
            "to redo it and everything downstream")


@dataclass
class Plan:
    todo: list[tuple[Node, list[Optional[int]]]]  # per node, the tasks to run, in DAG order
    # (node id, task) → why: finished tasks in `todo` whose outputs must go before they run: a damaged task, and a
    # finished one that reads a task redone for that reason (its outputs came from the damaged files)
    redo: dict[tuple[str, Optional[int]], str] = field(default_factory=dict)


def survey(paths: RunPaths, nodes: list[Node], overwrite: bool, full: bool = False) -> Plan:
    """The tasks still to run, per node: pending, changed (an error unless `overwrite`), damaged, and downstream
    of a damaged one. Every finished task's outputs are verified (`full`: every file hashed)."""
    plan_ = Plan([])
    redone: dict[str, str] = {}  # node id → the damaged task it redoes, or the one upstream it depends on
    for node in nodes:
        tasks = []
        upstream = next((d for d in reads(node) if d in redone), None)
        for task in node.task_ids():
            state, damage = inspect_task(paths, node, task, full)
            if state == "changed" and not overwrite:
                raise StageConflict(conflict_message(paths, node, task))
            if state == "damaged":
                plan_.redo[(node.id, task)] = f"{describe(node, task)} is damaged: {summary(damage)}"
                redone[node.id] = describe(node, task)
            elif state == "done" and upstream is not None:
                plan_.redo[(node.id, task)] = (f"{describe(node, task)} depends on {redone[upstream]}, which is "
                                               "damaged")
            if state != "done" or upstream is not None:
                tasks.append(task)
        if upstream is not None:
            redone.setdefault(node.id, redone[upstream])
        if tasks:
            plan_.todo.append((node, tasks))
    return plan_


def plan(paths: RunPaths, nodes: list[Node], overwrite: bool,
         full: bool = False) -> list[tuple[Node, list[Optional[int]]]]:
    """The tasks still to run, per node (survey)."""
    return survey(paths, nodes, overwrite, full).todo


def clear_for_redo(paths: RunPaths, node: Node, task: Optional[int], why: str) -> None:
    """A launcher's warning line and the clearing of a finished task it redoes (Plan.redo)."""
    logger.warning(f"{why}; redoing it")
    clear_outputs(paths, node, task)


# ---------------------------------------------------------------------------------------------------------------
# The manifest: what the dashboard reads.
#
# manifest.json = {run, config_hash, stages: [entry, ...]} with one entry per DAG node, in DAG order:
#   id "r<round>/<stage>", round, stage, tasks (array indices: seeds / checkpoint steps; null = one task), hash,
#   depends_on (node ids), state, job_ids, started, ended, seconds (local runs).
#   state: pending | running | done | failed (local launcher); submitted (Slurm launcher: its jobs are queued;
#     the DONE markers and sacct/squeue tell the rest, the launcher never learns when a job ends) or done (every
#     task was DONE when the Slurm launcher last ran).
#   job_ids: every job id submitted for the stage, newest last, as strings: "local" for the local launcher; for
#     Slurm the job id, for an array the array's job id (its tasks show in sacct as "<id>_<task>"); a
#     resubmission of some tasks is a new array holding only their indices.
# Added by the Slurm launcher (oel_hpc.launch.slurm):
#   submitted: time of the newest submission; script: the sbatch script it ran, relative to the run directory
#   (slurm/r<round>_<stage>.sbatch); submissions: [{job_id, tasks (the array indices this job covers, null for
#   a single job), dependency (the job refs it waits for: "<id>" or "<array id>_<task>"), submitted}], oldest first.
# An entry keeps these fields across invocations while its hash is unchanged; a changed hash starts it afresh.
MANIFEST_KEPT = ("state", "job_ids", "started", "ended", "seconds", "submitted", "script", "submissions")


@dataclass
class Manifest:
    paths: RunPaths
    run: str
    config_hash: str
    stages: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, paths: RunPaths, run: str, run_hash: str, nodes: list[Node]) -> "Manifest":
        import json

        old = {}
        if paths.manifest.is_file():
            try:
                old = {s["id"]: s for s in json.loads(paths.manifest.read_text())["stages"]}
            except (ValueError, KeyError, TypeError):  # the DONE markers, not the manifest, say what is done
                logger.warning(f"{paths.manifest} cannot be read; it is written afresh")
        stages = []
        for n in nodes:
            entry = {"id": n.id, "round": n.round, "stage": n.stage, "tasks": n.tasks, "hash": n.hash,
                     "depends_on": n.deps, "state": "pending", "job_ids": [], "started": None, "ended": None}
            prev = old.get(n.id)
            if prev and prev.get("hash") == n.hash:
                entry.update({k: prev[k] for k in MANIFEST_KEPT if k in prev})
            stages.append(entry)
        manifest = cls(paths, run, run_hash, stages)
        manifest.save()
        return manifest

    def save(self) -> None:
        write_json_atomic(self.paths.manifest,
                          {"run": self.run, "config_hash": self.config_hash, "stages": self.stages})

    def update(self, node_id: str, **fields) -> None:
        for s in self.stages:
            if s["id"] == node_id:
                s.update(fields)
        self.save()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
