"""sbatch scripts for the stages of a run, rendered from its config: the scripts the Slurm launcher submits ARE
these files (written to `<run>/slurm/`), and `launch.render_only=true` writes the same files without submitting.

One script per DAG node (`r<round>_<stage>.sbatch`): extraction and evaluation are job arrays (the array index is
the seed / checkpoint step), consolidation is one job of N nodes × T tasks started through `srun`, one
torch.distributed rank per task. Every script runs `python -m oel_hpc.worker <run-dir> <stage-id>`, which reads
everything it needs from the run directory, so a requeued job (which replays its script) finds its own state.
What a submission adds on the command line (`--array=<pending tasks>`, `--dependency=afterok:…`) is never
written into a script: a script is a pure function of the config, and the committed example in `slurm/` is
checked against a fresh rendering by the tests.

Quoting. Three kinds of text reach a script, each with its own rule:
- `#SBATCH` directives are parsed by sbatch, not by a shell: a value is written bare when it holds only
  harmless characters, else in double quotes with `\\` and `"` escaped (sbatch's own syntax); a value with a
  newline or another control character is refused (it could start a line of its own).
- Shell words (the run directory, the interpreter, container images and bind paths, srun options) go through
  `shlex.quote`, always.
- `cluster.setup` lines are shell code by design (`module load cuda/12.4`, `source /opt/venv/bin/activate`):
  they run as written, after `set -eo pipefail`. Each must be one complete command line: no newline, no trailing
  backslash, no here-document, and `bash -n` must accept it on its own, so a line can never swallow or rewrite
  the rest of the script. `cluster.extra_sbatch` lines are sbatch options by design, under the same one-line rule.
Secrets are never rendered: jobs get the submitter's environment through `--export=ALL`.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from oel_hpc.errors import ConfigError
from oel_hpc.slurm import _no_control, array_spec, check_path_for_slurm, check_sbatch_line, check_setup_line, sbatch_value

ARRAY_STAGES = ("extract", "evaluate")


def script_name(node) -> str:
    return f"r{node.round}_{node.stage}.sbatch"


def job_name(cfg: DictConfig, node) -> str:
    """`oel:<run>:r<round>:<stage>`; an array's index is the seed / checkpoint step (squeue -o %i shows it)."""
    return f"oel:{cfg.run.name}:r{node.round}:{node.stage}"


@dataclass
class Resources:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: Optional[int]
    time_min: int
    exclusive: bool


def stage_resources(cfg: DictConfig, stage: str) -> Resources:
    c = cfg.cluster
    r = c.resources[stage]
    pick = lambda v, default: default if v is None else v  # noqa: E731
    return Resources(nodes=r.nodes, tasks_per_node=r.tasks_per_node,
                     gpus_per_node=pick(r.gpus_per_node, c.gpus_per_node),
                     cpus_per_task=pick(r.cpus_per_task, c.cpus_per_task),
                     mem_gb=pick(r.mem_gb, c.mem_gb), time_min=r.time_min,
                     exclusive=r.exclusive)


def container_binds(cfg: DictConfig, run_dir: Path) -> list[str]:
    """What a container must see: the run directory, a local model folder, gather.source's folder, and
    `cluster.container_binds`. Hub ids are resolved from the Hugging Face cache: bind it (HF_HOME) yourself."""
    binds = [str(run_dir)]
    model = Path(str(cfg.model.path)).expanduser()
    if model.is_dir():
        binds.append(str(model.resolve()))
    if cfg.gather.source is not None:
        binds.append(str(Path(cfg.gather.source).expanduser().resolve().parent))
    binds += [str(b) for b in cfg.cluster.container_binds]
    out = []
    for b in binds:
        if b not in out:
            out.append(b)
    return out


def job_python(cfg: DictConfig) -> str:
    """The interpreter a job runs: `cluster.python` when set; else the one running this command (submitit's rule:
    the venv you submit from, activated or not), or, in a container, the image's `python`."""
    if cfg.cluster.python is not None:
        return str(cfg.cluster.python)
    if cfg.cluster.container is not None:
        return "python"
    if not sys.executable:
        raise ConfigError("cluster.python", "null means this command's interpreter, but Python cannot tell its path "
                          "(sys.executable is empty): set cluster.python")
    return os.path.abspath(sys.executable)  # not resolved: a venv's python is a symlink that must stay the venv's


