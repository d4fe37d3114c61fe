"""`status` at cluster scale, without Slurm: a synthetic run directory of the issue's size (1,500 extraction seeds,
200 evaluated checkpoints per round, 3 rounds: 5,115 tasks) half way through round 2, with squeue/sacct rows
made up for every task (array job ids, as the launcher submits them). The table must answer in well under a
second (the issue's bound; this test allows more for a loaded 2-core CI machine and prints the figure), read only
the progress of running tasks, and name the right numbers; the HTML report of it must be written in seconds.

`python tests/test_status_scale.py DIR` builds the run in DIR (10 experience files per seed) and prints the
timings; run it again to time the same run again.
"""
import json
import sys
import time
from pathlib import Path

import pytest

from oel_hpc import report as html_report
from oel_hpc import slurm, status, taskprogress
from oel_hpc.rundir import HASH_SCHEME, RunPaths, write_json_atomic
from oel_hpc.verify import OUTPUTS_SCHEME, record

SEEDS, CHECKPOINTS, ROUNDS = 1500, 200, 3
STEPS = 10  # extraction steps: one experience file each, recorded in the seed's DONE marker
DONE_SEEDS_R2, RUNNING_SEEDS_R2 = 1000, 300  # round 2: these done, these running, the rest pending
LIMIT_S = 3.0  # CPU seconds; the issue asks < 1 s on a cluster login node, CI shares 2 cores with other jobs


def base(r, stage):
    return str(100000 + 10 * r + ["extract", "gather", "deploy", "consolidate", "evaluate"].index(stage))


