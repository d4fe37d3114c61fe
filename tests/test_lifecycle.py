"""One task lifecycle (oel_hpc/lifecycle.py) and one exit-code rule, through both callers: the local command
(`python -m oel_hpc`) and the command every Slurm job runs (`python -m oel_hpc.worker`). Bad input ends both with
exit 2 and one line; a `.started` marker is written while a task runs and removed when it is DONE; a marker left
under another config clears the task's outputs; DONE is written from what the stage returns, in the format old run
directories have; a preempted consolidation ends both with 75. Real processes, the committed tiny model, real files.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from oel_hpc import errors
from oel_hpc.lifecycle import execute, started_marker
from oel_hpc.pipeline import build_dag
from oel_hpc.rundir import RunPaths, mark_done
from oel_hpc.stages.common import StageContext
from tests.conftest import ROOT, compose, wait_until

RUN = "tiny-frozenlake"


def env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop},
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def oel(root, *overrides, wait=True):
    cmd = [sys.executable, "-m", "oel_hpc", f"run.root={root}", "wandb.mode=disabled", *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def worker(run, stage_id, *args, wait=True):
    cmd = [sys.executable, "-m", "oel_hpc.worker", str(run), stage_id, *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def error_line(out, prog) -> str:
    """The command's verdict: its last stderr line, the only one that says `error`, and no traceback."""
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert [ln for ln in lines if "error" in ln] == lines[-1:], out.stderr[-3000:]
    assert lines[-1].startswith(f"{prog}: error: "), out.stderr[-3000:]
    return lines[-1].removeprefix(f"{prog}: error: ")


def fabricate(root, *overrides, pending=("r1/gather",)):
    """A run directory as the local launcher leaves it, without running a model: config.yaml, both extraction
    seeds' experience files, and a DONE marker (this config's hash, no outputs) for every task not in `pending`."""
    cfg = compose([f"run.root={root}", "wandb.mode=disabled", *overrides])
    paths = RunPaths(root / RUN)
    paths.root.mkdir(parents=True)
    paths.config.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    nodes = {n.id: n for n in build_dag(cfg)}
    for seed in range(cfg.extract.seeds):
        paths.experience(1, seed, cfg.extract.use_step).parent.mkdir(parents=True, exist_ok=True)
        paths.experience(1, seed, cfg.extract.use_step).write_text(f"- lesson {seed}\n")
    for node in nodes.values():
        if node.id not in pending:
            for task in node.task_ids():
                mark_done(paths, paths.done(1, node.stage, task), node.hash, [])
    return cfg, paths, nodes


# ---------------------------------------------------------------------------------------------------------------
# The exit-code rule

@pytest.mark.parametrize("error, code", [
    (errors.ConfigError("gather.source", "x does not exist"), 2),
    (errors.MissingInput("/x", "x does not exist"), 2),
    (errors.StageConflict("r1/gather finished under another config"), 2),
    (errors.SlurmError("sbatch: invalid partition"), 2),
    (errors.Preempted(3, "SIGUSR2", "ckpt/step_3", requeued=False), 75),
    (errors.AllStepsSkipped("all 2 steps skipped"), 1),
])
def test_every_oel_error_is_one_line_and_its_exit_status(error, code, capsys):
    with pytest.raises(SystemExit) as stopped:
        with errors.exit_on_error("prog"):
            raise error
    assert stopped.value.code == code
    verdict = "" if code == 75 else "error: "
    assert capsys.readouterr().err == f"prog: {verdict}{error}\n"


def test_a_crash_keeps_its_traceback():
    with pytest.raises(KeyError):
        with errors.exit_on_error("prog"):
            raise KeyError("a bug")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: exit 2 and one line, the same through both callers

