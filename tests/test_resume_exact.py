"""Resume is exact (issue 12, item 8): a consolidation killed at a random point (SIGKILL: no signal handler, no last
checkpoint; during sampling, a backward, a save or the export) and run again ends with weights bit-identical
(torch.equal, no tolerance) to an uninterrupted run at the same number of ranks, on CPU at one compute thread per
rank. A damaged newest checkpoint is skipped for the previous one and the result is still identical.

Two things are exact only to rounding, and are checked as such: a checkpoint resumed at another number of ranks
(each rank sums its own rows' gradients before the ranks average them: another grouping of the same sums), and
another thread count (the checkpoint resume warns about both; docs/run-directory.md).

The kill point is random: OEL_TEST_SEED=<n> replays one (every failure message names its seed). The run directory
comes from the real pipeline on the committed tiny model; tests/test_checkpoint.py holds the quick in-process
checks of the same code."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oel_hpc.rundir import read_jsonl
from tests.conftest import ROOT
from tests import test_distributed as distributed
from tests.test_distributed import CONSOLIDATE, clean_env, cut, fresh

pytestmark = pytest.mark.slow

STEPS = 3
RANKS = 3  # 2 ranks add two gradients, and a + b == b + a: exact by luck. 3 ranks show a summation order that moves
SEED = int(os.environ.get("OEL_TEST_SEED", time.time_ns() % 2**32))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished tiny run; its consolidation (one process) is the 1-rank reference."""
    root = tmp_path_factory.mktemp("exact")
    out = subprocess.run([sys.executable, "-m", "oel_hpc", f"run.root={root}", f"consolidate.steps={STEPS}",
                          "consolidate.save_freq=1", "deploy.games_per_step=4", "evaluate.games=4",
                          "wandb.mode=disabled"],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "tiny-frozenlake"


@pytest.fixture(scope="module")
def many_ranks(base_run, tmp_path_factory):
    """The same consolidation, uninterrupted, on RANKS DDP ranks: the reference at that rank count."""
    run = fresh(base_run, tmp_path_factory.mktemp("ranks") / "run", "ddp")
    consolidate(run, RANKS)
    return run


def consolidate(run: Path, ranks: int) -> str:
    """The consolidation task of `run` as a job runs it: one process per rank (as srun starts them)."""
    return distributed.consolidate(run, ranks, "env")


def kill_at_random_point(run: Path, ranks: int, rng: random.Random) -> str:
    """Start the consolidation of `run` and SIGKILL all its processes at a random point: once a random number of
    steps (0 to all but the last) is logged, after a further random delay of up to about a step, or at once when
    the last step is logged (then it dies saving or exporting). Returns where it died."""
    metrics, done = run / CONSOLIDATE / "metrics.jsonl", run / CONSOLIDATE / "DONE"
    after, fraction = rng.randrange(STEPS), rng.random()

    def logged() -> int:  # metrics.jsonl appears once the models are loaded, and gets a row at each step's end
        return len(read_jsonl(metrics)) if metrics.is_file() else -1

    procs = distributed.start(run, ranks, "env")
    deadline, kill_at = time.monotonic() + 300, None
    while True:
        n = logged()
        if kill_at is None and n >= after:
            kill_at = time.monotonic() + fraction * (read_jsonl(metrics)[-1]["seconds"] if n > 0 else 1.0)
        if n == STEPS or (kill_at is not None and time.monotonic() >= kill_at):
            break
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
            f"OEL_TEST_SEED={SEED}: " + distributed.finish(procs, 5)[1][-3000:]
        time.sleep(0.01)
    for p in procs:  # every rank at once, as when a node dies (killing a launcher such as torchrun alone would
        p.kill()     # leave its workers running)
    codes, out = distributed.finish(procs)
    where = f"killed after {n} logged steps (aimed at {after} + {fraction:.2f} step; OEL_TEST_SEED={SEED})"
    assert codes == [-signal.SIGKILL] * ranks and not done.exists(), f"{where}: it finished first\n{out[-3000:]}"
    return where


def weights(run: Path) -> dict:
    return load_file(run / CONSOLIDATE / "hf/model.safetensors")


def assert_identical(expected: Path, run: Path, what: str) -> None:
    a, b = weights(expected), weights(run)
    assert a.keys() == b.keys()
    differ = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ, by up to {max(differ.values()):.3g}"
    assert [m["step"] for m in read_jsonl(run / CONSOLIDATE / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert not [p.name for p in (run / CONSOLIDATE / "ckpt").iterdir() if p.name.startswith(".")], \
        "a dead save's temporary folder was left behind"


@pytest.mark.parametrize("ranks", [1, RANKS])
def test_a_killed_consolidation_resumes_bit_identically(base_run, many_ranks, ranks, tmp_path):
    rng = random.Random(SEED + ranks)
    run = fresh(base_run, tmp_path / "run", "ddp")
    where = kill_at_random_point(run, ranks, rng)
    consolidate(run, ranks)  # the same command again, as a requeued job runs it
    assert_identical(base_run if ranks == 1 else many_ranks, run, where)


def test_a_damaged_newest_checkpoint_falls_back_and_the_result_is_identical(base_run, tmp_path):
    """Flipped bytes in the newest checkpoint's weights, the one before cut short: the one before that is resumed."""
    run = cut(base_run, tmp_path / "run", keep=STEPS)
    ckpt = run / CONSOLIDATE / "ckpt"
    shard = ckpt / f"step_{STEPS}/__0_0.distcp"
    data = bytearray(shard.read_bytes())
    at = random.Random(SEED).randrange(len(data) - 8)
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    shard.write_bytes(bytes(data))
    metadata = ckpt / f"step_{STEPS - 1}/.metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    out = consolidate(run, 1)
    assert f"step_{STEPS} is damaged: __0_0.distcp does not match its sha256" in out
    assert f"step_{STEPS - 1} is damaged: .metadata has 100 bytes" in out
    assert f"resumed from checkpoint step {STEPS - 2}" in out
    assert_identical(base_run, run, f"flipped bytes at {at} (OEL_TEST_SEED={SEED})")
    assert sorted(p.name.split(".")[0] for p in ckpt.glob("damaged_*")) == [f"damaged_step_{STEPS - 1}",
                                                                           f"damaged_step_{STEPS}"]


def test_another_rank_count_resumes_to_rounding_and_says_so(base_run, many_ranks, tmp_path):
    """A RANKS-rank checkpoint resumed in one process: the steps after it sum each step's gradients in another
    grouping, so the weights match neither uninterrupted run bit for bit, only to rounding; the resume says so."""
    run = cut(many_ranks, tmp_path / "run", keep=1)
    out = consolidate(run, 1)
    assert "resumed from checkpoint step 1" in out
    assert f"was written by {RANKS} ranks and this run has 1: the result will equal an uninterrupted run only to " \
           "rounding" in out
    for reference in (base_run, many_ranks):
        a, b = weights(reference), weights(run)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 5e-5  # as tests/test_distributed.py's ATOL
