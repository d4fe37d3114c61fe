"""The Slurm launcher: submits the DAG of a run as sbatch jobs chained by afterok dependencies, then returns.

Per round at most one `sbatch` per stage (5; one per part of a split array), whatever the number of seeds and
checkpoints: extraction is ONE array over the pending seeds, evaluation ONE array over the pending checkpoint
steps, consolidation one job of N nodes × T tasks; gather and deploy one job each (deploy depends only on the
previous round's consolidation, so it runs beside extraction). An array whose indices would reach the cluster's
MaxArraySize (`scontrol show config`, or cluster.max_array_size) is submitted as several arrays
(oel_hpc.slurm.split_array), each with an index offset its jobs get as OEL_TASK_OFFSET (task =
SLURM_ARRAY_TASK_ID + offset; manifest: the submission's `index_offset`); what depends on the stage waits for all
of them. cluster.array_throttle adds `%N` to --array.
The scripts are rendered by `oel_hpc.launch.render` into `<run>/slurm/` and submitted as they are (`sbatch
--parsable [--array=…] [--export=ALL,OEL_TASK_OFFSET=…] [--dependency=afterok:…] <script>`).

Resuming: the same command again submits only the tasks that are neither DONE nor still queued/running. A task
counts as queued/running when one of its stage's jobs in the manifest shows it in `squeue` (pending jobs that
can never start — DependencyNeverSatisfied — are cancelled and resubmitted; so are pending jobs whose upstream
is resubmitted now, since their dependency names the old job). A new job depends on the upstream jobs submitted
now and on the upstream tasks still queued/running (`<array>_<task>` for an array task), never on what is DONE.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from oel_hpc.errors import SlurmError, StageConflict
from oel_hpc.launch import render
from oel_hpc.log import get_logger
from oel_hpc.pipeline import Manifest, Node, clear_for_redo, clear_outputs, now, plan, survey, task_state
from oel_hpc.rundir import RunPaths, dir_mode, read_started, share_run_dir, write_text_atomic
from oel_hpc.runlock import launcher_lock
from oel_hpc.slurm import (DEFAULT_MAX_ARRAY_SIZE, PENDING, ArrayPart, Slurm, array_spec, in_queue, job_ref,
                            never_starts, phase, split_array)

log = get_logger(__name__)


@dataclass
class Submission:
    node: Node
    job_id: str
    tasks: list[Optional[int]]
    dependency: list[str]
    index_offset: Optional[int] = None  # arrays: task = array index + offset


@dataclass
class SubmitReport:
    run_dir: Path
    submitted: list[Submission] = field(default_factory=list)
    in_flight: dict[str, list[str]] = field(default_factory=dict)  # node id → job refs left queued/running
    cancelled: list[str] = field(default_factory=list)
    sbatch_seconds: float = 0.0
    max_array_size: Optional[int] = None  # what the arrays were split by (when there were arrays to submit)
    max_array_size_from: Optional[str] = None  # where that came from

    def sbatch_per_round(self) -> dict[int, int]:
        per: dict[int, int] = {}
        for s in self.submitted:
            per[s.node.round] = per.get(s.node.round, 0) + 1
        return per


def write_scripts(files: dict[str, str], folder: Path) -> None:
    """Write only what changed, so a no-op resubmission leaves every file untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = folder / name
        if not path.is_file() or path.read_text() != text:
            write_text_atomic(path, text)
            if name.endswith(".sh"):
                path.chmod(dir_mode())  # executable: rwx where a folder would be


def run_config_yaml(cfg: DictConfig) -> str:
    """The config.yaml jobs read: the resolved config, as the launcher writes it (launch.* reset: it describes
    the submitting command, not the run)."""
    cfg = copy.deepcopy(cfg)
    cfg.launch.render_only, cfg.launch.render_dir = False, None
    return OmegaConf.to_yaml(cfg, resolve=True)


def render_only(cfg: DictConfig, paths: RunPaths, nodes: list[Node]) -> Path:
    """Write every stage's script (and submit.sh) without submitting; returns the folder."""
    if cfg.launch.render_dir is not None:
        folder = Path(cfg.launch.render_dir).expanduser().resolve()
        files = render.render_run(cfg, paths.root, nodes)
        files["config.yaml"] = run_config_yaml(cfg)
        write_scripts(files, folder)
        return folder
    plan(paths, nodes, cfg.run.overwrite, full=cfg.run.verify == "full")  # a conflicting config is an error here
    files = render.render_run(cfg, paths.root, nodes, in_run_dir=True)
    share_run_dir(paths.root, cfg.run.umask, cfg.run.group)
    with launcher_lock(paths.root, "render only"):  # not while another command writes the run's config.yaml
        write_scripts(files, paths.root / "slurm")
        write_scripts({"config.yaml": run_config_yaml(cfg)}, paths.root)
        (paths.root / "logs").mkdir(parents=True, exist_ok=True)
    return paths.root / "slurm"