def write(path: Path, text: str) -> Path:
    """Plain writes (not the atomic helpers' fsync): 60,000 files in seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rows(items) -> str:
    return "".join(json.dumps(row) + "\n" for row in items)


def build(run: Path, steps: int = STEPS) -> tuple[str, str]:
    """The run directory, and the sacct and squeue outputs Slurm would give for it. `steps`: experience files per
    finished seed (the test uses fewer than the script, to build in seconds)."""
    paths = RunPaths(run)
    stages, sacct, squeue = [], [], []
    t0 = time.time() - 3600
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))  # noqa: E731 - sacct's format
    for r in range(1, ROUNDS + 1):
        for st, tasks in (("extract", list(range(SEEDS))), ("gather", None), ("deploy", None),
                          ("consolidate", None), ("evaluate", list(range(0, CHECKPOINTS * 5, 5)))):
            deps = {"gather": [f"r{r}/extract"], "consolidate": [f"r{r}/gather", f"r{r}/deploy"],
                    "evaluate": [f"r{r}/consolidate"]}.get(st, [])
            stages.append({"id": f"r{r}/{st}", "round": r, "stage": st, "tasks": tasks, "hash": f"h{r}{st}",
                           "depends_on": deps, "state": "submitted", "job_ids": [base(r, st)], "started": None,
                           "ended": None})
            for t in tasks if tasks is not None else [None]:
                ref = base(r, st) + ("" if t is None else f"_{t}")
                done = r == 1 or (r == 2 and st == "extract" and t < DONE_SEEDS_R2)
                running = r == 2 and st == "extract" and DONE_SEEDS_R2 <= t < DONE_SEEDS_R2 + RUNNING_SEEDS_R2
                if done:
                    out = []
                    if st == "extract":
                        out = [write(paths.experience(r, t, k), f"- item {k}\n" * k) for k in range(1, steps + 1)]
                        write(paths.progress(r, st, t), rows(
                            {"done": k, "total": steps, "unit": "step", "t": t0 + k, "experience_items": k,
                             "experience_tokens": 7 * k, "success": k % 2 == 0} for k in range(1, steps + 1)))
                    write(paths.done(r, st, t), json.dumps({
                        "config_hash": f"h{r}{st}", "hash_scheme": HASH_SCHEME, "finished_at": "x",
                        "outputs_scheme": OUTPUTS_SCHEME, "outputs": {paths.rel(p): record(p) for p in out}}))
                    sacct.append(f"{ref}|oel|COMPLETED|00:01:00|0:0|n1|{iso(t0)}|{iso(t0 + 60)}|{iso(t0 - 5)}")
                elif running:
                    # 4 of 10 steps, 30 s apart: 6 steps left, ETA about 180 s after the last row
                    write(paths.progress(r, st, t), rows(
                        {"done": k, "total": STEPS, "unit": "step", "t": time.time() - 30 * (4 - k),
                         "experience_items": k, "experience_tokens": 7 * k, "success": True} for k in range(1, 5)))
                    sacct.append(f"{ref}|oel|RUNNING|00:02:00|0:0|n2|{iso(time.time() - 120)}|Unknown|{iso(t0)}")
                    squeue.append(f"{ref}|RUNNING|2:00|n2|n2|58:00|{iso(time.time() - 120)}")
                elif r == 2 and st == "extract":
                    squeue.append(f"{ref}|PENDING|0:00|(Resources)||1:00:00|{iso(time.time() + 600)}")
                else:
                    squeue.append(f"{ref}|PENDING|0:00|(Dependency)||1:00:00|N/A")
    write_json_atomic(paths.manifest, {"run": "scale", "config_hash": "c", "stages": stages})
    return "\n".join(sacct), "\n".join(squeue)


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("scale") / "scale"
    sacct_out, squeue_out = build(run, steps=2)
    return run, sacct_out, squeue_out


def test_status_of_a_big_run_is_fast(big_run, monkeypatch):
    run, sacct_out, squeue_out = big_run
    calls = []

    def fake(bases):
        calls.append(bases)
        return slurm.parse_sacct(sacct_out), slurm.parse_squeue(squeue_out), []

    read = []
    real = taskprogress.task_progress
    monkeypatch.setattr(taskprogress, "task_progress", lambda *a, **k: read.append(a[2:4]) or real(*a, **k))
    start, cpu = time.perf_counter(), time.process_time()
    report = status.collect(run, run_slurm=fake)
    text = status.render(report)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"\nstatus of {sum(len(s['tasks']) for s in report['stages'])} tasks: {seconds:.2f} s "
          f"({cpu:.2f} s CPU; {len(text.splitlines())} lines)")
    assert cpu < LIMIT_S
    assert len(calls) == 1 and len(calls[0]) == ROUNDS * 5
    # only the running tasks' progress was read
    assert sorted(read) == [("extract", t) for t in range(DONE_SEEDS_R2, DONE_SEEDS_R2 + RUNNING_SEEDS_R2)]
    r2 = next(s for s in report["stages"] if s["id"] == "r2/extract")
    states = [t["state"] for t in r2["tasks"]]
    assert states.count("done") == DONE_SEEDS_R2 and states.count("running") == RUNNING_SEEDS_R2
    assert states.count("pending") == SEEDS - DONE_SEEDS_R2 - RUNNING_SEEDS_R2
    running = r2["tasks"][DONE_SEEDS_R2]
    assert running["progress"]["done"] == 4 and running["progress"]["total"] == STEPS
    assert 150 < running["progress"]["eta_s"] <= 181, running["progress"]
    assert running["time_left_s"] == 58 * 60
    pending = r2["tasks"][-1]
    assert pending["expected_start"] is not None and pending["time_left_s"] is None
    # the table stays short: a long stage lists its running tasks (at most --tasks of them), then one summary line
    lines = [ln for ln in text.splitlines() if ln.startswith("r2/extract")]
    assert len(lines) == 1 + status.SHOWN_TASKS + 1, len(lines)
    assert "+1460 more" in lines[-1] and "1000 done" in lines[-1] and "200 pending" in lines[-1], lines[-1]


def test_html_report_of_a_big_run(big_run, tmp_path):
    run, sacct_out, squeue_out = big_run
    report = status.collect(run, run_slurm=lambda b: (slurm.parse_sacct(sacct_out), slurm.parse_squeue(squeue_out),
                                                      []))
    start = time.perf_counter()
    html_report.write(tmp_path / "big.html", [report])
    seconds = time.perf_counter() - start
    size = (tmp_path / "big.html").stat().st_size
    print(f"\nHTML report of the big run: {seconds:.2f} s, {size / 1e6:.2f} MB")
    assert seconds < 30 and size < 5e6
    page = (tmp_path / "big.html").read_text()
    assert 'id="plot-experience-items"' in page and "mean over seeds (1500 seeds)" in page


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    saved = folder / "slurm-answers.json"
    if saved.is_file():  # built before: time it again
        s_out, q_out = json.loads(saved.read_text())
    else:
        t = time.perf_counter()
        s_out, q_out = build(folder / "scale")
        saved.write_text(json.dumps([s_out, q_out]))
        print(f"built in {time.perf_counter() - t:.1f} s")
    for _ in range(2):
        t, c = time.perf_counter(), time.process_time()
        rep = status.collect(folder / "scale", run_slurm=lambda b: (slurm.parse_sacct(s_out),
                                                                    slurm.parse_squeue(q_out), []))
        status.render(rep)
        print(f"status: {time.perf_counter() - t:.2f} s ({time.process_time() - c:.2f} s CPU)")
    t, c = time.perf_counter(), time.process_time()
    html_report.write(folder / "scale.html", [rep])
    print(f"html: {time.perf_counter() - t:.2f} s ({time.process_time() - c:.2f} s CPU), "
          f"{(folder / 'scale.html').stat().st_size / 1e6:.2f} MB")
    print(json.dumps(rep["task_counts"]))
