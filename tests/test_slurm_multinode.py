"""Multi-node on the local test cluster (tools/slurm/start.sh starts OEL_SLURM_NODES slurmd daemons, default 2, on
this one machine; skipped without SLURM_CONF or with a one-node cluster).

- An extraction array's tasks run on different nodes (sacct NodeList).
- The consolidation job of 2 nodes x 1 task (`cluster.resources.consolidate.nodes=2 tasks_per_node=1`), submitted
  by the Slurm launcher, trains with torch DDP, torch FSDP2 and megatron (tp=1: data parallel 2) and exports the
  same weights, bit for bit, as the same config's 2 ranks on one node (torchrun, gloo). The DDP job is also sent
  the time-limit warning (USR2) at a random step: it checkpoints, requeues itself, starts again on 2 nodes and
  resumes from its checkpoint -- still bit-identical.
All runs start from one finished local tiny run (module fixture); the three 2-node runs are submitted together.
The references run with OMP_NUM_THREADS=1, the jobs' thread count (see tests/test_slurm_requeue.py).
"""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from oel_hpc.rundir import read_jsonl
from tests.conftest import ROOT
from tests.test_slurm_launch import _cluster_problem, all_job_ids, cancel, hydra_quoted, manifest, oel, sacct, \
    wait_for_run, wait_until
from tests.test_slurm_requeue import sacct_states

STEPS = 8
COMMON = ["wandb.mode=disabled", f"consolidate.steps={STEPS}", "consolidate.save_freq=1", "evaluate.steps=first_last",
          "evaluate.games=2"]  # evaluation is not what these tests check: keep it short
TWO_NODES = ["cluster.resources.consolidate.nodes=2", "cluster.resources.consolidate.tasks_per_node=1"]
TRAINERS = {  # submitted in this order; the requeued one last, so that it is still early in its steps when the
    # signal is sent (each submission takes seconds)
    "fsdp2": ["trainer.parallel=fsdp"],
    "megatron": ["trainer=megatron", "trainer.tp=1", "trainer.attention=sdpa"],  # 2 ranks: data parallel 2
    "ddp": ["trainer.parallel=ddp"],
}
REQUEUED = "ddp"  # the run that is sent USR2 midway
CONSOLIDATE = "round_1/consolidate"


def debug_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N"], capture_output=True, text=True,
                         timeout=15)
    return sorted(set(out.stdout.split()))


@pytest.fixture(scope="module", autouse=True)
def _multinode_cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"no Slurm test cluster: {problem}")
    nodes = debug_nodes()
    if len(nodes) < 2:
        pytest.skip(f"the Slurm test cluster has one node ({nodes}): start it with OEL_SLURM_NODES=2")


def job_env(trainer: str) -> dict:
    """What the submitting process (and through --export=ALL every job) gets: one thread; megatron's CPU shims."""
    if trainer == "megatron":
        from tests.test_megatron_trainer import shim_env

        pytest.importorskip("megatron.core")
        return shim_env(SLURM_CONF=os.environ["SLURM_CONF"], OMP_NUM_THREADS="1")
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def node_list(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "--format=NodeList"], capture_output=True,
                         text=True, timeout=30)
    hosts = subprocess.run(["scontrol", "show", "hostnames", out.stdout.split()[-1]], capture_output=True,
                           text=True, timeout=30)
    return hosts.stdout.split()


