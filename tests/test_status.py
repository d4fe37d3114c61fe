"""`python -m oel_hpc.status`: the run dashboard.

Without Slurm: a run directory made by the real local pipeline (every stage done, wall times), a removed DONE
marker, bad input, Slurm commands missing, Ctrl-C in --watch, and how squeue/sacct rows are read (compressed
pending arrays, the bare `<id>` row sacct shows right after an array ran).
With the real test cluster (skipped unless SLURM_CONF is set and sinfo works): real jobs submitted by hand, an
array with a failing task, a dependent job that can never run, a held array, a resubmission of one task, and a
manifest written by hand that refers to them. Every wait polls with a timeout.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from oel_hpc import slurm, status
from oel_hpc.rundir import RunPaths, write_json_atomic
from tests import conftest
from tests.conftest import ROOT

TIMEOUT = 30.0
POLL = 0.2


def cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "oel_hpc.status", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def wait_until(predicate, what, timeout=TIMEOUT):
    return conftest.wait_until(predicate, what, timeout, POLL)


def stage(report, stage_id):
    return next(s for s in report["stages"] if s["id"] == stage_id)


def task(report, stage_id, t):
    return next(r for r in stage(report, stage_id)["tasks"] if r["task"] == t)


def table_rows(text):
    """The table's rows, split into cells (two or more spaces apart)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("STAGE"))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))  # then failed tasks' logs
    return [re.split(r"\s{2,}", ln.strip()) for ln in lines[start + 1:end]]


# ---------------------------------------------------------------------------------------------------------------
# A local run, made by the real pipeline

@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # one torch thread: on this 2-core machine, beside other test runs, 2 threads each made it 7x slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "oel_hpc", f"run.root={root}", "wandb.mode=disabled"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return root / "tiny-frozenlake"


def test_local_run_all_done(local_run):
    out = cli(local_run)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    manifest = json.loads((local_run / "manifest.json").read_text())
    rows = table_rows(out.stdout)
    for s in manifest["stages"]:
        mine = [r for r in rows if r[0] == s["id"]]
        assert mine and all(r[3] == "done" for r in mine), (s["id"], out.stdout)
        # the stage's wall time (the array stage's summary row, or the one task's row)
        assert mine[0][5] == status.fmt_seconds(s["seconds"]), out.stdout
        assert all(r[2] == "local" for r in mine)
    assert "5 stages: 5 done" in out.stdout
    assert {r[1] for r in rows if r[0] == "r1/extract"} == {"2 seeds", "seed 0", "seed 1"}
    assert {r[1] for r in rows if r[0] == "r1/evaluate"} == {"2 steps", "step 0", "step 2"}

    report = json.loads(cli(local_run, "--json").stdout)
    assert report["all_done"] and report["finished"] and report["slurm"]["queried"] is False
    assert [s["id"] for s in report["stages"]] == [s["id"] for s in manifest["stages"]]
    for s in report["stages"]:
        assert s["state"] == "done" and s["seconds"] is not None
        assert all(r["done"] and r["state"] == "done" for r in s["tasks"])
    assert [r["task"] for r in stage(report, "r1/extract")["tasks"]] == [0, 1]

    watch = cli(local_run, "--watch", "0.2", timeout=30)  # everything is done: one refresh, exit 0
    assert watch.returncode == 0 and watch.stdout.count("STAGE") == 1


