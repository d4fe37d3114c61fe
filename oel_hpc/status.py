"""`python -m oel_hpc.status <run-dir|sweep-dir>... [--watch S] [--json] [--verify] [--tasks N] [--html FILE]`: every
stage and array task of one or several runs (docs/status.md).

For each stage of the run's manifest.json and each of its tasks (extract: seed, evaluate: checkpoint step): the
Slurm job id (`<id>` or `<id>_<task>`), state, elapsed time, exit code and node, from one `squeue` and one `sacct`
call per refresh. The DONE markers on disk are the ground truth for "done", once the files each records are checked
against it (oel_hpc/verify.py: size and mtime, the sha256 of touched files; every sha256 with --verify):
a task whose files do not match is "damaged", with the file named. A local run (no Slurm job ids) is shown from the
manifest and the DONE markers alone, without calling Slurm.

A running task also shows step k/K and an ETA from its progress record (oel_hpc/taskprogress.py: only a file's
tail is read, and only for running tasks); a running job its time left (squeue %L), a pending one Slurm's
expected start (%S); every job its requeue count (sacct -D rows); a failed task its log file and last lines.
Several runs (a sweep's points) are read with one squeue and one sacct call for all.

Per task, the newest job in the stage's `job_ids` (newest last) that covers it wins: an array stage's job id is the
array's, and a resubmission of some tasks is a new array holding only their indices. A job id written as
`<id>_<task>` or `<id>_[1,3-5]` names the tasks it covers explicitly.

Exit status: 0; 2 for bad input (no such folder, no manifest). With --watch: 0 once every stage is done, 1 when
the run stopped with a stage failed or blocked, 130 on Ctrl-C.

Kept small and free of torch/transformers/omegaconf so it starts fast on a login node.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from oel_hpc import taskprogress
from oel_hpc.taskprogress import fmt_seconds
from oel_hpc.errors import ConfigError, DamagedInput, MissingInput, SlurmError, exit_on_error
from oel_hpc.rundir import RunPaths, read_done
from oel_hpc.slurm import FINAL, PENDING, RUNNING, Runner, Slurm, job_ref, never_starts, parse_job_id, phase
from oel_hpc.verify import check_outputs, summary

PROG = "python -m oel_hpc.status"
SLURM = Slurm(Runner(timeout_s=30.0, attempts=2))  # a dashboard refresh waits a minute at most

# A task's state is one of: done, running, pending, failed, blocked (will never run: upstream failed), changed (a
# DONE marker from another config), damaged (a DONE marker whose files do not match it: the launcher redoes the
# task), unknown. Slurm's job states are read through oel_hpc.slurm.phase.
TERMINAL = {"done", "failed", "blocked", "changed", "damaged"}
LABELS = {"extract": ("seed", "seeds"), "evaluate": ("step", "steps")}


# ---------------------------------------------------------------------------------------------------------------
# Asking Slurm

def query_slurm(bases: list[str]) -> tuple[dict, dict, list[str]]:
    """One sacct and one squeue call, run side by side: (sacct rows, squeue rows, problems)."""
    rows: dict[str, dict] = {"sacct": {}, "squeue": {}}
    problems: dict[str, str] = {}

    def ask(name: str, command) -> None:
        try:
            rows[name] = command(bases)
        except SlurmError as e:
            problems[name] = str(e)

    threads = [threading.Thread(target=ask, args=(name, command), daemon=True)
               for name, command in (("sacct", lambda b: SLURM.accounting(b, duplicates=True)),
                                     ("squeue", SLURM.queue))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return rows["sacct"], rows["squeue"], [problems[n] for n in ("sacct", "squeue") if n in problems]


# ---------------------------------------------------------------------------------------------------------------
# Collecting the report

def load_manifest(run_dir: Path) -> dict:
    """The run's manifest.json; bad input (no such folder, no manifest, not a manifest) is a ConfigError naming
    the path (exit status 2)."""
    if not run_dir.exists():
        raise MissingInput(run_dir, f"no such run directory: {run_dir}")
    if not run_dir.is_dir():
        raise ConfigError(str(run_dir), "not a directory")
    path = RunPaths(run_dir).manifest
    if not path.is_file():
        raise MissingInput(path, f"{run_dir} has no manifest.json (not a run directory, or its launcher has not "
                                 "started yet)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(str(path), f"cannot read it ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), list):
        raise ConfigError(str(path), "not a run manifest (no 'stages' list)")
    return manifest


def task_label(stage: str, task: Optional[int]) -> str:
    return "-" if task is None else f"{LABELS.get(stage, ('task',))[0]} {task}"


def _from_slurm(row: dict) -> str:
    where = phase(row["state"])
    if where == RUNNING:
        return "running"
    if where == PENDING:
        return "blocked" if never_starts(row) else "pending"
    if where == FINAL:
        return "failed"  # COMPLETED without a DONE marker included: the task did not finish its work
    return "unknown"


def _slurm_row(base: str, task: Optional[int], sacct: dict, squeue: dict) -> Optional[dict]:
    """squeue's state is the current one; sacct adds exit code and times (when it agrees on the state)."""
    q, a = squeue.get((base, task)), sacct.get((base, task))
    if q is None and a is None:
        return None
    row = {"state": None, "reason": None, "elapsed_s": None, "exit_code": None, "node": None, "name": None,
           "start": None, "end": None, "submit": None, "time_left_s": None, "expected_start": None,
           "restarts": None}
    if a is not None:
        row.update(a)
    if q is not None:
        if a is not None and a["state"] != q["state"]:
            row.update(exit_code=None, end=None)
            if phase(q["state"]) == PENDING:
                row["start"] = None
        row.update({k: v for k, v in q.items() if v is not None or k == "reason"})
    return row


