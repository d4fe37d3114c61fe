"""Data-parallel consolidation with real processes and real gloo on CPU: 2 ranks train to the same weights as 1 rank
(DDP and FSDP2), DCP checkpoints resume at another rank count, SIGUSR2 stops every rank at a step boundary with a
checkpoint and a rerun finishes at the uninterrupted weights. The run directory comes from the real pipeline (the
committed tiny model); its single-process consolidation is the 1-rank reference. Ranks are launched as a batch job
would: torchrun, or one process per rank with Slurm's variables (as `srun` starts them)."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from oel_hpc.rundir import read_jsonl
from oel_hpc.train import preemption
from oel_hpc.ranks import DistEnv, detect_env, slurm_master_port
from oel_hpc.train.distributed import partition_by_tokens
from tests.conftest import ROOT

STEPS = 4
# small micro-batches: 12-13 per step in one process, 6 or 7 per rank on 2 ranks, so ranks run different numbers
# of them (DDP syncs only the last backward; FSDP2 pads with zero-weight passes)
MICRO_BATCH_TOKENS = 700
CONSOLIDATE = "round_1/consolidate"
ATOL = 5e-5  # measured: 2 ranks differ from 1 by ≤ 6e-6 after 4 steps at lr 3e-4 (summation order only)


# ---------------------------------------------------------------------------------------------------------------
# Unit: rows across ranks, the environment, requeue

def test_partition_balances_tokens_deterministically():
    lengths = [50, 10, 40, 30, 20, 60, 5]
    parts = partition_by_tokens(lengths, 2)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))  # every row exactly once
    assert all(p == sorted(p) for p in parts)  # file order within a rank
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= max(lengths)  # greedy bound
    assert loads == [110, 105]  # longest first to the emptier rank: 60→0, 50→1, 40→1, 30→0, 20→0, 10→1, 5→1
    assert partition_by_tokens(lengths, 2) == parts  # the same on every call (every rank computes it)
    assert partition_by_tokens(lengths, 1) == [list(range(len(lengths)))]
    assert partition_by_tokens([7, 7, 7], 2) == [[0, 2], [1]]  # ties: lower index, lower rank
    assert partition_by_tokens([3], 4) == [[0], [], [], []]  # more ranks than rows: some get none
    # many rows: loads within one row of each other
    lengths = [(i * 37) % 101 + 1 for i in range(128)]
    loads = [sum(lengths[i] for i in p) for p in partition_by_tokens(lengths, 16)]
    assert max(loads) - min(loads) <= max(lengths)


def test_environment_detection():
    assert detect_env({}) == DistEnv()  # no launcher: one process, no process group
    assert detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                       "MASTER_PORT": "1234"}) == DistEnv(3, 8, 1, "n1", 1234, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
             "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": "gpu[01-02]",
             "MASTER_ADDR": "gpu01"}
    assert detect_env(slurm) == DistEnv(5, 16, 5, "gpu01", slurm_master_port(4711), "slurm")
    assert slurm_master_port(4711) == slurm_master_port("4711") == 24711
    # the batch script itself (no step) is not a rank, even in a 16-task job; neither is a 1-task step
    assert detect_env({k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}) == DistEnv()
    assert detect_env({**slurm, "SLURM_STEP_ID": "batch"}) == DistEnv()
    assert detect_env({**slurm, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}).world_size == 1


def test_slurm_master_is_the_first_host_of_the_job(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"  # a broken scontrol (or none, as in a container): the node list is read in Python
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "30001", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert detect_env(env) == DistEnv(9, 16, 1, "gpu07", 20000 + 30001 % 20000, "slurm")
    assert detect_env({**env, "MASTER_PORT": "29400"}).master_port == 29400


def test_requeue_calls_scontrol_for_this_job(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert preemption.requeue_slurm_job() is False and not calls.exists()  # not in a Slurm job: nothing to do
    assert preemption.stop("SIGUSR2", 3, "ckpt/step_3").requeued is False
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    assert preemption.stop("SIGTERM", 3, "ckpt/step_3").requeued is False  # SIGTERM (scancel) never requeues
    assert not calls.exists()
    e = preemption.stop("SIGUSR2", 3, "ckpt/step_3")
    assert e.requeued and "requeued" in str(e) and calls.read_text() == "requeue 812\n"
    fake.write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\nexit 1\n")
    assert preemption.requeue_slurm_job() is False  # reported, not raised: the checkpoint is saved anyway


# ---------------------------------------------------------------------------------------------------------------
# Real processes

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A small run made by the real pipeline; its consolidation (one process, no process group) is the reference."""
    root = tmp_path_factory.mktemp("dist")
    out = subprocess.run([sys.executable, "-m", "oel_hpc", f"run.root={root}", f"consolidate.steps={STEPS}",
                          "consolidate.save_freq=1", f"consolidate.micro_batch_tokens={MICRO_BATCH_TOKENS}",
                          "evaluate.games=4", "wandb.mode=disabled"],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "tiny-frozenlake"


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_job_id() -> int:
    """A Slurm job id whose derived master port is free here."""
    for job_id in random.Random(os.getpid() + time.time_ns()).sample(range(1, 20000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_master_port(job_id)))
            except OSError:
                continue
            return job_id
    raise RuntimeError("no free port")


def fresh(base: Path, dst: Path, parallel: str = "ddp") -> Path:
    """A copy of the run with consolidation not started, under trainer.parallel=`parallel`."""
    shutil.copytree(base, dst)
    c = dst / CONSOLIDATE
    for p in ("ckpt", "hf", "DONE", "metrics.jsonl", "wandb"):
        shutil.rmtree(c / p) if (c / p).is_dir() else (c / p).unlink(missing_ok=True)
    cfg = OmegaConf.load(dst / "config.yaml")
    cfg.trainer.parallel = parallel
    OmegaConf.save(cfg, dst / "config.yaml")
    return dst


def cut(src: Path, dst: Path, keep: int) -> Path:
    """A copy of a finished run as if its job had died right after checkpoint `keep`."""
    shutil.copytree(src, dst)
    c = dst / CONSOLIDATE
    for p in (c / "ckpt").glob("step_*"):
        if int(p.name.split("_")[1]) > keep:
            shutil.rmtree(p)
    shutil.rmtree(c / "hf")
    (c / "DONE").unlink()
    return dst


def start(run: Path, ranks: int, how: str) -> list[subprocess.Popen]:
    """Consolidation of `run` on `ranks` processes: `torchrun`, or one process per rank with the variables
    torchrun (`env`) or srun (`slurm`) gives each task."""
    cmd = ["-m", "oel_hpc.worker", str(run), "r1/consolidate"]
    if how == "torchrun" or ranks == 1:
        pre = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
        return [subprocess.Popen([sys.executable, *pre, *cmd], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)]
    port, job_id, procs = free_port(), free_job_id(), []
    for rank in range(ranks):
        if how == "env":
            env = clean_env(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port))
        else:  # srun's variables; the port is derived from the job id
            env = clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS=str(ranks), SLURM_STEP_NUM_TASKS=str(ranks),
                            SLURM_LOCALID=str(rank), SLURM_STEP_ID="0", SLURM_JOB_ID=str(job_id),
                            SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1")
        procs.append(subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> tuple[list[int], str]:
    deadline, outs = time.time() + timeout, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], "\n".join(outs)