def test_missing_configured_file(tmp_path):
    missing = tmp_path / "no-such-list.txt"
    local = oel(tmp_path, f"gather.source={missing}")
    assert local.returncode == 2 and local.stdout == ""
    message = error_line(local, "oel_hpc")
    assert message == f"gather.source: experience list {missing} does not exist"

    (tmp_path / "list.txt").write_text("a.txt\n")
    (tmp_path / "a.txt").write_text("- lesson\n")
    fabricate(tmp_path, f"gather.source={tmp_path / 'list.txt'}", pending=())
    # the job's config.yaml names a list that is gone (moved, or a typo made by hand)
    cfg = OmegaConf.load(tmp_path / RUN / "config.yaml")
    cfg.gather.source = str(missing)
    OmegaConf.save(cfg, tmp_path / RUN / "config.yaml")
    job = worker(tmp_path / RUN, "r1/gather")
    assert job.returncode == 2 and job.stdout == ""
    assert error_line(job, "oel_hpc.worker") == message


def test_missing_upstream_file_fails_the_task_without_done(tmp_path):
    """An extraction's experience file deleted after its DONE: gather stops with MissingInput, names the file,
    leaves no DONE and its `.started` (this config's hash) behind, under both callers."""
    local_root, job_root = tmp_path / "local", tmp_path / "job"
    for root in (local_root, job_root):
        cfg, paths, nodes = fabricate(root)
        paths.experience(1, 1, cfg.extract.use_step).unlink()
    gather = nodes["r1/gather"]
    local, job = oel(local_root), worker(job_root / RUN, "r1/gather")
    for out, prog, root in ((local, "oel_hpc", local_root), (job, "oel_hpc.worker", job_root)):
        paths = RunPaths(root / RUN)
        assert out.returncode == 2, out.stderr[-3000:]
        assert error_line(out, prog) == (f"gather: {paths.experience(1, 1, 3)} does not exist (did extraction seed "
                                         "1 reach step 3?)")
        assert not paths.done(1, "gather").exists() and not paths.experience_list(1).exists()
        assert json.loads(started_marker(paths, gather, None).read_text())["config_hash"] == gather.hash
    manifest = json.loads((local_root / RUN / "manifest.json").read_text())
    assert next(s for s in manifest["stages"] if s["id"] == "r1/gather")["state"] == "failed"


def test_the_worker_refuses_a_task_done_under_another_config(tmp_path):
    cfg, paths, nodes = fabricate(tmp_path)
    mark_done(paths, paths.done(1, "gather"), "another-config", [])
    job = worker(paths.root, "r1/gather")
    assert job.returncode == 2
    assert error_line(job, "oel_hpc.worker").startswith("r1/gather already finished with a different config")
    assert json.loads(paths.done(1, "gather").read_text())["config_hash"] == "another-config"  # left alone


def test_the_worker_refuses_an_unknown_stage_or_task(tmp_path):
    _, paths, _ = fabricate(tmp_path)
    job = worker(paths.root, "r1/deploi")
    assert job.returncode == 2 and error_line(job, "oel_hpc.worker").startswith("r1/deploi: no such stage in")
    job = worker(paths.root, "r1/extract", "--task", 7)
    assert job.returncode == 2 and error_line(job, "oel_hpc.worker") == "--task: r1/extract has tasks [0, 1], not 7"
    job = worker(tmp_path / "nowhere", "r1/gather")
    assert job.returncode == 2 and error_line(job, "oel_hpc.worker").endswith("config.yaml does not exist")


# ---------------------------------------------------------------------------------------------------------------
# .started and stale outputs

def test_the_worker_marks_a_task_started_while_it_runs(tmp_path):
    _, paths, nodes = fabricate(tmp_path)
    gather = nodes["r1/gather"]
    marker = started_marker(paths, gather, None)
    job = worker(paths.root, "r1/gather", wait=False)
    try:
        seen = wait_until(lambda: marker.is_file() and marker.read_text() or job.poll() is not None,
                          "the .started marker", timeout=120, poll=0.01)
        assert seen is not True, "the worker ended before its .started marker was seen"
        assert json.loads(seen)["config_hash"] == gather.hash
        _, err = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, err[-3000:]
    assert not marker.exists()
    assert json.loads(paths.done(1, "gather").read_text())["config_hash"] == gather.hash
    # a second job finds it done: exit 0, nothing written
    before = paths.done(1, "gather").stat().st_mtime_ns
    again = worker(paths.root, "r1/gather")
    assert again.returncode == 0 and "r1/gather is already done" in again.stderr
    assert paths.done(1, "gather").stat().st_mtime_ns == before and not marker.exists()