def _covers(base: str, explicit: Optional[set], task: int, sacct: dict, squeue: dict,
            known: Optional[set] = None) -> Optional[bool]:
    """Does this job cover the task? None: cannot tell (Slurm knows no task rows of it yet, or failed). `known`:
    the job ids Slurm shows any row of (_known_bases; computed once, not per task, for arrays of thousands)."""
    if explicit is not None:
        return task in explicit
    if known is None:
        known = _known_bases(sacct, squeue)
    if (base, task) in sacct or (base, task) in squeue:
        return True
    if base not in known or (base, None) in sacct or (base, None) in squeue:
        return None
    return False


def _known_bases(sacct: dict, squeue: dict) -> set:
    return {k[0] for k in (*sacct, *squeue)}


_folders: dict = {}  # (run dir, round, stage) → the folder of its tasks' DONE markers, as text


def _done_path(paths: RunPaths, r, stage: str, task: Optional[int]) -> Optional[Path]:
    """paths.done(r, stage, task), built from text for array tasks: thousands of them per refresh, where pathlib's
    joins cost more than the file reads."""
    try:
        if task is None or stage not in ("extract", "evaluate"):
            return paths.done(int(r), stage, task)
        key = (paths.root, int(r), stage)
        if key not in _folders:
            _folders[key] = str(paths.done(int(r), stage, 0).parent.parent if stage == "extract"
                                else paths.eval_dir(int(r)))
        name = f"seed_{int(task)}/DONE" if stage == "extract" else f"DONE.step_{int(task)}"
        return Path(f"{_folders[key]}/{name}")
    except (KeyError, TypeError, ValueError):  # a stage this version does not know
        return None


