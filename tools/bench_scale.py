#!/usr/bin/env python
"""Scale benchmark of the Slurm launcher on the local test cluster (not a test: it prints figures).

A DAG at cluster scale: 3 rounds, each with 1,500 extraction seeds and 200 evaluation checkpoints (the tiny model,
`consolidate.steps=199 consolidate.save_freq=1 evaluate.steps=all`: step 0 and 199 checkpoints), split by
MaxArraySize 1001 (Slurm's default; the test cluster's own is 10001, so `cluster.max_array_size=1001` says it).
Real `sbatch` calls, real afterok dependencies, real `squeue`/`sacct`: every job is submitted held
(`cluster.extra_sbatch=[--hold]`), so nothing runs, and everything is cancelled at the end. The job bodies would
be `/bin/true` anyway (`cluster.python=/bin/true`).

Prints: the planner's wall time (`python -m oel_hpc ... launch.plan_only=true` as a subprocess, before
submitting), the sbatch calls and seconds per round of the submission (the launcher's `submit()` in-process), the
arrays after the split, and the wall time of `python -m oel_hpc.status <run>` (a subprocess, several repeats,
median; target < 1 s) on the submitted run, and the HTML report of it (`status --html`): its time, size, and
whether it loads and its plots draw in headless chromium (when installed).

    eval "$(tools/slurm/start.sh | tail -1)"; python tools/bench_scale.py
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEEDS, CHECKPOINTS, ROUNDS = 1500, 200, 3
OVERRIDES = ["cluster=local_slurm", f"extract.seeds={SEEDS}", f"consolidate.steps={CHECKPOINTS - 1}",
             "consolidate.save_freq=1", "evaluate.steps=all", f"pipeline.rounds={ROUNDS}", "wandb.mode=disabled",
             "cluster.python=/bin/true", "launch.check_python=false", "cluster.extra_sbatch=[--hold]",
             "run.name=scale"]


def timed(argv: list[str], env: dict, cpu: list | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of a subprocess; its CPU seconds (user + system) appended to `cpu`: on a shared, loaded
    machine the wall time also counts the waits for a core."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return seconds, out


def submit_in_process(overrides: list[str]):
    """The launcher's submit(), with every sbatch call timed; (report, seconds per call, submit seconds)."""
    from oel_hpc.__main__ import compose_config
    from oel_hpc.config import validate
    from oel_hpc.launch import guard, slurm
    from oel_hpc.pipeline import build_dag, run_hash
    from oel_hpc.slurm import Slurm

    class TimedSlurm(Slurm):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def sbatch(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().sbatch(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - t0)

    cfg = compose_config(overrides)
    validate(cfg, check_files=False)
    nodes = build_dag(cfg)
    paths = guard.check_run_dir(cfg)
    client = TimedSlurm()
    t0 = time.perf_counter()
    report = slurm.submit(cfg, paths, nodes, run_hash(cfg), client)
    return report, client.seconds, time.perf_counter() - t0, paths.root


def browser_check(html: Path) -> str:
    """Open the report in headless chromium (as tests/test_report_browser.py does) and say how many plots drew a
    series; the page's load time too."""
    import re

    from tests.test_report_browser import CHROMIUM, FLAGS, MEASURE

    if CHROMIUM is None:
        return "not checked (chromium is not installed)"
    measured = html.with_name("measured.html")
    measured.write_text(html.read_text().replace("</body>", MEASURE + "</body>"))
    t0 = time.perf_counter()
    out = subprocess.run([CHROMIUM, *FLAGS, "--virtual-time-budget=5000", "--window-size=1300,3000", "--dump-dom",
                          measured.as_uri()], capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    found = re.search(r'<pre id="geometry">(.*?)</pre>', out.stdout, re.S)
    if out.returncode != 0 or not found:
        return f"FAILED to load (exit {out.returncode}): {out.stderr.strip()[-300:]}"
    plots = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    drew = [p["id"] for p in plots if p["w"] > 0 and p["h"] > 0 and (p["lines"] or p["dots"] or p["bars"])]
    empty = [p["id"] for p in plots if p["id"] not in drew]
    return (f"loaded and laid out in {seconds:.1f} s; {len(drew)} of {len(plots)} plots drew a series"
            + (f" (empty: {', '.join(empty)})" if empty else ""))


def synthetic_report(root: Path) -> str:
    """The held run has no results to plot: the report of tests/test_status_scale.py's synthetic run of the same
    size (its records as the stages write them, made-up squeue/sacct answers) in headless chromium too."""
    from oel_hpc import report, slurm, status
    from tests.test_status_scale import build

    sacct_out, squeue_out = build(root / "synthetic")
    t0 = time.perf_counter()
    collected = status.collect(root / "synthetic", run_slurm=lambda bases: (
        slurm.parse_sacct(sacct_out), slurm.parse_squeue(squeue_out), []))
    html = root / "synthetic.html"
    report.write(html, [collected])
    seconds = time.perf_counter() - t0
    return f"{seconds:.2f} s, {html.stat().st_size / 1e3:.0f} KB; {browser_check(html)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-array-size", type=int, default=1001, help="cluster.max_array_size (default 1001)")
    parser.add_argument("--repeats", type=int, default=5, help="status runs to take the median of (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (default: removed)")
    args = parser.parse_args()
    if not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None:
        print('no Slurm test cluster: eval "$(tools/slurm/start.sh | tail -1)" first', file=sys.stderr)
        return 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(tempfile.mkdtemp(prefix="oel-scale-"))
    overrides = [*OVERRIDES, f"run.root={root}", f"cluster.max_array_size={args.max_array_size}"]
    job_ids: list[str] = []
    try:
        plan_s, plan = timed([sys.executable, "-m", "oel_hpc", *overrides, "launch.plan_only=true"], env)
        if plan.returncode != 0:
            raise SystemExit(f"the planner failed ({plan.returncode}): {plan.stderr.strip()}")

        report, call_seconds, submit_s, run_dir = submit_in_process(overrides)
        job_ids = [s.job_id for s in report.submitted]
        per_round: dict[int, list[float]] = {}
        for s, seconds in zip(report.submitted, call_seconds):
            per_round.setdefault(s.node.round, []).append(seconds)
        arrays = [s for s in report.submitted if s.index_offset is not None]
        tasks = sum(len(s.tasks) for s in report.submitted)

        status_argv = [sys.executable, "-m", "oel_hpc.status", str(run_dir)]
        status_s, status_cpu = [], []
        for _ in range(args.repeats):
            seconds, out = timed(status_argv, env, status_cpu)
            if out.returncode != 0:
                raise SystemExit(f"status failed ({out.returncode}): {out.stderr.strip()}")
            status_s.append(seconds)
        shown = json.loads(subprocess.run([*status_argv, "--json"], capture_output=True, text=True, timeout=120,
                                          cwd=ROOT, env=env).stdout)
        states: dict[str, int] = {}
        for stage in shown["stages"]:
            for row in stage["tasks"]:
                states[row["state"]] = states.get(row["state"], 0) + 1
        html = run_dir.parent / "scale-report.html"
        html_s, out = timed([*status_argv, "--html", str(html)], env)
        if out.returncode != 0:
            raise SystemExit(f"status --html failed ({out.returncode}): {out.stderr.strip()}")
        drawn = browser_check(html)
        synthetic = synthetic_report(root)
        replan_s, replan = timed([sys.executable, "-m", "oel_hpc", *overrides, "launch.plan_only=true"], env)

        print(f"DAG: {ROUNDS} rounds x 5 stages; per round {SEEDS} extraction seeds and {CHECKPOINTS} evaluation "
              f"checkpoints; {tasks} tasks in all; MaxArraySize {args.max_array_size} (cluster.max_array_size); "
              "jobs submitted held (nothing runs)")
        print(f"planner (python -m oel_hpc ... launch.plan_only=true, a subprocess): {plan_s:.2f} s before "
              f"submitting ({plan.stdout.splitlines()[2] if len(plan.stdout.splitlines()) > 2 else '?'}); "
              f"{replan_s:.2f} s after (all queued: {replan.stdout.splitlines()[2:3]})")
        print(f"submit() in-process: {submit_s:.2f} s, {len(report.submitted)} sbatch calls for {tasks} tasks")
        for r, seconds in sorted(per_round.items()):
            print(f"  round {r}: {len(seconds)} sbatch calls, {sum(seconds):.2f} s in sbatch "
                  f"({1000 * sum(seconds) / len(seconds):.0f} ms each)")
        print(f"arrays after the split ({len(arrays)}):")
        for s in arrays:
            print(f"  {s.node.id:<14} job {s.job_id:<6} tasks {s.tasks[0]}-{s.tasks[-1]} ({len(s.tasks)}) "
                  f"offset {s.index_offset}")
        median = statistics.median(status_s)
        print(f"python -m oel_hpc.status <run> (subprocess, {args.repeats} runs): median {median:.3f} s, "
              f"min {min(status_s):.3f} s, max {max(status_s):.3f} s  (target < 1 s: "
              f"{'met' if median < 1 else 'NOT met'}); CPU time (user + system) median "
              f"{statistics.median(status_cpu):.3f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
              "cores; task states: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
        print(f"HTML report (status --html, a subprocess): {html_s:.2f} s, {html.stat().st_size / 1e3:.0f} KB; "
              f"in headless chromium: {drawn}")
        print(f"HTML report of a synthetic run of the same size with records (tests/test_status_scale.py: round 1 "
              f"done, round 2 extracting): {synthetic}")
        return 0 if median < 1 else 1
    finally:
        if job_ids:
            subprocess.run(["scancel", *job_ids], capture_output=True, timeout=120)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"run folder kept in {root}")


if __name__ == "__main__":
    sys.exit(main())
