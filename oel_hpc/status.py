"""`python -m oel_hpc.status <run-dir> [--watch SECONDS] [--json]`: every stage and array task of a run.

For each stage of the run's manifest.json and each of its tasks (extract: seed, evaluate: checkpoint step): the
Slurm job id (`<id>` or `<id>_<task>`), state, elapsed time, exit code and node, from one `squeue` and one `sacct`
call per refresh. The DONE markers on disk are the ground truth for "done". A local run (no Slurm job ids) is shown
from the manifest and the DONE markers alone, without calling Slurm.

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
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from oel_hpc.rundir import RunPaths

PROG = "python -m oel_hpc.status"
SACCT_FIELDS = ("JobID", "JobName", "State", "Elapsed", "ExitCode", "NodeList", "Start", "End")
SQUEUE_FORMAT = "%i|%T|%M|%R|%N"
SLURM_TIMEOUT = 30.0

# Slurm job states → ours. A task's state is one of: done, running, pending, failed, blocked (will never run:
# upstream failed), changed (a DONE marker from another config), unknown.
ACTIVE_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                  "RESIZING"}
ACTIVE_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
TERMINAL = {"done", "failed", "blocked", "changed"}
NEVER_REASONS = {"DependencyNeverSatisfied"}  # a pending job that will never start
LABELS = {"extract": ("seed", "seeds"), "evaluate": ("step", "steps")}


class BadRun(Exception):
    """Bad input: reported in one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Job ids and Slurm output

_JOB = re.compile(r"^(?P<base>\d+)(?:_(?:(?P<task>\d+)|\[(?P<spec>[^\]]*)\]))?$")


def expand_indices(spec: str) -> list[int]:
    """`1,3-5`, `2-8:2` or `0-9%2` (a throttled array) → the array indices."""
    spec = spec.split("%", 1)[0]
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1, int(step or 1)))
    return out


def parse_job_id(text: str) -> Optional[tuple[str, Optional[set[int]]]]:
    """`123` → ('123', None); `123_4` → ('123', {4}); `123_[2-5]` → ('123', {2,3,4,5}); not Slurm → None."""
    m = _JOB.match(str(text).strip())
    if not m:
        return None
    if m["task"] is not None:
        return m["base"], {int(m["task"])}
    if m["spec"] is not None:
        return m["base"], set(expand_indices(m["spec"]))
    return m["base"], None