def _task_row(stage: dict, task: Optional[int], jobs: list, sacct: dict, squeue: dict, paths: RunPaths,
              slurm_ok: bool, verify: bool = False, known: Optional[set] = None) -> dict:
    r, name = stage.get("round"), stage.get("stage")
    row = {"task": task, "label": task_label(name, task), "job_id": None, "state": "unknown",
           "slurm_state": None, "reason": None, "elapsed_s": None, "exit_code": None, "node": None,
           "start": None, "end": None, "name": None, "done": False, "finished_at": None, "note": None,
           "submit": None, "time_left_s": None, "expected_start": None, "restarts": None, "progress": None,
           "log": None, "log_tail": None}
    done_path = _done_path(paths, r, name, task)
    damaged = None  # what is wrong with a DONE of this config: its marker, or a file it records
    try:
        done = read_done(done_path) if done_path is not None else None
    except DamagedInput:
        done, damaged = {}, f"{paths.rel(done_path)} cannot be read as a DONE marker"
    if done and (stage.get("hash") is None or done.get("config_hash") == stage.get("hash")):
        # size and mtime (a hash only where the mtime moved); --verify: every hash
        damage = check_outputs(paths.root, done, full=verify, hash_small=False)
        if damage:
            damaged = summary(damage)
        else:
            row["done"] = True
            row["finished_at"] = done.get("finished_at")

    # the Slurm job that covers this task: the newest one that surely does; a newer one we cannot place wins
    chosen = unknown = None
    for base, explicit in reversed(jobs):
        if task is None:  # a one-task stage: its newest job, whatever rows Slurm shows for it
            keys = sorted((k for k in (*squeue, *sacct) if k[0] == base), key=lambda k: (k[1] is not None,))
            chosen = (base, keys[0][1] if keys else None, bool(keys))
            break
        covers = _covers(base, explicit, task, sacct, squeue, known)
        if covers:
            chosen = (base, task, True)
            break
        if covers is None and unknown is None:
            unknown = (base, task, False)
    if unknown is not None and (chosen is None or not row["done"]):
        chosen = unknown

    slurm = None
    if chosen is None and stage.get("job_ids"):
        row["job_id"] = str(stage["job_ids"][-1])  # not a Slurm job: "local"
    if chosen is not None:
        base, t, known = chosen
        row["job_id"] = job_ref(base, t)
        slurm = _slurm_row(base, t, sacct, squeue) if known else None
        if slurm is not None:
            row.update({k: slurm[k] for k in ("reason", "elapsed_s", "exit_code", "node", "start", "end")})
            if phase(slurm["state"]) in (PENDING, RUNNING):
                row["exit_code"] = None  # sacct says 0:0 for a job that has not ended
            row["slurm_state"] = slurm["state"]
            row["name"] = slurm.get("name")
            row.update({k: slurm.get(k) for k in ("submit", "time_left_s", "expected_start", "restarts")})
            if phase(slurm["state"]) != RUNNING:  # squeue keeps a finished job a while, with its time limit left
                row["time_left_s"] = None
            if phase(slurm["state"]) != PENDING:
                row["expected_start"] = None
        else:
            row["slurm_state"] = "?"
            if task is not None:
                row["job_id"] = base  # which of its tasks is this one's, Slurm cannot tell us yet
            if not slurm_ok:
                row["note"] = "Slurm state unavailable"
            elif (base, None) in sacct or (base, None) in squeue:
                row["note"] = "Slurm shows the array but not its tasks yet"
            else:
                row["note"] = "squeue and sacct do not know this job"

    if row["done"]:
        row["state"] = "done"
    elif damaged is not None:
        row["state"] = "damaged"
        row["note"] = f"{damaged}: rerun the run's command to redo it"
    elif slurm is not None and _from_slurm(slurm) in ("running", "pending"):
        row["state"] = _from_slurm(slurm)
    elif done is not None:
        row["state"] = "changed"
        row["note"] = "DONE marker from another config"
    elif slurm is not None:
        row["state"] = _from_slurm(slurm)
        if slurm["state"] == "COMPLETED":
            row["note"] = "job ended without a DONE marker"
    elif chosen is not None:
        row["state"] = "unknown"
    else:  # no Slurm job: a local run (or not submitted yet): the manifest says what the runner is doing
        manifest_state = stage.get("state")
        started = done_path.with_name(done_path.name + ".started") if done_path is not None else None  # rundir.started
        if manifest_state == "failed":
            row["state"] = "failed"
        elif manifest_state == "running" and started is not None and started.is_file():
            row["state"] = "running"
        else:
            row["state"] = "pending"
            if manifest_state == "done":
                row["note"] = "no DONE marker"
    return row


