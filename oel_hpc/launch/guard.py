"""What the launchers check before they write or submit anything: the run directory lies inside `run.root` (both
launchers), and the interpreter the jobs will run exists and imports oel_hpc (the Slurm launcher)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from omegaconf import DictConfig

from oel_hpc.errors import ConfigError, StageConflict
from oel_hpc.launch.render import container_binds, job_python
from oel_hpc.log import get_logger
from oel_hpc.rundir import RunPaths

log = get_logger(__name__)

PYTHON_CHECK_TIMEOUT_S = 30.0
# what a job needs before its stage starts: oel_hpc's own torch-free modules (and their packages) importable, torch and
# transformers installed (found, not imported: importing torch can take longer than the whole check may)
_PROBE = "\n".join([
    "import importlib.util, os, oel_hpc, oel_hpc.config, oel_hpc.lifecycle, oel_hpc.pipeline, oel_hpc.worker",
    "for name in {packages}:",
    "    if importlib.util.find_spec(name) is None:",
    "        raise ModuleNotFoundError(f'No module named {name!r}')",
    "print('oel_hpc-probe', os.path.dirname(os.path.abspath(oel_hpc.__file__)))"])
_SETUP_DONE = "oel_hpc-setup-done"
_NOT_FOUND = 127  # bash's status for a command it cannot find


def check_run_dir(cfg: DictConfig, in_sweep: bool = False) -> RunPaths:
    """The run directory, which must lie inside run.root (a symlinked run name may not lead elsewhere). A run name
    `<sweep>/<point>` is a point of a sweep: its folder lies in the sweep's folder, which holds sweep.json (or is
    about to: `in_sweep`, the sweep launcher checking its points); a plain run name may not be a sweep's folder."""
    root = Path(cfg.run.root).expanduser().resolve()
    sweep, _, point = cfg.run.name.rpartition("/")
    run_dir = (root / cfg.run.name).resolve()
    expected = (root / sweep).resolve() if sweep else root
    if run_dir.parent != expected or (sweep and expected.parent != root):
        raise StageConflict(f"run directory {root / cfg.run.name} resolves to {run_dir}, outside run.root {root}")
    if sweep and not in_sweep and not (expected / "sweep.json").is_file():
        raise StageConflict(f"run.name '{cfg.run.name}' names point '{point}' of sweep '{sweep}', but {expected} "
                            "holds no sweep.json: a sweep is made with -m key=v1,v2 (docs/sweeps.md)")
    if not sweep and (run_dir / "sweep.json").is_file():
        raise StageConflict(f"run.name '{cfg.run.name}' is a sweep ({run_dir / 'sweep.json'}), not a run: pick "
                            "another run.name, or run its points with the sweep's command (-m)")
    return RunPaths(run_dir)


def check_job_python(cfg: DictConfig, run_dir: Path) -> None:
    """Run `<job python> -c 'import oel_hpc'` as a job would: after `cluster.setup`, in this directory (where
    sbatch starts jobs) with this environment (jobs get --export=ALL), inside the container when there is one.
    A failure is a ConfigError naming cluster.python: nothing is submitted. Checked on this host: a compute node
    that sees other files (another architecture, another mount) can still differ."""
    c = cfg.cluster
    python = job_python(cfg)
    packages = ("torch", "transformers") + (("vllm",) if cfg.engine.name == "vllm" else ())
    argv = [python, "-c", _PROBE.replace("{packages}", repr(packages))]
    if c.container is not None:
        if c.container_runtime != "apptainer" or shutil.which("apptainer") is None:
            why = ("apptainer is not installed here" if c.container_runtime == "apptainer"
                   else "pyxis images start only through srun")
            log.warning(f"cluster.python not checked: {why} (the jobs run {python} in {c.container})")
            return
        argv = ["apptainer", "exec", "--bind", ",".join(container_binds(cfg, run_dir)), str(c.container), *argv]
    elif not c.setup:  # without setup lines, this process's PATH is the jobs' PATH: say exactly what is missing
        _check_exists(python)
    script = "\n".join(["set -eo pipefail", *c.setup, f"echo {_SETUP_DONE}",
                        f"command -v -- {shlex.quote(argv[0])} >/dev/null || exit {_NOT_FOUND}",
                        f"exec {shlex.join(argv)}"])
    try:
        # /bin/bash: the shell of every rendered script
        out = subprocess.run(["/bin/bash", "-c", script], cwd=os.getcwd(), capture_output=True, text=True,
                             timeout=PYTHON_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConfigError("cluster.python", f"'{python} -c \"import oel_hpc\"' did not finish in "
                          f"{PYTHON_CHECK_TIMEOUT_S:.0f} s, so jobs may not start either") from None
    if _SETUP_DONE not in out.stdout:
        log.warning(f"cluster.python not checked: cluster.setup fails on this host ({_last_line(out.stderr)})")
        return
    if out.returncode == _NOT_FOUND and "oel_hpc-probe" not in out.stdout:
        where = ("in the container" if c.container is not None else "after cluster.setup" if c.setup
                 else "on the PATH")
        raise ConfigError("cluster.python", f"'{argv[0]}' not found {where}: nothing submitted")
    if out.returncode != 0 or "oel_hpc-probe" not in out.stdout:
        hint = ("" if c.python is None and c.container is None
                else "; set cluster.python to an interpreter that has it" + (
                    "" if c.container is not None else " (null: the one running this command)"))
        raise ConfigError("cluster.python", f"{python} cannot import oel_hpc ({_last_line(out.stderr)}): jobs would "
                          f"fail the same way, nothing submitted{hint}")
    found = out.stdout.split("oel_hpc-probe", 1)[1].strip()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if c.container is None and os.path.realpath(found) != os.path.realpath(here):
        log.warning(f"jobs will run oel_hpc from {found}, this command runs it from {here}")


def _check_exists(python: str) -> None:
    if os.sep in python:
        path = Path(python)  # as jobs run it: quoted, so no ~ expansion; relative to where sbatch runs
        if not path.exists():
            raise ConfigError("cluster.python", f"{python} does not exist: nothing submitted")
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ConfigError("cluster.python", f"{python} is not an executable file: nothing submitted")
    elif shutil.which(python) is None:
        raise ConfigError("cluster.python", f"'{python}' is not on the PATH (the PATH jobs inherit): nothing "
                          "submitted")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
