"""The Slurm launcher: submits the DAG of a run as sbatch jobs chained by afterok dependencies, then returns.

Per round at most one `sbatch` per stage (5), whatever the number of seeds and checkpoints: extraction is ONE
array over the pending seeds, evaluation ONE array over the pending checkpoint steps, consolidation one job of
N nodes × T tasks; gather and deploy one job each (deploy depends only on the previous round's consolidation,
so it runs beside extraction). The scripts are rendered by `oel_hpc.launch.render` into `<run>/slurm/` and
submitted as they are (`sbatch --parsable [--array=…] [--dependency=afterok:…] <script>`).

Resuming: the same command again submits only the tasks that are neither DONE nor still queued/running. A task
counts as queued/running when one of its stage's jobs in the manifest shows it in `squeue` (pending jobs that
can never start — DependencyNeverSatisfied — are cancelled and resubmitted; so are pending jobs whose upstream
is resubmitted now, since their dependency names the old job). A new job depends on the upstream jobs submitted
now and on the upstream tasks still queued/running (`<array>_<task>` for an array task), never on what is DONE.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from oel_hpc.errors import SlurmError

from oel_hpc.launch import render
from oel_hpc.pipeline import (Manifest, Node, StageConflict, clear_outputs, now, plan, task_state)
from oel_hpc.rundir import RunPaths, read_done, write_text_atomic

IN_FLIGHT = {"PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
             "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
NEVER_REASONS = {"DependencyNeverSatisfied"}
TIMEOUT_S = 60


class Slurm:
    """The Slurm commands the launcher runs; counts its sbatch calls (tests and the benchmark read them)."""

    def __init__(self, cwd: Optional[Path] = None):
        self.cwd = cwd
        self.sbatch_calls: list[list[str]] = []

    def _run(self, argv: list[str]) -> str:
        if shutil.which(argv[0]) is None:
            raise SlurmError(f"{argv[0]} not found: run this on a Slurm login node (or start the test cluster: "
                             "tools/slurm/start.sh)")
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=self.cwd)
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{argv[0]} did not answer within {TIMEOUT_S} s (is slurmctld up?)") from None
        if r.returncode != 0:
            raise SlurmError(f"{' '.join(argv[:-1] + [Path(argv[-1]).name])} failed: "
                             f"{r.stderr.strip() or r.stdout.strip() or r.returncode}")
        return r.stdout

    def sbatch(self, script: Path, array: Optional[str] = None, dependency: list[str] = ()) -> str:
        argv = ["sbatch", "--parsable"]
        if array is not None:
            argv.append(f"--array={array}")
        if dependency:
            argv.append("--dependency=afterok:" + ":".join(dependency))
        argv.append(str(script))
        self.sbatch_calls.append(argv)
        out = self._run(argv).strip()
        job_id = out.split(";")[0]  # "<id>[;<cluster>]"
        if not job_id.isdigit():
            raise SlurmError(f"sbatch answered {out!r}, not a job id")
        return job_id

    def queue(self, job_ids: list[str]) -> list[dict]:
        """squeue rows of these jobs, array tasks expanded: {job, task (None unless an array task), state, reason}."""
        if not job_ids:
            return []
        argv = ["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%F|%K|%T|%r"]
        try:
            out = self._run(argv)
        except SlurmError as e:
            if "Invalid job id" in str(e):  # every id has left the controller's memory
                return []
            raise
        rows = []
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) != 4:
                continue
            job, task, state, reason = parts
            rows.append({"job": job, "task": int(task) if task.isdigit() else None, "state": state,
                         "reason": reason})
        return rows

    def cancel(self, refs: list[str]) -> None:
        if refs:
            self._run(["scancel", *refs])


@dataclass
class Submission:
    node: Node
    job_id: str
    tasks: list[Optional[int]]
    dependency: list[str]


@dataclass
class SubmitReport:
    run_dir: Path
    submitted: list[Submission] = field(default_factory=list)
    in_flight: dict[str, list[str]] = field(default_factory=dict)  # node id → job refs left queued/running
    cancelled: list[str] = field(default_factory=list)
    sbatch_seconds: float = 0.0

    def sbatch_per_round(self) -> dict[int, int]:
        per: dict[int, int] = {}
        for s in self.submitted:
            per[s.node.round] = per.get(s.node.round, 0) + 1
        return per


def _ref(job: str, task: Optional[int]) -> str:
    return job if task is None else f"{job}_{task}"


def write_scripts(files: dict[str, str], folder: Path) -> None:
    """Write only what changed, so a no-op resubmission leaves every file untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = folder / name
        if not path.is_file() or path.read_text() != text:
            write_text_atomic(path, text)
            if name.endswith(".sh"):
                path.chmod(0o755)