def seconds_of(text: str) -> Optional[int]:
    """Slurm durations: `MM:SS`, `HH:MM:SS`, `D-HH:MM:SS` (sacct, squeue) → seconds."""
    text = (text or "").strip()
    m = re.match(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$", text)
    if not m:
        return None
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def _time(text: Optional[str]) -> Optional[str]:
    return text if text and text not in ("Unknown", "None", "N/A") else None


def parse_sacct(out: str) -> dict:
    """{(base, task or None): row}; compressed pending rows (`123_[2-5]`) are expanded; a bare `123` row of an
    array (sacct shows one briefly right after the tasks run) is kept under task None."""
    rows = {}
    for line in out.splitlines():
        values = line.split("|")
        if len(values) < len(SACCT_FIELDS):
            continue
        row = dict(zip(SACCT_FIELDS, values))
        parsed = parse_job_id(row["JobID"])
        if parsed is None:
            continue
        state = row["State"].split()[0] if row["State"] else ""
        node = row["NodeList"] if row["NodeList"] not in ("", "None assigned", "(null)") else None
        info = {"state": state, "reason": None, "elapsed_s": seconds_of(row["Elapsed"]),
                "exit_code": row["ExitCode"] or None, "node": node, "name": row["JobName"] or None,
                "start": _time(row["Start"]), "end": _time(row["End"])}
        base, tasks = parsed
        for task in sorted(tasks) if tasks is not None else [None]:
            rows[(base, task)] = dict(info)
    return rows


def parse_squeue(out: str) -> dict:
    """{(base, task or None): row} from `squeue -o '%i|%T|%M|%R|%N'`; `123_[2-5]` rows are expanded."""
    rows = {}
    for line in out.splitlines():
        values = line.strip().split("|")
        if len(values) < 5:
            continue
        jobid, state, elapsed, reason_or_nodes, nodes = values[:5]
        parsed = parse_job_id(jobid)
        if parsed is None:
            continue
        reason = reason_or_nodes[1:-1] if reason_or_nodes.startswith("(") else None
        if reason in ("None", ""):
            reason = None
        info = {"state": state, "reason": reason, "elapsed_s": seconds_of(elapsed), "node": nodes or None}
        base, tasks = parsed
        for task in sorted(tasks) if tasks is not None else [None]:
            rows[(base, task)] = dict(info)
    return rows


def query_slurm(bases: list[str]) -> tuple[dict, dict, list[str]]:
    """One sacct and one squeue call, run side by side: (sacct rows, squeue rows, problems)."""
    ids = ",".join(bases)
    commands = {
        "sacct": ["sacct", "-X", "-n", "-P", "-j", ids, "--format=" + ",".join(SACCT_FIELDS)],
        # -t all: slurmctld still knows tasks that ended in the last MinJobAge seconds, when sacct may lag
        "squeue": ["squeue", "-h", "-t", "all", "-j", ids, "-o", SQUEUE_FORMAT],
    }
    problems, procs, outs = [], {}, {"sacct": "", "squeue": ""}
    for name, cmd in commands.items():
        if shutil.which(cmd[0]) is None:
            problems.append(f"{name} not found")
            continue
        try:
            procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           stdin=subprocess.DEVNULL)
        except OSError as e:
            problems.append(f"{name} cannot run ({e})")
    deadline = time.monotonic() + SLURM_TIMEOUT
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            problems.append(f"{name} timed out after {SLURM_TIMEOUT:.0f} s")
            continue
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        if proc.returncode != 0:
            if name == "squeue" and any("Invalid job id" in ln for ln in lines):
                continue  # every id has left slurmctld's memory: nothing queued, sacct has the rest
            problems.append(f"{name} failed ({lines[-1].strip() if lines else f'exit {proc.returncode}'})")
            continue
        outs[name] = out
    return parse_sacct(outs["sacct"]), parse_squeue(outs["squeue"]), problems


# ---------------------------------------------------------------------------------------------------------------
# Collecting the report

