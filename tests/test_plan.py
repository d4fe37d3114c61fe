"""The planner (`launch.plan_only=true`) and MaxArraySize splits, with stand-ins for Slurm's commands (bash scripts
on PATH: sbatch hands out ids from 100 on, squeue prints what the test wrote, scontrol answers as a cluster
would). The real-cluster side is tests/test_slurm_plan.py."""
import json
import os
import subprocess
import sys

import pytest

from oel_hpc import status
from oel_hpc.errors import ConfigError
from oel_hpc.launch.plan import make_plan, format_plan
from oel_hpc.launch.slurm import submit
from oel_hpc.pipeline import build_dag
from oel_hpc.rundir import RunPaths
from oel_hpc.slurm import ArrayPart, Slurm, split_array
from oel_hpc.worker import array_task
from tests.conftest import ROOT, compose
from tests.test_slurm_module import calls, fake, quick

SCONTROL = """
if [ "$1 $2" = "show config" ]; then
  echo 'Configuration data as of now'
  echo 'MaxArraySize            = {max_array}'
  echo 'MaxJobCount             = {max_jobs}'
  exit 0
fi
if [ "$1 $2" = "show partition" ]; then echo "{partition}"; exit 0; fi
exit 1"""
PARTITION = ("PartitionName=gpu AllowGroups=ALL Default=YES MaxNodes=UNLIMITED MaxTime=00:30:00 State=UP "
             "TotalCPUs=8 TotalNodes=1 TRES=cpu=8,mem=100G,node=1,gres/gpu=1")


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    queue = tmp_path / "queue"
    logs = {"sbatch": fake(bin_dir, "sbatch", "echo $((99 + CALLS))"),
            "squeue": fake(bin_dir, "squeue", f'cat "{queue}" 2>/dev/null; true'),
            "scancel": fake(bin_dir, "scancel", "true"),
            "scontrol": fake(bin_dir, "scontrol", SCONTROL.format(max_array=4, max_jobs=100000, partition=PARTITION))}
    return {"bin": bin_dir, "queue": queue, **logs}


def test_split_array_keeps_every_index_below_the_limit():
    assert split_array(range(10), 4) == [ArrayPart(0, [0, 1, 2, 3]), ArrayPart(4, [4, 5, 6, 7]), ArrayPart(8, [8, 9])]
    assert split_array(range(4), 4) == [ArrayPart(0, [0, 1, 2, 3])]  # fits: one array, index = task
    seeds = split_array(range(1500), 1001)
    assert [(p.offset, p.tasks[0], p.tasks[-1], len(p.tasks)) for p in seeds] == [(0, 0, 1000, 1001),
                                                                                  (1001, 1001, 1499, 499)]
    assert seeds[1].spec() == "0-498" and seeds[1].spec(throttle=20) == "0-498%20"
    # evaluation: the index is the checkpoint step, so a few tasks can reach the limit too
    steps = split_array(range(0, 2001, 10), 1001)
    assert [(p.offset, p.tasks[0], p.tasks[-1]) for p in steps] == [(0, 0, 1000), (1010, 1010, 2000)]
    assert max(steps[1].indices()) == 990
    assert split_array([1200], 1001) == [ArrayPart(1200, [1200])]  # a lone resubmitted task: index 0
    assert split_array([3, 1, 2], 2) == [ArrayPart(0, [1]), ArrayPart(2, [2, 3])]


def test_the_worker_adds_the_offset_to_the_array_index():
    assert array_task({"SLURM_ARRAY_TASK_ID": "3", "OEL_TASK_OFFSET": "1001"}) == 1004
    assert array_task({"SLURM_ARRAY_TASK_ID": "3"}) == 3
    assert array_task({"OEL_TASK_OFFSET": "1001"}) is None  # not an array job (gather, consolidate)
    with pytest.raises(ConfigError, match="OEL_TASK_OFFSET: must be a non-negative integer"):
        array_task({"SLURM_ARRAY_TASK_ID": "3", "OEL_TASK_OFFSET": "-4"})


def launch(tmp_path, *overrides):
    cfg = compose(["cluster=local_slurm", f"run.root={tmp_path / 'runs'}", "wandb.mode=disabled", "extract.seeds=10",
                   *overrides])
    nodes = build_dag(cfg)
    paths = RunPaths(tmp_path / "runs" / cfg.run.name)
    return submit(cfg, paths, nodes, "run-hash", Slurm(quick())), paths