def check_run_dir(cfg: DictConfig) -> RunPaths:
    """The run directory, which must lie inside run.root (a symlinked run name may not lead elsewhere)."""
    root = Path(cfg.run.root).expanduser().resolve()
    run_dir = (root / cfg.run.name).resolve()
    if run_dir.parent != root:
        raise StageConflict(f"run directory {root / cfg.run.name} resolves to {run_dir}, outside run.root {root}")
    return RunPaths(run_dir)


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
    plan(paths, nodes, cfg.run.overwrite)  # a config that conflicts with the run's DONE stages is an error
    write_scripts(render.render_run(cfg, paths.root, nodes, in_run_dir=True), paths.root / "slurm")
    write_scripts({"config.yaml": run_config_yaml(cfg)}, paths.root)
    (paths.root / "logs").mkdir(parents=True, exist_ok=True)
    return paths.root / "slurm"


def _old_manifest(paths: RunPaths) -> dict[str, dict]:
    if not paths.manifest.is_file():
        return {}
    try:
        return {s["id"]: s for s in json.loads(paths.manifest.read_text())["stages"]}
    except (ValueError, KeyError, TypeError):
        return {}


def submit(cfg: DictConfig, paths: RunPaths, nodes: list[Node], run_hash: str,
           slurm: Optional[Slurm] = None) -> SubmitReport:
    """Submit what is neither DONE nor queued/running; returns what was submitted and what was left alone."""
    slurm = slurm or Slurm()
    report = SubmitReport(paths.root)
    todo = {node.id: tasks for node, tasks in plan(paths, nodes, cfg.run.overwrite)}
    if not todo:
        return report
    old = _old_manifest(paths)

    # What earlier submissions still have queued or running, per node and task.
    known = {n.id: [str(j) for j in old.get(n.id, {}).get("job_ids", []) if str(j).isdigit()] for n in nodes}
    rows = slurm.queue(sorted({j for ids in known.values() for j in ids}, key=int))
    live: dict[str, dict[Optional[int], list[dict]]] = {}
    for n in nodes:
        for row in rows:
            if row["job"] in known[n.id] and row["state"] in IN_FLIGHT:
                task = row["task"] if n.tasks is not None else None
                live.setdefault(n.id, {}).setdefault(task, []).append(row)
    for n in nodes:
        if live.get(n.id) and old.get(n.id, {}).get("hash") != n.hash:
            jobs = sorted({r["job"] for rs in live[n.id].values() for r in rs})
            raise StageConflict(f"{n.id} has jobs of an earlier submission under another config still queued or "
                                f"running ({', '.join(jobs)}): cancel them (scancel {' '.join(jobs)}) or wait")

    # Decide, in DAG order, which tasks to submit and which queued jobs to keep.
    to_submit: dict[str, list[Optional[int]]] = {}
    keep: dict[str, list[str]] = {}  # node id → job refs (still queued/running) that downstream jobs wait for
    cancel: list[str] = []
    for n in nodes:
        if n.id not in todo:
            continue
        upstream_new = any(d in to_submit for d in n.deps)
        for task in todo[n.id]:
            refs = live.get(n.id, {}).get(task, [])
            kept = []
            for row in refs:
                ref = _ref(row["job"], row["task"])
                pending = row["state"] in {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
                if row["state"] == "PENDING" and row["reason"] in NEVER_REASONS:
                    cancel.append(ref)  # will never start: its upstream failed or was cancelled
                elif upstream_new and pending:
                    cancel.append(ref)  # waits for an upstream job that is being replaced now
                else:
                    kept.append(ref)
            if kept:
                keep.setdefault(n.id, []).extend(kept)
            else:
                to_submit.setdefault(n.id, []).append(task)
    report.in_flight = keep

    if not to_submit:
        return report
    if cancel:
        slurm.cancel(cancel)
        report.cancelled = cancel

    # Write the config the jobs read, the scripts they run, and the folder their logs go to.
    for n in nodes:
        for task in to_submit.get(n.id, []):
            begun = read_done(paths.done(n.round, n.stage, task).with_name(
                paths.done(n.round, n.stage, task).name + ".started"))
            stale = (task_state(paths, n, task) == "changed"
                     or (begun is not None and begun.get("config_hash") != n.hash)
                     or (n.id in old and old[n.id].get("hash") != n.hash))
            if stale:  # leftovers of another config must not be resumed
                clear_outputs(paths, n, task)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.config, run_config_yaml(cfg))
    files = render.render_run(cfg, paths.root, nodes, in_run_dir=True)
    write_scripts(files, paths.root / "slurm")
    (paths.root / "logs").mkdir(exist_ok=True)
    manifest = Manifest.open(paths, cfg.run.name, run_hash, nodes)
    for n in nodes:
        if n.id not in todo:
            manifest.update(n.id, state="done")

    submitted_ids: dict[str, str] = {}
    t0 = time.perf_counter()
    try:
        for n in nodes:
            tasks = to_submit.get(n.id)
            if not tasks:
                continue
            dependency = []
            for d in n.deps:
                if d in submitted_ids:
                    dependency.append(submitted_ids[d])
                dependency += keep.get(d, [])
            script = paths.root / "slurm" / render.script_name(n)
            array = render.array_spec([t for t in tasks if t is not None]) if n.tasks is not None else None
            job_id = slurm.sbatch(script, array=array, dependency=dependency)
            submitted_ids[n.id] = job_id
            report.submitted.append(Submission(n, job_id, tasks, dependency))
            entry = next(s for s in manifest.stages if s["id"] == n.id)
            stamp = now()
            manifest.update(n.id, state="submitted", submitted=stamp, script=paths.rel(script),
                            job_ids=[*entry.get("job_ids", []), job_id],
                            submissions=[*entry.get("submissions", []),
                                         {"job_id": job_id, "tasks": tasks if n.tasks is not None else None,
                                          "dependency": dependency, "submitted": stamp}],
                            started=None, ended=None)
    except SlurmError:
        # leave nothing half-chained in the queue: cancel what this invocation submitted (the manifest keeps it)
        if submitted_ids:
            try:
                slurm.cancel(list(submitted_ids.values()))
            except SlurmError as e:
                print(f"oel_hpc: warning: could not cancel {', '.join(submitted_ids.values())}: {e}",
                      file=sys.stderr)
        raise
    finally:
        report.sbatch_seconds = time.perf_counter() - t0
    return report


def format_report(cfg: DictConfig, report: SubmitReport) -> str:
    run_dir = report.run_dir
    lines = []
    if report.submitted:
        per = report.sbatch_per_round()
        lines.append(f"Submitted run '{cfg.run.name}' to Slurm ({len(report.submitted)} sbatch calls: "
                     + ", ".join(f"round {r}: {k}" for r, k in sorted(per.items())) + f"); run directory {run_dir}")
        for s in report.submitted:
            label = {"extract": "seeds", "evaluate": "steps"}.get(s.node.stage)
            what = f"{label} {render.array_spec(s.tasks)}" if label else ""
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
    lines.append(f"Follow it with: python -m oel_hpc.status {run_dir}")
    return "\n".join(lines)