def _aggregate(states: list[str]) -> str:
    if all(s == "done" for s in states):
        return "done"
    for s in ("running", "pending", "unknown"):
        if s in states:
            return s
    for s in ("failed", "damaged", "changed"):
        if s in states:
            return s
    return "blocked"


def _span(rows: list[dict], now: float) -> Optional[float]:
    """The stage's wall time from its tasks' Slurm start and end times (now for a task still running)."""
    starts, ends = [], []
    for row in rows:
        try:
            if row.get("start"):
                starts.append(datetime.fromisoformat(row["start"]).timestamp())
                ends.append(datetime.fromisoformat(row["end"]).timestamp() if row.get("end") else now)
        except ValueError:
            return None
    return max(ends) - min(starts) if starts else None


def index_offsets(stages: list[dict]) -> dict[str, int]:
    """{array job id: index_offset} of the split arrays in the manifest (contract: absent = 0, left out)."""
    out = {}
    for stage in stages:
        for sub in stage.get("submissions") or []:
            if isinstance(sub, dict) and isinstance(sub.get("index_offset"), int) and sub["index_offset"]:
                out[str(sub.get("job_id"))] = sub["index_offset"]
    return out


def _shifted(rows: dict, offsets: dict[str, int]) -> dict:
    return {(base, task + offsets[base] if task is not None and base in offsets else task): row
            for (base, task), row in rows.items()}


def _slurm_refs(rows: list[dict], offsets: dict[str, int]) -> None:
    """A row's job id as Slurm names it (`<array>_<index>`, index = task - offset), for scancel and the logs."""
    for row in rows:
        parsed = parse_job_id(row["job_id"] or "")
        if parsed and parsed[0] in offsets and parsed[1]:
            row["job_id"] = job_ref(parsed[0], next(iter(parsed[1])) - offsets[parsed[0]])


def collect(run_dir: Path, run_slurm=query_slurm, verify: bool = False) -> dict:
    """Everything the table shows, as a dict (what --json prints). `verify`: hash every file DONE markers record."""
    return collect_runs([run_dir], run_slurm, verify)[0]


def collect_runs(run_dirs: list, run_slurm=query_slurm, verify: bool = False) -> list[dict]:
    """collect() of several runs (a sweep's points) with one squeue and one sacct call for all of them."""
    prepared = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        manifest = load_manifest(run_dir)
        stages = [s for s in manifest["stages"] if isinstance(s, dict)]
        jobs = {s.get("id"): [p for p in (parse_job_id(j) for j in s.get("job_ids") or []) if p] for s in stages}
        bases = sorted({base for js in jobs.values() for base, _ in js}, key=int)
        prepared.append((manifest, RunPaths(run_dir.resolve()), stages, jobs, bases))
    every_base = sorted({b for *_, bases in prepared for b in bases}, key=int)
    sacct, squeue, problems = {}, {}, []
    if every_base:
        sacct, squeue, problems = run_slurm(every_base)
    known = _known_bases(sacct, squeue)
    return [_collect_one(*p, sacct, squeue, problems, known, verify) for p in prepared]


def _timestamp(iso: Optional[str]) -> Optional[float]:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


class _Config:
    """The run's config.yaml, read once and only when a task's progress needs a total from it."""

    def __init__(self, paths: RunPaths):
        self.paths, self.value = paths, None

    def __call__(self) -> dict:
        if self.value is None:
            self.value = taskprogress.run_config(self.paths.config)
        return self.value


LOG_LINES = 5


