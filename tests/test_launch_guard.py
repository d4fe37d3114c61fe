"""What the launchers check before they write or submit anything (issue 12): one writer per run (the run directory's
locks, across real processes, a holder killed with SIGKILL), a run directory outside run.root refused by the local
launcher too, and the interpreter Slurm jobs will run (the submitting one by default) checked before any sbatch.
No Slurm cluster: SLURM_CONF is unset and `sbatch`/`squeue` on the PATH are stand-ins that record their calls."""
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oel_hpc.errors import ConfigError, RunInUse, StageConflict
from oel_hpc.launch import guard, render
from oel_hpc.runlock import JOBS_LOCK, LAUNCH_LOCK, job_lock, launcher_lock, read_holder
from tests.conftest import ROOT, compose

RUN = "tiny-frozenlake"  # the default run.name
SYSTEM_PYTHON = "/usr/bin/python3"

_HOLDER = """
import sys, time
from pathlib import Path
from oel_hpc.runlock import job_lock, launcher_lock
run_dir, kind = Path(sys.argv[1]), sys.argv[2]
lock = job_lock(run_dir) if kind == "job" else launcher_lock(run_dir, "test holder", exclude_jobs=True)
with lock:
    print("held", flush=True)
    time.sleep(600)
"""


def hold(run_dir: Path, kind: str = "launcher") -> subprocess.Popen:
    """Another process holding the run's launcher lock (as the local launcher does) or a job's shared lock."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir), kind], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    if not ready or proc.stdout.readline().strip() != "held":
        proc.kill()
        proc.wait(timeout=30)
        pytest.fail(f"the holder did not take the lock: {proc.stderr.read()}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


@pytest.fixture
def holders():
    procs = []
    yield lambda run_dir, kind="launcher": procs.append(hold(run_dir, kind)) or procs[-1]
    for p in procs:
        stop(p)


def fake_slurm(folder: Path) -> Path:
    """sbatch, squeue, scancel that append their argv to folder/calls.jsonl (sbatch answers job id 4242)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, answer in (("sbatch", "echo 4242"), ("squeue", "true"), ("scancel", "true")):
        path = folder / name
        path.write_text(f"#!/bin/bash\n{sys.executable} -c 'import json,sys; open(sys.argv[1],\"a\")"
                        f".write(json.dumps(sys.argv[2:])+\"\\n\")' {folder / 'calls.jsonl'} {name} \"$@\"\n{answer}\n")
        path.chmod(0o755)
    return folder


