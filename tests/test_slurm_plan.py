"""MaxArraySize splits on the real local test cluster (tools/slurm/start.sh; skipped without SLURM_CONF).

A run with 5 seeds and cluster.max_array_size=2: the extraction goes as 3 arrays (seeds 0-1, 2-3 with offset 2, 4
with offset 4), the evaluation (steps 0, 1, 2) as 2; each array task runs its index + offset, every DONE marker is
written, the gather waited for all three extraction arrays, and `python -m oel_hpc.status` shows every task done
under its Slurm name. The planner, asked first, says the same split.

The jobs run the real worker (`python -m oel_hpc.worker`: config, DAG, the task from SLURM_ARRAY_TASK_ID and
OEL_TASK_OFFSET, lifecycle, DONE markers) through a stand-in interpreter (cluster.python) whose stage bodies only
write down which task they ran: the tiny model's seeds would take minutes on 2 cores.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_slurm_launch import _cluster_problem, hydra_quoted, oel, sacct, wait_for_run

# `<python> -m oel_hpc.worker <run> <stage>` with every stage body replaced: it records the task and the Slurm
# variables it ran under, and returns that record as its output (the DONE marker records it)
STUB = """#!{python}
import json, os, sys
sys.path.insert(0, os.getcwd())  # as `python -m` does: the checkout the job was submitted from
from oel_hpc import lifecycle

def body(ctx, stage, r, task):
    out = ctx.paths.done(r, stage, task).parent / f"ran_{{stage}}_{{task}}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({{"task": task, "job": os.environ.get("SLURM_ARRAY_JOB_ID"),
                               "index": os.environ.get("SLURM_ARRAY_TASK_ID"),
                               "offset": os.environ.get("OEL_TASK_OFFSET")}}))
    return [out]

lifecycle.run_task = body
from oel_hpc.worker import main
assert sys.argv[1:3] == ["-m", "oel_hpc.worker"], sys.argv
sys.exit(main(sys.argv[3:]))
"""
SMALL = ["wandb.mode=disabled", "extract.seeds=5", "cluster.max_array_size=2", "launch.check_python=false",
         "cluster.resources.consolidate.tasks_per_node=1", "run.name=split", "evaluate.steps=all"]


@pytest.fixture(scope="module", autouse=True)
def _slurm_cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"no Slurm test cluster: {problem}")


def test_a_split_extraction_runs_every_seed_once_under_its_offset(tmp_path):
    root = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stub = tmp_path / "stub python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    small = [*SMALL, f"cluster.python={hydra_quoted(stub)}"]
    plan = oel(root, *small, "launch.plan_only=true", env=env)
    assert plan.returncode == 0, plan.stderr
    assert "split into 3 arrays (seeds 0-1; seeds 2-3 as indices 0-1 (offset 2); seeds 4 as indices 0 " \
           "(offset 4))" in plan.stdout
    assert "split into 2 arrays (steps 0-1; steps 2 as indices 0 (offset 2))" in plan.stdout
    assert "8 sbatch calls (round 1: 8)" in plan.stdout and not root.exists()

    out = oel(root, *small, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    run = root / "split"
    stages = {s["id"]: s for s in json.loads((run / "manifest.json").read_text())["stages"]}
    extract = stages["r1/extract"]["submissions"]
    assert [(s["tasks"], s.get("index_offset")) for s in extract] == [([0, 1], None), ([2, 3], 2), ([4], 4)]
    evaluate = stages["r1/evaluate"]["submissions"]
    assert [(s["tasks"], s.get("index_offset")) for s in evaluate] == [([0, 1], None), ([2], 2)]
    arrays = [s["job_id"] for s in extract]
    assert stages["r1/gather"]["submissions"][0]["dependency"] == arrays
    try:
        wait_for_run(run)
    finally:
        subprocess.run(["scancel", *[j for s in stages.values() for j in s["job_ids"]]], capture_output=True,
                       timeout=30)

    # every array task ran once, and ran seed index + offset
    rows = sacct(arrays)
    ran = {}
    for seed in range(5):
        record = json.loads((run / "round_1" / "extract" / f"seed_{seed}" / f"ran_extract_{seed}.json").read_text())
        assert (run / "round_1" / "extract" / f"seed_{seed}" / "DONE").is_file(), seed
        ran[seed] = (record["job"], int(record["index"]), int(record["offset"]))
    expected_refs = {seed: (arrays[seed // 2], seed % 2) for seed in range(5)}
    assert ran == {seed: (job, index, seed - index) for seed, (job, index) in expected_refs.items()}
    assert sorted(ref for ref in rows if "_" in ref) == sorted(f"{j}_{i}" for j, i in expected_refs.values())
    assert all(rows[f"{j}_{i}"]["State"] == "COMPLETED" for j, i in expected_refs.values())

    status = subprocess.run([sys.executable, "-m", "oel_hpc.status", str(run), "--json"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT, env=env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["all_done"], [(s["id"], s["state"]) for s in report["stages"]]
    shown = {row["task"]: row["job_id"] for s in report["stages"] if s["id"] == "r1/extract" for row in s["tasks"]}
    assert shown == {seed: f"{job}_{index}" for seed, (job, index) in expected_refs.items()}
    steps = {row["task"]: row["job_id"] for s in report["stages"] if s["id"] == "r1/evaluate" for row in s["tasks"]}
    assert steps == {0: f"{evaluate[0]['job_id']}_0", 1: f"{evaluate[0]['job_id']}_1", 2: f"{evaluate[1]['job_id']}_0"}
    step_2 = json.loads((run / "round_1" / "eval" / "ran_evaluate_2.json").read_text())
    assert (step_2["job"], step_2["index"], step_2["offset"]) == (evaluate[1]["job_id"], "0", "2")
