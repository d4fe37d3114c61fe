"""A Hydra sweep on the real local test cluster (tools/slurm/start.sh; skipped without SLURM_CONF), as a user types it:
`python -m oel_hpc -m hydra/launcher=submitit_slurm cluster=local_slurm ... consolidate.lr=1e-4,0.3`. Two small
points of the committed tiny model: both DAGs queued at once under their own job names and run directories; the
same command again while they are queued submits nothing, and nothing once they are done."""
import os
import subprocess
import sys
import time

import pytest

from oel_hpc.launch.sweep import RECORD
from tests.conftest import ROOT
from tests.test_slurm_launch import (SECRETS, _cluster_problem, all_job_ids, cancel, dag_done, hydra_quoted,
                                     queue_info, sbatch_calls, sbatch_wrapper, wait_for_run)
from tests.test_sweep_local import NAMES, SMALL

pytestmark = pytest.mark.slow
LRS = "1e-4,0.3"
STAGES = ("extract", "gather", "deploy", "consolidate", "evaluate")


@pytest.fixture(scope="module", autouse=True)
def _slurm_cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"no Slurm test cluster: {problem}")


def sweep(root, env):
    argv = [sys.executable, "-m", "oel_hpc", "-m", "hydra/launcher=submitit_slurm", "cluster=local_slurm",
            f"run.root={hydra_quoted(root)}", "run.name=sw", "cluster.resources.consolidate.tasks_per_node=1",
            *SMALL, f"consolidate.lr={LRS}"]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep-slurm")
    root = base / "runs"
    bin_dir, log = sbatch_wrapper(base / "bin")
    env = {**os.environ, **SECRETS, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    first = sweep(root, env)
    submit_s = time.monotonic() - t0
    assert first.returncode == 0, first.stdout + first.stderr
    runs = [root / "sw" / name for name in NAMES]
    try:
        queued = {run: queue_info(all_job_ids(run)) for run in runs}  # right after the submission
        calls_first = sbatch_calls(log)
        log.unlink()
        record = (root / "sw" / RECORD).read_bytes()
        while_queued = sweep(root, env)  # the jobs take longer than this command: they are still queued/running
        calls_queued = sbatch_calls(log)
        for run in runs:
            wait_for_run(run)
        done = sweep(root, env)
        calls_done = sbatch_calls(log)
    except BaseException:
        for run in runs:
            cancel(all_job_ids(run))
        raise
    return {"root": root, "runs": runs, "first": first, "submit_s": submit_s, "queued": queued,
            "calls": calls_first, "while_queued": while_queued, "calls_queued": calls_queued, "done": done,
            "calls_done": calls_done, "record": record}


def test_one_command_submits_one_dag_per_point(swept):
    out = swept["first"].stdout
    assert swept["submit_s"] < 60, "the command returns once both DAGs are queued"
    assert f"Sweep 'sw': 2 points ({swept['root'] / 'sw'}/sweep.json)" in out
    for name in NAMES:
        assert f"  sw/{name}" in out and "submitted 5 jobs" in out
    assert f"Follow it with: python -m oel_hpc.status {swept['root'] / 'sw'}" in out
    assert len(swept["calls"]) == 10  # 5 stages × 2 points, no more


def test_the_jobs_carry_each_points_name_and_run_directory(swept):
    for run, name in zip(swept["runs"], NAMES):
        rows = swept["queued"][run]
        ids = all_job_ids(run)
        assert len(ids) == 5
        by_stage = {}
        for job, job_name, comment in rows:
            by_stage.setdefault(job_name, set()).add(comment)
        assert sorted(by_stage) == sorted(f"oel:sw/{name}:r1:{stage}" for stage in STAGES)
        for stage in STAGES:
            assert by_stage[f"oel:sw/{name}:r1:{stage}"] == {f"oel_hpc run={run} stage=r1/{stage}"}


def test_a_rerun_while_queued_submits_nothing(swept):
    out = swept["while_queued"]
    assert out.returncode == 0, out.stderr
    assert swept["calls_queued"] == []
    assert out.stdout.count("nothing to submit: still queued or running") == 2, out.stdout


def test_a_rerun_when_done_submits_nothing(swept):
    out = swept["done"]
    assert out.returncode == 0, out.stderr
    assert swept["calls_done"] == []
    assert out.stdout.count("nothing to submit: already done") == 2, out.stdout
    assert (swept["root"] / "sw" / RECORD).read_bytes() == swept["record"]


def test_the_points_ran_with_their_own_values(swept):
    lrs = []
    for run in swept["runs"]:
        config = (run / "config.yaml").read_text()
        lrs.append(next(float(line.split(":")[1]) for line in config.splitlines() if line.startswith("  lr:")))
        assert dag_done(run)
    assert lrs == [1e-4, 0.3]


def test_no_secret_in_the_record(swept):
    text = (swept["root"] / "sw" / RECORD).read_text()
    assert not any(secret in text for secret in SECRETS.values())