def max_array_size(cfg: DictConfig, slurm: Optional[Slurm], ask: bool = True) -> tuple[int, str]:
    """(MaxArraySize, where it came from): cluster.max_array_size when set; else the cluster's (one `scontrol show
    config`); else, when Slurm cannot be asked (`ask` false, or scontrol fails), Slurm's default 1001, said so."""
    if cfg.cluster.max_array_size is not None:
        return int(cfg.cluster.max_array_size), "cluster.max_array_size"
    why = "not asked"
    if ask and slurm is not None:
        try:
            value = slurm.show_config().get("MaxArraySize", "")
            if value.isdigit():
                return int(value), "scontrol show config"
            why = f"scontrol show config has no MaxArraySize ({value!r})"
        except SlurmError as e:
            why = str(e)
    return DEFAULT_MAX_ARRAY_SIZE, (f"Slurm's default: the cluster could not be asked ({why}); set "
                                    "cluster.max_array_size if yours differs")


def array_parts(tasks: list[Optional[int]], limit: int) -> list[ArrayPart]:
    return split_array([t for t in tasks if t is not None], limit)


def queued_task(task: Optional[int], offsets: dict[str, int], job: str) -> Optional[int]:
    """The run's task an array job's index stands for (its submission's index_offset added)."""
    return None if task is None else task + offsets.get(job, 0)


def index_offsets(entry: dict) -> dict[str, int]:
    """{array job id: index_offset} of a manifest stage entry's submissions (absent = 0)."""
    return {str(sub.get("job_id")): int(sub.get("index_offset") or 0) for sub in entry.get("submissions") or []
            if isinstance(sub, dict)}


def _old_manifest(paths: RunPaths) -> dict[str, dict]:
    if not paths.manifest.is_file():
        return {}
    try:
        return {s["id"]: s for s in json.loads(paths.manifest.read_text())["stages"]}
    except (ValueError, KeyError, TypeError):
        return {}


def submit(cfg: DictConfig, paths: RunPaths, nodes: list[Node], run_hash: str,
           slurm: Optional[Slurm] = None) -> SubmitReport:
    """Submit what is neither DONE nor queued/running, holding the run's launcher lock (oel_hpc/runlock.py: a second
    submitter or a local run of it is refused; its jobs are not); returns what was submitted and left alone."""
    if not plan(paths, nodes, cfg.run.overwrite, full=cfg.run.verify == "full"):
        return SubmitReport(paths.root)  # nothing to do: nothing written, not even the lock
    share_run_dir(paths.root, cfg.run.umask, cfg.run.group)  # before the lock files: they inherit the group
    with launcher_lock(paths.root, "Slurm launcher"):
        return _submit(cfg, paths, nodes, run_hash, slurm or Slurm())


def _submit(cfg: DictConfig, paths: RunPaths, nodes: list[Node], run_hash: str, slurm: Slurm) -> SubmitReport:
    report = SubmitReport(paths.root)
    found = survey(paths, nodes, cfg.run.overwrite, full=cfg.run.verify == "full")  # damaged tasks are resubmitted
    todo = {node.id: tasks for node, tasks in found.todo}
    if not todo:
        return report
    old = _old_manifest(paths)
    live = _queued_tasks(slurm, nodes, old)
    choice = _choose(nodes, todo, live)
    report.in_flight = choice.keep
    if not choice.submit:
        return report
    if choice.cancel:
        slurm.cancel(choice.cancel)
        report.cancelled = choice.cancel
    manifest = _prepare_run_dir(cfg, paths, nodes, todo, choice.submit, old, run_hash, found.redo)
    arrays = [t for n in nodes if n.tasks is not None for t in choice.submit.get(n.id, []) if t is not None]
    if arrays:
        report.max_array_size, report.max_array_size_from = max_array_size(cfg, slurm)
        if report.max_array_size_from.startswith("Slurm's default") and max(arrays) >= report.max_array_size:
            # said only when it decides a split (else sbatch's own error, if any, is the one line that matters)
            log.warning(f"MaxArraySize {report.max_array_size}: {report.max_array_size_from}")
    _submit_in_dag_order(slurm, paths, nodes, choice, manifest, report, cfg.cluster.array_throttle)
    return report