def log_path(paths: RunPaths, stage: dict, row: dict) -> Optional[Path]:
    """The Slurm log of the task's job (launch/render.py: logs/r<round>_<stage>_%A_%a.out for an array task,
    _%j.out for a one-task job); None for a local task or a job id Slurm has not placed yet."""
    job = row.get("job_id") or ""
    parsed = parse_job_id(job)
    if parsed is None:
        return None
    base, tasks = parsed
    prefix = f"r{stage.get('round')}_{stage.get('stage')}_"
    if stage.get("tasks") is None:
        return paths.root / "logs" / f"{prefix}{base}.out"
    if not tasks or len(tasks) != 1:
        return None
    return paths.root / "logs" / f"{prefix}{base}_{min(tasks)}.out"


def _add_live(stage: dict, row: dict, paths: RunPaths, config: _Config, now: float) -> None:
    """Progress of a running task; log path and last lines of a failed one (read only for those)."""
    r, name, task = stage.get("round"), stage.get("stage"), row["task"]
    if row["state"] == "running":
        start = _timestamp(row.get("start"))
        if start is None:  # a local task: its .started marker says when
            started = _done_path(paths, r, name, task)
            try:
                start = started.with_name(started.name + ".started").stat().st_mtime if started else None
            except OSError:
                start = None
        try:
            row["progress"] = taskprogress.task_progress(paths, int(r), name, task, start, now, config)
        except (TypeError, ValueError):
            row["progress"] = None
    elif row["state"] == "failed":
        path = log_path(paths, stage, row)
        if path is not None:
            row["log"] = paths.display(path)
            lines = taskprogress.tail_lines(path, 4096)
            row["log_tail"] = lines[-LOG_LINES:] if path.is_file() else None


def _collect_one(manifest: dict, paths: RunPaths, stages: list, jobs: dict, bases: list, sacct: dict,
                 squeue: dict, problems: list, known: set, verify: bool) -> dict:
    offsets = index_offsets(stages)
    if offsets:  # Slurm's rows of a split array, keyed by the run's task (index + offset) like every other row
        sacct, squeue = _shifted(sacct, offsets), _shifted(squeue, offsets)
    slurm_ok = bool(bases) and not problems
    now = time.time()
    config = _Config(paths)

    out_stages, by_id = [], {}
    for stage in stages:
        tasks = stage.get("tasks")
        rows = [_task_row(stage, t, jobs.get(stage.get("id"), []), sacct, squeue, paths, slurm_ok, verify, known)
                for t in (tasks if isinstance(tasks, list) else [None])]
        if offsets:
            _slurm_refs(rows, offsets)
        upstream = [by_id.get(d, {}).get("state") for d in stage.get("depends_on") or []]
        if any(u in ("failed", "blocked", "changed", "damaged") for u in upstream):
            for row in rows:  # never submitted, or waiting locally, behind a stage that will not finish
                if row["state"] == "pending" and row["slurm_state"] is None:
                    row["state"] = "blocked"
                    row["note"] = "an upstream stage failed, is blocked or damaged"
        for row in rows:
            _add_live(stage, row, paths, config, now)
        seconds = stage.get("seconds")
        if seconds is None:
            seconds = rows[0]["elapsed_s"] if tasks is None else _span(rows, now)
        entry = {"id": stage.get("id"), "round": stage.get("round"), "stage": stage.get("stage"),
                 "hash": stage.get("hash"), "depends_on": stage.get("depends_on") or [],
                 "manifest_state": stage.get("state"), "job_ids": [str(j) for j in stage.get("job_ids") or []],
                 "started": stage.get("started"), "ended": stage.get("ended"),
                 "state": _aggregate([r["state"] for r in rows]),
                 "seconds": round(seconds, 2) if seconds is not None else None,
                 "array": tasks is not None, "tasks": rows}
        by_id[entry["id"]] = entry
        out_stages.append(entry)

    counts: dict = {}
    task_counts: dict = {}
    for s in out_stages:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
        for row in s["tasks"]:
            task_counts[row["state"]] = task_counts.get(row["state"], 0) + 1
    note = None
    if problems:
        note = f"Slurm: {'; '.join(problems)} — showing what the manifest and DONE markers say"
    return {"run": manifest.get("run"), "run_dir": str(paths.root), "config_hash": manifest.get("config_hash"),
            "time": datetime.now().astimezone().isoformat(timespec="seconds"),
            "slurm": {"queried": bool(bases), "job_ids": bases, "problems": problems}, "note": note,
            "counts": counts, "task_counts": task_counts,
            "finished": all(s["state"] in TERMINAL for s in out_stages),
            "all_done": all(s["state"] == "done" for s in out_stages), "stages": out_stages}