def one_node_reference(run, dst):
    """The same config's consolidation as 2 ranks on one node: torchrun, gloo, in a copy of `run`'s inputs."""
    from tests.test_distributed import finish
    from tests.test_megatron_trainer import shim_env

    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("logs", "slurm", "manifest.json", "consolidate", "eval"))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "oel_hpc.worker", str(dst), "r1/consolidate"], cwd=ROOT,
                            env=shim_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    codes, out = finish([proc], timeout=420)
    assert codes == [0], out[-4000:]
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{trainer: {"run": 2-node Slurm run, "ref": one-node reference, "job": consolidation job id, "at_step"}}."""
    base = tmp_path_factory.mktemp("multinode")
    local = subprocess.run([sys.executable, "-m", "oel_hpc", f"run.root={base / 'local'}", *COMMON], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert local.returncode == 0, local.stderr[-3000:]
    finished = base / "local" / "tiny-frozenlake"
    out: dict = {}
    try:
        for trainer, overrides in TRAINERS.items():
            # the Slurm run starts from the local run's extraction and deployment: consolidation and evaluation
            # are what the launcher submits
            run = base / trainer / "slurm" / "tiny-frozenlake"
            shutil.copytree(finished, run)
            for p in (CONSOLIDATE, "round_1/eval"):
                shutil.rmtree(run / p)
            sub = oel(base / trainer / "slurm", *COMMON, *TWO_NODES, *overrides, env=job_env(trainer))
            assert sub.returncode == 0, sub.stdout + sub.stderr
            stages = {s["id"]: s for s in manifest(run)["stages"]}
            slurm_jobs = {k for k, s in stages.items() if any(j.isdigit() for j in s["job_ids"])}
            assert slurm_jobs == {"r1/consolidate", "r1/evaluate"}, stages
            out[trainer] = {"run": run, "job": stages["r1/consolidate"]["job_ids"][-1]}
        # the time-limit warning (what --signal=B:USR2@... sends to the batch shell) at a random step
        requeued = out[REQUEUED]
        metrics = requeued["run"] / CONSOLIDATE / "metrics.jsonl"
        requeued["at_step"] = random.Random().randint(1, STEPS - 4)
        wait_until(lambda: metrics.is_file() and len(read_jsonl(metrics)) >= requeued["at_step"],
                   f"step {requeued['at_step']} of the 2-node {REQUEUED} consolidation", 300)
        subprocess.run(["scancel", "--batch", "--signal=USR2", requeued["job"]], check=True, timeout=30)
        for trainer, r in out.items():  # meanwhile, the one-node references (their config: the Slurm run's)
            r["ref"] = one_node_reference(r["run"], base / trainer / "one-node" / "tiny-frozenlake")
        for r in out.values():
            wait_for_run(r["run"], timeout=600)
    except BaseException:
        for r in out.values():
            cancel(all_job_ids(r["run"]))
        raise
    return out


def test_every_node_name_resolves_to_this_machine():
    """A multi-node job's MASTER_ADDR is its first node's name (oel_hpc/launch/render.py): start.sh's /etc/hosts
    line makes each resolve."""
    import socket

    for node in debug_nodes():
        assert socket.gethostbyname(node) == "127.0.0.1", node


def test_extraction_array_tasks_spread_over_the_nodes(tmp_path):
    from tests.test_slurm_launch import STUB

    stub = tmp_path / "stub python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    (tmp_path / "calls").mkdir()
    env = {**os.environ, "OEL_STUB_DIR": str(tmp_path / "calls"), "OEL_STUB_SLEEP": "3"}
    # placement is only predictable on idle nodes: other jobs (another test's) leave the least loaded node elsewhere
    wait_until(lambda: not subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True,
                                          timeout=30).stdout.strip(), "an idle cluster", 300)
    root = tmp_path / "runs"
    run = root / "stubbed"
    out = oel(root, "wandb.mode=disabled", "run.name=stubbed", "extract.seeds=4", f"cluster.python={hydra_quoted(stub)}",
              "launch.check_python=false", env=env)
    assert out.returncode == 0, out.stderr
    try:
        ext = next(s for s in manifest(run)["stages"] if s["id"] == "r1/extract")["job_ids"][-1]
        tasks = [f"{ext}_{i}" for i in range(4)]
        wait_until(lambda: all(sacct([ext], "JobID,State,NodeList").get(t, {}).get("State") == "COMPLETED"
                               for t in tasks), "the 4 extraction tasks", 120)
        rows = sacct([ext], "JobID,State,NodeList")
        used = {rows[t]["NodeList"] for t in tasks}
    finally:
        cancel(all_job_ids(run))
    assert len(used) >= 2, rows  # 4 tasks at once: CR_LLN puts each on the least loaded node


@pytest.mark.slow
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_two_nodes_one_rank_each_match_one_node(runs, trainer):
    r = runs[trainer]
    assert len(node_list(r["job"])) == 2, node_list(r["job"])  # the consolidation job spanned two nodes
    expected = load_file(r["ref"] / CONSOLIDATE / "hf/model.safetensors")
    got = load_file(r["run"] / CONSOLIDATE / "hf/model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), \
            f"{trainer} {name}: max difference {(expected[name] - got[name]).abs().max().item():.4g}"
    want = [{k: v for k, v in m.items() if k != "seconds"} for m in read_jsonl(r["ref"] / CONSOLIDATE / "metrics.jsonl")]
    have = [{k: v for k, v in m.items() if k != "seconds"} for m in read_jsonl(r["run"] / CONSOLIDATE / "metrics.jsonl")]
    assert have == want
    assert [m["step"] for m in have] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_a_requeued_two_node_consolidation_resumes_exactly(runs):
    r = runs[REQUEUED]
    log = "\n".join(p.read_text() for p in sorted((r["run"] / "logs").glob("*consolidate*")))
    assert "stopped by SIGUSR2 after step" in log, log[-3000:]
    assert "resumed from checkpoint step" in log, log[-3000:]
    assert "not be bit-identical" not in log, log[-3000:]
    assert sacct_states(r["job"])[0] == "REQUEUED", sacct_states(r["job"])
    # the bit-exact weights are checked by test_two_nodes_one_rank_each_match_one_node[ddp]
