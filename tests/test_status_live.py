"""`python -m oel_hpc.status` on runs in progress, without Slurm (squeue/sacct answers written by hand, in the
formats oel_hpc.slurm asks for): step k/K and ETA of running tasks from their progress records (the contract's
format) or, without one, from metrics.jsonl / experience files; time left and expected start; requeue counts;
a failed task's log and last lines; several runs and a sweep folder with one squeue and one sacct call.
"""
import json
import subprocess
import sys
import time

import pytest

from oel_hpc import slurm, status
from oel_hpc.rundir import RunPaths, write_json_atomic, write_jsonl_atomic
from tests.conftest import ROOT


def iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def manifest(run, name, stages):
    entries = []
    for sid, tasks, job_ids in stages:
        r, st = sid.split("/")
        entries.append({"id": sid, "round": int(r[1:]), "stage": st, "tasks": tasks, "hash": f"h-{sid}",
                        "depends_on": [], "state": "submitted", "job_ids": job_ids, "started": None, "ended": None})
    write_json_atomic(RunPaths(run).manifest, {"run": name, "config_hash": "c", "stages": entries})


def test_squeue_time_left_expected_start_and_sacct_requeues():
    squeue = slurm.parse_squeue("\n".join([
        "7_1|RUNNING|10:00|n1|n1|1:50:00|2026-01-01T10:00:00",
        "7_[2-3%1]|PENDING|0:00|(JobArrayTaskLimit)||2:00:00|2026-01-01T12:30:00",
        "8|PENDING|0:00|(Dependency)||2:00:00|N/A",
        "9|RUNNING|1-00:00:01|n2|n2|UNLIMITED|2026-01-01T09:00:00"]))
    assert squeue[("7", 1)]["time_left_s"] == 6600 and squeue[("7", 1)]["expected_start"] is None
    assert squeue[("7", 3)]["expected_start"] == "2026-01-01T12:30:00" and squeue[("7", 3)]["time_left_s"] is None
    assert squeue[("8", None)]["expected_start"] is None
    assert squeue[("9", None)]["time_left_s"] is None and squeue[("9", None)]["elapsed_s"] == 86401
    # a line in the old five-field format still reads
    assert slurm.parse_squeue("5|RUNNING|0:05|n1|n1")[("5", None)]["time_left_s"] is None
    sacct = slurm.parse_sacct("\n".join([  # sacct -D: each requeue leaves a row, the newest comes last
        "7_1|x|REQUEUED|00:01:00|0:0|n1|2026-01-01T09:00:00|2026-01-01T09:01:00|2026-01-01T08:59:00",
        "7_1|x|NODE_FAIL|00:02:00|0:0|n1|2026-01-01T09:02:00|2026-01-01T09:04:00|2026-01-01T08:59:00",
        "7_1|x|RUNNING|00:10:00|0:0|n1|2026-01-01T10:00:00|Unknown|2026-01-01T08:59:00",
        "7_0|x|COMPLETED|00:01:00|0:0|n1|2026-01-01T09:00:00|2026-01-01T09:01:00|2026-01-01T08:59:00",
        "7_[2-3%1]|x|PENDING|00:00:00|0:0|None assigned|Unknown|Unknown|2026-01-01T08:59:00",
        "8|x|COMPLETED|00:01:00|0:0|n1|2026-01-01T09:00:00|2026-01-01T09:01:00"]))  # 8 fields: still read
    assert sacct[("7", 1)]["restarts"] == 2 and sacct[("7", 1)]["state"] == "RUNNING"
    assert sacct[("7", 0)]["restarts"] == 0 and sacct[("7", 2)]["restarts"] == 0
    assert sacct[("7", 0)]["submit"] == "2026-01-01T08:59:00" and sacct[("8", None)]["submit"] is None