# ---------------------------------------------------------------------------------------------------------------
# Rendering

def _slurm_text(row: dict) -> str:
    if row["slurm_state"] is None:
        return "-"
    text = row["slurm_state"]
    if row.get("reason") and (phase(row["slurm_state"]) == PENDING or row["slurm_state"] == "FAILED"):
        text += f" ({row['reason']})"
    return text


def _progress_text(p: Optional[dict]) -> str:
    if not p:
        return "-"
    total = p["total"] if p.get("total") is not None else "?"
    return f"{p['done']}/{total} {p.get('unit') or ''}".rstrip()


def _clock(iso: Optional[str], now: datetime) -> str:
    """An expected start: the time of day when it is today, else the date and time."""
    if not iso:
        return "-"
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return when.strftime("%H:%M:%S") if when.date() == now.date() else when.strftime("%m-%d %H:%M")


# tasks listed one per row; a stage with more lists only those worth a look (running, failed, ...) up to this many
SHOWN_TASKS = 40
QUIET = ("done", "pending", "blocked")  # states a long stage sums up in one line instead of one row per task


def _table(report: dict, max_tasks: int) -> tuple[list, list]:
    """The table's rows and the failed tasks' log lines."""
    now = datetime.now()
    table, failures = [], []
    for s in report["stages"]:
        rows = s["tasks"]
        if s["array"]:
            n = len(rows)
            unit = LABELS.get(s["stage"], ("task", "tasks"))[1 if n != 1 else 0]
            slurm_states: dict = {}
            for r in rows:
                if r["slurm_state"]:
                    slurm_states[r["slurm_state"]] = slurm_states.get(r["slurm_state"], 0) + 1
            summary = ", ".join(f"{v} {k}" for k, v in slurm_states.items())
            done = sum(r["state"] == "done" for r in rows)
            jobs = ",".join(sorted({r["job_id"].split("_")[0] for r in rows if r["job_id"]},
                                   key=lambda j: (not j.isdigit(), int(j) if j.isdigit() else 0, j)))
            etas = [r["progress"]["eta_s"] for r in rows if r["progress"] and r["progress"].get("eta_s") is not None]
            table.append((s["id"], f"{n} {unit}", jobs or "-", s["state"], summary or "-", fmt_seconds(s["seconds"]),
                          "", "", f"{done}/{n}", fmt_seconds(max(etas)) if etas else "-", "-", "-", "-",
                          f"{done}/{n} done" if done < n else ""))
        shown = rows
        if len(rows) > max_tasks:
            shown = [r for r in rows if r["state"] not in QUIET][:max_tasks]
        for r in shown:
            elapsed = r["elapsed_s"] if s["array"] or r["elapsed_s"] is not None else s["seconds"]
            if phase(r["slurm_state"]) == PENDING:
                elapsed = None
            p = r.get("progress")
            eta = fmt_seconds(p["eta_s"]) if p and p.get("eta_s") is not None else "-"
            restarts = r.get("restarts")
            table.append((s["id"], r["label"], r["job_id"] or "-", r["state"], _slurm_text(r),
                          fmt_seconds(elapsed), r["exit_code"] or "-", r["node"] or "-", _progress_text(p), eta,
                          fmt_seconds(r.get("time_left_s")), _clock(r.get("expected_start"), now),
                          str(restarts) if restarts is not None else "-", r["note"] or ""))
            if r["state"] == "failed" and r.get("log"):
                failures.append(f"{s['id']} {r['label']} ({r['job_id']}): {r['log']}"
                                + ("" if r.get("log_tail") is not None else " (no such file)"))
                failures += [f"  | {line}" for line in r.get("log_tail") or []]
        if len(shown) < len(rows):
            hidden: dict = {}
            for r in rows:
                if r not in shown:
                    hidden[r["state"]] = hidden.get(r["state"], 0) + 1
            table.append((s["id"], f"+{len(rows) - len(shown)} more", "", "", "", "", "", "", "", "", "", "", "",
                          ", ".join(f"{v} {k}" for k, v in hidden.items())))
    return table, failures


