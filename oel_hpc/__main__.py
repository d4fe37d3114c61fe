"""`python -m oel_hpc [overrides]`: run the OEL pipeline (Hydra entry point).

Two launchers. `cluster.launcher=local` (the default `cluster=local`) runs every stage in this process through
`@hydra.main`. `cluster.launcher=slurm` (every Slurm preset: `cluster=local_slurm|a100|h100|b200`), or Hydra's
own launcher switch `-m hydra/launcher=submitit_slurm`, submits the run's DAG as sbatch jobs chained by
dependencies and exits as soon as they are queued: Hydra's submitit launcher would instead submit the whole app
as one array job and block until it ends, so it is never started. The config is composed with Hydra's compose
API (every override, group and `--cfg job` works as usual) and `hydra.launcher.*` values a user may pass
(partition, account, qos, constraint, timeout_min, gpus_per_node, cpus_per_task, mem_gb, nodes, tasks_per_node,
signal_delay_s, setup, additional_parameters, ...) are mapped onto `cluster.*` (see HYDRA_LAUNCHER_KEYS).
`launch.render_only=true` writes the sbatch scripts without submitting; `launch.plan_only=true` prints what would
be submitted (jobs, tasks, nodes x GPUs, time limits, GPU-hours, what the cluster would refuse) and writes nothing.

Sweeps (`-m key=a,b ...`, docs/sweeps.md): the points are expanded with Hydra's own override parser, as its basic
sweeper would (oel_hpc/launch/sweep.py), each composed and checked before anything is written or submitted (one bad
point refuses the sweep, naming the point and the key); a sweep of run.name N is the folder <run.root>/N/ with
sweep.json and one run directory per point, run.name `N/<point>`, the point named after its swept values. On Slurm
every point's DAG is submitted (or rendered), locally the points run one after another; `--cfg job` prints every
point's config. Hydra's own multirun is not used: it would run every point under one run.name.

Exit status (oel_hpc/errors.py, the same for `python -m oel_hpc.worker`): 0 done; 2 bad input, said in one line;
75 a consolidation stopped early with a checkpoint (the same command resumes it); anything else a failure.
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from oel_hpc import log
from oel_hpc.config import CONF_DIR, GROUPS, check_schema, config_error, validate
from oel_hpc.errors import ConfigError, SlurmError, exit_on_error

PROG = "oel_hpc"
logger = log.get_logger(__name__)

_GROUP_OVERRIDE = re.compile(r"^[+~]{0,2}(?P<group>\w+)=(?P<value>.*)$")


def config_dirs(argv: list[str]) -> Optional[list[Path]]:
    """The folders Hydra looks for config groups in: ours, plus --config-dir and hydra.searchpath=[...] ones
    (how a user brings a prompt set, env, ... kept outside this repository); None when one of them is not a
    folder we can list (a pkg:// search path), so only Hydra can tell what exists."""
    dirs, i = [CONF_DIR], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]).expanduser())
            i += 1
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]).expanduser())
        elif re.match(r"^[+~]{0,2}hydra\.searchpath=", arg):
            for entry in arg.split("=", 1)[1].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("pkg://"):
                    return None
                if entry:
                    dirs.append(Path(entry.removeprefix("file://")).expanduser())
        i += 1
    return dirs


def check_group_choices(argv: list[str]) -> None:
    """An unknown env/model/experiment/... gets a one-line error before Hydra's multi-line one."""
    dirs = config_dirs(argv)
    if dirs is None:
        return
    for arg in argv:
        m = _GROUP_OVERRIDE.match(arg)
        if not m or m["group"] not in GROUPS:
            continue
        if "(" in m["value"] or m["value"][:1] in "'\"":
            continue  # glob(), choice(), a quoted value: Hydra's parser reads it (the sweep checks each point)
        available = sorted({p.stem for d in dirs for p in (d / m["group"]).glob("*.yaml")})
        for value in m["value"].split(","):  # multirun sweeps list several
            if value and value != "null" and value not in available:
                raise ConfigError(m["group"], f"unknown {m['group']} '{value}' (available: {', '.join(available)})")