def test_removed_done_marker_shows_not_done(local_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(local_run, run, ignore=shutil.ignore_patterns("*.safetensors", "state.pt", "wandb"))
    paths = RunPaths(run)
    paths.done(1, "extract", 1).unlink()
    paths.done(1, "consolidate").unlink()
    report = status.collect(run)
    assert task(report, "r1/extract", 0)["state"] == "done"
    assert task(report, "r1/extract", 1)["state"] == "pending" and not task(report, "r1/extract", 1)["done"]
    assert stage(report, "r1/extract")["state"] == "pending"
    assert stage(report, "r1/consolidate")["state"] == "pending"
    assert stage(report, "r1/gather")["state"] == "done"
    assert not report["all_done"] and not report["finished"]
    # a marker from another config does not count as done
    write_json_atomic(paths.done(1, "extract", 1), {"config_hash": "another", "finished_at": "x", "outputs": {}})
    report = status.collect(run)
    assert task(report, "r1/extract", 1)["state"] == "changed"

    out = cli(run)
    rows = table_rows(out.stdout)
    assert ["r1/consolidate", "-", "local", "pending"] == rows[[r[0] for r in rows].index("r1/consolidate")][:4]

    # --watch on a run that does not move: Ctrl-C ends it cleanly
    # SIGINT as a terminal has it: a shell that starts pytest in the background leaves it ignored, and children
    # inherit that
    proc = subprocess.Popen([sys.executable, "-m", "oel_hpc.status", str(run), "--watch", "0.2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()  # it has started and shown the table once
        assert first.startswith("run 'tiny-frozenlake'"), first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_bad_input(tmp_path):
    out = cli(tmp_path / "nope")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "no such run directory" in out.stderr
    out = cli(tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no manifest.json" in out.stderr
    (tmp_path / "manifest.json").write_text("{not json")
    out = cli(tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "cannot read" in out.stderr
    out = cli(tmp_path, "--watch", "0")
    assert out.returncode == 2 and out.stderr.count("\n") == 1


def test_starts_without_heavy_imports():
    code = ("import sys, oel_hpc.status; "
            "print(sorted(m for m in ('torch', 'transformers', 'omegaconf', 'hydra') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def hand_manifest(run, stages, name="hand"):
    """A manifest as the Slurm launcher writes it: stage ids, tasks, hashes, job ids (newest last)."""
    entries = []
    for sid, tasks, job_ids, deps in stages:
        r, st = sid.split("/")
        entries.append({"id": sid, "round": int(r[1:]), "stage": st, "tasks": tasks, "hash": f"h-{sid}",
                        "depends_on": deps, "state": "submitted", "job_ids": [str(j) for j in job_ids],
                        "started": None, "ended": None})
    write_json_atomic(RunPaths(run).manifest, {"run": name, "config_hash": "c", "stages": entries})


def mark(run, sid, t=None):
    r, st = sid.split("/")
    write_json_atomic(RunPaths(run).done(int(r[1:]), st, t), {"config_hash": f"h-{sid}", "finished_at": "x",
                                                              "outputs": {}})


def test_slurm_commands_missing(tmp_path):
    run = tmp_path / "run"
    hand_manifest(run, [("r1/extract", [0, 1], ["900001"], []), ("r1/gather", None, ["900002"], ["r1/extract"])])
    mark(run, "r1/extract", 0)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no sacct, no squeue
    out = cli(run, env=env)
    assert out.returncode == 0, out.stderr
    notes = [ln for ln in out.stdout.splitlines() if ln.startswith("Slurm:")]
    assert len(notes) == 1 and "sacct not found" in notes[0] and "squeue not found" in notes[0]
    rows = table_rows(out.stdout)
    assert ["r1/extract", "seed 0", "900001", "done", "?"] == rows[1][:5]
    assert ["r1/extract", "seed 1", "900001", "unknown", "?"] == rows[2][:5]
    assert ["r1/gather", "-", "900002", "unknown", "?"] == rows[3][:5]


def test_reading_squeue_and_sacct_rows(tmp_path):
    """One sacct and one squeue result per refresh; compressed and bare array rows are not over-claimed."""
    run = tmp_path / "run"
    hand_manifest(run, [("r1/extract", [0, 1, 2, 3], ["10", "20"], []),
                        ("r1/evaluate", [0, 2, 4], ["30"], []),
                        ("r1/gather", None, ["40"], ["r1/extract"])])
    mark(run, "r1/extract", 0)
    sacct_out = "\n".join([
        "10_0|oel:x|COMPLETED|00:00:05|0:0|vm|2026-01-01T00:00:00|2026-01-01T00:00:05",
        "10_1|oel:x|FAILED|00:00:02|3:0|vm|2026-01-01T00:00:00|2026-01-01T00:00:02",
        "10_2|oel:x|CANCELLED by 0|00:00:00|0:0|None assigned|Unknown|2026-01-01T00:00:03",
        "10_3|oel:x|COMPLETED|00:00:07|0:0|vm|2026-01-01T00:00:00|2026-01-01T00:00:07",
        "20|oel:x|COMPLETED|00:00:01|0:0|vm|2026-01-01T00:01:00|2026-01-01T00:01:01",  # bare row: which task?
        "30_[0,2-4]|oel:e|PENDING|00:00:00|0:0|None assigned|Unknown|Unknown",
        "40|oel:g|PENDING|00:00:00|0:0|None assigned|Unknown|Unknown"])
    squeue_out = "\n".join(["30_[0,2-4%2]|PENDING|0:00|(Dependency)|", "40|PENDING|0:00|(DependencyNeverSatisfied)|"])
    calls = []

    def fake(bases):
        calls.append(bases)
        return slurm.parse_sacct(sacct_out), slurm.parse_squeue(squeue_out), []

    report = status.collect(run, run_slurm=fake)
    assert calls == [["10", "20", "30", "40"]]
    # job 20's tasks are not known yet: a task not done cannot be placed; a done one keeps its known job
    assert task(report, "r1/extract", 0)["job_id"] == "10_0" and task(report, "r1/extract", 0)["state"] == "done"
    for t in (1, 2, 3):
        row = task(report, "r1/extract", t)
        assert row["job_id"] == "20" and row["slurm_state"] == "?" and row["state"] == "unknown", row
    # once its task rows appear, job 20 covers only task 1
    sacct_out = sacct_out.replace("20|oel:x", "20_1|oel:x")
    report = status.collect(run, run_slurm=fake)
    assert [task(report, "r1/extract", t)["job_id"] for t in range(4)] == ["10_0", "20_1", "10_2", "10_3"]
    assert [task(report, "r1/extract", t)["state"] for t in range(4)] == ["done", "failed", "failed", "failed"]
    assert task(report, "r1/extract", 2)["slurm_state"] == "CANCELLED"
    assert task(report, "r1/extract", 3)["note"] == "job ended without a DONE marker"
    ev = stage(report, "r1/evaluate")
    assert [(r["job_id"], r["state"], r["reason"]) for r in ev["tasks"]] == [
        ("30_0", "pending", "Dependency"), ("30_2", "pending", "Dependency"), ("30_4", "pending", "Dependency")]
    gather = stage(report, "r1/gather")["tasks"][0]
    assert (gather["job_id"], gather["state"], gather["reason"]) == ("40", "blocked", "DependencyNeverSatisfied")
    assert stage(report, "r1/extract")["seconds"] == 61  # 00:00:00 → 00:01:01, the stage's span
    # an explicit task list in the job id wins over what Slurm shows
    hand_manifest(run, [("r1/extract", [0, 1, 2, 3], ["10", "20_[1,3]"], [])])
    sacct_out = sacct_out.replace("20_1|oel:x", "20|oel:x")
    report = status.collect(run, run_slurm=fake)
    assert [task(report, "r1/extract", t)["job_id"] for t in range(4)] == ["10_0", "20", "10_2", "20"]


def test_parsing_helpers():
    assert slurm.expand_indices("0,2-4%2") == [0, 2, 3, 4]
    assert slurm.expand_indices("1-7:3") == [1, 4, 7]
    assert slurm.parse_job_id("123") == ("123", None)
    assert slurm.parse_job_id("123_4") == ("123", {4})
    assert slurm.parse_job_id("123_[2-3]") == ("123", {2, 3})
    assert slurm.parse_job_id("local") is None
    assert [slurm.seconds_of(t) for t in ("0:05", "1:02:03", "2-00:00:01", "00:00:00", "")] == [
        5, 3723, 172801, 0, None]
    assert [status.fmt_seconds(s) for s in (None, 0.01, 5, 75, 3723, 90061)] == [
        "-", "0.0s", "5s", "1:15", "1:02:03", "1-1:01:01"]


# ---------------------------------------------------------------------------------------------------------------
# The real test cluster

def _cluster_problem():
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF is not set: start the test cluster with eval \"$(tools/slurm/start.sh | tail -1)\""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (tools/slurm/start.sh installs it)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: is slurmctld running? (tools/slurm/start.sh)"
    if r.returncode != 0:
        return f"sinfo fails ({r.stderr.strip() or r.returncode}): is the cluster running? (tools/slurm/start.sh)"
    return None


def sbatch(*args, wrap):
    out = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *args, "--wrap", wrap],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def done_cmd(run, sid, task_var=None):
    """A shell line that writes the stage's DONE marker (for the array task in $SLURM_ARRAY_TASK_ID)."""
    r, st = sid.split("/")
    path = RunPaths(run).done(int(r[1:]), st, 999999 if task_var else None)
    path = str(path).replace("999999", "$SLURM_ARRAY_TASK_ID")
    return f"mkdir -p \"$(dirname {path})\" && echo '{{\"config_hash\": \"h-{sid}\"}}' > {path}"


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"no Slurm test cluster: {problem}")
    run = tmp_path_factory.mktemp("slurm") / "run"
    run.mkdir()
    ids = {}
    # extract: seeds 0-2, seed 1 fails; gather waits on it (afterok: never satisfied); deploy completes;
    # r2/deploy completes without writing DONE; evaluate is a held array (pending, compressed in squeue)
    ids["extract"] = sbatch("--array=0-2", "-J", "oel:hand:r1:extract",
                            wrap=f"sleep 1; if [ $SLURM_ARRAY_TASK_ID = 1 ]; then exit 3; fi; "
                                 f"{done_cmd(run, 'r1/extract', True)}")
    ids["gather"] = sbatch(f"--dependency=afterok:{ids['extract']}", "-J", "oel:hand:r1:gather",
                           wrap=done_cmd(run, "r1/gather"))
    ids["deploy"] = sbatch("-J", "oel:hand:r1:deploy", wrap=f"sleep 1; {done_cmd(run, 'r1/deploy')}")
    ids["deploy2"] = sbatch("-J", "oel:hand:r2:deploy", wrap="true")
    ids["evaluate"] = sbatch("--array=0,2", "-H", "-J", "oel:hand:r1:evaluate", wrap="true")
    hand_manifest(run, [("r1/extract", [0, 1, 2], [ids["extract"]], []),
                        ("r1/gather", None, [ids["gather"]], ["r1/extract"]),
                        ("r1/deploy", None, [ids["deploy"]], []),
                        ("r1/consolidate", None, [], ["r1/gather", "r1/deploy"]),
                        ("r1/evaluate", [0, 2], [ids["evaluate"]], ["r1/consolidate"]),
                        ("r2/deploy", None, [ids["deploy2"]], [])])
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=15)
    yield run, ids, set(nodes.stdout.split())
    subprocess.run(["scancel", *ids.values()], capture_output=True, timeout=30)


def test_slurm_table(slurm_run):
    run, ids, nodes = slurm_run
    A = ids["extract"]

    def settled():
        report = status.collect(run)
        ex = stage(report, "r1/extract")["tasks"]
        gather = stage(report, "r1/gather")["tasks"][0]
        if (all(r["exit_code"] for r in ex) and stage(report, "r1/deploy")["state"] == "done"
                and stage(report, "r2/deploy")["tasks"][0]["exit_code"]
                and (gather["reason"] == "DependencyNeverSatisfied" or gather["slurm_state"] == "CANCELLED")):
            return report
        return None

    report = wait_until(settled, "the extraction array, its dependent job and the deploy job to settle")
    assert not report["slurm"]["problems"] and report["note"] is None
    ex = stage(report, "r1/extract")["tasks"]
    assert [r["job_id"] for r in ex] == [f"{A}_0", f"{A}_1", f"{A}_2"]
    assert [r["slurm_state"] for r in ex] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert [r["state"] for r in ex] == ["done", "failed", "done"]
    assert [r["exit_code"] for r in ex] == ["0:0", "3:0", "0:0"]
    assert all(r["node"] in nodes and r["elapsed_s"] is not None and r["elapsed_s"] >= 1 for r in ex), ex
    assert all(r["name"] == "oel:hand:r1:extract" for r in ex)
    assert stage(report, "r1/extract")["state"] == "failed" and stage(report, "r1/extract")["seconds"] >= 1
    gather = stage(report, "r1/gather")
    assert gather["tasks"][0]["job_id"] == ids["gather"] and gather["state"] == "blocked"
    assert gather["tasks"][0]["slurm_state"] in ("PENDING", "CANCELLED")
    deploy = stage(report, "r1/deploy")["tasks"][0]
    assert (deploy["job_id"], deploy["state"], deploy["slurm_state"], deploy["exit_code"]) == (
        ids["deploy"], "done", "COMPLETED", "0:0")
    assert deploy["node"] in nodes and deploy["elapsed_s"] >= 1
    assert stage(report, "r1/consolidate")["state"] == "blocked"  # never submitted, behind a blocked stage
    ev = stage(report, "r1/evaluate")["tasks"]
    assert [(r["job_id"], r["slurm_state"], r["reason"], r["state"]) for r in ev] == [
        (f"{ids['evaluate']}_{t}", "PENDING", "JobHeldUser", "pending") for t in (0, 2)]
    d2 = stage(report, "r2/deploy")["tasks"][0]
    assert (d2["state"], d2["slurm_state"], d2["note"]) == ("failed", "COMPLETED", "job ended without a DONE marker")
    assert not report["finished"]  # the held evaluation array may still run

    out = cli(run)
    assert out.returncode == 0, out.stderr
    rows = {(r[0], r[1]): r for r in table_rows(out.stdout)}
    seed1 = rows[("r1/extract", "seed 1")]
    assert seed1[2:4] == [f"{A}_1", "failed"] and seed1[4].startswith("FAILED") and seed1[6] == "3:0", seed1
    assert rows[("r1/extract", "seed 0")][2:5] == [f"{A}_0", "done", "COMPLETED"]
    assert rows[("r1/gather", "-")][2:4] == [ids["gather"], "blocked"]
    assert rows[("r1/evaluate", "step 2")][2:5] == [f"{ids['evaluate']}_2", "pending", "PENDING (JobHeldUser)"]
    print(out.stdout)

    # once the held array is gone, the run has stopped: --watch ends at once, with exit status 1
    subprocess.run(["scancel", ids["evaluate"]], capture_output=True, timeout=30)
    wait_until(lambda: stage(status.collect(run), "r1/evaluate")["state"] == "failed", "the evaluation to cancel")
    watch = cli(run, "--watch", "0.2", "--json", timeout=60)
    assert watch.returncode == 1, watch.stderr
    assert json.loads(watch.stdout.splitlines()[-1])["finished"] is True


def test_slurm_resubmitted_task_shows_new_job(slurm_run):
    run, ids, nodes = slurm_run
    A = ids["extract"]
    B = sbatch("--array=1", "-J", "oel:hand:r1:extract", wrap=done_cmd(run, "r1/extract", True))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"][0]["job_ids"].append(B)
    write_json_atomic(run / "manifest.json", manifest)

    def resubmitted():
        report = status.collect(run)
        row = task(report, "r1/extract", 1)
        return report if row["job_id"] == f"{B}_1" and row["exit_code"] else None

    report = wait_until(resubmitted, "the resubmitted task to show")
    ex = stage(report, "r1/extract")["tasks"]
    assert [r["job_id"] for r in ex] == [f"{A}_0", f"{B}_1", f"{A}_2"]
    assert [(r["state"], r["slurm_state"], r["exit_code"]) for r in ex] == [("done", "COMPLETED", "0:0")] * 3
    assert stage(report, "r1/extract")["state"] == "done"