HEADER = ("STAGE", "TASK", "JOB", "STATE", "SLURM", "ELAPSED", "EXIT", "NODE", "PROGRESS", "ETA", "LEFT", "START",
          "REQ", "NOTE")


def _lines(header: tuple, table: list, right: set) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]

    def line(row):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(r) for r in table)]


def render(report: dict, max_tasks: int = SHOWN_TASKS) -> str:
    """The run's table; below it, each failed task's log file and its last lines."""
    table, failures = _table(report, max_tasks)
    counts = ", ".join(f"{v} {k}" for k, v in report["counts"].items())
    lines = [f"run '{report['run']}'  {report['run_dir']}  {report['time']}",
             f"{len(report['stages'])} stages: {counts or 'none'}"]
    if report["note"]:
        lines.append(report["note"])
    lines += ["", *_lines(HEADER, table, {5, 9, 10, 12})]
    if failures:
        lines += ["", "failed tasks (log, last lines):", *failures]
    return "\n".join(lines)


def _summary_row(report: dict) -> tuple:
    tasks = report["task_counts"]
    total = sum(tasks.values())
    stages = report["stages"]
    current = next((s for s in stages if s["state"] not in ("done",)), None)
    etas = [r["progress"]["eta_s"] for s in stages for r in s["tasks"]
            if r.get("progress") and r["progress"].get("eta_s") is not None]
    state = "done" if report["all_done"] else ("stopped" if report["finished"] else "active")
    return (report["run"] or "?", state, f"{report['counts'].get('done', 0)}/{len(stages)}",
            f"{tasks.get('done', 0)}/{total}", str(tasks.get("running", 0)), str(tasks.get("pending", 0)),
            str(sum(tasks.get(k, 0) for k in ("failed", "damaged", "changed", "blocked"))),
            f"{current['id']} {current['state']}" if current else "-", fmt_seconds(max(etas)) if etas else "-",
            report["run_dir"])


