"""`launch.plan_only=true`: what the Slurm launcher would submit now, what it may cost, and what the cluster would
refuse — printed, nothing submitted, nothing written.

The jobs are the launcher's own choice (oel_hpc.launch.slurm: the tasks neither DONE nor queued, arrays split by
MaxArraySize), so the plan is what a submission right after it would do. Per sbatch: the stage, its tasks (array
spec and offset), nodes × GPUs per task, the time limit, and an upper bound on the GPU-hours (tasks × nodes × GPUs
per node × time limit; CPU-hours the same with the CPUs of every task) per stage and in total: every task running
to its time limit.

The cluster is asked once each where it can be (`scontrol show config`, `scontrol show partition [<p>] -o`, and
`squeue` for the jobs of an earlier submission): MaxArraySize (splits), MaxJobCount, the partition's MaxTime,
MaxNodes and node count, and its GPUs when its TRES lists them. Without Slurm commands (or with
launch.render_only=true, scripts for another host) it says so, and MaxArraySize comes from cluster.max_array_size
or Slurm's default, 1001.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig

from oel_hpc.errors import SlurmError
from oel_hpc.launch import render
from oel_hpc.launch.slurm import _choose, _old_manifest, _queued_tasks, array_parts, max_array_size
from oel_hpc.pipeline import Node, survey
from oel_hpc.rundir import RunPaths
from oel_hpc.slurm import Slurm, array_spec, seconds_of

LABELS = {"extract": "seeds", "evaluate": "steps"}


@dataclass
class Job:
    """One sbatch the launcher would run."""
    node: Node
    tasks: list[Optional[int]]
    array: Optional[str]  # --array's value
    offset: Optional[int]
    after: list[str]  # what it waits for: node ids submitted now, job refs still queued
    res: render.Resources

    @property
    def count(self) -> int:
        return len(self.tasks)

    def hours(self) -> tuple[float, float]:
        """(GPU-hours, CPU-hours) if every task runs to its time limit."""
        h = self.count * self.res.nodes * self.res.time_min / 60
        return h * self.res.gpus_per_node, h * self.res.tasks_per_node * self.res.cpus_per_task


@dataclass
class Limits:
    max_array_size: int
    max_array_size_from: str
    asked: bool  # whether Slurm answered at all
    why_not: Optional[str] = None  # why the cluster was not asked (or did not answer)
    max_job_count: Optional[int] = None
    partition: Optional[dict] = None
    partition_problem: Optional[str] = None
    array_problem: Optional[str] = None


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    in_flight: dict[str, list[str]] = field(default_factory=dict)
    cancel: list[str] = field(default_factory=list)
    queue_problem: Optional[str] = None
    limits: Optional[Limits] = None
    warnings: list[str] = field(default_factory=list)


def cluster_limits(cfg: DictConfig, slurm: Optional[Slurm]) -> Limits:
    """MaxArraySize, MaxJobCount and the partition's settings: one `scontrol show config` and one `scontrol show
    partition` call; `slurm` None: not asked."""
    default = "Slurm's default; set cluster.max_array_size if yours differs"
    if slurm is None:
        size, source = max_array_size(cfg, None, ask=False)
        return Limits(size, source if cfg.cluster.max_array_size is not None else default, False,
                      "launch.render_only=true: the scripts may be meant for another cluster")
    try:
        config = slurm.show_config()
    except SlurmError as e:
        size, source = max_array_size(cfg, None, ask=False)
        return Limits(size, source if cfg.cluster.max_array_size is not None else default, False, str(e))
    limits = Limits(0, "", True)
    if cfg.cluster.max_array_size is not None:
        limits.max_array_size, limits.max_array_size_from = int(cfg.cluster.max_array_size), "cluster.max_array_size"
        if config.get("MaxArraySize", "").isdigit() and int(config["MaxArraySize"]) < limits.max_array_size:
            limits.array_problem = (f"cluster.max_array_size={limits.max_array_size} is above the cluster's "
                                    f"MaxArraySize {config['MaxArraySize']}: sbatch refuses an array index from "
                                    f"{config['MaxArraySize']} on")
    elif config.get("MaxArraySize", "").isdigit():
        limits.max_array_size, limits.max_array_size_from = int(config["MaxArraySize"]), "scontrol show config"
    else:
        limits.max_array_size, limits.max_array_size_from = 1001, "Slurm's default (scontrol shows no MaxArraySize)"
    if config.get("MaxJobCount", "").isdigit():
        limits.max_job_count = int(config["MaxJobCount"])
    try:
        found = slurm.partitions(cfg.cluster.partition)
        if cfg.cluster.partition is None:
            found = [p for p in found if p.get("Default") == "YES"]
            if not found:
                limits.partition_problem = "the cluster has no default partition: set cluster.partition"
        limits.partition = found[0] if found else None
    except SlurmError as e:
        limits.partition_problem = str(e)
    return limits


def make_plan(cfg: DictConfig, paths: RunPaths, nodes: list[Node], slurm: Optional[Slurm]) -> Plan:
    """What a submission now would do (read-only: DONE markers, the manifest, one squeue)."""
    out = Plan()
    found = survey(paths, nodes, cfg.run.overwrite, full=cfg.run.verify == "full")
    todo = {node.id: tasks for node, tasks in found.todo}
    live = {}
    if todo and slurm is not None:
        try:
            live = _queued_tasks(slurm, nodes, _old_manifest(paths))
        except SlurmError as e:
            out.queue_problem = f"squeue could not be asked ({e}): jobs of an earlier submission still queued " \
                                "are counted as not queued"
    choice = _choose(nodes, todo, live)
    out.in_flight, out.cancel = choice.keep, choice.cancel
    out.limits = cluster_limits(cfg, slurm)
    for n in nodes:
        tasks = choice.submit.get(n.id)
        if not tasks:
            continue
        after = [d for d in n.deps if d in choice.submit] + [ref for d in n.deps for ref in choice.keep.get(d, [])]
        res = render.stage_resources(cfg, n.stage)
        if n.tasks is None:
            out.jobs.append(Job(n, tasks, None, None, after, res))
            continue
        for part in array_parts(tasks, out.limits.max_array_size):
            out.jobs.append(Job(n, part.tasks, part.spec(cfg.cluster.array_throttle), part.offset, after, res))
    out.warnings = warnings(cfg, out)
    return out


def _minutes(text: Optional[str]) -> Optional[float]:
    """A partition's MaxTime (`UNLIMITED`, `60`, `1-00:00:00`, `12:00:00`) in minutes; None = no limit."""
    if text is None or text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    if text.isdigit():
        return float(text)
    if "-" in text and text.count(":") < 2:  # D-HH or D-HH:MM
        days, _, rest = text.partition("-")
        text = f"{days}-{rest}:00" + (":00" if ":" not in rest else "")
    s = seconds_of(text)
    return None if s is None else s / 60


def _number(text: Optional[str]) -> Optional[int]:
    return int(text) if text and text.isdigit() else None


def warnings(cfg: DictConfig, plan: Plan) -> list[str]:
    """One line per thing the cluster would refuse (or a submission would do differently than asked)."""
    out, limits = [], plan.limits
    if plan.queue_problem:
        out.append(plan.queue_problem)
    if limits.array_problem:
        out.append(limits.array_problem)
    by_node: dict[str, list[Job]] = {}
    for job in plan.jobs:
        by_node.setdefault(job.node.id, []).append(job)
    for node_id, jobs in by_node.items():
        if len(jobs) > 1:
            parts = "; ".join(f"{LABELS[j.node.stage]} {array_spec(j.tasks)}"
                              + (f" as indices {array_spec([t - j.offset for t in j.tasks])} (offset {j.offset})"
                                 if j.offset else "") for j in jobs)
            out.append(f"{node_id}: array indices must stay below MaxArraySize {limits.max_array_size}: split into "
                       f"{len(jobs)} arrays ({parts}); what depends on it waits for all of them")
    total_tasks = sum(j.count for j in plan.jobs)
    if limits.max_job_count is not None and total_tasks > limits.max_job_count:
        out.append(f"{total_tasks} tasks exceed MaxJobCount {limits.max_job_count}: once the queue holds that many "
                   "job records (an array task started is one), sbatch refuses more until some end")
    if limits.partition_problem:
        out.append(f"partition not checked: {limits.partition_problem}")
    p = limits.partition
    if p is not None:
        name = p.get("PartitionName", "?")
        if p.get("State") not in (None, "UP"):
            out.append(f"partition {name} is {p.get('State')}: jobs will wait until it is UP")
        max_time = _minutes(p.get("MaxTime"))
        total_nodes, max_nodes = _number(p.get("TotalNodes")), _number(p.get("MaxNodes"))
        gpus = _tres_gpus(p.get("TRES", ""))
        seen = set()
        for job in plan.jobs:
            if job.node.stage in seen:
                continue
            seen.add(job.node.stage)
            key = f"cluster.resources.{job.node.stage}"
            if max_time is not None and job.res.time_min > max_time:
                out.append(f"{key}.time_min={job.res.time_min} is over partition {name}'s MaxTime "
                           f"{p.get('MaxTime')} ({max_time:g} min): sbatch refuses the job")
            if total_nodes is not None and job.res.nodes > total_nodes:
                out.append(f"{key}.nodes={job.res.nodes} is more than partition {name}'s {total_nodes} nodes: "
                           "sbatch refuses the job")
            elif max_nodes is not None and job.res.nodes > max_nodes:
                out.append(f"{key}.nodes={job.res.nodes} is over partition {name}'s MaxNodes {max_nodes}: "
                           "sbatch refuses the job")
            if gpus is not None and job.res.gpus_per_node * job.res.nodes > gpus:
                out.append(f"{key} asks {job.res.nodes} x {job.res.gpus_per_node} GPUs, partition {name} has "
                           f"{gpus}: the job can never start")
    return out


def _tres_gpus(tres: str) -> Optional[int]:
    """The partition's GPUs from its TRES (`cpu=64,mem=500G,node=2,billing=64,gres/gpu=16`); None when not listed."""
    for item in tres.split(","):
        key, _, value = item.partition("=")
        if key == "gres/gpu" and value.isdigit():
            return int(value)
    return None


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h < 1000 else f"{h:,.0f}"


def format_plan(cfg: DictConfig, paths: RunPaths, plan: Plan) -> str:
    limits = plan.limits
    lines = [f"Plan for run '{cfg.run.name}' (run directory {paths.root}): nothing submitted, nothing written."]
    if limits.asked:
        p = limits.partition
        where = (f"partition {p.get('PartitionName')} (MaxTime {p.get('MaxTime')}, nodes {p.get('TotalNodes')})"
                 if p else "partition not known")
        lines.append(f"Cluster: {where}; MaxArraySize {limits.max_array_size} ({limits.max_array_size_from})"
                     + (f"; MaxJobCount {limits.max_job_count}" if limits.max_job_count else ""))
    else:
        lines.append(f"Cluster: not asked ({limits.why_not}); MaxArraySize {limits.max_array_size} "
                     f"({limits.max_array_size_from}); partition limits not checked")
    if not plan.jobs:
        what = ("every stage not done is still queued or running" if plan.in_flight
                else "every stage is already done")
        lines.append(f"Nothing to submit: {what}.")
    else:
        per_round: dict[int, int] = {}
        for job in plan.jobs:
            per_round[job.node.round] = per_round.get(job.node.round, 0) + 1
        lines.append(f"{len(plan.jobs)} sbatch calls (" + ", ".join(f"round {r}: {k}" for r, k in
                                                                     sorted(per_round.items())) + "):")
        lines.append(f"  {'stage':<16} {'tasks':>6}  {'array':<24} {'nodes x GPUs':>12}  {'CPUs':>5}  "
                     f"{'time':>7}  {'GPU-h':>9}  {'CPU-h':>9}  after")
        stage_totals: dict[str, list[float]] = {}
        for job in plan.jobs:
            gpu_h, cpu_h = job.hours()
            array = "-" if job.array is None else job.array + (f" (+{job.offset})" if job.offset else "")
            cpus = job.res.tasks_per_node * job.res.cpus_per_task
            lines.append(f"  {job.node.id:<16} {job.count:>6}  {array:<24} "
                         f"{f'{job.res.nodes} x {job.res.gpus_per_node}':>12}  {cpus:>5}  {job.res.time_min:>4} min"
                         f"  {_hours(gpu_h):>9}  {_hours(cpu_h):>9}  {','.join(job.after) or '-'}")
            totals = stage_totals.setdefault(job.node.stage, [0, 0.0, 0.0])
            totals[0] += job.count
            totals[1] += gpu_h
            totals[2] += cpu_h
        lines.append("Upper bound (every task runs to its time limit; tasks x nodes x GPUs per node x time):")
        for stage, (count, gpu_h, cpu_h) in stage_totals.items():
            lines.append(f"  {stage:<12} {int(count):>7} tasks  {_hours(gpu_h):>10} GPU-hours  "
                         f"{_hours(cpu_h):>10} CPU-hours")
        gpu_total = sum(t[1] for t in stage_totals.values())
        cpu_total = sum(t[2] for t in stage_totals.values())
        lines.append(f"  {'total':<12} {sum(j.count for j in plan.jobs):>7} tasks  {_hours(gpu_total):>10} "
                     f"GPU-hours  {_hours(cpu_total):>10} CPU-hours"
                     + ("  (no GPUs asked: CPU-hours are the cost)" if gpu_total == 0 else ""))
    for node_id, refs in plan.in_flight.items():
        lines.append(f"  {node_id}: still queued/running, not submitted again: {_refs(refs)}")
    if plan.cancel:
        lines.append(f"  would cancel (waiting on jobs that will never succeed, or on replaced jobs): "
                     f"{_refs(plan.cancel)}")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _refs(refs: list[str], most: int = 8) -> str:
    return ", ".join(refs[:most]) + (f" and {len(refs) - most} more" if len(refs) > most else "")


def plan_only(cfg: DictConfig, paths: RunPaths, nodes: list[Node], slurm: Optional[Slurm] = None) -> str:
    """The plan as printed; Slurm is not asked with launch.render_only=true."""
    if cfg.launch.render_only:
        slurm = None
    elif slurm is None:
        slurm = Slurm()
    return format_plan(cfg, paths, make_plan(cfg, paths, nodes, slurm))