def run(cfg: DictConfig) -> None:
    if cfg.cluster.launcher == "slurm" or cfg.launch.render_only:
        # main() hands Slurm runs and sweeps to slurm_main / sweep_main: this is a bug, not bad input
        raise AssertionError("the local launcher got a Slurm run")
    from oel_hpc.launch.guard import check_run_dir
    from oel_hpc.launch.local import run_local
    from oel_hpc.pipeline import build_dag, run_hash
    from oel_hpc.summary import summary

    paths = check_run_dir(cfg)  # before anything is written
    nodes = build_dag(cfg)
    ran = run_local(cfg, paths, nodes, run_hash(cfg))
    if ran == 0:
        print(f"Nothing to do: every stage of run '{cfg.run.name}' is already done ({paths.root}). "
              "Pick another run.name for a new run.")
    print(summary(cfg, paths))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    # reported here: an exception that leaves this function is Hydra's to report (a stack trace, exit 1)
    with exit_on_error(PROG):
        validate(cfg)
        run(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Slurm: compose, validate, submit, exit.

STAGES = ("extract", "gather", "deploy", "consolidate", "evaluate")
# hydra.launcher.<key> (hydra-submitit-launcher's SlurmQueueConf) → what it sets here.
HYDRA_LAUNCHER_KEYS = {
    "partition": "cluster.partition", "account": "cluster.account", "qos": "cluster.qos",
    "constraint": "cluster.constraint", "gpus_per_node": "cluster.gpus_per_node",
    "cpus_per_task": "cluster.cpus_per_task", "mem_gb": "cluster.mem_gb",
    "timeout_min": "cluster.resources.<every stage>.time_min",
    "nodes": "cluster.resources.consolidate.nodes", "tasks_per_node": "cluster.resources.consolidate.tasks_per_node",
    "signal_delay_s": "cluster.signal_before_end_s", "setup": "cluster.setup (appended)",
    "additional_parameters": "cluster.extra_sbatch (appended as --key=value)",
    "exclude": "cluster.extra_sbatch", "mem_per_gpu": "cluster.extra_sbatch", "mem_per_cpu": "cluster.extra_sbatch",
    "cpus_per_gpu": "cluster.extra_sbatch", "gpus_per_task": "cluster.extra_sbatch",
}
_UNSUPPORTED = {
    "gres": "use cluster.gpus_per_node (and cluster.gpu_type)",
    "comment": "every job's comment names its run directory and stage",
    "name": "job names are oel:<run>:r<round>:<stage>",
    "array_parallelism": "use hydra.launcher.additional_parameters or cluster.extra_sbatch",
    "max_num_timeout": "consolidation requeues itself (cluster.requeue); other stages are resubmitted by "
                       "running the command again",
    "submitit_folder": "logs go to <run>/logs", "stderr_to_stdout": "stderr goes to the job's log already",
}
_LAUNCHER_ARG = re.compile(r"^[+~]{0,2}hydra\.launcher\.(?P<key>\w+)[.=]")


def _launcher_keys(argv: list[str]) -> list[str]:
    keys = []
    for arg in argv:
        m = _LAUNCHER_ARG.match(arg)
        if m:
            key = m["key"]
            if key in _UNSUPPORTED:
                raise ConfigError(f"hydra.launcher.{key}", f"not used by oel_hpc's Slurm launcher: {_UNSUPPORTED[key]}")
            if key not in HYDRA_LAUNCHER_KEYS:
                raise ConfigError(f"hydra.launcher.{key}", f"unknown (mapped keys: {', '.join(HYDRA_LAUNCHER_KEYS)})")
            if key not in keys:
                keys.append(key)
    return keys


def _option(key: str, value) -> str:
    return f"--{key.replace('_', '-')}" + ("" if value is None or value is True else f"={value}")


def compose_config(argv: list[str]) -> DictConfig:
    """The config `python -m oel_hpc <argv>` runs with, hydra.launcher.* mapped onto cluster.*."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    keys = _launcher_keys(overrides)
    if keys and "hydra/launcher=submitit_slurm" not in overrides:
        raise ConfigError(f"hydra.launcher.{keys[0]}", "needs hydra/launcher=submitit_slurm on the command line")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher if "launcher" in cfg.hydra else {}
    values = {k: OmegaConf.to_container(launcher[k]) if OmegaConf.is_config(launcher[k]) else launcher[k]
              for k in keys}
    with open_dict(cfg):
        del cfg["hydra"]
        c = cfg.cluster
        if "hydra/launcher=submitit_slurm" in overrides:
            c.launcher = "slurm"
        for key, value in values.items():
            target = HYDRA_LAUNCHER_KEYS[key]
            if key == "timeout_min":
                for stage in STAGES:
                    c.resources[stage].time_min = value
            elif key in ("nodes", "tasks_per_node"):
                c.resources.consolidate[key] = value
            elif key == "signal_delay_s":
                c.signal_before_end_s = value
            elif key == "setup":
                c.setup = [*c.setup, *(value or [])]
            elif key == "additional_parameters":
                c.extra_sbatch = [*c.extra_sbatch, *(_option(k, v) for k, v in (value or {}).items())]
            elif target == "cluster.extra_sbatch":
                if value is not None:
                    c.extra_sbatch = [*c.extra_sbatch, _option(key, value)]
            else:
                OmegaConf.update(cfg, target, value)
    return cfg


def slurm_main(cfg: DictConfig, show: Optional[str], resolve: bool) -> int:
    from oel_hpc.launch import guard, slurm
    from oel_hpc.pipeline import build_dag, plan, run_hash

    if show == "job":
        print(OmegaConf.to_yaml(cfg, resolve=resolve), end="")
        return 0
    render_only = bool(cfg.launch.render_only)
    validate(cfg, check_files=not render_only)
    paths = guard.check_run_dir(cfg)
    nodes = build_dag(cfg)
    if cfg.launch.plan_only:
        from oel_hpc.launch.plan import plan_only

        print(plan_only(cfg, paths, nodes))
        return 0
    if render_only:
        folder = slurm.render_only(cfg, paths, nodes)
        print(f"Rendered {len(nodes)} sbatch scripts and submit.sh for run '{cfg.run.name}' into {folder} "
              "(nothing submitted)")
        return 0
    if cfg.cluster.name == "local":
        logger.warning("cluster=local has no Slurm resources (1 node, no GPU, 60 min per job): pick a preset such "
                       "as cluster=local_slurm, a100, h100 or b200")
    # nothing is submitted (nor Slurm asked) with an interpreter the jobs would fail on; nothing to do: no check
    # (render_only neither: its scripts may be meant for another host)
    if cfg.launch.check_python and plan(paths, nodes, cfg.run.overwrite):
        guard.check_job_python(cfg, paths.root)
    report = slurm.submit(cfg, paths, nodes, run_hash(cfg))
    print(slurm.format_report(cfg, report))
    return 0


def compose_point(overrides: list[str]) -> DictConfig:
    """compose_config with Hydra's and OmegaConf's errors as one-line ConfigErrors."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        bad_value = config_error(e)  # a key or value the schema refuses (unknown, not of its type or set)
        if bad_value is not None:
            raise bad_value from None
        # a sweep value (key=a,b) without -m: Hydra's message says to add --multirun
        raise ConfigError("overrides", one_line(e)) from None


# ---------------------------------------------------------------------------------------------------------------
# Sweeps: every point composed and checked, the record written, then each point submitted (Slurm), rendered, or
# run here one after another (local).

def _point_error(point, e: ConfigError) -> ConfigError:
    text = str(e).removeprefix(f"{e.key}: ")
    params = ", ".join(f"{k}={v}" for k, v in point.params.items())
    return ConfigError(e.key, f"sweep point {point.name} ({params}): {text}")


def sweep_main(sweep, show: Optional[str], resolve: bool) -> int:
    from oel_hpc.launch.sweep import check_sweep_folder, merge_record, record_entry, write_record

    name, cfgs = _compose_points(sweep)
    if show == "job":
        for point, cfg in zip(sweep.points, cfgs):
            print(f"# sweep point {cfg.run.name}: {' '.join(point.overrides)}")
            print(OmegaConf.to_yaml(cfg, resolve=resolve), end="")
        return 0
    modes = {("slurm" if c.cluster.launcher == "slurm" else "local", bool(c.launch.render_only)) for c in cfgs}
    if len(modes) > 1:
        raise ConfigError("cluster.launcher", "a sweep's points must all run the same way (all on Slurm, all "
                          "local, or all render_only)")
    (mode, render_only), = modes
    folder = Path(cfgs[0].run.root).expanduser().resolve() / name
    check_sweep_folder(folder, name)
    checked = _check_points(sweep, cfgs, folder, submits=mode == "slurm" and not render_only
                             and not cfgs[0].launch.plan_only)
    if cfgs[0].launch.plan_only:  # every point's plan and the sweep's total; nothing written, not even the record
        from oel_hpc.launch.plan import format_plan, make_plan
        from oel_hpc.slurm import Slurm

        calls, gpu_h, cpu_h = 0, 0.0, 0.0
        for point, cfg, paths, nodes in checked:
            plan = make_plan(cfg, paths, nodes, None if cfg.launch.render_only else Slurm())
            print(f"== sweep '{name}' point {cfg.run.name}")
            print(format_plan(cfg, paths, plan))
            calls += len(plan.jobs)
            for job in plan.jobs:
                gpu_h, cpu_h = gpu_h + job.hours()[0], cpu_h + job.hours()[1]
        print(f"Sweep '{name}': {len(checked)} points, {calls} sbatch calls, at most {gpu_h:,.1f} GPU-hours and "
              f"{cpu_h:,.1f} CPU-hours in all (every task at its time limit)")
        return 0
    argv = ["python", "-m", PROG, *sys.argv[1:]]
    # each point's own command line: `python -m oel_hpc <overrides>` reruns that point alone
    entries = [record_entry(p, c.run.name, [*(o for o in p.overrides if not re.match(r"^[+~]*run\.name=", o)),
                                            f"run.name={c.run.name}"]) for p, c, _, _ in checked]
    record, changed = merge_record(folder, name, argv, sweep.params, entries)
    if changed and not (render_only and cfgs[0].launch.render_dir is not None):
        write_record(folder, record)

    if mode == "local" and not render_only:
        for k, (point, cfg, _, _) in enumerate(checked, 1):
            print(f"== sweep '{name}' point {k}/{len(checked)}: {point.name}", flush=True)
            run(cfg)
        print(f"Sweep '{name}': {len(checked)} points run one after another in {folder}. "
              f"See them with: python -m oel_hpc.status {folder}")
    elif render_only:
        from oel_hpc.launch import slurm

        for point, cfg, paths, nodes in checked:
            where = slurm.render_only(cfg, paths, nodes)
            print(f"  {cfg.run.name:<40} {len(nodes)} sbatch scripts and submit.sh in {where}")
        print(f"Rendered sweep '{name}' ({len(checked)} points; nothing submitted)")
    else:
        _submit_points(name, folder, checked)
    return 0


def _compose_points(sweep) -> tuple[str, list[DictConfig]]:
    """The sweep's name and every point's config, run.name `<sweep>/<point>`."""
    cfgs = []
    for point in sweep.points:
        try:
            check_group_choices(point.overrides)
            cfgs.append(compose_point(point.overrides))
        except ConfigError as e:
            raise _point_error(point, e) from None
    names = list(dict.fromkeys(c.run.name for c in cfgs))
    if len(names) > 1:
        raise ConfigError("run.name", f"the sweep's points have different run names ({', '.join(names)}): name the "
                          "sweep with run.name=<name>")
    name = names[0]
    if "/" in name:
        raise ConfigError("run.name", f"'{name}': a sweep's name is one folder name (its points are {name}/<point>)")
    for point, cfg in zip(sweep.points, cfgs):
        cfg.run.name = f"{name}/{point.name}"
        if cfg.launch.render_dir is not None:  # one folder per point: the points' scripts differ
            cfg.launch.render_dir = str(Path(cfg.launch.render_dir) / point.name)
    return name, cfgs


def _check_points(sweep, cfgs: list[DictConfig], folder: Path, submits: bool) -> list[tuple]:
    """(point, cfg, paths, nodes) per point, once every point passed what a single run is checked for: the schema,
    its files, the run directory guard, a finished stage of another config, the jobs' interpreter (once per cluster
    config), sbatch. One bad point refuses the sweep, before anything is written."""
    from oel_hpc.launch import guard
    from oel_hpc.pipeline import build_dag, plan

    checked, python_checked = [], set()
    for point, cfg in zip(sweep.points, cfgs):
        try:
            validate(cfg, check_files=not cfg.launch.render_only)
            paths = guard.check_run_dir(cfg, in_sweep=True)
            if paths.root.parent != folder:
                raise ConfigError("run.root", "a sweep's points must share run.root (they live in one folder)")
            nodes = build_dag(cfg)
            todo = plan(paths, nodes, cfg.run.overwrite)  # a finished stage of another config: refused here
            python = OmegaConf.to_yaml(cfg.cluster) + cfg.engine.name
            if submits and cfg.launch.check_python and todo and python not in python_checked:
                guard.check_job_python(cfg, paths.root)
                python_checked.add(python)
        except ConfigError as e:
            raise _point_error(point, e) from None
        checked.append((point, cfg, paths, nodes))
    if submits and shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found: run this on a Slurm login node (or start the test cluster: "
                         "tools/slurm/start.sh)")
    return checked


def _submit_points(name: str, folder: Path, checked: list[tuple]) -> None:
    """Each point's DAG in turn (the launcher's resume: only what is neither done nor queued); one line each."""
    from oel_hpc.launch import slurm
    from oel_hpc.pipeline import run_hash

    if checked[0][1].cluster.name == "local":
        logger.warning("cluster=local has no Slurm resources (1 node, no GPU, 60 min per job): pick a preset such "
                       "as cluster=local_slurm, a100, h100 or b200")
    lines = []
    for point, cfg, paths, nodes in checked:
        try:
            report = slurm.submit(cfg, paths, nodes, run_hash(cfg))
        except Exception:  # the points before it stay queued: say which
            print("\n".join([f"Sweep '{name}' ({folder}), stopped at point {cfg.run.name}:", *lines]), flush=True)
            raise
        lines.append(f"  {cfg.run.name:<40} {_point_outcome(report)}")
    print("\n".join([f"Sweep '{name}': {len(checked)} points ({folder}/sweep.json)", *lines,
                     f"Follow it with: python -m oel_hpc.status {folder}"]))


def _point_outcome(report) -> str:
    if report.submitted:
        jobs = ", ".join(s.job_id for s in report.submitted)
        return f"submitted {len(report.submitted)} jobs ({jobs})"
    if report.in_flight:
        return "nothing to submit: still queued or running"
    return "nothing to submit: already done"


def one_line(exc: BaseException) -> str:
    """Hydra's several-line message (what went wrong, then hints, the key again, where to read more) in one line."""
    lines = []
    while exc is not None:
        for line in str(exc).splitlines():
            if line.strip() and not line[:1].isspace() and not line.startswith(("See https://", "Set the environment")):
                lines.append(line.strip())
        exc = exc.__cause__
    return "; ".join(dict.fromkeys(lines)) or "could not compose the config"


_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc",
               "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--package", "-p",
               "--run", "-r", "--experimental-rerun")