def consolidate(run: Path, ranks: int, how: str = "torchrun") -> str:
    codes, out = finish(start(run, ranks, how))
    assert codes == [0] * len(codes), out[-4000:]
    return out


def weights(run: Path) -> dict:
    return load_file(run / CONSOLIDATE / "hf/model.safetensors")


def assert_same_weights(a: Path, b: Path, atol: float = ATOL) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"weights differ by {worst}"


def assert_same_metrics(a: Path, b: Path) -> None:
    ma, mb = read_jsonl(a / CONSOLIDATE / "metrics.jsonl"), read_jsonl(b / CONSOLIDATE / "metrics.jsonl")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, STEPS + 1))
    for x, y in zip(ma, mb):
        assert (x["tokens"], x["rows"]) == (y["tokens"], y["rows"])  # the same samples, split differently
        for key in ("kl", "student_entropy", "teacher_entropy", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4), key


@pytest.fixture(scope="module")
def two_ranks(base_run, tmp_path_factory):
    """Uninterrupted 2-rank runs, one per parallel mode (made once, on first use)."""
    made = {}

    def get(parallel: str) -> Path:
        if parallel not in made:
            run = fresh(base_run, tmp_path_factory.mktemp(f"two-{parallel}") / "run", parallel)
            consolidate(run, 2, "torchrun" if parallel == "ddp" else "slurm")
            made[parallel] = run
        return made[parallel]

    return get


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_give_the_weights_of_one(base_run, two_ranks, parallel):
    run = two_ranks(parallel)
    assert_same_weights(base_run, run)
    assert_same_metrics(base_run, run)
    c = run / CONSOLIDATE
    assert json.loads((c / "DONE").read_text())["config_hash"]
    meta = json.loads((c / "ckpt/step_1/meta.json").read_text())
    assert (meta["world_size"], meta["parallel"], meta["step"]) == (2, parallel, 1)
    files = {p.name for p in (c / "ckpt/step_1").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt", "meta.json"} <= files
    assert not list((c / "ckpt").glob(".step_*"))  # no temp folder left behind
    # the export is a plain HF folder, like the one-process export (tied LM head written once)
    assert json.loads((c / "hf/config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


def test_fsdp_checkpoint_resumes_at_other_rank_counts(base_run, two_ranks, tmp_path):
    # written by 2 ranks (sharded), resumed by 1 process ...
    run = cut(two_ranks("fsdp"), tmp_path / "a", keep=1)
    out = consolidate(run, 1)
    assert "resumed from checkpoint step 1" in out
    assert_same_weights(base_run, run)
    assert json.loads((run / CONSOLIDATE / "ckpt/step_2/meta.json").read_text())["world_size"] == 1
    # ... whose checkpoint 2 ranks resume again
    run = cut(run, tmp_path / "b", keep=2)
    out = consolidate(run, 2, "env")
    assert "resumed from checkpoint step 2 on 2 ranks (fsdp)" in out
    assert_same_weights(base_run, run)
    assert [m["step"] for m in read_jsonl(run / CONSOLIDATE / "metrics.jsonl")] == list(range(1, STEPS + 1))


def test_one_rank_checkpoint_resumes_on_two_ddp_ranks(base_run, tmp_path):
    run = cut(base_run, tmp_path / "run", keep=1)
    out = consolidate(run, 2, "slurm")
    assert "resumed from checkpoint step 1 on 2 ranks (ddp)" in out
    assert_same_weights(base_run, run)


def test_sigusr2_checkpoints_at_the_step_boundary_and_the_rerun_resumes(base_run, two_ranks, tmp_path):
    run = fresh(base_run, tmp_path / "run", "fsdp")
    c = run / CONSOLIDATE
    procs = start(run, 2, "env")
    deadline = time.time() + 240
    while not (c / "ckpt/step_1/meta.json").is_file():  # training is under way (signal handlers installed)
        assert time.time() < deadline and all(p.poll() is None for p in procs), finish(procs, 5)[1][-4000:]
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGUSR2)  # one rank only: all must agree to stop
    codes, out = finish(procs)
    assert codes == [preemption.EXIT_PREEMPTED] * 2, out[-4000:]
    stopped = max(int(p.name.split("_")[1]) for p in (c / "ckpt").glob("step_*"))
    assert 1 <= stopped < STEPS
    assert f"stopped by SIGUSR2 after step {stopped}" in out and "run it again to resume there" in out
    assert not (c / "DONE").exists() and not (c / "hf").exists()
    assert [m["step"] for m in read_jsonl(c / "metrics.jsonl")] == list(range(1, stopped + 1))

    out = consolidate(run, 2, "env")  # the same command again, as a requeued job runs it
    assert f"resumed from checkpoint step {stopped}" in out
    assert_same_weights(two_ranks("fsdp"), run, atol=1e-6)  # the uninterrupted 2-rank run
    assert_same_weights(base_run, run)
    assert [m["step"] for m in read_jsonl(c / "metrics.jsonl")] == list(range(1, STEPS + 1))


def test_export_for_eval_reads_a_sharded_checkpoint_once(two_ranks, tmp_path):
    """An evaluation task turns a checkpoint written by 2 FSDP ranks into an HF folder in one process; two tasks
    exporting the same step at once both succeed and leave one folder."""
    run = tmp_path / "run"
    shutil.copytree(two_ranks("fsdp"), run)
    code = ("import sys; from omegaconf import OmegaConf; from oel_hpc.rundir import RunPaths; "
            "from oel_hpc.train.export import export_for_eval; "
            "run = RunPaths(__import__('pathlib').Path(sys.argv[1])); "
            "print(export_for_eval(OmegaConf.load(run.config), run, 1, int(sys.argv[2])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(run), str(STEPS)], cwd=ROOT, env=clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    codes, out = finish(procs)
    assert codes == [0, 0], out[-3000:]
    ckpt = run / CONSOLIDATE / "ckpt"
    exported = load_file(ckpt / f"step_{STEPS}/hf/model.safetensors")
    final = weights(run)  # the last checkpoint holds the final weights
    assert exported.keys() == final.keys() and all((exported[k] == final[k]).all() for k in final)
    assert [p.name for p in (ckpt / f"step_{STEPS}").glob("*hf*")] == ["hf"]  # the losing copy was discarded