def calls(folder: Path) -> list:
    log = folder / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def oel(*args, bin_dir: Path, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    env["PATH"] = f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "oel_hpc", *map(str, args), "wandb.mode=disabled"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(out) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oel_hpc: error: "), out.stderr
    return lines[0]


SUBMIT = ("-m", "hydra/launcher=submitit_slurm", "cluster=local_slurm")


# ---------------------------------------------------------------------------------------------------------------
# One writer per run


def test_a_second_launcher_is_refused_with_the_holder_named(tmp_path, holders):
    run_dir = tmp_path / "runs" / RUN
    holder = holders(run_dir)
    with pytest.raises(RunInUse) as e:
        with launcher_lock(run_dir, "second"):
            pytest.fail("two launchers held one run")
    message = str(e.value)
    assert f"run directory {run_dir} is in use by pid {holder.pid} on host {socket.gethostname()} since " in message
    assert "test holder" in message and "-c" in message  # what it is and its command
    info = read_holder(run_dir)
    assert info["pid"] == holder.pid and info["host"] == socket.gethostname()


def test_the_local_launcher_and_the_slurm_launcher_refuse_a_run_in_use(tmp_path, holders):
    root = tmp_path / "runs"
    holder = holders(root / RUN)
    bin_dir = fake_slurm(tmp_path / "bin")
    local = one_line_error(oel(f"run.root={root}", bin_dir=bin_dir))
    submit = one_line_error(oel(*SUBMIT, f"run.root={root}", bin_dir=bin_dir))
    for line in (local, submit):
        assert f"run directory {root / RUN} is in use by pid {holder.pid} on host " in line, line
    assert calls(bin_dir) == []  # nothing submitted, Slurm not even asked
    assert sorted(p.name for p in (root / RUN).iterdir()) == [JOBS_LOCK, LAUNCH_LOCK]  # nothing else written


def test_a_killed_holder_leaves_a_lock_the_next_command_takes_over(tmp_path, holders):
    run_dir = tmp_path / RUN
    holder = holders(run_dir)
    assert read_holder(run_dir)["pid"] == holder.pid
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    with launcher_lock(run_dir, "successor", exclude_jobs=True):
        info = read_holder(run_dir)
        assert (info["pid"], info["role"]) == (os.getpid(), "successor")  # the dead holder's details replaced
    assert (run_dir / LAUNCH_LOCK).read_text() == ""  # let go: nobody to name
    with launcher_lock(run_dir, "again"):  # and free again
        pass


def test_jobs_of_a_run_share_it_but_exclude_a_local_run(tmp_path, holders):
    run_dir = tmp_path / RUN
    run_dir.mkdir()  # a job's run directory exists (it read its config.yaml there)
    job = holders(run_dir, "job")
    with job_lock(run_dir):  # a second task of the same run (another array task, another rank)
        with launcher_lock(run_dir, "Slurm launcher"):  # a resubmission while the jobs run
            pass
    with pytest.raises(RunInUse, match=f"run directory {run_dir} has Slurm jobs running"):
        with launcher_lock(run_dir, "local launcher", exclude_jobs=True):
            pytest.fail("a local run started beside a running job")
    with launcher_lock(run_dir, "Slurm launcher"):  # the refused local run left nothing held
        pass
    stop(job)
    local = holders(run_dir)  # a local run holds the run: a job that starts now is refused, naming it
    with pytest.raises(RunInUse, match=f"in use by pid {local.pid} "):
        with job_lock(run_dir):
            pytest.fail("a job ran beside a local run")


def test_a_job_started_beside_a_local_run_is_refused_in_one_line(tmp_path, holders):
    run_dir = tmp_path / RUN
    run_dir.mkdir()
    cfg = compose([f"run.root={tmp_path}"])
    from omegaconf import OmegaConf

    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    local = holders(run_dir)
    out = subprocess.run([sys.executable, "-m", "oel_hpc.worker", str(run_dir), "r1/gather"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == out.stderr.strip().splitlines()[0]
    assert f"in use by pid {local.pid} on host" in out.stderr and not (run_dir / "round_1").exists()


# ---------------------------------------------------------------------------------------------------------------
# The run directory stays inside run.root, on the local path too


def test_the_local_launcher_refuses_a_run_directory_outside_the_root(tmp_path):
    root, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / RUN).symlink_to(elsewhere, target_is_directory=True)
    line = one_line_error(oel(f"run.root={root}", bin_dir=fake_slurm(tmp_path / "bin")))
    assert f"resolves to {elsewhere}, outside run.root {root}" in line
    assert list(elsewhere.iterdir()) == []  # refused before anything was written
    with pytest.raises(StageConflict):
        guard.check_run_dir(compose([f"run.root={root}"]))


# ---------------------------------------------------------------------------------------------------------------
# The interpreter jobs run


def test_jobs_run_the_submitting_interpreter_unless_told_otherwise():
    cfg = compose(["cluster=local_slurm"])
    assert cfg.cluster.python is None
    assert render.job_python(cfg) == os.path.abspath(sys.executable)  # the venv's own path, not its target
    assert render.job_python(compose(["cluster=local_slurm", "cluster.python=/opt/py/bin/python3"])) == \
        "/opt/py/bin/python3"
    assert render.job_python(compose(["cluster=h100", "cluster.container=/images/oel.sif"])) == "python"
    guard.check_job_python(cfg, Path("/nonexistent/run"))  # this interpreter imports oel_hpc: no error


def test_a_rendered_script_names_the_submitting_interpreter(tmp_path):
    out = oel("cluster=local_slurm", f"run.root={tmp_path}", "launch.render_only=true",
              bin_dir=fake_slurm(tmp_path / "bin"))
    assert out.returncode == 0, out.stderr
    text = (tmp_path / RUN / "slurm" / "r1_extract.sbatch").read_text()
    assert f"exec {os.path.abspath(sys.executable)} -m oel_hpc.worker " in text


def system_python_lacks_oel_hpc() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import oel_hpc.config"], cwd=ROOT, capture_output=True, timeout=60)
    return probe.returncode != 0


@pytest.mark.parametrize("python", ["/nonexistent/bin/python", "no-such-python-3.99", "system"])
def test_a_bad_interpreter_is_refused_before_any_sbatch(tmp_path, python):
    if python == "system":
        if not system_python_lacks_oel_hpc():
            pytest.skip(f"{SYSTEM_PYTHON} is missing or imports oel_hpc")
        python = SYSTEM_PYTHON
    root = tmp_path / "runs"
    bin_dir = fake_slurm(tmp_path / "bin")
    line = one_line_error(oel(*SUBMIT, f"run.root={root}", f"cluster.python={python}", bin_dir=bin_dir))
    assert line.startswith("oel_hpc: error: cluster.python: ") and python in line, line
    expected = {"/nonexistent/bin/python": "does not exist", "no-such-python-3.99": "is not on the PATH",
                SYSTEM_PYTHON: "cannot import oel_hpc (ModuleNotFoundError: No module named"}[python]
    assert expected in line, line
    assert calls(bin_dir) == [] and not root.exists()  # nothing submitted, no run directory


def test_the_check_runs_the_setup_lines_first(tmp_path):
    """A bare name that only cluster.setup puts on the PATH is found, as in the job; one it does not is refused."""
    cfg = compose(["cluster=local_slurm", "cluster.python=python-from-setup"])
    wrapper = tmp_path / "python-from-setup"
    wrapper.write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    cfg.cluster.setup = [f"export PATH={tmp_path}:$PATH"]
    guard.check_job_python(cfg, tmp_path)
    cfg.cluster.setup = ["true"]
    with pytest.raises(ConfigError, match=r"'python-from-setup' not found after cluster.setup"):
        guard.check_job_python(cfg, tmp_path)


def test_in_a_container_the_check_runs_inside_it(tmp_path, monkeypatch, capsys):
    """With cluster.container the probe goes through `apptainer exec` as the job's command does; without apptainer
    here it is skipped, with a warning that says so."""
    image = tmp_path / "oel.sif"
    image.write_text("an image")
    cfg = compose(["cluster=local_slurm", f"cluster.container={image}"])
    run_dir = tmp_path / "runs" / RUN
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apptainer = bin_dir / "apptainer"
    # a stand-in that records its argv, then runs what follows the image (here: the venv's python is the image's)
    apptainer.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path / "argv"}\nshift 4\nexec "$@"\n')
    apptainer.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    guard.check_job_python(cfg, run_dir)
    argv = (tmp_path / "argv").read_text().split("\n")
    assert argv[:6] == ["exec", "--bind", ",".join(render.container_binds(cfg, run_dir)), str(image), "python", "-c"]
    # an image without oel_hpc: refused
    apptainer.write_text("#!/bin/bash\necho \"ModuleNotFoundError: No module named 'oel_hpc'\" >&2\nexit 1\n")
    with pytest.raises(ConfigError, match=r"cluster\.python.*No module named 'oel_hpc'"):
        guard.check_job_python(cfg, run_dir)
    # no apptainer on this host: not checked, and said so
    apptainer.unlink()
    monkeypatch.setenv("PATH", str(bin_dir))  # (whether or not this host has a real one)
    guard.check_job_python(cfg, run_dir)
    assert "cluster.python not checked: apptainer is not installed here" in capsys.readouterr().err