@pytest.fixture
def busy_run(tmp_path):
    """A run in the middle of round 1 on Slurm: seeds 0-1 running (one with a progress record, one with only
    experience files), seed 2 failed, seed 3 pending; consolidation of round 0... as its own run below."""
    run = tmp_path / "runs" / "busy"
    paths = RunPaths(run)
    manifest(run, "busy", [("r1/extract", [0, 1, 2, 3], ["500"]), ("r1/consolidate", None, ["501"]),
                           ("r1/evaluate", [0, 10], ["502"])])
    (run / "config.yaml").write_text("extract:\n  steps: 8\nconsolidate:\n  steps: 20\n")
    now = time.time()
    # seed 0: the contract's record, 3 of 10 games... steps: one every 20 s, the last 10 s ago
    write_jsonl_atomic(paths.progress(1, "extract", 0), [
        {"done": k, "total": 10, "unit": "step", "t": now - 10 - 20 * (3 - k), "experience_items": k,
         "experience_tokens": 11 * k, "success": k == 2} for k in (1, 2, 3)])
    # seed 1: no record (an older oel_hpc): 2 experience files of extract.steps=8
    for k in (1, 2):
        paths.experience(1, 1, k).parent.mkdir(parents=True, exist_ok=True)
        paths.experience(1, 1, k).write_text("- an item\n")
    # consolidation: metrics.jsonl rows only, 5 of consolidate.steps=20
    write_jsonl_atomic(paths.metrics(1), [{"step": s, "kl": 0.1} for s in range(1, 6)])
    # evaluation step 10: its record says 1 of 1 checkpoint... done=0 of 1 so far: no ETA
    write_jsonl_atomic(paths.progress(1, "evaluate", 10), [{"done": 0, "total": 1, "unit": "checkpoint",
                                                            "t": now}])
    (run / "logs").mkdir()
    (run / "logs" / "r1_extract_500_2.out").write_text("".join(f"line {i}\n" for i in range(1, 9)) +
                                                       "RuntimeError: out of memory\n")
    started = iso(now - 70)
    sacct = "\n".join([
        f"500_0|x|REQUEUED|00:00:30|0:0|n1|{iso(now - 200)}|{iso(now - 170)}|{iso(now - 300)}",
        f"500_0|x|RUNNING|00:01:10|0:0|n1|{started}|Unknown|{iso(now - 300)}",
        f"500_1|x|RUNNING|00:01:10|0:0|n1|{started}|Unknown|{iso(now - 300)}",
        f"500_2|x|FAILED|00:00:20|1:0|n2|{started}|{iso(now - 50)}|{iso(now - 300)}",
        f"500_3|x|PENDING|00:00:00|0:0|None assigned|Unknown|Unknown|{iso(now - 300)}",
        f"501|x|RUNNING|00:01:40|0:0|n3|{iso(now - 100)}|Unknown|{iso(now - 300)}",
        f"502_[0,10]|x|PENDING|00:00:00|0:0|None assigned|Unknown|Unknown|{iso(now - 300)}"])
    squeue = "\n".join([
        f"500_0|RUNNING|1:10|n1|n1|58:50|{started}",
        f"500_1|RUNNING|1:10|n1|n1|58:50|{started}",
        f"500_3|PENDING|0:00|(Resources)||1:00:00|{iso(now + 3600)}",
        f"501|RUNNING|1:40|n3|n3|1:58:20|{iso(now - 100)}",
        "502_[0,10]|PENDING|0:00|(Dependency)||1:00:00|N/A"])
    return run, sacct, squeue, now


def test_running_tasks_show_progress_eta_time_left_and_requeues(busy_run):
    run, sacct, squeue, now = busy_run
    calls = []

    def fake(bases):
        calls.append(bases)
        return slurm.parse_sacct(sacct), slurm.parse_squeue(squeue), []

    report = status.collect(run, run_slurm=fake)
    assert calls == [["500", "501", "502"]]
    extract = report["stages"][0]["tasks"]
    s0, s1, s2, s3 = extract
    assert s0["state"] == "running" and s0["restarts"] == 1 and s0["time_left_s"] == 3530
    p = s0["progress"]
    assert (p["done"], p["total"], p["unit"], p["source"]) == (3, 10, "step", "progress.jsonl")
    # 20 s per step (rows 1 to 3), 7 steps left, counted from the last row 10 s ago: 130 s
    assert p["eta_s"] == pytest.approx(130, abs=2)
    p = s1["progress"]
    assert (p["done"], p["total"], p["source"]) == (2, 8, "experience files")
    assert p["eta_s"] is not None and p["eta_s"] > 0  # ~35 s per step since the job started, 6 steps left
    assert s1["restarts"] == 0
    assert s2["state"] == "failed" and s2["progress"] is None and s2["log"] == "logs/r1_extract_500_2.out"
    assert s2["log_tail"] == ["line 5", "line 6", "line 7", "line 8", "RuntimeError: out of memory"]
    assert s3["state"] == "pending" and s3["expected_start"] == iso(now + 3600) and s3["progress"] is None
    consolidate = report["stages"][1]["tasks"][0]
    assert consolidate["progress"]["done"] == 5 and consolidate["progress"]["total"] == 20
    assert consolidate["progress"]["source"] == "metrics.jsonl"
    # 5 steps in the 100 s since the job started: 20 s each, 15 left
    assert consolidate["progress"]["eta_s"] == pytest.approx(300, abs=30)
    evaluate = report["stages"][2]["tasks"]
    assert all(t["state"] == "pending" and t["progress"] is None for t in evaluate)  # not running: not read

    # the report's job timeline: per task, queued from sacct's Submit to Start, then running (to End, or now)
    from oel_hpc import report as html_report
    page = html_report.build([report])
    timeline = page[page.index('id="plot-timeline"'):]
    assert timeline.count('class="queued"') == 7 and timeline.count('class="running"') == 4  # 7 tasks submitted
    assert "r1/extract seed 2: running" in timeline and "r1/evaluate step 10: queued" in timeline

    text = status.render(report)
    row = next(ln for ln in text.splitlines() if ln.startswith("r1/extract") and "seed 0" in ln)
    assert "3/10 step" in row and "2:10" in row and "58:50" in row, row
    assert text.splitlines()[-6] == "r1/extract seed 2 (500_2): logs/r1_extract_500_2.out"
    assert text.splitlines()[-1] == "  | RuntimeError: out of memory"


