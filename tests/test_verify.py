"""Outputs are verified, not trusted (oel_hpc/verify.py): a DONE marker records each file's size, mtime, sha256 and
JSONL rows, and a finished task counts as done only while its files match. Damaged files are found by the launchers'
plan (the task and what depends on it are redone), by `python -m oel_hpc.status`, and by a task about to read them
(it stops with one line naming the file); a touched file (same bytes) still counts.

Files are checked by hand first; then one real tiny run (the committed tiny model) is made once and copies of it
are damaged. Copies keep mtimes (shutil.copytree copies them), as `cp -a` does.
"""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from oel_hpc import errors, status, verify
from oel_hpc.experience import load_experience_list
from oel_hpc.launch.slurm import submit
from oel_hpc.pipeline import build_dag, survey
from oel_hpc.rundir import RunPaths, read_done, read_jsonl, read_started
from oel_hpc.slurm import Slurm
from tests.conftest import ROOT, compose
from tests.test_slurm_module import bin_dir, fake, quick  # noqa: F401 (bin_dir: a fixture)

RUN = "tiny-frozenlake"
MODEL = "round_1/consolidate/hf/model.safetensors"


def env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop},
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=900)


def oel(root, *overrides):
    return run_module("oel_hpc", f"run.root={root}", "wandb.mode=disabled", *overrides)


def error_line(out, prog) -> str:
    """The command's verdict: one line on stderr, no traceback."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"{prog}: error: "), out.stderr[-3000:]
    assert [ln for ln in lines if "error" in ln] == lines[-1:], out.stderr[-3000:]
    return lines[-1].removeprefix(f"{prog}: error: ")


def flip(path, keep_mtime: bool) -> None:
    """8 bytes in the middle of the file inverted (in a safetensors file: weights): the same size; its mtime put
    back when `keep_mtime`."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(x ^ 0xFF for x in data[mid:mid + 8])
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---------------------------------------------------------------------------------------------------------------
# The check itself, on files made here

def test_a_record_and_what_the_cheap_and_full_checks_find(tmp_path):
    small, large = tmp_path / "rows.jsonl", tmp_path / "weights.bin"
    small.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')
    large.write_bytes(os.urandom(verify.SMALL + 10))
    entry = verify.record(small)
    assert entry == {"size": small.stat().st_size, "mtime_ns": small.stat().st_mtime_ns,
                     "sha256": hashlib.sha256(small.read_bytes()).hexdigest(), "rows": 3}
    assert len(read_jsonl(small)) == entry["rows"]
    assert "rows" not in verify.record(large)
    done = {"outputs": {"rows.jsonl": entry, "weights.bin": verify.record(large)}}

    def bad(full=False):
        return [str(d) for d in verify.check_outputs(tmp_path, done, full)]

    assert bad() == [] and bad(full=True) == []
    os.utime(small, ns=(1, 1))  # touched: another mtime, the same bytes
    os.utime(large, ns=(1, 1))
    assert bad() == []

    flip(large, keep_mtime=False)  # the same size, and the recorded mtime put back
    os.utime(large, ns=(done["outputs"]["weights.bin"]["mtime_ns"],) * 2)
    assert bad() == [], "a large file with its size and mtime as recorded is not hashed by the cheap check"
    assert bad(full=True) == ["weights.bin differs from the sha256 its DONE marker records"]
    os.utime(large, ns=(2, 2))  # its mtime moved: now hashed
    assert bad() == ["weights.bin differs from the sha256 its DONE marker records"]

    original = small.read_bytes()
    flip(small, keep_mtime=True)  # a small file is always hashed
    assert bad()[0] == "rows.jsonl differs from the sha256 its DONE marker records"
    small.write_bytes(original[:original.rindex(b'{"a": 3}')])  # cut at a line boundary
    assert bad()[0] == (f"rows.jsonl has 2 rows ({small.stat().st_size} bytes) where its DONE marker records 3 "
                        f"rows ({len(original)} bytes)")
    small.unlink()
    assert bad()[0] == "rows.jsonl is missing"


def test_a_marker_from_before_sizes_were_recorded(tmp_path):
    """{path: sha256}: a missing file is damage; a small file's hash is checked, a large one's only when full."""
    small, large = tmp_path / "a.txt", tmp_path / "b.bin"
    small.write_text("- lesson\n")
    large.write_bytes(os.urandom(verify.SMALL + 10))
    done = {"outputs": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (small, large)}}
    assert verify.check_outputs(tmp_path, done) == []
    small.write_text("- lessoN\n")
    flip(large, keep_mtime=False)
    assert [d.path for d in verify.check_outputs(tmp_path, done)] == ["a.txt"]
    assert [d.path for d in verify.check_outputs(tmp_path, done, full=True)] == ["a.txt", "b.bin"]
    large.unlink()
    assert [str(d) for d in verify.check_outputs(tmp_path, done)][1] == "b.bin is missing"