def test_a_long_array_is_split_and_downstream_waits_for_every_part(tmp_path, cluster):
    report, paths = launch(tmp_path, "cluster.array_throttle=2")
    lines = calls(cluster["sbatch"])
    assert calls(cluster["scontrol"]) == ["show config"]  # asked once, for MaxArraySize 4
    extract = [line for line in lines if line.endswith("r1_extract.sbatch")]
    assert [line.rsplit(" ", 1)[0] for line in extract] == ["--parsable --array=0-3%2 --export=ALL,OEL_TASK_OFFSET=0",
                                                          "--parsable --array=0-3%2 --export=ALL,OEL_TASK_OFFSET=4",
                                                          "--parsable --array=0-1%2 --export=ALL,OEL_TASK_OFFSET=8"]
    assert len(lines) == 3 + 4  # 3 extraction arrays, gather, deploy, consolidation, evaluation (steps 0, 2)
    gather = next(line for line in lines if line.endswith("r1_gather.sbatch"))
    assert "--dependency=afterok:100:101:102 " in gather
    assert "--array=0,2%2 --export=ALL,OEL_TASK_OFFSET=0" in lines[-1]
    stage = next(s for s in json.loads(paths.manifest.read_text())["stages"] if s["id"] == "r1/extract")
    assert stage["job_ids"] == ["100", "101", "102"]
    assert [(s["job_id"], s["tasks"], s.get("index_offset")) for s in stage["submissions"]] == [
        ("100", [0, 1, 2, 3], None), ("101", [4, 5, 6, 7], 4), ("102", [8, 9], 8)]

    # seed 9 (array 102, index 1) failed; every other seed finishes; the gather that waited for it never starts
    rows = [f"{job}_{i}|COMPLETING|0:30|vm|vm" for job, n in (("100", 4), ("101", 4), ("102", 2)) for i in range(n)]
    rows[-1] = "102_1|FAILED|0:30|vm|vm"
    rows += ["103|PENDING|0:00|(DependencyNeverSatisfied)|"]
    cluster["queue"].write_text("\n".join(rows) + "\n")
    report, _ = launch(tmp_path)
    again = report.submitted[0]
    assert again.node.id == "r1/extract" and again.tasks == [9] and again.index_offset == 9
    assert "--array=0 --export=ALL,OEL_TASK_OFFSET=9" in calls(cluster["sbatch"])[len(lines)]
    new_gather = next(s for s in report.submitted if s.node.id == "r1/gather")
    kept = [f"100_{i}" for i in range(4)] + [f"101_{i}" for i in range(4)] + ["102_0"]  # Slurm's names: index
    assert new_gather.dependency == [again.job_id, *kept]
    assert report.in_flight["r1/extract"] == kept

    # the dashboard shows every task under its Slurm name, in the state of its own job
    def fake_slurm(bases):
        sacct = {("102", 0): {"state": "COMPLETED", "reason": None, "elapsed_s": 3, "exit_code": "0:0",
                              "node": "vm", "name": "x", "start": None, "end": None},
                 ("101", 1): {"state": "RUNNING", "reason": None, "elapsed_s": 3, "exit_code": "0:0",
                              "node": "vm", "name": "x", "start": None, "end": None}}
        squeue = {(again.job_id, 0): {"state": "PENDING", "reason": "Priority", "elapsed_s": 0, "node": None}}
        return sacct, squeue, []

    shown = status.collect(paths.root, run_slurm=fake_slurm)
    tasks = {row["task"]: row for row in next(s for s in shown["stages"] if s["id"] == "r1/extract")["tasks"]}
    assert tasks[5]["job_id"] == "101_1" and tasks[5]["state"] == "running"
    assert tasks[8]["job_id"] == "102_0" and tasks[8]["state"] == "failed"  # COMPLETED without a DONE marker
    assert tasks[9]["job_id"] == f"{again.job_id}_0" and tasks[9]["state"] == "pending"  # the resubmission


def plan_of(tmp_path, *overrides):
    cfg = compose(["cluster=local_slurm", f"run.root={tmp_path / 'runs'}", "wandb.mode=disabled",
                   "extract.seeds=10", "cluster.gpus_per_node=1", "cluster.resources.extract.time_min=12",
                   "cluster.resources.gather.time_min=6", "cluster.resources.deploy.time_min=12",
                   "cluster.resources.consolidate.time_min=60", "cluster.resources.consolidate.nodes=2",
                   "cluster.resources.evaluate.time_min=12", *overrides])
    paths = RunPaths(tmp_path / "runs" / cfg.run.name)
    return cfg, paths, make_plan(cfg, paths, build_dag(cfg), Slurm(quick()))