@pytest.mark.parametrize("caller", ["local", "worker"])
def test_outputs_begun_under_another_config_are_cleared(tmp_path, caller):
    _, paths, nodes = fabricate(tmp_path)
    gather = nodes["r1/gather"]
    leftover = paths.round(1) / "gather" / "experience_7.txt"  # as gather.source copies leave them
    leftover.parent.mkdir(parents=True)
    leftover.write_text("- from another config\n")
    marker = started_marker(paths, gather, None)
    marker.write_text(json.dumps({"config_hash": "another-config", "started_at": "2026-01-01T00:00:00+0000"}))
    out = oel(tmp_path) if caller == "local" else worker(paths.root, "r1/gather")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "starting r1/gather afresh: its earlier outputs were made under another config" in out.stderr
    assert not leftover.exists() and not marker.exists()
    assert json.loads(paths.done(1, "gather").read_text())["config_hash"] == gather.hash


def test_outputs_begun_under_this_config_are_kept(tmp_path):
    """The same config's attempt left them: they are what a stage resumes from."""
    _, paths, nodes = fabricate(tmp_path)
    gather = nodes["r1/gather"]
    leftover = paths.round(1) / "gather" / "experience_7.txt"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("- an earlier attempt\n")
    started_marker(paths, gather, None).write_text(json.dumps({"config_hash": gather.hash, "started_at": "x"}))
    out = worker(paths.root, "r1/gather")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "afresh" not in out.stderr and leftover.read_text() == "- an earlier attempt\n"


# ---------------------------------------------------------------------------------------------------------------
# DONE: written by the lifecycle from what the stage returns, in the format of existing run directories

def test_done_records_the_stages_outputs(tmp_path):
    cfg, paths, nodes = fabricate(tmp_path)
    gather = nodes["r1/gather"]
    ctx = StageContext(cfg, paths, {n.id: n.hash for n in nodes.values()})
    assert execute(ctx, gather, None) is True
    done = json.loads(paths.done(1, "gather").read_text())
    assert list(done) == ["config_hash", "hash_scheme", "finished_at", "outputs_scheme", "outputs"]
    files = ["round_1/experience_list.json", "round_1/extract/seed_0/experience_3.txt",
             "round_1/extract/seed_1/experience_3.txt"]
    assert done["config_hash"] == gather.hash and done["outputs_scheme"] == 2
    assert done["outputs"] == {f: {"size": (paths.root / f).stat().st_size,
                                   "mtime_ns": (paths.root / f).stat().st_mtime_ns,
                                   "sha256": hashlib.sha256((paths.root / f).read_bytes()).hexdigest()}
                               for f in files}
    assert not started_marker(paths, gather, None).exists()
    assert execute(ctx, gather, None) is False  # done: skipped


def test_a_done_marker_from_before_the_lifecycle_still_counts(tmp_path):
    """A marker of the first format (a sha256 per file, no sizes) counts while its files hash as recorded."""
    cfg, paths, nodes = fabricate(tmp_path)
    gather = nodes["r1/gather"]
    paths.done(1, "gather").parent.mkdir(parents=True)
    paths.experience_list(1).write_text("[]\n")  # small: its hash is checked
    paths.done(1, "gather").write_text(
        '{\n  "config_hash": "%s",\n  "finished_at": "2026-11-30T10:00:00+0000",\n  "outputs": {\n'
        '    "round_1/experience_list.json": "%s"\n  }\n}\n' % (gather.hash, hashlib.sha256(b"[]\n").hexdigest()))
    before = paths.done(1, "gather").read_bytes()
    ctx = StageContext(cfg, paths, {n.id: n.hash for n in nodes.values()})
    assert execute(ctx, gather, None) is False
    assert paths.done(1, "gather").read_bytes() == before and paths.experience_list(1).read_text() == "[]\n"
    out = oel(tmp_path)
    assert out.returncode == 0 and "Nothing to do" in out.stdout, out.stderr[-3000:]