Rows = dict[Optional[int], list[tuple[str, Optional[int], dict]]]  # task → (job, task, squeue row) still queued


def _queued_tasks(slurm: Slurm, nodes: list[Node], old: dict[str, dict]) -> dict[str, Rows]:
    """What earlier submissions (the manifest's job ids) still have queued or running, per node and task. Jobs of
    another config still queued are a conflict: they would write this run's outputs."""
    known = {n.id: [str(j) for j in old.get(n.id, {}).get("job_ids", []) if str(j).isdigit()] for n in nodes}
    offsets = {n.id: index_offsets(old.get(n.id, {})) for n in nodes}  # split arrays: index + offset = task
    rows = slurm.queue(sorted({j for ids in known.values() for j in ids}, key=int))
    live: dict[str, Rows] = {}
    for n in nodes:
        for (job, task), row in rows.items():
            if job in known[n.id] and in_queue(row["state"]):
                key = queued_task(task, offsets[n.id], job) if n.tasks is not None else None
                live.setdefault(n.id, {}).setdefault(key, []).append((job, task, row))
    for n in nodes:
        if live.get(n.id) and old.get(n.id, {}).get("hash") != n.hash:
            jobs = sorted({job for entries in live[n.id].values() for job, _, _ in entries})
            raise StageConflict(f"{n.id} has jobs of an earlier submission under another config still queued or "
                                f"running ({', '.join(jobs)}): cancel them (scancel {' '.join(jobs)}) or wait")
    return live


@dataclass
class Choice:
    submit: dict[str, list[Optional[int]]] = field(default_factory=dict)  # node id → tasks to submit now
    keep: dict[str, list[str]] = field(default_factory=dict)  # node id → queued job refs downstream jobs wait for
    cancel: list[str] = field(default_factory=list)  # queued job refs that would never (usefully) start


def _choose(nodes: list[Node], todo: dict[str, list[Optional[int]]], live: dict[str, Rows]) -> Choice:
    """In DAG order: per task not done, keep its queued job or submit it again. A pending job is cancelled when it
    can never start (its upstream failed or was cancelled) or when its upstream is submitted anew now (its
    dependency names the old job)."""
    choice = Choice()
    for n in nodes:
        if n.id not in todo:
            continue
        upstream_new = any(d in choice.submit for d in n.deps)
        for task in todo[n.id]:
            kept = []
            for job, job_task, row in live.get(n.id, {}).get(task, []):
                ref = job_ref(job, job_task)
                if never_starts(row) or (upstream_new and phase(row["state"]) == PENDING):
                    choice.cancel.append(ref)
                else:
                    kept.append(ref)
            if kept:
                choice.keep.setdefault(n.id, []).extend(kept)
            else:
                choice.submit.setdefault(n.id, []).append(task)
    return choice


def _prepare_run_dir(cfg: DictConfig, paths: RunPaths, nodes: list[Node], todo: dict, to_submit: dict,
                     old: dict[str, dict], run_hash: str, redo: dict) -> Manifest:
    """Clear what another config left in the tasks about to run, and damaged tasks (with what depends on them:
    `redo`), then write the config the jobs read, the scripts they run, the folder their logs go to, and the
    manifest (stages already done marked so)."""
    for n in nodes:
        for task in to_submit.get(n.id, []):
            if (n.id, task) in redo:
                clear_for_redo(paths, n, task, redo[(n.id, task)])
                continue
            begun = read_started(paths.started(n.round, n.stage, task))
            stale = (task_state(paths, n, task) == "changed"
                     or (begun is not None and begun.get("config_hash") != n.hash)
                     or (n.id in old and old[n.id].get("hash") != n.hash))
            if stale:  # leftovers of another config must not be resumed
                clear_outputs(paths, n, task)
    share_run_dir(paths.root, cfg.run.umask, cfg.run.group)  # sbatch passes the umask on to the jobs
    write_text_atomic(paths.config, run_config_yaml(cfg))
    write_scripts(render.render_run(cfg, paths.root, nodes, in_run_dir=True), paths.root / "slurm")
    (paths.root / "logs").mkdir(exist_ok=True)
    manifest = Manifest.open(paths, cfg.run.name, run_hash, nodes)
    for n in nodes:
        if n.id not in todo:
            manifest.update(n.id, state="done")
    return manifest