def main() -> None:
    # Hydra's parser takes -m only before the first override; anywhere on the line is what users type
    flags = [a for a in sys.argv[1:] if a in ("-m", "--multirun")]
    sys.argv[1:] = flags[:1] + [a for a in sys.argv[1:] if a not in ("-m", "--multirun")]
    with exit_on_error(PROG):
        _main(sys.argv[1:])


def _main(argv: list[str]) -> None:
    check_group_choices(argv)
    if any(a.split("=")[0] in _INFO_FLAGS for a in argv):
        hydra_main()  # Hydra's own flags: Hydra answers
        return
    show, resolve, rest, i = None, False, [], 0
    while i < len(argv):
        if argv[i] in ("--cfg", "-c") and i + 1 < len(argv):
            show, i = argv[i + 1], i + 2
        elif argv[i] == "--resolve":
            resolve, i = True, i + 1
        else:
            rest.append(argv[i])
            i += 1
    if any(a in ("-m", "--multirun") for a in argv):
        if show in ("hydra", "all"):  # Hydra itself refuses --cfg with --multirun (with a traceback)
            raise ConfigError("--cfg", f"{show} shows one config, not a sweep's: drop -m, or use --cfg job to see "
                              "every point")
        from oel_hpc.launch.sweep import expand

        points = expand([a for a in rest if a not in ("-m", "--multirun")])
        if points is not None:
            sys.exit(sweep_main(points, show, resolve))
        # -m without a swept value: one run, as without -m (not Hydra's multirun, which would make its own folder)
        sys.argv[1:] = [a for a in sys.argv[1:] if a not in ("-m", "--multirun")]
    cfg = compose_point(rest)
    if (cfg.cluster.launcher != "slurm" and not cfg.launch.render_only and not cfg.launch.plan_only
            or show in ("hydra", "all")):
        if show is None:
            check_schema(cfg)  # before Hydra's multirun (-m) makes its sweep folder
        hydra_main()
        return
    sys.exit(slurm_main(cfg, show, resolve))


if __name__ == "__main__":
    main()