def render_many(reports: list[dict], max_tasks: int = SHOWN_TASKS, title: Optional[str] = None) -> str:
    """Several runs (a sweep's points): one summary line per run, then each run's table."""
    header = ("RUN", "STATE", "STAGES", "TASKS", "RUNNING", "PENDING", "FAILED", "AT", "ETA", "DIRECTORY")
    lines = [title or f"{len(reports)} runs", "", *_lines(header, [_summary_row(r) for r in reports], {8})]
    for report in reports:
        lines += ["", "=" * 20, render(report, max_tasks)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------

def load_sweep(folder: Path) -> dict:
    """A sweep record (<run.root>/<sweep>/sweep.json, written by `python -m oel_hpc -m ...`): its points' run
    directories resolved (relative ones against the record's folder)."""
    path = folder / SWEEP_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(str(path), f"cannot read it ({e})") from None
    points = record.get("points") if isinstance(record, dict) else None
    if not isinstance(points, list) or not all(isinstance(p, dict) and p.get("run_dir") for p in points):
        raise ConfigError(str(path), "not a sweep record (no 'points' list with a run_dir each)")
    for p in points:
        p["path"] = folder / p["run_dir"]
    return record


SWEEP_RECORD = "sweep.json"


def resolve_runs(args: list[Path]) -> tuple[list[Path], Optional[dict]]:
    """The run directories named: each argument is a run directory or a sweep's folder (its points, in order).
    Also the sweep record when exactly one sweep folder was named (its title and parameters)."""
    runs, sweeps = [], []
    for arg in args:
        if (arg / SWEEP_RECORD).is_file() and not RunPaths(arg).manifest.is_file():
            sweep = load_sweep(arg)
            sweeps.append(sweep)
            runs += [p["path"] for p in sweep["points"]]
        else:
            runs.append(arg)
    return runs, sweeps[0] if len(sweeps) == 1 and len(args) == 1 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Every stage and array task of OEL runs: Slurm job, state, elapsed time, exit code, "
        "node, progress and ETA of running tasks, time left, expected start, requeues, logs of failed tasks (from "
        "manifest.json, one squeue and one sacct call, the DONE markers and the tasks' progress records).",
        epilog="Exit status: 0; 2 for bad input. With --watch: 0 when every stage of every run is done, 1 when "
        "they all stopped with a stage failed or blocked, 130 on Ctrl-C.")
    parser.add_argument("run_dir", type=Path, nargs="+",
                        help="run directories (run.root/run.name), or a sweep's folder (holding sweep.json)")
    parser.add_argument("--watch", type=float, metavar="SECONDS",
                        help="refresh every SECONDS until every stage is done or failed")
    parser.add_argument("--json", action="store_true",
                        help="print the data as JSON (with --watch: one JSON object per line per refresh); "
                        "several runs: {\"runs\": [...]}")
    parser.add_argument("--verify", action="store_true",
                        help="hash every file the DONE markers record (default: size and mtime, and the hash of "
                        "small files or files whose mtime changed)")
    parser.add_argument("--tasks", type=int, default=SHOWN_TASKS, metavar="N",
                        help=f"a stage with more than N tasks lists only its running, failed, ... ones (at most N) "
                        f"and sums up the rest in one line (default {SHOWN_TASKS})")
    parser.add_argument("--html", type=Path, metavar="FILE",
                        help="also write FILE: one self-contained HTML page with the tables and plots (no server, "
                        "no network; with --watch rewritten at each refresh)")
    args = parser.parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        raise ConfigError("--watch", f"needs a positive number of seconds, not {args.watch:g}")
    if args.tasks < 0:
        raise ConfigError("--tasks", f"needs a number >= 0, not {args.tasks}")
    if args.html is not None and not args.html.parent.is_dir():
        raise ConfigError("--html", f"{args.html.parent} is not a directory")
    runs, sweep = resolve_runs(args.run_dir)
    several = len(runs) > 1 or sweep is not None
    tty = sys.stdout.isatty()
    try:
        while True:
            reports = collect_runs(runs, verify=args.verify)  # bad input: a ConfigError, one line, exit 2
            if args.html is not None:
                from oel_hpc import report as html_report  # only here: the plain table stays quick to start
                html_report.write(args.html, reports, sweep)
            if args.json:
                data = {"sweep": sweep and {k: v for k, v in sweep.items() if k != "points"}, "runs": reports} \
                    if several else reports[0]
                text = json.dumps(data, indent=None if args.watch else 2, default=str)
            elif several:
                title = f"sweep '{sweep.get('sweep')}': {len(runs)} runs" if sweep else None
                text = render_many(reports, args.tasks, title)
            else:
                text = render(reports[0], args.tasks)
            if args.watch and tty and not args.json:
                sys.stdout.write("\033[H\033[2J")  # clear the screen between refreshes
            elif args.watch and not args.json:
                text += "\n"
            print(text, flush=True)
            if args.watch is None:
                return 0
            if all(r["finished"] for r in reports):
                return 0 if all(r["all_done"] for r in reports) else 1
            time.sleep(args.watch)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        return 0


def cli() -> None:
    with exit_on_error(PROG):  # the exit-status rule of every entry point (oel_hpc/errors.py)
        sys.exit(main())


if __name__ == "__main__":
    cli()