def test_several_runs_and_a_sweep_folder(busy_run, tmp_path):
    run, sacct, squeue, now = busy_run
    other = run.parent / "other"
    manifest(other, "other", [("r1/extract", [0], ["600"])])
    calls = []

    def fake(bases):
        calls.append(bases)
        return slurm.parse_sacct(sacct + f"\n600_0|x|COMPLETED|00:00:05|0:0|n1|{iso(now)}|{iso(now)}"), \
            slurm.parse_squeue(squeue), []

    reports = status.collect_runs([run, other], run_slurm=fake)
    assert calls == [["500", "501", "502", "600"]]  # one squeue and one sacct call for both runs
    assert [r["run"] for r in reports] == ["busy", "other"]
    assert reports[1]["stages"][0]["tasks"][0]["state"] == "failed"  # COMPLETED without a DONE marker
    text = status.render_many(reports)
    lines = text.splitlines()
    assert lines[2].startswith("RUN") and lines[3].startswith("busy") and lines[4].startswith("other")
    assert lines[3].split()[1:4] == ["active", "0/3", "0/7"]

    # a sweep record (contract 2): points listed relative to its folder, or absolute
    sweep = run.parent
    write_json_atomic(sweep / "sweep.json", {"sweep": "sw", "created": "x", "command": ["python", "-m", "oel_hpc"],
                                             "params": {"k": ["1", "2"]},
                                             "points": [{"run": "busy", "run_dir": "busy", "overrides": ["k=1"],
                                                         "params": {"k": "1"}},
                                                        {"run": "other", "run_dir": str(other),
                                                         "overrides": ["k=2"], "params": {"k": "2"}}]})
    runs, record = status.resolve_runs([sweep])
    assert runs == [sweep / "busy", other] and record["sweep"] == "sw"
    env_free = {"PATH": "/nonexistent"}  # no squeue, no sacct: the runs still show, with a note
    out = subprocess.run([sys.executable, "-m", "oel_hpc.status", str(sweep), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env_free)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["sweep"]["sweep"] == "sw" and [r["run"] for r in data["runs"]] == ["busy", "other"]
    out = subprocess.run([sys.executable, "-m", "oel_hpc.status", str(sweep), "--html", str(tmp_path / "s.html")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=env_free)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sweep 'sw': 2 runs")
    page = (tmp_path / "s.html").read_text()
    assert "sweep sw" in page and page.count('class="stages"') == 2

    write_json_atomic(sweep / "sweep.json", {"sweep": "sw", "points": [{"run": "x"}]})
    out = subprocess.run([sys.executable, "-m", "oel_hpc.status", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=env_free)
    assert out.returncode == 2 and "sweep.json" in out.stderr and out.stderr.count("\n") == 1


def test_on_the_real_cluster_requeue_count_time_left_and_progress(tmp_path):
    """Real jobs (the test cluster; skipped without it): a running array task that writes a progress record and is
    requeued once, a pending one. Slurm's own answers give REQ 1, time left, an expected start."""
    from tests.test_status import _cluster_problem, sbatch, wait_until
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"no Slurm test cluster: {problem}")
    run = tmp_path / "run"
    record = RunPaths(run).progress(1, "extract", 999999)
    record.parent.parent.mkdir(parents=True)
    path = str(record).replace("999999", "$SLURM_ARRAY_TASK_ID")
    row = '{"done": 1, "total": 4, "unit": "step", "t": '
    job = sbatch("--array=0", "--requeue", "-t", "10", "-J", "oel:live", wrap=(
        f'mkdir -p "$(dirname {path})"; echo \'{row}\'$(date +%s)\'}}\' > {path}; sleep 120'))
    blocked = sbatch(f"--dependency=afterok:{job}", "-t", "5", "-J", "oel:live2", wrap="true")
    manifest(run, "live", [("r1/extract", [0], [job]), ("r1/gather", None, [blocked])])
    try:
        wait_until(lambda: status.collect(run)["stages"][0]["tasks"][0]["state"] == "running", "the task to run")
        subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True, capture_output=True, timeout=30)

        def requeued_and_running():
            t = status.collect(run)["stages"][0]["tasks"][0]
            return t["restarts"] == 1 and t["state"] == "running" and t["progress"] is not None

        wait_until(requeued_and_running, "the requeued task to run again", timeout=120)
        report = status.collect(run)
        task0, gather = report["stages"][0]["tasks"][0], report["stages"][1]["tasks"][0]
        assert task0["progress"]["done"] == 1 and task0["progress"]["total"] == 4
        assert 0 < task0["time_left_s"] <= 600 and task0["expected_start"] is None
        assert gather["state"] == "pending" and gather["time_left_s"] is None
        text = status.render(report)
        line = next(ln for ln in text.splitlines() if "seed 0" in ln)
        assert "1/4 step" in line and line.split()[-1] == "1", line
    finally:
        subprocess.run(["scancel", job, blocked], capture_output=True, timeout=30)