def worker_argv(cfg: DictConfig, run_dir: Path, node) -> list[str]:
    return [job_python(cfg), "-m", "oel_hpc.worker", str(run_dir), node.id]


def stage_command(cfg: DictConfig, run_dir: Path, node) -> list[str]:
    """The argv one task runs (for the consolidation: what srun starts on every rank)."""
    c = cfg.cluster
    argv = worker_argv(cfg, run_dir, node)
    res = stage_resources(cfg, node.stage)
    multi = node.stage == "consolidate"
    if c.container is None:
        return ["srun", "--kill-on-bad-exit=1", *argv] if multi else argv
    binds = container_binds(cfg, run_dir)
    if c.container_runtime == "apptainer":
        nv = ["--nv"] if res.gpus_per_node > 0 else []
        inner = ["apptainer", "exec", *nv, "--bind", ",".join(binds), str(c.container), *argv]
        return ["srun", "--kill-on-bad-exit=1", *inner] if multi else inner
    # pyxis: the container is a property of the srun step
    mounts = ",".join(f"{b}:{b}" for b in binds)
    step = ["--kill-on-bad-exit=1"] if multi else ["--ntasks=1"]
    return ["srun", *step, f"--container-image={c.container}", f"--container-mounts={mounts}", *argv]


def shell_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def directives(cfg: DictConfig, run_dir: Path, node) -> list[tuple[str, str]]:
    """(#SBATCH option, value) pairs; value '' for a flag."""
    c = cfg.cluster
    res = stage_resources(cfg, node.stage)
    check_path_for_slurm("run.root", str(run_dir))
    log = run_dir / "logs" / (f"r{node.round}_{node.stage}_%A_%a.out" if node.tasks is not None
                              else f"r{node.round}_{node.stage}_%j.out")
    d: list[tuple[str, str]] = [
        ("--job-name", job_name(cfg, node)),
        ("--comment", f"oel_hpc run={run_dir} stage={node.id}"),
        ("--output", str(log)),
        ("--open-mode", "append"),  # a requeued job adds to its log instead of wiping the preempted attempt's
    ]
    if node.tasks is not None:
        d.append(("--array", array_spec(node.tasks)))
    for key in ("partition", "account", "qos", "constraint"):
        if c[key] is not None:
            d.append((f"--{key}", str(c[key])))
    d += [("--nodes", str(res.nodes)), ("--ntasks-per-node", str(res.tasks_per_node)),
          ("--cpus-per-task", str(res.cpus_per_task))]
    if res.gpus_per_node > 0:
        gpu = f"gpu:{c.gpu_type}:{res.gpus_per_node}" if c.gpu_type else f"gpu:{res.gpus_per_node}"
        d.append(("--gres", gpu))
    if res.mem_gb is not None:
        d.append(("--mem", f"{res.mem_gb}G" if res.mem_gb > 0 else "0"))
    if res.exclusive:
        d.append(("--exclusive", ""))
    d.append(("--time", str(res.time_min)))
    d.append(("--requeue" if c.requeue else "--no-requeue", ""))
    if node.stage == "consolidate":
        d.append(("--signal", f"B:USR2@{c.signal_before_end_s}"))
    d += [("--kill-on-invalid-dep", "yes"), ("--export", "ALL")]
    return d


_FORWARD_USR2 = """\
# The trainer checkpoints and requeues itself on USR2 (sent --signal seconds before the time limit, or at
# preemption). Slurm signals this batch shell (B:); forward it to the training step and wait for it to end.
"${cmd[@]}" &
child=$!
trap 'echo "oel_hpc: USR2 received, forwarding to the training step" >&2; kill -USR2 "$child" 2>/dev/null || true' USR2
while :; do
    status=0
    wait "$child" || status=$?
    kill -0 "$child" 2>/dev/null || break
done
exit "$status"
"""


