#!/usr/bin/env python
"""Benchmark of the Slurm launcher's submission on the local test cluster (not a test: it prints figures).

Submits the 3-round Sokoban recipe's DAG (`experiment=sokoban_qwen3_4b_instruct evaluate.steps=all`: 10 seeds and
51 evaluation tasks — step 0 and the 50 checkpoints — per round) with `cluster=local_slurm` and trivial stage
bodies, then prints the sbatch calls per round, the seconds it took to submit all three rounds, and the
scheduler's time-to-start of the first extraction array task (sacct Start − Submit). Everything it submitted is
cancelled at the end.

Trivial stage bodies: `cluster.python=/bin/true`. The rendered scripts are the real ones (same #SBATCH lines, srun
for the consolidation, the USR2 forwarding), but their last command is `true -m oel_hpc.worker <run> <stage>`,
which ignores its arguments and exits 0 at once, so every job succeeds in about a second and its dependents are released.

Two measurements:
  in-process   the launcher's `submit()` called from Python, config already composed (what the login process
               spends on Slurm: squeue, scripts, manifest, 15 sbatch calls);
  CLI          the user's whole command as a subprocess (`python -m oel_hpc -m hydra/launcher=submitit_slurm ...`),
               Python start-up, imports and Hydra composition included.

    eval "$(tools/slurm/start.sh | tail -1)"; python tools/bench_submit.py
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OVERRIDES = ["experiment=sokoban_qwen3_4b_instruct", "evaluate.steps=all", "cluster=local_slurm",
             "cluster.python=/bin/true", "launch.check_python=false", "wandb.mode=disabled"]


def sacct_times(job_id: str) -> dict[str, tuple[str, str, str]]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "--format=JobID,Submit,Start,State"],
                         capture_output=True, text=True, timeout=30).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 4:
            rows[parts[0]] = (parts[1], parts[2], parts[3])
    return rows


def time_to_start(array_id: str, timeout: float) -> float | None:
    """Start − Submit of the array's first task, from sacct (seconds; sacct has 1 s resolution)."""
    from datetime import datetime

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        row = sacct_times(array_id).get(f"{array_id}_0")
        if row and row[1] not in ("", "Unknown", "None"):
            return (datetime.fromisoformat(row[1]) - datetime.fromisoformat(row[0])).total_seconds()
        time.sleep(0.2)
    return None


def drain(job_ids: list[str], timeout: float = 900) -> tuple[float, dict[str, int]]:
    """Wait until none of the jobs is queued; (seconds, {sacct state: tasks})."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and not out.stdout.strip():
            break
        time.sleep(1)
    seconds = time.monotonic() - t0
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "--format=State"],
                         capture_output=True, text=True, timeout=30).stdout
    states: dict[str, int] = {}
    for state in out.split():
        states[state] = states.get(state, 0) + 1
    return seconds, states


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)


def in_process(root: Path) -> tuple[dict, list[str]]:
    from hydra import compose, initialize_config_dir
    from oel_hpc.config import CONF_DIR, validate
    from oel_hpc.launch import guard, slurm
    from oel_hpc.pipeline import build_dag, run_hash
    from oel_hpc.slurm import Slurm

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*OVERRIDES, f"run.root={root}", "run.name=bench-inproc"])
    validate(cfg, check_files=False)
    nodes = build_dag(cfg)
    paths = guard.check_run_dir(cfg)
    client = Slurm()
    t0 = time.perf_counter()
    report = slurm.submit(cfg, paths, nodes, run_hash(cfg), client)
    seconds = time.perf_counter() - t0
    ids = [s.job_id for s in report.submitted]
    extract = next(s for s in report.submitted if s.node.id == "r1/extract")
    tasks = {n.id: len(n.tasks) if n.tasks is not None else 1 for n in nodes}
    return {"seconds": seconds, "sbatch_seconds": report.sbatch_seconds, "calls": len(client.sbatch_calls),
            "per_round": report.sbatch_per_round(), "first_array": extract.job_id,
            "tasks_per_round": {r: sum(v for k, v in tasks.items() if k.startswith(f"r{r}/")) for r in (1, 2, 3)},
            "eval_tasks": tasks["r1/evaluate"], "seeds": tasks["r1/extract"]}, ids


def cli(root: Path) -> tuple[float, list[str], str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # the recipe's model is a hub id
    argv = [sys.executable, "-m", "oel_hpc", "-m", "hydra/launcher=submitit_slurm", *OVERRIDES,
            f"run.root={root}", "run.name=bench-cli"]
    t0 = time.perf_counter()
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    seconds = time.perf_counter() - t0
    ids = re.findall(r"\bjob (\d+)", out.stdout)
    if out.returncode != 0:
        raise SystemExit(f"the CLI failed ({out.returncode}): {out.stderr.strip()}")
    return seconds, ids, out.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the run folders (default: removed)")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI measurement")
    parser.add_argument("--drain", action="store_true",
                        help="let the in-process submission run to the end (3 x 64 trivial tasks) and time it")
    args = parser.parse_args()
    if not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None:
        print('no Slurm test cluster: eval "$(tools/slurm/start.sh | tail -1)" first', file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="oel-bench-"))
    submitted: list[str] = []
    try:
        fig, ids = in_process(root)
        submitted += ids
        tts = time_to_start(fig["first_array"], timeout=60)
        drained = drain(ids) if args.drain else None
        cancel(ids)
        print(f"DAG: 3 rounds x 5 stages; per round {fig['seeds']} extraction seeds, {fig['eval_tasks']} evaluation "
              f"tasks (step 0 + 50 checkpoints); {fig['tasks_per_round'][1]} tasks per round")
        print("in-process submit():")
        print("  sbatch calls per round:     " + ", ".join(f"round {r}: {k}" for r, k in sorted(fig["per_round"].items()))
              + "  (target <= 6)")
        print(f"  seconds to submit 3 rounds: {fig['seconds']:.3f} s in all, of which sbatch calls "
              f"{fig['sbatch_seconds']:.3f} s ({fig['calls']} calls, {1000 * fig['sbatch_seconds'] / fig['calls']:.0f} ms "
              f"each)  (target <= 3 s)")
        print(f"  first array task's time-to-start (sacct Start - Submit of {fig['first_array']}_0): "
              + (f"{tts:.0f} s" if tts is not None else "did not start within 60 s"))
        if drained is not None:
            seconds, states = drained
            print(f"  whole DAG with trivial bodies: {seconds:.0f} s until the queue was empty; sacct states: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
        if not args.no_cli:
            seconds, ids, _ = cli(root)
            submitted += ids
            cancel(ids)
            print("the user's command (python -m oel_hpc -m hydra/launcher=submitit_slurm ..., a subprocess):")
            print(f"  wall time, start-up and composition included: {seconds:.2f} s for {len(ids)} sbatch calls")
    finally:
        cancel(submitted)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"run folders kept in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
