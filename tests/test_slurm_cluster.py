"""The local Slurm test cluster (tools/slurm/start.sh) does what the Slurm backend relies on: job arrays,
afterok dependencies (satisfied and never satisfied) and accounting through sacct.

Needs a running cluster: `eval "$(tools/slurm/start.sh | tail -1)"` sets SLURM_CONF; skipped otherwise.
Every wait polls with a timeout; no test sleeps longer than one poll interval at a time.
"""
import os
import shutil
import subprocess

import pytest

from tests import conftest

TIMEOUT = 25.0
POLL = 0.2
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def _cluster_problem():
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF is not set: start the test cluster with eval \"$(tools/slurm/start.sh | tail -1)\""
    if shutil.which("sinfo") is None:
        return "sinfo is not installed (tools/slurm/start.sh installs Slurm)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: is slurmctld running? (tools/slurm/start.sh)"
    if r.returncode != 0:
        return f"sinfo fails ({r.stderr.strip() or r.returncode}): is the cluster running? (tools/slurm/start.sh)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _slurm_cluster():
    # checked when these tests run, not at collection: sinfo retries ~9 s when SLURM_CONF names a stopped cluster
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"no Slurm test cluster: {problem}")


def _run(*cmd):
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}"
    return r.stdout


def wait_until(predicate, what, timeout=TIMEOUT):
    return conftest.wait_until(predicate, what, timeout, POLL)


def sacct(job_id, fields="JobID,State,ExitCode"):
    """{JobID: {field: value}} from `sacct -X` (one row per job / array task); State without 'by <uid>'."""
    out = _run("sacct", "-X", "-j", str(job_id), f"--format={fields}", "-P", "-n")
    names = fields.split(",")
    rows = {}
    for line in out.splitlines():
        values = dict(zip(names, line.split("|")))
        if "State" in values:
            values["State"] = values["State"].split()[0] if values["State"] else ""
        rows[values["JobID"]] = values
    return rows


def wait_final(job_id, expected_ids):
    """Wait until sacct has every id in expected_ids in a final state; returns sacct(job_id)."""
    def done():
        rows = sacct(job_id)
        if set(expected_ids) <= set(rows) and all(rows[i]["State"] in FINAL for i in expected_ids):
            return rows
        return None
    return wait_until(done, f"job {job_id} rows {sorted(expected_ids)} to end in sacct")


@pytest.fixture
def submit(tmp_path):
    """submit(*sbatch_args, wrap=...) -> job id; runs in a fresh tmp folder; cancels leftovers afterwards."""
    jobs = []

    def _submit(*args, wrap):
        out = _run("sbatch", "--parsable", f"--chdir={tmp_path}", "-t", "2", "-o", "%x_%A_%a.out", *args,
                   "--wrap", wrap)
        job_id = out.strip().split(";")[0]
        jobs.append(job_id)
        return job_id

    yield _submit
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)


def test_array_writes_one_output_per_task(submit, tmp_path):
    array = submit("-J", "arr", "--array=0-3", wrap='echo "task $SLURM_ARRAY_TASK_ID" > out_$SLURM_ARRAY_TASK_ID.txt')
    rows = wait_final(array, [f"{array}_{i}" for i in range(4)])
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows
    for i in range(4):
        assert (tmp_path / f"out_{i}.txt").read_text() == f"task {i}\n"
        assert (tmp_path / f"arr_{array}_{i}.out").exists()  # %A_%a output names


def test_afterok_on_array_runs_after_every_task(submit, tmp_path):
    array = submit("-J", "arr", "--array=0-3", wrap="sleep 1; touch done_$SLURM_ARRAY_TASK_ID")
    after = submit("-J", "after", f"--dependency=afterok:{array}",
                   wrap="ls done_0 done_1 done_2 done_3 > seen.txt && touch after_ran")
    rows = wait_final(after, [after])
    assert rows[after]["State"] == "COMPLETED", rows
    assert (tmp_path / "after_ran").exists()
    assert (tmp_path / "seen.txt").read_text().split() == ["done_0", "done_1", "done_2", "done_3"]
    # (sacct may show an array as one row "<id>" for a moment before its per-task rows: wait for those)
    wait_final(array, [f"{array}_{i}" for i in range(4)])
    tasks = sacct(array, "JobID,State,Start,End")
    assert sorted(tasks) == [f"{array}_{i}" for i in range(4)] and {t["State"] for t in tasks.values()} == {
        "COMPLETED"}, tasks
    start = sacct(after, "JobID,Start")[after]["Start"]
    assert start >= max(t["End"] for t in tasks.values())  # ISO timestamps compare as strings


def test_afterok_on_failed_job_never_runs(submit, tmp_path):
    failing = submit("-J", "fails", wrap="exit 3")
    blocked = submit("-J", "blocked", f"--dependency=afterok:{failing}", wrap="touch must_not_exist")
    assert wait_final(failing, [failing])[failing]["State"] == "FAILED"

    def never_satisfied():
        out = subprocess.run(["squeue", "-h", "-j", blocked, "-o", "%T|%r"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
        if out:
            state, reason = out.split("|", 1)
            return out if state == "PENDING" and reason == "DependencyNeverSatisfied" else None
        row = sacct(blocked).get(blocked)  # gone from the queue: must have been cancelled, not run
        return f"sacct {row['State']}" if row and row["State"] in FINAL else None

    seen = wait_until(never_satisfied, f"job {blocked} to be held with DependencyNeverSatisfied or cancelled")
    assert seen in ("PENDING|DependencyNeverSatisfied", "sacct CANCELLED"), seen
    subprocess.run(["scancel", blocked], capture_output=True, timeout=30)
    row = wait_final(blocked, [blocked])[blocked]
    assert row["State"] == "CANCELLED", row
    # never given a node (sacct sets Start to the cancel time for a job cancelled while pending)
    assert sacct(blocked, "JobID,NodeList")[blocked]["NodeList"] == "None assigned"
    assert not (tmp_path / "must_not_exist").exists()


def test_sacct_reports_states_exit_codes_and_array_ids(submit):
    ok = submit("-J", "ok", wrap="true")
    bad = submit("-J", "bad", wrap="exit 3")
    array = submit("-J", "mixed", "--array=0-1", wrap="exit $SLURM_ARRAY_TASK_ID")
    assert wait_final(ok, [ok])[ok] == {"JobID": ok, "State": "COMPLETED", "ExitCode": "0:0"}
    assert wait_final(bad, [bad])[bad] == {"JobID": bad, "State": "FAILED", "ExitCode": "3:0"}
    rows = wait_final(array, [f"{array}_0", f"{array}_1"])
    assert rows == {f"{array}_0": {"JobID": f"{array}_0", "State": "COMPLETED", "ExitCode": "0:0"},
                    f"{array}_1": {"JobID": f"{array}_1", "State": "FAILED", "ExitCode": "1:0"}}
    # the raw line format the Slurm backend parses
    raw = _run("sacct", "-X", "-j", f"{array}_1", "--format=JobID,State,ExitCode", "-P", "-n").strip()
    assert raw == f"{array}_1|FAILED|1:0"