def render_script(cfg: DictConfig, run_dir: Path, node) -> str:
    """The sbatch script of one DAG node."""
    c = cfg.cluster
    # values that reach a line of the script: quoted, and never a newline (which would make a line of its own in
    # a comment or a directive, and an unreadable one in a quoted word)
    for key in ("run.name", "experiment", "cluster.name", "cluster.python", "cluster.container", "model.path"):
        _no_control(key, str(OmegaConf.select(cfg, key)))
    _no_control("run.root", str(run_dir))
    for i, b in enumerate(c.container_binds):
        _no_control(f"cluster.container_binds[{i}]", str(b))
    lines = ["#!/bin/bash",
             f"# oel_hpc: {node.id} of run '{cfg.run.name}'"
             f" (experiment {cfg.experiment or '-'}, cluster {c.name}), stage config hash {node.hash}.",
             "# Rendered from the run's config.yaml; do not edit: re-render with launch.render_only=true.",
             "# Submitted by the Slurm launcher with --array=<pending tasks> and --dependency=afterok:<upstream jobs>."]
    for opt, value in directives(cfg, run_dir, node):
        lines.append(f"#SBATCH {opt}" + (f"={sbatch_value(opt, value)}" if value != "" else ""))
    for i, extra in enumerate(c.extra_sbatch):
        check_sbatch_line(f"cluster.extra_sbatch[{i}]", extra)
        lines.append(f"#SBATCH {extra}")
    lines += ["", "set -eo pipefail"]
    if c.setup:
        lines.append("# cluster.setup")
        for i, line in enumerate(c.setup):
            check_setup_line(f"cluster.setup[{i}]", line)
            lines.append(line)
    # one compute thread per CPU Slurm gave the task (torch would otherwise use every core of a shared node)
    lines.append('export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"')
    task = " task ${SLURM_ARRAY_TASK_ID}" if node.tasks is not None else ""
    lines.append(f'echo "oel_hpc: {node.id}{task}: job ${{SLURM_JOB_ID}} on $(hostname) at $(date -Is)"')
    cmd = stage_command(cfg, run_dir, node)
    if node.stage == "consolidate":
        # rank 0's host and a port every rank derives alike (oel_hpc/train/distributed.py uses the same rule);
        # set here, outside any container (where scontrol exists), never inherited from the submitter
        lines += ['export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                  'export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"',
                  f"cmd=({shell_line(cmd)})", _FORWARD_USR2.rstrip("\n")]
    else:
        lines.append(f"exec {shell_line(cmd)}")
    return "\n".join(lines) + "\n"


def render_submit_sh(cfg: DictConfig, run_dir: Path, nodes, in_run_dir: bool) -> str:
    """A hand-submission script: every stage's script in DAG order, chained by afterok dependencies.

    It submits every stage (a task already DONE exits at once); the Python launcher is the one that resumes
    by submitting only what is not done."""
    var = lambda n: f"r{n.round}_{n.stage}"  # noqa: E731
    run_q = shlex.quote(str(run_dir))
    lines = ["#!/bin/bash",
             f"# Submit run '{cfg.run.name}' by hand: every stage's sbatch script in order, chained with afterok.",
             "# Rendered by oel_hpc with launch.render_only=true; relative paths in the config are relative to the",
             "# directory you submit from. To resume a run, prefer the python command (it submits only what is",
             "# not done and never a task whose job is still queued).",
             "set -euo pipefail",
             'here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
             f"run={run_q}",
             'mkdir -p "$run/logs"']
    if not in_run_dir:  # a copy elsewhere (e.g. the committed slurm/): it brings the run's config.yaml along
        lines += ['if [[ ! -e "$run/config.yaml" ]]; then',
                  '    cp "$here/config.yaml" "$run/config.yaml"',
                  'elif ! cmp -s "$here/config.yaml" "$run/config.yaml"; then',
                  '    echo "error: $run/config.yaml differs from $here/config.yaml (another config)" >&2; exit 1',
                  "fi"]
    for n in nodes:
        deps = ":".join(f"${{{d.replace('/', '_')}}}" for d in n.deps)
        dep = f" --dependency=afterok:{deps}" if deps else ""
        lines.append(f'{var(n)}="$(sbatch --parsable{dep} "$here/{script_name(n)}")"; '
                     f'{var(n)}="${{{var(n)}%%;*}}"')
        lines.append(f'echo "{n.id}: job ${{{var(n)}}}"')
    lines.append('echo "follow it with: python -m oel_hpc.status $run"')
    return "\n".join(lines) + "\n"


def render_run(cfg: DictConfig, run_dir: Path, nodes, in_run_dir: bool = False) -> dict[str, str]:
    """{file name: text}: every stage's script plus submit.sh. `in_run_dir`: the files go to <run>/slurm/, beside
    the run's config.yaml; otherwise submit.sh expects a config.yaml beside itself and copies it into the run."""
    files = {script_name(n): render_script(cfg, run_dir, n) for n in nodes}
    files["submit.sh"] = render_submit_sh(cfg, run_dir, nodes, in_run_dir)
    return files