def test_unreadable_files_are_named_in_one_line(tmp_path):
    rows = tmp_path / "step_1.jsonl"
    rows.write_text('{"a": 1}\n{"a": 2, "b"')  # cut in the middle of a row
    with pytest.raises(errors.DamagedInput, match=f"^{rows} line 2 is not JSON .*damaged or cut short$") as e:
        read_jsonl(rows)
    assert e.value.exit_code == 2 and e.value.key == str(rows)
    done = tmp_path / "DONE"
    done.write_text('{"config_hash": "abc", "outp')
    with pytest.raises(errors.DamagedInput, match=f"^{done} is not JSON"):
        read_done(done)
    assert read_started(done) == {"config_hash": None}  # an attempt under no known config: not resumed from
    listing = tmp_path / "experience_list.json"
    listing.write_text('[{"seed": 0, "step": 3, "path": "a.t')
    with pytest.raises(errors.DamagedInput, match=f"^experience list {listing} is not JSON"):
        load_experience_list(listing, tmp_path)
    listing.write_text('[{"seed": 0}]')
    with pytest.raises(errors.DamagedInput, match="holds an entry that is not"):
        load_experience_list(listing, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# A real finished run, damaged in copies

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = oel(root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return root / RUN


@pytest.fixture
def copy(finished, tmp_path):
    run = tmp_path / RUN
    shutil.copytree(finished, run)
    return RunPaths(run)


def plan_of(paths: RunPaths, full=False):
    found = survey(paths, build_dag(OmegaConf.load(paths.config)), overwrite=False, full=full)
    return {n.id: t for n, t in found.todo}, found.redo


def state(report, stage_id):
    return next(s for s in report["stages"] if s["id"] == stage_id)


def test_the_records_of_a_real_run(finished):
    paths = RunPaths(finished)
    deploy = read_done(paths.done(1, "deploy"))
    assert deploy["outputs_scheme"] == verify.OUTPUTS_SCHEME
    for k in (1, 2):
        entry = deploy["outputs"][f"round_1/deploy/step_{k}.jsonl"]
        assert entry["rows"] == len(read_jsonl(paths.deploy_step(1, k))) > 0
        assert entry["size"] == paths.deploy_step(1, k).stat().st_size
    assert read_done(paths.done(1, "consolidate"))["outputs"][MODEL]["size"] > verify.SMALL  # the cheap path
    assert plan_of(paths) == ({}, {}) and plan_of(paths, full=True) == ({}, {})


def test_damaged_weights_are_found_and_redone_with_what_read_them(finished, copy):
    """Flipped bytes in the exported model, its mtime put back: the cheap check cannot see it (documented), the
    full one can; `run.verify=full` redoes consolidation and evaluation, to the undamaged run's result."""
    flip(copy.root / MODEL, keep_mtime=True)
    assert plan_of(copy) == ({}, {})
    todo, redo = plan_of(copy, full=True)
    assert todo == {"r1/consolidate": [None], "r1/evaluate": [0, 2]}
    assert redo[("r1/consolidate", None)] == (f"r1/consolidate is damaged: {MODEL} differs from the sha256 its "
                                              "DONE marker records")
    assert redo[("r1/evaluate", 2)] == "r1/evaluate (step 2) depends on r1/consolidate, which is damaged"

    plain, full = run_module("oel_hpc.status", copy.root), run_module("oel_hpc.status", copy.root, "--verify")
    assert plain.returncode == full.returncode == 0, full.stderr
    assert "5 stages: 5 done" in plain.stdout
    assert "5 stages: 4 done, 1 damaged" in full.stdout
    [line] = [ln for ln in full.stdout.splitlines() if ln.startswith("r1/consolidate")]
    assert " damaged " in line and f"{MODEL} differs from the sha256" in line

    out = oel(copy.root.parent, "run.verify=full")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Nothing to do" not in out.stdout
    assert f"WARNING: r1/consolidate is damaged: {MODEL} differs from the sha256" in out.stderr
    for name in ("r1/consolidate", "r1/evaluate (step 0)", "r1/evaluate (step 2)"):
        assert f"[{name}] done in" in out.stderr, name
    assert "[r1/deploy] done in" not in out.stderr and "[r1/gather] done in" not in out.stderr
    assert (copy.root / MODEL).read_bytes() == (finished / MODEL).read_bytes()
    for k in (0, 2):
        assert copy.eval_result(1, k).read_text() == RunPaths(finished).eval_result(1, k).read_text()
    assert status.collect(copy.root, verify=True)["all_done"]


def test_flipped_bytes_with_a_new_mtime_are_seen_by_the_cheap_check(copy):
    flip(copy.root / MODEL, keep_mtime=False)
    todo, redo = plan_of(copy)
    assert todo == {"r1/consolidate": [None], "r1/evaluate": [0, 2]} and ("r1/consolidate", None) in redo
    report = status.collect(copy.root)
    assert state(report, "r1/consolidate")["state"] == "damaged" and not report["all_done"]
    assert state(report, "r1/consolidate")["tasks"][0]["note"].startswith(f"{MODEL} differs from the sha256")
    assert state(report, "r1/evaluate")["state"] == "done"  # its own files are intact; the launcher redoes it


def test_a_deploy_file_cut_at_a_line_boundary(copy):
    """The consolidation job refuses it, naming the file (a job cannot redo its upstream); the launcher's plan
    redoes deployment and what depends on it."""
    step = copy.deploy_step(1, 2)
    size, lines = step.stat().st_size, step.read_text().splitlines(keepends=True)
    step.write_text("".join(lines[:len(lines) // 2]))
    todo, redo = plan_of(copy)
    assert todo == {"r1/deploy": [None], "r1/consolidate": [None], "r1/evaluate": [0, 2]}
    assert redo[("r1/deploy", None)].startswith(f"r1/deploy is damaged: round_1/deploy/step_2.jsonl has "
                                                f"{len(lines) // 2} rows")
    copy.done(1, "consolidate").unlink()  # as if the consolidation job were about to run
    job = run_module("oel_hpc.worker", copy.root, "r1/consolidate")
    assert job.returncode == 2
    assert error_line(job, "oel_hpc.worker") == (
        f"r1/consolidate reads what r1/deploy wrote, and {step} has {len(lines) // 2} rows ({step.stat().st_size} "
        f"bytes) where its DONE marker records {len(lines)} rows ({size} bytes): run the run's command again to redo "
        "r1/deploy and what depends on it")
    assert not copy.done(1, "consolidate").exists() and not (copy.consolidate_dir(1) / "DONE.started").exists()


def test_a_truncated_experience_list(copy):
    listing = copy.experience_list(1)
    listing.write_text(listing.read_text()[:100])
    report = status.collect(copy.root)
    assert state(report, "r1/gather")["state"] == "damaged"
    assert state(report, "r1/gather")["tasks"][0]["note"].startswith("round_1/experience_list.json is 100 bytes")
    todo, redo = plan_of(copy)
    assert ("r1/gather", None) in redo and todo["r1/consolidate"] == [None]
    copy.done(1, "consolidate").unlink()
    job = run_module("oel_hpc.worker", copy.root, "r1/consolidate")
    assert job.returncode == 2
    assert error_line(job, "oel_hpc.worker").startswith(f"r1/consolidate reads what r1/gather wrote, and {listing} "
                                                        "is 100 bytes where its DONE marker records ")


def test_an_unreadable_done_marker_is_damage(copy):
    done = copy.done(1, "deploy")
    done.write_text(done.read_text()[:50])
    todo, redo = plan_of(copy)
    assert redo[("r1/deploy", None)] == "r1/deploy is damaged: round_1/deploy/DONE cannot be read as a DONE marker"
    assert state(status.collect(copy.root), "r1/deploy")["state"] == "damaged"


def test_touched_files_still_count_as_done(copy):
    """A touch (or a copy that does not keep times) changes mtimes, not bytes: every file is hashed and matches."""
    markers = {p: p.read_bytes() for p in copy.root.rglob("DONE*")}
    for p in copy.root.rglob("*"):
        if p.is_file():
            os.utime(p)
    out = oel(copy.root.parent)
    assert out.returncode == 0 and "Nothing to do" in out.stdout, out.stderr[-3000:]
    assert {p: p.read_bytes() for p in markers} == markers
    assert status.collect(copy.root)["all_done"]


def test_a_job_redoes_its_own_damaged_task(finished, copy):
    """The worker finds its task done but damaged (an evaluation result: small, always hashed): it redoes it."""
    result = copy.eval_result(1, 2)
    text = result.read_text()
    assert '"games": 16' in text
    result.write_text(text.replace('"games": 16', '"games": 61'))  # the same size
    job = run_module("oel_hpc.worker", copy.root, "r1/evaluate", "--task", 2)
    assert job.returncode == 0, job.stderr[-3000:]
    assert ("WARNING: r1/evaluate (step 2) is damaged: round_1/eval/step_2.json differs from the sha256 its DONE "
            "marker records; redoing it") in job.stderr
    assert result.read_text() == RunPaths(finished).eval_result(1, 2).read_text()


def test_the_slurm_launcher_resubmits_a_damaged_task_and_what_depends_on_it(copy, bin_dir):  # noqa: F811
    sbatch = fake(bin_dir, "sbatch", "echo $((99 + CALLS))")
    fake(bin_dir, "squeue", "true")
    step = copy.deploy_step(1, 1)
    step.write_text("".join(step.read_text().splitlines(keepends=True)[:3]))
    cfg = compose(["cluster=local_slurm", f"run.root={copy.root.parent}", "wandb.mode=disabled"])
    nodes = build_dag(cfg)
    report = submit(cfg, copy, nodes, "run-hash", Slurm(quick()))
    assert [(s.node.id, s.tasks) for s in report.submitted] == [
        ("r1/deploy", [None]), ("r1/consolidate", [None]), ("r1/evaluate", [0, 2])]
    assert len(sbatch.read_text().splitlines()) == 3
    for cleared in (copy.done(1, "deploy"), step, copy.done(1, "consolidate"), copy.hf(1),
                    copy.done(1, "evaluate", 0), copy.eval_result(1, 2)):
        assert not cleared.exists(), cleared  # a job finds them not done, and runs
    assert copy.done(1, "gather").is_file() and copy.done(1, "extract", 1).is_file()
