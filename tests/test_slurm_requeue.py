"""Preemption on the real test cluster: a consolidation job gets the time-limit warning (USR2) at a random step,
checkpoints, requeues itself, starts again, resumes from the checkpoint it finds on disk, and ends with the same
weights, bit for bit, as an uninterrupted run; with trainer=torch (1 task) and trainer=megatron (tp=2: 2 tasks).
The uninterrupted reference runs with the job's thread count (OMP_NUM_THREADS=1, what a 1-CPU task gets): CPU GEMMs
split their sums by thread, so runs at 1 and 2 threads differ in the last bits (up to ~1e-6 in the weights after
AdamW on some CPUs), which is not a resume defect. Skipped without the Slurm test cluster (SLURM_CONF)."""
import json
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from oel_hpc.rundir import read_jsonl
from tests.conftest import ROOT
from tests.test_slurm_launch import _cluster_problem, cancel, oel, wait_until

STEPS = 8
COMMON = ["wandb.mode=disabled", f"consolidate.steps={STEPS}", "consolidate.save_freq=1", "evaluate.steps=first_last"]


@pytest.fixture(scope="module", autouse=True)
def _slurm_cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"no Slurm test cluster: {problem}")


def sacct_states(job_id):
    """Every run of the job (requeues included), oldest first."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "--duplicates", "-j", job_id, "--format=JobID,State"],
                         capture_output=True, text=True, timeout=30)
    return [line.split("|")[1].split(" ")[0] for line in out.stdout.splitlines() if line]


def megatron_reference(run, tmp_path):
    """The uninterrupted trainer=megatron tp=2 consolidation of `run`'s inputs: 2 gloo ranks under torchrun."""
    from omegaconf import OmegaConf

    from tests.test_distributed import finish
    from tests.test_megatron_trainer import as_megatron, shim_env

    ref = as_megatron(run, tmp_path / "mg-ref" / "tiny-frozenlake", tp=2)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "oel_hpc.worker", str(ref), "r1/consolidate"], cwd=ROOT, env=shim_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    codes, out = finish([proc], timeout=420)
    assert codes == [0], out[-4000:]
    assert OmegaConf.load(ref / "config.yaml").trainer.tp == 2
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["torch", "megatron"])
def test_usr2_at_a_random_step_requeues_and_resumes_to_the_same_weights(tmp_path, trainer):
    # the reference: the same config, uninterrupted, in one local process (megatron: 2 ranks under torchrun)
    import os

    local = subprocess.run([sys.executable, "-m", "oel_hpc", f"run.root={tmp_path / 'local'}", *COMMON],
                           cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert local.returncode == 0, local.stderr[-3000:]
    reference = tmp_path / "local" / "tiny-frozenlake"
    # the Slurm run starts from the same extraction and deployment: only consolidation and evaluation are submitted
    run = tmp_path / "slurm" / "tiny-frozenlake"
    shutil.copytree(reference, run)
    for p in ("round_1/consolidate", "round_1/eval"):
        shutil.rmtree(run / p)
    if trainer == "megatron":
        from tests.test_megatron_trainer import shim_env

        pytest.importorskip("megatron.core")
        reference = megatron_reference(reference, tmp_path)
        out = oel(tmp_path / "slurm", *COMMON, "trainer=megatron", "trainer.tp=2", "trainer.attention=sdpa",
                  env=shim_env(SLURM_CONF=os.environ["SLURM_CONF"]))
    else:
        out = oel(tmp_path / "slurm", *COMMON, "cluster.resources.consolidate.tasks_per_node=1",
                  env={**os.environ, "OMP_NUM_THREADS": "1"})  # the jobs inherit it (--export=ALL)
    assert out.returncode == 0, out.stdout + out.stderr
    stages = {s["id"]: s for s in json.loads((run / "manifest.json").read_text())["stages"]}
    job = stages["r1/consolidate"]["job_ids"][-1]
    jobs = [job, stages["r1/evaluate"]["job_ids"][-1]]
    try:
        metrics = run / "round_1" / "consolidate" / "metrics.jsonl"
        at_step = random.Random().randint(1, STEPS - 3)
        wait_until(lambda: metrics.is_file() and len(read_jsonl(metrics)) >= at_step, f"step {at_step}", 300)
        # what Slurm sends `signal_before_end_s` before the time limit (--signal=B:USR2@...): to the batch shell
        subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True, timeout=30)
        # it checkpoints at the next step boundary and requeues itself; Slurm starts it again once the old job
        # credential expired (cred_expire, 10 s on the test cluster, 120 s by default)
        wait_until(lambda: (run / "round_1/consolidate/DONE").is_file(), "the resumed consolidation", 300)
        wait_until(lambda: all((run / f"round_1/eval/DONE.step_{s}").is_file() for s in (0, STEPS)),
                   "the evaluation", 300)
    except BaseException:
        cancel(jobs)
        raise
    log = "\n".join(p.read_text() for p in sorted((run / "logs").glob("*consolidate*")))
    assert "stopped by SIGUSR2 after step" in log, log[-3000:]
    assert "resumed from checkpoint step" in log, log[-3000:]
    assert "not be bit-identical" not in log, log[-3000:]  # resumed at the thread count it was written with
    assert sacct_states(job)[0] == "REQUEUED", sacct_states(job)
    expected = load_file(reference / "round_1/consolidate/hf/model.safetensors")
    resumed = load_file(run / "round_1/consolidate/hf/model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), \
            f"{name}: max difference {(expected[name] - resumed[name]).abs().max().item():.4g}"
    assert [m["step"] for m in read_jsonl(run / "round_1/consolidate/metrics.jsonl")] == list(range(1, STEPS + 1))