def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_manifest(run_dir: Path) -> dict:
    if not run_dir.exists():
        raise BadRun(f"no such run directory: {run_dir}")
    if not run_dir.is_dir():
        raise BadRun(f"not a directory: {run_dir}")
    path = RunPaths(run_dir).manifest
    if not path.is_file():
        raise BadRun(f"{run_dir} has no manifest.json (not a run directory, or its launcher has not started yet)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadRun(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), list):
        raise BadRun(f"{path} is not a run manifest (no 'stages' list)")
    return manifest


def task_label(stage: str, task: Optional[int]) -> str:
    return "-" if task is None else f"{LABELS.get(stage, ('task',))[0]} {task}"


def _from_slurm(row: dict) -> str:
    state = row["state"]
    if state in ACTIVE_RUNNING:
        return "running"
    if state in ACTIVE_PENDING:
        return "blocked" if row.get("reason") in NEVER_REASONS else "pending"
    if state in FINAL:
        return "failed"  # COMPLETED without a DONE marker included: the task did not finish its work
    return "unknown"


def _slurm_row(base: str, task: Optional[int], sacct: dict, squeue: dict) -> Optional[dict]:
    """squeue's state is the current one; sacct adds exit code and times (when it agrees on the state)."""
    q, a = squeue.get((base, task)), sacct.get((base, task))
    if q is None and a is None:
        return None
    row = {"state": None, "reason": None, "elapsed_s": None, "exit_code": None, "node": None, "name": None,
           "start": None, "end": None}
    if a is not None:
        row.update(a)
    if q is not None:
        if a is not None and a["state"] != q["state"]:
            row.update(exit_code=None, end=None)
            if q["state"] in ACTIVE_PENDING:
                row["start"] = None
        row.update({k: v for k, v in q.items() if v is not None or k == "reason"})
    return row


def _covers(base: str, explicit: Optional[set], task: int, sacct: dict, squeue: dict) -> Optional[bool]:
    """Does this job cover the task? None: cannot tell (Slurm knows no task rows of it yet, or failed)."""
    if explicit is not None:
        return task in explicit
    keys = [k for k in (*sacct, *squeue) if k[0] == base]
    if (base, task) in sacct or (base, task) in squeue:
        return True
    if not keys or (base, None) in sacct or (base, None) in squeue:
        return None
    return False


def _done_path(paths: RunPaths, r, stage: str, task: Optional[int]) -> Optional[Path]:
    try:
        return paths.done(int(r), stage, task)
    except (KeyError, TypeError, ValueError):  # a stage this version does not know
        return None


def _task_row(stage: dict, task: Optional[int], jobs: list, sacct: dict, squeue: dict, paths: RunPaths,
              slurm_ok: bool) -> dict:
    r, name = stage.get("round"), stage.get("stage")
    row = {"task": task, "label": task_label(name, task), "job_id": None, "state": "unknown",
           "slurm_state": None, "reason": None, "elapsed_s": None, "exit_code": None, "node": None,
           "start": None, "end": None, "name": None, "done": False, "finished_at": None, "note": None}
    done_path = _done_path(paths, r, name, task)
    done = _read_json(done_path) if done_path is not None else None
    if done is not None:
        if stage.get("hash") is None or done.get("config_hash") == stage.get("hash"):
            row["done"] = True
            row["finished_at"] = done.get("finished_at")

    # the Slurm job that covers this task: the newest one that surely does; a newer one we cannot place wins
    chosen = unknown = None
    for base, explicit in reversed(jobs):
        if task is None:  # a one-task stage: its newest job, whatever rows Slurm shows for it
            keys = sorted((k for k in (*squeue, *sacct) if k[0] == base), key=lambda k: (k[1] is not None,))
            chosen = (base, keys[0][1] if keys else None, bool(keys))
            break
        covers = _covers(base, explicit, task, sacct, squeue)
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
        row["job_id"] = base if t is None else f"{base}_{t}"
        slurm = _slurm_row(base, t, sacct, squeue) if known else None
        if slurm is not None:
            row.update({k: slurm[k] for k in ("reason", "elapsed_s", "exit_code", "node", "start", "end")})
            if slurm["state"] in ACTIVE_PENDING | ACTIVE_RUNNING:
                row["exit_code"] = None  # sacct says 0:0 for a job that has not ended
            row["slurm_state"] = slurm["state"]
            row["name"] = slurm.get("name")
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
        started = done_path.with_name(done_path.name + ".started") if done_path is not None else None
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
    return "failed" if "failed" in states else ("changed" if "changed" in states else "blocked")


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


def collect(run_dir: Path, run_slurm=query_slurm) -> dict:
    """Everything the table shows, as a dict (what --json prints)."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    paths = RunPaths(run_dir.resolve())
    stages = [s for s in manifest["stages"] if isinstance(s, dict)]
    jobs = {s.get("id"): [p for p in (parse_job_id(j) for j in s.get("job_ids") or []) if p] for s in stages}
    bases = sorted({base for js in jobs.values() for base, _ in js}, key=int)
    sacct, squeue, problems = {}, {}, []
    if bases:
        sacct, squeue, problems = run_slurm(bases)
    slurm_ok = bool(bases) and not problems
    now = time.time()

    out_stages, by_id = [], {}
    for stage in stages:
        tasks = stage.get("tasks")
        rows = [_task_row(stage, t, jobs.get(stage.get("id"), []), sacct, squeue, paths, slurm_ok)
                for t in (tasks if isinstance(tasks, list) else [None])]
        upstream = [by_id.get(d, {}).get("state") for d in stage.get("depends_on") or []]
        if any(u in ("failed", "blocked", "changed") for u in upstream):
            for row in rows:  # never submitted, or waiting locally, behind a stage that will not finish
                if row["state"] == "pending" and row["slurm_state"] is None:
                    row["state"] = "blocked"
                    row["note"] = "an upstream stage failed or is blocked"
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
    for s in out_stages:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    note = None
    if problems:
        note = f"Slurm: {'; '.join(problems)} — showing what the manifest and DONE markers say"
    return {"run": manifest.get("run"), "run_dir": str(paths.root), "config_hash": manifest.get("config_hash"),
            "time": datetime.now().astimezone().isoformat(timespec="seconds"),
            "slurm": {"queried": bool(bases), "job_ids": bases, "problems": problems}, "note": note,
            "counts": counts, "finished": all(s["state"] in TERMINAL for s in out_stages),
            "all_done": all(s["state"] == "done" for s in out_stages), "stages": out_stages}


# ---------------------------------------------------------------------------------------------------------------
# Rendering

def fmt_seconds(s) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s" if s != int(s) else f"{int(s)}s"
    s = int(round(s))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    text = f"{h}:{m:02d}:{s:02d}" if h or d else f"{m}:{s:02d}"
    return f"{d}-{text}" if d else text


def _slurm_text(row: dict) -> str:
    if row["slurm_state"] is None:
        return "-"
    text = row["slurm_state"]
    if row.get("reason") and row["slurm_state"] in ACTIVE_PENDING | {"FAILED"}:
        text += f" ({row['reason']})"
    return text


def render(report: dict) -> str:
    header = ("STAGE", "TASK", "JOB", "STATE", "SLURM", "ELAPSED", "EXIT", "NODE", "NOTE")
    table = []
    for s in report["stages"]:
        if s["array"]:
            n = len(s["tasks"])
            unit = LABELS.get(s["stage"], ("task", "tasks"))[1 if n != 1 else 0]
            slurm_states: dict = {}
            for r in s["tasks"]:
                if r["slurm_state"]:
                    slurm_states[r["slurm_state"]] = slurm_states.get(r["slurm_state"], 0) + 1
            summary = ", ".join(f"{v} {k}" for k, v in slurm_states.items())
            done = sum(r["state"] == "done" for r in s["tasks"])
            jobs = ",".join(sorted({r["job_id"].split("_")[0] for r in s["tasks"] if r["job_id"]},
                                   key=lambda j: (not j.isdigit(), int(j) if j.isdigit() else 0, j)))
            table.append((s["id"], f"{n} {unit}", jobs or "-", s["state"], summary or "-", fmt_seconds(s["seconds"]),
                          "", "", f"{done}/{n} done" if done < n else ""))
        for r in s["tasks"]:
            elapsed = r["elapsed_s"] if s["array"] or r["elapsed_s"] is not None else s["seconds"]
            if r["slurm_state"] in ACTIVE_PENDING:
                elapsed = None
            table.append((s["id"], r["label"], r["job_id"] or "-", r["state"], _slurm_text(r),
                          fmt_seconds(elapsed), r["exit_code"] or "-", r["node"] or "-", r["note"] or ""))
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    right = {5}

    def line(row):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    counts = ", ".join(f"{v} {k}" for k, v in report["counts"].items())
    lines = [f"run '{report['run']}'  {report['run_dir']}  {report['time']}",
             f"{len(report['stages'])} stages: {counts or 'none'}"]
    if report["note"]:
        lines.append(report["note"])
    lines += ["", line(header), *(line(r) for r in table)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Every stage and array task of an OEL run: Slurm job, state, elapsed time, "
        "exit code, node (from manifest.json, squeue/sacct and the DONE markers).",
        epilog="Exit status: 0; 2 for bad input. With --watch: 0 when every stage is done, 1 when the run stopped "
        "with a stage failed or blocked, 130 on Ctrl-C.")
    parser.add_argument("run_dir", type=Path, help="the run directory (run.root/run.name)")
    parser.add_argument("--watch", type=float, metavar="SECONDS",
                        help="refresh every SECONDS until every stage is done or failed")
    parser.add_argument("--json", action="store_true",
                        help="print the data as JSON (with --watch: one JSON object per line per refresh)")
    args = parser.parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        print(f"{PROG}: error: --watch needs a positive number of seconds, not {args.watch:g}", file=sys.stderr)
        return 2
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                report = collect(args.run_dir)
            except BadRun as e:
                print(f"{PROG}: error: {e}", file=sys.stderr)
                return 2
            if args.json:
                text = json.dumps(report, indent=None if args.watch else 2)
            else:
                text = render(report)
            if args.watch and tty and not args.json:
                sys.stdout.write("\033[H\033[2J")  # clear the screen between refreshes
            elif args.watch and not args.json:
                text += "\n"
            print(text, flush=True)
            if args.watch is None:
                return 0
            if report["finished"]:
                return 0 if report["all_done"] else 1
            time.sleep(args.watch)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    from oel_hpc.errors import exit_on_error

    with exit_on_error(PROG):  # the rule of every entry point (oel_hpc/errors.py) for what main() does not catch
        sys.exit(main())
