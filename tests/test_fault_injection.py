"""Fault injection, through the user's command: a tiny run killed (SIGKILL) at a random moment and run again, and a
finished run with one random file damaged (bytes flipped, cut short, cut at a line boundary, emptied, deleted) and
run again. Each rerun must either finish with results equal to an undisturbed run's, or stop with one line (no
traceback) naming the damaged file: never exit 0 with a different result. Secrets in the environment must not land
in any file of the run.

Trials are drawn from a seed printed on failure: OEL_FAULT_SEED=<seed> replays them, OEL_FAULT_TRIALS=<kills>,<damages>
sets how many (default 2,6: about 4 minutes on 2 cores)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SECRET = "sk-fault-injection-0123456789abcdef"
OVERRIDES = ["wandb.mode=offline"]
VOLATILE = {"seconds", "finished_at", "started_at"}  # wall-clock fields: not part of a result


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_API_KEY": SECRET,
            "HF_TOKEN": SECRET}


def start(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "oel_hpc", f"run.root={root}", *OVERRIDES], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(root: Path) -> subprocess.CompletedProcess:
    proc = start(root)
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def result_files(run_dir: Path) -> list[Path]:
    """What a run produced for its user: the stages' files, without checkpoints, logs, markers, progress records or
    wandb folders."""
    skip = {"ckpt", "wandb", "logs"}
    return sorted(p for p in (run_dir / "round_1").rglob("*")
                  if p.is_file() and not skip & set(p.relative_to(run_dir).parts)
                  and not p.name.startswith(("DONE", ".", "progress.")))


def content(path: Path):
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix == ".jsonl":
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
                for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        obj = json.loads(path.read_text())
        return {k: v for k, v in obj.items() if k not in VOLATILE} if isinstance(obj, dict) else obj
    return path.read_bytes()


def differences(reference: Path, other: Path) -> list[str]:
    ours = {p.relative_to(reference) for p in result_files(reference)}
    theirs = {p.relative_to(other) for p in result_files(other)}
    diff = [f"{rel}: {'missing' if rel in ours else 'extra'}" for rel in sorted(ours ^ theirs)]
    for rel in sorted(ours & theirs):
        a, b = content(reference / rel), content(other / rel)
        if isinstance(a, dict) and a and all(isinstance(v, torch.Tensor) for v in a.values()):
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            same = a == b
        if not same:
            diff.append(f"{rel}: differs")
    return diff


def leaked_secret(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def damage(path: Path, how: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if how == "flip" and data:
        data = bytearray(data)
        for _ in range(8):
            i = rng.randrange(len(data))
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "line" and data.count(b"\n") >= 2:
        lines = data.splitlines(keepends=True)
        path.write_bytes(b"".join(lines[: rng.randrange(1, len(lines))]))
    elif how == "empty":
        path.write_bytes(b"")
    else:  # "delete", or a damage the file's content cannot take
        path.unlink()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    t0 = time.monotonic()
    out = run(root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "tiny-frozenlake", time.monotonic() - t0


@pytest.fixture(scope="module")
def trials():
    seed = int(os.environ.get("OEL_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    kills, damages = (int(x) for x in os.environ.get("OEL_FAULT_TRIALS", "2,6").split(","))
    return seed, kills, damages


def check_outcome(out, reference: Path, run_dir: Path, what: str, damaged: str | None = None) -> None:
    root = run_dir.parent
    assert not leaked_secret(root), f"{what}: the secret landed in {leaked_secret(root)}"
    if out.returncode == 0:
        diff = differences(reference, run_dir)
        assert not diff, f"{what}: exit 0 with a different result: {diff[:10]}\n{out.stderr[-2000:]}"
        return
    # refused or stopped: one line naming the damaged file, no traceback
    assert damaged is not None, f"{what}: exit {out.returncode}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr, f"{what}: a traceback instead of one line\n{out.stderr[-3000:]}"
    last = [line for line in out.stderr.splitlines() if line.strip()][-1]
    assert Path(damaged).name in last, f"{what}: exit {out.returncode}, last line does not name {damaged}: {last}"


def test_killed_runs_finish_with_the_undisturbed_result(reference, trials, tmp_path):
    ref, seconds = reference
    seed, kills, _ = trials
    rng = random.Random(seed)
    for i in range(kills):
        root = tmp_path / f"kill_{i}"
        delay = rng.uniform(1.0, seconds * 0.95)
        what = f"trial kill {i} (OEL_FAULT_SEED={seed}): SIGKILL after {delay:.1f} s"
        proc = start(root)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out = run(root)
        check_outcome(out, ref, root / "tiny-frozenlake", what)


def test_damaged_files_are_redone_or_named(reference, trials, tmp_path):
    ref, _ = reference
    seed, _, damages = trials
    rng = random.Random(seed + 1)
    candidates = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file() and "wandb" not in p.parts
                        and not p.name.startswith("progress."))  # a task's progress record is no output
    for i in range(damages):
        root = tmp_path / f"damage_{i}"
        shutil.copytree(ref.parent, root, symlinks=True)
        rel = rng.choice(candidates)
        how = rng.choice(["flip", "half", "line", "empty", "delete"])
        damage(root / "tiny-frozenlake" / rel, how, rng)
        what = f"trial damage {i} (OEL_FAULT_SEED={seed}): {how} {rel}"
        out = run(root)
        check_outcome(out, ref, root / "tiny-frozenlake", what, damaged=str(rel))