def test_the_plan_counts_gpu_hours_and_warns_about_what_the_cluster_refuses(tmp_path, cluster):
    fake(cluster["bin"], "scontrol", SCONTROL.format(max_array=4, max_jobs=12, partition=PARTITION))
    cfg, paths, plan = plan_of(tmp_path)
    assert [(j.node.id, j.count, j.array, j.offset) for j in plan.jobs] == [
        ("r1/extract", 4, "0-3", 0), ("r1/extract", 4, "0-3", 4), ("r1/extract", 2, "0-1", 8),
        ("r1/gather", 1, None, None), ("r1/deploy", 1, None, None), ("r1/consolidate", 1, None, None),
        ("r1/evaluate", 2, "0,2", 0)]
    text = format_plan(cfg, paths, plan)
    # GPU-minutes: extract 10 x 12, gather 6, deploy 12, consolidation 2 nodes x 60, evaluation 2 x 12 = 282
    totals = {line.split()[0]: line.split()[1:6] for line in text.splitlines() if "GPU-hours" in line}
    # CPU-minutes: the same with 1 CPU per task, the consolidation 2 nodes x 2 tasks x 1 CPU x 60 = 402
    assert totals["total"] == ["15", "tasks", "4.7", "GPU-hours", "6.7"]
    assert totals["extract"] == ["10", "tasks", "2.0", "GPU-hours", "2.0"]
    assert totals["consolidate"] == ["1", "tasks", "2.0", "GPU-hours", "4.0"]
    assert "Cluster: partition gpu (MaxTime 00:30:00, nodes 1); MaxArraySize 4 (scontrol show config)" in text
    warnings = [line for line in text.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: r1/extract: array indices must stay below MaxArraySize 4: split into 3 arrays (seeds 0-3; seeds "
        "4-7 as indices 0-3 (offset 4); seeds 8-9 as indices 0-1 (offset 8)); what depends on it waits for all of them",
        "warning: 15 tasks exceed MaxJobCount 12: once the queue holds that many job records (an array task started "
        "is one), sbatch refuses more until some end",
        "warning: cluster.resources.consolidate.time_min=60 is over partition gpu's MaxTime 00:30:00 (30 min): "
        "sbatch refuses the job",
        "warning: cluster.resources.consolidate.nodes=2 is more than partition gpu's 1 nodes: sbatch refuses the job",
        "warning: cluster.resources.consolidate asks 2 x 1 GPUs, partition gpu has 1: the job can never start"]
    assert calls(cluster["sbatch"]) == [] and not paths.root.exists()


def test_the_plan_without_slurm_says_so_and_uses_the_config_key(tmp_path, cluster):
    fake(cluster["bin"], "scontrol", 'echo "scontrol: fatal: Could not establish a configuration source" >&2; exit 1')
    cfg, paths, plan = plan_of(tmp_path, "cluster.max_array_size=6", "cluster.array_throttle=3")
    assert [(j.array, j.offset) for j in plan.jobs if j.node.stage == "extract"] == [("0-5%3", 0), ("0-3%3", 6)]
    line = format_plan(cfg, paths, plan).splitlines()[1]
    assert line == ("Cluster: not asked (scontrol show config failed: scontrol: fatal: Could not establish a "
                    "configuration source); MaxArraySize 6 (cluster.max_array_size); partition limits not checked")
    cfg, paths, plan = plan_of(tmp_path)
    assert "MaxArraySize 1001 (Slurm's default; set cluster.max_array_size if yours differs)" in \
        format_plan(cfg, paths, plan)


def oel(*args, env=None):
    return subprocess.run([sys.executable, "-m", "oel_hpc", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_plan_only_from_the_command_line_writes_nothing(tmp_path, cluster):
    out = oel("cluster=local_slurm", f"run.root={tmp_path / 'runs'}", "wandb.mode=disabled", "extract.seeds=6",
              "launch.plan_only=true", "pipeline.rounds=2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Plan for run 'tiny-frozenlake'")
    assert "12 sbatch calls (round 1: 6, round 2: 6):" in out.stdout  # 6 seeds, MaxArraySize 4: 2 arrays
    assert calls(cluster["sbatch"]) == [] and not (tmp_path / "runs").exists()
    out = oel("cluster=local", f"run.root={tmp_path / 'runs'}", "launch.plan_only=true")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].endswith(
        "launch.plan_only: plans a Slurm submission, but cluster.launcher=local: pick a Slurm preset "
        "(cluster=local_slurm, a100, h100, b200) or set cluster.launcher=slurm")