def _submit_in_dag_order(slurm: Slurm, paths: RunPaths, nodes: list[Node], choice: Choice, manifest: Manifest,
                         report: SubmitReport, throttle: Optional[int] = None) -> None:
    """One sbatch per node with tasks to submit (an array split by MaxArraySize: one per part), each depending
    (afterok) on its upstream jobs submitted now (every part of a split array) and on its upstream tasks still
    queued; every job id goes into the manifest as soon as Slurm gives it. If an sbatch fails, the jobs this call
    submitted are cancelled: nothing is left half-chained in the queue."""
    submitted: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    try:
        for n in nodes:
            tasks = choice.submit.get(n.id)
            if not tasks:
                continue
            dependency = []
            for d in n.deps:
                dependency += submitted.get(d, [])
                dependency += choice.keep.get(d, [])
            script = paths.root / "slurm" / render.script_name(n)
            if n.tasks is None:
                parts = [(None, tasks, None)]
            else:
                parts = [(part.spec(throttle), part.tasks, part.offset)
                         for part in array_parts(tasks, report.max_array_size or DEFAULT_MAX_ARRAY_SIZE)]
            for array, part_tasks, offset in parts:
                job_id = slurm.sbatch(script, array=array, dependency=dependency, task_offset=offset)
                submitted.setdefault(n.id, []).append(job_id)
                report.submitted.append(Submission(n, job_id, part_tasks, dependency, offset))
                _record(manifest, paths, n, script, job_id, part_tasks, dependency, offset)
    except SlurmError:
        jobs = [j for ids in submitted.values() for j in ids]
        if jobs:
            try:
                slurm.cancel(jobs)
            except SlurmError as e:
                log.warning(f"could not cancel {', '.join(jobs)}: {e}")
        raise
    finally:
        report.sbatch_seconds = time.perf_counter() - t0


def _record(manifest: Manifest, paths: RunPaths, n: Node, script: Path, job_id: str, tasks: list[Optional[int]],
            dependency: list[str], index_offset: Optional[int] = None) -> None:
    entry = next(s for s in manifest.stages if s["id"] == n.id)
    stamp = now()
    submission = {"job_id": job_id, "tasks": tasks if n.tasks is not None else None, "dependency": dependency,
                  "submitted": stamp}
    if index_offset:  # a split array's later part: task = array index + index_offset (absent = 0)
        submission["index_offset"] = index_offset
    manifest.update(n.id, state="submitted", submitted=stamp, script=paths.rel(script),
                    job_ids=[*entry.get("job_ids", []), job_id],
                    submissions=[*entry.get("submissions", []), submission],
                    started=None, ended=None)


def format_report(cfg: DictConfig, report: SubmitReport) -> str:
    run_dir = report.run_dir
    lines = []
    if report.submitted:
        per = report.sbatch_per_round()
        lines.append(f"Submitted run '{cfg.run.name}' to Slurm ({len(report.submitted)} sbatch calls: "
                     + ", ".join(f"round {r}: {k}" for r, k in sorted(per.items())) + f"); run directory {run_dir}")
        for s in report.submitted:
            label = {"extract": "seeds", "evaluate": "steps"}.get(s.node.stage)
            what = f"{label} {array_spec(s.tasks)}" if label else ""
            if s.index_offset:
                what += f" (array index + {s.index_offset})"
            after = f"after {','.join(s.dependency)}" if s.dependency else ""
            lines.append(f"  {s.node.id:<16} job {s.job_id:<10} {what:<22} {after}".rstrip())
    for node_id, refs in report.in_flight.items():
        lines.append(f"  {node_id:<16} still queued/running: {', '.join(refs)} (not submitted again)")
    if report.cancelled:
        lines.append(f"  cancelled (waiting on jobs that will never succeed, or on replaced jobs): "
                     f"{', '.join(report.cancelled)}")
    if not report.submitted:
        if report.in_flight:
            lines.insert(0, f"Nothing to submit: every stage of run '{cfg.run.name}' not yet done is still "
                            f"queued or running ({run_dir}).")
        else:
            lines.append(f"Nothing to do: every stage of run '{cfg.run.name}' is already done ({run_dir}).")
    split = sum(1 for s in report.submitted if s.index_offset)
    if split:
        lines.append(f"  {split} array(s) with an index offset (task = array index + offset): indices must stay "
                     f"below MaxArraySize {report.max_array_size} ({report.max_array_size_from})")
    lines.append(f"Follow it with: python -m oel_hpc.status {run_dir}")
    return "\n".join(lines)