def test_a_stage_that_raises_leaves_no_done(tmp_path):
    cfg, paths, nodes = fabricate(tmp_path)
    paths.experience(1, 0, 3).unlink()
    ctx = StageContext(cfg, paths, {n.id: n.hash for n in nodes.values()})
    with pytest.raises(errors.MissingInput):
        execute(ctx, nodes["r1/gather"], None)
    assert not paths.done(1, "gather").exists()
    assert started_marker(paths, nodes["r1/gather"], None).is_file()


def test_a_task_done_under_another_config_is_redone_only_when_asked(tmp_path):
    cfg, paths, nodes = fabricate(tmp_path)
    gather = nodes["r1/gather"]
    mark_done(paths, paths.done(1, "gather"), "another-config", [])
    ctx = StageContext(cfg, paths, {n.id: n.hash for n in nodes.values()})
    with pytest.raises(errors.StageConflict):
        execute(ctx, gather, None)
    assert json.loads(paths.done(1, "gather").read_text())["config_hash"] == "another-config"
    assert execute(ctx, gather, None, redo_changed=True) is True
    assert json.loads(paths.done(1, "gather").read_text())["config_hash"] == gather.hash


# ---------------------------------------------------------------------------------------------------------------
# Preemption: 75 through both callers

PREEMPT = ("extract.seeds=1", "extract.steps=1", "extract.use_step=1", "extract.eval_games=0", "deploy.steps=5",
           "deploy.games_per_step=2", "consolidate.steps=5", "consolidate.allow_empty_experience=true",
           "evaluate.steps=first_last", "evaluate.games=2")


@pytest.fixture(scope="module")
def before_consolidation(tmp_path_factory):
    """A real run of the tiny model up to consolidation (consolidation and evaluation marked done beforehand, so
    the local launcher skips them)."""
    root = tmp_path_factory.mktemp("preempt")
    _, paths, _ = fabricate(root, *PREEMPT, pending=("r1/extract", "r1/gather", "r1/deploy"))
    shutil.rmtree(paths.round(1) / "extract")
    out = oel(root, *PREEMPT)
    assert out.returncode == 0, out.stderr[-3000:]
    return paths.root


@pytest.mark.parametrize("caller", ["local", "worker"])
def test_a_preempted_consolidation_exits_75(before_consolidation, tmp_path, caller):
    run = tmp_path / RUN
    shutil.copytree(before_consolidation, run)
    paths = RunPaths(run)
    paths.done(1, "consolidate").unlink()
    consolidate = next(n for n in build_dag(OmegaConf.load(paths.config)) if n.id == "r1/consolidate")
    proc = oel(tmp_path, *PREEMPT, wait=False) if caller == "local" else worker(run, "r1/consolidate", wait=False)
    try:
        wait_until(lambda: (paths.ckpt(1, 1) / "meta.json").is_file() or proc.poll() is not None,
                   "the first checkpoint", timeout=300, poll=0.01)
        proc.send_signal(signal.SIGUSR2)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == errors.EXIT_PREEMPTED, err[-3000:]
    prog = "oel_hpc" if caller == "local" else "oel_hpc.worker"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: stopped by SIGUSR2 after step ") and last.endswith("run it again to resume "
                                                                                         "there"), err[-3000:]
    assert "Traceback" not in err
    assert not paths.done(1, "consolidate").exists()
    assert json.loads(started_marker(paths, consolidate, None).read_text())["config_hash"] == consolidate.hash
